#!/usr/bin/env python3
"""OpenHands' CodeActAgent behind switchboard's process runtime (protocol 1).

switchboard starts this once per conversation (`runtime.kind = "openhands"`, see the README)
with the Python of the OpenHands 0.53.0 environment that `agents/openhands/install.sh`
installs. It hosts OpenHands' own AgentController, agent and CLI runtime (commands run on this
machine, in the conversation's working directory) and speaks docs/runtime-protocol.md:

- events reach switchboard the way OpenHands' server hands them to its clients
  (`Session._on_event`), with every field (`tool_call_metadata`, `llm_metrics`, ...); each is
  named by its OpenHands id as `ref`, and causes are sent as ids or refs;
- a conversation started again resumes from switchboard's history, written into the OpenHands
  file store before the event stream exists (nothing is re-sent, no command is run again);
- on `stop` every process group a command started is killed (the CLI runtime starts each
  command in its own session, out of reach of switchboard's process-group signals);
- OpenHands' state (its home, caches, git config, user microagents) lives in a per-conversation
  state directory outside the working directory, never in the user's home.

Settings: the `settings` of `init` (switchboard's user settings: llm_model, llm_base_url,
llm_api_key, agent, max_iterations) win over OpenHands' own environment variables (LLM_MODEL,
LLM_BASE_URL, LLM_API_KEY, LLM_NATIVE_TOOL_CALLING, MAX_ITERATIONS, ...).
OPENHANDS_STATE_DIR is where the per-conversation state directories go.
"""

import os
import sys

# ---- 0. stdout is the protocol stream; everything else printed goes to stderr --------------
_PROTOCOL = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LOG_LEVEL", "WARNING")

STATE_ROOT = os.path.abspath(
    os.environ.get("OPENHANDS_STATE_DIR")
    or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
        "switchboard-openhands",
    )
)


def _use_home(home):
    """Points HOME, the XDG directories and git's global config into `home`."""
    os.makedirs(home, exist_ok=True)
    os.environ["HOME"] = home
    for name, sub in (("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"),
                      ("XDG_DATA_HOME", ".local/share"), ("XDG_STATE_HOME", ".local/state")):
        os.environ[name] = os.path.join(home, sub)
    os.environ["GIT_CONFIG_GLOBAL"] = os.path.join(home, ".gitconfig")


# Imports may write caches: never into the user's home. Sandboxed (runtime.process.sandbox =
# "bwrap") the state root is read-only but for this agent's conversation, and the agent's own
# /tmp is private: the caches go there.
try:
    _use_home(os.path.join(STATE_ROOT, "_import-home"))
except OSError:
    _use_home(os.path.join(os.environ.get("TMPDIR") or "/tmp", "switchboard-import-home"))

import asyncio  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from pydantic import SecretStr  # noqa: E402

import openhands.agenthub  # noqa: E402,F401  (registers the agents)
import jinja2  # noqa: E402
import openhands.memory.memory as oh_memory  # noqa: E402
import openhands.utils.prompt as oh_prompt  # noqa: E402
from openhands.controller import AgentController  # noqa: E402
from openhands.controller.agent import Agent  # noqa: E402
from openhands.core.config import OpenHandsConfig  # noqa: E402
from openhands.core.config.condenser_config import NoOpCondenserConfig  # noqa: E402
from openhands.core.config.utils import finalize_config, load_from_env  # noqa: E402
from openhands.core.schema import AgentState  # noqa: E402
from openhands.core.setup import create_memory  # noqa: E402
from openhands.events import EventSource, EventStream, EventStreamSubscriber  # noqa: E402
from openhands.events.action import ChangeAgentStateAction, MessageAction, NullAction  # noqa: E402
from openhands.events.observation import (  # noqa: E402
    AgentStateChangedObservation,
    CmdOutputObservation,
    ErrorObservation,
    NullObservation,
    RecallObservation,
)
from openhands.events.serialization import event_from_dict, event_to_dict  # noqa: E402
from openhands.llm.llm import LLM  # noqa: E402
from openhands.runtime.impl.cli.cli_runtime import CLIRuntime  # noqa: E402
from openhands.storage import get_file_store  # noqa: E402
from openhands.storage.locations import get_conversation_event_filename  # noqa: E402

PROTOCOL_VERSION = 1
_write_lock = threading.Lock()


