#!/usr/bin/env bash
# switchboard benchmarks: builds release, starts servers with fresh data directories on
# 127.0.0.1, measures, prints a table and writes bench/results.json.
#
#   bench/run.sh            # the full run (about 5 minutes after the build)
#   QUICK=1 bench/run.sh    # smaller counts, for a smoke test
#
# Every load goes to 127.0.0.1 only and every step is bounded in count and time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out
mkdir -p "$OUT"
QUICK=${QUICK:-0}
PORT=${BENCH_PORT:-3917}
URL="http://127.0.0.1:$PORT"
ulimit -n "$(ulimit -Hn)"

if ! command -v wrk >/dev/null; then
  echo "== installing wrk"
  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi

echo "== building release"
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/switchboard"

if [ "$QUICK" = 1 ]; then
  WRK_SECS=3; LOAD_CONV=500; IDLE_A=2000; IDLE_B=10000; CLIENTS_A=200; CLIENTS_B=1000
else
  WRK_SECS=10; LOAD_CONV=3000; IDLE_A=10000; IDLE_B=100000; CLIENTS_A=1000; CLIENTS_B=10000
fi

PID=""
DATA=""
stop_server() {
  if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; fi
  if [ -n "$DATA" ]; then rm -rf "$DATA"; DATA=""; fi
}
trap stop_server EXIT

start_server() {
  stop_server
  DATA=$(mktemp -d)
  SWITCHBOARD_LOG=warn \
  SWITCHBOARD_MAX_RUNNING_CONVERSATIONS=1000000 \
  SWITCHBOARD_MAX_CLIENTS_PER_CONVERSATION=100000 \
  SWITCHBOARD_CREATE_RATE_PER_SEC=0 \
    "$BIN" serve --port "$PORT" --data-dir "$DATA" "$@" 2>"$OUT/server.log" &
  PID=$!
  for _ in $(seq 100); do
    if curl -sf "$URL/alive" >/dev/null 2>&1; then
      kill -0 "$PID" 2>/dev/null && return 0
      echo "port $PORT is taken by another process"; exit 1
    fi
    sleep 0.1
  done
  echo "server did not start"; cat "$OUT/server.log"; exit 1
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }

load() { "$BIN" load --url "$URL" "$@"; }

echo "== 1. POST /api/conversations vs GET /alive (wrk, 64 connections, ${WRK_SECS}s each)"
start_server
wrk -t1 -c64 -d"${WRK_SECS}s" --latency "$URL/alive" > "$OUT/wrk_alive.txt"
wrk -t1 -c64 -d"${WRK_SECS}s" --latency -s bench/post.lua "$URL/api/conversations" > "$OUT/wrk_post.txt"
grep -E "Requests/sec|99%|Non-2xx" "$OUT/wrk_alive.txt" "$OUT/wrk_post.txt" || true

echo "== 2. latency at 64 concurrent clients, and at light load"
start_server
load --conversations "$LOAD_CONV" --concurrency 64 --messages 5 --attach socketio --json "$OUT/load_64.json"
load --conversations 50 --concurrency 1 --messages 20 --attach socketio --json "$OUT/load_light.json"

echo "== 3. RSS per idle live conversation"
start_server
sleep 1
RSS0=$(rss_kb)
load --conversations "$IDLE_A" --concurrency 64 --messages 0 --attach none --json "$OUT/idle_a.json" >/dev/null
sleep 1
RSS_A=$(rss_kb)
load --conversations $((IDLE_B - IDLE_A)) --concurrency 64 --messages 0 --attach none --json "$OUT/idle_b.json" >/dev/null
sleep 1
RSS_B=$(rss_kb)
echo "rss: base ${RSS0} KiB, ${IDLE_A} conversations ${RSS_A} KiB, ${IDLE_B} conversations ${RSS_B} KiB"

echo "== 4. RSS per attached Socket.IO client, broadcast latency"
# Sets CB (RSS before) and CD (RSS while n clients are attached).
client_rss() {
  local n=$1 json=$2
  start_server
  sleep 1
  CB=$(rss_kb)
  load --broadcast "$n" --concurrency 64 --hold 6 --json "$json" >/dev/null &
  local lp=$!
  # Measure while the clients are held open: wait until all are attached.
  for _ in $(seq 600); do
    kill -0 "$lp" 2>/dev/null || break
    local conns
    conns=$(curl -s "$URL/api/conversations?limit=1" | grep -o '"num_connections":[0-9]*' | cut -d: -f2)
    [ "${conns:-0}" -ge "$n" ] && break
    sleep 0.2
  done
  sleep 1
  CD=$(rss_kb)
  wait "$lp" || true
}
client_rss "$CLIENTS_A" "$OUT/clients_a.json"; CB_A=$CB; CD_A=$CD
client_rss "$CLIENTS_B" "$OUT/clients_b.json"; CB_B=$CB; CD_B=$CD
echo "rss: ${CLIENTS_A} clients ${CB_A} -> ${CD_A} KiB; ${CLIENTS_B} clients ${CB_B} -> ${CD_B} KiB"
stop_server

echo "== 5. store appends"
if [ -f benches/store_append.rs ]; then
  cargo bench --quiet --bench store_append 2>/dev/null | tee "$OUT/store_append.txt"
fi

python3 bench/report.py "$OUT" \
  "$RSS0" "$RSS_A" "$RSS_B" "$IDLE_A" "$IDLE_B" \
  "$CB_A" "$CD_A" "$CB_B" "$CD_B" "$CLIENTS_A" "$CLIENTS_B"
