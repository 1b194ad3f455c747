#include "model/fingerprint.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <vector>

#include "model/hf_config.h"
#include "model/llama2c.h"
#include "model/safetensors.h"

namespace mprefill {
namespace {

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull, kP2 = 0xC2B2AE3D27D4EB4Full;

uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

uint64_t mix64(uint64_t z) {  // splitmix64 finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Streaming 128-bit hash: four independent 64-bit lanes over 32-byte blocks (so the
// multiplies pipeline), folded into two words. Not cryptographic.
class Digest {
 public:
  void bytes(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    total_ += n;
    for (; n >= 32; p += 32, n -= 32) {
      uint64_t w[4];
      std::memcpy(w, p, 32);
      for (int i = 0; i < 4; ++i) lane_[i] = rotl(lane_[i] ^ (w[i] * kP1), 31) * kP2;
    }
    for (; n > 0; ++p, --n) lane_[0] = rotl(lane_[0] ^ (*p * kP1), 23) * kP2;
  }
  void u64(uint64_t v) { bytes(&v, 8); }
  void str(const std::string& s) {
    u64(s.size());
    bytes(s.data(), s.size());
  }
  std::string hex() const {
    uint64_t h0 = mix64(lane_[0] ^ rotl(lane_[1], 17) ^ total_);
    uint64_t h1 = mix64(lane_[2] ^ rotl(lane_[3], 29) ^ mix64(h0 + kP2));
    h0 = mix64(h0 ^ rotl(lane_[3], 7) ^ lane_[2]);
    char buf[33];
    std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(h0),
                  static_cast<unsigned long long>(h1));
    return buf;
  }

 private:
  uint64_t lane_[4] = {0x243F6A8885A308D3ull, 0x13198A2E03707344ull, 0xA4093822299F31D0ull,
                       0x082EFA98EC4E6C89ull};
  uint64_t total_ = 0;
};

// Head of one tensor's record: name, shape, value count; the fp32 bytes follow (fed in
// one or more Digest::bytes calls, each but the last a multiple of 32 bytes: the same
// digest as one call).
void tensor_head(Digest* d, const std::string& name, const std::vector<int64_t>& shape) {
  d->str(name);
  d->u64(shape.size());
  int64_t n = 1;
  for (int64_t s : shape) {
    d->u64(static_cast<uint64_t>(s));
    n *= s;
  }
  d->u64(shape.empty() ? 0 : static_cast<uint64_t>(n));
}

// The tensors of a model in digest order, by their names in the digest and in an HF
// checkpoint. Biases come only with qkv_bias (otherwise hashed as empty tensors).
enum class Slot { kAttnNorm, kWq, kWk, kWv, kWo, kBq, kBk, kBv, kFfnNorm, kGate, kUp, kDown };
struct LayerTensor {
  Slot slot;
  const char* name;     // in the digest, after "<layer>."
  const char* hf_name;  // after "model.layers.<layer>."
  Tensor LayerWeights::*field;
};
constexpr LayerTensor kLayerTensors[] = {
    {Slot::kAttnNorm, "attn_norm", "input_layernorm.weight", &LayerWeights::attn_norm},
    {Slot::kWq, "wq", "self_attn.q_proj.weight", &LayerWeights::wq},
    {Slot::kWk, "wk", "self_attn.k_proj.weight", &LayerWeights::wk},
    {Slot::kWv, "wv", "self_attn.v_proj.weight", &LayerWeights::wv},
    {Slot::kWo, "wo", "self_attn.o_proj.weight", &LayerWeights::wo},
    {Slot::kBq, "bq", "self_attn.q_proj.bias", &LayerWeights::bq},
    {Slot::kBk, "bk", "self_attn.k_proj.bias", &LayerWeights::bk},
    {Slot::kBv, "bv", "self_attn.v_proj.bias", &LayerWeights::bv},
    {Slot::kFfnNorm, "ffn_norm", "post_attention_layernorm.weight", &LayerWeights::ffn_norm},
    {Slot::kGate, "w_gate", "mlp.gate_proj.weight", &LayerWeights::w_gate},
    {Slot::kUp, "w_up", "mlp.up_proj.weight", &LayerWeights::w_up},
    {Slot::kDown, "w_down", "mlp.down_proj.weight", &LayerWeights::w_down}};

// Shape of a layer tensor under a config; {} for a bias the model does not have.
std::vector<int64_t> layer_shape(const ModelConfig& c, Slot s) {
  const int64_t h = c.hidden, f = c.intermediate, q = c.q_dim(), kv = c.kv_dim();
  switch (s) {
    case Slot::kAttnNorm:
    case Slot::kFfnNorm:
      return {h};
    case Slot::kWq:
      return {q, h};
    case Slot::kWk:
    case Slot::kWv:
      return {kv, h};
    case Slot::kWo:
      return {h, q};
    case Slot::kBq:
      return c.qkv_bias ? std::vector<int64_t>{q} : std::vector<int64_t>{};
    case Slot::kBk:
    case Slot::kBv:
      return c.qkv_bias ? std::vector<int64_t>{kv} : std::vector<int64_t>{};
    case Slot::kGate:
    case Slot::kUp:
      return {f, h};
    case Slot::kDown:
      return {h, f};
  }
  return {};
}

// Every tensor in digest order: emit(digest name, HF name, shape under c, layer index
// or -1, its kLayerTensors entry or null). The caller hashes the head and the values.
template <class Emit>
void for_each_tensor(const ModelConfig& c, Emit&& emit) {
  const int64_t h = c.hidden, v = c.vocab;
  emit(std::string("embed"), std::string("model.embed_tokens.weight"), std::vector<int64_t>{v, h},
       -1, nullptr);
  for (int l = 0; l < c.n_layers; ++l)
    for (const LayerTensor& t : kLayerTensors)
      emit(std::to_string(l) + "." + t.name, "model.layers." + std::to_string(l) + "." + t.hf_name,
           layer_shape(c, t.slot), l, &t);
  emit(std::string("final_norm"), std::string("model.norm.weight"), std::vector<int64_t>{h}, -1,
       nullptr);
  emit(std::string("output"),
       std::string(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight"),
       std::vector<int64_t>{v, h}, -1, nullptr);
}

// Rows per read of a [rows][cols] fp32 tensor: a multiple of 8 (so each read is a
// multiple of 32 bytes) of about chunk_bytes.
int64_t rows_per_chunk(int64_t cols, int64_t chunk_bytes) {
  const int64_t r = chunk_bytes / std::max<int64_t>(1, cols * int64_t{sizeof(float)});
  return std::max<int64_t>(8, r / 8 * 8);
}

struct FileDigest {
  ModelConfig config;
  std::string digest;
  DType stored_dtype = DType::kF32;
};

// An HF directory, tensor by tensor (rows in chunks, converted to fp32 as load_hf_dir
// does).
FileDigest hf_dir_digest(const std::string& dir, int64_t chunk_bytes) {
  const ModelConfig c = read_hf_dir_config(dir);
  const SafetensorsCheckpoint ck(dir);
  if (!c.tie_word_embeddings && !ck.has("lm_head.weight"))
    throw std::runtime_error("tensor lm_head.weight not found in " + dir +
                             " (config.json has tie_word_embeddings false)");
  Digest d;
  d.str(c.fingerprint());
  for_each_tensor(c, [&](const std::string& name, const std::string& hf_name,
                         const std::vector<int64_t>& shape, int, const LayerTensor*) {
    tensor_head(&d, name, shape);
    if (shape.empty()) return;  // absent bias
    const int64_t rows = shape[0], cols = shape.size() > 1 ? shape[1] : 1;
    if (shape.size() == 1) {
      const Tensor t = ck.load(hf_name, shape);
      d.bytes(t.data.data(), t.data.size() * sizeof(float));
      return;
    }
    const int64_t step = rows_per_chunk(cols, chunk_bytes);
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const Tensor t = ck.load(hf_name, shape, RowSlice{r0, std::min(step, rows - r0)});
      d.bytes(t.data.data(), t.data.size() * sizeof(float));
    }
  });
  return {c, d.hex(), checkpoint_dtype(ck)};
}

// A llama2.c .bin: the fp32 arrays read in place of the file (per-layer arrays are
// stored [L][...]: layer l's tensor at l * its size within the array).
FileDigest llama2c_digest(const std::string& path, int64_t chunk_bytes) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open llama2.c checkpoint " + path);
  char head[kLlama2cHeaderBytes];
  f.read(head, sizeof head);
  if (!f)
    throw std::runtime_error("truncated llama2.c checkpoint " + path +
                             ": less than the 28-byte header");
  const Llama2cHeader h = parse_llama2c_header(head, path);
  std::error_code ec;
  const uint64_t size = std::filesystem::file_size(path, ec);
  const uint64_t want = llama2c_file_size(h);
  if (ec || size != want)
    throw std::runtime_error(std::string(size < want ? "truncated" : "corrupt") +
                             " llama2.c checkpoint " + path + ": " + std::to_string(size) +
                             " bytes, its header implies " + std::to_string(want));
  ModelConfig c = llama2c_config(h);
  c.validate();

