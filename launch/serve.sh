#!/usr/bin/env bash
# Starts the mprefill service for real use: a coordinator, one worker group under mpirun
# and one decoder, in the foreground; Ctrl-C (or SIGTERM) stops all three.
#
#   launch/serve.sh --model PATH [--ranks R] [--tp T] [--device cpu|cuda]
#                   [--host ADDR] [--port P] [--metrics-port P] [--tokenizer PATH]
#                   [--secret-file F] [--client-keys F] [--tls-cert F --tls-key F]
#                   [--insecure] [--capacity-mb MB] [--mpi-open] [--build-dir DIR]
#                   [-- EXTRA mpirun ARGS...]
#
# Defaults: 1 rank, tp 1, cpu, 127.0.0.1:7070, metrics on 9464, a fresh secret in
# $BUILD_DIR/serve.secret (0600) unless --secret-file is given. Clients then use
#   build/bin/mprefill submit --coordinator HOST:PORT --secret-file F --prompt ...
# (with --client-keys: --key-file K, one "NAME SECRET" line of it; with --tls-cert: --tls).
# A --host beyond loopback needs --tls-cert/--tls-key (the group and decoder then connect
# over tls://) or --insecure.
# MPI stays on this host: the ranks talk through shared memory only (--mca btl self,vader)
# and OpenMPI's out-of-band channel uses lo (--mca oob_tcp_if_include lo; mpirun's OOB
# listener itself binds the wildcard address in OpenMPI 4.1 whatever the option says: a
# host firewall closes it). A group over several hosts: --mpi-open, then the network in the
# mpirun args, e.g. -- --host a,b --mca btl self,vader,tcp --mca btl_tcp_if_include eth0
# --mca oob_tcp_if_include eth0 (and NCCL_SOCKET_IFNAME=eth0 in the environment: on one
# host it is set to lo).
# Logs: $BUILD_DIR/serve-{coordinator,workers,decoder}.log
set -euo pipefail
LOG_TAG=serve
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL=""
RANKS=1
TP=1
DEVICE=cpu
HOST=127.0.0.1
PORT=7070
METRICS_PORT=9464
TOKENIZER=""
SECRET_FILE=""
CAPACITY_MB=2048
CLIENT_KEYS=""
TLS_CERT=""
TLS_KEY=""
INSECURE=0
MPI_OPEN=0
MPI_EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift ;;
    --ranks) RANKS="$2"; shift ;;
    --tp) TP="$2"; shift ;;
    --device) DEVICE="$2"; shift ;;
    --host) HOST="$2"; shift ;;
    --port) PORT="$2"; shift ;;
    --metrics-port) METRICS_PORT="$2"; shift ;;
    --tokenizer) TOKENIZER="$2"; shift ;;
    --secret-file) SECRET_FILE="$2"; shift ;;
    --client-keys) CLIENT_KEYS="$2"; shift ;;
    --tls-cert) TLS_CERT="$2"; shift ;;
    --tls-key) TLS_KEY="$2"; shift ;;
    --insecure) INSECURE=1 ;;
    --mpi-open) MPI_OPEN=1 ;;
    --capacity-mb) CAPACITY_MB="$2"; shift ;;
    --build-dir) BUILD_DIR="$(realpath -m "$2")"; shift ;;
    --) shift; MPI_EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see launch/serve.sh --help)" ;;
  esac
  shift
done
[ -n "$MODEL" ] || die "--model is required (see launch/serve.sh --help)"
case "$DEVICE" in cpu|cuda) ;; *) die "--device must be cpu or cuda, not '$DEVICE'" ;; esac
BIN="$BUILD_DIR/bin"
for b in mprefill-coordinator mprefill-worker mprefill-decoder; do
  [ -x "$BIN/$b" ] || die "$BIN/$b not built: run launch/setup.sh"
done
command -v mpirun >/dev/null 2>&1 || die "mpirun not found (openmpi-bin)"

if [ -z "$SECRET_FILE" ]; then
  SECRET_FILE="$BUILD_DIR/serve.secret"
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRET_FILE")
fi
[ -s "$SECRET_FILE" ] || die "secret file $SECRET_FILE is empty"

