"""CPU smoke training of train_probe.py: a tiny model must leave chance on the retrieval task
within 300 steps (~50 s of one core). The 128K recipe of commit 46f4ec9 stayed at chance for
10,730 steps of an H100 (issue 18); this test pins the first-stage fix (32-token stage,
k1 -> k2 loss, LM head starting as the embedding, every record queried), and the fix of the
2026-12-07 16-minute run (records at any token, --stage-steps).

Needs torch: the Python that runs the test if it has torch, else $MPREFILL_TORCH_PYTHON, else
the repo's .deps/torch-venv/bin/python (docs/probe.md: how to make it); skipped when none has
torch. Run by ctest (probe_python_test) or: cd python/probe && python3 -m unittest -v
test_probe_train"""
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))


def torch_python():
    """A Python interpreter that imports torch, or None."""
    for exe in (sys.executable, os.environ.get("MPREFILL_TORCH_PYTHON", ""),
                os.path.join(ROOT, ".deps", "torch-venv", "bin", "python")):
        if exe and os.path.exists(exe) and subprocess.run(
                [exe, "-c", "import torch"], capture_output=True, timeout=60).returncode == 0:
            return exe
    return None


PY = torch_python()
CHANCE = math.log(512 - 16)  # uniform over the 496 content ids: 6.207


