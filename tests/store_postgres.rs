//! What only the PostgreSQL store promises: data survives a reopen, the schema is versioned
//! (a newer one, or a database holding other tables, is refused with a clear message and never
//! started on), several stores opening one database at once migrate it once, a server that cannot
//! be reached is a clear error that never shows the password, and a group commit keeps every
//! conversation's log dense. Each test uses a fresh database (see `tests/pg`); without a server
//! they print SKIPPED.

mod common;
mod pg;
use common::{cause_of, cid, meta, settings_unreadable_for_their_json};

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;
use switchboard::config::{PostgresSettings, StoreTuning};
use switchboard::events::{EventBody, Source, StoredEvent};
use switchboard::store::postgres::SCHEMA_VERSION;
use switchboard::store::{EventQuery, PostgresStore, Store, StoreError};

fn settings(url: &str) -> PostgresSettings {
    PostgresSettings {
        url: url.to_string(),
        pool_size: 4,
    }
}

fn tuning() -> StoreTuning {
    StoreTuning {
        batch_max: 512,
        queue: 1024,
    }
}

fn open(url: &str) -> PostgresStore {
    PostgresStore::open(&settings(url), &tuning()).expect("open")
}

fn open_err(url: &str) -> String {
    match PostgresStore::open(&settings(url), &tuning()) {
        Err(StoreError::Open(message)) => message.to_string(),
        Err(other) => panic!("expected StoreError::Open, got {other:?}"),
        Ok(store) => panic!("expected the open to be refused, got {store:?}"),
    }
}

async fn close(store: PostgresStore) {
    tokio::time::timeout(Duration::from_secs(30), store.close())
        .await
        .expect("the store's thread exits after the last handle is dropped");
}

fn event(id: u64) -> StoredEvent {
    EventBody::message(Source::Agent, &format!("reply {id}"), json!([]), false)
        .stamp(id, "2024-05-01T12:00:00.000000")
}

fn all() -> EventQuery {
    EventQuery::after(None, usize::MAX)
}

const T0: &str = "2024-01-01T00:00:00.000000Z";

#[tokio::test]
async fn data_survives_a_reopen_and_the_schema_is_migrated_once() {
    let Some(db) = pg::database() else { return };
    let store = open(&db.url);
    store.create(meta("c1", T0)).await.expect("create");
    store
        .append(&cid("c1"), (0..3).map(event).collect())
        .await
        .expect("append");
    store
        .save_settings("alice", json!({"llm_model": "m"}))
        .await
        .expect("settings");
    close(store).await;

    let store = open(&db.url);
    let record = store.get(&cid("c1")).await.expect("get").expect("kept");
    assert_eq!(record.next_event_id, 3);
    let stored = store.events(&cid("c1"), all()).await.expect("events");
    assert_eq!(stored, (0..3).map(event).collect::<Vec<_>>());
    assert_eq!(
        store.settings("alice").await.expect("settings"),
        Some(json!({"llm_model": "m"}))
    );
    close(store).await;
}

#[tokio::test]
async fn a_newer_schema_is_refused_and_left_alone() {
    let Some(db) = pg::database() else { return };
    let store = open(&db.url);
    store.create(meta("c1", T0)).await.expect("create");
    close(store).await;
    let newer = SCHEMA_VERSION + 1;
    db.execute(&format!("UPDATE switchboard_schema SET version = {newer}"));
    let message = open_err(&db.url);
    assert!(
        message.contains(&format!("schema version {newer}")) && message.contains("newer"),
        "{message}"
    );
    // Nothing was touched: back at the known version, the data is there.
    db.execute(&format!(
        "UPDATE switchboard_schema SET version = {SCHEMA_VERSION}"
    ));
    let store = open(&db.url);
    assert!(store.get(&cid("c1")).await.expect("get").is_some());
    close(store).await;
}

#[tokio::test]
async fn another_programs_tables_are_refused() {
    let Some(db) = pg::database() else { return };
    db.execute("CREATE TABLE invoices (id INT PRIMARY KEY)");
    let message = open_err(&db.url);
    assert!(
        message.contains("not switchboard's") && message.contains("invoices"),
        "{message}"
    );
    // And nothing of switchboard's was created next to them.
    db.execute(
        "DO $$ BEGIN IF to_regclass('conversations') IS NOT NULL \
         OR to_regclass('switchboard_schema') IS NOT NULL \
         THEN RAISE EXCEPTION 'switchboard created tables'; END IF; END $$",
    );
}

