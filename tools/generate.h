// `mprefill generate`: the single-process engine (CPU, or the GPU engine in CUDA builds)
// on one prompt, decoding a continuation; printed as text or one JSON object.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "model/sparse_policy.h"
#include "tools/cli_args.h"

namespace mprefill::cli {

// --device names a backend this machine or build cannot run (exit status 2).
struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct GenerateArgs : cli::JobOptions {
  GenerateArgs() { dense_below = kDefaultDenseBelow; }  // (the service's default too)
  std::string model, tokenizer;
  int64_t max_prompt = 0;
  std::string device = "cpu";
  int threads = 0;
  bool json = false;
  bool help = false;
  bool progress = false;  // --progress: a prefill progress line even when stderr is no terminal
};

// Runs the command; returns the exit status. Throws DeviceError, std::runtime_error.
int run_generate(const GenerateArgs& a);

}  // namespace mprefill::cli
