// CPU layer ops (fp32 data, fp32 accumulation unless stated): GEMM, RMSNorm, RoPE,
// SwiGLU, embedding gather, residual add.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/cpu.h"
#include "kernels/cpu/parallel.h"

namespace mprefill::cpu {
namespace {

// ---------------------------------------------------------------- GEMM y = x W^T
// Every output is a dot product of a row of x with a row of W (both contiguous in k).
// The micro-tile computes kMr x kNr such dot products with kLanes independent partial
// sums each (acc[r][c][l] sums the k = l mod kLanes terms), which the compiler
// vectorises over l without reassociating anything. Summation order of an output
// depends only on k (blocks of kKc, lanes, then a fixed lane reduction), never on the
// thread count or on where the output sits in a tile: results are bitwise reproducible.
// y must not overlap x or W.
//
// Measured once on an idle moment of the dev box (Xeon, 2 cores, -O3 -march=x86-64-v2 i.e.
// SSE, 1 thread; ~5-6 GFLOP/s while other jobs share the cores):
// 12.7 GFLOP/s at n=4096 in=128 out=352 (tiny model QKV/FFN), 15.7 at 1024^3, 8.9 at
// n=1 in=288 out=32000 (stories15M logits, decode); 2 threads: 22-27 GFLOP/s at n >= 512.
// LayerOps.GemmThroughput prints the current figure.
constexpr int kLanes = 8;
constexpr int kMr = 2;        // x rows per micro-tile
constexpr int kNr = 4;        // W rows per micro-tile
constexpr int64_t kKc = 512;  // k block: a kNr x kKc W tile (8 KiB) stays in L1
constexpr int64_t kMc = 64;   // x rows per task: a kMc x kKc x block (128 KiB) stays in L2
constexpr int64_t kNcMax = 64;

// out[r][c] = sum_{k in [k0, k1)} xr[r][k] * wr[c][k], r < MR (kMr, or 1 for a last odd
// row: decode has n = 1). Same summation order for either MR.
template <int MR>
inline void tile_dot(const float* const* xr, const float* const* wr, int64_t k0, int64_t k1,
                     float out[kMr][kNr]) {
  float acc[MR][kNr][kLanes] = {};
  int64_t k = k0;
  for (; k + kLanes <= k1; k += kLanes) {
    for (int r = 0; r < MR; ++r) {
      const float* xp = xr[r] + k;
      for (int c = 0; c < kNr; ++c) {
        const float* wp = wr[c] + k;
        for (int l = 0; l < kLanes; ++l) acc[r][c][l] += xp[l] * wp[l];
      }
    }
  }
  for (int l = 0; k + l < k1; ++l)  // tail: lane l takes k + l
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < kNr; ++c) acc[r][c][l] += xr[r][k + l] * wr[c][k + l];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kNr; ++c) {
      const float* a = acc[r][c];
      out[r][c] = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
    }
}
static_assert(kLanes == 8, "tile_dot's lane reduction is written for 8 lanes");

// y[i0:i1][o0:o1] of y = x W^T + bias. Edge tiles reuse the last valid row/column
// pointer and drop those results.
void gemm_block(const float* x, const float* w, const float* bias, float* y, int64_t in,
                int64_t out, int64_t i0, int64_t i1, int64_t o0, int64_t o1) {
  for (int64_t kb = 0; kb < std::max<int64_t>(in, 1); kb += kKc) {
    const int64_t ke = std::min(in, kb + kKc);
    for (int64_t o = o0; o < o1; o += kNr) {
      const float* wr[kNr];
      for (int c = 0; c < kNr; ++c) wr[c] = w + std::min(o + c, o1 - 1) * in;
      for (int64_t i = i0; i < i1; i += kMr) {
        const float* xr[kMr];
        for (int r = 0; r < kMr; ++r) xr[r] = x + std::min(i + r, i1 - 1) * in;
        float t[kMr][kNr] = {};
        if (i + 1 == i1)
          tile_dot<1>(xr, wr, kb, ke, t);
        else
          tile_dot<kMr>(xr, wr, kb, ke, t);
        for (int r = 0; r < kMr && i + r < i1; ++r) {
          float* yr = y + (i + r) * out;
          for (int c = 0; c < kNr && o + c < o1; ++c)
            yr[o + c] = kb == 0 ? t[r][c] : yr[o + c] + t[r][c];
        }
      }
    }
  }
  if (bias)
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t o = o0; o < o1; ++o) y[i * out + o] += bias[o];
}

}  // namespace

