// The shared CPU layer forward (engine/cpu_layer.h) against a naive fp64 reference
// written from the layer's definition, at awkward sizes (hidden 77, head_dim 10, 3 query
// heads on 1 KV head, FFN 53, 37 rows at scattered positions, MLP chunks of 16: none a
// multiple of 64 or of a chunk), random non-zero weights, biases on: each op, the whole
// forward with an fp64 attention, and a tp 2 split (two threads whose partial outputs
// are summed by the reduce hook) against the one-rank forward.
#include <gtest/gtest.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <random>
#include <thread>
#include <vector>

#include "engine/cpu_layer.h"

namespace mprefill {
namespace {

constexpr int64_t kHidden = 77, kFfn = 53, kRows = 37, kVocab = 41;
constexpr int kHeadDim = 10, kQHeads = 3, kKvHeads = 1, kLayers = 2;
constexpr float kEps = 1e-5f;

using Vec = std::vector<float>;
using Dvec = std::vector<double>;

Vec random_vec(size_t n, std::mt19937& g, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  Vec x(n);
  for (float& v : x) {
    v = d(g);
    if (v == 0.f) v = 0.5f * hi;  // non-zero everywhere
  }
  return x;
}

// One layer's weights, owned; view() is the CpuLayer of heads [q0, q0 + nq) (their KV
// heads) and FFN rows [f0, f1): the tp slice of a rank.
struct Layer {
  Vec attn_norm, ffn_norm, wq, wk, wv, bq, bk, bv, wo, gate, up, down;
  // Slices (filled by slice()).
  Vec s_wq, s_wk, s_wv, s_bq, s_bk, s_bv, s_wo, s_gate, s_up, s_down;

  explicit Layer(std::mt19937& g) {
    const float w = 1.f / std::sqrt(static_cast<float>(kHidden));
    attn_norm = random_vec(kHidden, g, 0.5f, 1.5f);
    ffn_norm = random_vec(kHidden, g, 0.5f, 1.5f);
    wq = random_vec(kQHeads * kHeadDim * kHidden, g, -w, w);
    wk = random_vec(kKvHeads * kHeadDim * kHidden, g, -w, w);
    wv = random_vec(kKvHeads * kHeadDim * kHidden, g, -w, w);
    bq = random_vec(kQHeads * kHeadDim, g, -0.1f, 0.1f);
    bk = random_vec(kKvHeads * kHeadDim, g, -0.1f, 0.1f);
    bv = random_vec(kKvHeads * kHeadDim, g, -0.1f, 0.1f);
    wo = random_vec(kHidden * kQHeads * kHeadDim, g, -w, w);
    gate = random_vec(kFfn * kHidden, g, -w, w);
    up = random_vec(kFfn * kHidden, g, -w, w);
    down = random_vec(kHidden * kFfn, g, -w, w);
  }

  CpuLayer view() const {
    CpuLayer o;
    o.attn_norm = attn_norm.data();
    o.ffn_norm = ffn_norm.data();
    o.wq = wq.data();
    o.wk = wk.data();
    o.wv = wv.data();
    o.bq = bq.data();
    o.bk = bk.data();
    o.bv = bv.data();
    o.wo = wo.data();
    o.gate = gate.data();
    o.up = up.data();
    o.down = down.data();
    o.n_q = kQHeads;
    o.n_kv = kKvHeads;
    o.ffn = kFfn;
    return o;
  }

