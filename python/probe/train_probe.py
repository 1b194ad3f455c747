#!/usr/bin/env python3
"""Train the long-context probe model for mprefill (issue 8, item 3).

A small Llama-architecture model (HF LlamaForCausalLM layout, 3.2M parameters, 6.4 MB in
bf16) trained from scratch on a synthetic key-value retrieval task at up to 16K tokens
(curriculum 512 -> 16384), then exported as an HF directory that mprefill loads
(worker/weights.h load_hf_dir): config.json + model.safetensors (BF16) + MODEL_CARD.md,
plus retrieval eval sets (JSON lines {"ids": [...], "answer": [...]}) at 8K / 16K / 32K
and a calibration prompt (token ids) for mprefill-search.

Task (vocabulary of 512 ids, no tokenizer needed):
  0 pad, 1 BOS, 2 EOS, 3 KEY, 4 VAL, 5 QUERY, 6 ANS; ids 16..511 are content tokens.
  A sequence is BOS, then filler content tokens in which `pairs` records
  KEY k1 k2 VAL v1 v2 are scattered (distinct 2-token keys, random 2-token values), then
  `queries` records QUERY k1 k2 ANS v1 v2 for random recorded keys. Loss: the value tokens
  of the queries only (cross-entropy on v1 v2 after ANS). An eval sample ends at ANS and
  its answer is [v1, v2]; greedy decoding must reproduce both tokens.

Runs on one GPU (H100) in <= 15 minutes (--minutes caps the wall clock of training).
Needs only torch (and numpy through torch); no transformers / safetensors packages.

  python3 python/probe/train_probe.py --out models/probe-kv16k
"""
import argparse
import json
import math
import os
import random
import struct
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, BOS, EOS, KEY, VAL, QUERY, ANS = 0, 1, 2, 3, 4, 5, 6
FIRST_CONTENT = 16


# ----------------------------------------------------------------------------- data
def make_sample(rng, length, vocab, pairs, queries, final_query_only=False):
    """Returns (ids, loss_positions, answer). ids has exactly `length` tokens.

    loss_positions: indices i whose NEXT token (ids[i + 1]) is supervised (the value
    tokens of each query). For an eval sample (final_query_only) the sequence ends with
    QUERY k1 k2 ANS and answer = [v1, v2].
    """
    tail = 4 if final_query_only else 6 * queries
    body = length - 1 - tail
    assert body >= 6 * pairs + 1, "sequence too short for the records"
    ids = rng.choices(range(FIRST_CONTENT, vocab), k=body)
    keys = set()
    while len(keys) < pairs:
        keys.add((rng.randrange(FIRST_CONTENT, vocab), rng.randrange(FIRST_CONTENT, vocab)))
    keys = list(keys)
    values = [(rng.randrange(FIRST_CONTENT, vocab), rng.randrange(FIRST_CONTENT, vocab))
              for _ in keys]
    # Non-overlapping record slots spread over the whole body (depth uniform in [0, 1)).
    slots = sorted(rng.sample(range(body // 6), pairs))
    for (k, v), s in zip(zip(keys, values), slots):
        ids[6 * s:6 * s + 6] = [KEY, k[0], k[1], VAL, v[0], v[1]]
    ids = [BOS] + ids
    loss_pos = []
    if final_query_only:
        j = rng.randrange(pairs)
        ids += [QUERY, keys[j][0], keys[j][1], ANS]
        return ids, loss_pos, [values[j][0], values[j][1]]
    for _ in range(queries):
        j = rng.randrange(pairs)
        ids += [QUERY, keys[j][0], keys[j][1], ANS, values[j][0], values[j][1]]
        n = len(ids)
        loss_pos += [n - 3, n - 2]  # ANS predicts v1, v1 predicts v2
    assert len(ids) == length
    return ids, loss_pos, None


def make_batch(rng, batch, length, vocab, pairs, queries, device):
    x = torch.empty(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        ids, pos, _ = make_sample(rng, length, vocab, pairs, queries)
        x[b] = torch.tensor(ids)
        mask[b, pos] = True
    return x.to(device, non_blocking=True), mask.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- model
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
        hd = c["head_dim"]
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.q_proj = nn.Linear(c["hidden_size"], c["num_attention_heads"] * hd, bias=False)
        self.k_proj = nn.Linear(c["hidden_size"], c["num_key_value_heads"] * hd, bias=False)
        self.v_proj = nn.Linear(c["hidden_size"], c["num_key_value_heads"] * hd, bias=False)
        self.o_proj = nn.Linear(c["num_attention_heads"] * hd, c["hidden_size"], bias=False)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.gate_proj = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], c["hidden_size"], bias=False)

    def forward(self, x, cos, sin):
        c = self.c
        B, T, _ = x.shape
        H, KV, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, H, hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, KV, hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, KV, hd).transpose(1, 2)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        if KV != H:
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
        # bf16 on the GPU so SDPA takes the flash kernel (fp32 at 16K would fall back to a
        # slower kernel); the residual stream x stays fp32.
        adt = torch.bfloat16 if x.is_cuda else x.dtype
        a = F.scaled_dot_product_attention(q.to(adt), k.to(adt), v.to(adt), is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, H * hd)).to(x.dtype)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)).to(x.dtype)


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

    def forward(self, ids):
        T = ids.shape[1]
        cos, sin = rope_cache(T, self.c["head_dim"], self.c["rope_theta"], ids.device)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


