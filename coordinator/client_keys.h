// Client credentials of the coordinator (--client-keys FILE): one key per client, each
// with a name, and an admin role that sees and cancels every job. Worker groups and
// decoders prove the separate infrastructure secret (--secret-file); a client key is
// never accepted for those roles, nor the infrastructure secret for a client.
//
// File: one key per line, "NAME SECRET [client|admin]" ('#' starts a comment line).
// NAME: 1-64 of [A-Za-z0-9._-]; SECRET: 16-1024 bytes without spaces; the role defaults
// to client. A client holds its own line's "NAME SECRET" (wire::load_key_file).
// The file is re-read when its mtime, size or inode changes (checked about once a
// second) or on SIGHUP; a removed or changed key closes that client's connections.
#pragma once
#include <sys/types.h>

#include <cstddef>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace mprefill::coord {

struct ClientKey {
  std::string name, secret;
  bool admin = false;
};

using ClientKeyMap = std::map<std::string, ClientKey>;

// Parses a keys file's text; throws std::runtime_error naming `path` and the line (never
// a secret).
ClientKeyMap parse_client_keys(const std::string& text, const std::string& path);

// A keys file watched for changes. Thread-safe.
class ClientKeyFile {
 public:
  static constexpr size_t kMaxBytes = size_t{1} << 20;
  explicit ClientKeyFile(std::string path);  // loads it; throws naming the path
  std::shared_ptr<const ClientKeyMap> keys() const;
  // Reads the file again when it changed (force: always). true when the keys were
  // replaced; a file that no longer parses keeps the old keys and sets *error.
  bool reload(bool force, std::string* error);
  const std::string& path() const { return path_; }

 private:
  struct Stamp {
    dev_t dev = 0;
    ino_t ino = 0;
    off_t size = -1;
    timespec mtime{};
    bool operator==(const Stamp& o) const {
      return dev == o.dev && ino == o.ino && size == o.size && mtime.tv_sec == o.mtime.tv_sec &&
             mtime.tv_nsec == o.mtime.tv_nsec;
    }
  };
  std::string path_;
  mutable std::mutex mu_;
  std::shared_ptr<const ClientKeyMap> keys_;  // under mu_
  Stamp stamp_;                               // under mu_
};

}  // namespace mprefill::coord
