// Model loading: llama2.c .bin (stories15M and hand-built files), HF directories
// (single, sharded, Qwen2 biases), the llama2.c -> HF converter and its RoPE row
// permutation, and the mprefill-convert CLI.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "model/convert.h"
#include "model/llama2c.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

namespace fs = std::filesystem;
using test::error_of;
using test::expect_one_line_containing;
using test::TempDir;

std::string stories_bin() { return test::shared_dir() + "/models/stories15M/stories15M.bin"; }

void write_bytes(const std::string& path, const void* p, size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
  ASSERT_TRUE(f.good());
}

std::vector<char> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

// One float at float index `i` after the 28-byte header, read with fseek/fread.
float fread_float(FILE* f, int64_t i) {
  float v = NAN;
  EXPECT_EQ(std::fseek(f, 28 + 4 * i, SEEK_SET), 0);
  EXPECT_EQ(std::fread(&v, 4, 1, f), 1u);
  return v;
}

bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

void expect_tensor_eq(const Tensor& a, const Tensor& b, const std::string& what) {
  EXPECT_EQ(a.shape, b.shape) << what;
  EXPECT_TRUE(bits_equal(a.data, b.data)) << what;
}

// Every weight of a and b bit-equal; wq/wk of `hf` are un-permuted first.
void expect_same_model(const ModelWeights& l2c, const ModelWeights& hf) {
  const ModelConfig& c = l2c.config;
  expect_tensor_eq(l2c.embed, hf.embed, "embed");
  expect_tensor_eq(l2c.final_norm, hf.final_norm, "final_norm");
  expect_tensor_eq(l2c.lm_head, hf.lm_head, "lm_head");
  ASSERT_EQ(l2c.layers.size(), hf.layers.size());
  for (size_t i = 0; i < l2c.layers.size(); ++i) {
    const LayerWeights &a = l2c.layers[i], &b = hf.layers[i];
    const std::string li = "layer " + std::to_string(i);
    Tensor wq = b.wq, wk = b.wk;
    wq.data = permute_rows_half_to_adjacent(b.wq.data.data(), c.n_heads, c.head_dim, c.hidden);
    wk.data = permute_rows_half_to_adjacent(b.wk.data.data(), c.n_kv_heads, c.head_dim, c.hidden);
    expect_tensor_eq(a.wq, wq, li + " wq");
    expect_tensor_eq(a.wk, wk, li + " wk");
    EXPECT_FALSE(bits_equal(a.wq.data, b.wq.data)) << li << " wq was not permuted";
    expect_tensor_eq(a.wv, b.wv, li + " wv");
    expect_tensor_eq(a.wo, b.wo, li + " wo");
    expect_tensor_eq(a.attn_norm, b.attn_norm, li + " attn_norm");
    expect_tensor_eq(a.ffn_norm, b.ffn_norm, li + " ffn_norm");
    expect_tensor_eq(a.w_gate, b.w_gate, li + " w_gate");
    expect_tensor_eq(a.w_up, b.w_up, li + " w_up");
    expect_tensor_eq(a.w_down, b.w_down, li + " w_down");
  }
}

// A hand-built llama2.c file with random weights. vocab < 0: separate classifier.
struct TinyBin {
  int32_t hdr[7];
  std::vector<float> body;
};
TinyBin make_tiny_bin(int dim, int hidden, int layers, int heads, int kv_heads, int vocab, int seq,
                      uint64_t seed) {
  TinyBin t{{dim, hidden, layers, heads, kv_heads, vocab, seq}, {}};
  const int64_t hd = dim / heads, kv = hd * kv_heads, v = std::abs(vocab);
  const int64_t n = v * dim + layers * (2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * hidden * dim) +
                    dim + seq * hd + (vocab < 0 ? v * dim : 0);
  t.body = test::random_normal(static_cast<size_t>(n), seed);
  return t;
}
void write_tiny_bin(const std::string& path, const TinyBin& t) {
  std::string bytes(reinterpret_cast<const char*>(t.hdr), sizeof t.hdr);
  bytes.append(reinterpret_cast<const char*>(t.body.data()), 4 * t.body.size());
  write_bytes(path, bytes.data(), bytes.size());
}

// ------------------------------------------------------------------ llama2.c

