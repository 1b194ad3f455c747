// Compiled into mprefill_worker_cuda (its sources are globbed); empty unless the NCCL KV
// transport is configured (tools/cmake/ncclkv.cmake defines MPREFILL_HAVE_NCCL_KV).
#ifdef MPREFILL_HAVE_NCCL_KV
#include "worker/cuda/nccl_kv_sink.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "decode/kv_store.h"
#include "decode/nccl_kv_common.h"

namespace mprefill::gpu {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

}  // namespace

struct NcclKvSink::Impl {
  KvHandoffOptions opt;
  int device = 0;
  std::string where;
  int head_dim = 0, n_kv_heads = 0, n_layers = 0, page_tokens = 0;
  std::unique_ptr<wire::Connection> conn;
  ncclComm_t comm = nullptr;
  std::thread reader;
  uint32_t* sums = nullptr;  // device [2 * pages of a layer]: K, V checksum of each page
  size_t sums_cap = 0;       // pages
  cudaStream_t last_stream = nullptr;
  std::vector<cudaEvent_t> ev_begin, ev_end;  // [layer]: around the layer's sends

  mutable std::mutex mu;
  std::condition_variable cv;
  bool failed = false, stopping = false, aborted = false;
  std::string error;
  int layers_put = 0, acked_prefix = 0;
  std::vector<char> acked;
  std::vector<Clock::time_point> put_at;  // [layer]
  Clock::time_point first_put, last_put, last_ack;
  bool any_put = false;
  KvHandoffStats st;

  // Records the first failure, aborts the communicator (the engine's stream may hold
  // sends that would never complete) and closes the connection.
  void fail(const std::string& msg) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (failed || stopping) return;
      failed = true;
      error = where + ": " + msg;
      if (comm && !aborted) {
        aborted = true;
        ncclCommAbort(comm);
      }
    }
    cv.notify_all();
    if (conn) conn->close();
  }

  void reader_loop() {
    for (;;) {
      std::string late;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (stopping || failed) return;
        for (int l = acked_prefix; l < layers_put; ++l)
          if (!acked[l] && ms_between(put_at[l], Clock::now()) > opt.timeout_ms) {
            late = "no LayerAck for layer " + std::to_string(l) + " within " +
                   std::to_string(opt.timeout_ms) +
                   " ms of its NCCL sends (decoder too slow or gone)";
            break;
          }
      }
      if (!late.empty()) return fail(late);
      v1::Envelope env;
      try {
        if (!conn->recv(&env, 100)) continue;
      } catch (const std::exception& e) {
        {
          std::lock_guard<std::mutex> lock(mu);
          if (stopping || failed) return;
        }
        return fail(std::string("decoder closed the KV stream: ") + e.what());
      }
      if (env.has_layer_ack() && env.layer_ack().job_id() == opt.job_id) {
        const int l = env.layer_ack().layer();
        std::lock_guard<std::mutex> lock(mu);
        if (l >= 0 && l < n_layers && !acked[l]) {
          acked[l] = 1;
          while (acked_prefix < n_layers && acked[acked_prefix]) ++acked_prefix;
          st.layers_acked++;
          last_ack = Clock::now();
        }
        cv.notify_all();
      } else if (env.has_error()) {
        return fail("decoder refused the stream: " + env.error().message());
      } else if (env.has_decode_failed()) {
        return fail("decoder failed the job: " + env.decode_failed().message());
      }
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    cv.notify_all();
    if (conn) conn->close();
    if (reader.joinable()) reader.join();
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
    if (sums) cudaFree(sums);
    sums = nullptr;
    for (auto e : ev_begin)
      if (e) cudaEventDestroy(e);
    for (auto e : ev_end)
      if (e) cudaEventDestroy(e);
    ev_begin.clear();
    ev_end.clear();
  }
};

NcclKvSink::NcclKvSink(KvHandoffOptions opt, int device) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.opt = std::move(opt);
  I.device = device;
  const KvHandoffOptions& o = I.opt;
  I.where = "NCCL KV handoff to decoder " + o.host + ":" + std::to_string(o.port) + " (job " +
            std::to_string(o.job_id) + ", rank " + std::to_string(o.rank) + ", device " +
            std::to_string(device) + ")";
  auto bad = [&](const std::string& m) { return std::runtime_error(I.where + ": " + m); };
  if (o.timeout_ms < 1) throw bad("timeout_ms must be >= 1");
  const auto& m = o.contract.model();
  I.head_dim = m.head_dim();
  I.n_kv_heads = m.n_kv_heads();
  I.n_layers = m.n_layers();
  I.page_tokens = o.contract.page_tokens();
  if (I.head_dim < 1 || I.n_kv_heads < 1 || I.n_layers < 1 || I.page_tokens < 1)
    throw bad("KV contract has no model shape or page size");
  if (o.contract.layout() != kKvLayout)
    throw bad("KV layout '" + o.contract.layout() + "' is not " + kKvLayout);
  I.acked.assign(I.n_layers, 0);
  I.put_at.assign(I.n_layers, Clock::now());
  I.ev_begin.assign(I.n_layers, nullptr);
  I.ev_end.assign(I.n_layers, nullptr);
  try {
    if (cudaSetDevice(device) != cudaSuccess)
      throw std::runtime_error("cudaSetDevice(" + std::to_string(device) + ") failed");
    for (int l = 0; l < I.n_layers; ++l)
      if (cudaEventCreate(&I.ev_begin[l]) != cudaSuccess ||
          cudaEventCreate(&I.ev_end[l]) != cudaSuccess)
        throw std::runtime_error("cudaEventCreate failed");
    ncclUniqueId id;
    if (ncclGetUniqueId(&id) != ncclSuccess) throw std::runtime_error("ncclGetUniqueId failed");
    I.conn = wire::Connection::connect(o.host, o.port, o.timeout_ms);
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
      throw std::runtime_error(std::string("NCCL communicator init: ") + ncclGetErrorString(r));
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
  I.reader = std::thread([this] { impl_->reader_loop(); });
}

