// Dense flash-attention forward (kernels/cuda/flash) against CPU references.
//
// For every case: random 16-bit inputs, outputs poisoned with NaN before the run,
// then max|out - ref64| <= 2 * max|same - ref64| + 1e-4 * max|ref64| where ref64 is
// float64 attention on the same (rounded) inputs and `same` a same-precision CPU
// reference (fp32 Q K^T and accumulation, P rounded to the element type before P V,
// output rounded). LSE: max|lse - lse64| <= 2 * max|lse_same - lse64| + 1e-4 *
// max(1, max|lse64|), and -inf exactly where a row sees no key. NaN never passes.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/flash/flash.h"
#include "kernels/types.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

struct Case {
  int n_q, n_k, heads, kv_heads, dim;
  bool causal;
  int64_t q_pos0 = 0, k_pos0 = 0;
  int pad = 0;  // extra elements at the end of every Q/K/V/O row (strided layout)
  DType dtype = DType::kBF16;
  uint64_t seed = 1;

  std::string name() const {
    std::ostringstream s;
    s << to_string(dtype) << " nq=" << n_q << " nk=" << n_k << " h=" << heads << "/" << kv_heads
      << " d=" << dim << (causal ? " causal" : " noncausal") << " qpos0=" << q_pos0
      << " kpos0=" << k_pos0 << " pad=" << pad;
    return s.str();
  }
};

bool gpu_ok(std::string* why) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    *why = "no CUDA device: flash attention GPU tests skipped";
    return false;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    *why = "cudaGetDeviceProperties failed";
    return false;
  }
  if (prop.major != 9) {
    *why = std::string("flash kernel needs sm_90 (Hopper); device 0 is ") + prop.name;
    return false;
  }
  return true;
}

uint16_t to_bits(float x, DType t) { return t == DType::kBF16 ? f32_to_bf16(x) : f32_to_f16(x); }
float from_bits(uint16_t b, DType t) { return t == DType::kBF16 ? bf16_to_f32(b) : f16_to_f32(b); }
float round_to(float x, DType t) { return from_bits(to_bits(x, t), t); }

struct Host {
  std::vector<uint16_t> q, k, v;  // strided, as on the device
  std::vector<float> qf, kf, vf;  // packed [t][h][d] values of the rounded inputs
};

// References for all heads: o64/o_same packed [n_q][heads][dim], lse [heads][n_q].
struct Ref {
  std::vector<double> o64, lse64;
  std::vector<float> o_same, lse_same;
};

void reference_head(const Case& c, const Host& h, int head, Ref* ref) {
  const int D = c.dim, kvh = head / (c.heads / c.kv_heads);
  const double scale = 1.0 / std::sqrt(double(D));
  const float scale_f = float(scale);
  std::vector<double> s64(c.n_k);
  std::vector<float> s32(c.n_k), pr(c.n_k);
  std::vector<double> acc64(D);
  std::vector<float> acc32(D);
  for (int i = 0; i < c.n_q; ++i) {
    const float* q = &h.qf[(size_t(i) * c.heads + head) * D];
    int n_vis = c.n_k;
    if (c.causal) {
      const int64_t lim = c.q_pos0 + i - c.k_pos0 + 1;  // keys j < lim visible
      n_vis = int(std::clamp<int64_t>(lim, 0, c.n_k));
    }
    double* o64 = &ref->o64[(size_t(i) * c.heads + head) * D];
    float* os = &ref->o_same[(size_t(i) * c.heads + head) * D];
    const size_t li = size_t(head) * c.n_q + i;
    if (n_vis == 0) {
      std::fill(o64, o64 + D, 0.0);
      std::fill(os, os + D, 0.f);
      ref->lse64[li] = kNegInf;
      ref->lse_same[li] = -std::numeric_limits<float>::infinity();
      continue;
    }
    double m64 = kNegInf;
    float m32 = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < n_vis; ++j) {
      const float* k = &h.kf[(size_t(j) * c.kv_heads + kvh) * D];
      double d64 = 0;
      float d32 = 0;
      for (int t = 0; t < D; ++t) {
        d64 += double(q[t]) * double(k[t]);
        d32 += q[t] * k[t];
      }
      s64[j] = d64 * scale;
      s32[j] = d32 * scale_f;
      m64 = std::max(m64, s64[j]);
      m32 = std::max(m32, s32[j]);
    }
    double l64 = 0;
    float l32 = 0;
    std::fill(acc64.begin(), acc64.end(), 0.0);
    std::fill(acc32.begin(), acc32.end(), 0.f);
    for (int j = 0; j < n_vis; ++j) {
      const double p64 = std::exp(s64[j] - m64);
      const float p32 = std::exp(s32[j] - m32);
      l64 += p64;
      l32 += p32;
      const float p_r = round_to(p32, c.dtype);
      const float* v = &h.vf[(size_t(j) * c.kv_heads + kvh) * D];
      for (int t = 0; t < D; ++t) {
        acc64[t] += p64 * double(v[t]);
        acc32[t] += p_r * v[t];
      }
    }
    for (int t = 0; t < D; ++t) {
      o64[t] = acc64[t] / l64;
      os[t] = round_to(acc32[t] / l32, c.dtype);
    }
    ref->lse64[li] = m64 + std::log(l64);
    ref->lse_same[li] = m32 + std::log(l32);
  }
}