TEST(Llama2c, Stories15MConfigAndSpotValues) {
  const std::string path = stories_bin();
  ASSERT_TRUE(test::file_exists(path)) << path;
  const ModelWeights w = load_llama2c(path);
  const ModelConfig& c = w.config;
  EXPECT_EQ(c.arch, "llama");
  EXPECT_EQ(c.hidden, 288);
  EXPECT_EQ(c.intermediate, 768);
  EXPECT_EQ(c.n_layers, 6);
  EXPECT_EQ(c.n_heads, 6);
  EXPECT_EQ(c.n_kv_heads, 6);
  EXPECT_EQ(c.head_dim, 48);
  EXPECT_EQ(c.vocab, 32000);
  EXPECT_EQ(c.max_position, 256);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-5f);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.rope_scaling.llama3);
  EXPECT_EQ(c.rope_style, RopeStyle::kAdjacentPairs);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.bos_id, 1);
  EXPECT_EQ(c.eos_id, 2);
  EXPECT_TRUE(w.lm_head.empty());
  EXPECT_EQ(&w.output_matrix(), &w.embed);
  ASSERT_EQ(w.layers.size(), 6u);
  EXPECT_EQ(w.embed.shape, (std::vector<int64_t>{32000, 288}));
  EXPECT_EQ(w.layers[5].w_down.shape, (std::vector<int64_t>{288, 768}));
  EXPECT_EQ(w.layers[0].w_gate.shape, (std::vector<int64_t>{768, 288}));
  EXPECT_EQ(w.final_norm.shape, (std::vector<int64_t>{288}));

  // Offsets (in floats after the header) computed here independently of the loader.
  const int64_t V = 32000, D = 288, H = 768, L = 6, KV = 288;
  const int64_t o_emb = 0, o_rms_att = o_emb + V * D, o_wq = o_rms_att + L * D,
                o_wk = o_wq + L * D * D, o_wv = o_wk + L * KV * D, o_wo = o_wv + L * KV * D,
                o_rms_ffn = o_wo + L * D * D, o_w1 = o_rms_ffn + L * D, o_w2 = o_w1 + L * H * D,
                o_w3 = o_w2 + L * D * H, o_rms_final = o_w3 + L * H * D;
  FILE* f = std::fopen(path.c_str(), "rb");
  ASSERT_NE(f, nullptr);
  std::mt19937_64 g(42);
  auto pick = [&g](int64_t n) { return static_cast<int64_t>(g() % static_cast<uint64_t>(n)); };
  for (int s = 0; s < 20; ++s) {
    const int64_t l = pick(L), r = pick(D), cc = pick(D), hr = pick(H), hc = pick(H), v = pick(V);
    const LayerWeights& lw = w.layers[l];
    EXPECT_EQ(w.embed.data[v * D + cc], fread_float(f, o_emb + v * D + cc));
    EXPECT_EQ(lw.attn_norm.data[r], fread_float(f, o_rms_att + l * D + r));
    EXPECT_EQ(lw.wq.data[r * D + cc], fread_float(f, o_wq + (l * D + r) * D + cc));
    EXPECT_EQ(lw.wk.data[r * D + cc], fread_float(f, o_wk + (l * KV + r) * D + cc));
    EXPECT_EQ(lw.wv.data[r * D + cc], fread_float(f, o_wv + (l * KV + r) * D + cc));
    EXPECT_EQ(lw.wo.data[r * D + cc], fread_float(f, o_wo + (l * D + r) * D + cc));
    EXPECT_EQ(lw.ffn_norm.data[r], fread_float(f, o_rms_ffn + l * D + r));
    EXPECT_EQ(lw.w_gate.data[hr * D + cc], fread_float(f, o_w1 + (l * H + hr) * D + cc));
    EXPECT_EQ(lw.w_down.data[r * H + hc], fread_float(f, o_w2 + (l * D + r) * H + hc));
    EXPECT_EQ(lw.w_up.data[hr * D + cc], fread_float(f, o_w3 + (l * H + hr) * D + cc));
    EXPECT_EQ(w.final_norm.data[r], fread_float(f, o_rms_final + r));
  }
  // Last element of the last array before freq_cis.
  EXPECT_EQ(w.final_norm.data[D - 1], fread_float(f, o_rms_final + D - 1));
  EXPECT_EQ(w.layers[5].w_up.data.back(), fread_float(f, o_w3 + L * H * D - 1));
  std::fclose(f);
  // The norms of a trained model are not zero-filled garbage.
  EXPECT_GT(std::fabs(w.final_norm.data[0]), 1e-3f);
}

