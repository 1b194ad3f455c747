#include "search/pattern_search.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>

#include "engine/cpu_local.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/parallel.h"
#include "kernels/edge_check.h"
#include "kernels/sparse.h"
#include "model/prompt.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;

// "pattern search: WHAT at layer L head H", the operation an edge check names.
std::string at(const char* what, int layer, int head) {
  std::string t = std::string("pattern search: ") + what;
  if (layer >= 0) t += " at layer " + std::to_string(layer);
  if (head >= 0) t += " head " + std::to_string(head);
  return t;
}

// Dense causal softmax of one head, rows packed: row r at [r (r + 1) / 2, + r + 1).
struct HeadAttention {
  int64_t n = 0;
  std::vector<float> p;
  const float* row(int64_t r) const { return p.data() + r * (r + 1) / 2; }
};

// q rows of stride qs, k rows of stride ks, one head each. Logits in fp32 by the CPU GEMM
// (what the attention kernels compute), softmax in fp64, rows in chunks of 256.
HeadAttention dense_softmax(const float* q, int64_t qs, const float* k, int64_t ks, int64_t n,
                            int d) {
  HeadAttention a;
  a.n = n;
  a.p.resize(static_cast<size_t>(n) * (n + 1) / 2);
  std::vector<float> qp(n * d), kp(n * d);
  for (int64_t r = 0; r < n; ++r)
    for (int i = 0; i < d; ++i) {
      qp[r * d + i] = q[r * qs + i];
      kp[r * d + i] = k[r * ks + i];
    }
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  constexpr int64_t kChunk = 256;
  std::vector<float> s(kChunk * n);
  for (int64_t r0 = 0; r0 < n; r0 += kChunk) {
    const int64_t rows = std::min(kChunk, n - r0), cols = r0 + rows;  // causal: keys < r0 + rows
    cpu::gemm_xwt(qp.data() + r0 * d, kp.data(), nullptr, s.data(), rows, d, cols);
    cpu::parallel_for(rows, 8, [&](int64_t b, int64_t e) {
      std::vector<double> ex;
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = r0 + i;
        const float* x = s.data() + i * cols;
        double mx = -INFINITY;
        for (int64_t c = 0; c <= r; ++c) mx = std::max(mx, x[c] * scale);
        ex.resize(r + 1);
        double sum = 0;
        for (int64_t c = 0; c <= r; ++c) sum += (ex[c] = std::exp(x[c] * scale - mx));
        float* out = a.p.data() + r * (r + 1) / 2;
        for (int64_t c = 0; c <= r; ++c) out[c] = static_cast<float>(ex[c] / sum);
      }
    });
  }
  return a;
}

// The key set of a candidate: per query block a membership byte per key < m1 (VS and
// block-sparse), or the A-shape rule per row.
struct Mask {
  PatternKind kind = PatternKind::kDense;
  int n_init = 0, n_local = 0;
  int64_t n = 0;
  std::vector<uint8_t> keys;  // block b at [64 b (64 b + 64) / ... ] see off()
  std::vector<int64_t> off;   // [nblocks + 1]

  // Visibility of the causal cell (r, c), c <= r.
  bool visible(int64_t r, int64_t c) const {
    switch (kind) {
      case PatternKind::kDense:
        return true;
      case PatternKind::kAShape:
        return c < n_init || r - c < n_local;
      default:
        return keys[off[r / kBlock] + c] != 0;
    }
  }
};

Mask block_mask(PatternKind kind, int64_t n) {
  Mask m;
  m.kind = kind;
  m.n = n;
  const int64_t nb = num_blocks(n);
  m.off.resize(nb + 1, 0);
  for (int64_t b = 0; b < nb; ++b) m.off[b + 1] = m.off[b] + std::min(n, (b + 1) * kBlock);
  m.keys.assign(m.off[nb], 0);
  return m;
}

