#!/bin/sh
# mprefill-bench handoff --tls on a tiny job (4 MB, 1 rep): exits 0, reports a plain and a
# TLS row with a GB/s above zero and the negotiated TLS 1.3 suite, and leaves no
# certificate behind in its TMPDIR. Usage: bench_tls_smoke.sh PATH/TO/mprefill-bench
set -u
tmp=$(mktemp -d) || exit 1
out=$(TMPDIR="$tmp" "$1" handoff --tls --mb 4 --page-tokens 256 --streams 1 --reps 1 \
  --layers 2 2>&1)
rc=$?
printf '%s\n' "$out"
left=$(ls -A "$tmp")
rm -rf "$tmp"
fail() {
  echo "FAIL: $1"
  exit 1
}
[ "$rc" -eq 0 ] || fail "exit status $rc"
[ -z "$left" ] || fail "TLS material left in TMPDIR: $left"
gbps='([0-9]*[1-9][0-9]*\.[0-9]+|[0-9]+\.[0-9]*[1-9][0-9]*)'
for mode in plain tls; do
  printf '%s\n' "$out" | grep -Eq "^\| 256 \| [0-9.]+ \| 1 \| $mode \| $gbps \|" ||
    fail "no $mode row with a GB/s above zero"
done
printf '%s\n' "$out" | grep -q '^# tls: TLSv1\.3 ' || fail "no negotiated TLS 1.3 suite"
echo PASS
