//! What only the SQLite store promises: data survives a reopen, bad files and locations are
//! refused with a clear message (never started empty), failures stay per request or per batch,
//! and opening stays cheap with 100,000 stored conversations. Real files in temp dirs.

mod common;
use common::{cause_of, cid, meta, settings_unreadable_for_their_json};

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rusqlite::Connection;
use serde_json::json;
use switchboard::config::StoreTuning;
use switchboard::conversation::{ConversationMeta, InitData};
use switchboard::events::{EventBody, Source, StoredEvent};
use switchboard::store::sqlite::{DB_FILE_NAME, SCHEMA_VERSION};
use switchboard::store::{EventQuery, SqliteStore, Store, StoreError};

fn tuning() -> StoreTuning {
    StoreTuning {
        batch_max: 512,
        queue: 1024,
    }
}

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir, &tuning()).expect("open")
}

fn open_err(dir: &Path) -> String {
    match SqliteStore::open(dir, &tuning()) {
        Err(StoreError::Open(message)) => message.to_string(),
        Err(other) => panic!("expected StoreError::Open, got {other:?}"),
        Ok(store) => panic!("expected the open to be refused, got {store:?}"),
    }
}

/// Closes the store and waits until its threads have closed the database.
async fn close(store: SqliteStore) {
    tokio::time::timeout(Duration::from_secs(30), store.close())
        .await
        .expect("store threads exit after the last handle is dropped");
}

fn event(id: u64) -> StoredEvent {
    EventBody::message(Source::Agent, &format!("reply {id}"), json!([]), false)
        .stamp(id, "2024-05-01T12:00:00.000000")
}

fn events(ids: std::ops::Range<u64>) -> Vec<StoredEvent> {
    ids.map(event).collect()
}

fn all() -> EventQuery {
    EventQuery::after(None, usize::MAX)
}

fn timestamp(i: u64) -> String {
    let base = chrono::DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
        .expect("base time")
        .with_timezone(&chrono::Utc);
    let at = base + chrono::Duration::seconds(i64::try_from(i).expect("small"));
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

#[tokio::test]
async fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rich = ConversationMeta {
        owner: Some("alice".into()),
        trigger: switchboard::conversation::Trigger::MicroagentManagement,
        init: InitData {
            repository: Some("octo/repo".into()),
            mcp_config: Some(json!({
                "sse_servers": [{"url": "https://mcp.example.com", "api_key": "s3cr3t"}],
                "stdio_servers": [{"name": "fs", "command": "npx", "args": ["-y", "fs"],
                                   "env": {"ROOT": "/tmp"}}],
                "nested": {"n": 1.5, "t": true, "z": null}
            })),
            initial_user_msg: Some("héllo\nworld".into()),
            image_urls: vec!["https://example.com/a.png".into()],
            replay_events: vec![json!({"source": "user", "action": "message"})],
            create_microagent: Some(json!({"repo": "octo/repo"})),
            ..InitData::default()
        },
        ..meta("rich", "2024-03-01T10:00:00.000000Z")
    };

    let store = open(dir.path());
    store.create(rich.clone()).await.expect("create");
    store
        .create(meta("plain", "2024-03-02T10:00:00.000000Z"))
        .await
        .expect("create");
    store
        .create(meta("empty", "2024-02-01T10:00:00.000000Z"))
        .await
        .expect("create");
    store
        .append(&cid("rich"), events(0..5))
        .await
        .expect("append");
    store
        .append(&cid("plain"), events(0..2))
        .await
        .expect("append");
    assert!(store
        .set_title(&cid("rich"), "Renamed")
        .await
        .expect("title"));
    let settings = json!({"llm_model": "a/b", "llm_api_key": "sk-1", "mcp_config": null});
    store
        .save_settings("", settings.clone())
        .await
        .expect("settings");
    let before: Vec<_> = join_all(["rich", "plain", "empty"].map(|id| store.get(&cid(id)))).await;
    let listed_before = store.list(0, 10).await.expect("list");
    close(store).await;

    let store = open(dir.path());
    let after: Vec<_> = join_all(["rich", "plain", "empty"].map(|id| store.get(&cid(id)))).await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            a.as_ref().expect("get"),
            b.as_ref().expect("get"),
            "same record after reopen"
        );
    }
    let record = after[0].clone().expect("get").expect("exists");
    assert_eq!(record.meta.title, "Renamed");
    assert_eq!(store.settings("").await.expect("settings"), Some(settings));
    assert_eq!(record.meta.init, rich.init, "init data incl. mcp_config");
    assert_eq!(record.meta.owner.as_deref(), Some("alice"));
    assert_eq!(record.next_event_id, 5);
    assert_eq!(store.list(0, 10).await.expect("list"), listed_before);
    assert_eq!(
        store.events(&cid("rich"), all()).await.expect("events"),
        events(0..5)
    );

    // The log continues where it stopped.
    store
        .append(&cid("rich"), events(5..7))
        .await
        .expect("append");
    let record = store.get(&cid("rich")).await.expect("get").expect("exists");
    assert_eq!(record.next_event_id, 7);
    close(store).await;

    let store = open(dir.path());
    assert_eq!(
        store.events(&cid("rich"), all()).await.expect("events"),
        events(0..7)
    );
    assert_eq!(
        store.events(&cid("plain"), all()).await.expect("events"),
        events(0..2)
    );
    close(store).await;
}

