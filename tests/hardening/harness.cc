#include "tests/hardening/harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "tests/testutil.h"

namespace mprefill::hardening {

namespace fs = std::filesystem;

std::string bin(const std::string& name) { return test::bin_dir() + "/" + name; }

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  if (!f) throw std::runtime_error("cannot write " + path);
}

std::string make_dir(const std::string& tag) {
  static int counter = 0;
  const std::string d = ::testing::TempDir() + "/hardening_" + tag + "_" +
                        std::to_string(::getpid()) + "_" + std::to_string(counter++);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

bool file_contains(const std::string& path, const std::string& needle) {
  return read_file(path).find(needle) != std::string::npos;
}

// ------------------------------------------------------------------------------ Proc

Proc::Proc(const std::vector<std::string>& args, const std::string& log,
           const std::vector<std::string>& env)
    : log_(log) {
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    ::setpgid(0, 0);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    for (const auto& e : env) ::putenv(const_cast<char*>(e.c_str()));
    std::vector<char*> argv;
    for (const auto& s : args) argv.push_back(const_cast<char*>(s.c_str()));
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    std::fprintf(stderr, "exec %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  ::setpgid(pid_, pid_);
}

bool Proc::running() {
  if (reaped_) return false;
  int st = 0;
  const pid_t r = ::waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    reaped_ = true;
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    return false;
  }
  return r == 0;
}

bool Proc::wait_log(const std::string& text, int timeout_ms) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (log().find(text) != std::string::npos) return true;
    if (!running() || std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

bool Proc::wait_exit(int timeout_ms, int* status) {
  const auto until = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (running()) {
    if (Clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (status) *status = status_;
  return true;
}

void Proc::signal_group(int sig) {
  if (pid_ > 0) ::kill(-pid_, sig);
}

namespace {
// Field 3 of /proc/PID/stat ('T' stopped, 't' traced; 0 when the process is gone).
char proc_state(pid_t pid) {
  const std::string st = read_file("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = st.rfind(')');
  return paren == std::string::npos || paren + 2 >= st.size() ? 0 : st[paren + 2];
}
void descendants(pid_t pid, std::vector<pid_t>* out) {
  for (pid_t c : children_of(pid)) {
    out->push_back(c);
    descendants(c, out);
  }
}
}  // namespace

bool Proc::freeze(bool stop, int timeout_ms) {
  if (pid_ <= 0) return false;
  const int sig = stop ? SIGSTOP : SIGCONT;
  ::kill(-pid_, sig);
  const auto until = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (true) {
    std::vector<pid_t> all = {pid_};
    descendants(pid_, &all);
    bool done = true;
    for (pid_t p : all) {
      const char s = proc_state(p);
      if (s == 0 || s == 'Z') continue;
      if ((s == 'T' || s == 't') != stop) {
        ::kill(p, sig);  // a descendant in another process group
        done = false;
      }
    }
    if (done) return true;
    if (Clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Proc::~Proc() {
  if (pid_ <= 0) return;
  // The group outlives its leader (mpirun's ranks): signal the group even when reaped.
  ::kill(-pid_, SIGTERM);
  const auto until = Clock::now() + std::chrono::seconds(5);
  while (running() && Clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ::kill(-pid_, SIGKILL);
  if (!reaped_) {
    int st;
    ::waitpid(pid_, &st, 0);
  }
}

// ------------------------------------------------------------------------------ floods

int connect_nonblocking(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 && errno != EINPROGRESS) {
    ::close(fd);
    return -1;
  }
  return fd;
}

SilentFlood::SilentFlood(uint16_t port, int n, std::string prefix) {
  th_ = std::thread([this, port, n, prefix] {
    std::vector<int> fds;
    std::vector<char> sent(static_cast<size_t>(n), 0);
    for (int i = 0; i < n; ++i) fds.push_back(connect_nonblocking(port));
    opened_ += n;
    char buf[4096];
    while (!stop_) {
      std::vector<pollfd> p;
      for (int fd : fds) p.push_back({fd, POLLIN, 0});
      if (::poll(p.data(), p.size(), 50) <= 0) continue;
      for (size_t i = 0; i < fds.size(); ++i) {
        if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t got = ::recv(fds[i], buf, sizeof(buf), 0);  // a ServerHello, or the close
        if (got > 0 && !prefix.empty() && !sent[i]) {
          (void)!::send(fds[i], prefix.data(), prefix.size(), MSG_NOSIGNAL);
          sent[i] = 1;
        }
        if (got == 0 || (got < 0 && errno != EAGAIN)) {
          ::close(fds[i]);
          fds[i] = connect_nonblocking(port);
          sent[i] = 0;
          ++opened_;
        }
      }
    }
    for (int fd : fds)
      if (fd >= 0) ::close(fd);
  });
}

void SilentFlood::stop() {
  stop_ = true;
  if (th_.joinable()) th_.join();
}

// ------------------------------------------------------------------------------ /proc

long rss_kb(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  return 0;
}

std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (const auto& t : fs::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
    std::istringstream is(read_file(t.path().string() + "/children"));
    pid_t c;
    while (is >> c) out.push_back(c);
  }
  return out;
}

std::string environ_of(pid_t pid, const std::string& key) {
  const std::string env = read_file("/proc/" + std::to_string(pid) + "/environ");
  size_t at = 0;
  while (at < env.size()) {
    const size_t end = env.find('\0', at);
    const std::string kv = env.substr(at, end == std::string::npos ? std::string::npos : end - at);
    if (kv.rfind(key + "=", 0) == 0) return kv.substr(key.size() + 1);
    if (end == std::string::npos) break;
    at = end + 1;
  }
  return "";
}

// ------------------------------------------------------------------------------ RawPeer

RawPeer::RawPeer(uint16_t port) : parser_(wire::kDefaultMaxFrame) {
  fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) throw std::runtime_error("socket failed");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    const int e = errno;
    ::close(fd_);
    fd_ = -1;
    throw std::runtime_error(std::string("connect 127.0.0.1:") + std::to_string(port) + ": " +
                             std::strerror(e));
  }
  int one = 1;
  ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

RawPeer::~RawPeer() { close(); }

void RawPeer::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void RawPeer::shutdown() {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

void RawPeer::send_bytes(const std::string& bytes) {
  size_t at = 0;
  while (fd_ >= 0 && at < bytes.size()) {
    const ssize_t w = ::send(fd_, bytes.data() + at, bytes.size() - at, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;  // the server closed: what the caller checks next
    at += static_cast<size_t>(w);
  }
}

RawPeer::Got RawPeer::next(v1::Envelope* env, int timeout_ms) {
  const auto until = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    std::string err;
    const auto r = parser_.next(env, &err);
    if (r == wire::FrameParser::Result::kOk) return Got::kFrame;
    if (r == wire::FrameParser::Result::kError) return Got::kBadFrame;
    if (fd_ < 0) return Got::kClosed;
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
    if (left <= 0) return Got::kTimeout;
    pollfd p{fd_, POLLIN, 0};
    const int pr = ::poll(&p, 1, static_cast<int>(left));
    if (pr == 0) return Got::kTimeout;
    if (pr < 0) {
      if (errno == EINTR) continue;
      return Got::kClosed;
    }
    char buf[65536];
    const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      // Frames already buffered are still returned above; then kClosed.
      std::string e2;
      const auto r2 = parser_.next(env, &e2);
      if (r2 == wire::FrameParser::Result::kOk) return Got::kFrame;
      return Got::kClosed;
    }
    parser_.feed(buf, static_cast<size_t>(n));
  }
}

bool RawPeer::next_error(v1::Error* err, int timeout_ms) {
  const auto until = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
    if (left <= 0) return false;
    v1::Envelope env;
    if (next(&env, static_cast<int>(left)) != Got::kFrame) return false;
    if (env.has_error()) {
      *err = env.error();
      return true;
    }
  }
}

bool RawPeer::closed_within(int timeout_ms) {
  const auto until = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
    if (left <= 0) return false;
    v1::Envelope env;
    const Got g = next(&env, static_cast<int>(left));
    if (g == Got::kClosed) return true;
    if (g == Got::kTimeout) return false;
    if (g == Got::kBadFrame) return false;
  }
}

bool RawPeer::hello(v1::Role role, const std::string& name, const std::string& secret,
                    std::string* why, uint32_t version, const std::string& key_id) {
  v1::Envelope env;
  if (next(&env, 5000) != Got::kFrame || !env.has_server_hello()) {
    *why = "no ServerHello";
    return false;
  }
  nonce_ = env.server_hello().nonce();
  v1::Envelope h;
  h.set_version(wire::kProtocolVersion);
  auto* ch = h.mutable_client_hello();
  ch->set_version(version);
  ch->set_role(role);
  ch->set_name(name);
  ch->set_client_nonce(wire::random_nonce());
  ch->set_key_id(key_id);
  if (!secret.empty()) ch->set_proof(wire::hello_proof(secret, wire::binding_of(*ch, nonce_)));
  send(h);
  v1::Envelope ans;
  const Got g = next(&ans, 5000);
  if (g != Got::kFrame) {
    *why = "no answer to the ClientHello";
    return false;
  }
  if (ans.has_error()) {
    *why = v1::ErrorCode_Name(ans.error().code()) + ": " + ans.error().message();
    return false;
  }
  if (!ans.has_hello_accepted()) {
    *why = "expected HelloAccepted";
    return false;
  }
  return true;
}

// ------------------------------------------------------------------------------ processes

Coordinator::Coordinator(const std::string& d, const std::vector<std::string>& extra_args,
                         uint16_t fixed_port)
    : dir(d) {
  const std::string port_file = dir + "/port";
  fs::remove(port_file);
  std::vector<std::string> args = {bin("mprefill-coordinator"), "--port",
                                   std::to_string(fixed_port), "--port-file", port_file};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  proc = std::make_unique<Proc>(args, dir + "/coordinator.log");
  const auto until = Clock::now() + std::chrono::seconds(20);
  while (!test::file_exists(port_file) && Clock::now() < until && proc->running())
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::istringstream ps(read_file(port_file));
  int p = 0;
  ps >> p;
  if (p <= 0) throw std::runtime_error("coordinator did not start: " + proc->log());
  port = static_cast<uint16_t>(p);
}

std::unique_ptr<Proc> start_workers(const std::string& dir, const std::string& addr,
                                    const std::string& model, int ranks, const std::string& group,
                                    const std::string& secret_file,
                                    const std::vector<std::string>& extra) {
  std::vector<std::string> args = {MPREFILL_MPIEXEC,
                                   "--oversubscribe",
                                   "--bind-to",
                                   "none",
                                   "-np",
                                   std::to_string(ranks),
                                   bin("mprefill-worker"),
                                   "--coordinator",
                                   addr,
                                   "--model",
                                   model,
                                   "--group",
                                   group,
                                   "--threads",
                                   "1"};
  if (!secret_file.empty()) {
    args.push_back("--secret-file");
    args.push_back(secret_file);
  }
  args.insert(args.end(), extra.begin(), extra.end());
  return std::make_unique<Proc>(
      args, dir + "/workers-" + group + ".log",
      std::vector<std::string>{"OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
                               "OMPI_MCA_rmaps_base_oversubscribe=1"});
}

std::unique_ptr<Proc> start_decoder(const std::string& dir, const std::string& addr,
                                    const std::string& model, const std::string& name,
                                    const std::string& secret_file,
                                    const std::vector<std::string>& extra) {
  std::vector<std::string> args = {bin("mprefill-decoder"),
                                   "--coordinator",
                                   addr,
                                   "--model",
                                   model,
                                   "--name",
                                   name,
                                   "--threads",
                                   "1"};
  if (!secret_file.empty()) {
    args.push_back("--secret-file");
    args.push_back(secret_file);
  }
  args.insert(args.end(), extra.begin(), extra.end());
  return std::make_unique<Proc>(args, dir + "/decoder-" + name + ".log");
}

// ------------------------------------------------------------------------------ Client

Client::Client(uint16_t port, const std::string& secret, const std::string& name,
               const std::string& key_id) {
  conn_ = wire::Connection::connect("127.0.0.1", port, 5000);
  conn_->client_handshake(v1::CLIENT, name, wire::Credential{key_id, secret}, 5000);
}

v1::StatusReply Client::status(uint64_t job_id, int timeout_ms) {
  v1::Envelope e;
  e.set_version(wire::kProtocolVersion);
  e.mutable_status_request()->set_job_id(job_id);
  conn_->send(e, timeout_ms);
  const auto until = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
    if (left <= 0) throw std::runtime_error("no StatusReply within " + std::to_string(timeout_ms));
    v1::Envelope r;
    if (!conn_->recv(&r, static_cast<int>(left))) continue;
    if (r.has_status_reply()) return r.status_reply();
    if (r.has_error())
      throw std::runtime_error("status refused: " + v1::ErrorCode_Name(r.error().code()) + ": " +
                               r.error().message());
  }
}

bool Client::submit(const v1::SubmitJob& job, v1::JobAccepted* accepted, v1::Error* error,
                    int timeout_ms) {
  v1::Envelope e;
  e.set_version(wire::kProtocolVersion);
  *e.mutable_submit() = job;
  conn_->send(e, timeout_ms);
  const auto until = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
    if (left <= 0) throw std::runtime_error("no answer to SubmitJob");
    v1::Envelope r;
    if (!conn_->recv(&r, static_cast<int>(left))) continue;
    if (r.has_accepted()) {
      if (accepted) *accepted = r.accepted();
      return true;
    }
    if (r.has_error()) {
      if (error) *error = r.error();
      return false;
    }
  }
}

bool Client::wait_result(uint64_t job_id, v1::JobResult* result, v1::Error* error, int timeout_ms) {
  const auto until = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
    if (left <= 0) {
      if (error) {
        error->set_job_id(job_id);
        error->set_message("test: no result within " + std::to_string(timeout_ms) + " ms");
      }
      return false;
    }
    v1::Envelope r;
    if (!conn_->recv(&r, static_cast<int>(left))) continue;
    if (r.has_result() && r.result().job_id() == job_id) {
      if (result) *result = r.result();
      return true;
    }
    if (r.has_error() && r.error().job_id() == job_id) {
      if (error) *error = r.error();
      return false;
    }
  }
}

bool wait_status(uint16_t port, const std::string& secret, int timeout_ms,
                 const std::function<bool(const v1::StatusReply&)>& pred) {
  const auto until = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Clock::now() < until) {
    try {
      Client c(port, secret, "status-poller");
      while (Clock::now() < until) {
        if (pred(c.status())) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    } catch (const std::exception&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  return false;
}

bool wait_registered(uint16_t port, const std::string& secret, int groups, int decoders,
                     int timeout_ms) {
  return wait_status(port, secret, timeout_ms, [&](const v1::StatusReply& r) {
    return r.groups_size() >= groups && r.decoders_size() >= decoders;
  });
}

v1::SubmitJob tiny_job(int tokens, int decode_tokens) {
  v1::SubmitJob j;
  for (int i = 0; i < tokens; ++i) j.add_token_ids(3 + (i * 7919) % 250);
  j.mutable_options()->set_decode_tokens(decode_tokens);
  return j;
}

}  // namespace mprefill::hardening
