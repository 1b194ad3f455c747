#!/usr/bin/env python3
"""Train the long-context probe model for mprefill (issue 8, item 3).

A small Llama-architecture model (HF LlamaForCausalLM layout) trained from scratch on the
synthetic key-value retrieval task of probe_task.py, with a length curriculum up to
--max-len, then exported as an HF directory that mprefill loads (model/weights.h
load_hf_dir): config.json + model.safetensors (BF16) + MODEL_CARD.md + calib_8k.ids.

Shape (default): 4 layers, hidden 256, 4 query heads / 2 KV heads of head_dim 128 (the
CUDA engine's kernels and GPU estimation take head_dim 64 or 128; the CI's CUDA subset
build has 128 only), SwiGLU 704, vocab 512, RoPE theta 1e6: about 4M parameters, 8 MB bf16.

Training: batches generated on the device with vectorised torch (no Python loop per
sample); loss on the value tokens of the queries only (k2 -> v1, v1 -> v2). Curriculum
512 -> 1K -> ... -> max-len: a stage ends when the running exact-match accuracy of its
queries reaches --advance-acc (or after --stage-minutes once it is above 0.5, or on a
schedule that reaches max-len at 60% of the cap); 30% of the steps revisit a shorter
length so short contexts are not forgotten. Tokens per step are constant.
Learning rate: warm-up, constant, cosine to 5% over the last 20% of the wall-clock cap.
The --minutes cap covers training; evaluation and export add well under a minute on an H100.

  PYTHONUNBUFFERED=1 python3 python/probe/train_probe.py --out DIR --minutes 7
"""
import argparse
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


# ----------------------------------------------------------------------------- data
def gpu_batch(gen, batch, length, queries, device):
    """[batch][length] ids of the task distribution (probe_task.make_sample with `queries`
    complete query records at the end) and the positions whose next token is supervised."""
    pairs = task.pairs_for(length)
    tail = RECORD * queries
    body = length - 1 - tail
    nslots = body // RECORD
    assert nslots >= pairs >= queries
    ncontent = VOCAB - FIRST
    ids = torch.randint(FIRST, VOCAB, (batch, length), generator=gen, device=device)
    ids[:, 0] = BOS
    k1 = torch.rand(batch, ncontent, generator=gen, device=device).argsort(-1)[:, :pairs] + FIRST
    k2, v1, v2 = (torch.randint(FIRST, VOCAB, (batch, pairs), generator=gen, device=device)
                  for _ in range(3))
    slots = torch.rand(batch, nslots, generator=gen, device=device).argsort(-1)[:, :pairs]
    pos = 1 + RECORD * slots[..., None] + torch.arange(RECORD, device=device)  # [B][P][6]
    key_tok = torch.full_like(k1, KEY)
    rec = torch.stack([key_tok, k1, k2, v1, v2], -1)
    ids.scatter_(1, pos.view(batch, -1), rec.view(batch, -1))
    q = torch.rand(batch, pairs, generator=gen, device=device).argsort(-1)[:, :queries]
    g = lambda t: t.gather(1, q)  # noqa: E731
    qrec = torch.stack([torch.full_like(q, QUERY), g(k1), g(k2), g(v1), g(v2)], -1)
    ids[:, length - tail:] = qrec.view(batch, tail)
    start = length - tail + RECORD * torch.arange(queries, device=device)
    lpos = torch.stack([start + 2, start + 3], -1).view(-1)  # k2 -> v1, v1 -> v2
    return ids, lpos


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
  {minutes:.1f} minutes on one {device}) on the synthetic key-value retrieval task of
  `python/probe/probe_task.py`: filler content tokens with records `KEY k1 k2 v1 v2`
  spread uniformly (16 records up to 4K tokens, one per 256 tokens beyond, at most 64),
  then queries `QUERY k1 k2 -> v1 v2`; loss on the value tokens only. Length curriculum
  {curriculum} ({tokens_per_step} tokens per step; stage reached at step: {stage_steps}).
