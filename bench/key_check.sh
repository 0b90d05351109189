#!/usr/bin/env bash
# What the key check costs: server CPU time per request for GET /api/conversations/{id} (one
# stored conversation, SQLite) when the caller is found without the store (the session key),
# with the cached answer that no user key exists (no key configured, authentication off: a look
# at SQLite's WAL-index header on the request's thread), and
# with one store read by the key's hash (a user key). Uses the release binary; loopback only;
# bounded runs.
#
#   bench/key_check.sh
#   BIN=path/to/switchboard bench/key_check.sh   # that binary, no build (before/after)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then
  BIN="${CARGO_TARGET_DIR:-target}/release/switchboard"
  cargo build --release --quiet
fi
PORT=${BENCH_PORT:-3962}
TCK=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One mode: $1 names it, $2 the server's session key ("" = none), $3 whether to add a user key
# (and send it), otherwise the session key is sent when there is one.
measure() {
  local name=$1 session=$2 user=$3 data key id c0 c1 n
  data=$(mktemp -d)
  key=$session
  if [ "$user" = yes ]; then
    key=$("$BIN" keys add bench --data-dir "$data" 2>/dev/null)
  fi
  SWITCHBOARD_LOG=warn SWITCHBOARD_SESSION_API_KEY="$session" \
    "$BIN" serve --port "$PORT" --data-dir "$data" 2>/dev/null &
  local pid=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/alive" >/dev/null && break; sleep 0.1; done
  local header=(-H "X-Session-API-Key: $key")
  [ -n "$key" ] || header=()
  id=$(curl -sf "${header[@]}" -X POST -H 'Content-Type: application/json' -d '{}' \
    "http://127.0.0.1:$PORT/api/conversations" | sed 's/.*"conversation_id":"\([^"]*\)".*/\1/')
  c0=$(cpu "$pid")
  if [ -n "$key" ]; then
    n=$(wrk -t1 -c16 -d3s -H "X-Session-API-Key: $key" "http://127.0.0.1:$PORT/api/conversations/$id" \
      | awk '/requests in/ {print $1}')
  else
    n=$(wrk -t1 -c16 -d3s "http://127.0.0.1:$PORT/api/conversations/$id" | awk '/requests in/ {print $1}')
  fi
  c1=$(cpu "$pid")
  echo "$name: $(( (c1 - c0) * 1000000 / TCK / n )) µs CPU/request ($n requests)"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$data"
}

for run in 1 2 3; do
  echo "run $run"
  measure "  session key (no store read)   " s3cret no
  measure "  no key, no user keys          " "" no
  measure "  user key (1 read by hash)     " "" yes
done
