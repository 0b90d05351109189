//! The `process` runtime with real child processes: the example shell agent, and tiny Python
//! agents that misbehave on purpose. Every test ends by checking that none of its agent
//! processes (found by the `SWITCHBOARD_CONVERSATION_ID` in their environment) is left, and
//! that this test process has no zombie child.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::{json, Value};
use switchboard::config::{RuntimeKind, SandboxKind, Settings};
use switchboard::conversation::{ConversationMeta, InitData};
use switchboard::events::{EventBody, Source};
use switchboard::runtime::{
    FromRuntime, ProcessRuntime, Runtime, RuntimeSignal, RuntimeSink, RuntimeStart,
};
use switchboard::store::{MemoryStore, Store};

use helpers::*;

mod pool;
mod sandbox;

const SHELL_AGENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/agents/shell_agent.py"
);

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Writes a Python agent into `dir` and returns the command that runs it.
fn script(dir: &Path, name: &str, body: &str) -> Vec<String> {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write script");
    vec![python(), path.display().to_string()]
}

async fn process_app(command: Vec<String>, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with(|s| {
        s.runtime.kind = RuntimeKind::Process;
        s.runtime.process.command = command;
        s.runtime.process.stop_grace_secs = 2;
        s.limits.start_timeout_secs = 30;
        tweak(s);
    })
    .await
}

// ---- finding processes ------------------------------------------------------------------

/// The state letter and parent pid of a process, from `/proc/<pid>/stat`.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Live (non-zombie) processes started for a conversation, its agent's children included.
fn agent_pids(conversation_id: &str) -> Vec<u32> {
    pids_with_env(&format!("SWITCHBOARD_CONVERSATION_ID={conversation_id}"))
}

/// Live (non-zombie) processes with `entry` (`NAME=value`) in their environment.
fn pids_with_env(entry: &str) -> Vec<u32> {
    let needle = format!("{entry}\0");
    all_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
                && proc_state(*pid).is_some_and(|(state, _)| state != 'Z')
        })
        .collect()
}

/// Waits until no process of the conversation is left; returns how long that took.
async fn wait_no_agents(conversation_id: &str, secs: u64) -> Duration {
    let start = Instant::now();
    loop {
        let pids = agent_pids(conversation_id);
        if pids.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "agent processes of {conversation_id} still running after {secs}s: {pids:?}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}

fn zombie_children() -> HashSet<u32> {
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|pid| proc_state(*pid) == Some(('Z', me)))
        .collect()
}

/// No child of this test process stays a zombie (tests running in parallel may leave one for
/// an instant, between an exit and its reaping).
async fn assert_no_lasting_zombies() {
    let first = zombie_children();
    if first.is_empty() {
        return;
    }
    actix_web::rt::time::sleep(Duration::from_secs(2)).await;
    let lasting: Vec<u32> = zombie_children().intersection(&first).copied().collect();
    assert!(lasting.is_empty(), "zombie children left: {lasting:?}");
}

// ---- reading conversations --------------------------------------------------------------

fn find(events: &[Value], pred: impl Fn(&Value) -> bool) -> Option<&Value> {
    events.iter().find(|e| pred(e))
}

fn run_output_containing<'a>(events: &'a [Value], text: &str) -> Option<&'a Value> {
    find(events, |e| {
        e["observation"] == "run" && e["content"].as_str().is_some_and(|c| c.contains(text))
    })
}

