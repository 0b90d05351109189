//! Sockets on any node: a Socket.IO or plain WebSocket client connected to a node that does
//! not own its conversation is spliced to the owner's socket (three real nodes sharing a
//! cluster key), and sees exactly what a client of the owner sees.

use super::*;

/// The two socket routes.
#[derive(Clone, Copy, Debug)]
pub(super) enum Route {
    SocketIo,
    Plain,
}

/// A socket client on its own thread, connected to conversation `id` on one node: it keeps
/// every text frame it receives and how the server closed the connection. A Socket.IO client
/// joins the default namespace and answers pings, a plain one answers WebSocket pings.
pub(super) struct Client {
    pub(super) frames: Arc<Mutex<Vec<String>>>,
    /// When each of `frames` arrived (pushed under the lock of `frames`).
    arrived: Arc<Mutex<Vec<Instant>>>,
    /// `Some` once the connection ended: the close code the server sent, if it sent one.
    closed: Arc<Mutex<Option<Option<u16>>>>,
    pub(super) thread: JoinHandle<()>,
}

impl Client {
    /// Connects over `route` to conversation `id` on the node at `port`, with `latest` as
    /// `latest_event_id` when given: the client once upgraded, else the handshake's status.
    pub(super) fn open(
        port: u16,
        id: &str,
        route: Route,
        latest: Option<&str>,
    ) -> Result<Client, u16> {
        let after = latest.map_or(String::new(), |l| format!("latest_event_id={l}&"));
        let url = match route {
            Route::SocketIo => format!(
                "ws://127.0.0.1:{port}/socket.io/?{after}conversation_id={id}&EIO=4&transport=websocket"
            ),
            Route::Plain => format!("ws://127.0.0.1:{port}/ws/conversations/{id}?{after}"),
        };
        let frames = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(None));
        let arrived = Arc::new(Mutex::new(Vec::new()));
        let (seen, ended, at) = (frames.clone(), closed.clone(), arrived.clone());
        let (handshake, status) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                use futures_util::{SinkExt, StreamExt};
                let mut ws = match awc::Client::new()
                    .ws(url)
                    .max_frame_size(16 << 20)
                    .connect()
                    .await
                {
                    Ok((_, ws)) => {
                        let _ = handshake.send(101);
                        ws
                    }
                    Err(awc::error::WsClientError::InvalidResponseStatus(status)) => {
                        let _ = handshake.send(status.as_u16());
                        return;
                    }
                    Err(e) => panic!("handshake failed: {e}"),
                };
                let mut code = None;
                while let Some(Ok(frame)) = ws.next().await {
                    let reply = match frame {
                        awc::ws::Frame::Text(text) => {
                            let text = String::from_utf8_lossy(&text).to_string();
                            let reply = match (route, text.as_str()) {
                                (Route::SocketIo, "2") => Some("3"),
                                (Route::SocketIo, t) if t.starts_with('0') => Some("40"),
                                _ => None,
                            };
                            let mut seen = seen.lock().expect("lock");
                            at.lock().expect("lock").push(Instant::now());
                            seen.push(text);
                            reply.map(|r| awc::ws::Message::Text(r.into()))
                        }
                        awc::ws::Frame::Ping(data) => Some(awc::ws::Message::Pong(data)),
                        awc::ws::Frame::Close(reason) => {
                            code = reason.map(|r| u16::from(r.code));
                            None
                        }
                        _ => None,
                    };
                    if let Some(reply) = reply {
                        if ws.send(reply).await.is_err() {
                            break;
                        }
                    }
                }
                *ended.lock().expect("lock") = Some(code);
            })
        });
        match status.recv() {
            Ok(101) => Ok(Client {
                frames,
                arrived,
                closed,
                thread,
            }),
            Ok(status) => {
                thread.join().expect("the client's thread");
                Err(status)
            }
            Err(_) => panic!("the client's thread ended before the handshake"),
        }
    }

    /// Connects, retrying every 50 ms while the handshake is answered 503 (as socket.io-client
    /// does), at most `limit`; how many handshakes were refused first.
    fn open_retrying(
        port: u16,
        id: &str,
        route: Route,
        latest: Option<&str>,
        limit: Duration,
    ) -> (Client, usize) {
        let deadline = Instant::now() + limit;
        let mut refused = 0;
        loop {
            match Client::open(port, id, route, latest) {
                Ok(client) => return (client, refused),
                Err(503) if Instant::now() < deadline => {
                    refused += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(status) => panic!("handshake answered {status} ({refused} 503s before)"),
            }
        }
    }

    /// The conversation's events received so far, in the order received.
    fn events(&self) -> Vec<Value> {
        self.frames
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|frame| {
                let json = match frame.strip_prefix("42") {
                    Some(packet) => {
                        let packet: Value = serde_json::from_str(packet).ok()?;
                        (packet[0] == "oh_event").then(|| packet[1].clone())?
                    }
                    None => serde_json::from_str(frame).ok()?,
                };
                json.get("id").is_some_and(Value::is_u64).then_some(json)
            })
            .collect()
    }

    /// When the first event that `wanted` picks arrived, if it did.
    fn arrival(&self, wanted: impl Fn(&Value) -> bool) -> Option<Instant> {
        let frames = self.frames.lock().expect("lock");
        let arrived = self.arrived.lock().expect("lock");
        frames.iter().zip(arrived.iter()).find_map(|(frame, at)| {
            let payload = frame
                .strip_prefix("42[\"oh_event\",")
                .map_or(frame.as_str(), |p| p.strip_suffix(']').unwrap_or(p));
            let event: Value = serde_json::from_str(payload).ok()?;
            wanted(&event).then_some(*at)
        })
    }

    /// The ids of [`Client::events`].
    fn ids(&self) -> Vec<u64> {
        self.events()
            .iter()
            .filter_map(|e| e["id"].as_u64())
            .collect()
    }

    /// Waits until the client has received event `id`.
    fn wait_for(&self, id: u64, what: &str) {
        wait_until(Duration::from_secs(20), what, || {
            self.ids().last().is_some_and(|last| *last >= id)
        });
    }

    /// Waits until the server closed the connection: the close code it sent, if any.
    fn wait_closed(self) -> (Option<u16>, Vec<String>) {
        self.thread.join().expect("the client's thread");
        let code = self
            .closed
            .lock()
            .expect("lock")
            .expect("the connection ended");
        let frames = self.frames.lock().expect("lock").clone();
        (code, frames)
    }
}

