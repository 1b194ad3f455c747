// LSE merge of partial attention states (kernels/cuda/merge.h) against fp64 references:
// the formula on random states (empty rows on either side, bf16 / fp32 partials, padded
// strides, awkward sizes), and the exactness property ring attention relies on: merging
// the partials of disjoint key sets gives full attention.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/merge.h"
#include "kernels/types.h"

namespace mprefill {
namespace {

#define REQUIRE_GPU()                                                         \
  do {                                                                        \
    if (!cuda::has_gpu()) {                                                   \
      if (std::getenv("MPREFILL_REQUIRE_GPU"))                                \
        FAIL() << "MPREFILL_REQUIRE_GPU is set but no CUDA device is usable"; \
      GTEST_SKIP() << "no CUDA device: skipping";                             \
    }                                                                         \
  } while (0)

template <class T>
T* dev(const std::vector<T>& h) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(h.size(), 1) * sizeof(T)),
            cudaSuccess);
  EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}
template <class T>
std::vector<T> host(const T* d, size_t n) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void run_formula_case(int n, int heads, int hd, bool b_bf16, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  const int64_t ars = int64_t(heads) * (hd + 5), ahs = hd + 5;  // padded a
  const int64_t brs = int64_t(heads) * hd + 8, bhs = hd;        // padded b rows
  const int64_t las = n + 3, lbs = n + 1;
  std::vector<float> oa(size_t(n) * ars), la(size_t(heads) * las), ob(size_t(n) * brs),
      lb(size_t(heads) * lbs);
  for (auto& x : oa) x = u(g);
  for (auto& x : ob) x = u(g);
  if (b_bf16)
    for (auto& x : ob) x = bf16_to_f32(f32_to_bf16(x));
  for (auto& x : la) x = 4.f * u(g);
  for (auto& x : lb) x = 4.f * u(g);
  // Empty rows: a only, b only, both.
  for (int h = 0; h < heads; ++h) {
    la[h * las + 0] = kNegInf;
    lb[h * lbs + 1] = kNegInf;
    la[h * las + 2] = lb[h * lbs + 2] = kNegInf;
  }
  for (int r = 0; r < n; ++r)
    for (int h = 0; h < heads; ++h)
      if (la[h * las + r] == kNegInf)
        for (int d = 0; d < hd; ++d) oa[r * ars + h * ahs + d] = 0.f;  // as attention writes
  // fp64 reference.
  std::vector<double> ro(size_t(n) * heads * hd), rl(size_t(n) * heads);
  for (int r = 0; r < n; ++r)
    for (int h = 0; h < heads; ++h) {
      const double a = la[h * las + r], b = lb[h * lbs + r];
      const double m = std::max(a, b);
      double wa = 0, wb = 0;
      if (m != -INFINITY) {
        wa = std::exp(a - m);
        wb = std::exp(b - m);
      }
      rl[r * heads + h] = m == -INFINITY ? -INFINITY : m + std::log(wa + wb);
      for (int d = 0; d < hd; ++d) {
        const double x = oa[r * ars + h * ahs + d], y = ob[r * brs + h * bhs + d];
        ro[(size_t(r) * heads + h) * hd + d] = m == -INFINITY ? 0.0 : (wa * x + wb * y) / (wa + wb);
      }
    }
  std::vector<uint16_t> ob16(ob.size());
  for (size_t i = 0; i < ob.size(); ++i) ob16[i] = f32_to_bf16(ob[i]);
  float* d_oa = dev(oa);
  float* d_la = dev(la);
  float* d_lb = dev(lb);
  void* d_ob = b_bf16 ? static_cast<void*>(dev(ob16)) : static_cast<void*>(dev(ob));
  uint16_t* d_out = dev(std::vector<uint16_t>(size_t(n) * heads * hd, 0));
  cuda::MergeStatesParams p;
  p.o_a = d_oa;
  p.lse_a = d_la;
  p.o_b = d_ob;
  p.lse_b = d_lb;
  p.b_dtype = b_bf16 ? DType::kBF16 : DType::kF32;
  p.out_bf16 = d_out;
  p.a_row_stride = ars;
  p.a_head_stride = ahs;
  p.b_row_stride = brs;
  p.b_head_stride = bhs;
  p.out_row_stride = int64_t(heads) * hd;
  p.out_head_stride = hd;
  p.lse_a_head_stride = las;
  p.lse_b_head_stride = lbs;
  p.n = n;
  p.num_heads = heads;
  p.head_dim = hd;
  ASSERT_EQ(cuda::merge_attention_states(p, nullptr), Status::kOk) << cuda::last_error();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto go = host(d_oa, oa.size());
  const auto gl = host(d_la, la.size());
  const auto gout = host(d_out, size_t(n) * heads * hd);
  double max_o = 0, max_l = 0, max_out = 0;
  int inf_mismatch = 0;
  for (int r = 0; r < n; ++r)
    for (int h = 0; h < heads; ++h) {
      const double want = rl[r * heads + h], got = gl[h * las + r];
      if (std::isinf(want) || std::isinf(got)) {
        inf_mismatch += !(std::isinf(want) && std::isinf(got) && want < 0 && got < 0);
      } else {
        max_l = std::max(max_l, std::fabs(got - want));
      }
      for (int d = 0; d < hd; ++d) {
        const double w = ro[(size_t(r) * heads + h) * hd + d];
        max_o = std::max(max_o, std::fabs(go[r * ars + h * ahs + d] - w));
        max_out =
            std::max(max_out, std::fabs(bf16_to_f32(gout[(size_t(r) * heads + h) * hd + d]) - w));
      }
    }
  EXPECT_EQ(inf_mismatch, 0);
  EXPECT_LT(max_l, 1e-4);
  EXPECT_LT(max_o, 1e-4);
  EXPECT_LT(max_out, 3.0 * 1.0 / 128);  // bf16 rounding of |o| <= 3
  // The a strides' padding is untouched.
  for (int r = 0; r < n; ++r)
    for (int h = 0; h < heads; ++h)
      for (int d = hd; d < ahs && h * ahs + d < ars; ++d)
        ASSERT_EQ(go[r * ars + h * ahs + d], oa[r * ars + h * ahs + d]);
  cudaFree(d_oa);
  cudaFree(d_la);
  cudaFree(d_lb);
  cudaFree(d_ob);
  cudaFree(d_out);
}

