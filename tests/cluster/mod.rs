//! Cluster nodes on PostgreSQL as real processes: `switchboard serve` on 127.0.0.1:0, each with
//! its own `SWITCHBOARD_NODE_ID`, sharing one fresh database (see `tests/pg`), with fast
//! heartbeats (100 ms, a 1 s TTL) so that expiry and fencing happen within a test. Without a
//! PostgreSQL server the tests print SKIPPED.

use std::sync::{Arc, Mutex};

use super::*;

/// Starts cluster node `node_id` on `db`.
fn start_node(db: &pg::TestDatabase, node_id: &str) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let envs = [
        ("SWITCHBOARD_POSTGRES_URL", db.url.as_str()),
        ("SWITCHBOARD_NODE_ID", node_id),
        ("SWITCHBOARD_HEARTBEAT_MS", "100"),
        ("SWITCHBOARD_NODE_TTL_MS", "1000"),
    ];
    Server::start_with(dir, &data, "postgres", &envs)
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
    let frames = Arc::new(Mutex::new(Vec::new()));
    let seen = frames.clone();
    let url = format!(
        "ws://127.0.0.1:{port}/socket.io/?latest_event_id=-1&conversation_id={id}&EIO=4&transport=websocket"
    );
    let thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            use futures_util::{SinkExt, StreamExt};
            let (_, mut ws) = awc::Client::new()
                .ws(url)
                .connect()
                .await
                .expect("socket connects");
            let mut namespace_joined = false;
            while let Some(Ok(frame)) = ws.next().await {
                if let awc::ws::Frame::Text(text) = frame {
                    let text = String::from_utf8_lossy(&text).to_string();
                    let open = text.starts_with('0');
                    seen.lock().expect("lock").push(text);
                    if open && !namespace_joined {
                        namespace_joined = true;
                        ws.send(awc::ws::Message::Text("40".into()))
                            .await
                            .expect("join the namespace");
                    }
                }
            }
        })
    });
    (thread, frames)
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
    wait_until(Duration::from_secs(15), "the node is ready", || {
        readiness(port).0 == 200
    });
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
    let before = stored_log(&db, &id);

    let held = db.hold("SELECT 1 FROM cluster_nodes WHERE node_id = 'a' FOR UPDATE");
    wait_until(Duration::from_secs(15), "/ready says fenced", || {
        readiness(port) == (503, "fenced".to_string())
    });
    client.join().expect("the client's thread");
    let frames = frames.lock().expect("lock").clone();
    assert!(
        !frames.iter().any(|f| f == "41"),
        "a fenced node's clients are not told goodbye: {frames:?}"
    );
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
    for (i, (event_id, _, _)) in log.iter().enumerate() {
        assert_eq!(*event_id, i as u64, "ids dense");
    }
    let first_epoch = before.last().expect("events before").1;
    let resumed = &log[before.len()];
    assert!(resumed.1 > first_epoch, "resumed under a higher epoch");
    assert_eq!(resumed.2["extras"]["agent_state"], "loading");
}
