#!/usr/bin/env python3
"""Train the long-context probe model for mprefill (issue 8 item 3; 128K: issue 18 item 2).

A small Llama-architecture model (HF LlamaForCausalLM layout) trained from scratch on the
synthetic retrieval tasks of probe_task.py with a length curriculum up to --max-len, then
exported as an HF directory that mprefill loads (model/weights.h load_hf_dir): config.json +
model.safetensors (BF16) + MODEL_CARD.md + calib_8k.ids + train.log + train_summary.json.

Shape (default): 4 layers, hidden 256, 4 query heads / 2 KV heads of head_dim 128 (the CUDA
engine's kernels and GPU estimation take head_dim 64 or 128; the CI's CUDA subset build has
128 only), SwiGLU 704, vocab 512: 4.0M parameters, 8 MB in bf16.

Why 64K-128K needs more than the 32K recipe (probe-kv32k: 1.00 at 32K, 0.52 at 64K):
- Positions never seen. Retrieval matches the 2-token key by content, so its q.k must not
  depend on the distance to the record: the head keeps the match in the rotary pairs that
  turn little over the context. Pair i turns by L * theta^(-2i/d) radians over L tokens; the
  pairs that stay under pi/2 are those with 2i/d > ln(L / 1.57) / ln(theta). At theta 1e6
  that is 28% of the pairs at 32K but 18% at 128K: a matcher learnt at 32K partly lives in
  pairs that turn past pi/2 at 64K and beyond, so it breaks there. theta 1e7 (Qwen2.5-1M's
  value) keeps 30% of the pairs under pi/2 at 128K, the 32K profile of theta 1e6. The
  highest frequency (1 rad per token, what the previous-token head uses) does not depend on
  theta. Training at 64K and 128K then covers every distance the evaluation asks for.
- Curriculum 32 -> 64 -> ... -> 131072 (doublings); a stage ends at --advance-acc running
  exact match, or after --stage-minutes once above 0.5, or on a schedule that reaches
  max-len at 60% of the cap once above 0.3, or after --stage-steps steps whatever its
  accuracy (the 2026-12-07 16-minute H100 run sat at 128 tokens, acc 0.19, below both
  floors for 23,986 steps: those times scale with --minutes, a step count does not). 30% of
  the steps revisit one of the 3 shorter lengths. The last 20% of the cap decays the
  learning rate.
- Records start at any token of the body (gpu_batch), not on probe_task's 5-token grid: on
  the grid a short stage has a few fixed record places, and the same run learnt where they
  are at 32 tokens (acc 0.906, gone at 64) and plateaued at 64 / 128 (docs/probe.md, "Why
  the 16-minute run failed").
- Leaving the first stage (issue 18's first H100 trial stayed at chance for 10,730 steps at
  256 tokens): at initialisation attention is uniform, so the gradient that builds the
  lookup (a head at k2 that finds the record and copies v1) is diluted over the whole
  context, and probe-kv32k spent 1,400 of its 3,947 steps on that plateau at 256 tokens with
  16 supervised queries per sequence. The 128K recipe halved the supervision there (8
  queries: queries_for capped at half the records) and never left it. Now: (1) the first
  stages are 32 and 64 tokens with 2 and 4 records (train_pairs), where that gradient is
  8x / 4x stronger than at 256; (2) every record is queried up to 4K tokens (probe-kv32k's
  16 at 256-4K); (3) k1 -> k2 of each query is supervised too (--key-loss: k1 is unique
  among the records, a one-token induction target that builds the same previous-token +
  copy circuit); (4) the LM head starts as a copy of the embedding (--tied-init), so a
  head that copies a token's embedding raises that token's logit from the first step.
  On CPU (2-layer, hidden-64 model, 4,096 tokens per step) the 64-token stage is learnt
  in ~450 steps with (1)+(3)+(4) and not within 750 steps at 256 tokens with either the
  old or the broken recipe (docs/probe.md, "Why the first 128K trial learnt nothing").
- Tokens per step: 65536 (batch = 65536 / length) up to 64K, one 131072-token sequence at
  128K. Supervised queries per sequence: every record up to 4K, then half the records,
  at least 32 per step, so the gradient does not thin out at long lengths.
- Mixed tasks: half the steps draw the queried records one per segment of the context, as
  the multi-key evaluation does (probe_task.make_multikey_sample); the others uniformly.
  Every query in the tail is supervised, so a multi-key prompt's earlier answered queries
  (teacher forcing) are the training layout. Both running accuracies are logged (kv, mk).
- Memory and time at 128K: SDPA's flash kernel in bf16 (forced on CUDA: a fallback to the
  math kernel would materialise 4 x 128K^2 scores) keeps attention memory linear; the
  activations of this 4M-parameter model at 131072 tokens are ~10 GB in all. Time per step
  on an H100, t(L, T) = T x (0.55 us + 14336 L / 2.5e14 s) for T tokens at length L: 0.55
  us per token is the measured 256-token rate of the first H100 trial (0.036 s per 65536
  tokens: everything but attention); 14336 L flop per token is causal attention forward +
  backward (16 head-layers x 3.5 x 2 x 128 x L) at an assumed 250 TFLOP/s of flash
  attention (FA2 on an H100). So 0.05 s per step at 4K, 0.16 s at 32K, 0.28 s at 64K,
  1.06 s at 128K (docs/probe.md has the stage budget).

Resumable in chunks (one device command may run 10 minutes): --chunk-minutes stops this
process after that much time, with a checkpoint (--out/ckpt.pt: weights, optimiser, data
generator and Python RNG states, curriculum state, training seconds so far) and exit status
3; the same command resumes from it. The schedule runs on training seconds summed over the
chunks, so chunking does not change it (stage changes depend on measured time: a rerun with
the same seed follows the same curriculum only up to timing noise). train.log (appended per
chunk) and train_summary.json are written into --out; the checkpoint is removed at the end.

  PYTHONUNBUFFERED=1 python3 python/probe/train_probe.py --out DIR --minutes 16 \
      --chunk-minutes 8.5    # repeat while the exit status is 3
"""
import argparse
import contextlib
import json
import math
import os
import random
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_task as task  # noqa: E402

