// CPU layer ops against naive fp64 references at awkward sizes.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numbers>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

constexpr double kTol = 1e-5;

#define EXPECT_NORMWISE(out, ref, tol)                                                      \
  do {                                                                                      \
    std::string why_;                                                                       \
    EXPECT_TRUE(test::normwise_close((out).data(), (ref).data(), (ref).size(), tol, &why_)) \
        << why_;                                                                            \
  } while (0)

class ThreadGuard {  // restores the default thread count
 public:
  explicit ThreadGuard(int n) { cpu::set_num_threads(n); }
  ~ThreadGuard() { cpu::set_num_threads(0); }
};

std::vector<double> gemm_ref(const std::vector<float>& x, const std::vector<float>& w,
                             const float* bias, int64_t n, int64_t in, int64_t out) {
  std::vector<double> y(n * out);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t o = 0; o < out; ++o) {
      double s = bias ? bias[o] : 0.0;
      for (int64_t k = 0; k < in; ++k) s += static_cast<double>(x[i * in + k]) * w[o * in + k];
      y[i * out + o] = s;
    }
  return y;
}

struct GemmCase {
  int64_t n, in, out;
};

TEST(LayerOps, GemmMatchesFp64) {
  // Row counts around the 2-row tile and 64-row task, k around the 8-lane and 512 blocks,
  // out around the 4-column tile; in = 1100 spans three k blocks.
  const GemmCase cases[] = {{1, 1, 1},      {1, 288, 768},  {1, 7, 5},     {2, 9, 3},
                            {3, 17, 5},     {63, 65, 127},  {65, 129, 63}, {127, 100, 33},
                            {129, 513, 67}, {5, 1100, 257}, {257, 48, 130}};
  uint64_t seed = 1;
  for (const auto& c : cases) {
    for (bool with_bias : {false, true}) {
      const auto x = test::random_uniform(c.n * c.in, seed++);
      const auto w = test::random_uniform(c.in * c.out, seed++);
      const auto b = test::random_uniform(c.out, seed++);
      std::vector<float> y(c.n * c.out, NAN);
      cpu::gemm_xwt(x.data(), w.data(), with_bias ? b.data() : nullptr, y.data(), c.n, c.in, c.out);
      const auto ref = gemm_ref(x, w, with_bias ? b.data() : nullptr, c.n, c.in, c.out);
      SCOPED_TRACE("n=" + std::to_string(c.n) + " in=" + std::to_string(c.in) +
                   " out=" + std::to_string(c.out) + " bias=" + std::to_string(with_bias));
      EXPECT_NORMWISE(y, ref, kTol);
    }
  }
}

TEST(LayerOps, GemmIndependentOfThreadCount) {
  const int64_t n = 131, in = 777, out = 301;
  const auto x = test::random_uniform(n * in, 11), w = test::random_uniform(in * out, 12);
  const auto b = test::random_uniform(out, 13);
  std::vector<float> y1(n * out), y3(n * out), row(out);
  {
    ThreadGuard g(1);
    cpu::gemm_xwt(x.data(), w.data(), b.data(), y1.data(), n, in, out);
  }
  {
    ThreadGuard g(3);
    cpu::gemm_xwt(x.data(), w.data(), b.data(), y3.data(), n, in, out);
  }
  EXPECT_EQ(0, std::memcmp(y1.data(), y3.data(), y1.size() * sizeof(float)));
  // A row computed alone (decode, n = 1) equals the same row of the batched product.
  cpu::gemm_xwt(x.data() + 77 * in, w.data(), b.data(), row.data(), 1, in, out);
  EXPECT_EQ(0, std::memcmp(row.data(), y1.data() + 77 * out, out * sizeof(float)));
}

TEST(LayerOps, GemmThroughput) {  // informational: prints GFLOP/s, asserts only correctness
  const int64_t n = 512, in = 288, out = 768;
  const auto x = test::random_uniform(n * in, 21), w = test::random_uniform(in * out, 22);
  std::vector<float> y(n * out);
  for (int threads : {1, 0}) {
    ThreadGuard g(threads);
    cpu::gemm_xwt(x.data(), w.data(), nullptr, y.data(), n, in, out);
    int reps = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double el = 0;
    do {
      cpu::gemm_xwt(x.data(), w.data(), nullptr, y.data(), n, in, out);
      ++reps;
      el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } while (el < 0.3);
    std::printf("gemm_xwt n=%ld in=%ld out=%ld threads=%d: %.2f GFLOP/s\n", long(n), long(in),
                long(out), cpu::num_threads(), 2.0 * n * in * out * reps / el / 1e9);
  }
  EXPECT_NORMWISE(y, gemm_ref(x, w, nullptr, n, in, out), kTol);
}

