// Offline pattern search: PNG writer, calibration capture vs the engine, candidate tile
// counts from the real estimators, recall / error scores against the kernels, MInference
// JSON read back by sparse_policy, CSV, stories15M run, CLI errors.
#include "search/pattern_search.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "engine/cpu_local.h"
#include "kernels/cpu/cpu.h"
#include "model/sparse_policy.h"
#include "model/tokenizer.h"
#include "search/png.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

std::string temp_dir(const std::string& name) {
  const std::string d = (std::filesystem::temp_directory_path() /
                         ("mprefill_search_" + name + "_" + std::to_string(::getpid())))
                            .string();
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

std::vector<int> random_ids(int n, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int> ids(n);
  for (int& x : ids) x = static_cast<int>(g() % vocab);
  ids[0] = 1;
  return ids;
}

// ---------------------------------------------------------------- PNG

TEST(Png, Crc32AndAdler32KnownValues) {
  const std::string s = "123456789";
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  EXPECT_EQ(png_crc32(p, s.size()), 0xCBF43926u);    // the CRC-32 check value
  EXPECT_EQ(png_adler32(p, s.size()), 0x091E01DEu);  // Adler-32 of "123456789"
}

TEST(Png, RoundTripAcrossSeveralStoredBlocks) {
  RgbImage img(211, 173);  // 173 * (1 + 633) bytes > 65535: two stored blocks
  std::mt19937 g(7);
  for (auto& b : img.rgb) b = static_cast<uint8_t>(g());
  const std::vector<uint8_t> bytes = encode_png(img);
  const RgbImage back = decode_png_stored(bytes);
  EXPECT_EQ(back.width, 211);
  EXPECT_EQ(back.height, 173);
  EXPECT_EQ(back.rgb, img.rgb);

  std::vector<uint8_t> bad = bytes;
  bad[bad.size() / 2] ^= 0x01;  // inside IDAT
  EXPECT_THROW(decode_png_stored(bad), std::runtime_error);
  bad = bytes;
  bad[0] = 0;
  EXPECT_THROW(decode_png_stored(bad), std::runtime_error);
  EXPECT_THROW(encode_png(RgbImage()), std::runtime_error);
}

// ---------------------------------------------------------------- tile counts

TEST(PatternSearch, AShapeTilesFollowKernelRanges) {
  // n = 200: blocks [0,64) [64,128) [128,192) [192,200).
  EXPECT_EQ(dense_tiles(200), 10);
  // sink 64, local 1: block 0 merges ([0, 64)); others sink piece + [m0, m1) piece.
  EXPECT_EQ(ashape_tiles(64, 1, 200), 1 + 2 + 2 + 2);
  // local 65: [m0 - 64, m1) touches the sink in blocks 1, 2 (one range [0, m1)); block 3
  // has [0, 64) and [128, 200): 1 + 2 pieces.
  EXPECT_EQ(ashape_tiles(64, 65, 200), 1 + 2 + 3 + 3);
  EXPECT_EQ(ashape_tiles(4, 1, 200), 1 + 2 + 2 + 2);
  EXPECT_EQ(ashape_tiles(0, 1, 200), 1 + 1 + 1 + 1);
}

// ---------------------------------------------------------------- capture

TEST(PatternSearch, CaptureMatchesEngineDensePrefill) {
  const ModelWeights w = load_model("random:tiny:5");
  const std::vector<int> ids = random_ids(300, w.config.vocab, 11);
  std::vector<std::vector<float>> ks(w.config.n_layers), vs(w.config.n_layers);
  const std::vector<float> logits =
      capture_qkv(w, ids, [&](int l, const float*, const float* k, const float* v) {
        ks[l].assign(k, k + ids.size() * w.config.kv_dim());
        vs[l].assign(v, v + ids.size() * w.config.kv_dim());
      });
  Engine engine(w);
  KvCache cache(w.config, static_cast<int64_t>(ids.size()));
  const std::vector<float> ref = engine.prefill(ids, SparsePolicy::dense(), &cache);
  ASSERT_EQ(logits.size(), ref.size());
  EXPECT_LE(test::max_abs_diff(logits.data(), ref.data(), ref.size()), 1e-5);
  for (int l = 0; l < w.config.n_layers; ++l) {
    EXPECT_EQ(test::max_abs_diff(ks[l].data(), cache.k[l].data(), ks[l].size()), 0.0) << l;
    EXPECT_EQ(test::max_abs_diff(vs[l].data(), cache.v[l].data(), vs[l].size()), 0.0) << l;
  }
}

// ---------------------------------------------------------------- search on a random model

class RandomModelSearch : public ::testing::Test {
 protected:
  static constexpr int kErrorRows = 128;
  static void SetUpTestSuite() {
    w_ = new ModelWeights(load_model("random:tiny:3"));
    ids_ = random_ids(700, w_->config.vocab, 5);  // 11 blocks, the last one partial
    SearchOptions opt;
    opt.budgets = {0.45, 0.6, 0.8};
    opt.error_rows = kErrorRows;  // rows (n i) / 128 - 1, i = 1..128 (pattern_search.h)
    opt.heatmap_heads = {{1, 2}};
    opt.heatmap_size = 64;
    r_ = new SearchResult(search_patterns(*w_, ids_, opt));
    qkv_ = new std::vector<std::array<std::vector<float>, 3>>(w_->config.n_layers);
    capture_qkv(*w_, ids_, [&](int l, const float* q, const float* k, const float* v) {
      const int64_t n = static_cast<int64_t>(ids_.size());
      (*qkv_)[l][0].assign(q, q + n * w_->config.q_dim());
      (*qkv_)[l][1].assign(k, k + n * w_->config.kv_dim());
      (*qkv_)[l][2].assign(v, v + n * w_->config.kv_dim());
    });
  }
  static void TearDownTestSuite() {
    delete r_;
    delete w_;
    delete qkv_;
  }
  static ModelWeights* w_;
  static std::vector<int> ids_;
  static SearchResult* r_;
  static std::vector<std::array<std::vector<float>, 3>>* qkv_;
};
ModelWeights* RandomModelSearch::w_ = nullptr;
std::vector<int> RandomModelSearch::ids_;
SearchResult* RandomModelSearch::r_ = nullptr;
std::vector<std::array<std::vector<float>, 3>>* RandomModelSearch::qkv_ = nullptr;

TEST_F(RandomModelSearch, DenseCandidateHasRecallOneAndNoError) {
  for (const HeadSearch& h : r_->heads) {
    ASSERT_FALSE(h.candidates.empty());
    const Candidate& d = h.candidates[0];
    ASSERT_EQ(d.pattern.kind, PatternKind::kDense);
    EXPECT_EQ(d.recall, 1.0) << h.layer << ":" << h.head;
    EXPECT_LT(d.rel_error, 1e-6) << h.layer << ":" << h.head;
    EXPECT_EQ(d.tiles, r_->causal_tiles);
  }
}

TEST_F(RandomModelSearch, CandidatesFitTheirBudgetAtNearlyEqualCost) {
  const int64_t nb = num_blocks(r_->seq_len);
  EXPECT_EQ(r_->causal_tiles, nb * (nb + 1) / 2);
  std::set<PatternKind> kinds_seen;
  for (const HeadSearch& h : r_->heads) {
    for (const Candidate& c : h.candidates) {
      if (c.budget < 0) continue;
      const int64_t T = r_->budget_tiles[c.budget];
      kinds_seen.insert(c.pattern.kind);
      EXPECT_LE(c.tiles, T) << to_string(c.pattern.kind);
      // One parameter step adds at most one tile per query block (two for VS, whose
      // step grows v and s together), so the largest fitting candidate is that close.
      const int64_t slack = (c.pattern.kind == PatternKind::kVerticalSlash ? 2 : 1) * nb;
      EXPECT_GE(c.tiles, T - slack)
          << to_string(c.pattern.kind) << " " << c.pattern.a << "," << c.pattern.b;
      EXPECT_NEAR(c.density, static_cast<double>(c.tiles) / r_->causal_tiles, 1e-12);
      EXPECT_GE(c.recall, 0.0);
      EXPECT_LE(c.recall, 1.0 + 1e-12);
    }
  }
  EXPECT_EQ(kinds_seen.size(), 3u) << "every pattern must have candidates at these budgets";
}

TEST_F(RandomModelSearch, TilesEqualTheEnginesEstimatedIndices) {
  const ModelConfig& c = w_->config;
  const int64_t n = r_->seq_len;
  const int group = c.n_heads / c.n_kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(c.head_dim));
  int checked = 0;
  for (const HeadSearch& h : r_->heads) {
    const float* q = (*qkv_)[h.layer][0].data() + h.head * c.head_dim;
    const float* k = (*qkv_)[h.layer][1].data() + (h.head / group) * c.head_dim;
    for (const Candidate& cand : h.candidates) {
      if (cand.pattern.kind == PatternKind::kVerticalSlash) {
        // The single-head estimate (engine/cpu_local.h); DistEngine's over sp shards equals it.
        const VsEstimateParams e =
            one_head_vs_params(q, c.q_dim(), k, c.kv_dim(), c.head_dim, n, scale);
        std::vector<VsSelection> sel;
        ASSERT_EQ(cpu::vs_estimate(e, &cand.pattern.a, &cand.pattern.b, &sel), Status::kOk);
        EXPECT_EQ(vs_mask_tiles(cpu::vs_build_index(sel, n), 0), cand.tiles);
        ++checked;
      } else if (cand.pattern.kind == PatternKind::kBlockSparse) {
        const cpu::BlockSparseEstimateParams e =
            one_head_bs_params(q, c.q_dim(), k, c.kv_dim(), c.head_dim, n, scale);
        BlockSparseIndex ix;
        ASSERT_EQ(cpu::block_sparse_estimate(e, &cand.pattern.a, &ix), Status::kOk);
        EXPECT_EQ(block_sparse_tiles(ix.blocks, ix.k), cand.tiles);
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 0);
}

// The score's masked softmax is what the sparse kernels output: rel_error recomputed from
// the CPU kernels' outputs on the same sampled rows agrees.
TEST_F(RandomModelSearch, ErrorMatchesSparseKernels) {
  const ModelConfig& c = w_->config;
  const int64_t n = r_->seq_len;
  const int group = c.n_heads / c.n_kv_heads, hd = c.head_dim;
  for (const HeadSearch& h : r_->heads) {
    const auto& qkv = (*qkv_)[h.layer];
    AttentionParams p;
    p.q = qkv[0].data() + h.head * hd;
    p.k = qkv[1].data() + (h.head / group) * hd;
    p.v = qkv[2].data() + (h.head / group) * hd;
    std::vector<float> od(n * hd), os(n * hd);
    p.q_row_stride = c.q_dim();
    p.k_row_stride = p.v_row_stride = c.kv_dim();
    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = hd;
    p.o_row_stride = hd;
    p.n_q = p.n_k = static_cast<int>(n);
    p.num_heads = p.num_kv_heads = 1;
    p.head_dim = hd;
    p.scale = 1.f / std::sqrt(static_cast<float>(hd));
    p.o = od.data();
    ASSERT_EQ(cpu::attention_dense(p), Status::kOk);
    for (int bi = 0; bi < 3; ++bi) {
      if (h.chosen[bi] < 0) continue;
      const Candidate& cand = h.candidates[h.chosen[bi]];
      p.o = os.data();
      const HeadPattern& hp = cand.pattern;
      if (hp.kind == PatternKind::kAShape) {
        AShapeParams a{&hp.a, &hp.b};
        ASSERT_EQ(cpu::attention_ashape(p, a), Status::kOk);
      } else if (hp.kind == PatternKind::kVerticalSlash) {
        const VsEstimateParams e =
            one_head_vs_params(static_cast<const float*>(p.q), c.q_dim(),
                               static_cast<const float*>(p.k), c.kv_dim(), hd, n, p.scale);
        std::vector<VsSelection> sel;
        ASSERT_EQ(cpu::vs_estimate(e, &hp.a, &hp.b, &sel), Status::kOk);
        const VsIndex ix = cpu::vs_build_index(sel, n);
        ASSERT_EQ(cpu::attention_vs(p, view(ix), 0), Status::kOk);
      } else {
        const cpu::BlockSparseEstimateParams e =
            one_head_bs_params(static_cast<const float*>(p.q), c.q_dim(),
                               static_cast<const float*>(p.k), c.kv_dim(), hd, n, p.scale);
        BlockSparseIndex ix;
        ASSERT_EQ(cpu::block_sparse_estimate(e, &hp.a, &ix), Status::kOk);
        ASSERT_EQ(cpu::attention_block_sparse(p, view(ix), 0), Status::kOk);
      }
      double num = 0, den = 0;
      for (int i = 1; i <= kErrorRows; ++i) {
        const int64_t r = n * i / kErrorRows - 1;
        for (int j = 0; j < hd; ++j) {
          const double o = os[r * hd + j], d = od[r * hd + j];
          num += (o - d) * (o - d);
          den += d * d;
        }
      }
      const double kernel_err = std::sqrt(num / den);
      EXPECT_NEAR(kernel_err, cand.rel_error, 1e-4 + 1e-3 * cand.rel_error)
          << h.layer << ":" << h.head << " " << to_string(hp.kind);
    }
  }
}

TEST_F(RandomModelSearch, RecallIsMonotoneInBudgetPerPatternShape) {
  int pairs = 0;
  for (const HeadSearch& h : r_->heads) {
    // (kind, shape) -> recall per budget
    std::map<std::pair<int, int>, std::map<int, double>> fam;
    for (const Candidate& c : h.candidates)
      if (c.budget >= 0) fam[{static_cast<int>(c.pattern.kind), c.shape}][c.budget] = c.recall;
    for (const auto& [key, by_budget] : fam) {
      double prev = -1;
      for (const auto& [b, rec] : by_budget) {
        EXPECT_GE(rec, prev - 1e-12) << "layer " << h.layer << " head " << h.head << " kind "
                                     << key.first << " shape " << key.second << " budget " << b;
        if (prev >= 0) ++pairs;
        prev = rec;
      }
    }
  }
  EXPECT_GT(pairs, 0);
}

TEST_F(RandomModelSearch, ChoiceIsTheBestRecallOfItsBudget) {
  for (const HeadSearch& h : r_->heads)
    for (int bi = 0; bi < 3; ++bi) {
      ASSERT_GE(h.chosen[bi], 0);
      const Candidate& ch = h.candidates[h.chosen[bi]];
      EXPECT_EQ(ch.budget, bi);
      EXPECT_NE(ch.pattern.kind, PatternKind::kDense);
      for (const Candidate& c : h.candidates) {
        if (c.budget == bi) {
          EXPECT_LE(c.recall, ch.recall + 1e-9);
        }
      }
      if (h.runner_up[bi] >= 0) {
        EXPECT_NE(h.runner_up[bi], h.chosen[bi]);
        EXPECT_LE(h.candidates[h.runner_up[bi]].recall, ch.recall + 1e-9);
      }
    }
}

TEST_F(RandomModelSearch, JsonLoadsThroughSparsePolicyReader) {
  const ModelConfig& c = w_->config;
  for (int bi = 0; bi < 3; ++bi) {
    const std::string json = minference_json(*r_, bi);
    const SparsePolicy pol = parse_minference_config(json, "search", c);
    const SparsePolicy want = r_->policy(bi);
    ASSERT_EQ(pol.heads.size(), want.heads.size());
    for (int l = 0; l < c.n_layers; ++l)
      for (int h = 0; h < c.n_heads; ++h) {
        const HeadPattern got = pol.at(l, h, kDefaultDenseBelow);
        EXPECT_EQ(got, want.heads[l * c.n_heads + h]) << l << ":" << h;
        EXPECT_EQ(got, r_->at(l, h).candidates[r_->at(l, h).chosen[bi]].pattern);
      }
  }
}

TEST_F(RandomModelSearch, CsvHasEveryCandidateAndAChoicePerHeadAndBudget) {
  std::istringstream in(search_csv(*r_));
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "layer,head,pattern,a,b,budget_tiles,tiles,density,recall,rel_error,choice");
  size_t rows = 0, want = 0;
  for (const HeadSearch& h : r_->heads) want += h.candidates.size();
  std::map<std::pair<int, int>, int> chosen;
  while (std::getline(in, line)) {
    ++rows;
    std::vector<std::string> f;
    std::stringstream ls(line);
    for (std::string x; std::getline(ls, x, ',');) f.push_back(x);
    if (!line.empty() && line.back() == ',') f.push_back("");
    ASSERT_EQ(f.size(), 11u) << line;
    if (f[10] == "chosen") ++chosen[{std::stoi(f[0]), std::stoi(f[1])}];
  }
  EXPECT_EQ(rows, want);
  EXPECT_EQ(chosen.size(), r_->heads.size());
  for (const auto& [k, v] : chosen) EXPECT_EQ(v, 3) << k.first << ":" << k.second;
}

TEST_F(RandomModelSearch, HeatmapIsAValidPng) {
  ASSERT_EQ(r_->heatmaps.size(), 1u);
  const Heatmap& hm = r_->heatmaps[0];
  EXPECT_EQ(hm.layer, 1);
  EXPECT_EQ(hm.head, 2);
  const std::string dir = temp_dir("png");
  const std::string path = dir + "/h.png";
  write_png(path, hm.image);
  const RgbImage back = decode_png_stored(read_bytes(path));
  EXPECT_EQ(back.width, 64);
  EXPECT_EQ(back.height, 64);
  EXPECT_EQ(back.rgb, hm.image.rgb);
  // Above the diagonal is the constant background; the diagonal is never background.
  EXPECT_EQ(back.at(63, 0)[0], 40);
  const uint8_t* d = back.at(10, 10);
  EXPECT_FALSE(d[0] == 40 && d[1] == 40 && d[2] == 40);
  std::filesystem::remove_all(dir);
}

TEST(PatternSearch, RejectsBadInput) {
  const ModelWeights w = load_model("random:tiny:1");
  SearchOptions opt;
  EXPECT_THROW(search_patterns(w, random_ids(100, 512, 1), opt), std::runtime_error);  // < 2 blocks
  EXPECT_THROW(search_patterns(w, {1, 2, 99999}, opt), std::runtime_error);
  opt.budgets = {0};
  EXPECT_THROW(search_patterns(w, random_ids(200, 512, 1), opt), std::runtime_error);
  opt.budgets = {0.5};
  opt.heatmap_heads = {{9, 0}};
  EXPECT_THROW(search_patterns(w, random_ids(200, 512, 1), opt), std::runtime_error);
}

TEST(PatternSearch, ScalesPolicyToTileDensity) {
  const ModelWeights w = load_model("random:tiny:4");
  const std::vector<int> ids = random_ids(2048, w.config.vocab, 9);
  const SparsePolicy base =
      SparsePolicy::uniform(w.config, HeadPattern::vertical_slash(1000, 6096), 0);
  double f = 0;
  const SparsePolicy s = scale_policy_to_density(w, ids, base, 0.25, &f);
  EXPECT_GT(f, 0.0);
  EXPECT_LT(f, 1.0);
  // Measured through the engine's own plan (same estimators; layer 0 sees the same input).
  Engine engine(w);
  KvCache cache(w.config, 2048);
  PrefillPlan plan;
  engine.prefill(ids, s, &cache, &plan);
  const double d = plan_tile_density(plan, s, w.config.n_heads);
  EXPECT_LE(d, 0.3);
  EXPECT_GT(d, 0.1);
  // A target below what the smallest budgets give is refused.
  EXPECT_THROW(scale_policy_to_density(w, ids, base, 0.01, nullptr), std::runtime_error);
}

// ---------------------------------------------------------------- synthetic heads
// Heads built so that one pattern is right: the search must tell them apart at equal cost.
struct SyntheticHead {
  static constexpr int kDim = 16;
  int64_t n;
  std::vector<float> q, k, v;
  explicit SyntheticHead(int64_t n_) : n(n_), q(n_ * kDim), k(n_ * kDim) {
    v = test::random_normal(n * kDim, 99);
    const std::vector<float> nq = test::random_normal(n * kDim, 1, 0.3f);
    const std::vector<float> nk = test::random_normal(n * kDim, 2, 0.3f);
    for (int64_t i = 0; i < n * kDim; ++i) {
      q[i] = nq[i];
      k[i] = nk[i];
    }
  }
  HeadSearch search(double budget, int64_t* tiles) const {
    *tiles = static_cast<int64_t>(budget * dense_tiles(n));
    SearchOptions opt;
    return search_head(q.data(), kDim, k.data(), v.data(), kDim, n, kDim, {*tiles}, opt);
  }
};

double best_recall(const HeadSearch& h, PatternKind kind) {
  double best = -1;
  for (const Candidate& c : h.candidates)
    if (c.budget == 0 && c.pattern.kind == kind) best = std::max(best, c.recall);
  return best;
}

TEST(PatternSearchSynthetic, ScatteredColumnsChooseVerticalSlash) {
  SyntheticHead s(2048);
  // Every query row puts most of its mass on 25 columns spread over the whole prompt:
  // 1 + 2 tiles per query block for vertical-slash, one block each for block-sparse.
  for (int64_t c = 0; c < s.n; ++c) s.k[c * 16] = (c < 4 || c % 97 == 13) ? 1.f : 0.f;
  for (int64_t r = 0; r < s.n; ++r) s.q[r * 16] = 32.f;  // logit 8 after the 1/4 scale
  int64_t tiles = 0;
  const HeadSearch h = s.search(0.2, &tiles);
  ASSERT_GE(h.chosen[0], 0);
  const Candidate& ch = h.candidates[h.chosen[0]];
  EXPECT_EQ(ch.pattern.kind, PatternKind::kVerticalSlash)
      << to_string(ch.pattern.kind) << " recall " << ch.recall;
  EXPECT_GT(ch.recall, 0.9);
  EXPECT_LT(best_recall(h, PatternKind::kBlockSparse), ch.recall - 0.2);
  EXPECT_LE(ch.tiles, tiles);
}

TEST(PatternSearchSynthetic, TopicBlocksChooseBlockSparse) {
  SyntheticHead s(2048);
  // Key block j carries topic j % 12; query block b asks for topic (7 b + 3) % 12, so its
  // mass sits on the few earlier blocks of that topic, a different set per query block.
  for (int64_t c = 0; c < s.n; ++c) s.k[c * 16 + (c / 64) % 12] += 1.f;
  for (int64_t r = 0; r < s.n; ++r) s.q[r * 16 + (7 * (r / 64) + 3) % 12] += 40.f;
  int64_t tiles = 0;
  const HeadSearch h = s.search(0.2, &tiles);
  ASSERT_GE(h.chosen[0], 0);
  const Candidate& ch = h.candidates[h.chosen[0]];
  EXPECT_EQ(ch.pattern.kind, PatternKind::kBlockSparse)
      << to_string(ch.pattern.kind) << " recall " << ch.recall;
  EXPECT_GT(ch.recall, 0.9);
  EXPECT_LT(best_recall(h, PatternKind::kVerticalSlash), ch.recall - 0.2);
  EXPECT_LT(best_recall(h, PatternKind::kAShape), ch.recall - 0.2);
}

TEST(PatternSearchSynthetic, SinkAndLocalWindowIsCapturedByAShape) {
  SyntheticHead s(2048);
  // logit(r, c) = A cos(w (r - c)) (+ 4 on the 4 sink keys): a Gaussian local window of
  // sigma = 1 / (w sqrt(A)) = 16 tokens and strong sinks.
  const double w = M_PI / (2.0 * s.n), A = 1.0 / (256.0 * w * w);
  for (int64_t i = 0; i < s.n; ++i) {
    s.q[i * 16 + 0] = static_cast<float>(4.0 * A * std::cos(w * i));
    s.q[i * 16 + 1] = static_cast<float>(4.0 * A * std::sin(w * i));
    s.k[i * 16 + 0] = static_cast<float>(std::cos(w * i));
    s.k[i * 16 + 1] = static_cast<float>(std::sin(w * i));
    s.q[i * 16 + 2] = static_cast<float>(4.0 * (A + 4.0));
    s.k[i * 16 + 2] = i < 4 ? 1.f : 0.f;
  }
  int64_t tiles = 0;
  const HeadSearch h = s.search(0.2, &tiles);
  ASSERT_GE(h.chosen[0], 0);
  EXPECT_GT(best_recall(h, PatternKind::kAShape), 0.99);
  EXPECT_GT(h.candidates[h.chosen[0]].recall, 0.99);
}

// ---------------------------------------------------------------- stories15M

TEST(PatternSearchStories15M, SearchWritesLoadableConfigCsvAndHeatmaps) {
  const std::string m = test::shared_dir() + "/models/stories15M";
  MPREFILL_SKIP_IF_MISSING(m + "/stories15M.bin");
  MPREFILL_SKIP_IF_MISSING(m + "/tokenizer.bin");
  const std::string calib = test::source_dir() + "/docs/search/calib_stories.txt";
  ASSERT_TRUE(test::file_exists(calib)) << calib;
  const std::string dir = temp_dir("stories");
  const std::string cmd = test::bin_dir() + "/mprefill-search --model " + m +
                          "/stories15M.bin --tokenizer " + m + "/tokenizer.bin --calib " + calib +
                          " --max-tokens 768 --budget-tiles 0.5 --out " + dir + "/c.json --csv " +
                          dir + "/r.csv --heatmaps " + dir + "/hm --heatmap-heads 0:0,5:5";
  std::string out;
  ASSERT_EQ(test::run_command(cmd, &out), 0) << out;
  EXPECT_NE(out.find("768 tokens, budget 39 of 78 causal tiles"), std::string::npos) << out;

  const ModelWeights w = load_model(m + "/stories15M.bin");
  const SparsePolicy pol = load_sparse_policy(dir + "/c.json", w.config);
  ASSERT_EQ(pol.heads.size(), 36u);
  for (const HeadPattern& p : pol.heads) EXPECT_NE(p.kind, PatternKind::kDense);

  std::ifstream csv(dir + "/r.csv");
  std::string line;
  std::getline(csv, line);
  std::set<std::pair<int, int>> heads;
  int rows = 0;
  while (std::getline(csv, line)) {
    ++rows;
    if (line.size() > 7 && line.substr(line.size() - 7) == ",chosen") {
      int l = -1, h = -1;
      ASSERT_EQ(std::sscanf(line.c_str(), "%d,%d,", &l, &h), 2);
      heads.insert({l, h});
    }
  }
  EXPECT_EQ(heads.size(), 36u);
  EXPECT_GT(rows, 36 * 3);
  for (const char* name : {"/hm/L0_H0.png", "/hm/L5_H5.png"}) {
    const RgbImage img = decode_png_stored(read_bytes(dir + name));
    EXPECT_EQ(img.width, 256) << name;
    EXPECT_EQ(img.height, 256) << name;
  }
  std::filesystem::remove_all(dir);
}

// ---------------------------------------------------------------- CLI

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }
std::string last_line(std::string s) {
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s.substr(s.rfind('\n') == std::string::npos ? 0 : s.rfind('\n') + 1);
}