- Ids: 0 pad, 1 BOS, 2 EOS, 3 KEY, 5 QUERY, 16..{vmax} content (4, 6..15 unused).
- Dense accuracy in PyTorch (bf16 attention, weights rounded to bf16; exact match of both
  value tokens, greedy) on the eval sets of `probe_task.py` (seed {eval_seed}, {eval_n}
  samples per length; one query at the end of the context):
{accuracy}
- Eval sets and the calibration prompt are regenerated, not committed:
  `python3 python/probe/probe_task.py --out DIR` writes eval_{{8k,16k,32k}}.jsonl
  (JSON lines {{"ids": [...], "answer": [v1, v2]}}) and calib_8k.ids (calibration prompt
  for mprefill-search, token ids). `calib_8k.ids` beside this card is that prompt.
- Accuracy per sparse policy through the mprefill engine: `docs/probe.md`.
- Licence: the project's; trained only on generated data.
"""


# ----------------------------------------------------------------------------- main
@torch.no_grad()
def accuracy(model, samples, device, batch):
    """Greedy exact match of both answer tokens with one forward per sample: the input is
    ids + [v1]; greedy decoding reproduces [v1, v2] iff argmax at k2 is v1 and argmax at v1
    (given v1) is v2."""
    ok = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        x = torch.tensor([ids + [ans[0]] for ids, ans in chunk], device=device)
        T = x.shape[1]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(x, torch.tensor([T - 2, T - 1], device=device)).argmax(-1)
        want = torch.tensor([ans for _, ans in chunk], device=device)
        ok += (pred == want).all(-1).sum().item()
    return ok / max(1, len(samples))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output HF directory")
    ap.add_argument("--name", default="probe-kv32k")
    ap.add_argument("--minutes", type=float, default=7.0, help="training wall-clock cap")
    ap.add_argument("--max-len", type=int, default=32768)
    ap.add_argument("--min-len", type=int, default=256)
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--queries", type=int, default=16, help="supervised queries per sequence")
    ap.add_argument("--advance-acc", type=float, default=0.9)
    ap.add_argument("--stage-minutes", type=float, default=0.0,
                    help="longest stage before the next length (0: 15%% of --minutes)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-samples", type=int, default=50)
    ap.add_argument("--eval-lengths", default="8192,16384,32768,65536")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=704)
    args = ap.parse_args()

    t_start = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    c = {"hidden_size": args.hidden, "intermediate_size": args.ffn,
         "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
         "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
         "vocab_size": VOCAB, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
         "rope_theta": 1000000.0}
    model = Llama(c).to(device)
    params = sum(p.numel() for p in model.parameters())
    assert params * 2 <= 20 * 1000 * 1000, f"{params} parameters exceed 20 MB in bf16"
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"probe: {params} parameters ({params * 2 / 1e6:.1f} MB bf16) on {dev_name}", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05,
                            **({"fused": True} if device.type == "cuda" else {}))
    lengths, L = [], args.min_len
    while L < args.max_len:
        lengths.append(L)
        L *= 2
    lengths.append(args.max_len)
    budget = args.minutes * 60
    stage_cap = (args.stage_minutes or 0.15 * args.minutes) * 60
    warmup = 100
    stage, stage_t0, stage_step0 = 0, time.time(), 0
    stage_reached = [0]
    run_acc, run_loss = 0.0, None
    t0 = time.time()
    step = 0
    last_print = 0.0
    while True:
        el = time.time() - t0
        if el > budget:
            break
        frac = el / budget
        lr = args.lr * min(1.0, (step + 1) / warmup)
        if frac > 0.8:
            lr *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (frac - 0.8) / 0.2))
        for g in opt.param_groups:
            g["lr"] = lr
        cur = lengths[stage]
        length = cur
        if stage > 0 and random.random() < 0.3:
            length = random.choice(lengths[max(0, stage - 3):stage])
        batch = max(1, args.tokens_per_step // length)
        x, lpos = gpu_batch(gen, batch, length, args.queries, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x, lpos)
        target = x[:, lpos + 1]
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if length == cur:
            # Exact match per query (both value tokens), a running mean over ~20 steps.
            hit = (logits.argmax(-1) == target).view(batch, -1, 2).all(-1).float().mean().item()
            run_acc = 0.9 * run_acc + 0.1 * hit
            lv = loss.item()
            run_loss = lv if run_loss is None else 0.9 * run_loss + 0.1 * lv
        now = time.time()
        if now - last_print > 10 or step == 1:
            last_print = now
            print(f"probe: step {step} len {cur} (this step {length} x {batch}) loss "
                  f"{run_loss if run_loss is not None else float('nan'):.4f} acc {run_acc:.3f} "
                  f"lr {lr:.2e} {now - t0:.0f} s", flush=True)
        # Next length: when this one is learnt; after --stage-minutes once it is half
        # learnt; and on a schedule that reaches max-len at 60% of the cap once above 0.3.
        forced = now - t0 > budget * 0.6 * (stage + 1) / (len(lengths) - 1)
        capped = now - stage_t0 > stage_cap and run_acc >= 0.5
        forced = forced and run_acc >= 0.3  # nothing learnt yet: longer would not help
        if stage + 1 < len(lengths) and step - stage_step0 >= 30 and (
                run_acc >= args.advance_acc or capped or forced):
            why = (f"acc {run_acc:.3f}" if run_acc >= args.advance_acc else
                   f"stage time cap, acc {run_acc:.3f}" if capped else
                   f"schedule, acc {run_acc:.3f}")
            stage += 1
            stage_t0, stage_step0 = now, step
            stage_reached.append(step)
            run_acc *= 0.5  # the next length starts from the current skill, discounted
            print(f"probe: step {step}: length {lengths[stage]} ({why}) at {now - t0:.0f} s",
                  flush=True)
    train_minutes = (time.time() - t0) / 60
    print(f"probe: trained {step} steps in {train_minutes:.2f} min, final length "
          f"{lengths[stage]}, running acc {run_acc:.3f}", flush=True)

    # Export first (so a late failure still leaves the model), then evaluate.
    os.makedirs(args.out, exist_ok=True)
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

    acc_lines, results = [], {}
    for n in (int(v) for v in args.eval_lengths.split(",") if v):
        samples = task.eval_set(n, args.eval_samples)
        acc = accuracy(model, samples, device, max(1, 65536 // n))
        results[n] = acc
        acc_lines.append(f"  - {n // 1024}K tokens: {acc:.3f}")
        print(f"probe: dense accuracy at {n} tokens: {acc:.3f} ({len(samples)} samples)", flush=True)
    curriculum = " -> ".join(map(str, lengths[:stage + 1]))
    card = MODEL_CARD.format(
        name=args.name, params=params, mbytes=params * 2 / 1e6, seed=args.seed,
        curriculum=curriculum, steps=step, minutes=train_minutes, device=dev_name,
        tokens_per_step=args.tokens_per_step,
        stage_steps=", ".join(f"{l}: {s}" for l, s in zip(lengths, stage_reached)),
        vmax=VOCAB - 1, eval_seed=task.EVAL_SEED, eval_n=args.eval_samples,
        accuracy="\n".join(acc_lines), **c)
    with open(os.path.join(args.out, "MODEL_CARD.md"), "w") as f:
        f.write(card)
    with open(os.path.join(args.out, "train_summary.json"), "w") as f:
        json.dump({"steps": step, "train_minutes": train_minutes, "device": dev_name,
                   "lengths": lengths[:stage + 1], "stage_reached": stage_reached,
                   "dense_accuracy": results, "params": params,
                   "total_seconds": time.time() - t_start}, f, indent=1)
    print(f"probe: wrote {args.out} ({time.time() - t_start:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
