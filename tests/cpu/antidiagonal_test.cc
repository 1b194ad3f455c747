// Block-sparse antidiagonal scoring (XAttention; issue 18 deliverable 1): the block mass
// against a naive fp64 reference of the strided antidiagonal softmax at awkward sizes
// (N not a multiple of 64 or of S, GQA groups of 2 and 3), the selection (ranking and
// mass cut of select_by_mass), a planted block pattern found at tau 0.9, the config
// switch ({"score": "antidiagonal", "stride": S}, xattn:TAU[:K[:S]], one-line errors),
// and the CPU engine on stories15M and through the CLI.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "kernels/cpu/cpu.h"
#include "model/sparse_policy.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

// Q [N][heads][dim], K [N][kv_heads][dim], packed, from seeded normals (never zero).
struct Qk {
  int64_t n;
  int heads, kv_heads, dim;
  std::vector<float> q, k;
  Qk(int64_t n_, int h, int kvh, int d, uint64_t seed, float sd = 1.f)
      : n(n_), heads(h), kv_heads(kvh), dim(d) {
    q = test::random_normal(static_cast<size_t>(n) * h * d, seed * 2 + 1, sd);
    k = test::random_normal(static_cast<size_t>(n) * kvh * d, seed * 2 + 2, sd);
  }
  float scale() const { return 1.f / std::sqrt(static_cast<float>(dim)); }
  cpu::BlockSparseEstimateParams params(int stride) const {
    cpu::BlockSparseEstimateParams p;
    p.q = q.data();
    p.k = k.data();
    p.q_row_stride = int64_t{heads} * dim;
    p.q_head_stride = dim;
    p.k_row_stride = int64_t{kv_heads} * dim;
    p.k_head_stride = dim;
    p.seq_len = n;
    p.num_heads = heads;
    p.num_kv_heads = kv_heads;
    p.head_dim = dim;
    p.scale = scale();
    p.stride = stride;
    return p;
  }
};

// Block mass of (head h, query block qb) straight from the definition in fp64: strided
// row I, column J <= I, logit (scale / S) * sum over t of q[min(I S + S-1-t, N-1)] .
// k[J S + t] for the cells with key < N and key <= that row; softmax over J; p[I][J]
// summed into key block J S / 64.
std::vector<double> reference_mass(const Qk& x, int s, int h, int64_t qb) {
  const int64_t n = x.n, kvh = h / (x.heads / x.kv_heads);
  const int64_t i0 = qb * 64 / s, i1 = (std::min<int64_t>(n, 64 * (qb + 1)) + s - 1) / s;
  std::vector<double> mass(qb + 1, 0.0), lg;
  for (int64_t i = i0; i < i1; ++i) {
    lg.assign(i + 1, 0.0);
    for (int64_t j = 0; j <= i; ++j) {
      double sum = 0;
      for (int t = 0; t < s; ++t) {
        const int64_t r = std::min(i * s + s - 1 - t, n - 1), c = j * s + t;
        if (c >= n || c > r) continue;
        for (int e = 0; e < x.dim; ++e)
          sum +=
              double{x.q[(r * x.heads + h) * x.dim + e]} * x.k[(c * x.kv_heads + kvh) * x.dim + e];
      }
      lg[j] = double{x.scale()} / s * sum;
    }
    const double m = *std::max_element(lg.begin(), lg.end());
    double z = 0;
    for (double& v : lg) z += (v = std::exp(v - m));
    for (int64_t j = 0; j <= i; ++j) mass[j * s / 64] += lg[j] / z;
  }
  return mass;
}

// The kernel's packed inputs of every query block.
struct Packed {
  std::vector<float> q, k;
  cpu::AntidiagParams p;
  Packed(const Qk& x, int s) {
    const int64_t rows = (x.n + s - 1) / s;
    q.resize(static_cast<size_t>(x.heads * rows * s * x.dim));
    k.resize(static_cast<size_t>(x.kv_heads * rows * s * x.dim));
    cpu::antidiag_pack(x.q.data(), int64_t{x.heads} * x.dim, x.dim, x.heads, x.dim, x.n, s, true,
                       q.data());
    cpu::antidiag_pack(x.k.data(), int64_t{x.kv_heads} * x.dim, x.dim, x.kv_heads, x.dim, x.n, s,
                       false, k.data());
    p.q_packed = q.data();
    p.k_packed = k.data();
    p.seq_len = x.n;
    p.qb0 = 0;
    p.qb1 = num_blocks(x.n);
    p.num_heads = x.heads;
    p.num_kv_heads = x.kv_heads;
    p.head_dim = x.dim;
    p.stride = s;
    p.scale = x.scale();
  }
};