/// Starts three nodes sharing a cluster key (`more` settings on each).
fn three_nodes(db: &pg::TestDatabase, more: &[(&str, &str)]) -> [Server; 3] {
    let mut envs = vec![CLUSTER_KEY];
    envs.extend_from_slice(more);
    ["a", "b", "c"].map(|node| start_node_with(db, node, 1000, &envs))
}

/// The ids of the stored log of conversation `id`.
fn stored_ids(db: &pg::TestDatabase, id: &str) -> Vec<u64> {
    stored_log(db, id).iter().map(|(i, _, _)| *i).collect()
}

/// A Socket.IO and a plain client of conversation `id` on the node at `port`, from its start.
fn both_routes(port: u16, id: &str) -> Vec<(Route, Client)> {
    [Route::SocketIo, Route::Plain]
        .into_iter()
        .map(|route| {
            let client = Client::open(port, id, route, None)
                .unwrap_or_else(|status| panic!("{route:?}: {status}"));
            (route, client)
        })
        .collect()
}

/// Waits until the server closed `client`, checks it did so with a close code among `codes`
/// and without Socket.IO's goodbye (`41`, after which a Socket.IO client would not
/// reconnect): the ids of the events it received.
fn closed_without_goodbye(route: Route, client: Client, codes: &[u16]) -> Vec<u64> {
    let ids = client.ids();
    let (code, frames) = client.wait_closed();
    assert!(
        code.is_some_and(|c| codes.contains(&c)),
        "{route:?}: closed with {code:?}, expected one of {codes:?}"
    );
    assert!(
        !frames.iter().any(|f| f == "41"),
        "{route:?} was told goodbye: {frames:?}"
    );
    ids
}

