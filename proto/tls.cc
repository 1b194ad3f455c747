#include "proto/tls.h"

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <signal.h>

#include <algorithm>
#include <boost/asio/error.hpp>
#include <cstring>
#include <stdexcept>

namespace mprefill::wire {

namespace {

std::string ssl_reason(const char* what) {
  std::string r = what;
  unsigned long e = ERR_get_error();
  if (e) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    r += std::string(": ") + buf;
  }
  ERR_clear_error();
  return r;
}

bool is_ip(const std::string& host) {
  unsigned char buf[16];
  return inet_pton(AF_INET, host.c_str(), buf) == 1 || inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

// OpenSSL writes with write(2): a peer that closed would raise SIGPIPE in a process that
// does not ignore it. Blocked around each call; one that became pending is consumed.
class NoSigpipe {
 public:
  NoSigpipe() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ~NoSigpipe() {
    sigset_t pending;
    sigpending(&pending);
    if (!was_pending_ && sigismember(&pending, SIGPIPE) == 1) {
      timespec zero{0, 0};
      sigtimedwait(&pipe_, nullptr, &zero);
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }

 private:
  sigset_t pipe_, old_;
  bool was_pending_ = false;
};

}  // namespace

void configure_tls_server(void* ssl_ctx, const std::string& cert, const std::string& key,
                          const std::string& who) {
  SSL_CTX* ctx = static_cast<SSL_CTX*>(ssl_ctx);
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  ERR_clear_error();
  if (SSL_CTX_use_certificate_chain_file(ctx, cert.c_str()) != 1)
    throw std::runtime_error(ssl_reason((who + ": --tls-cert " + cert).c_str()));
  if (SSL_CTX_use_PrivateKey_file(ctx, key.c_str(), SSL_FILETYPE_PEM) != 1)
    throw std::runtime_error(ssl_reason((who + ": --tls-key " + key).c_str()));
  if (SSL_CTX_check_private_key(ctx) != 1)
    throw std::runtime_error(
        ssl_reason((who + ": --tls-key " + key + " does not match --tls-cert " + cert).c_str()));
}

TlsServerContext::TlsServerContext(const std::string& cert, const std::string& key,
                                   const std::string& who) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  if (!ctx) throw std::runtime_error(ssl_reason((who + ": cannot create a TLS context").c_str()));
  ctx_ = ctx;
  configure_tls_server(ctx, cert, key, who);
}

TlsServerContext::~TlsServerContext() { SSL_CTX_free(static_cast<SSL_CTX*>(ctx_)); }

bool check_listen_security(const ListenSecurity& s) {
  if (s.loopback) return false;
  if (s.insecure) return !s.tls || !s.credentials;
  if (!s.tls)
    throw std::invalid_argument(
        s.where + " is beyond loopback: TLS is required (--tls-cert, --tls-key), or --insecure");
  if (!s.credentials)
    throw std::invalid_argument(s.where +
                                " is beyond loopback: credentials are required in addition to "
                                "TLS (" +
                                s.credential_flags + "), or --insecure");
  return false;
}

std::string insecure_warning(const std::string& host, bool tls) {
  return "--insecure: " + host + " is beyond loopback without " + (tls ? "credentials" : "TLS") +
         "; anyone on the network can read and forge traffic";
}

std::unique_ptr<TlsSession> TlsSession::client(int fd, const std::string& host,
                                               const std::string& ca_file) {
  std::unique_ptr<TlsSession> t(new TlsSession());
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  if (!ctx) throw std::runtime_error(ssl_reason("cannot create a TLS context"));
  t->ctx_ = ctx;
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  if (!ca_file.empty()) {
    if (SSL_CTX_load_verify_locations(ctx, ca_file.c_str(), nullptr) != 1)
      throw std::runtime_error(ssl_reason(("cannot load CA file " + ca_file).c_str()));
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  }
  SSL* ssl = SSL_new(ctx);
  if (!ssl) throw std::runtime_error(ssl_reason("cannot create a TLS session"));
  t->ssl_ = ssl;
  SSL_set_fd(ssl, fd);
  SSL_set_connect_state(ssl);
  if (!is_ip(host)) SSL_set_tlsext_host_name(ssl, host.c_str());
  if (!ca_file.empty()) {
    X509_VERIFY_PARAM* p = SSL_get0_param(ssl);
    if (is_ip(host) ? X509_VERIFY_PARAM_set1_ip_asc(p, host.c_str()) != 1
                    : SSL_set1_host(ssl, host.c_str()) != 1)
      throw std::runtime_error(ssl_reason("cannot set the name to verify"));
  }
  return t;
}

std::unique_ptr<TlsSession> TlsSession::server(int fd, const TlsServerContext& ctx) {
  std::unique_ptr<TlsSession> t(new TlsSession());
  t->server_ = true;
  SSL* ssl = SSL_new(static_cast<SSL_CTX*>(ctx.native()));
  if (!ssl) throw std::runtime_error(ssl_reason("cannot create a TLS session"));
  t->ssl_ = ssl;
  SSL_set_fd(ssl, fd);
  SSL_set_accept_state(ssl);
  return t;
}

TlsSession::~TlsSession() {
  SSL_free(static_cast<SSL*>(ssl_));
  SSL_CTX_free(static_cast<SSL_CTX*>(ctx_));  // nullptr on the server end: the listener's
}

bool TlsSession::handshake(int* wait) {
  std::lock_guard<std::mutex> lk(mu_);
  NoSigpipe no_sigpipe;
  SSL* ssl = static_cast<SSL*>(ssl_);
  ERR_clear_error();
  const int r = SSL_do_handshake(ssl);
  if (r == 1) return true;
  const int e = SSL_get_error(ssl, r);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
    *wait = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
    return false;
  }
  if (server_) throw std::runtime_error(ssl_reason("handshake failed (not a TLS client?)"));
  const long v = SSL_get_verify_result(ssl);
  if (v != X509_V_OK)
    throw std::runtime_error(std::string("certificate not trusted: ") +
                             X509_verify_cert_error_string(v));
  throw std::runtime_error(ssl_reason("handshake failed (not a TLS server?)"));
}

