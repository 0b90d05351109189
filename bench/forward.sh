#!/usr/bin/env bash
# Forwarded commands: create-or-joins of running conversations (`POST /api/conversations` with
# a conversation_id, round-robin over CONVS of them, bench/join.lua) sent with wrk to the
# cluster node that does not own them, which forwards each over HTTP to the owner, against the
# same commands sent to the owner itself. Two release nodes on the throwaway PostgreSQL of
# .ci/postgres.sh (a fresh database per round), loopback only, no creation rate limit (so that
# binaries from before forwarding came ahead of a local attempt, which took a creation token,
# measure alike).
# Prints wrk's rate and latency percentiles, the CPU time both nodes spent per request (the
# steadier figure on a shared machine), and how many connections the owner accepted during the
# forwarded run (switchboard_connections_accepted_total; n/a on a binary without it).
#
# Then the same for user messages posted to them (bench/message.lua) at MSG_CONNS connections.
#
#   bench/forward.sh                             # 3 rounds of 5 s at 1 and at 16 connections
#   BIN=path/to/switchboard bench/forward.sh     # that binary, no build (before/after)
#   ROUNDS=1 SECS=3 CONNS="1 64" CONVS=500 bench/forward.sh
#   MSG_CONNS="" bench/forward.sh                # create-or-joins only
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
CONNS=${CONNS:-1 16}
MSG_CONNS=${MSG_CONNS-1}
CONVS=${CONVS:-1000}
A_PORT=${BENCH_PORT:-3981}
B_PORT=$((A_PORT + 1))
ulimit -n "$(ulimit -Hn)"
. bench/common.sh
bench_binary
ADMIN=$(postgres_admin_url)
PIDS=()
DB=""
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
  if [ -n "$DB" ]; then psql -q "$ADMIN" -c "DROP DATABASE IF EXISTS $DB" >/dev/null; DB=""; fi
}
trap cleanup EXIT

node() { # $1 = node id, $2 = port, $3 = database URL
  SWITCHBOARD_LOG=warn SWITCHBOARD_SESSION_API_KEY="" SWITCHBOARD_CREATE_RATE_PER_SEC=0 \
  SWITCHBOARD_MAX_RUNNING_PER_USER=0 SWITCHBOARD_POSTGRES_URL="$3" \
  SWITCHBOARD_NODE_ID="$1" SWITCHBOARD_CLUSTER_KEY=bench \
    "$BIN" serve --store postgres --host 127.0.0.1 --port "$2" --data-dir "$(mktemp -d)" 2>/dev/null &
  PIDS+=($!)
}

TCK=$(getconf CLK_TCK)
cpu() { # CPU ticks both nodes used so far
  awk '{t += $14 + $15} END {print t}' "/proc/${PIDS[0]}/stat" "/proc/${PIDS[1]}/stat"
}

accepted() { # connections the node on port $1 accepted so far
  curl -sf "http://127.0.0.1:$1/metrics" | awk '/^switchboard_connections_accepted_total / {print $2}'
}

# wrk at $2 connections on port $1 with script $3 (bench/join.lua when not given): "req/s p50
# p99 non-2xx, CPU per request".
run() {
  local c0 out
  c0=$(cpu)
  out=$(wrk -t1 -c"$2" -d"${SECS}s" --latency -s "${3:-bench/join.lua}" "http://127.0.0.1:$1/api/conversations")
  echo "$out" | awk -v ticks=$(($(cpu) - c0)) -v tck="$TCK" \
    '/requests in/ {n = $1} /Requests\/sec/ {r = $2} /^ +50%/ {p50 = $2} /^ +99%/ {p99 = $2}
     /Non-2xx/ {bad = $5}
     END {printf "%6.0f req/s  p50 %8s  p99 %8s  non-2xx %d  a+b CPU %4.0f us/request",
          r, p50, p99, bad, ticks * 1e6 / tck / n}'
}

for round in $(seq "$ROUNDS"); do
  DB="switchboard_bench_forward_$$_$round"
  psql -q "$ADMIN" -c "CREATE DATABASE $DB" >/dev/null
  url="${ADMIN%/*}/$DB"
  node a "$A_PORT" "$url"
  node b "$B_PORT" "$url"
  for port in "$A_PORT" "$B_PORT"; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
  done
  ids=""
  for _ in $(seq "$CONVS"); do
    ids+=" $(curl -sf -X POST -H 'Content-Type: application/json' -d '{}' \
      "http://127.0.0.1:$A_PORT/api/conversations" | sed -n 's/.*"conversation_id": *"\([^"]*\)".*/\1/p')"
  done
  export WRK_IDS="$ids" WRK_KEY=""
  last=${ids##* }
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$A_PORT/api/conversations/$last" | grep -q '"RUNNING"' && break
    sleep 0.1
  done
  echo "== round $round: $CONVS conversations, owned by a"
  for c in $CONNS; do
    before=$(accepted "$A_PORT")
    forwarded=$(run "$B_PORT" "$c")
    after=$(accepted "$A_PORT")
    conns="n/a"
    if [ -n "$before" ] && [ -n "$after" ]; then conns=$((after - before - 1)); fi
    echo "  $c conn  forwarded b->a: $forwarded  (a accepted $conns connections)"
    echo "  $c conn  direct to a:     $(run "$A_PORT" "$c")"
  done
  for c in $MSG_CONNS; do
    echo "  $c conn  messages b->a:   $(run "$B_PORT" "$c" bench/message.lua)"
    echo "  $c conn  messages to a:   $(run "$A_PORT" "$c" bench/message.lua)"
  done
  cleanup
done
