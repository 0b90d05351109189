#!/usr/bin/env bash
# switchboard beside OpenHands 0.53.0: the same `switchboard load` against each, one table.
#
#   bench/vs-openhands.sh                                  # 12 conversations, 3 at a time, 3 messages
#   CONVERSATIONS=30 CONCURRENCY=6 MESSAGES=5 bench/vs-openhands.sh
#
# What it does, all on 127.0.0.1 and bounded in time:
# 1. installs OpenHands 0.53.0 (agents/openhands/install.sh: Python 3.12, uv, packages as of
#    2025-08-15, compiled bytecode) into its cache, ~/.cache/switchboard/openhands-0.53.0;
#    later runs reuse it;
# 2. starts agents/openhands/mock_llm.py, a mock OpenAI-compatible LLM (standard library);
# 3. starts OpenHands' own server (uvicorn openhands.server.listen:app) with the CLI runtime
#    (commands on the host, no Docker), CodeActAgent and the mock LLM, in a scratch home;
# 4. starts switchboard (release build, SQLite store) twice in turn: with the echo runtime, then
#    with the openhands runtime (the same CodeActAgent, CLI runtime and mock LLM, one adapter
#    process per conversation);
# 5. runs the same `switchboard load` against each (Socket.IO, --expect any), measures the
#    server's RSS (its whole process tree) before and after, counts the conversations still
#    running, and prints one table with the ratios.
# Each server is stopped when its run is over; every process it started is stopped at exit
# (trap), and the scratch directory removed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"

CONVERSATIONS=${CONVERSATIONS:-12}
CONCURRENCY=${CONCURRENCY:-3}
MESSAGES=${MESSAGES:-3}
TIMEOUT=${TIMEOUT:-120}
OH_PORT=${OH_PORT:-3931}
SB_PORT=${SB_PORT:-3932}
LOAD_ARGS=(--conversations "$CONVERSATIONS" --concurrency "$CONCURRENCY" --messages "$MESSAGES"
           --attach socketio --expect any --timeout "$TIMEOUT")
export SWITCHBOARD_OPENHANDS_VENV=${SWITCHBOARD_OPENHANDS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/switchboard/openhands-0.53.0}
VENV=$SWITCHBOARD_OPENHANDS_VENV

