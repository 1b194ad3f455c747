#!/usr/bin/env python3
"""Writes a small random Llama model as an HF directory (config.json + bf16
model.safetensors) for the 2-GPU handoff test: head_dim 128 (the GPU attention kernels'
size), long max_position, few parameters (so it travels), enough KV per token for a
bandwidth figure. Deterministic (seed 1). Standard library + numpy only.

usage: make_random_hf.py OUT_DIR [--layers L] [--kv-heads H]
"""
import argparse, array, json, os, random, struct


class T:
    """A tensor: shape and values (row-major), as bf16 bytes (round to nearest even)."""

    def __init__(self, shape, std=None, fill=None, rng=None):
        self.shape = list(shape)
        n = 1
        for d in shape:
            n *= d
        vals = [fill] * n if fill is not None else [rng.gauss(0.0, std) for _ in range(n)]
        u = array.array("I", struct.pack("<%df" % n, *vals))
        self.data = array.array("H", ((x + 0x7FFF + ((x >> 16) & 1)) >> 16 for x in u)).tobytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    a = ap.parse_args()
    hd, nh, nkv = 128, 2 * a.kv_heads, a.kv_heads
    hidden, inter, vocab = 256, 512, 512
    cfg = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
           "eos_token_id": 2, "head_dim": hd, "hidden_act": "silu", "hidden_size": hidden,
           "intermediate_size": inter, "max_position_embeddings": 1 << 20, "mlp_bias": False,
           "model_type": "llama", "num_attention_heads": nh, "num_hidden_layers": a.layers,
           "num_key_value_heads": nkv, "rms_norm_eps": 1e-5, "rope_scaling": None,
           "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
           "vocab_size": vocab}
    rng = random.Random(1)
    t = {"model.embed_tokens.weight": T((vocab, hidden), 1.0, rng=rng),
         "model.norm.weight": T((hidden,), fill=1.0)}
    for l in range(a.layers):
        p = "model.layers.%d." % l
        s = hidden ** -0.5
        t[p + "input_layernorm.weight"] = T((hidden,), fill=1.0)
        t[p + "post_attention_layernorm.weight"] = T((hidden,), fill=1.0)
        t[p + "self_attn.q_proj.weight"] = T((nh * hd, hidden), s, rng=rng)
        t[p + "self_attn.k_proj.weight"] = T((nkv * hd, hidden), s, rng=rng)
        t[p + "self_attn.v_proj.weight"] = T((nkv * hd, hidden), s, rng=rng)
        t[p + "self_attn.o_proj.weight"] = T((hidden, nh * hd), (nh * hd) ** -0.5, rng=rng)
        t[p + "mlp.gate_proj.weight"] = T((inter, hidden), s, rng=rng)
        t[p + "mlp.up_proj.weight"] = T((inter, hidden), s, rng=rng)
        t[p + "mlp.down_proj.weight"] = T((hidden, inter), inter ** -0.5, rng=rng)
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(t):
        b = t[name].data
        header[name] = {"dtype": "BF16", "shape": t[name].shape,
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


if __name__ == "__main__":
    main()