/// Requests accepted before the last handle is dropped are still carried out.
#[tokio::test]
async fn dropping_the_store_finishes_queued_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store
        .create(meta("c", "2024-01-01T00:00:00.000000Z"))
        .await
        .expect("create");
    let pending: Vec<_> = (0..500)
        .map(|i| store.append(&cid("c"), vec![event(i)]))
        .collect();
    let running = store.clone();
    drop(store);
    // The futures keep working without any store handle.
    for result in join_all(pending).await {
        result.expect("append");
    }
    close(running).await;
    let store = open(dir.path());
    let record = store.get(&cid("c")).await.expect("get").expect("exists");
    assert_eq!(record.next_event_id, 500);
    close(store).await;
}

#[tokio::test]
async fn newer_schema_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store
        .create(meta("c", "2024-01-01T00:00:00.000000Z"))
        .await
        .expect("create");
    close(store).await;
    let db = dir.path().join(DB_FILE_NAME);
    let newer = SCHEMA_VERSION + 41;
    {
        let conn = Connection::open(&db).expect("open directly");
        conn.pragma_update(None, "user_version", newer)
            .expect("set user_version");
    }
    let message = open_err(dir.path());
    println!("refusal: {message}");
    assert!(message.contains(&newer.to_string()), "{message}");
    assert!(
        message.contains(&format!("up to {SCHEMA_VERSION}")),
        "{message}"
    );
    assert!(message.contains(&db.display().to_string()), "{message}");
    // The file was left alone.
    let conn = Connection::open(&db).expect("open directly");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("user_version");
    assert_eq!(version, newer);
    let count: i64 = conn
        .query_row("SELECT count(*) FROM conversations", [], |r| r.get(0))
        .expect("count");
    assert_eq!(count, 1);
}

#[test]
fn garbage_file_is_refused_not_started_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join(DB_FILE_NAME);
    let garbage: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&db, &garbage).expect("write garbage");
    let message = open_err(dir.path());
    println!("refusal: {message}");
    assert!(message.contains("not a SQLite database"), "{message}");
    assert!(message.contains(&db.display().to_string()), "{message}");
    assert_eq!(
        std::fs::read(&db).expect("read"),
        garbage,
        "the file is untouched"
    );

    // A text file, too.
    std::fs::write(&db, "conversations:\n  - id: 1\n").expect("write text");
    let message = open_err(dir.path());
    assert!(message.contains("not a SQLite database"), "{message}");
}

