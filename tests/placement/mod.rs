//! Where a conversation runs, read off the real binary's JSON log: every line names the thread
//! it was written on (`threadName`), each HTTP worker and each conversation thread says which it
//! is in a debug line when it starts, a request's lines carry its `request_id` and a
//! conversation's lines its `conversation_id`. An echo conversation runs on the HTTP worker that
//! served the request creating it; an agent process's conversation (spawned and recorded with
//! blocking calls), and one no request brought up (taken over from a dead cluster node, on
//! PostgreSQL: SKIPPED without one), runs on a conversation thread, never on an HTTP worker.

use std::collections::HashSet;

use super::*;

/// HTTP workers and conversation threads the servers here start with (two of each, so that
/// "the right kind of thread" and "the request's own thread" are different questions).
const THREADS: usize = 2;

const SHELL_AGENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/agents/shell_agent.py"
);

/// JSON logs with the actors' debug lines, and `threads` (`THREADS`) HTTP workers and
/// conversation threads, then the settings in `more`.
fn settings<'a>(threads: &'a str, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut envs = vec![
        ("SWITCHBOARD_LOG_FORMAT", "json"),
        ("SWITCHBOARD_LOG", "info,switchboard::actors=debug"),
        ("SWITCHBOARD_WORKERS", threads),
        ("SWITCHBOARD_CONVERSATION_THREADS", threads),
    ];
    envs.extend_from_slice(more);
    envs
}

/// A server on the memory store with [`settings`].
fn start(more: &[(&str, &str)]) -> Server {
    let threads = THREADS.to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    Server::start_with(dir, &data, "memory", &settings(&threads, more))
}

/// The JSON lines the server has written so far (each must be one JSON object).
fn json_lines(server: &Server) -> Vec<Value> {
    server
        .seen
        .iter()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect()
}

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or_default()
}

fn thread(line: &Value) -> &str {
    line["threadName"]
        .as_str()
        .unwrap_or_else(|| panic!("a JSON line without threadName: {line}"))
}