TEST(Llama2c, TruncatedOrCorruptFilesGiveOneClearLine) {
  const std::vector<char> bin = read_all(stories_bin());
  ASSERT_EQ(bin.size(), 60816028u);
  TempDir dir;
  for (size_t n :
       {size_t{0}, size_t{10}, size_t{28}, size_t{1000}, bin.size() / 2, bin.size() - 4}) {
    SCOPED_TRACE(n);
    const std::string p = dir.file("trunc_" + std::to_string(n) + ".bin");
    write_bytes(p, bin.data(), n);
    expect_one_line_containing(error_of([&] { load_llama2c(p); }), {"truncated", p});
    // load_model dispatches .bin files to the same loader.
    expect_one_line_containing(error_of([&] { load_model(p); }), {"truncated", p});
  }
  {  // Extra trailing bytes.
    std::vector<char> longer = bin;
    longer.resize(bin.size() + 4);
    const std::string p = dir.file("long.bin");
    write_bytes(p, longer.data(), longer.size());
    expect_one_line_containing(error_of([&] { load_llama2c(p); }),
                               {"corrupt", p, "60816032 bytes", "implies 60816028"});
  }
  // Nonsensical headers: each field broken in turn (file otherwise intact).
  struct Bad {
    int field;
    int32_t value;
    std::string expect;
  };
  for (const Bad& b :
       {Bad{0, -288, "dim"}, Bad{0, 0x7fffffff, "dim"}, Bad{1, 0, "hidden_dim"},
        Bad{2, 100000, "n_layers"}, Bad{3, 7, "multiple of n_heads"}, Bad{3, 0, "n_heads"},
        Bad{4, 4, "multiple of n_kv_heads"}, Bad{4, 12, "n_kv_heads"}, Bad{5, 0, "vocab_size"},
        Bad{6, -1, "seq_len"}, Bad{3, 96, "head_dim"}}) {
    SCOPED_TRACE(b.expect);
    std::vector<char> bad(bin.begin(), bin.begin() + 4096);
    std::memcpy(bad.data() + 4 * b.field, &b.value, 4);
    const std::string p = dir.file("bad.bin");
    write_bytes(p, bad.data(), bad.size());
    expect_one_line_containing(error_of([&] { load_llama2c(p); }),
                               {"corrupt llama2.c header", p, b.expect});
  }
  {  // A valid-looking header that claims a separate classifier: size mismatch.
    std::vector<char> neg = bin;
    const int32_t v = -32000;
    std::memcpy(neg.data() + 20, &v, 4);
    const std::string p = dir.file("neg.bin");
    write_bytes(p, neg.data(), neg.size());
    expect_one_line_containing(error_of([&] { load_llama2c(p); }),
                               {"truncated", p, "vocab_size=-32000"});
  }
  expect_one_line_containing(error_of([&] { load_llama2c(dir.file("missing.bin")); }),
                             {"cannot open", dir.file("missing.bin")});
}

