// HF config.json parsing, named shapes, fingerprints and random initialisation.
#include "model/model_config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>

#include "model/weights.h"

namespace mprefill {
namespace {

// meta-llama/Llama-3.1-8B config.json (as published).
const char* kLlama31 = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})";

// Qwen/Qwen2.5-7B-Instruct config.json.
const char* kQwen25 = R"({
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
  "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
  "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
  "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 152064})";

// mistralai/Mistral-7B-v0.1 config.json (sliding window 4096).
const char* kMistral01 = R"({
  "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true,
  "vocab_size": 32000})";

// Replace the first occurrence of `from` in `s`.
std::string edit(std::string s, const std::string& from, const std::string& to) {
  const size_t p = s.find(from);
  EXPECT_NE(p, std::string::npos) << from;
  if (p != std::string::npos) s.replace(p, from.size(), to);
  return s;
}

// Expect parse_hf_config to throw std::runtime_error whose message contains `needle`.
void expect_error(const std::string& json, const std::string& needle) {
  try {
    parse_hf_config(json);
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' does not mention '" << needle << "'";
  }
}

TEST(ModelConfig, ParsesLlama31) {
  const ModelConfig c = parse_hf_config(kLlama31);
  EXPECT_EQ(c.arch, "llama");
  EXPECT_EQ(c.hidden, 4096);
  EXPECT_EQ(c.intermediate, 14336);
  EXPECT_EQ(c.n_layers, 32);
  EXPECT_EQ(c.n_heads, 32);
  EXPECT_EQ(c.n_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.vocab, 128256);
  EXPECT_EQ(c.max_position, 131072);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-5f);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_TRUE(c.rope_scaling.llama3);
  EXPECT_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position, 8192.0);
  EXPECT_EQ(c.rope_style, RopeStyle::kRotateHalf);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.bos_id, 128000);
  EXPECT_EQ(c.eos_id, 128001);  // first of the list
  EXPECT_EQ(c.q_dim(), 4096);
  EXPECT_EQ(c.kv_dim(), 1024);
}

TEST(ModelConfig, ParsesQwen2WithBias) {
  const ModelConfig c = parse_hf_config(kQwen25);
  EXPECT_EQ(c.arch, "qwen2");
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_EQ(c.hidden, 3584);
  EXPECT_EQ(c.n_heads, 28);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_FALSE(c.rope_scaling.llama3);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-6f);
  EXPECT_EQ(c.bos_id, 151643);
  EXPECT_EQ(c.eos_id, 151645);
  // sliding_window is ignored while use_sliding_window is false; refused when true.
  expect_error(edit(kQwen25, "\"use_sliding_window\": false", "\"use_sliding_window\": true"),
               "use_sliding_window");
}

TEST(ModelConfig, MistralSlidingWindowRefused) {
  expect_error(kMistral01, "sliding_window=4096");
  const ModelConfig c =
      parse_hf_config(edit(kMistral01, "\"sliding_window\": 4096", "\"sliding_window\": null"));
  EXPECT_EQ(c.arch, "mistral");
  EXPECT_EQ(c.vocab, 32000);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.rope_theta, 10000.0);
}

TEST(ModelConfig, DefaultsAndArchitecturesFallback) {
  // No model_type, no num_key_value_heads / head_dim / rope_theta / tie flag / ids.
  const char* j = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 288,
    "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 6,
    "vocab_size": 32000, "max_position_embeddings": 256, "rope_scaling": null})";
  const ModelConfig c = parse_hf_config(j);
  EXPECT_EQ(c.arch, "llama");
  EXPECT_EQ(c.n_kv_heads, 6);
  EXPECT_EQ(c.head_dim, 48);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.rope_scaling.llama3);
  EXPECT_EQ(c.bos_id, 1);
  EXPECT_EQ(c.eos_id, 2);
  // An explicit head_dim wins over hidden / heads.
  const ModelConfig d = parse_hf_config(
      edit(kLlama31, "\"hidden_size\": 4096", "\"hidden_size\": 4096, \"head_dim\": 64"));
  EXPECT_EQ(d.head_dim, 64);
  EXPECT_EQ(d.q_dim(), 2048);
  EXPECT_TRUE(parse_hf_config(
                  edit(kLlama31, "\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true"))
                  .tie_word_embeddings);
  // "type" is the older spelling of "rope_type".
  EXPECT_TRUE(parse_hf_config(edit(kLlama31, "\"rope_type\"", "\"type\"")).rope_scaling.llama3);
}

