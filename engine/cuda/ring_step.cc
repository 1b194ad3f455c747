// Attention at sp > 1: the ring pass of comm/ring_pass.h with a transport on the comm
// stream (grouped NCCL send / recv ordered by events against the compute stream) and,
// per step, every piece's kernel on the visiting shard, merged by log-sum-exp.
#include <algorithm>

#include "engine/cuda/layer_forward.h"
#include "kernels/cuda/merge.h"

namespace mprefill::gpu {
namespace {

// Slot i holds K rows [nmax][kvl] then V rows. post(): the comm stream may send this
// slot and overwrite the other one once the compute stream finished everything issued
// so far (RoPE / the previous step's attention); complete(): the compute stream waits
// for the received slot.
class StreamRingTransport final : public comm::RingTransport {
 public:
  StreamRingTransport(LayerForward& F, int layer) : F_(F), layer_(layer) {}

  Status post(const comm::RingStep& s, int64_t send_rows, int64_t recv_rows) override {
    const Bufs& B = F_.B;
    const int64_t kvl = F_.g.kvl, nmax = F_.S.nmax;
    comm::Communicator& sc = *F_.I.sp_comm;
    cudaStream_t cst = F_.I.comm_st;
    const int size = sc.size(), me = sc.rank();
    const int next = (me + 1) % size, prev = (me + size - 1) % size;
    const uint16_t* ks = B.slot[s.slot];
    const uint16_t* vs = ks + size_t(nmax) * kvl;
    uint16_t* kn = B.slot[1 - s.slot];
    uint16_t* vn = kn + size_t(nmax) * kvl;
    cudaEvent_t e = F_.sync_event();
    F_.f.ck(cudaEventRecord(e, F_.st), "ring event");
    F_.f.ck(cudaStreamWaitEvent(cst, e, 0), "ring event");
    const size_t cnt_out = size_t(send_rows) * kvl, cnt_in = size_t(recv_rows) * kvl;
    const size_t c0 = F_.timing ? time_mark(cst) : 0;
    Status r = sc.group_start();
    if (r == Status::kOk && cnt_out) {
      r = sc.send(ks, cnt_out, DType::kBF16, next, cst);
      if (r == Status::kOk) r = sc.send(vs, cnt_out, DType::kBF16, next, cst);
    }
    if (r == Status::kOk && cnt_in) {
      r = sc.recv(kn, cnt_in, DType::kBF16, prev, cst);
      if (r == Status::kOk) r = sc.recv(vn, cnt_in, DType::kBF16, prev, cst);
    }
    const Status end = sc.group_end();  // always closes the group
    if (r == Status::kOk) r = end;
    if (r != Status::kOk) {
      error_ = "layer " + std::to_string(layer_) + ": " + sc.last_error();
      return r;
    }
    if (F_.timing) F_.spans.push_back({3, c0, time_mark(cst)});
    recv_ = F_.sync_event();
    F_.f.ck(cudaEventRecord(recv_, cst), "ring event");
    return Status::kOk;
  }

  Status complete(const comm::RingStep&) override {
    const size_t t1 = F_.timing ? time_mark(F_.st) : 0;
    F_.f.ck(cudaStreamWaitEvent(F_.st, recv_, 0), "ring wait");
    if (F_.timing) F_.spans.push_back({1, t1, time_mark(F_.st)});
    return Status::kOk;
  }

  std::string last_error() const override { return error_; }

