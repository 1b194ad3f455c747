"""The probe model's synthetic retrieval tasks (no torch needed).

Vocabulary of 512 ids, no tokenizer: 0 pad, 1 BOS, 2 EOS, 3 KEY, 5 QUERY, 16..511 content
tokens (4 and 6 are unused). A sequence is BOS, then filler content tokens in which `pairs`
records KEY k1 k2 v1 v2 sit at non-overlapping 5-token slots spread uniformly over the body
(k1 distinct within a sequence, so every key is unique), then queries QUERY k1 k2 v1 v2 for
distinct recorded keys. After QUERY k1 k2 the model must find the record whose two key
tokens match and copy the two tokens that follow them (an induction-style lookup; single
content tokens recur in the filler about once per 500 tokens, so both key tokens must
match): the record is on average half the context away, so the answer needs long-range
attention. An evaluation sample ends at k2 of its final query; its answer is [v1, v2] and
greedy decoding must reproduce both tokens.

Task "kv" (single key, above): one query at the end. Task "mk" (multi-key, issue 18): the
same context, then `keys` queries for distinct records, one drawn from each of `keys` equal
segments of the body (so the facts are scattered over the whole context), in random order;
the sample is answered iff all `keys` values are. Each value is scored after a prefill that
ends at that query's k2 (teacher forcing: the earlier queries carry their true values), so
every fact goes through a sparse prefill; with dense decoding after one prefill only the
first value would (the decode attends densely to the whole cache). The prefill that ends at
query j also holds j - 1 answered queries in its last 64 rows, whose records compete with
the scored one for the verticals of an estimated mask: a budget with too few verticals
drops some of them.

Task "mw" (multi-key with a full estimation window, issue 18): the mk layout with
WINDOW_KEYS = 16 queries, of which only the last WINDOW_SCORED = 4 are scored. The prefill
that ends at a scored query holds 12 answered queries (63 rows) in the last 64 rows that
the vertical-slash estimate reads, so about 13 records compete for the verticals: a
budget that keeps fewer loses the scored one, while every fact stays reachable under dense
attention. Measured on the CPU engine (24 samples at 8K, the final query after 12 answered
ones, 2026-12-08): `auto` scaled to 10% (vs:17:106) answers 3 of 24, dense 24 of 24, and
the same budget answers 24 of 24 with one query at the end (bench/NOTES.md §8.8).

Eval line format (what `mprefill-search --eval-retrieval` reads): {"ids": [...], "answer":
[...]} and, for mk, "checks": [[P, [...]], ...]: greedy answers after prefills of ids[:P];
the sample is correct iff the answer after ids and after every check's prefix all match.

This module makes the evaluation sets and calibration prompts deterministically from a
seed (Python's `random`, stable across versions), so they are regenerated rather than
committed; train_probe.py draws its training batches from the same distribution on the GPU.

  python3 python/probe/probe_task.py --out DIR [--lengths 8192,16384,32768] [--samples 50]
      [--task kv|mk|mw] [--keys 4] [--answer-tokens 2] [--shard N]
  (the CI set beside the committed model: --lengths 1024 --samples 8 --seed 1024
   --prefix retrieval --calib-length 0)
"""
import argparse
import json
import os
import random

PAD, BOS, EOS, KEY, QUERY = 0, 1, 2, 3, 5
FIRST_CONTENT = 16
VOCAB = 512
RECORD = 5  # KEY k1 k2 v1 v2
EVAL_SEED = 20261126  # seed of the published eval sets (MODEL_CARD.md)
CALIB_SEED = 7
WINDOW_KEYS = 16    # "mw": queries per sample ...
WINDOW_SCORED = 4   # ... of which the last ones are scored


