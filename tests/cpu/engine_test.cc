// Single-process engine against a naive fp64 forward pass, prefill/decode consistency,
// sparse policies and plan reuse, MLP chunking, sampler.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/sampler.h"
#include "tests/model_fixtures.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

// Small GQA model: q_dim (64) != hidden (40) so wo's shape is exercised.
ModelConfig small_config(RopeStyle style, bool bias, bool tied) {
  ModelConfig c;
  c.arch = bias ? "qwen2" : "llama";
  c.hidden = 40;
  c.intermediate = 72;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.vocab = 97;
  c.max_position = 1000;
  c.rms_eps = 1e-5f;
  c.rope_theta = 10000.0;
  c.rope_style = style;
  c.tie_word_embeddings = tied;
  c.qkv_bias = bias;
  return c;
}

Tensor rand_tensor(std::vector<int64_t> shape, uint64_t seed, float a, float center = 0.f) {
  Tensor t;
  t.shape = std::move(shape);
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  t.data = test::random_uniform(static_cast<size_t>(n), seed, a);
  for (float& x : t.data) x += center;
  return t;
}

// Weights scaled so that activations and attention scores are O(1): attention is far
// from uniform, so sparse masks change the result.
ModelWeights make_model(const ModelConfig& c, uint64_t seed) {
  ModelWeights w;
  w.config = c;
  const int64_t H = c.hidden, F = c.intermediate, Q = c.q_dim(), KV = c.kv_dim();
  uint64_t s = seed * 1000;
  w.embed = rand_tensor({c.vocab, H}, ++s, 1.f);
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights L;
    L.attn_norm = rand_tensor({H}, ++s, 0.2f, 1.f);
    L.wq = rand_tensor({Q, H}, ++s, 0.6f);
    L.wk = rand_tensor({KV, H}, ++s, 0.6f);
    L.wv = rand_tensor({KV, H}, ++s, 0.3f);
    L.wo = rand_tensor({H, Q}, ++s, 0.2f);
    if (c.qkv_bias) {
      L.bq = rand_tensor({Q}, ++s, 0.5f);
      L.bk = rand_tensor({KV}, ++s, 0.5f);
      L.bv = rand_tensor({KV}, ++s, 0.5f);
    }
    L.ffn_norm = rand_tensor({H}, ++s, 0.2f, 1.f);
    L.w_gate = rand_tensor({F, H}, ++s, 0.3f);
    L.w_up = rand_tensor({F, H}, ++s, 0.3f);
    L.w_down = rand_tensor({H, F}, ++s, 0.2f);
    w.layers.push_back(std::move(L));
  }
  w.final_norm = rand_tensor({H}, ++s, 0.2f, 1.f);
  if (!c.tie_word_embeddings) w.lm_head = rand_tensor({c.vocab, H}, ++s, 0.5f);
  return w;
}

std::vector<int> random_ids(int n, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int> ids(n);
  for (int& x : ids) x = static_cast<int>(g() % vocab);
  return ids;
}

// ---------------------------------------------------------------- naive fp64 forward
struct NaiveOut {
  std::vector<double> logits;             // last position
  std::vector<std::vector<double>> k, v;  // [layer][N * kv_dim], K after RoPE
};

std::vector<double> naive_rmsnorm(const std::vector<double>& x, const Tensor& w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / x.size() + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * w.data[i];
  return y;
}

std::vector<double> naive_matvec(const Tensor& w, const std::vector<double>& x, const Tensor* b) {
  const size_t out = w.shape[0], in = w.shape[1];
  std::vector<double> y(out);
  for (size_t o = 0; o < out; ++o) {
    double acc = b && !b->empty() ? b->data[o] : 0.0;
    for (size_t i = 0; i < in; ++i) acc += static_cast<double>(w.data[o * in + i]) * x[i];
    y[o] = acc;
  }
  return y;
}