  // Query heads [q0, q1) with every KV head (kKvHeads == 1), FFN rows [f0, f1).
  CpuLayer slice(int q0, int q1, int64_t f0, int64_t f1) {
    const int64_t hd = kHeadDim, QD = kQHeads * hd;
    s_wq.assign(wq.begin() + q0 * hd * kHidden, wq.begin() + q1 * hd * kHidden);
    s_bq.assign(bq.begin() + q0 * hd, bq.begin() + q1 * hd);
    s_wo.clear();
    for (int64_t r = 0; r < kHidden; ++r)
      s_wo.insert(s_wo.end(), wo.begin() + r * QD + q0 * hd, wo.begin() + r * QD + q1 * hd);
    s_gate.assign(gate.begin() + f0 * kHidden, gate.begin() + f1 * kHidden);
    s_up.assign(up.begin() + f0 * kHidden, up.begin() + f1 * kHidden);
    s_down.clear();
    for (int64_t r = 0; r < kHidden; ++r)
      s_down.insert(s_down.end(), down.begin() + r * kFfn + f0, down.begin() + r * kFfn + f1);
    CpuLayer o = view();
    o.wq = s_wq.data();
    o.bq = s_bq.data();
    o.wo = s_wo.data();
    o.gate = s_gate.data();
    o.up = s_up.data();
    o.down = s_down.data();
    o.n_q = q1 - q0;
    o.ffn = f1 - f0;
    return o;
  }
};

// ---------------------------------------------------------------- fp64 reference
Dvec rmsnorm64(const Dvec& x, const Vec& w, int64_t n) {
  Dvec y(x.size());
  for (int64_t t = 0; t < n; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < kHidden; ++i) ss += x[t * kHidden + i] * x[t * kHidden + i];
    const double s = 1.0 / std::sqrt(ss / kHidden + kEps);
    for (int64_t i = 0; i < kHidden; ++i) y[t * kHidden + i] = x[t * kHidden + i] * s * w[i];
  }
  return y;
}
// y[n][out] = x[n][in] W^T (+ b)
Dvec matmul64(const Dvec& x, const Vec& w, const Vec* b, int64_t n, int64_t in, int64_t out) {
  Dvec y(static_cast<size_t>(n * out));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double acc = b ? (*b)[o] : 0.0;
      for (int64_t i = 0; i < in; ++i) acc += x[t * in + i] * w[o * in + i];
      y[t * out + o] = acc;
    }
  return y;
}
void rope64(Dvec* x, int64_t n, int heads, const std::vector<int64_t>& pos, RopeStyle style,
            const std::vector<double>& inv_freq) {
  const int half = kHeadDim / 2;
  for (int64_t t = 0; t < n; ++t)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < half; ++i) {
        double* row = x->data() + (t * heads + h) * kHeadDim;
        double* a = style == RopeStyle::kRotateHalf ? row + i : row + 2 * i;
        double* b = style == RopeStyle::kRotateHalf ? a + half : a + 1;
        const double ang = static_cast<double>(pos[t]) * inv_freq[i];
        const double na = *a * std::cos(ang) - *b * std::sin(ang);
        const double nb = *a * std::sin(ang) + *b * std::cos(ang);
        *a = na;
        *b = nb;
      }
}
// Causal attention by position, GQA (query head h reads KV head h / (nq / nkv)).
Dvec attention64(const Dvec& q, const Dvec& k, const Dvec& v, const std::vector<int64_t>& pos,
                 int nq, int nkv) {
  const int64_t n = static_cast<int64_t>(pos.size()), hd = kHeadDim;
  Dvec o(static_cast<size_t>(n * nq * hd), 0.0);
  for (int64_t r = 0; r < n; ++r)
    for (int h = 0; h < nq; ++h) {
      const int g = h / (nq / nkv);
      Dvec s(n, -INFINITY);
      double mx = -INFINITY;
      for (int64_t c = 0; c < n; ++c) {
        if (pos[c] > pos[r]) continue;
        double d = 0;
        for (int i = 0; i < hd; ++i) d += q[(r * nq + h) * hd + i] * k[(c * nkv + g) * hd + i];
        s[c] = d / std::sqrt(static_cast<double>(hd));
        mx = std::max(mx, s[c]);
      }
      double sum = 0;
      for (int64_t c = 0; c < n; ++c) sum += s[c] == -INFINITY ? 0 : std::exp(s[c] - mx);
      for (int64_t c = 0; c < n; ++c) {
        if (s[c] == -INFINITY) continue;
        const double p = std::exp(s[c] - mx) / sum;
        for (int i = 0; i < hd; ++i) o[(r * nq + h) * hd + i] += p * v[(c * nkv + g) * hd + i];
      }
    }
  return o;
}
double silu(double x) { return x / (1.0 + std::exp(-x)); }

Dvec to64(const float* x, size_t n) { return Dvec(x, x + n); }

// max |got - ref| / max |ref|
double rel_err(const float* got, const Dvec& ref) {
  double d = 0, m = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    d = std::max(d, std::fabs(got[i] - ref[i]));
    m = std::max(m, std::fabs(ref[i]));
  }
  EXPECT_GT(m, 0.0);
  return d / m;
}

std::vector<int64_t> scattered_positions(int64_t n) {
  std::vector<int64_t> pos(n);
  for (int64_t i = 0; i < n; ++i) pos[i] = 3 * i + (i % 5) + 7;  // increasing, gaps
  return pos;
}

