#include "worker/kv_handoff.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "decode/crc32c.h"
#include "decode/kv_store.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

void put_varint(std::string* s, uint64_t v) {
  while (v >= 0x80) {
    s->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  s->push_back(static_cast<char>(v));
}

size_t varint_size(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}

}  // namespace

// ---- contract ------------------------------------------------------------------------

v1::KvContract make_kv_contract(const ModelFingerprint& fp, int page_tokens, v1::DType dtype) {
  v1::KvContract c;
  auto* m = c.mutable_model();
  m->set_name(fp.name);
  m->set_n_layers(fp.n_layers);
  m->set_hidden(fp.hidden);
  m->set_n_heads(fp.n_heads);
  m->set_n_kv_heads(fp.n_kv_heads);
  m->set_head_dim(fp.head_dim);
  m->set_vocab(fp.vocab);
  m->set_max_position(fp.max_position);
  m->set_weights_digest(fp.weights_digest);
  c.set_kv_dtype(dtype);
  c.set_layout(kKvLayout);
  c.set_page_tokens(page_tokens);
  return c;
}

std::string kv_contract_mismatch(const v1::KvContract& a, const v1::KvContract& b) {
  auto diff = [](const std::string& what, const auto& x, const auto& y) -> std::string {
    if (x == y) return "";
    std::string sx, sy;
    if constexpr (std::is_same_v<std::decay_t<decltype(x)>, std::string>) {
      sx = x;
      sy = y;
    } else {
      sx = std::to_string(x);
      sy = std::to_string(y);
    }
    return what + " " + sx + " vs " + sy;
  };
  const auto &ma = a.model(), &mb = b.model();
  for (std::string d :
       {diff("weights digest", ma.weights_digest(), mb.weights_digest()),
        diff("layers", ma.n_layers(), mb.n_layers()), diff("hidden", ma.hidden(), mb.hidden()),
        diff("heads", ma.n_heads(), mb.n_heads()),
        diff("kv heads", ma.n_kv_heads(), mb.n_kv_heads()),
        diff("head_dim", ma.head_dim(), mb.head_dim()), diff("vocab", ma.vocab(), mb.vocab()),
        diff("kv dtype", static_cast<int>(a.kv_dtype()), static_cast<int>(b.kv_dtype())),
        diff("layout", a.layout(), b.layout()),
        diff("page_tokens", a.page_tokens(), b.page_tokens())})
    if (!d.empty()) return "KV contract mismatch: " + d;
  return "";
}

DType from_proto(v1::DType t) {
  switch (t) {
    case v1::F32:
      return DType::kF32;
    case v1::BF16:
      return DType::kBF16;
    case v1::F16:
      return DType::kF16;
    default:
      throw std::invalid_argument("KV dtype " + std::to_string(static_cast<int>(t)) +
                                  " is not f32, bf16 or f16");
  }
}

v1::DType to_proto(DType t) {
  switch (t) {
    case DType::kF32:
      return v1::F32;
    case DType::kBF16:
      return v1::BF16;
    case DType::kF16:
      return v1::F16;
    default:
      throw std::invalid_argument(std::string("KV dtype ") + to_string(t) + " has no wire form");
  }
}

std::string encode_kv_page_frame(const v1::KvPageHeader& header, const void* k, const void* v,
                                 size_t bytes_each) {
  const std::string h = header.SerializeAsString();
  // KvPage { header = 1; k = 2; v = 3 } and Envelope { version = 1; kv_page = 35 }.
  const size_t page_len =
      1 + varint_size(h.size()) + h.size() + 2 * (1 + varint_size(bytes_each) + bytes_each);
  const size_t env_len = 2 + 2 + varint_size(page_len) + page_len;
  std::string f;
  f.reserve(4 + env_len);
  for (int i = 0; i < 4; ++i) f.push_back(static_cast<char>((env_len >> (8 * i)) & 0xff));
  f.push_back(0x08);  // version, varint
  f.push_back(static_cast<char>(wire::kProtocolVersion));
  f.push_back(static_cast<char>(0x9a));  // field 35, length-delimited
  f.push_back(0x02);
  put_varint(&f, page_len);
  f.push_back(0x0a);
  put_varint(&f, h.size());
  f.append(h);
  f.push_back(0x12);
  put_varint(&f, bytes_each);
  f.append(static_cast<const char*>(k), bytes_each);
  f.push_back(0x1a);
  put_varint(&f, bytes_each);
  f.append(static_cast<const char*>(v), bytes_each);
  return f;
}

// ---- TcpKvHandoff ----------------------------------------------------------------------

