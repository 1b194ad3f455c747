#include "kernels/edge_check.h"

#include <atomic>

namespace mprefill {
namespace {
std::atomic<int> g_rank{-1};
std::atomic<int> g_device{-1};
std::atomic<const char*> g_role{nullptr};

// Source paths relative to the repository root when they contain one of its folders.
std::string_view short_path(std::string_view file) {
  for (std::string_view root : {"/engine/", "/kv/", "/worker/", "/decode/", "/search/", "/tools/",
                                "/bench/", "/coordinator/", "/model/", "/tests/", "/kernels/"}) {
    const size_t p = file.rfind(root);
    if (p != std::string_view::npos) return file.substr(p + 1);
  }
  return file;
}
}  // namespace

void set_edge_context(int rank, int device, const char* role) {
  g_rank.store(rank, std::memory_order_relaxed);
  g_device.store(device, std::memory_order_relaxed);
  g_role.store(role, std::memory_order_relaxed);
}
int edge_rank() { return g_rank.load(std::memory_order_relaxed); }
int edge_device() { return g_device.load(std::memory_order_relaxed); }
const char* edge_role() { return g_role.load(std::memory_order_relaxed); }

std::string edge_prefix() {
  const int r = edge_rank(), d = edge_device();
  const char* role = edge_role();
  std::string who = role ? role : "";
  if (r >= 0) who += (who.empty() ? "rank " : " rank ") + std::to_string(r);
  const std::string dev = d >= 0 ? "cuda:" + std::to_string(d) : "";
  if (who.empty()) return dev.empty() ? "" : dev + ": ";
  return who + (dev.empty() ? "" : " (" + dev + ")") + ": ";
}

void throw_status(Status s, std::string_view what, std::string_view backend_error, const char* file,
                  int line) {
  std::string text = edge_prefix();
  text.append(what).append(" failed: ").append(to_string(s));
  if (!backend_error.empty()) text.append(" (").append(backend_error).append(")");
  text.append(" [").append(short_path(file)).append(":").append(std::to_string(line)).append("]");
  throw StatusError(s, text);
}

}  // namespace mprefill