/// Checks that the node at `port` splices one Socket.IO and one plain socket
/// (`switchboard_spliced_sockets`).
fn assert_one_spliced_socket_per_transport(port: u16) {
    let spliced = scrape(port, &[]);
    for transport in ["socketio", "ws"] {
        assert_eq!(
            sample(
                &spliced,
                "switchboard_spliced_sockets",
                &[("transport", transport)]
            ),
            Some(1.0),
            "{transport} on port {port}"
        );
    }
}

/// Posts `count` messages to conversation `id` through each of `ports` in turn, and waits until
/// the agent answered the last one (as stored): the last stored id.
fn converse(db: &pg::TestDatabase, ports: &[u16], id: &str, tag: &str, count: usize) -> u64 {
    let mut last = String::new();
    for i in 0..count {
        for port in ports {
            last = format!("{tag} {i} via {port}");
            assert_eq!(post_message(*port, id, &last), 200, "{last}");
        }
    }
    wait_until(Duration::from_secs(20), "the agent answers", || {
        stored_log(db, id)
            .iter()
            .any(|(_, _, e)| e["args"]["content"] == last.as_str() && e["source"] == "agent")
    });
    *stored_ids(db, id).last().expect("events")
}

/// Clients on B and C (Socket.IO and plain on each) of a conversation owned by A see every event
/// once, in id order with no gap, exactly as stored, while messages are posted on A, B and C;
/// the owner counts them in `num_connections` and B and C in `switchboard_spliced_sockets`.
#[test]
fn clients_on_other_nodes_see_every_event_once_in_order() {
    let Some(db) = pg::database() else { return };
    let [a, b, c] = three_nodes(&db, &[]);
    let id = answered_conversation(&db, &a, "on a");
    let clients: Vec<Client> = [b.port, c.port]
        .into_iter()
        .flat_map(|port| [(port, Route::SocketIo), (port, Route::Plain)])
        .map(|(port, route)| {
            Client::open(port, &id, route, None)
                .unwrap_or_else(|status| panic!("{route:?} on {port}: {status}"))
        })
        .collect();
    let (status, info) = a.request("GET", &format!("/api/conversations/{id}"), None);
    assert_eq!(status, 200, "{info}");
    wait_until(
        Duration::from_secs(15),
        "the owner counts four clients",
        || {
            let (_, info) = a.request("GET", &format!("/api/conversations/{id}"), None);
            info["num_connections"] == 4
        },
    );
    for node in [&b, &c] {
        assert_one_spliced_socket_per_transport(node.port);
    }

    let last = converse(&db, &[a.port, b.port, c.port], &id, "message", 3);
    let stored = stored_log(&db, &id);
    for client in &clients {
        client.wait_for(last, "the client sees the last event");
        let events = client.events();
        let ids: Vec<u64> = events.iter().filter_map(|e| e["id"].as_u64()).collect();
        assert_eq!(
            ids,
            (0..=last).collect::<Vec<u64>>(),
            "every event once, in order"
        );
        for (event, (_, _, stored)) in events.iter().zip(&stored) {
            assert_eq!(event, stored, "as stored");
        }
    }
}

/// A client attaching on B with `latest_event_id` (Socket.IO and plain) gets exactly the events
/// after it from the owner A: the replay, then live ones, each once.
#[test]
fn a_client_attaching_on_another_node_gets_exactly_the_events_after_latest_event_id() {
    let Some(db) = pg::database() else { return };
    let [a, b, _c] = three_nodes(&db, &[]);
    let id = answered_conversation(&db, &a, "on a");
    let before = converse(&db, &[a.port], &id, "before", 2);
    let seen = before / 2;
    let clients: Vec<Client> = [Route::SocketIo, Route::Plain]
        .into_iter()
        .map(|route| {
            Client::open(b.port, &id, route, Some(&seen.to_string()))
                .unwrap_or_else(|status| panic!("{route:?}: {status}"))
        })
        .collect();
    for client in &clients {
        client.wait_for(before, "the replay reaches the last stored event");
    }
    let last = converse(&db, &[b.port], &id, "after", 1);
    for client in &clients {
        client.wait_for(last, "the client sees the live events");
        assert_eq!(
            client.ids(),
            (seen + 1..=last).collect::<Vec<u64>>(),
            "exactly the events after {seen}"
        );
    }
}