async fn post_message(app: &TestApp, id: &str, content: &str) {
    let r = app
        .post(
            &format!("/api/conversations/{id}/events"),
            json!({"action": "message", "args": {"content": content}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn stop(app: &TestApp, id: &str) {
    let r = app
        .post(&format!("/api/conversations/{id}/stop"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

// ---- the example agent ------------------------------------------------------------------

#[actix_web::test]
async fn shell_agent_round_trip_then_a_prompt_stop() {
    // A long grace period: the agent must exit on the `stop` line, not on a signal.
    let app = process_app(vec![python(), SHELL_AGENT.into()], |s| {
        s.runtime.process.stop_grace_secs = 30
    })
    .await;
    let id = app
        .create(json!({"initial_user_msg": "echo hello from the agent"}))
        .await;
    app.wait_status(&id, "RUNNING", 30).await;
    let events = app
        .wait_events(&id, 30, |e| {
            run_output_containing(e, "hello from the agent").is_some()
        })
        .await;
    let message_id = find(&events, |e| {
        e["source"] == "user" && e["action"] == "message"
    })
    .expect("the initial message")["id"]
        .clone();
    let output = run_output_containing(&events, "hello from the agent").unwrap();
    assert_eq!(output["source"], "agent");
    assert_eq!(output["cause"], message_id);
    assert_eq!(output["extras"]["metadata"]["exit_code"], 0);

    // A second message runs in the conversation's own working directory.
    post_message(&app, &id, "pwd; echo id=$SWITCHBOARD_CONVERSATION_ID").await;
    let workspace = app._data_dir.path().join("workspaces").join(&id);
    let events = app
        .wait_events(&id, 30, |e| {
            run_output_containing(e, &format!("id={id}")).is_some()
        })
        .await;
    let output = run_output_containing(&events, &format!("id={id}")).unwrap();
    let pwd = output["content"].as_str().unwrap().lines().next().unwrap();
    assert_eq!(
        std::fs::canonicalize(pwd).unwrap(),
        std::fs::canonicalize(&workspace).unwrap()
    );
    assert_dense(&events);
    let states = agent_states(&events);
    assert_eq!(
        states,
        [
            "loading",
            "running",
            "awaiting_user_input",
            "running",
            "awaiting_user_input"
        ],
        "{events:#?}"
    );
    assert_eq!(agent_pids(&id).len(), 1);

    stop(&app, &id).await;
    let took = wait_no_agents(&id, 10).await;
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    assert!(workspace.is_dir(), "the working directory is kept");
    let events = app.events(&id).await;
    assert_eq!(agent_states(&events).last().unwrap(), "stopped");
    assert!(find(&events, |e| e["observation"] == "error").is_none());
    app.shutdown().await;
    assert_no_lasting_zombies().await;
}

#[actix_web::test]
async fn a_restarted_agent_gets_the_history() {
    let app = process_app(vec![python(), SHELL_AGENT.into()], |_| {}).await;
    let id = app.create(json!({"initial_user_msg": "echo first"})).await;
    app.wait_events(&id, 30, |e| run_output_containing(e, "first").is_some())
        .await;
    app.wait_events(&id, 30, |e| {
        agent_states(e).last().map(String::as_str) == Some("awaiting_user_input")
    })
    .await;
    stop(&app, &id).await;
    wait_no_agents(&id, 10).await;
    let before = app.events(&id).await.len();

    let r = app
        .post(&format!("/api/conversations/{id}/start"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let expected = format!("Resumed after {before} earlier events (1 commands run before).");
    let events = app
        .wait_events(&id, 30, |e| {
            find(e, |ev| ev["args"]["content"] == expected.as_str()).is_some()
        })
        .await;
    assert_dense(&events);
    assert_eq!(app.info(&id).await["status"], "RUNNING");
    app.shutdown().await;
    wait_no_agents(&id, 5).await;
}

// ---- agents that fail -------------------------------------------------------------------

const CRASHES_AFTER_FIRST_MESSAGE: &str = r#"
import json, sys
sys.stdin.readline()
print(json.dumps({"type": "ready"}), flush=True)
sys.stdin.readline()
print("Traceback (most recent call last):", file=sys.stderr)
print("RuntimeError: the model backend is unreachable", file=sys.stderr, flush=True)
sys.exit(3)
"#;

#[actix_web::test]
async fn an_agent_crash_stops_the_conversation_with_a_readable_error() {
    let dir = tempfile::tempdir().unwrap();
    let command = script(dir.path(), "crash.py", CRASHES_AFTER_FIRST_MESSAGE);
    let app = process_app(command, |_| {}).await;
    let id = app.create(json!({"initial_user_msg": "hello"})).await;
    app.wait_status(&id, "STOPPED", 30).await;
    let events = app.events(&id).await;
    assert_dense(&events);
    let error = error_observation(&events);
    assert!(
        error.contains("exited unexpectedly (exit status: 3)"),
        "{error}"
    );
    assert!(
        error.contains("RuntimeError: the model backend is unreachable"),
        "{error}"
    );
    assert!(error.contains("Traceback"), "{error}");
    let last = events.last().unwrap();
    assert_eq!(last["extras"]["agent_state"], "stopped");
    assert_eq!(last["extras"]["reason"], error.as_str());
    wait_no_agents(&id, 5).await;
    app.shutdown().await;
    assert_no_lasting_zombies().await;
}

#[actix_web::test]
async fn an_agent_that_dies_before_ready_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let command = script(
        dir.path(),
        "no_key.py",
        "import sys\nprint('AGENT_API_KEY is not set', file=sys.stderr)\nsys.exit(1)\n",
    );
    let app = process_app(command, |_| {}).await;
    let id = app.create(json!({})).await;
    app.wait_status(&id, "STOPPED", 30).await;
    let error = error_observation(&app.events(&id).await);
    assert!(error.contains("exit status: 1"), "{error}");
    assert!(error.contains("AGENT_API_KEY is not set"), "{error}");
    wait_no_agents(&id, 5).await;
    app.shutdown().await;
}

#[actix_web::test]
async fn an_agent_that_never_gets_ready_hits_the_start_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let command = script(
        dir.path(),
        "never_ready.py",
        "import sys, time\nsys.stdin.readline()\ntime.sleep(600)\n",
    );
    // A deadline long enough that a busy machine still starts Python well within it.
    let app = process_app(command, |s| {
        s.limits.start_timeout_secs = 3;
        s.runtime.process.stop_grace_secs = 1;
    })
    .await;
    let id = app.create(json!({})).await;
    // The process is up (STARTING) before the deadline.
    let started = Instant::now();
    while agent_pids(&id).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "agent never started"
        );
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.info(&id).await["status"], "STARTING");
    app.wait_status(&id, "STOPPED", 10).await;
    let events = app.events(&id).await;
    assert!(error_observation(&events).contains("deadline"));
    assert_eq!(agent_states(&events).last().unwrap(), "stopped");
    // `stop` is ignored (the agent sleeps), SIGTERM after 1 s ends it.
    wait_no_agents(&id, 10).await;
    app.shutdown().await;
    assert_no_lasting_zombies().await;
}

/// Ignores `stop`, stdin closing and SIGTERM (noting each SIGTERM in a file), and leaves a
/// child of its own that ignores SIGTERM too.
const STUBBORN: &str = r#"
import json, signal, subprocess, sys, time
marker = sys.argv[1]
def on_term(signum, frame):
    with open(marker, "a") as f:
        f.write("TERM\n")
signal.signal(signal.SIGTERM, on_term)
subprocess.Popen([sys.executable, "-c",
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)"])
sys.stdin.readline()
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    pass
while True:
    time.sleep(0.05)
"#;

#[actix_web::test]
async fn an_agent_that_ignores_stop_and_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("signals");
    let mut command = script(dir.path(), "stubborn.py", STUBBORN);
    command.push(marker.display().to_string());
    let app = process_app(command, |s| s.runtime.process.stop_grace_secs = 2).await;
    let id = app.create(json!({})).await;
    app.wait_status(&id, "RUNNING", 30).await;
    // The agent and its own child.
    let started = Instant::now();
    while agent_pids(&id).len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "child not started"
        );
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }

    let stopped_at = Instant::now();
    stop(&app, &id).await;
    assert_eq!(app.info(&id).await["status"], "STOPPED");
    // Within the first grace period: `stop` and EOF ignored, no signal yet.
    actix_web::rt::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(agent_pids(&id).len(), 2);
    assert!(!marker.exists(), "SIGTERM came before the grace period");
    // After it: SIGTERM reached both (the whole group), and both ignored it.
    while !marker.exists() {
        assert!(stopped_at.elapsed() < Duration::from_secs(4), "no SIGTERM");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stopped_at.elapsed() >= Duration::from_millis(1900));
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(agent_pids(&id).len(), 2, "SIGTERM should have been ignored");
    // After the second grace period: SIGKILL to the group.
    wait_no_agents(&id, 10).await;
    let took = stopped_at.elapsed();
    assert!(
        took >= Duration::from_millis(3900),
        "killed too early: {took:?}"
    );
    assert!(took < Duration::from_secs(8), "killed too late: {took:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "TERM\n");
    app.shutdown().await;
    assert_no_lasting_zombies().await;
}

#[actix_web::test]
async fn server_shutdown_leaves_no_agent_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = script(dir.path(), "stubborn.py", STUBBORN);
    command.push(dir.path().join("signals").display().to_string());
    // A grace period far longer than the shutdown timeout: shutdown must not leave them running.
    let app = process_app(command, |s| {
        s.runtime.process.stop_grace_secs = 600;
        s.limits.shutdown_timeout_secs = 2;
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.create(json!({})).await);
    }
    for id in &ids {
        app.wait_status(id, "RUNNING", 30).await;
    }
    app.shutdown().await;
    for id in &ids {
        wait_no_agents(id, 10).await;
    }
    assert_no_lasting_zombies().await;
}

const TIDY: &str = r#"
import json, sys, time
marker = sys.argv[1]
sys.stdin.readline()
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    if json.loads(line).get("type") == "stop":
        break
time.sleep(0.5)  # tidying up takes a moment
with open(marker, "w") as f:
    f.write("tidied\n")
"#;

#[actix_web::test]
async fn server_shutdown_lets_agents_finish_their_stop() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("tidied");
    let mut command = script(dir.path(), "tidy.py", TIDY);
    command.push(marker.display().to_string());
    let app = process_app(command, |s| s.runtime.process.stop_grace_secs = 10).await;
    let id = app.create(json!({})).await;
    app.wait_status(&id, "RUNNING", 30).await;
    let store = app.shutdown().await;
    // Shutdown returned only after the agent had finished its own stop.
    assert_eq!(
        std::fs::read_to_string(&marker).ok().as_deref(),
        Some("tidied\n"),
        "the agent was cut short"
    );
    wait_no_agents(&id, 5).await;
    let events = store
        .events(&cid(&id), switchboard::store::EventQuery::after(None, 1000))
        .await
        .unwrap();
    let last: Value = serde_json::from_str(&events.last().unwrap().json).unwrap();
    assert_eq!(last["extras"]["agent_state"], "stopped");
    assert_no_lasting_zombies().await;
}

// ---- agents that talk nonsense ----------------------------------------------------------

const GARBAGE: &str = r#"
import json, sys
sys.stdin.readline()
out = sys.stdout
out.write(json.dumps({"type": "ready"}) + "\n")
out.write("this is not json\n")
out.write(json.dumps({"type": "event", "event": {"observation": "run", "content": "x" * 5000}}) + "\n")
out.write("y" * (4 * 1024 * 1024) + "\n")
out.write('{"type": "event", "event": {"source": "user", "action": "message", "args": {"content": "spoof"}}}\n')
out.write('{"type": "launch"}\n')
out.flush()
sys.stdout.buffer.write(b"\xff\xfe\x00 binary\n")
sys.stdout.buffer.flush()
out.write(json.dumps({"type": "event", "event": {"action": "message", "args": {"content": "still alive"}}}) + "\n")
out.flush()
for line in sys.stdin:
    pass
"#;

#[actix_web::test]
async fn garbage_and_oversized_lines_are_reported_and_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let command = script(dir.path(), "garbage.py", GARBAGE);
    let app = process_app(command, |s| s.runtime.process.max_line_bytes = 1024).await;
    let id = app.create(json!({})).await;
    let events = app
        .wait_events(&id, 30, |e| {
            find(e, |ev| ev["args"]["content"] == "still alive").is_some()
        })
        .await;
    let info = app.info(&id).await;
    assert_eq!(info["status"], "RUNNING");
    // An error status reached the conversation (its exact payloads: see the runtime test).
    assert_eq!(info["runtime_status"], "STATUS$ERROR_RUNTIME_DISCONNECTED");
    assert_dense(&events);
    let text = serde_json::to_string(&events).unwrap();
    assert!(!text.contains("xxxxxxxx"), "an oversized event was stored");
    assert!(!text.contains("yyyyyyyy"));
    assert!(
        !text.contains("spoof"),
        "an agent cannot speak for the user"
    );
    assert!(!text.contains("binary"));
    assert_eq!(app.get("/alive").await.status, 200);
    stop(&app, &id).await;
    wait_no_agents(&id, 5).await;
    app.shutdown().await;
}

// ---- protocol additions: lossless events, refs and acks, user events, agent state -------

/// Speaks every protocol addition and reports what it got back in a final agent message.
/// Writes each `init` line it gets to `init-<n>.json` in its working directory.
const PROTOCOL_AGENT: &str = r#"
import json, os, sys
def send(m):
    sys.stdout.write(json.dumps(m) + "\n")
    sys.stdout.flush()
def read():
    return json.loads(sys.stdin.readline())
init = read()
n = len([f for f in os.listdir(".") if f.startswith("init-")])
with open(f"init-{n}.json", "w") as f:
    json.dump(init, f)
if n == 0:
    # An event before `ready`, named by a ref and full of fields switchboard does not know.
    send({"type": "event", "ref": "sys", "event": {
        "source": "agent", "message": "the system prompt", "action": "system",
        "args": {"content": "be helpful", "tools": [{"type": "function", "name": "run"}]},
        "tool_call_metadata": {"function_name": "f", "tool_call_id": "call_1",
            "model_response": {"id": "r1", "choices": [{"x": [1, 2.5, None, True, "é"]}]},
            "total_calls_in_response": 1},
        "llm_metrics": {"accumulated_cost": 0.25, "token_usages": [{"prompt_tokens": 7}]},
        "zeta": 1, "alpha": {"b": 2, "a": 1}}})
    first_ack = read()
else:
    first_ack = None
send({"type": "ready", "manages_agent_state": True})
send({"type": "event", "event": {"source": "environment", "observation": "agent_state_changed",
      "content": "", "extras": {"agent_state": "awaiting_user_input", "reason": ""}}})
acks, seen = [first_ack] if first_ack else [], []
for line in sys.stdin:
    msg = json.loads(line)
    if msg["type"] == "stop":
        break
    if msg["type"] == "event":
        seen.append(msg["event"])
        user = msg["event"]
        send({"type": "event", "ref": 7, "event": {"source": "user", "action": "recall",
              "args": {"query": user["args"]["content"]}}})
        send({"type": "event", "event": {"source": "user", "action": "message",
              "args": {"content": "spoof"}}})
        send({"type": "event", "event": {"observation": "run", "cause": {"ref": "nope"},
              "content": "lost", "extras": {}}})
        send({"type": "event", "ref": "obs", "event": {"source": "environment",
              "observation": "recall", "cause": {"ref": 7}, "content": "", "extras": {},
              "success": True}})
    elif msg["type"] == "ack":
        acks.append(msg)
        if msg["ref"] == "obs":
            send({"type": "event", "event": {"action": "message", "args": {"content": "report"},
                  "acks": acks, "seen": seen}})
"#;

#[actix_web::test]
async fn agent_events_are_lossless_and_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let command = script(dir.path(), "protocol.py", PROTOCOL_AGENT);
    let app = process_app(command, |_| {}).await;
    let id = app.create(json!({})).await;
    app.wait_status(&id, "RUNNING", 30).await;
    let workspace = app._data_dir.path().join("workspaces").join(&id);
    post_message(&app, &id, "what did we do?").await;
    let events = app
        .wait_events(&id, 30, |e| {
            find(e, |ev| ev["args"]["content"] == "report").is_some()
        })
        .await;
    assert_dense(&events);

    // Every field of the system action is stored unchanged, in the agent's key order.
    let system = find(&events, |e| e["action"] == "system").expect("the system action");
    let keys: Vec<&str> = system
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "id",
            "timestamp",
            "source",
            "message",
            "action",
            "args",
            "tool_call_metadata",
            "llm_metrics",
            "zeta",
            "alpha"
        ]
    );
    assert_eq!(
        system["tool_call_metadata"],
        json!({"function_name": "f", "tool_call_id": "call_1",
               "model_response": {"id": "r1", "choices": [{"x": [1, 2.5, null, true, "é"]}]},
               "total_calls_in_response": 1})
    );
    assert_eq!(
        system["llm_metrics"],
        json!({"accumulated_cost": 0.25, "token_usages": [{"prompt_tokens": 7}]})
    );
    let alpha: Vec<&String> = system["alpha"].as_object().unwrap().keys().collect();
    assert_eq!(alpha, ["b", "a"]);
    assert_eq!(system["args"]["tools"][0]["name"], "run");

    // The agent manages its state: one `awaiting_user_input` (its own), none from switchboard.
    assert_eq!(
        agent_states(&events),
        ["loading", "awaiting_user_input"],
        "{events:#?}"
    );

    // A user event from the agent (not a message) is stored, and not handed back to it.
    let recall = find(&events, |e| e["action"] == "recall").expect("the recall action");
    assert_eq!(recall["source"], "user");
    let report = find(&events, |e| e["args"]["content"] == "report").unwrap();
    let seen = report["seen"].as_array().unwrap();
    assert_eq!(
        seen.len(),
        1,
        "the agent got its own events back: {seen:#?}"
    );
    assert_eq!(seen[0]["args"]["content"], "what did we do?");
    // Its cause, named by ref, became the recall's id; `success` is kept.
    let observation = find(&events, |e| e["observation"] == "recall").unwrap();
    assert_eq!(observation["cause"], recall["id"]);
    assert_eq!(observation["success"], true);
    // A user message from the agent and a cause naming an unknown ref are refused.
    let text = serde_json::to_string(&events).unwrap();
    assert!(
        !text.contains("spoof"),
        "an agent cannot speak for the user"
    );
    assert!(!text.contains("lost"), "an unknown cause ref was stored");
    assert_eq!(
        app.info(&id).await["runtime_status"],
        "STATUS$ERROR_RUNTIME_DISCONNECTED"
    );

    // Each ref was acknowledged with the id and timestamp it was stored under.
    let acks = report["acks"].as_array().unwrap();
    let refs: Vec<&Value> = acks.iter().map(|a| &a["ref"]).collect();
    assert_eq!(refs, [&json!("sys"), &json!(7), &json!("obs")]);
    for (ack, event) in acks.iter().zip([system, recall, observation]) {
        assert_eq!(ack["type"], "ack");
        assert_eq!(ack["id"], event["id"]);
        assert_eq!(ack["timestamp"], event["timestamp"]);
    }

    // `init` carried the working directory.
    let init: Value =
        serde_json::from_str(&std::fs::read_to_string(workspace.join("init-0.json")).unwrap())
            .unwrap();
    assert_eq!(
        std::fs::canonicalize(init["working_dir"].as_str().unwrap()).unwrap(),
        std::fs::canonicalize(&workspace).unwrap()
    );

    // Started again, the agent gets its history back byte for byte.
    stop(&app, &id).await;
    wait_no_agents(&id, 10).await;
    let stored = app.events(&id).await;
    let r = app
        .post(&format!("/api/conversations/{id}/start"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    app.wait_status(&id, "RUNNING", 30).await;
    let init: Value =
        serde_json::from_str(&std::fs::read_to_string(workspace.join("init-1.json")).unwrap())
            .unwrap();
    assert_eq!(init["history"], Value::Array(stored));
    app.shutdown().await;
    wait_no_agents(&id, 5).await;
}

/// Floods stdout when its initial message says so; otherwise echoes messages.
const FLOOD_OR_ECHO: &str = r#"
import json, sys
init = json.loads(sys.stdin.readline())
print(json.dumps({"type": "ready"}), flush=True)
if init["init"]["initial_user_msg"] == "flood":
    line = json.dumps({"type": "event", "event": {"observation": "run", "content": "z" * 200}}) + "\n"
    while True:
        sys.stdout.write(line)
for line in sys.stdin:
    event = json.loads(line).get("event", {})
    if event.get("action") == "message" and event["args"]["content"] != "flood":
        print(json.dumps({"type": "event", "event": {"action": "message",
              "args": {"content": "echo: " + event["args"]["content"]}}}), flush=True)
"#;

#[actix_web::test]
async fn a_flooding_agent_does_not_stall_its_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    let command = script(dir.path(), "flood.py", FLOOD_OR_ECHO);
    let app = process_app(command, |s| {
        // Both conversations on one thread.
        s.conversation_threads = 1;
        s.limits.max_events_per_conversation = 20_000;
        s.runtime.process.stop_grace_secs = 1;
    })
    .await;
    let flood = app.create(json!({"initial_user_msg": "flood"})).await;
    app.wait_status(&flood, "RUNNING", 30).await;
    let calm = app.create(json!({})).await;
    app.wait_status(&calm, "RUNNING", 30).await;
    let started = Instant::now();
    for i in 0..5 {
        let text = format!("ping {i}");
        post_message(&app, &calm, &text).await;
        let want = format!("echo: {text}");
        app.wait_events(&calm, 30, |e| {
            find(e, |ev| ev["args"]["content"] == want.as_str()).is_some()
        })
        .await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the calm conversation was held up: {:?}",
        started.elapsed()
    );
    // The flood ends at the conversation's event limit, which stops it.
    app.wait_status(&flood, "STOPPED", 60).await;
    let events = app.events(&flood).await;
    assert!(events.len() as u64 <= 20_000);
    assert_dense(&events);
    wait_no_agents(&flood, 10).await;
    assert_eq!(app.info(&calm).await["status"], "RUNNING");
    app.shutdown().await;
    wait_no_agents(&calm, 5).await;
    assert_no_lasting_zombies().await;
}

