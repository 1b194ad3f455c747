// Internals of CudaBackend shared by its .cc files (not a public header): device state,
// this rank's slice of the model, the per-prefill setup (launch pieces, capacities) and
// the one workspace carved from a single allocation.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <source_location>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/fail.h"
#include "engine/distributed_estimate.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/index/index.h"

namespace mprefill::gpu {

struct DevLayer {
  uint16_t* wqkv = nullptr;   // [ql + 2 kvl][hidden]: this rank's q rows, then k, v rows
  uint16_t* bqkv = nullptr;   // [ql + 2 kvl] or null
  uint16_t* wo = nullptr;     // [hidden][ql]
  uint16_t* wgu = nullptr;    // [2 nf][hidden]: gate rows, then up rows
  uint16_t* wdown = nullptr;  // [hidden][nf]
  float* attn_norm = nullptr;
  float* ffn_norm = nullptr;
};

// This rank's slice: heads [head0, head0 + nh), KV heads [kv0, kv0 + nkv), FFN rows
// [f0, f0 + nf); ql / kvl: row widths of its Q and K (V) activations.
struct Geometry {
  int tp = 1, sp = 1, tp_rank = 0, sp_rank = 0;
  int head0 = 0, nh = 0, kv0 = 0, nkv = 0;
  int64_t f0 = 0, nf = 0, ql = 0, kvl = 0;
};

// Estimation params of nh query heads (nkv KV heads) over this rank's bf16 Q / K rows of
// an n-token prompt: the one constructor of the workspace sizing (memory_plan.cc) and the
// launches (layer_forward.cc, sp_estimate.cc). q / q_last / k may be null for sizing.
inline VsCallShape vs_shape(const Geometry& g, int64_t n, int n_last, int nh, int nkv, int hd,
                            float scale) {
  return VsCallShape{nh, nkv, hd, n_last, n, g.ql, g.kvl, scale, DType::kBF16};
}
inline cuda::index::BlockSparseEstimateParams bs_estimate_params(const Geometry& g, int64_t n,
                                                                 int nh, int nkv, int hd,
                                                                 float scale,
                                                                 const void* q = nullptr,
                                                                 const void* k = nullptr) {
  cuda::index::BlockSparseEstimateParams e;
  e.q = q;
  e.k = k;
  e.q_row_stride = g.ql;
  e.q_head_stride = hd;
  e.k_row_stride = g.kvl;
  e.k_head_stride = hd;
  e.seq_len = n;
  e.num_heads = nh;
  e.num_kv_heads = nkv;
  e.head_dim = hd;
  e.scale = scale;
  e.dtype = DType::kBF16;
  return e;
}

struct CudaBackend::Impl {
  Fail fail;
  Geometry geo;
  std::vector<void*> allocs;
  uint16_t* embed = nullptr;
  uint16_t* lm_head = nullptr;  // == embed when tied
  float* final_norm = nullptr;
  std::vector<DevLayer> layers;
  double* inv_freq = nullptr;
  cuda::GemmContext* gemm = nullptr;
  int64_t* pinned = nullptr;       // host pinned [4]: index totals read back per call
  cudaStream_t st = nullptr;       // compute
  cudaStream_t comm_st = nullptr;  // ring transfers (sp > 1 only)
  std::unique_ptr<comm::Communicator> tp_comm, sp_comm;  // null when that size is 1
  std::vector<cudaEvent_t> events;                       // timing marks of the layer categories
  std::vector<cudaEvent_t> sync_events;                  // ordering between the streams (no timing)
  std::vector<cudaEvent_t> time_events;                  // timing spans of the ring / all-reduces