Mask vs_mask(const VsIndex& ix) {
  Mask m = block_mask(PatternKind::kVerticalSlash, ix.seq_len);
  for (int64_t b = 0; b < ix.nblocks; ++b) fill_vs_block_keys(ix, b, m.keys.data() + m.off[b]);
  return m;
}

Mask bs_mask(const std::vector<int>& blocks, int topk, int64_t n) {
  Mask m = block_mask(PatternKind::kBlockSparse, n);
  const int64_t nb = num_blocks(n);
  for (int64_t b = 0; b < nb; ++b) fill_bs_block_keys(blocks, topk, n, b, m.keys.data() + m.off[b]);
  return m;
}

Mask ashape_mask(int n_init, int n_local, int64_t n) {
  Mask m;
  m.kind = PatternKind::kAShape;
  m.n_init = n_init;
  m.n_local = n_local;
  m.n = n;
  return m;
}

// Everything the scores of one head need.
struct HeadContext {
  const HeadAttention* att = nullptr;
  const float* v = nullptr;  // V rows of this head's KV head, stride vs
  int64_t vs = 0;
  int d = 0;
  std::vector<int64_t> err_rows;  // sampled query rows for rel_error
};

// The mask's bytes of row r (keys 0..r).
void row_visibility(const Mask& m, int64_t r, std::vector<uint8_t>* vis) {
  vis->resize(r + 1);
  for (int64_t c = 0; c <= r; ++c) (*vis)[c] = m.visible(r, c) ? 1 : 0;
}

// Recall over all rows and the output errors over err_rows, through the shared row
// primitives (row_partial / OutputError) on the stored probabilities (weights, m = 0).
void score(const HeadContext& h, const Mask& m, Candidate* c) {
  const HeadAttention& a = *h.att;
  const int64_t n = a.n;
  // Recall over all rows, summed per chunk then combined in a fixed order.
  const int64_t nb = num_blocks(n);
  std::vector<double> part(nb, 0.0);
  cpu::parallel_for(nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> vis;
    for (int64_t b = b0; b < b1; ++b) {
      double acc = 0;
      for (int64_t r = b * kBlock; r < std::min(n, (b + 1) * kBlock); ++r) {
        row_visibility(m, r, &vis);
        acc += row_partial(a.row(r), 0.0, vis.data(), r + 1, nullptr, 0, 0).captured();
      }
      part[b] = acc;
    }
  });
  double sum = 0;
  for (double x : part) sum += x;
  c->recall = sum / static_cast<double>(n);

  // Output errors on the sampled rows.
  const size_t R = h.err_rows.size();
  std::vector<RowPartial> rows(R);
  cpu::parallel_for(static_cast<int64_t>(R), 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> vis;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = h.err_rows[i];
      row_visibility(m, r, &vis);
      rows[i] = row_partial(a.row(r), 0.0, vis.data(), r + 1, h.v, h.vs, h.d);
    }
  });
  OutputError err;
  for (const RowPartial& p : rows) err.add(p);
  c->rel_error = err.rel_fro();
  c->max_error = err.rel_max();
}

