#!/usr/bin/env python3
"""Accuracy of the probe model per sparse policy, length and task, with Wilson 95% intervals,
tile density and prefill time (issue 18, item 3): a CSV that plot_probe.py draws.

  python3 python/probe/eval_probe.py --model models/probe-kv128k --bin BUILD/bin/mprefill-search \\
      --out DIR [--samples 200] [--lengths 8k,16k,32k,64k,128k] [--tasks kv,mk,mw] \\
      [--deadline-minutes 9] [--adaptive 'SPEC;SPEC;SPEC']

Resumable in chunks: every (task, length, shard of --shard samples) is one mprefill-search
call whose JSON lands in DIR/raw/; a rerun skips the shards already there. Before a shard the
driver predicts its time (the last shard of the same task and length, else the previous length
x 3) and stops with exit status 3 when it would end past --deadline-minutes (one device
command may run 10 minutes): run it again to go on. DIR/probe_eval.csv is rewritten from
all of DIR/raw/ at every stop.

Policies (labels in the CSV): dense; minference = `auto` (MInference's default budgets,
vertical-slash 1000 / 6096 on every head: its published configs are for 28-32-layer models,
not this 4-layer one); searched = the pattern search's config at --search-budget of the
tiles on the 8K calibration prompt (run here unless --searched is given); ashape = 128 sink
+ 1920 local; auto10 = `auto` with both budgets times one factor f per (task, length) such
that the masks keep --auto-density of the tiles: f is the mean budget factor of
mprefill-search's `auto@D` bisection (16 prefills per prompt) on the first --pilot samples,
then every sample runs the fixed policy vs:floor(1000 f):floor(6096 f) (one prefill, the
rounding of scale_policy); adaptive = --adaptive's specs (the issue's adaptive policy at 2-3
thresholds). A spec `adaptive:TAU:auto10` takes auto10's budgets as its caps at each length
(`adaptive:TAU:V:S` with auto10's V and S): tau then cuts below auto10's density. Uncapped,
the mass threshold keeps 52-70% of the tiles of this probe at 8K-64K (2026-12-07), since
most of its heads spread their mass; the issue asks for <= 10% at 128K.

Cost (to be measured; the estimate behind the defaults): a prefill of this 16-head model is
~7 ms of dense attention per head at 128K (bench/NOTES.md: ~6.8 ms per head, H100) plus
estimation, index download and density count, so ~0.2-0.3 s at 128K and 4x less per halving.
kv: 1 prefill per sample and policy; mk: --keys prefills (one per fact); mw: 4 prefills
(its scored facts, probe_task.WINDOW_SCORED). With 6 policies,
200 samples, keys 4 and one-token answers that is ~0.5 h at 128K, ~0.2 h at 64K and
< 0.1 h for 8K-32K. --answer-tokens 1 (default) scores the value token that the prefill
itself produces: the second value token comes from a dense decode step and adds the
export of the KV cache (1 GiB of fp32 at 128K) per prompt.
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_stats  # noqa: E402
import probe_task as task  # noqa: E402

# The adaptive policy's specs at 2-3 thresholds, label -> --policies spec; filled once the
# adaptive policy exists (issue 18 item 1), e.g. {"adaptive0.9": "adaptive.json"}.
ADAPTIVE_POLICIES = {}

CSV_FIELDS = ["task", "tokens", "policy", "spec", "samples", "correct", "accuracy",
              "wilson_low", "wilson_high", "tile_density", "prefill_s", "s_per_sample",
              "budget_factor", "skipped", "device"]


def parse_length(s):
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def scaled_auto(factor):
    """`auto` (1000 verticals, 6096 slashes) times factor, rounded as scale_policy does."""
    return f"vs:{max(0, math.floor(1000 * factor))}:{max(0, math.floor(6096 * factor))}"


CAPPED = ":auto10"  # an --adaptive spec ending so takes auto10's budgets as its caps


def capped_adaptive(spec, factor):
    """`adaptive:TAU:auto10` -> `adaptive:TAU:V:S` with auto10's budgets at this factor."""
    return spec[:-len(CAPPED)] + ":" + scaled_auto(factor)[len("vs:"):]