#[tokio::test]
async fn stores_opening_one_database_at_once_migrate_it_once() {
    let Some(db) = pg::database() else { return };
    let url = db.url.clone();
    let opened: Vec<PostgresStore> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| open(&url))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("open"))
            .collect()
    });
    opened[0].create(meta("c1", T0)).await.expect("create");
    for store in &opened {
        assert!(store.get(&cid("c1")).await.expect("get").is_some());
    }
    for store in opened {
        close(store).await;
    }
}

/// A port nothing listens on (bound, then released).
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error_without_the_password() {
    let port = unused_port();
    let url = format!("postgres://sb:hunter2@127.0.0.1:{port}/switchboard");
    let message = open_err(&url);
    assert!(
        message.contains(&format!("postgres://sb@127.0.0.1:{port}/switchboard"))
            && message.contains("cannot connect"),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");
}

#[tokio::test]
async fn a_group_commit_of_many_conversations_keeps_every_log_dense() {
    let Some(db) = pg::database() else { return };
    let store = open(&db.url);
    let ids: Vec<String> = (0..50).map(|i| format!("c{i:02}")).collect();
    join_all(ids.iter().map(|id| store.create(meta(id, T0))))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .expect("create");
    // Many appends to many conversations queued at once: they share transactions.
    let mut appends = Vec::new();
    for round in 0..10u64 {
        for id in &ids {
            appends.push(store.append(&cid(id), vec![event(round)]));
        }
    }
    // One bad append in the middle fails alone.
    appends.push(store.append(&cid("c00"), vec![event(42)]));
    let outcomes = join_all(appends).await;
    let (bad, good) = outcomes.split_last().expect("outcomes");
    assert!(good.iter().all(Result::is_ok), "{good:?}");
    assert!(
        matches!(bad, Err(StoreError::Io(m)) if m.contains("continues at 10")),
        "{bad:?}"
    );
    assert!(matches!(
        store.append(&cid("nobody"), vec![event(0)]).await,
        Err(StoreError::Io(m)) if m.contains("does not exist")
    ));
    for id in &ids {
        let stored = store.events(&cid(id), all()).await.expect("events");
        assert_eq!(stored, (0..10).map(event).collect::<Vec<_>>(), "{id}");
    }
    close(store).await;
}

/// A failure keeps its cause typed, with the same message: a statement PostgreSQL refuses
/// answers with `StoreError::Io` whose source is the driver's error carrying the server's own
/// (its SQLSTATE, not only its text), and unreadable stored settings with the JSON parser's
/// error.
#[tokio::test]
async fn failures_keep_their_typed_cause() {
    let Some(db) = pg::database() else { return };
    let store = open(&db.url);
    store.create(meta("a", T0)).await.expect("create");
    db.execute(
        "CREATE FUNCTION refuse_1() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.id = 1 THEN RAISE EXCEPTION 'event 1 refused'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_1 BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_1();",
    );

    let refused = store
        .append(&cid("a"), vec![event(0), event(1)])
        .await
        .expect_err("the trigger refuses event 1");
    assert!(
        refused.to_string().starts_with("storage error: ")
            && refused.to_string().contains("event 1 refused"),
        "{refused}"
    );
    let server = cause_of::<tokio_postgres::Error>(&refused)
        .as_db_error()
        .expect("the server's error");
    assert_eq!(server.message(), "event 1 refused");
    assert_eq!(
        server.code(),
        &tokio_postgres::error::SqlState::RAISE_EXCEPTION
    );

    db.execute("INSERT INTO settings (user_id, json) VALUES ('u', '{not json')");
    settings_unreadable_for_their_json(&store, "u").await;
    close(store).await;
}

/// A refused open keeps the driver's error as the cause (here: the connection refused).
#[tokio::test]
async fn a_refused_open_keeps_the_drivers_error() {
    let url = format!("postgres://sb@127.0.0.1:{}/switchboard", unused_port());
    let Err(refused) = PostgresStore::open(&settings(&url), &tuning()) else {
        panic!("opened a store where no server listens")
    };
    assert!(matches!(refused, StoreError::Open(_)), "{refused:?}");
    assert!(refused.to_string().contains("cannot connect"), "{refused}");
    cause_of::<tokio_postgres::Error>(&refused);
}