uint64_t TlsSession::bytes_read() {
  std::lock_guard<std::mutex> lk(mu_);
  BIO* rbio = SSL_get_rbio(static_cast<SSL*>(ssl_));
  return rbio ? BIO_number_read(rbio) : 0;
}

std::string TlsSession::negotiated() {
  std::lock_guard<std::mutex> lk(mu_);
  const SSL* ssl = static_cast<SSL*>(ssl_);
  return std::string(SSL_get_version(ssl)) + " " + SSL_get_cipher_name(ssl);
}

size_t TlsSession::io(bool write, char* data, size_t n, int* wait, boost::system::error_code* ec) {
  std::lock_guard<std::mutex> lk(mu_);
  NoSigpipe no_sigpipe;
  SSL* ssl = static_cast<SSL*>(ssl_);
  ERR_clear_error();
  const int len = static_cast<int>(std::min<size_t>(n, 1 << 30));
  const int r = write ? SSL_write(ssl, data, len) : SSL_read(ssl, data, len);
  if (r > 0) return static_cast<size_t>(r);
  const int e = SSL_get_error(ssl, r);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
    *wait = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
    return 0;
  }
  if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0 && !write))
    *ec = boost::asio::error::eof;
  else
    *ec = boost::asio::error::connection_reset;
  ERR_clear_error();
  return 0;
}

std::string TlsSession::exporter(const char* label) {
  std::lock_guard<std::mutex> lk(mu_);
  unsigned char out[32];
  if (SSL_export_keying_material(static_cast<SSL*>(ssl_), out, sizeof(out), label,
                                 std::strlen(label), nullptr, 0, 0) != 1)
    throw std::runtime_error(ssl_reason("no TLS exporter"));
  return std::string(reinterpret_cast<char*>(out), sizeof(out));
}

}  // namespace mprefill::wire