TEST(Llama2c, SeparateClassifierAndGqa) {
  TempDir dir;
  // dim 20, 2 heads of 10, 1 kv head, vocab 11 with its own classifier.
  const TinyBin t = make_tiny_bin(20, 13, 2, 2, 1, -11, 5, 3);
  const std::string p = dir.file("tiny.bin");
  write_tiny_bin(p, t);
  const ModelWeights w = load_llama2c(p);
  EXPECT_FALSE(w.config.tie_word_embeddings);
  EXPECT_EQ(w.config.vocab, 11);
  EXPECT_EQ(w.config.head_dim, 10);
  EXPECT_EQ(w.config.kv_dim(), 10);
  EXPECT_EQ(w.config.max_position, 5);
  ASSERT_EQ(w.lm_head.shape, (std::vector<int64_t>{11, 20}));
  EXPECT_EQ(&w.output_matrix(), &w.lm_head);
  // The classifier is the last vocab*dim floats; the embedding the first.
  const std::vector<float> tail(t.body.end() - 11 * 20, t.body.end());
  EXPECT_TRUE(bits_equal(w.lm_head.data, tail));
  EXPECT_TRUE(bits_equal(w.embed.data, std::vector<float>(t.body.begin(), t.body.begin() + 220)));
  EXPECT_EQ(w.layers[1].wk.shape, (std::vector<int64_t>{10, 20}));
  // wk of layer 1 follows wq of both layers and wk of layer 0.
  const int64_t o_wk1 = 220 + 2 * 20 + 2 * 400 + 200;
  EXPECT_TRUE(bits_equal(w.layers[1].wk.data,
                         std::vector<float>(t.body.begin() + o_wk1, t.body.begin() + o_wk1 + 200)));

  // Converted to HF (untied: lm_head.weight is written) and back.
  const std::string out = dir.file("hf");
  convert_llama2c_to_hf(p, out, {DType::kF32, false});
  const ModelWeights h = load_model(out);
  EXPECT_FALSE(h.config.tie_word_embeddings);
  EXPECT_EQ(h.config.n_kv_heads, 1);
  EXPECT_EQ(h.config.rope_style, RopeStyle::kRotateHalf);
  expect_same_model(w, h);
  EXPECT_TRUE(SafetensorsCheckpoint(out).has("lm_head.weight"));
}

// ------------------------------------------------------------------ permutation

TEST(RopePermutation, RowsMoveAsSpecifiedAndInvert) {
  const int heads = 3, d = 10;
  const int64_t cols = 7;
  const auto w = test::random_normal(heads * d * cols, 9);
  const auto hf = permute_rows_adjacent_to_half(w.data(), heads, d, cols);
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < d / 2; ++i)
      for (int64_t c = 0; c < cols; ++c) {
        EXPECT_EQ(hf[(h * d + i) * cols + c], w[(h * d + 2 * i) * cols + c]);
        EXPECT_EQ(hf[(h * d + d / 2 + i) * cols + c], w[(h * d + 2 * i + 1) * cols + c]);
      }
  EXPECT_TRUE(bits_equal(permute_rows_half_to_adjacent(hf.data(), heads, d, cols), w));
  EXPECT_FALSE(bits_equal(hf, w));
}

// y[t][o] = sum_i x[t][i] w[o][i], in double then rounded.
std::vector<float> project(const std::vector<float>& x, const std::vector<float>& w, int64_t n,
                           int64_t in, int64_t out) {
  std::vector<float> y(n * out);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t i = 0; i < in; ++i) s += double(x[t * in + i]) * w[o * in + i];
      y[t * out + o] = static_cast<float>(s);
    }
  return y;
}

// Independent double-precision RoPE at position p for one head vector.
void rope_ref(double* v, int d, int64_t pos, double theta, bool adjacent) {
  for (int i = 0; i < d / 2; ++i) {
    const double a = double(pos) * std::pow(theta, -2.0 * i / d);
    const int j0 = adjacent ? 2 * i : i, j1 = adjacent ? 2 * i + 1 : i + d / 2;
    const double x0 = v[j0], x1 = v[j1];
    v[j0] = x0 * std::cos(a) - x1 * std::sin(a);
    v[j1] = x0 * std::sin(a) + x1 * std::cos(a);
  }
}