  // Float offset of each array after the header, in file order.
  const int64_t dim = h.dim, hid = h.hidden_dim, kv = h.kv_dim(), vocab = h.vocab(), L = h.n_layers;
  int64_t at = 0;
  auto array = [&](int64_t floats) {
    const int64_t o = at;
    at += floats;
    return o;
  };
  const int64_t embed = array(vocab * dim), att = array(L * dim), wq = array(L * dim * dim),
                wk = array(L * kv * dim), wv = array(L * kv * dim), wo = array(L * dim * dim),
                ffn = array(L * dim), w1 = array(L * hid * dim), w2 = array(L * dim * hid),
                w3 = array(L * hid * dim), final_norm = array(dim);
  array(2 * int64_t{h.seq_len} * (h.head_dim() / 2));  // freq_cis (unused)
  const int64_t wcls = h.shared_classifier() ? embed : array(vocab * dim);
  auto layer_array = [&](Slot s) -> int64_t {
    switch (s) {
      case Slot::kAttnNorm:
        return att;
      case Slot::kWq:
        return wq;
      case Slot::kWk:
        return wk;
      case Slot::kWv:
        return wv;
      case Slot::kWo:
        return wo;
      case Slot::kFfnNorm:
        return ffn;
      case Slot::kGate:
        return w1;
      case Slot::kDown:
        return w2;
      case Slot::kUp:
        return w3;
      default:
        return -1;  // no biases in this format
    }
  };

