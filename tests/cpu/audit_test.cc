// Online accuracy audit (engine/audit.h): seeded head / block sampling, recall and output
// error of full-cover and small masks, equality with the pattern search's scores on the
// same head and rows, partials merged over split key sets (the distributed path), the
// Engine and generate hooks, stories15M, and the CLI's --audit-heads.
#include "engine/audit.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "model/sparse_policy.h"
#include "search/pattern_search.h"
#include "tests/model_fixtures.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

std::vector<int> random_ids(int n, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int> ids(n);
  for (int& x : ids) x = static_cast<int>(g() % vocab);
  ids[0] = 1;
  return ids;
}

std::vector<HeadAuditResult> run_audit(const ModelWeights& w, const std::vector<int>& ids,
                                       const SparsePolicy& pol, const AuditOptions& ao,
                                       std::vector<float>* logits = nullptr) {
  Engine eng(w);
  KvCache cache(w.config, static_cast<int64_t>(ids.size()));
  PrefillStats st;
  std::vector<float> lg = eng.prefill(ids, pol, &cache, nullptr, &st, ao);
  if (logits) *logits = lg;
  return st.audit;
}

TEST(Audit, SamplingIsSeededNonDenseAndIncludesTheLastBlock) {
  const ModelConfig cfg = named_shape("tiny");
  const SparsePolicy pol =
      test::mixed_policy(cfg, HeadPattern::a_shape(64, 64), HeadPattern::vertical_slash(64, 64),
                         HeadPattern::block_sparse(2));
  AuditOptions o;
  o.heads_per_layer = 2;
  o.seed = 11;
  const int64_t n = 1000;  // 16 blocks, the last one partial
  for (int l = 0; l < cfg.n_layers; ++l) {
    const std::vector<int> h = audit_heads(pol, l, cfg.n_heads, n, o);
    ASSERT_EQ(h.size(), 2u);
    EXPECT_TRUE(std::is_sorted(h.begin(), h.end()));
    EXPECT_NE(h[0], h[1]);
    for (int x : h) EXPECT_NE(pol.at(l, x, n).kind, PatternKind::kDense) << l << ":" << x;
    EXPECT_EQ(h, audit_heads(pol, l, cfg.n_heads, n, o));
  }
  o.heads_per_layer = 10;  // more than the 3 non-dense heads: all of them
  EXPECT_EQ(audit_heads(pol, 0, cfg.n_heads, n, o), (std::vector<int>{1, 2, 3}));
  EXPECT_TRUE(audit_heads(SparsePolicy::dense(0), 0, cfg.n_heads, n, o).empty());
  SparsePolicy short_dense = pol;
  short_dense.dense_below = 2000;  // the prompt runs dense: nothing to audit
  EXPECT_TRUE(audit_heads(short_dense, 0, cfg.n_heads, n, o).empty());

  o.query_blocks = 4;
  std::set<std::vector<int64_t>> seen;
  for (uint64_t seed = 0; seed < 8; ++seed) {
    o.seed = seed;
    const std::vector<int64_t> b = audit_blocks(n, 0, o);
    ASSERT_EQ(b.size(), 4u);
    EXPECT_EQ(b.back(), 15);
    EXPECT_TRUE(std::is_sorted(b.begin(), b.end()));
    EXPECT_EQ(std::set<int64_t>(b.begin(), b.end()).size(), 4u);
    EXPECT_EQ(b, audit_blocks(n, 0, o));
    seen.insert(b);
  }
  EXPECT_GT(seen.size(), 1u) << "the seed does not change the sampled blocks";
  o.query_blocks = 50;
  EXPECT_EQ(audit_blocks(n, 0, o).size(), 16u);
  EXPECT_EQ(audit_blocks(10, 0, o), (std::vector<int64_t>{0}));

  AuditOptions bad;
  bad.heads_per_layer = -1;
  EXPECT_THROW(bad.validate(), std::runtime_error);
  bad.heads_per_layer = 1;
  bad.query_blocks = 0;
  EXPECT_THROW(bad.validate(), std::runtime_error);
}

