#include "model/model_config.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

namespace mprefill {
namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error("model config: " + msg); }

// ---- typed field readers for config.json: a wrong type or range names the field.
bool has(const json& j, const char* key) { return j.contains(key) && !j.at(key).is_null(); }

int64_t as_int(const json& v, const std::string& field) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {  // tolerate 4096.0
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15)
      return static_cast<int64_t>(d);
  }
  fail(field + " must be an integer, got " + v.dump());
}

int get_int(const json& j, const char* key) {
  if (!has(j, key)) fail(std::string("config.json has no field ") + key);
  const int64_t v = as_int(j.at(key), key);
  if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max())
    fail(std::string(key) + "=" + std::to_string(v) + " is out of range");
  return static_cast<int>(v);
}

int get_int_or(const json& j, const char* key, int dflt) {
  return has(j, key) ? get_int(j, key) : dflt;
}

double get_num(const json& j, const char* key, const std::string& where) {
  if (!has(j, key)) fail(where + " has no field " + key);
  const json& v = j.at(key);
  if (!v.is_number()) fail(where + "." + key + " must be a number, got " + v.dump());
  return v.get<double>();
}

double get_num_or(const json& j, const char* key, double dflt) {
  return has(j, key) ? get_num(j, key, "config.json") : dflt;
}

bool get_bool_or(const json& j, const char* key, bool dflt) {
  if (!has(j, key)) return dflt;
  if (!j.at(key).is_boolean())
    fail(std::string(key) + " must be true or false, got " + j.at(key).dump());
  return j.at(key).get<bool>();
}

// bos/eos: an integer, or a list whose first entry is used (Llama 3.1 lists several eos).
int get_token_id_or(const json& j, const char* key, int dflt) {
  if (!has(j, key)) return dflt;
  const json& v = j.at(key);
  if (v.is_array()) {
    if (v.empty()) return dflt;
    return static_cast<int>(as_int(v.at(0), std::string(key) + "[0]"));
  }
  return get_int(j, key);
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// model_type, or else the first entry of architectures ("LlamaForCausalLM" -> llama).
std::string detect_arch(const json& j) {
  std::string t;
  if (has(j, "model_type")) {
    if (!j.at("model_type").is_string()) fail("model_type must be a string");
    t = lower(j.at("model_type").get<std::string>());
  } else if (has(j, "architectures") && j.at("architectures").is_array() &&
             !j.at("architectures").empty() && j.at("architectures")[0].is_string()) {
    const std::string a = j.at("architectures")[0].get<std::string>();
    if (a == "LlamaForCausalLM")
      t = "llama";
    else if (a == "Qwen2ForCausalLM")
      t = "qwen2";
    else if (a == "MistralForCausalLM")
      t = "mistral";
    else
      fail("architectures[0]=" + a +
           " is not supported (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)");
  } else {
    fail("config.json has no field model_type (or architectures)");
  }
  if (t != "llama" && t != "qwen2" && t != "mistral")
    fail("model_type=" + t + " is not supported (llama, qwen2, mistral)");
  return t;
}

RopeScaling parse_rope_scaling(const json& j) {
  RopeScaling sc;
  if (!has(j, "rope_scaling")) return sc;
  const json& r = j.at("rope_scaling");
  if (!r.is_object()) fail("rope_scaling must be null or an object, got " + r.dump());
  std::string type;
  for (const char* key : {"rope_type", "type"})
    if (has(r, key)) {
      if (!r.at(key).is_string()) fail(std::string("rope_scaling.") + key + " must be a string");
      type = r.at(key).get<std::string>();
      break;
    }
  if (type == "default") return sc;
  if (type != "llama3")
    fail("rope_scaling type '" + type + "' is not supported (only llama3 or none)");
  sc.llama3 = true;
  sc.factor = get_num(r, "factor", "rope_scaling");
  sc.low_freq_factor = get_num(r, "low_freq_factor", "rope_scaling");
  sc.high_freq_factor = get_num(r, "high_freq_factor", "rope_scaling");
  sc.original_max_position = get_num(r, "original_max_position_embeddings", "rope_scaling");
  return sc;
}

// FNV-1a 64.
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string hexfloat(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%a", v);
  return buf;
}

}  // namespace

