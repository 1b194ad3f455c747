#include "engine/distributed_estimate.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/cpu.h"

namespace mprefill {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The one failure path of both estimators: the status, and in *error the one line the
// caller's edge check (kernels/edge_check.h) passes on as the backend text.
Status fail(const comm::Communicator& sp, Status s, const char* fn, const std::string& stage,
            const std::string& detail, std::string* error) {
  if (error) {
    *error = "sp rank " + std::to_string(sp.rank()) + ": " + fn + ": " + stage;
    if (!detail.empty()) *error += ": " + detail;
  }
  return s;
}

// block_sparse_estimate_distributed's antidiagonal form (ranges and shapes checked there).
// Every rank reaches both all_reduces, also when its own selection fails.
Status antidiag_distributed(comm::Communicator& sp, const TokenRanges& mine, int64_t n,
                            const float* q_local, const float* k_local, int num_heads,
                            int num_kv_heads, int d, float scale, const int* topk,
                            BlockSparseIndex* out, std::string* error, const double* tau,
                            int stride) {
  const char* fn = "block_sparse_estimate_distributed";
  int kmax = 0;
  for (int h = 0; h < num_heads; ++h) {
    if (topk[h] < 1 || (tau && !cpu::valid_tau(tau[h])))
      return fail(sp, Status::kInvalidArgument, fn, "arguments", "top-k < 1 or tau outside (0, 1]",
                  error);
    kmax = std::max(kmax, topk[h]);
  }
  if (!(scale > 0.f) || !std::isfinite(scale))
    return fail(sp, Status::kInvalidArgument, fn, "arguments", "bad scale", error);
  const int64_t rows = (n + stride - 1) / stride, w = int64_t{stride} * d, nb = num_blocks(n);
  const int64_t q_row = int64_t{num_heads} * d, k_row = int64_t{num_kv_heads} * d;
  std::vector<float> kp(static_cast<size_t>(num_kv_heads * rows * w), 0.f), part;
  int64_t off = 0;
  for (auto [b, e] : mine) {
    const int64_t len = e - b, lr = (len + stride - 1) / stride;
    if (len == 0) continue;
    part.resize(static_cast<size_t>(num_kv_heads * lr * w));
    cpu::antidiag_pack(k_local + off * k_row, k_row, d, num_kv_heads, d, len, stride, false,
                       part.data());
    for (int h = 0; h < num_kv_heads; ++h)
      std::copy_n(part.data() + h * lr * w, lr * w, kp.data() + (h * rows + b / stride) * w);
    off += len;
  }
  if (const Status s = sp.all_reduce(kp.data(), kp.data(), kp.size(), DType::kF32,
                                     comm::ReduceOp::kSum, nullptr);
      s != Status::kOk) {
    return fail(sp, s, fn, "all_reduce strided keys", sp.last_error(), error);
  }
  std::vector<int32_t> lists(static_cast<size_t>(num_heads * nb * kmax), 0);
  std::vector<int> sel;
  Status mine_status = Status::kOk;
  off = 0;
  for (auto [b, e] : mine) {
    const int64_t len = e - b, lr = (len + stride - 1) / stride;
    if (len == 0 || mine_status != Status::kOk) continue;
    part.resize(static_cast<size_t>(num_heads * lr * w));
    cpu::antidiag_pack(q_local + off * q_row, q_row, d, num_heads, d, len, stride, true,
                       part.data());
    off += len;
    cpu::AntidiagParams a;
    a.q_packed = part.data();
    a.k_packed = kp.data();
    a.seq_len = n;
    a.qb0 = b / kBlock;
    a.qb1 = num_blocks(e);
    a.num_heads = num_heads;
    a.num_kv_heads = num_kv_heads;
    a.head_dim = d;
    a.stride = stride;
    a.scale = scale;
    const int64_t nq = a.qb1 - a.qb0;
    sel.resize(static_cast<size_t>(num_heads * nq * kmax));
    mine_status = cpu::antidiag_select(a, topk, tau, kmax, sel.data());
    for (int64_t h = 0; mine_status == Status::kOk && h < num_heads; ++h)
      for (int64_t i = 0; i < nq * kmax; ++i)
        lists[(h * nb + a.qb0) * kmax + i] = sel[h * nq * kmax + i] + 1;
  }
  if (const Status s = sp.all_reduce(lists.data(), lists.data(), lists.size(), DType::kI32,
                                     comm::ReduceOp::kSum, nullptr);
      s != Status::kOk) {
    return fail(sp, s, fn, "all_reduce block lists", sp.last_error(), error);
  }
  if (mine_status != Status::kOk)
    return fail(sp, mine_status, fn, "antidiag_select", to_string(mine_status), error);
  out->seq_len = n;
  out->num_heads = num_heads;
  out->nblocks = nb;
  out->k = kmax;
  out->blocks.resize(lists.size());
  for (size_t i = 0; i < lists.size(); ++i) out->blocks[i] = lists[i] - 1;
  return Status::kOk;
}

}  // namespace