TEST(Audit, FullCoverMasksHaveRecallOneAndNoError) {
  const ModelWeights w = load_model("random:tiny:5");
  const int n = 700;  // 11 blocks, the last one partial
  const std::vector<int> ids = random_ids(n, w.config.vocab, 3);
  // Every tile covered: block-sparse top-k >= blocks, VS with every column and diagonal,
  // A-shape whose local window spans the prompt.
  const SparsePolicy pol =
      test::mixed_policy(w.config, HeadPattern::a_shape(64, n), HeadPattern::vertical_slash(n, n),
                         HeadPattern::block_sparse(11));
  AuditOptions ao;
  ao.heads_per_layer = 3;
  ao.query_blocks = 3;
  const std::vector<HeadAuditResult> a = run_audit(w, ids, pol, ao);
  ASSERT_EQ(a.size(), static_cast<size_t>(w.config.n_layers * 3));
  std::set<PatternKind> kinds;
  for (const HeadAuditResult& r : a) {
    kinds.insert(r.pattern.kind);
    EXPECT_EQ(r.rows, 2 * 64 + (n - 640)) << r.layer << ":" << r.head;  // incl. the last block
    EXPECT_EQ(r.recall, 1.0) << r.layer << ":" << r.head;
    EXPECT_EQ(r.output_rel_error, 0.0) << r.layer << ":" << r.head;
    EXPECT_EQ(r.output_rel_error_fro, 0.0);
  }
  EXPECT_EQ(kinds.size(), 3u);
}

TEST(Audit, SmallBudgetsLoseMassAndTheAuditLeavesLogitsAlone) {
  const ModelWeights w = load_model("random:tiny:6");
  const int n = 640;
  const std::vector<int> ids = random_ids(n, w.config.vocab, 9);
  const SparsePolicy pol =
      test::mixed_policy(w.config, HeadPattern::a_shape(16, 32), HeadPattern::vertical_slash(8, 16),
                         HeadPattern::block_sparse(1));
  AuditOptions ao;
  ao.heads_per_layer = 3;
  ao.query_blocks = 4;
  ao.seed = 5;
  std::vector<float> with, without;
  const std::vector<HeadAuditResult> a = run_audit(w, ids, pol, ao, &with);
  run_audit(w, ids, pol, AuditOptions{}, &without);
  EXPECT_EQ(with, without) << "the audit changed the prefill";
  ASSERT_EQ(a.size(), static_cast<size_t>(w.config.n_layers * 3));
  for (const HeadAuditResult& r : a) {
    EXPECT_EQ(r.rows, 4 * 64);
    EXPECT_GE(r.recall, 0.0);
    EXPECT_LT(r.recall, 1.0) << r.layer << ":" << r.head << " " << to_string(r.pattern.kind);
    EXPECT_GT(r.output_rel_error, 0.0);
    EXPECT_TRUE(std::isfinite(r.output_rel_error));
    EXPECT_EQ(r.pattern.kind, pol.at(r.layer, r.head, n).kind);
  }
  // Same options: same results; a prefill with a filled plan audits the same.
  const std::vector<HeadAuditResult> b = run_audit(w, ids, pol, ao);
  ASSERT_EQ(b.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].head, b[i].head);
    EXPECT_EQ(a[i].recall, b[i].recall);
    EXPECT_EQ(a[i].output_rel_error, b[i].output_rel_error);
  }
  // An audited prefill needs somewhere to put the results.
  Engine eng(w);
  KvCache cache(w.config, n);
  EXPECT_THROW(eng.prefill(ids, pol, &cache, nullptr, nullptr, ao), std::runtime_error);
}