/// `kill -9` of the owner A while clients are spliced to it through B: B closes them with 1012
/// and no Socket.IO `41` (so they reconnect); once A's registration expired and C took the
/// conversation over, the clients reconnect through B with the last id they saw and receive
/// exactly what follows — with what they saw before, the stored log, each event once.
#[test]
fn kill_9_of_the_owner_closes_spliced_clients_without_goodbye_and_they_resume_through_the_same_node(
) {
    let Some(db) = pg::database() else { return };
    let [mut a, b, c] = three_nodes(&db, &[]);
    let id = answered_conversation(&db, &a, "on a");
    let clients = both_routes(b.port, &id);
    let before = converse(&db, &[a.port, b.port], &id, "before", 2);
    for (_, client) in &clients {
        client.wait_for(before, "the client is up to date");
    }
    // One more message, and the owner dies while its answer may be under way.
    assert_eq!(post_message(b.port, &id, "just before the kill"), 200);

    a.kill_9();
    let mut seen: Vec<(Route, Vec<u64>)> = Vec::new();
    for (route, client) in clients {
        seen.push((route, closed_without_goodbye(route, client, &[1012])));
    }

    wait_until(
        Duration::from_secs(30),
        "C takes the conversation over",
        || join(c.port, &id) == 200,
    );
    let mut resumed = Vec::new();
    for (route, ids) in seen {
        let latest = ids.last().expect("events seen").to_string();
        let (client, _) =
            Client::open_retrying(b.port, &id, route, Some(&latest), Duration::from_secs(30));
        resumed.push((route, ids, client));
    }
    let last = converse(&db, &[b.port, c.port], &id, "after", 2);
    let stored = stored_ids(&db, &id);
    assert_eq!(stored, (0..=last).collect::<Vec<u64>>(), "dense ids");
    assert_one_writer_per_epoch(&stored_log(&db, &id));
    for (route, before, client) in resumed {
        client.wait_for(last, "the resumed client sees the last event");
        let after = client.ids();
        assert_eq!(
            after.first().copied(),
            before.last().map(|l| l + 1),
            "{route:?} resumes right after the last event it saw"
        );
        let mut all = before;
        all.extend(after);
        assert_eq!(all, stored, "{route:?}: every event once, in order");
    }
}

/// A node that is itself asking the store for a conversation another node owns (a command
/// for it arrived there, or its takeover sweep found the previous owner lapsed, and the acquire
/// has not been answered yet) splices a socket handshake for it to the owner instead of taking
/// it: held there, the socket would wait for that acquire and then be closed with 1012 when the
/// store refuses it. Here B's acquire (for a message posted on B) waits on a lock this test holds
/// on the conversation's ownership row, and the clients opened on B meanwhile are spliced to A
/// and replayed the whole log while it waits; once it is let go, they see every event once, in
/// order.
#[test]
fn a_handshake_on_a_node_still_asking_for_the_conversation_is_spliced_to_its_owner() {
    let Some(db) = pg::database() else { return };
    let key = [CLUSTER_KEY];
    let [a, b] = ["a", "b"].map(|node| start_node_with(&db, node, 1000, &key));
    let id = answered_conversation(&db, &a, "on a");
    let before = *stored_ids(&db, &id).last().expect("events");

    let held = db.hold(&format!(
        "SELECT 1 FROM ownership WHERE conversation_id = '{id}' FOR SHARE"
    ));
    let posted = {
        let id = id.clone();
        std::thread::spawn(move || post_message(b.port, &id, "while b asks for it"))
    };
    wait_until(
        Duration::from_secs(15),
        "B's acquire waits on the held row",
        || {
            let waiting = db.query(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            );
            waiting[0][0].as_deref().is_some_and(|n| n != "0")
        },
    );
    let clients = both_routes(b.port, &id);
    for (_, client) in &clients {
        client.wait_for(before, "the client replays the log while B's acquire waits");
    }
    assert_one_spliced_socket_per_transport(b.port);
    drop(held);
    assert_eq!(posted.join().expect("the post"), 200, "forwarded to A");

    let last = converse(&db, &[b.port, a.port], &id, "after", 2);
    let stored = stored_ids(&db, &id);
    for (route, client) in clients {
        client.wait_for(last, "the client sees the last event");
        assert_eq!(
            client.ids(),
            stored,
            "{route:?}: every event once, in order"
        );
        assert!(
            client.closed.lock().expect("lock").is_none(),
            "{route:?} is still open"
        );
    }
}