void naive_rope(double* head, int d, int64_t pos, double theta, RopeStyle style) {
  for (int i = 0; i < d / 2; ++i) {
    const double ang = static_cast<double>(pos) * std::pow(theta, -2.0 * i / d);
    const double cs = std::cos(ang), sn = std::sin(ang);
    const int a = style == RopeStyle::kRotateHalf ? i : 2 * i;
    const int b = style == RopeStyle::kRotateHalf ? i + d / 2 : 2 * i + 1;
    const double x0 = head[a], x1 = head[b];
    head[a] = x0 * cs - x1 * sn;
    head[b] = x0 * sn + x1 * cs;
  }
}

NaiveOut naive_forward(const ModelWeights& w, const std::vector<int>& ids) {
  const ModelConfig& c = w.config;
  const int N = static_cast<int>(ids.size()), H = c.hidden, d = c.head_dim;
  const int QD = c.q_dim(), group = c.n_heads / c.n_kv_heads;
  std::vector<std::vector<double>> x(N, std::vector<double>(H));
  for (int t = 0; t < N; ++t)
    for (int i = 0; i < H; ++i) x[t][i] = w.embed.data[static_cast<size_t>(ids[t]) * H + i];
  NaiveOut out;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    std::vector<std::vector<double>> q(N), k(N), v(N);
    for (int t = 0; t < N; ++t) {
      const auto h = naive_rmsnorm(x[t], L.attn_norm, c.rms_eps);
      q[t] = naive_matvec(L.wq, h, &L.bq);
      k[t] = naive_matvec(L.wk, h, &L.bk);
      v[t] = naive_matvec(L.wv, h, &L.bv);
      for (int hh = 0; hh < c.n_heads; ++hh)
        naive_rope(&q[t][hh * d], d, t, c.rope_theta, c.rope_style);
      for (int hh = 0; hh < c.n_kv_heads; ++hh)
        naive_rope(&k[t][hh * d], d, t, c.rope_theta, c.rope_style);
    }
    out.k.emplace_back();
    out.v.emplace_back();
    for (int t = 0; t < N; ++t) {
      out.k.back().insert(out.k.back().end(), k[t].begin(), k[t].end());
      out.v.back().insert(out.v.back().end(), v[t].begin(), v[t].end());
    }
    for (int t = 0; t < N; ++t) {
      std::vector<double> att(QD, 0.0);
      for (int hh = 0; hh < c.n_heads; ++hh) {
        const int kh = hh / group;
        std::vector<double> s(t + 1);
        double m = -INFINITY;
        for (int j = 0; j <= t; ++j) {
          double dot = 0;
          for (int i = 0; i < d; ++i) dot += q[t][hh * d + i] * k[j][kh * d + i];
          s[j] = dot / std::sqrt(static_cast<double>(d));
          m = std::max(m, s[j]);
        }
        double z = 0;
        for (int j = 0; j <= t; ++j) z += (s[j] = std::exp(s[j] - m));
        for (int j = 0; j <= t; ++j)
          for (int i = 0; i < d; ++i) att[hh * d + i] += s[j] / z * v[j][kh * d + i];
      }
      const auto o = naive_matvec(L.wo, att, nullptr);
      for (int i = 0; i < H; ++i) x[t][i] += o[i];
      const auto h2 = naive_rmsnorm(x[t], L.ffn_norm, c.rms_eps);
      const auto g = naive_matvec(L.w_gate, h2, nullptr);
      const auto u = naive_matvec(L.w_up, h2, nullptr);
      std::vector<double> a(g.size());
      for (size_t i = 0; i < g.size(); ++i) a[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      const auto dn = naive_matvec(L.w_down, a, nullptr);
      for (int i = 0; i < H; ++i) x[t][i] += dn[i];
    }
  }
  const auto hf = naive_rmsnorm(x[N - 1], w.final_norm, c.rms_eps);
  out.logits = naive_matvec(w.output_matrix(), hf, nullptr);
  return out;
}

void expect_close(const std::vector<float>& out, const std::vector<double>& ref, double tol,
                  const std::string& what) {
  ASSERT_EQ(out.size(), ref.size()) << what;
  std::string why;
  EXPECT_TRUE(test::normwise_close(out.data(), ref.data(), ref.size(), tol, &why))
      << what << ": " << why;
}

