// Per-head sparse policy: MInference JSON read as-is, clear errors, summaries.
#include "model/sparse_policy.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>

#include "tests/testutil.h"

namespace mprefill {
namespace {

ModelConfig shape(int layers, int heads) {
  ModelConfig c;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = heads;
  return c;
}

std::string error_of(const std::string& json, const ModelConfig& c) {
  try {
    parse_minference_config(json, "X", c);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(SparsePolicy, ReadsLlama3ConfigAsIs) {
  const std::string path =
      test::source_dir() +
      "/configs/minference/Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json";
  ASSERT_TRUE(test::file_exists(path)) << path;
  const SparsePolicy p = load_sparse_policy(path, shape(32, 32));
  EXPECT_EQ(p.dense_below, kDefaultDenseBelow);
  EXPECT_EQ(p.heads.size(), 1024u);
  // Budget mix documented in configs/minference/README.md.
  const auto s = p.summary();
  ASSERT_EQ(s.size(), 5u);
  const std::pair<HeadPattern, int> want[] = {{HeadPattern::vertical_slash(1000, 6096), 473},
                                              {HeadPattern::vertical_slash(30, 800), 278},
                                              {HeadPattern::vertical_slash(100, 800), 153},
                                              {HeadPattern::vertical_slash(3500, 100), 89},
                                              {HeadPattern::vertical_slash(500, 700), 31}};
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(s[i].pattern, want[i].first) << i;
    EXPECT_EQ(s[i].count, want[i].second) << i;
  }
  // Layer 0 head 16 is (30, 800) in the file.
  EXPECT_EQ(p.at(0, 16, 1 << 20), HeadPattern::vertical_slash(30, 800));
  EXPECT_EQ(p.at(0, 0, 1 << 20), HeadPattern::vertical_slash(1000, 6096));
  // Short prompts stay dense.
  EXPECT_EQ(p.at(0, 16, 1000).kind, PatternKind::kDense);
  EXPECT_TRUE(p.all_dense(32767));
  EXPECT_FALSE(p.all_dense(32768));
  EXPECT_NE(p.summary_string().find("vertical_slash(1000,6096) x473"), std::string::npos)
      << p.summary_string();
}

TEST(SparsePolicy, ReadsQwenConfigAndRejectsWrongModel) {
  const std::string path = test::source_dir() + "/configs/minference/Qwen2.5_7B_Instruct_1M.json";
  const SparsePolicy p = load_sparse_policy(path, shape(28, 28), 4096);
  EXPECT_EQ(p.heads.size(), 28u * 28u);
  EXPECT_EQ(p.dense_below, 4096);
  EXPECT_EQ(p.at(0, 0, 4096), HeadPattern::vertical_slash(9192, 14288));
  try {
    load_sparse_policy(path, shape(32, 32));
    FAIL() << "a 28-layer config loaded for a 32-layer model";
  } catch (const std::runtime_error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("28 layers"), std::string::npos) << m;
    EXPECT_NE(m.find("32"), std::string::npos) << m;
  }
}

TEST(SparsePolicy, AllThreePatternNames) {
  const std::string json = R"([
    {"0": ["vertical_and_slash", 64, 128, 0.5], "1": ["stream_llm", 4, 256, 1], "2": ["block_sparse", 100, 0, 0.1]},
    {"2": ["stream_llm", 0, 1, 0], "0": ["block_sparse", 1, 7, 0], "1": ["vertical_and_slash", 0, 0, 3]}])";
  const SparsePolicy p = parse_minference_config(json, "mixed.json", shape(2, 3));
  EXPECT_EQ(p.source, "mixed.json");
  EXPECT_EQ(p.at(0, 0, 1 << 20), HeadPattern::vertical_slash(64, 128));
  EXPECT_EQ(p.at(0, 1, 1 << 20), HeadPattern::a_shape(4, 256));
  EXPECT_EQ(p.at(0, 2, 1 << 20), HeadPattern::block_sparse(100));
  EXPECT_EQ(p.at(1, 0, 1 << 20), HeadPattern::block_sparse(1));
  EXPECT_EQ(p.at(1, 1, 1 << 20), HeadPattern::vertical_slash(0, 0));
  EXPECT_EQ(p.at(1, 2, 1 << 20), HeadPattern::a_shape(0, 1));
  EXPECT_EQ(p.summary().size(), 6u);
}

