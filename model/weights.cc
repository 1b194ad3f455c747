#include "model/weights.h"

#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/hf_config.h"
#include "model/llama2c.h"
#include "model/safetensors.h"

namespace mprefill {

namespace fs = std::filesystem;

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

DType checkpoint_dtype(const SafetensorsCheckpoint& ck) {
  bool any = false;
  for (const std::string& n : ck.names()) {
    const TensorInfo& t = ck.info(n);
    if (t.shape.size() != 2) continue;
    if (t.dtype != DType::kBF16) return DType::kF32;
    any = true;
  }
  return any ? DType::kBF16 : DType::kF32;
}

ModelWeights load_hf_dir(const std::string& dir) {
  const ModelConfig cfg = read_hf_dir_config(dir);

  const SafetensorsCheckpoint ck(dir);
  const int64_t h = cfg.hidden, ffn = cfg.intermediate, q = cfg.q_dim(), kv = cfg.kv_dim(),
                v = cfg.vocab;
  ModelWeights w;
  w.config = cfg;
  w.stored_dtype = checkpoint_dtype(ck);
  w.embed = ck.load("model.embed_tokens.weight", {v, h});
  w.layers.resize(cfg.n_layers);
  for (int i = 0; i < cfg.n_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights& L = w.layers[i];
    L.attn_norm = ck.load(p + "input_layernorm.weight", {h});
    L.wq = ck.load(p + "self_attn.q_proj.weight", {q, h});
    L.wk = ck.load(p + "self_attn.k_proj.weight", {kv, h});
    L.wv = ck.load(p + "self_attn.v_proj.weight", {kv, h});
    L.wo = ck.load(p + "self_attn.o_proj.weight", {h, q});
    if (cfg.qkv_bias) {
      L.bq = ck.load(p + "self_attn.q_proj.bias", {q});
      L.bk = ck.load(p + "self_attn.k_proj.bias", {kv});
      L.bv = ck.load(p + "self_attn.v_proj.bias", {kv});
    }
    L.ffn_norm = ck.load(p + "post_attention_layernorm.weight", {h});
    L.w_gate = ck.load(p + "mlp.gate_proj.weight", {ffn, h});
    L.w_up = ck.load(p + "mlp.up_proj.weight", {ffn, h});
    L.w_down = ck.load(p + "mlp.down_proj.weight", {h, ffn});
  }
  w.final_norm = ck.load("model.norm.weight", {h});
  if (!cfg.tie_word_embeddings) {
    if (!ck.has("lm_head.weight"))
      throw std::runtime_error("tensor lm_head.weight not found in " + dir +
                               " (config.json has tie_word_embeddings false)");
    w.lm_head = ck.load("lm_head.weight", {v, h});
  }
  return w;
}

ModelWeights load_model(const std::string& path) {
  // "random:NAME[:SEED]": deterministic random weights of a named shape (benchmarks, and
  // the demo when no checkpoint is at hand).
  if (path.rfind("random:", 0) == 0) {
    const std::string spec = path.substr(7);
    const size_t colon = spec.find(':');
    uint64_t seed = 1;
    if (colon != std::string::npos) {
      const std::string s = spec.substr(colon + 1);
      if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos)
        throw std::runtime_error("model spec " + path + ": seed '" + s + "' is not a number");
      seed = std::stoull(s);
    }
    return random_model(named_shape(spec.substr(0, colon)), seed);
  }
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) throw std::runtime_error("model path " + path + " does not exist");
  if (fs::is_directory(st)) {
    if (fs::exists(fs::path(path) / "config.json")) return load_hf_dir(path);
    // A llama2.c model directory: its one checkpoint .bin beside tokenizer.bin.
    std::vector<std::string> bins;
    for (const auto& e : fs::directory_iterator(path, ec)) {
      if (e.is_regular_file() && e.path().extension() == ".bin" &&
          e.path().filename() != "tokenizer.bin")
        bins.push_back(e.path().string());
    }
    if (bins.size() == 1) return load_llama2c(bins[0]);
    throw std::runtime_error("model directory " + path + " has no config.json and " +
                             (bins.empty()
                                  ? std::string("no llama2.c .bin checkpoint")
                                  : std::to_string(bins.size()) + " .bin checkpoints (name one)"));
  }
  if (fs::is_regular_file(st) && fs::path(path).extension() == ".bin") return load_llama2c(path);
  throw std::runtime_error("model path " + path +
                           " is neither an HF directory (config.json + safetensors) nor a "
                           "llama2.c .bin file");
}

}  // namespace mprefill
