#!/usr/bin/env bash
# 64 Socket.IO clients in a closed loop (each starts its next conversation as soon as one ends)
# against a fresh release server on 127.0.0.1, with the store given (sqlite or memory): the
# load's summary, then the CPU time the server and the load client each spent per conversation.
#
#   bench/closed_loop.sh                     # SQLite, 6,000 conversations of 5 messages
#   bench/closed_loop.sh memory              # the in-memory store
#   BIN=path/to/switchboard CONV=3000 bench/closed_loop.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-sqlite}
CONV=${CONV:-6000}
PORT=${BENCH_PORT:-3971}
. bench/common.sh
bench_binary
ulimit -n "$(ulimit -Hn)"
DATA=$(mktemp -d)
SWITCHBOARD_LOG=warn SWITCHBOARD_MAX_RUNNING_CONVERSATIONS=1000000 SWITCHBOARD_CREATE_RATE_PER_SEC=0 \
  "$BIN" serve --port "$PORT" --data-dir "$DATA" --store "$STORE" 2>/dev/null &
PID=$!
trap 'kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/alive" >/dev/null && break; sleep 0.1; done
TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
s0=$(cpu "$PID")
"$BIN" load --url "http://127.0.0.1:$PORT" --conversations "$CONV" --concurrency 64 --messages 5 \
  --attach socketio 2>/dev/null &
LOAD=$!
# The load client's CPU, read from /proc just before it exits (it is reaped by `wait`).
c=0
while kill -0 "$LOAD" 2>/dev/null; do
  c=$(cpu "$LOAD" 2>/dev/null || echo "$c")
  sleep 0.05
done
wait "$LOAD"
s1=$(cpu "$PID")
awk -v s=$((s1 - s0)) -v c="$c" -v n="$CONV" -v t="$TCK" -v store="$STORE" \
  'BEGIN {printf "%s store: CPU per conversation, server %.0f µs, load client at least %.0f µs (read up to 50 ms before it ended)\n",
          store, s * 1e6 / t / n, c * 1e6 / t / n}'
