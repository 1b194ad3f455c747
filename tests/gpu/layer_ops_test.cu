// GPU layer ops and GEMM against fp64 references on random inputs at awkward sizes.
// Pass rule (issue 3): max|out - ref64| <= 2 * max|same - ref64| + 1e-4 * max|ref64|,
// where "same" is a host reference in the kernel's own precision (inputs in the data
// type, fp32 math, output rounded to the output type). NaN never passes. Outputs are
// poisoned (all bits set: NaN in fp32 and bf16) before each run; in-place ops are
// checked to leave every byte outside their view untouched.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cuda/cuda.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

using cuda::last_error;

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call
#define ST_OK(call) ASSERT_EQ((call), Status::kOk) << #call << ": " << last_error()

float round_to(DType t, float v) { return t == DType::kBF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

std::vector<float> rounded(DType t, std::vector<float> v) {
  for (float& x : v) x = round_to(t, x);
  return v;
}

// Host bytes of `v` in dtype t (values must already be representable).
std::vector<uint8_t> encode(DType t, const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * dtype_size(t));
  if (t == DType::kF32) {
    std::memcpy(b.data(), v.data(), b.size());
  } else {
    for (size_t i = 0; i < v.size(); ++i) {
      const uint16_t h = f32_to_bf16(v[i]);
      std::memcpy(b.data() + 2 * i, &h, 2);
    }
  }
  return b;
}

std::vector<float> decode(DType t, const std::vector<uint8_t>& b) {
  std::vector<float> v(b.size() / dtype_size(t));
  if (t == DType::kF32) {
    std::memcpy(v.data(), b.data(), b.size());
  } else {
    for (size_t i = 0; i < v.size(); ++i) {
      uint16_t h;
      std::memcpy(&h, b.data() + 2 * i, 2);
      v[i] = bf16_to_f32(h);
    }
  }
  return v;
}

// Device buffer of n elements of dtype t.
class Buf {
 public:
  Buf(DType t, size_t n) : t_(t), n_(n) {
    if (cudaMalloc(&p_, bytes() + 64) != cudaSuccess) p_ = nullptr;
  }
  ~Buf() { cudaFree(p_); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  void* get() const { return p_; }
  size_t bytes() const { return n_ * dtype_size(t_); }
  bool ok() const { return p_ != nullptr; }
  cudaError_t upload(const std::vector<float>& v) {
    const auto b = encode(t_, v);
    return cudaMemcpy(p_, b.data(), b.size(), cudaMemcpyHostToDevice);
  }
  cudaError_t poison() { return cudaMemset(p_, 0xff, bytes()); }
  std::vector<float> download(cudaError_t* err) const {
    std::vector<uint8_t> b(bytes());
    *err = cudaMemcpy(b.data(), p_, b.size(), cudaMemcpyDeviceToHost);
    return decode(t_, b);
  }

 private:
  DType t_;
  size_t n_;
  void* p_ = nullptr;
};

// The pass rule of the header, over all elements.
::testing::AssertionResult Close(const std::vector<float>& out, const std::vector<double>& ref64,
                                 const std::vector<double>& same) {
  if (out.size() != ref64.size() || same.size() != ref64.size())
    return ::testing::AssertionFailure() << "size mismatch";
  double e_out = 0, e_same = 0, m = 0;
  size_t worst = 0, unwritten = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (std::isnan(out[i])) {
      if (unwritten++ == 0) worst = i;
      continue;
    }
    const double d = std::fabs(out[i] - ref64[i]);
    if (!(d <= e_out) && unwritten == 0) worst = i;
    e_out = std::max(e_out, d);
    e_same = std::max(e_same, std::fabs(same[i] - ref64[i]));
    m = std::max(m, std::fabs(ref64[i]));
  }
  if (unwritten)
    return ::testing::AssertionFailure()
           << unwritten << " of " << out.size() << " outputs NaN (unwritten?), first at " << worst;
  const double bound = 2 * e_same + 1e-4 * m;
  if (!(e_out <= bound))
    return ::testing::AssertionFailure()
           << "max|out-ref64| = " << e_out << " > bound " << bound
           << " (max|same-ref64| = " << e_same << ", max|ref64| = " << m << "); worst at " << worst
           << ": out " << out[worst] << " ref " << ref64[worst];
  return ::testing::AssertionSuccess();
}