// Converting stories15M gives every weight back (after undoing the permutation), and the
// permuted wq/wk make rotate-half RoPE equal adjacent-pair RoPE of the original.
TEST(Convert, Stories15MFp32RoundTripAndRopeEquivalence) {
  TempDir dir;
  const std::string out = dir.file("hf");
  convert_llama2c_to_hf(stories_bin(), out, {DType::kF32, false});
  EXPECT_TRUE(test::file_exists(out + "/config.json"));
  EXPECT_FALSE(test::file_exists(out + "/model.safetensors.tmp"));
  const ModelWeights l2c = load_llama2c(stories_bin());
  const ModelWeights hf = load_model(out);

  const ModelConfig &a = l2c.config, &b = hf.config;
  EXPECT_EQ(b.arch, "llama");
  EXPECT_EQ(b.hidden, a.hidden);
  EXPECT_EQ(b.intermediate, a.intermediate);
  EXPECT_EQ(b.n_layers, a.n_layers);
  EXPECT_EQ(b.n_heads, a.n_heads);
  EXPECT_EQ(b.n_kv_heads, a.n_kv_heads);
  EXPECT_EQ(b.head_dim, a.head_dim);
  EXPECT_EQ(b.vocab, a.vocab);
  EXPECT_EQ(b.max_position, 256);
  EXPECT_EQ(b.rms_eps, a.rms_eps);
  EXPECT_EQ(b.rope_theta, a.rope_theta);
  EXPECT_TRUE(b.tie_word_embeddings);
  EXPECT_EQ(b.rope_style, RopeStyle::kRotateHalf);
  EXPECT_EQ(b.bos_id, 1);
  EXPECT_EQ(b.eos_id, 2);
  EXPECT_TRUE(hf.lm_head.empty());
  expect_same_model(l2c, hf);

  const auto cfg = nlohmann::json::parse(
      std::string(read_all(out + "/config.json").data(), read_all(out + "/config.json").size()));
  EXPECT_EQ(cfg["torch_dtype"], "float32");
  EXPECT_EQ(cfg["tie_word_embeddings"], true);
  EXPECT_EQ(cfg["max_position_embeddings"], 256);
  EXPECT_EQ(cfg["rms_norm_eps"].get<double>(), 1e-5);
  EXPECT_EQ(cfg["rope_theta"].get<double>(), 10000.0);
  EXPECT_EQ(cfg["model_type"], "llama");
  EXPECT_FALSE(SafetensorsCheckpoint(out).has("lm_head.weight"));
  EXPECT_EQ(SafetensorsCheckpoint(out).info("model.norm.weight").dtype, DType::kF32);

  // RoPE equivalence on layer 2, 5 tokens at awkward positions, through cpu::rope.
  const int H = a.n_heads, KVH = a.n_kv_heads, d = a.head_dim;
  const int64_t D = a.hidden, n = 5, pos0 = 37;
  const auto x = test::random_normal(n * D, 21);
  const LayerWeights &la = l2c.layers[2], &lb = hf.layers[2];
  auto q_adj = project(x, la.wq.data, n, D, H * d), k_adj = project(x, la.wk.data, n, D, KVH * d);
  auto q_half = project(x, lb.wq.data, n, D, H * d), k_half = project(x, lb.wk.data, n, D, KVH * d);
  // Double-precision references before the in-place kernel rotates the float copies.
  std::vector<double> q_ref(q_adj.begin(), q_adj.end());
  for (int64_t t = 0; t < n; ++t)
    for (int h = 0; h < H; ++h) rope_ref(&q_ref[(t * H + h) * d], d, pos0 + t, a.rope_theta, true);
  const auto inv = rope_inv_freq(d, a.rope_theta, a.rope_scaling);
  cpu::rope(q_adj.data(), n, H, d, H * d, d, nullptr, pos0, inv, RopeStyle::kAdjacentPairs);
  cpu::rope(k_adj.data(), n, KVH, d, KVH * d, d, nullptr, pos0, inv, RopeStyle::kAdjacentPairs);
  cpu::rope(q_half.data(), n, H, d, H * d, d, nullptr, pos0, inv, RopeStyle::kRotateHalf);
  cpu::rope(k_half.data(), n, KVH, d, KVH * d, d, nullptr, pos0, inv, RopeStyle::kRotateHalf);

  double max_ref = 0, max_err = 0, max_err_ref = 0;
  for (int64_t t = 0; t < n; ++t)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < d / 2; ++i) {
        const int64_t base = (t * H + h) * d;
        for (int s = 0; s < 2; ++s) {
          const double adj = q_adj[base + 2 * i + s], half = q_half[base + s * d / 2 + i];
          max_ref = std::max(max_ref, std::fabs(adj));
          max_err = std::max(max_err, std::fabs(adj - half));
          max_err_ref = std::max(max_err_ref, std::fabs(q_ref[base + 2 * i + s] - half));
        }
      }
  EXPECT_GT(max_ref, 0.1);
  EXPECT_LE(max_err, 1e-5 * max_ref);
  EXPECT_LE(max_err_ref, 1e-5 * max_ref);  // and both kernels agree with a double reference

  // Attention logits q_t . k_s are the same in both conventions (MHA here: head h <-> h).
  double max_s = 0, max_ds = 0;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t s = 0; s <= t; ++s)
      for (int h = 0; h < H; ++h) {
        const int kh = h / (H / KVH);
        double sa = 0, sb = 0;
        for (int j = 0; j < d; ++j) {
          sa += double(q_adj[(t * H + h) * d + j]) * k_adj[(s * KVH + kh) * d + j];
          sb += double(q_half[(t * H + h) * d + j]) * k_half[(s * KVH + kh) * d + j];
        }
        max_s = std::max(max_s, std::fabs(sa));
        max_ds = std::max(max_ds, std::fabs(sa - sb));
      }
  EXPECT_GT(max_s, 0.1);
  EXPECT_LE(max_ds, 1e-5 * max_s);
}