// ---- the runtime on its own -------------------------------------------------------------

/// Collects what a runtime reports, as a conversation would receive it.
struct Recorder(Arc<Mutex<Vec<RuntimeSignal>>>);

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<FromRuntime> for Recorder {
    type Result = ();

    fn handle(&mut self, msg: FromRuntime, _ctx: &mut Self::Context) {
        self.0.lock().unwrap().push(msg.0);
    }
}

async fn wait_signals(
    signals: &Mutex<Vec<RuntimeSignal>>,
    check: impl Fn(&[RuntimeSignal]) -> bool,
) -> Vec<RuntimeSignal> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = signals.lock().unwrap().clone();
        if check(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "signals so far: {now:#?}");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}

fn contents(signals: &[RuntimeSignal]) -> Vec<String> {
    signals
        .iter()
        .filter_map(|s| match s {
            RuntimeSignal::Event(body) => Some(body.message.clone()),
            _ => None,
        })
        .collect()
}

/// Echoes its init line, then every line it gets, as agent messages; says a few wrong things.
const ECHO_LINES: &str = r#"
import json, sys
def say(text):
    print(json.dumps({"type": "event", "event": {"action": "message", "message": text,
                                                 "args": {"content": text}}}), flush=True)
say(sys.stdin.readline().strip())
print(json.dumps({"type": "ready"}), flush=True)
print(json.dumps({"type": "status", "status_type": "info", "id": "STATUS$AGENT_WARMING_UP",
                  "message": "loading the model"}), flush=True)
