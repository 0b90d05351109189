#!/usr/bin/env python3
"""A shell agent for switchboard's process runtime (protocol 1, docs/runtime-protocol.md).

Each user message is run as a shell command in the agent's working directory (a fresh
directory per conversation by default); the agent answers with a `run` action, the command's
output as a `run` observation, and the usual agent state changes. Python standard library only.

    SWITCHBOARD_RUNTIME=process \
    SWITCHBOARD_PROCESS_COMMAND="python3 examples/agents/shell_agent.py" \
    cargo run --release -- serve

Environment: SHELL_AGENT_TIMEOUT (seconds a command may run, default 60) and
SHELL_AGENT_MAX_OUTPUT (bytes of output kept, default 65536).

This runs whatever the user types. Only use it where that is what you want.
"""

import json
import os
import subprocess
import sys

TIMEOUT = float(os.environ.get("SHELL_AGENT_TIMEOUT", "60"))
MAX_OUTPUT = int(os.environ.get("SHELL_AGENT_MAX_OUTPUT", "65536"))


def send(message):
    """Writes one protocol message as a line on stdout."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def emit(event):
    send({"type": "event", "event": event})


def agent_state(state):
    emit({
        "source": "environment",
        "observation": "agent_state_changed",
        "content": "",
        "extras": {"agent_state": state, "reason": ""},
    })


def log(text):
    """Anything on stderr ends up in switchboard's log, tagged with the conversation id."""
    print(f"shell_agent: {text}", file=sys.stderr, flush=True)


def run(command, cause):
    emit({
        "source": "agent",
        "message": f"Running command: {command}",
        "action": "run",
        "args": {"command": command, "is_input": False, "thought": "", "blocking": False,
                 "hidden": False, "confirmation_state": "confirmed"},
    })
    try:
        done = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT)
        output, exit_code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as e:
        output, exit_code = (e.stdout or b"") + f"\n[timed out after {TIMEOUT:g}s]".encode(), -1
    text = output[:MAX_OUTPUT].decode("utf-8", "replace")
    if len(output) > MAX_OUTPUT:
        text += f"\n[output cut at {MAX_OUTPUT} bytes]"
    emit({
        "source": "agent",
        "message": f"Command `{command}` exited with code {exit_code}",
        "cause": cause,
        "observation": "run",
        "content": text,
        "extras": {"command": command, "hidden": False,
                   "metadata": {"exit_code": exit_code, "working_dir": os.getcwd(),
                                "prefix": "", "suffix": ""}},
    })


def main():
    init = json.loads(sys.stdin.readline() or "null")
    if not init or init.get("type") != "init" or init.get("protocol") != 1:
        log(f"expected an init line for protocol 1, got {init!r}")
        return 2
    history = init.get("history", [])
    log(f"conversation {init['conversation_id']} in {os.getcwd()}, {len(history)} earlier events")
    send({"type": "ready"})
    if history:
        ran = sum(1 for e in history if e.get("observation") == "run")
        emit({"source": "agent", "action": "message",
              "args": {"content": f"Resumed after {len(history)} earlier events "
                                  f"({ran} commands run before).",
                       "image_urls": None, "file_urls": None, "wait_for_response": True}})
    for line in sys.stdin:
        message = json.loads(line)
        if message["type"] == "stop":
            break
        event = message.get("event", {})
        if event.get("action") != "message":
            continue
        command = event["args"].get("content", "").strip()
        if not command:
            continue
        agent_state("running")
        run(command, event["id"])
        agent_state("awaiting_user_input")
    log("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
