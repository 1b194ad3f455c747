// The decoder on real weights: stories15M KV, prefilled by the engine, handed off over
// TCP as a tp 2 x sp 2 group would send it (zigzag token shards, interleaved KV heads),
// decodes to exactly the ids of Engine::generate (greedy, sampled, stop ids); Expect
// admission, Release, and StartDecode for unknown jobs. Skips when ../shared is absent.
#include "decode/decoder.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "kv/kv_handoff.h"
#include "model/convert.h"
#include "model/tokenizer.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;

std::string model_dir() { return test::shared_dir() + "/models/stories15M"; }

// Envelopes the decoder sends to "the coordinator".
struct Outbox {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<v1::Envelope> q;
  void push(const v1::Envelope& e) {
    std::lock_guard<std::mutex> lock(mu);
    q.push_back(e);
    cv.notify_all();
  }
  // The next envelope within timeout_ms (heartbeats are not sent without serve()).
  bool pop(v1::Envelope* out, int timeout_ms = 30000) {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return !q.empty(); }))
      return false;
    *out = q.front();
    q.pop_front();
    return true;
  }
};

class DecoderTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!test::file_exists(model_dir() + "/stories15M.bin")) return;
    weights_ = new ModelWeights(load_model(model_dir() + "/stories15M.bin"));
    tokenizer_ = new Tokenizer(Tokenizer::load(model_dir() + "/tokenizer.bin", 32000));
  }
  static void TearDownTestSuite() {
    delete weights_;
    delete tokenizer_;
    weights_ = nullptr;
    tokenizer_ = nullptr;
  }
  void SetUp() override {
    if (!weights_) GTEST_SKIP() << test::missing_file(model_dir() + "/stories15M.bin");
    decode::DecoderOptions o;
    o.model_name = "stories15M";
    o.page_tokens = 16;  // several pages per shard at these prompt lengths
    o.receiver.capacity_bytes = uint64_t{64} << 20;
    decoder_ = std::make_unique<decode::Decoder>(*weights_, o,
                                                 [this](const v1::Envelope& e) { out_.push(e); });
  }

  // Prefill with the engine (fp32) and push the KV to the decoder as ranks of a tp x sp
  // group (fp32 slices: a bf16 contract rounds them at export).
  void hand_off(uint64_t job, const std::vector<int>& ids, int tp, int sp,
                const ModelWeights* w = nullptr, decode::Decoder* dec = nullptr) {
    if (!w) w = weights_;
    if (!dec) dec = decoder_.get();
    const ModelConfig& c = w->config;
    const int64_t n = static_cast<int64_t>(ids.size());
    Engine eng(*w);
    KvCache cache(c, n);
    eng.prefill(ids, SparsePolicy::dense(), &cache);
    std::vector<std::thread> ranks;
    std::vector<std::string> errors(tp * sp);
    for (int r = 0; r < tp * sp; ++r)
      ranks.emplace_back([&, r] {
        try {
          KvHandoffOptions ho;
          ho.job_id = job;
          ho.rank = r;
          ho.host = "127.0.0.1";
          ho.port = dec->kv_port();
          ho.contract = dec->contract();
          ho.timeout_ms = 10000;
          TcpKvHandoff h(ho);
          // Zigzag shard of sp rank r / tp; heads t, t + tp, ... of tp rank r % tp.
          const int s = r / tp, t = r % tp;
          std::vector<std::pair<int64_t, int64_t>> tok;
          for (int64_t ch : {int64_t{s}, int64_t{2 * sp - 1 - s}}) {
            const int64_t b = n * ch / (2 * sp), e = n * (ch + 1) / (2 * sp);
            if (e > b) tok.push_back({b, e});
          }
          std::vector<int> heads;
          for (int h2 = t; h2 < c.n_kv_heads; h2 += tp) heads.push_back(h2);
          for (int l = 0; l < c.n_layers; ++l) {
            std::vector<float> k, v;
            for (auto [b, e] : tok)
              for (int64_t i = b; i < e; ++i)
                for (int h2 : heads) {
                  const float* kr = cache.k[l].data() + (i * c.n_kv_heads + h2) * c.head_dim;
                  const float* vr = cache.v[l].data() + (i * c.n_kv_heads + h2) * c.head_dim;
                  k.insert(k.end(), kr, kr + c.head_dim);
                  v.insert(v.end(), vr, vr + c.head_dim);
                }
            KvSlice sl;
            sl.layer = l;
            sl.kv_heads = heads;
            sl.tokens = tok;
            sl.head_dim = c.head_dim;
            sl.k = k.data();
            sl.v = v.data();
            h.put(sl);
          }
          h.finish();
        } catch (const std::exception& e) {
          errors[r] = e.what();
        }
      });
    for (auto& th : ranks) th.join();
    for (int r = 0; r < tp * sp; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  }

  v1::Envelope expect(uint64_t job, int64_t n, int decode_tokens, const SamplerOptions& so,
                      std::vector<int> stop = {}) {
    v1::Envelope env;
    auto* e = env.mutable_expect();
    e->set_job_id(job);
    e->set_prompt_tokens(n);
    e->set_n_layers(weights_->config.n_layers);
    e->set_senders(4);
    e->set_decode_tokens(decode_tokens);
    e->mutable_sampling()->set_temperature(so.temperature);
    e->mutable_sampling()->set_top_p(so.top_p);
    e->mutable_sampling()->set_seed(so.seed);
    for (int s : stop) e->add_stop_ids(s);
    e->set_timeout_ms(10000);
    return env;
  }

  // The whole job through the decoder: Expect -> Ready, KV, StartDecode -> DecodeDone.
  v1::DecodeDone run_job(uint64_t job, const std::vector<int>& ids, int decode_tokens,
                         const SamplerOptions& so, std::vector<int> stop = {}) {
    decoder_->handle(expect(job, static_cast<int64_t>(ids.size()), decode_tokens, so, stop));
    v1::Envelope env;
    EXPECT_TRUE(out_.pop(&env));
    EXPECT_TRUE(env.has_ready()) << env.ShortDebugString();
    hand_off(job, ids, 2, 2);
    // The worker's first token: the same sampler, first draw (as Engine::generate).
    Engine eng(*weights_);
    KvCache cache(weights_->config, static_cast<int64_t>(ids.size()));
    const auto logits = eng.prefill(ids, SparsePolicy::dense(), &cache);
    Sampler sampler(so);
    const SampledToken first = sampler.sample(logits.data(), static_cast<int>(logits.size()));
    v1::Envelope start;
    start.mutable_start_decode()->set_job_id(job);
    start.mutable_start_decode()->set_first_token_id(first.id);
    start.mutable_start_decode()->set_first_token_logit(first.logit);
    decoder_->handle(start);
    EXPECT_TRUE(out_.pop(&env));  // the KV is complete: the coordinator's DECODING
    EXPECT_TRUE(env.has_decode_started()) << env.ShortDebugString();
    EXPECT_EQ(env.decode_started().job_id(), job);
    EXPECT_TRUE(out_.pop(&env));
    EXPECT_TRUE(env.has_decode_done()) << env.ShortDebugString();
    return env.decode_done();
  }

  static ModelWeights* weights_;
  static Tokenizer* tokenizer_;
  Outbox out_;
  std::unique_ptr<decode::Decoder> decoder_;
};

