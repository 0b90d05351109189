"""Renders bench/run.sh's measurements as a table and bench/results.json."""
import json
import os
import platform
import re
import subprocess
import sys

out = sys.argv[1]
rss0, rss_a, rss_b, idle_a, idle_b, cb_a, cd_a, cb_b, cd_b, clients_a, clients_b = map(int, sys.argv[2:13])


def read(name):
    with open(os.path.join(out, name)) as f:
        return f.read()


def wrk(name):
    text = read(name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", text)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return rps, float(p99.group(1)) * scale, int(non2xx.group(1)) if non2xx else 0


def load(name):
    return json.loads(read(name))


alive_rps, alive_p99, _ = wrk("wrk_alive.txt")
post_rps, post_p99, post_errors = wrk("wrk_post.txt")
l64 = load("load_64.json")
light = load("load_light.json")
ca = load("clients_a.json")
cb = load("clients_b.json")
store = {}
if os.path.exists(os.path.join(out, "store_append.txt")):
    # Rows of the bench's table: name, batch_max, writers, events, events/s, …
    for line in read("store_append.txt").splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) >= 5 and parts[1].isdigit() and parts[2].isdigit():
            store[parts[0]] = float(parts[4].replace(",", ""))

cpu = "unknown"
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    pass
results = {
    "machine": {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release()},
    "post_vs_alive": {"alive_rps": alive_rps, "post_rps": post_rps, "ratio": post_rps / alive_rps,
                      "post_p99_ms": post_p99, "alive_p99_ms": alive_p99, "post_non_2xx": post_errors},
    "latency_64": l64["latency_ms"],
    "latency_light": light["latency_ms"],
    "rss_per_idle_conversation_bytes": {
        str(idle_a): (rss_a - rss0) * 1024 / idle_a,
        str(idle_b): (rss_b - rss0) * 1024 / idle_b,
    },
    "rss_per_client_bytes": {
        str(clients_a): (cd_a - cb_a) * 1024 / clients_a,
        str(clients_b): (cd_b - cb_b) * 1024 / clients_b,
    },
    "clients_attached": {str(clients_a): ca["conversations_ok"], str(clients_b): cb["conversations_ok"]},
    "broadcast_ms": {str(clients_a): ca["latency_ms"].get("broadcast_delivery"),
                     str(clients_b): cb["latency_ms"].get("broadcast_delivery")},
    "store_appends_per_sec": store,
}
with open("bench/results.json", "w") as f:
    json.dump(results, f, indent=2)

r = results
rows = [
    ("GET /alive throughput (64 conns)", f"{alive_rps:,.0f} req/s", ""),
    ("POST /api/conversations throughput", f"{post_rps:,.0f} req/s", f"ratio {r['post_vs_alive']['ratio']:.2f} (target ≥ 0.5)"),
    ("POST /api/conversations p99 (64 conns)", f"{post_p99:.2f} ms", "target ≤ 10 ms"),
    ("create→RUNNING p99 (64 clients, Socket.IO)", f"{l64['latency_ms']['create_to_running']['p99']:.2f} ms", "target ≤ 5 ms"),
    ("message round trip p50 / p99 (64 clients)", f"{l64['latency_ms']['message_round_trip']['p50']:.2f} / {l64['latency_ms']['message_round_trip']['p99']:.2f} ms", ""),
    ("message round trip p50 (light load)", f"{light['latency_ms']['message_round_trip']['p50']:.3f} ms", "target ≤ 1 ms"),
    ("create→RUNNING p99 (light load)", f"{light['latency_ms']['create_to_running']['p99']:.2f} ms", ""),
]
for n, v in r["rss_per_idle_conversation_bytes"].items():
    rows.append((f"RSS per idle conversation @ {int(n):,}", f"{v / 1024:.2f} KiB", "target ≤ 4 KiB"))
for n, v in r["rss_per_client_bytes"].items():
    rows.append((f"RSS per Socket.IO client @ {int(n):,}", f"{v / 1024:.2f} KiB", f"{r['clients_attached'][n]:,} attached; target ≤ 16 KiB"))
for n, b in r["broadcast_ms"].items():
    if b:
        rows.append((f"broadcast of one event to {int(n):,} clients", f"p50 {b['p50']:.1f} / p99 {b['p99']:.1f} / max {b['max']:.1f} ms", ""))
for k, v in store.items():
    rows.append((f"store appends: {k}", f"{v:,.0f} events/s", ""))

width = max(len(a) for a, _, _ in rows)
print()
print(f"machine: {os.cpu_count()} cpus, {cpu}")
print(f"| {'measure'.ljust(width)} | value | note |")
print(f"|{'-' * (width + 2)}|---|---|")
for a, b, c in rows:
    print(f"| {a.ljust(width)} | {b} | {c} |")
print("\nwritten: bench/results.json")
