#!/usr/bin/env bash
# One driver for the GPU benchmarks of bench/NOTES.md: named suites, each meant to run in
# one device call (launch/DEVICE.md; offline: bash, coreutils, python3, nvidia-smi, mpirun,
# and torch for the cuDNN / MInference baselines). `bench/run.sh --help` lists the suites.
#
# Every command runs under `timeout`; a failed or timed-out step is logged and the suite
# goes on, and the script then exits 1 naming the failed steps. Bad arguments and missing
# binaries exit 2 with one error line. Results go to --out DIR (default $OUT), a few files
# per suite (the device returns a limited number of files): SUITE.log (stamped steps and
# every command's stderr), SUITE*.jsonl (one JSON line per measured case), joined tables.
# Scratch (index files, per-run output) goes to --work DIR (default a fresh /tmp folder).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The Llama-3-8B vertical-slash config of the prefill benches ("mix" in NOTES sections 5-6).
MIX_POLICY=configs/minference/Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json
SUITES="kernel-tests dense sparse index ncu kernels attention e1 e2 prefill dist handoff ttft-compare"

usage() {
  cat <<'EOF'
usage: bench/run.sh [options] SUITE [SUITE...]

suites (NOTES.md section in brackets):
  kernel-tests  gpu_flash_attention_test, gpu_sparse_attention_test, gpu_index_test, then
                compute-sanitizer memcheck on the sparse ring / A-shape / block-sparse /
                strided cases                                                   [1-3]
  dense         mprefill-flash-bench over the dense shapes (32K/128K causal and not, 512K
                4 heads, 1M 2 heads, head_dim 64, fp16) against cuDNN SDPA; --seqs S runs
                only S (causal both) for a quick variant comparison              [1, K1]
  sparse        mprefill-sparse-bench, clustered and uniform, kernels v1 and v2 in one
                process, own dense in the same process                         [3]
  index         mprefill-index-bench (1M: estimation + index build per head)   [2, K4]
  ncu           Nsight Compute: sparse v1 vs v2 on the (30, 800) class and dense vs
                sparse kernels, 32K                                             [3]
  kernels       kernel-tests, dense, sparse, index
  attention     mprefill-bench attention (own dense, vertical-slash Llama-3-8B mix,
                block-sparse top-100) vs MInference's Triton kernels on the same index
                files and cuDNN SDPA; joined by compare_attention.py            [4, K1-K3]
  e1            Llama-3-8B-shape prefill TTFT at 128K: cuDNN SDPA of one layer, then own
                dense (E1 reference from that cuDNN time), the mix, auto        [5, E1]
  e2            Llama-3-8B-shape prefill TTFT at 512K, the mix                  [5, E2]
  prefill       e1 and e2
  dist          mpirun prefill over GPUs: 128K tp1 x sp2 with KV skipping off/on (twice),
                estimated indices on 1 GPU and on the ring, 1 GPU 512K, 4 GPUs 512K and
                1M as tp1 x sp4 and tp2 x sp2 (runs needing more GPUs are skipped) [6, E3]
  handoff       tests/gpu2/nccl_handoff_test.sh: mprefill run --device cuda, KV over TCP
                and NCCL to a decoder on GPU 1 (needs 2 GPUs, --model-hf, --tokenizer) [7]
  ttft-compare  old vs new binary (--old, --new), interleaved old,new,old,new...:
                Llama-3-8B-shape TTFT at 128K dense, 128K mix, 512K mix; median and
                spread per side and the new/old ratio; exit 1 if a ratio is outside
                +-TOLERANCE % (issue 14 "speed unchanged within 2%")

options:
  --out DIR            results folder (default: $OUT)
  --bin DIR            build outputs (default build/bin)
  --variant DIR        another build to time in the same call (dense, sparse, index;
                       repeatable), e.g. the previous kernel version
  --work DIR           scratch folder (default: a new folder under /tmp)
  --seqs LIST          sequence lengths (attention default 32768,131072; dense: quick mode;
                       sparse default 32768,131072)
  --long-seqs LIST     attention: also these lengths, clustered only (e.g. 524288,1048576)
  --repeat N           attention: timed launches per case (default 5)
  --sparse-kernels L   attention: own runs per sparse kernel generation, comma list of
                       default|auto|v1|v2 (mprefill-bench attention --sparse-kernel K;
                       default: no flag, the binary's own choice); the first list entry
                       writes attention_ours.jsonl, the others attention_ours_<k>.jsonl
  --minference-dir D   attention: MInference's Triton kernel files (default .carry/minference)
  --gpus N             dist: GPUs present (default: nvidia-smi -L; 4 in --dry-run)
  --model-hf DIR       handoff: bf16 HF conversion of stories15M ($MPREFILL_STORIES15M_HF)
  --tokenizer FILE     handoff: llama2.c tokenizer.bin ($MPREFILL_TOKENIZER)
  --old PATH --new PATH  ttft-compare: the two mprefill-bench binaries (or their folders)
  --cases LIST         ttft-compare: any of dense128,mix128,mix512 (default all three; one
                       device command is limited to 600 s, so split long comparisons)
  --runs N             ttft-compare: runs per side at 128K (default 3)
  --runs-512k N        ttft-compare: runs per side at 512K (default 2)
  --tolerance PCT      ttft-compare: allowed |new/old - 1| in percent (default 2)
  --timeout S          per-command limit for every step (default: per step, 30-600 s)
  --dry-run            print the commands, run nothing (no GPU or binaries needed)
  -h, --help           this text
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

# ---------------------------------------------------------------- arguments
OUTDIR=${OUT:-}
BIN=build/bin
VARIANTS=()
WORK=
SEQS=
LONG_SEQS=
REPEAT=5
SPARSE_KERNELS=default
MDIR=.carry/minference
GPUS=
MODEL_HF=${MPREFILL_STORIES15M_HF:-}
TOKENIZER=${MPREFILL_TOKENIZER:-}
OLD=
NEW=
CASES=dense128,mix128,mix512
RUNS=3
RUNS_512K=2
TOLERANCE=2
TIMEOUT=
DRY=0
CHECK_NEEDS=0
RUN_SUITES=()

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_pos() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
is_list() { [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]]; }

while (($#)); do
  a=$1
  case $a in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY=1 ;;
    --out | --bin | --variant | --work | --seqs | --long-seqs | --repeat | --sparse-kernels | \
      --minference-dir | --gpus | --model-hf | --tokenizer | --old | --new | --cases | --runs | \
      --runs-512k | --tolerance | --timeout)
      (($# >= 2)) || die "$a needs a value (try --help)"
      v=$2
      shift
      case $a in
        --out) OUTDIR=$v ;;
        --bin) BIN=$v ;;
        --variant) VARIANTS+=("$v") ;;
        --work) WORK=$v ;;
        --seqs) is_list "$v" || die "--seqs wants N[,N...], got '$v'"; SEQS=$v ;;
        --long-seqs) is_list "$v" || die "--long-seqs wants N[,N...], got '$v'"; LONG_SEQS=$v ;;
        --repeat) is_pos "$v" || die "--repeat wants an integer >= 1"; REPEAT=$v ;;
        --sparse-kernels) [[ $v =~ ^(default|auto|v1|v2)(,(default|auto|v1|v2))*$ ]] ||
          die "--sparse-kernels wants a comma list of default|auto|v1|v2, got '$v'"; SPARSE_KERNELS=$v ;;
        --minference-dir) MDIR=$v ;;
        --gpus) is_uint "$v" || die "--gpus wants an integer"; GPUS=$v ;;
        --model-hf) MODEL_HF=$v ;;
        --tokenizer) TOKENIZER=$v ;;
        --old) OLD=$v ;;
        --new) NEW=$v ;;
        --cases) [[ $v =~ ^(dense128|mix128|mix512)(,(dense128|mix128|mix512))*$ ]] ||
          die "--cases wants a comma list of dense128|mix128|mix512, got '$v'"; CASES=$v ;;
        --runs) is_pos "$v" || die "--runs wants an integer >= 1"; RUNS=$v ;;
        --runs-512k) is_pos "$v" || die "--runs-512k wants an integer >= 1"; RUNS_512K=$v ;;
        --tolerance) [[ $v =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--tolerance wants a percentage"; TOLERANCE=$v ;;
        --timeout) is_pos "$v" || die "--timeout wants seconds >= 1"; TIMEOUT=$v ;;
      esac
      ;;
    -*) die "unknown option '$a' (try --help)" ;;
    *)
      [[ " $SUITES " == *" $a "* ]] || die "unknown suite '$a' (suites: $SUITES)"
      RUN_SUITES+=("$a")
      ;;
  esac
  shift
