// `mprefill generate` end to end: golden ids through --json, text output, and bad input
// (non-zero exit, exactly one error line on stderr, no crash).
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "tests/testutil.h"

namespace mprefill {
namespace {

namespace fs = std::filesystem;

std::string model_dir() { return test::shared_dir() + "/models/stories15M"; }
std::string model_bin() { return model_dir() + "/stories15M.bin"; }
std::string tokenizer() { return model_dir() + "/tokenizer.bin"; }
std::string mprefill() { return test::bin_dir() + "/mprefill"; }

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

struct CmdResult {
  int status = -1;
  std::string out, err;
};

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(test::file_exists(mprefill())) << "binary not built: " << mprefill();
    std::string tmpl = (fs::temp_directory_path() / "mprefill_cli_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    tmp_ = tmpl;
  }
  void TearDown() override {
    if (!tmp_.empty()) fs::remove_all(tmp_);
  }
  void need_model() { MPREFILL_SKIP_IF_MISSING(model_bin()); }
  // stdout and stderr separately (stderr through a file).
  CmdResult run(const std::string& args) {
    CmdResult r;
    const std::string err_file = tmp_ + "/stderr.txt";
    r.status =
        test::run_command("( " + mprefill() + " " + args + " 2>" + quote(err_file) + " )", &r.out);
    std::ifstream f(err_file);
    std::stringstream s;
    s << f.rdbuf();
    r.err = s.str();
    return r;
  }
  std::string write(const std::string& name, const std::string& content) {
    const std::string p = tmp_ + "/" + name;
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
  // A failing run: non-zero exit, not a signal, exactly one stderr line mentioning error
  // (usage text may follow a usage error), that line containing `part`.
  void expect_error(const CmdResult& r, const std::string& part) {
    EXPECT_GT(r.status, 0) << r.err;
    EXPECT_LT(r.status, 128) << "crashed: " << r.err;
    std::istringstream lines(r.err);
    int n_error = 0;
    std::string line, error_line;
    while (std::getline(lines, line))
      if (line.find("error") != std::string::npos) ++n_error, error_line = line;
    EXPECT_EQ(n_error, 1) << "stderr:\n" << r.err;
    EXPECT_EQ(error_line.rfind("mprefill: error: ", 0), 0u) << error_line;
    EXPECT_NE(error_line.find(part), std::string::npos) << error_line;
  }
  std::string tmp_;
};

const std::vector<int> kNext = {29892, 727, 471, 263, 2217, 7826, 4257, 365};

TEST_F(Cli, GenerateJsonMatchesGolden) {
  need_model();
  const CmdResult r = run("generate --model " + quote(model_bin()) + " --tokenizer " +
                          quote(tokenizer()) + " --prompt 'Once upon a time' --decode 32 --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);  // exactly one object
  for (const char* k : {"prompt_tokens", "first_token_id", "first_token_logit", "generated_ids",
                        "logprobs", "text", "ttft_ms", "decode_ms", "sparse", "device"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["prompt_tokens"], 5);
  EXPECT_EQ(j["first_token_id"], kNext[0]);
  EXPECT_NEAR(j["first_token_logit"].get<double>(), 18.3597, 2e-3);
  const auto ids = j["generated_ids"].get<std::vector<int>>();
  ASSERT_EQ(ids.size(), 33u);
  EXPECT_EQ(std::vector<int>(ids.begin(), ids.begin() + 8), kNext);
  EXPECT_EQ(j["logprobs"].size(), 33u);
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_GT(j["ttft_ms"].get<double>(), 0.0);
  EXPECT_EQ(j["text"].get<std::string>().rfind(", there was a little girl", 0), 0u) << j["text"];
}

TEST_F(Cli, GenerateTextPrintsContinuation) {
  need_model();
  const CmdResult r = run("generate --model " + quote(model_bin()) + " --tokenizer " +
                          quote(tokenizer()) + " --prompt 'Once upon a time' --decode 32");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out.rfind("Once upon a time, there was a little girl", 0), 0u) << r.out;
  EXPECT_GT(r.out.size(), 60u) << r.out;
  EXPECT_NE(r.err.find("prompt tokens"), std::string::npos) << r.err;
}

// New-user defaults (issue 17): the README example (model directory, no --tokenizer, no
// --decode) prints a real continuation, and the summary line says what ran.
TEST_F(Cli, ReadmeExampleDecodesWithTheTokenizerBesideTheModel) {
  need_model();
  // The llama2.c model directory and the tokenizer.bin in it are found on their own.
  CmdResult r =
      run("generate --model " + quote(model_dir()) + " --prompt 'Once upon a time' --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  const auto ids = j["generated_ids"].get<std::vector<int>>();
  EXPECT_EQ(ids.size(), 17u);  // first token + --decode default 16
  EXPECT_EQ(std::vector<int>(ids.begin(), ids.begin() + 8), kNext);
  EXPECT_EQ(j["text"].get<std::string>().rfind(", there was a little girl", 0), 0u) << j["text"];
  // --sparse auto on a short prompt: the summary names what ran (dense), not the policy.
  r = run("generate --model " + quote(model_bin()) + " --prompt 'Once upon a time' --sparse auto");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("sparse: dense on every head (5 tokens < --dense-below 32768"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(r.err.find("vertical_slash x"), std::string::npos) << r.err;
  r = run("generate --model " + quote(model_bin()) +
          " --prompt 'Once upon a time' --sparse auto --dense-below 0 --decode 1");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("sparse: vertical_slash x36 (policy: auto)"), std::string::npos) << r.err;
  // --progress: one line per layer (a terminal gets them rewritten in place).
  r = run("generate --model " + quote(model_bin()) + " --prompt-ids 1,9038 --decode 1 --progress");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("mprefill: prefill layer 1/6, 2 tokens"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("mprefill: prefill layer 6/6, 2 tokens"), std::string::npos) << r.err;
  // A directory with neither config.json nor one checkpoint: one clear error.
  const std::string empty_dir = tmp_ + "/empty_model";
  fs::create_directories(empty_dir);
  expect_error(run("generate --model " + quote(empty_dir) + " --prompt-ids 1"),
               "has no config.json and no llama2.c .bin checkpoint");
}

TEST_F(Cli, PromptIdsFileAndSparseFlags) {
  need_model();
  // ids without a tokenizer print ids
  CmdResult r = run("generate --model " + quote(model_bin()) +
                    " --prompt-ids 1,9038,2501,263,931 --decode 2");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "29892,727,471\n");
  // prompt file + auto sparse at dense-below 0 (budgets cover 5 tokens: same ids)
  const std::string pf = write("prompt.txt", "Once upon a time\n");
  r = run("generate --model " + quote(model_bin()) + " --tokenizer " + quote(tokenizer()) +
          " --prompt-file " + quote(pf) + " --decode 2 --sparse auto --dense-below 0 --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["generated_ids"].get<std::vector<int>>(), std::vector<int>({29892, 727, 471}));
  EXPECT_EQ(j["sparse"]["source"], "auto");
  EXPECT_EQ(j["sparse"]["heads_run"]["vertical_slash"], 36);
  // a sampled run is repeatable with its seed
  const std::string sampled = "generate --model " + quote(model_bin()) +
                              " --prompt-ids 1,9038 --decode 6 --temperature 0.9 --top-p 0.9 "
                              "--seed 7 --json";
  const CmdResult a = run(sampled), b = run(sampled);
  ASSERT_EQ(a.status, 0) << a.err;
  EXPECT_EQ(nlohmann::json::parse(a.out)["generated_ids"],
            nlohmann::json::parse(b.out)["generated_ids"]);
  // stop id: stop at the first token
  r = run("generate --model " + quote(model_bin()) +
          " --prompt-ids 1,9038,2501,263,931 --decode 5 --stop-ids 29892 --json");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["generated_ids"].size(), 1u);
}

TEST_F(Cli, Help) {
  CmdResult r = run("--help");
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("generate"), std::string::npos);
  r = run("generate --help");
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("--prompt-ids"), std::string::npos);
}

TEST_F(Cli, UsageErrors) {
  CmdResult r = run("generate --model x --prompt-ids 1 --bogus");
  EXPECT_EQ(r.status, 2);
  expect_error(r, "unknown option '--bogus'");
  r = run("frobnicate");
  EXPECT_EQ(r.status, 2);
  expect_error(r, "unknown command");
  r = run("generate --prompt-ids 1");
  EXPECT_EQ(r.status, 2);
  expect_error(r, "--model is required");
  r = run("generate --model x --prompt-ids 1 --prompt hi");
  EXPECT_EQ(r.status, 2);
  expect_error(r, "exactly one of");
  r = run("generate --model x --prompt-ids 1 --decode many");
  EXPECT_EQ(r.status, 2);
  expect_error(r, "--decode expects an integer");
  r = run("generate --model x --prompt-ids 1 --decode");
  EXPECT_EQ(r.status, 2);
  expect_error(r, "--decode needs a value");
}

TEST_F(Cli, DeviceCudaIsAClearError) {
  need_model();
  const CmdResult r =
      run("generate --model " + quote(model_bin()) + " --prompt-ids 1 --device cuda");
  EXPECT_EQ(r.status, 2);
  expect_error(r, "--device cuda");
}

// Random weights of a named shape: same seed, same ids; an unknown shape or a bad seed is
// one clear error.
TEST_F(Cli, RandomModelSpec) {
  const CmdResult a =
      run("generate --model random:tiny:7 --prompt-ids 1,5,9,300 --decode 4 --json");
  const CmdResult b =
      run("generate --model random:tiny:7 --prompt-ids 1,5,9,300 --decode 4 --json");
  const CmdResult c =
      run("generate --model random:tiny:8 --prompt-ids 1,5,9,300 --decode 4 --json");
  ASSERT_EQ(a.status, 0) << a.err;
  auto ids = [](const std::string& out) {
    const auto j = nlohmann::json::parse(out);
    return j.at("generated_ids").get<std::vector<int>>();
  };
  EXPECT_EQ(ids(a.out).size(), 5u);
  EXPECT_EQ(ids(a.out), ids(b.out));
  EXPECT_NE(nlohmann::json::parse(a.out).at("logits"), nlohmann::json::parse(c.out).at("logits"));
  expect_error(run("generate --model random:nope --prompt-ids 1"), "unknown model shape 'nope'");
  expect_error(run("generate --model random:tiny:x --prompt-ids 1"), "seed 'x' is not a number");
}

TEST_F(Cli, TruncatedModelFile) {
  need_model();
  std::ifstream in(model_bin(), std::ios::binary);
  std::string head(1000, '\0');
  in.read(head.data(), head.size());
  const std::string bin = write("truncated.bin", head);
  expect_error(run("generate --model " + quote(bin) + " --prompt-ids 1,2"), "truncated.bin");
  // no file at all
  expect_error(run("generate --model " + quote(tmp_ + "/missing.bin") + " --prompt-ids 1"),
               "missing.bin");
}

TEST_F(Cli, CorruptHfDir) {
  const std::string dir = tmp_ + "/hf";
  fs::create_directories(dir);
  write("hf/config.json", "{ this is not json");
  write("hf/model.safetensors", "garbage");
  expect_error(run("generate --model " + quote(dir) + " --prompt-ids 1,2"), "config.json");
}

TEST_F(Cli, TokenIdOutOfRange) {
  need_model();
  expect_error(run("generate --model " + quote(model_bin()) + " --prompt-ids 1,32000"),
               "token id 32000 at position 1 is out of range [0, 32000)");
  expect_error(run("generate --model " + quote(model_bin()) + " --prompt-ids 1,-5"),
               "token id -5 at position 1");
}

TEST_F(Cli, EmptyPrompt) {
  need_model();
  expect_error(run("generate --model " + quote(model_bin()) + " --tokenizer " + quote(tokenizer()) +
                   " --prompt ''"),
               "prompt is empty");
  expect_error(run("generate --model " + quote(model_bin()) + " --prompt-ids ''"),
               "prompt is empty");
  const std::string pf = write("empty.txt", "");
  expect_error(run("generate --model " + quote(model_bin()) + " --tokenizer " + quote(tokenizer()) +
                   " --prompt-file " + quote(pf)),
               "prompt is empty");
}

TEST_F(Cli, PromptOverModelLimit) {
  need_model();
  std::string ids = "1";
  for (int i = 1; i < 300; ++i) ids.append(",").append(std::to_string(100 + i));
  const CmdResult r = run("generate --model " + quote(model_bin()) + " --prompt-ids " + ids);
  expect_error(r, "300");
  EXPECT_NE(r.err.find("256"), std::string::npos) << r.err;
  // with an override it runs
  const CmdResult ok = run("generate --model " + quote(model_bin()) + " --prompt-ids " + ids +
                           " --max-prompt 300 --json");
  EXPECT_EQ(ok.status, 0) << ok.err;
}

TEST_F(Cli, UnknownPatternInConfig) {
  need_model();
  // stories15M: 6 layers x 6 heads; layer 3 head 4 has a bad name.
  std::string json = "[";
  for (int l = 0; l < 6; ++l) {
    json += l ? ",{" : "{";
    for (int h = 0; h < 6; ++h)
      json += (h ? ",\"" : "\"") + std::to_string(h) + "\": [\"" +
              (l == 3 && h == 4 ? "diagonal" : "stream_llm") + "\", 4, 64, 0]";
    json += "}";
  }
  json += "]";
  const std::string cfg = write("bad_pattern.json", json);
  expect_error(
      run("generate --model " + quote(model_bin()) + " --prompt-ids 1,2 --sparse " + quote(cfg)),
      "layer 3 head 4: unknown pattern 'diagonal'");
  // wrong layer count
  const std::string small = write("small.json", R"([{"0": ["stream_llm", 4, 64, 0]}])");
  expect_error(
      run("generate --model " + quote(model_bin()) + " --prompt-ids 1,2 --sparse " + quote(small)),
      "1 layers but the model has 6");
}

TEST_F(Cli, TextPromptNeedsTokenizerAndBadSampling) {
  need_model();
  // No --tokenizer and none beside the model (random weights have no directory).
  CmdResult r = run("generate --model random:tiny:3 --prompt hello");
  EXPECT_EQ(r.status, 2);
  expect_error(r, "a text prompt needs --tokenizer (no tokenizer.bin beside random:tiny:3)");
  expect_error(
      run("generate --model " + quote(model_bin()) + " --prompt-ids 1 --temperature 1 --top-p 0"),
      "top-p");
  expect_error(run("generate --model " + quote(model_bin()) + " --tokenizer " +
                   quote(tmp_ + "/none.bin") + " --prompt hi"),
               "none.bin");
}

}  // namespace
}  // namespace mprefill