TEST(LayerOps, RmsNormMatchesFp64) {
  const std::pair<int64_t, int64_t> cases[] = {{1, 1}, {1, 48}, {7, 288}, {65, 4099}, {3, 128}};
  uint64_t seed = 100;
  for (auto [n, dim] : cases) {
    auto x = test::random_uniform(n * dim, seed++, 3.f);
    const auto w = test::random_uniform(dim, seed++, 2.f);
    const float eps = 1e-5f;
    std::vector<float> y(n * dim);
    cpu::rmsnorm(x.data(), w.data(), y.data(), n, dim, eps);
    std::vector<double> ref(n * dim);
    for (int64_t t = 0; t < n; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += double(x[t * dim + i]) * x[t * dim + i];
      const double s = 1.0 / std::sqrt(ss / dim + eps);
      for (int64_t i = 0; i < dim; ++i) ref[t * dim + i] = x[t * dim + i] * s * w[i];
    }
    SCOPED_TRACE("n=" + std::to_string(n) + " dim=" + std::to_string(dim));
    EXPECT_NORMWISE(y, ref, kTol);
    // In place (y == x) is allowed.
    cpu::rmsnorm(x.data(), w.data(), x.data(), n, dim, eps);
    EXPECT_NORMWISE(x, ref, kTol);
  }
}

TEST(LayerOps, SwigluMatchesFp64) {
  const int64_t n = 100003;
  auto g = test::random_uniform(n, 200, 8.f);
  const auto u = test::random_uniform(n, 201, 2.f);
  g[0] = -200.f;  // exp overflow must not give NaN
  g[1] = 200.f;
  std::vector<float> out(n);
  cpu::swiglu(g.data(), u.data(), out.data(), n);
  std::vector<double> ref(n);
  for (int64_t i = 0; i < n; ++i) ref[i] = g[i] / (1.0 + std::exp(-double(g[i]))) * u[i];
  EXPECT_NORMWISE(out, ref, kTol);
  EXPECT_FALSE(std::isnan(out[0]));
}

TEST(LayerOps, EmbeddingAndAdd) {
  const int64_t vocab = 37, dim = 29, n = 101;
  const auto table = test::random_uniform(vocab * dim, 300);
  std::vector<int> ids(n);
  for (int64_t t = 0; t < n; ++t) ids[t] = static_cast<int>((t * 17 + 3) % vocab);
  std::vector<float> out(n * dim);
  cpu::embedding(table.data(), vocab, dim, ids.data(), n, out.data());
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < dim; ++i) ASSERT_EQ(out[t * dim + i], table[ids[t] * dim + i]);

  const int64_t m = 200001;
  auto a = test::random_uniform(m, 301);
  const auto b = test::random_uniform(m, 302);
  const auto a0 = a;
  cpu::add_inplace(a.data(), b.data(), m);
  for (int64_t i = 0; i < m; ++i) ASSERT_EQ(a[i], a0[i] + b[i]) << i;
}

// ---------------------------------------------------------------- RoPE
// Direct formula in double on one head vector.
void rope_ref(double* v, int d, double pos, const std::vector<double>& inv_freq, RopeStyle st) {
  for (int i = 0; i < d / 2; ++i) {
    const int ia = st == RopeStyle::kRotateHalf ? i : 2 * i;
    const int ib = st == RopeStyle::kRotateHalf ? i + d / 2 : 2 * i + 1;
    const double a = v[ia], b = v[ib], th = pos * inv_freq[i];
    v[ia] = a * std::cos(th) - b * std::sin(th);
    v[ib] = a * std::sin(th) + b * std::cos(th);
  }
}

TEST(LayerOps, RopeMatchesDirectFormula) {
  // Padded strides: row = heads * head_stride + 5, head_stride = head_dim + 3; the padding
  // must stay untouched.
  for (RopeStyle st : {RopeStyle::kRotateHalf, RopeStyle::kAdjacentPairs}) {
    for (int d : {2, 48, 64, 128}) {
      for (bool explicit_pos : {false, true}) {
        const int heads = 3;
        const int64_t n = 65, hs = d + 3, rs = heads * hs + 5, pos0 = 999'990;
        std::vector<int64_t> positions(n);
        for (int64_t t = 0; t < n; ++t) positions[t] = (t * 7919) % 1'000'003;  // up to ~1e6
        auto x = test::random_uniform(n * rs, 400 + d);
        const auto x0 = x;
        const auto inv = rope_inv_freq(d, 10000.0, RopeScaling{});
        cpu::rope(x.data(), n, heads, d, rs, hs, explicit_pos ? positions.data() : nullptr, pos0,
                  inv, st);
        std::vector<double> ref(x0.begin(), x0.end());
        for (int64_t t = 0; t < n; ++t)
          for (int h = 0; h < heads; ++h)
            rope_ref(ref.data() + t * rs + h * hs, d,
                     static_cast<double>(explicit_pos ? positions[t] : pos0 + t), inv, st);
        SCOPED_TRACE("style=" + std::to_string(int(st)) + " d=" + std::to_string(d) +
                     " explicit=" + std::to_string(explicit_pos));
        // Each element is one double expression rounded once: elementwise 1 ulp.
        for (size_t i = 0; i < x.size(); ++i)
          ASSERT_NEAR(x[i], ref[i], 1e-6 * std::max(1.0, std::fabs(ref[i]))) << i;
        for (int64_t t = 0; t < n; ++t)
          for (int64_t i = 0; i < rs; ++i)
            if (i >= heads * hs || i % hs >= d) {
              ASSERT_EQ(x[t * rs + i], x0[t * rs + i]) << i;
            }
      }
    }
  }
}

