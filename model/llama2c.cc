#include "model/llama2c.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "model/weights.h"

namespace mprefill {

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

// Bounds that keep every size computation far from uint64 overflow.
constexpr int32_t kMaxDim = 1 << 20;
constexpr int32_t kMaxLayers = 1 << 12;
constexpr int32_t kMaxVocab = 1 << 24;

// Read-only mapping of a whole file, unmapped on destruction.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail("cannot open llama2.c checkpoint " + path + ": " + std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      fail("llama2.c checkpoint " + path + " is not a regular file");
    }
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      const int e = errno;
      ::close(fd);
      if (p == MAP_FAILED) fail("cannot mmap " + path + ": " + std::strerror(e));
      base_ = static_cast<const uint8_t*>(p);
    } else {
      ::close(fd);
    }
  }
  ~MappedFile() {
    if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return base_; }
  uint64_t size() const { return size_; }

 private:
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
};

std::string describe(const Llama2cHeader& h) {
  return "dim=" + std::to_string(h.dim) + " hidden_dim=" + std::to_string(h.hidden_dim) +
         " n_layers=" + std::to_string(h.n_layers) + " n_heads=" + std::to_string(h.n_heads) +
         " n_kv_heads=" + std::to_string(h.n_kv_heads) +
         " vocab_size=" + std::to_string(h.vocab_size) + " seq_len=" + std::to_string(h.seq_len);
}

}  // namespace

Llama2cHeader parse_llama2c_header(const void* bytes, const std::string& path) {
  int32_t v[7];
  std::memcpy(v, bytes, sizeof v);
  Llama2cHeader h;
  h.dim = v[0];
  h.hidden_dim = v[1];
  h.n_layers = v[2];
  h.n_heads = v[3];
  h.n_kv_heads = v[4];
  h.vocab_size = v[5];
  h.seq_len = v[6];
  const std::string where = "corrupt llama2.c header in " + path + " (" + describe(h) + "): ";
  auto in_range = [](int32_t x, int32_t hi) { return x > 0 && x <= hi; };
  if (!in_range(h.dim, kMaxDim)) fail(where + "dim must be in [1, 2^20]");
  if (!in_range(h.hidden_dim, kMaxDim)) fail(where + "hidden_dim must be in [1, 2^20]");
  if (!in_range(h.n_layers, kMaxLayers)) fail(where + "n_layers must be in [1, 4096]");
  if (!in_range(h.n_heads, h.dim)) fail(where + "n_heads must be in [1, dim]");
  if (!in_range(h.n_kv_heads, h.n_heads)) fail(where + "n_kv_heads must be in [1, n_heads]");
  if (h.vocab_size == 0 || h.vocab_size < -kMaxVocab || h.vocab_size > kMaxVocab)
    fail(where + "|vocab_size| must be in [1, 2^24]");
  if (!in_range(h.seq_len, kMaxDim)) fail(where + "seq_len must be in [1, 2^20]");
  if (h.dim % h.n_heads != 0) fail(where + "dim is not a multiple of n_heads");
  if (h.head_dim() % 2 != 0) fail(where + "head_dim = dim / n_heads is odd");
  if (h.n_heads % h.n_kv_heads != 0) fail(where + "n_heads is not a multiple of n_kv_heads");
  return h;
}

uint64_t llama2c_file_size(const Llama2cHeader& h) {
  const uint64_t dim = h.dim, hid = h.hidden_dim, L = h.n_layers, kv = h.kv_dim(),
                 vocab = h.vocab(), hd = h.head_dim(), seq = h.seq_len;
  uint64_t floats = vocab * dim            // tok_embeddings
                    + L * dim              // rms_att
                    + L * dim * dim        // wq
                    + 2 * L * kv * dim     // wk, wv
                    + L * dim * dim        // wo
                    + L * dim              // rms_ffn
                    + 3 * L * hid * dim    // w1, w2, w3
                    + dim                  // rms_final
                    + 2 * seq * (hd / 2);  // freq_cis_real, freq_cis_imag
  if (!h.shared_classifier()) floats += vocab * dim;
  return kLlama2cHeaderBytes + 4 * floats;
}

ModelConfig llama2c_config(const Llama2cHeader& h) {
  ModelConfig c;
  c.arch = "llama";
  c.hidden = h.dim;
  c.intermediate = h.hidden_dim;
  c.n_layers = h.n_layers;
  c.n_heads = h.n_heads;
  c.n_kv_heads = h.n_kv_heads;
  c.head_dim = static_cast<int>(h.head_dim());
  c.vocab = static_cast<int>(h.vocab());
  c.max_position = h.seq_len;
  c.rms_eps = 1e-5f;
  c.rope_theta = 10000.0;
  c.rope_scaling = RopeScaling{};
  c.rope_style = RopeStyle::kAdjacentPairs;
  c.tie_word_embeddings = h.shared_classifier();
  c.qkv_bias = false;
  c.bos_id = 1;
  c.eos_id = 2;
  return c;
}

ModelWeights load_llama2c(const std::string& bin_path) {
  const MappedFile file(bin_path);
  if (file.size() < kLlama2cHeaderBytes)
    fail("truncated llama2.c checkpoint " + bin_path + ": " + std::to_string(file.size()) +
         " bytes, less than the 28-byte header");
  const Llama2cHeader h = parse_llama2c_header(file.data(), bin_path);
  const uint64_t want = llama2c_file_size(h);
  if (file.size() != want)
    fail(std::string(file.size() < want ? "truncated" : "corrupt") + " llama2.c checkpoint " +
         bin_path + ": " + std::to_string(file.size()) + " bytes, but its header (" + describe(h) +
         ") implies " + std::to_string(want) + " bytes");

  ModelWeights w;
  w.config = llama2c_config(h);
  w.config.validate();
  const int64_t dim = h.dim, hid = h.hidden_dim, kv = h.kv_dim(), vocab = h.vocab();
  const float* p = reinterpret_cast<const float*>(file.data() + kLlama2cHeaderBytes);
  // Sequential cursor over the fp32 arrays (the mapping is 4-byte aligned: page + 28).
  auto take = [&p](std::vector<int64_t> shape) {
    Tensor t;
    t.shape = std::move(shape);
    t.data.assign(p, p + t.numel());
    p += t.numel();
    return t;
  };
  // Per-layer arrays are stored [L][...]: slice each one into the layers.
  auto take_layers = [&](Tensor LayerWeights::*field, std::vector<int64_t> shape) {
    for (LayerWeights& L : w.layers) L.*field = take(shape);
  };
  w.embed = take({vocab, dim});
  w.layers.resize(h.n_layers);
  take_layers(&LayerWeights::attn_norm, {dim});
  take_layers(&LayerWeights::wq, {dim, dim});
  take_layers(&LayerWeights::wk, {kv, dim});
  take_layers(&LayerWeights::wv, {kv, dim});
  take_layers(&LayerWeights::wo, {dim, dim});
  take_layers(&LayerWeights::ffn_norm, {dim});
  take_layers(&LayerWeights::w_gate, {hid, dim});  // w1
  take_layers(&LayerWeights::w_down, {dim, hid});  // w2
  take_layers(&LayerWeights::w_up, {hid, dim});    // w3
  w.final_norm = take({dim});
  p += 2 * static_cast<int64_t>(h.seq_len) * (h.head_dim() / 2);  // freq_cis (unused)
  if (!h.shared_classifier()) w.lm_head = take({vocab, dim});
  return w;
}

}  // namespace mprefill
