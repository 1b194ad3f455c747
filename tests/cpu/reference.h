// Naive fp64 references for the CPU attention/estimation kernels, and mask predicates
// written directly from the definitions in ../shared/BENCHMARKS.md (independent of the
// kernels' index build). Header-only; used by the tests in tests/cpu.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/parallel.h"
#include "kernels/sparse.h"
#include "tests/testutil.h"

namespace mprefill::test::ref {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Distinct seed for every test case (a hash of the case's parameters and a salt).
inline uint64_t case_seed(std::initializer_list<int64_t> values) {
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (int64_t x : values) {
    h ^= static_cast<uint64_t>(x) + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    h *= 0xBF58476D1CE4E5B9ull;
  }
  return h >> 8;  // leaves room for the small multipliers of Problem
}

// fp64 dot product of fp32 vectors (four partial sums: same value up to fp64 rounding,
// several times faster than one serial chain).
inline double dot64(const float* a, const float* b, int n) {
  double s[4] = {0, 0, 0, 0};
  int i = 0;
  for (; i + 4 <= n; i += 4)
    for (int t = 0; t < 4; ++t) s[t] += static_cast<double>(a[i + t]) * b[i + t];
  for (; i < n; ++i) s[0] += static_cast<double>(a[i]) * b[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// ---------------------------------------------------------------- problems
// Packed random Q/K/V (normal(0,1) Q/K so scores are O(1) after the 1/sqrt(d) scale,
// uniform V), output buffers, and params describing them.
struct Problem {
  int n_q = 0, n_k = 0, heads = 0, kv_heads = 0, dim = 0;
  int64_t q_pos0 = 0, k_pos0 = 0;
  bool causal = true;
  std::vector<float> q, k, v, o, lse;

  Problem(int n_q_, int n_k_, int h, int kvh, int d, uint64_t seed)
      : n_q(n_q_), n_k(n_k_), heads(h), kv_heads(kvh), dim(d) {
    q = random_normal(static_cast<size_t>(n_q) * h * d, seed * 4 + 1);
    k = random_normal(static_cast<size_t>(n_k) * kvh * d, seed * 4 + 2);
    v = random_uniform(static_cast<size_t>(n_k) * kvh * d, seed * 4 + 3);
    o.assign(q.size(), std::nanf(""));  // kernels must overwrite every element
    lse.assign(static_cast<size_t>(h) * n_q, std::nanf(""));
  }
  AttentionParams params() {
    AttentionParams p;
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.o = o.data();
    p.lse = lse.data();
    p.n_q = n_q;
    p.n_k = n_k;
    p.num_heads = heads;
    p.num_kv_heads = kv_heads;
    p.head_dim = dim;
    p.q_pos0 = q_pos0;
    p.k_pos0 = k_pos0;
    p.causal = causal;
    p.scale = 1.f / std::sqrt(static_cast<float>(dim));
    set_packed_strides(p);
    return p;
  }
};

struct Result {
  std::vector<double> o;    // [n_q][heads][dim], packed
  std::vector<double> lse;  // [heads][n_q]; -inf for a row without keys
};

// fp64 attention of p (read through its strides) where key c is visible to query row r
// (global positions) of query head h iff visible(h, r, c). Nothing else (not even
// causality) is applied: the predicate is the whole mask.
template <typename Visible>
Result attention(const AttentionParams& p, Visible visible) {
  Result res;
  res.o.assign(static_cast<size_t>(p.n_q) * p.num_heads * p.head_dim, 0.0);
  res.lse.assign(static_cast<size_t>(p.num_heads) * p.n_q, -kInf);
  const auto* q = static_cast<const float*>(p.q);
  const auto* k = static_cast<const float*>(p.k);
  const auto* v = static_cast<const float*>(p.v);
  const int group = p.num_heads / p.num_kv_heads, d = p.head_dim;
  cpu::parallel_for(static_cast<int64_t>(p.num_heads) * p.n_q, 8, [&](int64_t b, int64_t e) {
    std::vector<double> s(p.n_k), acc(d);
    std::vector<char> vis(p.n_k);
    for (int64_t item = b; item < e; ++item) {
      const int h = static_cast<int>(item / p.n_q), kvh = h / group;
      const int64_t i = item % p.n_q, r = p.q_pos0 + i;
      const float* qi = q + i * p.q_row_stride + h * p.q_head_stride;
      double m = -kInf;
      for (int64_t j = 0; j < p.n_k; ++j) {
        vis[j] = visible(h, r, p.k_pos0 + j) ? 1 : 0;
        if (!vis[j]) continue;
        const float* kj = k + j * p.k_row_stride + kvh * p.k_head_stride;
        s[j] = static_cast<double>(p.scale) * dot64(qi, kj, d);
        m = std::max(m, s[j]);
      }
      if (m == -kInf) continue;  // no visible key: o = 0, lse = -inf
      double l = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j < p.n_k; ++j) {
        if (!vis[j]) continue;
        const double w = std::exp(s[j] - m);
        l += w;
        const float* vj = v + j * p.v_row_stride + kvh * p.v_head_stride;
        for (int t = 0; t < d; ++t) acc[t] += w * vj[t];
      }
      double* o = res.o.data() + (i * p.num_heads + h) * d;
      for (int t = 0; t < d; ++t) o[t] = acc[t] / l;
      res.lse[h * p.n_q + i] = m + std::log(l);
    }
  });
  return res;
}

// ---------------------------------------------------------------- masks
inline auto dense_mask(bool causal) {
  return [causal](int, int64_t r, int64_t c) { return !causal || c <= r; };
}

inline auto ashape_mask(std::vector<int> n_init, std::vector<int> n_local) {
  return [n_init, n_local](int h, int64_t r, int64_t c) {
    return c <= r && (c < n_init[h] || r - c < n_local[h]);
  };
}

// Key set of every query block of one vertical-slash selection, straight from the
// definition: block b = rows [64 b, m1), m1 = min(64 b + 64, N); for each offset d < m1
// the keys [max(m1 - d, 64) - 64, max(m1 - d, 64)) (below m1), and each column c < m1.
struct VsBlockSets {
  int64_t n = 0;
  std::vector<std::vector<char>> window;  // [block][N]: covered by some offset window
  std::vector<std::vector<char>> keys;    // [block][N]: window or vertical column

  VsBlockSets(const VsSelection& sel, int64_t n_) : n(n_) {
    const int64_t nb = num_blocks(n);
    window.assign(nb, std::vector<char>(n, 0));
    keys.assign(nb, std::vector<char>(n, 0));
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t m1 = std::min<int64_t>(64 * b + 64, n);
      for (int d : sel.offsets) {
        if (d >= m1) continue;
        const int64_t e = std::max<int64_t>(m1 - d, 64);
        for (int64_t c = e - 64; c < e && c < m1; ++c) window[b][c] = 1;
      }
      keys[b] = window[b];
      for (int c : sel.columns) {
        if (c < m1) keys[b][c] = 1;
      }
    }
  }
  bool visible(int64_t r, int64_t c) const { return c <= r && keys[r / 64][c]; }
};

// Per-head vertical-slash mask (query head h uses sets[h]).
inline auto vs_mask(const std::vector<VsBlockSets>& sets) {
  return [&sets](int h, int64_t r, int64_t c) { return sets[h].visible(r, c); };
}

// Block-sparse mask from lists blocks[h][b] (any order, -1 ignored).
inline auto block_mask(const std::vector<std::vector<std::set<int>>>& lists) {
  return [&lists](int h, int64_t r, int64_t c) {
    return c <= r && lists[h][r / 64].count(static_cast<int>(c / 64)) > 0;
  };
}

// ---------------------------------------------------------------- estimation
// fp64 vertical-slash scores of a single process holding all N keys:
// col[h][c] = sum_r p[r][c], slash[h][d] = sum_r p[r][r - d] over the last min(64, N)
// rows, softmax over the causal keys of each row.
struct VsScores {
  std::vector<double> col, slash;  // [heads][N]
};
inline VsScores vs_scores(const std::vector<float>& q_last, const std::vector<float>& k, int64_t n,
                          int heads, int kv_heads, int dim, double scale) {
  const int n_last = static_cast<int>(std::min<int64_t>(64, n));
  VsScores s;
  s.col.assign(static_cast<size_t>(heads) * n, 0.0);
  s.slash.assign(static_cast<size_t>(heads) * n, 0.0);
  std::vector<double> x(n);
  for (int h = 0; h < heads; ++h) {
    const int kvh = h / (heads / kv_heads);
    for (int i = 0; i < n_last; ++i) {
      const int64_t r = n - n_last + i;
      double m = -kInf;
      for (int64_t c = 0; c <= r; ++c) {
        x[c] = scale * dot64(q_last.data() + (static_cast<size_t>(i) * heads + h) * dim,
                             k.data() + (static_cast<size_t>(c) * kv_heads + kvh) * dim, dim);
        m = std::max(m, x[c]);
      }
      double l = 0;
      for (int64_t c = 0; c <= r; ++c) l += std::exp(x[c] - m);
      for (int64_t c = 0; c <= r; ++c) {
        const double prob = std::exp(x[c] - m) / l;
        s.col[h * n + c] += prob;
        s.slash[h * n + (r - c)] += prob;
      }
    }
  }
  return s;
}

// fp64 block scores scale * mean(q rows of block b) . mean(k rows of block j), [H][nb][nb]
// (packed [N][heads][dim] Q and [N][kv_heads][dim] K).
inline std::vector<double> block_scores(const std::vector<float>& q, const std::vector<float>& k,
                                        int64_t n, int heads, int kv_heads, int dim, double scale) {
  const int64_t nb = num_blocks(n);
  auto pool = [&](const std::vector<float>& x, int nh) {
    std::vector<double> out(static_cast<size_t>(nh) * nb * dim, 0.0);
    for (int h = 0; h < nh; ++h)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t r0 = 64 * b, r1 = std::min<int64_t>(n, r0 + 64);
        for (int64_t r = r0; r < r1; ++r)
          for (int t = 0; t < dim; ++t)
            out[(h * nb + b) * dim + t] += x[(static_cast<size_t>(r) * nh + h) * dim + t];
        for (int t = 0; t < dim; ++t) out[(h * nb + b) * dim + t] /= static_cast<double>(r1 - r0);
      }
    return out;
  };
  const std::vector<double> qp = pool(q, heads), kp = pool(k, kv_heads);
  std::vector<double> s(static_cast<size_t>(heads) * nb * nb, 0.0);
  for (int h = 0; h < heads; ++h) {
    const int kvh = h / (heads / kv_heads);
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = 0; j < nb; ++j) {
        double dotv = 0;
        for (int t = 0; t < dim; ++t)
          dotv += qp[(h * nb + b) * dim + t] * kp[(kvh * nb + j) * dim + t];
        s[(h * nb + b) * nb + j] = scale * dotv;
      }
  }
  return s;
}