std::string dt(DType t) { return to_string(t); }

class LayerOps : public ::testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
      cudaGetLastError();
      if (std::getenv("MPREFILL_REQUIRE_GPU"))
        FAIL() << "MPREFILL_REQUIRE_GPU is set but no CUDA device is usable";
      GTEST_SKIP() << "no CUDA device: skipping";
    }
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
  }
  void TearDown() override {
    if (stream_) cudaStreamDestroy(stream_);
  }
  cudaError_t sync() {
    const cudaError_t e = cudaStreamSynchronize(stream_);
    return e != cudaSuccess ? e : cudaGetLastError();
  }
  uint64_t seed() { return seed_++; }
  cudaStream_t stream_ = nullptr;
  uint64_t seed_ = 0x5eed0000;
};

// ---------------------------------------------------------------- RMSNorm
struct NormCase {
  DType x, w, y;
  int64_t n, dim, pad;  // pad: extra elements per row (strides dim + pad)
  int64_t offset;       // elements of offset of x and y from the allocation start
};

TEST_F(LayerOps, RmsNorm) {
  const DType F = DType::kF32, B = DType::kBF16;
  const NormCase cases[] = {
      {F, F, F, 1, 48, 0, 0},    {F, F, F, 7, 289, 3, 0}, {B, B, B, 33, 4096, 0, 0},
      {B, B, B, 5, 4100, 4, 0},  {F, B, B, 9, 288, 0, 0}, {B, F, F, 3, 97, 0, 0},
      {F, F, B, 65, 1024, 8, 1}, {B, B, B, 2, 12, 0, 1},  {F, F, F, 130, 768, 0, 0},
  };
  const float eps = 1e-5f;
  for (const NormCase& c : cases) {
    SCOPED_TRACE(dt(c.x) + "/" + dt(c.w) + "/" + dt(c.y) + " n=" + std::to_string(c.n) +
                 " dim=" + std::to_string(c.dim) + " pad=" + std::to_string(c.pad) +
                 " off=" + std::to_string(c.offset));
    const int64_t st = c.dim + c.pad;
    const size_t total = c.offset + c.n * st;
    auto x = rounded(c.x, test::random_normal(total, seed(), 1.5f));
    auto w = test::random_uniform(c.dim, seed(), 0.5f);
    for (float& v : w) v = round_to(c.w, v + 1.f);
    Buf dx(c.x, total), dw(c.w, c.dim), dy(c.y, total);
    ASSERT_TRUE(dx.ok() && dw.ok() && dy.ok());
    CUDA_OK(dx.upload(x));
    CUDA_OK(dw.upload(w));
    CUDA_OK(dy.poison());
    const int64_t ox = c.offset * dtype_size(c.x), oy = c.offset * dtype_size(c.y);
    ST_OK(cuda::rmsnorm(static_cast<char*>(dx.get()) + ox, c.x, st, dw.get(), c.w,
                        static_cast<char*>(dy.get()) + oy, c.y, st, c.n, c.dim, eps, stream_));
    CUDA_OK(sync());
    cudaError_t e;
    const auto y = dy.download(&e);
    CUDA_OK(e);
    std::vector<float> out;
    std::vector<double> ref, same;
    for (int64_t r = 0; r < c.n; ++r) {
      const float* xr = x.data() + c.offset + r * st;
      double ss = 0;
      float ssf = 0;
      for (int64_t i = 0; i < c.dim; ++i) {
        ss += double(xr[i]) * xr[i];
        ssf += xr[i] * xr[i];
      }
      const double inv = 1.0 / std::sqrt(ss / c.dim + eps);
      const float invf = 1.f / std::sqrt(ssf / c.dim + eps);
      for (int64_t i = 0; i < c.dim; ++i) {
        out.push_back(y[c.offset + r * st + i]);
        ref.push_back(xr[i] * inv * w[i]);
        same.push_back(round_to(c.y, xr[i] * invf * w[i]));
      }
      for (int64_t i = c.dim; i < st; ++i)  // padding stays poisoned
        ASSERT_TRUE(std::isnan(y[c.offset + r * st + i])) << "row " << r << " pad " << i;
    }
    EXPECT_TRUE(Close(out, ref, same));
  }
}