/// Whether the line is the conversation's: logged inside its span or naming it in a field.
fn names_conversation(line: &Value, id: &str) -> bool {
    line["fields"]["conversation_id"] == id
        || line["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|span| span["conversation_id"] == id))
}

/// Polls stderr until `find` finds what it looks for in the JSON lines, at most 30 s.
fn wait_for<T>(server: &mut Server, what: &str, find: impl Fn(&[Value]) -> Option<T>) -> T {
    let limit = Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    loop {
        server.drain_nonblocking();
        if let Some(found) = find(&json_lines(server)) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; stderr so far: {:#?}",
            server.seen
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The server's threads by kind, from the line each writes when it starts.
struct Threads {
    workers: HashSet<String>,
    conversations: HashSet<String>,
}

fn threads(server: &mut Server) -> Threads {
    let of_kind = |lines: &[Value], started: &str| -> HashSet<String> {
        lines
            .iter()
            .filter(|line| message(line) == started)
            .map(|line| thread(line).to_string())
            .collect()
    };
    let threads = wait_for(server, "every thread's start line", |lines| {
        let found = Threads {
            workers: of_kind(lines, "HTTP worker started"),
            conversations: of_kind(lines, "conversation thread started"),
        };
        (found.workers.len() == THREADS && found.conversations.len() == THREADS).then_some(found)
    });
    for name in threads.workers.iter().chain(&threads.conversations) {
        assert!(name.starts_with("actix-rt|system:"), "{name}");
    }
    assert!(threads.workers.is_disjoint(&threads.conversations));
    threads
}

/// Creates a conversation with request id `request_id`; its id and the thread that served the
/// request (its access line's).
fn create(server: &mut Server, request_id: &str) -> (String, String) {
    let answer = http_raw(
        server.port,
        "POST",
        "/api/conversations",
        &[("X-Request-Id", request_id)],
        Some(r#"{"initial_user_msg": "echo placed"}"#),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body: Value = serde_json::from_str(&answer.body).expect("JSON answer");
    let id = body["conversation_id"].as_str().expect("an id").to_string();
    let served_on = wait_for(server, "the create's access line", |lines| {
        lines.iter().find_map(|line| {
            (line["span"]["request_id"] == request_id && message(line) == "request")
                .then(|| thread(line).to_string())
        })
    });
    (id, served_on)
}

/// Stops the conversation and returns all its lines once its actor is gone and the lines
/// `also` (each a message) are there.
fn stop_and_collect(server: &mut Server, id: &str, also: &[&str]) -> Vec<Value> {
    let path = format!("/api/conversations/{id}/stop");
    let (status, body) = server.request("POST", &path, Some("{}"));
    assert_eq!(status, 200, "{body}");
    wait_for(server, "the conversation's actor to stop", |lines| {
        let mine: Vec<Value> = lines
            .iter()
            .filter(|line| names_conversation(line, id))
            .cloned()
            .collect();
        let logged = |expected: &&str| mine.iter().any(|line| message(line) == *expected);
        (logged(&"actor stopped") && also.iter().all(logged)).then_some(mine)
    })
}

/// Checks that the conversation logged its life (`began`, its runtime ready, stopping) and
/// returns the one thread all its lines were written on.
fn the_one_thread(id: &str, lines: &[Value], began: &str) -> String {
    for expected in [began, "runtime ready", "stopping"] {
        assert!(
            lines.iter().any(|line| message(line) == expected),
            "{id}: no {expected:?} line in {lines:#?}"
        );
    }
    let threads: HashSet<&str> = lines.iter().map(thread).collect();
    assert_eq!(threads.len(), 1, "{id} logged on {threads:?}: {lines:#?}");
    threads.into_iter().next().expect("one thread").to_string()
}

#[test]
fn an_echo_conversation_runs_on_the_http_worker_that_served_its_create() {
    let mut server = start(&[]);
    let threads = threads(&mut server);
    // Each create on a connection of its own: the workers take turns accepting them.
    for n in 0..2 * THREADS {
        let (id, served_on) = create(&mut server, &format!("echo-create-{n}"));
        assert!(threads.workers.contains(&served_on), "{served_on}");
        let lines = stop_and_collect(&mut server, &id, &[]);
        assert_eq!(
            the_one_thread(&id, &lines, "conversation created"),
            served_on,
            "{id}"
        );
    }
}

#[test]
fn an_agent_process_conversation_runs_on_a_conversation_thread() {
    let command = format!("python3 {SHELL_AGENT}");
    let mut server = start(&[
        ("SWITCHBOARD_RUNTIME", "process"),
        ("SWITCHBOARD_PROCESS_COMMAND", command.as_str()),
        // Not about authentication: keep the generated key out of the way.
        ("SWITCHBOARD_SESSION_API_KEY", ""),
    ]);
    let threads = threads(&mut server);
    for n in 0..THREADS {
        let (id, served_on) = create(&mut server, &format!("process-create-{n}"));
        assert!(threads.workers.contains(&served_on), "{served_on}");
        wait_status(server.port, &id, "RUNNING");
        let agent = ["agent process started", "agent process stopped"];
        let lines = stop_and_collect(&mut server, &id, &agent);
        let ran_on = the_one_thread(&id, &lines, "conversation created");
        assert!(
            threads.conversations.contains(&ran_on),
            "{id} ran on {ran_on}, not on a conversation thread {:?}",
            threads.conversations
        );
    }
}

/// A conversation whose owner was killed (`kill -9`) is taken over by another node's sweep,
/// without any request: it runs there on a conversation thread.
#[test]
fn a_conversation_taken_over_without_a_request_runs_on_a_conversation_thread() {
    let Some(db) = super::pg::database() else {
        return;
    };
    let threads = THREADS.to_string();
    let node =
        |name: &str| super::cluster::start_node_with(&db, name, 1000, &settings(&threads, &[]));
    let mut a = node("a");
    let (id, _) = create(&mut a, "create-before-the-kill");
    let mut b = node("b");
    let b_threads = self::threads(&mut b);
    a.kill_9();
    wait_for(&mut b, "the takeover", |lines| {
        lines
            .iter()
            .find(|line| {
                message(line) == "took over a conversation its lapsed owner held"
                    && line["span"]["conversation"] == id.as_str()
            })
            .map(|_| ())
    });
    let lines = stop_and_collect(&mut b, &id, &[]);
    let ran_on = the_one_thread(&id, &lines, "conversation resumed");
    assert!(
        b_threads.conversations.contains(&ran_on),
        "{id} ran on {ran_on}, not on a conversation thread {:?}",
        b_threads.conversations
    );
}