std::vector<int64_t> sample_rows(int64_t n, int count) {
  std::vector<int64_t> rows;
  if (count <= 0 || count >= n) {
    for (int64_t r = 0; r < n; ++r) rows.push_back(r);
    return rows;
  }
  // count rows evenly spaced, the last row included.
  for (int i = 1; i <= count; ++i) rows.push_back((n * i) / count - 1);
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

// Largest integer x in [lo, hi] with f(x) <= budget, assuming f is non-decreasing;
// -1 when f(lo) > budget.
template <class F>
int64_t largest_fitting(int64_t lo, int64_t hi, int64_t budget, F f) {
  if (f(lo) > budget) return -1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (f(mid) <= budget)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// ---- heatmap
void ramp(double t, uint8_t* px) {
  // black -> purple -> orange -> pale yellow
  static const double stops[4][3] = {{0, 0, 0}, {90, 20, 120}, {230, 90, 30}, {255, 240, 160}};
  t = std::clamp(t, 0.0, 1.0) * 3.0;
  const int i = std::min(2, static_cast<int>(t));
  const double f = t - i;
  for (int k = 0; k < 3; ++k)
    px[k] = static_cast<uint8_t>(std::lround(stops[i][k] * (1 - f) + stops[i + 1][k] * f));
}

RgbImage render_heatmap(const HeadAttention& a, const Mask& m, int size) {
  const int64_t n = a.n;
  const int S = static_cast<int>(std::min<int64_t>(size, n));
  std::vector<double> mean(static_cast<size_t>(S) * S, -1.0), cover(mean.size(), 0.0);
  cpu::parallel_for(S, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = n * i / S, r1 = n * (i + 1) / S;
      for (int j = 0; j < S; ++j) {
        const int64_t c0 = n * j / S, c1 = n * (j + 1) / S;
        double sum = 0;
        int64_t cells = 0, masked = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const float* p = a.row(r);
          for (int64_t c = c0; c < std::min(c1, r + 1); ++c) {
            sum += p[c];
            ++cells;
            masked += m.visible(r, c);
          }
        }
        if (cells == 0) continue;
        mean[i * S + j] = sum / cells;
        cover[i * S + j] = static_cast<double>(masked) / cells;
      }
    }
  });
  double hi = -INFINITY;
  for (double x : mean)
    if (x > 0) hi = std::max(hi, std::log10(x));
  const double lo = hi - 5.0;  // five decades below the brightest pixel
  RgbImage img(S, S);
  for (int i = 0; i < S; ++i)
    for (int j = 0; j < S; ++j) {
      uint8_t* px = img.at(j, i);
      const double x = mean[i * S + j];
      if (x < 0) {  // above the diagonal: no causal cell
        px[0] = px[1] = px[2] = 40;
        continue;
      }
      ramp(x > 0 ? (std::log10(x) - lo) / (hi - lo) : 0.0, px);
      // Mask overlay: cyan tint in proportion to the covered share of the pixel.
      const double t = 0.45 * cover[i * S + j];
      const double tint[3] = {0, 200, 255};
      for (int k = 0; k < 3; ++k)
        px[k] = static_cast<uint8_t>(std::lround(px[k] * (1 - t) + tint[k] * t));
    }
  return img;
}

// Column and slash scores of one head (the real estimator, as the engine runs it): the
// last min(64, n) query rows of q ([n] rows of stride q_stride) against the keys of k.
void head_vs_scores(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                    int head_dim, int64_t n, float scale, int layer, int head,
                    std::vector<float>* col, std::vector<float>* slash) {
  const VsEstimateParams e = one_head_vs_params(q, q_stride, k, k_stride, head_dim, n, scale);
  RowStats stats;
  MPREFILL_EDGE_CHECK(cpu::vs_row_stats(e, &stats), at("vs_row_stats", layer, head), "");
  col->assign(n, 0.f);
  slash->assign(n, 0.f);
  MPREFILL_EDGE_CHECK(cpu::vs_scores(e, stats, col->data(), slash->data()),
                      at("vs_scores", layer, head), "");
}

}  // namespace

void SearchOptions::validate() const {
  if (budgets.empty()) throw std::runtime_error("search: at least one tile budget is needed");
  for (double b : budgets)
    if (!(b > 0) || !std::isfinite(b))
      throw std::runtime_error(
          "search: tile budget must be > 0 (a fraction in (0, 1] or a tile "
          "count), got " +
          std::to_string(b));
  for (int s : ashape_sinks)
    if (s < 0) throw std::runtime_error("search: A-shape sink sizes must be >= 0");
  for (double s : vs_vertical_shares)
    if (!(s >= 0 && s <= 1))
      throw std::runtime_error("search: vertical shares must be in [0, 1], got " +
                               std::to_string(s));
  if (error_rows < 0) throw std::runtime_error("search: error rows must be >= 0");
  if (heatmap_size < 8) throw std::runtime_error("search: heatmap size must be >= 8 pixels");
}