def aggregate(rows_by_shard):
    """Sum the per-shard JSON rows of one (task, length) by policy spec: counts add up,
    density and times are means weighted by samples."""
    out = {}
    for rows in rows_by_shard:
        for r in rows:
            a = out.setdefault(r["policy"], {"samples": 0, "correct": 0, "density": 0.0,
                                             "prefill": 0.0, "seconds": 0.0, "factor": 0.0,
                                             "skipped": 0, "device": r.get("device", "")})
            n = r.get("samples", 0)
            a["samples"] += n
            a["skipped"] += r.get("skipped", 0)
            if n:
                a["correct"] += r["correct"]
                a["density"] += r["tile_density"] * n
                a["prefill"] += r.get("prefill_seconds_per_sample", float("nan")) * n
                a["seconds"] += r["seconds_per_sample"] * n
                a["factor"] += r["budget_factor"] * n
    return out


def csv_rows(task_name, tokens, labels, agg):
    """CSV rows for one (task, length); labels maps spec -> policy label."""
    rows = []
    for spec, a in agg.items():
        n = a["samples"]
        row = {"task": task_name, "tokens": tokens, "policy": labels.get(spec, spec),
               "spec": spec, "samples": n, "correct": a["correct"], "skipped": a["skipped"],
               "device": a["device"]}
        if n:
            lo, hi = probe_stats.wilson(a["correct"], n)
            row.update(accuracy=f"{a['correct'] / n:.4f}", wilson_low=f"{lo:.4f}",
                       wilson_high=f"{hi:.4f}", tile_density=f"{a['density'] / n:.5f}",
                       prefill_s=f"{a['prefill'] / n:.4f}", s_per_sample=f"{a['seconds'] / n:.4f}",
                       budget_factor=f"{a['factor'] / n:.4g}")
        rows.append(row)
    return rows