std::vector<float> cache_rows(const std::vector<float>& buf, int64_t n, int kv_dim) {
  return std::vector<float>(buf.begin(), buf.begin() + n * kv_dim);
}

// ---------------------------------------------------------------- dense vs naive
struct Variant {
  RopeStyle style;
  bool bias, tied;
};

class EngineDense : public ::testing::TestWithParam<Variant> {};

TEST_P(EngineDense, PrefillMatchesNaiveFp64) {
  const Variant var = GetParam();
  const ModelWeights w = make_model(small_config(var.style, var.bias, var.tied), 7);
  const Engine eng(w, {.mlp_chunk = 32});
  for (int n : {1, 63, 77}) {
    const auto ids = random_ids(n, w.config.vocab, 100 + n);
    KvCache cache(w.config, n);
    const std::vector<float> logits = eng.prefill(ids, SparsePolicy::dense(), &cache);
    const NaiveOut ref = naive_forward(w, ids);
    EXPECT_EQ(cache.n_tokens, n);
    expect_close(logits, ref.logits, 1e-4, "logits n=" + std::to_string(n));
    for (int l = 0; l < w.config.n_layers; ++l) {
      const std::string tag = " layer " + std::to_string(l) + " n=" + std::to_string(n);
      expect_close(cache_rows(cache.k[l], n, w.config.kv_dim()), ref.k[l], 1e-4, "K" + tag);
      expect_close(cache_rows(cache.v[l], n, w.config.kv_dim()), ref.v[l], 1e-4, "V" + tag);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, EngineDense,
                         ::testing::Values(Variant{RopeStyle::kRotateHalf, true, false},
                                           Variant{RopeStyle::kAdjacentPairs, false, true}));

TEST(Engine, PrefillThenDecodeEqualsLongerPrefill) {
  const ModelWeights w = make_model(small_config(RopeStyle::kRotateHalf, true, false), 11);
  const Engine eng(w);
  const auto ids = random_ids(53, w.config.vocab, 5);
  const int n0 = 50;
  KvCache cache(w.config, 53);
  eng.prefill(std::vector<int>(ids.begin(), ids.begin() + n0), SparsePolicy::dense(), &cache);
  std::vector<float> last;
  for (int t = n0; t < 53; ++t) last = eng.decode_step(ids[t], t, &cache);
  EXPECT_EQ(cache.n_tokens, 53);

  KvCache full(w.config, 53);
  const std::vector<float> ref = eng.prefill(ids, SparsePolicy::dense(), &full);
  EXPECT_LE(test::max_abs_diff(last.data(), ref.data(), ref.size()), 1e-4);
  for (int l = 0; l < w.config.n_layers; ++l) {
    EXPECT_LE(test::max_abs_diff(cache.k[l].data(), full.k[l].data(), 53 * w.config.kv_dim()),
              1e-5);
    EXPECT_LE(test::max_abs_diff(cache.v[l].data(), full.v[l].data(), 53 * w.config.kv_dim()),
              1e-5);
  }
  // decode at the wrong position or past capacity is refused
  EXPECT_THROW(eng.decode_step(1, 52, &cache), std::runtime_error);
  EXPECT_THROW(eng.decode_step(1, 53, &cache), std::runtime_error);
}

TEST(Engine, MlpChunkDoesNotChangeResult) {
  const ModelWeights w = make_model(small_config(RopeStyle::kRotateHalf, false, false), 3);
  const auto ids = random_ids(131, w.config.vocab, 9);
  std::vector<std::vector<float>> outs;
  for (int64_t chunk : {1, 7, 64, 1024}) {
    const Engine eng(w, {.mlp_chunk = chunk});
    KvCache cache(w.config, 131);
    outs.push_back(eng.prefill(ids, SparsePolicy::dense(), &cache));
  }
  for (size_t i = 1; i < outs.size(); ++i)
    EXPECT_LE(test::max_abs_diff(outs[i].data(), outs[0].data(), outs[0].size()), 1e-5) << i;
}

// A prefill into a bf16 cache stores the rows a worker's KV export stores (the fp32 rows
// rounded to bf16) and leaves the logits alone: the attention reads the fp32 rows.
TEST(Engine, PrefillIntoBf16CacheStoresTheRoundedRows) {
  const ModelWeights w = make_model(small_config(RopeStyle::kRotateHalf, true, false), 13);
  const Engine eng(w);
  const int n = 97;
  const auto ids = random_ids(n, w.config.vocab, 17);
  KvCache f32(w.config, n), b16(w.config, n, DType::kBF16);
  const std::vector<float> a = eng.prefill(ids, SparsePolicy::dense(), &f32);
  const std::vector<float> b = eng.prefill(ids, SparsePolicy::dense(), &b16);
  EXPECT_EQ(b16.n_tokens, n);
  EXPECT_EQ(test::max_abs_diff(a.data(), b.data(), a.size()), 0.0);
  const KvCache rounded = round_to_bf16(f32, n);
  const int64_t kvd = w.config.kv_dim();
  std::vector<float> k1(n * kvd), v1(n * kvd), k2(n * kvd), v2(n * kvd);
  for (int l = 0; l < w.config.n_layers; ++l) {
    b16.read_rows(l, 0, n, k1.data(), v1.data());
    rounded.read_rows(l, 0, n, k2.data(), v2.data());
    EXPECT_EQ(test::max_abs_diff(k1.data(), k2.data(), k1.size()), 0.0) << "K layer " << l;
    EXPECT_EQ(test::max_abs_diff(v1.data(), v2.data(), v1.size()), 0.0) << "V layer " << l;
  }
}

// The engine reads the caller's weights in place (no copy): a change after construction
// shows in the next prefill.
TEST(Engine, PrefillReadsTheWeightsInPlace) {
  ModelWeights w = make_model(small_config(RopeStyle::kRotateHalf, false, false), 19);
  const Engine eng(w);
  const auto ids = random_ids(40, w.config.vocab, 23);
  KvCache c1(w.config, 40), c2(w.config, 40);
  const std::vector<float> before = eng.prefill(ids, SparsePolicy::dense(), &c1);
  for (float& x : w.layers[0].w_up.data) x *= 2.f;
  const std::vector<float> after = eng.prefill(ids, SparsePolicy::dense(), &c2);
  EXPECT_GT(test::max_abs_diff(before.data(), after.data(), before.size()), 1e-4);
}

// ---------------------------------------------------------------- sparse
TEST(EngineSparse, FullBudgetsEqualDense) {
  const ModelWeights w = make_model(small_config(RopeStyle::kRotateHalf, true, false), 21);
  const Engine eng(w);
  const int n = 150;  // 3 query blocks, the last one partial
  const auto ids = random_ids(n, w.config.vocab, 77);
  KvCache dc(w.config, n);
  const auto dense = eng.prefill(ids, SparsePolicy::dense(), &dc);
  double max_ref = 0;
  for (float x : dense) max_ref = std::max(max_ref, std::fabs(static_cast<double>(x)));
  const std::vector<std::pair<std::string, SparsePolicy>> policies = {
      {"a_shape", SparsePolicy::uniform(w.config, HeadPattern::a_shape(0, n), 0)},
      {"vertical_slash", SparsePolicy::uniform(w.config, HeadPattern::vertical_slash(n, n), 0)},
      {"block_sparse", SparsePolicy::uniform(w.config, HeadPattern::block_sparse(3), 0)},
      {"mixed",
       test::cycled_policy(w.config, {HeadPattern::a_shape(5, n), HeadPattern::vertical_slash(n, 0),
                                      HeadPattern::block_sparse(8), HeadPattern::dense()})},
  };
  for (const auto& [name, pol] : policies) {
    KvCache sc(w.config, n);
    PrefillStats st;
    const auto out = eng.prefill(ids, pol, &sc, nullptr, &st);
    EXPECT_FALSE(st.all_dense) << name;
    EXPECT_LE(test::max_abs_diff(out.data(), dense.data(), dense.size()), 1e-5 * max_ref) << name;
  }
}

TEST(EngineSparse, DenseBelowKeepsShortPromptsDense) {
  const ModelWeights w = make_model(small_config(RopeStyle::kRotateHalf, false, false), 4);
  const Engine eng(w);
  const int n = 300;
  const auto ids = random_ids(n, w.config.vocab, 1);
  SparsePolicy pol = SparsePolicy::uniform(w.config, HeadPattern::a_shape(1, 8), n + 1);
  KvCache c1(w.config, n), c2(w.config, n);
  PrefillStats st;
  const auto a = eng.prefill(ids, pol, &c1, nullptr, &st);
  const auto b = eng.prefill(ids, SparsePolicy::dense(), &c2);
  EXPECT_TRUE(st.all_dense);
  EXPECT_EQ(st.heads_by_kind[0], w.config.n_layers * w.config.n_heads);
  EXPECT_EQ(test::max_abs_diff(a.data(), b.data(), a.size()), 0.0);
  pol.dense_below = n;  // now sparse: the tiny A-shape must change the logits
  KvCache c3(w.config, n);
  const auto c = eng.prefill(ids, pol, &c3, nullptr, &st);
  EXPECT_FALSE(st.all_dense);
  EXPECT_EQ(st.heads_by_kind[1], w.config.n_layers * w.config.n_heads);
  EXPECT_GT(test::max_abs_diff(c.data(), b.data(), b.size()), 1e-3);
}

TEST(EngineSparse, PatternsFinitePlanFilledAndReused) {
  const ModelWeights w = make_model(small_config(RopeStyle::kRotateHalf, true, false), 31);
  const ModelConfig& c = w.config;
  const Engine eng(w);
  const int n = 389;  // 7 query blocks, the last partial
  const auto ids = random_ids(n, c.vocab, 123);
  const SparsePolicy pol =
      test::cycled_policy(c, {HeadPattern::a_shape(4, 40), HeadPattern::vertical_slash(30, 50),
                              HeadPattern::block_sparse(2), HeadPattern::dense()});
  KvCache dc(c, n);
  const auto dense = eng.prefill(ids, SparsePolicy::dense(), &dc);

  PrefillPlan plan;
  PrefillStats st;
  KvCache c1(c, n);
  const auto first = eng.prefill(ids, pol, &c1, &plan, &st);
  EXPECT_FALSE(st.plan_reused);
  for (float x : first) ASSERT_TRUE(std::isfinite(x));
  EXPECT_GT(test::max_abs_diff(first.data(), dense.data(), dense.size()), 1e-3)
      << "sparse masks this small should change the logits";
  EXPECT_EQ(st.heads_by_kind[0] + st.heads_by_kind[1] + st.heads_by_kind[2] + st.heads_by_kind[3],
            c.n_layers * c.n_heads);
  EXPECT_EQ(st.heads_by_kind[1], 2);
  EXPECT_EQ(st.heads_by_kind[2], 2);
  EXPECT_EQ(st.heads_by_kind[3], 2);

  // The plan holds what the policy asked for.
  ASSERT_EQ(plan.seq_len, n);
  ASSERT_EQ(plan.layers.size(), static_cast<size_t>(c.n_layers));
  int vs_l = -1, vs_h = -1, bs_l = -1, bs_h = -1;
  for (int l = 0; l < c.n_layers; ++l) {
    ASSERT_EQ(plan.layers[l].size(), static_cast<size_t>(c.n_heads));
    for (int h = 0; h < c.n_heads; ++h) {
      const HeadPlan& hp = plan.layers[l][h];
      EXPECT_EQ(hp.kind, pol.at(l, h, n).kind);
      if (hp.kind == PatternKind::kVerticalSlash) {
        EXPECT_EQ(hp.vs.columns.size(), 30u);
        EXPECT_EQ(hp.vs.offsets.size(), 50u);
        ASSERT_FALSE(hp.vs.offsets.empty());
        EXPECT_EQ(hp.vs.offsets.back(), 0);
        vs_l = l, vs_h = h;
      }
      if (hp.kind == PatternKind::kBlockSparse) {
        EXPECT_EQ(hp.topk, 2);
        ASSERT_EQ(hp.blocks.size(), static_cast<size_t>(num_blocks(n) * 2));
        for (int64_t b = 0; b < num_blocks(n); ++b) {
          const int* row = &hp.blocks[b * 2];
          EXPECT_TRUE(row[0] == b || row[1] == b) << "diagonal block missing";
        }
        bs_l = l, bs_h = h;
      }
    }
  }
  ASSERT_GE(vs_l, 0);
  ASSERT_GE(bs_l, 0);

  // Same plan again: identical output; the plan is not re-estimated.
  PrefillPlan kept = plan;
  KvCache c2(c, n);
  const auto second = eng.prefill(ids, pol, &c2, &plan, &st);
  EXPECT_TRUE(st.plan_reused);
  EXPECT_EQ(test::max_abs_diff(second.data(), first.data(), first.size()), 0.0);
  EXPECT_EQ(plan.layers[vs_l][vs_h].vs.columns, kept.layers[vs_l][vs_h].vs.columns);

  // A modified vertical-slash selection changes the result.
  {
    PrefillPlan mod = plan;
    VsSelection& s = mod.layers[vs_l][vs_h].vs;
    s.columns = {0};
    s.offsets = {0};
    KvCache c3(c, n);
    const auto out = eng.prefill(ids, pol, &c3, &mod);
    for (float x : out) ASSERT_TRUE(std::isfinite(x));
    EXPECT_GT(test::max_abs_diff(out.data(), first.data(), first.size()), 1e-4);
  }
  // A modified block list changes the result.
  {
    PrefillPlan mod = plan;
    HeadPlan& hp = mod.layers[bs_l][bs_h];
    for (int64_t b = 0; b < num_blocks(n); ++b) {
      hp.blocks[b * 2] = static_cast<int>(b);
      hp.blocks[b * 2 + 1] = -1;
    }
    KvCache c3(c, n);
    const auto out = eng.prefill(ids, pol, &c3, &mod);
    EXPECT_GT(test::max_abs_diff(out.data(), first.data(), first.size()), 1e-4);
  }
  // Plans that do not fit are refused.
  {
    PrefillPlan bad = plan;
    bad.seq_len = n - 1;
    KvCache c4(c, n);
    EXPECT_THROW(eng.prefill(ids, pol, &c4, &bad), std::runtime_error);
    bad = plan;
    bad.layers[vs_l][vs_h].vs.offsets = {5};  // offset 0 missing
    EXPECT_THROW(eng.prefill(ids, pol, &c4, &bad), std::runtime_error);
    bad = plan;
    bad.layers[bs_l][bs_h].blocks[0] = 3;  // block 0 cannot see block 3
    EXPECT_THROW(eng.prefill(ids, pol, &c4, &bad), std::runtime_error);
    bad = plan;
    bad.layers[0][0].kind = PatternKind::kBlockSparse;
    EXPECT_THROW(eng.prefill(ids, pol, &c4, &bad), std::runtime_error);
  }
}

TEST(EngineSparse, PolicyShapeMustMatchModel) {
  const ModelWeights w = make_model(small_config(RopeStyle::kRotateHalf, false, false), 2);
  const Engine eng(w);
  ModelConfig other = w.config;
  other.n_layers = 3;
  const SparsePolicy pol = SparsePolicy::uniform(other, HeadPattern::a_shape(1, 8), 0);
  KvCache cache(w.config, 10);
  EXPECT_THROW(eng.prefill(random_ids(10, w.config.vocab, 1), pol, &cache), std::runtime_error);
}

// ---------------------------------------------------------------- generate / checks
TEST(EngineGenerate, PromptChecks) {
  const ModelWeights w = make_model(small_config(RopeStyle::kRotateHalf, false, false), 2);
  const Engine eng(w);
  GenerateOptions opt;
  EXPECT_THROW(eng.generate({}, opt), std::runtime_error);
  try {
    eng.generate({1, 2, 3, 4, 97}, opt);
    FAIL() << "no error for an id >= vocab";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "token id 97 at position 4 is out of range [0, 97)");
  }
  EXPECT_THROW(eng.generate({1, -1}, opt), std::runtime_error);
  const std::vector<int> long_ids = random_ids(1001, w.config.vocab, 3);
  try {
    eng.generate(long_ids, opt);
    FAIL() << "no error for a prompt over max_position";
  } catch (const std::runtime_error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("1001"), std::string::npos) << m;
    EXPECT_NE(m.find("1000"), std::string::npos) << m;
  }
  opt.max_prompt = 1001;
  const GenerateResult r = eng.generate(long_ids, opt);
  EXPECT_EQ(r.prompt_tokens, 1001);
  opt.max_prompt = 500;
  EXPECT_THROW(eng.generate(long_ids, opt), std::runtime_error);
}

