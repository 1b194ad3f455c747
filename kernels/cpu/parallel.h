// Minimal fork-join parallel loop for the CPU reference kernels.
#pragma once
#include <cstdint>
#include <functional>

namespace mprefill::cpu {

// Runs fn(begin, end) over [0, n) split into contiguous chunks on up to num_threads()
// threads (the caller's thread included). Blocks until all chunks finish. Exceptions
// must not escape fn. grain: minimum items per chunk.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace mprefill::cpu