VsEstimateParams vs_call_params(const VsCallShape& s, const void* q_last, const void* k,
                                int64_t k_pos0, int n_k) {
  VsEstimateParams p;
  p.q_last = q_last;
  p.k = k;
  p.q_row_stride = s.q_row;
  p.q_head_stride = s.head_dim;
  p.k_row_stride = s.k_row;
  p.k_head_stride = s.head_dim;
  p.n_last = s.n_last;
  p.seq_len = s.seq_len;
  p.n_k = n_k;
  p.k_pos0 = k_pos0;
  p.num_heads = s.num_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_dim = s.head_dim;
  p.scale = s.scale;
  p.dtype = s.dtype;
  return p;
}

Status vs_estimate_distributed(comm::Communicator& sp, const TokenRanges& mine, int64_t n_total,
                               const float* q_local, const float* k_local, int num_heads,
                               int num_kv_heads, int head_dim, float scale, const int* v_budget,
                               const int* s_budget, std::vector<VsSelection>* out,
                               std::string* error, VsGlobalScores* scores, const double* tau) {
  const Status bad = Status::kInvalidArgument;
  if (!out || !v_budget || !s_budget)
    return fail(sp, bad, "vs_estimate_distributed", "arguments", "null output/budget", error);
  for (int h = 0; tau && h < num_heads; ++h)
    if (!cpu::valid_tau(tau[h]))
      return fail(sp, bad, "vs_estimate_distributed", "arguments", "tau outside (0, 1]", error);
  if (n_total <= 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 ||
      num_heads % num_kv_heads != 0 || !(scale > 0.f) || !std::isfinite(scale)) {
    return fail(sp, bad, "vs_estimate_distributed", "arguments", "bad n_total/heads/head_dim/scale",
                error);
  }
  int64_t n_local = 0, prev_end = 0;
  for (auto [b, e] : mine) {
    if (b < prev_end || e < b || e > n_total) {
      return fail(sp, bad, "vs_estimate_distributed", "arguments",
                  "ranges not ascending inside [0, n_total)", error);
    }
    prev_end = e;
    n_local += e - b;
  }
  if (n_local > 0 && (!q_local || !k_local)) {
    return fail(sp, bad, "vs_estimate_distributed", "arguments", "null q/k with local tokens",
                error);
  }

  const int64_t n = n_total;
  const int n_last = static_cast<int>(std::min<int64_t>(kBlock, n));
  const int64_t q_row = int64_t{num_heads} * head_dim, k_row = int64_t{num_kv_heads} * head_dim;
  const int64_t first_row = n - n_last;

  // (1) The last n_last query rows on every rank: owners write their rows into a zeroed
  // buffer, a SUM all_reduce adds exact zeros elsewhere (the values arrive unchanged).
  std::vector<float> q_last(static_cast<size_t>(n_last) * q_row, 0.f);
  {
    int64_t off = 0;
    for (auto [b, e] : mine) {
      for (int64_t t = std::max(b, first_row); t < e; ++t) {
        std::copy_n(q_local + (off + t - b) * q_row, q_row,
                    q_last.data() + (t - first_row) * q_row);
      }
      off += e - b;
    }
  }
  if (const Status s = sp.all_reduce(q_last.data(), q_last.data(), q_last.size(), DType::kF32,
                                     comm::ReduceOp::kSum, nullptr);
      s != Status::kOk) {
    return fail(sp, s, "vs_estimate_distributed", "all_reduce last query rows", sp.last_error(),
                error);
  }

  // Params of one local key range [b, e) whose rows start at local row off.
  VsCallShape shape;
  shape.num_heads = num_heads;
  shape.num_kv_heads = num_kv_heads;
  shape.head_dim = head_dim;
  shape.n_last = n_last;
  shape.seq_len = n;
  shape.q_row = q_row;
  shape.k_row = k_row;
  shape.scale = scale;
  auto params = [&](int64_t b, int64_t e, int64_t off) {
    return vs_call_params(shape, q_last.data(), k_local + off * k_row, b, static_cast<int>(e - b));
  };

  // (2) Row statistics: local combine over ranges, then global max and rescaled sums.
  const size_t n_rows = static_cast<size_t>(num_heads) * n_last;
  RowStats local;
  local.max.assign(n_rows, kNegInf);
  local.sum.assign(n_rows, 0.f);
  {
    int64_t off = 0;
    for (auto [b, e] : mine) {
      if (e > b) {
        RowStats part;
        if (const Status s = cpu::vs_row_stats(params(b, e, off), &part); s != Status::kOk) {
          return fail(sp, s, "vs_estimate_distributed",
                      "vs_row_stats of keys [" + std::to_string(b) + ", " + std::to_string(e) + ")",
                      "", error);
        }
        cpu::combine_row_stats(local, part);
      }
      off += e - b;
    }
  }
  RowStats global;
  global.max.assign(n_rows, kNegInf);
  global.sum.assign(n_rows, 0.f);
  if (const Status s = sp.all_reduce(local.max.data(), global.max.data(), n_rows, DType::kF32,
                                     comm::ReduceOp::kMax, nullptr);
      s != Status::kOk) {
    return fail(sp, s, "vs_estimate_distributed", "all_reduce row max", sp.last_error(), error);
  }
  for (size_t i = 0; i < n_rows; ++i) {
    // A rank without causal keys for row i holds (-inf, 0) and contributes 0.
    local.sum[i] =
        local.max[i] == kNegInf
            ? 0.f
            : static_cast<float>(local.sum[i] *
                                 std::exp(static_cast<double>(local.max[i]) - global.max[i]));
  }
  if (const Status s = sp.all_reduce(local.sum.data(), global.sum.data(), n_rows, DType::kF32,
                                     comm::ReduceOp::kSum, nullptr);
      s != Status::kOk) {
    return fail(sp, s, "vs_estimate_distributed", "all_reduce row sum", sp.last_error(), error);
  }

  // (3) Scores. Column scores of local columns land at their global positions (zeros
  // elsewhere, so the SUM all_reduce leaves them unchanged); slash scores are fp32 sums of
  // per-range partial sums, summed again across ranks, so they may differ from the
  // single-process sum in the last ulps (the order of the fp32 additions differs), and
  // the row sums above differ likewise.
  const size_t n_cells = static_cast<size_t>(num_heads) * n;
  std::vector<float> col(n_cells, 0.f), slash(n_cells, 0.f), col_part;
  {
    int64_t off = 0;
    for (auto [b, e] : mine) {
      const int64_t len = e - b;
      if (len > 0) {
        col_part.assign(static_cast<size_t>(num_heads) * len, 0.f);
        if (const Status s =
                cpu::vs_scores(params(b, e, off), global, col_part.data(), slash.data());
            s != Status::kOk) {
          return fail(sp, s, "vs_estimate_distributed",
                      "vs_scores of keys [" + std::to_string(b) + ", " + std::to_string(e) + ")",
                      "", error);
        }
        for (int h = 0; h < num_heads; ++h) {
          std::copy_n(col_part.data() + h * len, len, col.data() + h * n + b);
        }
      }
      off += len;
    }
  }
  if (const Status s = sp.all_reduce(col.data(), col.data(), n_cells, DType::kF32,
                                     comm::ReduceOp::kSum, nullptr);
      s != Status::kOk) {
    return fail(sp, s, "vs_estimate_distributed", "all_reduce column scores", sp.last_error(),
                error);
  }
  if (const Status s = sp.all_reduce(slash.data(), slash.data(), n_cells, DType::kF32,
                                     comm::ReduceOp::kSum, nullptr);
      s != Status::kOk) {
    return fail(sp, s, "vs_estimate_distributed", "all_reduce slash scores", sp.last_error(),
                error);
  }

  // (4) The same deterministic selection on the same arrays on every rank.
  out->assign(num_heads, {});
  for (int h = 0; h < num_heads; ++h) {
    (*out)[h] = cpu::vs_select(col.data() + h * n, slash.data() + h * n, n, v_budget[h],
                               s_budget[h], tau ? tau[h] : 0.0);
  }
  if (scores) {
    scores->col = std::move(col);
    scores->slash = std::move(slash);
  }
  return Status::kOk;
}