std::vector<int> listed(const BlockSparseIndex& ix, int h, int64_t qb) {
  std::vector<int> out;
  for (int i = 0; i < ix.k; ++i) {
    const int j = ix.blocks[(h * ix.nblocks + qb) * ix.k + i];
    if (j >= 0) out.push_back(j);
  }
  return out;
}

// A list against the reference masses m[0..qb] of its query block, up to tol: ascending,
// diagonal in, at most cap; the best-ranked blocks (no block left out outweighs a kept
// one); with tau > 0 and below the cap its mass reaches tau, and without its lightest
// non-diagonal block it would not.
void expect_selection(const std::vector<int>& kept, const std::vector<double>& m, int64_t qb,
                      int cap, double tau, double tol) {
  SCOPED_TRACE(testing::Message() << "query block " << qb);
  ASSERT_FALSE(kept.empty());
  EXPECT_TRUE(std::is_sorted(kept.begin(), kept.end()));
  EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), static_cast<int>(qb))) << "diagonal";
  EXPECT_LE(kept.size(), static_cast<size_t>(cap));
  double total = 0, got = 0, lightest = 1e300, heaviest_out = 0;
  for (int64_t j = 0; j <= qb; ++j) {
    total += m[j];
    const bool in = std::binary_search(kept.begin(), kept.end(), static_cast<int>(j));
    if (in) got += m[j];
    if (in && j != qb) lightest = std::min(lightest, m[j]);
    if (!in) heaviest_out = std::max(heaviest_out, m[j]);
  }
  if (kept.size() > 1) EXPECT_GE(lightest, heaviest_out - tol);
  const size_t full = static_cast<size_t>(std::min<int64_t>(cap, qb + 1));
  if (tau == 0) {
    EXPECT_EQ(kept.size(), full);
    return;
  }
  if (kept.size() < full) EXPECT_GE(got, tau * total - tol);
  if (kept.size() > 1) EXPECT_LT(got - lightest, tau * total + tol);
}

// ---------------------------------------------------------------- estimator

struct Case {
  int64_t n;
  int heads, kv_heads, dim, stride;
};

TEST(AntidiagEstimate, BlockMassMatchesNaiveFp64) {
  // N off every multiple of 64 and of S, GQA groups 2 and 3, head dims off 8.
  for (const Case c : {Case{357, 4, 2, 12, 8}, Case{203, 6, 2, 7, 16}, Case{130, 2, 1, 5, 1},
                       Case{199, 2, 2, 9, 64}, Case{64 * 3 + 1, 3, 1, 16, 4}}) {
    SCOPED_TRACE(testing::Message() << "n " << c.n << " stride " << c.stride);
    const Qk x(c.n, c.heads, c.kv_heads, c.dim, static_cast<uint64_t>(c.n), 1.5f);
    const Packed pk(x, c.stride);
    std::vector<float> got;
    for (int h = 0; h < c.heads; ++h)
      for (int64_t qb = 0; qb < num_blocks(c.n); ++qb) {
        got.assign(qb + 1, -1.f);
        ASSERT_EQ(cpu::antidiag_block_mass(pk.p, h, qb, got.data()), Status::kOk);
        const std::vector<double> ref = reference_mass(x, c.stride, h, qb);
        double rows = 0, off = 0;
        for (int64_t j = 0; j <= qb; ++j) {
          rows += ref[j];
          off = std::max(off, std::fabs(got[j] - ref[j]));
          ASSERT_GT(got[j], 0.f) << h << ":" << qb << ":" << j;
        }
        // Each strided row's softmax sums to 1: the block's masses add up to its rows.
        const int64_t r1 = std::min<int64_t>(c.n, 64 * (qb + 1)), r0 = 64 * qb;
        EXPECT_NEAR(rows, double((r1 + c.stride - 1) / c.stride - r0 / c.stride), 1e-9);
        EXPECT_LE(off, 2e-5 * rows) << h << ":" << qb;
      }
  }
}

