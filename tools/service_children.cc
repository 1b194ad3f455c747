#include "tools/service_children.h"

#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <thread>

namespace mprefill::cli {

using Clock = std::chrono::steady_clock;

std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  if (DIR* d = ::opendir("/proc")) {
    while (dirent* e = ::readdir(d)) {
      std::ifstream f(std::string("/proc/") + e->d_name + "/stat");
      std::string st;
      int ppid = 0;
      if (std::getline(f, st) && st.rfind(')') != std::string::npos &&
          std::sscanf(st.c_str() + st.rfind(')') + 1, " %*c %d", &ppid) == 1 && ppid == pid)
        out.push_back(static_cast<pid_t>(std::atoi(e->d_name)));
    }
    ::closedir(d);
  }
  return out;
}

void Child::spawn(const std::vector<std::string>& args, const std::vector<std::string>& env_extra) {
  std::vector<char*> argv;
  for (const auto& s : args) argv.push_back(const_cast<char*>(s.c_str()));
  argv.push_back(nullptr);
  pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed for " + what + ": " + std::strerror(errno));
  if (pid == 0) {
    ::setpgid(0, 0);
    ::dup2(STDERR_FILENO, STDOUT_FILENO);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    for (const auto& e : env_extra) ::putenv(const_cast<char*>(e.c_str()));
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "mprefill: error: cannot run %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also from the parent: no race with the signal below
}

bool Child::poll() {
  if (pid <= 0 || exited) return exited;
  const pid_t r = ::waitpid(pid, &status, WNOHANG);
  if (r == pid) exited = true;
  return exited;
}

std::string Child::exit_text() const {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
  return "ended";
}

void Child::stop(int grace_ms, bool children_first) {
  if (pid <= 0 || poll()) return;
  const auto until = Clock::now() + std::chrono::milliseconds(grace_ms);
  auto wait_until = [&](Clock::time_point t) {
    while (Clock::now() < t && !poll()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return exited;
  };
  std::vector<pid_t> kids;
  if (children_first) {
    kids = children_of(pid);
    for (pid_t k : kids) ::kill(k, SIGTERM);
  }
  if (kids.empty() || !wait_until(Clock::now() + std::chrono::milliseconds(grace_ms / 2))) {
    ::kill(-pid, SIGTERM);
    wait_until(until);
  }
  if (!poll())  // children of a live leader are its own (no reused pid)
    for (pid_t k : children_of(pid)) ::kill(k, SIGKILL);
  ::kill(-pid, SIGKILL);  // stragglers of the group (ranks) even when the leader exited
  if (!exited) {
    ::waitpid(pid, &status, 0);
    exited = true;
  }
}

void RunCleanup::stop_children() {
  std::vector<std::thread> t;
  for (Child* c : children) t.emplace_back([c, this] { c->stop(5000, c == mpirun); });
  for (auto& th : t) th.join();
}

RunCleanup::~RunCleanup() {
  stop_children();
  if (!secret_path.empty()) ::unlink(secret_path.c_str());
}

}  // namespace mprefill::cli