namespace {

// One layer's pages, already framed (the copy put() makes of the slice).
struct LayerCopy {
  int layer = 0;
  std::vector<std::string> frames;                  // encode_kv_page_frame of each page
  std::vector<size_t> payload;                      // K + V bytes of each page
  std::vector<std::pair<int64_t, int64_t>> ranges;  // token range of each page (messages)
  size_t next = 0;  // next page to hand to a stream (under the queue lock)
  std::atomic<size_t> sent{0};
};

}  // namespace

struct TcpKvHandoff::Impl {
  KvHandoffOptions opt;
  std::string where;  // "KV handoff to decoder H:P (job J, rank R)"
  DType wire_dtype = DType::kF32;
  int head_dim = 0, n_kv_heads = 0, n_layers = 0, page_tokens = 0;

  struct Stream {
    std::unique_ptr<wire::Connection> conn;
    std::thread sender, reader;
  };
  std::vector<Stream> streams;

  mutable std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<LayerCopy>> queue;  // layers not yet fully handed to streams
  bool stopping = false;
  bool failed = false;
  std::string error;
  int layers_put = 0;
  std::vector<char> acked;                       // [layer]
  std::vector<Clock::time_point> layer_sent_at;  // [layer]: last page sent
  std::vector<char> layer_sent;                  // [layer]
  int acked_prefix = 0;                          // layers [0, acked_prefix) acked
  Clock::time_point first_put, last_put, last_ack;
  std::vector<double> stream_send_ms;  // [stream]
  bool any_put = false;
  KvHandoffStats st;

  void fail(const std::string& msg) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (failed || stopping) return;
      failed = true;
      error = where + ": " + msg;
    }
    cv.notify_all();
    for (auto& s : streams)
      if (s.conn) s.conn->close();
  }

  void sender_loop(int si) {
    wire::Connection* conn = streams[si].conn.get();
    for (;;) {
      std::shared_ptr<LayerCopy> L;
      size_t idx = 0;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stopping || failed || !queue.empty(); });
        if (stopping || failed) return;
        L = queue.front();
        idx = L->next++;
        if (L->next >= L->frames.size()) queue.pop_front();
      }
      cv.notify_all();  // room in the queue
      std::string frame = std::move(L->frames[idx]);
      const auto ts = Clock::now();
      try {
        conn->send_frame(frame, opt.timeout_ms);
      } catch (const std::exception& e) {
        // A decoder that refuses a stream sends its reason, then closes: give the reader
        // a moment to report that instead of the bare broken pipe.
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait_for(lock, std::chrono::milliseconds(500), [&] { return failed || stopping; });
          if (failed || stopping) return;
        }
        fail("sending layer " + std::to_string(L->layer) + " tokens [" +
             std::to_string(L->ranges[idx].first) + ", " + std::to_string(L->ranges[idx].second) +
             "): " + e.what() + " (decoder gone or too slow)");
        return;
      }
      frame = std::string();  // memory back before the next page
      const double sent_ms = ms_between(ts, Clock::now());
      const size_t done = ++L->sent;
      std::lock_guard<std::mutex> lock(mu);
      stream_send_ms[si] += sent_ms;
      st.bytes += L->payload[idx];
      st.pages += 1;
      if (done == L->frames.size()) {
        layer_sent[L->layer] = 1;
        layer_sent_at[L->layer] = Clock::now();
        cv.notify_all();
      }
    }
  }

  void reader_loop(int si) {
    wire::Connection* conn = streams[si].conn.get();
    for (;;) {
      std::string late;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (stopping || failed) return;
        // Each layer sent must be acked within timeout_ms of its last page.
        for (int l = acked_prefix; l < n_layers && layer_sent[l]; ++l)
          if (!acked[l] && ms_between(layer_sent_at[l], Clock::now()) > opt.timeout_ms) {
            late = "no LayerAck for layer " + std::to_string(l) + " within " +
                   std::to_string(opt.timeout_ms) +
                   " ms after its pages were sent (decoder too slow, or another rank's pages "
                   "missing)";
            break;
          }
      }
      if (!late.empty()) {
        fail(late);
        return;
      }
      v1::Envelope env;
      try {
        if (!conn->recv(&env, 100)) continue;
      } catch (const std::exception& e) {
        {
          std::lock_guard<std::mutex> lock(mu);
          if (stopping || failed) return;
        }
        fail(std::string("decoder closed the KV stream: ") + e.what());
        return;
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
        fail("decoder refused the stream: " + env.error().message());
        return;
      } else if (env.has_decode_failed()) {
        fail("decoder failed the job: " + env.decode_failed().message());
        return;
      }
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    cv.notify_all();
    for (auto& s : streams)
      if (s.conn) s.conn->close();
    for (auto& s : streams) {
      if (s.sender.joinable()) s.sender.join();
      if (s.reader.joinable()) s.reader.join();
    }
  }
};

