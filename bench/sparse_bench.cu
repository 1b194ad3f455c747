// Vertical-slash sparse attention timing (kernels/cuda/sparse) against the own dense
// flash kernel in the same process: batch 1, bf16, token-major Q/K/V/O, 32 q / 8 kv heads,
// head_dim 128, causal. Per budget class (v, s) of the Llama-3-8B mix, every head gets its
// own `clustered` (or `uniform`) selection (model/index_sets.h: synthetic_vs) with that
// budget; work = 64x64 mask tiles (vs_mask_tiles), TF/s = tiles * 4 * 64 * 64 * d / t.
// The mix speedup weights each class's time by its share of the 1024 heads (473 / 278 /
// 153 / 89 / 31) against the dense time of the same 32 heads.
// Also: the dense causal mask through the sparse kernel (A-shape with n_init = N: one
// range [0, m1) per block), which isolates the cost of the 64-row tiling.
//
//   mprefill-sparse-bench [--seq 32768,131072] [--reps 10] [--warmup 2] [--set clustered]
//                         [--kernels 1,2,3]
// --kernels: sparse kernel generations to time (kernels/cuda/sparse/sparse_attention.h:
// SparseKernelGen; 3 = the skeleton); "kernel" in the JSON. Per case the own dense flash
// kernel and every generation run interleaved, --reps rounds (median, min, max); then each
// generation's last 256 rows are compared with the first generation's (per (row, head)
// max |diff| / max |o|; above 3e-2 the benchmark fails).
// One JSON object per case on stdout, then a short table on stderr.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bench/bench_common.cuh"
#include "kernels/attention.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/flash/flash.h"
#include "kernels/cuda/sparse/sparse_attention.h"
#include "kernels/sparse.h"
#include "model/index_sets.h"

namespace {

// Per-side timings of one case: sides run interleaved (round r times side 0, 1, ... in
// turn), so that clock and thermal drift hit every side alike.
struct Timing {
  double median = 0, min = 0, max = 0;
};

std::vector<Timing> time_interleaved(const std::vector<std::function<void()>>& sides, int warmup,
                                     int reps) {
  cudaEvent_t a, b;
  BENCH_CUDA(cudaEventCreate(&a));
  BENCH_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < warmup; ++i)
    for (const auto& s : sides) s();
  BENCH_CUDA(cudaDeviceSynchronize());
  std::vector<std::vector<float>> ms(sides.size());
  for (int i = 0; i < reps; ++i) {
    for (size_t k = 0; k < sides.size(); ++k) {
      BENCH_CUDA(cudaEventRecord(a));
      sides[k]();
      BENCH_CUDA(cudaEventRecord(b));
      BENCH_CUDA(cudaEventSynchronize(b));
      float t = 0;
      BENCH_CUDA(cudaEventElapsedTime(&t, a, b));
      ms[k].push_back(t);
    }
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::vector<Timing> out;
  for (auto& v : ms) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    out.push_back({n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]), v.front(), v.back()});
  }
  return out;
}

// Agreement of the sparse kernels on the last rows of the sequence (where a walk ends and
// long rows accumulate the most keys): per (row, head), max |o - o_ref| / max |o_ref|.
// The kernels are checked against the naive reference at awkward sizes by
// gpu_sparse_attention_test; here a kernel that diverges from the others on a benchmark
// shape fails the benchmark.
constexpr int kCheckRows = 256;
constexpr double kAgreeTol = 3e-2;

std::vector<float> tail_rows(const uint16_t* o, int64_t n, int H, int D) {
  const int64_t rows = std::min<int64_t>(n, kCheckRows);
  std::vector<uint16_t> raw(size_t(rows) * H * D);
  BENCH_CUDA(
      cudaMemcpy(raw.data(), o + size_t(n - rows) * H * D, raw.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<float> out(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    const uint32_t u = uint32_t(raw[i]) << 16;
    std::memcpy(&out[i], &u, 4);
  }
  return out;
}

double row_error(const std::vector<float>& got, const std::vector<float>& ref, int D) {
  double worst = 0;
  for (size_t r = 0; r + D <= ref.size(); r += D) {
    double num = 0, den = 1e-6;
    for (int d = 0; d < D; ++d) {
      num = std::max(num, double(std::fabs(got[r + d] - ref[r + d])));
      den = std::max(den, double(std::fabs(ref[r + d])));
    }
    worst = std::max(worst, num / den);
  }
  return worst;
}

template <typename T>
T* upload(const std::vector<T>& v) {
  T* d = nullptr;
  BENCH_CUDA(cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T)));
  if (!v.empty()) BENCH_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}

}  // namespace

