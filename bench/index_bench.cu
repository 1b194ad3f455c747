// Timing of GPU vertical-slash estimation + index build (kernels/cuda/index), target K4:
// <= 0.5 ms per head at 1M.
//
//   mprefill-index-bench [--seq 1048576] [--dim 128] [--reps 10] [--warmup 2]
//
// Cases: (heads, kv heads) in {(1, 1), (8, 2)} x budgets (v, s) in {(1000, 6096),
// (3500, 100)}. Random bf16 Q/K (never zeros); stages timed with CUDA events on one
// stream, median over reps: row stats (pass 1), scores (pass 2, including zeroing the
// score arrays), select (top-k), index count (+ the device-to-host read of the totals
// that sizes the value arrays: a real synchronisation), index fill. Also the index build
// alone for host-made `clustered` selections (../shared/BENCHMARKS.md). One JSON object
// per case on stdout, then a table.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "bench/bench_common.cuh"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/index/index.h"

namespace {

namespace gi = mprefill::cuda::index;
using mprefill::DType;
using mprefill::Status;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct Row {
  std::string what;
  int H;
  int v, s;
  double stats, scores, select, count, fill, total, per_head;
  int64_t ranges, cols;
};

void* dalloc(size_t bytes) {
  void* p = nullptr;
  BENCH_CUDA(cudaMalloc(&p, std::max<size_t>(bytes, 256)));
  return p;
}

// Index build (count, totals, fill) of `sel`; returns ms per stage via the events.
struct Build {
  void *ws = nullptr, *rp = nullptr, *cp = nullptr, *lo = nullptr, *hi = nullptr, *col = nullptr;
  size_t ws_bytes = 0;
  int64_t cap_r = -1, cap_c = -1, nr = 0, nc = 0;
  void run(const gi::VsSelectionsDevice& sel, cudaStream_t st, cudaEvent_t e_count,
           cudaEvent_t e_fill) {
    const int64_t items = sel.num_heads * ((sel.seq_len + 63) / 64);
    if (!ws) {
      ws_bytes = gi::vs_index_workspace_size(sel.num_heads, sel.seq_len, sel.off_capacity);
      ws = dalloc(ws_bytes);
      rp = dalloc((items + 1) * 8);
      cp = dalloc((items + 1) * 8);
    }
    BENCH_OK(gi::vs_index_count(sel, static_cast<int64_t*>(rp), static_cast<int64_t*>(cp), ws,
                                ws_bytes, st));
    BENCH_CUDA(cudaEventRecord(e_count, st));
    BENCH_CUDA(
        cudaMemcpyAsync(&nr, static_cast<int64_t*>(rp) + items, 8, cudaMemcpyDeviceToHost, st));
    BENCH_CUDA(
        cudaMemcpyAsync(&nc, static_cast<int64_t*>(cp) + items, 8, cudaMemcpyDeviceToHost, st));
    BENCH_CUDA(cudaStreamSynchronize(st));
    if (nr > cap_r || nc > cap_c) {  // first run only (same inputs every rep)
      cudaFree(lo);
      cudaFree(hi);
      cudaFree(col);
      lo = dalloc(nr * 4);
      hi = dalloc(nr * 4);
      col = dalloc(nc * 4);
      cap_r = nr;
      cap_c = nc;
    }
    BENCH_OK(gi::vs_index_fill(sel, static_cast<int64_t*>(rp), static_cast<int64_t*>(cp),
                               static_cast<int*>(lo), static_cast<int*>(hi), static_cast<int*>(col),
                               ws, ws_bytes, st));
    BENCH_CUDA(cudaEventRecord(e_fill, st));
  }
  ~Build() {
    for (void* p : {ws, rp, cp, lo, hi, col}) cudaFree(p);
  }
};

std::string card() {
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  return prop.name;
}

void print_row(const Row& r, int64_t n, const std::string& dev) {
  std::printf(
      "{\"name\":\"%s\",\"card\":\"%s\",\"seq\":%lld,\"heads\":%d,\"v\":%d,\"s\":%d,"
      "\"ms_row_stats\":%.4f,\"ms_scores\":%.4f,\"ms_select\":%.4f,\"ms_index_count\":%.4f,"
      "\"ms_index_fill\":%.4f,\"ms_total\":%.4f,\"ms_per_head\":%.4f,\"ranges\":%lld,"
      "\"cols\":%lld}\n",
      r.what.c_str(), dev.c_str(), static_cast<long long>(n), r.H, r.v, r.s, r.stats, r.scores,
      r.select, r.count, r.fill, r.total, r.per_head, static_cast<long long>(r.ranges),
      static_cast<long long>(r.cols));
  std::fflush(stdout);
}

}  // namespace