NcclKvSink::~NcclKvSink() { impl_->stop(); }

void NcclKvSink::put(const KvSlice& s) {
  Impl& I = *impl_;
  auto give_up = [&](const std::string& msg) {
    I.fail(msg);
    if (!I.opt.defer_errors) throw std::runtime_error(error());
  };
  {
    std::lock_guard<std::mutex> lock(I.mu);
    if (I.failed) {
      if (I.opt.defer_errors) return;
      throw std::runtime_error(I.error);
    }
    if (!I.any_put) {
      I.any_put = true;
      I.first_put = Clock::now();
    }
  }
  if (s.layer != I.layers_put)
    return give_up("layer " + std::to_string(s.layer) + " put, expected layer " +
                   std::to_string(I.layers_put) + " (layers go in order, once each)");
  if (!s.on_device) return give_up("the NCCL handoff sends device slices; this one is on the host");
  if (s.head_dim != I.head_dim)
    return give_up("slice head_dim " + std::to_string(s.head_dim) + ", contract says " +
                   std::to_string(I.head_dim));
  if (s.dtype != DType::kBF16 && s.dtype != DType::kF32)
    return give_up(std::string("slice dtype ") + to_string(s.dtype) + " is not bf16 or f32");
  if (s.kv_heads.empty()) return give_up("slice has no KV heads");
  for (size_t i = 0; i < s.kv_heads.size(); ++i)
    if (s.kv_heads[i] < 0 || s.kv_heads[i] >= I.n_kv_heads ||
        (i > 0 && s.kv_heads[i] <= s.kv_heads[i - 1]))
      return give_up("slice KV heads must be ascending ids in [0, " + std::to_string(I.n_kv_heads) +
                     ")");
  std::vector<decode::PageCut> cuts;
  try {
    cuts = decode::cut_pages(s.tokens, I.page_tokens);
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
    I.put_at[s.layer] = Clock::now();
    I.layers_put++;  // the reader now watches this layer's ack deadline
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
  h->set_crc32c(0);  // see decode/nccl_kv_common.h: the device checksum follows by NCCL
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
  {
    std::unique_lock<std::mutex> lock(I.mu);
    if (!I.failed && I.layers_put != I.n_layers) {
      lock.unlock();
      I.fail("finish() after " + std::to_string(I.layers_put) + " of " +
             std::to_string(I.n_layers) + " layers");
      lock.lock();
    }
    // The reader fails a layer not acked within timeout_ms of its put; this outer bound
    // only catches a wedged reader.
    const auto limit = std::chrono::milliseconds(int64_t{I.opt.timeout_ms} * (I.n_layers + 2));
    const bool done =
        I.cv.wait_for(lock, limit, [&] { return I.failed || I.acked_prefix == I.n_layers; });
    if (!done && !I.failed) {
      lock.unlock();
      I.fail("finish: layers still unacknowledged after " + std::to_string(limit.count()) + " ms");
      lock.lock();
    }
    if (!I.failed && I.any_put) {
      I.st.handoff_ms = ms_between(I.first_put, I.last_ack);
      I.st.tail_ms = std::max(0.0, ms_between(I.last_put, I.last_ack));
    }
  }
  // Every layer acked: the sends are done or finishing; wait (bounded) so the events can
  // be read, then sum the time the sends occupied the stream.
  if (!failed() && I.last_stream) {
    cudaSetDevice(I.device);
    const std::string w = ncclkv::wait_stream(I.comm, I.last_stream, I.opt.timeout_ms);
    if (!w.empty()) {
      I.fail("finish: " + w);
    } else {
      double busy = 0;
      for (int l = 0; l < I.n_layers; ++l) {
        float ms = 0;
        if (cudaEventElapsedTime(&ms, I.ev_begin[l], I.ev_end[l]) == cudaSuccess) busy += ms;
      }
      std::lock_guard<std::mutex> lock(I.mu);
      I.st.send_ms = busy;
    }
  }
  const bool failed_now = failed();
  I.stop();
  if (failed_now) throw std::runtime_error(error());
}

bool NcclKvSink::failed() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->failed;
}

std::string NcclKvSink::error() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->error;
}

KvHandoffStats NcclKvSink::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->st;
}

}  // namespace mprefill::gpu
#endif  // MPREFILL_HAVE_NCCL_KV