TEST_F(LayerOps, RmsNormInPlace) {
  for (DType t : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(dt(t));
    const int64_t n = 11, dim = 500;
    auto x = rounded(t, test::random_normal(n * dim, seed(), 3.f));
    auto w = rounded(t, test::random_uniform(dim, seed(), 2.f));
    Buf dx(t, n * dim), dw(t, dim);
    ASSERT_TRUE(dx.ok() && dw.ok());
    CUDA_OK(dx.upload(x));
    CUDA_OK(dw.upload(w));
    ST_OK(cuda::rmsnorm(dx.get(), t, dim, dw.get(), t, dx.get(), t, dim, n, dim, 1e-6f, stream_));
    CUDA_OK(sync());
    cudaError_t e;
    const auto y = dx.download(&e);
    CUDA_OK(e);
    std::vector<double> ref, same;
    for (int64_t r = 0; r < n; ++r) {
      double ss = 0;
      float ssf = 0;
      for (int64_t i = 0; i < dim; ++i) {
        ss += double(x[r * dim + i]) * x[r * dim + i];
        ssf += x[r * dim + i] * x[r * dim + i];
      }
      for (int64_t i = 0; i < dim; ++i) {
        ref.push_back(x[r * dim + i] / std::sqrt(ss / dim + 1e-6) * w[i]);
        same.push_back(round_to(t, x[r * dim + i] * (1.f / std::sqrt(ssf / dim + 1e-6f)) * w[i]));
      }
    }
    EXPECT_TRUE(Close(y, ref, same));
  }
}

// ---------------------------------------------------------------- RoPE
struct RopeCase {
  DType t;
  RopeStyle style;
  int64_t n_tokens;
  int heads, head_dim;
  int64_t head_pad, row_pad;
  bool explicit_positions;
  int64_t pos0;
  double theta;
  bool llama3;
};

