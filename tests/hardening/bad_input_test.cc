// Bad input against the real mprefill-coordinator over 127.0.0.1 (issue 7): malformed,
// truncated and oversize frames, unknown message types, wrong protocol versions, messages
// of another role, invalid token ids, empty and over-limit prompts, bad options, a wrong
// model fingerprint. Each gets a clear Error to the sender (and a close where the stream
// can no longer be trusted), and the service keeps serving: a status request, and a good
// job once a worker group and a decoder are registered, succeed right after.
#include <gtest/gtest.h>

#include <climits>
#include <cmath>
#include <functional>
#include <thread>

#include "tests/hardening/harness.h"

namespace h = mprefill::hardening;
namespace v1 = ::mprefill::v1;
namespace wire = ::mprefill::wire;

namespace {

const char* kModel = "random:tiny:7";  // vocab 512, max_position 2^20

std::string le32(uint32_t v) {
  std::string s(4, '\0');
  for (int i = 0; i < 4; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

v1::Envelope env() {
  v1::Envelope e;
  e.set_version(wire::kProtocolVersion);
  return e;
}

// The server answers with Error{code} whose message contains `text`, then closes.
void expect_error_and_close(h::RawPeer& p, v1::ErrorCode code, const std::string& text,
                            const std::string& what) {
  v1::Error err;
  ASSERT_TRUE(p.next_error(&err, 5000)) << what << ": no Error frame";
  EXPECT_EQ(err.code(), code) << what << ": " << err.message();
  EXPECT_NE(err.message().find(text), std::string::npos) << what << ": " << err.message();
  EXPECT_EQ(err.message().find('\n'), std::string::npos) << what << ": one line";
  EXPECT_TRUE(p.closed_within(5000)) << what << ": connection not closed";
}

// A status request on a fresh connection succeeds.
void expect_serving(uint16_t port, const std::string& after) {
  try {
    h::Client c(port);
    (void)c.status();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "service not serving after " << after << ": " << e.what();
  }
}

// Submits on c and expects Error{code} containing text; the connection stays usable.
void expect_refused(h::Client& c, const v1::SubmitJob& job, v1::ErrorCode code,
                    const std::string& text, const std::string& what) {
  v1::JobAccepted acc;
  v1::Error err;
  ASSERT_FALSE(c.submit(job, &acc, &err)) << what << ": accepted as job " << acc.job_id();
  EXPECT_EQ(err.code(), code) << what << ": " << v1::ErrorCode_Name(err.code()) << " "
                              << err.message();
  EXPECT_NE(err.message().find(text), std::string::npos) << what << ": " << err.message();
  EXPECT_EQ(err.message().find('\n'), std::string::npos) << what;
  (void)c.status();  // same connection still served
}

}  // namespace

TEST(BadInput, FramesVersionsAndRolesWithoutWorkers) {
  const std::string dir = h::make_dir("frames");
  h::Coordinator co(dir, {});

  {  // Garbage instead of a frame: the first 4 bytes read as a length over the maximum.
    h::RawPeer p(co.port);
    p.send_bytes("GARBAGE GARBAGE GARBAGE\n");
    expect_error_and_close(p, v1::BAD_FRAME, "exceeds the maximum", "garbage");
  }
  expect_serving(co.port, "garbage");
  {  // Oversize length after a good hello: refused without buffering 4 GiB.
    h::RawPeer p(co.port);
    std::string why;
    ASSERT_TRUE(p.hello(v1::CLIENT, "oversize", "", &why)) << why;
    p.send_bytes(le32(0xfffffff0u) + std::string(1000, 'x'));
    expect_error_and_close(p, v1::BAD_FRAME, "exceeds the maximum", "oversize length");
  }
  expect_serving(co.port, "oversize frame");
  {  // Length 64 MiB + 1: just over the default maximum.
    h::RawPeer p(co.port);
    std::string why;
    ASSERT_TRUE(p.hello(v1::CLIENT, "limit", "", &why)) << why;
    p.send_bytes(le32(static_cast<uint32_t>(wire::kDefaultMaxFrame + 1)));
    expect_error_and_close(p, v1::BAD_FRAME, "exceeds the maximum", "max frame + 1");
  }
  {  // Unparsable envelope of a valid length.
    h::RawPeer p(co.port);
    std::string why;
    ASSERT_TRUE(p.hello(v1::CLIENT, "junk", "", &why)) << why;
    p.send_bytes(le32(12) + std::string(12, '\xff'));
    expect_error_and_close(p, v1::BAD_FRAME, "unparsable envelope", "unparsable");
  }
  {  // Empty envelope (version only, no oneof): an unknown message type.
    h::RawPeer p(co.port);
    std::string why;
    ASSERT_TRUE(p.hello(v1::CLIENT, "empty", "", &why)) << why;
    p.send(env());
    expect_error_and_close(p, v1::BAD_FRAME, "without a message", "empty oneof");
  }
  {  // A message of a future protocol: field 99 (unknown) only.
    h::RawPeer p(co.port);
    std::string why;
    ASSERT_TRUE(p.hello(v1::CLIENT, "future", "", &why)) << why;
    const std::string body = std::string("\x08\x01", 2) + "\x9a\x06\x03" + "abc";  // 99: "abc"
    p.send_bytes(le32(static_cast<uint32_t>(body.size())) + body);
    expect_error_and_close(p, v1::BAD_FRAME, "without a message", "unknown field");
  }
  {  // Envelope of protocol version 2.
    h::RawPeer p(co.port);
    v1::Envelope sh;
    ASSERT_EQ(p.next(&sh, 5000), h::RawPeer::Got::kFrame);
    v1::Envelope e;
    e.set_version(2);
    e.mutable_client_hello()->set_version(2);
    e.mutable_client_hello()->set_role(v1::CLIENT);
    p.send(e);
    expect_error_and_close(p, v1::BAD_VERSION, "protocol version 2", "envelope version 2");
  }
  {  // ClientHello announcing version 7 inside a version-1 envelope.
    h::RawPeer p(co.port);
    std::string why;
    EXPECT_FALSE(p.hello(v1::CLIENT, "v7", "", &why, 7));
    EXPECT_NE(why.find("BAD_VERSION"), std::string::npos) << why;
    EXPECT_TRUE(p.closed_within(5000));
  }
  {  // ClientHello without a role.
    h::RawPeer p(co.port);
    std::string why;
    EXPECT_FALSE(p.hello(v1::ROLE_UNSPECIFIED, "norole", "", &why));
    EXPECT_NE(why.find("BAD_FRAME"), std::string::npos) << why;
    EXPECT_TRUE(p.closed_within(5000));
  }
  {  // First frame is not a ClientHello.
    h::RawPeer p(co.port);
    v1::Envelope sh;
    ASSERT_EQ(p.next(&sh, 5000), h::RawPeer::Got::kFrame);
    auto e = env();
    e.mutable_status_request();
    p.send(e);
    expect_error_and_close(p, v1::BAD_FRAME, "not a ClientHello", "no hello");
  }
  {  // A client sending a worker group's message.
    h::RawPeer p(co.port);
    std::string why;
    ASSERT_TRUE(p.hello(v1::CLIENT, "role", "", &why)) << why;
    auto e = env();
    e.mutable_worker_done()->set_job_id(1);
    p.send(e);
    expect_error_and_close(p, v1::BAD_FRAME, "unexpected message 'worker_done'", "wrong role");
  }
  {  // A worker group that talks before registering.
    h::RawPeer p(co.port);
    std::string why;
    ASSERT_TRUE(p.hello(v1::WORKER, "early", "", &why)) << why;
    auto e = env();
    e.mutable_heartbeat()->set_seq(1);
    p.send(e);
    expect_error_and_close(p, v1::BAD_FRAME, "before WorkerRegister", "unregistered worker");
  }
  {  // A decoder that registers with a broken contract.
    h::RawPeer p(co.port);
    std::string why;
    ASSERT_TRUE(p.hello(v1::DECODER, "broken", "", &why)) << why;
    auto e = env();
    auto* r = e.mutable_decoder_register();
    r->set_name("broken");
    r->set_kv_port(40000);
    r->set_capacity_bytes(1 << 20);
    r->mutable_kv()->mutable_model()->set_n_layers(4);  // the rest of the shape missing
    p.send(e);
    expect_error_and_close(p, v1::MODEL_MISMATCH, "non-positive field", "broken contract");
  }
  {  // A truncated frame, then the peer goes away mid-frame.
    h::RawPeer p(co.port);
    std::string why;
    ASSERT_TRUE(p.hello(v1::CLIENT, "trunc", "", &why)) << why;
    auto e = env();
    *e.mutable_submit() = h::tiny_job(50, 1);
    const std::string f = wire::encode_frame(e);
    p.send_bytes(f.substr(0, f.size() / 2));
    p.close();
  }
  {  // A truncated hello and then silence: closed by the hello timeout (5 s).
    h::RawPeer p(co.port);
    v1::Envelope sh;
    ASSERT_EQ(p.next(&sh, 5000), h::RawPeer::Got::kFrame);
    p.send_bytes(le32(40) + "partial");
    EXPECT_TRUE(p.closed_within(9000)) << "a half hello must not hold the connection";
  }
  {  // No workers yet: a job is refused as UNAVAILABLE and the connection stays open.
    h::Client c(co.port);
    expect_refused(c, h::tiny_job(8, 1), v1::UNAVAILABLE, "no worker group", "no group");
  }
  expect_serving(co.port, "all bad frames");
  EXPECT_TRUE(co.proc->running()) << co.proc->log();
  const std::string log = co.proc->log();
  EXPECT_NE(log.find("bad frame"), std::string::npos) << log;
}

// Sizes whose product (layers x heads x head_dim x dtype x tokens) would overflow 64 bits,
// world sizes whose tp x sp overflows 32: one clear refusal each, no crash (issue 7).
TEST(BadInput, AbsurdNumbersInContractsAreRefused) {
  const std::string dir = h::make_dir("absurd");
  h::Coordinator co(dir, {});
  auto sane = [](v1::KvContract* kv) {
    auto* m = kv->mutable_model();
    m->set_name("absurd");
    m->set_n_layers(4);
    m->set_hidden(64);
    m->set_n_heads(4);
    m->set_n_kv_heads(2);
    m->set_head_dim(16);
    m->set_vocab(512);
    m->set_max_position(4096);
    kv->set_kv_dtype(v1::F32);
    kv->set_page_tokens(256);
    kv->set_layout("token_major");
  };
  struct Case {
    const char* what;
    std::function<void(v1::KvContract*)> edit;
    const char* text;
  };
  const std::vector<Case> cases = {
      {"2^31-1 layers", [](v1::KvContract* k) { k->mutable_model()->set_n_layers(INT32_MAX); },
       "n_layers 2147483647 exceeds the limit 4096"},
      {"huge head_dim", [](v1::KvContract* k) { k->mutable_model()->set_head_dim(1 << 30); },
       "head_dim 1073741824 exceeds"},
      {"max_position 2^62",
       [](v1::KvContract* k) { k->mutable_model()->set_max_position(int64_t{1} << 62); },
       "max_position 4611686018427387904 exceeds"},
      {"page_tokens 2^31-1", [](v1::KvContract* k) { k->set_page_tokens(INT32_MAX); },
       "page_tokens 2147483647 exceeds"},
      {"every field at its limit: 2^47 KV bytes per token",
       [](v1::KvContract* k) {
         auto* m = k->mutable_model();
         m->set_n_layers(4096);
         m->set_n_heads(65536);
         m->set_n_kv_heads(65536);
         m->set_head_dim(65536);
       },
       "KV bytes per token 140737488355328 exceeds"},
  };
  std::string why;
  for (const auto& c : cases)
    for (v1::Role role : {v1::DECODER, v1::WORKER}) {
      h::RawPeer p(co.port);
      ASSERT_TRUE(p.hello(role, "absurd", "", &why)) << why;
      auto e = env();
      v1::KvContract* kv = nullptr;
      if (role == v1::DECODER) {
        auto* r = e.mutable_decoder_register();
        r->set_name("absurd");
        r->set_kv_port(40000);
        r->set_capacity_bytes(UINT64_MAX);
        kv = r->mutable_kv();
      } else {
        auto* r = e.mutable_worker_register();
        r->set_group("absurd");
        r->set_world(1);
        r->set_tp(1);
        r->set_sp(1);
        r->add_ranks()->set_rank(0);
        kv = r->mutable_kv();
      }
      sane(kv);
      c.edit(kv);
      p.send(e);
      expect_error_and_close(p, v1::MODEL_MISMATCH, c.text, c.what);
    }
  {  // tp x sp = 2^32 wraps to 0 in 32 bits: a world of 0 must not pass.
    h::RawPeer p(co.port);
    ASSERT_TRUE(p.hello(v1::WORKER, "wrap", "", &why)) << why;
    auto e = env();
    auto* r = e.mutable_worker_register();
    r->set_group("wrap");
    r->set_world(0);
    r->set_tp(65536);
    r->set_sp(65536);
    sane(r->mutable_kv());
    p.send(e);
    expect_error_and_close(p, v1::INVALID_ARGUMENT, "world 0 != tp 65536 x sp 65536",
                           "tp x sp overflow");
  }
  expect_serving(co.port, "absurd contracts");
  EXPECT_TRUE(co.proc->running());
  EXPECT_EQ(h::Client(co.port).status().decoders_size(), 0);
}

TEST(BadInput, ManyIdleAndHalfOpenConnections) {
  const std::string dir = h::make_dir("idle");
  h::Coordinator co(dir, {});
  // 64 peers that connect and never say hello, 16 that send half a frame: all closed by
  // the hello timeout, none blocks the others.
  std::vector<std::unique_ptr<h::RawPeer>> peers;
  for (int i = 0; i < 64; ++i) peers.push_back(std::make_unique<h::RawPeer>(co.port));
  for (int i = 0; i < 16; ++i) {
    auto p = std::make_unique<h::RawPeer>(co.port);
    p->send_bytes(le32(1000) + std::string(300, 'a'));
    peers.push_back(std::move(p));
  }
  expect_serving(co.port, "80 idle connections");
  int closed = 0;
  for (auto& p : peers) closed += p->closed_within(9000) ? 1 : 0;
  EXPECT_EQ(closed, 80);
  expect_serving(co.port, "idle connections closed");
}

TEST(BadInput, ConnectionCapRefusesOneMoreAndKeepsServing) {
  const std::string dir = h::make_dir("cap");
  h::Coordinator co(dir, {"--max-connections", "8"});
  std::vector<std::unique_ptr<h::RawPeer>> peers;
  for (int i = 0; i < 8; ++i) {
    peers.push_back(std::make_unique<h::RawPeer>(co.port));
    std::string why;
    ASSERT_TRUE(peers.back()->hello(v1::CLIENT, "p" + std::to_string(i), "", &why)) << why;
  }
  // The ninth: one Error line, closed; a client on wire::Connection hears the reason.
  h::RawPeer extra(co.port);
  expect_error_and_close(extra, v1::RESOURCE_EXHAUSTED,
                         "too many connections: 8 open (--max-connections 8)", "ninth peer");
  try {
    h::Client c(co.port);
    ADD_FAILURE() << "a client got in over the cap";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("too many connections"), std::string::npos) << e.what();
  }
  // One leaves: the service takes a client again; the 8 held ones still work.
  peers.back()->close();
  peers.pop_back();
  bool served = false;
  const auto until = h::Clock::now() + std::chrono::seconds(10);
  while (!served && h::Clock::now() < until) {
    try {
      h::Client c(co.port);
      (void)c.status();
      served = true;
    } catch (const std::exception&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  EXPECT_TRUE(served) << co.proc->log();
  {
    auto e = env();
    e.mutable_status_request();
    peers[0]->send(e);
    v1::Envelope r;
    ASSERT_EQ(peers[0]->next(&r, 5000), h::RawPeer::Got::kFrame);
    EXPECT_TRUE(r.has_status_reply()) << r.ShortDebugString();
  }
  EXPECT_TRUE(h::file_contains(co.dir + "/coordinator.log", "connection refused: too many"))
      << co.proc->log();
  EXPECT_TRUE(co.proc->running());
}

TEST(BadInput, HalfFrameAfterTheHelloIsClosedAfterItsDeadline) {
  const std::string dir = h::make_dir("halfframe");
  h::Coordinator co(dir, {"--frame-timeout-ms", "1500"});
  std::string why;
  // A frame begun and stalled, by a client and by a peer claiming to be a worker.
  for (v1::Role role : {v1::CLIENT, v1::WORKER}) {
    h::RawPeer p(co.port);
    ASSERT_TRUE(p.hello(role, "staller", "", &why)) << why;
    const auto t0 = h::Clock::now();
    p.send_bytes(le32(200) + std::string(50, 'x'));
    expect_error_and_close(p, v1::BAD_FRAME, "frame not completed within 1500 ms", "stalled frame");
    const double s = std::chrono::duration<double>(h::Clock::now() - t0).count();
    EXPECT_GE(s, 1.4);
    EXPECT_LT(s, 5.0);
  }
  // Frames that complete in time, even in pieces and with pauses between frames longer
  // than the deadline, keep the connection.
  h::RawPeer ok(co.port);
  ASSERT_TRUE(ok.hello(v1::CLIENT, "patient", "", &why)) << why;
  auto e = env();
  e.mutable_status_request();
  const std::string frame = wire::encode_frame(e);
  for (int i = 0; i < 2; ++i) {
    ok.send_bytes(frame.substr(0, 3));
    std::this_thread::sleep_for(std::chrono::milliseconds(800));
    ok.send_bytes(frame.substr(3));
    v1::Envelope r;
    ASSERT_EQ(ok.next(&r, 5000), h::RawPeer::Got::kFrame) << "piece-wise frame " << i;
    EXPECT_TRUE(r.has_status_reply());
    std::this_thread::sleep_for(std::chrono::milliseconds(1800));
  }
  expect_serving(co.port, "stalled frames");
}

TEST(BadInput, MaxFrameFlagsBoundFramesAfterTheHello) {
  const std::string dir = h::make_dir("maxframe");
  h::Coordinator co(dir, {"--max-frame", "100000"});
  std::string why;
  {
    h::RawPeer p(co.port);
    ASSERT_TRUE(p.hello(v1::CLIENT, "big", "", &why)) << why;
    p.send_bytes(le32(100001) + std::string(1000, 'y'));
    expect_error_and_close(p, v1::BAD_FRAME, "exceeds the maximum of 100000", "--max-frame");
  }
  {
    h::Client c(co.port);  // just under the limit: parsed (and refused: no worker group)
    auto j = h::tiny_job(30000, 1);
    ASSERT_LT(j.ByteSizeLong() + 16, 100000u);
    expect_refused(c, j, v1::UNAVAILABLE, "no worker group", "a large frame under the limit");
  }
  // The decoder's KV port: a stranger's oversize frame before and after its hello.
  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", "", {"--max-frame", "1048576"});
  ASSERT_TRUE(h::wait_registered(co.port, "", 0, 1, 60000)) << dec->log();
  const std::string ep = h::Client(co.port).status().decoders(0).endpoint();
  const uint16_t kv_port = static_cast<uint16_t>(std::stoi(ep.substr(ep.rfind(':') + 1)));
  {
    h::RawPeer p(kv_port);
    p.send_bytes(le32(70000) + std::string(100, 'z'));  // over the 64 KiB pre-hello limit
    EXPECT_TRUE(p.closed_within(10000)) << "decoder kept an oversize pre-hello frame";
  }
  {
    h::RawPeer p(kv_port);
    ASSERT_TRUE(p.hello(v1::WORKER, "stranger", "", &why)) << why;
    p.send_bytes(le32(1048577) + std::string(100, 'z'));
    EXPECT_TRUE(p.closed_within(10000)) << "decoder kept a frame over --max-frame";
  }
  EXPECT_TRUE(dec->running()) << dec->log();
  EXPECT_TRUE(h::wait_registered(co.port, "", 0, 1, 5000));
  // A limit below one KV page cannot work: refused at start with the numbers.
  auto tiny = h::start_decoder(dir, co.addr(), kModel, "d-small", "", {"--max-frame", "2048"});
  int st = -1;
  ASSERT_TRUE(tiny->wait_exit(30000, &st));
  EXPECT_EQ(st, 1);
  EXPECT_TRUE(h::file_contains(tiny->log_path(), "smaller than one KV page")) << tiny->log();
  expect_serving(co.port, "oversize frames");
}

// A real decoder and a 1-rank worker group on random:tiny, a --max-prompt limit.
class BadJobs : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = h::make_dir("jobs");
    co_ = std::make_unique<h::Coordinator>(
        dir_, std::vector<std::string>{"--max-prompt", "4096", "--heartbeat-ms", "200"});
    dec_ = h::start_decoder(dir_, co_->addr(), kModel, "d0", "");
    wrk_ = h::start_workers(dir_, co_->addr(), kModel, 1, "g0", "");
    ASSERT_TRUE(h::wait_registered(co_->port, "", 1, 1, 90000))
        << co_->proc->log() << dec_->log() << wrk_->log();
  }
  void expect_good_job(const std::string& after) {
    h::Client c(co_->port);
    v1::JobAccepted acc;
    v1::Error err;
    ASSERT_TRUE(c.submit(h::tiny_job(40, 3), &acc, &err)) << after << ": " << err.message();
    v1::JobResult res;
    ASSERT_TRUE(c.wait_result(acc.job_id(), &res, &err, 60000))
        << after << ": " << err.message() << "\n"
        << co_->proc->log();
    EXPECT_EQ(res.state(), v1::DONE);
    EXPECT_EQ(res.generated_ids_size(), 4);
    EXPECT_EQ(res.prompt_tokens(), 40);
  }
  std::string dir_;
  std::unique_ptr<h::Coordinator> co_;
  std::unique_ptr<h::Proc> dec_, wrk_;
};

TEST_F(BadJobs, InvalidPromptsAndOptionsAreRefusedClearly) {
  h::Client c(co_->port);
  {
    auto j = h::tiny_job(10, 1);
    j.set_token_ids(3, 512);  // vocab is 512
    expect_refused(c, j, v1::INVALID_ARGUMENT, "token id 512 at position 3", "id = vocab");
    j.set_token_ids(3, -1);
    expect_refused(c, j, v1::INVALID_ARGUMENT, "token id -1 at position 3", "negative id");
  }
  expect_refused(c, h::tiny_job(0, 1), v1::INVALID_ARGUMENT, "prompt is empty", "empty prompt");
  expect_refused(c, h::tiny_job(4097, 1), v1::INVALID_ARGUMENT,
                 "prompt of 4097 tokens exceeds the limit of 4096", "over --max-prompt");
  {
    auto j = h::tiny_job(5, 1);
    j.set_text("hello");
    expect_refused(c, j, v1::INVALID_ARGUMENT, "not both", "ids and text");
    v1::SubmitJob t;
    t.set_text("no tokenizer here");
    expect_refused(c, t, v1::INVALID_ARGUMENT, "need a tokenizer", "text without tokenizer");
  }
  {
    auto j = h::tiny_job(5, -1);
    expect_refused(c, j, v1::INVALID_ARGUMENT, "decode_tokens must be >= 0", "negative decode");
    j = h::tiny_job(5, INT32_MAX);
    expect_refused(c, j, v1::INVALID_ARGUMENT, "exceeds the model's max_position",
                   "2^31-1 decoded tokens");
    j = h::tiny_job(5, 1);
    j.mutable_options()->mutable_sampling()->set_temperature(-1.f);
    expect_refused(c, j, v1::INVALID_ARGUMENT, "temperature", "negative temperature");
    j = h::tiny_job(5, 1);
    j.mutable_options()->mutable_sampling()->set_temperature(std::nanf(""));
    expect_refused(c, j, v1::INVALID_ARGUMENT, "temperature", "NaN temperature");
    j = h::tiny_job(5, 1);
    j.mutable_options()->mutable_sampling()->set_top_p(2.f);
    expect_refused(c, j, v1::INVALID_ARGUMENT, "top_p", "top_p 2");
    j = h::tiny_job(5, 1);
    j.mutable_options()->add_stop_ids(100000);
    expect_refused(c, j, v1::INVALID_ARGUMENT, "stop id 100000", "stop id");
    j = h::tiny_job(5, 1);
    j.mutable_options()->set_kv_transport("udp");
    expect_refused(c, j, v1::INVALID_ARGUMENT, "kv_transport", "transport");
    j = h::tiny_job(5, 1);
    j.mutable_options()->set_group("nope");
    expect_refused(c, j, v1::INVALID_ARGUMENT, "no worker group named 'nope'", "group");
    j = h::tiny_job(5, 1);
    j.mutable_options()->set_decoder("nope");
    expect_refused(c, j, v1::INVALID_ARGUMENT, "no decoder named 'nope'", "decoder");
    j = h::tiny_job(5, 1);
    j.mutable_options()->set_audit_heads(99);
    expect_refused(c, j, v1::INVALID_ARGUMENT, "audit_heads", "audit heads");
    j = h::tiny_job(5, 1);
    j.mutable_options()->set_sparse("/nonexistent/config.json");
    expect_refused(c, j, v1::INVALID_ARGUMENT, "not a built-in (dense, auto) nor a config name",
                   "sparse config path");
    j = h::tiny_job(5, 1);
    j.set_model("stories15M");
    expect_refused(c, j, v1::MODEL_MISMATCH, "runs 'random:tiny:7'", "model name");
  }
  // Cancel and status of unknown jobs: NOT_FOUND, connection kept.
  {
    auto e = env();
    e.mutable_cancel()->set_job_id(987654);
    c.conn().send(e, 5000);
    v1::Envelope r;
    ASSERT_TRUE(c.conn().recv(&r, 5000));
    ASSERT_TRUE(r.has_error());
    EXPECT_EQ(r.error().code(), v1::NOT_FOUND);
    EXPECT_THROW(c.status(987654), std::runtime_error);
  }
  expect_good_job("invalid prompts");
}

TEST_F(BadJobs, WrongModelFingerprintIsRefused) {
  // A decoder and a worker group of other weights (same shape, other seed).
  auto bad_dec = h::start_decoder(dir_, co_->addr(), "random:tiny:8", "d-bad", "");
  int st = -1;
  ASSERT_TRUE(bad_dec->wait_exit(60000, &st)) << "mismatched decoder kept running";
  EXPECT_NE(st, 0);
  EXPECT_TRUE(h::file_contains(bad_dec->log_path(), "KV contract differs")) << bad_dec->log();
  auto bad_wrk = h::start_workers(dir_, co_->addr(), "random:tiny:8", 1, "g-bad", "");
  ASSERT_TRUE(bad_wrk->wait_exit(90000, &st)) << "mismatched worker group kept running";
  EXPECT_NE(st, 0);
  EXPECT_TRUE(h::file_contains(bad_wrk->log_path(), "KV contract differs")) << bad_wrk->log();
  // Another page size is another KV contract.
  auto bad_pages =
      h::start_decoder(dir_, co_->addr(), kModel, "d-pages", "", {"--page-tokens", "64"});
  ASSERT_TRUE(bad_pages->wait_exit(60000, &st));
  EXPECT_NE(st, 0);
  EXPECT_TRUE(h::file_contains(bad_pages->log_path(), "page_tokens")) << bad_pages->log();
  const std::string clog = co_->proc->log();
  EXPECT_NE(clog.find("refused"), std::string::npos) << clog;
  // A second decoder with a taken name is refused too.
  auto dup = h::start_decoder(dir_, co_->addr(), kModel, "d0", "");
  ASSERT_TRUE(dup->wait_exit(60000, &st));
  EXPECT_NE(st, 0);
  EXPECT_TRUE(h::file_contains(dup->log_path(), "already registered")) << dup->log();
  // The registered ones are untouched.
  h::Client c(co_->port);
  const auto s = c.status();
  ASSERT_EQ(s.groups_size(), 1);
  ASSERT_EQ(s.decoders_size(), 1);
  EXPECT_EQ(s.groups(0).name(), "g0");
  EXPECT_EQ(s.decoders(0).name(), "d0");
  expect_good_job("mismatched registrations");
}