TEST(SparsePolicy, UnknownPatternNamesLayerAndHead) {
  std::string json = "[";
  for (int l = 0; l < 4; ++l) {
    json += l ? ",{" : "{";
    for (int h = 0; h < 8; ++h) {
      const std::string pat = (l == 3 && h == 7) ? "foo" : "vertical_and_slash";
      json += (h ? ",\"" : "\"") + std::to_string(h) + "\": [\"" + pat + "\", 1000, 6096, 0.9]";
    }
    json += "}";
  }
  json += "]";
  EXPECT_EQ(error_of(json, shape(4, 8)),
            "config X: layer 3 head 7: unknown pattern 'foo' (expected vertical_and_slash, "
            "stream_llm, block_sparse)");
}

TEST(SparsePolicy, ClearErrors) {
  const ModelConfig c = shape(1, 2);
  auto has = [](const std::string& msg, const std::string& part) {
    return msg.find(part) != std::string::npos;
  };
  std::string m;
  m = error_of("{not json", c);
  EXPECT_TRUE(has(m, "config X: not valid JSON")) << m;
  m = error_of(R"({"0": 1})", c);
  EXPECT_TRUE(has(m, "expected a JSON list")) << m;
  m = error_of("[]", c);
  EXPECT_TRUE(has(m, "has 0 layers but the model has 1")) << m;
  m = error_of(R"([{"0": ["stream_llm", 1, 2, 0]}])", c);
  EXPECT_TRUE(has(m, "layer 0 has 1 heads but the model has 2")) << m;
  m = error_of(R"([{"0": ["stream_llm", 1, 2, 0], "x": ["stream_llm", 1, 2, 0]}])", c);
  EXPECT_TRUE(has(m, "head key 'x'")) << m;
  m = error_of(R"([{"0": ["stream_llm", 1, 2, 0], "2": ["stream_llm", 1, 2, 0]}])", c);
  EXPECT_TRUE(has(m, "head key '2'")) << m;
  m = error_of(R"([{"0": ["stream_llm", 1, 2, 0], "1": ["stream_llm", -1, 2, 0]}])", c);
  EXPECT_TRUE(has(m, "layer 0 head 1: init size must be a whole number >= 0")) << m;
  m = error_of(R"([{"0": ["stream_llm", 1, 2, 0], "1": ["vertical_and_slash", 1.5, 2, 0]}])", c);
  EXPECT_TRUE(has(m, "vertical size must be a whole number")) << m;
  m = error_of(R"([{"0": ["stream_llm", 1, 2, 0], "1": ["block_sparse", 0, 0, 0]}])", c);
  EXPECT_TRUE(has(m, "top-k must be a whole number >= 1")) << m;
  m = error_of(R"([{"0": ["stream_llm", 1, 2, 0], "1": ["stream_llm", 1, 0, 0]}])", c);
  EXPECT_TRUE(has(m, "local window must be a whole number >= 1")) << m;
  m = error_of(R"([{"0": ["stream_llm", 1, 2, 0], "1": "vertical_and_slash"}])", c);
  EXPECT_TRUE(has(m, "expected [pattern, a, b, score]")) << m;
  m = error_of(R"([{"0": ["stream_llm", 1, 2, 0], "1": ["stream_llm", "1", 2, 0]}])", c);
  EXPECT_TRUE(has(m, "init size must be a number")) << m;
  EXPECT_THROW(load_sparse_policy("/nonexistent/policy.json", c), std::runtime_error);
  EXPECT_THROW(load_sparse_policy("dense", c, -1), std::runtime_error);
}

TEST(SparsePolicy, DenseAndAuto) {
  const ModelConfig c = shape(3, 5);
  const SparsePolicy d = load_sparse_policy("dense", c, 0);
  EXPECT_TRUE(d.all_dense(1 << 30));
  EXPECT_EQ(d.at(2, 4, 1 << 30).kind, PatternKind::kDense);
  EXPECT_NE(d.summary_string().find("all heads dense"), std::string::npos);
  d.check_model(shape(7, 9));  // the dense policy fits any model

  const SparsePolicy a = load_sparse_policy("auto", c, 100);
  EXPECT_EQ(a.source, "auto");
  ASSERT_EQ(a.summary().size(), 1u);
  EXPECT_EQ(a.summary()[0].pattern, HeadPattern::vertical_slash(1000, 6096));
  EXPECT_EQ(a.summary()[0].count, 15);
  EXPECT_EQ(a.at(1, 1, 99).kind, PatternKind::kDense);
  EXPECT_EQ(a.at(1, 1, 100).kind, PatternKind::kVerticalSlash);
  EXPECT_THROW(a.check_model(shape(3, 6)), std::runtime_error);
  a.check_model(c);
}

}  // namespace
}  // namespace mprefill
