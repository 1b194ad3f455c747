#!/usr/bin/env python3
"""Join mprefill-flash-bench and cudnn_baseline.py JSON lines (same run, same card)
into one results file: per (seq, causal) our ms / TF/s, cuDNN's, and the ratio
(our TF/s over cuDNN's). Usage: compare_dense.py OURS.jsonl CUDNN.jsonl OUT.json"""
import json
import sys


def load(path):
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def main():
    ours, base, out = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
    cases = []
    for o in ours:
        b = [x for x in base if x["seq"] == o["seq"] and x["causal"] == o["causal"]
             and x["heads"] == o["heads"] and x["head_dim"] == o["head_dim"]
             and x.get("dtype", "bf16") == o["dtype"]]
        # Compare against the fastest baseline layout measured (the conservative ratio).
        b.sort(key=lambda x: -x["tflops"])
        c = {"name": "dense_" + ("causal" if o["causal"] else "noncausal"), "card": o["card"],
             "shape": {"batch": 1, "seq": o["seq"], "heads": o["heads"],
                       "kv_heads": o["kv_heads"], "head_dim": o["head_dim"], "dtype": o["dtype"]},
             "pattern": "dense", "ms": o["ms"], "tflops": o["tflops"]}
        if b:
            c.update({"baseline": b[0]["name"], "baseline_card": b[0]["card"],
                      "baseline_gqa": b[0].get("gqa"), "baseline_layout": b[0].get("layout"),
                      "baseline_ms": b[0]["ms"],
                      "baseline_tflops": b[0]["tflops"],
                      "ratio": round(o["tflops"] / b[0]["tflops"], 3)})
        cases.append(c)
    json.dump({"cases": cases}, open(out, "w"), indent=1)
    print(f"{'seq':>8} {'H':>3} {'d':>4} {'dt':>5} {'causal':>7} {'ours ms':>9} {'TF/s':>7} {'cudnn ms':>9} {'TF/s':>7} {'ratio':>6}")
    for c in cases:
        sh = c["shape"]
        print(f"{sh['seq']:>8} {sh['heads']:>3} {sh['head_dim']:>4} {sh['dtype']:>5} {str(c['name'].endswith('_causal')):>7} {c['ms']:>9.3f} "
              f"{c['tflops']:>7.1f} {c.get('baseline_ms', float('nan')):>9.3f} "
              f"{c.get('baseline_tflops', float('nan')):>7.1f} {c.get('ratio', float('nan')):>6.3f}")


if __name__ == "__main__":
    main()
