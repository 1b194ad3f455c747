// TcpKvHandoff (kv/kv_handoff.h): the "tcp" transport's sender. Staging buffers, the FIFO
// the stream threads drain, per-layer accounting of what was sent.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <new>
#include <thread>
#include <vector>

#include "kv/crc32c.h"
#include "kv/kv_ack.h"
#include "kv/kv_handoff.h"
#include "kv/kv_store.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// One KV stream to the decoder: connect, hello, KvHello. A hello the decoder closed
// without answering (its pre-hello pool evicting under a flood) is tried again
// (wire::open_retrying_busy).
std::unique_ptr<wire::Connection> open_stream(const KvHandoffOptions& o) {
  return wire::open_retrying_busy(
      [&](int left) {
        auto conn = wire::Connection::connect(o.host, o.port, left, wire::kDefaultMaxFrame, o.tls);
        conn->client_handshake(v1::WORKER, o.name, o.secret, left);
        v1::Envelope env;
        auto* h = env.mutable_kv_hello();
        h->set_job_id(o.job_id);
        h->set_rank(o.rank);
        *h->mutable_kv() = o.contract;
        h->set_transport("tcp");
        conn->send(env, left);
        return conn;
      },
      o.timeout_ms);
}

// One reusable staging buffer: page frames of one layer back to back.
struct Staging {
  char* data = nullptr;
  size_t cap = 0, used = 0;
  int layer = -1, pages = 0;
  uint64_t payload = 0;                    // K + V bytes of its pages
  int64_t token_begin = 0, token_end = 0;  // first / last page's range (messages)

  Staging() = default;
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  ~Staging() { std::free(data); }
  // Capacity for at least n bytes (page-aligned: the kernel copies whole pages).
  void reserve(size_t n) {
    if (n <= cap) return;
    const size_t c = (n + 4095) / 4096 * 4096;
    void* p = std::aligned_alloc(4096, c);
    if (!p) throw std::bad_alloc();
    std::free(data);
    data = static_cast<char*>(p);
    cap = c;
  }
  void reset(int l) {
    used = 0;
    layer = l;
    pages = 0;
    payload = 0;
  }
};

}  // namespace

struct TcpKvHandoff::Impl : KvSinkCore {
  DType wire_dtype = DType::kF32;

  struct Stream {
    std::unique_ptr<wire::Connection> conn;
    std::thread sender, reader;
  };
  std::vector<Stream> streams;
  std::vector<std::unique_ptr<Staging>> buffers;  // owned; freed after the threads end

  // Under mu (KvSinkCore's lock):
  std::vector<Staging*> free_list;
  std::deque<Staging*> ready;                  // filled buffers, layer order
  std::vector<int> layer_buffers, layer_sent;  // [layer] buffers queued / sent
  std::vector<char> layer_closed;              // [layer] put() queued its last buffer
  std::vector<double> stream_send_ms;          // [stream]

  void close_connections() override {
    for (auto& s : streams)
      if (s.conn) s.conn->close();
  }

  // Under mu: layer l's ack deadline starts once put() closed it and every buffer is out.
  void maybe_layer_sent(int l) {
    if (layer_closed[l] && layer_sent[l] == layer_buffers[l]) {
      start_ack_deadline(l, Clock::now());
      cv.notify_all();
    }
  }

  // A free buffer with room for `need` bytes for layer l; nullptr after a failure or when
  // none came free within timeout_ms (recorded as the failure).
  Staging* acquire(int l, size_t need) {
    Staging* b = nullptr;
    {
      std::unique_lock<std::mutex> lock(mu);
      const bool got = cv.wait_for(lock, std::chrono::milliseconds(opt.timeout_ms),
                                   [&] { return failed || !free_list.empty(); });
      if (failed) return nullptr;
      if (!got) {
        lock.unlock();
        fail("layer " + std::to_string(l) + ": no staging buffer came free within " +
             std::to_string(opt.timeout_ms) + " ms (decoder too slow)");
        return nullptr;
      }
      b = free_list.back();
      free_list.pop_back();
    }
    b->reset(l);
    b->reserve(std::max(need, opt.staging_bytes));
    return b;
  }

  void enqueue(Staging* b) {
    {
      std::lock_guard<std::mutex> lock(mu);
      layer_buffers[b->layer]++;
      ready.push_back(b);
    }
    cv.notify_all();
  }