TEST(AntidiagEstimate, SelectionRanksAndCutsTheReferenceMass) {
  const Qk x(64 * 9 + 23, 4, 2, 10, 91, 2.f);
  const int stride = 8;
  const int topk[4] = {3, 6, 10, 4};
  for (const double t : {0.0, 0.5, 0.9}) {
    SCOPED_TRACE(testing::Message() << "tau " << t);
    const double tau[4] = {t, t, t, t};
    BlockSparseIndex ix;
    ASSERT_EQ(cpu::block_sparse_estimate(x.params(stride), topk, &ix, t > 0 ? tau : nullptr),
              Status::kOk);
    ASSERT_EQ(ix.k, 10);
    ASSERT_EQ(ix.nblocks, 10);
    int cut = 0;
    for (int h = 0; h < 4; ++h)
      for (int64_t qb = 0; qb < ix.nblocks; ++qb) {
        const std::vector<int> kept = listed(ix, h, qb);
        expect_selection(kept, reference_mass(x, stride, h, qb), qb, topk[h], t, 1e-4);
        cut += kept.size() < static_cast<size_t>(std::min<int64_t>(topk[h], qb + 1));
      }
    if (t == 0.5) EXPECT_GT(cut, 3) << "the threshold, not only the cap, decided somewhere";
  }
  // The same lists as the pooled path's layout: the pooled score differs somewhere.
  BlockSparseIndex pooled, anti;
  ASSERT_EQ(cpu::block_sparse_estimate(x.params(0), topk, &pooled), Status::kOk);
  ASSERT_EQ(cpu::block_sparse_estimate(x.params(stride), topk, &anti), Status::kOk);
  EXPECT_EQ(pooled.blocks.size(), anti.blocks.size());
  EXPECT_NE(pooled.blocks, anti.blocks);
}

TEST(AntidiagEstimate, RefusesBadArguments) {
  const Qk x(100, 2, 1, 4, 3);
  const int topk[2] = {2, 2};
  BlockSparseIndex ix;
  for (const int s : {-8, 3, 5, 12, 65, 128}) {
    EXPECT_EQ(cpu::block_sparse_estimate(x.params(s), topk, &ix), Status::kInvalidArgument) << s;
  }
  const double bad_tau[2] = {0.5, 1.5};
  EXPECT_EQ(cpu::block_sparse_estimate(x.params(8), topk, &ix, bad_tau), Status::kInvalidArgument);
  Packed pk(x, 8);
  std::vector<float> m(2);
  EXPECT_EQ(cpu::antidiag_block_mass(pk.p, 2, 0, m.data()), Status::kInvalidArgument);
  EXPECT_EQ(cpu::antidiag_block_mass(pk.p, 0, 2, m.data()), Status::kInvalidArgument);
  pk.p.qb1 = 3;  // past the last block
  EXPECT_EQ(cpu::antidiag_block_mass(pk.p, 0, 0, m.data()), Status::kInvalidArgument);
}

// Planted pattern: every query row points along u; the keys are small noise except two
// keys in each of key blocks 2, 5 and 9 (one of them a vertical column that a 64-key mean
// dilutes), which point along u with logit 64. Those six keys hold > 99% of every later
// row's attention; the antidiagonal score at tau 0.9 keeps them in every query block.
TEST(AntidiagEstimate, FindsPlantedBlocksAtTau09) {
  const int64_t n = 64 * 12 + 20;
  const int heads = 2, d = 16;
  Qk x(n, heads, 1, d, 5, 0.05f);  // noise
  std::vector<float> u(d);
  for (int e = 0; e < d; ++e) u[e] = ((e * 7) % 5 - 2.f) / 3.f;
  double norm = 0;
  for (float v : u) norm += double{v} * v;
  for (float& v : u) v = static_cast<float>(v / std::sqrt(norm));
  for (int64_t r = 0; r < n; ++r)
    for (int h = 0; h < heads; ++h)
      for (int e = 0; e < d; ++e) x.q[(r * heads + h) * d + e] += 16.f * u[e];
  const std::vector<int> planted = {2, 5, 9};
  for (int b : planted)
    for (int64_t c : {int64_t{64} * b + 17, int64_t{64} * b + 50})
      for (int e = 0; e < d; ++e) x.k[c * d + e] = 16.f * u[e];
  const int topk[heads] = {12, 12};
  const double tau[heads] = {0.9, 0.9};
  BlockSparseIndex ix;
  ASSERT_EQ(cpu::block_sparse_estimate(x.params(8), topk, &ix, tau), Status::kOk);
  for (int h = 0; h < heads; ++h)
    for (int64_t qb = 0; qb < ix.nblocks; ++qb) {
      const std::vector<int> kept = listed(ix, h, qb);
      for (int b : planted)
        if (b < qb)
          EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), b))
              << "head " << h << " query block " << qb << " misses planted block " << b;
      // Planted blocks and the diagonal, at most one more.
      EXPECT_LE(kept.size(), planted.size() + 2) << "head " << h << " query block " << qb;
    }
}

