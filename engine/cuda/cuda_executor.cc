// The CUDA backend of engine/executor.h: CudaBackend for one rank (no communicator) and
// for a group of several (tp x sp over NCCL, one GPU per rank).
#include <mpi.h>

#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include "engine/backends.h"
#include "engine/cuda/cuda_backend.h"
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

// One rank (no communicator) or a group of several over NCCL: the same backend.
class CudaExecutor final : public Executor {
 public:
  CudaExecutor(const ExecutorSpec& spec, comm::Communicator* world) {
    CudaOptions o;
    o.device = spec.device;
    if (spec.topo.tp * spec.topo.sp == 1) {
      const ModelWeights w = load_model(spec.model);  // host fp32, uploaded as bf16
      backend_ = std::make_unique<CudaBackend>(nullptr, w, DistTopology{}, o);
      return;
    }
#ifdef MPREFILL_HAVE_NCCL
    if (!world) throw std::runtime_error("cuda executor: a group of ranks needs its communicator");
    comm::CommConfig cc;
    cc.timeout_ms = spec.comm_timeout_ms;
    std::string err;
    // The group is the MPI world (one worker group per mpirun); world checked its size.
    nccl_ = comm::make_nccl_communicator(MPI_COMM_WORLD, spec.device, cc, &err);
    if (!nccl_)
      throw std::runtime_error("--device cuda: NCCL communicator of rank " +
                               std::to_string(world->rank()) + ": " + err);
    backend_ = std::make_unique<CudaBackend>(nccl_.get(), spec.model, spec.topo, o);
#else
    (void)world;
    throw std::runtime_error("--device cuda: groups of " +
                             std::to_string(spec.topo.tp * spec.topo.sp) +
                             " ranks need NCCL (a CUDA build with NCCL); run one rank, or "
                             "--device cpu");
#endif
  }
  const ModelConfig& config() const override { return backend_->config(); }
  DistTopology topology() const override { return backend_->topology(); }
  int rank() const override { return backend_->rank(); }
  Backend backend() const override { return Backend::kCuda; }
  // The NCCL KV transport pairs one worker GPU with the decoder (kv/cuda/nccl_kv_sink.h);
  // a multi-rank group hands its KV off over tcp.
  ExecutorCaps caps() const override { return cuda_caps(/*nccl_kv=*/!nccl_); }
  const char* name() const override { return nccl_ ? "cuda-dist" : "cuda"; }

  PrefillResult prefill(const PrefillRequest& req, KvSink* sink) override {
    check_request(*this, req);
    const SparsePolicy dense = SparsePolicy::dense();
    SinkChain chain(sink, req.progress, config().n_layers);
    PrefillPlan plan;
    if (req.plan) plan = *req.plan;
    CudaPrefillStats st;
    PrefillResult out;
    out.logits = backend_->prefill(*req.ids, req.policy ? *req.policy : dense, chain.progress.get(),
                                   req.plan ? &plan : nullptr, &st);
    chain.progress->rethrow();
    out.tokens = st.tokens;
    out.all_dense = st.all_dense;
    for (int k = 0; k < 4; ++k) out.heads_by_kind[k] = st.heads_by_kind[k];
    out.total_ms = st.total_ms;
    out.ring_wait_ms = st.ring_wait_ms;
    out.kv_export_ms = chain.copy_ms();
    out.kv_dtype = DType::kBF16;
    out.kv_bytes_exported = sink ? st.kv_bytes_exported : 0;
    out.peak_device_bytes = st.peak_device_bytes;
    out.sp_layout = st.sp_layout;
    out.sp_imbalance = st.sp_imbalance;
    // The one placement this backend runs (caps.any_tp_placement is false) and its
    // expected cost under the policy.
    out.tp_placement =
        contiguous_tensor_parallel(config(), req.policy ? *req.policy : dense,
                                   static_cast<int64_t>(req.ids->size()), topology().tp);
    out.tp_imbalance = out.tp_placement.imbalance();
    out.tiles_computed = st.attention_tiles;
    return out;
  }

 private:
  std::unique_ptr<comm::Communicator> nccl_;  // null for one rank
  std::unique_ptr<CudaBackend> backend_;
};

}  // namespace

// Block-sparse heads estimate by pooled blocks and a fixed top-k only (no CUDA
// antidiagonal score or block-mass selection yet); vertical-slash tau selects on the device.
ExecutorCaps cuda_caps(bool nccl_kv) {
  ExecutorCaps c;
  c.fixed_plan = true;
  c.nccl_kv = nccl_kv;
  return c;
}

std::unique_ptr<Executor> make_cuda_executor(const ExecutorSpec& spec, comm::Communicator* world) {
  if (!cuda_available()) throw std::runtime_error("--device cuda: no CUDA device is visible");
  return std::make_unique<CudaExecutor>(spec, world);
}

}  // namespace mprefill::gpu
