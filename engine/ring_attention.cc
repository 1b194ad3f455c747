#include "engine/ring_attention.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <vector>

#include "comm/ring_pass.h"
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

std::string bad_shape(const std::string& who, int num_heads, int num_kv_heads, int head_dim,
                      int64_t n_total) {
  return who + "bad shape (heads " + std::to_string(num_heads) + ", kv heads " +
         std::to_string(num_kv_heads) + ", head_dim " + std::to_string(head_dim) + ", n " +
         std::to_string(n_total) + ")";
}

// The running output of this rank's rows, o [n_local][q_row] and lse [heads][n_local]
// (zero and -inf: no key yet; lse owned here when the caller passes none), and one
// step's partial output of the same layouts.
struct RingOutput {
  float* lse = nullptr;
  std::vector<float> lse_own, o_part, lse_part;

  RingOutput(float* o, float* lse_in, int64_t n_local, int64_t q_row, int num_heads) {
    std::fill(o, o + n_local * q_row, 0.f);
    lse = lse_in;
    if (!lse) {
      lse_own.resize(static_cast<size_t>(num_heads * n_local));
      lse = lse_own.data();
    }
    std::fill(lse, lse + num_heads * n_local, -std::numeric_limits<float>::infinity());
    o_part.resize(static_cast<size_t>(n_local * q_row));
    lse_part.resize(static_cast<size_t>(num_heads * n_local));
  }
};

// The ring both forms run (comm/ring_pass.h): at each step compute(owner's ranges, k, v)
// runs on the shard this rank holds while a helper thread moves it on. Adds the step
// times and bytes sent to st.
template <class Compute>
Status run_ring(comm::Communicator& sp, const std::vector<TokenRanges>& layout, int64_t kv_row,
                const float* k, const float* v, const std::string& who, RingStats* st,
                std::string* error, Compute&& compute) {
  comm::RingPlan plan;
  plan.layout = layout;
  comm::HostRingTransport transport(sp, k, v, kv_row, plan.max_rows());
  comm::RingPassStats ps;
  const Status s = comm::ring_pass(
      sp.rank(), plan, transport,
      [&](const comm::RingStep& step) {
        return compute(layout[step.owner], transport.k(step.step), transport.v(step.step));
      },
      &ps, error, who);
  st->compute_ms += ps.compute_ms;
  st->wait_ms += ps.wait_ms;
  st->bytes_sent += ps.rows_sent * kv_row * 2 * static_cast<int64_t>(sizeof(float));
  return s;
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
                bad_shape(who, num_heads, num_kv_heads, head_dim, n_total));
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
  RingOutput out(o, lse, n_local, q_row, num_heads);

  // Every (query range, key range) pair with at least one visible key.
  auto compute = [&](const TokenRanges& keys, const float* cur_k, const float* cur_v) {
    int64_t q_off = 0;
    for (auto [qb, qe] : mine) {
      int64_t k_off = 0;
      for (auto [kb, ke] : keys) {
        if (kb < qe) {  // else fully masked
          AttentionParams p;
          p.q = q + q_off * q_row;
          p.k = cur_k + k_off * kv_row;
          p.v = cur_v + k_off * kv_row;
          p.o = out.o_part.data() + q_off * q_row;
          p.lse = out.lse_part.data() + q_off;
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
          Status s = cpu::attention_dense(p);
          if (s != Status::kOk) return s;
          MergeParams m;
          m.o_a = o + q_off * q_row;
          m.lse_a = out.lse + q_off;
          m.o_b = out.o_part.data() + q_off * q_row;
          m.lse_b = out.lse_part.data() + q_off;
          m.row_stride = q_row;
          m.head_stride = head_dim;
          m.lse_head_stride = n_local;
          m.n = p.n_q;
          m.num_heads = num_heads;
          m.head_dim = head_dim;
          s = cpu::merge_states(m);
          if (s != Status::kOk) return s;
        }
        k_off += ke - kb;
      }
      q_off += qe - qb;
    }
    return Status::kOk;
  };
  RingStats st;
  return run_ring(sp, plan, kv_row, k, v, who, &st, error, compute);
}

namespace {

// Key blocks touched by the keys [lo, hi).
int64_t blocks_touched(int64_t lo, int64_t hi) {
  return lo < hi ? (hi - 1) / kBlock - lo / kBlock + 1 : 0;
}

// Blocks touched by the union of [a0, a1) and [b0, b1) (a0 <= b0).
int64_t union_blocks(int64_t a0, int64_t a1, int64_t b0, int64_t b1) {
  const int64_t na = blocks_touched(a0, a1), nb = blocks_touched(b0, b1);
  if (na == 0 || nb == 0) return na + nb;
  const int64_t lo = std::max(a0 / kBlock, b0 / kBlock);
  const int64_t hi = std::min((a1 - 1) / kBlock, (b1 - 1) / kBlock);
  return na + nb - std::max<int64_t>(0, hi - lo + 1);
}

}  // namespace