int64_t dense_tiles(int64_t n) {
  const int64_t nb = num_blocks(n);
  return nb * (nb + 1) / 2;
}

int64_t ashape_tiles(int n_init, int n_local, int64_t n) {
  auto pieces = [](int64_t lo, int64_t hi) {
    return hi > lo ? (hi - lo + kBlock - 1) / kBlock : 0;
  };
  int64_t tiles = 0;
  for (int64_t b = 0; b < num_blocks(n); ++b) {
    const int64_t m0 = b * kBlock, m1 = std::min(n, m0 + kBlock);
    const int64_t init_hi = std::min<int64_t>(n_init, m1);
    const int64_t loc_lo = std::max<int64_t>(m0 - n_local + 1, 0);
    if (n_local > 0 && loc_lo <= init_hi)
      tiles += pieces(0, m1);
    else
      tiles += pieces(0, init_hi) + (n_local > 0 ? pieces(loc_lo, m1) : 0);
  }
  return tiles;
}

int64_t block_sparse_tiles(const std::vector<int>& blocks, int) {
  return std::count_if(blocks.begin(), blocks.end(), [](int x) { return x >= 0; });
}

std::vector<float> capture_qkv(
    const ModelWeights& w, const std::vector<int>& ids,
    const std::function<void(int layer, const float* q, const float* k, const float* v)>& fn) {
  const ModelConfig& c = w.config;
  c.validate();
  check_prompt_ids(c, ids, "calibration prompt");
  const std::vector<double> inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);
  LocalAttentionParams a;  // dense, K / V in one reused layer buffer
  a.config = &c;
  a.n = static_cast<int64_t>(ids.size());
  a.observe = fn;
  return local_forward(w, inv_freq, EngineOptions{}.mlp_chunk, ids.data(), a);
}