// Layer 0 sees the same Q / K / V in the search's dense capture and in the sparse prefill,
// and the engine's estimators give the search's indices: auditing every row must give
// the search's recall and errors of the chosen candidate of every head.
TEST(Audit, EqualsPatternSearchScoresOnTheSameHeadAndRows) {
  const ModelWeights w = load_model("random:tiny:7");
  const int n = 448;
  const std::vector<int> ids = random_ids(n, w.config.vocab, 21);
  SearchOptions so;
  so.budgets = {0.35};
  so.error_rows = 0;  // every row, as the audit of every block
  const SearchResult sr = search_patterns(w, ids, so);
  SparsePolicy pol = sr.policy(0);
  pol.dense_below = 0;
  AuditOptions ao;
  ao.heads_per_layer = w.config.n_heads;
  ao.query_blocks = 1000;
  const std::vector<HeadAuditResult> a = run_audit(w, ids, pol, ao);
  ASSERT_EQ(a.size(), static_cast<size_t>(w.config.n_layers * w.config.n_heads));
  int compared = 0;
  double lowest = 1;
  std::set<PatternKind> kinds;
  for (const HeadAuditResult& r : a) {
    if (r.layer != 0) continue;
    const HeadSearch& hs = sr.at(0, r.head);
    ASSERT_GE(hs.chosen[0], 0);
    const Candidate& c = hs.candidates[hs.chosen[0]];
    EXPECT_EQ(r.pattern.kind, c.pattern.kind);
    EXPECT_EQ(r.rows, n);
    // The search sums fp32-stored probabilities, the audit fp64 weights: ~1e-7 apart.
    EXPECT_NEAR(r.recall, c.recall, 2e-6) << "head " << r.head;
    EXPECT_NEAR(r.output_rel_error, c.max_error, 1e-5 + 1e-4 * c.max_error) << "head " << r.head;
    EXPECT_NEAR(r.output_rel_error_fro, c.rel_error, 1e-5 + 1e-4 * c.rel_error) << r.head;
    kinds.insert(c.pattern.kind);
    lowest = std::min(lowest, r.recall);
    ++compared;
  }
  EXPECT_EQ(compared, w.config.n_heads);
  EXPECT_LT(lowest, 1.0) << "every chosen mask is complete: the comparison cannot tell";
  // The search's dense reference scores recall 1, error 0 by the same primitives.
  EXPECT_EQ(sr.at(0, 0).candidates[0].recall, 1.0);
  EXPECT_EQ(sr.at(0, 0).candidates[0].max_error, 0.0);
}

// The distributed path: partials over disjoint key sets (positions scattered as a zigzag
// shard would hold them), merged, equal the partial over every key.
TEST(Audit, PartialsOverSplitKeySetsMergeToTheWhole) {
  const int d = 24;
  const int64_t n = 333;
  std::vector<float> q = test::random_normal(static_cast<size_t>(n * d), 1);
  std::vector<float> k = test::random_normal(static_cast<size_t>(n * d), 2);
  std::vector<float> v = test::random_normal(static_cast<size_t>(n * d), 3);
  HeadPlan plan;
  plan.kind = PatternKind::kBlockSparse;
  plan.topk = 2;
  const int64_t nb = num_blocks(n);
  for (int64_t b = 0; b < nb; ++b) {
    plan.blocks.push_back(0);
    plan.blocks.push_back(b > 0 ? static_cast<int>(b) : -1);
  }
  const std::vector<int64_t> blocks = {1, 3, nb - 1};
  const AuditRows ar = audit_rows(plan, HeadPattern::block_sparse(2), n, blocks);
  std::vector<float> qr;
  for (int64_t r : ar.rows) qr.insert(qr.end(), q.begin() + r * d, q.begin() + (r + 1) * d);
  const double scale = 1.0 / std::sqrt(double(d));
  const std::vector<RowPartial> whole =
      audit_partials(ar, qr.data(), k.data(), v.data(), d, nullptr, n, d, scale);
  // Three shards: [0,40) + [300,333), [40,170), [170,300).
  const std::vector<std::vector<std::pair<int64_t, int64_t>>> shards = {
      {{0, 40}, {300, 333}}, {{40, 170}}, {{170, 300}}};
  std::vector<RowPartial> merged(ar.rows.size());
  for (const auto& sh : shards) {
    std::vector<int64_t> pos;
    std::vector<float> ks, vs;
    for (auto [b, e] : sh)
      for (int64_t t = b; t < e; ++t) {
        pos.push_back(t);
        ks.insert(ks.end(), k.begin() + t * d, k.begin() + (t + 1) * d);
        vs.insert(vs.end(), v.begin() + t * d, v.begin() + (t + 1) * d);
      }
    const std::vector<RowPartial> part =
        audit_partials(ar, qr.data(), ks.data(), vs.data(), d, pos.data(),
                       static_cast<int64_t>(pos.size()), d, scale);
    std::vector<double> wire(3 + 2 * d);
    for (size_t i = 0; i < part.size(); ++i) {
      encode_partial(part[i], d, wire.data());
      merged[i].merge(decode_partial(wire.data(), d));
    }
  }
  const HeadAuditResult a = audit_result(0, 0, HeadPattern::block_sparse(2), whole);
  const HeadAuditResult b = audit_result(0, 0, HeadPattern::block_sparse(2), merged);
  EXPECT_NEAR(a.recall, b.recall, 1e-12);
  EXPECT_NEAR(a.output_rel_error, b.output_rel_error, 1e-12);
  EXPECT_LT(a.recall, 1.0);
  EXPECT_GT(a.recall, 0.0);

  // Brute force of one row (row 200 of block 3): captured mass of keys in blocks 0 and 3.
  const int64_t r = 200;
  double mx = -INFINITY;
  std::vector<double> x(r + 1);
  for (int64_t c = 0; c <= r; ++c) {
    double s = 0;
    for (int j = 0; j < d; ++j) s += double(q[r * d + j]) * k[c * d + j];
    mx = std::max(mx, x[c] = s * scale);
  }
  double tot = 0, cap = 0;
  for (int64_t c = 0; c <= r; ++c) {
    const double e = std::exp(x[c] - mx);
    tot += e;
    if (c < 64 || c >= 192) cap += e;
  }
  const size_t i = std::find(ar.rows.begin(), ar.rows.end(), r) - ar.rows.begin();
  EXPECT_NEAR(whole[i].captured(), cap / tot, 1e-5);
}