TEST(LayerOps, RopeLargePositionsNeedDoubleAngles) {
  // At position ~1e6 the fp32 angle pos * inv_freq is off by up to ~0.03 rad; the double
  // angle is what every device must use. The kernel must agree with double to 1e-5.
  const int d = 128, n = 9;
  const int64_t pos0 = 1'048'570;
  const auto inv = rope_inv_freq(d, 500000.0, RopeScaling{});
  auto x = test::random_uniform(n * d, 500);
  std::vector<double> ref(x.begin(), x.end());
  cpu::rope(x.data(), n, 1, d, d, d, nullptr, pos0, inv, RopeStyle::kRotateHalf);
  for (int t = 0; t < n; ++t)
    rope_ref(ref.data() + t * d, d, double(pos0 + t), inv, RopeStyle::kRotateHalf);
  EXPECT_NORMWISE(x, ref, kTol);
  // The same with fp32 angles would fail this tolerance (guards the test's sensitivity).
  auto xf = test::random_uniform(n * d, 500);
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < d / 2; ++i) {
      const float th = float(pos0 + t) * float(inv[i]);
      const float a = xf[t * d + i], b = xf[t * d + i + d / 2];
      xf[t * d + i] = a * std::cos(th) - b * std::sin(th);
      xf[t * d + i + d / 2] = a * std::sin(th) + b * std::cos(th);
    }
  std::string why;
  EXPECT_FALSE(test::normwise_close(xf.data(), ref.data(), ref.size(), kTol, &why));
}

TEST(LayerOps, RopeRotateHalfOnPermutedEqualsAdjacentPairs) {
  // llama2.c -> HF conversion permutes the rows of wq/wk per head:
  //   HF row i <- llama2.c row 2i, HF row d/2 + i <- llama2.c row 2i + 1 (i < d/2),
  // so q_hf = P q_l and rotate_half(q_hf) must equal P adjacent(q_l).
  const int heads = 4, d = 48;
  const int64_t n = 127;
  const auto inv = rope_inv_freq(d, 10000.0, RopeScaling{});
  auto xl = test::random_uniform(n * heads * d, 600);
  std::vector<float> xh(xl.size());
  for (int64_t t = 0; t < n * heads; ++t)
    for (int i = 0; i < d / 2; ++i) {
      xh[t * d + i] = xl[t * d + 2 * i];
      xh[t * d + d / 2 + i] = xl[t * d + 2 * i + 1];
    }
  cpu::rope(xl.data(), n, heads, d, heads * d, d, nullptr, 123'457, inv, RopeStyle::kAdjacentPairs);
  cpu::rope(xh.data(), n, heads, d, heads * d, d, nullptr, 123'457, inv, RopeStyle::kRotateHalf);
  for (int64_t t = 0; t < n * heads; ++t)
    for (int i = 0; i < d / 2; ++i) {
      ASSERT_EQ(xh[t * d + i], xl[t * d + 2 * i]);
      ASSERT_EQ(xh[t * d + d / 2 + i], xl[t * d + 2 * i + 1]);
    }
}

TEST(LayerOps, RopeInvFreqLlama3Scaling) {
  // Llama 3.1: d = 128, theta = 500000, factor 8, low 1, high 4, original 8192, so
  // wavelengths < 2048 keep their frequency, > 8192 are divided by 8, and in between
  // smooth = (8192 / wavelen - 1) / 3 blends f / 8 and f. Values from Python's math:
  //   f_i = 500000 ** (-2i / 128); wl = 2 pi / f_i.
  RopeScaling sc;
  sc.llama3 = true;
  sc.factor = 8;
  sc.low_freq_factor = 1;
  sc.high_freq_factor = 4;
  sc.original_max_position = 8192;
  const auto f = rope_inv_freq(128, 500000.0, sc);
  ASSERT_EQ(f.size(), 64u);
  const std::pair<int, double> expect[] = {
      {0, 1.0},                     // wl 6.28: unchanged
      {10, 0.12868737343265052},    // wl 48.8: unchanged
      {28, 0.003211445994752591},   // wl 1956.5 < 2048: unchanged
      {29, 0.002166570763503359},   // wl 2401.7: smooth 0.8036
      {30, 0.0013718935677611381},  // wl 2948.3: smooth 0.5928
      {34, 0.0001785078127679964},  // wl 6695.1: smooth 0.0745
      {35, 9.556212353964683e-05},  // wl 8218.7 > 8192: f / 8
      {63, 3.068925988914511e-07},  // f / 8
  };
  for (auto [i, v] : expect) EXPECT_NEAR(f[i], v, 1e-12 * v) << "i=" << i;
  // Without scaling the plain formula holds.
  const auto g = rope_inv_freq(128, 500000.0, RopeScaling{});
  EXPECT_NEAR(g[63], 2.455140791131609e-06, 1e-18);
}

}  // namespace
}  // namespace mprefill
