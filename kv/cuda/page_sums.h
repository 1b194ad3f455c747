// Device checksums of KV pages for transports whose bytes never pass through host memory
// ("ipc": kv/cuda/ipc_kv_sink.h, kv/cuda/ipc_kv_receiver.h). The sum of a page is the
// kv_device_sum of kv/cuda/nccl_kv_common.h over its packed bytes ([tokens][page heads]
// [head_dim], little-endian u32 words w[i]): sum_i w[i] * (2i + 1) mod 2^32 (any change of one
// word, and any swap of two different words, changes it). Here a page may lie strided in
// memory (a subset of heads inside a [token][all heads][head_dim] region): it is given as
// pieces, each a 2-D block of rows that occupies a known place in the packed order, so the
// sender (contiguous slice) and the decoder (strided region) compute the same number.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mprefill::kvsum {

struct PageSumPiece {
  const void* src = nullptr;       // first word of the piece's first row (4-byte aligned)
  uint64_t pitch = 0;              // bytes between consecutive rows at src (multiple of 4)
  uint32_t rows = 0;               // tokens of the page
  uint32_t width_words = 0;        // u32 words of one row of the piece
  uint32_t packed_row_words = 0;   // u32 words of one row of the packed page
  uint32_t packed_base_words = 0;  // where a row of the piece starts inside a packed row
  uint32_t* out = nullptr;         // device u32 the piece's sum is added to (zeroed first)
  // The piece holds fp32 values widened from bf16 (an fp32 region fed by bf16 slices): each
  // word is read as two fp32 values, narrowed back to bf16 (exact), low value first; pitch
  // is in bytes of the fp32 rows, width_words counts bf16 words.
  bool widened = false;
};

constexpr int kMaxPieces = 64;  // per launch: 64 x 40 bytes of kernel parameters

struct PageSumBatch {
  PageSumPiece piece[kMaxPieces];
  int n = 0;
};

// Adds each piece's weighted sum into its out on `stream` (no allocation, no sync).
cudaError_t launch_page_sums(const PageSumBatch& batch, cudaStream_t stream);

// dst[r][c] = fp32(src[r][c]) for rows x width bf16 values (pitches in bytes) on `stream`:
// how a bf16 slice lands in an fp32 region, exactly.
cudaError_t launch_widen_bf16_rows(void* dst, uint64_t dpitch, const void* src, uint64_t spitch,
                                   uint32_t rows, uint32_t width, cudaStream_t stream);

// The same sum of `bytes` packed bytes on the host (tests, diagnostics).
uint32_t page_sum_host(const void* data, size_t bytes);

}  // namespace mprefill::kvsum
