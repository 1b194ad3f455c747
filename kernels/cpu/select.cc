// Ranking and cumulative-mass selection, shared by vertical-slash and block-sparse
// estimation: a fixed budget keeps the first `cap` entries of the ranking; an adaptive
// threshold tau keeps the shortest prefix of it whose mass reaches tau of the total.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/cpu/cpu.h"

namespace mprefill::cpu {

std::vector<int> rank_indices(const float* score, int64_t n, int64_t forced_lo, int64_t forced_hi,
                              int64_t take) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::vector<float> key(std::max<int64_t>(n, 0));
  for (int64_t i = 0; i < n; ++i) {
    key[i] = i >= forced_lo && i < forced_hi ? kInf : std::isnan(score[i]) ? -kInf : score[i];
  }
  std::vector<int> idx(key.size());
  std::iota(idx.begin(), idx.end(), 0);
  take = std::clamp<int64_t>(take, 0, static_cast<int64_t>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + take, idx.end(),
                    [&](int a, int b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
  idx.resize(take);
  return idx;
}

int64_t mass_prefix(const std::vector<int>& order, int64_t n_forced, const float* mass, int64_t n,
                    double tau) {
  auto usable = [](float m) { return std::isfinite(m) && m > 0.f; };
  double total = 0;
  for (int64_t i = 0; i < n; ++i)
    if (usable(mass[i])) total += mass[i];
  const double goal = tau * total;
  const int64_t size = static_cast<int64_t>(order.size());
  n_forced = std::clamp<int64_t>(n_forced, 0, size);
  double cum = 0;
  int64_t keep = 0;
  for (; keep < n_forced; ++keep)
    if (usable(mass[order[keep]])) cum += mass[order[keep]];
  // Forced entries may already reach the goal (or total may be 0: nothing to gain).
  while (keep < size && cum < goal && usable(mass[order[keep]])) cum += mass[order[keep++]];
  return keep;
}

std::vector<int> select_by_mass(const float* score, const float* mass, int64_t n, int64_t forced_lo,
                                int64_t forced_hi, int64_t cap, double tau) {
  std::vector<int> order = rank_indices(score, n, forced_lo, forced_hi, cap);
  if (tau > 0) {
    const int64_t n_forced =
        std::max<int64_t>(0, std::min(forced_hi, n) - std::max<int64_t>(forced_lo, 0));
    order.resize(mass_prefix(order, n_forced, mass, n, tau));
  }
  return order;
}

}  // namespace mprefill::cpu