done
((${#RUN_SUITES[@]})) || die "no suite given (suites: $SUITES; try --help)"

# Relative paths are taken from the caller's directory; everything below runs in ROOT
# (the python helpers and the policy config are addressed from there).
abspath() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
if [[ -z $OUTDIR ]]; then
  ((DRY)) || die "no results folder: give --out DIR or set OUT"
  # shellcheck disable=SC2016 # --dry-run prints the commands with a literal $OUT
  OUTDIR='$OUT'
else
  OUTDIR=$(abspath "$OUTDIR")
fi
BIN=$(abspath "$BIN")
for i in "${!VARIANTS[@]}"; do VARIANTS[i]=$(abspath "${VARIANTS[i]}"); done
# A variant's results are named after its folder: the names must differ.
if ((${#VARIANTS[@]})); then
  dup=$(for v in "${VARIANTS[@]}"; do basename "$v"; done | sort | uniq -d | head -1)
  [[ -z $dup ]] || die "two --variant folders are named '$dup': their results would mix"
fi
MDIR=$(abspath "$MDIR")
[[ -n $OLD ]] && OLD=$(abspath "$OLD")
[[ -n $NEW ]] && NEW=$(abspath "$NEW")
[[ -n $MODEL_HF ]] && MODEL_HF=$(abspath "$MODEL_HF")
[[ -n $TOKENIZER ]] && TOKENIZER=$(abspath "$TOKENIZER")
if [[ -n $WORK ]]; then WORK=$(abspath "$WORK"); elif ((DRY)); then WORK=/tmp/mprefill-bench.XXXX; fi
cd "$ROOT"

# ---------------------------------------------------------------- steps
FAILED=()
LOG=/dev/null
T0=$(date +%s)

stamp() {
  if ((DRY)); then
    echo "# $*"
  else
    echo "# [$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"
  fi
}

# Abort (exit 2) when a binary or file a suite needs is absent; --dry-run checks nothing.
need() {
  ((DRY && !CHECK_NEEDS)) && return 0
  local f
  for f in "$@"; do
    [[ -e $f ]] || die "$SUITE needs $f (not found: build it or pass --bin / the suite's option)"
  done
}

# The command as a shell line: words of safe characters as they are, others single-quoted
# ('$' counts as safe so that --dry-run's literal $OUT expands when pasted).
shq() {
  local w out="" safe='^[-A-Za-z0-9_./,:=@%+$]+$'
  for w in "$@"; do
    if [[ $w =~ $safe ]]; then
      out+="$w "
    else
      local q=${w//\'/\'\\\'\'}
      out+="'$q' "
    fi
  done
  echo "$out"
}

# step NAME LIMIT_S SINK CMD...: run CMD under timeout; stdout is appended to SINK (a file,
# or '-' for the suite log), stderr to the suite log. The last summary line of the output
# (a '# ' line of the benches or gtest's PASSED/FAILED) is echoed. Never aborts the suite.
step() {
  local name=$1 limit=$2 sink=$3
  shift 3
  [[ -n $TIMEOUT ]] && limit=$TIMEOUT
  local shown
  shown=$(shq "$@")
  if ((DRY)); then
    if [[ $sink == - ]]; then
      echo "timeout $limit ${shown}>> $LOG 2>&1"
    else
      echo "timeout $limit ${shown}>> $sink 2>> $LOG"
    fi
    return 0
  fi
  stamp "$name: $shown"
  local err="$WORK/$name.err" rc=0
  if [[ $sink == - ]]; then
    timeout --kill-after=15 "$limit" "$@" > "$err" 2>&1 || rc=$?
  else
    timeout --kill-after=15 "$limit" "$@" >> "$sink" 2> "$err" || rc=$?
  fi
  cat "$err" >> "$LOG"
  grep -E '^# |\[  (PASSED|FAILED)  \]|ERROR SUMMARY' "$err" | tail -3 || true
  if ((rc == 0)); then
    stamp "$name: ok"
  else
    local why=""
    ((rc == 124 || rc == 137)) && why=" (timed out after ${limit} s)"
    stamp "$name: FAILED rc=$rc$why"
    FAILED+=("$SUITE/$name")
  fi
}

begin_suite() {
  SUITE=$1
  LOG="$OUTDIR/$SUITE.log"
  if ((DRY)); then
    echo "## suite $SUITE"
    return 0
  fi
  {
    echo "# bench/run.sh $SUITE $(date -u +%FT%TZ) in $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
    nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv,noheader 2>&1 || true
  } >> "$LOG"
  stamp "suite $SUITE"
}

label() { basename "$1"; }

# ---------------------------------------------------------------- suites
suite_kernel_tests() {
  begin_suite kernel-tests
  need "$BIN/gpu_flash_attention_test" "$BIN/gpu_sparse_attention_test" "$BIN/gpu_index_test"
  step flash_test 300 - env MPREFILL_REQUIRE_GPU=1 "$BIN/gpu_flash_attention_test"
  step sparse_test 300 - env MPREFILL_REQUIRE_GPU=1 "$BIN/gpu_sparse_attention_test"
  step index_test 120 - env MPREFILL_REQUIRE_GPU=1 "$BIN/gpu_index_test"
  step sparse_memcheck 300 - compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$BIN/gpu_sparse_attention_test" --gtest_filter='*RingSteps*:*AShape*:*BlockSparse*:*Strided*'
}

suite_dense() {
  begin_suite dense
  local dirs=("$BIN" "${VARIANTS[@]}") d f i
  for d in "${dirs[@]}"; do need "$d/mprefill-flash-bench"; done
  need bench/cudnn_baseline.py bench/compare_dense.py
  for i in "${!dirs[@]}"; do
    d=${dirs[i]}
    f="$OUTDIR/dense_flash.jsonl"
    ((i > 0)) && f="$OUTDIR/dense_flash_$(label "$d").jsonl"
    if [[ -n $SEQS ]]; then
      step "flash_$i" 300 "$f" "$d/mprefill-flash-bench" --seq "$SEQS" --causal both --reps 10
    else
      step "flash_${i}_32k_128k" 300 "$f" "$d/mprefill-flash-bench" --seq 32768,131072 --causal both --reps 10
      step "flash_${i}_512k" 200 "$f" "$d/mprefill-flash-bench" --seq 524288 --heads 4 --kv-heads 1 \
        --causal 1 --reps 5 --warmup 1
      step "flash_${i}_1m" 200 "$f" "$d/mprefill-flash-bench" --seq 1048576 --heads 2 --kv-heads 1 \
        --causal 1 --reps 5 --warmup 1
      step "flash_${i}_d64" 120 "$f" "$d/mprefill-flash-bench" --seq 32768 --dim 64 --causal both --reps 10
      step "flash_${i}_fp16" 120 "$f" "$d/mprefill-flash-bench" --seq 32768 --dtype fp16 --causal both --reps 10
    fi
  done
  f="$OUTDIR/dense_cudnn.jsonl"
  if [[ -n $SEQS ]]; then
    step cudnn 300 "$f" python3 bench/cudnn_baseline.py --seq "$SEQS" --causal both --layout both --reps 10
  else
    step cudnn_32k_128k 300 "$f" python3 bench/cudnn_baseline.py --seq 32768,131072 --causal both \
      --layout both --reps 10
    step cudnn_512k 200 "$f" python3 bench/cudnn_baseline.py --seq 524288 --heads 4 --kv-heads 1 \
      --causal 1 --reps 5 --warmup 1
    step cudnn_1m 200 "$f" python3 bench/cudnn_baseline.py --seq 1048576 --heads 2 --kv-heads 1 \
      --causal 1 --reps 5 --warmup 1
    step cudnn_d64 120 "$f" python3 bench/cudnn_baseline.py --seq 32768 --dim 64 --causal both \
      --layout both --reps 10
  fi
  for i in "${!dirs[@]}"; do
    local src="$OUTDIR/dense_flash.jsonl" dst="$OUTDIR/dense.json"
    if ((i > 0)); then
      src="$OUTDIR/dense_flash_$(label "${dirs[i]}").jsonl"
      dst="$OUTDIR/dense_$(label "${dirs[i]}").json"
    fi
    step "compare_$i" 60 - python3 bench/compare_dense.py "$src" "$OUTDIR/dense_cudnn.jsonl" "$dst"
  done
}

suite_sparse() {
  begin_suite sparse
  local dirs=("$BIN" "${VARIANTS[@]}") i d set tag
  for d in "${dirs[@]}"; do need "$d/mprefill-sparse-bench"; done
  for i in "${!dirs[@]}"; do
    d=${dirs[i]}
    tag=""
    ((i > 0)) && tag="_$(label "$d")"
    for set in clustered uniform; do
      step "sparse_${set}_$i" 300 "$OUTDIR/sparse_$set$tag.jsonl" "$d/mprefill-sparse-bench" \
        --set "$set" --seq "${SEQS:-32768,131072}" --reps 8 --kernels 1,2
    done
  done
}

suite_index() {
  begin_suite index
  local dirs=("$BIN" "${VARIANTS[@]}") i d f
  for d in "${dirs[@]}"; do need "$d/mprefill-index-bench"; done
  for i in "${!dirs[@]}"; do
    d=${dirs[i]}
    f="$OUTDIR/index.jsonl"
    ((i > 0)) && f="$OUTDIR/index_$(label "$d").jsonl"
    step "index_$i" 120 "$f" "$d/mprefill-index-bench"
  done
}

suite_ncu() {
  begin_suite ncu
  need "$BIN/mprefill-sparse-bench"
  ((DRY)) || command -v ncu > /dev/null || die "ncu: Nsight Compute (ncu) is not on PATH"
  local kv
  # launch-skip 3 lands on the (30, 800) class of the first 32K pass (sparse_bench.cu order).
  for kv in 1 2; do
    step "sparse_v$kv" 180 - ncu --kernel-name regex:sparse_fwd --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
      --metrics lts__t_bytes.sum.per_second,l1tex__m_xbar2l1tex_read_bytes.sum.per_second \
      "$BIN/mprefill-sparse-bench" --seq 32768 --reps 1 --warmup 0 --kernels "$kv"
  done
  step dense_vs_sparse 240 - ncu --kernel-name 'regex:flash_fwd|sparse_fwd' --launch-count 3 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --metrics lts__t_bytes.sum.per_second,l1tex__m_xbar2l1tex_read_bytes.sum.per_second \
    "$BIN/mprefill-sparse-bench" --seq 32768 --reps 1 --warmup 0
}

suite_attention() {
  begin_suite attention
  local mb="$BIN/mprefill-bench" seqs=${SEQS:-32768,131072} ix="$WORK/ix/" k first=1 f
  need "$mb" bench/minference_baseline.py bench/cudnn_baseline.py bench/compare_attention.py
  ((DRY)) || mkdir -p "$ix"
  # Index files first (CPU only, deterministic seeds: the GPU runs rebuild the same
  # selections), so that MInference runs on them even if one of our kernels fails.
  step index_only 300 "$WORK/ix.jsonl" "$mb" attention --index-only --seq "$seqs" \
    --pattern vertical_slash --index-set clustered,uniform --mix llama3-8b --dump-indices "$ix"
  if [[ -n $LONG_SEQS ]]; then
    step index_only_long 300 "$WORK/ix.jsonl" "$mb" attention --index-only --seq "$LONG_SEQS" \
      --pattern vertical_slash --index-set clustered --mix llama3-8b --dump-indices "$ix"
  fi
  local -a kflag
  for k in ${SPARSE_KERNELS//,/ }; do
    f="$OUTDIR/attention_ours.jsonl"
    ((first)) || f="$OUTDIR/attention_ours_$k.jsonl"
    first=0
    kflag=()
    [[ $k == default ]] || kflag=(--sparse-kernel "$k")
    step "ours_vs_$k" 300 "$f" "$mb" attention "${kflag[@]}" --seq "$seqs" \
      --pattern dense,vertical_slash --index-set clustered,uniform --mix llama3-8b --json \
      --dump-indices "$ix" --warmup 1 --repeat "$REPEAT"
    step "ours_bs_$k" 200 "$f" "$mb" attention "${kflag[@]}" --seq "$seqs" \
      --pattern block_sparse --json --dump-indices "$ix" --warmup 1 --repeat "$REPEAT"
    if [[ -n $LONG_SEQS ]]; then
      step "ours_long_$k" 300 "$f" "$mb" attention "${kflag[@]}" --seq "$LONG_SEQS" \
        --pattern dense,vertical_slash --index-set clustered --mix llama3-8b --json \
        --dump-indices "$ix" --warmup 1 --repeat 3
    fi
  done
  step minference 450 "$OUTDIR/attention_minference.jsonl" python3 bench/minference_baseline.py \
    --from-jsonl "$OUTDIR/attention_ours.jsonl,$WORK/ix.jsonl" --minference-dir "$MDIR" \
    --warmup 1 --repeat "$REPEAT"
  step cudnn 200 "$OUTDIR/attention_cudnn.jsonl" python3 bench/cudnn_baseline.py --seq "$seqs" \
    --causal 1 --layout both --reps "$REPEAT" --warmup 1
  local n h
  for n in ${LONG_SEQS//,/ }; do
    h=4 # the BENCHMARKS.md long shapes: 4 query heads up to 512K, 2 above, over 1 kv head
    ((n > 524288)) && h=2
    step "cudnn_$n" 120 "$OUTDIR/attention_cudnn.jsonl" python3 bench/cudnn_baseline.py --seq "$n" \
      --heads "$h" --kv-heads 1 --causal 1 --layout token --reps 3 --warmup 1
  done
  step compare 60 "$OUTDIR/attention_table.txt" python3 bench/compare_attention.py \
    "$OUTDIR/attention_ours.jsonl" "$OUTDIR/attention_minference.jsonl" \
    "$OUTDIR/attention_cudnn.jsonl" "$OUTDIR/attention_summary.json"
  ((DRY)) || cat "$OUTDIR/attention_table.txt" 2> /dev/null || true
}

prefill_args() { # CASE -> the mprefill-bench prefill arguments of that case
  case $1 in
    dense128) echo "--shape llama3-8b --seq 131072 --sparse dense --json" ;;
    mix128) echo "--shape llama3-8b --seq 131072 --sparse $MIX_POLICY --index-set clustered --json" ;;
    auto128) echo "--shape llama3-8b --seq 131072 --sparse auto --index-set clustered --json" ;;
    mix512) echo "--shape llama3-8b --seq 524288 --sparse $MIX_POLICY --index-set clustered --json" ;;
  esac
}

suite_e1() {
  begin_suite e1
  local mb="$BIN/mprefill-bench" cudnn_ms
  need "$mb" "$MIX_POLICY" bench/cudnn_baseline.py
  # E1 reference = the run's GEMM time + 32 x one causal 128K layer of cuDNN SDPA (the faster
  # layout), measured in the same call.
  step cudnn_128k 200 "$OUTDIR/e1_cudnn.jsonl" python3 bench/cudnn_baseline.py --seq 131072 \
    --causal 1 --layout both --reps 5 --warmup 1
  if ((DRY)); then
    cudnn_ms='<min ms of e1_cudnn.jsonl>'
  else
    cudnn_ms=$(python3 -c '
import json, sys
ms = [json.loads(l)["ms"] for l in open(sys.argv[1]) if l.startswith("{")]
print(min(ms) if ms else "")' "$OUTDIR/e1_cudnn.jsonl" 2> /dev/null || true)
    [[ -n $cudnn_ms ]] || stamp "no cuDNN time: the dense run reports no E1 reference"
  fi
  local -a dense
  read -r -a dense <<< "$(prefill_args dense128)"
  step dense128 300 "$OUTDIR/e1.jsonl" "$mb" prefill "${dense[@]}" ${cudnn_ms:+--cudnn-ms "$cudnn_ms"}
  local c
  local -a args
  for c in mix128 auto128; do
    read -r -a args <<< "$(prefill_args "$c")"
    step "$c" 300 "$OUTDIR/e1.jsonl" "$mb" prefill "${args[@]}"
  done
}

suite_e2() {
  begin_suite e2
  local mb="$BIN/mprefill-bench"
  local -a args
  need "$mb" "$MIX_POLICY"
  read -r -a args <<< "$(prefill_args mix512)"
  step mix512 500 "$OUTDIR/e2.jsonl" "$mb" prefill "${args[@]}"
}

suite_dist() {
  begin_suite dist
  local mb="$BIN/mprefill-bench" gpus=$GPUS
  need "$mb" "$MIX_POLICY"
  if [[ -z $gpus ]]; then
    if ((DRY)); then gpus=4; else gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true); fi
  fi
  stamp "$gpus GPU(s)"
  # NVLink multicast stays off on the lent machines (launch/DEVICE.md).
  export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  ((DRY)) && echo "export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
  local fixed=(--shape llama3-8b --sparse "$MIX_POLICY" --index-set clustered --json)
  local est=(--shape llama3-8b --sparse "$MIX_POLICY" --index-set estimated --json)
  drun() { # name limit ranks prefill-args...
    local name=$1 limit=$2 np=$3
    shift 3
    if ((np > gpus)); then
      stamp "$name: SKIPPED (needs $np GPUs, $gpus present)"
      return 0
    fi
    if ((np == 1)); then
      step "$name" "$limit" "$OUTDIR/dist.jsonl" "$mb" prefill "$@"
    else
      step "$name" "$limit" "$OUTDIR/dist.jsonl" mpirun --oversubscribe --bind-to none -np "$np" \
        "$mb" prefill "$@"
    fi
  }
  local rep
  for rep in 1 2; do
    drun "kvskip_off_128k_$rep" 150 2 --tp 1 --sp 2 --seq 131072 "${fixed[@]}" --kv-skip off
    drun "kvskip_on_128k_$rep" 150 2 --tp 1 --sp 2 --seq 131072 "${fixed[@]}" --kv-skip on
  done
  drun est_gpu1_128k 150 1 --seq 131072 "${est[@]}"
  drun est_tp1sp2_128k 150 2 --tp 1 --sp 2 --seq 131072 "${est[@]}"
  drun est_tp2sp1_128k 150 2 --tp 2 --sp 1 --seq 131072 "${est[@]}"
  drun gpu1_512k 300 1 --seq 524288 "${fixed[@]}"
  drun tp1sp4_512k 300 4 --tp 1 --sp 4 --seq 524288 "${fixed[@]}"
  drun tp1sp4_1m 420 4 --tp 1 --sp 4 --seq 1048576 "${fixed[@]}"
  drun tp2sp2_512k 300 4 --tp 2 --sp 2 --seq 524288 "${fixed[@]}"
  drun tp2sp2_1m 420 4 --tp 2 --sp 2 --seq 1048576 "${fixed[@]}"
}

suite_handoff() {
  begin_suite handoff
  if ((DRY && !CHECK_NEEDS)); then
    MODEL_HF=${MODEL_HF:-STORIES15M_HF_DIR}
    TOKENIZER=${TOKENIZER:-TOKENIZER_BIN}
  fi
  [[ -n $MODEL_HF ]] || die "handoff needs --model-hf DIR (bf16 HF conversion of stories15M) or MPREFILL_STORIES15M_HF"
  [[ -n $TOKENIZER ]] || die "handoff needs --tokenizer FILE (llama2.c tokenizer.bin) or MPREFILL_TOKENIZER"
  need "$BIN/mprefill" "$MODEL_HF/config.json" "$TOKENIZER" tests/gpu2/nccl_handoff_test.sh
  # The test writes its JSON results and a generated random model into MPREFILL_TEST_OUT:
  # keep that in the scratch folder and bring back only the JSON results.
  step nccl_handoff 900 - env MPREFILL_TEST_OUT="$WORK/handoff" MPREFILL_STORIES15M_HF="$MODEL_HF" \
    bash tests/gpu2/nccl_handoff_test.sh "$BIN" "$TOKENIZER"
  if ((DRY)); then
    echo "cp $WORK/handoff/*.json $OUTDIR/ (as handoff_<run>.json)"
  else
    local j
    for j in "$WORK"/handoff/*.json; do
      if [[ -e $j ]]; then cp "$j" "$OUTDIR/handoff_$(basename "$j")"; fi
    done
  fi
}

# ttft-compare: --old / --new may name the binary or the folder that holds it.
bench_binary() { if [[ -d $1 ]]; then echo "$1/mprefill-bench"; else echo "$1"; fi; }

suite_ttft_compare() {
  begin_suite ttft-compare
  if ((DRY && !CHECK_NEEDS)); then
    OLD=${OLD:-OLD_BINARY}
    NEW=${NEW:-NEW_BINARY}
  fi
  [[ -n $OLD && -n $NEW ]] || die "ttft-compare needs --old PATH and --new PATH (mprefill-bench binaries or their folders)"
  local old new
  old=$(bench_binary "$OLD")
  new=$(bench_binary "$NEW")
  need "$old" "$new" "$MIX_POLICY"
  if ((!DRY)); then
    [[ -x $old && -x $new ]] || die "ttft-compare: $old and $new must be executable"
    sha256sum "$old" "$new" | tee -a "$LOG"
  fi
  local res="$OUTDIR/ttft_compare.jsonl" c n r side bin out limit
  local -a args
  for c in ${CASES//,/ }; do
    read -r -a args <<< "$(prefill_args "$c")"
    n=$RUNS
    limit=300
    if [[ $c == mix512 ]]; then
      n=$RUNS_512K
      limit=500
    fi
    for ((r = 1; r <= n; r++)); do
      for side in old new; do
        bin=$old
        [[ $side == new ]] && bin=$new
        out="$WORK/ttft_${c}_${side}_$r.out"
        ((DRY)) || : > "$out"
        step "${c}_${side}_$r" "$limit" "$out" "$bin" prefill "${args[@]}"
        ((DRY)) && continue
        # One JSON object per run on stdout; its ttft_ms is what the lead compares.
        python3 - "$out" "$c" "$side" "$r" "$bin" >> "$res" << 'PY' || true
import json, sys
out, case, side, run, binary = sys.argv[1:]
ttft = None
for line in open(out):
    line = line.strip()
    if line.startswith("{") and "ttft_ms" in line:
        ttft = json.loads(line)["ttft_ms"]
print(json.dumps({"case": case, "side": side, "run": int(run), "ttft_ms": ttft, "binary": binary}))
PY
      done
    done
  done
  if ((DRY)); then
    echo "python3 (inline) summary of $res: per case and side the median and spread of ttft_ms, new/old ratio, limit +-$TOLERANCE %"
    return 0
  fi
  local rc=0
  python3 - "$res" "$TOLERANCE" "$OUTDIR/ttft_compare_summary.json" << 'PY' | tee -a "$LOG" || rc=$?
import json, statistics, sys
res, tol, summary_path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rows = [json.loads(l) for l in open(res) if l.strip()]
cases = list(dict.fromkeys(r["case"] for r in rows))
summary, bad = [], 0
print("%-9s %-4s %4s %10s %8s  %s" % ("case", "side", "runs", "median ms", "spread", "ttft_ms of each run"))
for c in cases:
    med = {}
    for side in ("old", "new"):
        t = [r["ttft_ms"] for r in rows if r["case"] == c and r["side"] == side]
        ok = [x for x in t if x is not None]
        if len(ok) != len(t) or not ok:
            print("%-9s %-4s: %d of %d runs gave no TTFT" % (c, side, len(t) - len(ok), len(t)))
            bad = max(bad, 2)
        if not ok:
            continue
        m = statistics.median(ok)
        spread = (max(ok) - min(ok)) / m * 100
        med[side] = m
        print("%-9s %-4s %4d %10.1f %7.2f%%  %s" % (c, side, len(ok), m, spread,
                                                  " ".join("%.1f" % x for x in ok)))
        summary.append({"case": c, "side": side, "runs": ok, "median_ms": m, "spread_pct": spread})
    if "old" in med and "new" in med:
        ratio = med["new"] / med["old"]
        within = abs(ratio - 1) * 100 <= tol
        print("%-9s new/old %.4f (%+.2f%%): %s" % (c, ratio, (ratio - 1) * 100,
              "within %g%%" % tol if within else "OUTSIDE %g%%" % tol))
        summary.append({"case": c, "ratio_new_over_old": ratio, "within_tolerance": within})
        if not within:
            bad = max(bad, 1)
json.dump({"tolerance_pct": tol, "cases": summary}, open(summary_path, "w"), indent=1)
sys.exit(bad)
PY
  if ((rc == 1)); then
    FAILED+=("ttft-compare/ratio outside ${TOLERANCE}%")
  elif ((rc != 0)); then
    FAILED+=("ttft-compare/missing TTFT")
  fi
}

suite_kernels() {
  suite_kernel_tests
  suite_dense
  suite_sparse
  suite_index
}
suite_prefill() {
  suite_e1
  suite_e2
}

# ---------------------------------------------------------------- main
run_suites() {
  local s
  for s in "${RUN_SUITES[@]}"; do
    "suite_${s//-/_}"
  done
}
if ((!DRY)); then
  # Preflight: every suite's arguments and files are checked before any GPU work starts
  # (a dry run that prints nothing and exits 2 on the first missing piece).
  DRY=1 CHECK_NEEDS=1
  run_suites > /dev/null
  DRY=0 CHECK_NEEDS=0
  FAILED=()
  mkdir -p "$OUTDIR"
  if [[ -z $WORK ]]; then WORK=$(mktemp -d /tmp/mprefill-bench.XXXXXX); fi
  mkdir -p "$WORK"
fi
export PYTHONUNBUFFERED=1
SUITE=
run_suites
if ((${#FAILED[@]})); then
  echo "bench/run.sh: FAILED: ${FAILED[*]} (logs in $OUTDIR)" >&2
  exit 1
fi
((DRY)) || echo "bench/run.sh: done (${RUN_SUITES[*]}; results in $OUTDIR)"