HeadSearch search_head(const float* q, int64_t q_stride, const float* k, const float* v,
                       int64_t kv_stride, int64_t n, int head_dim,
                       const std::vector<int64_t>& budget_tiles, const SearchOptions& opt,
                       RgbImage* heatmap) {
  opt.validate();
  if (n < 2 * kBlock)
    throw std::runtime_error("search_head: needs at least " + std::to_string(2 * kBlock) +
                             " tokens, got " + std::to_string(n));
  HeadSearch hs;
  const int64_t causal = dense_tiles(n), nb = num_blocks(n);
  const int nbud = static_cast<int>(budget_tiles.size());
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  HeadContext ctx;
  const HeadAttention att = dense_softmax(q, q_stride, k, kv_stride, n, head_dim);
  ctx.att = &att;
  ctx.v = v;
  ctx.vs = kv_stride;
  ctx.d = head_dim;
  ctx.err_rows = sample_rows(n, opt.error_rows);

  // Vertical-slash scores of this head.
  std::vector<float> col, slash;
  head_vs_scores(q, q_stride, k, kv_stride, head_dim, n, scale, -1, -1, &col, &slash);
  auto vs_pair = [&](double share, int64_t t) {
    const int64_t vv = std::min<int64_t>(n, kMinVertical + static_cast<int64_t>(share * t));
    const int64_t ss = std::min<int64_t>(n, kMinSlash + static_cast<int64_t>((1 - share) * t));
    return HeadPattern::vertical_slash(static_cast<int>(vv), static_cast<int>(ss));
  };
  auto vs_index = [&](const HeadPattern& p) {
    return cpu::vs_build_index({cpu::vs_select(col.data(), slash.data(), n, p.a, p.b)}, n);
  };
  auto vs_tiles = [&](const HeadPattern& p) { return vs_mask_tiles(vs_index(p), 0); };

  const cpu::BlockSparseEstimateParams be =
      one_head_bs_params(q, q_stride, k, kv_stride, head_dim, n, scale);
  auto bs_index = [&](int topk) {
    BlockSparseIndex ix;
    MPREFILL_EDGE_CHECK(cpu::block_sparse_estimate(be, &topk, &ix),
                        at("block_sparse_estimate", -1, -1), "");
    return ix;
  };

  auto add = [&](HeadPattern p, int budget, int shape, int64_t tiles, const Mask& m) {
    Candidate c;
    c.pattern = p;
    c.budget = budget;
    c.shape = shape;
    c.tiles = tiles;
    c.density = static_cast<double>(tiles) / causal;
    score(ctx, m, &c);
    hs.candidates.push_back(c);
  };
  // Dense reference (recall 1 by construction of the score).
  {
    Mask m;
    m.kind = PatternKind::kDense;
    m.n = n;
    add(HeadPattern::dense(), -1, 0, causal, m);
  }
  for (int bi = 0; bi < nbud; ++bi) {
    const int64_t T = budget_tiles[bi];
    for (int si = 0; si < static_cast<int>(opt.ashape_sinks.size()); ++si) {
      const int sink = opt.ashape_sinks[si];
      if (sink >= n) continue;
      const int64_t nl = largest_fitting(
          1, n, T, [&](int64_t x) { return ashape_tiles(sink, static_cast<int>(x), n); });
      if (nl < 0) continue;
      const int loc = static_cast<int>(nl);
      add(HeadPattern::a_shape(sink, loc), bi, si, ashape_tiles(sink, loc, n),
          ashape_mask(sink, loc, n));
    }
    for (int vi = 0; vi < static_cast<int>(opt.vs_vertical_shares.size()); ++vi) {
      const double share = opt.vs_vertical_shares[vi];
      const int64_t t =
          largest_fitting(0, 2 * n, T, [&](int64_t x) { return vs_tiles(vs_pair(share, x)); });
      if (t < 0) continue;
      const HeadPattern p = vs_pair(share, t);
      const VsIndex ix = vs_index(p);
      add(p, bi, vi, vs_mask_tiles(ix, 0), vs_mask(ix));
    }
    {
      const int64_t k = largest_fitting(1, nb, T, [&](int64_t x) {
        return block_sparse_tiles(bs_index(static_cast<int>(x)).blocks, 0);
      });
      if (k >= 1) {
        const BlockSparseIndex ix = bs_index(static_cast<int>(k));
        add(HeadPattern::block_sparse(static_cast<int>(k)), bi, 0,
            block_sparse_tiles(ix.blocks, ix.k), bs_mask(ix.blocks, ix.k, n));
      }
    }
  }
  // Choice per budget.
  hs.chosen.assign(nbud, -1);
  hs.runner_up.assign(nbud, -1);
  auto better = [&](int a, int b) {  // candidate a ranks before b
    const Candidate &x = hs.candidates[a], &y = hs.candidates[b];
    if (std::abs(x.recall - y.recall) > 1e-9) return x.recall > y.recall;
    return x.rel_error < y.rel_error;
  };
  for (int bi = 0; bi < nbud; ++bi) {
    std::vector<int> idx;
    for (int i = 0; i < static_cast<int>(hs.candidates.size()); ++i)
      if (hs.candidates[i].budget == bi) idx.push_back(i);
    std::stable_sort(idx.begin(), idx.end(), better);
    if (!idx.empty()) hs.chosen[bi] = idx[0];
    if (idx.size() > 1) hs.runner_up[bi] = idx[1];
  }
  if (heatmap && hs.chosen[0] >= 0) {
    const Candidate& ch = hs.candidates[hs.chosen[0]];
    Mask m;
    switch (ch.pattern.kind) {
      case PatternKind::kAShape:
        m = ashape_mask(ch.pattern.a, ch.pattern.b, n);
        break;
      case PatternKind::kVerticalSlash:
        m = vs_mask(vs_index(ch.pattern));
        break;
      case PatternKind::kBlockSparse: {
        const BlockSparseIndex ix = bs_index(ch.pattern.a);
        m = bs_mask(ix.blocks, ix.k, n);
        break;
      }
      case PatternKind::kDense:
        m.kind = PatternKind::kDense;
        m.n = n;
        break;
    }
    *heatmap = render_heatmap(att, m, opt.heatmap_size);
  }
  return hs;
}

