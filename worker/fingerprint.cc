#include "worker/fingerprint.h"

#include <cstdio>
#include <cstring>

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

void add_tensor(Digest* d, const std::string& name, const Tensor& t) {
  d->str(name);
  d->u64(t.shape.size());
  for (int64_t s : t.shape) d->u64(static_cast<uint64_t>(s));
  d->u64(t.data.size());
  d->bytes(t.data.data(), t.data.size() * sizeof(float));
}

}  // namespace

std::string weights_digest(const ModelWeights& w) {
  Digest d;
  d.str(w.config.fingerprint());
  add_tensor(&d, "embed", w.embed);
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string p = std::to_string(l) + ".";
    const std::pair<const char*, const Tensor*> ts[] = {{"attn_norm", &L.attn_norm},
                                                        {"wq", &L.wq},
                                                        {"wk", &L.wk},
                                                        {"wv", &L.wv},
                                                        {"wo", &L.wo},
                                                        {"bq", &L.bq},
                                                        {"bk", &L.bk},
                                                        {"bv", &L.bv},
                                                        {"ffn_norm", &L.ffn_norm},
                                                        {"w_gate", &L.w_gate},
                                                        {"w_up", &L.w_up},
                                                        {"w_down", &L.w_down}};
    for (const auto& [n, t] : ts) add_tensor(&d, p + n, *t);
  }
  add_tensor(&d, "final_norm", w.final_norm);
  add_tensor(&d, "output", w.output_matrix());
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

ModelFingerprint model_fingerprint(const ModelWeights& w, const std::string& name) {
  const ModelConfig& c = w.config;
  ModelFingerprint f;
  f.name = name;
  f.n_layers = c.n_layers;
  f.hidden = c.hidden;
  f.n_heads = c.n_heads;
  f.n_kv_heads = c.n_kv_heads;
  f.head_dim = c.head_dim;
  f.vocab = c.vocab;
  f.max_position = c.max_position;
  f.weights_digest = weights_digest(w);
  return f;
}

std::string ModelFingerprint::to_string() const {
  return name + " L" + std::to_string(n_layers) + " H" + std::to_string(hidden) + " h" +
         std::to_string(n_heads) + "/" + std::to_string(n_kv_heads) + "x" +
         std::to_string(head_dim) + " V" + std::to_string(vocab) + " digest " + weights_digest;
}

}  // namespace mprefill
