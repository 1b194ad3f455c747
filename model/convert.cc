#include "model/convert.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "model/safetensors.h"

namespace mprefill {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

// dst row of source row j within a head, adjacent-pair -> rotate-half.
inline int half_row_of_adjacent(int j, int d) { return (j % 2 == 0) ? j / 2 : d / 2 + j / 2; }

void check_rows(int n_heads, int head_dim, size_t numel, int64_t cols, const char* what) {
  if (n_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 || cols <= 0 ||
      numel != static_cast<size_t>(n_heads) * head_dim * cols)
    fail(std::string("RoPE row permutation of ") + what + ": bad shape (n_heads " +
         std::to_string(n_heads) + ", head_dim " + std::to_string(head_dim) + ", cols " +
         std::to_string(cols) + ", numel " + std::to_string(numel) + ")");
}

// The shortest decimal that round-trips the float, as a double (1e-5f -> 1e-05).
double float_as_decimal(float f) {
  char buf[32];
  for (int prec = 1; prec <= 9; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, static_cast<double>(f));
    if (std::strtof(buf, nullptr) == f) break;
  }
  return std::strtod(buf, nullptr);
}

}  // namespace

std::vector<float> permute_rows_adjacent_to_half(const float* w, int n_heads, int head_dim,
                                                 int64_t cols) {
  std::vector<float> out(static_cast<size_t>(n_heads) * head_dim * cols);
  for (int h = 0; h < n_heads; ++h)
    for (int j = 0; j < head_dim; ++j) {
      const float* src = w + (static_cast<int64_t>(h) * head_dim + j) * cols;
      float* dst = out.data() +
                   (static_cast<int64_t>(h) * head_dim + half_row_of_adjacent(j, head_dim)) * cols;
      std::copy(src, src + cols, dst);
    }
  return out;
}

std::vector<float> permute_rows_half_to_adjacent(const float* w, int n_heads, int head_dim,
                                                 int64_t cols) {
  std::vector<float> out(static_cast<size_t>(n_heads) * head_dim * cols);
  for (int h = 0; h < n_heads; ++h)
    for (int j = 0; j < head_dim; ++j) {
      const float* src =
          w + (static_cast<int64_t>(h) * head_dim + half_row_of_adjacent(j, head_dim)) * cols;
      float* dst = out.data() + (static_cast<int64_t>(h) * head_dim + j) * cols;
      std::copy(src, src + cols, dst);
    }
  return out;
}

void convert_to_rotate_half(ModelWeights& w) {
  ModelConfig& c = w.config;
  if (c.rope_style != RopeStyle::kAdjacentPairs)
    fail("convert_to_rotate_half: model already uses rotate-half RoPE");
  for (LayerWeights& L : w.layers) {
    check_rows(c.n_heads, c.head_dim, L.wq.data.size(), c.hidden, "wq");
    check_rows(c.n_kv_heads, c.head_dim, L.wk.data.size(), c.hidden, "wk");
    L.wq.data = permute_rows_adjacent_to_half(L.wq.data.data(), c.n_heads, c.head_dim, c.hidden);
    L.wk.data = permute_rows_adjacent_to_half(L.wk.data.data(), c.n_kv_heads, c.head_dim, c.hidden);
    if (!L.bq.empty()) {
      check_rows(c.n_heads, c.head_dim, L.bq.data.size(), 1, "bq");
      L.bq.data = permute_rows_adjacent_to_half(L.bq.data.data(), c.n_heads, c.head_dim, 1);
    }
    if (!L.bk.empty()) {
      check_rows(c.n_kv_heads, c.head_dim, L.bk.data.size(), 1, "bk");
      L.bk.data = permute_rows_adjacent_to_half(L.bk.data.data(), c.n_kv_heads, c.head_dim, 1);
    }
  }
  c.rope_style = RopeStyle::kRotateHalf;
}

