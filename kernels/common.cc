// Backend-independent parts of the kernel host API.
#include <algorithm>
#include <cmath>
#include <numbers>

#include "kernels/attention.h"
#include "kernels/sparse.h"

namespace mprefill {

const char* to_string(Status s) {
  switch (s) {
    case Status::kOk:
      return "ok";
    case Status::kInvalidArgument:
      return "invalid argument";
    case Status::kUnsupported:
      return "unsupported";
    case Status::kOutOfMemory:
      return "out of memory";
    case Status::kCudaError:
      return "CUDA error";
    case Status::kNoDevice:
      return "no CUDA device";
    case Status::kTimeout:
      return "timeout";
    case Status::kCommError:
      return "communication error";
    case Status::kInternal:
      return "internal error";
  }
  return "unknown status";
}

const char* to_string(DType t) {
  switch (t) {
    case DType::kF32:
      return "fp32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "fp16";
    case DType::kI32:
      return "int32";
    case DType::kI64:
      return "int64";
  }
  return "unknown dtype";
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --exp;
      }
      u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
  uint32_t mant = u & 0x7fffffu;
  if (((u >> 23) & 0xff) == 0xff)
    return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;  // may carry into exp: correct
  return static_cast<uint16_t>(half);
}

void set_packed_strides(AttentionParams& p) {
  p.q_head_stride = p.o_head_stride = p.head_dim;
  p.k_head_stride = p.v_head_stride = p.head_dim;
  p.q_row_stride = p.o_row_stride = static_cast<int64_t>(p.num_heads) * p.head_dim;
  p.k_row_stride = p.v_row_stride = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  p.lse_head_stride = p.n_q;
}

Status validate(const AttentionParams& p) {
  if (!p.q || !p.k || !p.v || !p.o) return Status::kInvalidArgument;
  if (p.n_q < 0 || p.n_k < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0)
    return Status::kInvalidArgument;
  if (p.num_heads % p.num_kv_heads != 0) return Status::kInvalidArgument;
  if (p.q_pos0 < 0 || p.k_pos0 < 0) return Status::kInvalidArgument;
  if (p.lse && p.lse_head_stride < p.n_q) return Status::kInvalidArgument;
  if (p.q_head_stride < 0 || p.k_head_stride < 0 || p.v_head_stride < 0 || p.o_head_stride < 0)
    return Status::kInvalidArgument;
  if ((p.n_q > 1 && (p.q_row_stride <= 0 || p.o_row_stride <= 0)) ||
      (p.n_k > 1 && (p.k_row_stride <= 0 || p.v_row_stride <= 0)))
    return Status::kInvalidArgument;
  if (!(p.scale > 0.f) || !std::isfinite(p.scale)) return Status::kInvalidArgument;
  return Status::kOk;
}

int clamp_vertical_budget(int v, int64_t n) {
  return static_cast<int>(std::min<int64_t>(n, std::max(v, kMinVertical)));
}
int clamp_slash_budget(int s, int64_t n) {
  return static_cast<int>(std::min<int64_t>(n, std::max(s, kMinSlash)));
}

VsIndexView view(const VsIndex& ix) {
  VsIndexView v;
  v.seq_len = ix.seq_len;
  v.nblocks = ix.nblocks;
  v.range_ptr = ix.range_ptr.data();
  v.range_lo = ix.range_lo.data();
  v.range_hi = ix.range_hi.data();
  v.col_ptr = ix.col_ptr.data();
  v.col = ix.col.data();
  return v;
}

BlockSparseView view(const BlockSparseIndex& ix) {
  BlockSparseView v;
  v.seq_len = ix.seq_len;
  v.nblocks = ix.nblocks;
  v.k = ix.k;
  v.blocks = ix.blocks.data();
  return v;
}

std::vector<double> rope_inv_freq(int head_dim, double theta, const RopeScaling& sc) {
  std::vector<double> f(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i)
    f[i] = 1.0 / std::pow(theta, (2.0 * i) / static_cast<double>(head_dim));
  if (!sc.llama3) return f;
  // Llama 3.1 frequency-dependent scaling (HF _compute_llama3_parameters).
  const double low_wavelen = sc.original_max_position / sc.low_freq_factor;
  const double high_wavelen = sc.original_max_position / sc.high_freq_factor;
  for (double& x : f) {
    const double wavelen = 2.0 * std::numbers::pi / x;
    if (wavelen > low_wavelen) {
      x = x / sc.factor;
    } else if (wavelen >= high_wavelen) {
      const double smooth = (sc.original_max_position / wavelen - sc.low_freq_factor) /
                            (sc.high_freq_factor - sc.low_freq_factor);
      x = (1.0 - smooth) * x / sc.factor + smooth * x;
    }
  }
  return f;
}

}  // namespace mprefill
