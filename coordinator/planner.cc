#include "coordinator/planner.h"

#include <cstdio>

#include "model/parallel_plan.h"
#include "proto/shard_plan.h"

namespace mprefill::coord {

int dtype_bytes(v1::DType d) {
  switch (d) {
    case v1::F32:
      return 4;
    case v1::BF16:
    case v1::F16:
      return 2;
    default:
      return 0;
  }
}

uint64_t kv_bytes(const v1::KvContract& kv, int64_t tokens) {
  const auto& m = kv.model();
  return uint64_t{2} * static_cast<uint64_t>(m.n_layers()) * static_cast<uint64_t>(m.n_kv_heads()) *
         static_cast<uint64_t>(m.head_dim()) * static_cast<uint64_t>(dtype_bytes(kv.kv_dtype())) *
         static_cast<uint64_t>(tokens);
}

uint64_t rank_bytes_estimate(const v1::KvContract& kv, int64_t n, int tp, int sp) {
  const auto& m = kv.model();
  const uint64_t ranks = static_cast<uint64_t>(tp) * static_cast<uint64_t>(sp);
  const uint64_t local = static_cast<uint64_t>((n + sp - 1) / sp);
  const uint64_t hidden = static_cast<uint64_t>(m.hidden());
  const uint64_t q_dim = static_cast<uint64_t>(m.n_heads()) * static_cast<uint64_t>(m.head_dim());
  const uint64_t kv_dim =
      static_cast<uint64_t>(m.n_kv_heads()) * static_cast<uint64_t>(m.head_dim());
  const uint64_t t = static_cast<uint64_t>(tp);
  const uint64_t act_per_token = 4 * hidden + (q_dim + 2 * kv_dim) / t + 8 * hidden / t;
  const uint64_t ring_per_token = 2 * (2 * kv_dim / t);
  return (kv_bytes(kv, n) + ranks - 1) / ranks + local * (act_per_token + ring_per_token) * 4;
}

ModelConfig config_of(const v1::ModelFingerprint& m) {
  ModelConfig c;
  c.n_layers = m.n_layers();
  c.hidden = m.hidden();
  c.n_heads = m.n_heads();
  c.n_kv_heads = m.n_kv_heads();
  c.head_dim = m.head_dim();
  c.vocab = m.vocab();
  c.max_position = static_cast<int>(std::min<int64_t>(m.max_position(), INT32_MAX));
  return c;
}

v1::ShardPlan make_shard_plan(const v1::ModelFingerprint& m, const SparsePolicy& policy, int64_t n,
                              int tp, int sp, const TpPlan* current, bool any, TpPlan* placement) {
  v1::ShardPlan plan = wire::encode_shard_layout(plan_sequence_parallel(n, sp), tp, sp);
  const ModelConfig cfg = config_of(m);
  const bool keep = current && !current->kv_heads.empty() && current->tp == tp;
  TpPlan tpp = place_kv_heads(cfg, policy, n, tp, keep ? current : nullptr, any);
  wire::encode_tp_heads(tpp.kv_heads, &plan);
  if (placement) *placement = std::move(tpp);
  return plan;
}

v1::SparsePolicyTable policy_table(const SparsePolicy& policy) {
  v1::SparsePolicyTable t;
  t.set_source(policy.source);
  t.set_n_layers(policy.n_layers);
  t.set_n_heads(policy.n_heads);
  t.set_dense_below(policy.dense_below);
  for (const HeadPattern& h : policy.heads) {
    t.add_kind(static_cast<int32_t>(h.kind));
    t.add_a(h.a);
    t.add_b(h.b);
  }
  if (policy.any_adaptive())
    for (const HeadPattern& h : policy.heads) t.add_tau(h.tau);
  if (policy.any_antidiagonal())
    for (const HeadPattern& h : policy.heads) t.add_stride(h.stride);
  return t;
}

std::string contract_difference(const v1::KvContract& a, const v1::KvContract& b) {
  const auto& x = a.model();
  const auto& y = b.model();
  auto str = [](auto v) {
    if constexpr (std::is_same_v<decltype(v), std::string>)
      return v.empty() ? std::string("(none)") : v;
    else
      return std::to_string(v);
  };
#define MPREFILL_DIFF(field, va, vb) \
  if ((va) != (vb)) return std::string(field ": ") + str(va) + " vs " + str(vb)
  MPREFILL_DIFF("model name", x.name(), y.name());
  MPREFILL_DIFF("weights digest", x.weights_digest(), y.weights_digest());
  MPREFILL_DIFF("n_layers", x.n_layers(), y.n_layers());
  MPREFILL_DIFF("hidden", x.hidden(), y.hidden());
  MPREFILL_DIFF("n_heads", x.n_heads(), y.n_heads());
  MPREFILL_DIFF("n_kv_heads", x.n_kv_heads(), y.n_kv_heads());
  MPREFILL_DIFF("head_dim", x.head_dim(), y.head_dim());
  MPREFILL_DIFF("vocab", x.vocab(), y.vocab());
  MPREFILL_DIFF("max_position", x.max_position(), y.max_position());
  if (a.kv_dtype() != b.kv_dtype())
    return "kv_dtype: " + v1::DType_Name(a.kv_dtype()) + " vs " + v1::DType_Name(b.kv_dtype());
  MPREFILL_DIFF("layout", a.layout(), b.layout());
  MPREFILL_DIFF("page_tokens", a.page_tokens(), b.page_tokens());
#undef MPREFILL_DIFF
  return "";
}

std::string format_bytes(uint64_t bytes) {
  char buf[96];
  const double gib = static_cast<double>(bytes) / double(1ull << 30);
  if (gib >= 0.1)
    std::snprintf(buf, sizeof(buf), "%.2f GiB (%llu bytes)", gib,
                  static_cast<unsigned long long>(bytes));
  else
    std::snprintf(buf, sizeof(buf), "%.2f MiB (%llu bytes)",
                  static_cast<double>(bytes) / double(1ull << 20),
                  static_cast<unsigned long long>(bytes));
  return buf;
}

std::string valid_utf8(const std::string& in) {
  std::string out;
  out.reserve(in.size());
  const auto* p = reinterpret_cast<const unsigned char*>(in.data());
  const size_t n = in.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    size_t len = 0;
    unsigned cp = 0;
    if (c < 0x80) {
      len = 1;
      cp = c;
    } else if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      cp = c & 0x07;
    }
    bool ok = len > 0 && i + len <= n;
    for (size_t k = 1; ok && k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) ok = false;
      cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    // Overlong forms, surrogates and code points past U+10FFFF are invalid.
    if (ok && ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
               (len == 4 && (cp < 0x10000 || cp > 0x10ffff))))
      ok = false;
    if (ok) {
      out.append(in, i, len);
      i += len;
    } else {
      out += "\xef\xbf\xbd";
      ++i;
    }
  }
  return out;
}

}  // namespace mprefill::coord
