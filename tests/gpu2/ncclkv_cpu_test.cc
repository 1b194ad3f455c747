// The NCCL KV transport's CPU-visible contract (runs in CI, no GPU): a decoder that does
// not serve kv_transport "nccl" (no --device cuda) refuses a KV stream whose
// KvStreamHello carries an ncclUniqueId, with one clear error to the sender, and fails
// the job instead of waiting for pages.
#include <gtest/gtest.h>

#include <chrono>
#include <mutex>
#include <string>
#include <thread>

#include "decode/decoder.h"
#include "kv/kv_handoff.h"
#include "model/fingerprint.h"
#include "model/weights.h"
#include "proto/wire.h"

namespace mprefill {
namespace {

TEST(NcclKvCpu, DecoderWithoutNcclRefusesAnNcclStream) {
  const ModelWeights w = load_model("random:tiny:1");
  kv::ReceiverOptions ro;
  ro.contract = make_kv_contract(model_fingerprint(w, "random:tiny"));
  ro.capacity_bytes = uint64_t{64} << 20;
  std::mutex mu;
  std::string failed;
  kv::KvReceiver rx(ro, [&](uint64_t, const std::string& m) {
    std::lock_guard<std::mutex> lock(mu);
    failed = m;
  });
  v1::Expect e;
  e.set_job_id(7);
  e.set_prompt_tokens(16);
  e.set_n_layers(w.config.n_layers);
  e.set_senders(1);
  e.set_timeout_ms(5000);
  std::string why;
  ASSERT_TRUE(rx.expect(e, &why)) << why;

  auto conn = wire::Connection::connect("127.0.0.1", rx.port(), 5000);
  conn->client_handshake(v1::WORKER, "ncclkv-test", "", 5000);
  v1::Envelope env;
  auto* h = env.mutable_kv_hello();
  h->set_job_id(7);
  h->set_rank(0);
  *h->mutable_kv() = ro.contract;
  h->set_nccl_unique_id(std::string(128, '\x5a'));
  conn->send(env, 5000);

  // The job fails (DecodeFailed to its streams), then the stream is refused (Error).
  v1::Envelope ans;
  ASSERT_TRUE(conn->recv(&ans, 10000)) << "no answer to an NCCL KvStreamHello";
  ASSERT_TRUE(ans.has_error() || ans.has_decode_failed()) << ans.DebugString();
  const std::string msg = ans.has_error() ? ans.error().message() : ans.decode_failed().message();
  EXPECT_NE(msg.find("does not serve kv_transport nccl"), std::string::npos) << msg;
  EXPECT_FALSE(rx.wait_complete(7, &why));  // failed at once, not after the page timeout
  EXPECT_NE(why.find("kv_transport nccl"), std::string::npos) << why;
  // The failure callback runs on the receiver's thread, possibly after the frames went out.
  std::string seen;
  for (int i = 0; i < 500 && seen.empty(); ++i) {
    {
      std::lock_guard<std::mutex> lock(mu);
      seen = failed;
    }
    if (seen.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_NE(seen.find("nccl KV stream of rank 0 cannot be set up"), std::string::npos) << seen;
}

}  // namespace
}  // namespace mprefill
