// mprefill-bench handoff: bandwidth of the KV handoff's "tcp" transport on loopback, as
// issue 15 defines it: bytes landed in decoder-owned memory (the KvReceiver's page pool,
// checksums verified) / wall time of a saturating transfer (every layer's slice ready up
// front, senders put as fast as the transport takes them), against page size and the
// number of TCP streams per rank. Both ends run in this process (the decoder's KV port is
// the real KvReceiver, the senders the real TcpKvHandoff through kv::make_sender), so the
// CPU seconds per GB count both. Warm-up run first, median of --reps. --tls runs the same
// transfer over the TLS KV port as the service sets it up (decoder --tls-cert/--tls-key,
// worker --tls-ca verifying the certificate and 127.0.0.1), with a throwaway self-signed
// certificate (handoff_tls.h), plain and TLS rounds interleaved. Figures go to
// bench/NOTES.md only.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bench/handoff_tls.h"
#include "cli/flags.h"
#include "kernels/types.h"
#include "kv/kv_receiver.h"
#include "kv/kv_transport.h"
#include "model/fingerprint.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  double mb = 256;  // payload (K + V) per transfer
  std::vector<int> page_tokens = {16, 64, 256, 1024, 4096};
  std::vector<int> streams = {1, 2, 4, 8};
  int senders = 1;  // ranks (each with its share of the tokens, sp-style)
  int layers = 4, kv_heads = 8, head_dim = 128;
  int reps = 3;
  double staging_mb = 4;
  std::vector<int> tls = {0};  // 0: plain TCP, 1: TLS; interleaved per repetition
};

const char* kUsage =
    "usage: mprefill-bench handoff [--mb MB] [--page-tokens P[,P...]] [--streams S[,S...]]\n"
    "                              [--senders R] [--layers L] [--kv-heads H] [--head-dim D]\n"
    "                              [--reps N] [--staging-mb MB] [--tls [0,1]]\n"
    "TCP KV handoff on loopback, bf16 pages: GB/s = bytes landed in the decoder's page pool /\n"
    "wall time of a saturating transfer (median of --reps after a warm-up), per page size and\n"
    "streams per rank. Defaults: 256 MB, pages 16,64,256,1024,4096, streams 1,2,4,8, 1 sender,\n"
    "4 layers x 8 KV heads x 128, 3 reps, 4 MB staging buffers, plain TCP. --tls alone: plain\n"
    "and TLS 1.3 (throwaway self-signed certificate, verified) interleaved; --tls 1: TLS only.\n";

std::vector<int> int_list(const std::string& flag, const std::string& s, int lo = 1) {
  std::vector<int> out;
  size_t p = 0;
  while (p <= s.size()) {
    const size_t q = std::min(s.find(',', p), s.size());
    out.push_back(static_cast<int>(cli::parse_int(flag, s.substr(p, q - p), lo, 1 << 20)));
    p = q + 1;
  }
  return out;
}

double process_cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct Result {
  double gbps = 0, cpu_s_per_gb = 0, put_ms = 0;
};