BOS, KEY, QUERY = task.BOS, task.KEY, task.QUERY
FIRST, VOCAB, RECORD = task.FIRST_CONTENT, task.VOCAB, task.RECORD
EXIT_RESUME = 3  # checkpointed before the end: run the same command again


# ----------------------------------------------------------------------------- data
def train_pairs(length):
    """Records per training sequence: probe_task.pairs_for (16 up to 4K, one per 256 tokens
    beyond, at most 64) from 256 tokens on; below 256 (the first stages only: no evaluation
    set is that short) one per 16 tokens, so a 64-token sequence holds 4."""
    return task.pairs_for(length) if length >= 256 else max(2, length // 16)


def gpu_batch(gen, batch, length, queries, device, stratified=False):
    """[batch][length] ids of the task distribution (probe_task.make_sample with `queries`
    complete query records at the end) and the supervised positions (next token = target):
    vpos (k2 -> v1, v1 -> v2: the answer, what accuracy counts) and kpos (k1 -> k2: a
    one-token induction target; k1 is unique among the records).
    Records start at any token of the body, not on probe_task's 5-token slot grid: the body
    is a random order of `pairs` records and single filler tokens (units). On the grid with
    the query tail at a fixed place, a short sequence has only a few record places per
    length (4 at 32 tokens, 8 at 64), and the model learns where they are instead of
    matching the key: the 2026-12-07 full run plateaued at 64 and 128 tokens (acc 0.37 /
    0.19), and a CPU model trained at 32 tokens scored 0.73 there and <= 0.09 at 33-37 and
    64 (docs/probe.md, "Why the 16-minute run failed"). probe_task's grid samples remain one
    draw of this distribution.
    stratified: the queried records are one per segment of the units (queries segments),
    as in probe_task.make_multikey_sample; else anywhere."""
    pairs = train_pairs(length)
    tail = RECORD * queries
    body = length - 1 - tail
    units = body - (RECORD - 1) * pairs  # each record one unit, each filler token one
    assert body // RECORD >= pairs >= queries, (length, pairs, queries)
    ncontent = VOCAB - FIRST
    ids = torch.randint(FIRST, VOCAB, (batch, length), generator=gen, device=device)
    ids[:, 0] = BOS
    k1 = torch.rand(batch, ncontent, generator=gen, device=device).argsort(-1)[:, :pairs] + FIRST
    k2, v1, v2 = (torch.randint(FIRST, VOCAB, (batch, pairs), generator=gen, device=device)
                  for _ in range(3))
    score = torch.rand(batch, units, generator=gen, device=device)
    if stratified:
        # Records 0..queries-1 at one unit per segment; the rest at the other units.
        seg = torch.arange(queries, device=device)
        u = torch.rand(batch, queries, generator=gen, device=device)
        qunits = ((seg + u) * units / queries).long().clamp_(max=units - 1)
        score.scatter_(1, qunits, 2.0)  # last in the order below: not drawn twice
        rest = score.argsort(-1)[:, :pairs - queries]
        unit = torch.cat([qunits, rest], 1)
        q = torch.rand(batch, queries, generator=gen, device=device).argsort(-1)
    else:
        unit = score.argsort(-1)[:, :pairs]
        q = torch.rand(batch, pairs, generator=gen, device=device).argsort(-1)[:, :queries]
    # Record r starts after the units before it: 1 + unit + 4 x (records before it).
    before = (unit[:, :, None] > unit[:, None, :]).sum(-1)
    first = 1 + unit + (RECORD - 1) * before
    pos = first[..., None] + torch.arange(RECORD, device=device)  # [B][P][5]
    key_tok = torch.full_like(k1, KEY)
    rec = torch.stack([key_tok, k1, k2, v1, v2], -1)
    ids.scatter_(1, pos.view(batch, -1), rec.view(batch, -1))
    g = lambda t: t.gather(1, q)  # noqa: E731
    qrec = torch.stack([torch.full_like(q, QUERY), g(k1), g(k2), g(v1), g(v2)], -1)
    ids[:, length - tail:] = qrec.view(batch, tail)
    start = length - tail + RECORD * torch.arange(queries, device=device)
    vpos = torch.stack([start + 2, start + 3], -1).view(-1)  # k2 -> v1, v1 -> v2
    return ids, vpos, start + 1


def queries_for(length, batch, base):
    """Supervised queries per sequence: every record while there are at most 16 (up to 4K
    tokens, as probe-kv32k was trained), else half of them; at least 32 per step."""
    pairs = train_pairs(length)
    cap = pairs if pairs <= 16 else pairs // 2
    return max(1, min(cap, max(base, math.ceil(32 / batch))))


# ----------------------------------------------------------------------------- model
def flash_only(cuda):
    """On CUDA, SDPA restricted to the flash kernel: an error instead of a silent fallback to
    the math kernel, whose T x T scores do not fit at 128K."""
    if not cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_cache(length, head_dim, theta, device):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    ang = torch.arange(length, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)  # HF rotate-half layout
    return ang.cos().float(), ang.sin().float()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        hd, hid = c["head_dim"], c["hidden_size"]
        self.input_layernorm = RMSNorm(hid, c["rms_norm_eps"])
        self.q_proj = nn.Linear(hid, c["num_attention_heads"] * hd, bias=False)
        self.k_proj = nn.Linear(hid, c["num_key_value_heads"] * hd, bias=False)
        self.v_proj = nn.Linear(hid, c["num_key_value_heads"] * hd, bias=False)
        self.o_proj = nn.Linear(c["num_attention_heads"] * hd, hid, bias=False)
        self.post_attention_layernorm = RMSNorm(hid, c["rms_norm_eps"])
        self.gate_proj = nn.Linear(hid, c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(hid, c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], hid, bias=False)

    def forward(self, x, cos, sin):
        c = self.c
        B, T, _ = x.shape
        H, KV, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, H, hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, KV, hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, KV, hd).transpose(1, 2)
        q = q.float() * cos + rotate_half(q.float()) * sin
        k = k.float() * cos + rotate_half(k.float()) * sin
        if KV != H:  # query head h reads KV head h // (H / KV), as the engine does
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
        # bf16 on the GPU so SDPA takes the flash kernel; the residual stream x stays fp32.
        adt = torch.bfloat16 if x.is_cuda else torch.float32
        with flash_only(x.is_cuda):
            a = F.scaled_dot_product_attention(q.to(adt), k.to(adt), v.to(adt), is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, H * hd)).float()
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)).float()


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList([Block(c) for _ in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids, positions):
        """Logits at `positions` (1-D, shared by the batch): [B][len(positions)][vocab]."""
        T = ids.shape[1]
        cos, sin = rope_cache(T, self.c["head_dim"], self.c["rope_theta"], ids.device)
        x = self.embed_tokens(ids).float()
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x[:, positions]))