TEST(MergeStates, FormulaBf16Partial) {
  REQUIRE_GPU();
  run_formula_case(37, 3, 72, true, 1);
  run_formula_case(5, 8, 128, true, 2);
}

TEST(MergeStates, FormulaF32Partial) {
  REQUIRE_GPU();
  run_formula_case(129, 2, 64, false, 3);
}

// Attention of one query row set over keys split into three disjoint sets (one empty
// for some rows: causal), merged on the GPU state by state, equals attention over all
// keys (fp64 reference).
TEST(MergeStates, DisjointKeySetsGiveFullAttention) {
  REQUIRE_GPU();
  const int n = 23, heads = 2, hd = 40, nk = 61;
  std::mt19937 g(7);
  std::normal_distribution<double> z;
  std::vector<double> q(size_t(n) * heads * hd), k(size_t(nk) * hd), v(size_t(nk) * hd);
  for (auto& x : q) x = z(g);
  for (auto& x : k) x = z(g);
  for (auto& x : v) x = z(g);
  const double scale = 1.0 / std::sqrt(double(hd));
  // Key set s of row r: keys j with j % 3 == s and j <= 2 r + 10 (causal-like cut).
  auto attend = [&](int r, int h, int set, std::vector<double>* o) -> double {
    std::vector<double> s;
    std::vector<int> js;
    for (int j = 0; j < nk; ++j) {
      if ((set >= 0 && j % 3 != set) || j > 2 * r + 10) continue;
      double dot = 0;
      for (int d = 0; d < hd; ++d)
        dot += q[(size_t(r) * heads + h) * hd + d] * k[size_t(j) * hd + d];
      s.push_back(dot * scale);
      js.push_back(j);
    }
    o->assign(hd, 0.0);
    if (s.empty()) return -INFINITY;
    double m = -INFINITY, sum = 0;
    for (double x : s) m = std::max(m, x);
    for (size_t i = 0; i < s.size(); ++i) {
      const double w = std::exp(s[i] - m);
      sum += w;
      for (int d = 0; d < hd; ++d) (*o)[d] += w * v[size_t(js[i]) * hd + d];
    }
    for (double& x : *o) x /= sum;
    return m + std::log(sum);
  };
  std::vector<float> oa(size_t(n) * heads * hd), la(size_t(heads) * n);
  float* d_oa = dev(oa);
  float* d_la = dev(la);
  ASSERT_EQ(
      cuda::reset_attention_state(d_oa, d_la, int64_t(heads) * hd, hd, n, n, heads, hd, nullptr),
      Status::kOk);
  std::vector<double> tmp;
  for (int set = 0; set < 3; ++set) {
    std::vector<float> ob(oa.size()), lb(la.size());
    for (int r = 0; r < n; ++r)
      for (int h = 0; h < heads; ++h) {
        lb[h * n + r] = static_cast<float>(attend(r, h, set, &tmp));
        for (int d = 0; d < hd; ++d) ob[(size_t(r) * heads + h) * hd + d] = float(tmp[d]);
      }
    float* d_ob = dev(ob);
    float* d_lb = dev(lb);
    cuda::MergeStatesParams p;
    p.o_a = d_oa;
    p.lse_a = d_la;
    p.o_b = d_ob;
    p.lse_b = d_lb;
    p.b_dtype = DType::kF32;
    p.a_row_stride = p.b_row_stride = int64_t(heads) * hd;
    p.a_head_stride = p.b_head_stride = hd;
    p.lse_a_head_stride = p.lse_b_head_stride = n;
    p.n = n;
    p.num_heads = heads;
    p.head_dim = hd;
    ASSERT_EQ(cuda::merge_attention_states(p, nullptr), Status::kOk) << cuda::last_error();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    cudaFree(d_ob);
    cudaFree(d_lb);
  }
  const auto go = host(d_oa, oa.size());
  const auto gl = host(d_la, la.size());
  double max_o = 0, max_l = 0;
  for (int r = 0; r < n; ++r)
    for (int h = 0; h < heads; ++h) {
      const double l = attend(r, h, -1, &tmp);
      max_l = std::max(max_l, std::fabs(gl[h * n + r] - l));
      for (int d = 0; d < hd; ++d)
        max_o = std::max(max_o, std::fabs(go[(size_t(r) * heads + h) * hd + d] - tmp[d]));
    }
  EXPECT_LT(max_o, 5e-5);
  EXPECT_LT(max_l, 5e-5);
  cudaFree(d_oa);
  cudaFree(d_la);
}

TEST(MergeStates, RejectsBadArguments) {
  cuda::MergeStatesParams p;
  EXPECT_EQ(cuda::merge_attention_states(p, nullptr), Status::kInvalidArgument);
}

}  // namespace
}  // namespace mprefill
