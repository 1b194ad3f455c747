// Shared harness of the GPU attention tests (dense flash and sparse kernels): random
// 16-bit inputs in a strided layout, fp64 and same-precision CPU references over a
// visibility predicate, device buffers with poisoned outputs, and the pass rule
//   max|out - ref64| <= 2 * max|same - ref64| + 1e-4 * max|ref64|
// (ref64: float64 attention on the rounded inputs; same: fp32 Q K^T and accumulation,
// P rounded to the element type before P V, output rounded). LSE: max|lse - lse64| <=
// 2 * max|lse_same - lse64| + 1e-4 * max(1, max|lse64|), -inf exactly where a row sees
// no key. NaN never passes; row padding and LSE entries past n_q must stay poisoned.
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "kernels/attention.h"
#include "kernels/types.h"
#include "tests/testutil.h"

namespace mprefill::test::gpu {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Number of DeviceBuffers::check() calls so far in this process. The attention fixtures
// compare it before and after each test, so a test whose cases all fell away (e.g. an
// instance this build lacks) fails instead of passing with zero checks.
inline int& checks_done() {
  static int n = 0;
  return n;
}

// Fails the current test when it neither skipped nor ran a check since `before`
// (called from the fixtures' TearDown).
inline void expect_checked_since(int before) {
  const testing::TestInfo* t = testing::UnitTest::GetInstance()->current_test_info();
  if (t->result()->Skipped() || t->result()->Failed()) return;
  EXPECT_GT(checks_done(), before)
      << "no case was checked: skip (GTEST_SKIP with the reason) when nothing can run";
}

// False (with the reason) when there is no CUDA device or device 0 is not Hopper.
inline bool hopper_ok(const char* what, std::string* why) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    *why = std::string("no CUDA device: ") + what + " GPU tests skipped";
    return false;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    *why = "cudaGetDeviceProperties failed";
    return false;
  }
  if (prop.major != 9) {
    *why = std::string(what) + " needs sm_90 (Hopper); device 0 is " + prop.name;
    return false;
  }
  return true;
}

inline uint16_t to_bits(float x, DType t) {
  return t == DType::kBF16 ? f32_to_bf16(x) : f32_to_f16(x);
}
inline float from_bits(uint16_t b, DType t) {
  return t == DType::kBF16 ? bf16_to_f32(b) : f16_to_f32(b);
}
inline float round_to(float x, DType t) { return from_bits(to_bits(x, t), t); }

struct Shape {
  int n_q = 0, n_k = 0, heads = 1, kv_heads = 1, dim = 128;
  int64_t q_pos0 = 0, k_pos0 = 0;
  int pad = 0;  // extra elements at the end of every Q/K/V/O row (strided layout)
  DType dtype = DType::kBF16;
  uint64_t seed = 1;
  int64_t q_row() const { return int64_t(heads) * dim + pad; }
  int64_t kv_row() const { return int64_t(kv_heads) * dim + pad; }
};

// The Shape of a test case holding fields of the same names (flash and sparse cases).
template <class Case>
Shape shape_of(const Case& c) {
  Shape s;
  s.n_q = c.n_q;
  s.n_k = c.n_k;
  s.heads = c.heads;
  s.kv_heads = c.kv_heads;
  s.dim = c.dim;
  s.q_pos0 = c.q_pos0;
  s.k_pos0 = c.k_pos0;
  s.pad = c.pad;
  s.dtype = c.dtype;
  s.seed = c.seed;
  return s;
}

struct Host {
  std::vector<uint16_t> q, k, v;  // strided, as on the device
  std::vector<float> qf, kf, vf;  // packed [t][h][d] values of the rounded inputs
};

inline Host make_inputs(const Shape& s) {
  Host h;
  auto fill = [&](int n, int heads, int64_t row, uint64_t seed, std::vector<uint16_t>* bits,
                  std::vector<float>* vals) {
    const auto r = random_normal(size_t(n) * heads * s.dim, seed, 1.f);
    bits->assign(size_t(std::max(n, 1)) * row, to_bits(7.f, s.dtype));  // padding: finite junk
    vals->resize(r.size());
    for (int t = 0; t < n; ++t)
      for (int hh = 0; hh < heads; ++hh)
        for (int d = 0; d < s.dim; ++d) {
          const size_t src = (size_t(t) * heads + hh) * s.dim + d;
          const uint16_t b = to_bits(r[src], s.dtype);
          (*bits)[size_t(t) * row + size_t(hh) * s.dim + d] = b;
          (*vals)[src] = from_bits(b, s.dtype);
        }
  };
  fill(s.n_q, s.heads, s.q_row(), s.seed * 3 + 0, &h.q, &h.qf);
  fill(s.n_k, s.kv_heads, s.kv_row(), s.seed * 3 + 1, &h.k, &h.kf);
  fill(s.n_k, s.kv_heads, s.kv_row(), s.seed * 3 + 2, &h.v, &h.vf);
  return h;
}

// visible(h, r, c): key at global position c visible to query head h's row at global r.
using Visible = std::function<bool(int, int64_t, int64_t)>;

