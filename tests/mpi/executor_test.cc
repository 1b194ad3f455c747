// The executor contract (engine/executor.h) under mpirun: make_executor() on every rank,
// the CPU backend at every tp x sp of the world (1 rank: tp 1 x sp 1) against the
// single-process Engine (logits, the gathered KV cache), progress on every rank after
// every layer, a throwing progress stopping the prefill, and the refusals that live in
// check_request() / make_executor(). MPREFILL_TEST_TP sets tp (sp = ranks / tp).
#include "engine/executor.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kv/kv_cache_sink.h"
#include "model/weights.h"
#include "tests/mpi/mpi_testutil.h"

namespace mprefill {
namespace {

using test::mpi::env_tp;
using test::mpi::expect_all_ranks_ok;
using test::mpi::world;

constexpr const char* kModel = "random:tiny:7";

std::vector<int> random_ids(int64_t n, int vocab, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<int> ids(n);
  for (auto& x : ids) x = d(g);
  return ids;
}

ExecutorSpec cpu_spec(int ranks) {
  ExecutorSpec s;
  s.backend = Backend::kCpu;
  s.model = kModel;
  s.topo.tp = env_tp();
  s.topo.sp = ranks / s.topo.tp;
  return s;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b, size_t n) {
  double d = 0;
  for (size_t i = 0; i < n; ++i) d = std::max(d, static_cast<double>(std::fabs(a[i] - b[i])));
  return d;
}
double max_abs(const std::vector<float>& a, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, static_cast<double>(std::fabs(a[i])));
  return m;
}

// A 200-token prompt (not a multiple of the 64-token block) through the executor equals
// the single-process Engine: logits on every rank, the KV gathered on rank 0.
TEST(Executor, CpuEqualsSingleProcessEngine) {
  auto c = world();
  const ExecutorSpec spec = cpu_spec(c->size());
  std::unique_ptr<Executor> ex = make_executor(spec, c.get());
  ASSERT_EQ(ex->backend(), Backend::kCpu);
  EXPECT_STREQ(ex->name(), "cpu-dist");
  EXPECT_EQ(ex->topology().tp * ex->topology().sp, c->size());
  const ModelConfig& cfg = ex->config();
  const int64_t n = 200;
  const std::vector<int> ids = random_ids(n, cfg.vocab, 11);

  KvCache mine(cfg, n);
  KvCacheSink sink(&mine, cfg.head_dim);
  std::vector<int> layers_seen;
  PrefillRequest req;
  req.ids = &ids;
  req.progress = [&](int layer, int n_layers) {
    EXPECT_EQ(n_layers, cfg.n_layers);
    layers_seen.push_back(layer);
  };
  const PrefillResult r = ex->prefill(req, &sink);
  EXPECT_EQ(r.tokens, n);
  EXPECT_TRUE(r.all_dense);
  EXPECT_TRUE(r.measured);
  EXPECT_EQ(r.kv_dtype, DType::kF32);
  EXPECT_GT(r.kv_bytes_exported, 0);
  EXPECT_EQ(static_cast<int>(r.sp_layout.size()), spec.topo.sp);
  std::vector<int> expect_layers(cfg.n_layers);
  for (int l = 0; l < cfg.n_layers; ++l) expect_layers[l] = l;
  EXPECT_EQ(layers_seen, expect_layers) << "progress once per layer, in order, on every rank";

  KvCache gathered(cfg, n);
  gather_kv_cache(*c, sink, 0, n, c->rank() == 0 ? &gathered : nullptr);

  const ModelWeights w = load_model(kModel);
  Engine eng(w);
  KvCache ref(cfg, n);
  const std::vector<float> ref_logits = eng.prefill(ids, SparsePolicy::dense(), &ref);
  bool ok = r.logits.size() == ref_logits.size();
  if (ok) {
    const double d = max_abs_diff(r.logits, ref_logits, ref_logits.size());
    ok = d <= 1e-4 * max_abs(ref_logits, ref_logits.size());
    EXPECT_TRUE(ok) << "rank " << c->rank() << ": logits max|diff| " << d;
  }
  if (c->rank() == 0) {
    const size_t cells = static_cast<size_t>(n) * cfg.kv_dim();
    for (int l = 0; l < cfg.n_layers; ++l) {
      const double dk = max_abs_diff(gathered.k[l], ref.k[l], cells);
      const double dv = max_abs_diff(gathered.v[l], ref.v[l], cells);
      const bool lok =
          dk <= 1e-4 * max_abs(ref.k[l], cells) && dv <= 1e-4 * max_abs(ref.v[l], cells);
      EXPECT_TRUE(lok) << "layer " << l << ": K max|diff| " << dk << ", V " << dv;
      ok = ok && lok;
    }
  }
  expect_all_ranks_ok(*c, ok);
}

// PrefillRequest::sp_layout (the coordinator's plan) is the layout the CPU backend runs:
// at sp 2 a balanced interleaving that is not the zigzag (18 causal tiles per rank) runs
// as given with the zigzag's logits; an unbalanced one (contiguous halves, 10 vs 26
// tiles) is replaced by the sparse-aware re-balance, which the result reports.
TEST(Executor, CpuRunsTheGivenTokenLayout) {
  auto c = world();
  const ExecutorSpec spec = cpu_spec(c->size());
  std::unique_ptr<Executor> ex = make_executor(spec, c.get());
  const int sp = spec.topo.sp;
  const int64_t n = 512;
  const std::vector<int> ids = random_ids(n, ex->config().vocab, 5);
  PrefillRequest req;
  req.ids = &ids;
  const PrefillResult base = ex->prefill(req, nullptr);
  const std::vector<TokenRanges> given =
      sp == 2 ? std::vector<TokenRanges>{{{0, 64}, {128, 192}, {320, 384}, {448, 512}},
                                         {{64, 128}, {192, 320}, {384, 448}}}
              : plan_sequence_parallel(n, sp);
  req.sp_layout = given;
  const PrefillResult r = ex->prefill(req, nullptr);
  EXPECT_EQ(r.sp_layout, given);
  EXPECT_FALSE(r.sp_rebalanced);
  bool ok = r.logits.size() == base.logits.size() &&
            max_abs_diff(r.logits, base.logits, base.logits.size()) <=
                1e-4 * max_abs(base.logits, base.logits.size());
  EXPECT_TRUE(ok) << "rank " << c->rank() << ": the given layout changed the logits";
  if (sp == 2) {
    req.sp_layout = {{{0, 256}}, {{256, 512}}};
    const PrefillResult rb = ex->prefill(req, nullptr);
    EXPECT_TRUE(rb.sp_rebalanced);
    EXPECT_NEAR(rb.sp_imbalance_planned, 26.0 / 18.0, 1e-6);
    EXPECT_NE(rb.sp_layout, req.sp_layout);
    EXPECT_NO_THROW(check_sp_layout(rb.sp_layout, n, sp));
    ok = ok && rb.sp_rebalanced;
  }
  expect_all_ranks_ok(*c, ok);
}

// The coordinator's KV-head placement runs as given (tiny: 4 layers, 2 KV heads): at tp 2
// the heads of layers 1 and 3 swapped between the ranks give the contiguous placement's
// logits and KV, the result names the placement and that slices moved; the same placement
// again moves nothing; back to contiguous moves them back. At tp 1 the one placement runs.
TEST(Executor, CpuRunsTheGivenTpPlacement) {
  auto c = world();
  const ExecutorSpec spec = cpu_spec(c->size());
  std::unique_ptr<Executor> ex = make_executor(spec, c.get());
  ASSERT_TRUE(ex->caps().any_tp_placement);
  const ModelConfig& cfg = ex->config();
  const int tp = spec.topo.tp;
  const int64_t n = 300;
  const std::vector<int> ids = random_ids(n, cfg.vocab, 9);
  const TpPlan contiguous = contiguous_tensor_parallel(cfg, SparsePolicy::dense(), n, tp);
  KvCache base_kv(cfg, n), moved_kv(cfg, n);
  KvCacheSink base_sink(&base_kv, cfg.head_dim), moved_sink(&moved_kv, cfg.head_dim);
  PrefillRequest req;
  req.ids = &ids;
  req.tp_placement = contiguous;
  const PrefillResult base = ex->prefill(req, &base_sink);
  EXPECT_FALSE(base.tp_replaced);  // loaded contiguous
  EXPECT_EQ(base.tp_placement.kv_heads, contiguous.kv_heads);
  TpPlan swapped = contiguous;
  if (tp == 2)
    for (int l : {1, 3}) std::swap(swapped.kv_heads[l][0], swapped.kv_heads[l][1]);
  req.tp_placement = swapped;
  const PrefillResult r = ex->prefill(req, &moved_sink);
  EXPECT_EQ(r.tp_placement.kv_heads, swapped.kv_heads);
  EXPECT_EQ(r.tp_replaced, tp == 2);
  bool ok = r.logits.size() == base.logits.size() &&
            max_abs_diff(r.logits, base.logits, base.logits.size()) <=
                1e-4 * max_abs(base.logits, base.logits.size());
  EXPECT_TRUE(ok) << "rank " << c->rank() << ": the given placement changed the logits";
  // This rank exported the KV heads the placement gave it, and the gathered caches of the
  // two runs are the same.
  const int tp_rank = c->rank() % tp;
  int pieces = 0;
  for (const KvPiece& p : moved_sink.pieces()) {
    ++pieces;
    EXPECT_EQ(p.kv_heads, swapped.kv_heads[p.layer][tp_rank]) << "layer " << p.layer;
    ok = ok && p.kv_heads == swapped.kv_heads[p.layer][tp_rank];
  }
  EXPECT_GT(pieces, 0);
  KvCache g_base(cfg, n), g_moved(cfg, n);
  gather_kv_cache(*c, base_sink, 0, n, c->rank() == 0 ? &g_base : nullptr);
  gather_kv_cache(*c, moved_sink, 0, n, c->rank() == 0 ? &g_moved : nullptr);
  if (c->rank() == 0) {
    const size_t cells = static_cast<size_t>(n) * g_base.kv_dim;
    for (int l = 0; l < cfg.n_layers; ++l) {
      const double dk = max_abs_diff(g_moved.k[l], g_base.k[l], cells);
      const double dv = max_abs_diff(g_moved.v[l], g_base.v[l], cells);
      EXPECT_LE(dk, 1e-4 * max_abs(g_base.k[l], cells)) << "layer " << l;
      EXPECT_LE(dv, 1e-4 * max_abs(g_base.v[l], cells)) << "layer " << l;
      ok = ok && dk <= 1e-4 * max_abs(g_base.k[l], cells) &&
           dv <= 1e-4 * max_abs(g_base.v[l], cells);
    }
  }
  ok = ok && pieces > 0;
  const PrefillResult again = ex->prefill(req, nullptr);
  EXPECT_FALSE(again.tp_replaced);
  req.tp_placement = contiguous;
  const PrefillResult back = ex->prefill(req, nullptr);
  EXPECT_EQ(back.tp_replaced, tp == 2);
  EXPECT_EQ(back.tp_placement.kv_heads, contiguous.kv_heads);
  expect_all_ranks_ok(*c, ok);
}

// A progress that throws at layer 1 on every rank stops the CPU prefill there: no
// layer after it reaches the sink, and the exception reaches the caller.
TEST(Executor, ThrowingProgressStopsTheCpuPrefill) {
  auto c = world();
  std::unique_ptr<Executor> ex = make_executor(cpu_spec(c->size()), c.get());
  ASSERT_TRUE(ex->caps().abort_mid_prefill);
  const ModelConfig& cfg = ex->config();
  ASSERT_GE(cfg.n_layers, 3);
  const std::vector<int> ids = random_ids(130, cfg.vocab, 5);
  KvCache mine(cfg, 130);
  KvCacheSink sink(&mine, cfg.head_dim);
  PrefillRequest req;
  req.ids = &ids;
  req.progress = [](int layer, int) {
    if (layer == 1) throw std::runtime_error("stop at layer 1");
  };
  bool threw = false;
  try {
    ex->prefill(req, &sink);
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()).find("stop at layer 1") != std::string::npos;
  }
  EXPECT_TRUE(threw);
  int max_layer = -1;
  for (const KvPiece& p : sink.pieces()) max_layer = std::max(max_layer, p.layer);
  EXPECT_EQ(max_layer, 1) << "no layer after the throwing progress was exported";
  expect_all_ranks_ok(*c, threw && max_layer == 1);
}