TEST(EngineGenerate, GreedyMatchesStepwiseArgmaxAndStops) {
  const ModelWeights w = make_model(small_config(RopeStyle::kAdjacentPairs, false, true), 8);
  const Engine eng(w);
  const auto ids = random_ids(20, w.config.vocab, 4);
  GenerateOptions opt;
  opt.decode_steps = 6;
  const GenerateResult r = eng.generate(ids, opt);
  ASSERT_EQ(r.generated_ids.size(), 7u);
  ASSERT_EQ(r.logprobs.size(), 7u);
  ASSERT_EQ(r.logits.size(), 7u);
  EXPECT_EQ(r.stopped_by, "length");
  EXPECT_EQ(r.first_token_id, r.generated_ids[0]);
  // Recompute every step by a full prefill of the sequence so far.
  std::vector<int> seq = ids;
  for (size_t i = 0; i < r.generated_ids.size(); ++i) {
    KvCache cache(w.config, static_cast<int64_t>(seq.size()));
    const auto logits = eng.prefill(seq, SparsePolicy::dense(), &cache);
    const int arg =
        static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    EXPECT_EQ(r.generated_ids[i], arg) << "step " << i;
    EXPECT_NEAR(r.logits[i], logits[arg], 1e-4);
    double z = 0;
    for (float x : logits) z += std::exp(static_cast<double>(x) - logits[arg]);
    EXPECT_NEAR(r.logprobs[i], -std::log(z), 1e-5);
    seq.push_back(r.generated_ids[i]);
  }
  // Stop at the third token.
  opt.stop_ids = {r.generated_ids[2], 12345};
  const GenerateResult s = eng.generate(ids, opt);
  const size_t first_stop =
      std::find(r.generated_ids.begin(), r.generated_ids.end(), r.generated_ids[2]) -
      r.generated_ids.begin();
  ASSERT_EQ(s.generated_ids.size(), first_stop + 1);
  EXPECT_EQ(s.stopped_by, "stop_id");
  EXPECT_TRUE(std::equal(s.generated_ids.begin(), s.generated_ids.end(), r.generated_ids.begin()));
}