ModelWeights* DecoderTest::weights_ = nullptr;
Tokenizer* DecoderTest::tokenizer_ = nullptr;

TEST_F(DecoderTest, GreedyAndSampledMatchGenerate) {
  const std::vector<std::string> prompts = {
      "Once upon a time",
      "Lily and her brother found a big red ball in the park. They played with it all day, "
      "and when the sun went down they"};
  Engine eng(*weights_);
  uint64_t job = 1;
  for (const std::string& p : prompts)
    for (SamplerOptions so : {SamplerOptions{0.f, 1.f, 0}, SamplerOptions{0.9f, 0.95f, 42}}) {
      const std::vector<int> ids = tokenizer_->encode(p, true);
      GenerateOptions go;
      go.decode_steps = 16;
      go.sampler = so;
      const GenerateResult ref = eng.generate(ids, go);
      ASSERT_EQ(ref.generated_ids.size(), 17u);
      const v1::DecodeDone d = run_job(job++, ids, 16, so);
      const std::vector<int> got(d.generated_ids().begin(), d.generated_ids().end());
      EXPECT_EQ(got, ref.generated_ids) << "prompt '" << p << "' temperature " << so.temperature;
      EXPECT_EQ(d.stopped_by(), "length");
      EXPECT_EQ(d.kv_bytes_received(), uint64_t(2 * ids.size() * weights_->config.n_layers *
                                                weights_->config.kv_dim() * 4));
      EXPECT_GT(d.decode_ms(), 0);
    }
  EXPECT_EQ(decoder_->receiver().reserved_bytes(), 0u);
}