#define CU(call) \
  ASSERT_EQ((call), cudaSuccess) << #call << ": " << cudaGetErrorString(cudaGetLastError())

void run_case(const Case& c) {
  SCOPED_TRACE(c.name());
  const int D = c.dim;
  const int64_t q_row = int64_t(c.heads) * D + c.pad, kv_row = int64_t(c.kv_heads) * D + c.pad;
  Host h;
  auto fill = [&](int n, int heads, int64_t row, uint64_t seed, std::vector<uint16_t>* bits,
                  std::vector<float>* vals) {
    const auto r = test::random_normal(size_t(n) * heads * D, seed, 1.f);
    bits->assign(size_t(std::max(n, 1)) * row, to_bits(7.f, c.dtype));  // padding: finite junk
    vals->resize(r.size());
    for (int t = 0; t < n; ++t)
      for (int hh = 0; hh < heads; ++hh)
        for (int d = 0; d < D; ++d) {
          const size_t src = (size_t(t) * heads + hh) * D + d;
          const uint16_t b = to_bits(r[src], c.dtype);
          (*bits)[size_t(t) * row + size_t(hh) * D + d] = b;
          (*vals)[src] = from_bits(b, c.dtype);
        }
  };
  fill(c.n_q, c.heads, q_row, c.seed * 3 + 0, &h.q, &h.qf);
  fill(c.n_k, c.kv_heads, kv_row, c.seed * 3 + 1, &h.k, &h.kf);
  fill(c.n_k, c.kv_heads, kv_row, c.seed * 3 + 2, &h.v, &h.vf);

  Ref ref;
  ref.o64.resize(size_t(c.n_q) * c.heads * D);
  ref.o_same.resize(ref.o64.size());
  ref.lse64.resize(size_t(c.heads) * c.n_q);
  ref.lse_same.resize(ref.lse64.size());
  {
    std::vector<std::thread> pool;
    const int nt = int(std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
    for (int w = 0; w < nt; ++w)
      pool.emplace_back([&, w] {
        for (int hh = w; hh < c.heads; hh += nt) reference_head(c, h, hh, &ref);
      });
    for (auto& t : pool) t.join();
  }

  const size_t o_elems = size_t(c.n_q) * q_row;
  const int64_t lse_stride = c.n_q + 3;
  const size_t lse_elems = size_t(c.heads) * lse_stride;
  void *dq, *dk, *dv, *dout;
  float* dlse;
  CU(cudaMalloc(&dq, h.q.size() * 2));
  CU(cudaMalloc(&dk, h.k.size() * 2));
  CU(cudaMalloc(&dv, h.v.size() * 2));
  CU(cudaMalloc(&dout, o_elems * 2));
  CU(cudaMalloc(&dlse, lse_elems * 4));
  CU(cudaMemcpy(dq, h.q.data(), h.q.size() * 2, cudaMemcpyHostToDevice));
  CU(cudaMemcpy(dk, h.k.data(), h.k.size() * 2, cudaMemcpyHostToDevice));
  CU(cudaMemcpy(dv, h.v.data(), h.v.size() * 2, cudaMemcpyHostToDevice));
  CU(cudaMemset(dout, 0xff, o_elems * 2));    // NaN in bf16 and fp16
  CU(cudaMemset(dlse, 0xff, lse_elems * 4));  // NaN

  AttentionParams p;
  p.q = dq;
  p.k = dk;
  p.v = dv;
  p.o = dout;
  p.lse = dlse;
  p.n_q = c.n_q;
  p.n_k = c.n_k;
  p.num_heads = c.heads;
  p.num_kv_heads = c.kv_heads;
  p.head_dim = D;
  p.q_row_stride = p.o_row_stride = q_row;
  p.k_row_stride = p.v_row_stride = kv_row;
  p.q_head_stride = p.o_head_stride = p.k_head_stride = p.v_head_stride = D;
  p.lse_head_stride = lse_stride;
  p.q_pos0 = c.q_pos0;
  p.k_pos0 = c.k_pos0;
  p.causal = c.causal;
  p.scale = float(1.0 / std::sqrt(double(D)));
  p.dtype = c.dtype;
  const Status st = cuda::flash_attention_fwd(p, nullptr);
  ASSERT_EQ(st, Status::kOk) << to_string(st);
  CU(cudaDeviceSynchronize());

  std::vector<uint16_t> out(o_elems);
  std::vector<float> lse(lse_elems);
  CU(cudaMemcpy(out.data(), dout, o_elems * 2, cudaMemcpyDeviceToHost));
  CU(cudaMemcpy(lse.data(), dlse, lse_elems * 4, cudaMemcpyDeviceToHost));
  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dv);
  cudaFree(dout);
  cudaFree(dlse);

  double err = 0, err_same = 0, ref_max = 0;
  size_t bad_nan = 0, pad_written = 0;
  for (int t = 0; t < c.n_q; ++t) {
    for (int hh = 0; hh < c.heads; ++hh)
      for (int d = 0; d < D; ++d) {
        const size_t r = (size_t(t) * c.heads + hh) * D + d;
        const float o = from_bits(out[size_t(t) * q_row + size_t(hh) * D + d], c.dtype);
        if (!std::isfinite(o)) {
          ++bad_nan;
          continue;
        }
        err = std::max(err, std::fabs(double(o) - ref.o64[r]));
        err_same = std::max(err_same, std::fabs(double(ref.o_same[r]) - ref.o64[r]));
        ref_max = std::max(ref_max, std::fabs(ref.o64[r]));
      }
    for (int e = c.heads * D; e < q_row; ++e)  // padding must stay poisoned
      if (out[size_t(t) * q_row + e] != 0xffff) ++pad_written;
  }
  EXPECT_EQ(bad_nan, 0u) << "non-finite or unwritten outputs";
  EXPECT_EQ(pad_written, 0u) << "writes into row padding";
  const double tol = 2 * err_same + 1e-4 * ref_max;
  EXPECT_LE(err, tol) << "output: max err " << err << ", same-precision err " << err_same
                      << ", max|ref| " << ref_max;

  double lerr = 0, lerr_same = 0, lmax = 1;
  size_t lse_bad = 0, lse_pad = 0;
  for (int hh = 0; hh < c.heads; ++hh) {
    for (int i = 0; i < c.n_q; ++i) {
      const size_t li = size_t(hh) * c.n_q + i;
      const float got = lse[size_t(hh) * lse_stride + i];
      const double want = ref.lse64[li];
      if (std::isnan(got)) {
        ++lse_bad;
      } else if (want == kNegInf || std::isinf(got)) {
        if (!(double(got) == want)) ++lse_bad;
      } else {
        lerr = std::max(lerr, std::fabs(double(got) - want));
        lerr_same = std::max(lerr_same, std::fabs(double(ref.lse_same[li]) - want));
        lmax = std::max(lmax, std::fabs(want));
      }
    }
    for (int i = c.n_q; i < lse_stride; ++i)
      if (!std::isnan(lse[size_t(hh) * lse_stride + i])) ++lse_pad;
  }
  std::printf(
      "[ case ] %s: out err %.3g (same-precision %.3g, tol %.3g); lse err %.3g (same %.3g)\n",
      c.name().c_str(), err, err_same, tol, lerr, lerr_same);
  EXPECT_EQ(lse_bad, 0u) << "lse NaN, or -inf mismatch for rows without visible keys";
  EXPECT_EQ(lse_pad, 0u) << "lse written past n_q";
  EXPECT_LE(lerr, 2 * lerr_same + 1e-4 * lmax)
      << "lse: max err " << lerr << ", same-precision err " << lerr_same;
}

