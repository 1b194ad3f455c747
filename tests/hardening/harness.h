// Harness of the service hardening tests (issue 7): the real binaries
// (mprefill-coordinator, an mpirun group of mprefill-worker, mprefill-decoder) started as
// child processes in their own process groups (killed with the group on teardown), raw
// TCP peers that send arbitrary bytes to 127.0.0.1, and a blocking client on
// wire::Connection. Every wait is bounded.
#pragma once
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "proto/wire.h"

namespace mprefill::hardening {

namespace v1 = ::mprefill::v1;
using Clock = std::chrono::steady_clock;

std::string bin(const std::string& name);  // build/bin/NAME
std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& text);
// A fresh folder under the test temp dir.
std::string make_dir(const std::string& tag);

// A child process in its own process group; stdout and stderr go to log.
class Proc {
 public:
  Proc(const std::vector<std::string>& args, const std::string& log,
       const std::vector<std::string>& env = {});
  ~Proc();  // SIGTERM to the group, SIGKILL after 5 s
  Proc(const Proc&) = delete;
  Proc& operator=(const Proc&) = delete;
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_; }
  std::string log() const { return read_file(log_); }
  bool running();
  // Waits up to timeout_ms until the log holds `text`; false if it did not or the process
  // ended first.
  bool wait_log(const std::string& text, int timeout_ms);
  // Waits up to timeout_ms for the exit; true with *status (exit code, or 128 + signal).
  bool wait_exit(int timeout_ms, int* status);
  void signal_group(int sig);
  // SIGSTOP (stop) or SIGCONT to the group and to every descendant (one that left the group
  // too), then waits up to timeout_ms until each is stopped (or running again); false if
  // one is not. A test that needs a frozen worker must not go on before this returns true.
  bool freeze(bool stop, int timeout_ms = 10000);

 private:
  pid_t pid_ = -1;
  std::string log_;
  bool reaped_ = false;
  int status_ = 0;
};

// VmRSS of a process in KiB (0 when it is gone).
long rss_kb(pid_t pid);
// Child pids of a process (/proc/PID/task/*/children).
std::vector<pid_t> children_of(pid_t pid);
// Value of an environment variable of another process ("" when absent or unreadable).
std::string environ_of(pid_t pid, const std::string& key);

// A non-blocking TCP connect to 127.0.0.1:port (-1 when it failed at once).
int connect_nonblocking(uint16_t port);

// n silent TCP connections to 127.0.0.1:port, each reopened as soon as the server closes it
// (a slowloris), held on a thread of their own until stop() or destruction.
class SilentFlood {
 public:
  // prefix: bytes each connection sends once its ServerHello came (e.g. the start of a
  // frame, then nothing: a slowloris); empty: silent.
  SilentFlood(uint16_t port, int n, std::string prefix = "");
  ~SilentFlood() { stop(); }
  SilentFlood(const SilentFlood&) = delete;
  SilentFlood& operator=(const SilentFlood&) = delete;
  void stop();
  int opened() const { return opened_.load(); }  // connections opened so far

 private:
  std::atomic<bool> stop_{false};
  std::atomic<int> opened_{0};
  std::thread th_;
};

// A TCP connection to 127.0.0.1:port that sends raw bytes and reads frames.
class RawPeer {
 public:
  explicit RawPeer(uint16_t port);
  ~RawPeer();
  void send_bytes(const std::string& bytes);  // false-free: a failed send is ignored (peer gone)
  void send(const v1::Envelope& env) { send_bytes(wire::encode_frame(env)); }
  enum class Got { kFrame, kTimeout, kClosed, kBadFrame };
  // The next frame within timeout_ms.
  Got next(v1::Envelope* env, int timeout_ms);
  // Waits for an Error frame (other frames are skipped): true with it.
  bool next_error(v1::Error* err, int timeout_ms);
  // True when the server closes the connection within timeout_ms (frames are drained).
  bool closed_within(int timeout_ms);
  // Reads ServerHello (nonce), sends a ClientHello (proof when secret is non-empty) and
  // waits for HelloAccepted. false with *why on anything else.
  bool hello(v1::Role role, const std::string& name, const std::string& secret, std::string* why,
             uint32_t version = wire::kProtocolVersion, const std::string& key_id = "");
  const std::string& nonce() const { return nonce_; }
  void close();
  void shutdown();  // from another thread: wakes a send_bytes blocked on a full socket

 private:
  int fd_ = -1;
  wire::FrameParser parser_;
  std::string nonce_;
};

// A running coordinator (--port 0, --port-file).
struct Coordinator {
  std::string dir;
  uint16_t port = 0;
  std::unique_ptr<Proc> proc;
  Coordinator(const std::string& dir, const std::vector<std::string>& extra_args,
              uint16_t fixed_port = 0);
  std::string addr() const { return "127.0.0.1:" + std::to_string(port); }
};

// The mpirun group of mprefill-worker and mprefill-decoder.
std::unique_ptr<Proc> start_workers(const std::string& dir, const std::string& addr,
                                    const std::string& model, int ranks, const std::string& group,
                                    const std::string& secret_file,
                                    const std::vector<std::string>& extra = {});
std::unique_ptr<Proc> start_decoder(const std::string& dir, const std::string& addr,
                                    const std::string& model, const std::string& name,
                                    const std::string& secret_file,
                                    const std::vector<std::string>& extra = {});

// Blocking client over wire::Connection (hello included).
class Client {
 public:
  // key_id: a client key of --client-keys (secret is then that key's secret).
  Client(uint16_t port, const std::string& secret = "", const std::string& name = "test-client",
         const std::string& key_id = "");
  v1::StatusReply status(uint64_t job_id = 0, int timeout_ms = 10000);
  // Sends SubmitJob; returns the JobAccepted or the Error that answered it.
  bool submit(const v1::SubmitJob& job, v1::JobAccepted* accepted, v1::Error* error,
              int timeout_ms = 10000);
  // Follows a job to its JobResult (true) or Error (false), up to timeout_ms.
  bool wait_result(uint64_t job_id, v1::JobResult* result, v1::Error* error, int timeout_ms);
  wire::Connection& conn() { return *conn_; }
  void close() { conn_->close(); }

 private:
  std::unique_ptr<wire::Connection> conn_;
};

// Polls status until `pred` holds (true) or timeout_ms passes (false).
bool wait_status(uint16_t port, const std::string& secret, int timeout_ms,
                 const std::function<bool(const v1::StatusReply&)>& pred);
// Waits until `groups` worker groups and `decoders` decoders are registered.
bool wait_registered(uint16_t port, const std::string& secret, int groups, int decoders,
                     int timeout_ms);

// token ids 3 + (i * 7919) % 250: inside random:tiny's vocabulary (512).
v1::SubmitJob tiny_job(int tokens, int decode_tokens);

// Occurrences of `needle` in a file.
bool file_contains(const std::string& path, const std::string& needle);

}  // namespace mprefill::hardening