// ---------------------------------------------------------------- random selections
// A valid selection over N: `nv` distinct columns (ascending), `ns` distinct offsets
// (descending) that include 0. Sizes are capped by N.
inline VsSelection random_selection(int64_t n, int nv, int ns, std::mt19937_64& g) {
  std::uniform_int_distribution<int> pick(0, static_cast<int>(n - 1));
  std::set<int> cols, offs{0};
  nv = static_cast<int>(std::min<int64_t>(nv, n));
  ns = static_cast<int>(std::min<int64_t>(ns, n));
  while (static_cast<int>(cols.size()) < nv) cols.insert(pick(g));
  while (static_cast<int>(offs.size()) < ns) offs.insert(pick(g));
  VsSelection s;
  s.columns.assign(cols.begin(), cols.end());
  s.offsets.assign(offs.rbegin(), offs.rend());
  return s;
}

// ---------------------------------------------------------------- comparisons
// Normwise check of a kernel output against the fp64 reference.
inline void expect_close(const std::vector<float>& out, const std::vector<double>& ref, double tol,
                         const std::string& what) {
  ASSERT_EQ(out.size(), ref.size()) << what;
  std::string why;
  EXPECT_TRUE(normwise_close(out.data(), ref.data(), ref.size(), tol, &why)) << what << ": " << why;
}

// LSE: -inf exactly where the reference has no key, finite values normwise within tol.
inline void expect_lse_close(const std::vector<float>& out, const std::vector<double>& ref,
                             double tol, const std::string& what) {
  ASSERT_EQ(out.size(), ref.size()) << what;
  std::vector<float> a;
  std::vector<double> b;
  int64_t bad_inf = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (ref[i] == -kInf) {
      bad_inf += !(out[i] == -std::numeric_limits<float>::infinity());
    } else {
      a.push_back(out[i]);
      b.push_back(ref[i]);
    }
  }
  EXPECT_EQ(bad_inf, 0) << what << ": rows without keys must have lse = -inf";
  if (b.empty()) return;
  std::string why;
  EXPECT_TRUE(normwise_close(a.data(), b.data(), b.size(), tol, &why)) << what << " lse: " << why;
}

}  // namespace mprefill::test::ref
