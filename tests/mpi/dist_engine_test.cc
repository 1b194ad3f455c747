// DistEngine (tp x sp over MPI ranks, CPU) against the single-process Engine under
// mpirun. The topology comes from MPREFILL_TEST_TP (sp = ranks / tp). Rank 0 computes
// the reference (logits, per-layer KV, the estimated plan) and broadcasts it; every rank
// checks its own part (its KV slices, the logits it returns) and the verdicts are
// combined over ranks.
#include "engine/dist_engine.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "comm/mpi_comm.h"
#include "engine/plan_codec.h"
#include "kv/kv_cache_sink.h"
#include "model/convert.h"
#include "model/tokenizer.h"
#include "tests/model_fixtures.h"
#include "tests/mpi/mpi_testutil.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

using test::mpi::env_tp;
using test::mpi::expect_all_ranks_ok;
using test::mpi::world;

constexpr double kTol = 1e-4;  // max|diff| <= kTol * max|ref| (fp32)

std::string stories_path() { return test::shared_dir() + "/models/stories15M/stories15M.bin"; }
std::string stories_tokenizer() { return test::shared_dir() + "/models/stories15M/tokenizer.bin"; }

// test::mixed_policy (every tp rank gets a mix) with this suite's budgets.
SparsePolicy budget_mix(const ModelConfig& cfg, int64_t dense_below, int ashape_local, int vs_slash,
                        int bs_topk) {
  return test::mixed_policy(cfg, HeadPattern::a_shape(64, ashape_local),
                            HeadPattern::vertical_slash(60, vs_slash),
                            HeadPattern::block_sparse(bs_topk), dense_below);
}

std::vector<int> random_ids(int64_t n, int lo, int hi, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int> d(lo, hi - 1);
  std::vector<int> ids(n);
  for (auto& x : ids) x = d(g);
  ids[0] = 1;
  return ids;
}

// Story text repeated up to n tokens (BOS first).
std::vector<int> story_ids(int64_t n) {
  const Tokenizer tok = Tokenizer::load(stories_tokenizer(), 32000);
  std::vector<int> ids = tok.encode(
      "Once upon a time, there was a little girl named Lily. She loved to play in the park "
      "with her dog, Max. One day, Lily and Max found a big red ball under a tree. ",
      true);
  const std::vector<int> body(ids.begin() + 1, ids.end());
  while (static_cast<int64_t>(ids.size()) < n) ids.insert(ids.end(), body.begin(), body.end());
  ids.resize(n);
  return ids;
}

// The single-process result, computed on rank 0 and broadcast.
struct Reference {
  std::vector<float> logits;
  std::vector<std::vector<float>> k, v;  // [layer][n * kv_dim]
  PrefillPlan plan;
  std::vector<int> greedy;  // decode test only
  double ms = 0;
};

void bcast_floats(comm::Communicator& c, std::vector<float>* x) {
  int64_t len = static_cast<int64_t>(x->size());
  ASSERT_EQ(c.broadcast(&len, 1, DType::kI64, 0, nullptr), Status::kOk) << c.last_error();
  x->resize(len);
  if (len > 0) {
    ASSERT_EQ(c.broadcast(x->data(), len, DType::kF32, 0, nullptr), Status::kOk) << c.last_error();
  }
}
void bcast_ints(comm::Communicator& c, std::vector<int32_t>* x) {
  int64_t len = static_cast<int64_t>(x->size());
  ASSERT_EQ(c.broadcast(&len, 1, DType::kI64, 0, nullptr), Status::kOk) << c.last_error();
  x->resize(len);
  if (len > 0) {
    ASSERT_EQ(c.broadcast(x->data(), len, DType::kI32, 0, nullptr), Status::kOk) << c.last_error();
  }
}