int64_t mask_tiles(const HeadMask& m, int64_t qb, int64_t kb, int64_t ke, int64_t n) {
  const int64_t m0 = qb * kBlock, m1 = std::min(m0 + kBlock, n);
  ke = std::min(ke, m1);  // causal: no key at or after m1 is visible to the block
  if (kb >= ke || m0 >= m1) return 0;
  switch (m.kind) {
    case PatternKind::kDense:
      return blocks_touched(kb, ke);
    case PatternKind::kAShape: {
      // Rows r in [m0, m1) see [0, n_init) and [r - n_local + 1, r]: the block sees
      // [0, n_init) and [m0 - n_local + 1, m1).
      const int64_t i0 = kb, i1 = std::min<int64_t>(ke, m.n_init);
      if (m.n_local <= 0) return blocks_touched(i0, i1);
      const int64_t l0 = std::max({kb, m0 - m.n_local + 1, int64_t{0}}), l1 = ke;
      if (i1 <= i0) return blocks_touched(l0, l1);
      return union_blocks(i0, i1, std::max(l0, i0), l1);
    }
    case PatternKind::kVerticalSlash: {
      const int64_t hb = m.vs_head * m.vs.nblocks + qb;
      int64_t tiles = 0;
      for (int64_t t = m.vs.range_ptr[hb]; t < m.vs.range_ptr[hb + 1]; ++t) {
        const int64_t lo = std::max<int64_t>(m.vs.range_lo[t], kb);
        const int64_t hi = std::min<int64_t>(m.vs.range_hi[t], ke);
        if (lo < hi) tiles += (hi - lo + kBlock - 1) / kBlock;
      }
      int64_t cols = 0;
      for (int64_t t = m.vs.col_ptr[hb]; t < m.vs.col_ptr[hb + 1]; ++t)
        cols += m.vs.col[t] >= kb && m.vs.col[t] < ke;
      return tiles + (cols + kBlock - 1) / kBlock;
    }
    case PatternKind::kBlockSparse: {
      const int* list = m.bs.blocks + (m.bs_head * m.bs.nblocks + qb) * m.bs.k;
      int64_t tiles = 0;
      for (int t = 0; t < m.bs.k && list[t] >= 0; ++t) {
        const int64_t lo = int64_t{list[t]} * kBlock;
        tiles += lo < ke && lo + kBlock > kb;
      }
      return tiles;
    }
  }
  return 0;
}

namespace {

// One head's attention under its mask (p: one query head and its KV head).
Status head_kernel(const HeadMask& m, const AttentionParams& p) {
  switch (m.kind) {
    case PatternKind::kDense:
      return cpu::attention_dense(p);
    case PatternKind::kAShape: {
      AShapeParams a;
      a.n_init = &m.n_init;
      a.n_local = &m.n_local;
      return cpu::attention_ashape(p, a);
    }
    case PatternKind::kVerticalSlash:
      return cpu::attention_vs(p, m.vs, m.vs_head);
    case PatternKind::kBlockSparse:
      return cpu::attention_block_sparse(p, m.bs, m.bs_head);
  }
  return Status::kInvalidArgument;
}

// The ranges follow each other with no gap: local row i is global position r[0].first + i.
bool in_order(const TokenRanges& r) {
  for (size_t i = 1; i < r.size(); ++i)
    if (r[i].first != r[i - 1].second) return false;
  return true;
}

// One rank holding every row and key in order (the single process, Engine's prefill):
// each head's kernel over the whole sequence straight into o / lse, with no partial buffer
// and no merge, and a layer whose heads all run dense as one call.
Status one_shard_sparse(int64_t n, const float* q, const float* k, const float* v, float* o,
                        float* lse, int num_heads, int num_kv_heads, int head_dim, float scale,
                        const HeadMask* masks, RingStats* stats, const std::string& who,
                        std::string* error) {
  const auto t0 = std::chrono::steady_clock::now();
  RingStats st;
  bool all_dense = true;
  for (int h = 0; h < num_heads; ++h) {
    all_dense &= masks[h].kind == PatternKind::kDense;
    for (int64_t b = 0; b < num_blocks(n); ++b) st.tiles += mask_tiles(masks[h], b, 0, n, n);
  }
  AttentionParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = o;
  p.lse = lse;
  p.n_q = p.n_k = static_cast<int>(n);
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  set_packed_strides(p);
  p.lse_head_stride = n;
  p.causal = true;
  p.scale = scale;
  p.dtype = DType::kF32;
  Status s = Status::kOk;
  if (all_dense) {
    s = cpu::attention_dense(p);
  } else {
    const int group = num_heads / num_kv_heads;
    for (int h = 0; h < num_heads && s == Status::kOk; ++h) {
      const HeadMask& m = masks[h];
      AttentionParams ph = p;
      ph.num_heads = ph.num_kv_heads = 1;
      ph.q = q + int64_t{h} * head_dim;
      ph.o = o + int64_t{h} * head_dim;
      ph.lse = lse ? lse + int64_t{h} * n : nullptr;
      ph.k = k + int64_t{h / group} * head_dim;
      ph.v = v + int64_t{h / group} * head_dim;
      s = head_kernel(m, ph);
    }
  }
  if (s != Status::kOk) return fail(error, s, who + "attention kernel failed");
  st.compute_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (stats) *stats = st;
  return Status::kOk;
}

}  // namespace