TEST_F(DecoderTest, StopIdEndsGeneration) {
  Engine eng(*weights_);
  const std::vector<int> ids = {1, 9038, 2501, 263, 931};  // "Once upon a time"
  GenerateOptions go;
  go.decode_steps = 16;
  const GenerateResult ref = eng.generate(ids, go);
  // The README's greedy continuation: 29892 727 471 263 2217 7826 4257 365.
  const std::vector<int> readme = {29892, 727, 471, 263, 2217, 7826, 4257, 365};
  ASSERT_TRUE(std::equal(readme.begin(), readme.end(), ref.generated_ids.begin()));
  const v1::DecodeDone d = run_job(9, ids, 16, {}, {2217});
  const std::vector<int> got(d.generated_ids().begin(), d.generated_ids().end());
  EXPECT_EQ(got, std::vector<int>(readme.begin(), readme.begin() + 5));
  EXPECT_EQ(d.stopped_by(), "stop_id");
}

TEST_F(DecoderTest, AdmissionReleaseAndUnknownJobs) {
  v1::Envelope env;
  // 64 MiB capacity; 100k tokens of stories15M KV need 1.3 GB.
  decoder_->handle(expect(20, 100000, 4, {}));
  ASSERT_TRUE(out_.pop(&env));
  ASSERT_TRUE(env.has_decode_failed());
  EXPECT_NE(env.decode_failed().message().find("bytes are free"), std::string::npos)
      << env.decode_failed().message();

  decoder_->handle(expect(21, 40, 4, {}));
  ASSERT_TRUE(out_.pop(&env));
  ASSERT_TRUE(env.has_ready());
  EXPECT_GT(decoder_->receiver().reserved_bytes(), 0u);
  v1::Envelope rel;
  rel.mutable_release()->set_job_id(21);
  decoder_->handle(rel);
  EXPECT_EQ(decoder_->receiver().reserved_bytes(), 0u);

  v1::Envelope start;
  start.mutable_start_decode()->set_job_id(22);
  start.mutable_start_decode()->set_first_token_id(5);
  decoder_->handle(start);
  ASSERT_TRUE(out_.pop(&env));
  ASSERT_TRUE(env.has_decode_failed());
  EXPECT_EQ(env.decode_failed().job_id(), 22u);
  EXPECT_NE(env.decode_failed().message().find("not expected"), std::string::npos);
}