struct CpuLayerOps : ::testing::Test {
  std::mt19937 g{20261207};
  std::vector<double> inv_freq = rope_inv_freq(kHeadDim, 10000.0, RopeScaling{});
  CpuShape shape(RopeStyle style, int64_t chunk) const {
    CpuShape s;
    s.hidden = kHidden;
    s.head_dim = kHeadDim;
    s.rms_eps = kEps;
    s.rope_style = style;
    s.inv_freq = &inv_freq;
    s.mlp_chunk = chunk;
    return s;
  }
};

TEST_F(CpuLayerOps, QkvMatchesFp64BothRopeStyles) {
  Layer L(g);
  const Vec x = random_vec(kRows * kHidden, g, -2.f, 2.f);
  const std::vector<int64_t> pos = scattered_positions(kRows);
  for (RopeStyle style : {RopeStyle::kRotateHalf, RopeStyle::kAdjacentPairs}) {
    for (bool explicit_pos : {true, false}) {
      const int64_t pos0 = 11;
      std::vector<int64_t> p = pos;
      if (!explicit_pos)
        for (int64_t i = 0; i < kRows; ++i) p[i] = pos0 + i;
      Vec xb(x.size()), q(kRows * kQHeads * kHeadDim), k(kRows * kKvHeads * kHeadDim), v(k.size());
      cpu_layer_qkv(shape(style, 16), L.view(), x.data(), kRows,
                    explicit_pos ? pos.data() : nullptr, pos0, xb.data(), q.data(), k.data(),
                    v.data());
      const Dvec xn = rmsnorm64(to64(x.data(), x.size()), L.attn_norm, kRows);
      Dvec rq = matmul64(xn, L.wq, &L.bq, kRows, kHidden, kQHeads * kHeadDim);
      Dvec rk = matmul64(xn, L.wk, &L.bk, kRows, kHidden, kKvHeads * kHeadDim);
      const Dvec rv = matmul64(xn, L.wv, &L.bv, kRows, kHidden, kKvHeads * kHeadDim);
      rope64(&rq, kRows, kQHeads, p, style, inv_freq);
      rope64(&rk, kRows, kKvHeads, p, style, inv_freq);
      EXPECT_LT(rel_err(xb.data(), xn), 1e-6);
      EXPECT_LT(rel_err(q.data(), rq), 1e-5) << "style " << static_cast<int>(style);
      EXPECT_LT(rel_err(k.data(), rk), 1e-5) << "style " << static_cast<int>(style);
      EXPECT_LT(rel_err(v.data(), rv), 1e-5);
    }
  }
}

TEST_F(CpuLayerOps, OutAndChunkedMlpMatchFp64) {
  Layer L(g);
  const Vec att = random_vec(kRows * kQHeads * kHeadDim, g, -1.f, 1.f);
  const Vec x = random_vec(kRows * kHidden, g, -2.f, 2.f);
  Vec y(kRows * kHidden);
  cpu_layer_out(shape(RopeStyle::kRotateHalf, 16), L.view(), att.data(), kRows, y.data());
  EXPECT_LT(rel_err(y.data(), matmul64(to64(att.data(), att.size()), L.wo, nullptr, kRows,
                                       kQHeads * kHeadDim, kHidden)),
            1e-5);

  const Dvec h = rmsnorm64(to64(x.data(), x.size()), L.ffn_norm, kRows);
  const Dvec gt = matmul64(h, L.gate, nullptr, kRows, kHidden, kFfn);
  const Dvec u = matmul64(h, L.up, nullptr, kRows, kHidden, kFfn);
  Dvec act(gt.size());
  for (size_t i = 0; i < act.size(); ++i) act[i] = silu(gt[i]) * u[i];
  const Dvec ref = matmul64(act, L.down, nullptr, kRows, kFfn, kHidden);
  // Chunks of 16 (16 + 16 + 5 rows), 1 row, and one chunk larger than the rows.
  for (int64_t chunk : {16, 1, 1000}) {
    Vec out(kRows * kHidden, NAN), gate(std::min(chunk, kRows) * kFfn), up(gate.size());
    cpu_layer_mlp(shape(RopeStyle::kRotateHalf, chunk), L.view(), x.data(), kRows, out.data(),
                  gate.data(), up.data());
    EXPECT_LT(rel_err(out.data(), ref), 1e-5) << "chunk " << chunk;
  }
}

