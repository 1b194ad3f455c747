// KV handoff: crc32c, page cutting, the paged store (reassembly of tp x sp shards,
// checksum / overlap / geometry rejection, capacity), the model fingerprint, the KvPage
// frame encoding, and the real TCP path (TcpKvHandoff senders -> KvReceiver over
// loopback): exact reassembly, corrupted pages, vanished / silent senders, a vanished
// decoder, contract mismatch.
#include <gtest/gtest.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>

#include "decode/decoder.h"
#include "kv/crc32c.h"
#include "kv/kv_handoff.h"
#include "kv/kv_page_frame.h"
#include "kv/kv_store.h"
#include "kv/kv_transport.h"
#include "model/fingerprint.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

using kv::JobKvStore;
using kv::KvStoreShape;
using kv::PageCut;
using kv::PageError;
using kv::PageIn;
using kv::PagePool;
using Clock = std::chrono::steady_clock;
using Ranges = std::vector<std::pair<int64_t, int64_t>>;

// ---- crc32c ----------------------------------------------------------------------------

TEST(Crc32c, KnownVectorsAndExtension) {
  EXPECT_EQ(kv::crc32c("123456789", 9), 0xE3069283u);  // the CRC-32C check value
  EXPECT_EQ(kv::crc32c("", 0), 0u);
  const std::vector<uint8_t> zeros(32, 0);
  EXPECT_EQ(kv::crc32c(zeros.data(), 32), 0x8A9136AAu);  // RFC 3720 B.4
  std::vector<uint8_t> buf(1000 + 7);
  std::mt19937 rng(3);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  const uint32_t whole = kv::crc32c(buf.data(), buf.size());
  for (size_t cut : {size_t{0}, size_t{1}, size_t{13}, size_t{512}, buf.size()})
    EXPECT_EQ(kv::crc32c(buf.data() + cut, buf.size() - cut, kv::crc32c(buf.data(), cut)), whole);
  buf[500] ^= 0x10;
  EXPECT_NE(kv::crc32c(buf.data(), buf.size()), whole);
}

// The interleaved hardware path against the table, around its 3 x 4 KiB rounds, unaligned,
// continuing a running checksum.
TEST(Crc32c, InterleavedPathMatchesTheTable) {
  std::vector<uint8_t> buf(3 * 3 * 4096 + 1000);
  std::mt19937 rng(9);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t n : {size_t{0}, size_t{7}, size_t{12287}, size_t{12288}, size_t{12289}, size_t{24575},
                   size_t{24576}, size_t{24583}, size_t{36864}, buf.size() - 3})
    for (size_t off : {size_t{0}, size_t{3}})
      for (uint32_t seed : {0u, 0xdeadbeefu}) {
        if (off + n > buf.size()) continue;
        EXPECT_EQ(kv::crc32c(buf.data() + off, n, seed),
                  kv::crc32c_portable(buf.data() + off, n, seed))
            << n << " bytes at +" << off;
      }
}

// ---- page cutting ----------------------------------------------------------------------

TEST(CutPages, AlignedBlocksNeverSpanRanges) {
  const auto cuts = kv::cut_pages({{0, 5}, {300, 700}}, 256);
  ASSERT_EQ(cuts.size(), 3u);
  EXPECT_EQ(cuts[0].token_begin, 0);
  EXPECT_EQ(cuts[0].token_end, 5);
  EXPECT_EQ(cuts[0].row0, 0);
  EXPECT_EQ(cuts[1].token_begin, 300);
  EXPECT_EQ(cuts[1].token_end, 512);
  EXPECT_EQ(cuts[1].row0, 5);
  EXPECT_EQ(cuts[2].token_begin, 512);
  EXPECT_EQ(cuts[2].token_end, 700);
  EXPECT_EQ(cuts[2].row0, 217);

  std::mt19937 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    const int P = 1 + static_cast<int>(rng() % 100);
    Ranges r;
    int64_t t = rng() % 50;
    for (int i = 0, n = 1 + rng() % 4; i < n; ++i) {
      const int64_t len = 1 + rng() % 300;
      r.push_back({t, t + len});
      t += len + rng() % 40;
    }
    const auto c = kv::cut_pages(r, P);
    int64_t row = 0;
    size_t ri = 0;
    int64_t cursor = r[0].first;
    for (const PageCut& p : c) {
      if (cursor == r[ri].second) cursor = r[++ri].first;
      EXPECT_EQ(p.token_begin, cursor);
      EXPECT_EQ(p.row0, row);
      EXPECT_LE(p.token_end, r[ri].second);
      EXPECT_EQ(p.token_begin / P, (p.token_end - 1) / P);
      row += p.token_end - p.token_begin;
      cursor = p.token_end;
    }
    EXPECT_EQ(cursor, r.back().second);
    int64_t rows = 0;
    for (auto& [b, e] : r) rows += e - b;
    EXPECT_EQ(row, rows);
  }
  EXPECT_THROW(kv::cut_pages({{5, 5}}, 4), std::invalid_argument);
  EXPECT_THROW(kv::cut_pages({{10, 20}, {15, 30}}, 4), std::invalid_argument);
  EXPECT_THROW(kv::cut_pages({{0, 4}}, 0), std::invalid_argument);
}

// ---- a synthetic job: source KV and its tp x sp shards -------------------------------

struct SourceKv {
  int n_layers, kvh, hd;
  int64_t n;
  std::vector<std::vector<float>> k, v;  // [layer][n][kvh][hd]
};

SourceKv make_source(int n_layers, int64_t n, int kvh, int hd, uint64_t seed) {
  SourceKv s{n_layers, kvh, hd, n, {}, {}};
  for (int l = 0; l < n_layers; ++l) {
    s.k.push_back(test::random_uniform(n * kvh * hd, seed + 2 * l));
    s.v.push_back(test::random_uniform(n * kvh * hd, seed + 2 * l + 1));
  }
  return s;
}

// Zigzag sp shards: 2 * sp chunks, sp rank r holds chunks r and 2 sp - 1 - r.
Ranges zigzag(int64_t n, int sp, int r) {
  const int64_t chunks = 2 * sp;
  auto bound = [&](int64_t c) { return n * c / chunks; };
  Ranges out;
  for (int64_t c : {int64_t{r}, chunks - 1 - r})
    if (bound(c + 1) > bound(c)) out.push_back({bound(c), bound(c + 1)});
  return out;
}

// tp rank t holds heads t, t + tp, ... (not contiguous, on purpose).
std::vector<int> heads_of(int kvh, int tp, int t) {
  std::vector<int> h;
  for (int i = t; i < kvh; i += tp) h.push_back(i);
  return h;
}

// The rank's slice rows, gathered from the source: [rows][heads][hd].
struct RankSlice {
  Ranges tokens;
  std::vector<int> heads;
  std::vector<float> k, v;
};

RankSlice cut_slice(const SourceKv& s, int layer, const Ranges& tokens,
                    const std::vector<int>& heads) {
  RankSlice r{tokens, heads, {}, {}};
  for (auto [b, e] : tokens)
    for (int64_t t = b; t < e; ++t)
      for (int h : heads)
        for (int d = 0; d < s.hd; ++d) {
          r.k.push_back(s.k[layer][(t * s.kvh + h) * s.hd + d]);
          r.v.push_back(s.v[layer][(t * s.kvh + h) * s.hd + d]);
        }
  return r;
}

KvSlice as_slice(const RankSlice& r, int layer, int hd) {
  KvSlice s;
  s.layer = layer;
  s.kv_heads = r.heads;
  s.tokens = r.tokens;
  s.head_dim = hd;
  s.k = r.k.data();
  s.v = r.v.data();
  return s;
}

PageIn page_of(const RankSlice& r, int layer, int hd, const PageCut& c) {
  PageIn p;
  p.layer = layer;
  p.kv_heads = r.heads;
  p.token_begin = c.token_begin;
  p.token_end = c.token_end;
  p.head_dim = hd;
  const size_t row = r.heads.size() * hd;
  p.k = r.k.data() + c.row0 * row;
  p.v = r.v.data() + c.row0 * row;
  p.k_bytes = p.v_bytes = (c.token_end - c.token_begin) * row * 4;
  p.crc32c = kv::crc32c(p.v, p.v_bytes, kv::crc32c(p.k, p.k_bytes));
  return p;
}

