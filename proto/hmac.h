// SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), self-contained: the hello proof of
// every mprefill connection needs nothing more, so no OpenSSL dependency.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace mprefill::wire {

using Digest = std::array<uint8_t, 32>;

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  Digest finish();  // the object is spent afterwards

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;  // bytes
};

Digest sha256(std::string_view data);
Digest hmac_sha256(std::string_view key, std::string_view message);

// Compares two byte strings in time independent of where they differ (lengths are not
// secret).
bool constant_time_equal(std::string_view a, std::string_view b);

std::string to_hex(const void* data, size_t n);

}  // namespace mprefill::wire
