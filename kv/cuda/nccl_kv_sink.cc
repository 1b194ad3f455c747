// Compiled into mprefill_kv_cuda (kv/CMakeLists.txt); empty unless the NCCL KV
// transport is configured (MPREFILL_HAVE_NCCL comes with mprefill_comm_nccl).
#ifdef MPREFILL_HAVE_NCCL
#include "kv/cuda/nccl_kv_sink.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels/edge_check.h"
#include "kv/cuda/device_sink_core.h"
#include "kv/cuda/nccl_kv_common.h"
#include "kv/kv_ack.h"
#include "kv/kv_store.h"

namespace mprefill::gpu {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

}  // namespace

// DeviceSinkCore's events bracket the layer's sends; sums holds [2 * pages of a layer].
struct NcclKvSink::Impl : DeviceSinkCore {
  ncclComm_t comm = nullptr;
  bool aborted = false;  // under mu

  // A failure aborts the communicator (the engine's stream may hold sends that would
  // never complete) and closes the connection.
  void on_fail() override {
    if (comm && !aborted) {
      aborted = true;
      ncclCommAbort(comm);
    }
  }
  void stop() {
    stop_reader();
    cudaSetDevice(device);
    if (comm) {
      // The engine's stream holds no unfinished send here unless the handoff failed (then
      // the communicator is aborted already).
      if (!aborted) {
        if (last_stream && !ncclkv::wait_stream(comm, last_stream, opt.timeout_ms).empty()) {
          aborted = true;
          ncclCommAbort(comm);
        } else if (!ncclkv::settle(comm, ncclCommFinalize(comm), opt.timeout_ms).empty()) {
          ncclCommAbort(comm);
        } else {
          ncclCommDestroy(comm);
        }
      }
      comm = nullptr;
    }
    if (last_stream) cudaStreamSynchronize(last_stream);
    free_device_state();
  }
};

NcclKvSink::NcclKvSink(KvHandoffOptions opt, int device) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.device = device;
  std::string where = DeviceSinkCore::where_of("NCCL", opt, device);
  I.init(std::move(opt), std::move(where));
  const KvHandoffOptions& o = I.opt;
  auto bad = [&](const std::string& m) { return std::runtime_error(I.where + ": " + m); };
  try {
    I.create_layer_events();
    ncclUniqueId id;
    if (const ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess)
      throw_status(Status::kCommError, "NCCL KV sink: unique id",
                   std::string("ncclGetUniqueId: ") + ncclGetErrorString(r), __FILE__, __LINE__);
    I.conn = wire::Connection::connect(o.host, o.port, o.timeout_ms, wire::kDefaultMaxFrame, o.tls);
    I.conn->client_handshake(v1::WORKER, o.name, o.secret, o.timeout_ms);
    v1::Envelope env;
    auto* h = env.mutable_kv_hello();
    h->set_job_id(o.job_id);
    h->set_rank(o.rank);
    *h->mutable_kv() = o.contract;
    h->set_nccl_unique_id(std::string(reinterpret_cast<const char*>(&id), sizeof id));
    I.conn->send(env, o.timeout_ms);
    // Join the communicator; a decoder that refuses the stream says why on the connection.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&I.comm, 2, id, 0, &config);
    const auto deadline = Clock::now() + std::chrono::milliseconds(o.timeout_ms);
    while (r == ncclInProgress) {
      v1::Envelope ans;
      std::string refused;
      try {
        if (I.conn->recv(&ans, 2) && ans.has_error()) refused = ans.error().message();
      } catch (const std::exception& e) {
        refused = std::string("connection closed: ") + e.what();
      }
      if (!refused.empty() || Clock::now() > deadline) {
        ncclCommAbort(I.comm);
        I.comm = nullptr;
        throw std::runtime_error(!refused.empty()
                                     ? "decoder refused the NCCL stream: " + refused
                                     : "NCCL communicator init timed out after " +
                                           std::to_string(o.timeout_ms) + " ms; aborted");
      }
      ncclCommGetAsyncError(I.comm, &r);
    }
    if (r != ncclSuccess) {
      if (I.comm) ncclCommAbort(I.comm);
      I.comm = nullptr;
      throw_status(Status::kCommError, "NCCL KV sink: communicator init",
                   std::string("ncclCommInitRank: ") + ncclGetErrorString(r), __FILE__, __LINE__);
    }
    // Warm-up word (the decoder's receiver posts the matching receive): the peer
    // connection is set up here, not inside the first layer's timing.
    if (cudaMalloc(&I.sums, 2 * 64 * sizeof(uint32_t)) != cudaSuccess)
      throw std::runtime_error("cudaMalloc checksums failed");
    I.sums_cap = 64;
    cudaStream_t ws = nullptr;
    if (cudaStreamCreateWithFlags(&ws, cudaStreamNonBlocking) != cudaSuccess)
      throw std::runtime_error("cudaStreamCreate failed");
    std::string e =
        ncclkv::settle(I.comm, ncclSend(I.sums, 1, ncclUint32, 1, I.comm, ws), o.timeout_ms);
    if (e.empty()) e = ncclkv::wait_stream(I.comm, ws, o.timeout_ms);
    if (!e.empty()) {
      I.aborted = true;
      ncclCommAbort(I.comm);
      I.comm = nullptr;
    }
    cudaStreamSynchronize(ws);
    cudaStreamDestroy(ws);
    if (!e.empty()) throw std::runtime_error("NCCL warm-up send: " + e + "; aborted");
  } catch (const std::exception& e) {
    I.stop();
    throw bad(e.what());
  }
  I.reader = std::thread([this] {
    impl_->read_acks(impl_->conn.get(), " ms of its NCCL sends (decoder too slow or gone)");
  });
}