TEST(EngineGenerate, SampledIsSeedDeterministic) {
  const ModelWeights w = make_model(small_config(RopeStyle::kRotateHalf, true, false), 9);
  const Engine eng(w);
  const auto ids = random_ids(16, w.config.vocab, 6);
  GenerateOptions opt;
  opt.decode_steps = 12;
  opt.sampler.temperature = 1.5f;
  opt.sampler.top_p = 0.9f;
  opt.sampler.seed = 42;
  const auto a = eng.generate(ids, opt);
  const auto b = eng.generate(ids, opt);
  EXPECT_EQ(a.generated_ids, b.generated_ids);
  std::set<std::vector<int>> distinct;
  for (uint64_t seed = 0; seed < 6; ++seed) {
    opt.sampler.seed = seed;
    distinct.insert(eng.generate(ids, opt).generated_ids);
  }
  EXPECT_GT(distinct.size(), 1u) << "different seeds should give different samples";
  for (double lp : a.logprobs) EXPECT_LE(lp, 0.0);
}

// ---------------------------------------------------------------- sampler
TEST(Sampler, GreedyTieGoesToLowestId) {
  Sampler s({});
  const std::vector<float> logits = {0.5f, 2.f, -1.f, 2.f, 2.f};
  const SampledToken t = s.sample(logits.data(), 5);
  EXPECT_EQ(t.id, 1);
  EXPECT_EQ(t.logit, 2.f);
  const double z = std::exp(0.5 - 2) + 3 + std::exp(-3.0);
  EXPECT_NEAR(t.logprob, -std::log(z), 1e-12);
}

