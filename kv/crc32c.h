// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of KV pages.
// SSE4.2 crc32 instructions when the CPU has them (three interleaved chains on buffers of
// 12 KiB and more), a table otherwise; both give the same value.
#pragma once
#include <cstddef>
#include <cstdint>

namespace mprefill::kv {

// Extends crc (0 for a fresh checksum) over n bytes: crc32c(b, crc32c(a)) == crc32c(a || b).
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
// The table implementation on every CPU (the reference the tests compare crc32c with).
uint32_t crc32c_portable(const void* data, size_t n, uint32_t crc = 0);

}  // namespace mprefill::kv