/// A refused open says what to do and keeps SQLite's own error (its code) as the cause.
#[test]
fn a_refused_open_keeps_sqlites_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(DB_FILE_NAME), "conversations:\n  - id: 1\n").expect("write");
    let Err(refused) = SqliteStore::open(dir.path(), &tuning()) else {
        panic!("a text file was opened as a database")
    };
    assert!(matches!(refused, StoreError::Open(_)), "{refused:?}");
    assert!(
        refused.to_string().contains("not a SQLite database"),
        "{refused}"
    );
    assert_eq!(
        cause_of::<rusqlite::Error>(&refused).sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase)
    );
}

#[tokio::test]
async fn corrupt_database_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for i in 0..200 {
        store
            .create(meta(&format!("c{i:03}"), &timestamp(i)))
            .await
            .expect("create");
    }
    store
        .append(&cid("c000"), events(0..200))
        .await
        .expect("append");
    close(store).await;
    let db = dir.path().join(DB_FILE_NAME);
    {
        // Make sure every page is in the main file, not in the WAL.
        let conn = Connection::open(&db).expect("open directly");
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
    }
    let mut bytes = std::fs::read(&db).expect("read");
    let page = 4096;
    assert!(bytes.len() > 4 * page, "database has pages to damage");
    // Smash everything after the first page (the schema) with a repeating pattern.
    for (i, b) in bytes[page..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(&db, &bytes).expect("write");
    let message = open_err(dir.path());
    println!("refusal: {message}");
    assert!(message.contains("corrupt"), "{message}");
    assert!(message.contains(&db.display().to_string()), "{message}");
}

#[test]
fn another_programs_database_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join(DB_FILE_NAME);
    {
        let conn = Connection::open(&db).expect("create");
        conn.execute_batch("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL);")
            .expect("schema");
    }
    let message = open_err(dir.path());
    println!("refusal: {message}");
    assert!(message.contains("invoices"), "{message}");
}

#[test]
fn unusable_locations_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").expect("write");
    let message = open_err(&file);
    println!("refusal: {message}");
    assert!(message.contains(&file.display().to_string()), "{message}");
    assert!(message.contains("data directory"), "{message}");

    // Under a regular file.
    let message = open_err(&file.join("data"));
    assert!(message.contains("data directory"), "{message}");

    // The database path is a directory.
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join(DB_FILE_NAME)).expect("mkdir");
    let message = open_err(&data);
    assert!(message.contains("is a directory"), "{message}");

    #[cfg(target_os = "linux")]
    {
        let message = open_err(Path::new("/proc/switchboard-test/data"));
        println!("refusal: {message}");
        assert!(message.contains("/proc/switchboard-test/data"), "{message}");
        // An existing directory nobody may create files in.
        let message = open_err(Path::new("/proc/self"));
        println!("refusal: {message}");
        assert!(message.contains("/proc/self"), "{message}");
    }
}

/// Set in the child process of `committed_appends_survive_kill_9`: the data dir to write into.
const CHILD_DIR_VAR: &str = "SWITCHBOARD_STORE_TEST_KILL9_DIR";

/// Not a test on its own: the child process of `committed_appends_survive_kill_9` (a no-op
/// unless [`CHILD_DIR_VAR`] is set). Appends forever, printing the last id of each completed
/// append, until it is killed.
#[tokio::test]
async fn kill9_child_process() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    use std::io::Write;
    let store = open(Path::new(&dir));
    store
        .create(meta("c", "2024-01-01T00:00:00.000000Z"))
        .await
        .expect("create");
    let mut next = 0;
    loop {
        let n = 1 + next % 7;
        store
            .append(&cid("c"), events(next..next + n))
            .await
            .expect("append");
        next += n;
        let mut out = std::io::stdout().lock();
        writeln!(out, "committed {}", next - 1).expect("stdout");
        out.flush().expect("stdout");
    }
}

