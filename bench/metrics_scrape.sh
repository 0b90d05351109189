#!/usr/bin/env bash
# What scraping /metrics costs the server: GET /alive throughput (wrk, 64 connections) and server
# CPU per request, with and without a scraper fetching /metrics 10 times a second (150 times
# Prometheus' default rate), alternating the two, on one release server with a few thousand
# live conversations. Loopback only; bounded runs. Prints each run and the medians.
#
#   bench/metrics_scrape.sh            # 3 rounds of 5 s each
#   ROUNDS=5 SECS=10 bench/metrics_scrape.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
BIN="${CARGO_TARGET_DIR:-target}/release/switchboard"
PORT=${BENCH_PORT:-3962}
URL="http://127.0.0.1:$PORT"
TCK=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }

DATA=$(mktemp -d)
SWITCHBOARD_LOG=warn SWITCHBOARD_MAX_RUNNING_CONVERSATIONS=1000000 SWITCHBOARD_CREATE_RATE_PER_SEC=0 \
  "$BIN" serve --port "$PORT" --data-dir "$DATA" --store memory 2>/dev/null &
PID=$!
SCRAPER=
cleanup() {
  [ -n "$SCRAPER" ] && kill "$SCRAPER" 2>/dev/null || true
  kill -TERM "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT
for _ in $(seq 50); do curl -sf "$URL/alive" >/dev/null && break; sleep 0.1; done
# Live conversations, so that a scrape has a registry to count.
wrk -t1 -c16 -d1s -s bench/post.lua "$URL/api/conversations" >/dev/null
live=$(curl -sf "$URL/metrics" | awk '/^switchboard_conversations\{status="running"\}/ {print $2}')
bytes=$(curl -sf "$URL/metrics" | wc -c)
echo "live conversations: $live; one scrape: $bytes bytes"

run() { # $1 = label; prints "req/s µs-CPU/request"
  local c0 c1 out n rps
  c0=$(cpu "$PID")
  out=$(wrk -t1 -c64 -d"${SECS}s" "$URL/alive")
  c1=$(cpu "$PID")
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$out")
  echo "$rps $(( (c1 - c0) * 1000000 / TCK / n ))"
}

plain=() scraped=() plain_cpu=() scraped_cpu=()
for round in $(seq "$ROUNDS"); do
  read -r rps us < <(run plain)
  plain+=("$rps"); plain_cpu+=("$us")
  echo "round $round without scraping: $rps req/s, $us µs CPU/request"
  ( while true; do curl -sf "$URL/metrics" >/dev/null; sleep 0.1; done ) &
  SCRAPER=$!
  read -r rps us < <(run scraped)
  kill "$SCRAPER"; wait "$SCRAPER" 2>/dev/null || true; SCRAPER=
  scraped+=("$rps"); scraped_cpu+=("$us")
  echo "round $round with scraping:    $rps req/s, $us µs CPU/request"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
p=$(median "${plain[@]}"); s=$(median "${scraped[@]}")
echo "median GET /alive: $p req/s without scraping, $s req/s with /metrics scraped 10 times a second (ratio $(awk -v a="$s" -v b="$p" 'BEGIN {printf "%.2f", a / b}'))"
echo "median server CPU per /alive: $(median "${plain_cpu[@]}") µs without, $(median "${scraped_cpu[@]}") µs with"