TEST(Sampler, TopPKeepsTheNucleusWithItsMass) {
  // probabilities 0.1, 0.4, 0.2, 0.3 (ids 0..3)
  const std::vector<float> logits = {std::log(0.1f), std::log(0.4f), std::log(0.2f),
                                     std::log(0.3f)};
  std::map<int, int> counts;
  const int trials = 20000;
  for (int i = 0; i < trials; ++i) {
    Sampler s({.temperature = 1.f, .top_p = 0.6f, .seed = static_cast<uint64_t>(i)});
    const SampledToken t = s.sample(logits.data(), 4);
    ++counts[t.id];
    // logprob is of the full tempered distribution
    EXPECT_NEAR(t.logprob, logits[t.id], 1e-5);
  }
  // nucleus for 0.6: {1 (0.4), 3 (0.3)}, renormalised 4/7 and 3/7
  EXPECT_EQ(counts.count(0), 0u);
  EXPECT_EQ(counts.count(2), 0u);
  EXPECT_NEAR(counts[1] / double(trials), 4.0 / 7, 0.015);
  EXPECT_NEAR(counts[3] / double(trials), 3.0 / 7, 0.015);
  // tiny top-p: only the most likely token
  for (int i = 0; i < 100; ++i) {
    Sampler s({.temperature = 1.f, .top_p = 0.01f, .seed = static_cast<uint64_t>(i)});
    EXPECT_EQ(s.sample(logits.data(), 4).id, 1);
  }
  // top-p 1: all four, with their probabilities
  counts.clear();
  Sampler all({.temperature = 1.f, .top_p = 1.f, .seed = 5});
  for (int i = 0; i < trials; ++i) ++counts[all.sample(logits.data(), 4).id];
  EXPECT_NEAR(counts[0] / double(trials), 0.1, 0.015);
  EXPECT_NEAR(counts[2] / double(trials), 0.2, 0.015);
}