TEST(ModelConfig, ErrorsNameTheField) {
  expect_error("{\"hidden_size\": 4096,", "not valid JSON");
  expect_error("[1, 2]", "JSON object");
  expect_error(edit(kLlama31, "\"hidden_size\": 4096,", ""), "hidden_size");
  expect_error(edit(kLlama31, "\"vocab_size\": 128256", "\"vocab_size\": null"), "vocab_size");
  expect_error(edit(kLlama31, "\"num_hidden_layers\": 32", "\"num_hidden_layers\": \"32\""),
               "num_hidden_layers");
  expect_error(edit(kLlama31, "\"intermediate_size\": 14336", "\"intermediate_size\": 1.5"),
               "intermediate_size");
  expect_error(edit(kLlama31, "\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5"),
               "num_key_value_heads=5");
  expect_error(edit(kLlama31, "\"num_attention_heads\": 32", "\"num_attention_heads\": 0"),
               "num_attention_heads");
  expect_error(edit(kLlama31, "\"model_type\": \"llama\"", "\"model_type\": \"gpt2\""),
               "model_type=gpt2");
  expect_error(edit(kLlama31, "\"rope_type\": \"llama3\"", "\"rope_type\": \"yarn\""),
               "rope_scaling type 'yarn'");
  expect_error(edit(kLlama31, "\"low_freq_factor\": 1.0,", ""), "low_freq_factor");
  expect_error(edit(kLlama31, "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\""),
               "hidden_act");
  expect_error(edit(kLlama31, "\"attention_bias\": false", "\"attention_bias\": true"),
               "attention_bias");
  expect_error(edit(kLlama31, "\"vocab_size\": 128256", "\"vocab_size\": 1000"),
               "bos_token_id=128000");
  expect_error(edit(kLlama31, "\"hidden_size\": 4096", "\"hidden_size\": 4000"), "head_dim");
  expect_error(edit(kLlama31, "\"vocab_size\": 128256", "\"vocab_size\": 99999999999"),
               "vocab_size");
}

