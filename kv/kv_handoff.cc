// The KV contract, the page frame encoding and KvSinkCore (kv/kv_ack.h); the TCP sender
// itself is kv_handoff_tcp.cc.
#include "kv/kv_handoff.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>

#include "kv/kv_ack.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
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

size_t kv_page_frame_size(size_t header_bytes, size_t bytes_each) {
  // KvPage { header = 1; k = 2; v = 3 } and Envelope { version = 1; kv_page = 35 }.
  const size_t page_len =
      1 + varint_size(header_bytes) + header_bytes + 2 * (1 + varint_size(bytes_each) + bytes_each);
  return 4 + 2 + 2 + varint_size(page_len) + page_len;
}

size_t write_kv_page_frame(char* dst, const std::string& header, const void* k, const void* v,
                           size_t bytes_each) {
  const size_t page_len = 1 + varint_size(header.size()) + header.size() +
                          2 * (1 + varint_size(bytes_each) + bytes_each);
  const size_t env_len = 2 + 2 + varint_size(page_len) + page_len;
  char* p = dst;
  auto varint = [&](uint64_t x) {
    while (x >= 0x80) {
      *p++ = static_cast<char>((x & 0x7f) | 0x80);
      x >>= 7;
    }
    *p++ = static_cast<char>(x);
  };
  for (int i = 0; i < 4; ++i) *p++ = static_cast<char>((env_len >> (8 * i)) & 0xff);
  *p++ = 0x08;  // version, varint
  *p++ = static_cast<char>(wire::kProtocolVersion);
  *p++ = static_cast<char>(0x9a);  // field 35, length-delimited
  *p++ = 0x02;
  varint(page_len);
  *p++ = 0x0a;
  varint(header.size());
  std::memcpy(p, header.data(), header.size());
  p += header.size();
  *p++ = 0x12;
  varint(bytes_each);
  std::memcpy(p, k, bytes_each);
  p += bytes_each;
  *p++ = 0x1a;
  varint(bytes_each);
  std::memcpy(p, v, bytes_each);
  p += bytes_each;
  return static_cast<size_t>(p - dst);
}

std::string encode_kv_page_frame(const v1::KvPageHeader& header, const void* k, const void* v,
                                 size_t bytes_each) {
  const std::string h = header.SerializeAsString();
  std::string f(kv_page_frame_size(h.size(), bytes_each), '\0');
  write_kv_page_frame(f.data(), h, k, v, bytes_each);
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
  last_call = Clock::now();
  if (!any_put) {
    any_put = true;
    first_put = last_call;
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
    st.last_put_ms = ms_between(Clock::time_point{}, last_call);
    st.kv_ready_ms = ms_between(Clock::time_point{}, last_ack);
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

}  // namespace mprefill
