// mprefill-bench: timing of the CUDA kernels as ../shared/BENCHMARKS.md specifies.
//
//   mprefill-bench attention [options]     attention microbenchmark (this file)
//   (issue 5 adds `prefill`)
//
// attention: batch 1, bf16, causal, token-major Q/K/V/O ([N][heads][d]), GQA without
// expanding K/V. Per shape: the own dense flash kernel is timed first (dense_ms of every
// case of that shape), then each sparse case. Work of a sparse case = its 64x64 mask
// tiles (vs_mask_tiles for vertical-slash; listed causal blocks for block-sparse; the
// merged key ranges for A-shape), FLOPs = 4 * 64 * 64 * d per tile per head. Dense FLOPs
// = 2 * 2 * N^2 * d * H / 2. Time = median of --repeat CUDA-event-timed launches after
// --warmup. Inputs (>= 2.4 GB at 128K) are far larger than the 50 MB L2, so buffers are
// not rotated. Before timing, every case's output is poisoned (NaN), computed once and a
// few rows of a few heads are checked against an fp64 host reference on the same bf16
// inputs ("check" in the JSON: max |out - ref| / max |ref| and pass/fail).
//
// Budgets of vertical-slash cases (one case = all heads of one launch):
//   --budget-class V,S[;V,S...]  one case per class, every head that class (each head its
//                                own random selection)
//   --mix llama3-8b|FILE.json    the classes of the Llama-3-8B config (473 x (1000,6096),
//                                278 x (30,800), 153 x (100,800), 89 x (3500,100),
//                                31 x (500,700)) or of any MInference file, one case per
//                                class with all heads of that class, plus a derived "mix"
//                                row: ms = sum_c w_c ms_c / sum_c w_c (time of H heads drawn
//                                from the mix), tiles likewise. 5 launches per shape
//                                instead of 32 layers; a full launch per class keeps the
//                                grid full, so per-head cost is what a layer pays.
//   --budgets FILE.json [--layers all|L,...]  the real heads of layers of the file, one
//                                launch per layer (first H heads of the layer), plus a
//                                derived "layers" row (sum over the layers run).
#include <cuda_runtime_api.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_budgets.h"
#include "bench/bench_common.cuh"
#include "kernels/attention.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/flash/flash.h"
#include "kernels/sparse.h"
#include "model/index_sets.h"
#if __has_include("kernels/cuda/sparse/sparse_attention.h") && !defined(MPREFILL_BENCH_NO_SPARSE)
#include "kernels/cuda/sparse/sparse_attention.h"
#define MPREFILL_BENCH_SPARSE 1
#else
#define MPREFILL_BENCH_SPARSE 0
#endif

namespace {

using namespace mprefill;

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "error: %s\n", msg.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, sep))
    if (!tok.empty()) out.push_back(tok);
  return out;
}

int to_int(const std::string& s, const char* what) {
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end) die(std::string("bad ") + what + " '" + s + "'");
  return static_cast<int>(v);
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o + "\"";
}

// Ordered JSON object writer (values already formatted).
struct Json {
  std::vector<std::pair<std::string, std::string>> kv;
  Json& s(const std::string& k, const std::string& v) { return raw(k, json_str(v)); }
  Json& i(const std::string& k, int64_t v) { return raw(k, std::to_string(v)); }
  Json& f(const std::string& k, double v, int prec = 4) {
    if (!std::isfinite(v)) return raw(k, "null");
    char b[64];
    std::snprintf(b, sizeof b, "%.*f", prec, v);
    return raw(k, b);
  }
  Json& b(const std::string& k, bool v) { return raw(k, v ? "true" : "false"); }
  Json& raw(const std::string& k, const std::string& v) {
    kv.emplace_back(k, v);
    return *this;
  }
  std::string str() const {
    std::string o = "{";
    for (size_t n = 0; n < kv.size(); ++n)
      o += (n ? ", " : "") + json_str(kv[n].first) + ": " + kv[n].second;
    return o + "}";
  }
};

// ------------------------------------------------------------------ options
struct Options {
  std::vector<int64_t> seqs = {32768};
  int heads = 0, kv_heads = 0;  // 0: BENCHMARKS.md defaults by N
  int head_dim = 128;
  std::vector<std::string> patterns = {"dense"};
  std::vector<std::string> index_sets = {"clustered"};
  std::vector<std::pair<int, int>> classes;  // --budget-class
  std::string mix;                           // --mix
  std::string budgets;                       // --budgets
  std::string layers = "all";                // --layers
  std::string dump, load;                    // --dump-indices, --load-indices
  int topk = 100;
  std::string bs_select = "estimate";  // estimate | random
  int n_init = 128, n_local = 4096;    // A-shape
  std::string sparse_kernel = "auto";  // auto | v1 | v2 | skel | skel-owner (SparseKernelGen)
  int warmup = 2, repeat = 10;
  int check_rows = 6;
  bool json = false;
  bool index_only = false;  // no GPU: build/dump indices, print tiles
  uint64_t seed = 1;
};

void usage() {
  std::printf(
      "usage: mprefill-bench attention [--seq N[,N...]] [--heads H] [--kv-heads K] "
      "[--head-dim 128]\n"
      "         [--pattern dense,vertical_slash,block_sparse,a_shape] [--index-set "
      "uniform,clustered]\n"
      "         [--budget-class V,S[;V,S]] [--mix llama3-8b|FILE.json] [--budgets FILE.json "
      "[--layers all|L,..]]\n"
      "         [--topk 100] [--bs-select estimate|random] [--a-shape N_INIT,N_LOCAL] "
      "[--sparse-kernel auto|v1|v2|skel|skel-owner]\n"
      "         [--dump-indices PREFIX|DIR/|FILE] [--load-indices FILE[,FILE]] [--warmup 2] "
      "[--repeat 10]\n"
      "         [--check-rows 6] [--seed 1] [--json] [--index-only]\n"
      "--index-only: no GPU; build (and dump) the vertical-slash indices and "
      "print their tiles.\n"
      "defaults: --seq 32768; heads/kv-heads 32/8 up to 128K, 4/1 up to 512K, 2/1 above; "
      "vertical_slash budgets --mix llama3-8b; --a-shape 128,4096; --topk 100.\n"
      "--sparse-kernel: sparse kernel generation of every sparse case (auto: v2 for "
      "vertical_slash and a_shape, v1 for block_sparse; skel: the attention skeleton; "
      "skel-owner: the skeleton with owner tiles).\n");
}

