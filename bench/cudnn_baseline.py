#!/usr/bin/env python3
"""Dense attention baseline: PyTorch SDPA on the cuDNN backend, same shapes as
mprefill-flash-bench (batch 1, bf16, 32 q heads / 8 kv heads, head_dim 128).

Q/K/V are allocated token-major ([n, heads, d], as mprefill stores them) and passed
to SDPA as [1, heads, n, d] views (--layout token), or as contiguous head-major
copies (--layout bhnd), or both. GQA: tried first with enable_gqa=True; if the
cuDNN backend refuses it, K/V are expanded to 32 heads before timing (reported in
the "gqa" field; the expansion itself is not timed). Time = median over reps of
CUDA-event-timed calls after warm-up. One JSON object per case on stdout.
"""
import argparse
import json
import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def run_case(n, heads, kv_heads, d, causal, reps, warmup, backend, layout):
    dev = torch.device("cuda")
    torch.manual_seed(n)
    q = torch.randn(n, heads, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(n, kv_heads, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(n, kv_heads, d, device=dev, dtype=torch.bfloat16)
    qv = q.unsqueeze(0).transpose(1, 2)  # [1, H, n, d] view of token-major memory
    kv_ = k.unsqueeze(0).transpose(1, 2)
    vv = v.unsqueeze(0).transpose(1, 2)
    if layout == "bhnd":  # head-major contiguous copies
        qv, kv_, vv = qv.contiguous(), kv_.contiguous(), vv.contiguous()
        del q, k, v
    gqa = "native"

    def call_native():
        return F.scaled_dot_product_attention(qv, kv_, vv, is_causal=causal, enable_gqa=True)

    fn = call_native
    with sdpa_kernel([backend]):
        try:
            call_native()
            torch.cuda.synchronize()
        except Exception as e:  # cuDNN backend without GQA support
            print(f"# enable_gqa refused ({type(e).__name__}: {str(e)[:120]}); expanding K/V",
                  file=sys.stderr)
            rep = heads // kv_heads
            ke = kv_.repeat_interleave(rep, dim=1)
            ve = vv.repeat_interleave(rep, dim=1)
            gqa = "expanded"

            def call_expanded():
                return F.scaled_dot_product_attention(qv, ke, ve, is_causal=causal)

            fn = call_expanded
        times = []
        for r in range(warmup + reps):
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            if r >= warmup:
                times.append(e0.elapsed_time(e1))
    ms = statistics.median(times)
    flops = 4.0 * n * n * d * heads * (0.5 if causal else 1.0)
    return {
        "name": "sdpa_" + backend.name.lower(),
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "dtype": "bf16",
        "seq": n,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": d,
        "causal": causal,
        "gqa": gqa,
        "layout": layout,
        "ms": round(ms, 4),
        "ms_min": round(min(times), 4),
        "ms_max": round(max(times), 4),
        "reps": reps,
        "tflops": round(flops / (ms * 1e-3) / 1e12, 1),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", default="32768,131072")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--causal", default="1", help="1, 0 or both")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default="cudnn", help="cudnn or flash")
    ap.add_argument("--layout", default="token",
                    help="token (token-major views, mprefill's layout), bhnd (contiguous) or both")
    a = ap.parse_args()
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[a.backend]
    causals = [True, False] if a.causal == "both" else [a.causal != "0"]
    layouts = ["token", "bhnd"] if a.layout == "both" else [a.layout]
    for n in [int(s) for s in a.seq.split(",")]:
        for c in causals:
            for lay in layouts:
                print(json.dumps(run_case(n, a.heads, a.kv_heads, a.dim, c, a.reps, a.warmup,
                                          backend, lay)), flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