// One saturating transfer of the job: seconds, or throws with the failure.
// rx: the decoder's KV port, one per page size and kept across transfers, as a running
// decoder's is (its page pool keeps buffers between jobs).
Result transfer(const Options& o, kv::KvReceiver& rx, const v1::KvContract& c, int streams,
                int64_t n, const std::vector<std::vector<uint16_t>>& k,
                const std::vector<std::vector<uint16_t>>& v, uint64_t job,
                const std::string& tls_ca) {
  v1::Expect e;
  e.set_job_id(job);
  e.set_prompt_tokens(n);
  e.set_n_layers(o.layers);
  e.set_senders(o.senders);
  e.set_timeout_ms(60000);
  std::string why;
  if (!rx.expect(e, &why)) throw std::runtime_error(why);
  std::vector<std::string> errors(o.senders);
  std::vector<double> put_ms(o.senders);
  const auto t0 = Clock::now();
  const double cpu0 = process_cpu_s();
  std::vector<std::thread> ranks;
  for (int r = 0; r < o.senders; ++r)
    ranks.emplace_back([&, r] {
      try {
        KvHandoffOptions ho;
        ho.job_id = job;
        ho.rank = r;
        ho.host = "127.0.0.1";
        ho.port = rx.port();
        ho.tls.enabled = rx.tls();  // as worker/handoff.cc: DecoderEndpoint.tls, --tls-ca
        ho.tls.ca_file = tls_ca;
        ho.contract = c;
        ho.streams = streams;
        ho.timeout_ms = 60000;
        ho.staging_bytes = static_cast<size_t>(o.staging_mb * (1 << 20));
        auto s = kv::make_sender("tcp", ho, kv::SenderSite{});
        const int64_t b = n * r / o.senders, end = n * (r + 1) / o.senders;
        const size_t row = static_cast<size_t>(o.kv_heads) * o.head_dim;
        for (int l = 0; l < o.layers; ++l) {
          KvSlice sl;
          sl.layer = l;
          for (int h = 0; h < o.kv_heads; ++h) sl.kv_heads.push_back(h);
          sl.tokens = {{b, end}};
          sl.head_dim = o.head_dim;
          sl.dtype = DType::kBF16;
          sl.k = k[l].data() + b * row;
          sl.v = v[l].data() + b * row;
          s->put(sl);
        }
        put_ms[r] = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        s->finish();
      } catch (const std::exception& ex) {
        errors[r] = ex.what();
      }
    });
  for (auto& t : ranks) t.join();
  for (const auto& err : errors)
    if (!err.empty()) throw std::runtime_error(err);
  if (!rx.wait_complete(job, &why)) throw std::runtime_error(why);
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  const double cpu = process_cpu_s() - cpu0;
  const double gb = rx.info(job).bytes / 1e9;
  rx.release(job);
  Result res;
  res.gbps = gb / s;
  res.cpu_s_per_gb = cpu / gb;
  res.put_ms = *std::max_element(put_ms.begin(), put_ms.end());
  return res;
}