NcclKvSink::~NcclKvSink() { impl_->stop(); }

void NcclKvSink::put(const KvSlice& s) {
  Impl& I = *impl_;
  if (!I.begin_put()) return;
  auto give_up = [&](const std::string& msg) { I.give_up(msg); };
  const std::string bad =
      I.slice_problem(s, true, "the NCCL handoff sends device slices; this one is on the host");
  if (!bad.empty()) return give_up(bad);
  std::vector<kv::PageCut> cuts;
  try {
    cuts = kv::cut_pages(s.tokens, I.page_tokens);
  } catch (const std::exception& e) {
    return give_up(std::string("layer ") + std::to_string(s.layer) + ": " + e.what());
  }
  const auto t0 = Clock::now();
  auto st = static_cast<cudaStream_t>(s.stream);
  I.last_stream = st;
  const size_t row_bytes = s.kv_heads.size() * s.head_dim * dtype_size(s.dtype);
  const char* k = static_cast<const char*>(s.k);
  const char* v = static_cast<const char*>(s.v);
  std::string err;
  auto cuda_ok = [&](cudaError_t e, const char* what) {
    if (e != cudaSuccess && err.empty()) err = std::string(what) + ": " + cudaGetErrorString(e);
    return err.empty();
  };
  auto nccl_ok = [&](ncclResult_t r, const char* what) {
    if (!err.empty()) return false;
    const std::string e = ncclkv::settle(I.comm, r, I.opt.timeout_ms);
    if (!e.empty()) err = std::string(what) + ": " + e;
    return err.empty();
  };
  cudaSetDevice(I.device);
  if (cuts.size() > I.sums_cap) {
    // The previous layer's sends read the old buffer: wait for them (bounded) first.
    if (I.sums) {
      const std::string w = ncclkv::wait_stream(I.comm, st, I.opt.timeout_ms);
      if (!w.empty()) return give_up("layer " + std::to_string(s.layer) + ": " + w);
      cudaFree(I.sums);
      I.sums = nullptr;
    }
    if (!cuda_ok(cudaMalloc(&I.sums, 2 * cuts.size() * sizeof(uint32_t)), "cudaMalloc"))
      return give_up(err);
    I.sums_cap = cuts.size();
  }
  {
    std::lock_guard<std::mutex> lock(I.mu);
    I.start_ack_deadline(s.layer, Clock::now());  // the reader now watches it
    I.layers_put++;
    I.st.layers_put = I.layers_put;
  }
  cuda_ok(cudaEventRecord(I.ev_begin[s.layer], st), "cudaEventRecord");
  cuda_ok(cudaMemsetAsync(I.sums, 0, 2 * cuts.size() * sizeof(uint32_t), st), "cudaMemsetAsync");
  for (size_t p = 0; p < cuts.size() && err.empty(); ++p) {
    const size_t off = static_cast<size_t>(cuts[p].row0) * row_bytes;
    const size_t n = static_cast<size_t>(cuts[p].token_end - cuts[p].token_begin) * row_bytes;
    cuda_ok(ncclkv::launch_device_sum(k + off, n, I.sums + 2 * p, st), "device checksum K");
    cuda_ok(ncclkv::launch_device_sum(v + off, n, I.sums + 2 * p + 1, st), "device checksum V");
  }
  v1::Envelope env;
  v1::KvPageHeader* h = env.mutable_kv_page()->mutable_header();
  h->set_job_id(I.opt.job_id);
  h->set_layer(s.layer);
  for (int kh : s.kv_heads) h->add_kv_heads(kh);
  h->set_dtype(to_proto(s.dtype));
  h->set_layout(kKvLayout);
  h->set_page_tokens(I.page_tokens);
  h->set_head_dim(I.head_dim);
  h->set_sender_rank(I.opt.rank);
  h->set_crc32c(0);  // see kv/cuda/nccl_kv_common.h: the device checksum follows by NCCL
  uint64_t bytes = 0;
  for (size_t p = 0; p < cuts.size() && err.empty(); ++p) {
    const size_t off = static_cast<size_t>(cuts[p].row0) * row_bytes;
    const size_t n = static_cast<size_t>(cuts[p].token_end - cuts[p].token_begin) * row_bytes;
    h->set_token_begin(cuts[p].token_begin);
    h->set_token_end(cuts[p].token_end);
    try {
      I.conn->send(env, I.opt.timeout_ms);
    } catch (const std::exception& e) {
      err = std::string("sending the header of tokens [") + std::to_string(cuts[p].token_begin) +
            ", " + std::to_string(cuts[p].token_end) + "): " + e.what();
      break;
    }
    nccl_ok(ncclGroupStart(), "ncclGroupStart");
    nccl_ok(ncclSend(k + off, n, ncclUint8, 1, I.comm, st), "ncclSend K");
    nccl_ok(ncclSend(v + off, n, ncclUint8, 1, I.comm, st), "ncclSend V");
    nccl_ok(ncclSend(I.sums + 2 * p, 2, ncclUint32, 1, I.comm, st), "ncclSend checksum");
    nccl_ok(ncclGroupEnd(), "ncclGroupEnd");
    bytes += 2 * n;
  }
  cuda_ok(cudaEventRecord(I.ev_end[s.layer], st), "cudaEventRecord");
  if (!err.empty()) return give_up("layer " + std::to_string(s.layer) + ": " + err);
  const auto t1 = Clock::now();
  std::lock_guard<std::mutex> lock(I.mu);
  I.st.bytes += bytes;
  I.st.pages += static_cast<int64_t>(cuts.size());
  I.st.copy_ms += ms_between(t0, t1);
  I.last_put = t1;
}

void NcclKvSink::finish() {
  Impl& I = *impl_;
  // Every layer acked: the sends are done or finishing; wait (bounded) so the events can
  // be read.
  I.finish_layers(
      [&](cudaStream_t st) { return ncclkv::wait_stream(I.comm, st, I.opt.timeout_ms); },
      [&] { I.stop(); });
}

bool NcclKvSink::failed() const { return impl_->has_failed(); }

std::string NcclKvSink::error() const { return impl_->error_message(); }

KvHandoffStats NcclKvSink::stats() const { return impl_->stats(); }

}  // namespace mprefill::gpu
#endif  // MPREFILL_HAVE_NCCL
