// DistEngine ranks hand their KV off over TCP to a KvReceiver (the decoder's store, run by
// rank 0 in this process), under mpirun: the store holds the single-process Engine's KV
// for the same prompt and indices (max|diff| <= 1e-4 max|ref| per layer), whatever the
// tp x sp split; a decoder that is gone fails every rank's handoff, boundedly. The
// topology comes from MPREFILL_TEST_TP (sp = ranks / tp).
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <random>

#include "comm/mpi_comm.h"
#include "decode/decoder.h"
#include "engine/dist_engine.h"
#include "engine/engine.h"
#include "kv/kv_handoff.h"
#include "kv/kv_transport.h"
#include "model/fingerprint.h"
#include "tests/model_fixtures.h"
#include "tests/mpi/mpi_testutil.h"

namespace mprefill {
namespace {

constexpr const char* kModel = "random:tiny:3";

using test::mpi::env_tp;
using test::mpi::expect_all_ranks_ok;
using test::mpi::world;

uint16_t bcast_port(comm::Communicator& c, uint16_t port) {
  int32_t p = port;
  EXPECT_EQ(c.broadcast(&p, 1, DType::kI32, 0, nullptr), Status::kOk) << c.last_error();
  return static_cast<uint16_t>(p);
}

TEST(DistHandoff, DecoderStoreHoldsTheEngineKv) {
  auto c = world();
  const int tp = env_tp(), n_ranks = c->size();
  ASSERT_EQ(n_ranks % tp, 0);
  const DistTopology topo{tp, n_ranks / tp};
  const int64_t n = 4099;  // 4K tokens, not a multiple of the page size nor of 2 sp
  std::vector<int> ids(n);
  std::mt19937 g(17);
  for (auto& x : ids) x = 3 + static_cast<int>(g() % 500);
  ids[0] = 1;

  // Rank 0: the full model (reference engine, fingerprint) and the decoder's receiver.
  std::unique_ptr<ModelWeights> w;
  std::unique_ptr<kv::KvReceiver> rx;
  v1::KvContract contract;
  uint16_t port = 0;
  if (c->rank() == 0) {
    w = std::make_unique<ModelWeights>(load_model(kModel));
    contract = make_kv_contract(model_fingerprint(*w, kModel), 64);
    kv::ReceiverOptions ro;
    ro.contract = contract;
    rx = std::make_unique<kv::KvReceiver>(ro, nullptr);
    v1::Expect e;
    e.set_job_id(1);
    e.set_prompt_tokens(n);
    e.set_n_layers(w->config.n_layers);
    e.set_senders(n_ranks);
    e.set_timeout_ms(30000);
    std::string why;
    ASSERT_TRUE(rx->expect(e, &why)) << why;
    port = rx->port();
  }
  port = bcast_port(*c, port);
  {  // every rank needs the contract for its KvStreamHello
    std::string bytes = contract.SerializeAsString();
    int32_t len = static_cast<int32_t>(bytes.size());
    ASSERT_EQ(c->broadcast(&len, 1, DType::kI32, 0, nullptr), Status::kOk);
    std::vector<int32_t> buf((len + 3) / 4);
    std::memcpy(buf.data(), bytes.data(), bytes.size() * (c->rank() == 0));
    ASSERT_EQ(c->broadcast(buf.data(), buf.size(), DType::kI32, 0, nullptr), Status::kOk);
    ASSERT_TRUE(contract.ParseFromArray(buf.data(), len));
  }

  DistEngine de(c.get(), kModel, topo);
  const SparsePolicy policy =
      test::mixed_policy(de.config(), HeadPattern::a_shape(64, 128),
                         HeadPattern::vertical_slash(60, 150), HeadPattern::block_sparse(4), 128);
  KvHandoffOptions ho;
  ho.job_id = 1;
  ho.rank = c->rank();
  ho.host = "127.0.0.1";
  ho.port = port;
  ho.contract = contract;
  ho.timeout_ms = 30000;
  ho.streams = 1 + c->rank() % 2;  // both single- and multi-stream ranks
  // Mixed staging: a 4 KiB buffer (every page frame larger: a buffer per page, grown) on odd
  // ranks, a few pages per buffer on rank 2, the default on the others.
  ho.staging_bytes = c->rank() % 2 ? 4096 : (c->rank() == 2 ? 64 << 10 : ho.staging_bytes);
  std::string err;
  PrefillPlan plan;  // estimated by the group, identical on every rank
  DistPrefillResult res;
  KvHandoffStats hs;
  try {
    auto sink = kv::make_sender("tcp", ho, kv::SenderSite{});
    EXPECT_EQ(sink->transport(), "tcp");
    res = de.prefill(ids, policy, sink.get(), &plan);  // calls sink->finish()
    hs = sink->stats();
  } catch (const std::exception& e) {
    err = e.what();
  }
  EXPECT_EQ(err, "") << "rank " << c->rank();
  EXPECT_EQ(hs.layers_acked, de.config().n_layers);
  EXPECT_EQ(static_cast<int64_t>(hs.bytes), res.kv_bytes_exported);
  EXPECT_GE(hs.kv_ready_ms, hs.last_put_ms);  // KV ready after the last layer left
  EXPECT_GT(hs.last_put_ms, 0.0);

  bool ok = err.empty();
  if (c->rank() == 0) {
    std::string why;
    EXPECT_TRUE(rx->wait_complete(1, &why)) << why;
    auto store = rx->store(1);
    ASSERT_TRUE(store);
    // The engine with the group's indices.
    Engine eng(*w);
    KvCache cache(w->config, n);
    const std::vector<float> logits = eng.prefill(ids, policy, &cache, &plan);
    const int64_t kvd = w->config.kv_dim();
    std::vector<float> k(n * kvd), v(n * kvd);
    for (int l = 0; l < w->config.n_layers; ++l) {
      store->export_layer(l, k.data(), v.data());
      for (const auto& [got, ref, name] :
           {std::tuple{&k, &cache.k[l], "K"}, std::tuple{&v, &cache.v[l], "V"}}) {
        double max_ref = 0, max_diff = 0;
        for (int64_t i = 0; i < n * kvd; ++i) {
          max_ref = std::max(max_ref, std::fabs(double((*ref)[i])));
          max_diff = std::max(max_diff, std::fabs(double((*got)[i]) - (*ref)[i]));
        }
        EXPECT_LE(max_diff, 1e-4 * max_ref) << name << " layer " << l;
        ok = ok && max_diff <= 1e-4 * max_ref;
      }
    }
    double max_ref = 0, max_diff = 0;
    for (size_t i = 0; i < logits.size(); ++i) {
      max_ref = std::max(max_ref, std::fabs(double(logits[i])));
      max_diff = std::max(max_diff, std::fabs(double(res.logits[i]) - logits[i]));
    }
    EXPECT_LE(max_diff, 1e-4 * max_ref) << "logits";
    EXPECT_EQ(rx->info(1).bytes, uint64_t(2 * n * kvd * 4 * w->config.n_layers));
    std::printf("[ handoff ] tp %d x sp %d: %.2f MB KV received, rank 0 sent for %.1f ms\n", tp,
                topo.sp, rx->info(1).bytes / 1e6, hs.send_ms);
  }
  expect_all_ranks_ok(*c, ok);
}

// The decoder vanishes before the job: every rank's handoff fails within its timeout
// with the decoder named, and the prefill still completes in step on every rank.
TEST(DistHandoff, VanishedDecoderFailsEveryRank) {
  auto c = world();
  const int tp = env_tp();
  const DistTopology topo{tp, c->size() / tp};
  uint16_t port = 0;
  std::unique_ptr<kv::KvReceiver> rx;
  DistEngine de(c.get(), kModel, topo);
  ModelFingerprint fp;
  fp.name = kModel;
  fp.n_layers = de.config().n_layers;
  fp.hidden = de.config().hidden;
  fp.n_heads = de.config().n_heads;
  fp.n_kv_heads = de.config().n_kv_heads;
  fp.head_dim = de.config().head_dim;
  fp.vocab = de.config().vocab;
  fp.weights_digest = "x";
  const v1::KvContract contract = make_kv_contract(fp, 64);
  if (c->rank() == 0) {
    kv::ReceiverOptions ro;
    ro.contract = contract;
    rx = std::make_unique<kv::KvReceiver>(ro, nullptr);
    v1::Expect e;
    e.set_job_id(2);
    e.set_prompt_tokens(300);
    e.set_n_layers(fp.n_layers);
    e.set_senders(c->size());
    std::string why;
    ASSERT_TRUE(rx->expect(e, &why)) << why;
    port = rx->port();
  }
  port = bcast_port(*c, port);
  KvHandoffOptions ho;
  ho.job_id = 2;
  ho.rank = c->rank();
  ho.host = "127.0.0.1";
  ho.port = port;
  ho.contract = contract;
  ho.timeout_ms = 2000;
  ho.defer_errors = true;  // as the worker service runs it
  std::string err;
  std::vector<int> ids(300, 7);
  ids[0] = 1;
  std::unique_ptr<TcpKvHandoff> sink;
  try {
    sink = std::make_unique<TcpKvHandoff>(ho);  // connected while the decoder is there
  } catch (const std::exception& e) {
    err = e.what();
  }
  ASSERT_EQ(err, "");
  expect_all_ranks_ok(*c, true);  // every rank connected
  rx.reset();                     // the decoder goes away
  expect_all_ranks_ok(*c, true);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    de.prefill(ids, SparsePolicy::dense(), sink.get());  // finish() throws the failure
  } catch (const std::exception& e) {
    err = e.what();
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const bool ok = err.find("KV handoff to decoder 127.0.0.1:") != std::string::npos &&
                  err.find("job 2, rank " + std::to_string(c->rank())) != std::string::npos &&
                  s < 30.0;
  EXPECT_TRUE(ok) << "rank " << c->rank() << " after " << s << " s: " << err;
  expect_all_ranks_ok(*c, ok);
}

}  // namespace
}  // namespace mprefill