Status ring_attention_sparse_cpu(comm::Communicator& sp, const std::vector<TokenRanges>& layout,
                                 int64_t n_total, const float* q, const float* k, const float* v,
                                 float* o, float* lse, int num_heads, int num_kv_heads,
                                 int head_dim, float scale, const HeadMask* masks, RingStats* stats,
                                 std::string* error) {
  const int rank = sp.rank(), size = sp.size();
  const std::string who = "sparse ring attention rank " + std::to_string(rank) + ": ";
  if (num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || num_heads % num_kv_heads != 0 ||
      n_total <= 0 || !(scale > 0.f) || !masks) {
    return fail(error, Status::kInvalidArgument,
                bad_shape(who, num_heads, num_kv_heads, head_dim, n_total) + " or no masks");
  }
  if (static_cast<int>(layout.size()) != size)
    return fail(error, Status::kInvalidArgument,
                who + "layout has " + std::to_string(layout.size()) + " ranks, the ring " +
                    std::to_string(size));
  // The layout must cover [0, n_total) exactly once with 64-aligned ranges.
  {
    std::vector<std::pair<int64_t, int64_t>> all;
    for (const auto& r : layout) all.insert(all.end(), r.begin(), r.end());
    std::sort(all.begin(), all.end());
    int64_t at = 0;
    bool ok = true;
    for (auto [b, e] : all) {
      ok &= b == at && e > b && b % kBlock == 0 && (e % kBlock == 0 || e == n_total);
      at = e;
    }
    if (!ok || at != n_total)
      return fail(error, Status::kInvalidArgument,
                  who + "layout does not cover [0, " + std::to_string(n_total) +
                      ") once with 64-aligned ranges");
  }
  const TokenRanges& mine = layout[rank];
  const int64_t n_local = token_count(mine);
  if (n_local > 0 && (!q || !k || !v || !o)) {
    return fail(error, Status::kInvalidArgument, who + "null q/k/v/o");
  }
  const int group = num_heads / num_kv_heads;
  const int64_t q_row = int64_t{num_heads} * head_dim;
  const int64_t kv_row = int64_t{num_kv_heads} * head_dim;
  if (size == 1 && in_order(mine))
    return one_shard_sparse(n_total, q, k, v, o, lse, num_heads, num_kv_heads, head_dim, scale,
                            masks, stats, who, error);
  RingOutput out(o, lse, n_local, q_row, num_heads);
  RingStats st;

  // Attention of head h, local rows [r0, r1) (global [g0, g0 + r1 - r0)) against the
  // shard keys [kb, ke) at local offset k_off, merged into (o, lse).
  auto run = [&](int h, int64_t r0, int64_t r1, int64_t g0, const float* ck, const float* cv,
                 int64_t k_off, int64_t kb, int64_t ke) -> Status {
    const HeadMask& m = masks[h];
    const int kvh = h / group;
    AttentionParams p;
    p.q = q + r0 * q_row + int64_t{h} * head_dim;
    p.k = ck + k_off * kv_row + int64_t{kvh} * head_dim;
    p.v = cv + k_off * kv_row + int64_t{kvh} * head_dim;
    p.o = out.o_part.data() + r0 * q_row + int64_t{h} * head_dim;
    p.lse = out.lse_part.data() + int64_t{h} * n_local + r0;
    p.q_row_stride = p.o_row_stride = q_row;
    p.k_row_stride = p.v_row_stride = kv_row;
    p.q_head_stride = p.o_head_stride = p.k_head_stride = p.v_head_stride = head_dim;
    p.lse_head_stride = n_local;
    p.n_q = static_cast<int>(r1 - r0);
    p.n_k = static_cast<int>(ke - kb);
    p.num_heads = p.num_kv_heads = 1;
    p.head_dim = head_dim;
    p.q_pos0 = g0;
    p.k_pos0 = kb;
    p.causal = true;
    p.scale = scale;
    p.dtype = DType::kF32;
    const Status s = head_kernel(m, p);
    if (s != Status::kOk) return s;
    MergeParams mp;
    mp.o_a = o + r0 * q_row + int64_t{h} * head_dim;
    mp.lse_a = out.lse + int64_t{h} * n_local + r0;
    mp.o_b = static_cast<const float*>(p.o);
    mp.lse_b = p.lse;
    mp.row_stride = q_row;
    mp.head_stride = head_dim;
    mp.lse_head_stride = n_local;
    mp.n = p.n_q;
    mp.num_heads = 1;
    mp.head_dim = head_dim;
    return cpu::merge_states(mp);
  };

  // Per head, the runs of consecutive query blocks with at least one selected tile of
  // the visiting shard.
  auto compute = [&](const TokenRanges& keys, const float* cur_k, const float* cur_v) {
    for (int h = 0; h < num_heads; ++h) {
      int64_t q_off = 0;
      for (auto [qb, qe] : mine) {
        int64_t k_off = 0;
        for (auto [kb, ke] : keys) {
          int64_t run_lo = -1;
          const int64_t b_first = qb / kBlock, b_end = num_blocks(qe);
          for (int64_t b = b_first; b <= b_end; ++b) {
            const int64_t tiles = b < b_end ? mask_tiles(masks[h], b, kb, ke, n_total) : 0;
            st.tiles += tiles;
            if (tiles > 0 && run_lo < 0) run_lo = b;
            if (tiles == 0 && run_lo >= 0) {
              const int64_t g0 = std::max(qb, run_lo * kBlock), g1 = std::min(qe, b * kBlock);
              const Status s =
                  run(h, q_off + g0 - qb, q_off + g1 - qb, g0, cur_k, cur_v, k_off, kb, ke);
              if (s != Status::kOk) return s;
              run_lo = -1;
            }
          }
          k_off += ke - kb;
        }
        q_off += qe - qb;
      }
    }
    return Status::kOk;
  };
  const Status s = run_ring(sp, layout, kv_row, k, v, who, &st, error, compute);
  if (s == Status::kOk && stats) *stats = st;
  return s;
}

