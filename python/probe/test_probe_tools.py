"""CPU tests of the probe's torch-free tools: the task generators (probe_task.py), the Wilson
interval (probe_stats.py) and the CSV aggregation of eval_probe.py. Run by ctest
(probe_python_test) or: cd python/probe && python3 -m unittest -v test_probe_tools"""
import json
import os
import random
import subprocess
import sys
import tempfile
import unittest

import eval_probe
import probe_stats
import probe_task as task


def find_record(ids, k1, k2):
    """Positions p with ids[p:p+3] == [KEY, k1, k2] (before the query tail)."""
    return [p for p in range(len(ids) - 4) if ids[p] == task.KEY and ids[p + 1] == k1
            and ids[p + 2] == k2]


class Wilson(unittest.TestCase):
    def test_published_values(self):
        # Newcombe (1998), Statistics in Medicine 17:857, Table II, method 3 (score, no
        # continuity correction).
        for k, n, lo, hi in [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                             (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
                             (29, 29, 0.8830, 1.0)]:
            got = probe_stats.wilson(k, n)
            self.assertAlmostEqual(got[0], lo, places=4, msg=(k, n))
            self.assertAlmostEqual(got[1], hi, places=4, msg=(k, n))

    def test_contains_estimate_and_narrows_with_n(self):
        for n in (1, 7, 16, 200):
            for k in range(n + 1):
                lo, hi = probe_stats.wilson(k, n)
                self.assertTrue(0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi))
        self.assertLess(probe_stats.wilson(190, 200)[1] - probe_stats.wilson(190, 200)[0],
                        probe_stats.wilson(19, 20)[1] - probe_stats.wilson(19, 20)[0])
        # The point: 16/16 cannot exclude 0.94, 200/200 can.
        self.assertLess(probe_stats.wilson(16, 16)[0], 0.94)
        self.assertGreater(probe_stats.wilson(200, 200)[0], 0.94)

    def test_bad_input(self):
        for k, n in ((1, 0), (-1, 5), (6, 5), (0.5, 2)):
            with self.assertRaises(ValueError):
                probe_stats.wilson(k, n)


class SingleKey(unittest.TestCase):
    def test_sample_answers_its_query(self):
        rng = random.Random(5)
        for length in (512, 1024, 4096):
            ids, ans = task.make_sample(rng, length)
            self.assertEqual(len(ids), length)
            self.assertEqual(ids[0], task.BOS)
            self.assertEqual(ids[-3], task.QUERY)
            recs = find_record(ids, ids[-2], ids[-1])
            self.assertEqual(len(recs), 1)
            self.assertEqual(ids[recs[0] + 3:recs[0] + 5], ans)
            self.assertEqual(sum(1 for t in ids if t == task.KEY), task.pairs_for(length))

    def test_ci_file_is_reproduced(self):
        # models/probe-kv32k/retrieval_1k.jsonl was written by this generator (MODEL_CARD).
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(here, "..", "..", "models", "probe-kv32k", "retrieval_1k.jsonl")
        with open(path) as f:
            want = [json.loads(line) for line in f if line.strip()]
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.jsonl")
            task.write_eval(out, task.eval_set(1024, 8, 1024))
            with open(out) as f:
                got = [json.loads(line) for line in f if line.strip()]
        self.assertEqual(got, want)