TEST_F(LayerOps, Rope) {
  const DType F = DType::kF32, B = DType::kBF16;
  const RopeStyle H = RopeStyle::kRotateHalf, A = RopeStyle::kAdjacentPairs;
  const RopeCase cases[] = {
      {F, H, 5, 3, 48, 0, 0, false, 0, 10000.0, false},
      {F, A, 5, 3, 48, 0, 0, false, 0, 10000.0, false},
      {F, H, 67, 6, 64, 2, 5, false, 1000003, 500000.0, true},
      {F, A, 67, 6, 64, 2, 5, true, 0, 500000.0, true},
      {B, H, 130, 5, 128, 0, 3, true, 0, 500000.0, true},
      {B, A, 130, 5, 128, 0, 3, false, 999937, 10000.0, false},
      {B, H, 1, 40, 128, 0, 0, false, 1048575, 1000000.0, false},
      {F, A, 3, 1, 2, 1, 1, true, 0, 10000.0, false},
  };
  for (const RopeCase& c : cases) {
    SCOPED_TRACE(dt(c.t) + (c.style == H ? " rotate-half" : " adjacent") +
                 " n=" + std::to_string(c.n_tokens) + " heads=" + std::to_string(c.heads) +
                 " d=" + std::to_string(c.head_dim) + " pos0=" + std::to_string(c.pos0) +
                 (c.explicit_positions ? " explicit" : ""));
    const int64_t hs = c.head_dim + c.head_pad;
    const int64_t rs = c.heads * hs + c.row_pad;
    const size_t total = c.n_tokens * rs;
    const auto x = rounded(c.t, test::random_normal(total, seed(), 2.f));
    std::vector<int64_t> pos(c.n_tokens);
    std::mt19937_64 g(seed());
    for (int64_t t = 0; t < c.n_tokens; ++t)
      pos[t] = c.explicit_positions ? static_cast<int64_t>(g() % 2000000) : c.pos0 + t;
    RopeScaling sc;
    sc.llama3 = c.llama3;
    if (c.llama3) sc.factor = 8.0;
    const std::vector<double> inv = rope_inv_freq(c.head_dim, c.theta, sc);
    Buf dx(c.t, total);
    ASSERT_TRUE(dx.ok());
    CUDA_OK(dx.upload(x));
    int64_t* dpos = nullptr;
    double* dinv = nullptr;
    CUDA_OK(cudaMalloc(&dpos, sizeof(int64_t) * pos.size()));
    CUDA_OK(cudaMalloc(&dinv, sizeof(double) * inv.size()));
    CUDA_OK(cudaMemcpy(dpos, pos.data(), sizeof(int64_t) * pos.size(), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dinv, inv.data(), sizeof(double) * inv.size(), cudaMemcpyHostToDevice));
    const Status s =
        cuda::rope(dx.get(), c.t, c.n_tokens, c.heads, c.head_dim, rs, hs,
                   c.explicit_positions ? dpos : nullptr, c.pos0, dinv, c.style, stream_);
    const cudaError_t se = sync();
    cudaError_t e;
    const auto y = dx.download(&e);
    cudaFree(dpos);
    cudaFree(dinv);
    ASSERT_EQ(s, Status::kOk) << last_error();
    CUDA_OK(se);
    CUDA_OK(e);
    std::vector<bool> inside(total, false);
    std::vector<float> out;
    std::vector<double> ref, same;
    const int half = c.head_dim / 2;
    size_t changed = 0;
    for (int64_t t = 0; t < c.n_tokens; ++t) {
      for (int h = 0; h < c.heads; ++h) {
        const int64_t base = t * rs + h * hs;
        for (int i = 0; i < half; ++i) {
          const int64_t d0 = c.style == A ? 2 * i : i, d1 = c.style == A ? 2 * i + 1 : i + half;
          const double ang = static_cast<double>(pos[t]) * inv[i];
          const double cd = std::cos(ang), sd = std::sin(ang);
          const float cf = static_cast<float>(cd), sf = static_cast<float>(sd);
          const float a = x[base + d0], b = x[base + d1];
          for (int64_t d : {d0, d1}) {
            inside[base + d] = true;
            out.push_back(y[base + d]);
            changed += y[base + d] != x[base + d];
          }
          ref.push_back(a * cd - b * sd);
          ref.push_back(a * sd + b * cd);
          same.push_back(round_to(c.t, a * cf - b * sf));
          same.push_back(round_to(c.t, a * sf + b * cf));
        }
      }
    }
    for (size_t i = 0; i < total; ++i)
      if (!inside[i]) ASSERT_EQ(y[i], x[i]) << "element " << i << " outside the heads changed";
    EXPECT_GT(changed, out.size() / 4) << "most rotated elements should differ from the input";
    EXPECT_TRUE(Close(out, ref, same));
  }
}

// ---------------------------------------------------------------- SwiGLU
TEST_F(LayerOps, SwiGlu) {
  struct Case {
    DType in, out;
    int64_t n, dim;
    bool fused;  // gate and up halves of one [n][2 * dim] buffer
  };
  const DType F = DType::kF32, B = DType::kBF16;
  const Case cases[] = {{F, F, 1, 768, false}, {F, F, 17, 1001, true}, {B, B, 64, 14336, true},
                        {B, F, 9, 768, false}, {F, B, 3, 97, false},   {B, B, 130, 255, false}};
  for (const Case& c : cases) {
    SCOPED_TRACE(dt(c.in) + "->" + dt(c.out) + " n=" + std::to_string(c.n) +
                 " dim=" + std::to_string(c.dim) + (c.fused ? " fused" : ""));
    const int64_t is = c.fused ? 2 * c.dim : c.dim;
    const auto gate = rounded(c.in, test::random_normal(c.n * is, seed(), 3.f));
    const auto up = rounded(c.in, test::random_normal(c.n * is, seed(), 1.f));
    Buf dg(c.in, c.n * is), du(c.in, c.n * is), dout(c.out, c.n * c.dim);
    ASSERT_TRUE(dg.ok() && du.ok() && dout.ok());
    CUDA_OK(dg.upload(gate));
    CUDA_OK(du.upload(c.fused ? gate : up));
    CUDA_OK(dout.poison());
    const void* gp = dg.get();
    const void* upp =
        c.fused ? static_cast<const char*>(dg.get()) + c.dim * dtype_size(c.in) : du.get();
    const std::vector<float>& uh = c.fused ? gate : up;
    const int64_t uoff = c.fused ? c.dim : 0;
    ST_OK(cuda::swiglu(gp, upp, c.in, is, dout.get(), c.out, c.dim, c.n, c.dim, stream_));
    CUDA_OK(sync());
    cudaError_t e;
    const auto y = dout.download(&e);
    CUDA_OK(e);
    std::vector<double> ref, same;
    for (int64_t r = 0; r < c.n; ++r) {
      for (int64_t i = 0; i < c.dim; ++i) {
        const float gv = gate[r * is + i], uv = uh[r * is + uoff + i];
        ref.push_back(gv / (1.0 + std::exp(-double(gv))) * uv);
        same.push_back(round_to(c.out, gv / (1.f + std::exp(-gv)) * uv));
      }
    }
    EXPECT_TRUE(Close(y, ref, same));
  }
}