TcpKvHandoff::TcpKvHandoff(KvHandoffOptions opt) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.opt = std::move(opt);
  const KvHandoffOptions& o = I.opt;
  I.where = "KV handoff to decoder " + o.host + ":" + std::to_string(o.port) + " (job " +
            std::to_string(o.job_id) + ", rank " + std::to_string(o.rank) + ")";
  auto bad = [&](const std::string& m) { return std::runtime_error(I.where + ": " + m); };
  if (o.streams < 1 || o.streams > 64) throw bad("streams must be in [1, 64]");
  if (o.timeout_ms < 1) throw bad("timeout_ms must be >= 1");
  if (o.max_queued_layers < 1) throw bad("max_queued_layers must be >= 1");
  const auto& m = o.contract.model();
  I.head_dim = m.head_dim();
  I.n_kv_heads = m.n_kv_heads();
  I.n_layers = m.n_layers();
  I.page_tokens = o.contract.page_tokens();
  if (I.head_dim < 1 || I.n_kv_heads < 1 || I.n_layers < 1 || I.page_tokens < 1)
    throw bad("KV contract has no model shape or page size");
  if (o.contract.layout() != kKvLayout)
    throw bad("KV layout '" + o.contract.layout() + "' is not " + kKvLayout);
  try {
    I.wire_dtype = from_proto(o.contract.kv_dtype());
  } catch (const std::exception& e) {
    throw bad(e.what());
  }
  if (I.wire_dtype == DType::kF16) throw bad("f16 KV pages are not supported (f32 or bf16)");
  I.acked.assign(I.n_layers, 0);
  I.layer_sent.assign(I.n_layers, 0);
  I.layer_sent_at.assign(I.n_layers, Clock::now());

  I.streams.resize(o.streams);
  I.stream_send_ms.assign(o.streams, 0.0);
  for (int s = 0; s < o.streams; ++s) {
    try {
      auto conn = wire::Connection::connect(o.host, o.port, o.timeout_ms);
      conn->client_handshake(v1::WORKER, o.name, o.secret, o.timeout_ms);
      v1::Envelope env;
      auto* h = env.mutable_kv_hello();
      h->set_job_id(o.job_id);
      h->set_rank(o.rank);
      *h->mutable_kv() = o.contract;
      conn->send(env, o.timeout_ms);
      I.streams[s].conn = std::move(conn);
    } catch (const std::exception& e) {
      I.stop();
      throw bad(std::string("connecting stream ") + std::to_string(s) + ": " + e.what());
    }
  }
  for (int s = 0; s < o.streams; ++s) {
    I.streams[s].sender = std::thread([this, s] { impl_->sender_loop(s); });
    I.streams[s].reader = std::thread([this, s] { impl_->reader_loop(s); });
  }
}

TcpKvHandoff::~TcpKvHandoff() { impl_->stop(); }

