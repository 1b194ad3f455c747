#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace mprefill {

void SamplerOptions::validate() const {
  if (!(temperature >= 0.f) || !std::isfinite(temperature))
    throw std::runtime_error("temperature must be a finite number >= 0, got " +
                             std::to_string(temperature));
  if (!(top_p > 0.f && top_p <= 1.f))
    throw std::runtime_error("top-p must be in (0, 1], got " + std::to_string(top_p));
}

Sampler::Sampler(const SamplerOptions& opt) : opt_(opt), rng_(opt.seed) { opt_.validate(); }

SampledToken Sampler::sample(const float* logits, int n) {
  if (n <= 0) throw std::runtime_error("sampler: empty logits row");
  for (int i = 0; i < n; ++i)
    if (std::isnan(logits[i]))
      throw std::runtime_error("sampler: logit of token " + std::to_string(i) + " is NaN");

  if (opt_.temperature == 0.f) {
    int best = 0;
    for (int i = 1; i < n; ++i)
      if (logits[i] > logits[best]) best = i;  // strict: ties keep the lowest id
    const double m = logits[best];
    double z = 0;
    for (int i = 0; i < n; ++i) z += std::exp(static_cast<double>(logits[i]) - m);
    return {best, logits[best], -std::log(z)};
  }

  // p[i] = exp(logits[i] / T - m), unnormalised; z = sum p.
  const double inv_t = 1.0 / opt_.temperature;
  double m = -INFINITY;
  for (int i = 0; i < n; ++i) m = std::max(m, logits[i] * inv_t);
  std::vector<double> p(n);
  double z = 0;
  for (int i = 0; i < n; ++i) z += (p[i] = std::exp(logits[i] * inv_t - m));

  // Candidates in sampling order: all ids ascending, or the nucleus by descending p
  // (ties: lower id first), cut after the first prefix whose mass reaches top_p * z.
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  double mass = z;
  if (opt_.top_p < 1.f) {
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    const double target = static_cast<double>(opt_.top_p) * z;
    double cum = 0;
    size_t keep = 0;
    while (keep < order.size()) {
      cum += p[order[keep++]];
      if (cum >= target) break;
    }
    order.resize(keep);
    mass = cum;
  }
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * mass;  // [0, mass)
  int chosen = order.back();
  double cum = 0;
  for (int id : order) {
    cum += p[id];
    if (u < cum) {
      chosen = id;
      break;
    }
  }
  return {chosen, logits[chosen], logits[chosen] * inv_t - m - std::log(z)};
}

}  // namespace mprefill