// ---------------------------------------------------------------- embedding
TEST_F(LayerOps, Embedding) {
  struct Case {
    DType table, out;
    int64_t vocab, dim, n;
  };
  const DType F = DType::kF32, B = DType::kBF16;
  const Case cases[] = {{F, F, 32000, 288, 5},
                        {B, B, 1009, 4096, 37},
                        {B, F, 101, 289, 64},
                        {F, B, 77, 48, 1},
                        {F, F, 3, 1, 10}};
  for (const Case& c : cases) {
    SCOPED_TRACE(dt(c.table) + "->" + dt(c.out) + " vocab=" + std::to_string(c.vocab) +
                 " dim=" + std::to_string(c.dim) + " n=" + std::to_string(c.n));
    const auto table = rounded(c.table, test::random_normal(c.vocab * c.dim, seed(), 1.f));
    std::vector<int> ids(c.n);
    std::mt19937_64 g(seed());
    for (auto& id : ids) id = static_cast<int>(g() % c.vocab);
    ids[0] = static_cast<int>(c.vocab - 1);
    if (c.n > 1) ids[c.n - 1] = 0;
    Buf dt_(c.table, c.vocab * c.dim), dout(c.out, c.n * c.dim);
    ASSERT_TRUE(dt_.ok() && dout.ok());
    CUDA_OK(dt_.upload(table));
    CUDA_OK(dout.poison());
    int* dids = nullptr;
    CUDA_OK(cudaMalloc(&dids, sizeof(int) * c.n));
    CUDA_OK(cudaMemcpy(dids, ids.data(), sizeof(int) * c.n, cudaMemcpyHostToDevice));
    const Status s =
        cuda::embedding(dt_.get(), c.table, c.vocab, c.dim, dids, c.n, dout.get(), c.out, stream_);
    const cudaError_t se = sync();
    cudaFree(dids);
    ASSERT_EQ(s, Status::kOk) << last_error();
    CUDA_OK(se);
    cudaError_t e;
    const auto y = dout.download(&e);
    CUDA_OK(e);
    for (int64_t t = 0; t < c.n; ++t)  // a gather with conversion is exact
      for (int64_t i = 0; i < c.dim; ++i)
        ASSERT_EQ(y[t * c.dim + i], round_to(c.out, table[ids[t] * c.dim + i]))
            << "token " << t << " (id " << ids[t] << ") element " << i;
  }
}

TEST_F(LayerOps, EmbeddingBadIdGivesNaNRow) {
  const int64_t vocab = 50, dim = 64;
  const auto table = test::random_normal(vocab * dim, seed(), 1.f);
  const std::vector<int> ids = {3, 50, -1, 49};
  Buf dt_(DType::kF32, vocab * dim), dout(DType::kF32, ids.size() * dim);
  ASSERT_TRUE(dt_.ok() && dout.ok());
  CUDA_OK(dt_.upload(table));
  CUDA_OK(dout.upload(std::vector<float>(ids.size() * dim, 7.f)));
  int* dids = nullptr;
  CUDA_OK(cudaMalloc(&dids, sizeof(int) * ids.size()));
  CUDA_OK(cudaMemcpy(dids, ids.data(), sizeof(int) * ids.size(), cudaMemcpyHostToDevice));
  const Status s = cuda::embedding(dt_.get(), DType::kF32, vocab, dim, dids, ids.size(), dout.get(),
                                   DType::kF32, stream_);
  const cudaError_t se = sync();
  cudaFree(dids);
  ASSERT_EQ(s, Status::kOk) << last_error();
  CUDA_OK(se);
  cudaError_t e;
  const auto y = dout.download(&e);
  CUDA_OK(e);
  for (size_t t = 0; t < ids.size(); ++t)
    for (int64_t i = 0; i < dim; ++i) {
      if (ids[t] < 0 || ids[t] >= vocab)
        ASSERT_TRUE(std::isnan(y[t * dim + i])) << "token " << t;
      else
        ASSERT_EQ(y[t * dim + i], table[ids[t] * dim + i]) << "token " << t;
    }
}