void TcpKvHandoff::put(const KvSlice& s) {
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
  if (s.on_device)
    return give_up("on-device KV slices are not supported by the TCP handoff (copy to host)");
  if (s.head_dim != I.head_dim)
    return give_up("slice head_dim " + std::to_string(s.head_dim) + ", contract says " +
                   std::to_string(I.head_dim));
  if (s.dtype != DType::kF32 && s.dtype != DType::kBF16)
    return give_up(std::string("slice dtype ") + to_string(s.dtype) + " is not f32 or bf16");
  if (s.kv_heads.empty()) return give_up("slice has no KV heads");
  for (size_t i = 0; i < s.kv_heads.size(); ++i)
    if (s.kv_heads[i] < 0 || s.kv_heads[i] >= I.n_kv_heads ||
        (i > 0 && s.kv_heads[i] <= s.kv_heads[i - 1]))
      return give_up("slice KV heads must be ascending ids in [0, " + std::to_string(I.n_kv_heads) +
                     ")");

  // Room in the queue (bounded wait), then copy outside the lock.
  const auto t0 = Clock::now();
  {
    std::unique_lock<std::mutex> lock(I.mu);
    const bool room = I.cv.wait_for(lock, std::chrono::milliseconds(I.opt.timeout_ms), [&] {
      return I.failed || static_cast<int>(I.queue.size()) < I.opt.max_queued_layers;
    });
    if (I.failed) {
      lock.unlock();
      if (I.opt.defer_errors) return;
      throw std::runtime_error(error());
    }
    if (!room) {
      lock.unlock();
      return give_up("layer " + std::to_string(s.layer) + ": send queue still full after " +
                     std::to_string(I.opt.timeout_ms) + " ms (decoder too slow)");
    }
  }
  const auto t1 = Clock::now();
  auto L = std::make_shared<LayerCopy>();
  L->layer = s.layer;
  std::vector<decode::PageCut> cuts;
  try {
    cuts = decode::cut_pages(s.tokens, I.page_tokens);
  } catch (const std::exception& e) {
    return give_up(std::string("layer ") + std::to_string(s.layer) + ": " + e.what());
  }
  const size_t elems = static_cast<size_t>(s.rows()) * s.kv_heads.size() * s.head_dim;
  const size_t esz = dtype_size(I.wire_dtype);
  const size_t row_bytes = s.kv_heads.size() * s.head_dim * esz;
  // Pages are framed straight from the slice (one copy); a dtype change goes through a
  // converted copy first.
  const char* k = static_cast<const char*>(s.k);
  const char* v = static_cast<const char*>(s.v);
  std::vector<char> kc, vc;
  if (s.dtype != I.wire_dtype) {
    kc.resize(elems * esz);
    vc.resize(elems * esz);
    if (s.dtype == DType::kBF16) {  // bf16 slice -> f32 pages
      const auto* k16 = static_cast<const uint16_t*>(s.k);
      const auto* v16 = static_cast<const uint16_t*>(s.v);
      auto* kf = reinterpret_cast<float*>(kc.data());
      auto* vf = reinterpret_cast<float*>(vc.data());
      for (size_t i = 0; i < elems; ++i) {
        kf[i] = bf16_to_f32(k16[i]);
        vf[i] = bf16_to_f32(v16[i]);
      }
    } else {  // f32 slice -> bf16 pages
      const auto* kf = static_cast<const float*>(s.k);
      const auto* vf = static_cast<const float*>(s.v);
      auto* k16 = reinterpret_cast<uint16_t*>(kc.data());
      auto* v16 = reinterpret_cast<uint16_t*>(vc.data());
      for (size_t i = 0; i < elems; ++i) {
        k16[i] = f32_to_bf16(kf[i]);
        v16[i] = f32_to_bf16(vf[i]);
      }
    }
    k = kc.data();
    v = vc.data();
  }
  v1::KvPageHeader h;
  h.set_job_id(I.opt.job_id);
  h.set_layer(s.layer);
  for (int kh : s.kv_heads) h.add_kv_heads(kh);
  h.set_dtype(to_proto(I.wire_dtype));
  h.set_layout(kKvLayout);
  h.set_page_tokens(I.page_tokens);
  h.set_head_dim(I.head_dim);
  h.set_sender_rank(I.opt.rank);
  for (const decode::PageCut& c : cuts) {
    const size_t off = static_cast<size_t>(c.row0) * row_bytes;
    const size_t n = static_cast<size_t>(c.token_end - c.token_begin) * row_bytes;
    h.set_token_begin(c.token_begin);
    h.set_token_end(c.token_end);
    h.set_crc32c(decode::crc32c(v + off, n, decode::crc32c(k + off, n)));
    L->frames.push_back(encode_kv_page_frame(h, k + off, v + off, n));
    L->payload.push_back(2 * n);
    L->ranges.push_back({c.token_begin, c.token_end});
  }
  const auto t2 = Clock::now();
  {
    std::lock_guard<std::mutex> lock(I.mu);
    I.st.wait_ms += ms_between(t0, t1);
    I.st.copy_ms += ms_between(t1, t2);
    I.layers_put++;
    I.last_put = t2;
    I.st.layers_put = I.layers_put;
    if (L->frames.empty()) {  // a rank with no tokens in this layer: nothing to send
      I.layer_sent[s.layer] = 1;
      I.layer_sent_at[s.layer] = t2;
    } else {
      I.queue.push_back(std::move(L));
    }
  }
  I.cv.notify_all();
}

void TcpKvHandoff::finish() {
  Impl& I = *impl_;
  {
    std::unique_lock<std::mutex> lock(I.mu);
    if (!I.failed && I.layers_put != I.n_layers) {
      lock.unlock();
      I.fail("finish() after " + std::to_string(I.layers_put) + " of " +
             std::to_string(I.n_layers) + " layers");
      lock.lock();
    }
    // Bounded: every layer's ack is due within timeout_ms of its last page (the reader
    // threads fail the handoff otherwise), and the queue drains within the send bounds;
    // this outer bound only catches a wedged stream.
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
    for (double ms : I.stream_send_ms) I.st.send_ms = std::max(I.st.send_ms, ms);
  }
  const bool failed_now = I.failed;
  I.stop();
  if (failed_now) throw std::runtime_error(error());
}

bool TcpKvHandoff::failed() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->failed;
}

std::string TcpKvHandoff::error() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->error;
}

KvHandoffStats TcpKvHandoff::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->st;
}

}  // namespace mprefill
