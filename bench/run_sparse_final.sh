#!/usr/bin/env bash
# Device-side driver, final sparse run: tests + memcheck, bench (clustered, uniform),
# the 1-CTA-per-SM variant (clustered, 32K), and an ncu look at dense vs sparse kernels.
#   bench/run_sparse_final.sh OUTDIR BINDIR
set -u
out=$1; bin=$2
bash bench/run_sparse.sh "$out" "$bin" both --seq 32768,131072 --reps 8
timeout 60 "$bin/cta1/mprefill-sparse-bench" --set clustered --seq 32768 --reps 8 > "$out/cta1.jsonl" 2> "$out/cta1.err"
echo "cta1 rc=$?"; cat "$out/cta1.err"
timeout 150 ncu --kernel-name regex:'flash_fwd|sparse_fwd' --launch-count 3 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --metrics lts__t_bytes.sum.per_second,l1tex__m_xbar2l1tex_read_bytes.sum.per_second \
  "$bin/mprefill-sparse-bench" --seq 32768 --reps 1 --warmup 0 > "$out/ncu.txt" 2>&1
echo "ncu rc=$?"; grep -E "flash_fwd|sparse_fwd|Throughput|L2 Cache Throughput|lts__t_bytes|xbar2l1tex|Duration|Compute \(SM\)" "$out/ncu.txt" | head -40