// An executor whose caps lack a feature: check_request refuses it with one message that
// names the executor and the feature.
class NoFeatures final : public Executor {
 public:
  const ModelConfig& config() const override { return cfg; }
  DistTopology topology() const override { return topo; }
  int rank() const override { return 3; }
  Backend backend() const override { return Backend::kCuda; }
  ExecutorCaps caps() const override { return {}; }
  const char* name() const override { return "bare"; }
  PrefillResult prefill(const PrefillRequest& req, KvSink*) override {
    check_request(*this, req);
    return {};
  }

  ModelConfig cfg;
  DistTopology topo;
};

TEST(Executor, RefusalsComeFromOnePlace) {
  auto c = world();
  NoFeatures bare;
  const std::vector<int> ids = {1, 2, 3};
  PrefillRequest req;
  EXPECT_THROW(
      {
        try {
          bare.prefill(req, nullptr);
        } catch (const std::runtime_error& e) {
          EXPECT_NE(std::string(e.what()).find("has no prompt ids"), std::string::npos) << e.what();
          throw;
        }
      },
      std::runtime_error);
  req.ids = &ids;
  req.audit.heads_per_layer = 2;
  try {
    bare.prefill(req, nullptr);
    ADD_FAILURE() << "an audit request passed an executor without the audit";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("bare executor (rank 3): the head audit"),
              std::string::npos)
        << e.what();
  }
  req.audit = {};
  EXPECT_NO_THROW(bare.prefill(req, nullptr));

  // A token layout (the coordinator's plan): checked against the prompt and sp; one
  // other than the zigzag is refused by a backend without caps.sp_layout (the CUDA ones).
  const std::vector<int> ids512(512, 1);
  req.ids = &ids512;
  bare.topo = {1, 2};
  req.sp_layout = plan_sequence_parallel(512, 2);
  EXPECT_NO_THROW(bare.prefill(req, nullptr));
  req.sp_layout = {{{0, 64}, {128, 192}, {320, 384}, {448, 512}},
                   {{64, 128}, {192, 320}, {384, 448}}};
  try {
    bare.prefill(req, nullptr);
    ADD_FAILURE() << "a non-zigzag layout passed an executor without caps.sp_layout";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "bare executor (rank 3): a token layout other than the zigzag split"),
              std::string::npos)
        << e.what();
  }
  req.sp_layout = {{{0, 256}}};
  try {
    bare.prefill(req, nullptr);
    ADD_FAILURE() << "a layout of 1 shard passed an sp 2 executor";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("token layout for 512 tokens over sp 2: it has 1 sp "
                                         "shards"),
              std::string::npos)
        << e.what();
  }
  req.sp_layout.clear();

  // A KV-head placement (the coordinator's plan): checked against the model and tp; one
  // other than the contiguous placement is refused without caps.any_tp_placement.
  bare.cfg = load_model(kModel).config;  // 4 layers, 2 KV heads
  bare.topo = {2, 1};
  req.tp_placement = contiguous_tensor_parallel(bare.cfg, SparsePolicy::dense(), 512, 2);
  EXPECT_NO_THROW(bare.prefill(req, nullptr));
  std::swap(req.tp_placement.kv_heads[2][0], req.tp_placement.kv_heads[2][1]);
  try {
    bare.prefill(req, nullptr);
    ADD_FAILURE() << "a non-contiguous placement passed an executor without any_tp_placement";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("bare executor (rank 3): a KV-head placement other "
                                         "than the contiguous one is not supported"),
              std::string::npos)
        << e.what();
  }
  req.tp_placement.kv_heads[2][0] = {0};  // swapped: rank 1 holds KV head 0 too
  try {
    bare.prefill(req, nullptr);
    ADD_FAILURE() << "a placement with a KV head twice passed";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("bare executor (rank 3): KV-head placement over tp 2: "
                                         "layer 2: KV head 0 is placed twice"),
              std::string::npos)
        << e.what();
  }
  req.tp_placement = {};
  bare.cfg = {};
  req.ids = &ids;
  bare.topo = {};

  // Block-sparse heads the backend would have to estimate without the estimator
  // (caps.adaptive_blocks / antidiagonal_blocks): refused, unless the prompt runs dense or
  // the indices are given (check_policy, also the single-process paths' check).
  const ModelConfig mc = load_model(kModel).config;
  const std::vector<int> ids300(300, 1);
  const SparsePolicy adaptive = SparsePolicy::uniform(mc, HeadPattern::block_sparse(4, 0.9), 0);
  const SparsePolicy antidiag = SparsePolicy::uniform(mc, HeadPattern::block_sparse(4, 0, 8), 0);
  req.ids = &ids300;
  for (const auto& [pol, what] :
       {std::pair{&adaptive, "adaptive block-sparse heads (tau) are not supported"},
        std::pair{&antidiag, "antidiagonal block scores (stride) are not supported"}}) {
    req.policy = pol;
    try {
      bare.prefill(req, nullptr);
      ADD_FAILURE() << what << ": passed an executor without the estimator";
    } catch (const std::runtime_error& e) {
      const std::string m = e.what();
      EXPECT_EQ(m.rfind("bare executor (rank 3): sparse policy ", 0), 0u) << m;
      EXPECT_NE(m.find(what), std::string::npos) << m;
    }
  }
  const SparsePolicy late =
      SparsePolicy::uniform(mc, HeadPattern::block_sparse(4, 0.9), /*dense_below=*/301);
  req.policy = &late;
  EXPECT_NO_THROW(bare.prefill(req, nullptr));
  req.policy = nullptr;
  req.ids = &ids;
  PrefillPlan given;
  given.seq_len = 300;
  given.layers.assign(mc.n_layers, std::vector<HeadPlan>(mc.n_heads));
  for (auto& layer : given.layers)
    for (HeadPlan& hp : layer) hp = {PatternKind::kBlockSparse, {}, 1, {0}};
  EXPECT_NO_THROW(check_policy(ExecutorCaps{}, adaptive, 300, &given, "x: "));
  given.layers.back().back().blocks.clear();  // one head left to estimate
  EXPECT_THROW(check_policy(ExecutorCaps{}, adaptive, 300, &given, "x: "), std::runtime_error);

  // A topology that does not match the group, and a bad backend name.
  ExecutorSpec bad = cpu_spec(c->size());
  bad.topo.sp += 1;
  try {
    make_executor(bad, c.get());
    ADD_FAILURE() << "a topology larger than the group was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("the group has " + std::to_string(c->size())),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(parse_backend("gpu"), std::invalid_argument);
  EXPECT_EQ(parse_backend("cuda"), Backend::kCuda);

  // --device cuda on this machine: refused with one line naming the device flag (no CUDA
  // backend in the build, or no visible device) unless a GPU is really there.
  ExecutorSpec cuda = cpu_spec(c->size());
  cuda.backend = Backend::kCuda;
  const char* require = std::getenv("MPREFILL_REQUIRE_GPU");
  if (!require || std::string(require) != "1") {
    try {
      make_executor(cuda, c.get());
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("--device cuda"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace mprefill