/// A completed append survives `kill -9` of the process (WAL + synchronous=NORMAL).
#[cfg(unix)]
#[tokio::test]
async fn committed_appends_survive_kill_9() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "kill9_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_VAR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child process");
    let stdout = child.stdout.take().expect("child stdout");
    let mut last_committed = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child output");
        if let Some(id) = line.strip_prefix("committed ") {
            let id: u64 = id.trim().parse().expect("an event id");
            last_committed = Some(id);
            if id >= 2_000 {
                break;
            }
        }
    }
    // SIGKILL while the child keeps appending: no shutdown, no final checkpoint.
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let last = last_committed.expect("the child committed appends");

    let store = open(dir.path());
    let log = store.events(&cid("c"), all()).await.expect("events");
    let ids: Vec<u64> = log.iter().map(|e| e.id).collect();
    println!(
        "child confirmed up to {last}; the log holds {} events",
        ids.len()
    );
    assert!(
        ids.len() as u64 > last,
        "every confirmed append survived (confirmed {last}, found {})",
        ids.len()
    );
    assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>(), "dense");
    assert_eq!(log, events(0..ids.len() as u64), "intact");
    let record = store.get(&cid("c")).await.expect("get").expect("exists");
    assert_eq!(record.next_event_id, ids.len() as u64);
    close(store).await;
}

/// One failing request in a batch fails alone; its neighbours commit.
#[tokio::test]
async fn a_failing_request_does_not_fail_its_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for id in ["a", "b"] {
        store
            .create(meta(id, "2024-01-01T00:00:00.000000Z"))
            .await
            .expect("create");
    }
    // Issued together, so they usually share one transaction.
    let first = store.append(&cid("a"), events(0..2));
    let gap = store.append(&cid("b"), events(5..6));
    let overlap = store.append(&cid("a"), events(1..3));
    let taken = store.create(meta("a", "2024-01-01T00:00:00.000000Z"));
    let second = store.append(&cid("a"), events(2..4));
    first.await.expect("first append");
    let gap = gap.await;
    assert!(
        matches!(&gap, Err(StoreError::Io(m)) if m.contains("continues at 0")),
        "{gap:?}"
    );
    let overlap = overlap.await;
    assert!(matches!(overlap, Err(StoreError::Io(_))), "{overlap:?}");
    assert!(matches!(taken.await, Err(StoreError::Exists(_))));
    second.await.expect("second append");
    assert_eq!(
        store.events(&cid("a"), all()).await.expect("events"),
        events(0..4)
    );
    assert!(store
        .events(&cid("b"), all())
        .await
        .expect("events")
        .is_empty());
    close(store).await;
}

/// A whole transaction failing (here: another process holds the write lock past the busy
/// timeout, 5 s) fails the batch with `Io`; the writer carries on, and reads are not held up
/// behind the stuck writer.
#[tokio::test]
async fn a_failed_batch_reports_io_and_the_writer_continues() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store
        .create(meta("c", "2024-01-01T00:00:00.000000Z"))
        .await
        .expect("create");
    store.append(&cid("c"), events(0..1)).await.expect("append");

    let locker = Connection::open(dir.path().join(DB_FILE_NAME)).expect("second connection");
    locker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");

    let blocked = store.append(&cid("c"), events(1..2));
    tokio::pin!(blocked);
    // Reads use their own connections and threads: they finish while the writer waits.
    let read = store.get(&cid("c"));
    tokio::select! {
        biased;
        record = read => {
            let record = record.expect("get").expect("exists");
            assert_eq!(record.next_event_id, 1);
        }
        _ = &mut blocked => panic!("the write finished before the read"),
    }

    let result = blocked.await;
    println!("failed batch: {result:?}");
    assert!(
        matches!(&result, Err(StoreError::Io(m)) if m.contains("locked")),
        "{result:?}"
    );

    locker.execute_batch("ROLLBACK").expect("release");
    drop(locker);
    store
        .append(&cid("c"), events(1..3))
        .await
        .expect("append after");
    assert!(store.set_title(&cid("c"), "y").await.expect("title after"));
    assert_eq!(
        store.events(&cid("c"), all()).await.expect("events"),
        events(0..3)
    );
    close(store).await;
}