  void sender_loop(int si) {
    wire::Connection* conn = streams[si].conn.get();
    for (;;) {
      Staging* b = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stopping || failed || !ready.empty(); });
        if (stopping || failed) return;
        b = ready.front();
        ready.pop_front();
      }
      const auto ts = Clock::now();
      try {
        conn->send_bytes(b->data, b->used, opt.timeout_ms);
      } catch (const std::exception& e) {
        // A decoder that refuses a stream sends its reason, then closes: give the reader
        // a moment to report that instead of the bare broken pipe.
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait_for(lock, std::chrono::milliseconds(500), [&] { return failed || stopping; });
          if (failed || stopping) return;
        }
        fail("sending layer " + std::to_string(b->layer) + " tokens [" +
             std::to_string(b->token_begin) + ", " + std::to_string(b->token_end) +
             "): " + e.what() + " (decoder gone or too slow)");
        return;
      }
      const double sent_ms = ms_between(ts, Clock::now());
      {
        std::lock_guard<std::mutex> lock(mu);
        stream_send_ms[si] += sent_ms;
        st.bytes += b->payload;
        st.pages += b->pages;
        layer_sent[b->layer]++;
        maybe_layer_sent(b->layer);
        free_list.push_back(b);
      }
      cv.notify_all();  // a free buffer
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    cv.notify_all();
    close_connections();
    for (auto& s : streams) {
      if (s.sender.joinable()) s.sender.join();
      if (s.reader.joinable()) s.reader.join();
    }
  }
};

TcpKvHandoff::TcpKvHandoff(KvHandoffOptions opt) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  const std::string where = "KV handoff to decoder " + opt.host + ":" + std::to_string(opt.port) +
                            " (job " + std::to_string(opt.job_id) + ", rank " +
                            std::to_string(opt.rank) + ")";
  auto bad = [&](const std::string& m) { return std::runtime_error(where + ": " + m); };
  if (opt.streams < 1 || opt.streams > 64) throw bad("streams must be in [1, 64]");
  if (opt.staging_bytes < 4096 || opt.staging_bytes > (size_t{1} << 30))
    throw bad("staging_bytes must be in [4 KiB, 1 GiB]");
  if (opt.staging_buffers < 0 || opt.staging_buffers > 1024)
    throw bad("staging_buffers must be in [0, 1024]");
  I.init(std::move(opt), where);
  const KvHandoffOptions& o = I.opt;
  try {
    I.wire_dtype = from_proto(o.contract.kv_dtype());
  } catch (const std::exception& e) {
    throw bad(e.what());
  }
  if (I.wire_dtype == DType::kF16) throw bad("f16 KV pages are not supported (f32 or bf16)");
  const int nbuf = o.staging_buffers > 0 ? o.staging_buffers : 2 * o.streams + 2;
  for (int i = 0; i < nbuf; ++i) {
    I.buffers.push_back(std::make_unique<Staging>());
    I.free_list.push_back(I.buffers.back().get());  // memory on first use
  }
  I.layer_buffers.assign(I.n_layers, 0);
  I.layer_sent.assign(I.n_layers, 0);
  I.layer_closed.assign(I.n_layers, 0);

  I.streams.resize(o.streams);
  I.stream_send_ms.assign(o.streams, 0.0);
  for (int s = 0; s < o.streams; ++s) {
    try {
      I.streams[s].conn = open_stream(o);
    } catch (const std::exception& e) {
      I.stop();
      throw bad(std::string("connecting stream ") + std::to_string(s) + ": " + e.what());
    }
  }
  for (int s = 0; s < o.streams; ++s) {
    I.streams[s].sender = std::thread([this, s] { impl_->sender_loop(s); });
    I.streams[s].reader = std::thread([this, s] {
      impl_->read_acks(impl_->streams[s].conn.get(),
                       " ms after its pages were sent (decoder too slow, or another rank's "
                       "pages missing)");
    });
  }
}

TcpKvHandoff::~TcpKvHandoff() { impl_->stop(); }

namespace {

// The slice's K and V in the wire dtype: the slice itself, or a converted copy in kc / vc.
void to_wire_dtype(const KvSlice& s, DType wire, std::vector<char>* kc, std::vector<char>* vc,
                   const char** k, const char** v) {
  *k = static_cast<const char*>(s.k);
  *v = static_cast<const char*>(s.v);
  if (s.dtype == wire) return;
  const size_t elems = static_cast<size_t>(s.rows()) * s.kv_heads.size() * s.head_dim;
  kc->resize(elems * dtype_size(wire));
  vc->resize(elems * dtype_size(wire));
  if (s.dtype == DType::kBF16) {  // bf16 slice -> f32 pages
    const auto* k16 = static_cast<const uint16_t*>(s.k);
    const auto* v16 = static_cast<const uint16_t*>(s.v);
    auto* kf = reinterpret_cast<float*>(kc->data());
    auto* vf = reinterpret_cast<float*>(vc->data());
    for (size_t i = 0; i < elems; ++i) {
      kf[i] = bf16_to_f32(k16[i]);
      vf[i] = bf16_to_f32(v16[i]);
    }
  } else {  // f32 slice -> bf16 pages
    const auto* kf = static_cast<const float*>(s.k);
    const auto* vf = static_cast<const float*>(s.v);
    auto* k16 = reinterpret_cast<uint16_t*>(kc->data());
    auto* v16 = reinterpret_cast<uint16_t*>(vc->data());
    for (size_t i = 0; i < elems; ++i) {
      k16[i] = f32_to_bf16(kf[i]);
      v16[i] = f32_to_bf16(vf[i]);
    }
  }
  *k = kc->data();
  *v = vc->data();
}

}  // namespace

