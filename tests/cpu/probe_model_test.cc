// The committed long-context probe model (models/probe-kv32k, issue 8): it loads through
// load_hf_dir, answers the key-value retrieval samples of retrieval_1k.jsonl (written by
// python/probe/probe_task.py) through the CPU engine (prefill, then one decode step), and
// mprefill-search runs its pattern search and --eval-retrieval on it.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "model/sparse_policy.h"
#include "model/weights.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

std::string probe_dir() { return test::source_dir() + "/models/probe-kv32k"; }

struct Sample {
  std::vector<int> ids, answer;
};

std::vector<Sample> read_samples(const std::string& path) {
  std::ifstream f(path);
  std::vector<Sample> out;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    const nlohmann::json j = nlohmann::json::parse(line);
    out.push_back({j.at("ids").get<std::vector<int>>(), j.at("answer").get<std::vector<int>>()});
  }
  return out;
}

// Greedy answer of the CPU engine: argmax of the prefill's logits, then decode steps.
std::vector<int> answer(const Engine& e, const ModelConfig& cfg, const Sample& s,
                        const SparsePolicy& pol) {
  const int64_t n = static_cast<int64_t>(s.ids.size());
  KvCache cache(cfg, n + static_cast<int64_t>(s.answer.size()));
  std::vector<float> logits = e.prefill(s.ids, pol, &cache);
  std::vector<int> got;
  for (size_t t = 0; t < s.answer.size(); ++t) {
    got.push_back(
        static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
    if (t + 1 < s.answer.size())
      logits = e.decode_step(got.back(), n + static_cast<int64_t>(t), &cache);
  }
  return got;
}

class ProbeModel : public ::testing::Test {
 protected:
  void SetUp() override { MPREFILL_SKIP_IF_MISSING(probe_dir() + "/model.safetensors"); }
};

TEST_F(ProbeModel, LoadsWithTheTrainedShape) {
  const ModelWeights w = load_model(probe_dir());
  EXPECT_EQ(w.config.vocab, 512);
  EXPECT_EQ(w.config.head_dim, 128);  // the CUDA engine's kernels and GPU estimation
  EXPECT_EQ(w.config.n_layers, 4);
  EXPECT_EQ(w.config.n_heads, 4);
  EXPECT_EQ(w.config.n_kv_heads, 2);
}

// The model in dir answers every 1K retrieval sample densely through the CPU engine, and
// fails most far samples under a sink + 256-key local window (the answer really comes from
// the record far back).
void check_answers(const std::string& dir) {
  const ModelWeights w = load_model(dir);
  const Engine e(w);
  // The samples are the task's, not a model's: probe_task.py's 1K eval set (seed of the
  // model cards), committed beside probe-kv32k.
  const std::vector<Sample> samples = read_samples(probe_dir() + "/retrieval_1k.jsonl");
  ASSERT_GE(samples.size(), 8u);
  int correct = 0;
  for (const Sample& s : samples) {
    ASSERT_EQ(s.ids.size(), 1024u);
    ASSERT_EQ(s.answer.size(), 2u);
    const std::vector<int> got = answer(e, w.config, s, SparsePolicy{});
    correct += got == s.answer;
  }
  // Every sample (12 of 12 on the first 12 of this seed for probe-kv32k, measured;
  // MODEL_CARD.md; 8 of 8 for probe-kv128k): a wrong layout (RoPE convention or theta,
  // GQA grouping, tensor names) answers none.
  EXPECT_EQ(correct, static_cast<int>(samples.size())) << dir;

  int local_correct = 0, far = 0;
  const SparsePolicy local = SparsePolicy::uniform(w.config, HeadPattern::a_shape(64, 256), 0);
  for (const Sample& s : samples) {
    // Position of the record KEY k1 k2 v1 v2 whose key is the query's (the sample ends
    // QUERY k1 k2).
    const int64_t n = static_cast<int64_t>(s.ids.size());
    int64_t rec = -1;
    for (int64_t i = 1; i + 5 <= n - 3; ++i)
      if (s.ids[i] == 3 && s.ids[i + 1] == s.ids[n - 2] && s.ids[i + 2] == s.ids[n - 1]) rec = i;
    ASSERT_GE(rec, 0);
    if (n - rec <= 64 + 256 + 64) continue;  // within the window: not a far sample
    if (far == 4) break;                     // enough (CI time)
    ++far;
    local_correct += answer(e, w.config, s, local) == s.answer;
  }
  ASSERT_EQ(far, 4);  // 6 of the 8 committed samples are far
  EXPECT_LE(local_correct * 2, far)
      << dir << ": " << local_correct << " of " << far
      << " far samples answered without long-range attention";
}

TEST_F(ProbeModel, AnswersRetrievalSamplesThroughTheCpuEngine) { check_answers(probe_dir()); }

// models/probe-kv128k (issue 18): trained to 128K with RoPE theta 1e7; the same checks.
TEST(ProbeModel128k, LoadsAndAnswersRetrievalSamplesThroughTheCpuEngine) {
  const std::string dir = test::source_dir() + "/models/probe-kv128k";
  MPREFILL_SKIP_IF_MISSING(dir + "/model.safetensors");
  const ModelWeights w = load_model(dir);
  EXPECT_EQ(w.config.head_dim, 128);
  EXPECT_EQ(w.config.n_layers, 4);
  EXPECT_DOUBLE_EQ(w.config.rope_theta, 1e7);
  check_answers(dir);
}

TEST_F(ProbeModel, SearchAndRetrievalEvalRunOnIt) {
  const std::string out =
      (std::filesystem::temp_directory_path() / ("mprefill_probe_" + std::to_string(::getpid())))
          .string();
  std::filesystem::remove_all(out);
  std::filesystem::create_directories(out);
  const std::string bin = test::bin_dir() + "/mprefill-search";
  std::string log;
  ASSERT_EQ(test::run_command(bin + " --model " + probe_dir() + " --calib " + probe_dir() +
                                  "/calib_8k.ids --max-tokens 512 --budget-tiles 0.3 --out " + out +
                                  "/searched.json --csv " + out + "/searched.csv",
                              &log),
            0)
      << log;
  std::ifstream jf(out + "/searched.json");
  const nlohmann::json j = nlohmann::json::parse(jf);
  ASSERT_EQ(j.size(), 4u);  // one object per layer
  for (const auto& layer : j) EXPECT_EQ(layer.size(), 4u);
  // The searched config then runs through --eval-retrieval next to dense.
  {
    std::ifstream in(probe_dir() + "/retrieval_1k.jsonl");
    std::ofstream one(out + "/one.jsonl");
    std::string line;
    std::getline(in, line);
    one << line << "\n";
  }
  ASSERT_EQ(test::run_command(bin + " --model " + probe_dir() + " --eval-retrieval " + out +
                                  "/one.jsonl --policies 'dense;" + out +
                                  "/searched.json' --json " + out + "/acc.json",
                              &log),
            0)
      << log;
  std::ifstream af(out + "/acc.json");
  const nlohmann::json acc = nlohmann::json::parse(af);
  ASSERT_EQ(acc.size(), 2u);
  EXPECT_EQ(acc[0].at("policy"), "dense");
  EXPECT_DOUBLE_EQ(acc[0].at("accuracy").get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(acc[0].at("tile_density").get<double>(), 1.0);
  // 1024 tokens: 136 causal tiles, the budget 40; every head fits a candidate.
  EXPECT_LE(acc[1].at("tile_density").get<double>(), 0.3 + 1e-9);
  std::filesystem::remove_all(out);
}

// --eval-retrieval with "checks" (the multi-key task of probe_task.py): a sample is right
// only when the answers after every check's prefix and after the whole prompt all are.
TEST_F(ProbeModel, EvalRetrievalScoresEveryCheck) {
  const test::TempDir tmp("probe_checks");
  const std::string& out = tmp.path;
  const Sample s = read_samples(probe_dir() + "/retrieval_1k.jsonl").at(0);
  // A second query after the first one's true values: the first other record of the body.
  size_t r = 1;
  while (r + 4 < s.ids.size() && (s.ids[r] != 3 || (s.ids[r + 1] == s.ids[s.ids.size() - 2] &&
                                                    s.ids[r + 2] == s.ids.back())))
    ++r;
  ASSERT_LT(r + 4, s.ids.size() - 3);
  std::vector<int> ids = s.ids;
  ids.insert(ids.end(), {s.answer[0], s.answer[1], 5, s.ids[r + 1], s.ids[r + 2]});
  const std::vector<int> second = {s.ids[r + 3]};  // one token: the prefill's own answer
  using nlohmann::json;
  auto line = [&](int64_t prefix, const std::vector<int>& first) {
    json j;
    j["ids"] = ids;
    j["answer"] = second;
    j["checks"] = json::array({json::array({prefix, first})});
    return j.dump();
  };
  const int64_t n1 = static_cast<int64_t>(s.ids.size());
  std::vector<int> wrong = s.answer;
  wrong[0] = wrong[0] == 16 ? 17 : 16;
  {
    std::ofstream f(out + "/mk.jsonl");
    f << line(n1, s.answer) << "\n" << line(n1, wrong) << "\n";
    std::ofstream g(out + "/bad.jsonl");
    g << line(static_cast<int64_t>(ids.size()), s.answer) << "\n";
  }
  const std::string bin = test::bin_dir() + "/mprefill-search";
  std::string log;
  for (const char* name : {"mk", "mk_first"}) {
    const bool limit = std::string(name) == "mk_first";
    ASSERT_EQ(test::run_command(bin + " --model " + probe_dir() + " --eval-retrieval " + out +
                                    "/mk.jsonl --policies dense --json " + out + "/" + name +
                                    ".json" + (limit ? " --limit 1" : ""),
                                &log),
              0)
        << log;
  }
  std::ifstream a1(out + "/mk_first.json"), a2(out + "/mk.json");
  const json first = json::parse(a1), both = json::parse(a2);
  // The committed model answers both queries of the first sample; the second sample has the
  // same prompts with a wrong first answer, so it counts as wrong.
  EXPECT_EQ(first.at(0).at("correct"), 1) << first.dump();
  EXPECT_EQ(both.at(0).at("samples"), 2);
  EXPECT_EQ(both.at(0).at("correct"), 1) << both.dump();
  EXPECT_DOUBLE_EQ(both.at(0).at("tile_density").get<double>(), 1.0);
  EXPECT_GT(both.at(0).at("prefill_seconds_per_sample").get<double>(), 0.0);
  // A check whose prefix is the whole prompt is refused with one error line.
  EXPECT_EQ(test::run_command(bin + " --model " + probe_dir() + " --eval-retrieval " + out +
                                  "/bad.jsonl --policies dense",
                              &log),
            1)
      << log;
  EXPECT_NE(log.find("a check needs a prefix length in [1, "), std::string::npos) << log;
}

}  // namespace
}  // namespace mprefill