WORK=$(mktemp -d)
PIDS=()
stop_group() {  # pid: TERM its process group, KILL it after 5 s
  kill -TERM -- "-$1" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL -- "-$1" 2>/dev/null || true
}
cleanup() {
  for pid in "${PIDS[@]}"; do stop_group "$pid"; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts "$@" in a session of its own (so its whole process group can be stopped).
start() {  # log, command…; sets LAST_PID
  local log=$1; shift
  setsid "$@" >"$log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

wait_http() {  # url, seconds, pid, log
  local deadline=$((SECONDS + $2))
  until curl -sf "$1" >/dev/null 2>&1; do
    if ! kill -0 "$3" 2>/dev/null; then echo "process exited; log:"; tail -30 "$4"; exit 1; fi
    if [ $SECONDS -ge $deadline ]; then echo "$1 did not answer in $2 s; log:"; tail -30 "$4"; exit 1; fi
    sleep 0.2
  done
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$OH_PORT" "$SB_PORT"; do
  port_free "$p" || { echo "port $p is in use (set OH_PORT / SB_PORT)"; exit 1; }
done

# The RSS of a process and all its descendants, in KiB.
rss_tree_kb() {
  local total=0 pid kids queue=("$1")
  while [ ${#queue[@]} -gt 0 ]; do
    pid=${queue[0]}; queue=("${queue[@]:1}")
    total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
    kids=$(cat /proc/"$pid"/task/*/children 2>/dev/null || true)
    for k in $kids; do queue+=("$k"); done
  done
  echo "$total"
}

running() {  # conversations listed as RUNNING (first 100)
  curl -sf --retry 5 --retry-delay 1 "$1/api/conversations?limit=100" |
    python3 -c 'import json,sys; print(sum(c.get("status") == "RUNNING" for c in json.load(sys.stdin)["results"]))'
}

measure() {  # name, url, pid
  local name=$1 url=$2 pid=$3 before after live
  sleep 1
  before=$(rss_tree_kb "$pid")
  echo "-- $name: switchboard load --url $url ${LOAD_ARGS[*]}"
  timeout $((TIMEOUT * CONVERSATIONS + 120)) "$BIN" load --url "$url" "${LOAD_ARGS[@]}" \
    --json "$OUT/vs_$name.json" || true
  sleep 1
  after=$(rss_tree_kb "$pid")
  live=$(running "$url" || echo 0)
  echo "{\"rss_before_kb\":$before,\"rss_after_kb\":$after,\"live\":$live}" >"$OUT/vs_${name}_rss.json"
}

echo "== 1. OpenHands 0.53.0"
timeout 1800 agents/openhands/install.sh

echo "== 2. switchboard (release build)"
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/switchboard"

echo "== 3. mock LLM"
start "$WORK/llm.log" python3 agents/openhands/mock_llm.py --port 0
for _ in $(seq 100); do grep -q "listening on" "$WORK/llm.log" && break; sleep 0.1; done
LLM_PORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/llm.log")
[ -n "$LLM_PORT" ] || { echo "mock LLM did not start"; cat "$WORK/llm.log"; exit 1; }
LLM_URL="http://127.0.0.1:$LLM_PORT/v1"
# The agent's LLM, as OpenHands' environment variables (both OpenHands rows use them).
LLM_ENV=(LLM_MODEL=openai/mock LLM_API_KEY=mock LLM_BASE_URL="$LLM_URL" LLM_NATIVE_TOOL_CALLING=true
         LITELLM_LOCAL_MODEL_COST_MAP=True LOG_LEVEL=WARNING)

echo "== 4. OpenHands server on 127.0.0.1:$OH_PORT (CLI runtime, CodeActAgent, mock LLM)"
mkdir -p "$WORK/oh/store" "$WORK/oh/workspace" "$WORK/oh/home"
# The web app's saved settings: the agent and the LLM every new conversation gets.
cat >"$WORK/oh/store/settings.json" <<EOF
{"language":"en","agent":"CodeActAgent","max_iterations":20,"confirmation_mode":false,
 "llm_model":"openai/mock","llm_api_key":"mock","llm_base_url":"$LLM_URL",
 "enable_default_condenser":false,"enable_sound_notifications":false,
 "enable_proactive_conversation_starters":false,"enable_solvability_analysis":false,
 "user_consents_to_analytics":false}
EOF
# HOME is a scratch directory (OpenHands writes ~/.openhands); MAX_CONCURRENT_CONVERSATIONS is
# raised from 3 so that no conversation of the run is evicted; `port` is where OpenHands looks
# for its own MCP server; no frontend build is served.
start "$WORK/oh.log" env -C "$WORK/oh" -u PYTHONDONTWRITEBYTECODE HOME="$WORK/oh/home" \
  SERVE_FRONTEND=false RUNTIME=cli FILE_STORE=local FILE_STORE_PATH="$WORK/oh/store" \
  WORKSPACE_BASE="$WORK/oh/workspace" MAX_CONCURRENT_CONVERSATIONS=$((CONVERSATIONS + 10)) \
  port="$OH_PORT" "${LLM_ENV[@]}" \
  "$VENV/bin/python" -m uvicorn openhands.server.listen:app --host 127.0.0.1 --port "$OH_PORT" \
  --log-level warning
OH_PID=$LAST_PID
wait_http "http://127.0.0.1:$OH_PORT/alive" 180 "$OH_PID" "$WORK/oh.log"
measure openhands "http://127.0.0.1:$OH_PORT" "$OH_PID"
stop_group "$OH_PID"

echo "== 5. switchboard on 127.0.0.1:$SB_PORT (SQLite store, echo runtime)"
start "$WORK/sb.log" env SWITCHBOARD_LOG=warn "$BIN" serve --port "$SB_PORT" --data-dir "$WORK/sb"
SB_PID=$LAST_PID
wait_http "http://127.0.0.1:$SB_PORT/alive" 30 "$SB_PID" "$WORK/sb.log"
measure switchboard "http://127.0.0.1:$SB_PORT" "$SB_PID"
stop_group "$SB_PID"

echo "== 6. switchboard on 127.0.0.1:$SB_PORT (SQLite store, openhands runtime, mock LLM)"
start "$WORK/sb-oh.log" env -u PYTHONDONTWRITEBYTECODE SWITCHBOARD_LOG=warn \
  SWITCHBOARD_RUNTIME=openhands SWITCHBOARD_START_TIMEOUT_SECS=180 "${LLM_ENV[@]}" \
  "$BIN" serve --port "$SB_PORT" --data-dir "$WORK/sb-oh"
SB_PID=$LAST_PID
wait_http "http://127.0.0.1:$SB_PORT/alive" 30 "$SB_PID" "$WORK/sb-oh.log"
measure switchboard_openhands "http://127.0.0.1:$SB_PORT" "$SB_PID"
stop_group "$SB_PID"

echo
python3 - "$OUT" "$CONVERSATIONS" "$CONCURRENCY" "$MESSAGES" <<'EOF'
import json, sys
out, n, c, m = sys.argv[1], *sys.argv[2:]

def row(name):
    s = json.load(open(f"{out}/vs_{name}.json"))
    r = json.load(open(f"{out}/vs_{name}_rss.json"))
    lat = s["latency_ms"]
    p = lambda step, q: lat.get(step, {}).get(q)
    per = (r["rss_after_kb"] - r["rss_before_kb"]) / r["live"] if r["live"] else None
    return {
        "cps": s["conversations_per_sec"],
        "run50": p("create_to_running", "p50"), "run99": p("create_to_running", "p99"),
        "rt50": p("message_round_trip", "p50"), "rt99": p("message_round_trip", "p99"),
        "rss": per, "live": r["live"], "ok": s["conversations_ok"],
        "failed": s["conversations_failed"], "errors": s["errors"], "r429": s["rate_limited"],
    }

def ms(v):
    return "–" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" if v >= 10 else f"{v:.2f}"

def mib(kib):
    return "–" if kib is None else f"{kib / 1024:,.1f} MiB" if kib >= 1024 else f"{kib:,.0f} KiB"

def ratio(a, b):
    if not a or not b:
        return "–"
    x = a / b
    return f"{x:,.0f}×" if x >= 10 else f"{x:,.1f}×" if x >= 1 else f"{x:.2f}×"

oh = row("openhands")
rows = [("OpenHands 0.53.0 server (CLI runtime, CodeActAgent)", oh),
        ("switchboard, echo runtime", row("switchboard")),
        ("switchboard, openhands runtime (CodeActAgent, CLI runtime)", row("switchboard_openhands"))]
print(f"`switchboard load --conversations {n} --concurrency {c} --messages {m} --attach socketio --expect any`, mock LLM\n")
print("| server | conversations/s | create→RUNNING p50 / p99 (ms) | message round trip p50 / p99 (ms) | RSS per live conversation | ok / failed | 429s |")
print("|---|---|---|---|---|---|---|")
for name, r in rows:
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items())
    print(f"| {name} | {r['cps']:,.2f} | {ms(r['run50'])} / {ms(r['run99'])} | {ms(r['rt50'])} / {ms(r['rt99'])} "
          f"| {mib(r['rss'])} ({r['live']} live) | {r['ok']} / {r['failed']}{' (' + errors + ')' if errors else ''} | {r['r429']} |")
for name, r in rows[1:]:
    print(f"| *ratio: {name}* | {ratio(r['cps'], oh['cps'])} | {ratio(oh['run50'], r['run50'])} / {ratio(oh['run99'], r['run99'])} "
          f"| {ratio(oh['rt50'], r['rt50'])} / {ratio(oh['rt99'], r['rt99'])} | {ratio(oh['rss'], r['rss'])} | | |")
print("\nRatios are against the OpenHands server, oriented so that above 1× means switchboard is ahead:"
      " its conversations/s over OpenHands', OpenHands' latency and memory over its.")
EOF
echo
echo "(summaries: $OUT/vs_openhands.json, $OUT/vs_switchboard.json, $OUT/vs_switchboard_openhands.json)"
