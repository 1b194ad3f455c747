#include "engine/cpu_shard.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace mprefill {

void set_heads(const ModelConfig& c, const std::vector<int>& kv_heads, LocalLayer* out) {
  const int group = c.n_heads / c.n_kv_heads;
  out->kv_heads = kv_heads;
  out->q_heads.clear();
  for (int g : kv_heads)
    for (int j = 0; j < group; ++j) out->q_heads.push_back(g * group + j);
}

void load_attention(const WeightSource& src, const std::vector<int>& kv_heads, int l,
                    LocalLayer* out) {
  const ModelConfig& c = src.config();
  const ModelWeights* fw = src.full();
  const LayerWeights* L = fw ? &fw->layers[l] : nullptr;
  const std::string p = "model.layers." + std::to_string(l) + ".";
  const int64_t H = c.hidden, hd = c.head_dim, Q = c.q_dim(), KV = c.kv_dim();
  LocalLayer& o = *out;
  o.wq.clear();
  o.wk.clear();
  o.wv.clear();
  o.bq.clear();
  o.bk.clear();
  o.bv.clear();
  set_heads(c, kv_heads, &o);
  for (int h : o.q_heads)
    src.rows(p + "self_attn.q_proj.weight", L ? &L->wq : nullptr, Q, H, h * hd, hd, &o.wq);
  for (int g : o.kv_heads) {
    src.rows(p + "self_attn.k_proj.weight", L ? &L->wk : nullptr, KV, H, g * hd, hd, &o.wk);
    src.rows(p + "self_attn.v_proj.weight", L ? &L->wv : nullptr, KV, H, g * hd, hd, &o.wv);
  }
  if (c.qkv_bias) {  // 1-D and small: read whole, keep this rank's heads
    const std::vector<float> bq = src.whole(p + "self_attn.q_proj.bias", L ? &L->bq : nullptr, {Q});
    const std::vector<float> bk =
        src.whole(p + "self_attn.k_proj.bias", L ? &L->bk : nullptr, {KV});
    const std::vector<float> bv =
        src.whole(p + "self_attn.v_proj.bias", L ? &L->bv : nullptr, {KV});
    for (int h : o.q_heads) o.bq.insert(o.bq.end(), bq.begin() + h * hd, bq.begin() + (h + 1) * hd);
    for (int g : o.kv_heads) {
      o.bk.insert(o.bk.end(), bk.begin() + g * hd, bk.begin() + (g + 1) * hd);
      o.bv.insert(o.bv.end(), bv.begin() + g * hd, bv.begin() + (g + 1) * hd);
    }
  }
  // Wo: the columns of each local query head, interleaved into [H][nq * hd].
  const int64_t nq = static_cast<int64_t>(o.q_heads.size());
  o.wo.resize(static_cast<size_t>(H * nq * hd));
  for (int64_t i = 0; i < nq; ++i) {
    const std::vector<float> blk =
        src.cols(p + "self_attn.o_proj.weight", L ? &L->wo : nullptr, H, Q, o.q_heads[i] * hd, hd);
    for (int64_t r = 0; r < H; ++r)
      std::copy_n(blk.begin() + r * hd, hd, o.wo.begin() + r * nq * hd + i * hd);
  }
}

LocalWeights load_local(const WeightSource& src, const TpPlan& placement, int tp_rank) {
  const ModelConfig& c = src.config();
  const ModelWeights* fw = src.full();
  const int64_t H = c.hidden, F = c.intermediate, V = c.vocab, tp = placement.tp;
  LocalWeights w;
  w.cfg = c;
  w.embed = src.whole("model.embed_tokens.weight", fw ? &fw->embed : nullptr, {V, H});
  w.final_norm = src.whole("model.norm.weight", fw ? &fw->final_norm : nullptr, {H});
  const int64_t vchunk = (V + tp - 1) / tp;
  w.v0 = std::min(V, tp_rank * vchunk);
  w.v1 = std::min(V, w.v0 + vchunk);
  if (c.tie_word_embeddings || (fw && fw->lm_head.empty())) {
    w.lm_rows.assign(w.embed.begin() + w.v0 * H, w.embed.begin() + w.v1 * H);
  } else {
    src.rows("lm_head.weight", fw ? &fw->lm_head : nullptr, V, H, w.v0, w.v1 - w.v0, &w.lm_rows);
  }
  w.f0 = F * tp_rank / tp;
  w.f1 = F * (tp_rank + 1) / tp;
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights* L = fw ? &fw->layers[l] : nullptr;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LocalLayer& o = w.layers[l];
    load_attention(src, placement.kv_heads[l][tp_rank], l, &o);
    o.attn_norm = src.whole(p + "input_layernorm.weight", L ? &L->attn_norm : nullptr, {H});
    o.ffn_norm = src.whole(p + "post_attention_layernorm.weight", L ? &L->ffn_norm : nullptr, {H});
    src.rows(p + "mlp.gate_proj.weight", L ? &L->w_gate : nullptr, F, H, w.f0, w.f1 - w.f0,
             &o.gate);
    src.rows(p + "mlp.up_proj.weight", L ? &L->w_up : nullptr, F, H, w.f0, w.f1 - w.f0, &o.up);
    o.down =
        src.cols(p + "mlp.down_proj.weight", L ? &L->w_down : nullptr, H, F, w.f0, w.f1 - w.f0);
  }
  if (!c.tie_word_embeddings && !fw && !src.has("lm_head.weight", nullptr))
    throw std::runtime_error(
        "tensor lm_head.weight not found (config.json has "
        "tie_word_embeddings false)");
  return w;
}

CpuLayer cpu_layer(const LocalLayer& L, int64_t ffn) {
  auto ptr = [](const std::vector<float>& x) { return x.empty() ? nullptr : x.data(); };
  CpuLayer o;
  o.attn_norm = L.attn_norm.data();
  o.ffn_norm = L.ffn_norm.data();
  o.wq = L.wq.data();
  o.wk = L.wk.data();
  o.wv = L.wv.data();
  o.bq = ptr(L.bq);
  o.bk = ptr(L.bk);
  o.bv = ptr(L.bv);
  o.wo = L.wo.data();
  o.gate = L.gate.data();
  o.up = L.up.data();
  o.down = L.down.data();
  o.n_q = static_cast<int>(L.q_heads.size());
  o.n_kv = static_cast<int>(L.kv_heads.size());
  o.ffn = ffn;
  return o;
}

}  // namespace mprefill
