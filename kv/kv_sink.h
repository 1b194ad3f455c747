// KV export: where a prefill executor puts each layer's K (after RoPE, global positions)
// and V as soon as the layer is done. One interface for every executor (CPU engine, GPU
// engine, distributed ranks) and every destination (a KvCache in memory, a file, pinned
// host buffers, the TCP / NCCL handoff to a decoder).
//
// Shapes: a slice holds rows for the global token ranges `tokens` (ascending, disjoint;
// a zigzag sequence-parallel shard has two) in that order, each row
// [n_kv_heads][head_dim] for the model KV heads listed in `kv_heads` (ascending; a
// tensor-parallel rank's heads need not be contiguous). Row-major, no padding:
// k[(row * n_kv_heads + h) * head_dim + d].
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/types.h"

namespace mprefill {

struct KvSlice {
  int layer = 0;
  std::vector<int> kv_heads;                        // model KV-head ids, ascending
  std::vector<std::pair<int64_t, int64_t>> tokens;  // global [begin, end), ascending
  int head_dim = 0;
  DType dtype = DType::kF32;  // kF32 (CPU) or kBF16 (GPU)
  const void* k = nullptr;    // [rows][kv_heads.size()][head_dim]
  const void* v = nullptr;    // same shape
  bool on_device = false;     // k / v are CUDA device pointers, ready on `stream`
  void* stream = nullptr;     // cudaStream_t when on_device

  int64_t rows() const {
    int64_t r = 0;
    for (const auto& t : tokens) r += t.second - t.first;
    return r;
  }
  int64_t bytes_per_tensor() const {
    return rows() * static_cast<int64_t>(kv_heads.size()) * head_dim * dtype_size(dtype);
  }
};

// Receives the KV of each finished layer. put() is called once per layer per executor
// rank, in layer order, from the executor's thread. The executor may overwrite the slice
// memory once put() returns, so a sink that works asynchronously copies first (or blocks
// until its copy is made). finish() is called once after the last layer; failures are
// reported by throwing std::runtime_error with context (the executor aborts the job).
class KvSink {
 public:
  virtual ~KvSink() = default;
  virtual void put(const KvSlice& slice) = 0;
  virtual void finish() {}
  // true: put() takes device slices (on_device) as they are; false: the executor hands
  // host slices only (a GPU executor stages them to host memory first).
  virtual bool takes_device_slices() const { return false; }
};

}  // namespace mprefill
