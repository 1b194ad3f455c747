// TLS material of mprefill-bench handoff --tls: a throwaway self-signed certificate for
// 127.0.0.1 and its key, made at run time (OpenSSL, nothing read or downloaded), and a probe
// that reads the protocol and cipher suite the decoder's KV port negotiates with the
// worker's TLS client (proto/tls.h, both ends as the service wires them).
#pragma once
#include <cstdint>
#include <string>

namespace mprefill::bench {

// A fresh temp dir (TMPDIR, else /tmp) holding cert.pem (EC P-256, CN mprefill-bench,
// subjectAltName IP:127.0.0.1, valid for a day) and key.pem; both files and the dir are
// removed by the destructor. The certificate is its own CA: a worker's --tls-ca.
// Throws std::runtime_error with OpenSSL's reason.
class ThrowawayCert {
 public:
  ThrowawayCert();
  ~ThrowawayCert();
  ThrowawayCert(const ThrowawayCert&) = delete;
  ThrowawayCert& operator=(const ThrowawayCert&) = delete;
  const std::string& cert() const { return cert_; }
  const std::string& key() const { return key_; }

 private:
  void remove();
  std::string dir_, cert_, key_;
};

// Connects to 127.0.0.1:port, runs the TLS handshake of a worker whose --tls-ca is
// ca_file (certificate and IP verified) within timeout_ms and returns "TLSv1.3 SUITE";
// throws std::runtime_error on failure. The KV port closes the silent connection after
// its pre-hello deadline.
std::string probe_tls(uint16_t port, const std::string& ca_file, int timeout_ms);

}  // namespace mprefill::bench