# ----------------------------------------------------------------------------- export
def hf_state(model):
    """HF LlamaForCausalLM tensor names (what worker/weights.cc load_hf_dir reads)."""
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
        "bos_token_id": BOS, "eos_token_id": EOS, "torch_dtype": "bfloat16",
    }


MODEL_CARD = """# probe-kv16k: long-context retrieval probe for mprefill

- Architecture: Llama (HF LlamaForCausalLM layout), {num_hidden_layers} layers, hidden
  {hidden_size}, {num_attention_heads} query heads / {num_key_value_heads} KV heads of {head_dim},
  SwiGLU FFN {intermediate_size}, RMSNorm eps {rms_norm_eps}, RoPE theta {rope_theta}
  (rotate-half), vocabulary {vocab_size} (no tokenizer: ids are the task's symbols),
  untied LM head, {params} parameters, {mbytes:.1f} MB in bf16 (model.safetensors).
- Trained from scratch by python/probe/train_probe.py (seed {seed}) on a synthetic key-value
  retrieval task: filler content tokens with {pairs} records KEY k1 k2 VAL v1 v2 scattered
  uniformly, then QUERY k1 k2 ANS -> v1 v2. Curriculum {curriculum}; {steps} steps,
  {minutes:.1f} minutes on {device}.
- Ids: 0 pad, 1 BOS, 2 EOS, 3 KEY, 4 VAL, 5 QUERY, 6 ANS, 16..{vmax} content.
- Dense accuracy (PyTorch, bf16, exact match of both value tokens, {eval_n} samples each):
{accuracy}
- Files: config.json, model.safetensors, eval_{{8k,16k,32k}}.jsonl (JSON lines
  {{"ids": [...], "answer": [v1, v2]}}), calib_8k.ids (calibration prompt for mprefill-search).
- Use: python/probe/eval_probe.sh DIR (accuracy per sparse policy through the mprefill engine,
  with the mask tile density beside each).
- Licence: the project's; trained only on generated data.
"""