/// Startup does not grow with the number of conversations. Durations are printed, not asserted.
#[tokio::test]
async fn open_stays_fast_with_100k_conversations() {
    const N: u64 = 100_000;
    const CHUNK: u64 = 5_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let tuning = StoreTuning {
        batch_max: 5_000,
        queue: 8_192,
    };
    let store = Arc::new(SqliteStore::open(dir.path(), &tuning).expect("open"));
    let started = Instant::now();
    for chunk in 0..N / CHUNK {
        let creates: Vec<_> = (chunk * CHUNK..(chunk + 1) * CHUNK)
            .map(|i| store.create(meta(&format!("conv-{i:06}"), &timestamp(i))))
            .collect();
        for result in join_all(creates).await {
            result.expect("create");
        }
    }
    store
        .append(&cid("conv-050000"), events(0..100))
        .await
        .expect("append");
    let fill = started.elapsed();
    let store = Arc::try_unwrap(store).expect("only handle");
    close(store).await;
    let size = std::fs::metadata(dir.path().join(DB_FILE_NAME))
        .expect("db file")
        .len();

    let t = Instant::now();
    let store = SqliteStore::open(dir.path(), &tuning).expect("reopen");
    let open_time = t.elapsed();

    let t = Instant::now();
    let page = store.list(0, 20).await.expect("list");
    let list_time = t.elapsed();
    let expected: Vec<String> = (N - 20..N).rev().map(|i| format!("conv-{i:06}")).collect();
    let got: Vec<String> = page
        .into_iter()
        .map(|m| m.conversation_id.to_string())
        .collect();
    assert_eq!(got, expected);

    let t = Instant::now();
    let record = store
        .get(&cid("conv-050000"))
        .await
        .expect("get")
        .expect("exists");
    let get_time = t.elapsed();
    assert_eq!(record.next_event_id, 100);

    let t = Instant::now();
    let deep = store.list(90_000, 20).await.expect("list");
    let deep_time = t.elapsed();
    assert_eq!(deep.len(), 20);
    assert_eq!(
        deep[0].conversation_id.as_str(),
        format!("conv-{:06}", N - 1 - 90_000)
    );

    println!(
        "100k conversations ({:.1} MiB): fill {fill:?}, open {open_time:?}, list(0,20) \
         {list_time:?}, get {get_time:?}, list(90000,20) {deep_time:?}",
        size as f64 / (1024.0 * 1024.0)
    );
    close(store).await;
}

/// A statement failing halfway through a request (here a trigger added behind the store's
/// back refuses event id 3) undoes that request alone: its earlier inserts are rolled back, its
/// conversation's `last_updated_at` stays, and its neighbours in the batch commit.
#[tokio::test]
async fn a_request_failing_halfway_is_undone_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let old = "2024-01-01T00:00:00.000000Z";
    for id in ["a", "b"] {
        store.create(meta(id, old)).await.expect("create");
    }
    let db = Connection::open(dir.path().join(DB_FILE_NAME)).expect("second connection");
    db.execute_batch(
        "CREATE TRIGGER refuse_3 BEFORE INSERT ON events WHEN NEW.id = 3 \
         BEGIN SELECT RAISE(ABORT, 'event 3 refused'); END;",
    )
    .expect("trigger");

    // Issued together, so they usually share one transaction.
    let first = store.append(&cid("a"), events(0..2));
    let halfway = store.append(&cid("b"), events(0..5));
    let created = store.create(meta("c", old));
    let second = store.append(&cid("a"), events(2..3));
    first.await.expect("first append");
    let halfway = halfway.await;
    assert!(
        matches!(&halfway, Err(StoreError::Io(m)) if m.contains("event 3 refused")),
        "{halfway:?}"
    );
    created.await.expect("create c");
    second.await.expect("second append");

    assert_eq!(
        store.events(&cid("a"), all()).await.expect("events"),
        events(0..3)
    );
    assert!(store
        .events(&cid("b"), all())
        .await
        .expect("events")
        .is_empty());
    let b = store.get(&cid("b")).await.expect("get").expect("exists");
    assert_eq!(b.next_event_id, 0);
    assert_eq!(
        b.meta.last_updated_at, old,
        "a failed append does not touch"
    );
    assert!(store.get(&cid("c")).await.expect("get").is_some());

    db.execute_batch("DROP TRIGGER refuse_3")
        .expect("drop trigger");
    store.append(&cid("b"), events(0..5)).await.expect("append");
    assert_eq!(
        store.events(&cid("b"), all()).await.expect("events"),
        events(0..5)
    );
    close(store).await;
}