// ---------------------------------------------------------------- adds
TEST_F(LayerOps, AddInPlace) {
  struct Case {
    DType x, y;
    int64_t n, offset;
  };
  const DType F = DType::kF32, B = DType::kBF16;
  const Case cases[] = {{F, F, 1, 0},    {F, B, 1001, 0},      {B, B, (1 << 20) + 3, 0},
                        {B, F, 4096, 0}, {F, F, (1 << 22), 0}, {F, F, 1000, 1},
                        {B, B, 4000, 3}};
  for (const Case& c : cases) {
    SCOPED_TRACE(dt(c.x) + "+=" + dt(c.y) + " n=" + std::to_string(c.n) +
                 " off=" + std::to_string(c.offset));
    const size_t total = c.n + c.offset;
    const auto x = rounded(c.x, test::random_normal(total, seed(), 4.f));
    const auto y = rounded(c.y, test::random_normal(total, seed(), 1.f));
    Buf dx(c.x, total), dy(c.y, total);
    ASSERT_TRUE(dx.ok() && dy.ok());
    CUDA_OK(dx.upload(x));
    CUDA_OK(dy.upload(y));
    ST_OK(cuda::add_inplace(static_cast<char*>(dx.get()) + c.offset * dtype_size(c.x), c.x,
                            static_cast<char*>(dy.get()) + c.offset * dtype_size(c.y), c.y, c.n,
                            stream_));
    CUDA_OK(sync());
    cudaError_t e;
    const auto out = dx.download(&e);
    CUDA_OK(e);
    for (int64_t i = 0; i < c.offset; ++i) ASSERT_EQ(out[i], x[i]) << "before the view: " << i;
    size_t bad = 0, first = 0;
    for (size_t i = c.offset; i < total; ++i) {  // fp32 add, one rounding: exact match
      if (!(out[i] == round_to(c.x, x[i] + y[i])) && bad++ == 0) first = i;
    }
    EXPECT_EQ(bad, 0u) << "first mismatch at " << first << ": " << out[first] << " vs "
                       << round_to(c.x, x[first] + y[first]);
  }
}

TEST_F(LayerOps, AddBias) {
  for (DType t : {DType::kF32, DType::kBF16}) {
    for (int64_t pad : {0, 3}) {
      SCOPED_TRACE(dt(t) + " pad=" + std::to_string(pad));
      const int64_t n = 19, dim = 131 + (pad ? 0 : 1), st = dim + pad;
      const auto y = rounded(t, test::random_normal(n * st, seed(), 2.f));
      const auto b = rounded(t, test::random_normal(dim, seed(), 1.f));
      Buf dy(t, n * st), db(t, dim);
      ASSERT_TRUE(dy.ok() && db.ok());
      CUDA_OK(dy.upload(y));
      CUDA_OK(db.upload(b));
      ST_OK(cuda::add_bias(dy.get(), t, st, db.get(), n, dim, stream_));
      CUDA_OK(sync());
      cudaError_t e;
      const auto out = dy.download(&e);
      CUDA_OK(e);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t i = 0; i < st; ++i) {
          const float want = i < dim ? round_to(t, y[r * st + i] + b[i]) : y[r * st + i];
          ASSERT_EQ(out[r * st + i], want) << "row " << r << " col " << i;
        }
    }
  }
}

// ---------------------------------------------------------------- GEMM
class Gemm : public LayerOps {
 protected:
  void SetUp() override {
    LayerOps::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    ASSERT_EQ(cuda::gemm_create(&ctx_), Status::kOk) << last_error();
    ASSERT_EQ(cudaMalloc(&ws_, cuda::gemm_workspace_size()), cudaSuccess);
  }
  void TearDown() override {
    cuda::gemm_destroy(ctx_);
    cudaFree(ws_);
    LayerOps::TearDown();
  }
  cuda::GemmContext* ctx_ = nullptr;
  void* ws_ = nullptr;
};

