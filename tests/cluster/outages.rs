//! Cluster nodes losing their processes or their database while clients keep using them:
//! repeated `kill -9` of the owner during a stream of messages, and the PostgreSQL server
//! stopped for longer than the nodes' TTL (on a server of the test's own).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// The user messages stored in conversation `id`'s log, by content.
fn stored_user_messages(db: &pg::TestDatabase, id: &str) -> Vec<String> {
    stored_log(db, id)
        .into_iter()
        .filter(|(_, _, e)| e["source"] == "user" && e["action"] == "message")
        .filter_map(|(_, _, e)| e["args"]["content"].as_str().map(str::to_string))
        .collect()
}

/// The node that owns conversation `id` now, if any.
fn owner_of(db: &pg::TestDatabase, id: &str) -> Option<String> {
    db.query(&format!(
        "SELECT node_id FROM ownership WHERE conversation_id = '{id}' AND node_id IS NOT NULL"
    ))
    .into_iter()
    .next()
    .and_then(|row| row[0].clone())
}

/// Three nodes sharing a cluster key; a client posts 1,000 messages to one conversation, each
/// through whichever node answers (the next one after a failure, each attempt with its own
/// content), while the conversation's owner is `kill -9`ed four times and restarted under its
/// id each time. Every message answered 200 is in the log exactly once, the log's ids are
/// dense, no event of an older epoch follows one of a newer epoch, and each kill moved the
/// conversation to a new epoch.
#[test]
fn repeated_kills_of_the_owner_during_1000_messages_lose_no_acknowledged_message() {
    let Some(db) = pg::database() else { return };
    let key = [CLUSTER_KEY];
    let names = ["a", "b", "c"];
    let mut nodes: Vec<Server> = names
        .iter()
        .map(|name| start_node_with(&db, name, 1000, &key))
        .collect();
    let ports = Arc::new(Mutex::new(nodes.iter().map(|n| n.port).collect::<Vec<_>>()));
    let id = answered_conversation(&db, &nodes[0], "first");
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let finished = Arc::new(AtomicBool::new(false));
    const MESSAGES: usize = 1000;
    const KILLS: usize = 4;

    let started = Instant::now();
    let client = {
        let (ports, acked, finished, id) =
            (ports.clone(), acked.clone(), finished.clone(), id.clone());
        std::thread::spawn(move || {
            let path = format!("/api/conversations/{id}/events");
            let mut failed_attempts = 0usize;
            for i in 0..MESSAGES {
                let mut attempt = 0usize;
                loop {
                    let port = {
                        let ports = ports.lock().expect("lock");
                        ports[(i + attempt) % ports.len()]
                    };
                    let content = format!("m{i}-{attempt}");
                    let body =
                        format!(r#"{{"action":"message","args":{{"content":"{content}"}}}}"#);
                    match try_http_raw(port, "POST", &path, &[], Some(&body)) {
                        Ok(answer) if answer.status == 200 => {
                            acked.lock().expect("lock").push(content);
                            break;
                        }
                        _ => {
                            attempt += 1;
                            failed_attempts += 1;
                            assert!(attempt < 3000, "message {i} never accepted");
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            }
            finished.store(true, Ordering::Release);
            failed_attempts
        })
    };

    let mut kills = 0;
    while kills < KILLS {
        let target = (kills + 1) * MESSAGES / (KILLS + 1);
        wait_until(
            Duration::from_secs(120),
            "the client makes progress",
            || acked.lock().expect("lock").len() >= target || finished.load(Ordering::Acquire),
        );
        assert!(
            !finished.load(Ordering::Acquire),
            "the client finished before kill {}",
            kills + 1
        );
        let Some(owner) = owner_of(&db, &id) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let index = names
            .iter()
            .position(|n| *n == owner)
            .expect("a known node");
        nodes[index].kill_9();
        kills += 1;
        nodes[index] = start_node_with(&db, names[index], 1000, &key);
        ports.lock().expect("lock")[index] = nodes[index].port;
    }
    let failed_attempts = client.join().expect("the client");
    let took = started.elapsed();

    let acked = acked.lock().expect("lock").clone();
    assert_eq!(acked.len(), MESSAGES);
    let log = stored_log(&db, &id);
    assert_one_writer_per_epoch(&log);
    let stored = stored_user_messages(&db, &id);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for content in &stored {
        *counts.entry(content.as_str()).or_default() += 1;
    }
    for content in &acked {
        assert_eq!(
            counts.get(content.as_str()).copied().unwrap_or(0),
            1,
            "acknowledged message {content} is in the log exactly once"
        );
    }
    assert!(
        counts.values().all(|n| *n == 1),
        "no message is stored twice"
    );
    let mut epochs: Vec<i64> = log.iter().map(|(_, epoch, _)| *epoch).collect();
    epochs.dedup();
    assert!(
        epochs.len() > KILLS,
        "each kill moved the conversation to a new epoch: {epochs:?}"
    );
    println!(
        "{MESSAGES} messages acknowledged in {took:?} across {KILLS} kills of the owner; \
         {failed_attempts} attempts refused or lost on the way; {} stored (an attempt whose \
         answer was lost may be stored too); {} epochs",
        stored.len(),
        epochs.len()
    );
}

/// A PostgreSQL server of one test's own (`.ci/postgres.sh` in a temporary directory, on a
/// free port), stopped and removed when dropped.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
    /// Its administrative URL.
    url: String,
}

impl PrivatePostgres {
    /// Starts one, or `None` (after printing SKIPPED) where the shared test server is not
    /// configured either: the machine has no PostgreSQL for tests.
    fn start() -> Option<PrivatePostgres> {
        // Skips (or, where required, fails) exactly as the tests on the shared server do.
        pg::admin_url()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = PrivatePostgres {
            dir,
            port: free_port(),
            url: String::new(),
        };
        let exports = server.script("start");
        server.url = exports
            .trim()
            .strip_prefix("export SWITCHBOARD_TEST_POSTGRES_URL=")
            .unwrap_or_else(|| panic!("postgres.sh start printed {exports:?}"))
            .to_string();
        Some(server)
    }

    /// Runs `.ci/postgres.sh ACTION` for this server; what it printed.
    fn script(&self, action: &str) -> String {
        let output = self.run_script(action).expect("run .ci/postgres.sh");
        assert!(
            output.status.success(),
            "postgres.sh {action} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn run_script(&self, action: &str) -> std::io::Result<std::process::Output> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/postgres.sh");
        Command::new("bash")
            .arg(script)
            .arg(action)
            .env("SWITCHBOARD_TEST_POSTGRES_DIR", self.dir.path())
            .env("SWITCHBOARD_TEST_POSTGRES_PORT", self.port.to_string())
            .stderr(Stdio::piped())
            .output()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Never a panic while a failed test unwinds.
        let _ = self.run_script("stop");
    }
}

/// A user message posted to conversation `id` on the node at `port`: its status, or `None`
/// when no answer came (the request's bound, 10 s, passed or the connection failed).
fn try_post_message(port: u16, id: &str, content: &str) -> Option<u16> {
    let body = format!(r#"{{"action":"message","args":{{"content":"{content}"}}}}"#);
    let path = format!("/api/conversations/{id}/events");
    try_http_raw(port, "POST", &path, &[], Some(&body))
        .ok()
        .map(|a| a.status)
}

/// PostgreSQL stopped for 3 × `node_ttl_ms` under two nodes: while it is down, writes answer
/// 503 (a message to the owner, a create on the other node; each within the request's bound),
/// both nodes fence themselves (`/ready` says `fenced`) and the owner's Socket.IO client is
/// disconnected without `41`. Once it runs again, both nodes register anew (a new
/// incarnation), the conversation can be used again through either node, and every message
/// acknowledged before the outage is still in its log, which keeps one writer per epoch.
#[test]
fn postgres_stopped_for_three_ttls_then_everything_resumes() {
    let Some(server) = PrivatePostgres::start() else {
        return;
    };
    let db = pg::database_on(&server.url);
    let key = [CLUSTER_KEY];
    let a = start_node_with(&db, "a", 1000, &key);
    let b = start_node_with(&db, "b", 1000, &key);
    let (id, client, frames) = watched_conversation(a.port);
    assert_eq!(post_message(b.port, &id, "before the outage"), 200);
    let registered = |node: &str| {
        db.query(&format!(
            "SELECT incarnation FROM cluster_nodes WHERE node_id = '{node}'"
        ))[0][0]
            .clone()
            .expect("incarnation")
    };
    let incarnations = (registered("a"), registered("b"));

    server.script("stop");
    let stopped = Instant::now();
    assert_eq!(
        try_post_message(a.port, &id, "during the outage"),
        Some(503),
        "a message to the owner"
    );
    let first_refusal = stopped.elapsed();
    let created = try_http_raw(b.port, "POST", "/api/conversations", &[], Some("{}"));
    assert_eq!(
        created.as_ref().map(|a| a.status).ok(),
        Some(503),
        "a create on the other node: {:?}",
        created.map(|a| a.body)
    );
    for node in [&a, &b] {
        wait_until(Duration::from_secs(15), "/ready says fenced", || {
            readiness(node.port) == (503, "fenced".to_string())
        });
    }
    let fenced = stopped.elapsed();
    assert_closed_without_goodbye(client, &frames);
    let outage = Duration::from_millis(3 * 1000);
    std::thread::sleep(outage.saturating_sub(stopped.elapsed()));
    assert_eq!(
        try_post_message(b.port, &id, "still down"),
        Some(503),
        "writes still answer 503 after 3 × TTL"
    );

    server.script("start");
    let restarted = Instant::now();
    for node in [&a, &b] {
        wait_until(Duration::from_secs(30), "the node is ready again", || {
            readiness(node.port).0 == 200
        });
    }
    let ready = restarted.elapsed();
    assert!(registered("a") > incarnations.0 && registered("b") > incarnations.1);
    wait_until(
        Duration::from_secs(30),
        "the conversation takes messages",
        || try_post_message(b.port, &id, "after the outage") == Some(200),
    );
    println!(
        "PostgreSQL stopped for {:?} (node_ttl_ms 1000, heartbeat_ms 100): the first write \
         answered 503 after {first_refusal:?}, both nodes fenced after {fenced:?}; started \
         again: both ready after {ready:?}, the conversation took a message after {:?}",
        restarted.duration_since(stopped),
        restarted.elapsed()
    );
    wait_until(Duration::from_secs(15), "the agent answers", || {
        stored_log(&db, &id)
            .iter()
            .any(|(_, _, e)| e["args"]["content"] == "after the outage" && e["source"] == "agent")
    });
    let log = stored_log(&db, &id);
    assert_one_writer_per_epoch(&log);
    let users = stored_user_messages(&db, &id);
    assert_eq!(
        users.iter().filter(|m| *m == "before the outage").count(),
        1,
        "{users:?}"
    );
    assert!(!users
        .iter()
        .any(|m| m == "during the outage" || m == "still down"));
    let (status, body) = http(a.port, "POST", "/api/conversations", Some("{}"));
    assert_eq!(status, 200, "a new conversation after the outage: {body}");
}

/// A node that dies holding conversations: once its registration expired, the other nodes
/// take each of them over on their own — no request for them needed — under a higher epoch,
/// and they run there (nothing stored lost, one writer per epoch). Prints how long it took.
#[test]
fn a_dead_owners_conversations_run_again_elsewhere_without_a_request() {
    let Some(db) = pg::database() else { return };
    let mut a = start_node(&db, "a");
    let b = start_node(&db, "b");
    let c = start_node(&db, "c");
    let ids: Vec<String> = (0..3)
        .map(|i| answered_conversation(&db, &a, &format!("before {i}")))
        .collect();
    let before: Vec<_> = ids.iter().map(|id| stored_log(&db, id)).collect();
    for id in &ids {
        assert_eq!(owner_of(&db, id).as_deref(), Some("a"));
    }

    a.kill_9();
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "b or c owns every conversation",
        || {
            ids.iter()
                .all(|id| owner_of(&db, id).is_some_and(|owner| owner == "b" || owner == "c"))
        },
    );
    println!(
        "every conversation of a node killed with -9 taken over without a request: {:?} after \
         the kill (node_ttl_ms 1000, heartbeat_ms 100)",
        killed.elapsed()
    );
    for (id, before) in ids.iter().zip(&before) {
        // Running there (it was STARTING while it loaded): each node shows it RUNNING — its
        // own, or a live node's lease.
        for node in [&b, &c] {
            wait_until(Duration::from_secs(15), "it runs again", || {
                let (status, info) = node.request("GET", &format!("/api/conversations/{id}"), None);
                status == 200 && info["status"] == "RUNNING"
            });
        }
        let log = stored_log(&db, id);
        assert_one_writer_per_epoch(&log);
        assert_eq!(&log[..before.len()], &before[..], "nothing stored was lost");
    }
}

/// A node killed with `-9` and started again under its id takes back, on its own, what its
/// previous run held: its new incarnation finds those leases lapsed and starts each
/// conversation again under a higher epoch, no request needed.
#[test]
fn a_node_restarted_under_its_id_starts_what_its_killed_run_held() {
    let Some(db) = pg::database() else { return };
    let mut a = start_node(&db, "a");
    let id = answered_conversation(&db, &a, "before");
    let epoch = |db: &pg::TestDatabase| -> Option<i64> {
        db.query(&format!(
            "SELECT epoch FROM ownership WHERE conversation_id = '{id}' AND node_id = 'a'"
        ))
        .into_iter()
        .next()
        .and_then(|row| row[0].clone())
        .and_then(|e| e.parse().ok())
    };
    let held = epoch(&db).expect("a holds it");
    a.kill_9();
    let a = start_node(&db, "a");
    wait_until(
        Duration::from_secs(15),
        "the restarted node runs it again",
        || {
            let (status, info) = a.request("GET", &format!("/api/conversations/{id}"), None);
            status == 200 && info["status"] == "RUNNING"
        },
    );
    assert!(
        epoch(&db).is_some_and(|e| e > held),
        "taken under a higher epoch"
    );
    assert_one_writer_per_epoch(&stored_log(&db, &id));
}

/// The takeover sweep says "took over" only for what it took over. After `kill -9` of A, B's
/// sweep brings up the conversation A owned (nobody asks B for it) and logs that it took it
/// over. A conversation B runs already, whose ownership row the database shows under A as well
/// (as when a request on B brought it up between the sweep's listing and its open), is listed
/// as orphaned too: the sweep finds it live (logged at debug) and never logs it as taken over.
#[test]
fn the_takeover_sweep_logs_a_takeover_only_for_what_it_took_over() {
    let Some(db) = pg::database() else { return };
    let mut a = start_node(&db, "a");
    let debug = (
        "SWITCHBOARD_LOG",
        "info,switchboard::actors::takeover=debug",
    );
    let mut b = start_node_with(&db, "b", 1000, &[debug]);
    let on_a = answered_conversation(&db, &a, "on a");
    let on_b = answered_conversation(&db, &b, "on b");
    db.execute(&format!(
        "UPDATE ownership SET (node_id, incarnation) = (SELECT node_id, incarnation \
         FROM cluster_nodes WHERE node_id = 'a') WHERE conversation_id = '{on_b}'"
    ));

    a.kill_9();
    let took_over = |id: &str| {
        let id = id.to_string();
        move |line: &str| line.contains("took over a conversation") && line.contains(&id)
    };
    let found_live = |line: &str| line.contains("live here already") && line.contains(&on_b);
    for (what, check) in [
        (
            "B takes over A's conversation",
            &took_over(&on_a) as &dyn Fn(&str) -> bool,
        ),
        ("B's sweep finds its own conversation live", &found_live),
    ] {
        if !b.seen.iter().any(|l| check(l)) {
            println!("waiting until {what}");
            b.wait_line(Duration::from_secs(30), check);
        }
    }
    b.drain_nonblocking();
    let claimed: Vec<&String> = b.seen.iter().filter(|l| took_over(&on_b)(l)).collect();
    assert!(
        claimed.is_empty(),
        "a conversation B ran already was logged as taken over: {claimed:#?}"
    );
    assert_eq!(
        b.seen.iter().filter(|l| took_over(&on_a)(l)).count(),
        1,
        "A's conversation is taken over once"
    );
}
