#include "coordinator/client_keys.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <stdexcept>

namespace mprefill::coord {

namespace {

bool valid_name(const std::string& n) {
  if (n.empty() || n.size() > 64) return false;
  for (char c : n)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'))
      return false;
  return true;
}

// Reads at most limit + 1 bytes of a regular file (fstat after open: no FIFO, no device).
std::string read_regular(const std::string& path, size_t limit, struct stat* st) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw std::runtime_error("client keys " + path + ": " + std::strerror(errno));
  std::string text;
  try {
    if (::fstat(fd, st) != 0 || !S_ISREG(st->st_mode))
      throw std::runtime_error("client keys " + path + ": not a regular file");
    char buf[65536];
    for (;;) {
      ssize_t n = ::read(fd, buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw std::runtime_error("client keys " + path + ": " + std::strerror(errno));
      if (n == 0) break;
      text.append(buf, static_cast<size_t>(n));
      if (text.size() > limit)
        throw std::runtime_error("client keys " + path + ": larger than " + std::to_string(limit) +
                                 " bytes");
    }
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  return text;
}

}  // namespace

ClientKeyMap parse_client_keys(const std::string& text, const std::string& path) {
  ClientKeyMap keys;
  std::istringstream in(text);
  std::string line;
  int no = 0;
  while (std::getline(in, line)) {
    ++no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    std::istringstream ls(line);
    ClientKey k;
    std::string role, extra;
    if (!(ls >> k.name) || k.name[0] == '#') continue;
    const std::string where = "client keys " + path + " line " + std::to_string(no);
    if (!valid_name(k.name))
      throw std::runtime_error(where + ": the name must be 1-64 of [A-Za-z0-9._-]");
    if (!(ls >> k.secret)) throw std::runtime_error(where + ": no secret for '" + k.name + "'");
    if (k.secret.size() < 16 || k.secret.size() > 1024)
      throw std::runtime_error(where + ": the secret of '" + k.name + "' must be 16-1024 bytes");
    if (ls >> role) {
      if (role != "admin" && role != "client")
        throw std::runtime_error(where + ": role must be client or admin");
      k.admin = role == "admin";
    }
    if (ls >> extra) throw std::runtime_error(where + ": expected NAME SECRET [client|admin]");
    if (keys.count(k.name)) throw std::runtime_error(where + ": '" + k.name + "' again");
    keys.emplace(k.name, std::move(k));
  }
  if (keys.empty()) throw std::runtime_error("client keys " + path + ": no key");
  return keys;
}

ClientKeyFile::ClientKeyFile(std::string path) : path_(std::move(path)) {
  std::string error;
  if (!reload(true, &error)) throw std::runtime_error(error);
}

std::shared_ptr<const ClientKeyMap> ClientKeyFile::keys() const {
  std::lock_guard<std::mutex> lk(mu_);
  return keys_;
}

bool ClientKeyFile::reload(bool force, std::string* error) {
  struct stat st {};
  if (!force) {
    if (::stat(path_.c_str(), &st) != 0) {
      if (error) *error = "client keys " + path_ + ": " + std::strerror(errno) + " (keys kept)";
      return false;
    }
    Stamp now{st.st_dev, st.st_ino, st.st_size, st.st_mtim};
    std::lock_guard<std::mutex> lk(mu_);
    if (now == stamp_) return false;
  }
  try {
    std::string text = read_regular(path_, kMaxBytes, &st);
    auto keys = std::make_shared<const ClientKeyMap>(parse_client_keys(text, path_));
    std::lock_guard<std::mutex> lk(mu_);
    keys_ = std::move(keys);
    stamp_ = Stamp{st.st_dev, st.st_ino, st.st_size, st.st_mtim};
    return true;
  } catch (const std::exception& e) {
    if (error) *error = e.what();
    std::lock_guard<std::mutex> lk(mu_);
    // The same broken file is reported once: remember its stamp.
    if (::stat(path_.c_str(), &st) == 0)
      stamp_ = Stamp{st.st_dev, st.st_ino, st.st_size, st.st_mtim};
    return false;
  }
}

}  // namespace mprefill::coord
