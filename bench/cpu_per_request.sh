#!/usr/bin/env bash
# Server CPU time per request for GET /alive and POST /api/conversations, which varies far less
# than req/s on a shared machine. Uses the release binary; loopback only; bounded runs.
#
#   bench/cpu_per_request.sh            # the default (sqlite) store
#   bench/cpu_per_request.sh memory     # the in-memory store
#   KEY=1 bench/cpu_per_request.sh      # the server has a session key and wrk sends it
#   BIN=path/to/switchboard bench/cpu_per_request.sh   # that binary, no build (before/after)
#   RUNS=5 SECS=5 bench/cpu_per_request.sh   # more and longer runs (default 3 of 3 s)
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-sqlite}
if [ -z "${BIN:-}" ]; then
  BIN="${CARGO_TARGET_DIR:-target}/release/switchboard"
  cargo build --release --quiet
fi
SESSION_KEY=""
if [ -n "${KEY:-}" ]; then SESSION_KEY=bench-session-key; fi
export WRK_KEY=$SESSION_KEY
PORT=${BENCH_PORT:-3961}
TCK=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for run in $(seq "${RUNS:-3}"); do
  DATA=$(mktemp -d)
  SWITCHBOARD_LOG=warn SWITCHBOARD_SESSION_API_KEY="$SESSION_KEY" SWITCHBOARD_MAX_RUNNING_CONVERSATIONS=1000000 SWITCHBOARD_CREATE_RATE_PER_SEC=0 \
    "$BIN" serve --port "$PORT" --data-dir "$DATA" --store "$STORE" 2>/dev/null &
  PID=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/alive" >/dev/null && break; sleep 0.1; done
  c0=$(cpu "$PID")
  n=$(wrk -t1 -c64 -d"${SECS:-3}s" -s bench/get.lua "http://127.0.0.1:$PORT/alive" | awk '/requests in/ {print $1}')
  c1=$(cpu "$PID")
  alive=$(( (c1 - c0) * 1000000 / TCK / n ))
  c0=$(cpu "$PID")
  m=$(wrk -t1 -c64 -d"${SECS:-3}s" -s bench/post.lua "http://127.0.0.1:$PORT/api/conversations" | awk '/requests in/ {print $1}')
  sleep 0.5 # let the store finish what was accepted
  c1=$(cpu "$PID")
  post=$(( (c1 - c0) * 1000000 / TCK / m ))
  ratio=$(awk -v a="$alive" -v p="$post" 'BEGIN { printf "%.2f", a / p }')
  echo "run $run ($STORE${KEY:+, session key}): GET /alive ${alive} µs CPU/request ($n); POST /api/conversations ${post} µs CPU/request ($m); ratio ${ratio}"
  kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; rm -rf "$DATA"
done
