// mprefill-convert: llama2.c .bin -> Hugging Face directory (config.json +
// model.safetensors), permuting wq/wk rows from adjacent-pair to rotate-half RoPE.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "model/convert.h"
#include "tools/cli_args.h"

namespace {

constexpr const char* kUsage =
    "usage: mprefill-convert --in FILE.bin --out DIR [--dtype bf16|fp32] [--force]\n"
    "  Converts a llama2.c checkpoint into an HF directory (config.json + model.safetensors).\n"
    "  --dtype   storage type of model.safetensors (default fp32, lossless)\n"
    "  --force   write into a non-empty output directory\n";

int usage_error(const std::string& msg) {
  std::fprintf(stderr, "mprefill-convert: error: %s\n%s", msg.c_str(), kUsage);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string in, out;
  mprefill::ConvertOptions opt;
  try {
    mprefill::cli::FlagReader r(argc - 1, argv + 1);  // past the program name
    while (r.next()) {
      const std::string& a = r.flag();
      if (a == "-h" || a == "--help") {
        std::fputs(kUsage, stdout);
        return 0;
      } else if (a == "--in") {
        in = r.value();
      } else if (a == "--out") {
        out = r.value();
      } else if (a == "--dtype") {
        const std::string d = r.value();
        if (d == "bf16") {
          opt.dtype = mprefill::DType::kBF16;
        } else if (d == "fp32") {
          opt.dtype = mprefill::DType::kF32;
        } else {
          return usage_error("unknown --dtype '" + d + "' (bf16 or fp32)");
        }
      } else if (a == "--force") {
        opt.force = true;
      } else {
        return usage_error("unknown argument '" + r.arg() + "'");
      }
    }
  } catch (const mprefill::cli::UsageError& e) {
    return usage_error(e.what());
  }
  if (in.empty() || out.empty()) return usage_error("--in and --out are required");
  try {
    mprefill::convert_llama2c_to_hf(in, out, opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill-convert: error: %s\n", e.what());
    return 1;
  }
  std::printf("mprefill-convert: wrote %s/config.json and %s/model.safetensors (%s)\n", out.c_str(),
              out.c_str(), mprefill::to_string(opt.dtype));
  return 0;
}
