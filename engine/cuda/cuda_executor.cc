// The CUDA backend of engine/executor.h: CudaEngine for one rank, CudaDistEngine for a
// group of several (tp x sp over NCCL, one GPU per rank).
#include <mpi.h>

#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include "engine/backends.h"
#include "engine/cuda/cuda_dist_engine.h"
#include "engine/cuda/cuda_engine.h"
#include "kv/cuda/kv_sinks.h"
#include "model/weights.h"
#ifdef MPREFILL_HAVE_NCCL
#include "comm/nccl_comm.h"
#endif

namespace mprefill::gpu {
namespace {

// Calls the request's progress after each layer went to the sink. The GPU engines are not
// exception-safe mid-prefill: a throw is kept and rethrown after the prefill (rethrow()),
// and progress is not called again.
class ProgressSink final : public KvSink {
 public:
  ProgressSink(KvSink* next, const LayerProgressFn& fn, int n_layers)
      : next_(next), fn_(fn), n_layers_(n_layers) {}
  void put(const KvSlice& s) override {
    if (next_) next_->put(s);
    if (!fn_ || deferred_) return;
    try {
      fn_(s.layer, n_layers_);
    } catch (...) {
      deferred_ = std::current_exception();
    }
  }
  void finish() override {
    if (next_) next_->finish();
  }
  bool takes_device_slices() const override { return !next_ || next_->takes_device_slices(); }
  void rethrow() const {
    if (deferred_) std::rethrow_exception(deferred_);
  }

 private:
  KvSink* next_;
  const LayerProgressFn& fn_;
  int n_layers_;
  std::exception_ptr deferred_;
};

// The sink chain of one prefill: engine -> progress -> (host staging) -> sink.
struct SinkChain {
  std::unique_ptr<HostStagingSink> staging;
  std::unique_ptr<ProgressSink> progress;
  SinkChain(KvSink* sink, const LayerProgressFn& fn, int n_layers) {
    KvSink* next = sink;
    if (sink && !sink->takes_device_slices()) {
      staging = std::make_unique<HostStagingSink>(sink);
      next = staging.get();
    }
    progress = std::make_unique<ProgressSink>(next, fn, n_layers);
  }
  double copy_ms() const { return staging ? staging->copy_ms() : 0.0; }
};

ExecutorCaps cuda_caps(bool nccl_kv) {
  ExecutorCaps c;
  c.fixed_plan = true;
  c.nccl_kv = nccl_kv;
  return c;
}

class CudaOneExecutor final : public Executor {
 public:
  explicit CudaOneExecutor(const ExecutorSpec& spec) {
    CudaEngineOptions o;
    o.device = spec.device;
    const ModelWeights w = load_model(spec.model);  // host fp32, uploaded as bf16
    engine_ = std::make_unique<CudaEngine>(w, o);
  }
  const ModelConfig& config() const override { return engine_->config(); }
  DistTopology topology() const override { return {}; }
  int rank() const override { return 0; }
  Backend backend() const override { return Backend::kCuda; }
  ExecutorCaps caps() const override { return cuda_caps(/*nccl_kv=*/true); }
  const char* name() const override { return "cuda"; }

  PrefillResult prefill(const PrefillRequest& req, KvSink* sink) override {
    check_request(*this, req);
    const SparsePolicy dense = SparsePolicy::dense();
    SinkChain chain(sink, req.progress, config().n_layers);
    PrefillPlan plan;
    if (req.plan) plan = *req.plan;
    CudaPrefillStats st;
    PrefillResult out;
    out.logits = engine_->prefill(*req.ids, req.policy ? *req.policy : dense, chain.progress.get(),
                                  req.plan ? &plan : nullptr, &st);
    chain.progress->rethrow();
    out.tokens = st.tokens;
    out.all_dense = st.all_dense;
    for (int k = 0; k < 4; ++k) out.heads_by_kind[k] = st.heads_by_kind[k];
    out.total_ms = st.total_ms;
    out.kv_export_ms = chain.copy_ms();
    out.kv_dtype = DType::kBF16;
    const int64_t kv_row = int64_t{config().n_kv_heads} * config().head_dim * 2;  // bf16 bytes
    out.kv_bytes_exported = sink ? 2 * st.tokens * kv_row * config().n_layers : 0;
    out.peak_device_bytes = st.peak_device_bytes;
    out.sp_layout = {TokenRanges{std::make_pair(int64_t{0}, st.tokens)}};
    return out;
  }