TEST(Sampler, TemperatureSharpensAndSeedRepeats) {
  const std::vector<float> logits = {1.f, 2.f, 0.f};
  Sampler a({.temperature = 0.7f, .top_p = 1.f, .seed = 9});
  Sampler b({.temperature = 0.7f, .top_p = 1.f, .seed = 9});
  int top = 0;
  for (int i = 0; i < 2000; ++i) {
    const SampledToken x = a.sample(logits.data(), 3), y = b.sample(logits.data(), 3);
    ASSERT_EQ(x.id, y.id);
    top += x.id == 1;
    // logprob under logits / T
    const double z = std::exp(1 / 0.7) + std::exp(2 / 0.7) + 1;
    EXPECT_NEAR(x.logprob, logits[x.id] / 0.7 - std::log(z), 1e-5);
  }
  const double p1 = std::exp(2 / 0.7) / (std::exp(1 / 0.7) + std::exp(2 / 0.7) + 1);
  EXPECT_NEAR(top / 2000.0, p1, 0.03);
}

TEST(Sampler, RejectsBadOptions) {
  EXPECT_THROW(Sampler({.temperature = -1.f}), std::runtime_error);
  EXPECT_THROW(Sampler({.temperature = 1.f, .top_p = 0.f}), std::runtime_error);
  EXPECT_THROW(Sampler({.temperature = 1.f, .top_p = 1.5f}), std::runtime_error);
  Sampler s({});
  const std::vector<float> nan = {0.f, NAN};
  EXPECT_THROW(s.sample(nan.data(), 2), std::runtime_error);
}

}  // namespace
}  // namespace mprefill
