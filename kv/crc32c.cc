#include "kv/crc32c.h"

#include <array>
#include <cstring>

namespace mprefill::kv {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;

std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    t[i] = c;
  }
  return t;
}

uint32_t crc_table(const uint8_t* p, size_t n, uint32_t c) {
  static const std::array<uint32_t, 256> table = make_table();
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xffu] ^ (c >> 8);
  return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t crc_sse42_1(const uint8_t* p, size_t n, uint32_t c) {
  uint64_t c64 = c;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c64 = __builtin_ia32_crc32di(c64, w);
    p += 8;
    n -= 8;
  }
  c = static_cast<uint32_t>(c64);
  while (n--) c = __builtin_ia32_crc32qi(c, *p++);
  return c;
}

// Three interleaved chains: crc32 has a 3-cycle latency and a 1-cycle throughput, so one
// chain runs at a third of the instruction's rate (perf of the TCP handoff: crc32c 13% of
// both ends' CPU, bench/NOTES.md §10.2). Each round takes 3 blocks of kBlock bytes, the
// first continuing the running register, the other two from 0, and joins them:
// reg(a || b || c) = shift(reg_a, 2 kBlock) ^ shift(reg_b, kBlock) ^ reg_c, where shift(r, n)
// (r followed by n zero bytes) is linear in r: a 32 x 32 GF(2) matrix, built once.
constexpr size_t kBlock = 4096;

struct Shift {
  uint32_t col[32];  // image of each register bit
  uint32_t apply(uint32_t r) const {
    uint32_t out = 0;
    for (int i = 0; r; ++i, r >>= 1)
      if (r & 1) out ^= col[i];
    return out;
  }
};

__attribute__((target("sse4.2"))) Shift zero_bytes_shift(size_t n) {
  Shift one{}, acc{};
  for (int i = 0; i < 32; ++i) {
    one.col[i] = __builtin_ia32_crc32qi(1u << i, 0);  // one zero byte
    acc.col[i] = 1u << i;                             // identity
  }
  for (; n; n >>= 1) {  // acc = one^n by squaring
    if (n & 1) {
      Shift t{};
      for (int i = 0; i < 32; ++i) t.col[i] = one.apply(acc.col[i]);
      acc = t;
    }
    Shift sq{};
    for (int i = 0; i < 32; ++i) sq.col[i] = one.apply(one.col[i]);
    one = sq;
  }
  return acc;
}

__attribute__((target("sse4.2"))) uint32_t crc_sse42(const uint8_t* p, size_t n, uint32_t c) {
  if (n < 3 * kBlock) return crc_sse42_1(p, n, c);
  static const Shift s1 = zero_bytes_shift(kBlock), s2 = zero_bytes_shift(2 * kBlock);
  while (n >= 3 * kBlock) {
    uint64_t a = c, b = 0, d = 0;
    for (size_t i = 0; i < kBlock; i += 8) {
      uint64_t wa, wb, wd;
      std::memcpy(&wa, p + i, 8);
      std::memcpy(&wb, p + kBlock + i, 8);
      std::memcpy(&wd, p + 2 * kBlock + i, 8);
      a = __builtin_ia32_crc32di(a, wa);
      b = __builtin_ia32_crc32di(b, wb);
      d = __builtin_ia32_crc32di(d, wd);
    }
    c = s2.apply(static_cast<uint32_t>(a)) ^ s1.apply(static_cast<uint32_t>(b)) ^
        static_cast<uint32_t>(d);
    p += 3 * kBlock;
    n -= 3 * kBlock;
  }
  return crc_sse42_1(p, n, c);
}
#endif

}  // namespace

uint32_t crc32c_portable(const void* data, size_t n, uint32_t crc) {
  return ~crc_table(static_cast<const uint8_t*>(data), n, ~crc);
}

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  c = hw ? crc_sse42(p, n, c) : crc_table(p, n, c);
#else
  c = crc_table(p, n, c);
#endif
  return ~c;
}

}  // namespace mprefill::kv