// fp64 causal attention of the layer's local heads, K / V kept per layer.
class Fp64Attention final : public CpuAttention {
 public:
  Fp64Attention(const std::vector<const CpuLayer*>& layers, const std::vector<int64_t>& pos)
      : layers_(layers), pos_(pos), k_(layers.size()), v_(layers.size()) {}
  void kv_rows(int l, float** k, float** v) override {
    const int64_t kv = layers_[l]->kv_row(kHeadDim) * static_cast<int64_t>(pos_.size());
    k_[l].assign(kv, NAN);
    v_[l].assign(kv, NAN);
    *k = k_[l].data();
    *v = v_[l].data();
  }
  void attend(int l, const float* q, float* att) override {
    const CpuLayer& L = *layers_[l];
    const size_t nq = static_cast<size_t>(L.q_row(kHeadDim)) * pos_.size();
    const Dvec o = attention64(to64(q, nq), to64(k_[l].data(), k_[l].size()),
                               to64(v_[l].data(), v_[l].size()), pos_, L.n_q, L.n_kv);
    for (size_t i = 0; i < o.size(); ++i) att[i] = static_cast<float>(o[i]);
  }
  void layer_done(int l) override { done_.push_back(l); }
  std::vector<int> done_;

 private:
  std::vector<const CpuLayer*> layers_;
  std::vector<int64_t> pos_;
  std::vector<Vec> k_, v_;
};

// The whole forward in fp64 (final residual rows).
Dvec forward64(const std::vector<Layer>& layers, const Vec& embed, const std::vector<int>& ids,
               const std::vector<int64_t>& pos, RopeStyle style,
               const std::vector<double>& inv_freq) {
  const int64_t n = static_cast<int64_t>(ids.size()), QD = kQHeads * kHeadDim,
                KD = kKvHeads * kHeadDim;
  Dvec x(static_cast<size_t>(n * kHidden));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < kHidden; ++i) x[t * kHidden + i] = embed[ids[t] * kHidden + i];
  for (const Layer& L : layers) {
    const Dvec xn = rmsnorm64(x, L.attn_norm, n);
    Dvec q = matmul64(xn, L.wq, &L.bq, n, kHidden, QD);
    Dvec k = matmul64(xn, L.wk, &L.bk, n, kHidden, KD);
    const Dvec v = matmul64(xn, L.wv, &L.bv, n, kHidden, KD);
    rope64(&q, n, kQHeads, pos, style, inv_freq);
    rope64(&k, n, kKvHeads, pos, style, inv_freq);
    const Dvec y =
        matmul64(attention64(q, k, v, pos, kQHeads, kKvHeads), L.wo, nullptr, n, QD, kHidden);
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
    const Dvec h = rmsnorm64(x, L.ffn_norm, n);
    const Dvec gt = matmul64(h, L.gate, nullptr, n, kHidden, kFfn);
    const Dvec u = matmul64(h, L.up, nullptr, n, kHidden, kFfn);
    Dvec act(gt.size());
    for (size_t i = 0; i < act.size(); ++i) act[i] = silu(gt[i]) * u[i];
    const Dvec d = matmul64(act, L.down, nullptr, n, kFfn, kHidden);
    for (size_t i = 0; i < x.size(); ++i) x[i] += d[i];
  }
  return x;
}

struct Model {
  std::vector<Layer> layers;
  Vec embed, final_norm;
  std::vector<int> ids;
  explicit Model(std::mt19937& g) {
    for (int l = 0; l < kLayers; ++l) layers.emplace_back(g);
    embed = random_vec(kVocab * kHidden, g, -1.f, 1.f);
    final_norm = random_vec(kHidden, g, 0.5f, 1.5f);
    std::uniform_int_distribution<int> d(0, kVocab - 1);
    for (int64_t i = 0; i < kRows; ++i) ids.push_back(d(g));
  }
  // The forward of this model's rows at pos through layers (views of its layers).
  CpuForwardParams forward(const CpuShape& shape, const std::vector<CpuLayer>& views,
                           const std::vector<int64_t>& pos, CpuAttention* att) const {
    CpuForwardParams p;
    p.shape = shape;
    p.layers = views.data();
    p.n_layers = kLayers;
    p.embed = embed.data();
    p.vocab = kVocab;
    p.ids = ids.data();
    p.n = kRows;
    p.pos = pos.data();
    p.attention = att;
    return p;
  }
};