double expected_block_tiles(const HeadPattern& p, int64_t b, int64_t n) {
  const int64_t causal = b + 1;
  auto cdiv = [](int64_t a, int64_t d) { return (a + d - 1) / d; };
  switch (p.kind) {
    case PatternKind::kDense:
      return static_cast<double>(causal);
    case PatternKind::kAShape:
      return static_cast<double>(std::min(causal, cdiv(p.a, kBlock) + cdiv(p.b, kBlock) + 1));
    case PatternKind::kVerticalSlash:
      return static_cast<double>(std::min<int64_t>(
          causal, clamp_slash_budget(p.b, n) + cdiv(clamp_vertical_budget(p.a, n), kBlock)));
    case PatternKind::kBlockSparse:
      return static_cast<double>(std::min<int64_t>(causal, p.a));
  }
  return 0;
}

void HeadMaskSet::build(const std::vector<const HeadPlan*>& plans,
                        const std::vector<HeadPattern>& pats, int64_t n) {
  masks.assign(plans.size(), {});
  vs.clear();
  vs.reserve(plans.size());
  for (size_t i = 0; i < plans.size(); ++i) {
    HeadMask& m = masks[i];
    m.kind = plans[i]->kind;
    if (m.kind == PatternKind::kAShape) {
      m.n_init = pats[i].a;
      m.n_local = pats[i].b;
    } else if (m.kind == PatternKind::kVerticalSlash) {
      vs.push_back(cpu::vs_build_index({plans[i]->vs}, n));
      m.vs = view(vs.back());
      m.vs_head = 0;
    } else if (m.kind == PatternKind::kBlockSparse) {
      m.bs.seq_len = n;
      m.bs.nblocks = num_blocks(n);
      m.bs.k = plans[i]->topk;
      m.bs.blocks = plans[i]->blocks.data();
      m.bs_head = 0;
    }
  }
}

}  // namespace mprefill