void ModelConfig::validate() const {
  auto positive = [](int v, const char* name) {
    if (v <= 0) fail(std::string(name) + "=" + std::to_string(v) + " must be positive");
  };
  if (arch != "llama" && arch != "qwen2" && arch != "mistral")
    fail("arch=" + arch + " is not supported (llama, qwen2, mistral)");
  positive(hidden, "hidden_size");
  positive(intermediate, "intermediate_size");
  positive(n_layers, "num_hidden_layers");
  positive(n_heads, "num_attention_heads");
  positive(n_kv_heads, "num_key_value_heads");
  positive(head_dim, "head_dim");
  positive(vocab, "vocab_size");
  positive(max_position, "max_position_embeddings");
  if (n_heads % n_kv_heads != 0)
    fail("num_key_value_heads=" + std::to_string(n_kv_heads) +
         " must divide num_attention_heads=" + std::to_string(n_heads));
  if (head_dim % 2 != 0)
    fail("head_dim=" + std::to_string(head_dim) + " must be even (RoPE pairs)");
  if (static_cast<int64_t>(n_heads) * head_dim > std::numeric_limits<int>::max())
    fail("num_attention_heads * head_dim overflows");
  if (!(rms_eps > 0.f) || !std::isfinite(rms_eps))
    fail("rms_norm_eps=" + std::to_string(rms_eps) + " must be positive and finite");
  if (!(rope_theta > 1.0) || !std::isfinite(rope_theta))
    fail("rope_theta=" + std::to_string(rope_theta) + " must be finite and > 1");
  if (rope_scaling.llama3) {
    const RopeScaling& s = rope_scaling;
    if (!(s.factor >= 1.0) || !std::isfinite(s.factor))
      fail("rope_scaling.factor=" + std::to_string(s.factor) + " must be >= 1");
    if (!(s.low_freq_factor > 0.0) || !(s.high_freq_factor > s.low_freq_factor) ||
        !std::isfinite(s.high_freq_factor))
      fail("rope_scaling needs 0 < low_freq_factor (" + std::to_string(s.low_freq_factor) +
           ") < high_freq_factor (" + std::to_string(s.high_freq_factor) + ")");
    if (!(s.original_max_position > 0.0) || !std::isfinite(s.original_max_position))
      fail("rope_scaling.original_max_position_embeddings must be positive");
  }
  if (bos_id < 0 || bos_id >= vocab)
    fail("bos_token_id=" + std::to_string(bos_id) + " is outside the vocabulary [0, " +
         std::to_string(vocab) + ")");
  if (eos_id < 0 || eos_id >= vocab)
    fail("eos_token_id=" + std::to_string(eos_id) + " is outside the vocabulary [0, " +
         std::to_string(vocab) + ")");
}

// Hash of a canonical text of every field (doubles as exact hex floats), so equal
// configs give equal fingerprints on every platform.
std::string ModelConfig::fingerprint() const {
  std::string s = "mprefill-model-config-v1";
  auto add = [&](const char* k, const std::string& v) { s += std::string(";") + k + "=" + v; };
  add("arch", arch);
  add("hidden", std::to_string(hidden));
  add("intermediate", std::to_string(intermediate));
  add("n_layers", std::to_string(n_layers));
  add("n_heads", std::to_string(n_heads));
  add("n_kv_heads", std::to_string(n_kv_heads));
  add("head_dim", std::to_string(head_dim));
  add("vocab", std::to_string(vocab));
  add("max_position", std::to_string(max_position));
  add("rms_eps", hexfloat(rms_eps));
  add("rope_theta", hexfloat(rope_theta));
  add("rope_llama3", rope_scaling.llama3 ? "1" : "0");
  if (rope_scaling.llama3) {
    add("rope_factor", hexfloat(rope_scaling.factor));
    add("rope_low", hexfloat(rope_scaling.low_freq_factor));
    add("rope_high", hexfloat(rope_scaling.high_freq_factor));
    add("rope_orig", hexfloat(rope_scaling.original_max_position));
  }
  add("rope_style", std::to_string(static_cast<int>(rope_style)));
  add("tied", tie_word_embeddings ? "1" : "0");
  add("qkv_bias", qkv_bias ? "1" : "0");
  add("bos", std::to_string(bos_id));
  add("eos", std::to_string(eos_id));
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(fnv1a(s)));
  return buf;
}

