// Next-token choice from a logits row: greedy (temperature 0; ties go to the lowest id),
// or temperature sampling with optional nucleus (top-p) truncation, deterministic for a
// seed (std::mt19937_64; uniforms built from its raw 64-bit output, so the same seed
// gives the same ids on every platform).
#pragma once
#include <cstdint>
#include <random>

namespace mprefill {

struct SamplerOptions {
  float temperature = 0.f;  // 0: greedy; > 0: sample from softmax(logits / temperature)
  float top_p = 1.f;        // (0, 1]: keep the smallest most-likely set with mass >= top_p
  uint64_t seed = 0;
  // Throws std::runtime_error naming the bad value.
  void validate() const;
};

struct SampledToken {
  int id = 0;
  float logit = 0.f;     // raw logit of id
  double logprob = 0.0;  // log-softmax of id under logits / temperature (plain log-softmax
                         // when greedy), over the whole vocabulary, before top-p truncation
};

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& opt);
  // logits: [n], n >= 1. A NaN logit is an error (std::runtime_error).
  SampledToken sample(const float* logits, int n);

 private:
  SamplerOptions opt_;
  std::mt19937_64 rng_;
};

}  // namespace mprefill