  template <class T>
  T* alloc(size_t count, const char* what) {
    void* p = nullptr;
    fail.ck(cudaMalloc(&p, std::max<size_t>(count * sizeof(T), 1)),
            std::string("allocating ") + what + " (" + std::to_string(count * sizeof(T) >> 20) +
                " MiB)");
    allocs.push_back(p);
    return static_cast<T*>(p);
  }
  ~Impl();
};

// Heads of one layer that one attention launch covers: same kind (and A-shape window, and
// planned-or-not), GQA-consistent (whole KV groups, or inside one group). h0 / kv0 are
// local to this rank's heads.
struct Piece {
  PatternKind kind = PatternKind::kDense;
  int h0 = 0, nh = 0, kv0 = 0, nkv = 0;
  int a = 0, b = 0;      // A-shape window
  bool planned = false;  // indices come from the plan
};

// Everything a prefill decides before touching the device.
struct Setup {
  int64_t n = 0, nb = 0, chunk = 0;
  std::vector<TokenRanges> layout;  // sp ranks' token ranges ([[0, n)] at sp 1)
  std::vector<int64_t> rows;        // tokens per sp rank
  int64_t nl = 0, nmax = 0;         // this rank's rows, the largest shard
  bool all_dense = true;
  std::vector<std::vector<Piece>> pieces;  // [layer]
  bool any_vs = false, any_bs = false;
  int vs_col_cap = 0, vs_off_cap = 0;  // estimation selections (clamped budgets, max)
  int bs_kmax = 0;                     // estimation block lists
  int64_t range_cap = 0, col_cap = 0;  // CSR value capacities (entries)
  std::vector<int> plan_vs_ccap, plan_vs_ocap, plan_bs_k;  // planned indices per layer
  size_t est_ws = 0;
  size_t sp_est_scratch = 0;  // grown by SpEstimator (sp > 1), counted in the plan
  int max_pieces = 0;
  int n_last = 0;
};

struct Bufs {
  int* ids = nullptr;
  int64_t* pos = nullptr;  // global positions of the local rows (sp > 1)
  float* x = nullptr;
  uint16_t *xb = nullptr, *q = nullptr, *k = nullptr, *v = nullptr;
  uint16_t *mlp_h = nullptr, *gu = nullptr, *act = nullptr;
  float* logits = nullptr;
  uint16_t* last = nullptr;
  void* gemm_ws = nullptr;
  // ring (sp > 1): two K/V slots ([nmax][kvl] K then V; slot 0 = k / v), merge state
  uint16_t* slot[2] = {nullptr, nullptr};
  uint16_t* part_o = nullptr;
  float *part_lse = nullptr, *acc_o = nullptr, *acc_lse = nullptr;
  // estimation
  float *row_max = nullptr, *row_sum = nullptr, *col_score = nullptr, *slash_score = nullptr;
  int *sel_cols = nullptr, *sel_offs = nullptr, *sel_nc = nullptr, *sel_no = nullptr;
  void* est_ws = nullptr;
  int* bs_blocks = nullptr;
  uint16_t* q_last = nullptr;  // sp > 1: the globally last n_last query rows
  // index
  int64_t *range_ptr = nullptr, *col_ptr = nullptr;
  int *range_lo = nullptr, *range_hi = nullptr, *col = nullptr;
  // plan uploads, per layer
  std::vector<int*> pv_cols, pv_offs, pv_nc, pv_no, pb_blocks;
};

struct Sizes {
  size_t act = 0, mlp = 0, est = 0, idx = 0, gemm = 0;
};

// Bytes carved from one allocation in a fixed order: first a sizing pass (base null),
// then the same calls on the real base.
struct Carver {
  char* base = nullptr;
  size_t used = 0;
  template <class T>
  T* take(size_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += (count * sizeof(T) + 255) / 256 * 256;
    return p;
  }
};

bool head_planned(const HeadPlan& hp);

// memory_plan.cc
Setup make_setup(const ModelConfig& c, const Geometry& g, const CudaOptions& opt, int64_t n,
                 const SparsePolicy& policy, const PrefillPlan* plan, const PrefillOptions& popt,
                 const Fail& fail);
void carve_all(Carver& cv, const Setup& S, const ModelConfig& c, const Geometry& g, Bufs& B,
               Sizes& sz);
MemoryPlan measure(const Setup& S, const ModelConfig& c, const Geometry& g, const CudaOptions& opt,
                   size_t weight_bytes, const Fail& fail);

}  // namespace mprefill::gpu