TEST(Convert, Bf16OutputAndOverwriteRules) {
  TempDir dir;
  const TinyBin t = make_tiny_bin(24, 40, 3, 4, 2, 37, 9, 17);  // head_dim 6, GQA 2:1, tied
  const std::string bin = dir.file("t.bin");
  write_tiny_bin(bin, t);
  const std::string out = dir.file("out");
  convert_llama2c_to_hf(bin, out, {DType::kBF16, false});
  ModelWeights l2c = load_llama2c(bin);
  convert_to_rotate_half(l2c);
  EXPECT_EQ(l2c.config.rope_style, RopeStyle::kRotateHalf);
  EXPECT_THROW(convert_to_rotate_half(l2c), std::runtime_error);
  const ModelWeights hf = load_hf_dir(out);
  EXPECT_EQ(SafetensorsCheckpoint(out).info("model.layers.0.self_attn.q_proj.weight").dtype,
            DType::kBF16);
  auto bf = [](const Tensor& x) {
    Tensor y = x;
    for (float& v : y.data) v = bf16_to_f32(f32_to_bf16(v));
    return y;
  };
  expect_tensor_eq(bf(l2c.embed), hf.embed, "embed");
  for (int i = 0; i < 3; ++i) {
    expect_tensor_eq(bf(l2c.layers[i].wq), hf.layers[i].wq, "wq");
    expect_tensor_eq(bf(l2c.layers[i].wk), hf.layers[i].wk, "wk");
    expect_tensor_eq(bf(l2c.layers[i].w_down), hf.layers[i].w_down, "w_down");
  }
  const std::string cfg(read_all(out + "/config.json").data(),
                        read_all(out + "/config.json").size());
  EXPECT_EQ(nlohmann::json::parse(cfg)["torch_dtype"], "bfloat16");

  // Non-empty output directory: refused without force; replaced with force.
  expect_one_line_containing(error_of([&] {
                               convert_llama2c_to_hf(bin, out, {DType::kF32, false});
                             }),
                             {"output directory " + out + " is not empty", "--force"});
  EXPECT_EQ(SafetensorsCheckpoint(out).info("model.norm.weight").dtype, DType::kBF16);
  convert_llama2c_to_hf(bin, out, {DType::kF32, true});
  EXPECT_EQ(SafetensorsCheckpoint(out).info("model.norm.weight").dtype, DType::kF32);

  // A bad input creates nothing.
  const std::string out2 = dir.file("out2");
  expect_one_line_containing(
      error_of([&] {
        convert_llama2c_to_hf(dir.file("none.bin"), out2, {DType::kF32, false});
      }),
      {dir.file("none.bin")});
  EXPECT_FALSE(test::file_exists(out2));
  write_bytes(dir.file("file"), "x", 1);
  expect_one_line_containing(error_of([&] {
                               convert_llama2c_to_hf(bin, dir.file("file"), {DType::kF32, false});
                             }),
                             {"not a directory"});
}

// ------------------------------------------------------------------ HF directories