// Reference prefill (estimating the plan) and, with decode_steps, greedy decoding.
Reference reference(comm::Communicator& c, const std::string& model, const std::vector<int>& ids,
                    const SparsePolicy& policy, int decode_steps = 0) {
  Reference r;
  const int64_t n = static_cast<int64_t>(ids.size());
  std::vector<int32_t> plan_enc, greedy;
  int L = 0;
  if (c.rank() == 0) {
    const auto t0 = std::chrono::steady_clock::now();
    const ModelWeights w = load_model(model);
    Engine eng(w);
    KvCache cache(w.config, n + decode_steps);
    r.logits = eng.prefill(ids, policy, &cache, &r.plan);
    r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    L = w.config.n_layers;
    for (int l = 0; l < L; ++l) {
      r.k.emplace_back(cache.k[l].begin(), cache.k[l].begin() + n * cache.kv_dim);
      r.v.emplace_back(cache.v[l].begin(), cache.v[l].begin() + n * cache.kv_dim);
    }
    plan_enc = encode_plan(r.plan);
    if (decode_steps > 0) {
      std::vector<float> lg = r.logits;
      for (int s = 0; s <= decode_steps; ++s) {
        const int id = static_cast<int>(std::max_element(lg.begin(), lg.end()) - lg.begin());
        greedy.push_back(id);
        if (s < decode_steps) lg = eng.decode_step(id, n + s, &cache);
      }
    }
  }
  int32_t nl = L;
  EXPECT_EQ(c.broadcast(&nl, 1, DType::kI32, 0, nullptr), Status::kOk);
  r.k.resize(nl);
  r.v.resize(nl);
  bcast_floats(c, &r.logits);
  for (int l = 0; l < nl; ++l) {
    bcast_floats(c, &r.k[l]);
    bcast_floats(c, &r.v[l]);
  }
  bcast_ints(c, &plan_enc);
  r.plan = decode_plan(plan_enc);
  bcast_ints(c, &greedy);
  r.greedy.assign(greedy.begin(), greedy.end());
  return r;
}

double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (float e : x) m = std::max(m, static_cast<double>(std::fabs(e)));
  return m;
}

// This rank's logits and KV pieces against the reference; prints the worst ratio.
bool compare(const DistPrefillResult& res, const KvCacheSink& sink, const Reference& ref,
             const ModelConfig& cfg, const std::string& what, int rank) {
  bool ok = true;
  const double lref = max_abs(ref.logits);
  double ldiff = res.logits.size() == ref.logits.size() ? 0 : 1e30;
  for (size_t i = 0; i < res.logits.size() && i < ref.logits.size(); ++i)
    ldiff = std::max(ldiff, static_cast<double>(std::fabs(res.logits[i] - ref.logits[i])));
  if (!(ldiff <= kTol * lref)) {
    ADD_FAILURE() << what << " rank " << rank << ": logits max|diff| " << ldiff << " > " << kTol
                  << " * " << lref;
    ok = false;
  }
  double worst = 0;
  const int hd = cfg.head_dim, kvd = cfg.kv_dim();
  std::vector<int> layers_seen(cfg.n_layers, 0);
  for (const KvPiece& p : sink.pieces()) {
    ++layers_seen[p.layer];
    for (int which = 0; which < 2; ++which) {
      const auto& refl = which == 0 ? ref.k[p.layer] : ref.v[p.layer];
      const auto& got = which == 0 ? sink.cache().k[p.layer] : sink.cache().v[p.layer];
      const double mref = max_abs(refl);
      double d = 0;
      for (auto [b, e] : p.tokens)
        for (int64_t t = b; t < e; ++t)
          for (int h : p.kv_heads)
            for (int i = 0; i < hd; ++i) {
              const int64_t at = t * kvd + int64_t{h} * hd + i;
              d = std::max(d, static_cast<double>(std::fabs(got[at] - refl[at])));
            }
      worst = std::max(worst, d / mref);
      if (!(d <= kTol * mref)) {
        ADD_FAILURE() << what << " rank " << rank << ": layer " << p.layer << (which ? " V" : " K")
                      << " max|diff| " << d << " > " << kTol << " * " << mref;
        ok = false;
      }
    }
  }
  for (int l = 0; l < cfg.n_layers; ++l)
    if (layers_seen[l] != 1) {
      ADD_FAILURE() << what << " rank " << rank << ": layer " << l << " exported " << layers_seen[l]
                    << " times";
      ok = false;
    }
  if (rank == 0)
    std::printf("[ %s ] logits max|diff|/max|ref| %.2e, KV worst %.2e\n", what.c_str(),
                ldiff / lref, worst);
  return ok;
}