class Driver:
    def __init__(self, args):
        self.a = args
        self.t0 = time.time()
        self.deadline = self.t0 + args.deadline_minutes * 60
        self.raw = os.path.join(args.out, "raw")
        self.sets = os.path.join(args.out, "sets")
        os.makedirs(self.raw, exist_ok=True)
        os.makedirs(self.sets, exist_ok=True)
        self.timing_path = os.path.join(args.out, "timing.jsonl")
        self.per_sample = {}  # (task, tokens) -> measured wall seconds per sample
        if os.path.exists(self.timing_path):
            with open(self.timing_path) as f:
                for line in f:
                    t = json.loads(line)
                    self.per_sample[(t["task"], t["tokens"])] = t["seconds"] / t["samples"]

    def log(self, msg):
        print(f"eval_probe: [{time.time() - self.t0:6.0f} s] {msg}", flush=True)

    def run(self, cmd, budget_s):
        self.log(" ".join(cmd))
        if self.a.dry_run:
            return
        remaining = self.deadline - time.time()
        timeout = max(30.0, min(budget_s, remaining + 60))
        try:
            subprocess.run(cmd, check=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"eval_probe: error: {cmd[0]} ran past {timeout:.0f} s: "
                             "rerun (finished shards are kept) or lower --shard")
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"eval_probe: error: {' '.join(cmd[:3])} ... exited {e.returncode}")

    def shard_files(self, task_name, n):
        """Write (once) the eval set of task/length as shards of --shard samples."""
        a = self.a
        name = f"{task_name}_{task.length_name(n)}"
        count = math.ceil(a.samples / a.shard)
        paths = [os.path.join(self.sets, f"{name}.s{k}.jsonl") for k in range(count)]
        if all(os.path.exists(p) for p in paths):
            return paths
        self.log(f"generating {a.samples} {task_name} samples of {n} tokens")
        samples = task.task_eval_set(task_name, n, a.samples, a.keys)
        for k, p in enumerate(paths):
            task.write_eval(p + ".tmp", samples[k * a.shard:(k + 1) * a.shard], a.answer_tokens)
            os.replace(p + ".tmp", p)
        return paths

    def searched_config(self):
        if self.a.searched:
            return self.a.searched
        out = os.path.join(self.a.out, "searched.json")
        if os.path.exists(out):
            return out
        calib = os.path.join(self.a.out, "calib_8k.ids")
        with open(calib, "w") as f:
            f.write(" ".join(map(str, task.calibration_ids(8192))) + "\n")
        self.run([self.a.bin, "--model", self.a.model, "--calib", calib, "--budget-tiles",
                  str(self.a.search_budget), "--out", out, "--csv",
                  os.path.join(self.a.out, "searched.csv")], 600)
        return out

    def predict(self, task_name, n, samples):
        per = self.per_sample.get((task_name, n))
        if per is None and (task_name, n // 2) in self.per_sample:
            per = 3.0 * self.per_sample[(task_name, n // 2)]
        return None if per is None else per * samples

    def auto_factor(self, task_name, n, may_run):
        """Mean budget factor of `auto@D` on the first --pilot samples (cached; None when
        it is not there and may_run is false, or no sample fits the density)."""
        path = os.path.join(self.raw, f"pilot_{task_name}_{task.length_name(n)}.json")
        if not os.path.exists(path):
            if not may_run:
                return None
            shard0 = self.shard_files(task_name, n)[0]
            self.run([self.a.bin, "--device", self.a.device, "--model", self.a.model,
                      "--eval-retrieval", shard0, "--limit", str(self.a.pilot), "--policies",
                      f"auto@{self.a.auto_density}", "--json", path], 600)
            if self.a.dry_run:
                return 1.0
        with open(path) as f:
            rows = json.load(f)
        if not rows or rows[0].get("samples", 0) == 0:
            self.log(f"auto@{self.a.auto_density} fits no sample at {n} tokens: auto10 left out")
            return None
        return rows[0]["budget_factor"]

    def evaluate(self, task_name, n, policies):
        """Runs the missing shards; returns False when the deadline stopped it."""
        paths = self.shard_files(task_name, n)
        specs = ";".join(policies.values())
        for k, shard in enumerate(paths):
            out = os.path.join(self.raw, f"{task_name}_{task.length_name(n)}.s{k}.json")
            if os.path.exists(out):
                continue
            with open(shard) as f:
                count = sum(1 for line in f if line.strip())
            est = self.predict(task_name, n, count)
            if est is not None and time.time() + est > self.deadline:
                self.log(f"{task_name} {n} shard {k}: ~{est:.0f} s would pass the deadline")
                return False
            t = time.time()
            self.run([self.a.bin, "--device", self.a.device, "--model", self.a.model,
                      "--eval-retrieval", shard, "--policies", specs, "--json", out + ".tmp"],
                     3600)
            if self.a.dry_run:
                continue
            os.replace(out + ".tmp", out)
            rec = {"task": task_name, "tokens": n, "shard": k, "samples": count,
                   "seconds": time.time() - t, "policies": len(policies)}
            with open(self.timing_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.per_sample[(task_name, n)] = rec["seconds"] / count
        return True

    def write_csv(self, labels):
        rows = []
        for task_name in self.a.tasks:
            for n in self.a.lengths:
                name = f"{task_name}_{task.length_name(n)}"
                shards = sorted(p for p in os.listdir(self.raw)
                                if p.startswith(name + ".s") and p.endswith(".json"))
                loaded = []
                for p in shards:
                    with open(os.path.join(self.raw, p)) as f:
                        loaded.append(json.load(f))
                if loaded:
                    rows += csv_rows(task_name, n, labels.get((task_name, n), {}),
                                     aggregate(loaded))
        path = os.path.join(self.a.out, "probe_eval.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.log(f"wrote {path} ({len(rows)} rows)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="probe HF directory")
    ap.add_argument("--bin", required=True, help="mprefill-search (a CUDA build for --device cuda)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tasks", default="kv,mk")
    ap.add_argument("--lengths", default="8k,16k,32k,64k,128k")
    ap.add_argument("--samples", type=int, default=200, help="per task and length")
    ap.add_argument("--shard", type=int, default=50, help="samples per mprefill-search call")
    ap.add_argument("--keys", type=int, default=4, help="mk: facts per sample")
    ap.add_argument("--answer-tokens", type=int, choices=(1, 2), default=1)
    ap.add_argument("--searched", default="", help="searched config (default: search here)")
    ap.add_argument("--search-budget", type=float, default=0.1)
    ap.add_argument("--auto-density", type=float, default=0.1)
    ap.add_argument("--pilot", type=int, default=8, help="samples of the auto@D factor pilot")
    ap.add_argument("--adaptive", default="", help="';'-separated extra specs (adaptive policy)")
    ap.add_argument("--only", default="",
                    help="comma-separated policy labels to run (default all), e.g. "
                         "adaptive0,adaptive1 to add rows to an earlier evaluation")
    ap.add_argument("--deadline-minutes", type=float, default=1e9)
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = ap.parse_args()
    a.tasks = [t for t in a.tasks.split(",") if t]
    if any(t not in ("kv", "mk", "mw") for t in a.tasks):
        ap.error("--tasks takes kv, mk and/or mw")
    a.lengths = [parse_length(x) for x in a.lengths.split(",") if x]
    if a.samples < 1 or a.shard < 1 or a.pilot < 1 or not 0 < a.auto_density <= 1:
        ap.error("--samples, --shard and --pilot must be >= 1, --auto-density in (0, 1]")
    if not a.dry_run and not os.access(a.bin, os.X_OK):
        ap.error(f"{a.bin} is not an executable")
    if not os.path.exists(os.path.join(a.model, "config.json")):
        ap.error(f"{a.model}/config.json not found")
    adaptive = [s.strip() for s in a.adaptive.split(";") if s.strip()]
    known = ["dense", "minference", "searched", "ashape", "auto10"] + list(ADAPTIVE_POLICIES) + \
        [f"adaptive{i}" for i in range(len(adaptive))]
    only = [x.strip() for x in a.only.split(",") if x.strip()] or known
    bad = [x for x in only if x not in known]
    if bad:
        ap.error(f"--only: unknown policy label(s) {', '.join(bad)} (known: {', '.join(known)})")
    d = Driver(a)
    base = {"dense": "dense", "minference": "auto", "ashape": "ashape:128:1920"}
    if "searched" in only:  # the search runs only when its rows are wanted
        base["searched"] = d.searched_config()
    base.update(ADAPTIVE_POLICIES)
    for i, spec in enumerate(adaptive):
        base[f"adaptive{i}"] = spec
    base = {k: v for k, v in base.items() if k in only}
    capped = [k for k, v in base.items() if v.endswith(CAPPED)]
    labels, done = {}, True
    for task_name in a.tasks:
        for n in a.lengths:
            pol = dict(base)
            if "auto10" in only or capped:
                # The pilot runs `auto@D` on --pilot prompts with ~16 prefills each: about 3x
                # the time per sample of the policy set.
                est = d.predict(task_name, n, 3 * a.pilot)
                done = done and (est is None or time.time() + est <= d.deadline)
                f = d.auto_factor(task_name, n, done)
                for k in capped:  # without auto10's budgets there are no caps to take
                    if f is None:
                        del pol[k]
                    else:
                        pol[k] = capped_adaptive(base[k], f)
                if f is not None and "auto10" in only:
                    pol["auto10"] = scaled_auto(f)
            labels[(task_name, n)] = {spec: label for label, spec in pol.items()}
            if done and not d.evaluate(task_name, n, pol):
                done = False
    d.write_csv(labels)
    if not done:
        d.log("stopped at the deadline: run again to go on")
        sys.exit(3)
    d.log("all shards done")


if __name__ == "__main__":
    main()
