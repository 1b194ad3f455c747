#include "worker/ring_attention.h"

#include <algorithm>
#include <exception>
#include <limits>
#include <thread>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cpu/cpu.h"

namespace mprefill {
namespace {

int64_t token_count(const TokenRanges& r) {
  int64_t n = 0;
  for (auto [b, e] : r) n += e - b;
  return n;
}

Status fail(std::string* error, Status s, const std::string& what) {
  if (error) *error = what;
  return s;
}

// One ring transfer, posted as a group: send (k, v) of `send_tokens` rows to `to`, receive
// `recv_tokens` rows into (rk, rv) from `from`. Zero-row messages are skipped on both
// sides (both derive the counts from the same plan). On failure `err` holds last_error().
Status exchange(comm::Communicator& c, const float* k, const float* v, size_t send_count, float* rk,
                float* rv, size_t recv_count, int to, int from, std::string* err) {
  Status first = c.group_start();
  if (first != Status::kOk) {
    *err = c.last_error();
    return first;
  }
  auto keep = [&](Status s) {
    if (s != Status::kOk && first == Status::kOk) {
      first = s;
      *err = c.last_error();
    }
  };
  if (send_count > 0) {
    keep(c.send(k, send_count, DType::kF32, to, nullptr));
    keep(c.send(v, send_count, DType::kF32, to, nullptr));
  }
  if (recv_count > 0) {
    keep(c.recv(rk, recv_count, DType::kF32, from, nullptr));
    keep(c.recv(rv, recv_count, DType::kF32, from, nullptr));
  }
  keep(c.group_end());  // always closes the group, even after a failed post
  return first;
}

}  // namespace

Status ring_attention_cpu(comm::Communicator& sp, const TokenRanges& mine, int64_t n_total,
                          const float* q, const float* k, const float* v, float* o, float* lse,
                          int num_heads, int num_kv_heads, int head_dim, float scale,
                          std::string* error) {
  const int rank = sp.rank(), size = sp.size();
  const std::string who = "ring attention rank " + std::to_string(rank) + ": ";
  if (num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || num_heads % num_kv_heads != 0 ||
      n_total < 0 || !(scale > 0.f)) {
    return fail(error, Status::kInvalidArgument,
                who + "bad shape (heads " + std::to_string(num_heads) + ", kv heads " +
                    std::to_string(num_kv_heads) + ", head_dim " + std::to_string(head_dim) +
                    ", n " + std::to_string(n_total) + ")");
  }
  std::vector<TokenRanges> plan;
  try {
    plan = plan_sequence_parallel(n_total, size);
  } catch (const std::exception& e) {
    return fail(error, Status::kInvalidArgument, who + e.what());
  }
  if (plan[rank] != mine) {
    return fail(error, Status::kInvalidArgument,
                who + "token ranges differ from plan_sequence_parallel(" + std::to_string(n_total) +
                    ", " + std::to_string(size) + ")");
  }
  const int64_t n_local = token_count(mine);
  if (n_local > std::numeric_limits<int>::max())
    return fail(error, Status::kInvalidArgument, who + "too many local tokens");
  if (n_local > 0 && (!q || !k || !v || !o)) {
    return fail(error, Status::kInvalidArgument, who + "null q/k/v/o");
  }

  const int64_t q_row = int64_t{num_heads} * head_dim;
  const int64_t kv_row = int64_t{num_kv_heads} * head_dim;
  int64_t max_tokens = 0;
  for (const auto& r : plan) max_tokens = std::max(max_tokens, token_count(r));

  // Running state (o, lse) and one step's partial state, same layouts.
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(o, o + n_local * q_row, 0.f);
  std::vector<float> lse_own;
  if (!lse) {
    lse_own.resize(static_cast<size_t>(num_heads * n_local));
    lse = lse_own.data();
  }
  std::fill(lse, lse + num_heads * n_local, neg_inf);
  std::vector<float> o_part(static_cast<size_t>(n_local * q_row));
  std::vector<float> lse_part(static_cast<size_t>(num_heads * n_local));

  // Receive slots: the shard of step s arrives in slot s % 2 during step s - 1.
  std::vector<float> kbuf[2], vbuf[2];
  if (size > 1) {
    for (int i = 0; i < 2; ++i) {
      kbuf[i].resize(static_cast<size_t>(max_tokens * kv_row));
      vbuf[i].resize(static_cast<size_t>(max_tokens * kv_row));
    }
  }
  const int next = (rank + 1) % size, prev = (rank + size - 1) % size;

  const float* cur_k = k;
  const float* cur_v = v;
  for (int step = 0; step < size; ++step) {
    const int owner = (rank - step + size) % size;  // whose K/V this step holds
    const TokenRanges& keys = plan[owner];
    const int64_t cur_tokens = token_count(keys);

    // Post the transfer of the next shard before computing this one. The helper thread
    // alone uses `sp` until joined; this thread only reads cur_k/cur_v meanwhile.
    std::thread xfer;
    Status xfer_status = Status::kOk;
    std::string xfer_error;
    const bool more = step + 1 < size;
    float* nk = nullptr;
    float* nv = nullptr;
    if (more) {
      const int next_owner = (owner + size - 1) % size;
      const size_t send_count = static_cast<size_t>(cur_tokens * kv_row);
      const size_t recv_count = static_cast<size_t>(token_count(plan[next_owner]) * kv_row);
      nk = kbuf[(step + 1) % 2].data();
      nv = vbuf[(step + 1) % 2].data();
      try {
        xfer = std::thread([&, send_count, recv_count, cur_k, cur_v, nk, nv] {
          xfer_status =
              exchange(sp, cur_k, cur_v, send_count, nk, nv, recv_count, next, prev, &xfer_error);
        });
      } catch (const std::exception& e) {  // thread creation failed: run it inline
        xfer_status =
            exchange(sp, cur_k, cur_v, send_count, nk, nv, recv_count, next, prev, &xfer_error);
      }
    }

    // Every (query range, key range) pair with at least one visible key.
    Status compute_status = Status::kOk;
    int64_t q_off = 0;
    for (auto [qb, qe] : mine) {
      int64_t k_off = 0;
      for (auto [kb, ke] : keys) {
        if (kb < qe && compute_status == Status::kOk) {  // else fully masked
          AttentionParams p;
          p.q = q + q_off * q_row;
          p.k = cur_k + k_off * kv_row;
          p.v = cur_v + k_off * kv_row;
          p.o = o_part.data() + q_off * q_row;
          p.lse = lse_part.data() + q_off;
          p.n_q = static_cast<int>(qe - qb);
          p.n_k = static_cast<int>(ke - kb);
          p.num_heads = num_heads;
          p.num_kv_heads = num_kv_heads;
          p.head_dim = head_dim;
          set_packed_strides(p);
          p.lse_head_stride = n_local;
          p.q_pos0 = qb;
          p.k_pos0 = kb;
          p.causal = true;
          p.scale = scale;
          p.dtype = DType::kF32;
          compute_status = cpu::attention_dense(p);
          if (compute_status == Status::kOk) {
            MergeParams m;
            m.o_a = o + q_off * q_row;
            m.lse_a = lse + q_off;
            m.o_b = o_part.data() + q_off * q_row;
            m.lse_b = lse_part.data() + q_off;
            m.row_stride = q_row;
            m.head_stride = head_dim;
            m.lse_head_stride = n_local;
            m.n = p.n_q;
            m.num_heads = num_heads;
            m.head_dim = head_dim;
            compute_status = cpu::merge_states(m);
          }
        }
        k_off += ke - kb;
      }
      q_off += qe - qb;
    }

    if (xfer.joinable()) xfer.join();
    if (compute_status != Status::kOk) {
      return fail(error, compute_status,
                  who + "step " + std::to_string(step) + ": attention of the shard of rank " +
                      std::to_string(owner) + " failed: " + to_string(compute_status));
    }
    if (xfer_status != Status::kOk) {
      return fail(error, xfer_status,
                  who + "step " + std::to_string(step) + ": ring transfer (send to " +
                      std::to_string(next) + ", recv from " + std::to_string(prev) +
                      ") failed: " + xfer_error);
    }
    cur_k = nk;
    cur_v = nv;
  }
  return Status::kOk;
}

}  // namespace mprefill