ModelConfig parse_hf_config(const std::string& json_text) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    fail(std::string("config.json is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) fail("config.json must hold a JSON object");

  ModelConfig c;
  c.arch = detect_arch(j);
  if (c.arch == "mistral" && has(j, "sliding_window"))
    fail("mistral sliding_window=" + j.at("sliding_window").dump() +
         " is not supported (only full attention; sliding_window must be null)");
  if (c.arch == "qwen2" && get_bool_or(j, "use_sliding_window", false))
    fail("qwen2 use_sliding_window=true is not supported (only full attention)");
  if (has(j, "hidden_act")) {
    const json& a = j.at("hidden_act");
    if (!a.is_string() || (a.get<std::string>() != "silu" && a.get<std::string>() != "swish"))
      fail("hidden_act=" + a.dump() + " is not supported (silu)");
  }
  if (get_bool_or(j, "attention_bias", false) && c.arch != "qwen2")
    fail("attention_bias=true is not supported for " + c.arch);
  if (get_bool_or(j, "mlp_bias", false)) fail("mlp_bias=true is not supported");

  c.hidden = get_int(j, "hidden_size");
  c.intermediate = get_int(j, "intermediate_size");
  c.n_layers = get_int(j, "num_hidden_layers");
  c.n_heads = get_int(j, "num_attention_heads");
  c.n_kv_heads = get_int_or(j, "num_key_value_heads", c.n_heads);
  if (c.n_heads > 0 && c.hidden % c.n_heads != 0 && !has(j, "head_dim"))
    fail("hidden_size=" + std::to_string(c.hidden) + " is not a multiple of num_attention_heads=" +
         std::to_string(c.n_heads) + " and head_dim is not given");
  c.head_dim = get_int_or(j, "head_dim", c.n_heads > 0 ? c.hidden / c.n_heads : 0);
  c.vocab = get_int(j, "vocab_size");
  c.max_position = get_int(j, "max_position_embeddings");
  const double eps = get_num_or(j, "rms_norm_eps", 1e-6);  // HF default
  c.rms_eps = static_cast<float>(eps);
  c.rope_theta = get_num_or(j, "rope_theta", 10000.0);
  c.rope_scaling = parse_rope_scaling(j);
  c.rope_style = RopeStyle::kRotateHalf;
  c.tie_word_embeddings = get_bool_or(j, "tie_word_embeddings", false);
  c.qkv_bias = c.arch == "qwen2";
  c.bos_id = get_token_id_or(j, "bos_token_id", c.bos_id);
  c.eos_id = get_token_id_or(j, "eos_token_id", c.eos_id);
  c.validate();
  return c;
}

ModelConfig named_shape(const std::string& name) {
  ModelConfig c;
  c.arch = "llama";
  c.rms_eps = 1e-5f;
  c.rope_theta = 10000.0;
  if (name == "tiny") {  // GQA 2:1, small enough for CPU tests at 4K+ tokens
    c.hidden = 128;
    c.intermediate = 352;
    c.n_layers = 4;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 32;
    c.vocab = 512;
    c.max_position = 1 << 20;
  } else if (name == "stories15m") {  // llama2.c stories15M (adjacent-pair RoPE, tied output)
    c.hidden = 288;
    c.intermediate = 768;
    c.n_layers = 6;
    c.n_heads = 6;
    c.n_kv_heads = 6;
    c.head_dim = 48;
    c.vocab = 32000;
    c.max_position = 256;
    c.rope_style = RopeStyle::kAdjacentPairs;
    c.tie_word_embeddings = true;
  } else if (name == "llama3-8b") {  // Llama 3.1 8B
    c.hidden = 4096;
    c.intermediate = 14336;
    c.n_layers = 32;
    c.n_heads = 32;
    c.n_kv_heads = 8;
    c.head_dim = 128;
    c.vocab = 128256;
    c.max_position = 1 << 21;
    c.rope_theta = 500000.0;
    c.rope_scaling.llama3 = true;
    c.rope_scaling.factor = 8.0;
    c.rope_scaling.low_freq_factor = 1.0;
    c.rope_scaling.high_freq_factor = 4.0;
    c.rope_scaling.original_max_position = 8192.0;
    c.bos_id = 128000;
    c.eos_id = 128001;
  } else {
    fail("unknown model shape '" + name + "' (known: tiny, stories15m, llama3-8b)");
  }
  c.validate();
  return c;
}

}  // namespace mprefill
