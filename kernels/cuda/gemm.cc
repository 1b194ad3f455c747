// y = x W^T (+ bias) (+ y) through cuBLASLt, with cublasGemmEx as the fallback.
//
// Row-major y[n][out] is column-major y^T (out x n) = W (out x in) * x^T (in x n). In
// column-major terms: A = W stored (in x out, ld in) used transposed, B = x stored
// (in x n, ld in), C = D = y (out x n, ld out): m = out, n = n, k = in ("TN").
//
// The launch path allocates nothing: descriptors live in cuBLASLt's opaque structs on
// the stack, the chosen algorithm of each shape is cached in a fixed table, and the
// workspace is the caller's.
#include <cuda_runtime_api.h>

#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <utility>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda.h"

namespace mprefill::cuda {

namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // cuBLAS's recommendation for Hopper
constexpr int kCacheSize = 64;

struct GemmKey {
  int64_t n = 0, in = 0, out = 0;
  DType in_dtype = DType::kF32, y_dtype = DType::kF32;
  bool bias = false, accumulate = false;
  uint32_t align_x = 0, align_w = 0, align_y = 0, align_bias = 0;
  size_t workspace = 0;
  bool operator==(const GemmKey&) const = default;
};

struct GemmEntry {
  GemmKey key;
  bool used = false;
  bool has_algo = false;  // false: cuBLASLt offered none, use the fallback
  cublasLtMatmulAlgo_t algo{};
};

cudaDataType_t cuda_type(DType t) { return t == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

// Largest power of two (<= 256) dividing the address.
uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

// Descriptors of one call (no heap allocation).
struct LtDescs {
  cublasLtMatmulDescOpaque_t op{};
  cublasLtMatrixLayoutOpaque_t a{}, b{}, c{};
  cublasLtMatmulDesc_t op_desc() { return &op; }
  cublasLtMatrixLayout_t a_desc() { return &a; }
  cublasLtMatrixLayout_t b_desc() { return &b; }
  cublasLtMatrixLayout_t c_desc() { return &c; }
};

Status init_descs(LtDescs& d, const GemmKey& k, const void* bias) {
  MPREFILL_CUBLAS_TRY(cublasLtMatmulDescInit(d.op_desc(), CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  MPREFILL_CUBLAS_TRY(
      cublasLtMatmulDescSetAttribute(d.op_desc(), CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  MPREFILL_CUBLAS_TRY(
      cublasLtMatmulDescSetAttribute(d.op_desc(), CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  if (k.bias) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bt = cuda_type(k.y_dtype);
    MPREFILL_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(d.op_desc(), CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                       &epi, sizeof epi));
    MPREFILL_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(
        d.op_desc(), CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt));
    MPREFILL_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(
        d.op_desc(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
  }
  const cudaDataType_t it = cuda_type(k.in_dtype), yt = cuda_type(k.y_dtype);
  MPREFILL_CUBLAS_TRY(cublasLtMatrixLayoutInit(d.a_desc(), it, k.in, k.out, k.in));
  MPREFILL_CUBLAS_TRY(cublasLtMatrixLayoutInit(d.b_desc(), it, k.in, k.n, k.in));
  MPREFILL_CUBLAS_TRY(cublasLtMatrixLayoutInit(d.c_desc(), yt, k.out, k.n, k.out));
  return Status::kOk;
}

}  // namespace

struct GemmContext {
  cublasLtHandle_t lt = nullptr;
  cublasHandle_t blas = nullptr;
  bool force_fallback = false;
  std::array<GemmEntry, kCacheSize> cache{};
  int next = 0;  // round-robin replacement
};

Status gemm_create(GemmContext** ctx) {
  MPREFILL_CHECK_ARG(ctx != nullptr, Status::kInvalidArgument);
  *ctx = nullptr;
  if (!has_gpu())
    return detail::record_error(Status::kNoDevice, "gemm_create: no CUDA device", __FILE__,
                                __LINE__);
  auto* c = new GemmContext;
  cublasStatus_t s = cublasLtCreate(&c->lt);
  if (s == CUBLAS_STATUS_SUCCESS) s = cublasCreate(&c->blas);
  if (s != CUBLAS_STATUS_SUCCESS) {
    gemm_destroy(c);
    return detail::record_cublas_error(s, "cublasLtCreate/cublasCreate", __FILE__, __LINE__);
  }
  *ctx = c;
  return Status::kOk;
}

void gemm_destroy(GemmContext* ctx) {
  if (!ctx) return;
  if (ctx->blas) cublasDestroy(ctx->blas);
  if (ctx->lt) cublasLtDestroy(ctx->lt);
  delete ctx;
}

size_t gemm_workspace_size() { return kWorkspaceBytes; }

void gemm_force_fallback(GemmContext* ctx, bool on) {
  if (ctx) ctx->force_fallback = on;
}

namespace {

// Finds or fills the cache entry of `key`.
Status choose_algo(GemmContext* ctx, const GemmKey& key, LtDescs& d, const GemmEntry** out) {
  for (const GemmEntry& e : ctx->cache) {
    if (e.used && e.key == key) {
      *out = &e;
      return Status::kOk;
    }
  }
  GemmEntry& e = ctx->cache[ctx->next];
  ctx->next = (ctx->next + 1) % kCacheSize;
  e = GemmEntry{};
  e.key = key;
  cublasLtMatmulPreferenceOpaque_t pref_storage{};
  cublasLtMatmulPreference_t pref = &pref_storage;
  MPREFILL_CUBLAS_TRY(cublasLtMatmulPreferenceInit(pref));
  const uint64_t ws = key.workspace;
  MPREFILL_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_w},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_x},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_y},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_y}};
  for (const auto& [attr, v] : aligns)
    MPREFILL_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(pref, attr, &v, sizeof v));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t s =
      cublasLtMatmulAlgoGetHeuristic(ctx->lt, d.op_desc(), d.a_desc(), d.b_desc(), d.c_desc(),
                                     d.c_desc(), pref, 1, &result, &found);
  if (s == CUBLAS_STATUS_SUCCESS && found > 0) {
    e.has_algo = true;
    e.algo = result.algo;
  } else if (s != CUBLAS_STATUS_SUCCESS && s != CUBLAS_STATUS_NOT_SUPPORTED) {
    return detail::record_cublas_error(s, "cublasLtMatmulAlgoGetHeuristic", __FILE__, __LINE__);
  }
  e.used = true;
  *out = &e;
  return Status::kOk;
}

Status gemm_fallback(GemmContext* ctx, const GemmKey& k, const void* x, const void* w,
                     const void* bias, void* y, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  MPREFILL_CUBLAS_TRY(cublasSetStream(ctx->blas, stream));
  MPREFILL_CUBLAS_TRY(cublasSetWorkspace(ctx->blas, workspace, workspace_bytes));
  const float alpha = 1.f, beta = k.accumulate ? 1.f : 0.f;
  const cudaDataType_t it = cuda_type(k.in_dtype), yt = cuda_type(k.y_dtype);
  const int m = static_cast<int>(k.out), n = static_cast<int>(k.n), kk = static_cast<int>(k.in);
  MPREFILL_CUBLAS_TRY(cublasGemmEx(ctx->blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, kk, &alpha, w, it, kk,
                                   x, it, kk, &beta, y, yt, m, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
  if (bias) return add_bias(y, k.y_dtype, k.out, bias, k.n, k.out, stream);
  return Status::kOk;
}

}  // namespace

Status gemm_xwt(GemmContext* ctx, const void* x, const void* w, DType in_dtype, const void* bias,
                void* y, DType y_dtype, int64_t n, int64_t in, int64_t out, bool accumulate,
                void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  MPREFILL_CHECK_ARG(ctx && ctx->lt && ctx->blas, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(n >= 0 && in > 0 && out > 0, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(n <= INT_MAX && in <= INT_MAX && out <= INT_MAX, Status::kInvalidArgument);
  if (n == 0) return Status::kOk;
  MPREFILL_CHECK_ARG(x && w && y, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(workspace || workspace_bytes == 0, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, Status::kInvalidArgument);
  const bool bf16_in = in_dtype == DType::kBF16;
  const bool ok_types = (bf16_in && (y_dtype == DType::kBF16 || y_dtype == DType::kF32)) ||
                        (in_dtype == DType::kF32 && y_dtype == DType::kF32);
  if (!ok_types)
    return detail::record_error(Status::kUnsupported,
                                "gemm_xwt: dtypes (x/W bf16 -> y bf16|fp32, or fp32 -> fp32)",
                                __FILE__, __LINE__);
  GemmKey key;
  key.n = n;
  key.in = in;
  key.out = out;
  key.in_dtype = in_dtype;
  key.y_dtype = y_dtype;
  key.bias = bias != nullptr;
  key.accumulate = accumulate;
  key.align_x = alignment(x);
  key.align_w = alignment(w);
  key.align_y = alignment(y);
  key.align_bias = bias ? alignment(bias) : 0;
  key.workspace = workspace_bytes;
  // cuBLASLt's bias epilogue wants a 16-byte aligned vector; others take the fallback.
  if (ctx->force_fallback || (bias && key.align_bias < 16))
    return gemm_fallback(ctx, key, x, w, bias, y, workspace, workspace_bytes, stream);

  LtDescs d;
  if (Status s = init_descs(d, key, bias); s != Status::kOk) return s;
  const GemmEntry* e = nullptr;
  if (Status s = choose_algo(ctx, key, d, &e); s != Status::kOk) return s;
  if (!e->has_algo)
    return gemm_fallback(ctx, key, x, w, bias, y, workspace, workspace_bytes, stream);
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  MPREFILL_CUBLAS_TRY(cublasLtMatmul(ctx->lt, d.op_desc(), &alpha, w, d.a_desc(), x, d.b_desc(),
                                     &beta, y, d.c_desc(), y, d.c_desc(), &e->algo, workspace,
                                     workspace_bytes, stream));
  return Status::kOk;
}

}  // namespace mprefill::cuda