// ---------------------------------------------------------------- config

ModelConfig shape(int layers, int heads) {
  ModelConfig c;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = heads;
  return c;
}

std::string parse_error(const std::string& json) {
  return test::error_of([&] { parse_minference_config(json, "X", shape(1, 1)); });
}

TEST(AntidiagConfig, ScoreAndStrideInJson) {
  const ModelConfig c = shape(1, 4);
  const std::string heads = R"({"0": ["block_sparse", 8, 0, 0.1, {"score": "antidiagonal"}],
      "1": ["block_sparse", 6, 0, 0.1, {"tau": 0.9, "score": "antidiagonal", "stride": 16}],
      "2": ["block_sparse", 5, 0, 0.1], "3": ["vertical_and_slash", 100, 200, 0.5]})";
  SparsePolicy p = parse_minference_config("[" + heads + "]", "X", c);
  EXPECT_EQ(p.at(0, 0, 1 << 20), HeadPattern::block_sparse(8, 0, 8));
  EXPECT_EQ(p.at(0, 1, 1 << 20), HeadPattern::block_sparse(6, 0.9, 16));
  EXPECT_EQ(p.at(0, 2, 1 << 20), HeadPattern::block_sparse(5));  // pooled by default
  EXPECT_EQ(p.at(0, 3, 1 << 20), HeadPattern::vertical_slash(100, 200));
  EXPECT_TRUE(p.any_antidiagonal());
  EXPECT_NE(p.summary_string().find("block_sparse(6,tau=0.9,antidiagonal=16) x1"),
            std::string::npos)
      << p.summary_string();
  // Top level: every block-sparse head without its own score; "pooled" overrides it.
  const std::string mixed = R"({"0": ["block_sparse", 8, 0, 0.1], "1": ["block_sparse", 6, 0,
      0.1, {"score": "pooled"}], "2": ["stream_llm", 4, 64, 0.1], "3": ["vertical_and_slash",
      100, 200, 0.5]})";
  p = parse_minference_config(
      R"({"score": "antidiagonal", "stride": 4, "tau": 0.8, "layers": [)" + mixed + "]}", "X", c);
  EXPECT_EQ(p.at(0, 0, 1 << 20), HeadPattern::block_sparse(8, 0.8, 4));
  EXPECT_EQ(p.at(0, 1, 1 << 20), HeadPattern::block_sparse(6, 0.8, 0));
  EXPECT_EQ(p.at(0, 2, 1 << 20), HeadPattern::a_shape(4, 64));
  EXPECT_EQ(p.at(0, 3, 1 << 20), HeadPattern::vertical_slash(100, 200, 0.8));
  // MInference files stay pooled.
  const SparsePolicy llama = load_sparse_policy(
      test::source_dir() +
          "/configs/minference/Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json",
      shape(32, 32));
  EXPECT_FALSE(llama.any_antidiagonal());
}