// A small random Qwen2-style model (biases, untied head) built by hand.
ModelWeights tiny_qwen2() {
  ModelWeights w;
  ModelConfig& c = w.config;
  c.arch = "qwen2";
  c.hidden = 24;
  c.intermediate = 44;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 6;
  c.vocab = 29;
  c.max_position = 128;
  c.rope_theta = 1e6;
  c.rms_eps = 1e-6f;
  c.tie_word_embeddings = false;
  c.qkv_bias = true;
  c.rope_style = RopeStyle::kRotateHalf;
  uint64_t seed = 100;
  auto T = [&seed](std::vector<int64_t> shape) {
    Tensor t;
    t.shape = std::move(shape);
    t.data = test::random_normal(static_cast<size_t>(t.numel()), seed++);
    return t;
  };
  const int64_t h = c.hidden, f = c.intermediate, q = c.q_dim(), kv = c.kv_dim();
  w.embed = T({c.vocab, h});
  w.layers.resize(c.n_layers);
  for (LayerWeights& L : w.layers) {
    L.attn_norm = T({h});
    L.wq = T({q, h});
    L.wk = T({kv, h});
    L.wv = T({kv, h});
    L.wo = T({h, q});
    L.bq = T({q});
    L.bk = T({kv});
    L.bv = T({kv});
    L.ffn_norm = T({h});
    L.w_gate = T({f, h});
    L.w_up = T({f, h});
    L.w_down = T({h, f});
  }
  w.final_norm = T({h});
  w.lm_head = T({c.vocab, h});
  return w;
}

void expect_equal_hf(const ModelWeights& a, const ModelWeights& b) {
  expect_tensor_eq(a.embed, b.embed, "embed");
  expect_tensor_eq(a.final_norm, b.final_norm, "final_norm");
  expect_tensor_eq(a.lm_head, b.lm_head, "lm_head");
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t i = 0; i < a.layers.size(); ++i) {
    const LayerWeights &x = a.layers[i], &y = b.layers[i];
    for (auto m : {&LayerWeights::attn_norm, &LayerWeights::wq, &LayerWeights::wk,
                   &LayerWeights::wv, &LayerWeights::wo, &LayerWeights::bq, &LayerWeights::bk,
                   &LayerWeights::bv, &LayerWeights::ffn_norm, &LayerWeights::w_gate,
                   &LayerWeights::w_up, &LayerWeights::w_down})
      expect_tensor_eq(x.*m, y.*m, "layer " + std::to_string(i));
  }
}