// References for all heads: o64/o_same packed [n_q][heads][dim], lse [heads][n_q].
struct Ref {
  std::vector<double> o64, lse64;
  std::vector<float> o_same, lse_same;
};

inline void reference_head(const Shape& s, const Host& h, const Visible& vis, int head, Ref* ref) {
  const int D = s.dim, kvh = head / (s.heads / s.kv_heads);
  const double scale = 1.0 / std::sqrt(double(D));
  const float scale_f = float(scale);
  std::vector<int> keys;
  std::vector<double> s64, acc64(D);
  std::vector<float> s32, acc32(D);
  for (int i = 0; i < s.n_q; ++i) {
    const int64_t r = s.q_pos0 + i;
    keys.clear();
    for (int j = 0; j < s.n_k; ++j)
      if (vis(head, r, s.k_pos0 + j)) keys.push_back(j);
    const float* q = &h.qf[(size_t(i) * s.heads + head) * D];
    double* o64 = &ref->o64[(size_t(i) * s.heads + head) * D];
    float* os = &ref->o_same[(size_t(i) * s.heads + head) * D];
    const size_t li = size_t(head) * s.n_q + i;
    if (keys.empty()) {
      std::fill(o64, o64 + D, 0.0);
      std::fill(os, os + D, 0.f);
      ref->lse64[li] = kNegInf;
      ref->lse_same[li] = -std::numeric_limits<float>::infinity();
      continue;
    }
    s64.resize(keys.size());
    s32.resize(keys.size());
    double m64 = kNegInf;
    float m32 = -std::numeric_limits<float>::infinity();
    for (size_t t = 0; t < keys.size(); ++t) {
      const float* k = &h.kf[(size_t(keys[t]) * s.kv_heads + kvh) * D];
      double d64 = 0;
      float d32 = 0;
      for (int e = 0; e < D; ++e) {
        d64 += double(q[e]) * double(k[e]);
        d32 += q[e] * k[e];
      }
      s64[t] = d64 * scale;
      s32[t] = d32 * scale_f;
      m64 = std::max(m64, s64[t]);
      m32 = std::max(m32, s32[t]);
    }
    double l64 = 0;
    float l32 = 0;
    std::fill(acc64.begin(), acc64.end(), 0.0);
    std::fill(acc32.begin(), acc32.end(), 0.f);
    for (size_t t = 0; t < keys.size(); ++t) {
      const double p64 = std::exp(s64[t] - m64);
      const float p32 = std::exp(s32[t] - m32);
      l64 += p64;
      l32 += p32;
      const float p_r = round_to(p32, s.dtype);
      const float* v = &h.vf[(size_t(keys[t]) * s.kv_heads + kvh) * D];
      for (int e = 0; e < D; ++e) {
        acc64[e] += p64 * double(v[e]);
        acc32[e] += p_r * v[e];
      }
    }
    for (int e = 0; e < D; ++e) {
      o64[e] = acc64[e] / l64;
      os[e] = round_to(acc32[e] / l32, s.dtype);
    }
    ref->lse64[li] = m64 + std::log(l64);
    ref->lse_same[li] = m32 + std::log(l32);
  }
}

