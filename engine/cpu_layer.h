// The CPU Llama layer forward (fp32), written once: DistEngine (every prefill: tp x sp over
// MPI, or Engine's tp 1 x sp 1 over the one-rank group), Engine's decode steps and the
// pattern search's capture (search/) all run cpu_forward() and differ only in their
// attention (CpuAttention) and in the tensor-parallel sum (CpuForwardParams::reduce).
//
// One layer on this rank's n token rows, x [n][hidden] the residual stream:
//   xb = rmsnorm(x, attn_norm)
//   q = xb Wq^T (+ bq), k = xb Wk^T (+ bk), v = xb Wv^T (+ bv); RoPE on q and k at the
//       rows' global positions; k, v written where the attention says (kv_rows)
//   att = attention(q, K, V)                      (CpuAttention::attend)
//   y = att Wo^T; reduce(y); x += y               (row-parallel O projection)
//   per chunk of mlp_chunk rows: h = rmsnorm(x, ffn_norm);
//       y = (silu(h Wgate^T) * (h Wup^T)) Wdown^T; then reduce(y); x += y
// The op order is the one every backend had before this file existed; an fp32 result is
// bit-identical to it (tests/cpu/engine_cpu_layer_test.cc checks the ops against fp64).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/sparse.h"
#include "model/weights.h"

namespace mprefill {

struct PrefillStats;

// One layer's weights on this rank (fp32, row-major, not owned). With tensor parallelism
// the rank holds n_q query heads (its KV-head groups), n_kv KV heads and ffn FFN rows.
struct CpuLayer {
  const float* attn_norm = nullptr;  // [hidden]
  const float* ffn_norm = nullptr;   // [hidden]
  const float* wq = nullptr;         // [n_q * head_dim][hidden]
  const float* wk = nullptr;         // [n_kv * head_dim][hidden]
  const float* wv = nullptr;         // [n_kv * head_dim][hidden]
  const float* bq = nullptr;         // [n_q * head_dim], null: no bias
  const float* bk = nullptr;         // [n_kv * head_dim], null: no bias
  const float* bv = nullptr;         // [n_kv * head_dim], null: no bias
  const float* wo = nullptr;         // [hidden][n_q * head_dim]
  const float* gate = nullptr;       // [ffn][hidden]
  const float* up = nullptr;         // [ffn][hidden]
  const float* down = nullptr;       // [hidden][ffn]
  int n_q = 0, n_kv = 0;             // heads on this rank
  int64_t ffn = 0;                   // FFN rows on this rank

  int64_t q_row(int head_dim) const { return int64_t{n_q} * head_dim; }
  int64_t kv_row(int head_dim) const { return int64_t{n_kv} * head_dim; }
};

// The layer of a whole model (every head, every FFN row: the single-process case).
CpuLayer whole_layer(const ModelConfig& c, const LayerWeights& L);

// Model-wide sizes of the layer ops.
struct CpuShape {
  int64_t hidden = 0;
  int head_dim = 0;
  float rms_eps = 0;
  RopeStyle rope_style = RopeStyle::kRotateHalf;
  const std::vector<double>* inv_freq = nullptr;  // [head_dim / 2] (rope_inv_freq)
  int64_t mlp_chunk = 512;                        // rows per MLP chunk (>= 1)
};
CpuShape cpu_shape(const ModelConfig& c, const std::vector<double>& inv_freq, int64_t mlp_chunk);

// ---- the ops (n rows; n == 0 computes nothing)
// xb = rmsnorm(x); q [n][q_row], k / v [n][kv_row] (row strides q_row / kv_row), RoPE at
// positions pos[i] (pos null: pos0 + i).
void cpu_layer_qkv(const CpuShape& s, const CpuLayer& L, const float* x, int64_t n,
                   const int64_t* pos, int64_t pos0, float* xb, float* q, float* k, float* v);
// y [n][hidden] = att [n][q_row] Wo^T (this rank's part of the sum over heads).
void cpu_layer_out(const CpuShape& s, const CpuLayer& L, const float* att, int64_t n, float* y);
// y [n][hidden] = this rank's part of the MLP of rmsnorm(x), in chunks of s.mlp_chunk rows;
// y also holds each chunk's normed rows until its down projection overwrites them.
// gate, up: scratch of at least min(mlp_chunk, n) * ffn floats each.
void cpu_layer_mlp(const CpuShape& s, const CpuLayer& L, const float* x, int64_t n, float* y,
                   float* gate, float* up);
// out [rows] = rmsnorm(x_row, final_norm) lm^T (lm: [rows][hidden], e.g. a vocab slice).
void cpu_logits(const CpuShape& s, const float* x_row, const float* final_norm, const float* lm,
                int64_t rows, float* out);

// The attention of a forward: where each layer's K / V rows go, and att from q.
class CpuAttention {
 public:
  virtual ~CpuAttention() = default;
  // Destinations of layer l's K and V rows of this forward ([n][kv_row] each, packed).
  virtual void kv_rows(int layer, float** k, float** v) = 0;
  // att [n][q_row] of layer l from q [n][q_row] (after RoPE) and the layer's keys, of
  // which this forward's rows were just written to kv_rows(layer).
  virtual void attend(int layer, const float* q, float* att) = 0;
  // After layer l is done (its K / V rows still in place): export, progress.
  virtual void layer_done(int layer) { (void)layer; }
};

struct CpuForwardParams {
  CpuShape shape;
  const CpuLayer* layers = nullptr;  // [n_layers]
  int n_layers = 0;
  const float* embed = nullptr;  // [vocab][hidden]
  int64_t vocab = 0;
  const int* ids = nullptr;  // [n] this rank's token ids (checked < vocab by the caller)
  int64_t n = 0;
  const int64_t* pos = nullptr;  // [n] global positions; null: pos0 + i
  int64_t pos0 = 0;
  CpuAttention* attention = nullptr;
  // Sum of a partial [count] buffer over the tensor-parallel ranks, in place; empty: one
  // rank. Called twice per layer, also with count 0 (a collective).
  std::function<void(float* buf, int64_t count)> reduce;
  PrefillStats* stats = nullptr;  // may be null: gemm_ms and mlp_ms are added here
};

// Embedding and every layer; returns the residual rows x [n][hidden] after the last layer.
std::vector<float> cpu_forward(const CpuForwardParams& p);

}  // namespace mprefill
