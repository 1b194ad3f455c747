#include <cstring>

#include "kv/cuda/page_sums.h"

namespace mprefill::kvsum {
namespace {

constexpr int kThreads = 256;

__global__ void page_sums_kernel(PageSumBatch b) {
  const PageSumPiece& p = b.piece[blockIdx.y];
  const uint64_t total = uint64_t(p.rows) * p.width_words;
  uint32_t acc = 0;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += uint64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = i / p.width_words, c = i % p.width_words;
    uint32_t w;
    if (p.widened) {
      const uint2 f =
          *reinterpret_cast<const uint2*>(static_cast<const char*>(p.src) + r * p.pitch + c * 8);
      w = (f.x >> 16) | (f.y & 0xffff0000u);
    } else {
      w = *reinterpret_cast<const uint32_t*>(static_cast<const char*>(p.src) + r * p.pitch + c * 4);
    }
    const uint64_t packed = r * p.packed_row_words + p.packed_base_words + c;
    acc += w * static_cast<uint32_t>(2 * packed + 1);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  __shared__ uint32_t warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kThreads / 32 ? warp_sums[lane] : 0u;
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0 && acc != 0) atomicAdd(p.out, acc);
  }
}

__global__ void widen_kernel(char* dst, uint64_t dpitch, const char* src, uint64_t spitch,
                             uint32_t rows, uint32_t width) {
  const uint64_t total = uint64_t(rows) * width;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += uint64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = i / width, c = i % width;
    const uint16_t h = *reinterpret_cast<const uint16_t*>(src + r * spitch + c * 2);
    *reinterpret_cast<uint32_t*>(dst + r * dpitch + c * 4) = uint32_t(h) << 16;
  }
}

}  // namespace

cudaError_t launch_widen_bf16_rows(void* dst, uint64_t dpitch, const void* src, uint64_t spitch,
                                   uint32_t rows, uint32_t width, cudaStream_t stream) {
  const uint64_t total = uint64_t(rows) * width;
  if (total == 0) return cudaSuccess;
  uint64_t blocks = (total + 4 * kThreads - 1) / (4 * kThreads);
  blocks = blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks);
  widen_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<char*>(dst), dpitch, static_cast<const char*>(src), spitch, rows, width);
  return cudaGetLastError();
}

cudaError_t launch_page_sums(const PageSumBatch& b, cudaStream_t stream) {
  if (b.n <= 0) return cudaSuccess;
  if (b.n > kMaxPieces) return cudaErrorInvalidValue;
  uint64_t most = 0;
  for (int i = 0; i < b.n; ++i) {
    const PageSumPiece& p = b.piece[i];
    if (!p.out || (p.rows > 0 && p.width_words > 0 && !p.src)) return cudaErrorInvalidValue;
    const uint64_t t = uint64_t(p.rows) * p.width_words;
    most = t > most ? t : most;
  }
  if (most == 0) return cudaSuccess;
  // 4 words per thread at least; at most 128 blocks per piece (a page is <= a few MB).
  uint64_t blocks = (most + 4 * kThreads - 1) / (4 * kThreads);
  blocks = blocks < 1 ? 1 : (blocks > 128 ? 128 : blocks);
  page_sums_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(b.n)), kThreads, 0,
                     stream>>>(b);
  return cudaGetLastError();
}

uint32_t page_sum_host(const void* data, size_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t acc = 0;
  const size_t n_words = bytes / 4;
  for (size_t i = 0; i < n_words; ++i) {
    uint32_t w;
    std::memcpy(&w, p + 4 * i, 4);
    acc += w * static_cast<uint32_t>(2 * i + 1);
  }
  return acc;  // page rows are whole words (head_dim x dtype bytes % 4 == 0)
}

}  // namespace mprefill::kvsum