def log(text):
    print(f"openhands-adapter: {text}", file=sys.stderr, flush=True)


def send(message):
    line = json.dumps(message, ensure_ascii=False, default=str) + "\n"
    with _write_lock:
        _PROTOCOL.write(line)
        _PROTOCOL.flush()


# ---- the CLI runtime, with its commands' process groups tracked and its output kept --------

class SwitchboardCLIRuntime(CLIRuntime):
    """CLIRuntime that remembers the process group of every command (so that `stop` can kill
    them all, background ones included), gives commands no stdin (the protocol stream), and
    reads a command's output to the end without blocking on what it left running (OpenHands
    0.53 loses the output of a command that ends before the first poll)."""

    process_groups = set()
    groups_lock = threading.Lock()

    def _execute_shell_command(self, command, timeout):
        start = time.monotonic()
        process = subprocess.Popen(
            ["bash", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with self.groups_lock:
            self.process_groups.add(process.pid)
        fd = process.stdout.fileno()
        chunks = []
        timed_out = False

        def read_available(wait):
            """Reads what is there within `wait` seconds; False at end of output."""
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return True
            data = os.read(fd, 65536)
            if not data:
                return False
            chunks.append(data)
            if self._shell_stream_callback:
                self._shell_stream_callback(data.decode("utf-8", "replace"))
            return True

        open_ = True
        while process.poll() is None:
            if timeout is not None and time.monotonic() - start > timeout:
                self._safe_terminate_process(process, signal_to_send=signal.SIGTERM)
                timed_out = True
                break
            if open_:
                open_ = read_available(0.1)
            else:
                time.sleep(0.05)
        # The command is done: take what is left, but do not wait for processes it left in
        # the background holding the pipe.
        while open_:
            before = len(chunks)
            open_ = read_available(0.05)
            if open_ and len(chunks) == before:
                break
        process.stdout.close()
        if timed_out:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._safe_terminate_process(process, signal_to_send=signal.SIGKILL)
        exit_code = -1 if timed_out else process.returncode
        metadata = {"working_dir": self._workspace_path}
        if timed_out:
            metadata["suffix"] = f"[The command timed out after {timeout:.1f} seconds.]"
        return CmdOutputObservation(
            command=command,
            content=b"".join(chunks).decode("utf-8", "replace"),
            exit_code=exit_code,
            metadata=metadata,
        )

    @classmethod
    def kill_all_commands(cls):
        """SIGKILL to every process group a command started (live or not)."""
        with cls.groups_lock:
            groups = list(cls.process_groups)
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# ---- configuration ----------------------------------------------------------------------

def build_config(workspace, settings, state_dir):
    cfg = OpenHandsConfig()
    load_from_env(cfg, os.environ)
    agent_name = settings.get("agent") or cfg.default_agent or "CodeActAgent"
    cfg.runtime = "cli"
    cfg.default_agent = agent_name
    cfg.workspace_base = workspace
    cfg.file_store = "memory"
    cfg.cache_dir = os.path.join(state_dir, "cache")
    if settings.get("max_iterations"):
        cfg.max_iterations = int(settings["max_iterations"])
    llm = cfg.get_llm_config()
    if settings.get("llm_model"):
        llm.model = settings["llm_model"]
    if settings.get("llm_base_url"):
        llm.base_url = settings["llm_base_url"]
    if settings.get("llm_api_key"):
        llm.api_key = SecretStr(str(settings["llm_api_key"]))
    cfg.set_llm_config(llm)
    agent_cfg = cfg.get_agent_config(agent_name)
    agent_cfg.enable_mcp = False
    agent_cfg.condenser = NoOpCondenserConfig(type="noop")
    cfg.set_agent_config(agent_cfg, agent_name)
    finalize_config(cfg)
    return cfg, agent_name


# ---- forwarding (what OpenHands' server sends its clients) -------------------------------

class Forwarder:
    """Turns OpenHands stream events into protocol `event` lines, as `Session._on_event` does."""

    def __init__(self, history_last_id):
        self.history_last_id = history_last_id
        # OpenHands ids of the user events switchboard sent, and the switchboard ids they have.
        self.from_switchboard = {}
        # OpenHands ids of events sent with that id as `ref`.
        self.sent = set()
        # Switchboard ids of sent events, from acks.
        self.acked = {}
        self.lock = threading.Lock()

    def cause(self, cause):
        if cause is None:
            return None
        with self.lock:
            if cause in self.from_switchboard:
                return self.from_switchboard[cause]
            if cause in self.acked:
                return self.acked[cause]
            if cause in self.sent:
                return {"ref": cause}
        if cause <= self.history_last_id:
            return cause  # history events have switchboard's ids
        return None

    def on_ack(self, ack):
        ref = ack.get("ref")
        if isinstance(ref, int):
            with self.lock:
                self.acked[ref] = ack.get("id")

    def __call__(self, event):
        try:
            self.forward(event)
        except Exception as e:  # a callback error must not stop the stream
            log(f"cannot forward event {getattr(event, 'id', '?')}: {e!r}")

    def forward(self, event):
        if isinstance(event, (NullAction, NullObservation)):
            return
        with self.lock:
            if event.id in self.from_switchboard:
                return  # switchboard's own user event, already stored
        source = event.source
        if source == EventSource.USER and isinstance(event, MessageAction):
            return  # only users speak for users
        data = event_to_dict(event)
        if source == EventSource.ENVIRONMENT:
            if not isinstance(event, (CmdOutputObservation, AgentStateChangedObservation,
                                      RecallObservation, ErrorObservation)):
                return
            data["source"] = "agent"
        elif source not in (EventSource.AGENT, EventSource.USER):
            return
        oh_id = data.pop("id", None)
        data.pop("timestamp", None)
        if "cause" in data:
            cause = self.cause(data.pop("cause"))
            if cause is not None:
                data["cause"] = cause
        message = {"type": "event", "event": data}
        if isinstance(oh_id, int) and oh_id >= 0:
            message["ref"] = oh_id
            with self.lock:
                self.sent.add(oh_id)
        send(message)


# ---- resume -----------------------------------------------------------------------------

def write_history(file_store, sid, history):
    """Writes switchboard's history into the file store under switchboard's ids, before the
    event stream exists: OpenHands then loads it as its own past, and nothing is delivered
    to subscribers or run again."""
    last = -1
    for item in history:
        event_id = item.get("id")
        if not isinstance(event_id, int):
            continue
        last = max(last, event_id)
        try:
            event_from_dict(dict(item))
        except Exception as e:
            log(f"history event {event_id} is not an OpenHands event, skipped: {e}")
            continue
        file_store.write(get_conversation_event_filename(sid, event_id), json.dumps(item))
    return last


# ---- the conversation ---------------------------------------------------------------------

# ---- before `init`: what every conversation would repeat ------------------------------------

_TEMPLATES = {}


def _shared_environment(loader):
    """One jinja environment per prompt directory, so that a template is compiled once per
    process, not once per agent (OpenHands makes a new environment for each PromptManager)."""
    key = tuple(getattr(loader, "searchpath", ()) or ())
    if key not in _TEMPLATES:
        _TEMPLATES[key] = jinja2.Environment(loader=loader)
    return _TEMPLATES[key]


def warm_up():
    """Compiles the default agent's prompt templates while waiting for `init`: a warm pool
    hands this agent out sooner (~10 ms of CodeActAgent's start)."""
    oh_prompt.Environment = _shared_environment
    try:
        cls = Agent.get_cls("CodeActAgent")
        prompts = os.path.join(os.path.dirname(sys.modules[cls.__module__].__file__), "prompts")
        oh_prompt.PromptManager(prompt_dir=prompts)
    except Exception as e:  # only a lost head start
        log(f"warm-up skipped: {e!r}")


async def main():
    warm_up()
    line = sys.stdin.buffer.readline()
    if not line:
        return
    init_message = json.loads(line)
    if init_message.get("type") != "init" or init_message.get("protocol") != PROTOCOL_VERSION:
        log(f"unsupported protocol: {init_message.get('type')} {init_message.get('protocol')}")
        sys.exit(2)
    sid = init_message["conversation_id"]
    init = init_message.get("init") or {}
    history = init_message.get("history") or []
    settings = init_message.get("settings") or init.get("settings") or {}
    workspace = os.path.abspath(init_message.get("working_dir") or os.getcwd())

    state_dir = os.path.join(STATE_ROOT, sid)
    _use_home(os.path.join(state_dir, "home"))
    oh_memory.USER_MICROAGENTS_DIR = Path(os.environ["HOME"]) / ".openhands" / "microagents"

    cfg, agent_name = build_config(workspace, settings, state_dir)
    file_store = get_file_store(cfg.file_store, cfg.file_store_path)
    last_id = write_history(file_store, sid, history)
    event_stream = EventStream(sid, file_store)
    if last_id >= 0:
        event_stream.cur_id = last_id + 1
    forwarder = Forwarder(last_id)
    event_stream.subscribe(EventStreamSubscriber.SERVER, forwarder, sid)

    def status(level, runtime_status, msg=""):
        status_id = getattr(runtime_status, "value", None) or str(runtime_status)
        send({"type": "status", "status_type": "error" if level == "error" else "info",
              "id": status_id[:256] or "STATUS$UNKNOWN", "message": str(msg or "")})

    agent_cls = Agent.get_cls(agent_name)
    agent = agent_cls(llm=LLM(config=cfg.get_llm_config_from_agent(agent_name)),
                      config=cfg.get_agent_config(agent_name))
    runtime = SwitchboardCLIRuntime(
        config=cfg, event_stream=event_stream, sid=sid, plugins=agent_cls.sandbox_plugins,
        headless_mode=False, attach_to_existing=False, env_vars={}, git_provider_tokens=None,
        status_callback=status)
    await runtime.connect()
    memory = create_memory(
        runtime=runtime, event_stream=event_stream, sid=sid,
        selected_repository=init.get("repository"),
        conversation_instructions=init.get("conversation_instructions"),
        working_dir=cfg.workspace_mount_path_in_sandbox)
    controller = AgentController(
        sid=sid, file_store=file_store, event_stream=event_stream, agent=agent,
        iteration_delta=cfg.max_iterations, budget_per_task_delta=cfg.max_budget_per_task,
        agent_to_llm_config=cfg.get_agent_to_llm_config_map(),
        agent_configs=cfg.get_agent_configs(), confirmation_mode=False, headless_mode=False,
        initial_state=None)
    del memory  # subscribed to the stream; kept alive there

    # Like OpenHands' AgentSession.start: wait for the user unless a first message comes.
    first_message_coming = not history and (init.get("initial_user_msg") or init.get("image_urls"))
    if not first_message_coming:
        event_stream.add_event(ChangeAgentStateAction(AgentState.AWAITING_USER_INPUT),
                               EventSource.ENVIRONMENT)
    send({"type": "ready", "manages_agent_state": True})

    loop = asyncio.get_running_loop()
    inbox = asyncio.Queue()

    def read_stdin():
        for raw in sys.stdin.buffer:
            loop.call_soon_threadsafe(inbox.put_nowait, raw)
        loop.call_soon_threadsafe(inbox.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    while True:
        raw = await inbox.get()
        if raw is None:
            break
        try:
            message = json.loads(raw)
        except ValueError:
            log("ignoring a line that is not JSON")
            continue
        kind = message.get("type")
        if kind == "stop":
            break
        if kind == "ack":
            forwarder.on_ack(message)
        elif kind == "event":
            data = dict(message.get("event") or {})
            sb_id = data.pop("id", None)
            data.pop("timestamp", None)
            data["source"] = "user"
            try:
                action = event_from_dict(data)
            except Exception as e:
                log(f"cannot read user event {sb_id}: {e}")
                continue
            # The id is assigned under the stream's lock, before any subscriber sees the event.
            with forwarder.lock:
                event_stream.add_event(action, EventSource.USER)
                forwarder.from_switchboard[action.id] = sb_id
    await stop(controller, runtime)


async def stop(controller, runtime):
    """Kills every command, closes the controller (switchboard announces `stopped` itself)
    and the runtime, and exits at once: the stream's threads would only delay the exit."""
    # The commands first: a command that is still running holds up everything else.
    SwitchboardCLIRuntime.kill_all_commands()
    try:
        await asyncio.wait_for(controller.close(set_stop_state=False), 5)
    except Exception as e:
        log(f"closing the controller: {e!r}")
    try:
        runtime.close()
    except Exception as e:
        log(f"closing the runtime: {e!r}")
    SwitchboardCLIRuntime.kill_all_commands()
    _PROTOCOL.flush()
    os._exit(0)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except SystemExit:
        raise
    except BaseException as e:
        log(f"failed: {e!r}")
        SwitchboardCLIRuntime.kill_all_commands()
        os._exit(1)