namespace {
int bench_main(int argc, char** argv) {
  using namespace mprefill;
  std::vector<int64_t> seqs = {32768, 131072};
  int reps = 10, warmup = 2;
  std::string set = "clustered";
  std::vector<int64_t> versions = {1, 2, 3, 4};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--seq")
      seqs = parse_list(v);
    else if (k == "--reps")
      reps = std::stoi(v);
    else if (k == "--warmup")
      warmup = std::stoi(v);
    else if (k == "--set")
      set = v;
    else if (k == "--kernels")
      versions = parse_list(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 1;
    }
  }
  for (int64_t ver : versions) {
    if (ver < 1 || ver > 5) {
      std::fprintf(
          stderr,
          "--kernels takes generations 1 to 5 (3: the skeleton, 4: with owner tiles, 5: planned), "
          "got %lld\n",
          (long long)ver);
      return 1;
    }
  }
  const IndexSetKind kind = parse_index_set_kind(set);
  const int H = 32, HKV = 8, D = 128;
  const std::vector<std::tuple<int, int, int>> mix = {
      {1000, 6096, 473}, {30, 800, 278}, {100, 800, 153}, {3500, 100, 89}, {500, 700, 31}};
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  const std::string card = prop.name;
  struct Row {
    std::string name;
    int64_t n;
    double ms, tfs, dense_ms, dense_tfs, density, spread, err;
  };
  std::vector<Row> rows;