PIDS=()
cleanup() {
  trap - INT TERM EXIT
  for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  log "stopped"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

COORD_ARGS=(--host "$HOST" --port "$PORT" --metrics-port "$METRICS_PORT" --secret-file "$SECRET_FILE")
[ -n "$TOKENIZER" ] && COORD_ARGS+=(--tokenizer "$TOKENIZER")
[ -n "$CLIENT_KEYS" ] && COORD_ARGS+=(--client-keys "$CLIENT_KEYS")
[ -n "$TLS_CERT" ] && COORD_ARGS+=(--tls-cert "$TLS_CERT" --tls-key "$TLS_KEY")
[ "$INSECURE" = 1 ] && COORD_ARGS+=(--insecure)
PORT_FILE="$BUILD_DIR/serve.port"
rm -f "$PORT_FILE"
setsid "$BIN/mprefill-coordinator" "${COORD_ARGS[@]}" --port-file "$PORT_FILE" \
  >"$BUILD_DIR/serve-coordinator.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$PORT_FILE" ] && break; sleep 0.1; done
[ -s "$PORT_FILE" ] || die "the coordinator did not start: $(tail -3 "$BUILD_DIR/serve-coordinator.log")"
ADDR="$HOST:$(cut -d' ' -f1 "$PORT_FILE")"
[ "$HOST" = 0.0.0.0 ] && ADDR="127.0.0.1:$(cut -d' ' -f1 "$PORT_FILE")"
[ -n "$TLS_CERT" ] && ADDR="tls://$ADDR"
METRICS_PORT="$(cut -d' ' -f2 "$PORT_FILE")"

MPI_ARGS=(-np "$RANKS")
[ "$DEVICE" = cpu ] && MPI_ARGS+=(--oversubscribe --bind-to none)
[ "$MPI_OPEN" = 0 ] && MPI_ARGS+=(--mca btl self,vader --mca oob_tcp_if_include lo)
# NCCL's bootstrap listener on lo too (NCCL skips lo unless told), unless already chosen.
if [ "$MPI_OPEN" = 0 ] && [ -z "${NCCL_SOCKET_IFNAME:-}" ]; then
  export NCCL_SOCKET_IFNAME=lo
  MPI_ARGS+=(-x NCCL_SOCKET_IFNAME)
fi
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
setsid mpirun "${MPI_ARGS[@]}" "${MPI_EXTRA[@]}" "$BIN/mprefill-worker" --coordinator "$ADDR" \
  --model "$MODEL" --tp "$TP" --device "$DEVICE" --group serve --secret-file "$SECRET_FILE" \
  >"$BUILD_DIR/serve-workers.log" 2>&1 &
PIDS+=($!)
setsid "$BIN/mprefill-decoder" --coordinator "$ADDR" --model "$MODEL" --name serve-decoder \
  --capacity-mb "$CAPACITY_MB" --secret-file "$SECRET_FILE" \
  >"$BUILD_DIR/serve-decoder.log" 2>&1 &
PIDS+=($!)

# Ready when the group and the decoder are registered (asked with an admin client key when
# there are client keys: the infrastructure secret is no client credential then).
STATUS_CRED=(--secret-file "$SECRET_FILE")
if [ -n "$CLIENT_KEYS" ]; then
  ADMIN_KEY="$BUILD_DIR/serve.admin.key"
  (umask 077 && awk '!/^#/ && $3 == "admin" { print $1 " " $2; exit }' "$CLIENT_KEYS" >"$ADMIN_KEY")
  [ -s "$ADMIN_KEY" ] || die "--client-keys $CLIENT_KEYS has no admin key (serve.sh checks readiness with it)"
  STATUS_CRED=(--key-file "$ADMIN_KEY")
fi
READY=0
for _ in $(seq 600); do
  ST="$("$BIN/mprefill" status --coordinator "$ADDR" "${STATUS_CRED[@]}" --json 2>/dev/null || true)"
  if grep -q '"groups":\[{' <<<"$ST" && grep -q '"decoders":\[{' <<<"$ST"; then
    READY=1
    log "ready: coordinator $ADDR (metrics http://$HOST:$METRICS_PORT/metrics), $RANKS rank(s) tp $TP on $DEVICE, secret $SECRET_FILE"
    log "submit: $BIN/mprefill submit --coordinator $ADDR --secret-file $SECRET_FILE --prompt-ids 1,2,3 --decode 16"
    break
  fi
  for p in "${PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || die "a service process exited; see $BUILD_DIR/serve-*.log"
  done
  sleep 0.2
done
[ $READY = 1 ] || die "the worker group and decoder did not register within 120 s; see $BUILD_DIR/serve-*.log"
# Foreground until a process ends or Ctrl-C.
wait -n "${PIDS[@]}" || true
log "a service process ended; see $BUILD_DIR/serve-*.log"
