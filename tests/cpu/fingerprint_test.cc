// Model fingerprint read from the weight files (model_fingerprint_of_path) against the
// fingerprint of the loaded model: equal for every format the loader takes (HF f32 /
// bf16, Qwen2 biases, tied and untied output, llama2.c .bin, random:), at any read chunk;
// one changed weight changes it, bytes the model does not use (llama2.c freq_cis) do not.
#include "model/fingerprint.h"

#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "model/convert.h"
#include "model/llama2c.h"
#include "model/weights.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

using test::TempDir;

std::string stories_bin() { return test::shared_dir() + "/models/stories15M/stories15M.bin"; }

// The path form at several read sizes (1 byte: 8 rows a read) equals the loaded form.
void expect_same_as_loaded(const std::string& path) {
  SCOPED_TRACE(path);
  const ModelFingerprint want = model_fingerprint(load_model(path), model_name_from_path(path));
  EXPECT_EQ(want.weights_digest.size(), 32u);
  for (int64_t chunk : {int64_t{64} << 20, int64_t{4096}, int64_t{1}}) {
    const ModelFingerprint got = model_fingerprint_of_path(path, chunk);
    EXPECT_EQ(got, want) << "chunk " << chunk << ": " << got.to_string() << " vs "
                         << want.to_string();
  }
}

TEST(FingerprintOfPath, EqualsTheLoadedModelInEveryFormat) {
  TempDir tmp;
  ModelConfig untied = named_shape("tiny");  // rotate-half, untied output
  const ModelWeights a = random_model(untied, 11);
  const std::string f32 = tmp.sub("tiny_f32"), bf16 = tmp.sub("tiny_bf16");
  save_hf_dir(a, f32, DType::kF32);
  save_hf_dir(a, bf16, DType::kBF16);
  expect_same_as_loaded(f32);
  expect_same_as_loaded(bf16);
  // The model's KV dtype follows its weights: bf16 checkpoints hand off bf16 KV.
  EXPECT_EQ(model_fingerprint_of_path(f32).kv_dtype, DType::kF32);
  EXPECT_EQ(model_fingerprint_of_path(bf16).kv_dtype, DType::kBF16);
  EXPECT_EQ(model_fingerprint(load_model(bf16), "x").kv_dtype, DType::kBF16);
  EXPECT_EQ(model_fingerprint_of_path("random:tiny:3").kv_dtype, DType::kF32);

  ModelConfig qwen = named_shape("tiny");
  qwen.arch = "qwen2";
  qwen.qkv_bias = true;
  const std::string bias = tmp.sub("qwen_bias");
  save_hf_dir(random_model(qwen, 12), bias, DType::kF32);
  expect_same_as_loaded(bias);

  ModelConfig tied = named_shape("tiny");
  tied.tie_word_embeddings = true;
  const std::string t = tmp.sub("tied");
  save_hf_dir(random_model(tied, 13), t, DType::kBF16);
  expect_same_as_loaded(t);

  expect_same_as_loaded("random:tiny:3");

  MPREFILL_SKIP_IF_MISSING(stories_bin());
  expect_same_as_loaded(stories_bin());
  const std::string hf = tmp.path + "/stories_hf";
  ConvertOptions o;
  o.dtype = DType::kBF16;
  convert_llama2c_to_hf(stories_bin(), hf, o);
  expect_same_as_loaded(hf);
}

TEST(FingerprintOfPath, FollowsEveryWeightNotUnusedBytes) {
  TempDir tmp;
  ModelConfig c = named_shape("tiny");
  ModelWeights w = random_model(c, 21);
  const std::string d0 = tmp.sub("a"), d1 = tmp.sub("b");
  save_hf_dir(w, d0, DType::kF32);
  float& x = w.layers[2].wk.data[777];
  x = std::nextafter(x, 2.f);  // one ulp of one weight
  save_hf_dir(w, d1, DType::kF32);
  const ModelFingerprint f0 = model_fingerprint_of_path(d0), f1 = model_fingerprint_of_path(d1);
  EXPECT_NE(f0.weights_digest, f1.weights_digest);
  EXPECT_EQ(f1, model_fingerprint(w, "b"));
  EXPECT_NE(model_fingerprint_of_path("random:tiny:1").weights_digest,
            model_fingerprint_of_path("random:tiny:2").weights_digest);

  MPREFILL_SKIP_IF_MISSING(stories_bin());
  // llama2.c: the last float of rms_final (a weight) vs the first of freq_cis (unused).
  std::ifstream in(stories_bin(), std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const Llama2cHeader h = parse_llama2c_header(bytes.data(), stories_bin());
  ASSERT_TRUE(h.shared_classifier());  // freq_cis are the last arrays
  const size_t freq0 =
      bytes.size() - static_cast<size_t>(2 * int64_t{h.seq_len} * (h.head_dim() / 2) * 4);
  auto write_with = [&](const std::string& name, size_t at) {
    std::vector<char> b = bytes;
    b[at] ^= 0x10;
    const std::string p = tmp.path + "/" + name;
    std::ofstream(p, std::ios::binary).write(b.data(), static_cast<std::streamsize>(b.size()));
    return p;
  };
  const std::string base = model_fingerprint_of_path(stories_bin()).weights_digest;
  EXPECT_NE(model_fingerprint_of_path(write_with("w.bin", freq0 - 2)).weights_digest, base);
  EXPECT_EQ(model_fingerprint_of_path(write_with("f.bin", freq0 + 1)).weights_digest, base);
}

TEST(FingerprintOfPath, BadPathsFailClearly) {
  TempDir tmp;
  auto error_of = [](const std::string& p) -> std::string {
    try {
      model_fingerprint_of_path(p);
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "no exception";
  };
  EXPECT_NE(error_of(tmp.path + "/missing.bin").find("does not exist"), std::string::npos)
      << error_of(tmp.path + "/missing.bin");
  const std::string trunc = tmp.path + "/trunc.bin";
  std::ofstream(trunc, std::ios::binary).write("abc", 3);
  EXPECT_NE(error_of(trunc).find("truncated"), std::string::npos) << error_of(trunc);
  EXPECT_NE(error_of(tmp.sub("empty_dir")).find("config.json"), std::string::npos);
}

}  // namespace
}  // namespace mprefill
