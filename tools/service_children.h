// `mprefill run`'s children: the decoder and the mpirun group, each in its own process
// group, stopped on every exit path (RunCleanup) within a bounded grace.
#pragma once
#include <sys/types.h>

#include <string>
#include <vector>

namespace mprefill::cli {

// Children of pid (/proc/*/stat: "PID (COMM) STATE PPID ...").
std::vector<pid_t> children_of(pid_t pid);

// A child in its own process group (so that mpirun and every rank it starts can be
// signalled together); its stdout goes to our stderr (stdout stays clean for --json).
struct Child {
  std::string what;
  pid_t pid = -1;
  int status = 0;
  bool exited = false;

  // Throws std::runtime_error when fork fails.
  void spawn(const std::vector<std::string>& args, const std::vector<std::string>& env_extra);
  // Non-blocking: true when it has exited (status recorded).
  bool poll();
  std::string exit_text() const;
  // SIGTERM to the process group, up to grace_ms, then SIGKILL. children_first (mpirun):
  // first to its children (the ranks, in process groups of their own), which finalize,
  // and mpirun exits 0 with them (signalled itself it waits ~2 s, then exits 1); its group
  // only when they have not ended within grace_ms / 2.
  void stop(int grace_ms, bool children_first = false);
};

struct RunCleanup {
  std::vector<Child*> children;
  Child* mpirun = nullptr;  // stopped through its ranks (Child::stop children_first)
  std::string secret_path;
  // All at once (each stops within a few hundred ms; one after another would add up).
  void stop_children();
  ~RunCleanup();
};

}  // namespace mprefill::cli
