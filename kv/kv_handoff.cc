#include "kv/kv_handoff.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "kv/crc32c.h"
#include "kv/kv_ack.h"
#include "kv/kv_store.h"

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

v1::KvContract make_kv_contract(const ModelFingerprint& fp, int page_tokens) {
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
  c.set_kv_dtype(to_proto(fp.kv_dtype));
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

// ---- KvSinkCore (kv/kv_ack.h) ---------------------------------------------------

void KvSinkCore::init(KvHandoffOptions o, std::string where_prefix) {
  opt = std::move(o);
  where = std::move(where_prefix);
  auto bad = [&](const std::string& m) { return std::runtime_error(where + ": " + m); };
  if (opt.timeout_ms < 1) throw bad("timeout_ms must be >= 1");
  const auto& m = opt.contract.model();
  head_dim = m.head_dim();
  n_kv_heads = m.n_kv_heads();
  n_layers = m.n_layers();
  page_tokens = opt.contract.page_tokens();
  if (head_dim < 1 || n_kv_heads < 1 || n_layers < 1 || page_tokens < 1)
    throw bad("KV contract has no model shape or page size");
  if (opt.contract.layout() != kKvLayout)
    throw bad("KV layout '" + opt.contract.layout() + "' is not " + kKvLayout);
  acked.assign(n_layers, 0);
  ack_due.assign(n_layers, 0);
  ack_due_from.assign(n_layers, Clock::now());
}

void KvSinkCore::fail(const std::string& msg) {
  {
    std::lock_guard<std::mutex> lock(mu);
    if (failed || stopping) return;
    failed = true;
    error = where + ": " + msg;
    on_fail();
  }
  cv.notify_all();
  close_connections();
}

bool KvSinkCore::begin_put() {
  std::lock_guard<std::mutex> lock(mu);
  if (failed) {
    if (opt.defer_errors) return false;
    throw std::runtime_error(error);
  }
  if (!any_put) {
    any_put = true;
    first_put = Clock::now();
  }
  return true;
}

void KvSinkCore::give_up(const std::string& msg) {
  fail(msg);
  if (!opt.defer_errors) throw std::runtime_error(error_message());
}

std::string KvSinkCore::slice_problem(const KvSlice& s, bool want_device,
                                      const std::string& placement_msg) const {
  if (s.layer != layers_put)
    return "layer " + std::to_string(s.layer) + " put, expected layer " +
           std::to_string(layers_put) + " (layers go in order, once each)";
  if (s.on_device != want_device) return placement_msg;
  if (s.head_dim != head_dim)
    return "slice head_dim " + std::to_string(s.head_dim) + ", contract says " +
           std::to_string(head_dim);
  if (s.dtype != DType::kF32 && s.dtype != DType::kBF16)
    return std::string("slice dtype ") + to_string(s.dtype) + " is not f32 or bf16";
  if (s.kv_heads.empty()) return "slice has no KV heads";
  for (size_t i = 0; i < s.kv_heads.size(); ++i)
    if (s.kv_heads[i] < 0 || s.kv_heads[i] >= n_kv_heads ||
        (i > 0 && s.kv_heads[i] <= s.kv_heads[i - 1]))
      return "slice KV heads must be ascending ids in [0, " + std::to_string(n_kv_heads) + ")";
  return "";
}

void KvSinkCore::start_ack_deadline(int layer, Clock::time_point t) {
  ack_due[layer] = 1;
  ack_due_from[layer] = t;
}

void KvSinkCore::read_acks(wire::Connection* conn, const std::string& overdue_what) {
  for (;;) {
    std::string late;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (stopping || failed) return;
      for (int l = acked_prefix; l < n_layers && ack_due[l]; ++l)
        if (!acked[l] && ms_between(ack_due_from[l], Clock::now()) > opt.timeout_ms) {
          late = "no LayerAck for layer " + std::to_string(l) + " within " +
                 std::to_string(opt.timeout_ms) + overdue_what;
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

void KvSinkCore::await_acks() {
  std::unique_lock<std::mutex> lock(mu);
  if (!failed && layers_put != n_layers) {
    lock.unlock();
    fail("finish() after " + std::to_string(layers_put) + " of " + std::to_string(n_layers) +
         " layers");
    lock.lock();
  }
  const auto limit = std::chrono::milliseconds(int64_t{opt.timeout_ms} * (n_layers + 2));
  const bool done = cv.wait_for(lock, limit, [&] { return failed || acked_prefix == n_layers; });
  if (!done && !failed) {
    lock.unlock();
    fail("finish: layers still unacknowledged after " + std::to_string(limit.count()) + " ms");
    lock.lock();
  }
  if (!failed && any_put) {
    st.handoff_ms = ms_between(first_put, last_ack);
    st.tail_ms = std::max(0.0, ms_between(last_put, last_ack));
  }
}

bool KvSinkCore::has_failed() const {
  std::lock_guard<std::mutex> lock(mu);
  return failed;
}

std::string KvSinkCore::error_message() const {
  std::lock_guard<std::mutex> lock(mu);
  return error;
}

KvHandoffStats KvSinkCore::stats() const {
  std::lock_guard<std::mutex> lock(mu);
  return st;
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

struct TcpKvHandoff::Impl : KvSinkCore {
  DType wire_dtype = DType::kF32;

  struct Stream {
    std::unique_ptr<wire::Connection> conn;
    std::thread sender, reader;
  };
  std::vector<Stream> streams;

  // Under mu (KvSinkCore's lock):
  std::deque<std::shared_ptr<LayerCopy>> queue;  // layers not yet fully handed to streams
  std::vector<double> stream_send_ms;            // [stream]

  void close_connections() override {
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
        start_ack_deadline(L->layer, Clock::now());  // its last page is out
        cv.notify_all();
      }
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
  if (opt.max_queued_layers < 1) throw bad("max_queued_layers must be >= 1");
  I.init(std::move(opt), where);
  const KvHandoffOptions& o = I.opt;
  try {
    I.wire_dtype = from_proto(o.contract.kv_dtype());
  } catch (const std::exception& e) {
    throw bad(e.what());
  }
  if (I.wire_dtype == DType::kF16) throw bad("f16 KV pages are not supported (f32 or bf16)");

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
    I.streams[s].reader = std::thread([this, s] {
      impl_->read_acks(impl_->streams[s].conn.get(),
                       " ms after its pages were sent (decoder too slow, or another rank's "
                       "pages missing)");
    });
  }
}

TcpKvHandoff::~TcpKvHandoff() { impl_->stop(); }

void TcpKvHandoff::put(const KvSlice& s) {
  Impl& I = *impl_;
  if (!I.begin_put()) return;
  auto give_up = [&](const std::string& msg) { I.give_up(msg); };
  const std::string bad = I.slice_problem(
      s, false, "on-device KV slices are not supported by the TCP handoff (copy to host)");
  if (!bad.empty()) return give_up(bad);

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
  std::vector<kv::PageCut> cuts;
  try {
    cuts = kv::cut_pages(s.tokens, I.page_tokens);
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
  for (const kv::PageCut& c : cuts) {
    const size_t off = static_cast<size_t>(c.row0) * row_bytes;
    const size_t n = static_cast<size_t>(c.token_end - c.token_begin) * row_bytes;
    h.set_token_begin(c.token_begin);
    h.set_token_end(c.token_end);
    h.set_crc32c(kv::crc32c(v + off, n, kv::crc32c(k + off, n)));
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
      I.start_ack_deadline(s.layer, t2);
    } else {
      I.queue.push_back(std::move(L));
    }
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