Status block_sparse_estimate_distributed(comm::Communicator& sp, const TokenRanges& mine,
                                         int64_t n_total, const float* q_local,
                                         const float* k_local, int num_heads, int num_kv_heads,
                                         int head_dim, float scale, const int* topk,
                                         BlockSparseIndex* out, std::string* error,
                                         const double* tau, int stride) {
  const Status bad = Status::kInvalidArgument;
  if (!out || !topk)
    return fail(sp, bad, "block_sparse_estimate_distributed", "arguments", "null output/topk",
                error);
  if (n_total <= 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 ||
      num_heads % num_kv_heads != 0) {
    return fail(sp, bad, "block_sparse_estimate_distributed", "arguments",
                "bad n_total/heads/head_dim", error);
  }
  int64_t n_local = 0, prev_end = 0;
  for (auto [b, e] : mine) {
    if (b < prev_end || e < b || e > n_total || b % kBlock != 0 ||
        (e % kBlock != 0 && e != n_total)) {
      return fail(sp, bad, "block_sparse_estimate_distributed", "arguments",
                  "ranges not ascending, 64-aligned, inside [0, n_total)", error);
    }
    prev_end = e;
    n_local += e - b;
  }
  if (n_local > 0 && (!q_local || !k_local))
    return fail(sp, bad, "block_sparse_estimate_distributed", "arguments", "null q/k", error);
  if (stride != 0) {
    if (!valid_antidiag_stride(stride))
      return fail(sp, bad, "block_sparse_estimate_distributed", "arguments",
                  "stride " + std::to_string(stride) + " does not divide 64", error);
    return antidiag_distributed(sp, mine, n_total, q_local, k_local, num_heads, num_kv_heads,
                                head_dim, scale, topk, out, error, tau, stride);
  }
  const int64_t nb = num_blocks(n_total), d = head_dim;
  const int64_t q_row = int64_t{num_heads} * d, k_row = int64_t{num_kv_heads} * d;
  std::vector<float> qpool(static_cast<size_t>(num_heads * nb * d), 0.f);
  std::vector<float> kpool(static_cast<size_t>(num_kv_heads * nb * d), 0.f);
  {
    int64_t off = 0;
    std::vector<float> part;
    for (auto [b, e] : mine) {
      const int64_t len = e - b, lb = num_blocks(len), b0 = b / kBlock;
      if (len == 0) continue;
      part.assign(static_cast<size_t>(num_heads * lb * d), 0.f);
      cpu::block_mean_pool(q_local + off * q_row, q_row, d, num_heads, head_dim, len, part.data());
      for (int h = 0; h < num_heads; ++h)
        std::copy_n(part.data() + h * lb * d, lb * d, qpool.data() + (h * nb + b0) * d);
      part.assign(static_cast<size_t>(num_kv_heads * lb * d), 0.f);
      cpu::block_mean_pool(k_local + off * k_row, k_row, d, num_kv_heads, head_dim, len,
                           part.data());
      for (int h = 0; h < num_kv_heads; ++h)
        std::copy_n(part.data() + h * lb * d, lb * d, kpool.data() + (h * nb + b0) * d);
      off += len;
    }
  }
  if (const Status s = sp.all_reduce(qpool.data(), qpool.data(), qpool.size(), DType::kF32,
                                     comm::ReduceOp::kSum, nullptr);
      s != Status::kOk) {
    return fail(sp, s, "block_sparse_estimate_distributed", "all_reduce pooled queries",
                sp.last_error(), error);
  }
  if (const Status s = sp.all_reduce(kpool.data(), kpool.data(), kpool.size(), DType::kF32,
                                     comm::ReduceOp::kSum, nullptr);
      s != Status::kOk) {
    return fail(sp, s, "block_sparse_estimate_distributed", "all_reduce pooled keys",
                sp.last_error(), error);
  }
  if (const Status s = cpu::block_sparse_select(qpool.data(), kpool.data(), n_total, num_heads,
                                                num_kv_heads, head_dim, scale, topk, out, tau);
      s != Status::kOk) {
    return fail(sp, s, "block_sparse_estimate_distributed", "block_sparse_select", to_string(s),
                error);
  }
  return Status::kOk;
}

}  // namespace mprefill