SearchResult search_patterns(const ModelWeights& w, const std::vector<int>& ids,
                             const SearchOptions& opt) {
  const auto t0 = Clock::now();
  opt.validate();
  const ModelConfig& cfg = w.config;
  check_prompt_ids(cfg, ids, "calibration prompt");
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n < 2 * kBlock)
    throw std::runtime_error("calibration prompt has " + std::to_string(n) +
                             " tokens; the search needs at least " + std::to_string(2 * kBlock) +
                             " (two 64-token blocks)");
  if (n > (int64_t{1} << 31) - 1) throw std::runtime_error("calibration prompt is over 2^31");
  for (const auto& [l, h] : opt.heatmap_heads)
    if (l < 0 || l >= cfg.n_layers || h < 0 || h >= cfg.n_heads)
      throw std::runtime_error("heatmap head " + std::to_string(l) + ":" + std::to_string(h) +
                               " is outside the model's " + std::to_string(cfg.n_layers) +
                               " layers x " + std::to_string(cfg.n_heads) + " heads");

  SearchResult res;
  res.seq_len = n;
  res.causal_tiles = dense_tiles(n);
  res.n_layers = cfg.n_layers;
  res.n_heads = cfg.n_heads;
  for (double b : opt.budgets)
    res.budget_tiles.push_back(b <= 1.0 ? static_cast<int64_t>(std::floor(b * res.causal_tiles))
                                        : static_cast<int64_t>(std::floor(b)));
  res.heads.resize(static_cast<size_t>(cfg.n_layers) * cfg.n_heads);

  const int hd = cfg.head_dim, group = cfg.n_heads / cfg.n_kv_heads;
  const int64_t QD = cfg.q_dim(), KVD = cfg.kv_dim();

  capture_qkv(w, ids, [&](int l, const float* q, const float* k, const float* v) {
    for (int h = 0; h < cfg.n_heads; ++h) {
      const bool want_map = std::find(opt.heatmap_heads.begin(), opt.heatmap_heads.end(),
                                      std::make_pair(l, h)) != opt.heatmap_heads.end();
      RgbImage img;
      HeadSearch& hs = res.heads[static_cast<size_t>(l) * cfg.n_heads + h];
      hs = search_head(q + int64_t{h} * hd, QD, k + int64_t{h / group} * hd,
                       v + int64_t{h / group} * hd, KVD, n, hd, res.budget_tiles, opt,
                       want_map ? &img : nullptr);
      hs.layer = l;
      hs.head = h;
      if (want_map && hs.chosen[0] >= 0)
        res.heatmaps.push_back({l, h, hs.candidates[hs.chosen[0]], std::move(img)});
    }
    if (opt.progress) opt.progress(l, cfg.n_layers);
  });
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return res;
}

SparsePolicy SearchResult::policy(int budget) const {
  if (budget < 0 || budget >= static_cast<int>(budget_tiles.size()))
    throw std::runtime_error("search result has no budget " + std::to_string(budget));
  SparsePolicy p;
  p.source = "search";
  p.n_layers = n_layers;
  p.n_heads = n_heads;
  for (const HeadSearch& h : heads)
    p.heads.push_back(h.chosen[budget] >= 0 ? h.candidates[h.chosen[budget]].pattern
                                            : HeadPattern::block_sparse(1));
  return p;
}

