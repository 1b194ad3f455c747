#include "kv/cuda/ipc_kv_sink.h"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "kernels/cuda/edge_check.h"
#include "kv/cuda/cuda_check.h"
#include "kv/cuda/device_sink_core.h"
#include "kv/cuda/page_sums.h"
#include "kv/kv_ack.h"
#include "kv/kv_ipc.h"
#include "kv/kv_store.h"

namespace mprefill::gpu {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

using kv::cuda_util::device_name;

// Waits until `stream` is idle or timeout_ms passed: "" or why not.
std::string wait_stream(cudaStream_t stream, int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (int spins = 0;; ++spins) {
    const cudaError_t q = cudaStreamQuery(stream);
    if (q == cudaSuccess) return "";
    if (q != cudaErrorNotReady) return std::string("CUDA: ") + cudaGetErrorString(q);
    if (Clock::now() > deadline)
      return "stream not idle after " + std::to_string(timeout_ms) + " ms";
    if (spins < 2000)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

}  // namespace

// DeviceSinkCore's events bracket the layer's checksums and copies; sums holds [pages of
// a layer][K, V].
struct IpcKvSink::Impl : DeviceSinkCore {
  kv::IpcRegionLayout layout;
  char* region = nullptr;  // the decoder's region, mapped here
  cudaEvent_t ipc_ev[2] = {nullptr, nullptr};

  void stop() {
    stop_reader();
    cudaSetDevice(device);
    // The copies into the mapped region end before it is unmapped (they only need this GPU
    // and the decoder's memory, which stays allocated while mapped here).
    if (last_stream) cudaStreamSynchronize(last_stream);
    last_stream = nullptr;  // the executor may destroy it after finish()
    if (region) cudaIpcCloseMemHandle(region);
    region = nullptr;
    for (auto& e : ipc_ev)
      if (e) cudaEventDestroy(e);
    ipc_ev[0] = ipc_ev[1] = nullptr;
    free_device_state();
  }

  // The decoder's KvIpcOffer (or its refusal) within timeout_ms.
  v1::KvIpcOffer await_offer() {
    const auto deadline = Clock::now() + std::chrono::milliseconds(opt.timeout_ms);
    for (;;) {
      v1::Envelope env;
      const int left = static_cast<int>(
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
      if (left <= 0)
        throw std::runtime_error("no KvIpcOffer from the decoder within " +
                                 std::to_string(opt.timeout_ms) + " ms");
      if (!conn->recv(&env, std::min(left, 100))) continue;
      if (env.has_kv_ipc_offer()) return env.kv_ipc_offer();
      if (env.has_error())
        throw std::runtime_error("decoder refused the ipc stream: " + env.error().message());
      if (env.has_decode_failed())
        throw std::runtime_error("decoder failed the job: " + env.decode_failed().message());
    }
  }

  void open(const v1::KvIpcOffer& o) {
    if (o.job_id() != opt.job_id)
      throw std::runtime_error("KvIpcOffer for job " + std::to_string(o.job_id()));
    const std::string bad_layout = kv::IpcRegionLayout::from_offer(o, opt.contract, &layout);
    if (!bad_layout.empty()) throw std::runtime_error(bad_layout);
    if (opt.rank >= layout.senders)
      throw std::runtime_error("rank " + std::to_string(opt.rank) + " but the region has " +
                               std::to_string(layout.senders) + " senders");
    if (o.host_id() != kv::host_identity())
      throw std::runtime_error("the decoder runs on host '" + o.host_id() + "', this rank on '" +
                               kv::host_identity() + "'");
    if (o.mem_handle().size() != sizeof(cudaIpcMemHandle_t) || o.event_handles_size() != 2)
      throw std::runtime_error("KvIpcOffer without a memory handle and two event handles");
    for (const auto& h : o.event_handles())
      if (h.size() != sizeof(cudaIpcEventHandle_t))
        throw std::runtime_error("KvIpcOffer event handle of " + std::to_string(h.size()) +
                                 " bytes");
    cudaIpcMemHandle_t mh;
    std::memcpy(&mh, o.mem_handle().data(), sizeof mh);
    void* p = nullptr;
    const cudaError_t e = cudaIpcOpenMemHandle(&p, mh, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw_status(Status::kCudaError,
                   "opening the decoder's region (" + o.device() + ") on " + device_name(device),
                   std::string("cudaIpcOpenMemHandle: ") + cudaGetErrorString(e), __FILE__,
                   __LINE__);
    }
    region = static_cast<char*>(p);
    for (int i = 0; i < 2; ++i) {
      cudaIpcEventHandle_t eh;
      std::memcpy(&eh, o.event_handles(i).data(), sizeof eh);
      MPREFILL_EDGE_CHECK_CUDA(cudaIpcOpenEventHandle(&ipc_ev[i], eh), "cudaIpcOpenEventHandle");
    }
  }
};

IpcKvSink::IpcKvSink(KvHandoffOptions opt, int device) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.device = device;
  std::string where = DeviceSinkCore::where_of("IPC", opt, device);
  I.init(std::move(opt), std::move(where));
  const KvHandoffOptions& o = I.opt;
  try {
    I.create_layer_events();
    I.conn = wire::Connection::connect(o.host, o.port, o.timeout_ms);
    I.conn->client_handshake(v1::WORKER, o.name, o.secret, o.timeout_ms);
    v1::Envelope env;
    auto* h = env.mutable_kv_hello();
    h->set_job_id(o.job_id);
    h->set_rank(o.rank);
    *h->mutable_kv() = o.contract;
    h->set_transport("ipc");
    v1::KvIpcSetup setup;
    setup.set_host_id(kv::host_identity());
    setup.set_pid(static_cast<int32_t>(getpid()));
    setup.set_device(device_name(device));
    h->set_transport_setup(setup.SerializeAsString());
    I.conn->send(env, o.timeout_ms);
    I.open(I.await_offer());
  } catch (const std::exception& e) {
    I.stop();
    throw std::runtime_error(I.where + ": " + e.what());
  }
  I.reader = std::thread([this] {
    impl_->read_acks(impl_->conn.get(), " ms of its IPC copies (decoder too slow or gone)");
  });
}

IpcKvSink::~IpcKvSink() { impl_->stop(); }

void IpcKvSink::put(const KvSlice& s) {
  Impl& I = *impl_;
  if (!I.begin_put()) return;
  auto give_up = [&](const std::string& msg) { I.give_up(msg); };
  std::string bad =
      I.slice_problem(s, true, "the IPC handoff copies device slices; this one is on the host");
  // The region holds the contract's dtype: a slice of it is copied as is, a bf16 slice on an
  // fp32 contract is widened (exactly) on the way.
  const bool widen = s.dtype == DType::kBF16 && I.opt.contract.kv_dtype() == v1::F32;
  if (bad.empty() && to_proto(s.dtype) != I.opt.contract.kv_dtype() && !widen)
    bad = std::string("the IPC handoff copies KV in the contract's dtype (") +
          v1::DType_Name(I.opt.contract.kv_dtype()) + "); this slice is " + to_string(s.dtype);
  if (!bad.empty()) return give_up(bad);
  if (s.tokens.empty())
    return give_up("layer " + std::to_string(s.layer) + ": slice has no tokens");
  const kv::IpcRegionLayout& L = I.layout;
  const int layer = s.layer;
  std::vector<kv::PageCut> cuts;
  try {
    cuts = kv::cut_pages(s.tokens, I.page_tokens);
  } catch (const std::exception& e) {
    return give_up("layer " + std::to_string(layer) + ": " + e.what());
  }
  if (s.tokens.back().second > L.n_tokens)
    return give_up("layer " + std::to_string(layer) + ": tokens up to " +
                   std::to_string(s.tokens.back().second) + " but the job has " +
                   std::to_string(L.n_tokens));
  if (static_cast<int64_t>(cuts.size()) > L.sum_slots)
    return give_up("layer " + std::to_string(layer) + ": " + std::to_string(cuts.size()) +
                   " pages, the region has checksum slots for " + std::to_string(L.sum_slots));
  // Back-pressure: at most two layers in flight (layer L waits for the ack of L - 2, which
  // also frees the interprocess event L % 2 for this layer).
  if (layer >= 2) {
    std::unique_lock<std::mutex> lock(I.mu);
    const bool ok = I.cv.wait_for(lock, std::chrono::milliseconds(I.opt.timeout_ms),
                                  [&] { return I.failed || I.acked[layer - 2]; });
    if (I.failed) {
      lock.unlock();
      if (I.opt.defer_errors) return;
      throw std::runtime_error(I.error_message());
    }
    if (!ok) {
      lock.unlock();
      return give_up("layer " + std::to_string(layer - 2) + " not acked within " +
                     std::to_string(I.opt.timeout_ms) + " ms (at most two layers in flight)");
    }
  }
  const auto t0 = Clock::now();
  auto st = static_cast<cudaStream_t>(s.stream);
  I.last_stream = st;
  const size_t esz = dtype_size(s.dtype);
  const size_t head_bytes = static_cast<size_t>(s.head_dim) * esz;
  const size_t row_bytes = s.kv_heads.size() * head_bytes;
  const uint32_t row_words = static_cast<uint32_t>(row_bytes / 4);
  if (head_bytes % 4 != 0)
    return give_up(
        "the IPC handoff's page checksums need head_dim x dtype bytes to be a "
        "multiple of 4, got " +
        std::to_string(head_bytes));
  const bool all_heads = static_cast<int>(s.kv_heads.size()) == L.n_kv_heads;
  const char* k = static_cast<const char*>(s.k);
  const char* v = static_cast<const char*>(s.v);
  std::string err;
  auto ok = [&](cudaError_t e, const char* what) {
    if (e != cudaSuccess && err.empty()) err = std::string(what) + ": " + cudaGetErrorString(e);
    return err.empty();
  };
  cudaSetDevice(I.device);
  if (cuts.size() > I.sums_cap) {
    // The previous layers' checksum copies read the old buffer (stream-ordered before).
    if (I.sums) {
      ok(cudaStreamSynchronize(st), "cudaStreamSynchronize");
      cudaFree(I.sums);
      I.sums = nullptr;
      I.sums_cap = 0;
    }
    if (!ok(cudaMalloc(reinterpret_cast<void**>(&I.sums), 2 * cuts.size() * sizeof(uint32_t)),
            "cudaMalloc checksums"))
      return give_up("layer " + std::to_string(layer) + ": " + err);
    I.sums_cap = cuts.size();
  }
  {
    std::lock_guard<std::mutex> lock(I.mu);
    I.start_ack_deadline(layer, Clock::now());
    I.layers_put++;
    I.st.layers_put = I.layers_put;
  }
  ok(cudaEventRecord(I.ev_begin[layer], st), "cudaEventRecord");
  ok(cudaMemsetAsync(I.sums, 0, 2 * cuts.size() * sizeof(uint32_t), st), "cudaMemsetAsync");
  // 1. Checksums of the pages as the slice holds them (packed, contiguous).
  kvsum::PageSumBatch b;
  for (size_t p = 0; p < cuts.size() && err.empty(); ++p)
    for (int t = 0; t < 2; ++t) {
      if (b.n == kvsum::kMaxPieces) {
        ok(kvsum::launch_page_sums(b, st), "page checksum kernel");
        b.n = 0;
      }
      kvsum::PageSumPiece& q = b.piece[b.n++];
      q.src = (t == 0 ? k : v) + static_cast<size_t>(cuts[p].row0) * row_bytes;
      q.pitch = row_bytes;
      q.rows = static_cast<uint32_t>(cuts[p].token_end - cuts[p].token_begin);
      q.width_words = row_words;
      q.packed_row_words = row_words;
      q.packed_base_words = 0;
      q.out = I.sums + 2 * p + t;
    }
  ok(kvsum::launch_page_sums(b, st), "page checksum kernel");
  // 2. The rows of each token range into the region.
  int64_t row0 = 0;
  for (const auto& [tb, te] : s.tokens) {
    const size_t rows = static_cast<size_t>(te - tb);
    for (int t = 0; t < 2 && err.empty(); ++t) {
      const char* src = (t == 0 ? k : v) + static_cast<size_t>(row0) * row_bytes;
      if (all_heads && !widen) {
        ok(cudaMemcpyAsync(I.region + L.kv_offset(layer, t == 1, tb, 0), src, rows * row_bytes,
                           cudaMemcpyDeviceToDevice, st),
           "cudaMemcpyAsync into the decoder's region");
        continue;
      }
      for (size_t j0 = 0; j0 < s.kv_heads.size() && err.empty();) {
        size_t j1 = j0 + 1;
        while (j1 < s.kv_heads.size() && s.kv_heads[j1] == s.kv_heads[j1 - 1] + 1) ++j1;
        char* dst = I.region + L.kv_offset(layer, t == 1, tb, s.kv_heads[j0]);
        if (widen)
          ok(kvsum::launch_widen_bf16_rows(dst, L.row_bytes(), src + j0 * head_bytes, row_bytes,
                                           static_cast<uint32_t>(rows),
                                           static_cast<uint32_t>((j1 - j0) * s.head_dim), st),
             "widening copy into the decoder's region");
        else
          ok(cudaMemcpy2DAsync(dst, L.row_bytes(), src + j0 * head_bytes, row_bytes,
                               (j1 - j0) * head_bytes, rows, cudaMemcpyDeviceToDevice, st),
             "cudaMemcpy2DAsync into the decoder's region");
        j0 = j1;
      }
    }
    row0 += te - tb;
  }
  // 3. The checksums into the table (this rank's slots of the layer are contiguous), then
  // the layer's event: the decoder polls it before it reads a page of this layer.
  ok(cudaMemcpyAsync(I.region + L.sum_offset(layer, I.opt.rank, 0), I.sums,
                     2 * cuts.size() * sizeof(uint32_t), cudaMemcpyDeviceToDevice, st),
     "cudaMemcpyAsync checksums");
  ok(cudaEventRecord(I.ev_end[layer], st), "cudaEventRecord");
  ok(cudaEventRecord(I.ipc_ev[layer % 2], st), "cudaEventRecord (interprocess)");
  if (!err.empty()) return give_up("layer " + std::to_string(layer) + ": " + err);
  // 4. The page headers: the decoder checks each page once the event says it landed.
  v1::Envelope env;
  v1::KvPageHeader* h = env.mutable_kv_page()->mutable_header();
  h->set_job_id(I.opt.job_id);
  h->set_layer(layer);
  for (int kh : s.kv_heads) h->add_kv_heads(kh);
  h->set_dtype(to_proto(s.dtype));
  h->set_layout(kKvLayout);
  h->set_page_tokens(I.page_tokens);
  h->set_head_dim(I.head_dim);
  h->set_sender_rank(I.opt.rank);
  h->set_crc32c(0);  // the device checksums travel in the region (kv/cuda/page_sums.h)
  uint64_t bytes = 0;
  for (size_t p = 0; p < cuts.size(); ++p) {
    h->set_token_begin(cuts[p].token_begin);
    h->set_token_end(cuts[p].token_end);
    h->set_sum_slot(static_cast<int32_t>(p));
    try {
      I.conn->send(env, I.opt.timeout_ms);
    } catch (const std::exception& e) {
      return give_up("layer " + std::to_string(layer) + ": sending the header of tokens [" +
                     std::to_string(cuts[p].token_begin) + ", " +
                     std::to_string(cuts[p].token_end) + "): " + e.what());
    }
    bytes += 2 * static_cast<uint64_t>(cuts[p].token_end - cuts[p].token_begin) * row_bytes;
  }
  const auto t1 = Clock::now();
  std::lock_guard<std::mutex> lock(I.mu);
  I.st.bytes += bytes;
  I.st.pages += static_cast<int64_t>(cuts.size());
  I.st.copy_ms += ms_between(t0, t1);
  I.last_put = t1;
}

void IpcKvSink::finish() {
  Impl& I = *impl_;
  I.finish_layers([&](cudaStream_t st) { return wait_stream(st, I.opt.timeout_ms); },
                  [&] { I.stop(); });
}

bool IpcKvSink::failed() const { return impl_->has_failed(); }

std::string IpcKvSink::error() const { return impl_->error_message(); }

KvHandoffStats IpcKvSink::stats() const { return impl_->stats(); }

}  // namespace mprefill::gpu
