// Private to proto/: the TLS client of wire::Connection, OpenSSL on a non-blocking socket
// (TLS 1.3 only). Each SSL call holds a mutex: a Connection's sender and receiver threads
// may use it at once.
#pragma once
#include <boost/system/error_code.hpp>
#include <cstddef>
#include <mutex>
#include <string>

namespace mprefill::wire {

class TlsClient {
 public:
  // ca_file empty: no certificate verification (see wire.h TlsClientOptions). Throws
  // std::runtime_error with OpenSSL's reason.
  TlsClient(int fd, const std::string& host, const std::string& ca_file);
  ~TlsClient();
  TlsClient(const TlsClient&) = delete;
  TlsClient& operator=(const TlsClient&) = delete;
  // One handshake step: true when done; false: poll the socket for *wait (POLLIN /
  // POLLOUT) and call again. Throws std::runtime_error on failure.
  bool handshake(int* wait);
  // Bytes moved, or 0 with *wait set (would block), or 0 with *ec (closed: eof, or
  // broken).
  size_t io(bool write, char* data, size_t n, int* wait, boost::system::error_code* ec);
  std::string exporter(const char* label);  // 32 bytes

 private:
  void* ctx_ = nullptr;  // SSL_CTX*
  void* ssl_ = nullptr;  // SSL*
  std::mutex mu_;
};

}  // namespace mprefill::wire