def pairs_for(length):
    """Records per sequence: 16 at 512 tokens, one per 256 tokens, at most 64."""
    return min(64, max(16, length // 256))


def make_sample(rng, length, pairs=None, queries=1):
    """One evaluation sample of exactly `length` tokens ending at k2 of the last query.

    Returns (ids, answer) with answer = [v1, v2]. queries > 1 puts queries - 1 complete
    query records before the final one (distinct keys)."""
    pairs = pairs_for(length) if pairs is None else pairs
    n_content = VOCAB - FIRST_CONTENT
    assert pairs <= n_content and queries <= pairs
    tail = RECORD * (queries - 1) + 3
    body = length - 1 - tail
    assert body // RECORD >= pairs, "sequence too short for the records"
    ids = [rng.randrange(FIRST_CONTENT, VOCAB) for _ in range(body)]
    k1 = rng.sample(range(FIRST_CONTENT, VOCAB), pairs)
    keys = [(a, rng.randrange(FIRST_CONTENT, VOCAB)) for a in k1]
    values = [(rng.randrange(FIRST_CONTENT, VOCAB), rng.randrange(FIRST_CONTENT, VOCAB))
              for _ in range(pairs)]
    slots = rng.sample(range(body // RECORD), pairs)
    for (k, v), s in zip(zip(keys, values), slots):
        ids[RECORD * s:RECORD * s + RECORD] = [KEY, k[0], k[1], v[0], v[1]]
    ids = [BOS] + ids
    order = rng.sample(range(pairs), queries)
    for j in order[:-1]:
        ids += [QUERY, keys[j][0], keys[j][1], values[j][0], values[j][1]]
    j = order[-1]
    ids += [QUERY, keys[j][0], keys[j][1]]
    assert len(ids) == length
    return ids, [values[j][0], values[j][1]]


def make_multikey_sample(rng, length, keys=4, pairs=None):
    """One multi-key sample of exactly `length` tokens ending at k2 of the last of `keys`
    queries. Returns (ids, checks) with checks = [(P_j, [v1, v2])] for j = 1..keys in query
    order: P_j = the prefix length that ends at k2 of query j (P_keys = length).

    Query j's record sits in segment j of the body's slots (keys equal segments), so the
    queried facts are spread over the whole context; the other records are uniform."""
    pairs = pairs_for(length) if pairs is None else pairs
    assert 1 <= keys <= pairs <= VOCAB - FIRST_CONTENT
    tail = RECORD * keys - 2  # QUERY k1 k2 v1 v2 per query, the last one without values
    body = length - 1 - tail
    nslots = body // RECORD
    assert nslots >= pairs and nslots >= 2 * keys, "sequence too short for the records"
    ids = [rng.randrange(FIRST_CONTENT, VOCAB) for _ in range(body)]
    k1 = rng.sample(range(FIRST_CONTENT, VOCAB), pairs)
    recs = [(a, rng.randrange(FIRST_CONTENT, VOCAB), rng.randrange(FIRST_CONTENT, VOCAB),
             rng.randrange(FIRST_CONTENT, VOCAB)) for a in k1]
    # Queried records first: one slot per segment; then the rest anywhere else.
    qslots = [rng.randrange(j * nslots // keys, (j + 1) * nslots // keys) for j in range(keys)]
    taken = set(qslots)
    free = [s for s in range(nslots) if s not in taken]
    slots = qslots + rng.sample(free, pairs - keys)
    for r, s in zip(recs, slots):
        ids[RECORD * s:RECORD * s + RECORD] = [KEY, *r]
    ids = [BOS] + ids
    checks = []
    for j in rng.sample(range(keys), keys):
        a, b, v1, v2 = recs[j]
        ids += [QUERY, a, b]
        checks.append((len(ids), [v1, v2]))
        ids += [v1, v2]
    del ids[-2:]
    assert len(ids) == length and checks[-1][0] == length
    return ids, checks


def eval_set(length, samples, seed=EVAL_SEED):
    rng = random.Random(seed * 1000003 + length)
    return [make_sample(rng, length) for _ in range(samples)]


def multikey_eval_set(length, samples, keys=4, seed=EVAL_SEED):
    """Multi-key samples as (ids, checks); its own seed stream (distinct from eval_set's)."""
    rng = random.Random((seed * 1000003 + length) * 31 + keys)
    return [make_multikey_sample(rng, length, keys) for _ in range(samples)]


def window_eval_set(length, samples, seed=EVAL_SEED):
    """"mw" samples as (ids, checks): multi-key samples with WINDOW_KEYS queries, only the
    last WINDOW_SCORED checks kept (each after >= 12 answered queries); own seed stream."""
    rng = random.Random((seed * 1000003 + length) * 41 + WINDOW_KEYS)
    out = []
    for _ in range(samples):
        ids, checks = make_multikey_sample(rng, length, WINDOW_KEYS)
        out.append((ids, checks[-WINDOW_SCORED:]))
    return out


def task_eval_set(name, length, samples, keys=4, seed=EVAL_SEED):
    """The eval set of task kv, mk (keys facts) or mw."""
    if name == "kv":
        return eval_set(length, samples, seed)
    if name == "mk":
        return multikey_eval_set(length, samples, keys, seed)
    if name == "mw":
        return window_eval_set(length, samples, seed)
    raise ValueError(f"unknown task {name!r} (kv, mk or mw)")


def eval_line(ids, answer, checks=(), answer_tokens=2):
    """One JSON line of the evaluator's format; answers cut to their first answer_tokens
    tokens (1: only the value token produced by the prefill itself, no dense decode)."""
    rec = {"ids": ids, "answer": answer[:answer_tokens]}
    if checks:
        rec["checks"] = [[p, a[:answer_tokens]] for p, a in checks]
    return json.dumps(rec, separators=(",", ":"))


def calibration_ids(length=8192, seed=CALIB_SEED):
    """A calibration prompt for mprefill-search: a training-like sequence with 8 queries."""
    ids, _ = make_sample(random.Random(seed * 1000003 + length), length, queries=8)
    return ids


def write_eval(path, samples, answer_tokens=2):
    """kv samples (ids, answer) or mk samples (ids, checks): the last check is the answer
    after the whole of ids, the others go to "checks"."""
    with open(path, "w") as f:
        for ids, ans in samples:
            if ans and isinstance(ans[0], tuple):
                f.write(eval_line(ids, ans[-1][1], ans[:-1], answer_tokens) + "\n")
            else:
                f.write(eval_line(ids, ans, (), answer_tokens) + "\n")


def length_name(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def main():
    ap = argparse.ArgumentParser(description="Write the probe model's eval sets and calibration prompt.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--calib-length", type=int, default=8192, help="0: no calibration prompt")
    ap.add_argument("--prefix", default="eval", help="file names PREFIX_<length>.jsonl")
    ap.add_argument("--task", choices=("kv", "mk", "mw"), default="kv")
    ap.add_argument("--keys", type=int, default=4, help="mk: queried records per sample")
    ap.add_argument("--answer-tokens", type=int, choices=(1, 2), default=2,
                    help="answer tokens scored per query (1: the prefill's own token only)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for n in (int(x) for x in args.lengths.split(",") if x):
        samples = task_eval_set(args.task, n, args.samples, args.keys, args.seed)
        write_eval(os.path.join(args.out, f"{args.prefix}_{length_name(n)}.jsonl"), samples,
                   args.answer_tokens)
    if args.calib_length <= 0:
        return
    with open(os.path.join(args.out, f"calib_{args.calib_length // 1024}k.ids"), "w") as f:
        f.write(" ".join(map(str, calibration_ids(args.calib_length))) + "\n")


if __name__ == "__main__":
    main()
