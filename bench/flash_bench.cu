// Dense attention timing of kernels/cuda/flash: batch 1, token-major bf16 Q/K/V/O,
// GQA without expanded K/V. One JSON object per case on stdout, then a short table.
//
//   mprefill-flash-bench [--seq 32768,131072] [--heads 32] [--kv-heads 8] [--dim 128]
//                        [--causal 1|0|both] [--reps 10] [--warmup 2] [--dtype bf16|fp16]
//
// Inputs are random (never zeros); time = median over reps of cudaEvent-timed single
// launches; FLOPs = 4 * n^2 * d * heads (non-causal), half of that when causal.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_common.cuh"
#include "kernels/attention.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/flash/flash.h"

namespace {

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) v.push_back(std::atoi(tok.c_str()));
  return v;
}

}  // namespace

namespace {
int bench_main(int argc, char** argv) {
  std::vector<int> seqs = {32768, 131072};
  int heads = 32, kv_heads = 8, dim = 128, reps = 10, warmup = 2;
  std::string causal_arg = "1", dtype_arg = "bf16";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: %s needs a value\n", a.c_str());
        std::exit(1);
      }
      return argv[++i];
    };
    if (a == "--seq")
      seqs = parse_list(next());
    else if (a == "--heads")
      heads = std::atoi(next().c_str());
    else if (a == "--kv-heads")
      kv_heads = std::atoi(next().c_str());
    else if (a == "--dim")
      dim = std::atoi(next().c_str());
    else if (a == "--causal")
      causal_arg = next();
    else if (a == "--reps")
      reps = std::atoi(next().c_str());
    else if (a == "--warmup")
      warmup = std::atoi(next().c_str());
    else if (a == "--dtype")
      dtype_arg = next();
    else {
      std::fprintf(stderr, "error: unknown argument %s\n", a.c_str());
      return 1;
    }
  }
  std::vector<bool> causals;
  if (causal_arg == "both")
    causals = {true, false};
  else
    causals = {causal_arg != "0"};
  const mprefill::DType dtype =
      dtype_arg == "fp16" ? mprefill::DType::kF16 : mprefill::DType::kBF16;

  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::fprintf(stderr, "error: no CUDA device\n");
    return 2;
  }
  const std::string card = prop.name;

  struct Row {
    int n;
    bool causal;
    double ms, tflops;
  };
  std::vector<Row> rows;
  for (int n : seqs) {
    const size_t q_elems = size_t(n) * heads * dim, kv_elems = size_t(n) * kv_heads * dim;
    uint16_t *q, *k, *v, *o;
    float* lse;
    BENCH_CUDA(cudaMalloc(&q, q_elems * 2));
    BENCH_CUDA(cudaMalloc(&k, kv_elems * 2));
    BENCH_CUDA(cudaMalloc(&v, kv_elems * 2));
    BENCH_CUDA(cudaMalloc(&o, q_elems * 2));
    BENCH_CUDA(cudaMalloc(&lse, size_t(heads) * n * 4));
    const bool bf16 = dtype == mprefill::DType::kBF16;
    mprefill::bench::fill_random<<<1024, 256>>>(q, q_elems, 1, bf16);
    mprefill::bench::fill_random<<<1024, 256>>>(k, kv_elems, 2, bf16);
    mprefill::bench::fill_random<<<1024, 256>>>(v, kv_elems, 3, bf16);
    BENCH_CUDA(cudaGetLastError());

    for (bool causal : causals) {
      mprefill::AttentionParams p;
      p.q = q;
      p.k = k;
      p.v = v;
      p.o = o;
      p.lse = lse;
      p.n_q = p.n_k = n;
      p.num_heads = heads;
      p.num_kv_heads = kv_heads;
      p.head_dim = dim;
      mprefill::set_packed_strides(p);
      p.causal = causal;
      p.scale = 1.f / std::sqrt(float(dim));
      p.dtype = dtype;
      std::vector<float> times;
      cudaEvent_t e0, e1;
      BENCH_CUDA(cudaEventCreate(&e0));
      BENCH_CUDA(cudaEventCreate(&e1));
      for (int r = 0; r < warmup + reps; ++r) {
        BENCH_CUDA(cudaEventRecord(e0));
        BENCH_OK(mprefill::cuda::flash_attention_fwd(p, nullptr));
        BENCH_CUDA(cudaEventRecord(e1));
        BENCH_CUDA(cudaEventSynchronize(e1));
        float ms = 0;
        BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        if (r >= warmup) times.push_back(ms);
      }
      BENCH_CUDA(cudaEventDestroy(e0));
      BENCH_CUDA(cudaEventDestroy(e1));
      std::sort(times.begin(), times.end());
      const double ms = times[times.size() / 2];
      const double flops = 4.0 * double(n) * n * dim * heads * (causal ? 0.5 : 1.0);
      const double tf = flops / (ms * 1e-3) / 1e12;
      rows.push_back({n, causal, ms, tf});
      std::printf(
          "{\"name\": \"flash_fwd\", \"card\": \"%s\", \"dtype\": \"%s\", \"seq\": %d, "
          "\"heads\": %d, \"kv_heads\": %d, \"head_dim\": %d, \"causal\": %s, \"ms\": %.4f, "
          "\"ms_min\": %.4f, \"ms_max\": %.4f, \"reps\": %d, \"tflops\": %.1f}\n",
          card.c_str(), dtype_arg.c_str(), n, heads, kv_heads, dim, causal ? "true" : "false", ms,
          times.front(), times.back(), reps, tf);
      std::fflush(stdout);
    }
    cudaFree(q);
    cudaFree(k);
    cudaFree(v);
    cudaFree(o);
    cudaFree(lse);
  }
  std::printf("# %-8s %-9s %10s %8s\n", "seq", "causal", "ms", "TF/s");
  for (const Row& r : rows)
    std::printf("# %-8d %-9s %10.3f %8.1f\n", r.n, r.causal ? "yes" : "no", r.ms, r.tflops);
  return 0;
}
}  // namespace

int main(int argc, char** argv) { return mprefill::bench::run_main(bench_main, argc, argv); }