print("not json", flush=True)
print(json.dumps({"type": "status", "status_type": "fatal", "id": "X"}), flush=True)
for line in sys.stdin:
    say(line.strip())
"#;

#[actix_web::test]
async fn the_runtime_speaks_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::defaults();
    settings.data_dir = dir.path().join("data");
    settings.runtime.kind = RuntimeKind::Process;
    settings.runtime.process.command = script(dir.path(), "echo_lines.py", ECHO_LINES);
    let settings = Arc::new(settings);

    // A conversation with two durable events: the history the agent resumes from.
    let store = Arc::new(MemoryStore::new());
    // Unique on the machine: other test runs look for their agents by conversation id too.
    let id = format!("resumed-{}", std::process::id());
    let id = id.as_str();
    let init = InitData {
        repository: Some("octo/hello".into()),
        conversation_instructions: Some("be brief".into()),
        initial_user_msg: Some("hi".into()),
        ..Default::default()
    };
    store
        .create(ConversationMeta {
            conversation_id: cid(id),
            title: "t".into(),
            created_at: "c".into(),
            last_updated_at: "u".into(),
            trigger: switchboard::conversation::Trigger::Gui,
            owner: None,
            init: init.clone(),
        })
        .await
        .unwrap();
    let history = vec![
        EventBody::agent_state("loading", "").stamp(0, "2026-01-01T00:00:00.000000"),
        EventBody::message(Source::User, "hi", json!([]), false)
            .stamp(1, "2026-01-01T00:00:01.000000"),
        EventBody::agent_state("stopped", "").stamp(2, "2026-01-01T00:00:02.000000"),
    ];
    store.append(&cid(id), history.clone()).await.unwrap();

    let signals = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder(signals.clone()).start();
    let mut runtime = ProcessRuntime::new(settings.clone());
    let store_dyn: Arc<dyn Store> = store.clone();
    let immediate = runtime.start(RuntimeStart {
        conversation_id: &cid(id),
        trigger: "gui",
        init: &init,
        sink: RuntimeSink::new(recorder.recipient()),
        store: store_dyn,
        history_before: 2,
        settings: None,
    });
    assert!(immediate.is_empty());
    assert!(dir.path().join("data/workspaces").join(id).is_dir());

    let got = wait_signals(&signals, |s| {
        s.iter()
            .filter(|x| matches!(x, RuntimeSignal::Status(_)))
            .count()
            >= 3
    })
    .await;
    // The init line: protocol, id, init data with the trigger, and the durable history only.
    let init_line: Value = serde_json::from_str(&contents(&got)[0]).unwrap();
    assert_eq!(init_line["type"], "init");
    assert_eq!(init_line["protocol"], 1);
    assert_eq!(init_line["conversation_id"], id);
    assert_eq!(init_line["init"]["repository"], "octo/hello");
    assert_eq!(init_line["init"]["conversation_instructions"], "be brief");
    assert_eq!(init_line["init"]["initial_user_msg"], "hi");
    assert_eq!(init_line["init"]["trigger"], "gui");
    let expected: Vec<Value> = history[..2]
        .iter()
        .map(|e| serde_json::from_str(&e.json).unwrap())
        .collect();
    assert_eq!(init_line["history"], Value::Array(expected));
    assert_eq!(got[1], RuntimeSignal::READY);
    // Statuses: the agent's own, then one error per invalid line.
    let statuses: Vec<_> = got
        .iter()
        .filter_map(|s| match s {
            RuntimeSignal::Status(u) => Some(u.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(statuses[0].kind, "info");
    assert_eq!(statuses[0].id.as_deref(), Some("STATUS$AGENT_WARMING_UP"));
    assert_eq!(statuses[0].message, "loading the model");
    assert_eq!(
        &*statuses[0].to_json(),
        r#"{"status_update":true,"type":"info","id":"STATUS$AGENT_WARMING_UP","message":"loading the model"}"#
    );
    for error in &statuses[1..] {
        assert_eq!(error.kind, "error");
        assert_eq!(error.id.as_deref(), Some("STATUS$ERROR_AGENT_PROTOCOL"));
    }
    assert!(statuses[1].message.contains("not JSON"), "{statuses:?}");
    assert!(statuses[2].message.contains("status_type"), "{statuses:?}");

    // A user event reaches the agent with its id; `stop` follows, then the agent exits.
    let body = EventBody::message(Source::User, "ls -l", json!([]), false);
    assert!(runtime.on_user_event(7, &body).is_empty());
    wait_signals(&signals, |s| contents(s).len() >= 2).await;
    runtime.stop();
    let got = wait_signals(&signals, |s| contents(s).len() >= 3).await;
    let lines = contents(&got);
    let event_line: Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(
        event_line,
        json!({"type": "event", "event": {"id": 7, "source": "user", "message": "ls -l",
               "action": "message", "args": {"content": "ls -l", "file_urls": [],
               "image_urls": [], "wait_for_response": false}}})
    );
    assert_eq!(lines[2], r#"{"type":"stop"}"#);
    wait_no_agents(id, 10).await;
    // A requested stop is not a failure.
    actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    assert!(!signals
        .lock()
        .unwrap()
        .iter()
        .any(|s| matches!(s, RuntimeSignal::Failed(_))));
    drop(runtime);
    assert_no_lasting_zombies().await;
}

#[actix_web::test]
async fn dropping_a_running_runtime_stops_its_agent() {
    let id = format!("dropped-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::defaults();
    settings.data_dir = dir.path().join("data");
    settings.runtime.kind = RuntimeKind::Process;
    settings.runtime.process.command = vec![python(), SHELL_AGENT.into()];
    let signals = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder(signals.clone()).start();
    let mut runtime = ProcessRuntime::new(Arc::new(settings));
    let init = InitData::default();
    let immediate = runtime.start(RuntimeStart {
        conversation_id: &cid(&id),
        trigger: "gui",
        init: &init,
        sink: RuntimeSink::new(recorder.recipient()),
        store: Arc::new(MemoryStore::new()),
        history_before: 0,
        settings: None,
    });
    assert!(immediate.is_empty());
    wait_signals(&signals, |s| s.contains(&RuntimeSignal::READY)).await;
    assert_eq!(agent_pids(&id).len(), 1);
    drop(runtime);
    wait_no_agents(&id, 10).await;
}

#[actix_web::test]
async fn an_agent_that_cannot_be_started_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-agent").display().to_string();
    let mut settings = Settings::defaults();
    settings.data_dir = dir.path().join("data");
    settings.runtime.kind = RuntimeKind::Process;
    settings.runtime.process.command = vec![missing.clone()];
    let recorder = Recorder(Arc::new(Mutex::new(Vec::new()))).start();
    let mut runtime = ProcessRuntime::new(Arc::new(settings));
    let init = InitData::default();
    let immediate = runtime.start(RuntimeStart {
        conversation_id: &cid("missing-1"),
        trigger: "gui",
        init: &init,
        sink: RuntimeSink::new(recorder.recipient()),
        store: Arc::new(MemoryStore::new()),
        history_before: 0,
        settings: None,
    });
    let [RuntimeSignal::Failed(why)] = &immediate[..] else {
        panic!("expected a failure, got {immediate:?}")
    };
    assert!(why.contains("cannot start the agent"), "{why}");
    assert!(why.contains(&missing), "{why}");
    // The system's own error is kept as the cause.
    let cause = std::error::Error::source(why).and_then(|e| e.downcast_ref::<std::io::Error>());
    assert_eq!(
        cause.map(std::io::Error::kind),
        Some(std::io::ErrorKind::NotFound),
        "{why:?}"
    );
    runtime.stop();
}

/// Reads its init, says ready, then never answers: every user message leaves a turn open.
const THINKER: &str = r#"
import json, sys
sys.stdin.readline()
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    pass
"#;

#[actix_web::test]
async fn eviction_spares_a_conversation_in_the_middle_of_a_turn() {
    let dir = tempfile::tempdir().unwrap();
    let command = script(dir.path(), "thinker.py", THINKER);
    let app = process_app(command, |s| {
        s.limits.max_running_conversations = 2;
        s.limits.on_limit = switchboard::config::OnLimit::EvictOldest;
    })
    .await;
    let busy = app
        .create(json!({"initial_user_msg": "think about it"}))
        .await;
    app.wait_status(&busy, "RUNNING", 20).await;
    let idle = app.create(json!({})).await;
    app.wait_events(&idle, 20, |e| {
        agent_states(e).last().map(String::as_str) == Some("awaiting_user_input")
    })
    .await;
    // No client is attached to either and `busy` is the older one, but its turn is under way.
    let next = app.create(json!({"initial_user_msg": "and this"})).await;
    app.wait_status(&idle, "STOPPED", 10).await;
    assert_eq!(app.info(&busy).await["status"], "RUNNING");
    app.wait_status(&next, "RUNNING", 20).await;
    // Both running conversations are mid-turn: nothing may be evicted, the new one is refused.
    let r = app.post("/api/conversations", json!({})).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(app.listed().await, 3);
    for id in [&busy, &next] {
        assert_eq!(app.info(id).await["status"], "RUNNING");
        let events = app.events(id).await;
        assert!(!agent_states(&events).contains(&"stopped".to_string()));
    }
    app.shutdown().await;
    for id in [&busy, &idle, &next] {
        wait_no_agents(id, 10).await;
    }
    assert_no_lasting_zombies().await;
}

// ---- the user's saved settings ----------------------------------------------------------

/// Says what its `init` line's `settings` held, as an agent message.
const REPORTS_SETTINGS: &str = r#"
import json, sys
init = json.loads(sys.stdin.readline())
print(json.dumps({"type": "ready"}), flush=True)
content = json.dumps(init.get("settings", "absent"), sort_keys=True)
print(json.dumps({"type": "event", "event": {"source": "agent", "action": "message",
      "args": {"content": "settings=" + content}}}), flush=True)
sys.stdin.read()
"#;

#[actix_web::test]
async fn the_saved_settings_reach_the_agent_init() {
    let dir = tempfile::tempdir().expect("tempdir");
    let command = script(dir.path(), "settings_agent.py", REPORTS_SETTINGS);
    let app = process_app(command, |_| {}).await;
    let said = |events: &[Value]| -> Option<Value> {
        events.iter().find_map(|e| {
            let text = e["args"]["content"].as_str()?.strip_prefix("settings=")?;
            serde_json::from_str(text).ok()
        })
    };
    // Nothing saved yet: `settings` is null.
    let id = app.create(json!({})).await;
    let events = app.wait_events(&id, 30, |e| said(e).is_some()).await;
    assert_eq!(said(&events), Some(Value::Null));

    let r = app
        .post(
            "/api/settings",
            json!({"llm_model": "openai/gpt-4o", "llm_api_key": "sk-test",
                   "llm_base_url": "http://llm.local", "agent": "CodeActAgent",
                   "language": "de", "confirmation_mode": true, "max_iterations": "7",
                   "mcp_config": {"sse_servers": [{"url": "https://mcp.example.com"}]}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = app.create(json!({})).await;
    let events = app.wait_events(&id, 30, |e| said(e).is_some()).await;
    let settings = said(&events).expect("reported");
    assert_eq!(settings["llm_model"], "openai/gpt-4o");
    assert_eq!(settings["llm_api_key"], "sk-test", "the agent gets the key");
    assert_eq!(settings["llm_base_url"], "http://llm.local");
    assert_eq!(settings["agent"], "CodeActAgent");
    assert_eq!(settings["language"], "de");
    assert_eq!(settings["confirmation_mode"], true);
    assert_eq!(settings["max_iterations"], 7);
    assert_eq!(
        settings["mcp_config"]["sse_servers"][0]["url"],
        "https://mcp.example.com"
    );
    app.shutdown().await;
}

#[actix_web::test]
async fn delete_answers_once_the_agent_is_gone_and_the_data_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let command = script(dir.path(), "thinker.py", THINKER);
    let app = process_app(command, |_| {}).await;
    let id = app.create(json!({"initial_user_msg": "think"})).await;
    app.wait_status(&id, "RUNNING", 20).await;
    assert_eq!(agent_pids(&id).len(), 1);
    let r = app
        .send("DELETE", &format!("/api/conversations/{id}"), None)
        .await;
    assert_eq!((r.status, r.body), (200, json!(true)));
    // Answered after the agent ended and the rows went: nothing of it is left to find.
    assert!(agent_pids(&id).is_empty(), "{:?}", agent_pids(&id));
    assert_eq!(app.info(&id).await, Value::Null);
    assert_eq!(
        app.get(&format!("/api/conversations/{id}/events"))
            .await
            .status,
        404
    );
    app.shutdown().await;
    assert_no_lasting_zombies().await;
}

// ---- the OpenHands agent ----------------------------------------------------------------

/// The OpenHands environment `agents/openhands/install.sh` created, or `None` (the test is
/// skipped) when it is missing; `.ci/run` installs it and sets
/// `SWITCHBOARD_REQUIRE_AGENT_TESTS=1`, which turns a missing environment into a failure.
fn openhands_venv() -> Option<String> {
    let venv = std::env::var("SWITCHBOARD_OPENHANDS_VENV")
        .ok()
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(switchboard::runtime::openhands::default_venv)?;
    if venv.join("bin/python").is_file() {
        return Some(venv.display().to_string());
    }
    let required = std::env::var("SWITCHBOARD_REQUIRE_AGENT_TESTS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "the OpenHands environment is required but not installed at {}",
        venv.display()
    );
    eprintln!(
        "SKIPPED: the OpenHands environment is not installed at {} (agents/openhands/install.sh)",
        venv.display()
    );
    None
}

/// `agents/openhands/mock_llm.py` on a free port of 127.0.0.1; killed when dropped.
struct MockLlm {
    child: std::process::Child,
    url: String,
}

impl MockLlm {
    fn start() -> MockLlm {
        use std::io::BufRead;
        let mut child = std::process::Command::new(python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/agents/openhands/mock_llm.py"
            ))
            .args(["--port", "0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("mock LLM starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("mock LLM says where it listens");
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        MockLlm {
            child,
            url: format!("http://{addr}"),
        }
    }

    /// Every request the mock got: `{"authorization", "path", "body"}`.
    async fn requests(&self) -> Vec<Value> {
        let mut resp = awc::Client::default()
            .get(format!("{}/requests", self.url))
            .send()
            .await
            .expect("mock LLM answers");
        resp.json::<Vec<Value>>()
            .limit(64 * 1024 * 1024)
            .await
            .expect("requests")
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count_state(events: &[Value], state: &str) -> usize {
    agent_states(events).iter().filter(|s| *s == state).count()
}

/// The live processes of a conversation whose command line contains `text`.
fn processes_running(conversation_id: &str, text: &str) -> usize {
    agent_pids(conversation_id)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(text)
            })
        })
        .count()
}

#[actix_web::test]
async fn openhands_agent_runs_stops_and_resumes() {
    openhands_round(SandboxKind::None).await;
}

#[actix_web::test]
async fn openhands_agent_runs_stops_and_resumes_in_the_sandbox() {
    if sandbox::bwrap_works() {
        openhands_round(SandboxKind::Bwrap).await;
    }
}

/// Saves the mock LLM at `base_url` with `key` as the user's model (the web app's settings),
/// then runs a conversation with "run echo hi" until its agent finished: its id and events.
async fn echo_hi_with_saved_settings(
    app: &TestApp,
    base_url: &str,
    key: &str,
) -> (String, Vec<Value>) {
    let r = app
        .post(
            "/api/settings",
            json!({"llm_model": "openai/mock", "llm_base_url": base_url, "llm_api_key": key}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = app.create(json!({"initial_user_msg": "run echo hi"})).await;
    app.wait_status(&id, "RUNNING", 180).await;
    let events = app
        .wait_events(&id, 120, |e| count_state(e, "finished") == 1)
        .await;
    assert_dense(&events);
    (id, events)
}

/// An OpenHands conversation run, stopped and resumed, its agent confined as `sandbox` says.
async fn openhands_round(sandbox: SandboxKind) {
    let Some(venv) = openhands_venv() else {
        return;
    };
    let llm = MockLlm::start();
    let base_url = format!("{}/v1", llm.url);
    let app = spawn_app_with(|s| {
        s.runtime.kind = RuntimeKind::Openhands;
        s.runtime.process.sandbox = sandbox;
        s.runtime.openhands.venv = venv;
        s.runtime.process.stop_grace_secs = 10;
        s.limits.start_timeout_secs = 180;
        let env = &mut s.runtime.process.env;
        // Settings the web app does not have; saved settings win over the rest.
        env.insert("LLM_NATIVE_TOOL_CALLING".into(), "true".into());
        env.insert("LLM_MODEL".into(), "openai/not-this-one".into());
    })
    .await;
    let (id, events) = echo_hi_with_saved_settings(&app, &base_url, "sk-switchboard-test").await;
    // One announcement of each state: switchboard adds none of its own to the agent's.
    assert_eq!(
        agent_states(&events),
        ["loading", "running", "finished"],
        "{events:#?}"
    );
    let recall = find(&events, |e| e["action"] == "recall").expect("the recall action");
    assert_eq!(recall["source"], "user");
    let system = find(&events, |e| e["action"] == "system").expect("the system prompt");
    assert_eq!(system["args"]["agent_class"], "CodeActAgent");
    let run = find(&events, |e| e["action"] == "run").expect("the run action");
    assert_eq!(run["args"]["command"], "echo hi");
    assert_eq!(run["tool_call_metadata"]["function_name"], "execute_bash");
    let call_id = run["tool_call_metadata"]["tool_call_id"].clone();
    assert!(call_id.is_string(), "{run:#}");
    assert!(run["llm_metrics"]["accumulated_token_usage"]["prompt_tokens"].as_u64() > Some(0));
    let output = find(&events, |e| e["observation"] == "run").expect("the run observation");
    assert_eq!(output["cause"], run["id"]);
    assert_eq!(output["content"].as_str().map(str::trim), Some("hi"));
    assert_eq!(output["tool_call_metadata"]["tool_call_id"], call_id);
    assert_eq!(output["success"], true);
    let finish = find(&events, |e| e["action"] == "finish").expect("the finish action");
    assert_eq!(finish["tool_call_metadata"]["function_name"], "finish");
    assert!(finish["llm_metrics"].is_object());
    // The saved model, base URL and key are what the agent used.
    let requests = llm.requests().await;
    assert_eq!(
        requests.len(),
        2,
        "one call for the command, one for finish"
    );
    for r in &requests {
        assert_eq!(r["authorization"], "Bearer sk-switchboard-test");
        assert_eq!(r["path"], "/v1/chat/completions");
        assert_eq!(r["body"]["model"], "mock");
    }

    // A second turn, which leaves a process behind on purpose, then one that is still running.
    post_message(&app, &id, "run nohup sleep 123 >/dev/null 2>&1 &").await;
    app.wait_events(&id, 120, |e| count_state(e, "finished") == 2)
        .await;
    post_message(&app, &id, "run sleep 300").await;
    let started = Instant::now();
    while processes_running(&id, "sleep 300") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "sleep 300 never ran"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(processes_running(&id, "sleep 123"), 1);
    // OpenHands' state is the conversation's own, outside its working directory.
    let state = app._data_dir.path().join("openhands/state").join(&id);
    assert!(state.join("home/.openhands/microagents").is_dir());

    // Stop: the agent, the running command and the one it left in the background are gone.
    stop(&app, &id).await;
    wait_no_agents(&id, 30).await;

    // Started again, the agent resumes from the history: the model sees the earlier call.
    let before = llm.requests().await.len();
    let r = app
        .post(&format!("/api/conversations/{id}/start"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    app.wait_status(&id, "RUNNING", 180).await;
    post_message(&app, &id, "run echo again").await;
    let events = app
        .wait_events(&id, 120, |e| count_state(e, "finished") == 3)
        .await;
    assert_dense(&events);
    let requests = llm.requests().await;
    let resumed = &requests[before]["body"]["messages"];
    let text = serde_json::to_string(resumed).unwrap();
    assert!(text.contains(call_id.as_str().unwrap()), "{text}");
    assert!(
        resumed
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["role"] == "tool" && m["tool_call_id"] == call_id),
        "the earlier result is missing: {resumed:#}"
    );
    let again = events
        .iter()
        .rev()
        .find(|e| e["observation"] == "run")
        .unwrap();
    assert_eq!(again["content"].as_str().map(str::trim), Some("again"));
    assert!(find(&events, |e| e["observation"] == "error").is_none());
    // No command ran twice: one output of `echo hi`, as before.
    let his = events
        .iter()
        .filter(|e| e["observation"] == "run" && e["extras"]["command"] == "echo hi")
        .count();
    assert_eq!(his, 1);
    app.shutdown().await;
    wait_no_agents(&id, 30).await;
    assert_no_lasting_zombies().await;
}

// ---- the bwrap sandbox ------------------------------------------------------------------

#[actix_web::test]
async fn a_sandboxed_agent_writes_only_its_working_directory_and_its_own_tmp_offline() {
    if !sandbox::bwrap_works() {
        return;
    }
    // Outside the working directory: a directory of the test's own in /var/tmp (never under
    // /tmp, whose sandboxed view is the agent's private one — the checkout, and so the target
    // directory, may well be under /tmp) and the host's /tmp.
    let outside = tempfile::tempdir_in("/var/tmp").expect("temp dir in /var/tmp");
    let mark = uuid::Uuid::new_v4().simple().to_string();
    let host_tmp = Path::new("/tmp").join(format!("switchboard-sandbox-{mark}"));
    let app = process_app(vec![python(), SHELL_AGENT.into()], |s| {
        s.runtime.process.sandbox = SandboxKind::Bwrap;
        s.runtime.process.sandbox_network = false;
    })
    .await;
    let id = app
        .create(json!({"initial_user_msg": "echo started"}))
        .await;
    app.wait_status(&id, "RUNNING", 30).await;
    let outside_file = outside.path().join("escaped.txt");
    let command = format!(
        "echo in > inside.txt && echo inside=ok; \
         echo out > {} && echo outside=written || echo outside=refused; \
         echo secret > {} && echo tmp=$(cat {}); \
         echo nets=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,)",
        outside_file.display(),
        host_tmp.display(),
        host_tmp.display()
    );
    post_message(&app, &id, &command).await;
    let events = app
        .wait_events(&id, 30, |e| run_output_containing(e, "inside=").is_some())
        .await;
    let output = run_output_containing(&events, "inside=").unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(output.contains("inside=ok"), "{output}");
    assert!(
        output.contains("outside=refused") && output.contains("Read-only file system"),
        "{output}"
    );
    assert!(output.contains("tmp=secret"), "{output}");
    // No network: its own loopback only.
    assert!(output.contains("nets=lo,\n"), "{output}");
    let workspace = app._data_dir.path().join("workspaces").join(&id);
    assert_eq!(
        std::fs::read_to_string(workspace.join("inside.txt")).unwrap(),
        "in\n"
    );
    assert!(
        !outside_file.exists(),
        "the agent wrote outside its workspace"
    );
    assert!(!host_tmp.exists(), "the agent's /tmp is the host's");

    stop(&app, &id).await;
    wait_no_agents(&id, 15).await;
    app.shutdown().await;
    assert_no_lasting_zombies().await;
}
