// Element types and small shared enums of the kernel host API.
#pragma once
#include <cstdint>
#include <cstring>

namespace mprefill {

// kI32/kI64 are for comm/ payloads (indices, counts); kernels take kF32/kBF16/kF16.
enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI32 = 3, kI64 = 4 };

inline int dtype_size(DType t) {
  switch (t) {
    case DType::kBF16:
    case DType::kF16:
      return 2;
    case DType::kI64:
      return 8;
    default:
      return 4;
  }
}
const char* to_string(DType t);

// bf16 <-> fp32 on the host (round to nearest even; NaN stays NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Query blocks of every sparse pattern are 64 rows of the GLOBAL sequence:
// block b covers rows [64 b, min(64 b + 64, N)).
constexpr int kBlock = 64;

}  // namespace mprefill