 private:
  std::unique_ptr<CudaEngine> engine_;
};

#ifdef MPREFILL_HAVE_NCCL
class CudaDistExecutor final : public Executor {
 public:
  CudaDistExecutor(const ExecutorSpec& spec, comm::Communicator* world) {
    comm::CommConfig cc;
    cc.timeout_ms = spec.comm_timeout_ms;
    std::string err;
    // The group is the MPI world (one worker group per mpirun); world checked its size.
    nccl_ = comm::make_nccl_communicator(MPI_COMM_WORLD, spec.device, cc, &err);
    if (!nccl_)
      throw std::runtime_error("--device cuda: NCCL communicator of rank " +
                               std::to_string(world->rank()) + ": " + err);
    CudaDistOptions o;
    o.device = spec.device;
    engine_ = std::make_unique<CudaDistEngine>(nccl_.get(), spec.model, spec.topo, o);
  }
  const ModelConfig& config() const override { return engine_->config(); }
  DistTopology topology() const override { return engine_->topology(); }
  int rank() const override { return engine_->rank(); }
  Backend backend() const override { return Backend::kCuda; }
  // The NCCL KV transport pairs one worker GPU with the decoder (kv/cuda/nccl_kv_sink.h);
  // a multi-rank group hands its KV off over tcp.
  ExecutorCaps caps() const override { return cuda_caps(/*nccl_kv=*/false); }
  const char* name() const override { return "cuda-dist"; }

  PrefillResult prefill(const PrefillRequest& req, KvSink* sink) override {
    check_request(*this, req);
    const SparsePolicy dense = SparsePolicy::dense();
    const SparsePolicy& policy = req.policy ? *req.policy : dense;
    SinkChain chain(sink, req.progress, config().n_layers);
    const CudaDistResult r = engine_->prefill(*req.ids, policy, chain.progress.get(), req.plan);
    chain.progress->rethrow();
    PrefillResult out;
    out.logits = r.logits;
    out.tokens = static_cast<int64_t>(req.ids->size());
    out.all_dense = policy.all_dense(out.tokens);
    out.total_ms = r.total_ms;
    out.ring_wait_ms = r.ring_wait_ms;
    out.kv_export_ms = chain.copy_ms();
    out.kv_dtype = DType::kBF16;
    out.kv_bytes_exported = r.kv_bytes_exported;
    out.peak_device_bytes = r.peak_device_bytes;
    out.sp_layout = r.sp_layout;
    out.sp_imbalance = r.sp_imbalance;
    out.tiles_computed = r.attention_tiles;
    return out;
  }

 private:
  std::unique_ptr<comm::Communicator> nccl_;
  std::unique_ptr<CudaDistEngine> engine_;
};
#endif

}  // namespace

std::unique_ptr<Executor> make_cuda_executor(const ExecutorSpec& spec, comm::Communicator* world) {
  if (!cuda_available()) throw std::runtime_error("--device cuda: no CUDA device is visible");
  const int group = spec.topo.tp * spec.topo.sp;
  if (group == 1) return std::make_unique<CudaOneExecutor>(spec);
#ifdef MPREFILL_HAVE_NCCL
  if (!world) throw std::runtime_error("cuda executor: a group of ranks needs its communicator");
  return std::make_unique<CudaDistExecutor>(spec, world);
#else
  (void)world;
  throw std::runtime_error("--device cuda: groups of " + std::to_string(group) +
                           " ranks need NCCL (a CUDA build with NCCL); run one rank, or "
                           "--device cpu");
#endif
}

}  // namespace mprefill::gpu