  Digest d;
  d.str(c.fingerprint());
  std::vector<char> buf;
  for_each_tensor(c, [&](const std::string& name, const std::string& hf_name,
                         const std::vector<int64_t>& shape, int l, const LayerTensor* t) {
    tensor_head(&d, name, shape);
    if (shape.empty()) return;
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    int64_t first;
    if (t) {
      first = layer_array(t->slot) + l * n;
    } else if (name == "embed") {
      first = embed;
    } else if (name == "final_norm") {
      first = final_norm;
    } else {
      first = wcls;
    }
    const int64_t cols = shape.size() > 1 ? shape[1] : n;
    const int64_t step = rows_per_chunk(cols, chunk_bytes) * cols;  // floats per read
    f.seekg(static_cast<std::streamoff>(kLlama2cHeaderBytes + 4 * first));
    for (int64_t done = 0; done < n; done += step) {
      const int64_t m = std::min(step, n - done);
      buf.resize(static_cast<size_t>(m * 4));
      f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      if (!f) throw std::runtime_error("read error in " + path + " (tensor " + hf_name + ")");
      d.bytes(buf.data(), buf.size());
    }
  });
  return {c, d.hex()};
}

}  // namespace

std::string weights_digest(const ModelWeights& w) {
  Digest d;
  d.str(w.config.fingerprint());
  for_each_tensor(w.config, [&](const std::string& name, const std::string&,
                                const std::vector<int64_t>&, int l, const LayerTensor* t) {
    const Tensor& x = t                      ? w.layers[l].*(t->field)
                      : name == "embed"      ? w.embed
                      : name == "final_norm" ? w.final_norm
                                             : w.output_matrix();
    tensor_head(&d, name, x.shape);
    d.bytes(x.data.data(), x.data.size() * sizeof(float));
  });
  return d.hex();
}

std::string model_name_from_path(const std::string& path) {
  if (path.rfind("random:", 0) == 0) return path;
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const size_t slash = p.find_last_of('/');
  if (slash != std::string::npos) p = p.substr(slash + 1);
  for (const char* ext : {".bin", ".safetensors"}) {
    const size_t n = std::strlen(ext);
    if (p.size() > n && p.compare(p.size() - n, n, ext) == 0) p.resize(p.size() - n);
  }
  return p;
}

namespace {

ModelFingerprint fingerprint_of(const ModelConfig& c, const std::string& name, std::string digest,
                                DType stored_dtype) {
  ModelFingerprint f;
  f.kv_dtype = model_kv_dtype(stored_dtype);
  f.name = name;
  f.n_layers = c.n_layers;
  f.hidden = c.hidden;
  f.n_heads = c.n_heads;
  f.n_kv_heads = c.n_kv_heads;
  f.head_dim = c.head_dim;
  f.vocab = c.vocab;
  f.max_position = c.max_position;
  f.weights_digest = std::move(digest);
  return f;
}

}  // namespace

ModelFingerprint model_fingerprint(const ModelWeights& w, const std::string& name) {
  return fingerprint_of(w.config, name, weights_digest(w), w.stored_dtype);
}

ModelFingerprint model_fingerprint_of_path(const std::string& path, int64_t chunk_bytes) {
  const std::string name = model_name_from_path(path);
  std::error_code ec;
  if (path.rfind("random:", 0) != 0) {
    if (std::filesystem::is_directory(path, ec)) {
      const FileDigest fd = hf_dir_digest(path, chunk_bytes);
      return fingerprint_of(fd.config, name, fd.digest, fd.stored_dtype);
    }
    if (std::filesystem::is_regular_file(path, ec) &&
        std::filesystem::path(path).extension() == ".bin") {
      const FileDigest fd = llama2c_digest(path, chunk_bytes);
      return fingerprint_of(fd.config, name, fd.digest, fd.stored_dtype);
    }
  }
  // random:NAME[:SEED] (no file: generated whole), or load_model's error for a path that
  // is neither.
  return model_fingerprint(load_model(path), name);
}

std::string ModelFingerprint::to_string() const {
  return name + " L" + std::to_string(n_layers) + " H" + std::to_string(hidden) + " h" +
         std::to_string(n_heads) + "/" + std::to_string(n_kv_heads) + "x" +
         std::to_string(head_dim) + " V" + std::to_string(vocab) + " kv " +
         mprefill::to_string(kv_dtype) + " digest " + weights_digest;
}

}  // namespace mprefill