TEST(AntidiagConfig, BadScoreOrStrideGivesOneClearLine) {
  const std::string bs = R"(["block_sparse", 8, 0, 0.5)";
  for (const std::string s : {"0", "3", "12", "128", "-8", "8.5", "\"8\"", "null"}) {
    test::expect_one_line_containing(
        parse_error(R"([{"0": )" + bs + R"(, {"score": "antidiagonal", "stride": )" + s + "}]}]"),
        {"config X", "layer 0 head 0", "stride must be 1, 2, 4, 8, 16, 32 or 64"});
    test::expect_one_line_containing(
        parse_error(R"({"score": "antidiagonal", "stride": )" + s + R"(, "layers": [{"0": )" + bs +
                    "]}]}"),
        {"config X", "top level", "stride must be 1, 2, 4, 8, 16, 32 or 64"});
  }
  test::expect_one_line_containing(parse_error(R"([{"0": )" + bs + R"(, {"stride": 8}]}])"),
                                   {"layer 0 head 0", "expected {\"tau\": T}"});
  test::expect_one_line_containing(
      parse_error(R"([{"0": )" + bs + R"(, {"score": "pooled", "stride": 8}]}])"),
      {"layer 0 head 0", "stride applies to \"score\": \"antidiagonal\" only"});
  test::expect_one_line_containing(
      parse_error(R"([{"0": )" + bs + R"(, {"score": "antidiag"}]}])"),
      {"layer 0 head 0", "score must be \"pooled\" or \"antidiagonal\", got \"antidiag\""});
  test::expect_one_line_containing(
      parse_error(R"([{"0": ["vertical_and_slash", 100, 200, 0.5, {"score": "antidiagonal"}]}])"),
      {"layer 0 head 0", "score and stride apply to block_sparse, not vertical_and_slash"});
  test::expect_one_line_containing(
      parse_error(R"([{"0": )" + bs + R"(, {"score": "antidiagonal", "strid": 8}]}])"),
      {"layer 0 head 0", "unknown key 'strid'"});
}

TEST(AntidiagConfig, CliSpec) {
  const ModelConfig c = shape(2, 3);
  SparsePolicy p = load_sparse_policy("xattn:0.9", c, 0);
  EXPECT_EQ(p.source, "xattn:0.9");
  EXPECT_EQ(p.at(1, 2, 1 << 20), HeadPattern::block_sparse(100, 0.9, 8));
  EXPECT_EQ(load_sparse_policy("xattn:1:16", c, 0).at(0, 0, 1 << 20),
            HeadPattern::block_sparse(16, 1.0, 8));
  EXPECT_EQ(load_sparse_policy("xattn:0.5:16:32", c, 0).at(0, 0, 1 << 20),
            HeadPattern::block_sparse(16, 0.5, 32));
  EXPECT_TRUE(is_builtin_sparse_spec("xattn:0.9"));
  EXPECT_FALSE(is_builtin_sparse_spec("xattn.json"));
  for (const std::string bad : {"xattn:0.9:16:3", "xattn:0.9:16:128", "xattn:0.9:16:0"})
    test::expect_one_line_containing(test::error_of([&] { load_sparse_policy(bad, c); }),
                                     {"sparse policy '" + bad + "'", "S must be"});
  for (const std::string bad : {"xattn", "xattn:0.9:1:8:2"})
    test::expect_one_line_containing(test::error_of([&] { load_sparse_policy(bad, c); }),
                                     {"sparse policy '" + bad + "'", "xattn:TAU:K:S"});
  test::expect_one_line_containing(test::error_of([&] { load_sparse_policy("xattn:2", c); }),
                                   {"sparse policy 'xattn:2'", "tau must be a number in (0, 1]"});
  test::expect_one_line_containing(test::error_of([&] { load_sparse_policy("xattn:0.9:x", c); }),
                                   {"K must be a whole number >= 1, got 'x'"});
}

// ---------------------------------------------------------------- engine

// The story text of the distributed engine tests, repeated up to n tokens (BOS first).
std::vector<int> story_ids(const std::string& tokenizer, int64_t n) {
  const Tokenizer tok = Tokenizer::load(tokenizer, 32000);
  std::vector<int> ids = tok.encode(
      "Once upon a time, there was a little girl named Lily. She loved to play in the park "
      "with her dog, Max. One day, Lily and Max found a big red ball under a tree. ",
      true);
  const std::vector<int> body(ids.begin() + 1, ids.end());
  while (static_cast<int64_t>(ids.size()) < n) ids.insert(ids.end(), body.begin(), body.end());
  ids.resize(n);
  return ids;
}

