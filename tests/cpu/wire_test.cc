// Wire protocol: SHA-256 / HMAC against published vectors, frame codec on good, truncated,
// oversize and garbage input, and real loopback TCP connections (deadlines, hello, auth).
#include "proto/wire.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include "proto/hmac.h"
#include "proto/line_limiter.h"

namespace w = mprefill::wire;
namespace v1 = mprefill::v1;
using Clock = std::chrono::steady_clock;

namespace {

std::string hex(const w::Digest& d) { return w::to_hex(d.data(), d.size()); }

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

v1::Envelope submit_env(int n, int seed) {
  v1::Envelope env;
  auto* s = env.mutable_submit();
  for (int i = 0; i < n; ++i) s->add_token_ids((i * 7919 + seed) % 32000);
  s->set_client_tag("tag" + std::to_string(seed));
  s->mutable_options()->set_decode_tokens(seed);
  return env;
}

// Accepts one connection in a thread; the result is read after join().
struct AcceptThread {
  std::unique_ptr<w::Connection> conn;
  std::string name, error;
  std::thread t;
  AcceptThread(w::Listener& l, v1::Role role, std::string secret, int timeout_ms = 5000) {
    t = std::thread([&l, role, secret, timeout_ms, this] {
      conn = l.accept(timeout_ms, role, secret, &name, &error);
    });
  }
  void join() { t.join(); }
};

}  // namespace