/// While the owner A is stopped (`SIGSTOP`) but its registration has not expired, a socket
/// handshake on B (Socket.IO or plain) is answered 503 within `cluster.splice_timeout_ms`. A
/// handshake already spliced (carrying the cluster key) that reaches a node which does not
/// own the conversation is refused with 421, never spliced again; one with a wrong cluster key
/// is refused with 403 — and so is a handshake on a node whose own cluster key is wrong, which
/// passes the owner's refusal on. A node without a cluster key splices nothing: 503.
#[test]
fn a_paused_owner_is_a_503_for_sockets_and_commands_and_a_splice_is_never_spliced_again() {
    let Some(db) = pg::database() else { return };
    let key = CLUSTER_KEY;
    let quick = ("SWITCHBOARD_SPLICE_TIMEOUT_MS", "300");
    let quick_forward = ("SWITCHBOARD_FORWARD_TIMEOUT_MS", "300");
    let a = start_node_with(&db, "a", 20_000, &[key]);
    let b = start_node_with(&db, "b", 20_000, &[key, quick, quick_forward]);
    let wrong = start_node_with(
        &db,
        "wrong",
        20_000,
        &[("SWITCHBOARD_CLUSTER_KEY", "another secret")],
    );
    let keyless = start_node_with(&db, "keyless", 20_000, &[]);
    let id = answered_conversation(&db, &a, "on a");
    let socketio = format!("/socket.io/?conversation_id={id}&EIO=4&transport=websocket");
    let plain = format!("/ws/conversations/{id}");

    signal(&a, "STOP");
    let refused: Vec<u16> = [&socketio, &plain]
        .iter()
        .map(|path| socket_handshake_with(b.port, path, &[]))
        .collect();
    // A command forwarded to the paused owner waits forward_timeout_ms, then is a 503.
    let forwarded = post_message(b.port, &id, "while the owner is paused");
    signal(&a, "CONT");
    assert_eq!(refused, [503, 503], "Socket.IO, plain");
    assert_eq!(forwarded, 503, "a command forwarded to a paused owner");

    let spliced = [("X-Switchboard-Cluster-Key", CLUSTER_KEY.1)];
    let guessed = [("X-Switchboard-Cluster-Key", "a guess")];
    for path in [&socketio, &plain] {
        assert_eq!(socket_handshake_with(b.port, path, &spliced), 421, "{path}");
        assert_eq!(socket_handshake_with(a.port, path, &guessed), 403, "{path}");
        assert_eq!(socket_handshake_with(wrong.port, path, &[]), 403, "{path}");
        assert_eq!(
            socket_handshake_with(keyless.port, path, &[]),
            503,
            "{path}"
        );
        assert_eq!(socket_handshake_with(a.port, path, &spliced), 101, "{path}");
        assert_eq!(socket_handshake_with(b.port, path, &[]), 101, "{path}");
    }
}

