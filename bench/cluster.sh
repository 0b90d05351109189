#!/usr/bin/env bash
# `switchboard load` over one switchboard node and over three, on the same PostgreSQL (the
# throwaway one of .ci/postgres.sh on 127.0.0.1), with the release binary. Each round gets a
# fresh database; every node listens on 127.0.0.1 only and is stopped at the end.
#
#   bench/cluster.sh                      # 1,000 conversations, concurrency 64, 3 messages, 2 rounds
#   CONV=300 ROUNDS=1 bench/cluster.sh    # a quick look
#   BIN=path/to/switchboard bench/cluster.sh   # a given binary, no build
set -euo pipefail
cd "$(dirname "$0")/.."
CONV=${CONV:-1000}
CONC=${CONC:-64}
MSGS=${MSGS:-3}
ROUNDS=${ROUNDS:-2}
BASE_PORT=${BENCH_PORT:-3971}
ulimit -n "$(ulimit -Hn)"
. bench/common.sh
bench_binary
ADMIN=$(postgres_admin_url)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

round() { # $1 = number of nodes, $2 = round
  local nodes=$1 db="switchboard_bench_$$_${1}_$2" urls=() i port
  psql -q "$ADMIN" -c "CREATE DATABASE $db" >/dev/null
  local url="${ADMIN%/*}/$db"
  PIDS=()
  for i in $(seq "$nodes"); do
    port=$((BASE_PORT + i - 1))
    DATA=$(mktemp -d)
    SWITCHBOARD_LOG=warn SWITCHBOARD_MAX_RUNNING_CONVERSATIONS=100000 SWITCHBOARD_CREATE_RATE_PER_SEC=0 \
    SWITCHBOARD_MAX_RUNNING_PER_USER=0 \
    SWITCHBOARD_POSTGRES_URL="$url" SWITCHBOARD_NODE_ID="bench-$i" SWITCHBOARD_CLUSTER_KEY=bench \
      "$BIN" serve --store postgres --host 127.0.0.1 --port "$port" --data-dir "$DATA" 2>/dev/null &
    PIDS+=($!)
    urls+=(--url "http://127.0.0.1:$port")
  done
  for i in $(seq "$nodes"); do
    port=$((BASE_PORT + i - 1))
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
  done
  echo "== $nodes node(s), round $2"
  "$BIN" load "${urls[@]}" --conversations "$CONV" --concurrency "$CONC" --messages "$MSGS" \
    --attach socketio --expect echo
  cleanup
  PIDS=()
  psql -q "$ADMIN" -c "DROP DATABASE $db" >/dev/null
}

for r in $(seq "$ROUNDS"); do
  round 1 "$r"
  round 3 "$r"
done
