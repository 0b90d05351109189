//! Cluster nodes losing their processes while a client keeps using them: repeated `kill -9` of
//! the owner during a stream of messages.

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
    let key = [("SWITCHBOARD_CLUSTER_KEY", "a shared secret")];
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
