// libFuzzer target: the byte stream of one mprefill TCP connection as the coordinator,
// decoders and the blocking Connection read it (wire::FrameParser), then what the
// receivers do with the envelopes that parse:
//   - every envelope re-encodes (encode_frame) and re-parses to the same bytes;
//   - a ClientHello goes through wire::check_client_hello (the coordinator's and the
//     decoder's hello check) with and without a secret: accepted only with the right
//     proof, never an error message that contains the secret;
//   - a KvPage goes through the decoder's page store (kv::JobKvStore::put, the same
//     PageIn the decoder's KvReceiver builds) with its checksum fixed up on most inputs so
//     that the geometry and overlap checks are reached;
//   - a DecoderRegister's host:port goes through wire::parse_host_port.
// The coordinator's own message validation (Coordinator::Impl::refuse_reason_locked) is
// not a pure function, so it is covered by tests/hardening/bad_input_test.cc instead.
//
// Input layout: byte 0 picks the chunking of the stream (how feed() calls split it),
// byte 1 the maximum frame size, byte 2 the job size of the page store; the rest is the
// stream.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>

#include "kv/crc32c.h"
#include "kv/kv_store.h"
#include "proto/wire.h"

namespace {

namespace v1 = ::mprefill::v1;
namespace wire = ::mprefill::wire;
namespace kvp = ::mprefill::kv;

[[noreturn]] void violated(const char* what) {
  std::fprintf(stderr, "frame_fuzz: invariant violated: %s\n", what);
  std::abort();
}
#define FUZZ_CHECK(cond)          \
  do {                            \
    if (!(cond)) violated(#cond); \
  } while (0)

const std::string kSecret = "fuzz-secret-0123456789abcdef";
const std::string kNonce(32, '\x5a');

void check_roundtrip(const v1::Envelope& env, size_t max_frame) {
  const std::string frame = wire::encode_frame(env);
  wire::FrameParser p(max_frame < frame.size() ? frame.size() : max_frame);
  p.feed(frame.data(), frame.size());
  v1::Envelope again;
  std::string err;
  FUZZ_CHECK(p.next(&again, &err) == wire::FrameParser::Result::kOk);
  FUZZ_CHECK(p.buffered() == 0);
  FUZZ_CHECK(again.SerializeAsString() == env.SerializeAsString());
}

void check_hello(const v1::ClientHello& h) {
  for (const std::string* secret : {&kSecret, static_cast<const std::string*>(nullptr)}) {
    const std::string s = secret ? *secret : std::string();
    std::string why;
    v1::ErrorCode code = v1::ERROR_CODE_UNSPECIFIED;
    const bool ok = wire::check_client_hello(h, kNonce, v1::ROLE_UNSPECIFIED, s, &why, &code);
    if (ok) {
      FUZZ_CHECK(h.version() == wire::kProtocolVersion);
      FUZZ_CHECK(h.role() == v1::CLIENT || h.role() == v1::WORKER || h.role() == v1::DECODER);
      if (!s.empty()) FUZZ_CHECK(h.proof() == wire::hello_proof(s, wire::binding_of(h, kNonce)));
    } else {
      FUZZ_CHECK(!why.empty());
      FUZZ_CHECK(code != v1::ERROR_CODE_UNSPECIFIED);
      if (!s.empty()) FUZZ_CHECK(why.find(s) == std::string::npos);
    }
  }
}

// The decoder's page store for a small model shape: 2 layers x 2 KV heads x head_dim 4,
// pages of 4 tokens.
void check_page(const v1::KvPage& page, int64_t n_tokens, bool fix_crc) {
  kvp::KvStoreShape shape;
  shape.n_layers = 2;
  shape.n_kv_heads = 2;
  shape.head_dim = 4;
  shape.page_tokens = 4;
  kvp::PagePool pool(shape, uint64_t{1} << 20);
  std::unique_ptr<kvp::JobKvStore> store;
  try {
    store = std::make_unique<kvp::JobKvStore>(&pool, n_tokens);
  } catch (const kvp::PageError&) {
    return;  // does not fit the pool: admission refused, as in the decoder
  }
  const v1::KvPageHeader& h = page.header();
  kvp::PageIn p;
  p.layer = h.layer();
  p.kv_heads.assign(h.kv_heads().begin(), h.kv_heads().end());
  p.token_begin = h.token_begin();
  p.token_end = h.token_end();
  p.head_dim = h.head_dim();
  p.dtype = h.dtype() == v1::BF16 ? mprefill::DType::kBF16 : mprefill::DType::kF32;
  p.k = page.k().data();
  p.v = page.v().data();
  p.k_bytes = page.k().size();
  p.v_bytes = page.v().size();
  p.crc32c = h.crc32c();
  if (fix_crc)
    p.crc32c = kvp::crc32c(page.v().data(), page.v().size(),
                           kvp::crc32c(page.k().data(), page.k().size()));
  // The same page twice: the second must be refused as an overlap (or refused for the
  // same reason as the first).
  for (int rep = 0; rep < 2; ++rep) {
    bool stored = false;
    try {
      store->put(p);
      stored = true;
    } catch (const kvp::PageError&) {
    } catch (const std::invalid_argument&) {
    }
    if (rep == 1) FUZZ_CHECK(!stored || p.token_begin == p.token_end || p.kv_heads.empty());
    if (!stored) break;
  }
  for (int l = 0; l < shape.n_layers; ++l)
    if (store->layer_complete(l)) {
      std::vector<float> k(n_tokens * shape.kv_dim()), v(k.size());
      store->export_layer(l, k.data(), v.data());
      store->release_layer(l);
    }
  FUZZ_CHECK(store->bytes_received() <= page.k().size() + page.v().size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const size_t chunk = data[0] == 0 ? size : 1 + data[0] % 23;
  static const size_t kMaxFrames[4] = {16, 4096, size_t{1} << 16, wire::kDefaultMaxFrame};
  const size_t max_frame = kMaxFrames[data[1] % 4];
  const int64_t n_tokens = 1 + data[2] % 13;
  const bool fix_crc = (data[2] & 0x80) == 0;
  data += 3;
  size -= 3;

  wire::FrameParser parser(max_frame);
  size_t fed = 0;
  bool failed = false;
  int frames = 0;
  while (!failed && fed < size) {
    const size_t n = std::min(chunk, size - fed);
    parser.feed(data + fed, n);
    fed += n;
    FUZZ_CHECK(parser.buffered() <= fed);
    for (;;) {
      v1::Envelope env;
      std::string err;
      const auto r = parser.next(&env, &err);
      if (r == wire::FrameParser::Result::kNeedMore) break;
      if (r == wire::FrameParser::Result::kError) {
        FUZZ_CHECK(!err.empty());
        // After an error the stream stays unusable.
        std::string again;
        FUZZ_CHECK(parser.next(&env, &again) == wire::FrameParser::Result::kError);
        failed = true;
        break;
      }
      ++frames;
      FUZZ_CHECK(env.version() == wire::kProtocolVersion);
      FUZZ_CHECK(env.msg_case() != v1::Envelope::MSG_NOT_SET);
      check_roundtrip(env, max_frame);
      if (env.has_client_hello()) check_hello(env.client_hello());
      if (env.has_kv_page()) check_page(env.kv_page(), n_tokens, fix_crc);
      if (env.has_decoder_register()) {
        std::string host;
        uint16_t port = 0;
        try {
          wire::parse_host_port(env.decoder_register().host() + ":" +
                                    std::to_string(env.decoder_register().kv_port()),
                                &host, &port);
        } catch (const std::invalid_argument&) {
        }
      }
      if (env.has_error()) {
        const v1::Envelope e =
            wire::make_error(env.error().job_id(), env.error().code(), env.error().message());
        check_roundtrip(e, max_frame);
      }
    }
  }
  return 0;
}