void expect_store_equals(const JobKvStore& store, const SourceKv& s) {
  std::vector<float> k(s.n * s.kvh * s.hd), v(k.size());
  for (int l = 0; l < s.n_layers; ++l) {
    ASSERT_TRUE(store.layer_complete(l)) << "layer " << l;
    store.export_layer(l, k.data(), v.data());
    EXPECT_EQ(std::memcmp(k.data(), s.k[l].data(), k.size() * 4), 0) << "K layer " << l;
    EXPECT_EQ(std::memcmp(v.data(), s.v[l].data(), v.size() * 4), 0) << "V layer " << l;
  }
}

// The pages of every layer's tp x sp shards (zigzag tokens over sp, heads over tp), cut at
// P tokens; pages point into slices.
struct ShardPages {
  std::vector<RankSlice> slices;              // [layer * tp * sp + rank]
  std::vector<std::pair<int, PageIn>> pages;  // (layer, page)
};
ShardPages shard_pages(const SourceKv& src, int tp, int sp, int P) {
  ShardPages out;
  for (int l = 0; l < src.n_layers; ++l)
    for (int r = 0; r < tp * sp; ++r)
      out.slices.push_back(
          cut_slice(src, l, zigzag(src.n, sp, r / tp), heads_of(src.kvh, tp, r % tp)));
  for (int l = 0; l < src.n_layers; ++l)
    for (int r = 0; r < tp * sp; ++r) {
      const RankSlice& rs = out.slices[l * tp * sp + r];
      for (const PageCut& c : kv::cut_pages(rs.tokens, P))
        out.pages.push_back({l, page_of(rs, l, src.hd, c)});
    }
  return out;
}

// ---- the store ---------------------------------------------------------------------------

TEST(KvStore, ReassemblesTpSpShardsInAnyOrder) {
  const int L = 2, kvh = 4, hd = 24, P = 64, tp = 2, sp = 3;
  const int64_t n = 1001;  // not a multiple of P nor of 2 sp
  const SourceKv src = make_source(L, n, kvh, hd, 7);
  KvStoreShape shape{L, kvh, hd, P};
  PagePool pool(shape, uint64_t{1} << 30);
  JobKvStore store(&pool, n);

  ShardPages sp_pages = shard_pages(src, tp, sp, P);
  auto& pages = sp_pages.pages;
  std::shuffle(pages.begin(), pages.end(), std::mt19937(5));
  int completed = 0;
  for (size_t i = 0; i < pages.size(); ++i) {
    const bool done = store.put(pages[i].second);
    completed += done;
    // A layer completes exactly at its last page.
    const bool last_of_layer = std::none_of(pages.begin() + i + 1, pages.end(), [&](const auto& p) {
      return p.first == pages[i].first;
    });
    EXPECT_EQ(done, last_of_layer) << "page " << i;
  }
  EXPECT_EQ(completed, L);
  EXPECT_TRUE(store.complete());
  expect_store_equals(store, src);
  EXPECT_EQ(store.bytes_received(), uint64_t(2 * L * n * kvh * hd * 4));
}

// The receivers of one job put in parallel (their copies run outside the store's lock):
// 6 threads put the tp x sp shards' pages of 3 layers, each thread its share in shuffled
// order, with duplicates of pages already put mixed in (refused as overlaps, the store
// unchanged). Each layer is reported complete exactly once, by a put that saw every cell
// stored, and the store equals the source. Repeated to give the interleavings a chance.
TEST(KvStore, ParallelPutsCompleteEachLayerOnce) {
  const int L = 3, kvh = 4, hd = 32, P = 16, tp = 2, sp = 3;
  const int64_t n = 777;
  const SourceKv src = make_source(L, n, kvh, hd, 11);
  ShardPages sp_pages = shard_pages(src, tp, sp, P);
  auto& pages = sp_pages.pages;
  KvStoreShape shape{L, kvh, hd, P};
  PagePool pool(shape, uint64_t{1} << 30);
  for (int round = 0; round < 20; ++round) {
    JobKvStore store(&pool, n);
    std::shuffle(pages.begin(), pages.end(), std::mt19937(round));
    constexpr int kThreads = 6;
    std::vector<std::vector<int>> reported(kThreads);
    std::atomic<int> overlaps{0}, other_errors{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < kThreads; ++t)
      ts.emplace_back([&, t] {
        for (size_t i = t; i < pages.size(); i += kThreads) {
          const auto& [layer, pg] = pages[i];
          if (store.put(pg)) {
            reported[t].push_back(layer);
            if (!store.layer_complete(layer)) other_errors++;  // complete when reported
          }
          if (i % 7 == 0 && i >= kThreads) {  // a page put before (by some thread) again
            try {
              store.put(pages[i - kThreads].second);
              other_errors++;
            } catch (const PageError& e) {
              overlaps += std::string(e.what()).find("overlaps") != std::string::npos;
            }
          }
        }
      });
    for (auto& th : ts) th.join();
    std::vector<int> all;
    for (const auto& r : reported) all.insert(all.end(), r.begin(), r.end());
    std::sort(all.begin(), all.end());
    ASSERT_EQ(all, (std::vector<int>{0, 1, 2})) << "round " << round;
    EXPECT_EQ(other_errors.load(), 0) << "round " << round;
    EXPECT_GT(overlaps.load(), 0);
    expect_store_equals(store, src);
    EXPECT_EQ(store.bytes_received(), uint64_t(2 * L * n * kvh * hd * 4));
  }
}

