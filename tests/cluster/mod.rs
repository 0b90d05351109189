//! Cluster nodes on PostgreSQL as real processes: `switchboard serve` on 127.0.0.1:0, each with
//! its own `SWITCHBOARD_NODE_ID`, sharing one fresh database (see `tests/pg`), with fast
//! heartbeats (100 ms, a 1 s TTL) so that expiry and fencing happen within a test. Without a
//! PostgreSQL server the tests print SKIPPED.

use std::sync::{Arc, Mutex};

use super::*;

mod outages;
mod sockets;

/// Starts cluster node `node_id` on `db` (heartbeat 100 ms, TTL 1 s).
fn start_node(db: &pg::TestDatabase, node_id: &str) -> Server {
    start_node_with_ttl(db, node_id, 1000)
}

/// The cluster key the tests' nodes share (forwarding and splicing need one).
pub(crate) const CLUSTER_KEY: (&str, &str) = ("SWITCHBOARD_CLUSTER_KEY", "a shared secret");

/// Nodes `a` and `b` sharing [`CLUSTER_KEY`], `b` with `b_more` settings too, and a conversation
/// `a` runs that has answered `message`.
fn a_conversation_on_a_with_b_beside(
    db: &pg::TestDatabase,
    b_more: &[(&str, &str)],
    message: &str,
) -> (Server, Server, String) {
    let a = start_node_with(db, "a", 1000, &[CLUSTER_KEY]);
    let mut more = vec![CLUSTER_KEY];
    more.extend_from_slice(b_more);
    let b = start_node_with(db, "b", 1000, &more);
    let id = answered_conversation(db, &a, message);
    (a, b, id)
}

/// Starts cluster node `node_id` on `db` with a heartbeat of 100 ms and a TTL of `ttl_ms`
/// (without a cluster key: commands for another node's conversations are refused with 503).
fn start_node_with_ttl(db: &pg::TestDatabase, node_id: &str, ttl_ms: u64) -> Server {
    start_node_with(db, node_id, ttl_ms, &[])
}

/// [`start_node_with_ttl`] with more settings.
pub(crate) fn start_node_with(
    db: &pg::TestDatabase,
    node_id: &str,
    ttl_ms: u64,
    more: &[(&str, &str)],
) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let ttl = ttl_ms.to_string();
    let mut envs = vec![
        ("SWITCHBOARD_POSTGRES_URL", db.url.as_str()),
        ("SWITCHBOARD_NODE_ID", node_id),
        ("SWITCHBOARD_HEARTBEAT_MS", "100"),
        ("SWITCHBOARD_NODE_TTL_MS", ttl.as_str()),
    ];
    envs.extend_from_slice(more);
    let node = Server::start_with(dir, &data, "postgres", &envs);
    let port = node.port;
    wait_until(Duration::from_secs(15), "the node is ready", || {
        readiness(port).0 == 200
    });
    node
}

/// Sends `signal` (`STOP`, `CONT`, `TERM`) to the node's process.
fn signal(node: &Server, signal: &str) {
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(node.child.0.id().to_string())
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal}");
}