TEST(Sha256, PublishedVectors) {
  EXPECT_EQ(hex(w::sha256("")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex(w::sha256("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex(w::sha256("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // One million 'a', fed in uneven pieces (exercises the block buffer).
  w::Sha256 s;
  std::string chunk(997, 'a');
  size_t left = 1000000;
  while (left > 0) {
    size_t n = std::min(left, chunk.size());
    s.update(chunk.data(), n);
    left -= n;
  }
  EXPECT_EQ(hex(s.finish()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(HmacSha256, Rfc4231Vectors) {
  EXPECT_EQ(hex(w::hmac_sha256(std::string(20, '\x0b'), "Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  EXPECT_EQ(hex(w::hmac_sha256("Jefe", "what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  EXPECT_EQ(hex(w::hmac_sha256(std::string(131, '\xaa'),
                               "Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
  EXPECT_TRUE(w::constant_time_equal("abc", "abc"));
  EXPECT_FALSE(w::constant_time_equal("abc", "abd"));
  EXPECT_FALSE(w::constant_time_equal("abc", "abcd"));
}

TEST(HelloProof, DependsOnSecretBothNoncesRoleKeyAndDirection) {
  const std::string sn = w::random_nonce(), cn = w::random_nonce();
  ASSERT_EQ(sn.size(), 32u);
  EXPECT_NE(sn, w::random_nonce());
  w::HelloBinding b{sn, cn, v1::WORKER, "", ""};
  const std::string p = w::hello_proof("s3cret", b);
  EXPECT_EQ(p.size(), 32u);
  EXPECT_EQ(p, w::hello_proof("s3cret", b));
  EXPECT_NE(p, w::hello_proof("s3cres", b));
  EXPECT_NE(p, w::server_proof("s3cret", b)) << "a client proof must not serve as the server's";
  auto with = [&](auto change) {
    w::HelloBinding c = b;
    change(c);
    return w::hello_proof("s3cret", c);
  };
  const std::string other = w::random_nonce();
  EXPECT_NE(p, with([](w::HelloBinding& c) { c.role = v1::CLIENT; }));
  EXPECT_NE(p, with([&](w::HelloBinding& c) { c.server_nonce = other; }));
  EXPECT_NE(p, with([&](w::HelloBinding& c) { c.client_nonce = other; }));
  EXPECT_NE(p, with([](w::HelloBinding& c) { c.key_id = "alice"; }));
  EXPECT_NE(p, with([](w::HelloBinding& c) { c.channel = "tls-exporter"; }));
  // Fields are length-prefixed: moving bytes between adjacent fields changes the proof.
  w::HelloBinding k1{sn, cn, v1::CLIENT, "ab", ""}, k2{sn, cn, v1::CLIENT, "a", ""};
  EXPECT_NE(w::hello_proof("s3cret", k1), w::hello_proof("s3cret", k2));
}

TEST(Frames, RoundTripWholeAndByteByByte) {
  std::string stream;
  for (int i = 0; i < 5; ++i) stream += w::encode_frame(submit_env(i * 37, i));
  // Version 0 in the envelope is encoded as kProtocolVersion.
  {
    w::FrameParser p;
    p.feed(stream.data(), stream.size());
    for (int i = 0; i < 5; ++i) {
      v1::Envelope env;
      std::string err;
      ASSERT_EQ(p.next(&env, &err), w::FrameParser::Result::kOk) << err;
      EXPECT_EQ(env.version(), w::kProtocolVersion);
      ASSERT_TRUE(env.has_submit());
      EXPECT_EQ(env.submit().token_ids_size(), i * 37);
      EXPECT_EQ(env.submit().client_tag(), "tag" + std::to_string(i));
      if (i > 1) {
        EXPECT_EQ(env.submit().token_ids(1), (7919 + i) % 32000);
      }
    }
    v1::Envelope env;
    EXPECT_EQ(p.next(&env, nullptr), w::FrameParser::Result::kNeedMore);
    EXPECT_EQ(p.buffered(), 0u);
  }
  {
    w::FrameParser p;
    int got = 0;
    for (char c : stream) {
      p.feed(&c, 1);
      v1::Envelope env;
      std::string err;
      auto r = p.next(&env, &err);
      ASSERT_NE(r, w::FrameParser::Result::kError) << err;
      if (r == w::FrameParser::Result::kOk) {
        EXPECT_EQ(env.submit().client_tag(), "tag" + std::to_string(got));
        ++got;
      }
    }
    EXPECT_EQ(got, 5);
  }
}

TEST(Frames, TruncatedNeedsMore) {
  const std::string f = w::encode_frame(submit_env(100, 3));
  for (size_t cut : {size_t{0}, size_t{1}, size_t{3}, size_t{4}, f.size() / 2, f.size() - 1}) {
    w::FrameParser p;
    p.feed(f.data(), cut);
    v1::Envelope env;
    EXPECT_EQ(p.next(&env, nullptr), w::FrameParser::Result::kNeedMore) << cut;
  }
}

TEST(Frames, OversizeLengthIsAnErrorBeforeTheBodyArrives) {
  w::FrameParser p(1024);
  const std::string f = w::encode_frame(submit_env(2000, 1));  // > 1 KiB
  p.feed(f.data(), 4);
  v1::Envelope env;
  std::string err;
  EXPECT_EQ(p.next(&env, &err), w::FrameParser::Result::kError);
  EXPECT_NE(err.find("exceeds the maximum of 1024"), std::string::npos) << err;
  // The stream stays unusable.
  const std::string ok = w::encode_frame(submit_env(1, 1));
  p.feed(ok.data(), ok.size());
  EXPECT_EQ(p.next(&env, &err), w::FrameParser::Result::kError);
}

TEST(Frames, HelloLimitThenTheFullLimitAfterTheHello) {
  // Before the hello a peer may send kHelloMaxFrame bytes a frame; the receiver raises
  // the limit once the peer is accepted.
  const std::string big = w::encode_frame(submit_env(40000, 1));  // ~ 200 KB
  ASSERT_GT(big.size(), w::kHelloMaxFrame);
  v1::Envelope env;
  std::string err;
  w::FrameParser before(w::kHelloMaxFrame);
  before.feed(big.data(), 4);
  EXPECT_EQ(before.next(&env, &err), w::FrameParser::Result::kError);
  w::FrameParser after(w::kHelloMaxFrame);
  after.set_max_frame(w::kDefaultMaxFrame);
  after.feed(big.data(), big.size());
  EXPECT_EQ(after.next(&env, &err), w::FrameParser::Result::kOk) << err;
  EXPECT_EQ(env.submit().token_ids_size(), 40000);
}

TEST(Frames, GarbageVersionAndEmptyAreErrors) {
  std::mt19937 rng(7);
  int errors = 0;
  for (int trial = 0; trial < 50; ++trial) {
    std::string junk(64, '\0');
    for (auto& c : junk) c = static_cast<char>(rng());
    junk[0] = 60;  // a length that fits the junk
    junk[1] = junk[2] = junk[3] = 0;
    w::FrameParser p;
    p.feed(junk.data(), junk.size());
    v1::Envelope env;
    std::string err;
    if (p.next(&env, &err) == w::FrameParser::Result::kError) {
      ++errors;
      EXPECT_FALSE(err.empty());
    }
  }
  // Random bytes almost never form a version-1 envelope with a message.
  EXPECT_GE(errors, 48);

  v1::Envelope other;
  other.set_version(2);
  other.mutable_cancel()->set_job_id(5);
  const std::string f2 = w::encode_frame(other);
  w::FrameParser p2;
  p2.feed(f2.data(), f2.size());
  v1::Envelope env;
  std::string err;
  EXPECT_EQ(p2.next(&env, &err), w::FrameParser::Result::kError);
  EXPECT_EQ(p2.error_kind(), w::WireError::Kind::kBadVersion);
  EXPECT_NE(err.find("version 2"), std::string::npos) << err;

  v1::Envelope empty;  // no message set
  const std::string f3 = w::encode_frame(empty);
  w::FrameParser p3;
  p3.feed(f3.data(), f3.size());
  EXPECT_EQ(p3.next(&env, &err), w::FrameParser::Result::kError);
  EXPECT_EQ(p3.error_kind(), w::WireError::Kind::kBadFrame);
}

// One line per interval; the next line written carries the count held back since the last,
// from several threads at once.
TEST(LineLimiter, OneLinePerIntervalAndTheCountHeldBack) {
  w::LineLimiter l(std::chrono::milliseconds(300));
  uint64_t held = 99;
  ASSERT_TRUE(l.admit(&held));
  EXPECT_EQ(held, 0u);
  std::atomic<int> admitted{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&] {
      for (int i = 0; i < 25; ++i) {
        uint64_t h = 0;
        if (l.admit(&h)) ++admitted;
      }
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(admitted.load(), 0);  // 100 lines well inside the 300 ms
  std::this_thread::sleep_for(std::chrono::milliseconds(350));
  ASSERT_TRUE(l.admit(&held));
  EXPECT_EQ(held, 100u);
  EXPECT_FALSE(l.admit(&held));
  std::this_thread::sleep_for(std::chrono::milliseconds(350));
  ASSERT_TRUE(l.admit(&held));
  EXPECT_EQ(held, 1u);
}

// A hello the server closes without answering is WireError::kBusy, and
// open_retrying_busy tries it again (a server whose pre-hello pool evicts under a flood):
// two busy closes then a real hello take three tries; a budget of two tries throws the
// kBusy; a refusal (wrong secret: an Error frame) is not tried again.
TEST(Loopback, BusyHelloIsTriedAgainARefusalIsNot) {
  w::Listener l("127.0.0.1", 0);
  auto serve = [&l](int busy, const std::string& secret) {
    return std::thread([&l, busy, secret] {
      std::string err;
      for (int i = 0; i < busy; ++i) {  // ServerHello, read the ClientHello, close: busy
        auto c = l.accept_raw(5000, &err);
        if (!c) return;
        c->send_server_hello(!secret.empty(), 1000, &err);
        v1::Envelope env;
        try {
          c->recv(&env, 1000);
        } catch (const std::exception&) {
        }
        c->close();
      }
      std::string name;
      auto ok = l.accept(5000, v1::DECODER, secret, &name, &err);
      if (ok) {
        v1::Envelope env;
        try {
          ok->recv(&env, 1000);  // until the client closes
        } catch (const std::exception&) {
        }
      }
    });
  };
  auto dial = [&](const std::string& secret, int* tries) {
    return [&, secret, tries](int left) {
      ++*tries;
      auto c = w::Connection::connect("127.0.0.1", l.port(), left);
      c->client_handshake(v1::DECODER, "d", secret, left);
      return c;
    };
  };
  {
    std::thread server = serve(2, "s3cret");
    int tries = 0;
    auto c = w::open_retrying_busy(dial("s3cret", &tries), 5000);
    EXPECT_NE(c, nullptr);
    EXPECT_EQ(tries, 3);
    c.reset();
    server.join();
  }
  {
    std::thread server = serve(2, "s3cret");
    int tries = 0;
    try {
      w::open_retrying_busy(dial("s3cret", &tries), 5000, 2);
      ADD_FAILURE() << "a busy server accepted";
    } catch (const w::WireError& e) {
      EXPECT_EQ(e.kind(), w::WireError::Kind::kBusy) << e.what();
      EXPECT_NE(std::string(e.what()).find("closed the connection before answering"),
                std::string::npos)
          << e.what();
    }
    EXPECT_EQ(tries, 2);
    // The server's third connection: a real hello, then it waits for the client to close.
    auto last = w::Connection::connect("127.0.0.1", l.port(), 2000);
    last->client_handshake(v1::DECODER, "d", "s3cret", 2000);
    last.reset();
    server.join();
  }
  {
    std::thread server = serve(0, "s3cret");
    int tries = 0;
    try {
      w::open_retrying_busy(dial("wrong", &tries), 5000);
      ADD_FAILURE() << "a wrong secret accepted";
    } catch (const w::WireError& e) {
      EXPECT_EQ(e.kind(), w::WireError::Kind::kAuth) << e.what();
    }
    EXPECT_EQ(tries, 1);
    server.join();
  }
}

TEST(HostPort, ParsesAndRejects) {
  std::string h;
  uint16_t port = 0;
  w::parse_host_port("127.0.0.1:7070", &h, &port);
  EXPECT_EQ(h, "127.0.0.1");
  EXPECT_EQ(port, 7070);
  w::parse_host_port("[::1]:80", &h, &port);
  EXPECT_EQ(h, "::1");
  w::parse_host_port("0.0.0.0:0", &h, &port);  // listening on any port
  EXPECT_EQ(port, 0);
  for (const char* bad : {"localhost", ":80", "host:", "host:70000", "host:8x", "host:-1"})
    EXPECT_THROW(w::parse_host_port(bad, &h, &port), std::invalid_argument) << bad;
}

TEST(Loopback, HandshakeAndMessagesBothWays) {
  w::Listener l("127.0.0.1", 0);
  l.set_server_name("test-server");
  ASSERT_GT(l.port(), 0);
  AcceptThread at(l, v1::WORKER, "");
  auto c = w::Connection::connect("127.0.0.1", l.port(), 2000);
  c->client_handshake(v1::WORKER, "group-a", "", 2000);
  at.join();
  ASSERT_TRUE(at.conn) << at.error;
  EXPECT_EQ(at.name, "group-a");
  EXPECT_EQ(at.conn->peer_name(), "group-a");
  EXPECT_EQ(c->peer_name(), "test-server");
  EXPECT_EQ(c->peer(), "127.0.0.1:" + std::to_string(l.port()));

  // A large frame (8 MiB page) while the other side sends small ones concurrently.
  v1::Envelope page;
  auto* kv = page.mutable_kv_page();
  kv->mutable_header()->set_layer(3);
  std::string k(8u << 20, '\0');
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<char>(i * 131 + 7);
  kv->set_k(k);
  std::thread sender([&] { c->send(page, 5000); });
  for (int i = 0; i < 20; ++i) at.conn->send(submit_env(10, i), 2000);
  v1::Envelope got;
  ASSERT_TRUE(at.conn->recv(&got, 5000));
  sender.join();
  ASSERT_TRUE(got.has_kv_page());
  EXPECT_EQ(got.kv_page().header().layer(), 3);
  EXPECT_EQ(got.kv_page().k(), k);
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(c->recv(&got, 2000));
    EXPECT_EQ(got.submit().client_tag(), "tag" + std::to_string(i));
  }
}

TEST(Loopback, RecvTimesOutThenPeerCloseIsReported) {
  w::Listener l("127.0.0.1", 0);
  AcceptThread at(l, v1::CLIENT, "");
  auto c = w::Connection::connect("127.0.0.1", l.port(), 2000);
  c->client_handshake(v1::CLIENT, "cli", "", 2000);
  at.join();
  ASSERT_TRUE(at.conn) << at.error;
  v1::Envelope env;
  auto t0 = Clock::now();
  EXPECT_FALSE(c->recv(&env, 150));
  double ms = ms_since(t0);
  EXPECT_GE(ms, 140);
  EXPECT_LT(ms, 1500);
  at.conn.reset();  // server side closes
  try {
    c->recv(&env, 2000);
    FAIL() << "recv after peer close returned";
  } catch (const w::WireError& e) {
    EXPECT_EQ(e.kind(), w::WireError::Kind::kClosed) << e.what();
  }
}

TEST(Loopback, CloseFromAnotherThreadWakesRecv) {
  w::Listener l("127.0.0.1", 0);
  AcceptThread at(l, v1::CLIENT, "");
  auto c = w::Connection::connect("127.0.0.1", l.port(), 2000);
  c->client_handshake(v1::CLIENT, "cli", "", 2000);
  at.join();
  ASSERT_TRUE(at.conn);
  auto t0 = Clock::now();
  std::thread closer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    c->close();
  });
  v1::Envelope env;
  EXPECT_THROW(c->recv(&env, 10000), w::WireError);
  closer.join();
  EXPECT_LT(ms_since(t0), 3000);
}

TEST(Loopback, SendTimesOutWhenThePeerDoesNotRead) {
  w::Listener l("127.0.0.1", 0);
  AcceptThread at(l, v1::CLIENT, "");
  auto c = w::Connection::connect("127.0.0.1", l.port(), 2000);
  c->client_handshake(v1::CLIENT, "cli", "", 2000);
  at.join();
  ASSERT_TRUE(at.conn);
  v1::Envelope big;
  big.mutable_kv_page()->set_k(std::string(48u << 20, 'x'));  // far above socket buffers
  auto t0 = Clock::now();
  try {
    c->send(big, 200);
    FAIL() << "send of 48 MiB to a peer that does not read completed";
  } catch (const w::WireError& e) {
    EXPECT_EQ(e.kind(), w::WireError::Kind::kTimeout) << e.what();
  }
  EXPECT_LT(ms_since(t0), 2000);
  // The stream is broken now: further sends fail at once.
  EXPECT_THROW(c->send(submit_env(1, 1), 200), w::WireError);
}

TEST(Loopback, ConnectRefusedAndHandshakeTimeout) {
  uint16_t dead_port;
  {
    w::Listener tmp("127.0.0.1", 0);
    dead_port = tmp.port();
  }
  try {
    w::Connection::connect("127.0.0.1", dead_port, 1000);
    FAIL() << "connect to a closed port succeeded";
  } catch (const w::WireError& e) {
    EXPECT_EQ(e.kind(), w::WireError::Kind::kConnect) << e.what();
  }
  // A listener that never accepts: the kernel completes the TCP connect, but no
  // ServerHello comes.
  w::Listener silent("127.0.0.1", 0);
  auto c = w::Connection::connect("127.0.0.1", silent.port(), 1000);
  auto t0 = Clock::now();
  try {
    c->client_handshake(v1::CLIENT, "cli", "", 200);
    FAIL() << "handshake without a server completed";
  } catch (const w::WireError& e) {
    EXPECT_EQ(e.kind(), w::WireError::Kind::kTimeout) << e.what();
  }
  EXPECT_LT(ms_since(t0), 1500);
  // accept() with nobody connecting returns nullptr without an error after the timeout.
  w::Listener idle("127.0.0.1", 0);
  std::string err = "x";
  t0 = Clock::now();
  EXPECT_EQ(idle.accept(120, v1::CLIENT, "", nullptr, &err), nullptr);
  EXPECT_TRUE(err.empty());
  EXPECT_GE(ms_since(t0), 110);
}

TEST(Loopback, SecretAcceptedWrongSecretRefused) {
  const std::string secret = "correct horse battery staple";
  w::Listener l("127.0.0.1", 0);
  {
    AcceptThread at(l, v1::DECODER, secret);
    auto c = w::Connection::connect("127.0.0.1", l.port(), 2000);
    c->client_handshake(v1::DECODER, "dec", secret, 2000);
    at.join();
    ASSERT_TRUE(at.conn) << at.error;
    c->send(submit_env(3, 9), 1000);
    v1::Envelope env;
    ASSERT_TRUE(at.conn->recv(&env, 1000));
    EXPECT_EQ(env.submit().client_tag(), "tag9");
  }
  {
    AcceptThread at(l, v1::DECODER, secret);
    auto c = w::Connection::connect("127.0.0.1", l.port(), 2000);
    try {
      c->client_handshake(v1::DECODER, "dec", "wrong secret", 2000);
      FAIL() << "wrong secret accepted";
    } catch (const w::WireError& e) {
      EXPECT_EQ(e.kind(), w::WireError::Kind::kAuth) << e.what();
      EXPECT_EQ(std::string(e.what()).find(secret), std::string::npos);
    }
    at.join();
    EXPECT_EQ(at.conn, nullptr);
    EXPECT_NE(at.error.find("wrong proof"), std::string::npos) << at.error;
    EXPECT_EQ(at.error.find(secret), std::string::npos);
  }
  {
    // No secret on the client while the server requires one: refused locally.
    AcceptThread at(l, v1::DECODER, secret, 3000);
    auto c = w::Connection::connect("127.0.0.1", l.port(), 2000);
    try {
      c->client_handshake(v1::DECODER, "dec", "", 2000);
      FAIL() << "handshake without a secret passed";
    } catch (const w::WireError& e) {
      EXPECT_EQ(e.kind(), w::WireError::Kind::kAuth) << e.what();
    }
    c.reset();
    at.join();
    EXPECT_EQ(at.conn, nullptr);
  }
  {
    // A role other than the expected one is refused.
    AcceptThread at(l, v1::DECODER, secret);
    auto c = w::Connection::connect("127.0.0.1", l.port(), 2000);
    EXPECT_THROW(c->client_handshake(v1::CLIENT, "cli", secret, 2000), w::WireError);
    at.join();
    EXPECT_EQ(at.conn, nullptr);
    EXPECT_NE(at.error.find("expected a decoder"), std::string::npos) << at.error;
  }
}

TEST(Loopback, ListenerCloseWakesAccept) {
  w::Listener l("127.0.0.1", 0);
  std::string err;
  auto t0 = Clock::now();
  std::thread closer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    l.close();
  });
  EXPECT_EQ(l.accept(10000, v1::CLIENT, "", nullptr, &err), nullptr);
  closer.join();
  EXPECT_EQ(err, "listener closed");
  EXPECT_LT(ms_since(t0), 2000);
}

TEST(SecretFile, LoadsStripsAndRejects) {
  const std::string path = ::testing::TempDir() + "/wire_test_secret";
  {
    std::ofstream f(path);
    f << "abc def\n";
  }
  EXPECT_EQ(w::load_secret_file(path), "abc def");
  {
    std::ofstream f(path);
    f << "\n";
  }
  EXPECT_THROW(w::load_secret_file(path), std::runtime_error);
  EXPECT_THROW(w::load_secret_file(path + ".missing"), std::runtime_error);
}