void TcpKvHandoff::put(const KvSlice& s) {
  Impl& I = *impl_;
  if (!I.begin_put()) return;
  const std::string bad = I.slice_problem(
      s, false, "on-device KV slices are not supported by the TCP handoff (copy to host)");
  if (!bad.empty()) return I.give_up(bad);
  const auto t0 = Clock::now();
  std::vector<kv::PageCut> cuts;
  try {
    cuts = kv::cut_pages(s.tokens, I.page_tokens);
  } catch (const std::exception& e) {
    return I.give_up(std::string("layer ") + std::to_string(s.layer) + ": " + e.what());
  }
  const size_t row_bytes = s.kv_heads.size() * s.head_dim * dtype_size(I.wire_dtype);
  std::vector<char> kc, vc;
  const char *k = nullptr, *v = nullptr;
  to_wire_dtype(s, I.wire_dtype, &kc, &vc, &k, &v);
  v1::KvPageHeader h;
  h.set_job_id(I.opt.job_id);
  h.set_layer(s.layer);
  for (int kh : s.kv_heads) h.add_kv_heads(kh);
  h.set_dtype(to_proto(I.wire_dtype));
  h.set_layout(kKvLayout);
  h.set_page_tokens(I.page_tokens);
  h.set_head_dim(I.head_dim);
  h.set_sender_rank(I.opt.rank);

  // Pages into staging buffers, each queued as soon as the next page does not fit, so the
  // streams start sending while later pages are framed.
  double wait_ms = 0;
  Staging* cur = nullptr;
  std::string hb;
  for (const kv::PageCut& c : cuts) {
    const size_t off = static_cast<size_t>(c.row0) * row_bytes;
    const size_t n = static_cast<size_t>(c.token_end - c.token_begin) * row_bytes;
    h.set_token_begin(c.token_begin);
    h.set_token_end(c.token_end);
    h.set_crc32c(kv::crc32c(v + off, n, kv::crc32c(k + off, n)));
    h.SerializeToString(&hb);
    const size_t need = kv_page_frame_size(hb.size(), n);
    if (cur && cur->used + need > cur->cap) {
      I.enqueue(cur);
      cur = nullptr;
    }
    if (!cur) {
      const auto tw = Clock::now();
      try {
        cur = I.acquire(s.layer, need);
      } catch (const std::bad_alloc&) {
        return I.give_up("layer " + std::to_string(s.layer) + ": no host memory for a " +
                         std::to_string(need) + "-byte staging buffer");
      }
      wait_ms += ms_between(tw, Clock::now());
      if (!cur) {  // failed (recorded)
        if (I.opt.defer_errors) return;
        throw std::runtime_error(error());
      }
      cur->token_begin = c.token_begin;
    }
    cur->used += write_kv_page_frame(cur->data + cur->used, hb, k + off, v + off, n);
    cur->pages++;
    cur->payload += 2 * n;
    cur->token_end = c.token_end;
  }
  if (cur) I.enqueue(cur);
  const auto t2 = Clock::now();
  {
    std::lock_guard<std::mutex> lock(I.mu);
    I.st.wait_ms += wait_ms;
    I.st.copy_ms += ms_between(t0, t2) - wait_ms;
    I.layers_put++;
    I.last_put = t2;
    I.st.layers_put = I.layers_put;
    I.layer_closed[s.layer] = 1;  // a rank with no tokens in this layer: nothing to send
    I.maybe_layer_sent(s.layer);
  }
  I.cv.notify_all();
}

void TcpKvHandoff::finish() {
  Impl& I = *impl_;
  I.await_acks();
  {
    std::lock_guard<std::mutex> lock(I.mu);
    for (double ms : I.stream_send_ms) I.st.send_ms = std::max(I.st.send_ms, ms);
  }
  const bool failed_now = I.has_failed();
  I.stop();
  if (failed_now) throw std::runtime_error(error());
}

bool TcpKvHandoff::failed() const { return impl_->has_failed(); }

std::string TcpKvHandoff::error() const { return impl_->error_message(); }

KvHandoffStats TcpKvHandoff::stats() const { return impl_->stats(); }

}  // namespace mprefill
