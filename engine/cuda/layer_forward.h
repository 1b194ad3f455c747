// The one layer forward of CudaBackend (private header): everything one prefill needs
// while it runs, for every tp x sp. Per layer:
//   norm -> QKV GEMM -> RoPE (global positions) -> KV export -> per piece: index
//   (estimated or planned) -> attention (sp 1: straight into Wo's input; sp > 1: the ring
//   pass of comm/ring_pass.h, merged by log-sum-exp) -> O GEMM (+ tp all-reduce) -> MLP
//   in chunks (+ tp all-reduce).
// At tp 1 x sp 1 no collective, no second stream and no merge is issued.
#pragma once
#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "comm/ring_pass.h"
#include "engine/cuda/backend_impl.h"
#include "engine/cuda/sp_estimate.h"
#include "kernels/cuda/index/index.h"

namespace mprefill::gpu {

enum Cat { kGemm = 0, kAttn, kEst, kExport, kRest, kHead };

// The device index of one piece for the current layer.
struct PieceView {
  VsIndexView vs;
  BlockSparseView bs;
};

// Where the next piece's index goes in the index / block capacity (reset per piece at
// sp 1, advanced at sp > 1 where every piece's index lives through the ring).
struct IndexCursor {
  size_t ptr = 0;
  int64_t ranges = 0, cols = 0, blocks = 0;
};

class LayerForward {
 public:
  struct Inputs {
    const ModelConfig* cfg;
    CudaBackend::Impl* impl;
    const Setup* setup;
    const Bufs* bufs;
    const CudaOptions* opt;
    const SparsePolicy* policy;
    PrefillPlan* plan;  // filled and used, or to be filled (fill_plan), or null
    bool fill_plan;
    const PrefillOptions* popt;
    KvSink* sink;
    CudaPrefillStats* stats;
  };
  explicit LayerForward(const Inputs& in);
  ~LayerForward();

  void embed();
  void layer(int l);
  // Final norm + LM head of position n - 1 on its owner, broadcast to the group; waits
  // for the device (bounded in a group) and returns the logits.
  std::vector<float> logits(comm::Communicator* world);
  // Stats after the device finished: estimation traffic, and with timing the events.
  void collect_times();

 private:
  void mark(int cat, int layer);
  void gemm(const void* x, const void* w, const void* bias, void* y, DType yt, int64_t m,
            int64_t in, int64_t out, bool acc, int l);
  void all_reduce_x(int l);
  void qkv_rope_export(int l);
  void attention(int l);
  void index_vs(int l, const Piece& p, IndexCursor& cur, PieceView& out);
  void index_bs(int l, const Piece& p, IndexCursor& cur, PieceView& out);
  void estimate_vs(int l, const Piece& p, cuda::index::VsSelectionsDevice& sel);
  void download_vs(int l, const Piece& p, const cuda::index::VsSelectionsDevice& sel);
  void download_bs(int l, const Piece& p, const int* blocks, int kmax);
  // One launch of piece p: ap carries rows, strides, positions and outputs.
  void launch(const Piece& p, const PieceView& x, AttentionParams ap, int l, const char* what);
  void attention_local(int l, const Piece& p, const PieceView& x);
  void ring_attention(int l, const std::vector<Piece>& pieces);  // ring_step.cc
  void ring_compute(int l, const std::vector<Piece>& pieces, int owner, const uint16_t* ks,
                    const uint16_t* vs);  // ring_step.cc
  void mlp(int l);

 public:
  // Shared with the ring transport (ring_step.cc).
  const ModelConfig& c;
  CudaBackend::Impl& I;
  const Geometry& g;
  const Setup& S;
  const Bufs& B;
  const Fail& f;
  cudaStream_t st;
  bool timing;
  size_t n_sync = 0;
  cudaEvent_t sync_event();           // ordering events, reused round-robin (64)
  size_t time_mark(cudaStream_t on);  // a timing event recorded on `on`
  struct Span {
    int kind;  // 0 ring compute, 1 ring wait, 2 all-reduce, 3 ring transfer (comm stream)
    size_t a, b;
  };
  std::vector<Span> spans;

 private:
  const CudaOptions& opt_;
  const SparsePolicy& policy_;
  PrefillPlan* plan_;
  bool fill_plan_;
  const PrefillOptions& popt_;
  KvSink* sink_;
  CudaPrefillStats& ST;
  const int hd_;
  const float scale_;
  struct Mark {
    int cat, layer;
  };
  std::vector<Mark> marks_;
  size_t n_time_ = 0;
  std::vector<int> vb_, sb_, topk_;
  std::vector<double> tau_;  // per head of a vertical-slash piece: 0 = fixed budgets
  std::vector<PieceView> views_;
  std::unique_ptr<SpEstimator> est_;  // sp > 1 with estimated heads
  bool qlast_ready_ = false;
  comm::RingPlan ring_;
  TokenRanges kv_tokens_;
  std::vector<int> kv_heads_;
};

}  // namespace mprefill::gpu