TEST(PatternSearchCli, BadInputGivesOneClearErrorLine) {
  const std::string bin = test::bin_dir() + "/mprefill-search";
  const std::string dir = temp_dir("cli");
  std::string out;
  EXPECT_EQ(test::run_command(bin + " --model random:tiny --out " + dir + "/c.json", &out), 2);
  EXPECT_EQ(first_line(out), "mprefill-search: error: --calib is required") << out;

  EXPECT_EQ(test::run_command(bin + " --model random:tiny --calib " + dir + "/missing.txt --out " +
                                  dir + "/c.json",
                              &out),
            1);
  EXPECT_EQ(first_line(out),
            "mprefill-search: error: cannot open calibration file " + dir + "/missing.txt")
      << out;
  EXPECT_EQ(out.find('\n'), out.size() - 1) << "one line only: " << out;

  {
    std::ofstream f(dir + "/ids.txt");
    for (int i = 0; i < 300; ++i) f << (i * 37 % 500) << (i % 20 == 19 ? "\n" : " ");
  }
  EXPECT_EQ(test::run_command(bin + " --model " + dir + "/no_such_model.bin --calib " + dir +
                                  "/ids.txt --out " + dir + "/c.json",
                              &out),
            1);
  EXPECT_EQ(out.rfind("mprefill-search: error: ", 0), 0u) << out;
  EXPECT_NE(out.find("no_such_model.bin"), std::string::npos) << out;
  EXPECT_EQ(out.find('\n'), out.size() - 1) << "one line only: " << out;

  {
    std::ofstream f(dir + "/text.txt");
    f << "Once upon a time";
  }
  EXPECT_EQ(
      test::run_command(
          bin + " --model random:tiny --calib " + dir + "/text.txt --out " + dir + "/c.json", &out),
      1);
  EXPECT_NE(first_line(out).find("not a list of token ids"), std::string::npos) << out;

  EXPECT_EQ(test::run_command(bin + " --model random:tiny --calib " + dir + "/ids.txt --out " +
                                  dir + "/c.json --budget-tiles -1",
                              &out),
            2);
  EXPECT_EQ(first_line(out), "mprefill-search: error: --budget-tiles must be > 0") << out;
  EXPECT_EQ(test::run_command(bin + " --model random:tiny --calib " + dir + "/ids.txt --out " +
                                  dir + "/c.json --budget-tiles 3",
                              &out),
            1);
  // Refused before any layer is computed: the error is the only line (no progress lines).
  EXPECT_EQ(first_line(out).rfind("mprefill-search: error: budget of 3 tiles fits no candidate", 0),
            0u)
      << out;
  EXPECT_EQ(out.find("mprefill-search: layer"), std::string::npos) << out;
  EXPECT_FALSE(test::file_exists(dir + "/c.json"));
  std::filesystem::remove_all(dir);
}

