// Where a job's sparse policy comes from, without a client ever naming a server file:
// a built-in ("dense", "auto"), the NAME of a config in the coordinator's --config-dir
// (read as DIR/NAME.json), or the JSON text sent inline with the job (sparse_config).
//
// A config name is [A-Za-z0-9._-], 1..kMaxConfigName bytes, not starting with '.', with no
// "..": it never spells a path. The file is opened with O_NOFOLLOW | O_NONBLOCK and must be
// a regular file (a symbolic link, FIFO, device or directory is refused before any byte is
// read) of at most max_bytes. Every refusal is one line that names the config (the name
// sanitised and cut at kMaxConfigName bytes) and the reason, never the server's directory
// and never a byte of the file.
#pragma once
#include <cstddef>
#include <stdexcept>
#include <string>

#include "common.pb.h"
#include "model/model_config.h"
#include "model/sparse_policy.h"

namespace mprefill::coord {

constexpr size_t kMaxConfigName = 64;

// A refusal to show the client as it is (INVALID_ARGUMENT).
struct SparseSourceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct SparseSource {
  std::string config_dir;  // canonical directory; empty: built-ins and inline only
  size_t max_bytes = 0;    // inline text and config files at most
};

// True for a name that may be looked up in the config directory.
bool valid_config_name(const std::string& name);
// The client's string fit for an error line: at most kMaxConfigName bytes, bytes outside
// printable ASCII as '?', and "... (N bytes)" when cut.
std::string printable_name(const std::string& s);
// The canonical form of a --config-dir (realpath; must be a directory). Throws
// std::runtime_error naming the directory.
std::string canonical_config_dir(const std::string& dir);
// The text of DIR/NAME.json under the rules above. Throws SparseSourceError.
std::string read_named_config(const SparseSource& src, const std::string& name);
// Cheap checks of options.sparse / sparse_config (sizes and the name's form), done before
// any work: throws SparseSourceError.
void check_sparse_option(const SparseSource& src, const v1::JobOptions& o);
// The policy of a job (file reading and JSON parsing happen here: call it outside the
// service lock). Throws SparseSourceError.
SparsePolicy resolve_sparse(const SparseSource& src, const v1::JobOptions& o,
                            const ModelConfig& cfg, int64_t dense_below);

}  // namespace mprefill::coord