Options parse(int argc, char** argv, int first) {
  Options o;
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--seq") {
      o.seqs.clear();
      for (auto& t : split(next(), ',')) o.seqs.push_back(to_int(t, "--seq"));
    } else if (a == "--heads") {
      o.heads = to_int(next(), "--heads");
    } else if (a == "--kv-heads") {
      o.kv_heads = to_int(next(), "--kv-heads");
    } else if (a == "--head-dim" || a == "--dim") {
      o.head_dim = to_int(next(), "--head-dim");
    } else if (a == "--pattern") {
      o.patterns = split(next(), ',');
    } else if (a == "--index-set") {
      o.index_sets = split(next(), ',');
    } else if (a == "--budget-class") {
      for (auto& c : split(next(), ';')) {
        const auto vs = split(c, ',');
        if (vs.size() != 2) die("--budget-class wants V,S[;V,S...], got '" + c + "'");
        o.classes.emplace_back(to_int(vs[0], "vertical budget"), to_int(vs[1], "slash budget"));
      }
    } else if (a == "--mix") {
      o.mix = next();
    } else if (a == "--budgets") {
      o.budgets = next();
    } else if (a == "--layers") {
      o.layers = next();
    } else if (a == "--dump-indices") {
      o.dump = next();
    } else if (a == "--load-indices") {
      o.load = next();
    } else if (a == "--topk") {
      o.topk = to_int(next(), "--topk");
    } else if (a == "--bs-select") {
      o.bs_select = next();
    } else if (a == "--a-shape") {
      const auto v = split(next(), ',');
      if (v.size() != 2) die("--a-shape wants N_INIT,N_LOCAL");
      o.n_init = to_int(v[0], "n_init");
      o.n_local = to_int(v[1], "n_local");
    } else if (a == "--sparse-kernel") {
      o.sparse_kernel = next();
    } else if (a == "--warmup") {
      o.warmup = to_int(next(), "--warmup");
    } else if (a == "--repeat" || a == "--reps") {
      o.repeat = to_int(next(), "--repeat");
    } else if (a == "--check-rows") {
      o.check_rows = to_int(next(), "--check-rows");
    } else if (a == "--seed") {
      o.seed = static_cast<uint64_t>(to_int(next(), "--seed"));
    } else if (a == "--json") {
      o.json = true;
    } else if (a == "--index-only") {
      o.index_only = true;
    } else if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else {
      die("unknown argument " + a + " (try --help)");
    }
  }
  for (auto& p : o.patterns)
    if (p != "dense" && p != "vertical_slash" && p != "block_sparse" && p != "a_shape")
      die("unknown --pattern " + p);
  for (auto& s : o.index_sets)
    if (s != "uniform" && s != "clustered") die("unknown --index-set " + s);
  if (o.bs_select != "estimate" && o.bs_select != "random") die("unknown --bs-select");
  if (o.sparse_kernel != "auto" && o.sparse_kernel != "v1" && o.sparse_kernel != "v2" &&
      o.sparse_kernel != "skel" && o.sparse_kernel != "skel-owner")
    die("unknown --sparse-kernel " + o.sparse_kernel + " (auto, v1, v2, skel or skel-owner)");
  if (o.repeat < 1 || o.warmup < 0) die("--repeat >= 1 and --warmup >= 0 required");
  if (o.head_dim <= 0) die("bad --head-dim");
  return o;
}

// ------------------------------------------------------------------ cases
struct Case {
  std::string name;       // unique per shape, used for dump file names
  std::string pattern;    // dense | vertical_slash | block_sparse | a_shape
  std::string index_set;  // uniform | clustered | estimate | random | file | -
  std::string budget;     // "1000,6096", "layer 3", "file", ...
  std::string group;      // derived-row group ("" none)
  double weight = 0;      // weight in the group's derived row
  std::vector<VsSelection> vs;
  std::string load_path;   // index file of this case (loaded)
  std::string index_file;  // index file dumped / loaded
};

struct Result {
  std::string name, pattern, index_set, budget, group, index_file;
  int64_t tiles = 0;
  double ms = 0, ms_min = 0, ms_max = 0, weight = 0;
  double check_rel = -1;
  bool check_ok = true;
  std::string status = "ok";
};

struct Shape {
  int64_t n = 0;
  int heads = 0, kv_heads = 0, d = 0;
};

// Default heads by N (BENCHMARKS.md: all 32/8 heads up to 128K, 4 at 512K, 2 at 1M).
Shape shape_for(const Options& o, int64_t n, int file_heads) {
  Shape s;
  s.n = n;
  s.d = o.head_dim;
  s.heads = file_heads > 0 ? file_heads
            : o.heads > 0  ? o.heads
            : n <= 131072  ? 32
            : n <= 524288  ? 4
                           : 2;
  s.kv_heads = o.kv_heads > 0 ? o.kv_heads : std::max(1, s.heads / 4);
  if (s.heads % s.kv_heads) die("heads must be a multiple of kv-heads");
  return s;
}

int64_t causal_tiles(int64_t n) {
  const int64_t nb = num_blocks(n);
  return nb * (nb + 1) / 2;
}