class FlashAttention : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!gpu_ok(&why)) GTEST_SKIP() << why;
  }
  void run(Case c) { run_case(c); }
  // Skips the test when this build has no instance for (dtype, head_dim), e.g. with
  // MPREFILL_CUDA_SUBSET (bf16 / head_dim 128 only).
  bool built(DType t, int dim) {
    if (cuda::flash_attention_supported(t, dim)) return true;
    std::printf("[ skip ] %s head_dim %d not built in this configuration\n", to_string(t), dim);
    return false;
  }
};

const int kSizes[] = {1, 63, 65, 127, 200, 1000, 4099};

TEST_F(FlashAttention, CausalSquareGqa4) {
  uint64_t seed = 10;
  for (int n : kSizes) {
    const int heads = n > 1000 ? 4 : 8;
    run({n, n, heads, heads / 4, 128, true, 0, 0, 0, DType::kBF16, seed++});
  }
}

TEST_F(FlashAttention, NonCausalGqa) {
  run({65, 1000, 8, 2, 128, false, 0, 0, 0, DType::kBF16, 21});
  run({200, 127, 6, 6, 128, false, 0, 0, 0, DType::kBF16, 22});
  run({1, 4099, 4, 1, 128, false, 0, 0, 0, DType::kBF16, 23});
  run({1000, 63, 4, 1, 128, false, 0, 0, 0, DType::kBF16, 24});
  run({127, 1, 3, 3, 128, false, 0, 0, 0, DType::kBF16, 25});
}