inline Ref reference(const Shape& s, const Host& h, const Visible& vis) {
  Ref ref;
  ref.o64.resize(size_t(s.n_q) * s.heads * s.dim);
  ref.o_same.resize(ref.o64.size());
  ref.lse64.resize(size_t(s.heads) * s.n_q);
  ref.lse_same.resize(ref.lse64.size());
  std::vector<std::thread> pool;
  const int nt = int(std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
  for (int w = 0; w < nt; ++w)
    pool.emplace_back([&, w] {
      for (int hh = w; hh < s.heads; hh += nt) reference_head(s, h, vis, hh, &ref);
    });
  for (auto& t : pool) t.join();
  return ref;
}

// Device copies of the inputs and poisoned outputs (NaN in bf16/fp16 and fp32); the LSE
// has 3 padding entries per head. params() fills every AttentionParams field but
// `causal`. Frees everything it allocated.
class DeviceBuffers {
 public:
  DeviceBuffers(const Shape& s, const Host& h) : s_(s) {
    q_ = upload(h.q.data(), h.q.size() * 2);
    k_ = upload(h.k.data(), h.k.size() * 2);
    v_ = upload(h.v.data(), h.v.size() * 2);
    const std::vector<uint16_t> po(o_elems(), 0xffff);
    const std::vector<float> pl(lse_elems(), std::nanf(""));
    o_ = upload(po.data(), po.size() * 2);
    lse_ = upload(pl.data(), pl.size() * 4);
  }
  ~DeviceBuffers() {
    for (void* p : owned_) cudaFree(p);
  }
  DeviceBuffers(const DeviceBuffers&) = delete;
  DeviceBuffers& operator=(const DeviceBuffers&) = delete;

  bool ok() const { return ok_; }
  // Copies host data to the device (nullptr when the allocation fails); freed with *this.
  void* upload(const void* data, size_t bytes) {
    void* d = nullptr;
    if (cudaMalloc(&d, std::max<size_t>(bytes, 1)) != cudaSuccess) {
      ok_ = false;
      return nullptr;
    }
    owned_.push_back(d);
    if (bytes && cudaMemcpy(d, data, bytes, cudaMemcpyHostToDevice) != cudaSuccess) ok_ = false;
    return d;
  }
  template <typename T>
  T* upload(const std::vector<T>& v) {
    return static_cast<T*>(upload(v.data(), v.size() * sizeof(T)));
  }

  int64_t lse_stride() const { return s_.n_q + 3; }
  size_t o_elems() const { return size_t(s_.n_q) * s_.q_row(); }
  size_t lse_elems() const { return size_t(s_.heads) * lse_stride(); }

  AttentionParams params() const {
    AttentionParams p;
    p.q = q_;
    p.k = k_;
    p.v = v_;
    p.o = o_;
    p.lse = static_cast<float*>(lse_);
    p.n_q = s_.n_q;
    p.n_k = s_.n_k;
    p.num_heads = s_.heads;
    p.num_kv_heads = s_.kv_heads;
    p.head_dim = s_.dim;
    p.q_row_stride = p.o_row_stride = s_.q_row();
    p.k_row_stride = p.v_row_stride = s_.kv_row();
    p.q_head_stride = p.o_head_stride = p.k_head_stride = p.v_head_stride = s_.dim;
    p.lse_head_stride = lse_stride();
    p.q_pos0 = s_.q_pos0;
    p.k_pos0 = s_.k_pos0;
    p.scale = float(1.0 / std::sqrt(double(s_.dim)));
    p.dtype = s_.dtype;
    return p;
  }

  // Synchronises, downloads O and LSE and applies the pass rule (gtest expectations).
  void check(const Ref& ref, const std::string& name) const {
    ++checks_done();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << cudaGetErrorString(cudaGetLastError());
    std::vector<uint16_t> out(o_elems());
    std::vector<float> lse(lse_elems());
    ASSERT_EQ(cudaMemcpy(out.data(), o_, out.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(lse.data(), lse_, lse.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    const int D = s_.dim;
    const int64_t q_row = s_.q_row();
    double err = 0, err_same = 0, ref_max = 0;
    size_t bad_nan = 0, pad_written = 0;
    for (int t = 0; t < s_.n_q; ++t) {
      for (int hh = 0; hh < s_.heads; ++hh)
        for (int d = 0; d < D; ++d) {
          const size_t r = (size_t(t) * s_.heads + hh) * D + d;
          const float o = from_bits(out[size_t(t) * q_row + size_t(hh) * D + d], s_.dtype);
          if (!std::isfinite(o)) {
            ++bad_nan;
            continue;
          }
          err = std::max(err, std::fabs(double(o) - ref.o64[r]));
          err_same = std::max(err_same, std::fabs(double(ref.o_same[r]) - ref.o64[r]));
          ref_max = std::max(ref_max, std::fabs(ref.o64[r]));
        }
      for (int64_t e = int64_t(s_.heads) * D; e < q_row; ++e)  // padding must stay poisoned
        if (out[size_t(t) * q_row + e] != 0xffff) ++pad_written;
    }
    EXPECT_EQ(bad_nan, 0u) << "non-finite or unwritten outputs";
    EXPECT_EQ(pad_written, 0u) << "writes into row padding";
    const double tol = 2 * err_same + 1e-4 * ref_max;
    EXPECT_LE(err, tol) << "output: max err " << err << ", same-precision err " << err_same
                        << ", max|ref| " << ref_max;

    double lerr = 0, lerr_same = 0, lmax = 1;
    size_t lse_bad = 0, lse_pad = 0, empty_rows = 0;
    for (int hh = 0; hh < s_.heads; ++hh) {
      for (int i = 0; i < s_.n_q; ++i) {
        const size_t li = size_t(hh) * s_.n_q + i;
        const float got = lse[size_t(hh) * lse_stride() + i];
        const double want = ref.lse64[li];
        if (want == kNegInf) ++empty_rows;
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
      for (int64_t i = s_.n_q; i < lse_stride(); ++i)
        if (!std::isnan(lse[size_t(hh) * lse_stride() + i])) ++lse_pad;
    }
    std::printf(
        "[ case ] %s: out err %.3g (same %.3g, tol %.3g); lse err %.3g (same %.3g); empty rows "
        "%zu\n",
        name.c_str(), err, err_same, tol, lerr, lerr_same, empty_rows);
    EXPECT_EQ(lse_bad, 0u) << "lse NaN, or -inf mismatch for rows without visible keys";
    EXPECT_EQ(lse_pad, 0u) << "lse written past n_q";
    EXPECT_LE(lerr, 2 * lerr_same + 1e-4 * lmax)
        << "lse: max err " << lerr << ", same-precision err " << lerr_same;
  }

 private:
  Shape s_;
  bool ok_ = true;
  std::vector<void*> owned_;
  void *q_ = nullptr, *k_ = nullptr, *v_ = nullptr, *o_ = nullptr, *lse_ = nullptr;
};

}  // namespace mprefill::test::gpu