class MultiKey(unittest.TestCase):
    def test_checks_are_prefixes_ending_at_their_queries(self):
        rng = random.Random(11)
        for length, keys in ((1024, 4), (8192, 6), (2048, 1)):
            ids, checks = task.make_multikey_sample(rng, length, keys)
            self.assertEqual(len(ids), length)
            self.assertEqual(len(checks), keys)
            self.assertEqual(checks[-1][0], length)
            positions = []
            seen = set()
            for j, (p, ans) in enumerate(checks):
                self.assertEqual(ids[p - 3], task.QUERY)
                k1, k2 = ids[p - 2], ids[p - 1]
                self.assertNotIn((k1, k2), seen)
                seen.add((k1, k2))
                recs = find_record(ids, k1, k2)
                self.assertEqual(len(recs), 1)
                self.assertEqual(ids[recs[0] + 3:recs[0] + 5], ans)
                if j + 1 < keys:  # teacher forcing: the true values follow the query
                    self.assertEqual(ids[p:p + 2], ans)
                    self.assertEqual(checks[j + 1][0], p + task.RECORD)
                positions.append(recs[0])
            # One queried record per segment of the body: sorted, they fall in distinct
            # keys-quantiles of the context.
            body = length - 1 - (task.RECORD * keys - 2)
            segs = sorted(min(keys - 1, (p - 1) * keys // body) for p in positions)
            self.assertEqual(segs, list(range(keys)))

    def test_deterministic_and_distinct_from_single_key(self):
        a = task.multikey_eval_set(1024, 3, 4)
        self.assertEqual(a, task.multikey_eval_set(1024, 3, 4))
        self.assertNotEqual([s[0] for s in a], [s[0] for s in task.eval_set(1024, 3)])

    def test_eval_line_format(self):
        ids, checks = task.make_multikey_sample(random.Random(3), 1024, 3)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "mk.jsonl")
            task.write_eval(out, [(ids, checks)], answer_tokens=1)
            with open(out) as f:
                rec = json.loads(f.readline())
        self.assertEqual(rec["ids"], ids)
        self.assertEqual(rec["answer"], checks[-1][1][:1])
        self.assertEqual(rec["checks"], [[p, a[:1]] for p, a in checks[:-1]])

    def test_window_task_scores_the_last_facts_behind_a_full_window(self):
        a = task.window_eval_set(4096, 3)
        self.assertEqual(a, task.window_eval_set(4096, 3))
        self.assertNotEqual([s[0] for s in a], [s[0] for s in task.multikey_eval_set(4096, 3, 4)])
        for ids, checks in a:
            self.assertEqual(len(ids), 4096)
            self.assertEqual(len(checks), task.WINDOW_SCORED)
            self.assertEqual(checks[-1][0], 4096)
            for p, ans in checks:
                # The estimate's last 64 rows: 12 answered queries and the scored one.
                self.assertGreaterEqual(ids[p - 64:p].count(task.QUERY), 13)
                k1, k2 = ids[p - 2], ids[p - 1]
                at = [i for i in range(1, p - 64) if ids[i:i + 3] == [task.KEY, k1, k2]]
                self.assertEqual(len(at), 1)  # the record is in the body, once
                self.assertEqual(ids[at[0] + 3:at[0] + 5], ans)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "mw.jsonl")
            task.write_eval(out, a[:1], answer_tokens=1)
            with open(out) as f:
                rec = json.loads(f.readline())
        self.assertEqual(len(rec["checks"]), task.WINDOW_SCORED - 1)
        with self.assertRaises(ValueError):
            task.task_eval_set("nope", 4096, 1)

    def test_too_short_is_refused(self):
        with self.assertRaises(AssertionError):
            task.make_multikey_sample(random.Random(1), 90, 4, pairs=16)


class Aggregation(unittest.TestCase):
    def test_shards_add_up(self):
        s0 = [{"policy": "dense", "samples": 50, "correct": 49, "tile_density": 1.0,
               "seconds_per_sample": 0.2, "prefill_seconds_per_sample": 0.1,
               "budget_factor": 1.0, "device": "cuda"},
              {"policy": "vs:17:105", "samples": 40, "correct": 20, "tile_density": 0.1,
               "seconds_per_sample": 0.1, "prefill_seconds_per_sample": 0.05,
               "budget_factor": 1.0, "skipped": 10, "device": "cuda"}]
        s1 = [dict(s0[0], correct=50, tile_density=1.0),
              dict(s0[1], samples=50, correct=30, tile_density=0.2, skipped=0)]
        rows = eval_probe.csv_rows("mk", 8192, {"vs:17:105": "auto10"},
                                   eval_probe.aggregate([s0, s1]))
        by = {r["policy"]: r for r in rows}
        self.assertEqual((by["dense"]["samples"], by["dense"]["correct"]), (100, 99))
        self.assertEqual(by["auto10"]["samples"], 90)
        self.assertEqual(by["auto10"]["skipped"], 10)
        self.assertAlmostEqual(float(by["auto10"]["tile_density"]), (40 * 0.1 + 50 * 0.2) / 90,
                               places=4)
        lo, hi = probe_stats.wilson(50, 90)
        self.assertEqual(by["auto10"]["wilson_low"], f"{lo:.4f}")
        self.assertEqual(by["auto10"]["wilson_high"], f"{hi:.4f}")

    def test_only_runs_the_named_policies(self):
        here = os.path.dirname(os.path.abspath(__file__))
        model = os.path.join(here, "..", "..", "models", "probe-kv32k")
        with tempfile.TemporaryDirectory() as d:
            base = [sys.executable, os.path.join(here, "eval_probe.py"), "--model", model,
                    "--bin", "/bin/true", "--out", d, "--dry-run", "--tasks", "kv",
                    "--lengths", "1k", "--samples", "3", "--adaptive", "adaptive:0.9"]
            out = subprocess.run(base + ["--only", "dense,adaptive0"], capture_output=True,
                                 text=True, check=True).stdout
            calls = [l for l in out.splitlines() if "--eval-retrieval" in l]
            self.assertEqual(len(calls), 1, out)  # no pilot, no search: one shard call
            self.assertIn("--policies dense;adaptive:0.9 ", calls[0])
            bad = subprocess.run(base + ["--only", "dense,adaptive1"], capture_output=True,
                                 text=True)
            self.assertEqual(bad.returncode, 2)
            self.assertIn("unknown policy label(s) adaptive1", bad.stderr)

    def test_scaled_auto_rounds_like_scale_policy(self):
        self.assertEqual(eval_probe.scaled_auto(0.0172), "vs:17:104")
        self.assertEqual(eval_probe.scaled_auto(1.0), "vs:1000:6096")


if __name__ == "__main__":
    unittest.main()