/// A Socket.IO client whose upgrade a node took while nobody owned the conversation, and which
/// sends its CONNECT only after another node took the conversation, is closed with 1012 and
/// neither a `44` (which socket.io-client takes as final) nor a `41`; its reconnect through the
/// same node is spliced to the new owner and attached.
#[test]
fn a_socket_whose_conversation_moved_before_its_connect_is_told_to_reconnect() {
    let Some(db) = pg::database() else { return };
    let [a, b, _c] = three_nodes(&db, &[]);
    let id = answered_conversation(&db, &a, "on a");
    let (status, body) = a.request("POST", &format!("/api/conversations/{id}/stop"), None);
    assert_eq!(status, 200, "{body}");
    wait_until(
        Duration::from_secs(15),
        "A released the conversation",
        || {
            let (_, info) = b.request("GET", &format!("/api/conversations/{id}"), None);
            info["status"] == "STOPPED"
        },
    );

    let url = format!(
        "ws://127.0.0.1:{}/socket.io/?conversation_id={id}&EIO=4&transport=websocket",
        b.port
    );
    let (code, frames) = actix_web::rt::System::new().block_on(async {
        use futures_util::{SinkExt, StreamExt};
        let (_, mut ws) = awc::Client::new()
            .ws(url)
            .connect()
            .await
            .expect("B takes the upgrade itself: nobody owns the conversation");
        let mut frames = Vec::new();
        let mut code = None;
        let mut connected = false;
        while let Some(Ok(frame)) = ws.next().await {
            match frame {
                awc::ws::Frame::Text(text) => {
                    let text = String::from_utf8_lossy(&text).to_string();
                    if text.starts_with('0') && !connected {
                        connected = true;
                        // A takes the conversation back before the client's CONNECT.
                        assert_eq!(join(a.port, &id), 200);
                        ws.send(awc::ws::Message::Text("40".into()))
                            .await
                            .expect("send CONNECT");
                    }
                    frames.push(text);
                }
                awc::ws::Frame::Close(reason) => code = reason.map(|r| u16::from(r.code)),
                _ => {}
            }
        }
        (code, frames)
    });
    assert_eq!(code, Some(1012), "{frames:?}");
    assert!(
        !frames.iter().any(|f| f == "41" || f.starts_with("44")),
        "no goodbye, no final refusal: {frames:?}"
    );

    let client = Client::open(b.port, &id, Route::SocketIo, None).expect("spliced to A");
    let last = converse(&db, &[b.port], &id, "after", 1);
    client.wait_for(last, "the reconnected client is attached");
}