// stories15M on 600 tokens with every head block-sparse by antidiagonals, from a JSON
// config: tau = 1 with caps over every block is dense (same ids, logits to fp32 order);
// tau 0.9 within 4 blocks is really sparse and decodes the dense continuation.
TEST(AntidiagEngine, Stories15MStaysWithDense) {
  const std::string dir = test::shared_dir() + "/models/stories15M";
  MPREFILL_SKIP_IF_MISSING(dir + "/stories15M.bin");
  MPREFILL_SKIP_IF_MISSING(dir + "/tokenizer.bin");
  const ModelWeights w = load_model(dir + "/stories15M.bin");
  const ModelConfig& c = w.config;
  const int64_t n = 600, nb = num_blocks(n);
  const std::vector<int> ids = story_ids(dir + "/tokenizer.bin", n);
  auto config = [&](int cap, double tau) {
    nlohmann::json layers = nlohmann::json::array();
    for (int l = 0; l < c.n_layers; ++l) {
      nlohmann::json layer = nlohmann::json::object();
      for (int h = 0; h < c.n_heads; ++h)
        layer[std::to_string(h)] = {
            "block_sparse", cap, 0, 0.5, {{"tau", tau}, {"score", "antidiagonal"}, {"stride", 8}}};
      layers.push_back(layer);
    }
    SparsePolicy p = parse_minference_config(layers.dump(), "stories-xattn", c);
    p.dense_below = 0;
    return p;
  };
  const Engine eng(w);
  GenerateOptions g;
  g.decode_steps = 8;
  g.max_prompt = n;  // past the 256 positions it was trained on, as the audit tests run it
  const GenerateResult dense = eng.generate(ids, g);
  g.policy = config(static_cast<int>(nb), 1.0);
  const GenerateResult all = eng.generate(ids, g);
  EXPECT_EQ(all.generated_ids, dense.generated_ids);
  ASSERT_EQ(all.logits.size(), dense.logits.size());
  for (size_t i = 0; i < dense.logits.size(); ++i)
    EXPECT_NEAR(all.logits[i], dense.logits[i], 1e-3) << "step " << i;
  // tau 0.9, at most 4 key blocks per query block.
  const SparsePolicy cut = config(4, 0.9);
  PrefillPlan plan;
  KvCache cache(c, n);
  PrefillStats st;
  eng.prefill(ids, cut, &cache, &plan, &st);
  EXPECT_EQ(st.heads_by_kind[3], c.n_layers * c.n_heads);
  int64_t kept = 0;
  for (const auto& layer : plan.layers)
    for (const HeadPlan& hp : layer)
      kept += std::count_if(hp.blocks.begin(), hp.blocks.end(), [](int b) { return b >= 0; });
  const int64_t causal = int64_t{c.n_layers} * c.n_heads * nb * (nb + 1) / 2;
  EXPECT_LT(kept, causal / 2) << "block density " << double(kept) / causal;
  g.policy = cut;
  const GenerateResult sparse = eng.generate(ids, g);
  EXPECT_EQ(sparse.first_token_id, dense.first_token_id);
  EXPECT_EQ(sparse.generated_ids, dense.generated_ids);
}

TEST(AntidiagCli, GenerateWithXattnAndAudit) {
  const std::string bin = test::bin_dir() + "/mprefill";
  MPREFILL_SKIP_IF_MISSING(bin);
  std::string out;
  const std::string base =
      test::tiny_generate_command(bin) + "--dense-below 0 --decode 2 --audit-heads 2 --sparse ";
  ASSERT_EQ(test::run_command(base + "xattn:0.9:3 --json", &out), 0) << out;
  const auto j = nlohmann::json::parse(out.substr(out.find('{')));
  ASSERT_EQ(j["audit"].size(), 8u) << out;  // 4 layers x 2 heads
  for (const auto& e : j["audit"]) {
    EXPECT_EQ(e["pattern"], "block_sparse") << out;
    EXPECT_EQ(e["stride"].get<int>(), 8) << out;
    EXPECT_EQ(e["tau"].get<double>(), 0.9) << out;
    EXPECT_GT(e["recall"].get<double>(), 0.0);
    EXPECT_LE(e["recall"].get<double>(), 1.0);
  }
  ASSERT_EQ(test::run_command(base + "xattn:0.9:3", &out), 0) << out;
  EXPECT_NE(out.find("block_sparse(3,tau=0.9,antidiagonal=8)"), std::string::npos) << out;
  EXPECT_NE(test::run_command(base + "xattn:0.9:3:5", &out), 0);
  test::expect_one_line_containing(out.substr(0, out.find_last_not_of('\n') + 1),
                                   {"xattn:0.9:3:5", "S must be 1, 2, 4, 8, 16, 32 or 64"});
}

}  // namespace
}  // namespace mprefill