// A bf16 model (stories15M converted to a bf16 HF directory): the contract says bf16, the
// pages cross in half the fp32 bytes, the decoder keeps bf16 and decodes exactly what an
// fp32-KV reference whose KV was rounded to bf16 gives; capacity counts bf16 bytes.
TEST_F(DecoderTest, Bf16ModelKeepsBf16Kv) {
  test::TempDir tmp;
  const std::string hf = tmp.path + "/stories_bf16";
  ConvertOptions co;
  co.dtype = DType::kBF16;
  convert_llama2c_to_hf(model_dir() + "/stories15M.bin", hf, co);
  const ModelWeights w = load_model(hf);
  ASSERT_EQ(w.stored_dtype, DType::kBF16);
  const ModelConfig& c = w.config;
  const std::vector<int> ids =
      tokenizer_->encode("Lily and her brother found a big red ball", true);
  const int64_t n = static_cast<int64_t>(ids.size());
  const uint64_t bf16_kv = uint64_t(2) * n * c.n_layers * c.kv_dim() * 2;
  decode::DecoderOptions o;
  o.model_name = "stories_bf16";
  o.page_tokens = 4;
  o.receiver.capacity_bytes = bf16_kv;  // this job in bf16, half of it in fp32
  Outbox out;
  decode::Decoder dec(w, o, [&](const v1::Envelope& e) { out.push(e); });
  ASSERT_EQ(dec.contract().kv_dtype(), v1::BF16);

  // Reference: the fp32 prefill's KV rounded to bf16, decoded greedily by the engine.
  Engine eng(w);
  KvCache f32(c, n);
  const std::vector<float> logits = eng.prefill(ids, SparsePolicy::dense(), &f32);
  Sampler sampler(SamplerOptions{});
  const int first = sampler.sample(logits.data(), static_cast<int>(logits.size())).id;
  KvCache b16 = round_to_bf16(f32, n + 16);
  EXPECT_EQ(b16.bytes(), uint64_t(2) * (n + 16) * c.n_layers * c.kv_dim() * 2);
  std::vector<int> want{first};
  for (int step = 0; step < 16; ++step) {
    const std::vector<float> lg = eng.decode_step(want.back(), n + step, &b16);
    want.push_back(sampler.sample(lg.data(), static_cast<int>(lg.size())).id);
  }

  v1::Envelope env = expect(60, n, 16, {});
  dec.handle(env);
  ASSERT_TRUE(out.pop(&env));
  ASSERT_TRUE(env.has_ready()) << env.ShortDebugString();
  EXPECT_EQ(dec.receiver().reserved_bytes(), bf16_kv);
  // Capacity is bf16 bytes: one more token does not fit, and the refusal names the bytes.
  dec.handle(expect(61, 1, 4, {}));
  ASSERT_TRUE(out.pop(&env));
  ASSERT_TRUE(env.has_decode_failed());
  const std::string msg = env.decode_failed().message();
  EXPECT_NE(msg.find(std::to_string(c.n_layers * c.kv_dim() * 2 * 2) + " bytes per token"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("bf16"), std::string::npos) << msg;
  EXPECT_NE(msg.find("0 of " + std::to_string(bf16_kv) + " bytes are free"), std::string::npos)
      << msg;

  hand_off(60, ids, 2, 2, &w, &dec);
  v1::Envelope start;
  start.mutable_start_decode()->set_job_id(60);
  start.mutable_start_decode()->set_first_token_id(first);
  dec.handle(start);
  ASSERT_TRUE(out.pop(&env));
  ASSERT_TRUE(env.has_decode_started()) << env.ShortDebugString();
  ASSERT_TRUE(out.pop(&env));
  ASSERT_TRUE(env.has_decode_done()) << env.ShortDebugString();
  const std::vector<int> got(env.decode_done().generated_ids().begin(),
                             env.decode_done().generated_ids().end());
  EXPECT_EQ(got, want);
  EXPECT_EQ(env.decode_done().kv_bytes_received(), bf16_kv);  // half of fp32's
  EXPECT_EQ(dec.receiver().reserved_bytes(), 0u);
}

// Absurd numbers from the coordinator: one clear DecodeFailed each, nothing reserved,
// and the decoder still takes a sane job (issue 7).
TEST_F(DecoderTest, AbsurdCountsAreRefusedWithoutOverflow) {
  v1::Envelope env;
  auto refused = [&](const v1::Envelope& in, const std::string& text) {
    decoder_->handle(in);
    ASSERT_TRUE(out_.pop(&env));
    ASSERT_TRUE(env.has_decode_failed()) << env.ShortDebugString();
    EXPECT_NE(env.decode_failed().message().find(text), std::string::npos)
        << env.decode_failed().message();
    EXPECT_EQ(decoder_->receiver().reserved_bytes(), 0u);
  };
  // 2^62 tokens x 9 KiB per token would wrap the 64-bit reservation to a small number.
  refused(expect(30, int64_t{1} << 62, 4, {}), "is absurd");
  refused(expect(31, INT64_MAX, 4, {}), "is absurd");
  // A reservation that does not wrap but cannot fit.
  refused(expect(32, int64_t{1} << 40, 4, {}), "bytes are free");
  refused(expect(33, 40, INT32_MAX, {}), "exceeds the model's max_position 256");
  std::string why;
  v1::Expect e = expect(34, int64_t{1} << 62, 4, {}).expect();
  EXPECT_FALSE(decoder_->receiver().expect(e, &why));
  EXPECT_NE(why.find("is absurd"), std::string::npos) << why;
  decoder_->handle(expect(35, 40, 4, {}));
  ASSERT_TRUE(out_.pop(&env));
  EXPECT_TRUE(env.has_ready()) << env.ShortDebugString();
}

}  // namespace
}  // namespace mprefill