void gemm_xwt(const float* x, const float* w, const float* bias, float* y, int64_t n, int64_t in,
              int64_t out) {
  if (n <= 0 || out <= 0) return;
  // Column blocks small enough that decode (n = 1) still gives every thread work.
  const int64_t per_thread = (out + 4 * num_threads() - 1) / (4 * num_threads());
  const int64_t nc = std::clamp<int64_t>((per_thread + kNr - 1) / kNr * kNr, kNr, kNcMax);
  const int64_t row_blocks = (n + kMc - 1) / kMc, col_blocks = (out + nc - 1) / nc;
  parallel_for(row_blocks * col_blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t rb = t / col_blocks, cb = t % col_blocks;
      gemm_block(x, w, bias, y, in, out, rb * kMc, std::min(n, rb * kMc + kMc), cb * nc,
                 std::min(out, cb * nc + nc));
    }
  });
}

// Mean of squares accumulated in double; the scale 1/sqrt(ms + eps) is rounded to fp32
// and applied as (x * scale) * w, as HF Llama does.
void rmsnorm(const float* x, const float* w, float* y, int64_t n, int64_t dim, float eps) {
  if (n <= 0 || dim <= 0) return;
  parallel_for(n, std::max<int64_t>(1, 16384 / dim), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* xr = x + t * dim;
      float* yr = y + t * dim;
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float s = static_cast<float>(1.0 / std::sqrt(ss / dim + static_cast<double>(eps)));
      for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] * s) * w[i];
    }
  });
}

// Pair i of a head (a, b) = (x[i], x[i + d/2]) (rotate-half) or (x[2i], x[2i + 1])
// (adjacent pairs) is rotated by angle = double(pos) * inv_freq[i]:
//   a' = a cos - b sin,  b' = a sin + b cos,
// all in double, rounded once to fp32.
void rope(float* x, int64_t n_tokens, int num_heads, int head_dim, int64_t row_stride,
          int64_t head_stride, const int64_t* positions, int64_t pos0,
          const std::vector<double>& inv_freq, RopeStyle style) {
  const int half = head_dim / 2;
  if (n_tokens <= 0 || half <= 0) return;
  const int64_t pairs = std::min<int64_t>(half, static_cast<int64_t>(inv_freq.size()));
  const bool halves = style == RopeStyle::kRotateHalf;
  const int64_t grain = std::max<int64_t>(1, 4096 / (static_cast<int64_t>(num_heads) * half));
  parallel_for(n_tokens, grain, [&](int64_t b, int64_t e) {
    std::vector<double> cs(pairs), sn(pairs);
    for (int64_t t = b; t < e; ++t) {
      const double pos = static_cast<double>(positions ? positions[t] : pos0 + t);
      for (int64_t i = 0; i < pairs; ++i) {
        const double angle = pos * inv_freq[i];
        cs[i] = std::cos(angle);
        sn[i] = std::sin(angle);
      }
      for (int h = 0; h < num_heads; ++h) {
        float* xh = x + t * row_stride + h * head_stride;
        for (int64_t i = 0; i < pairs; ++i) {
          float* pa = halves ? xh + i : xh + 2 * i;
          float* pb = halves ? pa + half : pa + 1;
          const double a = *pa, bb = *pb;
          *pa = static_cast<float>(a * cs[i] - bb * sn[i]);
          *pb = static_cast<float>(a * sn[i] + bb * cs[i]);
        }
      }
    }
  });
}

// silu(g) = g / (1 + exp(-g)) in fp32; exp overflow for g << 0 gives -0, never NaN.
void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  parallel_for(n, 1 << 15, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  });
}

void embedding(const float* table, int64_t vocab, int64_t dim, const int* ids, int64_t n,
               float* out) {
  (void)vocab;
  parallel_for(n, std::max<int64_t>(1, 65536 / std::max<int64_t>(dim, 1)),
               [&](int64_t b, int64_t e) {
                 for (int64_t t = b; t < e; ++t)
                   std::memcpy(out + t * dim, table + static_cast<int64_t>(ids[t]) * dim,
                               sizeof(float) * dim);
               });
}

void add_inplace(float* x, const float* y, int64_t n) {
  parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) x[i] += y[i];
  });
}

}  // namespace mprefill::cpu
