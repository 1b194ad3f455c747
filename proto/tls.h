// TLS of every mprefill listener and connection (OpenSSL, TLS 1.3 only), one place for:
//   - the server certificate set-up and the beyond-loopback rule, shared by the
//     coordinator's Boost.Asio ports and the blocking Listener (the decoder's KV port);
//   - TlsSession: TLS on a non-blocking socket for wire::Connection, either end.
#pragma once
#include <boost/system/error_code.hpp>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace mprefill::wire {

// Loads a PEM certificate chain and its private key into an SSL_CTX* (passed as void* so
// that this header does not pull OpenSSL in) and sets TLS 1.3 as the minimum. Throws
// std::runtime_error "WHO: --tls-cert F: reason" (or --tls-key).
void configure_tls_server(void* ssl_ctx, const std::string& cert, const std::string& key,
                          const std::string& who);

// An SSL_CTX of a TLS server (configure_tls_server), shared by the connections of one
// blocking Listener.
class TlsServerContext {
 public:
  TlsServerContext(const std::string& cert, const std::string& key, const std::string& who);
  ~TlsServerContext();
  TlsServerContext(const TlsServerContext&) = delete;
  TlsServerContext& operator=(const TlsServerContext&) = delete;
  void* native() const { return ctx_; }  // SSL_CTX*

 private:
  void* ctx_ = nullptr;
};

// The rule of every listener beyond loopback: TLS and credentials are both required;
// `insecure` lifts it (the caller warns at start: insecure_warning()).
struct ListenSecurity {
  std::string where;             // "coordinator: --host 0.0.0.0" (starts every message)
  bool loopback = true;          // the bound address is a loopback address
  bool tls = false;              // --tls-cert / --tls-key given
  bool credentials = false;      // a secret (or keys) that peers must prove
  std::string credential_flags;  // "--secret-file, --client-keys"
  bool insecure = false;         // --insecure
};
// false: fine; true: runs beyond loopback without TLS or credentials under --insecure.
// Throws std::invalid_argument with one line when refused.
bool check_listen_security(const ListenSecurity& s);
// The start-up warning of an insecure listener ("--insecure: HOST is beyond loopback
// without TLS; anyone on the network can read and forge traffic").
std::string insecure_warning(const std::string& host, bool tls);

// TLS on a connected non-blocking socket. Each SSL call holds a mutex: a Connection's
// sender and receiver threads may use it at once.
class TlsSession {
 public:
  // Connecting end. ca_file empty: no certificate verification (see wire.h
  // TlsClientOptions). Throws std::runtime_error with OpenSSL's reason.
  static std::unique_ptr<TlsSession> client(int fd, const std::string& host,
                                            const std::string& ca_file);
  // Accepting end, with the listener's certificate.
  static std::unique_ptr<TlsSession> server(int fd, const TlsServerContext& ctx);
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;
  // One handshake step: true when done; false: poll the socket for *wait (POLLIN /
  // POLLOUT) and call again. Throws std::runtime_error on failure.
  bool handshake(int* wait);
  // Bytes moved, or 0 with *wait set (would block), or 0 with *ec (closed: eof, or
  // broken).
  size_t io(bool write, char* data, size_t n, int* wait, boost::system::error_code* ec);
  std::string exporter(const char* label);  // 32 bytes
  // Bytes read from the socket so far: 0 after a server handshake that timed out means
  // the peer never spoke (a plain-TCP mprefill peer waiting for our ServerHello).
  uint64_t bytes_read();
  // "TLSv1.3 TLS_AES_256_GCM_SHA384": protocol and cipher suite after the handshake.
  std::string negotiated();

 private:
  TlsSession() = default;
  void* ctx_ = nullptr;  // SSL_CTX* (client end: owned)
  void* ssl_ = nullptr;  // SSL*
  bool server_ = false;
  std::mutex mu_;
};

}  // namespace mprefill::wire