// Parallel over heads: build each head's canonical index, then concatenate.
VsIndex build_vs_index(const std::vector<VsSelection>& heads, int64_t n) {
  const int H = static_cast<int>(heads.size());
  std::vector<VsIndex> part(H);
  std::atomic<int> next{0};
  const int nt =
      std::max(1, std::min<int>(H, static_cast<int>(std::thread::hardware_concurrency())));
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t)
    pool.emplace_back([&] {
      for (int h; (h = next++) < H;) part[h] = cpu::vs_build_index({heads[h]}, n);
    });
  for (auto& t : pool) t.join();
  VsIndex ix;
  ix.seq_len = n;
  ix.num_heads = H;
  ix.nblocks = num_blocks(n);
  ix.range_ptr.assign(1, 0);
  ix.col_ptr.assign(1, 0);
  for (int h = 0; h < H; ++h) {
    const int64_t r0 = static_cast<int64_t>(ix.range_lo.size()),
                  c0 = static_cast<int64_t>(ix.col.size());
    for (size_t b = 1; b < part[h].range_ptr.size(); ++b)
      ix.range_ptr.push_back(r0 + part[h].range_ptr[b]);
    for (size_t b = 1; b < part[h].col_ptr.size(); ++b)
      ix.col_ptr.push_back(c0 + part[h].col_ptr[b]);
    ix.range_lo.insert(ix.range_lo.end(), part[h].range_lo.begin(), part[h].range_lo.end());
    ix.range_hi.insert(ix.range_hi.end(), part[h].range_hi.begin(), part[h].range_hi.end());
    ix.col.insert(ix.col.end(), part[h].col.begin(), part[h].col.end());
    part[h] = VsIndex{};
  }
  return ix;
}

// Tiles of an A-shape head: per query block the key ranges [0, min(n_init, m1)) and
// [max(0, m0 - n_local + 1), m1), merged, in 64-column pieces.
int64_t ashape_tiles(int64_t n, int n_init, int n_local) {
  int64_t t = 0;
  for (int64_t b = 0; b < num_blocks(n); ++b) {
    const int64_t m0 = 64 * b, m1 = std::min<int64_t>(m0 + 64, n);
    const int64_t a_hi = std::min<int64_t>(n_init, m1),
                  l_lo = std::max<int64_t>(0, m0 - n_local + 1);
    if (a_hi >= l_lo)
      t += (m1 + 63) / 64;
    else
      t += (a_hi + 63) / 64 + (m1 - l_lo + 63) / 64;
  }
  return t;
}

int64_t bs_tiles(const BlockSparseIndex& ix, int h) {
  int64_t t = 0;
  const int* p = ix.blocks.data() + static_cast<size_t>(h) * ix.nblocks * ix.k;
  for (int64_t i = 0; i < ix.nblocks * ix.k; ++i) t += p[i] >= 0;
  return t;
}

// ------------------------------------------------------------------ device buffers
struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  void alloc(size_t b) {
    free();
    bytes = b;
    if (b) BENCH_CUDA(cudaMalloc(&p, b));
  }
  template <class T>
  void upload(const std::vector<T>& v) {
    alloc(std::max<size_t>(v.size() * sizeof(T), sizeof(T)));
    if (!v.empty())
      BENCH_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  void free() {
    if (p) cudaFree(p);
    p = nullptr;
    bytes = 0;
  }
  ~DevBuf() { free(); }
};

struct Timing {
  double median = 0, min = 0, max = 0;
};

Timing time_it(const std::function<Status()>& launch, int warmup, int repeat, const char* what) {
  cudaEvent_t e0, e1;
  BENCH_CUDA(cudaEventCreate(&e0));
  BENCH_CUDA(cudaEventCreate(&e1));
  std::vector<float> t;
  for (int r = 0; r < warmup + repeat; ++r) {
    BENCH_CUDA(cudaEventRecord(e0));
    MPREFILL_EDGE_CHECK(launch(), what, cuda::last_error());
    BENCH_CUDA(cudaEventRecord(e1));
    BENCH_CUDA(cudaEventSynchronize(e1));
    BENCH_CUDA(cudaGetLastError());
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= warmup) t.push_back(ms);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front(), t.back()};
}

// Key sets of one (head, row) for the host reference: a list of [lo, hi) ranges.
using Ranges = std::vector<std::pair<int64_t, int64_t>>;

// fp64 reference of a few rows / heads against the device output. Returns
// max|out - ref| / max|ref| over the rows checked; sets *ok (finite and within tolerance:
// 2e-2 relative, several times the bf16 rounding of P and O).
double check_rows(const Shape& s, const AttentionParams& p, const std::vector<uint16_t>& hk,
                  const std::vector<uint16_t>& hv, int rows,
                  const std::function<Ranges(int h, int64_t r)>& keys, uint64_t seed, bool* ok) {
  *ok = true;
  if (rows <= 0) return -1;
  std::mt19937_64 g(seed);
  std::vector<int> hs = {0, s.heads - 1, s.heads / 2};
  std::vector<int64_t> rs = {0, s.n - 1, std::min<int64_t>(s.n - 1, 64 * 5 + 17)};
  std::uniform_int_distribution<int64_t> any(0, s.n - 1);
  while (static_cast<int>(rs.size()) < rows) rs.push_back(any(g));
  rs.resize(rows);
  const int d = s.d, group = s.heads / s.kv_heads;
  double max_err = 0, max_ref = 0;
  std::vector<uint16_t> q(d), o(d);
  std::vector<double> acc(d);
  for (int h : hs) {
    const int kvh = h / group;
    for (int64_t r : rs) {
      const size_t off = (static_cast<size_t>(r) * s.heads + h) * d;
      BENCH_CUDA(cudaMemcpy(q.data(), static_cast<const uint16_t*>(p.q) + off, d * 2,
                            cudaMemcpyDeviceToHost));
      BENCH_CUDA(cudaMemcpy(o.data(), static_cast<const uint16_t*>(p.o) + off, d * 2,
                            cudaMemcpyDeviceToHost));
      std::vector<double> qf(d);
      for (int i = 0; i < d; ++i) qf[i] = bf16_to_f32(q[i]);
      double mx = -INFINITY, sum = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      std::vector<std::pair<int64_t, double>> sc;
      for (auto [lo, hi] : keys(h, r)) {
        for (int64_t c = lo; c < hi; ++c) {
          const uint16_t* kr = hk.data() + (static_cast<size_t>(c) * s.kv_heads + kvh) * d;
          double x = 0;
          for (int i = 0; i < d; ++i) x += qf[i] * bf16_to_f32(kr[i]);
          x *= p.scale;
          sc.emplace_back(c, x);
          mx = std::max(mx, x);
        }
      }
      for (auto [c, x] : sc) {
        const double e = std::exp(x - mx);
        sum += e;
        const uint16_t* vr = hv.data() + (static_cast<size_t>(c) * s.kv_heads + kvh) * d;
        for (int i = 0; i < d; ++i) acc[i] += e * bf16_to_f32(vr[i]);
      }
      for (int i = 0; i < d; ++i) {
        const double ref = sc.empty() ? 0.0 : acc[i] / sum;
        const double out = bf16_to_f32(o[i]);
        if (!std::isfinite(out)) *ok = false;
        max_err = std::max(max_err, std::fabs(out - ref));
        max_ref = std::max(max_ref, std::fabs(ref));
      }
    }
  }
  const double rel = max_err / std::max(max_ref, 1e-30);
  if (!(rel <= 2e-2)) *ok = false;
  return rel;
}