/// Backpressure crosses the splice: a plain client on B that stops reading is, once the
/// buffers between it and the owner A are full, dropped by A's conversation as too slow (A's
/// `num_connections` falls)
/// (`socket.queue_frames` = 16 on A) — B does not buffer the owner's frames without bound —
/// while a client on B that reads keeps up and sees every event.
#[test]
fn a_spliced_client_that_stops_reading_is_dropped_by_the_owner_as_too_slow() {
    let Some(db) = pg::database() else { return };
    let key = CLUSTER_KEY;
    let a = start_node_with(
        &db,
        "a",
        1000,
        &[key, ("SWITCHBOARD_SOCKET_QUEUE_FRAMES", "16")],
    );
    let b = start_node_with(&db, "b", 1000, &[key]);
    let id = answered_conversation(&db, &a, "on a");
    let reader = Client::open(b.port, &id, Route::Plain, None).expect("spliced to A");

    // A WebSocket client that completes the upgrade and then never reads.
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", b.port)).expect("connect");
    let upgrade = format!(
        "GET /ws/conversations/{id} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        b.port
    );
    stalled
        .write_all(upgrade.as_bytes())
        .expect("send the upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stalled.read_exact(&mut byte).expect("read the answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    wait_until(
        Duration::from_secs(15),
        "the owner counts the client",
        || {
            let (_, info) = a.request("GET", &format!("/api/conversations/{id}"), None);
            info["num_connections"] == 2
        },
    );

    let connections = || {
        let (_, info) = a.request("GET", &format!("/api/conversations/{id}"), None);
        info["num_connections"].clone()
    };
    let big = "x".repeat(900_000);
    let mut posted = 0;
    wait_until(
        Duration::from_secs(120),
        "A drops the stalled client",
        || {
            if connections() == 1 {
                return true;
            }
            assert!(posted < 100, "100 messages of 900 kB and still attached");
            assert_eq!(post_message(b.port, &id, &big), 200);
            posted += 1;
            false
        },
    );
    println!("the stalled client was dropped after {posted} messages of 900 kB");
    let last = converse(&db, &[b.port], &id, "last", 1);
    reader.wait_for(last, "the reading client sees the last event");
    assert_eq!(reader.ids(), (0..=last).collect::<Vec<u64>>());
    assert_eq!(connections(), 1, "the reading client stays attached");
    drop(stalled);
}

/// `SIGTERM` of a node that relays sockets to the owner: its spliced clients are closed with a
/// close frame and no Socket.IO `41` (so they reconnect, to another node), not dropped when
/// the node's shutdown bound runs out, and it exits; the conversation goes on at its owner.
#[test]
fn sigterm_of_a_splicing_node_closes_its_spliced_sockets_so_they_reconnect() {
    let Some(db) = pg::database() else { return };
    let [a, mut b, c] = three_nodes(&db, &[]);
    let id = answered_conversation(&db, &a, "on a");
    let clients = both_routes(b.port, &id);
    let last = converse(&db, &[a.port], &id, "before", 1);
    for (_, client) in &clients {
        client.wait_for(last, "the client is up to date");
    }

    let sent = Instant::now();
    signal(&b, "TERM");
    let mut seen = Vec::new();
    for (route, client) in clients {
        seen.push((route, closed_without_goodbye(route, client, &[1001])));
    }
    b.child
        .wait_for_exit(Duration::from_secs(15))
        .expect("the node exits");
    println!(
        "SIGTERM of a splicing node: {:?} from the signal until it had exited",
        sent.elapsed()
    );
    for (route, ids) in seen {
        let latest = ids.last().expect("events seen").to_string();
        let client = Client::open(c.port, &id, route, Some(&latest)).expect("spliced to A");
        let last = converse(&db, &[c.port], &id, "after", 1);
        client.wait_for(last, "the client resumed on C");
        assert_eq!(client.ids().first().copied(), ids.last().map(|l| l + 1));
    }
}

/// The owner A stopped (`SIGSTOP`) past its TTL while clients are spliced to it through B; C
/// takes the conversation over; when A runs again (`SIGCONT`) it fences itself and its close
/// (1012, no `41`) reaches the clients through B unchanged; they reconnect through B, are
/// spliced to C and receive exactly what follows the last event they saw.
#[test]
fn a_fenced_owner_s_close_reaches_spliced_clients_and_they_resume_on_the_new_owner() {
    let Some(db) = pg::database() else { return };
    let [mut a, b, c] = three_nodes(&db, &[]);
    let id = answered_conversation(&db, &a, "on a");
    let clients = both_routes(b.port, &id);
    let before = converse(&db, &[b.port], &id, "before", 1);
    for (_, client) in &clients {
        client.wait_for(before, "the client is up to date");
    }

    signal(&a, "STOP");
    // Asked before A's registration expired, C would forward the join to A and wait for it.
    wait_until(Duration::from_secs(30), "A's registration expires", || {
        let lapsed = "SELECT 1 FROM cluster_nodes WHERE node_id = 'a' AND expires_at < now()";
        !db.query(lapsed).is_empty()
    });
    assert_eq!(join(c.port, &id), 200, "C takes the conversation over");
    signal(&a, "CONT");
    a.wait_line(Duration::from_secs(15), |l| {
        l.contains("cluster node fenced itself")
    });
    let seen: Vec<(Route, Vec<u64>)> = clients
        .into_iter()
        .map(|(route, client)| (route, closed_without_goodbye(route, client, &[1012])))
        .collect();

    let resumed: Vec<(Route, Vec<u64>, Client)> = seen
        .into_iter()
        .map(|(route, ids)| {
            let latest = ids.last().expect("events seen").to_string();
            let (client, _) =
                Client::open_retrying(b.port, &id, route, Some(&latest), Duration::from_secs(30));
            (route, ids, client)
        })
        .collect();
    let last = converse(&db, &[b.port], &id, "after", 1);
    let stored = stored_ids(&db, &id);
    assert_one_writer_per_epoch(&stored_log(&db, &id));
    for (route, mut all, client) in resumed {
        client.wait_for(last, "the resumed client sees the last event");
        all.extend(client.ids());
        assert_eq!(all, stored, "{route:?}: every event once, in order");
    }
}

/// What the splice adds on a reply's way to a client, printed, not asserted: messages posted to
/// the owner A one at a time, the time from the post until the agent's reply reached a plain
/// client on A and one spliced through B (debug builds, one machine). Both see the same events.
#[test]
fn what_a_splice_adds_to_a_reply_s_way_to_the_client() {
    let Some(db) = pg::database() else { return };
    let [a, b, _c] = three_nodes(&db, &[]);
    let id = answered_conversation(&db, &a, "on a");
    let direct = Client::open(a.port, &id, Route::Plain, None).expect("direct");
    let spliced = Client::open(b.port, &id, Route::Plain, None).expect("spliced");
    let (mut on_a, mut via_b) = (Vec::new(), Vec::new());
    for i in 0..40 {
        let content = format!("ping {i}");
        let reply = |e: &Value| e["source"] == "agent" && e["args"]["content"] == content.as_str();
        let sent = Instant::now();
        assert_eq!(post_message(a.port, &id, &content), 200, "{content}");
        for (client, took) in [(&direct, &mut on_a), (&spliced, &mut via_b)] {
            wait_until(Duration::from_secs(10), "the reply arrives", || {
                client.arrival(reply).is_some()
            });
            took.push(client.arrival(reply).expect("arrived") - sent);
        }
    }
    let summary = |took: &mut Vec<Duration>| {
        took.sort();
        format!(
            "median {:?}, p90 {:?}",
            took[took.len() / 2],
            took[took.len() * 9 / 10]
        )
    };
    let mut added: Vec<Duration> = via_b
        .iter()
        .zip(&on_a)
        .map(|(b, a)| b.saturating_sub(*a))
        .collect();
    println!(
        "reply reached a client on the owner: {}; spliced through another node: {}; the \
         spliced client after the direct one: {}",
        summary(&mut on_a),
        summary(&mut via_b),
        summary(&mut added)
    );
    let last = *stored_ids(&db, &id).last().expect("events");
    direct.wait_for(last, "the direct client sees the last event");
    spliced.wait_for(last, "the spliced client sees the last event");
    assert_eq!(direct.events(), spliced.events());
}

/// A write the store refuses as fenced (the conversation's epoch moved on — another node took
/// it over — while its owner still runs it) closes the owner's clients the way a lost
/// membership does: 1012 and no Socket.IO goodbye (`41`), so they reconnect and find the new
/// owner; never the final close of a plain store failure.
#[test]
fn a_write_refused_as_fenced_closes_clients_so_they_reconnect() {
    let Some(db) = pg::database() else { return };
    let a = start_node_with(&db, "a", 1000, &[CLUSTER_KEY]);
    let id = answered_conversation(&db, &a, "on a");
    let clients = both_routes(a.port, &id);
    let last = *stored_ids(&db, &id).last().expect("events stored");
    for (_, client) in &clients {
        client.wait_for(last, "the client is up to date");
    }
    // As a takeover does: the epoch moves on under A.
    db.execute(&format!(
        "UPDATE ownership SET epoch = epoch + 1 WHERE conversation_id = '{id}'"
    ));
    assert_ne!(post_message(a.port, &id, "written after the takeover"), 200);
    for (route, client) in clients {
        closed_without_goodbye(route, client, &[1012]);
    }
    assert_eq!(
        stored_ids(&db, &id).last().copied(),
        Some(last),
        "nothing was written under the old epoch"
    );
}