@unittest.skipIf(PY is None, "no Python with torch (see docs/probe.md)")
class SmokeTrain(unittest.TestCase):
    def train(self, out, *extra):
        cmd = [PY, os.path.join(HERE, "train_probe.py"), "--out", out, "--hidden", "64",
               "--layers", "2", "--head-dim", "16", "--ffn", "128", "--min-len", "32",
               "--max-len", "32", "--tokens-per-step", "4096", "--max-steps", "300",
               "--minutes", "5", "--chunk-minutes", "6", "--eval-lengths", "",
               "--seed", "1234", *extra]
        # argparse keeps the last of a repeated option: extra may override the above.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr[-2000:])
        with open(os.path.join(out, "train_summary.json")) as f:
            return json.load(f)

    def test_leaves_chance_in_300_steps(self):
        with tempfile.TemporaryDirectory() as d:
            s = self.train(d)
            self.assertEqual(s["steps"], 300)
            first = s["stages"][0]
            self.assertEqual(first["length"], 32)
            # Measured (seed 1234, one core, records at any token): running answer loss 2.05
            # and exact match 0.684 (kv 0.689, mk 0.684) at step 300, ~5.75 / 0.00 at step
            # 200 (the grid layout's positional start was earlier, ~0.3 at step 200, but it
            # reached 0.9 at step 893 against 340: bench/NOTES.md §8.3). A recipe that does
            # not learn stays at ~6.2.
            self.assertLess(first["end_loss"], CHANCE - 2.0, first)
            self.assertGreater(first["acc"], 0.3, first)
            # Both layouts are trained (the multi-key task's stratified queries too).
            self.assertGreater(first["acc_mk"], 0.3, first)
            for name in ("config.json", "model.safetensors", "train.log"):
                self.assertTrue(os.path.exists(os.path.join(d, name)), name)
            self.assertFalse(os.path.exists(os.path.join(d, "ckpt.pt")))

    def test_multikey_accuracy_in_one_forward(self):
        # accuracy() scores every check of a multi-key sample from one forward; causal
        # attention makes that equal to a forward per check prefix. A random model's own
        # greedy answers (per prefix) must score 1.0, the same with one answer changed 0.0.
        code = f"""
import sys, torch
sys.path.insert(0, {HERE!r})
import train_probe as tp, probe_task as task
torch.manual_seed(0)
c = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=4096,
         rms_norm_eps=1e-5, rope_theta=1e7)
m = tp.Llama(c).eval()
with torch.no_grad():
    for p in m.parameters():
        p.mul_(20)  # away from uniform logits: argmax ties would make the check vacuous
own = []
with torch.no_grad():
    for ids, checks in task.multikey_eval_set(512, 3, 4):
        ids, new = list(ids), []
        for p, _ in checks:  # greedy v1 after ids[:p], then v2 after ids[:p] + [v1]
            v1 = m(torch.tensor([ids[:p]]), torch.tensor([p - 1])).argmax(-1).item()
            v2 = m(torch.tensor([ids[:p] + [v1]]), torch.tensor([p])).argmax(-1).item()
            if p < len(ids):
                ids[p:p + 2] = [v1, v2]  # teacher forcing with the model's own answers
            new.append((p, [v1, v2]))
        own.append((ids, new))
dev = torch.device("cpu")
print(tp.accuracy(m, own, dev, 4))
bad = [(ids, [(p, [a[0], a[1] + 1 if a[1] < 511 else 16]) if j == 1 else (p, a)
              for j, (p, a) in enumerate(ch)]) for ids, ch in own]
print(tp.accuracy(m, bad, dev, 4))
"""
        r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertEqual(r.stdout.split(), ["1.0", "0.0"])

    def test_records_off_the_slot_grid(self):
        # gpu_batch places records at any token (the 5-token grid let a 32-token model learn
        # record places instead of keys): every queried record must sit intact in the body,
        # starts must take every phase mod 5, and stratified queries one per segment.
        code = f"""
import sys, torch
sys.path.insert(0, {HERE!r})
import train_probe as tp, probe_task as task
g = torch.Generator(); g.manual_seed(5)
for L, strat in ((32, False), (64, True), (128, False), (1024, True), (2048, False)):
    nq = tp.queries_for(L, 8, 16)
    x, vpos, kpos = tp.gpu_batch(g, 8, L, nq, torch.device("cpu"), strat)
    body = L - 5 * nq
    assert x.shape == (8, L) and (x[:, 0] == task.BOS).all()
    assert ((x[:, 1:body] == task.KEY).sum(-1) == tp.train_pairs(L)).all(), L
    phases = set()
    for b in range(8):
        for j in range(nq):
            q = x[b, body + 5 * j: body + 5 * j + 5].tolist()
            assert q[0] == task.QUERY
            at = [p for p in range(1, body - 4) if x[b, p].item() == task.KEY
                  and x[b, p + 1:p + 5].tolist() == q[1:]]
            assert len(at) == 1, (L, b, j)
            phases.add((at[0] - 1) % 5)
        if strat and tp.train_pairs(L) == nq:  # i-th record: unit i of nq equal segments
            units = body - 1 - 4 * nq
            starts = (x[b, 1:body] == task.KEY).nonzero().view(-1) + 1
            for i, p in enumerate(starts.tolist()):
                u = p - 1 - 4 * i
                assert i * units / nq - 1 <= u < (i + 1) * units / nq, (L, i, u, units)
    assert len(phases) == 5 or L <= 64, (L, phases)
    assert (x[:, kpos - 1] == task.QUERY).all() and (x[:, vpos[0::2] - 2] == task.QUERY).all()
print("ok")
"""
        r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertEqual(r.stdout.split(), ["ok"])

    def test_stage_left_after_step_cap(self):
        # --stage-steps leaves a stage that has not learnt (the full run held 128 tokens for
        # 23,986 steps below both accuracy floors); unreachable --advance-acc, so only the
        # step cap can move on.
        with tempfile.TemporaryDirectory() as d:
            s = self.train(d, "--max-len", "64", "--max-steps", "45", "--stage-steps", "30",
                           "--advance-acc", "1.01")
            self.assertEqual([r["length"] for r in s["stages"]], [32, 64])
            self.assertEqual(s["stages"][0]["why"], "step cap")
            self.assertEqual(s["stages"][0]["steps"], 30)
            self.assertEqual(s["stages"][1]["steps"], 15)

    def test_bad_min_len_is_refused(self):
        with tempfile.TemporaryDirectory() as d:
            r = subprocess.run([PY, os.path.join(HERE, "train_probe.py"), "--out", d,
                                "--min-len", "16"], capture_output=True, text=True, timeout=120)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("--min-len >= 32", r.stderr)


if __name__ == "__main__":
    unittest.main()