bool is_dir(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// --dump-indices: "{case}" is replaced by the case name; a directory (or a value ending
// in '/') gets DIR/<case>.mpix; otherwise the value is the file (one index case only).
std::string dump_path(const std::string& spec, const std::string& name, int n_index_cases) {
  if (spec.empty()) return "";
  const auto at = spec.find("{case}");
  if (at != std::string::npos) return spec.substr(0, at) + name + spec.substr(at + 6);
  if (spec.back() == '/' || is_dir(spec)) {
    mkdir(spec.c_str(), 0755);
    return spec + (spec.back() == '/' ? "" : "/") + name + ".mpix";
  }
  if (n_index_cases > 1)
    die("--dump-indices " + spec + ": several index cases; give a directory or a name with {case}");
  return spec;
}

struct MixClass {
  int v, s;
  double count;
};

std::vector<MixClass> mix_classes(const std::string& spec) {
  if (spec == "llama3-8b")
    return {{1000, 6096, 473}, {30, 800, 278}, {100, 800, 153}, {3500, 100, 89}, {500, 700, 31}};
  const bench::BudgetFile bf = bench::read_budget_file(spec);
  std::vector<MixClass> out;
  for (const bench::BudgetClass& c : bf.classes) {
    if (c.pattern.kind == "vertical_slash")
      out.push_back({c.pattern.a, c.pattern.b, static_cast<double>(c.count)});
    else
      std::fprintf(stderr, "# --mix %s: %d heads of kind %s not in the vertical-slash mix\n",
                   spec.c_str(), c.count, c.pattern.kind.c_str());
  }
  if (out.empty()) die("--mix " + spec + ": no vertical_and_slash heads");
  return out;
}

uint64_t head_seed(uint64_t base, int64_t n, int v, int s, int h, const std::string& set) {
  uint64_t z = base * 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(n) << 20) ^
               (static_cast<uint64_t>(v) << 40) ^ (static_cast<uint64_t>(s) << 8) ^ h;
  if (set == "uniform") z ^= 0x5555AAAA5555ull;
  z = (z ^ (z >> 31)) * 0xBF58476D1CE4E5B9ull;
  return z ^ (z >> 29);
}

