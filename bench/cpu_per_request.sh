#!/usr/bin/env bash
# Server CPU time per request for GET /alive and POST /api/conversations, which varies far less
# than req/s on a shared machine. Uses the release binary; loopback only; bounded runs.
#
#   bench/cpu_per_request.sh            # the default (sqlite) store
#   bench/cpu_per_request.sh memory     # the in-memory store
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-sqlite}
BIN="${CARGO_TARGET_DIR:-target}/release/switchboard"
PORT=${BENCH_PORT:-3961}
TCK=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for run in 1 2 3; do
  DATA=$(mktemp -d)
  SWITCHBOARD_LOG=warn SWITCHBOARD_MAX_RUNNING_CONVERSATIONS=1000000 SWITCHBOARD_CREATE_RATE_PER_SEC=0 \
    "$BIN" serve --port "$PORT" --data-dir "$DATA" --store "$STORE" 2>/dev/null &
  PID=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/alive" >/dev/null && break; sleep 0.1; done
  c0=$(cpu "$PID")
  n=$(wrk -t1 -c64 -d3s "http://127.0.0.1:$PORT/alive" | awk '/requests in/ {print $1}')
  c1=$(cpu "$PID")
  alive=$(( (c1 - c0) * 1000000 / TCK / n ))
  c0=$(cpu "$PID")
  m=$(wrk -t1 -c64 -d3s -s bench/post.lua "http://127.0.0.1:$PORT/api/conversations" | awk '/requests in/ {print $1}')
  sleep 0.5 # let the store finish what was accepted
  c1=$(cpu "$PID")
  post=$(( (c1 - c0) * 1000000 / TCK / m ))
  echo "run $run ($STORE): GET /alive ${alive} µs CPU/request ($n); POST /api/conversations ${post} µs CPU/request ($m)"
  kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; rm -rf "$DATA"
done