  for (int64_t n : seqs) {
    uint16_t *q, *k, *v, *o;
    float* lse;
    BENCH_CUDA(cudaMalloc(&q, size_t(n) * H * D * 2));
    BENCH_CUDA(cudaMalloc(&k, size_t(n) * HKV * D * 2));
    BENCH_CUDA(cudaMalloc(&v, size_t(n) * HKV * D * 2));
    BENCH_CUDA(cudaMalloc(&o, size_t(n) * H * D * 2));
    BENCH_CUDA(cudaMalloc(&lse, size_t(n) * H * 4));
    mprefill::bench::fill_random<<<1024, 256>>>(q, size_t(n) * H * D, 1);
    mprefill::bench::fill_random<<<1024, 256>>>(k, size_t(n) * HKV * D, 2);
    mprefill::bench::fill_random<<<1024, 256>>>(v, size_t(n) * HKV * D, 3);
    BENCH_CUDA(cudaDeviceSynchronize());
    AttentionParams p;
    p.q = q;
    p.k = k;
    p.v = v;
    p.o = o;
    p.lse = lse;
    p.n_q = p.n_k = int(n);
    p.num_heads = H;
    p.num_kv_heads = HKV;
    p.head_dim = D;
    set_packed_strides(p);
    p.causal = true;
    p.scale = 1.f / std::sqrt(float(D));
    p.dtype = DType::kBF16;
    const double nb = double(num_blocks(n));
    const double causal_tiles = nb * (nb + 1) / 2 * H;
    const double tile_flops = 4.0 * 64 * 64 * D;
    const double dense_flops = 4.0 * double(n) * n * D * H / 2;
    auto gen = [](int64_t ver) { return static_cast<cuda::SparseKernelGen>(ver); };
    // One case: own dense flash and each kernel generation, interleaved; then the kernels'
    // agreement on the last rows. Returns the kernels' medians (ms) and the dense median.
    auto run_case = [&](const std::string& base, double tiles,
                        const std::function<void(int64_t)>& launch, double* dense_out) {
      std::vector<std::function<void()>> sides;
      sides.push_back([&] { BENCH_OK(cuda::flash_attention_fwd(p, nullptr)); });
      for (int64_t ver : versions) sides.push_back([&launch, ver] { launch(ver); });
      const std::vector<Timing> t = time_interleaved(sides, warmup, reps);
      std::vector<float> ref;
      std::vector<double> err(versions.size(), 0.0);
      for (size_t vi = 0; vi < versions.size(); ++vi) {
        launch(versions[vi]);
        BENCH_CUDA(cudaDeviceSynchronize());
        std::vector<float> got = tail_rows(o, n, H, D);
        if (vi == 0)
          ref = std::move(got);
        else
          err[vi] = row_error(got, ref, D);
      }
      const double dense_ms = t[0].median, dense_tfs = dense_flops / dense_ms * 1e-9;
      *dense_out = dense_ms;
      std::vector<double> med;
      for (size_t vi = 0; vi < versions.size(); ++vi) {
        const Timing& k = t[vi + 1];
        const int kver = int(versions[vi]);
        const std::string name = base + "_v" + std::to_string(kver);
        const double tfs = tiles * tile_flops / k.median * 1e-9;
        rows.push_back({name, n, k.median, tfs, dense_ms, dense_tfs, tiles / causal_tiles,
                        (k.max - k.min) / k.median, err[vi]});
        med.push_back(k.median);
        std::printf(
            "{\"name\": \"%s\", \"card\": \"%s\", \"seq\": %lld, \"heads\": %d, "
            "\"kv_heads\": %d, \"dim\": %d, \"dtype\": \"bf16\", \"pattern\": \"%s\", "
            "\"kernel\": %d, \"reps\": %d, \"ms\": %.4f, \"ms_min\": %.4f, \"ms_max\": %.4f, "
            "\"tiles\": %.0f, \"density\": %.4f, \"tflops_tiles\": %.1f, \"dense_ms\": %.4f, "
            "\"dense_ms_min\": %.4f, \"dense_ms_max\": %.4f, \"dense_tflops\": %.1f, "
            "\"tfs_ratio_vs_dense\": %.3f, \"speedup_vs_dense\": %.3f, "
            "\"tail_row_err_vs_v%d\": %.2e}\n",
            name.c_str(), card.c_str(), (long long)n, H, HKV, D, set.c_str(), kver, reps, k.median,
            k.min, k.max, tiles, tiles / causal_tiles, tfs, dense_ms, t[0].min, t[0].max, dense_tfs,
            tfs / dense_tfs, dense_ms / k.median, int(versions[0]), err[vi]);
        std::fflush(stdout);
        if (err[vi] > kAgreeTol)
          throw std::runtime_error(name + " at " + std::to_string(n) +
                                   ": last rows differ from kernel " + std::to_string(versions[0]) +
                                   " by " + std::to_string(err[vi]) +
                                   " (per-row max error / max |o|)");
      }
      return med;
    };
    double dense_ms = 0;
    run_case(
        "dense_via_sparse_kernel", causal_tiles,
        [&](int64_t ver) { BENCH_OK(cuda::ashape_attention_fwd(p, int(n), 0, nullptr, gen(ver))); },
        &dense_ms);
    {
      // Block-sparse top-100: block b lists itself and min(99, b) random distinct j < b.
      const int kTop = 100;
      const int64_t nbl = num_blocks(n);
      std::vector<int> blocks(size_t(H) * nbl * kTop, -1);
      uint64_t st = 12345;
      double tiles = 0;
      for (int h = 0; h < H; ++h)
        for (int64_t b = 0; b < nbl; ++b) {
          std::vector<char> used(size_t(b + 1), 0);
          used[b] = 1;
          const int want = int(std::min<int64_t>(kTop, b + 1));
          for (int got = 1; got < want;) {
            st = st * 6364136223846793005ull + 1442695040888963407ull;
            const int64_t j = int64_t((st >> 33) % uint64_t(b));
            if (!used[j]) used[j] = 1, ++got;
          }
          int t = 0;
          for (int64_t j = 0; j <= b; ++j)
            if (used[j]) blocks[(size_t(h) * nbl + b) * kTop + t++] = int(j);
          tiles += want;
        }
      int* db = upload(blocks);
      BlockSparseView bv;
      bv.seq_len = n;
      bv.nblocks = nbl;
      bv.k = kTop;
      bv.blocks = db;
      double dms = 0;
      run_case(
          "block_sparse_top100", tiles,
          [&](int64_t ver) {
            BENCH_OK(cuda::block_sparse_attention_fwd(p, bv, 0, nullptr, gen(ver)));
          },
          &dms);
      cudaFree(db);
    }
    std::vector<double> mix_ms(versions.size(), 0.0);
    double mix_dense_ms = 0;
    for (auto [bv, bs, count] : mix) {
      std::vector<VsSelection> sel;
      for (int h = 0; h < H; ++h) sel.push_back(synthetic_vs(kind, n, bv, bs, 1000 * h + bv + bs));
      const VsIndex ix = cpu::vs_build_index(sel, n);
      double tiles = 0;
      for (int h = 0; h < H; ++h) tiles += double(vs_mask_tiles(ix, h));
      VsIndexView dv;
      dv.seq_len = ix.seq_len;
      dv.nblocks = ix.nblocks;
      int64_t* rp = upload(ix.range_ptr);
      int* rl = upload(ix.range_lo);
      int* rh = upload(ix.range_hi);
      int64_t* cp = upload(ix.col_ptr);
      int* cc = upload(ix.col);
      dv.range_ptr = rp;
      dv.range_lo = rl;
      dv.range_hi = rh;
      dv.col_ptr = cp;
      dv.col = cc;
      double dms = 0;
      const std::vector<double> med = run_case(
          "vs_" + std::to_string(bv) + "_" + std::to_string(bs), tiles,
          [&](int64_t ver) { BENCH_OK(cuda::vs_attention_fwd(p, dv, 0, nullptr, gen(ver))); },
          &dms);
      for (size_t vi = 0; vi < versions.size(); ++vi) mix_ms[vi] += med[vi] * count / 1024.0;
      mix_dense_ms += dms * count / 1024.0;
      cudaFree(rp);
      cudaFree(rl);
      cudaFree(rh);
      cudaFree(cp);
      cudaFree(cc);
    }
    // The mix: each class's time weighted by its share of the 1024 heads; the dense time
    // is the same weighting of the dense medians measured beside each class.
    for (size_t vi = 0; vi < versions.size(); ++vi) {
      std::printf(
          "{\"name\": \"vs_llama3_8b_mix_v%d\", \"card\": \"%s\", \"seq\": %lld, "
          "\"pattern\": \"%s\", \"kernel\": %d, \"ms_per_32_heads\": %.4f, \"dense_ms\": %.4f, "
          "\"speedup_vs_dense\": %.3f}\n",
          int(versions[vi]), card.c_str(), (long long)n, set.c_str(), int(versions[vi]), mix_ms[vi],
          mix_dense_ms, mix_dense_ms / mix_ms[vi]);
      rows.push_back(
          {"vs_mix_v" + std::to_string(versions[vi]), n, mix_ms[vi], 0, mix_dense_ms, 0, 0, 0, 0});
    }
    cudaFree(q);
    cudaFree(k);
    cudaFree(v);
    cudaFree(o);
    cudaFree(lse);
  }
  std::fprintf(stderr, "\n%-28s %8s %10s %7s %8s %8s %10s %9s %8s %9s\n", "case", "seq", "ms",
               "spread", "density", "TF/s", "dense TF/s", "TF ratio", "speedup", "tail err");
  for (const Row& r : rows)
    std::fprintf(stderr, "%-28s %8lld %10.3f %7.3f %8.3f %8.1f %10.1f %9.3f %8.3f %9.2e\n",
                 r.name.c_str(), (long long)r.n, r.ms, r.spread, r.density, r.tfs, r.dense_tfs,
                 r.tfs > 0 ? r.tfs / r.dense_tfs : 0.0, r.dense_ms / r.ms, r.err);
  return 0;
}
}  // namespace

int main(int argc, char** argv) { return mprefill::bench::run_main(bench_main, argc, argv); }