/// A failure keeps its cause typed, with the same message: a statement SQLite refuses answers
/// with `StoreError::Io` whose source is SQLite's own error (its code, not only its text), and
/// unreadable stored settings with the JSON parser's error.
#[tokio::test]
async fn failures_keep_their_typed_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store
        .create(meta("a", "2024-01-01T00:00:00.000000Z"))
        .await
        .expect("create");
    let db = Connection::open(dir.path().join(DB_FILE_NAME)).expect("second connection");
    db.execute_batch(
        "CREATE TRIGGER refuse_1 BEFORE INSERT ON events WHEN NEW.id = 1 \
         BEGIN SELECT RAISE(ABORT, 'event 1 refused'); END;",
    )
    .expect("trigger");

    let refused = store
        .append(&cid("a"), events(0..2))
        .await
        .expect_err("the trigger refuses event 1");
    assert_eq!(refused.to_string(), "storage error: event 1 refused");
    let sqlite = cause_of::<rusqlite::Error>(&refused);
    assert_eq!(
        sqlite.sqlite_error_code(),
        Some(rusqlite::ErrorCode::ConstraintViolation),
        "{sqlite:?}"
    );

    db.execute_batch("INSERT INTO settings (user_id, json) VALUES ('u', '{not json')")
        .expect("corrupt settings");
    settings_unreadable_for_their_json(&store, "u").await;
    close(store).await;
}

/// Events need their conversation: appending to an unknown one stores nothing.
#[tokio::test]
async fn appending_to_an_unknown_conversation_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let refused = store.append(&cid("ghost"), events(0..2)).await;
    assert!(
        matches!(&refused, Err(StoreError::Io(m)) if m.contains("does not exist")),
        "{refused:?}"
    );
    store
        .append(&cid("ghost"), Vec::new())
        .await
        .expect("an empty append is a no-op");
    assert!(store.get(&cid("ghost")).await.expect("get").is_none());
    store
        .create(meta("ghost", "2024-01-01T00:00:00.000000Z"))
        .await
        .expect("create");
    let record = store
        .get(&cid("ghost"))
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        record.next_event_id, 0,
        "nothing was stored before the create"
    );
    assert!(store
        .events(&cid("ghost"), all())
        .await
        .expect("events")
        .is_empty());
    close(store).await;
}

fn seq_of(db: &Connection, id: &str) -> Option<i64> {
    use rusqlite::OptionalExtension;
    db.query_row("SELECT seq FROM conversations WHERE id = ?1", [id], |r| {
        r.get(0)
    })
    .optional()
    .expect("seq")
}

