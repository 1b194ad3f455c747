#!/usr/bin/env python3
"""Sparse attention baseline: MInference's Triton kernels on the identical index files
(MPIX, ../shared/BENCHMARKS.md) that mprefill-bench dumped.

MInference itself is not installed and not part of this repository: its two kernel files
(minference/ops/pit_sparse_flash_attention_v2.py, block_sparse_flash_attention.py) are
read from --minference-dir (a git-ignored folder, e.g. .carry/minference); the one import
of its compiled extension (`from ..cuda import ...`) is dropped in a temporary copy, which
is imported as a plain module. Only `_triton_mixed_sparse_attention` and
`_triton_block_sparse_attention` are called, as MInference calls them (their launch
configuration: 64x64 tiles, num_warps 4, num_stages 2; the output is allocated with
zeros_like inside the call, <1% of the time at these sizes).

Vertical-slash index conversion (MInference's own converter is a CUDA extension; it is not
built). Both conversions below start from the same MPIX file:
  exact       our mask exactly (BENCHMARKS.md): per 64-row block the merged windows
              [lo, hi) of the canonical index; a range of length L = 64 q + r is passed
              as q 64-wide block offsets starting at lo + r and its first r columns as
              gathered column indices (they lie left of the block's rows, where the
              column path needs no causal mask); vertical columns outside every range
              are column indices as well.
  minference  MInference's merge rule (read from its converter's description): a window
              whose end lies within 64 past the current range's end extends the range by
              a whole 64; verticals inside a range are dropped. Ranges stay multiples of
              64 and may cover up to 63 columns more than our mask per merge.
The output is checked on a few rows against a float64 torch reference of the mask that
the conversion represents (exact: BENCHMARKS.md's definition computed from the MPIX
selection directly; minference: windows + columns of the converted index).

Layout: MInference's own, [1, H, N, d] contiguous; GQA is expanded (K/V with H heads, as
its kernels index K/V by the query head). Tiles: "tiles" = 64x64 mask tiles of our
definition (vs_mask_tiles / listed causal blocks), the work unit of mprefill-bench;
"visited_tiles" = the tiles MInference's kernel iterates. FLOPs = 4 * 64 * 64 * d per
tile. One JSON object per case on stdout.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import struct
import sys
import tempfile
import time

import numpy as np

try:
    import numba

    njit = numba.njit(cache=False, parallel=True)
    prange = numba.prange
    HAVE_NUMBA = True
except Exception:  # slow pure-python fallback (small sizes only)
    HAVE_NUMBA = False

    def njit(f):
        return f

    prange = range

MAGIC = 0x5849504D


# ----------------------------------------------------------------------------- MPIX
def read_mpix(path):
    """Returns dict(kind, n, heads, and per kind: cols/offs lists or blocks [H, nb, k])."""
    raw = np.fromfile(path, dtype="<i4")
    if raw.size < 6 or raw[0] != MAGIC:
        raise ValueError(f"{path}: not an MPIX file (bad magic)")
    if raw[1] != 1:
        raise ValueError(f"{path}: unsupported version {raw[1]}")
    kind, n, heads, block = int(raw[2]), int(raw[3]), int(raw[4]), int(raw[5])
    if block != 64:
        raise ValueError(f"{path}: block {block} != 64")
    pos = 6
    out = {"kind": kind, "n": n, "heads": heads, "path": path}
    if kind == 1:
        cols, offs = [], []
        for h in range(heads):
            nv, ns = int(raw[pos]), int(raw[pos + 1])
            pos += 2
            c = raw[pos:pos + nv].astype(np.int64)
            pos += nv
            o = raw[pos:pos + ns].astype(np.int64)
            pos += ns
            if nv and (np.any(np.diff(c) <= 0) or c[0] < 0 or c[-1] >= n):
                raise ValueError(f"{path}: head {h}: columns not ascending/in range")
            if ns == 0 or np.any(np.diff(o) >= 0) or o[-1] != 0 or o[0] >= n:
                raise ValueError(f"{path}: head {h}: offsets not descending/in range or no 0")
            cols.append(c)
            offs.append(o)
        out["cols"], out["offs"] = cols, offs
    elif kind == 2:
        nb = (n + 63) // 64
        k = None
        blocks = []
        for h in range(heads):
            k = int(raw[pos])
            pos += 1
            blocks.append(raw[pos:pos + nb * k].reshape(nb, k))
            pos += nb * k
        out["blocks"] = np.stack(blocks).astype(np.int32)
        out["k"] = k
    else:
        raise ValueError(f"{path}: unknown kind {kind}")
    if pos != raw.size:
        raise ValueError(f"{path}: {raw.size - pos} trailing ints")
    return out


# ----------------------------------------------------------------------------- conversion
@njit
def _convert(offs_flat, offs_ptr, cols_flat, cols_ptr, n, nb, mode, fill, bc, bo, cc, ci, stats):
    """mode 0 = exact, 1 = minference merge. fill = False: count only (bc, cc get the
    per-block counts). stats[h] = (mask tiles of our definition, visited tiles)."""
    H = offs_ptr.shape[0] - 1
    for h in prange(H):
        o0, o1 = offs_ptr[h], offs_ptr[h + 1]
        c0, c1 = cols_ptr[h], cols_ptr[h + 1]
        mask_tiles = 0
        visited = 0
        lo_buf = np.empty(o1 - o0 + 1, np.int64)
        hi_buf = np.empty(o1 - o0 + 1, np.int64)
        for b in range(nb):
            m1 = min(64 * (b + 1), n)
            # canonical ranges (exact) or MInference-merged ranges
            nr = 0
            for i in range(o0, o1):
                d = offs_flat[i]
                if d >= m1:
                    continue
                e = max(m1 - d, 64)
                if mode == 0:
                    lo = e - 64
                    hi = min(e, m1)
                    if nr > 0 and lo <= hi_buf[nr - 1]:
                        if hi > hi_buf[nr - 1]:
                            hi_buf[nr - 1] = hi
                    else:
                        lo_buf[nr] = lo
                        hi_buf[nr] = hi
                        nr += 1
                else:
                    if nr == 0:
                        lo_buf[0] = e - 64
                        hi_buf[0] = e
                        nr = 1
                    elif e > hi_buf[nr - 1] + 64:
                        lo_buf[nr] = e - 64
                        hi_buf[nr] = e
                        nr += 1
                    elif e > hi_buf[nr - 1]:
                        hi_buf[nr - 1] += 64
            nwin = 0
            ncol = 0
            nvert = 0
            # windows (and exact-mode range heads as gathered columns)
            for t in range(nr):
                lo = lo_buf[t]
                hi = hi_buf[t]
                L = hi - lo
                r = L % 64 if mode == 0 else 0
                if mode == 0:
                    mask_tiles += (L + 63) // 64
                for c in range(lo, lo + r):
                    if fill:
                        ci[h, b, ncol] = c
                    ncol += 1
                s = lo + r
                while s < hi:
                    if fill:
                        bo[h, b, nwin] = s
                    nwin += 1
                    s += 64
            # verticals outside every range, c < m1
            t = 0
            for j in range(c0, c1):
                c = cols_flat[j]
                if c >= m1:
                    break
                while t < nr and hi_buf[t] <= c:
                    t += 1
                if t < nr and lo_buf[t] <= c:
                    continue
                if fill:
                    ci[h, b, ncol] = c
                ncol += 1
                nvert += 1
            if mode == 0:
                mask_tiles += (nvert + 63) // 64
            if fill and ncol > 1:
                ci[h, b, :ncol].sort()  # gathered columns ascending
            visited += nwin + (ncol + 63) // 64
            bc[h, b] = nwin
            cc[h, b] = ncol
        stats[h, 0] = mask_tiles
        stats[h, 1] = visited


def convert_vs(ix, mode):
    """Returns (block_count, block_offset, column_count, column_index) as int32 numpy
    arrays shaped [1, H, nb(, width)], plus per-head stats [H, 2] (mask tiles for mode
    exact, visited tiles)."""
    n, H = ix["n"], ix["heads"]
    nb = (n + 63) // 64
    offs_ptr = np.zeros(H + 1, np.int64)
    cols_ptr = np.zeros(H + 1, np.int64)
    offs_ptr[1:] = np.cumsum([len(o) for o in ix["offs"]])
    cols_ptr[1:] = np.cumsum([len(c) for c in ix["cols"]])
    offs_flat = np.concatenate(ix["offs"]).astype(np.int64)
    cols_flat = (np.concatenate(ix["cols"]) if cols_ptr[-1] else np.zeros(0)).astype(np.int64)
    m = 0 if mode == "exact" else 1
    bc = np.zeros((H, nb), np.int32)
    cc = np.zeros((H, nb), np.int32)
    stats = np.zeros((H, 2), np.int64)
    dummy3 = np.zeros((1, 1, 1), np.int32)
    _convert(offs_flat, offs_ptr, cols_flat, cols_ptr, n, nb, m, False, bc, dummy3, cc, dummy3, stats)
    ws = max(1, int(bc.max()))
    wv = max(1, int(cc.max()))
    bo = np.zeros((H, nb, ws), np.int32)
    ci = np.zeros((H, nb, wv), np.int32)
    _convert(offs_flat, offs_ptr, cols_flat, cols_ptr, n, nb, m, True, bc, bo, cc, ci, stats)
    return bc[None], bo[None], cc[None], ci[None], stats


def vs_mask_row(ix, h, r):
    """Boolean key mask of (head h, row r) by BENCHMARKS.md's definition."""
    n = ix["n"]
    m1 = min(64 * (r // 64 + 1), n)
    keys = np.zeros(n, bool)
    o = ix["offs"][h]
    o = o[o < m1]
    e = np.maximum(m1 - o, 64)
    for lo, hi in zip(e - 64, np.minimum(e, m1)):
        keys[lo:hi] = True
    c = ix["cols"][h]
    keys[c[c < m1]] = True
    keys[r + 1:] = False
    return keys


def converted_mask_row(n, bc, bo, cc, ci, h, r):
    """Key mask of the MInference-format index (what its kernel computes) for (h, r)."""
    b = r // 64
    keys = np.zeros(n + 64, bool)
    for s in bo[0, h, b, :bc[0, h, b]]:
        keys[s:s + 64] = True
    keys[ci[0, h, b, :cc[0, h, b]]] = True
    keys = keys[:n]
    keys[r + 1:] = False
    return keys


# ----------------------------------------------------------------------------- kernels
def load_minference(mdir):
    """Imports MInference's two Triton kernel files from mdir (a copy of its
    minference/ops/ files), without its compiled extension."""
    names = ["pit_sparse_flash_attention_v2.py", "block_sparse_flash_attention.py"]
    tmp = tempfile.mkdtemp(prefix="minference_ops_")
    for nm in names:
        src = None
        for cand in (os.path.join(mdir, nm), os.path.join(mdir, "minference", "ops", nm)):
            if os.path.exists(cand):
                src = open(cand).read()
                break
        if src is None:
            raise FileNotFoundError(f"{nm} not found under {mdir}")
        src = src.replace("from ..cuda import convert_vertical_slash_indexes", "convert_vertical_slash_indexes = None")
        with open(os.path.join(tmp, "mi_" + nm), "w") as f:
            f.write(src)
    sys.path.insert(0, tmp)
    import io
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):  # its "install SGLang or vllm" hint
        import mi_pit_sparse_flash_attention_v2 as vs_mod
        import mi_block_sparse_flash_attention as bs_mod
    return vs_mod, bs_mod


def time_cuda(fn, warmup, reps):
    import torch

    times = []
    for i in range(warmup + reps):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        if i >= warmup:
            times.append(e0.elapsed_time(e1))
    return statistics.median(times), min(times), max(times)


def check_rows(q, k, v, out, rows, mask_fn, scale, heads):
    """max|out - ref| / max|ref| over (head, row) pairs; ref in float64 on the GPU."""
    import torch

    err, mref = 0.0, 0.0
    finite = True
    for h in heads:
        for r in rows:
            keys = torch.from_numpy(np.nonzero(mask_fn(h, r))[0]).to(q.device)
            qr = q[0, h, r].double()
            kk = k[0, h].index_select(0, keys).double()
            vv = v[0, h].index_select(0, keys).double()
            p = torch.softmax((kk @ qr) * scale, dim=0)
            ref = p @ vv
            o = out[0, h, r].double()
            finite = finite and bool(torch.isfinite(o).all())
            err = max(err, float((o - ref).abs().max()))
            mref = max(mref, float(ref.abs().max()))
    rel = err / max(mref, 1e-30)
    return rel, finite and rel <= 2e-2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--load-indices", default="", help="MPIX files, comma-separated")
    ap.add_argument("--from-jsonl", default="",
                    help="mprefill-bench --json outputs (comma-separated): their index_file fields")
    ap.add_argument("--minference-dir", default=".carry/minference")
    ap.add_argument("--convert", default="exact,minference", help="exact, minference or both (comma)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--check-rows", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    import torch
    import triton

    files = [f for f in a.load_indices.split(",") if f]
    meta = {}
    for jl in [f for f in a.from_jsonl.split(",") if f]:
        if not os.path.exists(jl):
            print(f"# {jl}: missing", file=sys.stderr)
            continue
        for line in open(jl):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            f = r.get("index_file")
            if f and not r.get("derived") and f not in meta and os.path.exists(f):
                files.append(f)
                meta[f] = r
    if not files:
        sys.exit("error: no index files (--load-indices or --from-jsonl)")
    vs_mod, bs_mod = load_minference(a.minference_dir)
    commit = ""
    cpath = os.path.join(a.minference_dir, "COMMIT")
    if os.path.exists(cpath):
        commit = open(cpath).read().strip()
    card = torch.cuda.get_device_name(0)
    dev = torch.device("cuda")
    d = a.head_dim
    tile_flops = 4.0 * 64 * 64 * d
    modes = [m for m in a.convert.split(",") if m]
    print(f"# numba: {HAVE_NUMBA}, triton {triton.__version__}, torch {torch.__version__}, "
          f"minference {commit[:12]}", file=sys.stderr)

    cache = {}
    for path in files:
        t0 = time.time()
        ix = read_mpix(path)
        n, H = ix["n"], ix["heads"]
        if n % 64:
            print(json.dumps({"name": "minference", "index_file": path, "status": "N not a multiple of 64"}))
            continue
        nb = n // 64
        if cache.get("shape") != (n, H):  # inputs shared by the cases of one shape
            cache.clear()
            torch.cuda.empty_cache()
            g = torch.Generator(device=dev).manual_seed(a.seed + n)
            cache["q"] = torch.randn(1, H, n, d, device=dev, dtype=torch.bfloat16, generator=g)
            cache["k"] = torch.randn(1, H, n, d, device=dev, dtype=torch.bfloat16, generator=g)
            cache["v"] = torch.randn(1, H, n, d, device=dev, dtype=torch.bfloat16, generator=g)
            cache["shape"] = (n, H)
        q, k, v = cache["q"], cache["k"], cache["v"]
        seqlens = torch.tensor([n], dtype=torch.int32, device=dev)
        scale = d ** -0.5
        rng = np.random.default_rng(a.seed)
        rows = sorted(set([0, n - 1, min(n - 1, 64 * 5 + 17)] + list(rng.integers(0, n, max(0, a.check_rows - 3)))))
        rows = [int(x) for x in rows[:a.check_rows]] if a.check_rows > 0 else []
        heads = sorted(set([0, H - 1, H // 2]))
        base = os.path.basename(path).rsplit(".mpix", 1)[0]
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        common = {"card": card, "date": date, "index_file": path, "case": base,
                  "shape": {"seq": n, "heads": H, "kv_heads": H, "head_dim": d, "dtype": "bf16",
                            "causal": True, "layout": "bhnd", "gqa": "expanded"},
                  "triton": triton.__version__, "torch": torch.__version__, "minference_commit": commit}
        if ix["kind"] == 1:
            mask_tiles = None
            for mode in modes:
                tc = time.time()
                bc, bo, cc, ci, stats = convert_vs(ix, mode)
                conv_s = time.time() - tc
                if mode == "exact":
                    mask_tiles = int(stats[:, 0].sum())
                if mask_tiles is None:  # our tile count needs the exact ranges
                    mask_tiles = int(convert_vs(ix, "exact")[4][:, 0].sum())
                visited = int(stats[:, 1].sum())
                t_bc, t_bo, t_cc, t_ci = (torch.from_numpy(x).to(dev) for x in (bc, bo, cc, ci))
                del bo, ci

                def run():
                    return vs_mod._triton_mixed_sparse_attention(
                        q, k, v, seqlens, t_bc, t_bo, t_cc, t_ci, scale, 64, 64)

                out = run()
                torch.cuda.synchronize()
                if mode == "exact":
                    mfn = lambda h, r: vs_mask_row(ix, h, r)
                else:
                    bc_, bo_, cc_, ci_ = (x.cpu().numpy() for x in (t_bc, t_bo, t_cc, t_ci))
                    mfn = lambda h, r: converted_mask_row(n, bc_, bo_, cc_, ci_, h, r)
                rel, ok = check_rows(q, k, v, out, rows, mfn, scale, heads)
                del out
                ms, mn, mx = time_cuda(run, a.warmup, a.repeat)
                rec = {"name": "minference_vs_" + mode, **common, "pattern": "vertical_slash",
                       "convert": mode, "tiles": mask_tiles, "visited_tiles": visited,
                       "causal_tiles": H * nb * (nb + 1) // 2,
                       "density": round(mask_tiles / (H * nb * (nb + 1) / 2), 4),
                       "ms": round(ms, 4), "ms_min": round(mn, 4), "ms_max": round(mx, 4),
                       "reps": a.repeat, "tflops": round(tile_flops * mask_tiles / (ms * 1e-3) / 1e12, 1),
                       "tflops_visited": round(tile_flops * visited / (ms * 1e-3) / 1e12, 1),
                       "check_rel_err": round(rel, 5), "check_ok": ok, "convert_s": round(conv_s, 2),
                       "status": "ok" if ok else "check failed"}
                if path in meta:
                    for key in ("group", "weight", "budget", "index_set"):
                        if key in meta[path]:
                            rec[key] = meta[path][key]
                print(json.dumps(rec), flush=True)
                del t_bc, t_bo, t_cc, t_ci
                torch.cuda.empty_cache()
        else:
            blocks = ix["blocks"]
            kk = ix["k"]
            want = np.minimum(np.arange(nb) + 1, kk)
            valid = (blocks >= 0).sum(-1)
            if np.any(valid < want[None, :]):
                print(json.dumps({"name": "minference_bs", **common,
                                  "status": "index has fewer than min(b+1, k) blocks in a row; "
                                            "MInference's kernel would read block -1"}))
                continue
            tiles = int(valid.sum())
            t_bi = torch.from_numpy(np.ascontiguousarray(blocks[None])).to(dev)

            def run():
                return bs_mod._triton_block_sparse_attention(q, k, v, seqlens, t_bi, scale, 64, 64)

            out = run()
            torch.cuda.synchronize()

            def mfn(h, r):
                keys = np.zeros(n, bool)
                for j in blocks[h, r // 64]:
                    if j >= 0:
                        keys[64 * j:64 * j + 64] = True
                keys[r + 1:] = False
                return keys

            rel, ok = check_rows(q, k, v, out, rows, mfn, scale, heads)
            del out
            ms, mn, mx = time_cuda(run, a.warmup, a.repeat)
            rec = {"name": "minference_bs", **common, "pattern": "block_sparse", "topk": kk,
                   "tiles": tiles, "visited_tiles": tiles, "causal_tiles": H * nb * (nb + 1) // 2,
                   "density": round(tiles / (H * nb * (nb + 1) / 2), 4),
                   "ms": round(ms, 4), "ms_min": round(mn, 4), "ms_max": round(mx, 4), "reps": a.repeat,
                   "tflops": round(tile_flops * tiles / (ms * 1e-3) / 1e12, 1),
                   "check_rel_err": round(rel, 5), "check_ok": ok, "status": "ok" if ok else "check failed"}
            print(json.dumps(rec), flush=True)
            del t_bi
        print(f"# {base}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
