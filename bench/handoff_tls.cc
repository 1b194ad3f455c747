#include "bench/handoff_tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <vector>

#include "proto/tls.h"

namespace mprefill::bench {

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::string r = "throwaway TLS certificate: " + what;
  if (const unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    r += std::string(": ") + buf;
  }
  ERR_clear_error();
  throw std::runtime_error(r);
}

struct Free {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
  void operator()(X509* p) const { X509_free(p); }
  void operator()(X509_EXTENSION* p) const { X509_EXTENSION_free(p); }
  void operator()(FILE* f) const { std::fclose(f); }
};
template <class T>
using Own = std::unique_ptr<T, Free>;

void add_ext(X509* x, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, x, x, nullptr, nullptr, 0);
  Own<X509_EXTENSION> ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value));
  if (!ext || X509_add_ext(x, ext.get(), -1) != 1) fail(std::string("extension ") + value);
}

void write_pem(const std::string& path, EVP_PKEY* key, X509* cert) {
  Own<FILE> f(std::fopen(path.c_str(), "w"));
  if (!f) fail("cannot write " + path);
  const int ok = key ? PEM_write_PrivateKey(f.get(), key, nullptr, nullptr, 0, nullptr, nullptr)
                     : PEM_write_X509(f.get(), cert);
  if (ok != 1 || std::fflush(f.get()) != 0) fail("cannot write " + path);
}

}  // namespace

ThrowawayCert::ThrowawayCert() {
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/mprefill-bench-tls-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) fail("cannot make a temp dir from " + tmpl);
  dir_ = buf.data();
  cert_ = dir_ + "/cert.pem";
  key_ = dir_ + "/key.pem";
  try {
    Own<EVP_PKEY> key(EVP_EC_gen("P-256"));
    if (!key) fail("cannot make an EC P-256 key");
    Own<X509> x(X509_new());
    if (!x || X509_set_version(x.get(), 2) != 1 ||
        ASN1_INTEGER_set(X509_get_serialNumber(x.get()), 1) != 1 ||
        !X509_gmtime_adj(X509_getm_notBefore(x.get()), -60) ||
        !X509_gmtime_adj(X509_getm_notAfter(x.get()), 24 * 3600) ||
        X509_set_pubkey(x.get(), key.get()) != 1)
      fail("cannot fill the certificate");
    X509_NAME* name = X509_get_subject_name(x.get());
    if (X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                   reinterpret_cast<const unsigned char*>("mprefill-bench"), -1, -1,
                                   0) != 1 ||
        X509_set_issuer_name(x.get(), name) != 1)
      fail("cannot name the certificate");
    // As `openssl req -x509` makes the tests' certificates (tests/hardening/tenancy_test.cc).
    add_ext(x.get(), NID_basic_constraints, "critical,CA:TRUE");
    add_ext(x.get(), NID_subject_key_identifier, "hash");
    add_ext(x.get(), NID_subject_alt_name, "IP:127.0.0.1");
    if (X509_sign(x.get(), key.get(), EVP_sha256()) <= 0) fail("cannot sign the certificate");
    write_pem(key_, key.get(), nullptr);
    write_pem(cert_, nullptr, x.get());
  } catch (...) {
    remove();
    throw;
  }
}

ThrowawayCert::~ThrowawayCert() { remove(); }

void ThrowawayCert::remove() {
  ::unlink(key_.c_str());
  ::unlink(cert_.c_str());
  ::rmdir(dir_.c_str());
}

std::string probe_tls(uint16_t port, const std::string& ca_file, int timeout_ms) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("TLS probe: no socket");
  struct Close {
    int fd;
    ~Close() { ::close(fd); }
  } close_fd{fd};
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0)
    throw std::runtime_error("TLS probe: cannot connect to the KV port");
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);  // the handshake waits in poll
  auto tls = wire::TlsSession::client(fd, "127.0.0.1", ca_file);
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  int wait = 0;
  while (!tls->handshake(&wait)) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          until - std::chrono::steady_clock::now())
                          .count();
    pollfd p{fd, static_cast<short>(wait), 0};
    if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0)
      throw std::runtime_error("TLS probe: no handshake within " + std::to_string(timeout_ms) +
                               " ms");
  }
  return tls->negotiated();
}

}  // namespace mprefill::bench