// Heads whose distributed indices differ from the reference's.
int plan_mismatches(const PrefillPlan& a, const PrefillPlan& b, std::string* first) {
  int bad = 0;
  if (a.seq_len != b.seq_len || a.layers.size() != b.layers.size()) return 1 << 20;
  for (size_t l = 0; l < a.layers.size(); ++l)
    for (size_t h = 0; h < a.layers[l].size() && h < b.layers[l].size(); ++h) {
      const HeadPlan &x = a.layers[l][h], &y = b.layers[l][h];
      const bool same = x.kind == y.kind && x.vs.columns == y.vs.columns &&
                        x.vs.offsets == y.vs.offsets && x.topk == y.topk && x.blocks == y.blocks;
      if (!same && bad++ == 0 && first)
        *first = "layer " + std::to_string(l) + " head " + std::to_string(h) + " (" +
                 to_string(x.kind) + ")";
    }
  return bad;
}

struct DistRun {
  DistPrefillResult res;
  double ms = 0;
};

void print_balance(const std::string& what, const DistRun& r, const Reference& ref, int rank,
                   DistTopology topo) {
  if (rank != 0) return;
  std::printf(
      "[ %s ] tp %d x sp %d: dist %.0f ms (ref %.0f ms single rank), sp imbalance %.3f "
      "(zigzag predicted %.3f, layout predicted %.3f, rebalanced %d), tp imbalance %.3f "
      "expected / %.3f tiles (heads re-placed %d), rank 0: %lld tiles, ring compute %.0f ms, "
      "wait %.0f ms\n",
      what.c_str(), topo.tp, topo.sp, r.ms, ref.ms, r.res.sp_imbalance, r.res.sp_imbalance_zigzag,
      r.res.sp_imbalance_predicted, r.res.sp_rebalanced ? 1 : 0, r.res.tp_imbalance,
      r.res.tp_imbalance_tiles, r.res.tp_replaced ? 1 : 0,
      static_cast<long long>(r.res.tiles_computed), r.res.ring_compute_ms, r.res.ring_wait_ms);
}

