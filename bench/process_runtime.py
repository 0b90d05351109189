#!/usr/bin/env python3
"""Benchmark of the process runtime with the example shell agent (standard library only).

Starts a release switchboard with `runtime.kind = "process"` and
examples/agents/shell_agent.py, creates N conversations (C requests at a time), and measures:

- conversations started per second: from the first create request until every conversation
  is RUNNING (its agent process started, read `init` and said `ready`);
- memory per running conversation: the server's own RSS growth divided by N, and each agent
  process's RSS and PSS (PSS shares the interpreter's pages fairly between the agents);
- one message round trip per conversation (a command run by each agent);
- that stopping all of them leaves no agent process.

    cargo build --release
    python3 bench/process_runtime.py --conversations 200 --concurrency 16

The agent runs with the real interpreter (sys.executable), not through a version-manager shim.
"""

import argparse
import concurrent.futures as futures
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "examples", "agents", "shell_agent.py")
# The process runtime requires a session key; the benchmark sets its own.
KEY = secrets.token_hex(24)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json",
                                          "X-Session-API-Key": KEY})
    with urllib.request.urlopen(req, timeout=60) as resp:
        text = resp.read()
        return json.loads(text) if text else None


def kib(pid, key, file="status"):
    """A `key: N kB` value from /proc/<pid>/status or smaps_rollup, in KiB."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid):
    """User + system CPU time a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_pids(server_pid):
    """Agents are the server's direct children."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == server_pid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def message_round_trips(base, ids, concurrency):
    """Sends one command to every conversation; seconds until every agent answered."""
    t = time.monotonic()
    message = {"action": "message", "args": {"content": "echo ok"}}
    with futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda cid: call(base, "POST", f"/api/conversations/{cid}/events", message),
                      ids))

    def answered(cid):
        while True:
            events = call(base, "GET", f"/api/conversations/{cid}/events?limit=100")["events"]
            if any(e["source"] == "agent" for e in events):
                return
            time.sleep(0.02)

    with futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(answered, ids))
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "switchboard"))
    ap.add_argument("--command", default=f"{sys.executable} {AGENT}",
                    help="the agent command (shell-style); default: the example shell agent")
    args = ap.parse_args()
    n = args.conversations

    data_dir = tempfile.mkdtemp(prefix="switchboard-bench-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ,
               SWITCHBOARD_PORT=str(port),
               SWITCHBOARD_DATA_DIR=data_dir,
               SWITCHBOARD_STORE="memory",
               SWITCHBOARD_LOG="warn",
               SWITCHBOARD_RUNTIME="process",
               SWITCHBOARD_SESSION_API_KEY=KEY,
               SWITCHBOARD_PROCESS_COMMAND=args.command,
               SWITCHBOARD_MAX_RUNNING_CONVERSATIONS=str(n + 10),
               SWITCHBOARD_CREATE_RATE_PER_SEC="0")
    server = subprocess.Popen([args.binary, "serve"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                call(base, "GET", "/alive")
                break
            except OSError:
                time.sleep(0.05)
        # Warm up (page cache, first fork) with one conversation, then measure from there.
        warm = call(base, "POST", "/api/conversations", {})["conversation_id"]
        while call(base, "GET", f"/api/conversations/{warm}")["status"] != "RUNNING":
            time.sleep(0.01)
        call(base, "POST", f"/api/conversations/{warm}/stop", {})
        time.sleep(0.5)
        rss_before = kib(server.pid, "VmRSS")
        cpu_before = cpu_seconds(server.pid)

        t0 = time.monotonic()
        with futures.ThreadPoolExecutor(args.concurrency) as pool:
            ids = list(pool.map(
                lambda _: call(base, "POST", "/api/conversations", {})["conversation_id"],
                range(n)))
        created = time.monotonic() - t0
        pending = set(ids)
        while pending:
            running = set()
            cursor = call(base, "GET", "/api/conversations?limit=100")
            while True:
                running |= {c["conversation_id"] for c in cursor["results"]
                            if c["status"] == "RUNNING"}
                if not cursor.get("next_page_id"):
                    break
                page_id = urllib.parse.quote(cursor["next_page_id"])
                cursor = call(base, "GET", f"/api/conversations?limit=100&page_id={page_id}")
            pending -= running
            if pending:
                time.sleep(0.01)
        started = time.monotonic() - t0
        server_cpu = cpu_seconds(server.pid) - cpu_before
        time.sleep(1.0)

        rss_after = kib(server.pid, "VmRSS")
        agents = agent_pids(server.pid)
        agent_rss = [kib(p, "VmRSS") for p in agents]
        agent_pss = [kib(p, "Pss", "smaps_rollup") for p in agents]

        round_trips = None
        if "shell_agent" in args.command:
            round_trips = message_round_trips(base, ids, args.concurrency)

        t2 = time.monotonic()
        with futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda cid: call(base, "POST", f"/api/conversations/{cid}/stop", {}),
                          ids))
        while agent_pids(server.pid):
            time.sleep(0.02)
        stopped = time.monotonic() - t2

        cpus = os.cpu_count()
        print(f"machine: {cpus} CPUs, {sys.executable} (Python {sys.version.split()[0]})")
        print(f"agent: {args.command}")
        print(f"conversations: {n}, concurrency {args.concurrency}")
        print(f"created (HTTP answers): {created:.2f} s")
        print(f"all RUNNING after: {started:.2f} s -> {n / started:.0f} conversations started/s")
        print(f"server CPU while starting them: {server_cpu:.2f} s "
              f"= {server_cpu / n * 1000:.1f} ms per conversation")
        print(f"agents running: {len(agents)}")
        print(f"server RSS: {rss_before / 1024:.1f} MiB -> {rss_after / 1024:.1f} MiB "
              f"= {(rss_after - rss_before) / n:.0f} KiB per conversation")
        if agents:
            print(f"agent process: RSS {sum(agent_rss) / len(agents) / 1024:.1f} MiB, "
                  f"PSS {sum(agent_pss) / len(agents) / 1024:.1f} MiB on average")
        if round_trips is not None:
            print(f"one command per conversation, all answered in {round_trips:.2f} s")
        print(f"all stopped, no agent process left, in {stopped:.2f} s")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