# ----------------------------------------------------------------------------- main
@torch.no_grad()
def dense_accuracy(model, samples, device):
    ok = 0
    for ids, answer in samples:
        x = torch.tensor([ids], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            t1 = model(x)[0, -1].argmax().item()
            t2 = model(torch.cat([x, torch.tensor([[t1]], device=device)], 1))[0, -1].argmax().item()
        ok += [t1, t2] == answer
    return ok / max(1, len(samples))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output HF directory")
    ap.add_argument("--minutes", type=float, default=13.0, help="training wall-clock cap")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-samples", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    c = {"hidden_size": args.hidden, "intermediate_size": (args.hidden * 8 // 3 + 63) // 64 * 64,
         "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
         "num_key_value_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
         "vocab_size": 512, "max_position_embeddings": 65536, "rms_norm_eps": 1e-5,
         "rope_theta": 1000000.0}
    model = Llama(c).to(device)
    params = sum(p.numel() for p in model.parameters())
    assert params * 2 <= 20 * 1024 * 1024, f"{params} parameters exceed 20 MB in bf16"
    print(f"probe: {params} parameters ({params * 2 / 1e6:.1f} MB bf16) on {device}", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    # Curriculum: doubling lengths, each stage a share of the steps; last stage max-len.
    lengths, L = [], 512
    while L < args.max_len:
        lengths.append(L)
        L *= 2
    lengths.append(args.max_len)
    stage_steps = [max(1, args.steps // (2 * (len(lengths) - 1)))] * (len(lengths) - 1)
    stage_steps.append(args.steps - sum(stage_steps))
    warmup = 100
    t0 = time.time()
    step = 0
    stop = False
    for length, nsteps in zip(lengths, stage_steps):
        batch = max(1, args.tokens_per_step // length)
        for _ in range(nsteps):
            lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            for g in opt.param_groups:
                g["lr"] = lr
            x, m = make_batch(rng, batch, length, c["vocab_size"], args.pairs, args.queries, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.float()[m[:, :-1]], x[:, 1:][m[:, :-1]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"probe: step {step} len {length} batch {batch} loss {loss.item():.4f} "
                      f"lr {lr:.2e} {time.time() - t0:.0f} s", flush=True)
            if time.time() - t0 > args.minutes * 60:
                print(f"probe: time cap of {args.minutes} min reached at step {step}", flush=True)
                stop = True
                break
        if stop:
            break
    train_minutes = (time.time() - t0) / 60

    os.makedirs(args.out, exist_ok=True)
    model.eval()
    erng = random.Random(args.seed + 1)
    acc_lines = []
    for name, n in (("8k", 8192), ("16k", 16384), ("32k", 32768)):
        samples = []
        for _ in range(args.eval_samples):
            ids, _, ans = make_sample(erng, n, c["vocab_size"], args.pairs, 0, final_query_only=True)
            samples.append((ids, ans))
        with open(os.path.join(args.out, f"eval_{name}.jsonl"), "w") as f:
            for ids, ans in samples:
                f.write(json.dumps({"ids": ids, "answer": ans}) + "\n")
        acc = dense_accuracy(model, samples, device)
        acc_lines.append(f"  - {name}: {acc:.3f}")
        print(f"probe: dense accuracy at {n} tokens: {acc:.3f} ({len(samples)} samples)", flush=True)
    calib, _, _ = make_sample(erng, 8192, c["vocab_size"], args.pairs, 0, final_query_only=True)
    with open(os.path.join(args.out, "calib_8k.ids"), "w") as f:
        f.write(" ".join(map(str, calib)) + "\n")

    save_safetensors(os.path.join(args.out, "model.safetensors"), hf_state(model))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(hf_config(c), f, indent=2)
        f.write("\n")
    card = MODEL_CARD.format(
        params=params, mbytes=params * 2 / 1e6, seed=args.seed, pairs=args.pairs,
        curriculum=" -> ".join(map(str, lengths)), steps=step, minutes=train_minutes,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        vmax=c["vocab_size"] - 1, eval_n=args.eval_samples, accuracy="\n".join(acc_lines), **c)
    with open(os.path.join(args.out, "MODEL_CARD.md"), "w") as f:
        f.write(card)
    print(f"probe: wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