// ------------------------------------------------------------------ one shape
void run_shape(const Options& o, const Shape& s, std::vector<Case> cases, const std::string& card,
               std::vector<std::string>* table) {
  const int64_t n = s.n;
  if (o.index_only) {
    int n_index_cases = 0;
    for (auto& c : cases) n_index_cases += c.pattern == "vertical_slash";
    const int64_t ct = causal_tiles(n) * s.heads;
    for (Case& c : cases) {
      if (c.pattern != "vertical_slash") continue;
      if (!c.load_path.empty()) {
        int64_t n_file = 0;
        c.vs = load_vs_indices(c.load_path, &n_file);
        c.index_file = c.load_path;
      }
      const VsIndex vix = build_vs_index(c.vs, n);
      int64_t tiles = 0;
      for (int h = 0; h < s.heads; ++h) tiles += vs_mask_tiles(vix, h);
      if (c.load_path.empty() && !o.dump.empty()) {
        c.index_file = dump_path(o.dump, c.name + "_n" + std::to_string(n), n_index_cases);
        save_vs_indices(c.index_file, n, c.vs);
      }
      Json j;
      j.s("name", c.name).s("pattern", c.pattern).s("index_set", c.index_set).s("budget", c.budget);
      j.i("seq", n)
          .i("heads", s.heads)
          .i("tiles", tiles)
          .i("causal_tiles", ct)
          .f("density", double(tiles) / ct, 4);
      j.i("ranges", static_cast<int64_t>(vix.range_lo.size()))
          .i("gathered_cols", static_cast<int64_t>(vix.col.size()));
      if (!c.group.empty()) j.s("group", c.group).f("weight", c.weight, 1);
      if (!c.index_file.empty()) j.s("index_file", c.index_file);
      j.s("status", "index only");
      std::printf("%s\n", j.str().c_str());
      char line[300];
      std::snprintf(line, sizeof line, "%-8lld %-3d %-40s %-10s %7.3f", static_cast<long long>(n),
                    s.heads, c.name.c_str(), c.index_set.c_str(), double(tiles) / ct);
      table->push_back(line);
    }
    return;
  }
  const size_t q_elems = static_cast<size_t>(n) * s.heads * s.d;
  const size_t kv_elems = static_cast<size_t>(n) * s.kv_heads * s.d;
  DevBuf q, k, v, out, lse;
  q.alloc(q_elems * 2);
  k.alloc(kv_elems * 2);
  v.alloc(kv_elems * 2);
  out.alloc(q_elems * 2);
  lse.alloc(static_cast<size_t>(s.heads) * n * 4);
  mprefill::bench::fill_random<<<2048, 256>>>(static_cast<uint16_t*>(q.p), q_elems, o.seed * 3 + 1);
  mprefill::bench::fill_random<<<2048, 256>>>(static_cast<uint16_t*>(k.p), kv_elems,
                                              o.seed * 3 + 2);
  mprefill::bench::fill_random<<<2048, 256>>>(static_cast<uint16_t*>(v.p), kv_elems,
                                              o.seed * 3 + 3);
  BENCH_CUDA(cudaGetLastError());
  BENCH_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> hk(kv_elems), hv(kv_elems);
  BENCH_CUDA(cudaMemcpy(hk.data(), k.p, kv_elems * 2, cudaMemcpyDeviceToHost));
  BENCH_CUDA(cudaMemcpy(hv.data(), v.p, kv_elems * 2, cudaMemcpyDeviceToHost));

  AttentionParams p;
  p.q = q.p;
  p.k = k.p;
  p.v = v.p;
  p.o = out.p;
  p.lse = static_cast<float*>(lse.p);
  p.n_q = p.n_k = static_cast<int>(n);
  p.num_heads = s.heads;
  p.num_kv_heads = s.kv_heads;
  p.head_dim = s.d;
  set_packed_strides(p);
  p.causal = true;
  p.scale = 1.f / std::sqrt(static_cast<float>(s.d));
  p.dtype = DType::kBF16;

  const double tile_flops = 4.0 * 64 * 64 * s.d;
  const int64_t ctiles = causal_tiles(n) * s.heads;
  const std::string date = utc_now();
  auto poison = [&] { BENCH_CUDA(cudaMemset(out.p, 0xFF, q_elems * 2)); };

  // Dense (own flash kernel): the baseline of every case of this shape.
  poison();
  {
    BENCH_OK(cuda::flash_attention_fwd(p, nullptr));
    BENCH_CUDA(cudaDeviceSynchronize());
  }
  bool dense_ok = true;
  const double dense_rel = check_rows(
      s, p, hk, hv, o.check_rows,
      [](int, int64_t r) {
        return Ranges{{0, r + 1}};
      },
      o.seed, &dense_ok);
  const Timing dt =
      time_it([&] { return cuda::flash_attention_fwd(p, nullptr); }, o.warmup, o.repeat, "dense");
  const double dense_flops = 2.0 * 2.0 * double(n) * double(n) * s.d * s.heads / 2.0;
  auto emit = [&](const Result& r, double flops, bool derived) {
    const double tf = flops / (r.ms * 1e-3) / 1e12;
    const double dense_tf_tiles = tile_flops * ctiles / (dt.median * 1e-3) / 1e12;
    Json j;
    j.s("name", r.name).s("card", card).s("date", date).s("pattern", r.pattern);
    j.s("index_set", r.index_set).s("budget", r.budget);
    j.raw("shape", Json()
                       .i("seq", n)
                       .i("heads", s.heads)
                       .i("kv_heads", s.kv_heads)
                       .i("head_dim", s.d)
                       .s("dtype", "bf16")
                       .b("causal", true)
                       .str());
    j.i("tiles", r.tiles).i("causal_tiles", ctiles).f("density", double(r.tiles) / ctiles, 4);
    j.f("ms", r.ms).f("ms_min", r.ms_min).f("ms_max", r.ms_max).i("reps", o.repeat);
    j.f("tflops", tf, 1);
    j.f("dense_ms", dt.median).f("dense_tflops", dense_flops / (dt.median * 1e-3) / 1e12, 1);
    j.f("dense_tflops_tiles", dense_tf_tiles, 1);
    j.f("speedup_vs_dense", dt.median / r.ms, 3);
    j.f("tflops_ratio_vs_dense_tiles", tf / dense_tf_tiles, 3);
    if (r.check_rel >= 0) j.f("check_rel_err", r.check_rel, 5).b("check_ok", r.check_ok);
    if (!r.group.empty()) j.s("group", r.group).f("weight", r.weight, 1);
    if (derived) j.b("derived", true);
    if (!r.index_file.empty()) j.s("index_file", r.index_file);
    j.s("status", r.status);
    if (o.json) std::printf("%s\n", j.str().c_str());
    std::fflush(stdout);
    char line[400];
    std::snprintf(line, sizeof line, "%-8lld %-3d %-40s %-10s %7.3f %10.3f %7.1f %9.3f %7.3f %s",
                  static_cast<long long>(n), s.heads, r.name.c_str(), r.index_set.c_str(),
                  double(r.tiles) / ctiles, r.ms, tf, dt.median / r.ms, tf / dense_tf_tiles,
                  r.check_rel < 0 ? "-"
                  : r.check_ok    ? "ok"
                                  : "FAIL");
    table->push_back(line);
  };
  {
    Result r;
    r.name = "dense";
    r.pattern = "dense";
    r.index_set = "-";
    r.budget = "-";
    r.tiles = ctiles;
    r.ms = dt.median;
    r.ms_min = dt.min;
    r.ms_max = dt.max;
    r.check_rel = dense_rel;
    r.check_ok = dense_ok;
    emit(r, dense_flops, false);
  }

  int n_index_cases = 0;
  for (auto& c : cases)
    n_index_cases += c.pattern == "vertical_slash" || c.pattern == "block_sparse";
  std::map<std::string, std::vector<Result>> groups;
#if MPREFILL_BENCH_SPARSE
  const cuda::SparseKernelGen gen = o.sparse_kernel == "v1"     ? cuda::SparseKernelGen::kV1
                                    : o.sparse_kernel == "v2"   ? cuda::SparseKernelGen::kV2
                                    : o.sparse_kernel == "skel" ? cuda::SparseKernelGen::kSkel
                                    : o.sparse_kernel == "skel-owner"
                                        ? cuda::SparseKernelGen::kSkelOwner
                                        : cuda::SparseKernelGen::kAuto;
#endif
  for (Case& c : cases) {
    if (c.pattern == "dense") continue;
    Result r;
    r.name = c.name;
    r.pattern = c.pattern;
    r.index_set = c.index_set;
    r.budget = c.budget;
    r.group = c.group;
    r.weight = c.weight;
    std::function<Status()> launch;
    std::function<Ranges(int, int64_t)> keys;
    DevBuf d_rp, d_lo, d_hi, d_cp, d_col, d_bs;
    VsIndex vix;
    BlockSparseIndex bix;
    if (c.pattern == "vertical_slash") {
      if (!c.load_path.empty()) {
        int64_t n_file = 0;
        c.vs = load_vs_indices(c.load_path, &n_file);
        c.index_file = c.load_path;
      }
      if (static_cast<int>(c.vs.size()) != s.heads) die(c.name + ": index heads != heads");
      vix = build_vs_index(c.vs, n);
      for (int h = 0; h < s.heads; ++h) r.tiles += vs_mask_tiles(vix, h);
      if (c.load_path.empty() && !o.dump.empty()) {
        c.index_file = dump_path(o.dump, c.name + "_n" + std::to_string(n), n_index_cases);
        save_vs_indices(c.index_file, n, c.vs);
      }
      d_rp.upload(vix.range_ptr);
      d_lo.upload(vix.range_lo);
      d_hi.upload(vix.range_hi);
      d_cp.upload(vix.col_ptr);
      d_col.upload(vix.col);
      keys = [&vix](int h, int64_t row) {
        Ranges rg;
        const int64_t hb = h * vix.nblocks + row / 64;
        for (int64_t t = vix.range_ptr[hb]; t < vix.range_ptr[hb + 1]; ++t)
          if (vix.range_lo[t] <= row)
            rg.emplace_back(vix.range_lo[t], std::min<int64_t>(vix.range_hi[t], row + 1));
        for (int64_t t = vix.col_ptr[hb]; t < vix.col_ptr[hb + 1]; ++t)
          if (vix.col[t] <= row) rg.emplace_back(vix.col[t], vix.col[t] + 1);
        return rg;
      };
#if MPREFILL_BENCH_SPARSE
      VsIndexView view;
      view.seq_len = n;
      view.nblocks = vix.nblocks;
      view.range_ptr = static_cast<const int64_t*>(d_rp.p);
      view.range_lo = static_cast<const int*>(d_lo.p);
      view.range_hi = static_cast<const int*>(d_hi.p);
      view.col_ptr = static_cast<const int64_t*>(d_cp.p);
      view.col = static_cast<const int*>(d_col.p);
      launch = [&p, view, gen] { return cuda::vs_attention_fwd(p, view, 0, nullptr, gen); };
#endif
    } else if (c.pattern == "block_sparse") {
      if (!c.load_path.empty()) {
        bix = load_block_sparse_indices(c.load_path);
        c.index_file = c.load_path;
      } else if (c.index_set == "estimate") {
        // Pooled estimate on the same random inputs (host fp32 copies of Q and K).
        std::vector<uint16_t> hq(q_elems);
        BENCH_CUDA(cudaMemcpy(hq.data(), q.p, q_elems * 2, cudaMemcpyDeviceToHost));
        std::vector<float> fq(q_elems), fk(kv_elems);
        for (size_t i = 0; i < q_elems; ++i) fq[i] = bf16_to_f32(hq[i]);
        for (size_t i = 0; i < kv_elems; ++i) fk[i] = bf16_to_f32(hk[i]);
        hq = {};
        cpu::BlockSparseEstimateParams ep;
        ep.q = fq.data();
        ep.k = fk.data();
        ep.q_row_stride = int64_t(s.heads) * s.d;
        ep.q_head_stride = s.d;
        ep.k_row_stride = int64_t(s.kv_heads) * s.d;
        ep.k_head_stride = s.d;
        ep.seq_len = n;
        ep.num_heads = s.heads;
        ep.num_kv_heads = s.kv_heads;
        ep.head_dim = s.d;
        ep.scale = p.scale;
        ep.dtype = DType::kF32;
        std::vector<int> topk(s.heads, o.topk);
        MPREFILL_EDGE_CHECK(cpu::block_sparse_estimate(ep, topk.data(), &bix),
                            "block_sparse_estimate", "");
      } else {  // random: diagonal + uniform distinct earlier blocks
        bix.seq_len = n;
        bix.num_heads = s.heads;
        bix.nblocks = num_blocks(n);
        bix.k = o.topk;
        bix.blocks.assign(static_cast<size_t>(s.heads) * bix.nblocks * bix.k, -1);
        std::mt19937_64 g(o.seed * 77 + n);
        for (int h = 0; h < s.heads; ++h)
          for (int64_t b = 0; b < bix.nblocks; ++b) {
            std::vector<int> pick;
            if (b + 1 <= o.topk) {
              for (int j = 0; j <= b; ++j) pick.push_back(j);
            } else {
              std::vector<char> used(b, 0);
              pick.push_back(static_cast<int>(b));
              std::uniform_int_distribution<int64_t> any(0, b - 1);
              while (static_cast<int>(pick.size()) < o.topk) {
                const int64_t j = any(g);
                if (!used[j]) used[j] = 1, pick.push_back(static_cast<int>(j));
              }
            }
            std::sort(pick.begin(), pick.end());
            std::copy(pick.begin(), pick.end(), bix.blocks.begin() + (h * bix.nblocks + b) * bix.k);
          }
      }
      if (bix.seq_len != n || bix.num_heads != s.heads)
        die(c.name + ": block-sparse index shape mismatch");
      for (int h = 0; h < s.heads; ++h) r.tiles += bs_tiles(bix, h);
      if (c.load_path.empty() && !o.dump.empty()) {
        c.index_file = dump_path(o.dump, c.name + "_n" + std::to_string(n), n_index_cases);
        save_block_sparse_indices(c.index_file, bix);
      }
      d_bs.upload(bix.blocks);
      keys = [&bix](int h, int64_t row) {
        Ranges rg;
        const int* bl = bix.blocks.data() + (h * bix.nblocks + row / 64) * bix.k;
        for (int t = 0; t < bix.k; ++t)
          if (bl[t] >= 0 && 64LL * bl[t] <= row)
            rg.emplace_back(64LL * bl[t], std::min<int64_t>(64LL * bl[t] + 64, row + 1));
        return rg;
      };
#if MPREFILL_BENCH_SPARSE
      BlockSparseView view;
      view.seq_len = n;
      view.nblocks = bix.nblocks;
      view.k = bix.k;
      view.blocks = static_cast<const int*>(d_bs.p);
      launch = [&p, view, gen] {
        return cuda::block_sparse_attention_fwd(p, view, 0, nullptr, gen);
      };
#endif
    } else if (c.pattern == "a_shape") {
      r.tiles = ashape_tiles(n, o.n_init, o.n_local) * s.heads;
      const int ni = o.n_init, nl = o.n_local;
      keys = [ni, nl](int, int64_t row) {
        Ranges rg;
        const int64_t a_hi = std::min<int64_t>(ni, row + 1),
                      l_lo = std::max<int64_t>(0, row - nl + 1);
        if (a_hi >= l_lo) {
          rg.emplace_back(0, row + 1);
        } else {
          rg.emplace_back(0, a_hi);
          rg.emplace_back(l_lo, row + 1);
        }
        return rg;
      };
#if MPREFILL_BENCH_SPARSE
      launch = [&p, ni, nl, gen] { return cuda::ashape_attention_fwd(p, ni, nl, nullptr, gen); };
#endif
    }
    if (!launch) {
      r.status = "sparse kernels not built";
      std::fprintf(
          stderr,
          "# %s n=%lld: sparse kernels not built (no kernels/cuda/sparse/sparse_attention.h)\n",
          c.name.c_str(), static_cast<long long>(n));
      Json j;
      j.s("name", r.name)
          .s("card", card)
          .s("date", date)
          .s("pattern", r.pattern)
          .s("index_set", r.index_set);
      j.s("budget", r.budget)
          .i("seq", n)
          .i("heads", s.heads)
          .i("tiles", r.tiles)
          .i("causal_tiles", ctiles);
      j.f("density", double(r.tiles) / ctiles, 4);
      if (!c.index_file.empty()) j.s("index_file", c.index_file);
      j.s("status", r.status);
      if (o.json) std::printf("%s\n", j.str().c_str());
      char line[300];
      std::snprintf(line, sizeof line, "%-8lld %-3d %-40s %-10s %7.3f   (sparse kernels not built)",
                    static_cast<long long>(n), s.heads, r.name.c_str(), r.index_set.c_str(),
                    double(r.tiles) / ctiles);
      table->push_back(line);
      continue;
    }
    r.index_file = c.index_file;
    poison();
    {
      MPREFILL_EDGE_CHECK(launch(), c.name, cuda::last_error());
      BENCH_CUDA(cudaDeviceSynchronize());
    }
    r.check_rel = check_rows(s, p, hk, hv, o.check_rows, keys, o.seed + 17, &r.check_ok);
    const Timing t = time_it(launch, o.warmup, o.repeat, c.name.c_str());
    r.ms = t.median;
    r.ms_min = t.min;
    r.ms_max = t.max;
    if (!r.check_ok) r.status = "check failed";
    emit(r, tile_flops * r.tiles, false);
    if (!r.group.empty()) groups[r.group].push_back(r);
  }
  // Derived rows: weighted mean (mix) or sum (layers) over a group's cases.
  for (auto& [g, rs] : groups) {
    const bool is_layers = g.rfind("layers", 0) == 0;
    Result m;
    m.name = g;
    m.pattern = rs[0].pattern;
    m.index_set = rs[0].index_set;
    m.budget = is_layers ? "sum of layers" : "weighted mix";
    double w = 0, ms = 0, ms_min = 0, ms_max = 0, tiles = 0;
    bool ok = true;
    double rel = 0;
    for (auto& r : rs) {
      const double wr = is_layers ? 1.0 : r.weight;
      w += wr;
      ms += wr * r.ms;
      ms_min += wr * r.ms_min;
      ms_max += wr * r.ms_max;
      tiles += wr * r.tiles;
      ok = ok && r.check_ok;
      rel = std::max(rel, r.check_rel);
    }
    const double div = is_layers ? 1.0 : w;
    m.ms = ms / div;
    m.ms_min = ms_min / div;
    m.ms_max = ms_max / div;
    m.tiles = static_cast<int64_t>(std::llround(tiles / div));
    m.check_rel = rel;
    m.check_ok = ok;
    m.weight = w;
    // The layers row is compared with one dense launch per layer.
    if (is_layers) {
      Result scaled = m;
      const double L = static_cast<double>(rs.size());
      scaled.ms = m.ms / L;
      scaled.ms_min = m.ms_min / L;
      scaled.ms_max = m.ms_max / L;
      scaled.tiles = static_cast<int64_t>(std::llround(tiles / L));
      scaled.name = g + "_per_layer";
      emit(scaled, tile_flops * scaled.tiles, true);
    } else {
      emit(m, tile_flops * m.tiles, true);
    }
  }
}