int run(const Options& o) {
  const size_t row = static_cast<size_t>(o.kv_heads) * o.head_dim;
  const int64_t n = std::max<int64_t>(
      1, static_cast<int64_t>(o.mb * 1e6 / (2.0 * o.layers * row * 2)));  // bf16 K + V
  std::vector<std::vector<uint16_t>> k(o.layers), v(o.layers);
  uint64_t x = 0x9e3779b97f4a7c15ull;  // xorshift: random bits, cheap to make
  auto next = [&] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return static_cast<uint16_t>(x >> 48);
  };
  for (int l = 0; l < o.layers; ++l) {
    k[l].resize(n * row);
    v[l].resize(n * row);
    for (auto& e : k[l]) e = next();
    for (auto& e : v[l]) e = next();
  }
  ModelFingerprint f;
  f.name = "bench";
  f.n_layers = o.layers;
  f.n_heads = o.kv_heads;
  f.n_kv_heads = o.kv_heads;
  f.head_dim = o.head_dim;
  f.hidden = o.kv_heads * o.head_dim;
  f.vocab = 2;
  f.weights_digest = "bench";
  f.kv_dtype = DType::kBF16;
  std::unique_ptr<bench::ThrowawayCert> cert;  // deleted (files and dir) on every exit
  if (std::count(o.tls.begin(), o.tls.end(), 1) > 0)
    cert = std::make_unique<bench::ThrowawayCert>();
  std::printf(
      "# mprefill-bench handoff: tcp loopback, bf16, %d layers x %d KV heads x %d, %lld tokens "
      "(%.1f MB K+V), %d sender(s), staging %.1f MB, median of %d (+1 warm-up), %u hardware "
      "threads\n",
      o.layers, o.kv_heads, o.head_dim, static_cast<long long>(n),
      2.0 * o.layers * n * row * 2 / 1e6, o.senders, o.staging_mb, o.reps,
      std::thread::hardware_concurrency());
  bool probed = !cert;
  uint64_t job = 1;
  for (int P : o.page_tokens) {
    const v1::KvContract c = make_kv_contract(f, P);
    // The decoder's KV port per mode, kept across transfers as a running decoder's is.
    std::vector<std::unique_ptr<kv::KvReceiver>> rx;
    for (int tls : o.tls) {
      kv::ReceiverOptions ro;
      ro.contract = c;
      // Room for two jobs: release() frees a job's pages only once its streams' in-flight
      // puts drop the store, which may come after the next job's expect().
      ro.capacity_bytes = uint64_t{4} * o.layers * n * row * 2 + (uint64_t{64} << 20);
      ro.max_frame = std::max<size_t>(ro.max_frame, 2 * size_t(P) * row * 2 + 65536);
      if (tls) ro.tls_cert = cert->cert(), ro.tls_key = cert->key();
      rx.push_back(std::make_unique<kv::KvReceiver>(ro, nullptr));
      if (tls && !probed) {
        std::printf("# tls: %s (certificate verified against the throwaway CA)\n",
                    bench::probe_tls(rx.back()->port(), cert->cert(), 10000).c_str());
        probed = true;
      }
    }
    if (P == o.page_tokens.front()) {
      std::printf(
          "| page tokens | page KB (K+V) | streams/rank | TLS | GB/s (median) | min-max | CPU "
          "s/GB | last put ms |\n");
      std::printf("|---|---|---|---|---|---|---|---|\n");
    }
    for (int st : o.streams) {
      std::vector<std::vector<Result>> rs(o.tls.size());
      for (int rep = 0; rep <= o.reps; ++rep)  // rep 0 warms up; the order alternates
        for (size_t i = 0; i < o.tls.size(); ++i) {
          const size_t m = rep % 2 ? o.tls.size() - 1 - i : i;
          Result r = transfer(o, *rx[m], c, st, n, k, v, job++, cert ? cert->cert() : "");
          if (rep > 0) rs[m].push_back(r);
        }
      for (size_t m = 0; m < o.tls.size(); ++m) {
        std::sort(rs[m].begin(), rs[m].end(),
                  [](const Result& a, const Result& b) { return a.gbps < b.gbps; });
        const Result& med = rs[m][rs[m].size() / 2];
        std::printf("| %d | %.1f | %d | %s | %.3f | %.3f-%.3f | %.2f | %.1f |\n", P,
                    2.0 * P * row * 2 / 1024, st, o.tls[m] ? "tls" : "plain", med.gbps,
                    rs[m].front().gbps, rs[m].back().gbps, med.cpu_s_per_gb, med.put_ms);
      }
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace

int handoff_bench_main(int argc, char** argv) {
  Options o;
  // A bare --tls (last, or before another flag) means --tls 0,1.
  std::vector<std::string> args(argv + 2, argv + argc);  // past "mprefill-bench handoff"
  for (size_t i = 0; i < args.size(); ++i)
    if (args[i] == "--tls" && (i + 1 == args.size() || args[i + 1].rfind("-", 0) == 0))
      args[i] = "--tls=0,1";
  std::vector<char*> av;
  for (auto& a : args) av.push_back(a.data());
  try {
    cli::FlagReader r(static_cast<int>(av.size()), av.data());
    while (r.next()) {
      const std::string& flag = r.flag();
      if (flag == "--help" || flag == "-h") {
        std::fputs(kUsage, stdout);
        return 0;
      } else if (flag == "--mb") {
        o.mb = static_cast<double>(cli::parse_int(flag, r.value(), 1, 1 << 20));
      } else if (flag == "--page-tokens") {
        o.page_tokens = int_list(flag, r.value());
      } else if (flag == "--streams") {
        o.streams = int_list(flag, r.value());
        for (int s : o.streams)
          if (s > 64) throw cli::UsageError("--streams: at most 64 per rank");
      } else if (flag == "--senders") {
        o.senders = static_cast<int>(cli::parse_int(flag, r.value(), 1, 64));
      } else if (flag == "--layers") {
        o.layers = static_cast<int>(cli::parse_int(flag, r.value(), 1, 1024));
      } else if (flag == "--kv-heads") {
        o.kv_heads = static_cast<int>(cli::parse_int(flag, r.value(), 1, 1024));
      } else if (flag == "--head-dim") {
        o.head_dim = static_cast<int>(cli::parse_int(flag, r.value(), 1, 1024));
      } else if (flag == "--reps") {
        o.reps = static_cast<int>(cli::parse_int(flag, r.value(), 1, 100));
      } else if (flag == "--tls") {
        o.tls = int_list(flag, r.value(), 0);
        for (int t : o.tls)
          if (t > 1) throw cli::UsageError("--tls: 0 (plain) or 1 (TLS)");
      } else if (flag == "--staging-mb") {
        o.staging_mb = static_cast<double>(cli::parse_int(flag, r.value(), 1, 1024));
      } else {
        throw cli::UsageError("unknown option '" + r.arg() + "' (see --help)");
      }
    }
  } catch (const cli::UsageError& e) {
    std::fprintf(stderr, "mprefill-bench handoff: error: %s\n", e.what());
    return 2;
  }
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill-bench handoff: error: %s\n", e.what());
    return 1;
  }
}

}  // namespace mprefill