 private:
  size_t time_mark(cudaStream_t on) { return F_.time_mark(on); }
  LayerForward& F_;
  int layer_;
  cudaEvent_t recv_ = nullptr;
  std::string error_;
};

}  // namespace

void LayerForward::ring_attention(int l, const std::vector<Piece>& pieces) {
  f.ok(cuda::reset_attention_state(B.acc_o, B.acc_lse, g.ql, hd_, S.nl, static_cast<int>(S.nl),
                                   g.nh, hd_, st),
       "reset attention state", l);
  StreamRingTransport transport(*this, l);
  comm::RingPassStats ps;
  std::string err;
  const Status s = comm::ring_pass(
      g.sp_rank, ring_, transport,
      [&](const comm::RingStep& step) {
        const uint16_t* ks = B.slot[step.slot];
        const size_t t0 = timing ? time_mark(st) : 0;
        ring_compute(l, pieces, step.owner, ks, ks + size_t(S.nmax) * g.kvl);
        if (timing) spans.push_back({0, t0, time_mark(st)});
        return Status::kOk;
      },
      &ps, &err, "ring at layer " + std::to_string(l) + ": ");
  if (s != Status::kOk) f.raise(err);
  ST.ring_bytes_sent += ps.rows_sent * g.kvl * 2 * 2;  // K and V rows, bf16
}

// One ring step: every (query range, visiting key range) pair with a visible key runs
// each piece's kernel into the partial output, then one merge of all heads into the fp32
// state; the merge writes Wo's input (bf16) as it goes, so the last step leaves it final.
void LayerForward::ring_compute(int l, const std::vector<Piece>& pieces, int owner,
                                const uint16_t* ks, const uint16_t* vs) {
  const int64_t ql = g.ql, kvl = g.kvl, nl = S.nl;
  const int64_t key_end = ring_.key_end(g.sp_rank);  // clip of key ranges (causal skipping)
  int64_t qoff = 0;
  for (auto [qb, qe] : S.layout[g.sp_rank]) {
    int64_t koff = 0;
    for (auto [kb, ke_full] : S.layout[owner]) {
      const int64_t ke = std::min(ke_full, key_end);
      if (kb <= qe - 1 && kb < ke) {  // some key visible to some row
        AttentionParams ap;
        ap.q_row_stride = ap.o_row_stride = ql;
        ap.k_row_stride = ap.v_row_stride = kvl;
        ap.q_head_stride = ap.k_head_stride = ap.v_head_stride = ap.o_head_stride = hd_;
        ap.lse_head_stride = nl;
        ap.n_q = static_cast<int>(qe - qb);
        ap.n_k = static_cast<int>(ke - kb);
        ap.head_dim = hd_;
        ap.q_pos0 = qb;
        ap.k_pos0 = kb;
        ap.causal = true;
        ap.scale = scale_;
        ap.dtype = DType::kBF16;
        for (size_t pi = 0; pi < pieces.size(); ++pi) {
          const Piece& p = pieces[pi];
          ap.q = B.q + size_t(qoff) * ql + size_t(p.h0) * hd_;
          ap.k = ks + size_t(koff) * kvl + size_t(p.kv0) * hd_;
          ap.v = vs + size_t(koff) * kvl + size_t(p.kv0) * hd_;
          ap.o = B.part_o + size_t(qoff) * ql + size_t(p.h0) * hd_;
          ap.lse = B.part_lse + size_t(p.h0) * nl + qoff;
          launch(p, views_[pi], ap, l, "ring ");
        }
        cuda::MergeStatesParams mp;
        mp.o_a = B.acc_o + size_t(qoff) * ql;
        mp.lse_a = B.acc_lse + qoff;
        mp.o_b = B.part_o + size_t(qoff) * ql;
        mp.lse_b = B.part_lse + qoff;
        mp.b_dtype = DType::kBF16;
        mp.out_bf16 = B.xb + size_t(qoff) * ql;
        mp.a_row_stride = mp.b_row_stride = mp.out_row_stride = ql;
        mp.a_head_stride = mp.b_head_stride = mp.out_head_stride = hd_;
        mp.lse_a_head_stride = mp.lse_b_head_stride = nl;
        mp.n = ap.n_q;
        mp.num_heads = g.nh;
        mp.head_dim = hd_;
        f.ok(cuda::merge_attention_states(mp, st), "merge", l);
      }
      koff += ke_full - kb;
    }
    qoff += qe - qb;
  }
}

}  // namespace mprefill::gpu