TEST(KvStore, RejectsBadPagesAndStaysUsable) {
  const int kvh = 2, hd = 8, P = 16;
  const int64_t n = 40;
  const SourceKv src = make_source(1, n, kvh, hd, 21);
  PagePool pool(KvStoreShape{1, kvh, hd, P}, uint64_t{1} << 20);
  JobKvStore store(&pool, n);
  const RankSlice all = cut_slice(src, 0, {{0, n}}, {0, 1});
  const auto cuts = kv::cut_pages(all.tokens, P);
  ASSERT_EQ(cuts.size(), 3u);

  auto expect_reject = [&](PageIn p, const char* what) {
    try {
      store.put(p);
      ADD_FAILURE() << "accepted a page with " << what;
    } catch (const PageError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  PageIn p = page_of(all, 0, hd, cuts[0]);
  PageIn bad = p;
  bad.crc32c ^= 1;
  expect_reject(bad, "checksum mismatch");
  std::vector<float> corrupt(static_cast<const float*>(p.k),
                             static_cast<const float*>(p.k) + p.k_bytes / 4);
  corrupt[5] += 1e-3f;
  bad = p;
  bad.k = corrupt.data();
  expect_reject(bad, "checksum mismatch");
  bad = p;
  bad.token_end = 17;  // spans two 16-token pages
  expect_reject(bad, "spans two");
  bad = p;
  bad.layer = 1;
  expect_reject(bad, "layer out of");
  bad = p;
  bad.kv_heads = {1, 0};
  expect_reject(bad, "ascending");
  bad = p;
  bad.head_dim = 4;
  expect_reject(bad, "head_dim");
  bad = p;
  bad.k_bytes -= 4;
  expect_reject(bad, "bytes");
  bad = p;
  bad.token_begin = 30;
  bad.token_end = 46;
  expect_reject(bad, "outside");

  EXPECT_FALSE(store.put(p));
  expect_reject(p, "overlaps");  // the same page twice
  // Half a page overlapping the stored one, for one head.
  const RankSlice head1 = cut_slice(src, 0, {{8, 16}}, {1});
  expect_reject(page_of(head1, 0, hd, {8, 16, 0}), "overlaps");
  EXPECT_FALSE(store.put(page_of(all, 0, hd, cuts[1])));
  EXPECT_TRUE(store.put(page_of(all, 0, hd, cuts[2])));
  expect_store_equals(store, src);
}

TEST(KvStore, CapacityIsReservedUpFrontAndReturned) {
  // KV bytes of a job: 2 (K, V) x tokens x kv_dim (16) x 4 bytes x 2 layers = 256 per token.
  const KvStoreShape shape{2, 2, 8, 16};
  PagePool pool(shape, 100 * 256);
  {
    JobKvStore a(&pool, 64);
    EXPECT_EQ(pool.reserved_bytes(), 64u * 256);
    try {
      JobKvStore b(&pool, 37);  // 37 tokens: 9472 bytes, 9216 free
      ADD_FAILURE() << "over capacity accepted";
    } catch (const PageError& e) {
      EXPECT_NE(std::string(e.what()).find("KV needs 9472 bytes, 9216 of 25600 bytes are free"),
                std::string::npos)
          << e.what();
    }
    JobKvStore c(&pool, 36);  // exactly the rest (pages round up, the budget does not)
    EXPECT_EQ(pool.reserved_bytes(), 100u * 256);
  }
  EXPECT_EQ(pool.reserved_bytes(), 0u);
  JobKvStore d(&pool, 100);
  EXPECT_EQ(pool.reserved_bytes(), 100u * 256);
}

// A retired store's reservation is draining until its last reference drops: an admission
// that fits only once it is gone waits for it (bounded), one that would not fit even then
// is refused at once.
TEST(KvStore, AdmissionWaitsForDrainingReservationsOnly) {
  const KvStoreShape shape{2, 2, 8, 16};  // 256 KV bytes per token
  PagePool pool(shape, 100 * 256);
  auto live = std::make_unique<JobKvStore>(&pool, 30);
  auto gone = std::make_shared<JobKvStore>(&pool, 60);
  gone->retire();
  gone->retire();  // idempotent
  EXPECT_EQ(pool.draining_bytes(), 60u * 256);
  EXPECT_EQ(pool.reserved_bytes(), 90u * 256);

  // 71 tokens would not fit even without the draining 60: refused at once.
  auto t0 = Clock::now();
  std::string why;
  EXPECT_FALSE(pool.reserve(shape.pages_for(71), shape.kv_bytes(71), &why, 5000));
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 2.0);
  EXPECT_NE(why.find("KV needs 18176 bytes, 2560 of 25600 bytes are free (15360 bytes of released "
                     "jobs still draining)"),
            std::string::npos)
      << why;

  // 70 tokens fit once the draining store is gone (its holder drops it after 300 ms).
  std::thread holder([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    gone.reset();
  });
  t0 = Clock::now();
  const bool ok = pool.reserve(shape.pages_for(70), shape.kv_bytes(70), &why, 5000);
  const double waited = std::chrono::duration<double>(Clock::now() - t0).count();
  holder.join();
  ASSERT_TRUE(ok) << why;
  EXPECT_GE(waited, 0.25);
  EXPECT_EQ(pool.draining_bytes(), 0u);
  EXPECT_EQ(pool.reserved_bytes(), 100u * 256);
  pool.unreserve(shape.pages_for(70), shape.kv_bytes(70));
  live.reset();
  EXPECT_EQ(pool.reserved_bytes(), 0u);
}

// ---- fingerprint ---------------------------------------------------------------------------

TEST(Fingerprint, DigestFollowsEveryWeight) {
  const ModelConfig cfg = named_shape("tiny");
  ModelWeights a = random_model(cfg, 1);
  const std::string d = weights_digest(a);
  EXPECT_EQ(d.size(), 32u);
  EXPECT_EQ(weights_digest(random_model(cfg, 1)), d);
  EXPECT_NE(weights_digest(random_model(cfg, 2)), d);
  float& x = a.layers.back().w_down.data[12345];
  x = std::nextafter(x, 1.f);  // one ulp of one weight
  EXPECT_NE(weights_digest(a), d);
  const ModelFingerprint f = model_fingerprint(random_model(cfg, 1), "random:tiny:1");
  EXPECT_EQ(f.n_layers, cfg.n_layers);
  EXPECT_EQ(f.head_dim, cfg.head_dim);
  EXPECT_EQ(f.weights_digest, d);
  EXPECT_EQ(model_name_from_path("/a/b/stories15M.bin"), "stories15M");
  EXPECT_EQ(model_name_from_path("/models/Llama-3-8B/"), "Llama-3-8B");
  EXPECT_EQ(model_name_from_path("random:tiny:3"), "random:tiny:3");
}

TEST(Contract, MismatchNamesTheField) {
  ModelFingerprint f;
  f.name = "m";
  f.n_layers = 2;
  f.hidden = 64;
  f.n_heads = 4;
  f.n_kv_heads = 2;
  f.head_dim = 16;
  f.vocab = 100;
  f.weights_digest = "aa";
  const v1::KvContract a = make_kv_contract(f, 256);
  EXPECT_EQ(kv_contract_mismatch(a, a), "");
  EXPECT_NE(kv_contract_mismatch(a, make_kv_contract(f, 128)).find("page_tokens 256 vs 128"),
            std::string::npos);
  ModelFingerprint g = f;
  g.weights_digest = "bb";
  EXPECT_NE(kv_contract_mismatch(a, make_kv_contract(g, 256)).find("weights digest aa vs bb"),
            std::string::npos);
  // The dtype comes from the fingerprint (model_kv_dtype), never a caller's choice.
  EXPECT_EQ(a.kv_dtype(), v1::F32);
  ModelFingerprint b16 = f;
  b16.kv_dtype = DType::kBF16;
  EXPECT_EQ(make_kv_contract(b16, 256).kv_dtype(), v1::BF16);
  EXPECT_NE(kv_contract_mismatch(a, make_kv_contract(b16, 256)).find("kv dtype"),
            std::string::npos);
}

// ---- frame encoding -----------------------------------------------------------------------

TEST(KvPageFrame, ParsesLikeTheProtobufEncoding) {
  for (size_t bytes : {size_t{0}, size_t{4}, size_t{100}, size_t{70000}}) {
    std::string k(bytes, 'k'), v(bytes, 'v');
    for (size_t i = 0; i < bytes; ++i)
      k[i] = static_cast<char>(i * 7), v[i] = static_cast<char>(i * 13);
    v1::KvPageHeader h;
    h.set_job_id(123456789012ull);
    h.set_layer(3);
    h.add_kv_heads(1);
    h.add_kv_heads(5);
    h.set_token_begin(512);
    h.set_token_end(700);
    h.set_crc32c(0xdeadbeef);
    const std::string frame = encode_kv_page_frame(h, k.data(), v.data(), bytes);
    v1::Envelope ref;
    *ref.mutable_kv_page()->mutable_header() = h;
    ref.mutable_kv_page()->set_k(k);
    ref.mutable_kv_page()->set_v(v);
    wire::FrameParser parser;
    parser.feed(frame.data(), frame.size());
    v1::Envelope got;
    std::string err;
    ASSERT_EQ(parser.next(&got, &err), wire::FrameParser::Result::kOk) << err;
    EXPECT_EQ(parser.buffered(), 0u);
    ref.set_version(wire::kProtocolVersion);
    EXPECT_EQ(got.SerializeAsString(), ref.SerializeAsString()) << bytes;  // the same message
    EXPECT_EQ(got.kv_page().header().token_end(), 700);
    EXPECT_EQ(got.kv_page().k(), k);
    EXPECT_EQ(got.kv_page().v(), v);
  }
}

// ---- TCP: senders -> receiver over loopback ------------------------------------------------

v1::KvContract test_contract(int L, int kvh, int hd, int P, const std::string& digest = "d1",
                             DType dtype = DType::kF32) {
  ModelFingerprint f;
  f.name = "synthetic";
  f.n_layers = L;
  f.hidden = kvh * hd;
  f.n_heads = kvh;
  f.n_kv_heads = kvh;
  f.head_dim = hd;
  f.vocab = 10;
  f.weights_digest = digest;
  f.kv_dtype = dtype;
  return make_kv_contract(f, P);
}

std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = f32_to_bf16(x[i]);
  return out;
}

struct Failures {
  std::mutex mu;
  std::vector<std::pair<uint64_t, std::string>> list;
  void add(uint64_t j, const std::string& m) {
    std::lock_guard<std::mutex> lock(mu);
    list.push_back({j, m});
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(mu);
    return list.size();
  }
};

kv::ReceiverOptions receiver_opts(const v1::KvContract& c) {
  kv::ReceiverOptions o;
  o.contract = c;
  o.capacity_bytes = uint64_t{1} << 30;
  return o;
}

v1::Expect expect_msg(uint64_t job, int64_t n, int L, int senders, int timeout_ms = 10000) {
  v1::Expect e;
  e.set_job_id(job);
  e.set_prompt_tokens(n);
  e.set_n_layers(L);
  e.set_senders(senders);
  e.set_timeout_ms(timeout_ms);
  return e;
}

KvHandoffOptions sender_opts(uint64_t job, int rank, uint16_t port, const v1::KvContract& c,
                             int streams = 1, int timeout_ms = 10000) {
  KvHandoffOptions o;
  o.job_id = job;
  o.rank = rank;
  o.host = "127.0.0.1";
  o.port = port;
  o.contract = c;
  o.streams = streams;
  o.timeout_ms = timeout_ms;
  return o;
}