struct GemmCase {
  DType in, y;
  int64_t n, in_dim, out_dim;
  bool bias, accumulate, fallback;
  int64_t x_offset;  // elements; misaligns x for the alignment-aware heuristic
};

TEST_F(Gemm, XWt) {
  const DType F = DType::kF32, B = DType::kBF16;
  const GemmCase cases[] = {
      {B, B, 1, 48, 97, false, false, false, 0},
      {B, F, 37, 289, 131, true, false, false, 0},
      {B, B, 300, 1000, 768, true, true, false, 0},
      {B, B, 129, 4096, 512, false, false, false, 0},
      {B, F, 64, 288, 768, false, true, false, 1},
      {F, F, 37, 289, 131, true, true, false, 0},
      {F, F, 5, 48, 32000, false, false, false, 0},
      {B, B, 37, 289, 131, true, false, true, 0},
      {B, F, 300, 1000, 768, true, true, true, 0},
      {F, F, 3, 100, 7, true, false, true, 1},
      {B, B, 1000, 256, 257, false, false, false, 3},
  };
  for (const GemmCase& c : cases) {
    SCOPED_TRACE(dt(c.in) + "->" + dt(c.y) + " n=" + std::to_string(c.n) +
                 " in=" + std::to_string(c.in_dim) + " out=" + std::to_string(c.out_dim) +
                 (c.bias ? " bias" : "") + (c.accumulate ? " accumulate" : "") +
                 (c.fallback ? " fallback" : "") + " x_off=" + std::to_string(c.x_offset));
    const int64_t n = c.n, K = c.in_dim, M = c.out_dim;
    const auto x = rounded(c.in, test::random_normal(c.x_offset + n * K, seed(), 1.f));
    const auto w = rounded(c.in, test::random_normal(M * K, seed(), 0.05f));
    const auto bias = rounded(c.y, test::random_normal(M, seed(), 0.5f));
    const auto y0 = rounded(c.y, test::random_normal(n * M, seed(), 1.f));
    Buf dx(c.in, c.x_offset + n * K), dw(c.in, M * K), db(c.y, M), dy(c.y, n * M);
    ASSERT_TRUE(dx.ok() && dw.ok() && db.ok() && dy.ok());
    CUDA_OK(dx.upload(x));
    CUDA_OK(dw.upload(w));
    CUDA_OK(db.upload(bias));
    CUDA_OK(c.accumulate ? dy.upload(y0) : dy.poison());
    cuda::gemm_force_fallback(ctx_, c.fallback);
    ST_OK(cuda::gemm_xwt(ctx_, static_cast<char*>(dx.get()) + c.x_offset * dtype_size(c.in),
                         dw.get(), c.in, c.bias ? db.get() : nullptr, dy.get(), c.y, n, K, M,
                         c.accumulate, ws_, cuda::gemm_workspace_size(), stream_));
    CUDA_OK(sync());
    cudaError_t e;
    const auto y = dy.download(&e);
    CUDA_OK(e);
    std::vector<double> ref(n * M), same(n * M);
    for (int64_t r = 0; r < n; ++r) {
      const float* xr = x.data() + c.x_offset + r * K;
      for (int64_t j = 0; j < M; ++j) {
        const float* wr = w.data() + j * K;
        double acc = 0;
        float accf = 0;
        for (int64_t k = 0; k < K; ++k) {
          acc += double(xr[k]) * wr[k];
          accf += xr[k] * wr[k];
        }
        double r64 = acc;
        float rf = accf;
        if (c.accumulate) {
          r64 += y0[r * M + j];
          rf += y0[r * M + j];
        }
        if (c.bias) {
          r64 += bias[j];
          // the fallback adds the bias to an already rounded output
          rf = c.fallback ? round_to(c.y, rf) + bias[j] : rf + bias[j];
        }
        ref[r * M + j] = r64;
        same[r * M + j] = round_to(c.y, rf);
      }
    }
    EXPECT_TRUE(Close(y, ref, same));
  }
  cuda::gemm_force_fallback(ctx_, false);
}