std::string minference_json(const SearchResult& r, int budget) {
  const SparsePolicy pol = r.policy(budget);
  nlohmann::ordered_json doc = nlohmann::ordered_json::array();
  for (int l = 0; l < r.n_layers; ++l) {
    nlohmann::ordered_json layer = nlohmann::ordered_json::object();
    for (int h = 0; h < r.n_heads; ++h) {
      const HeadSearch& hs = r.at(l, h);
      const HeadPattern& p = pol.heads[static_cast<size_t>(l) * r.n_heads + h];
      const double recall = hs.chosen[budget] >= 0 ? hs.candidates[hs.chosen[budget]].recall : 0;
      switch (p.kind) {
        case PatternKind::kAShape:
          layer[std::to_string(h)] = {"stream_llm", p.a, p.b, recall};
          break;
        case PatternKind::kVerticalSlash:
          layer[std::to_string(h)] = {"vertical_and_slash", p.a, p.b, recall};
          break;
        case PatternKind::kBlockSparse:
          layer[std::to_string(h)] = {"block_sparse", p.a, 0, recall};
          break;
        case PatternKind::kDense:
          throw std::runtime_error("search: a dense choice cannot be written in MInference format");
      }
    }
    doc.push_back(layer);
  }
  return doc.dump() + "\n";
}

std::string search_csv(const SearchResult& r) {
  std::ostringstream s;
  s << "layer,head,pattern,a,b,budget_tiles,tiles,density,recall,rel_error,choice\n";
  s.precision(6);
  for (const HeadSearch& h : r.heads) {
    for (int i = 0; i < static_cast<int>(h.candidates.size()); ++i) {
      const Candidate& c = h.candidates[i];
      const char* choice = "";
      if (c.budget >= 0 && h.chosen[c.budget] == i) choice = "chosen";
      if (c.budget >= 0 && h.runner_up[c.budget] == i) choice = "runner_up";
      s << h.layer << ',' << h.head << ',' << to_string(c.pattern.kind) << ',' << c.pattern.a << ','
        << c.pattern.b << ',' << (c.budget >= 0 ? r.budget_tiles[c.budget] : r.causal_tiles) << ','
        << c.tiles << ',' << c.density << ',' << c.recall << ',' << c.rel_error << ',' << choice
        << '\n';
    }
  }
  return s.str();
}

double plan_tile_density(const PrefillPlan& plan, const SparsePolicy& policy, int n_heads) {
  const int64_t n = plan.seq_len;
  if (n <= 0 || plan.layers.empty()) throw std::runtime_error("tile density: plan is empty");
  double tiles = 0;
  int heads = 0;
  for (size_t l = 0; l < plan.layers.size(); ++l) {
    for (int h = 0; h < n_heads; ++h, ++heads) {
      const HeadPlan& hp = plan.layers[l].at(h);
      const HeadPattern p = policy.at(static_cast<int>(l), h, n);
      switch (hp.kind) {
        case PatternKind::kDense:
          tiles += dense_tiles(n);
          break;
        case PatternKind::kAShape:
          tiles += ashape_tiles(p.a, p.b, n);
          break;
        case PatternKind::kVerticalSlash:
          tiles += vs_mask_tiles(cpu::vs_build_index({hp.vs}, n), 0);
          break;
        case PatternKind::kBlockSparse:
          tiles += block_sparse_tiles(hp.blocks, hp.topk);
          break;
      }
    }
  }
  return tiles / (static_cast<double>(heads) * dense_tiles(n));
}

SparsePolicy scale_policy(const SparsePolicy& p, double f) {
  SparsePolicy q = p;
  auto sc = [&](int x, int lo) { return std::max(lo, static_cast<int>(std::floor(x * f))); };
  for (HeadPattern& h : q.heads) {
    switch (h.kind) {
      case PatternKind::kAShape:
        h = HeadPattern::a_shape(sc(h.a, 0), sc(h.b, 1));
        break;
      case PatternKind::kVerticalSlash:
        h = HeadPattern::vertical_slash(sc(h.a, 0), sc(h.b, 0));
        break;
      case PatternKind::kBlockSparse:
        h = HeadPattern::block_sparse(sc(h.a, 1));
        break;
      case PatternKind::kDense:
        break;
    }
  }
  return q;
}