// Every rank of a tp x sp group sends its shard of every layer from its own thread.
void run_group(const SourceKv& src, const v1::KvContract& c, uint16_t port, uint64_t job, int tp,
               int sp, int streams, std::vector<KvHandoffStats>* stats = nullptr) {
  std::vector<std::thread> ranks;
  std::vector<std::string> errors(tp * sp);
  if (stats) stats->assign(tp * sp, {});
  for (int r = 0; r < tp * sp; ++r)
    ranks.emplace_back([&, r] {
      try {
        TcpKvHandoff h(sender_opts(job, r, port, c, streams));
        const Ranges tok = zigzag(src.n, sp, r / tp);
        const auto heads = heads_of(src.kvh, tp, r % tp);
        for (int l = 0; l < src.n_layers; ++l) {
          RankSlice rs = cut_slice(src, l, tok, heads);
          h.put(as_slice(rs, l, src.hd));
          std::fill(rs.k.begin(), rs.k.end(), -1.f);  // put() copied: reuse is safe
        }
        h.finish();
        if (stats) (*stats)[r] = h.stats();
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : ranks) t.join();
  for (int r = 0; r < tp * sp; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

TEST(TcpHandoff, GroupShardsArriveExactly) {
  const int L = 3, kvh = 4, hd = 32, P = 128;
  const int64_t n = 2000;
  const SourceKv src = make_source(L, n, kvh, hd, 99);
  const v1::KvContract c = test_contract(L, kvh, hd, P);
  Failures fails;
  kv::KvReceiver rx(receiver_opts(c), [&](uint64_t j, const std::string& m) { fails.add(j, m); });
  for (int streams : {1, 3}) {
    const uint64_t job = 10 + streams;
    std::string why;
    ASSERT_TRUE(rx.expect(expect_msg(job, n, L, 4), &why)) << why;
    std::vector<KvHandoffStats> stats;
    run_group(src, c, rx.port(), job, 2, 2, streams, &stats);
    ASSERT_TRUE(rx.wait_complete(job, &why)) << why;
    auto store = rx.store(job);
    ASSERT_TRUE(store);
    expect_store_equals(*store, src);
    const auto info = rx.info(job);
    EXPECT_EQ(info.bytes, uint64_t(2 * L * n * kvh * hd * 4));
    EXPECT_EQ(info.streams, 4 * streams);
    uint64_t sent = 0;
    for (const auto& s : stats) {
      sent += s.bytes;
      EXPECT_EQ(s.layers_acked, L);
    }
    EXPECT_EQ(sent, info.bytes);
    store.reset();
    rx.release(job);
  }
  EXPECT_EQ(rx.reserved_bytes(), 0u);
  EXPECT_EQ(fails.size(), 0u);
}

// A sender that speaks the protocol by hand (to send what TcpKvHandoff never would).
std::unique_ptr<wire::Connection> raw_stream(uint16_t port, uint64_t job, int rank,
                                             const v1::KvContract& c) {
  auto conn = wire::Connection::connect("127.0.0.1", port, 5000);
  conn->client_handshake(v1::WORKER, "raw", "", 5000);
  v1::Envelope hello;
  hello.mutable_kv_hello()->set_job_id(job);
  hello.mutable_kv_hello()->set_rank(rank);
  *hello.mutable_kv_hello()->mutable_kv() = c;
  conn->send(hello, 5000);
  return conn;
}

// Waits for a DecodeFailed on a raw stream; returns its message.
std::string failure_on(wire::Connection* conn, int timeout_ms) {
  const auto end = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Clock::now() < end) {
    v1::Envelope env;
    try {
      if (!conn->recv(&env, 100)) continue;
    } catch (const std::exception& e) {
      return std::string("closed: ") + e.what();
    }
    if (env.has_decode_failed()) return env.decode_failed().message();
  }
  return "";
}

TEST(TcpHandoff, CorruptedPageFailsTheJob) {
  const int L = 1, kvh = 2, hd = 8, P = 16;
  const int64_t n = 32;
  const SourceKv src = make_source(L, n, kvh, hd, 5);
  const v1::KvContract c = test_contract(L, kvh, hd, P);
  Failures fails;
  kv::KvReceiver rx(receiver_opts(c), [&](uint64_t j, const std::string& m) { fails.add(j, m); });
  std::string why;
  ASSERT_TRUE(rx.expect(expect_msg(7, n, L, 1), &why)) << why;
  auto conn = raw_stream(rx.port(), 7, 0, c);
  const RankSlice all = cut_slice(src, 0, {{0, n}}, {0, 1});
  PageIn p = page_of(all, 0, hd, {0, 16, 0});
  std::vector<float> k(static_cast<const float*>(p.k), static_cast<const float*>(p.k) + 16 * 16);
  k[3] = -k[3];  // flipped in flight, after the checksum
  v1::KvPageHeader h;
  h.set_job_id(7);
  h.set_layer(0);
  h.add_kv_heads(0);
  h.add_kv_heads(1);
  h.set_token_begin(0);
  h.set_token_end(16);
  h.set_dtype(v1::F32);
  h.set_layout(kKvLayout);
  h.set_page_tokens(P);
  h.set_head_dim(hd);
  h.set_crc32c(p.crc32c);
  conn->send_frame(encode_kv_page_frame(h, k.data(), p.v, p.k_bytes), 5000);
  const std::string msg = failure_on(conn.get(), 5000);
  EXPECT_NE(msg.find("checksum mismatch"), std::string::npos) << msg;
  EXPECT_FALSE(rx.wait_complete(7, &why));
  EXPECT_NE(why.find("checksum mismatch"), std::string::npos) << why;
  for (int i = 0; i < 100 && fails.size() < 1; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(fails.size(), 1u);
  EXPECT_EQ(rx.reserved_bytes(), 0u);  // memory released with the failure
  rx.release(7);
}

TEST(TcpHandoff, VanishedAndSilentSendersFailWithinTheTimeout) {
  const int L = 3, kvh = 2, hd = 8, P = 16;
  const int64_t n = 50;
  const SourceKv src = make_source(L, n, kvh, hd, 8);
  const v1::KvContract c = test_contract(L, kvh, hd, P);
  Failures fails;
  kv::KvReceiver rx(receiver_opts(c), [&](uint64_t j, const std::string& m) { fails.add(j, m); });
  std::string why;
  // Rank 0 sends layer 0 and dies (no finish): the job fails as soon as its stream ends.
  ASSERT_TRUE(rx.expect(expect_msg(1, n, L, 1, 60000), &why)) << why;
  {
    TcpKvHandoff h(sender_opts(1, 0, rx.port(), c));
    RankSlice rs = cut_slice(src, 0, {{0, n}}, {0, 1});
    h.put(as_slice(rs, 0, hd));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  auto t0 = Clock::now();
  EXPECT_FALSE(rx.wait_complete(1, &why));
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 5.0);
  EXPECT_NE(why.find("ended with 1 of 3 layers complete"), std::string::npos) << why;

  // A stream that stays open but sends nothing: failed after the job's 400 ms timeout.
  ASSERT_TRUE(rx.expect(expect_msg(2, n, L, 1, 400), &why)) << why;
  auto conn = raw_stream(rx.port(), 2, 0, c);
  t0 = Clock::now();
  EXPECT_FALSE(rx.wait_complete(2, &why));
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LT(s, 3.0);
  EXPECT_NE(why.find("no KV page for"), std::string::npos) << why;
  EXPECT_NE(failure_on(conn.get(), 3000).find("no KV page"), std::string::npos);
  for (int i = 0; i < 100 && fails.size() < 2; ++i)  // the callback runs after the flag
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(fails.size(), 2u);
  EXPECT_EQ(rx.reserved_bytes(), 0u);
}

TEST(TcpHandoff, VanishedDecoderFailsTheSender) {
  const int L = 4, kvh = 2, hd = 8, P = 16;
  const int64_t n = 64;
  const SourceKv src = make_source(L, n, kvh, hd, 9);
  const v1::KvContract c = test_contract(L, kvh, hd, P);
  auto rx = std::make_unique<kv::KvReceiver>(receiver_opts(c), nullptr);
  std::string why;
  // Two senders expected: rank 1 never comes, so no layer is ever acked.
  ASSERT_TRUE(rx->expect(expect_msg(3, n, L, 2), &why)) << why;
  TcpKvHandoff h(sender_opts(3, 0, rx->port(), c, 1, 1500));
  RankSlice rs = cut_slice(src, 0, {{0, n / 2}}, {0, 1});
  h.put(as_slice(rs, 0, hd));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  rx.reset();  // the decoder goes away
  const auto t0 = Clock::now();
  std::string err;
  try {
    for (int l = 1; l < L; ++l) {
      RankSlice r2 = cut_slice(src, l, {{0, n / 2}}, {0, 1});
      h.put(as_slice(r2, l, hd));
    }
    h.finish();
  } catch (const std::exception& e) {
    err = e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 5.0);
  EXPECT_NE(err.find("KV handoff to decoder 127.0.0.1:"), std::string::npos) << err;
  EXPECT_NE(err.find("job 3, rank 0"), std::string::npos) << err;
  EXPECT_TRUE(h.failed());
}

TEST(TcpHandoff, SlowDecoderAckTimesOut) {
  const int L = 2, kvh = 2, hd = 8, P = 16;
  const int64_t n = 32;
  const SourceKv src = make_source(L, n, kvh, hd, 10);
  const v1::KvContract c = test_contract(L, kvh, hd, P);
  kv::KvReceiver rx(receiver_opts(c), nullptr);
  std::string why;
  ASSERT_TRUE(rx.expect(expect_msg(4, n, L, 2, 60000), &why)) << why;  // rank 1 never sends
  TcpKvHandoff h(sender_opts(4, 0, rx.port(), c, 1, 600));
  for (int l = 0; l < L; ++l) {
    RankSlice rs = cut_slice(src, l, {{0, n / 2}}, {0, 1});
    h.put(as_slice(rs, l, hd));
  }
  const auto t0 = Clock::now();
  std::string err;
  try {
    h.finish();
  } catch (const std::exception& e) {
    err = e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 3.0);
  EXPECT_NE(err.find("no LayerAck for layer 0 within 600 ms"), std::string::npos) << err;
}

TEST(TcpHandoff, ContractMismatchIsRefused) {
  const v1::KvContract c = test_contract(2, 2, 8, 16);
  Failures fails;
  kv::KvReceiver rx(receiver_opts(c), [&](uint64_t j, const std::string& m) { fails.add(j, m); });
  std::string why;
  ASSERT_TRUE(rx.expect(expect_msg(5, 20, 2, 1), &why)) << why;
  TcpKvHandoff h(sender_opts(5, 0, rx.port(), test_contract(2, 2, 8, 16, "other"), 1, 3000));
  std::vector<float> k(20 * 2 * 8, 1.f);
  KvSlice s;
  s.layer = 0;
  s.kv_heads = {0, 1};
  s.tokens = {{0, 20}};
  s.head_dim = 8;
  s.k = s.v = k.data();
  std::string err;
  try {
    h.put(s);
    s.layer = 1;
    h.put(s);
    h.finish();
  } catch (const std::exception& e) {
    err = e.what();
  }
  EXPECT_NE(err.find("weights digest other vs d1"), std::string::npos) << err;
  EXPECT_FALSE(rx.wait_complete(5, &why));
  EXPECT_NE(why.find("KV contract mismatch"), std::string::npos) << why;
}

// ---- bf16 pages ------------------------------------------------------------------------

// A bf16 model's KV: bf16 slices cross as bytes (no conversion), fp32 slices are rounded
// to nearest even at export; either way the store holds exactly the bf16 values, at half
// the fp32 bytes, and exports them as bf16.
TEST(TcpHandoff, Bf16PagesRoundTripAsBytes) {
  const int L = 2, kvh = 4, hd = 24, P = 64;
  const int64_t n = 301;  // not a page multiple
  const SourceKv src = make_source(L, n, kvh, hd, 17);
  const v1::KvContract c = test_contract(L, kvh, hd, P, "d1", DType::kBF16);
  ASSERT_EQ(c.kv_dtype(), v1::BF16);
  Failures fails;
  kv::KvReceiver rx(receiver_opts(c), [&](uint64_t j, const std::string& m) { fails.add(j, m); });
  for (const DType slice_dtype : {DType::kBF16, DType::kF32}) {
    const uint64_t job = slice_dtype == DType::kBF16 ? 40 : 41;
    std::string why;
    ASSERT_TRUE(rx.expect(expect_msg(job, n, L, 4), &why)) << why;
    std::vector<std::thread> ranks;
    std::vector<std::string> errors(4);
    std::vector<KvHandoffStats> stats(4);
    for (int r = 0; r < 4; ++r)
      ranks.emplace_back([&, r] {
        try {
          TcpKvHandoff h(sender_opts(job, r, rx.port(), c, 2));
          for (int l = 0; l < L; ++l) {
            const RankSlice rs = cut_slice(src, l, zigzag(n, 2, r / 2), heads_of(kvh, 2, r % 2));
            const std::vector<uint16_t> k16 = to_bf16(rs.k), v16 = to_bf16(rs.v);
            KvSlice sl = as_slice(rs, l, hd);
            if (slice_dtype == DType::kBF16) {
              sl.dtype = DType::kBF16;
              sl.k = k16.data();
              sl.v = v16.data();
            }
            h.put(sl);
          }
          h.finish();
          stats[r] = h.stats();
        } catch (const std::exception& e) {
          errors[r] = e.what();
        }
      });
    for (auto& t : ranks) t.join();
    for (int r = 0; r < 4; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
    ASSERT_TRUE(rx.wait_complete(job, &why)) << why;
    auto store = rx.store(job);
    ASSERT_TRUE(store);
    EXPECT_EQ(store->shape().dtype, DType::kBF16);
    const uint64_t bf16_bytes = uint64_t(2) * L * n * kvh * hd * 2;  // half of fp32's
    EXPECT_EQ(rx.info(job).bytes, bf16_bytes);
    uint64_t sent = 0;
    for (const auto& st : stats) sent += st.bytes;
    EXPECT_EQ(sent, bf16_bytes);
    EXPECT_EQ(rx.reserved_bytes(), bf16_bytes);  // capacity in real bytes
    std::vector<uint16_t> k(n * kvh * hd), v(k.size());
    for (int l = 0; l < L; ++l) {
      store->export_layer(l, k.data(), v.data());
      EXPECT_EQ(k, to_bf16(src.k[l])) << "K layer " << l;
      EXPECT_EQ(v, to_bf16(src.v[l])) << "V layer " << l;
    }
    store.reset();
    rx.release(job);
  }
  EXPECT_EQ(rx.reserved_bytes(), 0u);
  EXPECT_EQ(fails.size(), 0u);
}

// A bf16 page whose bytes change after the checksum, one whose sizes are fp32's, and an
// fp32 page on a bf16 contract: each fails its job with the reason; a good job still runs.
TEST(TcpHandoff, CorruptedBf16PageIsRefused) {
  const int L = 1, kvh = 2, hd = 8, P = 16;
  const int64_t n = 32;
  const SourceKv src = make_source(L, n, kvh, hd, 5);
  const v1::KvContract c = test_contract(L, kvh, hd, P, "d1", DType::kBF16);
  kv::KvReceiver rx(receiver_opts(c), nullptr);
  const RankSlice all = cut_slice(src, 0, {{0, n}}, {0, 1});
  const std::vector<uint16_t> k16 = to_bf16(all.k), v16 = to_bf16(all.v);
  const size_t bytes = 16 * kvh * hd * 2;  // the first page, bf16
  auto header = [&](uint64_t job, v1::DType dt, uint32_t crc) {
    v1::KvPageHeader h;
    h.set_job_id(job);
    h.set_layer(0);
    h.add_kv_heads(0);
    h.add_kv_heads(1);
    h.set_token_begin(0);
    h.set_token_end(16);
    h.set_dtype(dt);
    h.set_layout(kKvLayout);
    h.set_page_tokens(P);
    h.set_head_dim(hd);
    h.set_crc32c(crc);
    return h;
  };
  const uint32_t crc = kv::crc32c(v16.data(), bytes, kv::crc32c(k16.data(), bytes));
  struct Case {
    uint64_t job;
    std::string frame, want;
  };
  std::vector<uint16_t> flipped(k16.begin(), k16.begin() + bytes / 2);
  flipped[5] ^= 0x0001;  // one mantissa bit, after the checksum
  const uint32_t crc_f32 = kv::crc32c(all.v.data(), 2 * bytes, kv::crc32c(all.k.data(), 2 * bytes));
  const std::vector<Case> cases = {
      {50, encode_kv_page_frame(header(50, v1::BF16, crc), flipped.data(), v16.data(), bytes),
       "checksum mismatch"},
      // fp32-sized payload declared bf16: the sizes are checked from the dtype.
      {51,
       encode_kv_page_frame(header(51, v1::BF16, crc_f32), all.k.data(), all.v.data(), 2 * bytes),
       "expected " + std::to_string(bytes)},
      {52,
       encode_kv_page_frame(header(52, v1::F32, crc_f32), all.k.data(), all.v.data(), 2 * bytes),
       "page dtype F32, the KV contract says BF16"},
  };
  for (const Case& cs : cases) {
    std::string why;
    ASSERT_TRUE(rx.expect(expect_msg(cs.job, n, L, 1), &why)) << why;
    auto conn = raw_stream(rx.port(), cs.job, 0, c);
    conn->send_frame(cs.frame, 5000);
    const std::string msg = failure_on(conn.get(), 5000);
    EXPECT_NE(msg.find(cs.want), std::string::npos) << msg;
    EXPECT_FALSE(rx.wait_complete(cs.job, &why));
    EXPECT_NE(why.find(cs.want), std::string::npos) << why;
    rx.release(cs.job);
  }
  // The intact page of the same bytes is taken.
  std::string why;
  ASSERT_TRUE(rx.expect(expect_msg(53, n, L, 1), &why)) << why;
  TcpKvHandoff h(sender_opts(53, 0, rx.port(), c));
  KvSlice sl = as_slice(all, 0, hd);
  sl.dtype = DType::kBF16;
  sl.k = k16.data();
  sl.v = v16.data();
  h.put(sl);
  h.finish();
  EXPECT_TRUE(rx.wait_complete(53, &why)) << why;
  EXPECT_EQ(rx.info(53).bytes, uint64_t(2) * n * kvh * hd * 2);
}

double process_cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Loopback throughput of the whole path (copy, crc, frame, TCP, parse, crc, store) on
// this machine, for the same KV as fp32 pages and as bf16 pages (bf16 slices, as a bf16
// model's GPU exports them: no conversion on either end); printed, not asserted
// (bf16 moves the same tokens in half the bytes). MPREFILL_HANDOFF_MB scales the job
// (fp32 size, default 64).
TEST(TcpHandoff, LoopbackThroughput) {
  const char* env = std::getenv("MPREFILL_HANDOFF_MB");
  const int64_t mb = env ? std::max(1, std::atoi(env)) : 64;
  const int L = 4, kvh = 8, hd = 128, P = 256;
  const int64_t n = std::max<int64_t>(1, mb * (1 << 20) / (2 * L * kvh * hd * 4));
  const SourceKv src = make_source(L, n, kvh, hd, 1);
  const char* streams_env = std::getenv("MPREFILL_HANDOFF_STREAMS");
  const int streams = streams_env ? std::max(1, std::atoi(streams_env)) : 1;
  for (const DType dt : {DType::kF32, DType::kBF16}) {
    const v1::KvContract c = test_contract(L, kvh, hd, P, "d1", dt);
    kv::ReceiverOptions ro = receiver_opts(c);
    ro.capacity_bytes = uint64_t{8} << 30;
    kv::KvReceiver rx(ro, nullptr);
    for (int sp : {1, 2}) {
      const uint64_t job = 100 + sp;
      std::string why;
      ASSERT_TRUE(rx.expect(expect_msg(job, n, L, sp), &why)) << why;
      // Slices are prepared up front so only the handoff is timed.
      std::vector<std::vector<RankSlice>> slices(sp);
      std::vector<std::vector<std::vector<uint16_t>>> k16(sp), v16(sp);
      for (int r = 0; r < sp; ++r)
        for (int l = 0; l < L; ++l) {
          slices[r].push_back(cut_slice(src, l, zigzag(n, sp, r), heads_of(kvh, 1, 0)));
          k16[r].push_back(to_bf16(slices[r].back().k));
          v16[r].push_back(to_bf16(slices[r].back().v));
        }
      const auto t0 = Clock::now();
      const double cpu0 = process_cpu_s();
      std::vector<std::thread> ranks;
      for (int r = 0; r < sp; ++r)
        ranks.emplace_back([&, r] {
          TcpKvHandoff h(sender_opts(job, r, rx.port(), c, streams));
          for (int l = 0; l < L; ++l) {
            KvSlice sl = as_slice(slices[r][l], l, hd);
            if (dt == DType::kBF16) {
              sl.dtype = DType::kBF16;
              sl.k = k16[r][l].data();
              sl.v = v16[r][l].data();
            }
            h.put(sl);
          }
          h.finish();
        });
      for (auto& t : ranks) t.join();
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      const double cpu = process_cpu_s() - cpu0;
      ASSERT_TRUE(rx.wait_complete(job, &why)) << why;
      const double gb = rx.info(job).bytes / 1e9;
      EXPECT_EQ(rx.info(job).bytes, uint64_t(2) * L * n * kvh * hd * dtype_size(dt));
      // CPU seconds per GB (senders + receiver, both ends in this process) bound the rate
      // on an idle machine; the wall rate depends on the load of this one.
      std::printf(
          "[ handoff ] %s pages, %d sender(s) x %d stream(s): %lld tokens, %.3f GB in %.3f s = "
          "%.2f GB/s, %.2f Mtokens/s (%.2f CPU s per GB, both ends)\n",
          to_string(dt), sp, streams, static_cast<long long>(n), gb, s, gb / s, n / s / 1e6,
          cpu / gb);
      auto store = rx.store(job);
      const size_t cells = n * kvh * hd;
      if (dt == DType::kF32) {
        std::vector<float> k(cells), v(cells);
        store->export_layer(L - 1, k.data(), v.data());
        EXPECT_EQ(std::memcmp(k.data(), src.k[L - 1].data(), cells * 4), 0);
      } else {
        std::vector<uint16_t> k(cells), v(cells);
        store->export_layer(L - 1, k.data(), v.data());
        EXPECT_EQ(k, to_bf16(src.k[L - 1]));
      }
      store.reset();
      rx.release(job);
    }
  }
}

// ---- the TCP fast path: staging buffers, page sizes, streams ------------------------------

// Every page size against a prime token count (pages of 1 token, tile +- 1, one page for the
// whole prompt, larger than the prompt), each with staging buffers smaller than one page
// frame (a buffer per page, grown), holding a few pages, and the default; 1 and 3 streams;
// a 2 x 3 tp x sp group (non-contiguous heads, zigzag ranges). The store holds exactly the
// source, and every rank reports each layer acked.
TEST(TcpHandoff, EveryPageSizeAndStagingSizeRoundTrips) {
  const int L = 2, kvh = 4, hd = 8;
  const int64_t n = 97;
  const SourceKv src = make_source(L, n, kvh, hd, 5);
  uint64_t job = 500;
  for (int P : {1, 2, 3, 7, 16, 31, 32, 33, 96, 97, 98, 300}) {
    const v1::KvContract c = test_contract(L, kvh, hd, P);
    kv::KvReceiver rx(receiver_opts(c), nullptr);
    for (const size_t staging : {size_t{4096}, size_t{3} << 12, size_t{4} << 20}) {
      const int streams = staging == 4096 ? 3 : 1;
      ++job;
      std::string why;
      ASSERT_TRUE(rx.expect(expect_msg(job, n, L, 6), &why)) << why;
      std::vector<std::string> errors(6);
      std::vector<KvHandoffStats> stats(6);
      std::vector<std::thread> ranks;
      for (int r = 0; r < 6; ++r)
        ranks.emplace_back([&, r] {
          try {
            KvHandoffOptions o = sender_opts(job, r, rx.port(), c, streams);
            o.staging_bytes = staging;
            o.staging_buffers = r % 2 ? 1 : 0;  // one buffer: sends and framing alternate
            TcpKvHandoff hsend(o);
            const Ranges tok = zigzag(n, 3, r / 2);
            const auto heads = heads_of(kvh, 2, r % 2);
            for (int l = 0; l < L; ++l) {
              RankSlice rs = cut_slice(src, l, tok, heads);
              hsend.put(as_slice(rs, l, hd));
              std::fill(rs.k.begin(), rs.k.end(), -1.f);  // put() copied
            }
            hsend.finish();
            stats[r] = hsend.stats();
          } catch (const std::exception& e) {
            errors[r] = e.what();
          }
        });
      for (auto& t : ranks) t.join();
      for (int r = 0; r < 6; ++r) {
        EXPECT_EQ(errors[r], "") << "P " << P << " staging " << staging << " rank " << r;
        EXPECT_EQ(stats[r].layers_acked, L);
      }
      ASSERT_TRUE(rx.wait_complete(job, &why)) << "P " << P << ": " << why;
      auto store = rx.store(job);
      ASSERT_TRUE(store);
      expect_store_equals(*store, src);
      uint64_t sent = 0;
      int64_t pages = 0;
      for (const auto& st : stats) sent += st.bytes, pages += st.pages;
      EXPECT_EQ(sent, uint64_t(2 * L * n * kvh * hd * 4));
      EXPECT_GE(pages, int64_t{L} * ((n + P - 1) / P));  // every page once, cut per rank
      store.reset();
      rx.release(job);
    }
    EXPECT_EQ(rx.reserved_bytes(), 0u);
  }
}

// The in-place reader of page frames agrees with protobuf on what the sender writes, and
// leaves every other frame (another message, another version, truncated) to protobuf.
TEST(KvPageFrame, InPlaceReaderMatchesProtobuf) {
  std::mt19937 g(3);
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{127}, size_t{128}, size_t{16383}, size_t{16384},
                       size_t{100003}}) {
    std::string k(bytes, '\0'), v(bytes, '\0');
    for (auto& x : k) x = static_cast<char>(g());
    for (auto& x : v) x = static_cast<char>(g());
    v1::KvPageHeader h;
    h.set_job_id(uint64_t{1} << 40);
    h.set_layer(3);
    h.add_kv_heads(1);
    h.add_kv_heads(5);
    h.set_token_begin(1 << 20);
    h.set_token_end((1 << 20) + 7);
    h.set_dtype(v1::BF16);
    h.set_layout(kKvLayout);
    h.set_page_tokens(256);
    h.set_head_dim(128);
    h.set_crc32c(0xdeadbeef);
    h.set_sender_rank(2);
    const std::string frame = encode_kv_page_frame(h, k.data(), v.data(), bytes);
    const std::string_view env(frame.data() + 4, frame.size() - 4);
    kv::KvPageView page;
    ASSERT_TRUE(kv::read_kv_page_frame(env, &page)) << bytes;
    EXPECT_EQ(page.header.SerializeAsString(), h.SerializeAsString());
    EXPECT_EQ(page.k, k);
    EXPECT_EQ(page.v, v);
    v1::Envelope parsed;
    ASSERT_TRUE(parsed.ParseFromArray(env.data(), static_cast<int>(env.size())));
    EXPECT_EQ(parsed.kv_page().k(), k);
    for (size_t cut : {size_t{1}, size_t{5}, env.size() / 2})  // truncated: not a page
      if (cut < env.size()) {
        EXPECT_FALSE(kv::read_kv_page_frame(env.substr(0, cut), &page));
      }
  }
  v1::Envelope ack;
  ack.set_version(wire::kProtocolVersion);
  ack.mutable_layer_ack()->set_layer(1);
  const std::string af = ack.SerializeAsString();
  kv::KvPageView page;
  EXPECT_FALSE(kv::read_kv_page_frame(af, &page));
  v1::Envelope old_page;
  old_page.set_version(wire::kProtocolVersion + 1);
  old_page.mutable_kv_page()->set_k("x");
  EXPECT_FALSE(kv::read_kv_page_frame(old_page.SerializeAsString(), &page));
}

// ---- transports: one factory, no silent fallback -----------------------------------------

TEST(KvTransport, UnservedOrBrokenTransportsFailWithTheReason) {
  const v1::KvContract c = test_contract(2, 2, 8, 16);
  // Names this build or this executor does not serve: refused before any connection.
  EXPECT_NE(kv::sender_refusal("rdma", {}).find("KV transport 'rdma' is unknown"),
            std::string::npos);
  EXPECT_EQ(kv::sender_refusal("", {}), "");
  EXPECT_EQ(kv::sender_refusal("tcp", {}), "");
  EXPECT_EQ(kv::sender_transports({}), std::vector<std::string>{"tcp"});  // a CPU rank
  try {
    kv::make_sender("nccl", sender_opts(1, 0, 1, c), kv::SenderSite{});
    ADD_FAILURE() << "nccl set up on a CPU rank";
  } catch (const std::exception& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("KV transport 'nccl' is not"), std::string::npos) << m;
  }
  // A transport that cannot be set up: the reason, never another transport.
  uint16_t dead_port = 0;
  {
    kv::KvReceiver gone(receiver_opts(c), nullptr);
    dead_port = gone.port();
  }
  try {
    kv::make_sender("tcp", sender_opts(1, 0, dead_port, c, 2, 2000), kv::SenderSite{});
    ADD_FAILURE() << "tcp set up to a closed port";
  } catch (const std::exception& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("KV transport 'tcp' cannot be set up: KV handoff to decoder 127.0.0.1:" +
                     std::to_string(dead_port)),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("connecting stream 0"), std::string::npos) << m;
  }
  // The decoder side: a stream naming a transport this KV port does not serve fails the
  // job at once with the reason, told to the sender.
  Failures fails;
  kv::KvReceiver rx(receiver_opts(c), [&](uint64_t j, const std::string& m) { fails.add(j, m); });
  EXPECT_EQ(kv::receiver_transports(kv::receiver_payloads(-1)), std::vector<std::string>{"tcp"});
  std::string why;
  ASSERT_TRUE(rx.expect(expect_msg(9, 40, 2, 1), &why)) << why;
  auto conn = wire::Connection::connect("127.0.0.1", rx.port(), 5000);
  conn->client_handshake(v1::WORKER, "ipc-sender", "", 5000);
  v1::Envelope hello;
  hello.mutable_kv_hello()->set_job_id(9);
  *hello.mutable_kv_hello()->mutable_kv() = c;
  hello.mutable_kv_hello()->set_transport("ipc");
  hello.mutable_kv_hello()->set_transport_setup("handle");
  conn->send(hello, 5000);
  const std::string told = failure_on(conn.get(), 5000);
  EXPECT_NE(told.find("ipc KV stream of rank 0 cannot be set up: this decoder does not serve "
                      "kv_transport ipc (it serves tcp)"),
            std::string::npos)
      << told;
  EXPECT_FALSE(rx.wait_complete(9, &why));
  EXPECT_NE(why.find("kv_transport ipc"), std::string::npos) << why;
}

// Two jobs in flight to one decoder at once (different groups, page counts and streams):
// each store holds exactly its own job's KV.
TEST(TcpHandoff, TwoJobsInFlightToOneDecoder) {
  const int L = 3, kvh = 4, hd = 16, P = 32;
  const SourceKv a = make_source(L, 1001, kvh, hd, 11), b = make_source(L, 611, kvh, hd, 12);
  const v1::KvContract c = test_contract(L, kvh, hd, P);
  Failures fails;
  kv::KvReceiver rx(receiver_opts(c), [&](uint64_t j, const std::string& m) { fails.add(j, m); });
  std::string why;
  ASSERT_TRUE(rx.expect(expect_msg(71, a.n, L, 4), &why)) << why;
  ASSERT_TRUE(rx.expect(expect_msg(72, b.n, L, 2), &why)) << why;
  std::thread ja([&] { run_group(a, c, rx.port(), 71, 2, 2, 2); });
  std::thread jb([&] { run_group(b, c, rx.port(), 72, 1, 2, 3); });
  ja.join();
  jb.join();
  ASSERT_TRUE(rx.wait_complete(71, &why)) << why;
  ASSERT_TRUE(rx.wait_complete(72, &why)) << why;
  expect_store_equals(*rx.store(71), a);
  expect_store_equals(*rx.store(72), b);
  EXPECT_EQ(rx.info(71).streams, 8);
  EXPECT_EQ(rx.info(72).streams, 6);
  EXPECT_EQ(fails.size(), 0u);
}

// The KV port runs each connection's hellos on its own thread: 20 connections that never
// speak delay no handoff (the serial port took 5 s each), are closed after
// prehello_timeout_ms, and past max_prehello a new connection closes the oldest silent one.
TEST(KvPort, SilentConnectionsDelayNoHandoff) {
  const int L = 2, kvh = 2, hd = 16, P = 64;
  const SourceKv src = make_source(L, 500, kvh, hd, 21);
  const v1::KvContract c = test_contract(L, kvh, hd, P);
  kv::ReceiverOptions ro = receiver_opts(c);
  ro.prehello_timeout_ms = 3000;
  kv::KvReceiver rx(ro, nullptr);
  std::vector<std::unique_ptr<wire::Connection>> silent;
  for (int i = 0; i < 20; ++i)
    silent.push_back(wire::Connection::connect("127.0.0.1", rx.port(), 2000));
  std::string why;
  ASSERT_TRUE(rx.expect(expect_msg(1, src.n, L, 2), &why)) << why;
  const auto t0 = Clock::now();
  run_group(src, c, rx.port(), 1, 1, 2, 2);
  ASSERT_TRUE(rx.wait_complete(1, &why)) << why;
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LT(s, 1.5) << "the handoff waited behind silent connections";
  expect_store_equals(*rx.store(1), src);
  // Closed after the pre-hello deadline: the ServerHello came, then the end.
  for (auto& conn : silent) {
    v1::Envelope env;
    bool closed = false;
    try {
      while (conn->recv(&env, 6000)) {
      }
    } catch (const wire::WireError& e) {
      closed = e.kind() == wire::WireError::Kind::kClosed;
    }
    EXPECT_TRUE(closed);
  }

  // The cap: with max_prehello silent connections in, the next one closes the oldest and
  // says its hellos (a flood of silent sockets locks no worker out).
  kv::ReceiverOptions capped = receiver_opts(c);
  capped.max_prehello = 4;
  capped.prehello_timeout_ms = 1000;
  kv::KvReceiver rx2(capped, nullptr);
  silent.clear();
  for (int i = 0; i < 4; ++i)
    silent.push_back(wire::Connection::connect("127.0.0.1", rx2.port(), 2000));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto extra = wire::Connection::connect("127.0.0.1", rx2.port(), 2000);
  EXPECT_NO_THROW(extra->client_handshake(v1::WORKER, "over-cap", "", 2000));
  {  // the oldest silent one was closed for it (well before the 1 s hello deadline)
    v1::Envelope env;
    bool closed = false;
    try {
      while (silent[0]->recv(&env, 500)) {
      }
    } catch (const wire::WireError& e) {
      closed = e.kind() == wire::WireError::Kind::kClosed;
    }
    EXPECT_TRUE(closed);
  }
  // Once the silent ones expired, streams get in again.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  ASSERT_TRUE(rx2.expect(expect_msg(2, src.n, L, 1), &why)) << why;
  run_group(src, c, rx2.port(), 2, 1, 1, 1);
  ASSERT_TRUE(rx2.wait_complete(2, &why)) << why;
}

// ---- admission: released jobs whose stores are still held ---------------------------------

// A receiver with room for one 1000-token job (2 layers, 2 KV heads of 16, fp32: 512 KV
// bytes per token) and 1000 bytes to spare.
constexpr int64_t kAdmitTokens = 1000;
constexpr uint64_t kAdmitJobBytes = kAdmitTokens * 512, kAdmitCapacity = kAdmitJobBytes + 1000;

kv::ReceiverOptions admit_opts(int admission_wait_ms) {
  kv::ReceiverOptions o = receiver_opts(test_contract(2, 2, 16, 64));
  o.capacity_bytes = kAdmitCapacity;
  o.admission_wait_ms = admission_wait_ms;
  return o;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

const std::string kAdmitFull = "KV needs " + std::to_string(kAdmitJobBytes) + " bytes, 1000 of " +
                               std::to_string(kAdmitCapacity) + " bytes are free";

// A receiver of admit_opts(wait_ms) whose room job 1 fills; with hold, job 1's store is
// taken as an in-flight put takes it (the receiver's release does not free it then).
struct Admission {
  kv::KvReceiver rx;
  std::shared_ptr<JobKvStore> held;
  explicit Admission(int wait_ms, bool hold = true) : rx(admit_opts(wait_ms), nullptr) {
    std::string why;
    EXPECT_TRUE(admit(1, &why)) << why;
    if (hold) held = rx.store(1);
    EXPECT_TRUE(!hold || held);
  }
  bool admit(uint64_t job, std::string* why) {
    return rx.expect(expect_msg(job, kAdmitTokens, 2, 1), why);
  }
};

// A released job's store held by someone else (as an in-flight put holds it) blocks the
// next job only until it is dropped; expect() waits for that without holding the
// receiver's lock.
TEST(KvAdmission, WaitsForAReleasedJobsStoreToDrain) {
  Admission a(2000);
  kv::KvReceiver& rx = a.rx;
  std::string why;
  rx.release(1);
  double info_s = -1;
  std::thread holder([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto t = Clock::now();
    (void)rx.info(1);  // blocks if expect() waits under mu_
    info_s = seconds_since(t);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    a.held.reset();
  });
  const auto t0 = Clock::now();
  const bool ok = a.admit(2, &why);
  const double waited = seconds_since(t0);
  holder.join();
  ASSERT_TRUE(ok) << why;
  EXPECT_GE(waited, 0.25) << "admitted before the released store was dropped";
  EXPECT_LT(info_s, 1.0) << "the receiver's lock was held during the admission wait";
  EXPECT_EQ(rx.reserved_bytes(), kAdmitJobBytes);
  EXPECT_TRUE(rx.info(2).known);
}

// A live job is not waited for: refused at once with the byte numbers.
TEST(KvAdmission, LiveJobRefusesAtOnce) {
  Admission a(2000, /*hold=*/false);
  kv::KvReceiver& rx = a.rx;
  std::string why;
  const auto t0 = Clock::now();
  EXPECT_FALSE(a.admit(2, &why));
  EXPECT_LT(seconds_since(t0), 1.0) << "waited for a live job";
  EXPECT_NE(why.find("job 2: decoder KV store full"), std::string::npos) << why;
  EXPECT_NE(why.find(kAdmitFull), std::string::npos) << why;
  EXPECT_EQ(why.find("waiting"), std::string::npos) << why;
  EXPECT_FALSE(rx.info(2).known);
  EXPECT_EQ(rx.reserved_bytes(), kAdmitJobBytes);
}

// A failed job's store that stays held past admission_wait_ms: refused after about that
// long, naming the wait; once dropped, the next expect() is admitted without waiting.
TEST(KvAdmission, DrainPastTheWaitIsRefusedNamingIt) {
  Admission a(300);
  kv::KvReceiver& rx = a.rx;
  std::string why;
  rx.fail_job(1, "job 1: test failure");
  auto t0 = Clock::now();
  EXPECT_FALSE(a.admit(2, &why));
  const double waited = seconds_since(t0);
  EXPECT_GE(waited, 0.28);
  EXPECT_LT(waited, 2.0);
  EXPECT_NE(why.find("job 2: decoder KV store full"), std::string::npos) << why;
  EXPECT_NE(why.find(kAdmitFull + " after waiting "), std::string::npos) << why;
  EXPECT_NE(why.find(" ms for released jobs' pages (" + std::to_string(kAdmitJobBytes) +
                     " bytes still draining)"),
            std::string::npos)
      << why;
  EXPECT_FALSE(rx.info(2).known);
  a.held.reset();
  EXPECT_EQ(rx.reserved_bytes(), 0u);
  t0 = Clock::now();
  ASSERT_TRUE(a.admit(3, &why)) << why;
  EXPECT_LT(seconds_since(t0), 1.0);
}

// admission_wait_ms 0: the old behaviour, refused at once even while a store drains.
TEST(KvAdmission, ZeroWaitRefusesAtOnce) {
  Admission a(0);
  std::string why;
  a.rx.release(1);
  std::thread holder([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    a.held.reset();
  });
  const auto t0 = Clock::now();
  const bool ok = a.admit(2, &why);
  const double waited = seconds_since(t0);
  holder.join();
  EXPECT_FALSE(ok);
  EXPECT_LT(waited, 1.0) << "waited with admission_wait_ms 0";
  EXPECT_NE(why.find("job 2: decoder KV store full"), std::string::npos) << why;
  EXPECT_NE(why.find(kAdmitFull + " (" + std::to_string(kAdmitJobBytes) +
                     " bytes of released jobs still draining)"),
            std::string::npos)
      << why;
  ASSERT_TRUE(a.admit(3, &why)) << why;
}

}  // namespace
}  // namespace mprefill