TEST(ModelConfig, ValidateCatchesBadFields) {
  auto expect_invalid = [](const std::function<void(ModelConfig&)>& f, const std::string& needle) {
    ModelConfig c = named_shape("tiny");
    f(c);
    try {
      c.validate();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_invalid([](ModelConfig& c) { c.head_dim = 33; }, "head_dim");
  expect_invalid([](ModelConfig& c) { c.n_kv_heads = 3; }, "num_key_value_heads");
  expect_invalid([](ModelConfig& c) { c.hidden = -1; }, "hidden_size");
  expect_invalid([](ModelConfig& c) { c.rms_eps = 0.f; }, "rms_norm_eps");
  expect_invalid([](ModelConfig& c) { c.rope_theta = NAN; }, "rope_theta");
  expect_invalid([](ModelConfig& c) { c.eos_id = 512; }, "eos_token_id");
  expect_invalid([](ModelConfig& c) { c.arch = "gpt2"; }, "arch");
  expect_invalid(
      [](ModelConfig& c) {
        c.rope_scaling.llama3 = true;
        c.rope_scaling.high_freq_factor = 0.5;
      },
      "high_freq_factor");
}

TEST(ModelConfig, NamedShapes) {
  const ModelConfig t = named_shape("tiny");
  EXPECT_EQ(t.hidden, 128);
  EXPECT_EQ(t.n_layers, 4);
  EXPECT_EQ(t.n_heads, 4);
  EXPECT_EQ(t.n_kv_heads, 2);
  EXPECT_EQ(t.head_dim, 32);
  EXPECT_EQ(t.intermediate, 352);
  EXPECT_EQ(t.vocab, 512);
  EXPECT_EQ(t.max_position, 1 << 20);

  const ModelConfig s = named_shape("stories15m");
  EXPECT_EQ(s.hidden, 288);
  EXPECT_EQ(s.intermediate, 768);
  EXPECT_EQ(s.n_layers, 6);
  EXPECT_EQ(s.n_heads, 6);
  EXPECT_EQ(s.n_kv_heads, 6);
  EXPECT_EQ(s.head_dim, 48);
  EXPECT_EQ(s.vocab, 32000);
  EXPECT_EQ(s.max_position, 256);
  EXPECT_TRUE(s.tie_word_embeddings);
  EXPECT_EQ(s.rope_style, RopeStyle::kAdjacentPairs);

  const ModelConfig l = named_shape("llama3-8b");
  const ModelConfig hf = parse_hf_config(kLlama31);
  EXPECT_EQ(l.hidden, hf.hidden);
  EXPECT_EQ(l.intermediate, hf.intermediate);
  EXPECT_EQ(l.n_layers, hf.n_layers);
  EXPECT_EQ(l.n_kv_heads, hf.n_kv_heads);
  EXPECT_EQ(l.vocab, hf.vocab);
  EXPECT_EQ(l.rope_theta, hf.rope_theta);
  EXPECT_TRUE(l.rope_scaling.llama3);
  EXPECT_EQ(l.rope_scaling.factor, 8.0);
  EXPECT_EQ(l.max_position, 1 << 21);

  try {
    named_shape("llama2-7b");
    ADD_FAILURE() << "unknown shape accepted";
  } catch (const std::runtime_error& e) {
    const std::string m = e.what();
    for (const char* k : {"llama2-7b", "tiny", "stories15m", "llama3-8b"})
      EXPECT_NE(m.find(k), std::string::npos) << m;
  }
}

TEST(ModelConfig, FingerprintIsStableAndSensitive) {
  const ModelConfig a = named_shape("tiny");
  const std::string fa = a.fingerprint();
  ASSERT_EQ(fa.size(), 16u);
  EXPECT_EQ(fa.find_first_not_of("0123456789abcdef"), std::string::npos) << fa;
  EXPECT_EQ(fa, named_shape("tiny").fingerprint());
  EXPECT_EQ(parse_hf_config(kLlama31).fingerprint(), parse_hf_config(kLlama31).fingerprint());
  // Every architecture field changes it.
  const std::function<void(ModelConfig&)> edits[] = {
      [](ModelConfig& c) { c.arch = "qwen2"; },
      [](ModelConfig& c) { c.hidden += 2; },
      [](ModelConfig& c) { c.intermediate += 1; },
      [](ModelConfig& c) { c.n_layers += 1; },
      [](ModelConfig& c) { c.n_heads = 8; },
      [](ModelConfig& c) { c.n_kv_heads = 4; },
      [](ModelConfig& c) { c.head_dim = 16; },
      [](ModelConfig& c) { c.vocab += 1; },
      [](ModelConfig& c) { c.max_position += 1; },
      [](ModelConfig& c) { c.rms_eps = 1e-6f; },
      [](ModelConfig& c) { c.rope_theta = 10000.5; },
      [](ModelConfig& c) { c.rope_scaling.llama3 = true; },
      [](ModelConfig& c) { c.rope_style = RopeStyle::kAdjacentPairs; },
      [](ModelConfig& c) { c.tie_word_embeddings = true; },
      [](ModelConfig& c) { c.qkv_bias = true; },
      [](ModelConfig& c) { c.bos_id = 0; },
      [](ModelConfig& c) { c.eos_id = 3; },
  };
  for (size_t i = 0; i < std::size(edits); ++i) {
    ModelConfig b = a;
    edits[i](b);
    EXPECT_NE(b.fingerprint(), fa) << "edit " << i;
  }
  ModelConfig s1 = named_shape("llama3-8b"), s2 = s1;
  s2.rope_scaling.factor = 4.0;
  EXPECT_NE(s1.fingerprint(), s2.fingerprint());
}

// ---------------------------------------------------------------- random init
double mean_of(const Tensor& t) {
  double s = 0;
  for (float v : t.data) s += v;
  return s / t.data.size();
}
double std_of(const Tensor& t) {
  const double m = mean_of(t);
  double s = 0;
  for (float v : t.data) s += (v - m) * (v - m);
  return std::sqrt(s / t.data.size());
}

TEST(RandomInit, ShapesAndStatistics) {
  const ModelConfig c = named_shape("tiny");
  const ModelWeights w = random_model(c, 7);
  EXPECT_EQ(w.config.fingerprint(), c.fingerprint());
  EXPECT_EQ(w.embed.shape, (std::vector<int64_t>{512, 128}));
  EXPECT_EQ(w.embed.data.size(), 512u * 128u);
  ASSERT_EQ(w.layers.size(), 4u);
  const LayerWeights& l = w.layers[2];
  EXPECT_EQ(l.wq.shape, (std::vector<int64_t>{128, 128}));
  EXPECT_EQ(l.wk.shape, (std::vector<int64_t>{64, 128}));
  EXPECT_EQ(l.wv.shape, (std::vector<int64_t>{64, 128}));
  EXPECT_EQ(l.wo.shape, (std::vector<int64_t>{128, 128}));
  EXPECT_EQ(l.w_gate.shape, (std::vector<int64_t>{352, 128}));
  EXPECT_EQ(l.w_up.shape, (std::vector<int64_t>{352, 128}));
  EXPECT_EQ(l.w_down.shape, (std::vector<int64_t>{128, 352}));
  EXPECT_EQ(l.attn_norm.shape, (std::vector<int64_t>{128}));
  EXPECT_TRUE(l.bq.empty());
  EXPECT_EQ(w.lm_head.shape, (std::vector<int64_t>{512, 128}));
  EXPECT_EQ(&w.output_matrix(), &w.lm_head);
  EXPECT_NEAR(mean_of(l.w_gate), 0.0, 0.002);
  EXPECT_NEAR(std_of(l.w_gate), 0.02, 0.001);
  EXPECT_NEAR(std_of(l.w_down), 0.02 / std::sqrt(8.0), 0.0005);
  EXPECT_NEAR(mean_of(l.ffn_norm), 1.0, 0.01);
  EXPECT_GT(std_of(l.ffn_norm), 0.0);
  EXPECT_LT(std_of(l.ffn_norm), 0.05);
  for (float v : w.embed.data) ASSERT_TRUE(std::isfinite(v) && v != 0.f);
  // Distinct tensors get distinct streams.
  EXPECT_NE(l.w_gate.data[0], l.w_up.data[0]);
  EXPECT_NE(w.layers[0].wq.data[0], w.layers[1].wq.data[0]);
}

TEST(RandomInit, DeterministicPerSeed) {
  const ModelConfig c = named_shape("tiny");
  const ModelWeights a = random_model(c, 42), b = random_model(c, 42), d = random_model(c, 43);
  EXPECT_EQ(a.embed.data, b.embed.data);
  EXPECT_EQ(a.layers[3].w_down.data, b.layers[3].w_down.data);
  EXPECT_EQ(a.final_norm.data, b.final_norm.data);
  EXPECT_NE(a.embed.data, d.embed.data);
  EXPECT_NE(a.layers[3].w_down.data, d.layers[3].w_down.data);
  // Values depend on (seed, tensor name, index) only: a deeper model shares the first
  // layers' weights.
  ModelConfig deeper = c;
  deeper.n_layers = 5;
  const ModelWeights e = random_model(deeper, 42);
  EXPECT_EQ(a.layers[1].wq.data, e.layers[1].wq.data);
}

TEST(RandomInit, TiedQwenAndLimit) {
  ModelConfig c = named_shape("stories15m");
  const ModelWeights s = random_model(c, 1);
  EXPECT_TRUE(s.lm_head.empty());
  EXPECT_EQ(&s.output_matrix(), &s.embed);

  c = named_shape("tiny");
  c.arch = "qwen2";
  c.qkv_bias = true;
  const ModelWeights q = random_model(c, 1);
  EXPECT_EQ(q.layers[0].bq.shape, (std::vector<int64_t>{128}));
  EXPECT_EQ(q.layers[0].bk.shape, (std::vector<int64_t>{64}));
  EXPECT_EQ(q.layers[0].bv.data.size(), 64u);

  try {
    random_model(named_shape("llama3-8b"), 1);  // ~8 G parameters = ~30 GiB fp32
    ADD_FAILURE() << "llama3-8b fp32 weights accepted by the CPU engine";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("GiB"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("29.9"), std::string::npos) << e.what();
  }
  ModelConfig bad = named_shape("tiny");
  bad.n_kv_heads = 3;
  EXPECT_THROW(random_model(bad, 1), std::runtime_error);
}

}  // namespace
}  // namespace mprefill