TEST(HfDir, Qwen2BiasesUntiedHeadAndShardedIndex) {
  TempDir dir;
  const ModelWeights w = tiny_qwen2();
  save_hf_dir(w, dir.path, DType::kF32);
  const ModelWeights r = load_model(dir.path);
  EXPECT_EQ(r.config.arch, "qwen2");
  EXPECT_TRUE(r.config.qkv_bias);
  EXPECT_FALSE(r.config.tie_word_embeddings);
  EXPECT_EQ(r.config.rope_theta, 1e6);
  EXPECT_EQ(r.config.rms_eps, 1e-6f);
  EXPECT_EQ(r.config.n_kv_heads, 2);
  EXPECT_EQ(r.config.rope_style, RopeStyle::kRotateHalf);
  expect_equal_hf(w, r);

  // Re-shard into two files with an index; the loader routes every name.
  const SafetensorsCheckpoint ck(dir.path);
  const std::vector<std::string> names = ck.names();
  std::vector<std::vector<float>> vals(names.size());
  std::vector<SafetensorsEntry> s1, s2;
  nlohmann::json map;
  for (size_t i = 0; i < names.size(); ++i) {
    const TensorInfo& ti = ck.info(names[i]);
    vals[i].resize(ti.numel());
    ck.read_f32(names[i], vals[i].data());
    const bool first = i % 2 == 0;
    (first ? s1 : s2).push_back({names[i], DType::kF32, ti.shape, vals[i].data()});
    map[names[i]] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  TempDir sharded;
  write_safetensors(sharded.file("model-00001-of-00002.safetensors"), s1);
  write_safetensors(sharded.file("model-00002-of-00002.safetensors"), s2);
  const std::string index = nlohmann::json{{"weight_map", map}}.dump();
  write_bytes(sharded.file("model.safetensors.index.json"), index.data(), index.size());
  fs::copy_file(dir.file("config.json"), sharded.file("config.json"));
  EXPECT_EQ(SafetensorsCheckpoint(sharded.path).num_files(), 2u);
  expect_equal_hf(w, load_hf_dir(sharded.path));
}

TEST(HfDir, MissingTensorShapeMismatchAndBadPaths) {
  TempDir dir;
  ModelWeights w = tiny_qwen2();
  w.config.tie_word_embeddings = true;
  w.lm_head = Tensor{};
  save_hf_dir(w, dir.path, DType::kBF16);
  EXPECT_NO_THROW(load_hf_dir(dir.path));

  // Drop one tensor: clear "not found in DIR".
  {
    const SafetensorsCheckpoint ck(dir.path);
    std::vector<std::vector<float>> vals;
    std::vector<SafetensorsEntry> keep;
    const auto names = ck.names();
    vals.reserve(names.size());
    for (const std::string& n : names) {
      if (n == "model.layers.1.mlp.up_proj.weight") continue;
      vals.emplace_back(ck.info(n).numel());
      ck.read_f32(n, vals.back().data());
      keep.push_back({n, DType::kBF16, ck.info(n).shape, vals.back().data()});
    }
    TempDir d2;
    write_safetensors(d2.file("model.safetensors"), keep);
    fs::copy_file(dir.file("config.json"), d2.file("config.json"));
    expect_one_line_containing(
        error_of([&] { load_hf_dir(d2.path); }),
        {"tensor model.layers.1.mlp.up_proj.weight not found in " + d2.path});
  }
  // Transposed down_proj: "expected [24, 44], file has [44, 24]".
  {
    ModelWeights t = w;
    t.layers[0].w_down.shape = {44, 24};
    TempDir d3;
    save_hf_dir(t, d3.path, DType::kF32);
    expect_one_line_containing(
        error_of([&] { load_hf_dir(d3.path); }),
        {"model.layers.0.mlp.down_proj.weight", "expected [24, 44], file has [44, 24]"});
  }
  // Untied config without lm_head.weight.
  {
    TempDir d4;
    save_hf_dir(w, d4.path, DType::kF32);
    ModelConfig c = w.config;
    c.tie_word_embeddings = false;
    write_file_atomic(d4.file("config.json"), hf_config_json(c, DType::kF32));
    expect_one_line_containing(error_of([&] { load_hf_dir(d4.path); }),
                               {"lm_head.weight not found in " + d4.path});
  }
  TempDir empty;
  expect_one_line_containing(error_of([&] { load_hf_dir(empty.path); }),
                             {"config.json", empty.path});
  expect_one_line_containing(error_of([&] { load_model(empty.file("nothing")); }),
                             {"does not exist", empty.file("nothing")});
  write_bytes(empty.file("weights.pt"), "abc", 3);
  expect_one_line_containing(error_of([&] { load_model(empty.file("weights.pt")); }),
                             {"neither", empty.file("weights.pt")});
}

// ------------------------------------------------------------------ CLI

TEST(ConvertCli, ExitCodesAndMessages) {
  const std::string exe = test::bin_dir() + "/mprefill-convert";
  ASSERT_TRUE(test::file_exists(exe)) << exe;
  TempDir dir;
  std::string out;
  EXPECT_EQ(test::run_command(exe + " --in " + stories_bin(), &out), 2) << out;
  EXPECT_NE(out.find("--in and --out are required"), std::string::npos) << out;
  EXPECT_EQ(test::run_command(exe + " --in x.bin --out y --dtype fp8", &out), 2) << out;
  EXPECT_NE(out.find("unknown --dtype 'fp8'"), std::string::npos) << out;

  EXPECT_EQ(
      test::run_command(exe + " --in " + dir.file("missing.bin") + " --out " + dir.file("o"), &out),
      1)
      << out;
  EXPECT_EQ(out.rfind("mprefill-convert: error: ", 0), 0u) << out;
  EXPECT_EQ(out.find('\n'), out.size() - 1) << out;  // exactly one line

  const std::string o = dir.file("o");
  EXPECT_EQ(
      test::run_command(exe + " --in " + stories_bin() + " --out " + o + " --dtype bf16", &out), 0)
      << out;
  EXPECT_EQ(SafetensorsCheckpoint(o).info("model.embed_tokens.weight").dtype, DType::kBF16);
  EXPECT_EQ(test::run_command(exe + " --in " + stories_bin() + " --out " + o, &out), 1) << out;
  EXPECT_NE(out.find("not empty"), std::string::npos) << out;
  EXPECT_EQ(test::run_command(exe + " --in " + stories_bin() + " --out " + o + " --force", &out), 0)
      << out;
  EXPECT_EQ(SafetensorsCheckpoint(o).info("model.embed_tokens.weight").dtype, DType::kF32);
}

}  // namespace
}  // namespace mprefill