namespace {
int bench_main(int argc, char** argv) {
  int64_t n = 1 << 20;
  int d = 128, reps = 10, warmup = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--seq")
      n = std::atoll(argv[i + 1]);
    else if (a == "--dim")
      d = std::atoi(argv[i + 1]);
    else if (a == "--reps")
      reps = std::atoi(argv[i + 1]);
    else if (a == "--warmup")
      warmup = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 1;
    }
  }
  if (!mprefill::cuda::has_gpu()) {
    std::fprintf(stderr, "no GPU\n");
    return 1;
  }
  const std::string dev = card();
  cudaStream_t st;
  BENCH_CUDA(cudaStreamCreate(&st));
  cudaEvent_t ev[7];
  for (auto& e : ev) BENCH_CUDA(cudaEventCreate(&e));
  std::vector<Row> rows;
  const int nl = static_cast<int>(std::min<int64_t>(64, n));

  for (const auto& hk : std::vector<std::pair<int, int>>{{1, 1}, {8, 2}}) {
    const int H = hk.first, Hkv = hk.second;
    uint16_t* q = static_cast<uint16_t*>(dalloc(size_t(nl) * H * d * 2));
    uint16_t* k = static_cast<uint16_t*>(dalloc(size_t(n) * Hkv * d * 2));
    mprefill::bench::fill_random<<<1024, 256, 0, st>>>(q, size_t(nl) * H * d, 1 + H);
    mprefill::bench::fill_random<<<4096, 256, 0, st>>>(k, size_t(n) * Hkv * d, 2 + H);
    BENCH_CUDA(cudaGetLastError());
    mprefill::VsEstimateParams p;
    p.q_last = q;
    p.k = k;
    p.q_row_stride = int64_t(H) * d;
    p.q_head_stride = d;
    p.k_row_stride = int64_t(Hkv) * d;
    p.k_head_stride = d;
    p.n_last = nl;
    p.seq_len = n;
    p.n_k = static_cast<int>(n);
    p.k_pos0 = 0;
    p.num_heads = H;
    p.num_kv_heads = Hkv;
    p.head_dim = d;
    p.scale = 1.f / std::sqrt(float(d));
    p.dtype = DType::kBF16;
    const size_t est_ws = gi::vs_estimate_workspace_size(p);
    void* ws_est = dalloc(est_ws);
    float* rmax = static_cast<float*>(dalloc(size_t(H) * nl * 4));
    float* rsum = static_cast<float*>(dalloc(size_t(H) * nl * 4));
    float* col = static_cast<float*>(dalloc(size_t(H) * n * 4));
    float* slash = static_cast<float*>(dalloc(size_t(H) * n * 4));
    const size_t sel_ws = gi::vs_select_workspace_size(H, n);
    void* ws_sel = dalloc(sel_ws);

    for (const auto& vs : std::vector<std::pair<int, int>>{{1000, 6096}, {3500, 100}}) {
      std::vector<int> vb(H, vs.first), sb(H, vs.second);
      const int cc = mprefill::clamp_vertical_budget(vs.first, n);
      const int oc = mprefill::clamp_slash_budget(vs.second, n);
      gi::VsSelectionsDevice sel;
      sel.seq_len = n;
      sel.num_heads = H;
      sel.columns = static_cast<int*>(dalloc(size_t(H) * cc * 4));
      sel.offsets = static_cast<int*>(dalloc(size_t(H) * oc * 4));
      sel.n_columns = static_cast<int*>(dalloc(H * 4));
      sel.n_offsets = static_cast<int*>(dalloc(H * 4));
      sel.col_capacity = cc;
      sel.off_capacity = oc;
      Build build;
      std::vector<double> t[6];
      for (int it = 0; it < warmup + reps; ++it) {
        BENCH_CUDA(cudaEventRecord(ev[0], st));
        BENCH_OK(gi::vs_row_stats(p, rmax, rsum, ws_est, est_ws, st));
        BENCH_CUDA(cudaEventRecord(ev[1], st));
        BENCH_CUDA(cudaMemsetAsync(col, 0, size_t(H) * n * 4, st));
        BENCH_CUDA(cudaMemsetAsync(slash, 0, size_t(H) * n * 4, st));
        BENCH_OK(gi::vs_scores(p, rmax, rsum, col, slash, ws_est, est_ws, st));
        BENCH_CUDA(cudaEventRecord(ev[2], st));
        BENCH_OK(gi::vs_select(col, slash, vb.data(), sb.data(), &sel, ws_sel, sel_ws, st));
        BENCH_CUDA(cudaEventRecord(ev[3], st));
        build.run(sel, st, ev[4], ev[5]);
        BENCH_CUDA(cudaEventSynchronize(ev[5]));
        if (it < warmup) continue;
        float ms[5];
        BENCH_CUDA(cudaEventElapsedTime(&ms[0], ev[0], ev[1]));
        BENCH_CUDA(cudaEventElapsedTime(&ms[1], ev[1], ev[2]));
        BENCH_CUDA(cudaEventElapsedTime(&ms[2], ev[2], ev[3]));
        BENCH_CUDA(cudaEventElapsedTime(&ms[3], ev[3], ev[4]));
        BENCH_CUDA(cudaEventElapsedTime(&ms[4], ev[4], ev[5]));
        float tot;
        BENCH_CUDA(cudaEventElapsedTime(&tot, ev[0], ev[5]));
        for (int s = 0; s < 5; ++s) t[s].push_back(ms[s]);
        t[5].push_back(tot);
      }
      Row r{"vs_estimate_build",
            H,
            vs.first,
            vs.second,
            median(t[0]),
            median(t[1]),
            median(t[2]),
            median(t[3]),
            median(t[4]),
            median(t[5]),
            median(t[5]) / H,
            build.nr,
            build.nc};
      print_row(r, n, dev);
      rows.push_back(r);

      // Index build alone on a host-made clustered selection with the same budgets.
      {
        std::mt19937_64 rng(17 + H + vs.first);
        std::vector<int> hc(size_t(H) * cc), ho(size_t(H) * oc), nc(H, cc), no(H, oc);
        std::uniform_int_distribution<int64_t> any(0, n - 1);
        std::exponential_distribution<double> ex(1.0 / 2048);
        std::uniform_real_distribution<double> un(std::log(100.0), std::log(double(n)));
        for (int h = 0; h < H; ++h) {
          std::set<int> c, o;
          for (int i = 0; i < 30 && i < cc; ++i) c.insert(i);
          while (int(c.size()) < cc) c.insert(int(any(rng)));
          for (int i = 0; i < 100 && i < oc; ++i) o.insert(i);
          while (int(o.size()) < oc) {
            const int64_t dd =
                (rng() % 10 < 8) ? 100 + int64_t(ex(rng)) : int64_t(std::floor(std::exp(un(rng))));
            if (dd < n) o.insert(int(dd));
          }
          std::copy(c.begin(), c.end(), hc.begin() + size_t(h) * cc);
          std::copy(o.rbegin(), o.rend(), ho.begin() + size_t(h) * oc);
        }
        BENCH_CUDA(cudaMemcpy(sel.columns, hc.data(), hc.size() * 4, cudaMemcpyHostToDevice));
        BENCH_CUDA(cudaMemcpy(sel.offsets, ho.data(), ho.size() * 4, cudaMemcpyHostToDevice));
        BENCH_CUDA(cudaMemcpy(sel.n_columns, nc.data(), H * 4, cudaMemcpyHostToDevice));
        BENCH_CUDA(cudaMemcpy(sel.n_offsets, no.data(), H * 4, cudaMemcpyHostToDevice));
        Build b2;
        std::vector<double> tc, tf, tt;
        for (int it = 0; it < warmup + reps; ++it) {
          BENCH_CUDA(cudaEventRecord(ev[3], st));
          b2.run(sel, st, ev[4], ev[5]);
          BENCH_CUDA(cudaEventSynchronize(ev[5]));
          if (it < warmup) continue;
          float a, b, c;
          BENCH_CUDA(cudaEventElapsedTime(&a, ev[3], ev[4]));
          BENCH_CUDA(cudaEventElapsedTime(&b, ev[4], ev[5]));
          BENCH_CUDA(cudaEventElapsedTime(&c, ev[3], ev[5]));
          tc.push_back(a);
          tf.push_back(b);
          tt.push_back(c);
        }
        Row r2{"vs_build_clustered", H,          vs.first,   vs.second,      0,     0,    0,
               median(tc),           median(tf), median(tt), median(tt) / H, b2.nr, b2.nc};
        print_row(r2, n, dev);
        rows.push_back(r2);
      }
      for (void* ptr : {static_cast<void*>(sel.columns), static_cast<void*>(sel.offsets),
                        static_cast<void*>(sel.n_columns), static_cast<void*>(sel.n_offsets)})
        cudaFree(ptr);
    }
    for (void* ptr :
         {static_cast<void*>(q), static_cast<void*>(k), ws_est, static_cast<void*>(rmax),
          static_cast<void*>(rsum), static_cast<void*>(col), static_cast<void*>(slash), ws_sel})
      cudaFree(ptr);
  }
  std::printf("\n%-20s %3s %5s %5s %8s %8s %8s %8s %8s %8s %9s %11s %9s\n", "case", "H", "v", "s",
              "stats", "scores", "select", "count", "fill", "total", "ms/head", "ranges", "cols");
  for (const Row& r : rows)
    std::printf("%-20s %3d %5d %5d %8.4f %8.4f %8.4f %8.4f %8.4f %8.4f %9.4f %11lld %9lld\n",
                r.what.c_str(), r.H, r.v, r.s, r.stats, r.scores, r.select, r.count, r.fill,
                r.total, r.per_head, static_cast<long long>(r.ranges),
                static_cast<long long>(r.cols));
  std::printf("card: %s, seq %lld, head_dim %d, median of %d reps\n", dev.c_str(),
              static_cast<long long>(n), d, reps);
  return 0;
}
}  // namespace

int main(int argc, char** argv) { return mprefill::bench::run_main(bench_main, argc, argv); }