/// Deleting the newest conversation frees its seq for the next one (rowids restart from the
/// largest in use). The new conversation inherits nothing: no events, no `last_updated_at` from
/// an append to the old one in the same batch, no cached seq; and an id deleted and created
/// again in one batch gets the new row.
#[tokio::test]
async fn a_reused_seq_inherits_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let old = "2024-01-01T00:00:00.000000Z";
    let db = Connection::open(dir.path().join(DB_FILE_NAME)).expect("second connection");

    store.create(meta("x", old)).await.expect("create");
    store.append(&cid("x"), events(0..3)).await.expect("append");
    let x_seq = seq_of(&db, "x").expect("x has a seq");
    // Issued together, so they usually share one transaction.
    let append = store.append(&cid("x"), events(3..4));
    let delete = store.delete(&cid("x"));
    let create = store.create(meta("y", old));
    append.await.expect("append");
    assert!(delete.await.expect("delete"));
    create.await.expect("create");
    assert_eq!(seq_of(&db, "y"), Some(x_seq), "the seq was reused");
    let y = store.get(&cid("y")).await.expect("get").expect("exists");
    assert_eq!(y.next_event_id, 0);
    assert_eq!(y.meta.last_updated_at, old);
    assert!(store
        .events(&cid("y"), all())
        .await
        .expect("events")
        .is_empty());
    assert!(store.get(&cid("x")).await.expect("get").is_none());
    assert!(store
        .events(&cid("x"), all())
        .await
        .expect("events")
        .is_empty());
    store.append(&cid("y"), events(0..2)).await.expect("append");
    assert_eq!(
        store.events(&cid("y"), all()).await.expect("events"),
        events(0..2)
    );

    // The same id deleted and created again, then appended to, in one go.
    store.create(meta("r", old)).await.expect("create");
    store.append(&cid("r"), events(0..2)).await.expect("append");
    let delete = store.delete(&cid("r"));
    let create = store.create(meta("r", old));
    let append = store.append(&cid("r"), events(0..1));
    assert!(delete.await.expect("delete"));
    create.await.expect("re-create");
    append.await.expect("append to the new r");
    assert_eq!(
        store.events(&cid("r"), all()).await.expect("events"),
        events(0..1)
    );
    assert_eq!(
        store
            .get(&cid("r"))
            .await
            .expect("get")
            .expect("exists")
            .next_event_id,
        1
    );
    assert!(store.delete(&cid("x")).await.is_ok_and(|deleted| !deleted));
    close(store).await;
}

/// Writes a database file made by `sql` into `dir`; returns its path.
fn database_from(dir: &Path, sql: &str) -> std::path::PathBuf {
    let db = dir.join(DB_FILE_NAME);
    let conn = Connection::open(&db).expect("create");
    conn.execute_batch(sql).expect("schema");
    db
}

/// A file left by a pre-release build (schema version 1 in its first shape, keyed by the text
/// ids) is refused with the reason, not used.
#[test]
fn a_pre_release_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = database_from(
        dir.path(),
        r#"
            CREATE TABLE conversations (
                id TEXT PRIMARY KEY NOT NULL, title TEXT NOT NULL, created_at TEXT NOT NULL,
                last_updated_at TEXT NOT NULL, "trigger" TEXT NOT NULL, owner TEXT,
                init_json TEXT NOT NULL);
            CREATE INDEX conversations_newest_first ON conversations (created_at DESC, id DESC);
            CREATE TABLE events (conversation_id TEXT NOT NULL, id INTEGER NOT NULL,
                json TEXT NOT NULL, PRIMARY KEY (conversation_id, id)) WITHOUT ROWID;
            PRAGMA user_version = 1;
            PRAGMA application_id = 1398227524;
            "#,
    );
    let message = open_err(dir.path());
    println!("refusal: {message}");
    assert!(message.contains("schema"), "{message}");
    assert!(message.contains(&db.display().to_string()), "{message}");
}