// The distributed prefill with a fixed (or empty) plan into a local KV cache.
DistRun dist_run(DistEngine& de, const std::vector<int>& ids, const SparsePolicy& policy,
                 KvCacheSink* sink, PrefillPlan* plan, int* progress_calls = nullptr) {
  DistRun r;
  const auto t0 = std::chrono::steady_clock::now();
  r.res = de.prefill(ids, policy, sink, plan, [&](int, int) {
    if (progress_calls) ++*progress_calls;
  });
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

DistTopology topology(comm::Communicator& c) {
  DistTopology t;
  t.tp = env_tp();
  t.sp = c.size() / t.tp;
  return t;
}

// Fixed indices: estimated once by the single-process engine, given to both.
void fixed_plan_case(const std::string& what, const std::string& model, const std::vector<int>& ids,
                     const SparsePolicy& policy, bool expect_sparse) {
  auto c = world();
  const DistTopology topo = topology(*c);
  const Reference ref = reference(*c, model, ids, policy);
  DistEngine de(c.get(), model, topo);
  const ModelConfig& cfg = de.config();
  const int64_t n = static_cast<int64_t>(ids.size());
  KvCache local(cfg, n);
  KvCacheSink sink(&local, cfg.head_dim);
  PrefillPlan plan = ref.plan;
  int calls = 0;
  const DistRun r = dist_run(de, ids, policy, &sink, &plan, &calls);
  bool ok = compare(r.res, sink, ref, cfg, what, c->rank());
  EXPECT_EQ(calls, cfg.n_layers);
  EXPECT_TRUE(r.res.stats.plan_reused);
  EXPECT_EQ(r.res.stats.all_dense, !expect_sparse);
  if (expect_sparse) {
    for (int k = 0; k < 4; ++k) EXPECT_GT(r.res.stats.heads_by_kind[k], 0) << "kind " << k;
  }
  EXPECT_GE(r.res.sp_imbalance, 1.0);
  EXPECT_GT(r.res.tiles_computed, 0);
  // The layout used is never predicted worse than the plain zigzag, and the heads are
  // placed within the re-placement threshold (1.10) or as well as the planner does for
  // this policy and length (place_kv_heads).
  EXPECT_LE(r.res.sp_imbalance_predicted, r.res.sp_imbalance_zigzag + 1e-12);
  EXPECT_LE(r.res.tp_imbalance,
            std::max(1.10, plan_tensor_parallel(cfg, policy, n, topo.tp).imbalance()) + 1e-9);
  EXPECT_EQ(static_cast<int>(r.res.sp_layout.size()), topo.sp);
  ok &= calls == cfg.n_layers;
  print_balance(what, r, ref, c->rank(), topo);
  expect_all_ranks_ok(*c, ok);
}

// Empty plan: the distributed estimation must pick the reference's indices.
void estimated_plan_case(const std::string& what, const std::string& model,
                         const std::vector<int>& ids, const SparsePolicy& policy) {
  auto c = world();
  const DistTopology topo = topology(*c);
  const Reference ref = reference(*c, model, ids, policy);
  DistEngine de(c.get(), model, topo);
  const ModelConfig& cfg = de.config();
  KvCache local(cfg, static_cast<int64_t>(ids.size()));
  KvCacheSink sink(&local, cfg.head_dim);
  PrefillPlan plan;
  const DistRun r = dist_run(de, ids, policy, &sink, &plan);
  std::string first;
  const int bad = plan_mismatches(plan, ref.plan, &first);
  EXPECT_EQ(bad, 0) << "first differing head: " << first;
  bool ok = bad == 0 && !r.res.stats.plan_reused;
  ok &= compare(r.res, sink, ref, cfg, what, c->rank());
  print_balance(what, r, ref, c->rank(), topo);
  expect_all_ranks_ok(*c, ok);
}

TEST(DistEngine, TinyDenseFixed) {
  const ModelConfig cfg = named_shape("tiny");
  fixed_plan_case("tiny dense", "random:tiny:7", random_ids(777, 3, cfg.vocab, 11),
                  SparsePolicy::dense(), false);
}

TEST(DistEngine, TinySparseFixed) {
  const ModelConfig cfg = named_shape("tiny");
  fixed_plan_case("tiny sparse", "random:tiny:7", random_ids(1237, 3, cfg.vocab, 12),
                  budget_mix(cfg, 128, 128, 150, 4), true);
}

TEST(DistEngine, TinySparseEstimated) {
  const ModelConfig cfg = named_shape("tiny");
  estimated_plan_case("tiny estimated", "random:tiny:7", random_ids(1237, 3, cfg.vocab, 13),
                      budget_mix(cfg, 128, 128, 150, 4));
}

// An HF directory (safetensors, read slice by slice by every rank) of a Qwen2-style tiny
// model (q/k/v biases), written by rank 0 for this test.
TEST(DistEngine, TinyHfQwen2SparseFixed) {
  auto c = world();
  int32_t pid = static_cast<int32_t>(getpid());
  ASSERT_EQ(c->broadcast(&pid, 1, DType::kI32, 0, nullptr), Status::kOk);
  const std::string dir = "/tmp/mprefill_dist_hf_" + std::to_string(pid);
  ModelConfig cfg = named_shape("tiny");
  cfg.arch = "qwen2";
  cfg.qkv_bias = true;
  bool wrote = true;
  if (c->rank() == 0) {
    try {
      std::filesystem::create_directories(dir);
      save_hf_dir(random_model(cfg, 9), dir, DType::kF32);
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
      wrote = false;
    }
  }
  expect_all_ranks_ok(*c, wrote);  // also a barrier: the directory exists from here on
  fixed_plan_case("tiny HF qwen2 sparse", dir, random_ids(1100, 3, cfg.vocab, 14),
                  budget_mix(cfg, 128, 128, 150, 4), true);
  if (c->rank() == 0) std::filesystem::remove_all(dir);
}

TEST(DistEngine, StoriesDenseFixed) {
  MPREFILL_SKIP_IF_MISSING(stories_path());
  fixed_plan_case("stories15M dense", stories_path(), story_ids(301), SparsePolicy::dense(), false);
}

TEST(DistEngine, StoriesSparseFixed) {
  MPREFILL_SKIP_IF_MISSING(stories_path());
  const ModelConfig cfg = named_shape("stories15m");
  fixed_plan_case("stories15M sparse", stories_path(), story_ids(449),
                  budget_mix(cfg, 64, 64, 120, 3), true);
}

TEST(DistEngine, StoriesSparseEstimated) {
  MPREFILL_SKIP_IF_MISSING(stories_path());
  const ModelConfig cfg = named_shape("stories15m");
  estimated_plan_case("stories15M estimated", stories_path(), story_ids(449),
                      budget_mix(cfg, 64, 64, 120, 3));
}

// Block-sparse heads scored by antidiagonals (fixed and adaptive, two strides) beside
// pooled ones in every layer: the distributed estimate groups them by score and gives the
// single process's plan exactly.
TEST(DistEngine, StoriesAntidiagonalEstimated) {
  MPREFILL_SKIP_IF_MISSING(stories_path());
  const ModelConfig cfg = named_shape("stories15m");
  estimated_plan_case(
      "stories15M antidiagonal", stories_path(), story_ids(449),
      test::cycled_policy(
          cfg,
          {HeadPattern::block_sparse(3, 0.9, 8), HeadPattern::block_sparse(3),
           HeadPattern::vertical_slash(60, 120), HeadPattern::block_sparse(4, 0, 16)},
          64));
}

// KV gathered to rank 0 and decoded there: the greedy ids equal the single process's.
TEST(DistEngine, StoriesGreedyDecode) {
  MPREFILL_SKIP_IF_MISSING(stories_path());
  constexpr int kSteps = 16;
  auto c = world();
  const DistTopology topo = topology(*c);
  const ModelConfig cfg0 = named_shape("stories15m");
  const std::vector<int> ids = story_ids(449);
  const SparsePolicy policy = budget_mix(cfg0, 64, 64, 120, 3);
  const Reference ref = reference(*c, stories_path(), ids, policy, kSteps);
  DistEngine de(c.get(), stories_path(), topo);
  const ModelConfig& cfg = de.config();
  const int64_t n = static_cast<int64_t>(ids.size());
  KvCache local(cfg, n);
  KvCacheSink sink(&local, cfg.head_dim);
  PrefillPlan plan = ref.plan;
  const DistRun r = dist_run(de, ids, policy, &sink, &plan);
  bool ok = true;
  KvCache full(cfg, n + kSteps);
  gather_kv_cache(*c, sink, 0, n, c->rank() == 0 ? &full : nullptr);
  if (c->rank() == 0) {
    const ModelWeights w = load_model(stories_path());
    Engine eng(w);
    std::vector<int> got;
    std::vector<float> lg = r.res.logits;
    for (int s = 0; s <= kSteps; ++s) {
      const int id = static_cast<int>(std::max_element(lg.begin(), lg.end()) - lg.begin());
      got.push_back(id);
      if (s < kSteps) lg = eng.decode_step(id, n + s, &full);
    }
    EXPECT_EQ(got, ref.greedy);
    ok = got == ref.greedy;
    std::printf(
        "[ stories15M greedy ] %d ids identical after a distributed prefill of %lld tokens\n",
        ok ? kSteps + 1 : 0, static_cast<long long>(n));
  }
  print_balance("stories15M greedy", r, ref, c->rank(), topo);
  expect_all_ranks_ok(*c, ok);
}

// A topology that does not fit the world or the model fails on every rank with one clear
// message (before any communication, so no rank hangs).
TEST(DistEngine, BadTopologyIsAClearError) {
  auto c = world();
  auto expect_error = [&](DistTopology t, const std::string& needle) {
    try {
      DistEngine de(c.get(), "random:tiny:7", t);
      ADD_FAILURE() << "tp " << t.tp << " x sp " << t.sp << " was accepted";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error({c->size(), 2}, "needs");                                   // size mismatch
  if (c->size() == 3) expect_error({3, 1}, "must divide the 2 KV heads");  // tiny: 2 kv heads
  expect_error({0, c->size()}, "must be >= 1");
  expect_all_ranks_ok(*c, !testing::Test::HasFailure());
}

}  // namespace
}  // namespace mprefill
