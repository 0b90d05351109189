#!/usr/bin/env python3
"""Benchmark of agent start-up and memory: the OpenHands agent against the example shell agent.

Starts a switchboard with each agent in turn and measures, one conversation at a time:

- POST /api/conversations → RUNNING (the agent process started, read `init`, said `ready`),
  cold: no agent was waiting; and warm: with `runtime.process.warm = 1`, each conversation
  created once the pooled agent is there and idle (done loading);
- for OpenHands: one turn (a user message `run echo hi` → `run`, its output, `finish`,
  `finished`, two calls to a mock LLM on loopback), through switchboard;
- the RSS and PSS of each live OpenHands agent (all of them kept running until the end);
- the same start and turn with the adapter driven directly over its stdin/stdout, without
  switchboard: the difference is switchboard's overhead.

    cargo build --release
    agents/openhands/install.sh
    python3 bench/openhands.py --conversations 5

Standard library only; reuses bench/process_runtime.py's helpers.
"""

import argparse
import json
import os
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from process_runtime import AGENT, KEY, ROOT, agent_pids, call, free_port, kib  # noqa: E402

MOCK_LLM = os.path.join(ROOT, "agents", "openhands", "mock_llm.py")


def start_server(binary, data_dir, env_extra):
    port = free_port()
    env = dict(os.environ, SWITCHBOARD_PORT=str(port), SWITCHBOARD_DATA_DIR=data_dir,
               SWITCHBOARD_STORE="memory", SWITCHBOARD_LOG="warn", SWITCHBOARD_SESSION_API_KEY=KEY,
               SWITCHBOARD_START_TIMEOUT_SECS="300", **env_extra)
    server = subprocess.Popen([binary, "serve"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            call(base, "GET", "/alive")
            return server, base
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the server did not start")


def stop_server(server):
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def wait_running(base, cid):
    while call(base, "GET", f"/api/conversations/{cid}")["status"] != "RUNNING":
        time.sleep(0.005)


def states(base, cid):
    events = call(base, "GET", f"/api/conversations/{cid}/events?limit=100&reverse=true")
    return [e["extras"]["agent_state"] for e in events["events"]
            if e.get("observation") == "agent_state_changed"]


def cold_starts(base, n, body, before=lambda: None):
    """Seconds from POST to RUNNING for `n` conversations, one after another (`before` runs
    ahead of each, untimed)."""
    times, ids = [], []
    for _ in range(n):
        before()
        t = time.monotonic()
        cid = call(base, "POST", "/api/conversations", body)["conversation_id"]
        wait_running(base, cid)
        times.append(time.monotonic() - t)
        ids.append(cid)
    return times, ids


def pooled_agents(server_pid):
    """The server's agents waiting in its warm pool: those in a `.pool-…` directory."""
    pids = []
    for pid in agent_pids(server_pid):
        try:
            if os.path.basename(os.readlink(f"/proc/{pid}/cwd")).startswith(".pool-"):
                pids.append(pid)
        except OSError:
            pass
    return pids


def cpu_ticks(pid):
    """User and system CPU time of a process so far, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def wait_warm(server_pid, warm):
    """Waits until `warm` agents wait in the pool, done loading (no CPU used for 0.5 s)."""
    while True:
        pids = pooled_agents(server_pid)
        if len(pids) < warm:
            time.sleep(0.05)
            continue
        before = [cpu_ticks(p) for p in pids]
        time.sleep(0.5)
        if [cpu_ticks(p) for p in pids] == before:
            return


def warm_starts(base, server_pid, n, body, warm=1):
    """Seconds from POST to RUNNING for `n` conversations, each with a loaded pooled agent."""
    return cold_starts(base, n, body, before=lambda: wait_warm(server_pid, warm))


def summary(values):
    ordered = sorted(values)
    return (f"p50 {statistics.median(ordered):.3f} s, min {ordered[0]:.3f} s, "
            f"max {ordered[-1]:.3f} s (n={len(ordered)})")


def direct(python, adapter, llm_url, work):
    """The adapter alone: seconds to `ready`, and for one turn (message → `finished`)."""
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, LLM_MODEL="openai/mock", LLM_BASE_URL=llm_url + "/v1",
               LLM_API_KEY="sk-bench", LLM_NATIVE_TOOL_CALLING="true",
               OPENHANDS_STATE_DIR=os.path.join(work, "state"))
    t = time.monotonic()
    agent = subprocess.Popen([python, adapter], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, cwd=work, env=env, text=True)

    def send(message):
        agent.stdin.write(json.dumps(message) + "\n")
        agent.stdin.flush()

    def until(done):
        for line in agent.stdout:
            message = json.loads(line)
            if message.get("type") == "event" and "ref" in message:
                send({"type": "ack", "ref": message["ref"], "id": 0, "timestamp": ""})
            if done(message):
                return
        raise SystemExit("the adapter exited")

    send({"type": "init", "protocol": 1, "conversation_id": "bench-direct",
          "working_dir": work, "init": {}, "settings": None, "history": []})
    until(lambda m: m.get("type") == "ready")
    ready = time.monotonic() - t
    t = time.monotonic()
    send({"type": "event", "event": {"id": 1, "source": "user", "message": "run echo hi",
          "action": "message", "args": {"content": "run echo hi", "file_urls": [],
                                        "image_urls": [], "wait_for_response": False}}})
    until(lambda m: m.get("type") == "event"
          and m["event"].get("extras", {}).get("agent_state") == "finished")
    turn = time.monotonic() - t
    send({"type": "stop"})
    agent.stdin.close()
    agent.wait(timeout=30)
    return ready, turn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=5)
    ap.add_argument("--binary", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release",
        "switchboard"))
    ap.add_argument("--venv", default=os.environ.get("SWITCHBOARD_OPENHANDS_VENV") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "switchboard",
        "openhands-0.53.0"))
    args = ap.parse_args()
    n = args.conversations
    venv = args.venv
    print(f"machine: {os.cpu_count()} CPUs; binary {args.binary}")

    # The shell agent, cold then from the warm pool.
    for warm in (0, 1):
        data_dir = tempfile.mkdtemp(prefix="switchboard-bench-")
        server, base = start_server(args.binary, data_dir, {
            "SWITCHBOARD_RUNTIME": "process",
            "SWITCHBOARD_PROCESS_WARM": str(warm),
            "SWITCHBOARD_MAX_RUNNING_CONVERSATIONS": str(n + 5),
            "SWITCHBOARD_PROCESS_COMMAND": f"{sys.executable} {AGENT}"})
        try:
            cold_starts(base, 1, {})  # page cache
            if warm:
                times, _ = warm_starts(base, server.pid, n, {})
                print(f"shell_agent.py POST→RUNNING warm: {summary(times)}")
            else:
                times, _ = cold_starts(base, n, {})
                print(f"shell_agent.py POST→RUNNING cold: {summary(times)}")
        finally:
            stop_server(server)
            shutil.rmtree(data_dir, ignore_errors=True)

    # The OpenHands agent, with a mock LLM.
    llm = subprocess.Popen([sys.executable, MOCK_LLM, "--port", "0"], stdout=subprocess.PIPE,
                           text=True)
    llm_url = "http://" + llm.stdout.readline().split()[-1]
    openhands_env = {
        "SWITCHBOARD_RUNTIME": "openhands",
        "SWITCHBOARD_MAX_RUNNING_CONVERSATIONS": str(n + 5),
        "LLM_MODEL": "openai/mock", "LLM_BASE_URL": llm_url + "/v1", "LLM_API_KEY": "sk-bench",
        "LLM_NATIVE_TOOL_CALLING": "true"}
    # From the warm pool: each conversation once the pooled agent has loaded.
    data_dir = tempfile.mkdtemp(prefix="switchboard-bench-")
    server, base = start_server(args.binary, data_dir,
                                dict(openhands_env, SWITCHBOARD_PROCESS_WARM="1"))
    try:
        times, ids = warm_starts(base, server.pid, n, {})
        print(f"OpenHands agent POST→RUNNING warm: {summary(times)}")
        turns = []
        for cid in ids:
            t = time.monotonic()
            call(base, "POST", f"/api/conversations/{cid}/events",
                 {"action": "message", "args": {"content": "run echo hi"}})
            while states(base, cid).count("finished") == 0:
                time.sleep(0.005)
            turns.append(time.monotonic() - t)
        print(f"OpenHands first turn, pooled agent: {summary(turns)}")
    finally:
        stop_server(server)
        shutil.rmtree(data_dir, ignore_errors=True)
    data_dir = tempfile.mkdtemp(prefix="switchboard-bench-")
    server, base = start_server(args.binary, data_dir, openhands_env)
    try:
        cold_starts(base, 1, {})  # page cache
        times, ids = cold_starts(base, n, {})
        print(f"OpenHands agent POST→RUNNING cold: {summary(times)}")
        turns = []
        for cid in ids:
            before = states(base, cid).count("finished")
            t = time.monotonic()
            call(base, "POST", f"/api/conversations/{cid}/events",
                 {"action": "message", "args": {"content": "run echo hi"}})
            while states(base, cid).count("finished") == before:
                time.sleep(0.005)
            turns.append(time.monotonic() - t)
        print(f"OpenHands one turn (message → finished, 2 mock LLM calls): {summary(turns)}")
        time.sleep(1)
        agents = agent_pids(server.pid)
        rss = [kib(p, "VmRSS") / 1024 for p in agents]
        pss = [kib(p, "Pss", "smaps_rollup") / 1024 for p in agents]
        print(f"OpenHands agents live: {len(agents)}; per agent RSS {statistics.mean(rss):.0f} MiB,"
              f" PSS {statistics.mean(pss):.0f} MiB on average")
        stop_server(server)
        # The same agent without switchboard, with the command switchboard ran.
        python, adapter = (os.path.join(venv, "bin", "python"),
                           os.path.join(data_dir, "openhands", "adapter.py"))
        alone = [direct(python, adapter, llm_url, os.path.join(data_dir, f"direct-{i}"))
                 for i in range(min(n, 3))]
        print(f"OpenHands adapter alone: start→ready {summary([a[0] for a in alone])}")
        print(f"OpenHands adapter alone: one turn {summary([a[1] for a in alone])}")
    finally:
        stop_server(server)
        llm.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