TEST_F(CpuLayerOps, ForwardAndLogitsMatchFp64) {
  Model m(g);
  const std::vector<int64_t> pos = scattered_positions(kRows);
  std::vector<CpuLayer> views;
  for (const Layer& L : m.layers) views.push_back(L.view());
  Fp64Attention att({&views[0], &views[1]}, pos);
  CpuForwardParams p = m.forward(shape(RopeStyle::kAdjacentPairs, 16), views, pos, &att);
  int reduces = 0;
  p.reduce = [&](float*, int64_t count) {
    EXPECT_EQ(count, kRows * kHidden);
    ++reduces;
  };
  const Vec x = cpu_forward(p);
  EXPECT_EQ(reduces, 2 * kLayers);
  EXPECT_EQ(att.done_, (std::vector<int>{0, 1}));
  const Dvec ref = forward64(m.layers, m.embed, m.ids, pos, RopeStyle::kAdjacentPairs, inv_freq);
  EXPECT_LT(rel_err(x.data(), ref), 1e-5);

  // Logits of the last row, by vocab rows 3..40 of the embedding as the LM head.
  Vec logits(kVocab - 3);
  cpu_logits(p.shape, x.data() + (kRows - 1) * kHidden, m.final_norm.data(),
             m.embed.data() + 3 * kHidden, kVocab - 3, logits.data());
  const Dvec last(ref.end() - kHidden, ref.end());
  const Dvec rl =
      matmul64(rmsnorm64(last, m.final_norm, 1), Vec(m.embed.begin() + 3 * kHidden, m.embed.end()),
               nullptr, 1, kHidden, kVocab - 3);
  EXPECT_LT(rel_err(logits.data(), rl), 1e-5);
}

// Two tp ranks (threads): rank 0 holds query heads {0}, FFN rows [0, 20); rank 1 heads
// {1, 2}, rows [20, 53). The reduce hook sums their partial outputs; both ranks end with
// the residual rows of the one-rank forward (up to the order of the sum).
TEST_F(CpuLayerOps, TensorParallelSplitSumsToTheWholeLayer) {
  Model m(g);
  const std::vector<int64_t> pos = scattered_positions(kRows);
  std::vector<CpuLayer> whole;
  for (const Layer& L : m.layers) whole.push_back(L.view());
  Fp64Attention att1({&whole[0], &whole[1]}, pos);
  const CpuForwardParams p = m.forward(shape(RopeStyle::kRotateHalf, 16), whole, pos, &att1);
  const Vec x1 = cpu_forward(p);

  std::vector<Layer> copies = m.layers;  // slices own their storage per rank
  std::vector<Layer> copies2 = m.layers;
  std::vector<CpuLayer> r0, r1;
  for (int l = 0; l < kLayers; ++l) {
    r0.push_back(copies[l].slice(0, 1, 0, 20));
    r1.push_back(copies2[l].slice(1, 3, 20, kFfn));
  }
  std::barrier sync(2);
  std::vector<float> sum;
  float* bufs[2] = {nullptr, nullptr};
  auto reduce = [&](int rank, float* buf, int64_t count) {
    bufs[rank] = buf;
    sync.arrive_and_wait();
    if (rank == 0) {
      sum.assign(count, 0.f);
      for (int64_t i = 0; i < count; ++i) sum[i] = bufs[0][i] + bufs[1][i];
    }
    sync.arrive_and_wait();
    std::copy(sum.begin(), sum.end(), buf);
    sync.arrive_and_wait();
  };
  Vec out[2];
  auto rank_main = [&](int rank) {
    std::vector<CpuLayer>& mine = rank == 0 ? r0 : r1;
    Fp64Attention att({&mine[0], &mine[1]}, pos);
    CpuForwardParams q = p;
    q.layers = mine.data();
    q.attention = &att;
    q.reduce = [&, rank](float* buf, int64_t count) { reduce(rank, buf, count); };
    out[rank] = cpu_forward(q);
  };
  std::thread t1(rank_main, 1);
  rank_main(0);
  t1.join();
  const Dvec ref = to64(x1.data(), x1.size());
  EXPECT_EQ(out[0], out[1]);  // every tp rank holds the same residual rows
  EXPECT_LT(rel_err(out[0].data(), ref), 1e-5);
  EXPECT_LT(rel_err(out[0].data(),
                    forward64(m.layers, m.embed, m.ids, pos, RopeStyle::kRotateHalf, inv_freq)),
            1e-5);
}

}  // namespace
}  // namespace mprefill