SparsePolicy scale_policy_to_density(const ModelWeights& w, const std::vector<int>& ids,
                                     const SparsePolicy& p, double target, double* factor) {
  const ModelConfig& c = w.config;
  p.check_model(c);
  if (!(target > 0 && target <= 1))
    throw std::runtime_error("target tile density must be in (0, 1]");
  const int64_t n = static_cast<int64_t>(ids.size());
  const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
  const int64_t QD = c.q_dim(), KVD = c.kv_dim();
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  if (factor) *factor = 1.0;
  if (p.heads.empty()) return p;  // all dense: nothing to scale
  // Per head: VS scores (from the last 64 queries) or Q/K copies for block-sparse.
  struct HeadData {
    std::vector<float> col, slash, q, k;
  };
  std::vector<HeadData> data(static_cast<size_t>(c.n_layers) * c.n_heads);
  capture_qkv(w, ids, [&](int l, const float* q, const float* k, const float*) {
    for (int h = 0; h < c.n_heads; ++h) {
      const HeadPattern& hp = p.heads[static_cast<size_t>(l) * c.n_heads + h];
      HeadData& d = data[static_cast<size_t>(l) * c.n_heads + h];
      const float* qh = q + int64_t{h} * hd;
      const float* kh = k + int64_t{h / group} * hd;
      if (hp.kind == PatternKind::kVerticalSlash) {
        head_vs_scores(qh, QD, kh, KVD, hd, n, scale, l, h, &d.col, &d.slash);
      } else if (hp.kind == PatternKind::kBlockSparse) {
        d.q.resize(n * hd);
        d.k.resize(n * hd);
        for (int64_t r = 0; r < n; ++r)
          for (int i = 0; i < hd; ++i) {
            d.q[r * hd + i] = qh[r * QD + i];
            d.k[r * hd + i] = kh[r * KVD + i];
          }
      }
    }
  });
  auto density = [&](const SparsePolicy& q) {
    double tiles = 0;
    for (size_t i = 0; i < q.heads.size(); ++i) {
      const HeadPattern& hp = q.heads[i];
      const HeadData& d = data[i];
      switch (hp.kind) {
        case PatternKind::kDense:
          tiles += dense_tiles(n);
          break;
        case PatternKind::kAShape:
          tiles += ashape_tiles(hp.a, hp.b, n);
          break;
        case PatternKind::kVerticalSlash:
          tiles += vs_mask_tiles(
              cpu::vs_build_index({cpu::vs_select(d.col.data(), d.slash.data(), n, hp.a, hp.b)}, n),
              0);
          break;
        case PatternKind::kBlockSparse: {
          const cpu::BlockSparseEstimateParams e =
              one_head_bs_params(d.q.data(), hd, d.k.data(), hd, hd, n, scale);
          BlockSparseIndex ix;
          MPREFILL_EDGE_CHECK(cpu::block_sparse_estimate(e, &hp.a, &ix),
                              at("block_sparse_estimate", -1, -1), "");
          tiles += block_sparse_tiles(ix.blocks, ix.k);
          break;
        }
      }
    }
    return tiles / (static_cast<double>(q.heads.size()) * dense_tiles(n));
  };
  if (density(p) <= target) return p;
  const double smallest = density(scale_policy(p, 0.0));
  if (smallest > target)
    throw std::runtime_error("cannot scale policy " + p.source + " to tile density " +
                             std::to_string(target) + " at " + std::to_string(n) +
                             " tokens: its smallest budgets give " + std::to_string(smallest));
  double lo = 0, hi = 1;
  for (int it = 0; it < 30; ++it) {
    const double mid = 0.5 * (lo + hi);
    (density(scale_policy(p, mid)) <= target ? lo : hi) = mid;
  }
  if (factor) *factor = lo;
  SparsePolicy q = scale_policy(p, lo);
  q.source = p.source + "@" + std::to_string(target);
  return q;
}

}  // namespace mprefill