TEST_F(FlashAttention, CausalWithPositionOffsets) {
  // Chunked prefill: 200 queries at the end of 1000 keys.
  run({200, 1000, 8, 2, 128, true, 800, 0, 0, DType::kBF16, 31});
  // KV shard entirely in the past: every key visible.
  run({65, 300, 4, 1, 128, true, 1000, 0, 0, DType::kBF16, 32});
  // KV shard entirely in the future: every row empty (o = 0, lse = -inf).
  run({127, 200, 4, 1, 128, true, 0, 5000, 0, DType::kBF16, 33});
  // Rows 0..49 see no key, the rest a growing prefix.
  run({200, 300, 4, 2, 128, true, 100, 150, 0, DType::kBF16, 34});
  // Odd offset against a long shard; 1:1 heads.
  run({65, 4099, 2, 2, 128, true, 37, 0, 0, DType::kBF16, 35});
  // Positions past 2^32.
  run({63, 1000, 4, 1, 128, true, int64_t(5) << 32, (int64_t(5) << 32) - 500, 0, DType::kBF16, 36});
  // Empty KV shard: no keys at all.
  run({65, 0, 4, 1, 128, true, 0, 0, 0, DType::kBF16, 38});
  run({65, 0, 4, 1, 128, false, 0, 0, 0, DType::kBF16, 39});
  // Queries before the shard begins only partly: 1000 rows, shard starts at row 700.
  run({1000, 1000, 4, 1, 128, true, 0, 700, 0, DType::kBF16, 37});
}

TEST_F(FlashAttention, StridedRows) {
  run({200, 1000, 4, 2, 128, true, 800, 0, 8, DType::kBF16, 41});
  run({127, 65, 4, 4, 128, false, 0, 0, 64, DType::kBF16, 42});
}

TEST_F(FlashAttention, HeadDim64) {
  if (!built(DType::kBF16, 64)) GTEST_SKIP() << "bf16 head_dim 64 not built (MPREFILL_CUDA_SUBSET)";
  run({1000, 1000, 8, 2, 64, true, 0, 0, 0, DType::kBF16, 51});
  run({200, 4099, 4, 1, 64, false, 0, 0, 0, DType::kBF16, 52});
  run({200, 300, 4, 2, 64, true, 100, 150, 0, DType::kBF16, 53});
}

TEST_F(FlashAttention, Fp16) {
  if (!built(DType::kF16, 128) || !built(DType::kF16, 64))
    GTEST_SKIP() << "fp16 not built (MPREFILL_CUDA_SUBSET)";
  run({1000, 1000, 8, 2, 128, true, 0, 0, 0, DType::kF16, 61});
  run({65, 4099, 4, 1, 128, false, 0, 0, 0, DType::kF16, 62});
  run({200, 300, 4, 2, 64, true, 100, 150, 0, DType::kF16, 63});
}

// Argument checks return before any launch, so this runs without a GPU too.
TEST(FlashAttentionApi, RejectsUnsupported) {
  std::vector<uint16_t> dummy(16);
  AttentionParams p;
  p.q = p.k = p.v = dummy.data();
  p.o = dummy.data();
  p.n_q = p.n_k = 1;
  p.num_heads = p.num_kv_heads = 1;
  p.head_dim = 96;
  set_packed_strides(p);
  p.scale = 0.1f;
  p.dtype = DType::kBF16;
  EXPECT_EQ(cuda::flash_attention_fwd(p, nullptr), Status::kUnsupported);
  EXPECT_NE(cuda::last_error().find("head_dim 96"), std::string::npos) << cuda::last_error();
  p.head_dim = 128;
  p.dtype = DType::kF32;
  set_packed_strides(p);
  EXPECT_EQ(cuda::flash_attention_fwd(p, nullptr), Status::kUnsupported);
  p.dtype = DType::kBF16;
  p.q_row_stride = 130;  // not a multiple of 8 elements
  EXPECT_EQ(cuda::flash_attention_fwd(p, nullptr), Status::kUnsupported);
  p.q_row_stride = 128;
  p.num_kv_heads = 2;  // 1 % 2 != 0
  EXPECT_EQ(cuda::flash_attention_fwd(p, nullptr), Status::kInvalidArgument);
}

}  // namespace
}  // namespace mprefill
