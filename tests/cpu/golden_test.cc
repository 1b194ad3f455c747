// Real weights (stories15M): greedy ids and logits against the published reference,
// from the llama2.c .bin and from its converted HF directory (fp32).
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "model/convert.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

const std::vector<int> kPrompt = {1, 9038, 2501, 263, 931};
const std::vector<int> kNext = {29892, 727, 471, 263, 2217, 7826, 4257, 365};
const std::vector<float> kLogits = {18.3597f, 16.6334f, 13.2058f, 13.8603f,
                                    9.7992f,  10.7615f, 20.2952f, 13.4598f};

std::string model_dir() { return test::shared_dir() + "/models/stories15M"; }

#define SKIP_WITHOUT_MODEL() MPREFILL_SKIP_IF_MISSING(model_dir() + "/stories15M.bin")

void expect_golden(const ModelWeights& w, const SparsePolicy& policy, const std::string& what) {
  const Engine eng(w);
  GenerateOptions opt;
  opt.decode_steps = static_cast<int>(kNext.size()) - 1;
  opt.policy = policy;
  const GenerateResult r = eng.generate(kPrompt, opt);
  EXPECT_EQ(r.prompt_tokens, 5);
  EXPECT_EQ(r.generated_ids, kNext) << what;
  ASSERT_EQ(r.logits.size(), kLogits.size()) << what;
  for (size_t i = 0; i < kLogits.size(); ++i)
    EXPECT_NEAR(r.logits[i], kLogits[i], 2e-3) << what << " step " << i;
  EXPECT_EQ(r.first_token_id, kNext[0]);
  EXPECT_NEAR(r.first_token_logit, kLogits[0], 2e-3);
}

TEST(Golden, Stories15MBin) {
  SKIP_WITHOUT_MODEL();
  const ModelWeights w = load_model(model_dir() + "/stories15M.bin");
  EXPECT_EQ(w.config.rope_style, RopeStyle::kAdjacentPairs);
  EXPECT_EQ(w.config.max_position, 256);
  expect_golden(w, SparsePolicy::dense(), "stories15M.bin");
  // Every sparse pattern with budgets covering 5 tokens is dense: same ids.
  expect_golden(w, SparsePolicy::uniform(w.config, HeadPattern::vertical_slash(1000, 6096), 0),
                "stories15M.bin, vertical-slash at dense_below 0");
  expect_golden(w, SparsePolicy::uniform(w.config, HeadPattern::block_sparse(100), 0),
                "stories15M.bin, block-sparse at dense_below 0");
}

TEST(Golden, Stories15MConvertedHfDir) {
  SKIP_WITHOUT_MODEL();
  std::string tmpl = (std::filesystem::temp_directory_path() / "mprefill_golden_XXXXXX").string();
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
  const std::string dir = tmpl + "/hf";
  ConvertOptions opt;
  opt.dtype = DType::kF32;
  convert_llama2c_to_hf(model_dir() + "/stories15M.bin", dir, opt);
  ModelWeights w = load_model(dir);
  std::filesystem::remove_all(tmpl);
  EXPECT_EQ(w.config.rope_style, RopeStyle::kRotateHalf);
  expect_golden(w, SparsePolicy::dense(), "converted HF dir");
}

TEST(Golden, TokenizerEncodesPrompt) {
  SKIP_WITHOUT_MODEL();
  const Tokenizer tok = Tokenizer::load(model_dir() + "/tokenizer.bin");
  EXPECT_EQ(tok.vocab_size(), 32000);
  EXPECT_EQ(tok.encode("Once upon a time", true), kPrompt);
  // The golden continuation decodes to text that follows the prompt.
  std::string text;
  int prev = kPrompt.back();
  for (int id : kNext) {
    text += tok.decode_token(prev, id);
    prev = id;
  }
  EXPECT_EQ(text.substr(0, 1), ",") << text;
}

}  // namespace
}  // namespace mprefill
