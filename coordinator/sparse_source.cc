#include "coordinator/sparse_source.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>

#include "coordinator/planner.h"

namespace mprefill::coord {

namespace {

constexpr const char* kLimitFlag = "--max-config-bytes";

// Closes the descriptor on every exit path.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

std::string quoted(const std::string& name) {
  std::string q(1, '\'');
  q.append(printable_name(name)).push_back('\'');
  return q;
}

[[noreturn]] void refuse(const std::string& why) {
  throw SparseSourceError("sparse config " + why);
}

std::string over_limit(const std::string& what, uint64_t bytes, size_t limit) {
  return what + " has " + std::to_string(bytes) + " bytes, over the coordinator's limit of " +
         std::to_string(limit) + " (" + kLimitFlag + ")";
}

// The policy of a JSON text: invalidity is reported without the parser's excerpt of the text
// (the text of a named config is the server's; the client learns only that it is broken).
SparsePolicy parse_config(const std::string& text, const std::string& label,
                          const ModelConfig& cfg) {
  if (!nlohmann::json::accept(text)) refuse(label + ": not valid JSON");
  try {
    return parse_minference_config(text, label, cfg);
  } catch (const std::exception& e) {
    std::string why = std::string("sparse ") + e.what();  // "sparse config NAME: ..."
    if (why.size() > 300) why = why.substr(0, 300) + "...";
    throw SparseSourceError(valid_utf8(why));
  }
}

}  // namespace

bool valid_config_name(const std::string& name) {
  if (name.empty() || name.size() > kMaxConfigName || name[0] == '.') return false;
  if (name.find("..") != std::string::npos) return false;
  for (char c : name) {
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::string printable_name(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < kMaxConfigName; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    out += c >= 0x20 && c < 0x7f && c != '\'' ? static_cast<char>(c) : '?';
  }
  if (s.size() > kMaxConfigName) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

std::string canonical_config_dir(const std::string& dir) {
  char buf[PATH_MAX];
  if (!::realpath(dir.c_str(), buf))
    throw std::runtime_error("--config-dir " + dir + ": " + std::strerror(errno));
  struct stat st {};
  if (::stat(buf, &st) != 0 || !S_ISDIR(st.st_mode))
    throw std::runtime_error("--config-dir " + dir + ": not a directory");
  return buf;
}

// Empty when name may be looked up in the config directory, else the refusal.
static std::string name_problem(const SparseSource& src, const std::string& name) {
  if (!valid_config_name(name))
    return "sparse config " + quoted(name) + ": not a built-in (dense, auto) nor a config name (" +
           std::to_string(kMaxConfigName) +
           " bytes at most of A-Z a-z 0-9 . _ -, no '..', not a path); send a local file's JSON "
           "inline instead (sparse_config; the CLI does so for a path)";
  if (src.config_dir.empty())
    return "sparse config " + quoted(name) +
           ": this coordinator has no config directory (--config-dir); send the JSON inline";
  return "";
}

std::string read_named_config(const SparseSource& src, const std::string& name) {
  const std::string problem = name_problem(src, name);
  if (!problem.empty()) throw SparseSourceError(problem);
  const std::string file = name + ".json";
  Fd dir;
  dir.fd = ::open(src.config_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir.fd < 0) refuse(quoted(name) + ": the config directory cannot be opened");
  // Look before opening: a FIFO or device is never opened (opening one may block or act).
  struct stat st {};
  if (::fstatat(dir.fd, file.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    if (errno == ENOENT) refuse(quoted(name) + ": no such config in the coordinator's directory");
    refuse(quoted(name) + ": cannot be read (" + std::strerror(errno) + ")");
  }
  if (S_ISLNK(st.st_mode)) refuse(quoted(name) + ": is a symbolic link (refused)");
  if (!S_ISREG(st.st_mode)) refuse(quoted(name) + ": is not a regular file (refused)");
  if (static_cast<uint64_t>(st.st_size) > src.max_bytes)
    refuse(over_limit(quoted(name), static_cast<uint64_t>(st.st_size), src.max_bytes));
  Fd f;
  f.fd = ::openat(dir.fd, file.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (f.fd < 0)
    refuse(quoted(name) + (errno == ELOOP
                               ? std::string(": is a symbolic link (refused)")
                               : ": cannot be opened (" + std::string(std::strerror(errno)) + ")"));
  struct stat fst {};
  // The same regular file as looked at (not swapped in between).
  if (::fstat(f.fd, &fst) != 0 || !S_ISREG(fst.st_mode) || fst.st_ino != st.st_ino ||
      fst.st_dev != st.st_dev)
    refuse(quoted(name) + ": changed while opened (refused)");
  std::string text;
  text.resize(std::min<uint64_t>(static_cast<uint64_t>(fst.st_size), src.max_bytes) + 1);
  size_t got = 0;
  for (;;) {  // at most max_bytes + 1: a file that grew past the limit is refused
    const ssize_t n = ::read(f.fd, text.data() + got, text.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) refuse(quoted(name) + ": read failed (" + std::strerror(errno) + ")");
    if (n == 0) break;
    got += static_cast<size_t>(n);
    if (got > src.max_bytes) refuse(over_limit(quoted(name), got, src.max_bytes));
    if (got == text.size()) text.resize(std::min(text.size() * 2, src.max_bytes + 1));
  }
  text.resize(got);
  return text;
}

void check_sparse_option(const SparseSource& src, const v1::JobOptions& o) {
  if (!o.sparse_config().empty()) {
    if (o.sparse_config().size() > src.max_bytes)
      refuse(over_limit("sent inline", o.sparse_config().size(), src.max_bytes));
    if (!o.sparse().empty())
      refuse("both named (" + quoted(o.sparse()) +
             ") and sent inline: give one (sparse or sparse_config)");
    return;
  }
  const std::string& s = o.sparse();
  if (s.empty() || is_builtin_sparse_spec(s)) return;
  const std::string problem = name_problem(src, s);
  if (!problem.empty()) throw SparseSourceError(problem);
}

SparsePolicy resolve_sparse(const SparseSource& src, const v1::JobOptions& o,
                            const ModelConfig& cfg, int64_t dense_below) {
  check_sparse_option(src, o);
  SparsePolicy pol;
  if (!o.sparse_config().empty()) {
    pol = parse_config(o.sparse_config(), "(inline)", cfg);
    pol.source = "inline";
  } else if (o.sparse().empty() || is_builtin_sparse_spec(o.sparse())) {
    pol = load_sparse_policy(o.sparse().empty() ? "dense" : o.sparse(), cfg, dense_below);
  } else {
    pol = parse_config(read_named_config(src, o.sparse()), quoted(o.sparse()), cfg);
    pol.source = o.sparse();
  }
  pol.dense_below = dense_below;
  return pol;
}

}  // namespace mprefill::coord