TEST(Audit, GenerateCarriesTheAudit) {
  const ModelWeights w = load_model("random:tiny:8");
  Engine eng(w);
  GenerateOptions g;
  g.policy = test::mixed_policy(w.config, HeadPattern::a_shape(16, 32),
                                HeadPattern::vertical_slash(8, 16), HeadPattern::block_sparse(1));
  g.audit.heads_per_layer = 1;
  const GenerateResult r = eng.generate(random_ids(300, w.config.vocab, 4), g);
  ASSERT_EQ(r.prefill.audit.size(), static_cast<size_t>(w.config.n_layers));
  for (const HeadAuditResult& a : r.prefill.audit) EXPECT_LT(a.recall, 1.0);
}

TEST(AuditStories15M, RecallAndErrorsPerSampledHead) {
  const std::string m = test::shared_dir() + "/models/stories15M/stories15M.bin";
  MPREFILL_SKIP_IF_MISSING(m);
  const ModelWeights w = load_model(m);
  const int n = 600;
  const std::vector<int> ids = random_ids(n, w.config.vocab, 17);
  AuditOptions ao;
  ao.heads_per_layer = 2;
  ao.query_blocks = 3;
  const SparsePolicy small =
      test::mixed_policy(w.config, HeadPattern::a_shape(16, 64),
                         HeadPattern::vertical_slash(16, 32), HeadPattern::block_sparse(2));
  const std::vector<HeadAuditResult> a = run_audit(w, ids, small, ao);
  ASSERT_EQ(a.size(), static_cast<size_t>(w.config.n_layers * 2));
  double lowest = 1;
  for (const HeadAuditResult& r : a) {
    EXPECT_GE(r.recall, 0.0);
    EXPECT_LE(r.recall, 1.0);
    EXPECT_GE(r.output_rel_error, 0.0);
    lowest = std::min(lowest, r.recall);
  }
  EXPECT_LT(lowest, 1.0);
  const SparsePolicy full =
      test::mixed_policy(w.config, HeadPattern::a_shape(64, n), HeadPattern::vertical_slash(n, n),
                         HeadPattern::block_sparse(10));
  for (const HeadAuditResult& r : run_audit(w, ids, full, ao)) {
    EXPECT_EQ(r.recall, 1.0);
    EXPECT_EQ(r.output_rel_error, 0.0);
  }
}

TEST(AuditCli, GenerateAuditHeadsTextAndJson) {
  const std::string bin = test::bin_dir() + "/mprefill";
  MPREFILL_SKIP_IF_MISSING(bin);
  std::string out;
  const std::string base =
      test::tiny_generate_command(bin) + "--sparse auto --dense-below 0 --decode 0 --audit-heads 2";
  ASSERT_EQ(test::run_command(base + " --json", &out), 0) << out;
  const auto j = nlohmann::json::parse(out.substr(out.find('{')));
  ASSERT_TRUE(j.contains("audit")) << out;
  ASSERT_EQ(j["audit"].size(), 8u) << out;  // 4 layers x 2 heads
  for (const auto& e : j["audit"]) {
    EXPECT_GE(e["recall"].get<double>(), 0.0);
    EXPECT_LE(e["recall"].get<double>(), 1.0);
    EXPECT_TRUE(e.contains("output_rel_error"));
    EXPECT_TRUE(e.contains("pattern"));
  }
  ASSERT_EQ(test::run_command(base, &out), 0) << out;
  EXPECT_NE(out.find("audit layer 0 head"), std::string::npos) << out;
  EXPECT_NE(test::run_command(base + " --audit-heads -1", &out), 0);
  EXPECT_NE(out.find("--audit-heads"), std::string::npos) << out;
}

}  // namespace
}  // namespace mprefill
