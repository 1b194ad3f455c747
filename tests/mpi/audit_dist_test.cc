// The DistEngine's online audit (engine/audit.h) against the single-process Engine's
// under mpirun: same audited heads, recall and output errors on every rank, for a fixed
// plan and for the plan the ranks estimate. Topology from MPREFILL_TEST_TP (sp = ranks /
// tp), as tests/mpi/dist_engine_test.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "engine/audit.h"
#include "engine/dist_engine.h"
#include "engine/engine.h"
#include "tests/model_fixtures.h"
#include "tests/mpi/mpi_testutil.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

using test::mpi::env_tp;
using test::mpi::expect_all_ranks_ok;
using test::mpi::world;

std::vector<int> random_ids(int n, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int> ids(n);
  for (int& x : ids) x = static_cast<int>(g() % vocab);
  ids[0] = 1;
  return ids;
}

// Audits one prompt on the single process and over the world's ranks; every rank compares.
void audit_case(const std::string& model, const std::vector<int>& ids, bool fixed_plan) {
  auto c = world();
  const int tp = env_tp();
  ASSERT_EQ(c->size() % tp, 0);
  const ModelWeights w = load_model(model);
  const SparsePolicy pol =
      test::mixed_policy(w.config, HeadPattern::a_shape(16, 96),
                         HeadPattern::vertical_slash(24, 48), HeadPattern::block_sparse(2));
  AuditOptions ao;
  ao.heads_per_layer = 2;
  ao.query_blocks = 3;
  ao.seed = 4;

  Engine eng(w);
  KvCache cache(w.config, static_cast<int64_t>(ids.size()));
  PrefillPlan plan;
  PrefillStats ref;
  eng.prefill(ids, pol, &cache, &plan, &ref, ao);
  ASSERT_EQ(ref.audit.size(), static_cast<size_t>(w.config.n_layers * 2));

  DistEngine de(c.get(), model, DistTopology{tp, c->size() / tp});
  PrefillPlan dplan = fixed_plan ? plan : PrefillPlan{};
  const DistPrefillResult r = de.prefill(ids, pol, nullptr, &dplan, {}, ao);

  bool ok = r.stats.audit.size() == ref.audit.size();
  EXPECT_EQ(r.stats.audit.size(), ref.audit.size());
  double lowest = 1;
  for (size_t i = 0; ok && i < ref.audit.size(); ++i) {
    const HeadAuditResult &a = ref.audit[i], &b = r.stats.audit[i];
    const std::string at = "layer " + std::to_string(a.layer) + " head " + std::to_string(a.head);
    ok &= a.layer == b.layer && a.head == b.head && a.rows == b.rows &&
          a.pattern.kind == b.pattern.kind;
    // fp32 projections summed in another order (tp all-reduce) and sums merged over
    // shards: equal to ~1e-6.
    ok &= std::abs(a.recall - b.recall) <= 1e-5;
    ok &= std::abs(a.output_rel_error - b.output_rel_error) <= 1e-4 + 1e-3 * a.output_rel_error;
    ok &= std::abs(a.output_rel_error_fro - b.output_rel_error_fro) <=
          1e-4 + 1e-3 * a.output_rel_error_fro;
    EXPECT_TRUE(ok) << at << ": single recall " << a.recall << " error " << a.output_rel_error
                    << " rows " << a.rows << ", dist recall " << b.recall << " error "
                    << b.output_rel_error << " rows " << b.rows;
    ok &= b.recall >= 0 && b.recall <= 1;
    lowest = std::min(lowest, b.recall);
  }
  EXPECT_LT(lowest, 1.0) << "the small budgets lost no mass: the test cannot tell";
  ok &= lowest < 1.0;
  // Identical on every rank: rank 0's figures broadcast and compared bitwise.
  std::vector<double> mine;
  for (const HeadAuditResult& a : r.stats.audit) {
    mine.push_back(a.recall);
    mine.push_back(a.output_rel_error);
  }
  std::vector<double> zero = mine;
  ASSERT_EQ(c->broadcast(zero.data(), zero.size(), DType::kI64, 0, nullptr), Status::kOk);
  EXPECT_EQ(zero, mine) << "rank " << c->rank() << " differs from rank 0";
  ok &= zero == mine;
  expect_all_ranks_ok(*c, ok);
}

TEST(DistAudit, TinyFixedPlan) { audit_case("random:tiny:7", random_ids(900, 512, 5), true); }

TEST(DistAudit, TinyEstimatedPlan) { audit_case("random:tiny:8", random_ids(700, 512, 6), false); }

TEST(DistAudit, StoriesFixedPlan) {
  const std::string m = test::shared_dir() + "/models/stories15M/stories15M.bin";
  MPREFILL_SKIP_IF_MISSING(m);
  audit_case(m, random_ids(500, 32000, 7), true);
}

}  // namespace
}  // namespace mprefill
