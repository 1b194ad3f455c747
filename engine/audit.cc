#include "engine/audit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/cpu/cpu.h"
#include "kernels/cpu/parallel.h"
#include "kernels/sparse.h"

namespace mprefill {
namespace {

// splitmix64: a portable stream (std::shuffle's results differ between libraries).
uint64_t mix(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// First k of a seeded Fisher-Yates shuffle of xs, ascending.
template <class T>
std::vector<T> pick(std::vector<T> xs, size_t k, uint64_t seed) {
  k = std::min(k, xs.size());
  uint64_t st = seed;
  for (size_t i = 0; i < k; ++i) {
    const size_t j = i + static_cast<size_t>(mix(&st) % (xs.size() - i));
    std::swap(xs[i], xs[j]);
  }
  xs.resize(k);
  std::sort(xs.begin(), xs.end());
  return xs;
}

uint64_t layer_seed(uint64_t seed, int layer, uint64_t salt) {
  uint64_t st = seed ^ (static_cast<uint64_t>(layer) * 0xd1b54a32d192ed03ULL) ^ salt;
  return mix(&st);
}

}  // namespace

void AuditOptions::validate() const {
  if (heads_per_layer < 0)
    throw std::runtime_error("audit: heads per layer must be >= 0, got " +
                             std::to_string(heads_per_layer));
  if (query_blocks < 1)
    throw std::runtime_error("audit: query blocks must be >= 1, got " +
                             std::to_string(query_blocks));
}

std::vector<int> audit_heads(const SparsePolicy& policy, int layer, int n_heads, int64_t n,
                             const AuditOptions& opt) {
  if (!opt.enabled() || policy.all_dense(n)) return {};
  std::vector<int> cand;
  for (int h = 0; h < n_heads; ++h)
    if (policy.at(layer, h, n).kind != PatternKind::kDense) cand.push_back(h);
  return pick(std::move(cand), static_cast<size_t>(opt.heads_per_layer),
              layer_seed(opt.seed, layer, 0x68656164ULL));
}

std::vector<int64_t> audit_blocks(int64_t n, int layer, const AuditOptions& opt) {
  const int64_t nb = num_blocks(n);
  std::vector<int64_t> others;
  for (int64_t b = 0; b + 1 < nb; ++b) others.push_back(b);
  std::vector<int64_t> out = pick(std::move(others), static_cast<size_t>(opt.query_blocks - 1),
                                  layer_seed(opt.seed, layer, 0x626c6f636bULL));
  if (nb > 0) out.push_back(nb - 1);
  return out;
}

AuditRows audit_rows(const HeadPlan& plan, const HeadPattern& pattern, int64_t n,
                     const std::vector<int64_t>& blocks) {
  AuditRows ar;
  ar.n = n;
  ar.blocks = blocks;
  VsIndex ix;
  if (plan.kind == PatternKind::kVerticalSlash) ix = cpu::vs_build_index({plan.vs}, n);
  for (int64_t b : blocks) {
    if (b < 0 || b >= num_blocks(n))
      throw std::runtime_error("audit: query block " + std::to_string(b) + " is outside the " +
                               std::to_string(num_blocks(n)) + " blocks of the prompt");
    for (int64_t r = b * kBlock; r < std::min(n, (b + 1) * kBlock); ++r) ar.rows.push_back(r);
    ar.masks.push_back(
        block_keys(plan, pattern, plan.kind == PatternKind::kVerticalSlash ? &ix : nullptr, n, b));
  }
  return ar;
}

std::vector<RowPartial> audit_partials(const AuditRows& ar, const float* q, const float* k,
                                       const float* v, int64_t kv_stride, const int64_t* key_pos,
                                       int64_t n_keys, int d, double scale) {
  std::vector<RowPartial> out(ar.rows.size());
  for (RowPartial& p : out) {
    p.o.assign(d, 0.0);
    p.o_mask.assign(d, 0.0);
  }
  auto pos_of = [&](int64_t j) { return key_pos ? key_pos[j] : j; };
  std::vector<float> kc, vc, logits;
  std::vector<int64_t> cpos;
  size_t row0 = 0;  // first row of the block in ar.rows / q
  for (size_t bi = 0; bi < ar.blocks.size(); ++bi) {
    const int64_t b = ar.blocks[bi], m0 = b * kBlock, m1 = std::min(ar.n, m0 + kBlock);
    const int64_t rows = m1 - m0;
    const BlockKeys& mask = ar.masks[bi];
    // Keys of the set before m1, in chunks; each chunk's partial merged into the row's.
    std::vector<int64_t> keys;
    for (int64_t j = 0; j < n_keys; ++j)
      if (pos_of(j) < m1) keys.push_back(j);
    for (size_t c0 = 0; c0 < keys.size(); c0 += kAuditKeyChunk) {
      const int64_t cn = std::min<int64_t>(kAuditKeyChunk, static_cast<int64_t>(keys.size() - c0));
      kc.resize(static_cast<size_t>(cn * d));
      vc.resize(kc.size());
      cpos.resize(cn);
      for (int64_t j = 0; j < cn; ++j) {
        const int64_t src = keys[c0 + j];
        std::memcpy(kc.data() + j * d, k + src * kv_stride, sizeof(float) * d);
        std::memcpy(vc.data() + j * d, v + src * kv_stride, sizeof(float) * d);
        cpos[j] = pos_of(src);
      }
      logits.resize(static_cast<size_t>(rows * cn));
      cpu::gemm_xwt(q + row0 * d, kc.data(), nullptr, logits.data(), rows, d, cn);
      cpu::parallel_for(rows, 4, [&](int64_t i0, int64_t i1) {
        std::vector<double> w(cn);
        std::vector<uint8_t> vis(cn);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = m0 + i;
          const float* x = logits.data() + i * cn;
          double mx = -INFINITY;
          for (int64_t j = 0; j < cn; ++j)
            if (cpos[j] <= r) mx = std::max(mx, x[j] * scale);
          if (mx == -INFINITY) continue;  // no key of this chunk is <= r
          for (int64_t j = 0; j < cn; ++j) {
            const bool causal = cpos[j] <= r;
            w[j] = causal ? std::exp(x[j] * scale - mx) : 0.0;
            vis[j] = causal && mask.visible(r, cpos[j]) ? 1 : 0;
          }
          out[row0 + i].merge(row_partial(w.data(), mx, vis.data(), cn, vc.data(), d, d));
        }
      });
    }
    row0 += static_cast<size_t>(rows);
  }
  return out;
}

HeadAuditResult audit_result(int layer, int head, const HeadPattern& pattern,
                             const std::vector<RowPartial>& rows) {
  HeadAuditResult r;
  r.layer = layer;
  r.head = head;
  r.pattern = pattern;
  r.rows = static_cast<int64_t>(rows.size());
  double cap = 0;
  OutputError err;
  for (const RowPartial& p : rows) {
    cap += p.captured();
    err.add(p);
  }
  r.recall = rows.empty() ? 1.0 : cap / static_cast<double>(rows.size());
  r.output_rel_error = err.rel_max();
  r.output_rel_error_fro = err.rel_fro();
  return r;
}

void encode_partial(const RowPartial& p, int d, double* out) {
  out[0] = p.m;
  out[1] = p.s;
  out[2] = p.s_mask;
  for (int j = 0; j < d; ++j) {
    out[3 + j] = p.o.empty() ? 0.0 : p.o[j];
    out[3 + d + j] = p.o_mask.empty() ? 0.0 : p.o_mask[j];
  }
}

RowPartial decode_partial(const double* in, int d) {
  RowPartial p;
  p.m = in[0];
  p.s = in[1];
  p.s_mask = in[2];
  p.o.assign(in + 3, in + 3 + d);
  p.o_mask.assign(in + 3 + d, in + 3 + 2 * d);
  return p;
}

}  // namespace mprefill