std::string hf_config_json(const ModelConfig& c, DType dtype) {
  json j;
  if (c.arch == "qwen2") {
    j["architectures"] = {"Qwen2ForCausalLM"};
  } else if (c.arch == "mistral") {
    j["architectures"] = {"MistralForCausalLM"};
    j["sliding_window"] = nullptr;
  } else {
    j["architectures"] = {"LlamaForCausalLM"};
    j["attention_bias"] = c.qkv_bias;
    j["mlp_bias"] = false;
  }
  j["model_type"] = c.arch;
  j["hidden_act"] = "silu";
  j["hidden_size"] = c.hidden;
  j["intermediate_size"] = c.intermediate;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["head_dim"] = c.head_dim;
  j["vocab_size"] = c.vocab;
  j["max_position_embeddings"] = c.max_position;
  j["rms_norm_eps"] = float_as_decimal(c.rms_eps);
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling.llama3) {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope_scaling.factor},
                         {"low_freq_factor", c.rope_scaling.low_freq_factor},
                         {"high_freq_factor", c.rope_scaling.high_freq_factor},
                         {"original_max_position_embeddings",
                          static_cast<int64_t>(c.rope_scaling.original_max_position)}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["bos_token_id"] = c.bos_id;
  j["eos_token_id"] = c.eos_id;
  j["torch_dtype"] = dtype == DType::kBF16  ? "bfloat16"
                     : dtype == DType::kF16 ? "float16"
                                            : "float32";
  return j.dump(2) + "\n";
}

void save_hf_dir(const ModelWeights& w, const std::string& dir, DType dtype) {
  const ModelConfig& c = w.config;
  if (c.rope_style != RopeStyle::kRotateHalf)
    fail("save_hf_dir: HF checkpoints use rotate-half RoPE; convert the model first");
  if (static_cast<int>(w.layers.size()) != c.n_layers)
    fail("save_hf_dir: model has " + std::to_string(w.layers.size()) + " layers, config says " +
         std::to_string(c.n_layers));
  std::vector<SafetensorsEntry> e;
  auto add = [&](const std::string& name, const Tensor& t) {
    if (static_cast<int64_t>(t.data.size()) != t.numel())
      fail("save_hf_dir: tensor " + name + " has " + std::to_string(t.data.size()) +
           " values for shape " + shape_to_string(t.shape));
    e.push_back({name, dtype, t.shape, t.data.data()});
  };
  add("model.embed_tokens.weight", w.embed);
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const LayerWeights& L = w.layers[i];
    add(p + "input_layernorm.weight", L.attn_norm);
    add(p + "self_attn.q_proj.weight", L.wq);
    add(p + "self_attn.k_proj.weight", L.wk);
    add(p + "self_attn.v_proj.weight", L.wv);
    add(p + "self_attn.o_proj.weight", L.wo);
    if (c.qkv_bias) {
      add(p + "self_attn.q_proj.bias", L.bq);
      add(p + "self_attn.k_proj.bias", L.bk);
      add(p + "self_attn.v_proj.bias", L.bv);
    }
    add(p + "post_attention_layernorm.weight", L.ffn_norm);
    add(p + "mlp.gate_proj.weight", L.w_gate);
    add(p + "mlp.up_proj.weight", L.w_up);
    add(p + "mlp.down_proj.weight", L.w_down);
  }
  add("model.norm.weight", w.final_norm);
  if (!c.tie_word_embeddings) add("lm_head.weight", w.output_matrix());

  const fs::path d(dir);
  // A stale index would take precedence over the new single file.
  std::error_code ec;
  fs::remove(d / "model.safetensors.index.json", ec);
  write_safetensors((d / "model.safetensors").string(), e);
  write_file_atomic((d / "config.json").string(), hf_config_json(c, dtype));
}

void convert_llama2c_to_hf(const std::string& bin_path, const std::string& out_dir,
                           const ConvertOptions& opt) {
  if (opt.dtype != DType::kF32 && opt.dtype != DType::kBF16)
    fail(std::string("unsupported output dtype ") + to_string(opt.dtype) + " (use bf16 or fp32)");
  std::error_code ec;
  const fs::file_status st = fs::status(out_dir, ec);
  if (fs::exists(st)) {
    if (!fs::is_directory(st)) fail("output path " + out_dir + " exists and is not a directory");
    if (!fs::is_empty(out_dir, ec) && !opt.force)
      fail("output directory " + out_dir + " is not empty (pass --force to overwrite)");
  }
  ModelWeights w = load_llama2c(bin_path);  // validate the input before creating anything
  convert_to_rotate_half(w);
  fs::create_directories(out_dir, ec);
  if (ec) fail("cannot create output directory " + out_dir + ": " + ec.message());
  save_hf_dir(w, out_dir, opt.dtype);
}

}  // namespace mprefill
