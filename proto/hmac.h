// SHA-256 and HMAC-SHA256 through OpenSSL's libcrypto (EVP digests, HMAC()): the hello
// proofs of every mprefill connection (wire.h) and the digests beside them.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace mprefill::wire {

using Digest = std::array<uint8_t, 32>;

// Incremental SHA-256 (an OpenSSL EVP_MD_CTX underneath).
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t n);
  Digest finish();  // the object is spent afterwards

 private:
  void* ctx_;  // EVP_MD_CTX*
};

Digest sha256(std::string_view data);
Digest hmac_sha256(std::string_view key, std::string_view message);

// Compares two byte strings in time independent of where they differ (CRYPTO_memcmp;
// lengths are not secret).
bool constant_time_equal(std::string_view a, std::string_view b);

std::string to_hex(const void* data, size_t n);

}  // namespace mprefill::wire