# ----------------------------------------------------------------------------- export
def hf_state(model):
    """HF LlamaForCausalLM tensor names (what model/weights.cc load_hf_dir reads)."""
    out = {"model.embed_tokens.weight": model.embed_tokens.weight,
           "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.lm_head.weight}
    for i, L in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = L.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm.weight
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = getattr(L, n).weight
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[p + f"mlp.{n}.weight"] = getattr(L, n).weight
    return out


def save_safetensors(path, tensors):
    """Minimal safetensors writer: 8-byte LE header length, JSON header, BF16 data."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.bfloat16).contiguous()
        data = t.view(torch.int16).numpy().tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)  # align the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def hf_config(c):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c["num_key_value_heads"], "head_dim": c["head_dim"],
        "vocab_size": c["vocab_size"], "max_position_embeddings": c["max_position_embeddings"],
        "rms_norm_eps": c["rms_norm_eps"], "rope_theta": c["rope_theta"],
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": task.BOS, "eos_token_id": task.EOS, "torch_dtype": "bfloat16",
    }


MODEL_CARD = """# {name}: long-context retrieval probe for mprefill

- Architecture: Llama (HF LlamaForCausalLM layout), {num_hidden_layers} layers, hidden
  {hidden_size}, {num_attention_heads} query heads / {num_key_value_heads} KV heads of
  head_dim {head_dim}, SwiGLU FFN {intermediate_size}, RMSNorm eps {rms_norm_eps}, RoPE theta
  {rope_theta:g} (rotate-half), vocabulary {vocab_size} (no tokenizer: ids are the task's
  symbols), untied LM head, {params:,} parameters, {mbytes:.1f} MB in bf16 (model.safetensors).
- Trained from scratch by `python/probe/train_probe.py` (seed {seed}, {steps} steps,
  {minutes:.1f} minutes of training in {chunks} chunk(s) on one {device}) on the synthetic
  retrieval tasks of `python/probe/probe_task.py`: filler content tokens with records
  `KEY k1 k2 v1 v2` spread uniformly (16 records up to 4K tokens, one per 256 tokens beyond,
  at most 64), then queries `QUERY k1 k2 -> v1 v2` (half the steps with the queried records
  one per segment of the context, as in the multi-key task; 2 / 4 / 8 records in the
  32 / 64 / 128-token first stages); loss on the value tokens and on k2 of each query (after
  k1), the LM head starting as a copy of the embedding. Length curriculum {curriculum}
  ({tokens_per_step} tokens per step, at least one sequence; stage reached at step:
  {stage_steps}; per stage loss and accuracy in train.log and train_summary.json).
- Ids: 0 pad, 1 BOS, 2 EOS, 3 KEY, 5 QUERY, 16..{vmax} content (4, 6..15 unused).
- Dense accuracy in PyTorch (bf16 attention, weights rounded to bf16; greedy exact match of
  both value tokens of every scored query) on the eval sets of `probe_task.py` (seed
  {eval_seed}, {eval_n} samples per length; kv: one query at the end; mk: {keys} queried
  records, each scored after a prefix ending at its query, all must match):
{accuracy}
- Eval sets and the calibration prompt are regenerated, not committed:
  `python3 python/probe/probe_task.py --out DIR [--task kv|mk]` writes eval_<length>.jsonl
  and calib_8k.ids (calibration prompt for mprefill-search, token ids; the file beside this
  card is that prompt). `python/probe/eval_probe.py` runs the engine evaluation.
- Files: config.json, model.safetensors, calib_8k.ids, train.log and train_summary.json
  (the training run).
- Licence: the project's; trained only on generated data.
"""


# ----------------------------------------------------------------------------- eval
@torch.no_grad()
def accuracy(model, samples, device, batch):
    """Greedy exact match of both answer tokens, one forward per sample. kv samples are
    (ids, [v1, v2]): the input is ids + [v1]; greedy decoding reproduces [v1, v2] iff the
    argmax at k2 is v1 and the argmax at v1 (given v1) is v2. mk samples are (ids, [(P,
    [v1, v2]), ...]), each check a prompt ids[:P]; right iff all checks are. Causal
    attention makes the logits at P - 1 and P of the whole ids + [last v1] those of the
    prompt ids[:P] + [v1] (teacher forcing: ids[P] is the check's v1), so one forward
    scores every check."""
    rows = []  # (input ids, logit positions, wanted tokens)
    for ids, ans in samples:
        checks = ans if ans and isinstance(ans[0], tuple) else [(len(ids), ans)]
        assert checks[-1][0] == len(ids)
        pos = [q for p, _ in checks for q in (p - 1, p)]
        rows.append((ids + [checks[-1][1][0]], pos, [t for _, a in checks for t in a[:2]]))
    right = 0
    j = 0
    while j < len(rows):  # batches of prompts with equal length and positions, in order
        k = j
        while (k < len(rows) and k - j < batch and len(rows[k][0]) == len(rows[j][0])
               and rows[k][1] == rows[j][1]):
            k += 1
        x = torch.tensor([r[0] for r in rows[j:k]], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(x, torch.tensor(rows[j][1], device=device)).argmax(-1)
        want = torch.tensor([r[2] for r in rows[j:k]], device=device)
        right += (pred == want).all(-1).sum().item()
        j = k
    return right / max(1, len(samples))


# ----------------------------------------------------------------------------- main
class Log:
    """print + append to OUT/train.log (one file over all chunks)."""

    def __init__(self, path):
        self.f = open(path, "a")

    def __call__(self, msg):
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def curriculum(min_len, max_len):
    lengths, L = [], min_len
    while L < max_len:
        lengths.append(L)
        L *= 2
    return lengths + [max_len]


def lr_at(peak, step, frac, warmup=100):
    """Linear warm-up over `warmup` steps, constant, cosine to 5% over the last 20% of the
    training time (frac = trained seconds / cap)."""
    lr = peak * min(1.0, (step + 1) / warmup)
    if frac > 0.8:
        lr *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (frac - 0.8) / 0.2))
    return lr


def train_step(model, opt, gen, device, batch, length, queries, stratified, key_loss):
    """One optimiser step on a fresh batch. Loss: cross-entropy on the answer tokens
    (k2 -> v1, v1 -> v2) plus key_loss x that on k1 -> k2 of each query. Returns (answer
    loss, exact-match rate of both answer tokens per query)."""
    x, vpos, kpos = gpu_batch(gen, batch, length, queries, device, stratified)
    pos = torch.cat([vpos, kpos]) if key_loss > 0 else vpos
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x, pos).float()
    target = x[:, pos + 1]
    nv = vpos.numel()
    vloss = F.cross_entropy(logits[:, :nv].reshape(-1, VOCAB), target[:, :nv].reshape(-1))
    loss = vloss
    if key_loss > 0:
        kloss = F.cross_entropy(logits[:, nv:].reshape(-1, VOCAB), target[:, nv:].reshape(-1))
        loss = vloss + key_loss * kloss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    hit = (logits[:, :nv].argmax(-1) == target[:, :nv]).view(batch, -1, 2).all(-1)
    return vloss.item(), hit.float().mean().item()


def note_step(st, loss, hit, stratified):
    """Running means (over ~20 steps) of the answer loss and exact match at the current
    length, per query layout (kv: uniform, mk: stratified), and the stage's mean loss."""
    st["run_acc"] = 0.9 * st["run_acc"] + 0.1 * hit
    k = "acc_mk" if stratified else "acc_kv"
    st[k] = 0.8 * st[k] + 0.2 * hit  # about half the steps: a similar horizon
    st["run_loss"] = loss if st["run_loss"] is None else 0.9 * st["run_loss"] + 0.1 * loss
    st["stage_loss"][0] += loss
    st["stage_loss"][1] += 1


def stage_line(st, length, step, ts, why):
    """One line per finished stage: what a short trial is read by."""
    n = max(1, st["stage_loss"][1])
    row = {"length": length, "steps": step - st["stage_step0"],
           "seconds": round(ts - st["stage_t0"], 1), "mean_loss": round(st["stage_loss"][0] / n, 4),
           "end_loss": round(st["run_loss"] or 0.0, 4), "acc": round(st["run_acc"], 3),
           "acc_kv": round(st["acc_kv"], 3), "acc_mk": round(st["acc_mk"], 3), "why": why}
    st["stages"].append(row)
    return (f"probe: stage {length} done ({why}): {row['steps']} steps, {row['seconds']:.0f} s, "
            f"mean answer loss {row['mean_loss']:.3f}, end loss {row['end_loss']:.3f}, "
            f"acc {row['acc']:.3f} (kv {row['acc_kv']:.3f}, mk {row['acc_mk']:.3f})")


def finish(args, c, model, st, lengths, params, dev_name, device, log, t_proc):
    """Export the trained model (HF directory), evaluate it densely on both tasks, write the
    model card and train_summary.json, remove the checkpoint."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    train_minutes = st["train_s"] / 60
    stage = st["stage"]
    log(f"probe: trained {st['step']} steps in {train_minutes:.2f} min, final length "
        f"{lengths[stage]}, running acc {st['run_acc']:.3f}")

    # Export first (so a late failure still leaves the model), then evaluate.
    model.eval()
    with torch.no_grad():  # evaluate what is exported: bf16-rounded weights
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    save_safetensors(os.path.join(args.out, "model.safetensors"), hf_state(model))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(hf_config(c), f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "calib_8k.ids"), "w") as f:
        f.write(" ".join(map(str, task.calibration_ids(8192))) + "\n")

    acc_lines, results = [], {"kv": {}, "mk": {}}
    for n in (int(v) for v in args.eval_lengths.split(",") if v):
        for name in ("kv", "mk"):
            samples = (task.eval_set(n, args.eval_samples) if name == "kv" else
                       task.multikey_eval_set(n, args.eval_samples, args.eval_keys))
            acc = accuracy(model, samples, device, max(1, 65536 // n))
            results[name][n] = acc
            log(f"probe: dense {name} accuracy at {n} tokens: {acc:.3f} ({len(samples)} samples)")
        acc_lines.append(f"  - {task.length_name(n).upper()} tokens: single key "
                         f"{results['kv'][n]:.3f}, multi-key {results['mk'][n]:.3f}")
    card = MODEL_CARD.format(
        name=args.name, params=params, mbytes=params * 2 / 1e6, seed=args.seed,
        curriculum=" -> ".join(map(str, lengths[:stage + 1])), steps=st["step"],
        minutes=train_minutes, chunks=st["chunks"], device=dev_name,
        tokens_per_step=args.tokens_per_step,
        stage_steps=", ".join(f"{l}: {s}" for l, s in zip(lengths, st["stage_reached"])),
        vmax=VOCAB - 1, eval_seed=task.EVAL_SEED, eval_n=args.eval_samples,
        keys=args.eval_keys, accuracy="\n".join(acc_lines), **c)
    with open(os.path.join(args.out, "MODEL_CARD.md"), "w") as f:
        f.write(card)
    with open(os.path.join(args.out, "train_summary.json"), "w") as f:
        json.dump({"steps": st["step"], "train_minutes": train_minutes, "chunks": st["chunks"],
                   "device": dev_name, "seed": args.seed, "rope_theta": args.rope_theta,
                   "lengths": lengths[:stage + 1], "stage_reached": st["stage_reached"],
                   "stages": st["stages"], "dense_accuracy": results, "params": params,
                   "args": vars(args),
                   "last_chunk_seconds": time.time() - t_proc}, f, indent=1)
    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    log(f"probe: wrote {args.out} ({time.time() - t_proc:.0f} s in this chunk)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output HF directory (also the checkpoint's)")
    ap.add_argument("--name", default="probe-kv128k")
    ap.add_argument("--minutes", type=float, default=16.0,
                    help="training cap, summed over chunks (eval and export add ~1 min)")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="also stop after this many steps (0: time only; tests)")
    ap.add_argument("--chunk-minutes", type=float, default=8.5,
                    help="stop this process after this long with a checkpoint (exit status 3)")
    ap.add_argument("--max-len", type=int, default=131072)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--queries", type=int, default=16,
                    help="supervised queries per sequence (more at long lengths: queries_for)")
    ap.add_argument("--stratified", type=float, default=0.5,
                    help="fraction of steps with the queried records one per segment")
    ap.add_argument("--key-loss", type=float, default=1.0,
                    help="weight of the k1 -> k2 loss of each query (0: answer tokens only)")
    ap.add_argument("--tied-init", type=int, default=1,
                    help="1: the LM head starts as a copy of the embedding (0: its own draw)")
    ap.add_argument("--advance-acc", type=float, default=0.9)
    ap.add_argument("--stage-minutes", type=float, default=0.0,
                    help="longest stage before the next length (0: 15%% of --minutes)")
    ap.add_argument("--stage-steps", type=int, default=1500,
                    help="leave a stage after this many steps whatever its accuracy (0: never)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--rope-theta", type=float, default=1e7)
    ap.add_argument("--eval-samples", type=int, default=50)
    ap.add_argument("--eval-lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--eval-keys", type=int, default=4, help="facts per multi-key eval sample")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--ckpt-every", type=float, default=120.0, help="seconds between checkpoints")
    ap.add_argument("--eval-reserve", type=float, default=120.0,
                    help="seconds of a chunk kept for the final evaluation and export")
    args = ap.parse_args()
    if args.minutes <= 0 or args.chunk_minutes <= 0 or args.min_len < 32:
        ap.error("--minutes and --chunk-minutes must be > 0, --min-len >= 32")

    t_proc = time.time()
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "train.log"))
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    c = {"hidden_size": args.hidden, "intermediate_size": args.ffn,
         "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
         "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
         "vocab_size": VOCAB, "max_position_embeddings": 2 * args.max_len,
         "rms_norm_eps": 1e-5, "rope_theta": args.rope_theta}
    model = Llama(c).to(device)
    if args.tied_init:
        with torch.no_grad():  # the LM head starts as the embedding (trained untied)
            model.lm_head.weight.copy_(model.embed_tokens.weight)
    params = sum(p.numel() for p in model.parameters())
    assert params * 2 <= 16 * 1000 * 1000, f"{params} parameters exceed 16 MB in bf16"
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05,
                            **({"fused": True} if device.type == "cuda" else {}))
    lengths = curriculum(args.min_len, args.max_len)
    st = {"step": 0, "stage": 0, "stage_t0": 0.0, "stage_step0": 0, "stage_reached": [0],
          "run_acc": 0.0, "acc_kv": 0.0, "acc_mk": 0.0, "run_loss": None,
          "stage_loss": [0.0, 0], "stages": [], "train_s": 0.0, "chunks": 0, "done": False,
          "args": vars(args)}
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["state"]["args"]["seed"] != args.seed or ck["config"] != c:
            raise SystemExit(f"train_probe: error: {ckpt_path} is from another run "
                             "(seed or shape differ); remove it to start afresh")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"].cpu())
        random.setstate(ck["py_random"])
        torch.set_rng_state(ck["torch_rng"].cpu())
        st = ck["state"]
        log(f"probe: resumed from {ckpt_path}: step {st['step']}, length {lengths[st['stage']]}, "
            f"{st['train_s']:.0f} s trained")
    st["chunks"] += 1
    log(f"probe: chunk {st['chunks']}: {params} parameters ({params * 2 / 1e6:.1f} MB bf16) on "
        f"{dev_name}, seed {args.seed}, theta {args.rope_theta:g}, lengths {lengths}")

    def save_ckpt():
        tmp = ckpt_path + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "py_random": random.getstate(),
                    "torch_rng": torch.get_rng_state(), "state": st, "config": c}, tmp)
        os.replace(tmp, ckpt_path)

    budget = args.minutes * 60
    chunk_end = t_proc + args.chunk_minutes * 60
    stage_cap = (args.stage_minutes or 0.15 * args.minutes) * 60
    last_print, last_ckpt = 0.0, time.time()
    step0 = st["step"]
    while not st["done"]:
        t_iter = time.time()
        if st["train_s"] >= budget or (args.max_steps and st["step"] >= args.max_steps):
            st["done"] = True
            break
        if t_iter >= chunk_end:
            save_ckpt()
            log(f"probe: chunk {st['chunks']} ends at step {st['step']} ({st['train_s']:.0f} s "
                f"of {budget:.0f} s trained): checkpoint {ckpt_path}; run again to resume")
            sys.exit(EXIT_RESUME)
        frac = st["train_s"] / budget
        if args.max_steps:
            frac = max(frac, st["step"] / args.max_steps)
        lr = lr_at(args.lr, st["step"], frac)
        for g in opt.param_groups:
            g["lr"] = lr
        stage = st["stage"]
        cur = lengths[stage]
        length = cur
        if stage > 0 and random.random() < 0.3:
            length = random.choice(lengths[max(0, stage - 3):stage])
        batch = max(1, args.tokens_per_step // length)
        nq = queries_for(length, batch, args.queries)
        strat = random.random() < args.stratified
        loss, hit = train_step(model, opt, gen, device, batch, length, nq, strat, args.key_loss)
        st["step"] += 1
        step = st["step"]
        if device.type == "cuda":
            torch.cuda.synchronize()  # so train_s counts the step's GPU time
        now = time.time()
        st["train_s"] += now - t_iter
        if length == cur:
            note_step(st, loss, hit, strat)
        ts, run_acc = st["train_s"], st["run_acc"]
        if now - last_print > 10 or step == 1:
            last_print = now
            log(f"probe: step {step} len {cur} (this step {length} x {batch}, {nq} queries"
                f"{', stratified' if strat else ''}) loss {st['run_loss']:.4f} acc {run_acc:.3f} "
                f"(kv {st['acc_kv']:.3f}, mk {st['acc_mk']:.3f}) lr {lr:.2e} {ts:.0f} s")
        # Next length: when this one is learnt; after --stage-minutes once it is half
        # learnt; and on a schedule that reaches max-len at 60% of the cap once above 0.3.
        forced = ts > budget * 0.6 * (stage + 1) / max(1, len(lengths) - 1) and run_acc >= 0.3
        capped = ts - st["stage_t0"] > stage_cap and run_acc >= 0.5
        # A stage stuck below the floors above would hold the rest of the cap (the
        # 2026-12-07 full run: 23,986 steps at 128 tokens, acc 0.19); a step count, unlike
        # the times above, does not grow with --minutes.
        stuck = args.stage_steps and step - st["stage_step0"] >= args.stage_steps
        if stage + 1 < len(lengths) and step - st["stage_step0"] >= 30 and (
                run_acc >= args.advance_acc or capped or forced or stuck):
            why = ("acc" if run_acc >= args.advance_acc else
                   "stage time cap" if capped else "schedule" if forced else "step cap")
            log(stage_line(st, cur, step, ts, why))
            st["stage"] += 1
            st["stage_t0"], st["stage_step0"] = ts, step
            st["stage_reached"].append(step)
            st["stage_loss"] = [0.0, 0]
            for k in ("run_acc", "acc_kv", "acc_mk"):
                st[k] *= 0.5  # the next length starts from the current skill, discounted
            log(f"probe: step {step}: length {lengths[st['stage']]} at {ts:.0f} s")
        if now - last_ckpt > args.ckpt_every:
            save_ckpt()
            last_ckpt = time.time()
    if st["step"] > step0 and time.time() + args.eval_reserve > chunk_end:
        # Training ended in this chunk, too late for the evaluation: that is the next chunk.
        save_ckpt()
        log(f"probe: training done ({st['step']} steps); evaluation in the next chunk")
        sys.exit(EXIT_RESUME)
    if not st.get("last_stage_logged"):
        st["last_stage_logged"] = True
        log(stage_line(st, lengths[st["stage"]], st["step"], st["train_s"], "end of training"))
    finish(args, c, model, st, lengths, params, dev_name, device, log, t_proc)


if __name__ == "__main__":
    main()