/// A database of schema version 1 (before the settings table, the byte counts and the user
/// keys, without incremental auto-vacuum) is migrated in place when opened: its conversations
/// and events stay, each conversation's bytes are counted, settings and keys can be stored,
/// its conversations are listed by owner, and deletes give space back from then on.
#[tokio::test]
async fn a_version_1_database_is_migrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = database_from(
        dir.path(),
        r#"
            CREATE TABLE conversations (
                seq INTEGER PRIMARY KEY, id TEXT NOT NULL, title TEXT NOT NULL,
                created_at TEXT NOT NULL, last_updated_at TEXT NOT NULL, "trigger" TEXT NOT NULL,
                owner TEXT, init_json TEXT NOT NULL);
            CREATE UNIQUE INDEX conversations_by_id ON conversations (id);
            CREATE INDEX conversations_by_created_at ON conversations (created_at, id);
            CREATE TABLE events (conv_seq INTEGER NOT NULL, id INTEGER NOT NULL,
                json TEXT NOT NULL, PRIMARY KEY (conv_seq, id)) WITHOUT ROWID;
            INSERT INTO conversations VALUES (1, 'old', 'Old one', '2024-01-01T00:00:00.000000Z',
                '2024-01-01T00:00:00.000000Z', 'gui', NULL, '{}');
            INSERT INTO events VALUES (1, 0, '{"id":0,"source":"user","message":"hi"}');
            PRAGMA user_version = 1;
            PRAGMA application_id = 1398227524;
            "#,
    );
    let store = open(dir.path());
    let record = store.get(&cid("old")).await.expect("get").expect("kept");
    assert_eq!(record.meta.title, "Old one");
    assert_eq!(record.next_event_id, 1);
    let event = r#"{"id":0,"source":"user","message":"hi"}"#;
    assert_eq!(record.bytes, ("{}".len() + event.len()) as u64);
    assert_eq!(store.settings("").await.expect("settings"), None);
    store
        .save_settings("", json!({"language": "en"}))
        .await
        .expect("save");
    assert!(store.list_keys().await.expect("keys").is_empty());
    assert!(store
        .list_owned("alice", 0, 10)
        .await
        .expect("list")
        .is_empty());
    let key = switchboard::store::ApiKey {
        name: "alice".into(),
        admin: false,
        created_at: "2024-01-02T00:00:00.000000Z".into(),
    };
    store.add_key(key, "h".into()).await.expect("add key");
    assert!(store.lookup_key(Some("h")).await.expect("lookup").any);
    close(store).await;
    let conn = Connection::open(&db).expect("open");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("user_version");
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 4);
    let auto_vacuum: i64 = conn
        .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
        .expect("auto_vacuum");
    assert_eq!(auto_vacuum, 2, "incremental");
}

/// Deleting a conversation makes the database file smaller, not just emptier.
#[tokio::test]
async fn delete_gives_the_space_back_to_the_file_system() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let big = "b".repeat(4000);
    for c in 0..4 {
        let id = format!("c{c}");
        store
            .create(meta(&id, "2024-01-01T00:00:00.000000Z"))
            .await
            .expect("create");
        let events: Vec<StoredEvent> = (0..100)
            .map(|i| EventBody::message(Source::User, &big, json!([]), false).stamp(i, "t"))
            .collect();
        store.append(&cid(&id), events).await.expect("append");
    }
    store.flush().await.expect("flush");
    let size = |store: &SqliteStore| {
        let db = std::fs::metadata(store.path()).map_or(0, |m| m.len());
        let wal = std::fs::metadata(store.path().with_extension("db-wal")).map_or(0, |m| m.len());
        db + wal
    };
    let used = store.used_bytes();
    let before = size(&store);
    for c in 0..3 {
        assert!(store.delete(&cid(format!("c{c}"))).await.expect("delete"));
    }
    store.flush().await.expect("flush");
    let after = size(&store);
    eprintln!("database + WAL: {before} bytes before deleting 3 of 4 conversations, {after} after");
    assert!(after < before / 2, "{after} !< {before} / 2");
    assert!(store.used_bytes() < used / 2);
    assert_eq!(
        store
            .events(&cid("c3"), EventQuery::after(None, 1000))
            .await
            .expect("events")
            .len(),
        100
    );
}