TEST_F(Gemm, RejectsBadArguments) {
  Buf a(DType::kBF16, 64), b(DType::kBF16, 64), y(DType::kF16, 64);
  EXPECT_EQ(cuda::gemm_xwt(ctx_, a.get(), b.get(), DType::kF32, nullptr, y.get(), DType::kBF16, 4,
                           4, 4, false, ws_, cuda::gemm_workspace_size(), stream_),
            Status::kUnsupported);
  EXPECT_NE(last_error().find("gemm_xwt"), std::string::npos) << last_error();
  EXPECT_EQ(cuda::gemm_xwt(ctx_, a.get(), b.get(), DType::kBF16, nullptr, y.get(), DType::kBF16, 4,
                           0, 4, false, ws_, cuda::gemm_workspace_size(), stream_),
            Status::kInvalidArgument);
  EXPECT_EQ(
      cuda::gemm_xwt(ctx_, a.get(), b.get(), DType::kBF16, nullptr, y.get(), DType::kBF16, 4, 4, 4,
                     false, static_cast<char*>(ws_) + 8, cuda::gemm_workspace_size() - 8, stream_),
      Status::kInvalidArgument);
}

// ---------------------------------------------------------------- no device needed
// Argument checks run before any launch, so these hold on machines without a GPU too.
TEST(LayerOpsArgs, RejectsBadArgumentsWithAMessage) {
  float dummy[8];
  EXPECT_EQ(cuda::rmsnorm(dummy, DType::kF16, 4, dummy, DType::kF32, dummy, DType::kF32, 4, 1, 4,
                          1e-5f, nullptr),
            Status::kUnsupported);
  EXPECT_NE(last_error().find("fp16"), std::string::npos) << last_error();
  EXPECT_EQ(cuda::rmsnorm(dummy, DType::kF32, 2, dummy, DType::kF32, dummy, DType::kF32, 4, 1, 4,
                          1e-5f, nullptr),
            Status::kInvalidArgument);  // row stride < dim
  EXPECT_EQ(cuda::rope(dummy, DType::kF32, 1, 1, 3, 3, 3, nullptr, 0, nullptr,
                       RopeStyle::kRotateHalf, nullptr),
            Status::kInvalidArgument);  // odd head_dim, no inv_freq
  EXPECT_EQ(cuda::rope(dummy, DType::kF32, 1, 2, 4, 6, 4, nullptr, 0,
                       reinterpret_cast<const double*>(dummy), RopeStyle::kRotateHalf, nullptr),
            Status::kInvalidArgument);  // row stride too small for 2 heads
  EXPECT_EQ(cuda::swiglu(dummy, dummy, DType::kF32, 4, nullptr, DType::kF32, 4, 1, 4, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(cuda::embedding(dummy, DType::kBF16, 0, 4, nullptr, 1, dummy, DType::kF32, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(cuda::add_inplace(dummy, DType::kF16, dummy, DType::kF32, 4, nullptr),
            Status::kUnsupported);
  // Empty work is fine and touches nothing.
  EXPECT_EQ(cuda::add_inplace(nullptr, DType::kF32, nullptr, DType::kF32, 0, nullptr), Status::kOk);
}

TEST(Device, QueriesAgree) {
  const int n = cuda::device_count();
  EXPECT_EQ(cuda::has_gpu(), n > 0);
  if (n == 0) {
    EXPECT_EQ(cuda::device_name(0), "");
    EXPECT_EQ(cuda::sm_count(0), 0);
    cuda::GemmContext* ctx = nullptr;
    EXPECT_EQ(cuda::gemm_create(&ctx), Status::kNoDevice);
    EXPECT_EQ(ctx, nullptr);
    return;
  }
  cuda::DeviceInfo info;
  ASSERT_EQ(cuda::device_info(0, &info), Status::kOk) << last_error();
  EXPECT_FALSE(info.name.empty());
  EXPECT_GT(info.sm_count, 0);
  EXPECT_EQ(cuda::sm_count(0), info.sm_count);
  EXPECT_EQ(cuda::device_info(n, &info), Status::kNoDevice);
  std::printf("device 0: %s, %d SMs, cc %d.%d, %.1f GiB, L2 %d KiB\n", info.name.c_str(),
              info.sm_count, info.cc_major, info.cc_minor, info.total_mem / 1073741824.0,
              info.l2_bytes / 1024);
}

}  // namespace
}  // namespace mprefill
