#include "engine/cuda/sp_estimate.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <utility>

#include "engine/distributed_estimate.h"
#include "kernels/cuda/cuda.h"

namespace mprefill::gpu {

SpEstimator::SpEstimator(comm::Communicator* sp, std::vector<TokenRanges> layout, int me, int64_t n,
                         cudaStream_t stream, std::string who)
    : sp_(sp),
      layout_(std::move(layout)),
      me_(me),
      sp_size_(static_cast<int>(layout_.size())),
      n_last_(static_cast<int>(std::min<int64_t>(kBlock, n))),
      n_(n),
      st_(stream),
      f_{std::move(who)} {
  if (n <= 0 || me < 0 || me >= sp_size_) f_.raise("sp estimation: bad sequence length or rank");
  if (sp_size_ > 1 && (!sp || sp->size() != sp_size_ || sp->rank() != me))
    f_.raise("sp estimation: the communicator does not match the layout");
  for (auto [b, e] : layout_[me_]) {
    local_rows_ += e - b;
    max_range_ = std::max(max_range_, e - b);
  }
}

SpEstimator::~SpEstimator() {
  for (Buf* b : {&ws_, &lmax_, &lsum_, &tmax_, &tsum_, &gmax_, &gsum_, &col_, &slash_, &coltmp_,
                 &qpool_, &kpool_})
    if (b->p) cudaFree(b->p);
}

template <class T>
T* SpEstimator::get(Buf& b, size_t count) {
  const size_t need = std::max<size_t>(count, 1) * sizeof(T);
  if (need > b.bytes) {
    // The stream may still use the old buffer: free only after it drained.
    if (b.p) {
      f_.ck(cudaStreamSynchronize(st_), "sp estimation: growing estimation scratch", -1);
      cudaFree(b.p);
    }
    b.p = nullptr;
    b.bytes = 0;
    const cudaError_t e = cudaMalloc(&b.p, need);
    if (e != cudaSuccess) b.p = nullptr;
    f_.ck(e,
          "sp estimation: allocating " + std::to_string(need >> 20) + " MiB of estimation scratch");
    b.bytes = need;
  }
  return static_cast<T*>(b.p);
}

void SpEstimator::gather_last_rows(const uint16_t* q_local, int64_t row_elems, uint16_t* q_last) {
  const int64_t first = n_ - n_last_;
  // Rank order and range order are known to every rank, so the broadcasts match.
  for (int r = 0; r < sp_size_; ++r) {
    int64_t off = 0;
    for (auto [b, e] : layout_[r]) {
      const int64_t t0 = std::max(b, first), t1 = e;
      if (t0 < t1) {
        uint16_t* dst = q_last + size_t(t0 - first) * row_elems;
        const size_t cnt = size_t(t1 - t0) * row_elems;
        if (r == me_)
          f_.ck(cudaMemcpyAsync(dst, q_local + size_t(off + t0 - b) * row_elems, cnt * 2,
                                cudaMemcpyDeviceToDevice, st_),
                "sp estimation: copying the last query rows", -1);
        if (sp_size_ > 1) {
          f_.cok(sp_->broadcast(dst, cnt, DType::kBF16, r, st_), *sp_,
                 "sp estimation: broadcasting the last query rows", -1);
          if (r == me_) comm_bytes_ += int64_t(cnt) * 2;
        }
      }
      off += e - b;
    }
  }
}

void SpEstimator::vertical_slash(const uint16_t* q_last, int64_t q_row, const uint16_t* k_local,
                                 int64_t k_row, int num_heads, int num_kv_heads, int head_dim,
                                 float scale, const int* v_budget, const int* s_budget,
                                 const cuda::index::VsSelectionsDevice& out, int layer,
                                 const double* tau) {
  namespace ix = cuda::index;
  const TokenRanges& mine = layout_[me_];
  const VsCallShape shape{num_heads, num_kv_heads, head_dim, n_last_,     n_,
                          q_row,     k_row,        scale,    DType::kBF16};
  auto params = [&](int64_t b, int64_t e, int64_t off) {
    return vs_call_params(shape, q_last, k_local + size_t(off) * k_row, b, static_cast<int>(e - b));
  };
  size_t wsb = ix::vs_select_workspace_size(std::min(num_heads, ix::kMaxHeadsPerCall), n_);
  for (auto [b, e] : mine) wsb = std::max(wsb, ix::vs_estimate_workspace_size(params(b, e, 0)));
  void* ws = get<char>(ws_, wsb);
  const size_t rows = size_t(num_heads) * n_last_, cells = size_t(num_heads) * n_;
  float* lmax = get<float>(lmax_, rows);
  float* lsum = get<float>(lsum_, rows);
  float* tmax = get<float>(tmax_, rows);
  float* tsum = get<float>(tsum_, rows);
  float* gmax = get<float>(gmax_, rows * sp_size_);
  float* gsum = get<float>(gsum_, rows * sp_size_);
  float* col = get<float>(col_, cells);
  float* slash = get<float>(slash_, cells);
  float* coltmp = get<float>(coltmp_, size_t(num_heads) * max_range_);

  // (1) Local row statistics over this rank's key ranges (every rank has >= 1 range).
  {
    int64_t off = 0;
    bool first = true;
    for (auto [b, e] : mine) {
      f_.ok(ix::vs_row_stats(params(b, e, off), first ? lmax : tmax, first ? lsum : tsum, ws, wsb,
                             st_),
            "sp estimation: vs_row_stats", layer);
      if (!first)
        f_.ok(ix::vs_combine_row_stats(lmax, lsum, tmax, tsum, rows, st_), "sp estimation: combine",
              layer);
      first = false;
      off += e - b;
    }
  }
  // (2) Global statistics: gathered, then combined in rank order (identical on all ranks).
  if (sp_size_ > 1) {
    f_.cok(sp_->all_gather(lmax, gmax, rows, DType::kF32, st_), *sp_,
           "sp estimation: all_gather row max", layer);
    f_.cok(sp_->all_gather(lsum, gsum, rows, DType::kF32, st_), *sp_,
           "sp estimation: all_gather row sum", layer);
    comm_bytes_ += int64_t(rows) * 8;
    for (int r = 1; r < sp_size_; ++r)
      f_.ok(ix::vs_combine_row_stats(gmax, gsum, gmax + r * rows, gsum + r * rows, rows, st_),
            "sp estimation: combine gathered row stats", layer);
  } else {
    f_.ck(cudaMemcpyAsync(gmax, lmax, rows * 4, cudaMemcpyDeviceToDevice, st_),
          "sp estimation: copy", layer);
    f_.ck(cudaMemcpyAsync(gsum, lsum, rows * 4, cudaMemcpyDeviceToDevice, st_),
          "sp estimation: copy", layer);
  }
  // (3) Scores: local columns at their global positions, slash offsets global.
  f_.ck(cudaMemsetAsync(col, 0, cells * 4, st_), "sp estimation: clear scores", layer);
  f_.ck(cudaMemsetAsync(slash, 0, cells * 4, st_), "sp estimation: clear scores", layer);
  {
    int64_t off = 0;
    for (auto [b, e] : mine) {
      const int64_t len = e - b;
      f_.ck(cudaMemsetAsync(coltmp, 0, size_t(num_heads) * len * 4, st_),
            "sp estimation: clear scores", layer);
      f_.ok(ix::vs_scores(params(b, e, off), gmax, gsum, coltmp, slash, ws, wsb, st_),
            "sp estimation: vs_scores", layer);
      f_.ck(cudaMemcpy2DAsync(col + b, size_t(n_) * 4, coltmp, size_t(len) * 4, size_t(len) * 4,
                              num_heads, cudaMemcpyDeviceToDevice, st_),
            "sp estimation: placing column scores", layer);
      off += len;
    }
  }
  if (sp_size_ > 1) {
    f_.cok(sp_->all_reduce(col, col, cells, DType::kF32, comm::ReduceOp::kSum, st_), *sp_,
           "sp estimation: all_reduce column scores", layer);
    f_.cok(sp_->all_reduce(slash, slash, cells, DType::kF32, comm::ReduceOp::kSum, st_), *sp_,
           "sp estimation: all_reduce slash scores", layer);
    comm_bytes_ += int64_t(cells) * 8;
  }
  // (4) The same selection on the same arrays on every rank.
  for (int h0 = 0; h0 < num_heads; h0 += ix::kMaxHeadsPerCall) {
    const int m = std::min(ix::kMaxHeadsPerCall, num_heads - h0);
    ix::VsSelectionsDevice part = out;
    part.num_heads = m;
    part.columns += size_t(h0) * out.col_capacity;
    part.offsets += size_t(h0) * out.off_capacity;
    part.n_columns += h0;
    part.n_offsets += h0;
    f_.ok(ix::vs_select(col + size_t(h0) * n_, slash + size_t(h0) * n_, v_budget + h0,
                        s_budget + h0, &part, ws, wsb, st_, tau ? tau + h0 : nullptr),
          "sp estimation: vs_select", layer);
  }
}

void SpEstimator::block_sparse(const uint16_t* q_local, int64_t q_row, const uint16_t* k_local,
                               int64_t k_row, int num_heads, int num_kv_heads, int head_dim,
                               float scale, const int* topk, int* blocks, int k_out, int layer) {
  namespace ix = cuda::index;
  const int64_t nb = num_blocks(n_), d = head_dim;
  const size_t qcells = size_t(num_heads) * nb * d, kcells = size_t(num_kv_heads) * nb * d;
  float* qpool = get<float>(qpool_, qcells);
  float* kpool = get<float>(kpool_, kcells);
  f_.ck(cudaMemsetAsync(qpool, 0, qcells * 4, st_), "sp estimation: clear pooled blocks", layer);
  f_.ck(cudaMemsetAsync(kpool, 0, kcells * 4, st_), "sp estimation: clear pooled blocks", layer);
  int64_t off = 0;
  for (auto [b, e] : layout_[me_]) {
    if (b % kBlock != 0 || (e % kBlock != 0 && e != n_))
      f_.raise("sp estimation: token range [" + std::to_string(b) + ", " + std::to_string(e) +
               ") is not 64-aligned");
    const int64_t b0 = b / kBlock;
    f_.ok(ix::block_mean_pool(q_local + size_t(off) * q_row, q_row, head_dim, e - b, num_heads,
                              head_dim, DType::kBF16, qpool + b0 * d, nb, st_),
          "sp estimation: pooling queries", layer);
    f_.ok(ix::block_mean_pool(k_local + size_t(off) * k_row, k_row, head_dim, e - b, num_kv_heads,
                              head_dim, DType::kBF16, kpool + b0 * d, nb, st_),
          "sp estimation: pooling keys", layer);
    off += e - b;
  }
  if (sp_size_ > 1) {
    f_.cok(sp_->all_reduce(qpool, qpool, qcells, DType::kF32, comm::ReduceOp::kSum, st_), *sp_,
           "sp estimation: all_reduce pooled queries", layer);
    f_.cok(sp_->all_reduce(kpool, kpool, kcells, DType::kF32, comm::ReduceOp::kSum, st_), *sp_,
           "sp estimation: all_reduce pooled keys", layer);
    comm_bytes_ += int64_t(qcells + kcells) * 4;
  }
  // Calls of whole kv groups (at most kMaxHeadsPerCall heads each).
  const int group = num_heads / num_kv_heads;
  const int per_call = std::max(1, ix::kMaxHeadsPerCall / group) * group;
  for (int h0 = 0; h0 < num_heads; h0 += per_call) {
    const int m = std::min(per_call, num_heads - h0);
    f_.ok(ix::block_sparse_select_pooled(qpool + size_t(h0) * nb * d,
                                         kpool + size_t(h0 / group) * nb * d, n_, m,
                                         std::max(1, m / group), head_dim, scale, topk + h0,
                                         blocks + size_t(h0) * nb * k_out, k_out, st_),
          "sp estimation: block-sparse top-k", layer);
  }
}

}  // namespace mprefill::gpu