int cmd_attention(int argc, char** argv) {
  const Options o = parse(argc, argv, 2);
  cudaDeviceProp prop{};
  std::string card = "none";
  if (!o.index_only) {
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess)
      die("no CUDA device (--index-only runs without one)");
    card = prop.name;
  }
  if (!o.index_only && !cuda::flash_attention_supported(DType::kBF16, o.head_dim))
    die("flash_attention_fwd does not support bf16 head_dim " + std::to_string(o.head_dim) +
        " in this build");
#if !MPREFILL_BENCH_SPARSE
  for (auto& pt : o.patterns)
    if (pt != "dense")
      std::fprintf(stderr, "# sparse kernels not built: %s cases report tiles only\n", pt.c_str());
#endif
  std::vector<std::string> table;
  auto has = [&](const char* pt) {
    return std::find(o.patterns.begin(), o.patterns.end(), pt) != o.patterns.end();
  };

  if (!o.load.empty()) {  // shapes come from the files
    for (const std::string& path : split(o.load, ',')) {
      FILE* f = std::fopen(path.c_str(), "rb");
      if (!f) die("--load-indices " + path + ": cannot open");
      int32_t hdr[6] = {};
      const size_t got = std::fread(hdr, 4, 6, f);
      std::fclose(f);
      if (got != 6 || hdr[0] != 0x5849504D) die("--load-indices " + path + ": not an MPIX file");
      const Shape s = shape_for(o, hdr[3], hdr[4]);
      Case c;
      c.pattern = hdr[2] == 1 ? "vertical_slash" : "block_sparse";
      std::string base = path.substr(path.find_last_of('/') + 1);
      if (base.size() > 5 && base.substr(base.size() - 5) == ".mpix") base.resize(base.size() - 5);
      c.name = base;
      c.index_set = "file";
      c.budget = "file";
      c.load_path = path;
      run_shape(o, s, {c}, card, &table);
    }
  } else {
    for (int64_t n : o.seqs) {
      const Shape s = shape_for(o, n, 0);
      std::vector<Case> cases;
      if (has("vertical_slash")) {
        for (const std::string& set : o.index_sets) {
          const IndexSetKind kind = parse_index_set_kind(set);
          auto add_class = [&](int vb, int sb, const std::string& group, double w) {
            Case c;
            c.pattern = "vertical_slash";
            c.index_set = set;
            c.budget = std::to_string(vb) + "," + std::to_string(sb);
            c.name = "vs_" + set + "_v" + std::to_string(vb) + "_s" + std::to_string(sb);
            c.group = group;
            c.weight = w;
            for (int h = 0; h < s.heads; ++h)
              c.vs.push_back(synthetic_vs(kind, n, vb, sb, head_seed(o.seed, n, vb, sb, h, set)));
            cases.push_back(std::move(c));
          };
          for (auto [vb, sb] : o.classes) add_class(vb, sb, "", 0);
          const std::string mix =
              (o.classes.empty() && o.budgets.empty() && o.mix.empty()) ? "llama3-8b" : o.mix;
          if (!mix.empty()) {
            std::string tag = mix.substr(mix.find_last_of('/') + 1);
            if (tag.size() > 5 && tag.substr(tag.size() - 5) == ".json") tag.resize(tag.size() - 5);
            for (const MixClass& mc : mix_classes(mix))
              add_class(mc.v, mc.s, "vs_" + set + "_mix_" + tag, mc.count);
          }
          if (!o.budgets.empty()) {
            const bench::BudgetFile bf = bench::read_budget_file(o.budgets);
            std::vector<int> layers;
            if (o.layers == "all") {
              for (int l = 0; l < bf.n_layers; ++l) layers.push_back(l);
            } else {
              for (auto& t : split(o.layers, ',')) layers.push_back(to_int(t, "--layers"));
            }
            if (s.heads > bf.n_heads)
              die("--budgets " + o.budgets + ": file has " + std::to_string(bf.n_heads) +
                  " heads per layer");
            for (int l : layers) {
              if (l < 0 || l >= bf.n_layers) die("--layers: no layer " + std::to_string(l));
              Case c;
              c.pattern = "vertical_slash";
              c.index_set = set;
              c.budget = "layer " + std::to_string(l);
              c.name = "vs_" + set + "_layer" + std::to_string(l);
              c.group = "vs_" + set + "_layers";
              c.weight = 1;
              for (int h = 0; h < s.heads; ++h) {
                const bench::BudgetHead& hp = bf.heads[static_cast<size_t>(l) * bf.n_heads + h];
                if (hp.kind != "vertical_slash")
                  die("--budgets: layer " + std::to_string(l) + " head " + std::to_string(h) +
                      " is " + hp.kind + ", not vertical-slash");
                c.vs.push_back(synthetic_vs(kind, n, hp.a, hp.b,
                                            head_seed(o.seed, n, hp.a, hp.b, 1000 * l + h, set)));
              }
              cases.push_back(std::move(c));
            }
          }
        }
      }
      if (has("block_sparse")) {
        Case c;
        c.pattern = "block_sparse";
        c.index_set = o.bs_select;
        c.budget = "top" + std::to_string(o.topk);
        c.name = "bs_" + o.bs_select + "_top" + std::to_string(o.topk);
        cases.push_back(c);
      }
      if (has("a_shape")) {
        Case c;
        c.pattern = "a_shape";
        c.index_set = "-";
        c.budget = std::to_string(o.n_init) + "," + std::to_string(o.n_local);
        c.name = "ashape_" + std::to_string(o.n_init) + "_" + std::to_string(o.n_local);
        cases.push_back(c);
      }
      run_shape(o, s, std::move(cases), card, &table);
    }
  }
  std::printf("# card: %s\n", card.c_str());
  std::printf("# %-8s %-3s %-40s %-10s %7s %10s %7s %9s %7s %s\n", "seq", "H", "case", "set",
              "density", "ms", "TF/s", "dense/ms", "TF/TFd", "check");
  for (const auto& l : table) std::printf("# %s\n", l.c_str());
  return 0;
}

}  // namespace

namespace mprefill {
int handoff_bench_main(int argc, char** argv);
}

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    usage();
    return argc < 2 ? 1 : 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "attention") return cmd_attention(argc, argv);
    if (cmd == "prefill") {
      int prefill_bench_main(int, char**);
      return prefill_bench_main(argc, argv);
    }
#ifdef MPREFILL_HANDOFF_BENCH
    if (cmd == "handoff") return mprefill::handoff_bench_main(argc, argv);  // handoff_bench.cc
#endif
  } catch (const std::exception& e) {
    die(e.what());
  }
  std::fprintf(stderr, "error: unknown subcommand '%s' (attention)\n", cmd.c_str());
  return 1;
}
