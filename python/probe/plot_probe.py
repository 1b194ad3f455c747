#!/usr/bin/env python3
"""Accuracy vs tile density of the probe evaluation (eval_probe.py's CSV): one panel per task,
one marker per policy, one colour per length, Wilson 95% intervals as vertical bars.

  python3 python/probe/plot_probe.py DIR/probe_eval.csv --out docs/probe/accuracy_vs_density.png
"""
import argparse
import csv
import sys


def load(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("accuracy")]
    if not rows:
        raise SystemExit(f"plot_probe: error: {path} has no rows with an accuracy")
    for r in rows:
        for k in ("accuracy", "wilson_low", "wilson_high", "tile_density"):
            r[k] = float(r[k])
        r["tokens"] = int(r["tokens"])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--out", required=True, help="PNG file")
    args = ap.parse_args()
    rows = load(args.csv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["tokens"] for r in rows})
    policies = sorted({r["policy"] for r in rows})
    markers = "osD^v<>pP*Xh"
    colours = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == t):
            li, pi = lengths.index(r["tokens"]), policies.index(r["policy"])
            c = colours(li / max(1, len(lengths) - 1))
            yerr = [[r["accuracy"] - r["wilson_low"]], [r["wilson_high"] - r["accuracy"]]]
            ax.errorbar(r["tile_density"], r["accuracy"], yerr=yerr, fmt=markers[pi % len(markers)],
                        color=c, ms=6, capsize=2, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("tile density (computed 64x64 tiles / causal tiles)")
        ax.set_ylabel("accuracy (Wilson 95%)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title({"kv": "single key", "mk": "multi-key (all facts)",
                      "mw": "multi-key, full window (all 4 facts)"}.get(t, t))
        ax.grid(True, which="both", alpha=0.3)
    # Legends: policies by marker (grey), lengths by colour.
    ax = axes[0][0]
    hp = [ax.plot([], [], markers[i % len(markers)], color="0.4")[0] for i in range(len(policies))]
    hl = [ax.plot([], [], "s", color=colours(i / max(1, len(lengths) - 1)))[0]
          for i in range(len(lengths))]
    fig.legend(hp + hl, policies + [f"{n // 1024}K" for n in lengths], loc="center right",
               fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(args.out, dpi=120)
    print(f"plot_probe: wrote {args.out} ({len(rows)} points)", file=sys.stderr)


if __name__ == "__main__":
    main()