TEST(PatternSearchCli, SearchAndRetrievalEvalOnRandomModel) {
  const std::string bin = test::bin_dir() + "/mprefill-search";
  const std::string dir = temp_dir("cli_ok");
  {
    std::ofstream f(dir + "/ids.txt");
    for (int i = 0; i < 300; ++i) f << (i * 37 % 500) << ",";
  }
  std::string out;
  ASSERT_EQ(test::run_command(bin + " --model random:tiny:2 --calib " + dir + "/ids.txt --out " +
                                  dir + "/c.json --budget-tiles 0.6",
                              &out),
            0)
      << out;
  const SparsePolicy pol = load_sparse_policy(dir + "/c.json", named_shape("tiny"));
  EXPECT_EQ(pol.heads.size(), 16u);

  // Two retrieval samples of 1024 tokens; the answer is whatever; densities are checked.
  {
    std::ofstream f(dir + "/eval.jsonl");
    for (int s = 0; s < 2; ++s) {
      f << "{\"ids\": [1";
      for (int i = 1; i < 1024; ++i) f << "," << (i * (31 + s) % 500);
      f << "], \"answer\": [5, 6]}\n";
    }
  }
  ASSERT_EQ(test::run_command(bin + " --model random:tiny:2 --eval-retrieval " + dir +
                                  "/eval.jsonl --policies 'dense;ashape:64:64;" + dir +
                                  "/c.json;auto@0.5' --json " + dir + "/eval.json",
                              &out),
            0)
      << out;
  std::ifstream jf(dir + "/eval.json");
  const nlohmann::json rows = nlohmann::json::parse(jf);
  ASSERT_EQ(rows.size(), 4u) << rows.dump();
  EXPECT_EQ(rows[0]["policy"], "dense");
  EXPECT_DOUBLE_EQ(rows[0]["tile_density"].get<double>(), 1.0);
  // ashape(64, 64) at 1024 tokens: ashape_tiles / dense_tiles on every head.
  EXPECT_NEAR(rows[1]["tile_density"].get<double>(),
              static_cast<double>(ashape_tiles(64, 64, 1024)) / dense_tiles(1024), 1e-12);
  EXPECT_LT(rows[2]["tile_density"].get<double>(), 1.0);
  // Scaled on the dense forward's estimates; the engine's own estimates (layers > 0 see
  // sparse outputs) may differ a little.
  EXPECT_LE(rows[3]["tile_density"].get<double>(), 0.55);
  EXPECT_GT(rows[3]["tile_density"].get<double>(), 0.3);
  for (const auto& r : rows) {
    EXPECT_EQ(r["samples"], 2);
    EXPECT_GE(r["accuracy"].get<double>(), 0.0);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace mprefill
