#include "kernels/cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>

#include "kernels/cpu/cpu.h"

namespace mprefill::cpu {
namespace {

int default_threads() {
  if (const char* e = std::getenv("MPREFILL_THREADS")) {
    const int n = std::atoi(e);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

std::atomic<int> g_threads{0};

}  // namespace

void set_num_threads(int n) { g_threads.store(n > 0 ? n : default_threads()); }

int num_threads() {
  int n = g_threads.load();
  if (n <= 0) {
    n = default_threads();
    g_threads.store(n);
  }
  return n;
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks = std::min<int64_t>(num_threads(), (n + grain - 1) / grain);
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  // Chunks are handed out dynamically so uneven work (causal rows) balances.
  const int64_t pieces = std::min<int64_t>(n, chunks * 8);
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < pieces;) {
      const int64_t b = n * i / pieces, e = n * (i + 1) / pieces;
      if (b < e) fn(b, e);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(chunks - 1);
  for (int64_t t = 1; t < chunks; ++t) threads.emplace_back(worker);
  worker();
  for (auto& t : threads) t.join();
}

}  // namespace mprefill::cpu