/// Create-or-join of conversation `id` on the node at `port`: its status.
fn join(port: u16, id: &str) -> u16 {
    let body = format!(r#"{{"conversation_id":"{id}"}}"#);
    http(port, "POST", "/api/conversations", Some(&body)).0
}

/// A user message posted to conversation `id` on the node at `port`: its status.
fn post_message(port: u16, id: &str, content: &str) -> u16 {
    let body = format!(r#"{{"action":"message","args":{{"content":"{content}"}}}}"#);
    let path = format!("/api/conversations/{id}/events");
    http(port, "POST", &path, Some(&body)).0
}

/// Checks what one writer per log means in the stored log (see `tests/pg`).
fn assert_one_writer_per_epoch(log: &[(u64, i64, Value)]) {
    pg::assert_one_writer_per_epoch(log.iter().map(|(id, epoch, _)| (*id, *epoch)));
}

/// Polls `check` every 20 ms until it holds; fails naming `what` after `limit`.
fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `/ready`'s status and its `status` word.
fn readiness(port: u16) -> (u16, String) {
    let (status, body) = http(port, "GET", "/ready", None);
    (status, body["status"].as_str().unwrap_or("").to_string())
}

/// A Socket.IO client (WebSocket transport) of conversation `id` on its own thread: every text
/// frame it received, kept in the returned list, until the server closes the connection.
fn socketio(port: u16, id: &str) -> (JoinHandle<()>, Arc<Mutex<Vec<String>>>) {
    let client = sockets::Client::open(port, id, sockets::Route::SocketIo, Some("-1"))
        .unwrap_or_else(|status| panic!("socket connects: {status}"));
    (client.thread, client.frames)
}

/// A new conversation on the node at `port` with a Socket.IO client attached that has seen its
/// agent ready: its id, the client's thread and what it received.
fn watched_conversation(port: u16) -> (String, JoinHandle<()>, Arc<Mutex<Vec<String>>>) {
    let (status, body) = http(port, "POST", "/api/conversations", Some("{}"));
    assert_eq!(status, 200, "{body}");
    let id = body["conversation_id"].as_str().expect("id").to_string();
    let (client, frames) = socketio(port, &id);
    wait_until(
        Duration::from_secs(15),
        "the client sees the conversation",
        || {
            frames
                .lock()
                .expect("lock")
                .iter()
                .any(|f| f.contains("awaiting_user_input"))
        },
    );
    (id, client, frames)
}

/// The server closed the client's connection without Socket.IO's goodbye (`41`), so a
/// Socket.IO client reconnects.
fn assert_closed_without_goodbye(client: JoinHandle<()>, frames: &Mutex<Vec<String>>) {
    client.join().expect("the client's thread");
    let frames = frames.lock().expect("lock").clone();
    assert!(
        !frames.iter().any(|f| f == "41"),
        "the client was told goodbye: {frames:?}"
    );
}

/// A new conversation on `node` with `first` as its initial message, once its agent has
/// answered (as stored).
fn answered_conversation(db: &pg::TestDatabase, node: &Server, first: &str) -> String {
    let body = format!(r#"{{"initial_user_msg": "{first}"}}"#);
    let (status, body) = node.request("POST", "/api/conversations", Some(&body));
    assert_eq!(status, 200, "{body}");
    let id = body["conversation_id"].as_str().expect("id").to_string();
    wait_until(Duration::from_secs(15), "the agent answered", || {
        stored_log(db, &id)
            .iter()
            .any(|(_, _, e)| e["extras"]["agent_state"] == "awaiting_user_input")
    });
    id
}

/// A Socket.IO WebSocket handshake for conversation `id`: 101 when upgraded, else the status.
fn socket_handshake(port: u16, id: &str) -> u16 {
    let path = format!("/socket.io/?conversation_id={id}&EIO=4&transport=websocket");
    socket_handshake_with(port, &path, &[])
}

/// A WebSocket handshake for `path` with extra `headers`: 101 when upgraded, else the status.
fn socket_handshake_with(port: u16, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut request = awc::Client::new().ws(format!("ws://127.0.0.1:{port}{path}"));
    for (name, value) in headers {
        request = request.set_header(*name, *value);
    }
    actix_web::rt::System::new().block_on(async move {
        match request.connect().await {
            Ok((response, _)) => response.status().as_u16(),
            Err(awc::error::WsClientError::InvalidResponseStatus(status)) => status.as_u16(),
            Err(e) => panic!("handshake failed: {e}"),
        }
    })
}

/// Every stored event of conversation `id` as (event id, epoch, event JSON), in id order.
fn stored_log(db: &pg::TestDatabase, id: &str) -> Vec<(u64, i64, Value)> {
    db.query(&format!(
        "SELECT e.id, e.epoch, e.json FROM events e JOIN conversations c ON c.seq = e.conv_seq \
         WHERE c.id = '{id}' ORDER BY e.id"
    ))
    .into_iter()
    .map(|row| {
        let text = |i: usize| row[i].clone().expect("not null");
        (
            text(0).parse().expect("id"),
            text(1).parse().expect("epoch"),
            serde_json::from_str(&text(2)).expect("event JSON"),
        )
    })
    .collect()
}

/// The node whose heartbeats cannot get through (its registration row is locked) fences itself
/// within half the TTL: `/ready` answers 503 `fenced`, its conversation stops without writing
/// anything (no `stopped` event in the log), its Socket.IO client is disconnected without a
/// `41` (so it reconnects), and once the database lets it register again it is ready and the
/// conversation resumes there under a higher epoch.
#[test]
fn a_node_that_cannot_heartbeat_fences_itself_without_writing_and_comes_back() {
    let Some(db) = pg::database() else { return };
    let mut node = start_node(&db, "a");
    let port = node.port;
    let (id, client, frames) = watched_conversation(port);
    let before = stored_log(&db, &id);

    let held = db.hold("SELECT 1 FROM cluster_nodes WHERE node_id = 'a' FOR UPDATE");
    wait_until(Duration::from_secs(15), "/ready says fenced", || {
        readiness(port) == (503, "fenced".to_string())
    });
    assert_closed_without_goodbye(client, &frames);
    node.wait_line(Duration::from_secs(15), |l| {
        l.contains("cluster node fenced itself")
    });
    node.wait_line(Duration::from_secs(15), |l| {
        l.contains("stopping") && l.contains(&id) && l.contains("lost its cluster membership")
    });
    assert_eq!(
        stored_log(&db, &id).len(),
        before.len(),
        "a fenced node writes nothing"
    );

    drop(held);
    wait_until(Duration::from_secs(15), "the node is ready again", || {
        readiness(port).0 == 200
    });
    let (status, body) = http(
        port,
        "POST",
        "/api/conversations",
        Some(&format!(r#"{{"conversation_id":"{id}"}}"#)),
    );
    assert_eq!(status, 200, "{body}");
    wait_until(Duration::from_secs(15), "the conversation resumes", || {
        stored_log(&db, &id).len() > before.len()
    });
    let log = stored_log(&db, &id);
    assert_one_writer_per_epoch(&log);
    let first_epoch = before.last().expect("events before").1;
    let resumed = &log[before.len()];
    assert!(resumed.1 > first_epoch, "resumed under a higher epoch");
    assert_eq!(resumed.2["extras"]["agent_state"], "loading");
}

/// An agent that answers `init` with `ready` and exits when its stdin closes.
const QUIET_AGENT: &str = r#"
import json, sys
if not sys.stdin.readline():
    sys.exit(0)
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    pass
"#;

/// A fenced node keeps no pooled agent: with `runtime.process.warm = 2`, once its heartbeats
/// are blocked and it fenced itself, no process of its agent command is left while it stays
/// fenced; once it has registered again the pool is refilled.
#[test]
fn a_fenced_node_stops_its_pooled_agents_and_refills_once_registered_again() {
    let Some(db) = pg::database() else { return };
    // Not under /tmp: a sandboxed agent sees a private, empty one.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let script = dir.path().join("quiet_agent.py");
    std::fs::write(&script, QUIET_AGENT).expect("write agent");
    let command = format!("python3 {}", script.display());
    let node = start_node_with(
        &db,
        "a",
        1000,
        &[
            ("SWITCHBOARD_RUNTIME", "process"),
            ("SWITCHBOARD_PROCESS_COMMAND", command.as_str()),
            ("SWITCHBOARD_PROCESS_WARM", "2"),
        ],
    );
    let port = node.port;
    let needle = script.display().to_string();
    let agents = || live_with_cmdline(|c| c.windows(needle.len()).any(|w| w == needle.as_bytes()));
    wait_until(Duration::from_secs(15), "two pooled agents wait", || {
        agents().len() == 2
    });

    let held = db.hold("SELECT 1 FROM cluster_nodes WHERE node_id = 'a' FOR UPDATE");
    wait_until(Duration::from_secs(15), "/ready says fenced", || {
        readiness(port) == (503, "fenced".to_string())
    });
    wait_until(Duration::from_secs(15), "no pooled agent is left", || {
        agents().is_empty()
    });
    assert_eq!(
        readiness(port),
        (503, "fenced".to_string()),
        "still fenced with no pooled agent"
    );

    drop(held);
    wait_until(Duration::from_secs(15), "the node is ready again", || {
        readiness(port).0 == 200
    });
    wait_until(Duration::from_secs(15), "the pool is refilled", || {
        agents().len() == 2
    });
}

/// `kill -9` of the node that owns a conversation: another node takes it over once the dead
/// node's registration expired (refused with 503 before), the log continues with dense ids
/// under a higher epoch, and the conversation goes on there. Prints how long the takeover took.
#[test]
fn kill_9_of_the_owner_and_another_node_takes_over_with_dense_ids() {
    let Some(db) = pg::database() else { return };
    let mut a = start_node(&db, "a");
    let b = start_node(&db, "b");
    let id = answered_conversation(&db, &a, "before");
    assert_eq!(
        join(b.port, &id),
        503,
        "a live owner keeps its conversation"
    );
    let before = stored_log(&db, &id);

    a.kill_9();
    let killed = Instant::now();
    let mut refused = 0;
    wait_until(Duration::from_secs(30), "another node takes over", || {
        let status = join(b.port, &id);
        refused += usize::from(status == 503);
        status == 200
    });
    let took = killed.elapsed();
    println!(
        "takeover after kill -9: {took:?} (node_ttl_ms 1000, heartbeat_ms 100; {refused} \
         requests refused before)"
    );
    assert_eq!(post_message(b.port, &id, "after"), 200);
    wait_until(Duration::from_secs(15), "the new owner answers", || {
        stored_log(&db, &id)
            .iter()
            .any(|(_, _, e)| e["args"]["content"] == "after" && e["source"] == "agent")
    });
    let log = stored_log(&db, &id);
    assert_one_writer_per_epoch(&log);
    assert_eq!(&log[..before.len()], &before[..], "nothing stored was lost");
    assert!(log.last().expect("events").1 > before.last().expect("events").1);
}

/// The owner stopped (`SIGSTOP`) past its TTL: another node takes the conversation over and
/// writes to it; when the old owner runs again (`SIGCONT`) it writes nothing more — no event of
/// its epoch follows one of the new owner's — its Socket.IO client is disconnected without a
/// `41`, and it becomes ready again under a new incarnation.
#[test]
fn sigstop_past_the_ttl_then_sigcont_and_the_old_owner_is_fenced() {
    let Some(db) = pg::database() else { return };
    let mut a = start_node(&db, "a");
    let b = start_node(&db, "b");
    let (id, client, frames) = watched_conversation(a.port);

    signal(&a, "STOP");
    wait_until(Duration::from_secs(30), "another node takes over", || {
        join(b.port, &id) == 200
    });
    assert_eq!(post_message(b.port, &id, "on b"), 200);
    wait_until(Duration::from_secs(15), "the new owner answers", || {
        stored_log(&db, &id)
            .iter()
            .any(|(_, _, e)| e["args"]["content"] == "on b" && e["source"] == "agent")
    });
    let taken_over = stored_log(&db, &id);

    signal(&a, "CONT");
    // The old owner's actor still believes it owns the conversation: whatever it tries to
    // write is refused, and it fences itself.
    let _ = post_message(a.port, &id, "on a, stale");
    a.wait_line(Duration::from_secs(15), |l| {
        l.contains("cluster node fenced itself") || l.contains("append fenced")
    });
    assert_closed_without_goodbye(client, &frames);
    wait_until(
        Duration::from_secs(15),
        "the old owner is ready again",
        || readiness(a.port).0 == 200,
    );
    let log = stored_log(&db, &id);
    assert_one_writer_per_epoch(&log);
    assert_eq!(&log[..taken_over.len()], &taken_over[..]);
    assert!(
        !log.iter()
            .any(|(_, _, e)| e["args"]["content"] == "on a, stale"),
        "the stale owner wrote nothing"
    );
}

/// `SIGTERM` hands a node's conversations off at once: with a TTL of a minute, another node
/// can only take them over because the stopping node released them and left the cluster, and
/// it does so on its first try after the process exited. Prints how long that took.
#[test]
fn sigterm_hands_the_conversations_off_at_once() {
    let Some(db) = pg::database() else { return };
    let mut a = start_node_with_ttl(&db, "a", 60_000);
    let b = start_node_with_ttl(&db, "b", 60_000);
    let ids: Vec<String> = (0..3)
        .map(|_| {
            let (status, body) = a.request("POST", "/api/conversations", Some("{}"));
            assert_eq!(status, 200, "{body}");
            body["conversation_id"].as_str().expect("id").to_string()
        })
        .collect();
    assert_eq!(
        join(b.port, &ids[0]),
        503,
        "a live owner keeps its conversation"
    );

    let sent = Instant::now();
    signal(&a, "TERM");
    a.child
        .wait_for_exit(Duration::from_secs(15))
        .expect("the node exits");
    for id in &ids {
        assert_eq!(join(b.port, id), 200, "taken over on the first try");
    }
    println!(
        "hand-off after SIGTERM: {:?} from the signal until another node had taken all {} \
         conversations (node_ttl_ms 60000)",
        sent.elapsed(),
        ids.len()
    );
}

/// With a cluster key, a command sent to any node is handled by the conversation's owner and
/// answered with the owner's answer: a posted message and a create-or-join through B reach the
/// conversation A owns (one epoch: nothing moved), a stop through B stops it on A. A request
/// already forwarded is never forwarded again (421 from a node that does not own it), and a
/// wrong cluster key is refused (403). A socket handshake on B is upgraded (spliced to A).
#[test]
fn commands_sent_to_any_node_are_handled_by_the_owner() {
    let Some(db) = pg::database() else { return };
    let key = [CLUSTER_KEY];
    let a = start_node_with(&db, "a", 1000, &key);
    let b = start_node_with(&db, "b", 1000, &key);
    let id = answered_conversation(&db, &a, "on a");

    assert_eq!(post_message(b.port, &id, "via b"), 200);
    wait_until(Duration::from_secs(15), "the owner answers", || {
        stored_log(&db, &id)
            .iter()
            .any(|(_, _, e)| e["args"]["content"] == "via b" && e["source"] == "agent")
    });
    assert_eq!(join(b.port, &id), 200);
    let log = stored_log(&db, &id);
    assert_one_writer_per_epoch(&log);
    assert!(
        log.iter().all(|(_, epoch, _)| *epoch == log[0].1),
        "one owner throughout: {:?}",
        log.iter().map(|(i, e, _)| (i, e)).collect::<Vec<_>>()
    );

    // A message as a node forwards it, with `cluster_key`: the answer's status.
    let forwarded_message = |port: u16, cluster_key: &str| {
        let path = format!("/api/conversations/{id}/events");
        let message = r#"{"action":"message","args":{"content":"again"}}"#;
        let headers = [("X-Switchboard-Cluster-Key", cluster_key)];
        http_raw(port, "POST", &path, &headers, Some(message)).status
    };
    assert_eq!(forwarded_message(b.port, CLUSTER_KEY.1), 421);
    assert_eq!(forwarded_message(a.port, "a guess"), 403);

    // A socket on another node is spliced to the owner's (see `sockets`); the owner takes its
    // own.
    assert_eq!(socket_handshake(b.port, &id), 101);
    assert_eq!(socket_handshake(a.port, &id), 101);

    let (status, body) = b.request("POST", &format!("/api/conversations/{id}/stop"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["message"], "Conversation stopped successfully",
        "{body}"
    );
    assert_eq!(
        stored_log(&db, &id).last().expect("events").2["extras"]["agent_state"],
        "stopped"
    );
}

/// A node keeps its connections to the owner of the commands it forwards: 20 create-or-joins
/// sent to B (two HTTP workers, each holding its own pool) one after the other, each on a new
/// connection of the caller's, all reach A, and A accepts at most two connections for them —
/// one per worker of B — where a connection per forwarded command would be 20.
#[test]
fn forwarded_commands_reuse_their_connections_to_the_owner() {
    let Some(db) = pg::database() else { return };
    let (a, b, id) =
        a_conversation_on_a_with_b_beside(&db, &[("SWITCHBOARD_WORKERS", "2")], "on a");

    let accepted = || {
        sample(
            &scrape(a.port, &[]),
            "switchboard_connections_accepted_total",
            &[],
        )
        .expect("A counts the connections it accepts")
    };
    let before = accepted();
    const COMMANDS: usize = 20;
    for _ in 0..COMMANDS {
        assert_eq!(join(b.port, &id), 200);
    }
    // The scrape's own connection is counted before it is answered.
    let from_b = accepted() - before - 1.0;
    assert!(
        (1.0..=2.0).contains(&from_b),
        "{COMMANDS} commands forwarded from B reached A over {from_b} new connections"
    );
    let log = stored_log(&db, &id);
    assert!(
        log.iter().all(|(_, epoch, _)| *epoch == log[0].1),
        "A owned it throughout"
    );
}

/// Commands for a conversation another live node runs start nothing that stays on the node
/// they reach: B answers create-or-joins of A's conversation as A does without starting it
/// itself, so they spend none of B's creation tokens (rate 1/s, burst 2 here: ten in a row
/// would otherwise be refused with 429 after the second); a message posted on B, which B tries
/// to take first, leaves no conversation registered on B once the store refused it.
#[test]
fn commands_for_another_nodes_conversation_start_nothing_on_the_node_they_reach() {
    let Some(db) = pg::database() else { return };
    let rate = [
        ("SWITCHBOARD_CREATE_RATE_PER_SEC", "1"),
        ("SWITCHBOARD_CREATE_BURST", "2"),
    ];
    let (_a, b, id) = a_conversation_on_a_with_b_beside(&db, &rate, "on a");
    let answers: Vec<u16> = (0..10).map(|_| join(b.port, &id)).collect();
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    assert_eq!(post_message(b.port, &id, "through b"), 200);
    let (status, info) = http(b.port, "GET", &format!("/api/conversations/{id}"), None);
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["status"], "RUNNING");
    // B runs nothing of its own: no conversation of B's is starting, running or stopping.
    let live_on_b: f64 = ["starting", "running", "stopping"]
        .iter()
        .map(|s| {
            sample(
                &scrape(b.port, &[]),
                "switchboard_conversations",
                &[("status", s)],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(live_on_b, 0.0);
}

/// A node that does not own a conversation shows it as its live owner does: `RUNNING` while
/// another live node runs it, `STOPPED` once it stopped there — in `GET
/// /api/conversations/{id}` and in the list alike.
#[test]
fn a_node_shows_a_conversation_another_node_runs_as_running() {
    let Some(db) = pg::database() else { return };
    let a = start_node(&db, "a");
    let b = start_node(&db, "b");
    let running = answered_conversation(&db, &a, "runs on a");
    let stopped = answered_conversation(&db, &a, "stopped on a");
    let stop = |id: &str| {
        let (status, body) = http(
            a.port,
            "POST",
            &format!("/api/conversations/{id}/stop"),
            None,
        );
        assert_eq!(status, 200, "{body}");
    };
    stop(&stopped);
    // (`get` status, listed status) of conversation `id` on the node at `port`.
    let shown = |port: u16, id: &str| {
        let (status, one) = http(port, "GET", &format!("/api/conversations/{id}"), None);
        assert_eq!(status, 200, "{one}");
        let (status, list) = http(port, "GET", "/api/conversations?limit=100", None);
        assert_eq!(status, 200, "{list}");
        let listed = list["results"]
            .as_array()
            .expect("results")
            .iter()
            .find(|c| c["conversation_id"] == id)
            .map(|c| c["status"].clone());
        (one["status"].clone(), listed.expect("listed"))
    };
    let both = |word: &str| (Value::from(word), Value::from(word));
    wait_until(
        Duration::from_secs(15),
        "B shows the stopped one stopped",
        || shown(b.port, &stopped) == both("STOPPED"),
    );
    for port in [a.port, b.port] {
        assert_eq!(shown(port, &running), both("RUNNING"), "on port {port}");
        assert_eq!(shown(port, &stopped), both("STOPPED"), "on port {port}");
    }

    stop(&running);
    wait_until(Duration::from_secs(15), "B shows it stopped", || {
        shown(b.port, &running) == both("STOPPED")
    });
}

/// 200 concurrent create-or-join requests for one new id, spread over three nodes sharing a
/// cluster key: every one is answered 200, and exactly one conversation runtime started (one
/// `loading` event in the log, every event under one epoch).
#[test]
fn concurrent_create_or_join_of_one_id_across_three_nodes_starts_one_runtime() {
    let Some(db) = pg::database() else { return };
    let key = [CLUSTER_KEY];
    let nodes = [
        start_node_with(&db, "a", 1000, &key),
        start_node_with(&db, "b", 1000, &key),
        start_node_with(&db, "c", 1000, &key),
    ];
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..20)
            .map(|worker| {
                let (ports, id) = (&ports, &id);
                scope.spawn(move || {
                    (0..10)
                        .map(|i| join(ports[(worker + i) % ports.len()], id))
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    assert_eq!(statuses.len(), 200);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every create-or-join answered 200: {statuses:?}"
    );
    wait_until(Duration::from_secs(15), "the agent is ready", || {
        stored_log(&db, &id)
            .iter()
            .any(|(_, _, e)| e["extras"]["agent_state"] == "awaiting_user_input")
    });
    let log = stored_log(&db, &id);
    assert_one_writer_per_epoch(&log);
    let starts = log
        .iter()
        .filter(|(_, _, e)| e["extras"]["agent_state"] == "loading")
        .count();
    assert_eq!(starts, 1, "one runtime start");
    assert!(log.iter().all(|(_, epoch, _)| *epoch == log[0].1));
}

/// `limits.max_running_per_user` is exact across the cluster: 30 concurrent creates by one user
/// (a user key) spread over three nodes with a limit of 4 are answered 200 exactly 4 times and
/// 429 `SWITCHBOARD$USER_LIMIT` otherwise; the 4 run, and nothing of a refused one is stored
/// (4 conversations, 4 held ownership rows). Once one of them stopped, another node admits a new
/// one.
#[test]
fn a_users_running_limit_is_exact_across_three_nodes() {
    let Some(db) = pg::database() else { return };
    let cwd = tempfile::tempdir().expect("temp dir");
    let unused = cwd.path().join("data");
    let on_db = [("SWITCHBOARD_POSTGRES_URL", db.url.as_str())];
    let alice = add_key_on(cwd.path(), &unused, "postgres", &on_db, "alice", false);
    let settings = [
        ("SWITCHBOARD_SESSION_API_KEY", "s3cret-key"),
        ("SWITCHBOARD_MAX_RUNNING_PER_USER", "4"),
    ];
    let nodes = [
        start_node_with(&db, "a", 1000, &settings),
        start_node_with(&db, "b", 1000, &settings),
        start_node_with(&db, "c", 1000, &settings),
    ];
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let create = |port: u16, tag: &str| keyed(port, "POST", "/api/conversations", &alice, tag);
    let answers: Vec<(u16, Answer)> = std::thread::scope(|scope| {
        let creates: Vec<_> = (0..30)
            .map(|i| {
                let (port, create) = (ports[i % ports.len()], &create);
                scope.spawn(move || (port, create(port, &format!("create-{i}"))))
            })
            .collect();
        creates
            .into_iter()
            .map(|c| c.join().expect("create"))
            .collect()
    });
    let mut created: Vec<(u16, String)> = Vec::new();
    for (port, answer) in &answers {
        let body: Value = serde_json::from_str(&answer.body).expect("JSON answer");
        match answer.status {
            200 => created.push((*port, body["conversation_id"].as_str().expect("id").into())),
            429 => assert_eq!(body["msg_id"], "SWITCHBOARD$USER_LIMIT", "{body}"),
            other => panic!("create answered {other}: {body}"),
        }
    }
    assert_eq!(created.len(), 4, "exactly the limit admitted: {created:?}");
    let mut ids: Vec<String> = created.iter().map(|(_, id)| id.clone()).collect();
    ids.sort();
    let column = |sql: &str| {
        let mut values: Vec<String> = db
            .query(sql)
            .into_iter()
            .map(|row| row[0].clone().expect("not null"))
            .collect();
        values.sort();
        values
    };
    assert_eq!(
        column("SELECT id FROM conversations"),
        ids,
        "nothing half-created"
    );
    assert_eq!(
        column("SELECT conversation_id FROM ownership WHERE node_id IS NOT NULL"),
        ids
    );
    wait_until(Duration::from_secs(15), "all four run", || {
        let listed = keyed(ports[0], "GET", "/api/conversations", &alice, "list");
        let list: Value = serde_json::from_str(&listed.body).expect("JSON");
        let running = list["results"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|c| c["status"] == "RUNNING").count());
        running == 4
    });

    let (port, id) = &created[0];
    let stopped = keyed(
        *port,
        "POST",
        &format!("/api/conversations/{id}/stop"),
        &alice,
        "stop",
    );
    assert_eq!(stopped.status, 200, "{}", stopped.body);
    let other = ports
        .iter()
        .copied()
        .find(|p| p != port)
        .expect("another node");
    wait_until(Duration::from_secs(15), "a slot is free again", || {
        create(other, "after-stop").status == 200
    });
    assert_eq!(create(other, "over").status, 429, "the limit holds again");
}
