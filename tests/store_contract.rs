//! The `Store` contract, written once and run against every backend: the in-memory store, the
//! SQLite store (with the default tuning, and with tiny queues so that back-pressure and
//! one-request batches are exercised too) and the PostgreSQL store (likewise; skipped without a
//! PostgreSQL server, see `tests/pg`). SQLite stores live in real files in a temp dir, PostgreSQL
//! stores in a fresh database each.

mod common;
mod pg;
use common::{cid, meta};

use std::sync::Arc;

use serde_json::json;
use switchboard::config::{PostgresSettings, StoreTuning};
use switchboard::conversation::{ConversationMeta, InitData};
use switchboard::events::{EventBody, Source, StoredEvent};
use switchboard::store::{
    events_bytes, meta_bytes, ApiKey, EventQuery, Existing, KeyLookup, MemoryStore, PostgresStore,
    Quota, SqliteStore, Store, StoreError, StoreLimits,
};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A store under test and whatever must outlive it.
struct Fixture<S> {
    store: Arc<S>,
    _dir: Option<TempDir>,
    _db: Option<pg::TestDatabase>,
}

/// A fixture, or `None` when the backend is not available here (the test is skipped).
trait MaybeFixture<S> {
    fn fixture(self) -> Option<Fixture<S>>;
}

impl<S> MaybeFixture<S> for Fixture<S> {
    fn fixture(self) -> Option<Fixture<S>> {
        Some(self)
    }
}

impl<S> MaybeFixture<S> for Option<Fixture<S>> {
    fn fixture(self) -> Option<Fixture<S>> {
        self
    }
}

fn memory() -> Fixture<MemoryStore> {
    Fixture {
        store: Arc::new(MemoryStore::new()),
        _dir: None,
        _db: None,
    }
}

fn memory_limited(limits: StoreLimits) -> Fixture<MemoryStore> {
    Fixture {
        store: Arc::new(MemoryStore::with_limits(limits)),
        _dir: None,
        _db: None,
    }
}

fn sqlite_with(batch_max: usize, queue: usize) -> Fixture<SqliteStore> {
    sqlite_limited_with(batch_max, queue, StoreLimits::default())
}

fn sqlite_limited_with(
    batch_max: usize,
    queue: usize,
    limits: StoreLimits,
) -> Fixture<SqliteStore> {
    let dir = tempfile::tempdir().expect("tempdir");
    let tuning = StoreTuning { batch_max, queue };
    let store = SqliteStore::open_with(dir.path(), &tuning, limits).expect("open");
    Fixture {
        store: Arc::new(store),
        _dir: Some(dir),
        _db: None,
    }
}

fn sqlite_limited(limits: StoreLimits) -> Fixture<SqliteStore> {
    sqlite_limited_with(512, 1024, limits)
}

fn sqlite_tiny_limited(limits: StoreLimits) -> Fixture<SqliteStore> {
    sqlite_limited_with(1, 1, limits)
}

fn sqlite_small_limited(limits: StoreLimits) -> Fixture<SqliteStore> {
    sqlite_limited_with(3, 2, limits)
}

/// A PostgreSQL store on a fresh database; `None` (test skipped) without a server.
fn postgres_limited_with(
    batch_max: usize,
    queue: usize,
    limits: StoreLimits,
) -> Option<Fixture<PostgresStore>> {
    let db = pg::database()?;
    let settings = PostgresSettings {
        url: db.url.clone(),
        pool_size: 4,
    };
    let tuning = StoreTuning { batch_max, queue };
    let store = PostgresStore::open_with(&settings, &tuning, limits).expect("open");
    Some(Fixture {
        store: Arc::new(store),
        _dir: None,
        _db: Some(db),
    })
}

fn postgres() -> Option<Fixture<PostgresStore>> {
    postgres_limited_with(512, 1024, StoreLimits::default())
}

fn postgres_tiny() -> Option<Fixture<PostgresStore>> {
    postgres_limited_with(1, 1, StoreLimits::default())
}

fn postgres_limited(limits: StoreLimits) -> Option<Fixture<PostgresStore>> {
    postgres_limited_with(512, 1024, limits)
}

fn postgres_tiny_limited(limits: StoreLimits) -> Option<Fixture<PostgresStore>> {
    postgres_limited_with(1, 1, limits)
}

fn sqlite() -> Fixture<SqliteStore> {
    sqlite_with(512, 1024)
}

fn sqlite_tiny() -> Fixture<SqliteStore> {
    sqlite_with(1, 1)
}

fn sqlite_small() -> Fixture<SqliteStore> {
    sqlite_with(3, 2)
}

const OLD: &str = "2020-01-01T00:00:00.000000Z";

fn rich_meta(id: &str) -> ConversationMeta {
    ConversationMeta {
        owner: Some("alice".into()),
        trigger: switchboard::conversation::Trigger::SuggestedTask,
        init: InitData {
            repository: Some("octo/repo".into()),
            selected_branch: Some("main".into()),
            git_provider: Some("github".into()),
            conversation_instructions: Some("be brief".into()),
            mcp_config: Some(json!({"servers": [{"name": "x", "env": {"TOKEN": "s3cr3t"}}]})),
            initial_user_msg: Some("hello ✓".into()),
            image_urls: vec!["https://example.com/a.png".into()],
            replay_events: vec![json!({"action": "message", "args": {"content": "hi"}})],
            suggested_task: Some(json!({"title": "Fix it"})),
            create_microagent: None,
        },
        ..meta(id, OLD)
    }
}

fn event(id: u64) -> StoredEvent {
    EventBody::message(Source::User, &format!("message {id}"), json!([]), false)
        .stamp(id, "2024-05-01T12:00:00.000000")
}

fn events(ids: std::ops::Range<u64>) -> Vec<StoredEvent> {
    ids.map(event).collect()
}

fn ids(events: &[StoredEvent]) -> Vec<u64> {
    events.iter().map(|e| e.id).collect()
}

fn query(start_id: u64, end_id: Option<u64>, reverse: bool, limit: usize) -> EventQuery {
    EventQuery {
        start_id,
        end_id,
        reverse,
        limit,
    }
}

fn all() -> EventQuery {
    EventQuery::after(None, usize::MAX)
}

fn is_meta_timestamp(s: &str) -> bool {
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.6fZ").is_ok()
        && s.len() == "2024-05-01T12:00:00.000000Z".len()
}

// ---------------------------------------------------------------------------------------------
// The contract

/// `exists` answers what `get` would (the conversation or nothing, and its owner) without
/// loading it: before its create, with and without an owner, with events, after its delete.
async fn exists_tells_existence_and_owner<S: Store>(store: Arc<S>) {
    async fn both<S: Store>(store: &S, id: &str) -> (Option<Existing>, Option<Option<String>>) {
        let id = cid(id);
        let existing = store.exists(&id).await.expect("exists");
        let record = store.get(&id).await.expect("get");
        (existing, record.map(|r| r.meta.owner))
    }
    let owned = |owner: Option<&str>| {
        Some(Existing {
            owner: owner.map(str::to_string),
        })
    };
    assert_eq!(both(&*store, "c1").await, (None, None));
    store.create(rich_meta("c1")).await.expect("create c1");
    store.create(meta("c2", OLD)).await.expect("create c2");
    store
        .create_with_events(meta("c3", OLD), events(0..3))
        .await
        .expect("create c3");
    let alice = Some(Some("alice".to_string()));
    assert_eq!(both(&*store, "c1").await, (owned(Some("alice")), alice));
    assert_eq!(both(&*store, "c2").await, (owned(None), Some(None)));
    assert_eq!(both(&*store, "c3").await, (owned(None), Some(None)));
    assert!(store.delete(&cid("c1")).await.expect("delete"));
    assert_eq!(both(&*store, "c1").await, (None, None));
    assert_eq!(both(&*store, "c2").await, (owned(None), Some(None)));
}

async fn create_then_exists<S: Store>(store: Arc<S>) {
    let m = rich_meta("c1");
    store.create(m.clone()).await.expect("create");
    let again = store.create(meta("c1", OLD)).await;
    assert!(
        matches!(&again, Err(StoreError::Exists(id)) if id == "c1"),
        "{again:?}"
    );
    // The first create's data is untouched.
    let record = store.get(&cid("c1")).await.expect("get").expect("exists");
    assert_eq!(record.meta, m);
    // Another id is fine.
    store.create(meta("c2", OLD)).await.expect("create c2");
}

/// A conversation created with its first events is one write: both land, or neither does.
async fn create_with_events<S: Store>(store: Arc<S>) {
    let m = rich_meta("w");
    store
        .create_with_events(m.clone(), events(0..3))
        .await
        .expect("create with events");
    let record = store.get(&cid("w")).await.expect("get").expect("exists");
    assert_eq!(record.next_event_id, 3);
    let init = serde_json::to_string(&m.init).expect("json");
    assert_eq!(
        record.bytes,
        meta_bytes(&init) + events_bytes(&events(0..3))
    );
    assert_eq!(record.meta.title, m.title);
    assert_eq!(record.meta.created_at, m.created_at);
    assert!(
        record.meta.last_updated_at > m.last_updated_at,
        "its events move last_updated_at: {}",
        record.meta.last_updated_at
    );
    assert_eq!(
        ids(&store.events(&cid("w"), all()).await.expect("events")),
        [0, 1, 2]
    );
    store
        .append(&cid("w"), events(3..4))
        .await
        .expect("the log goes on");

    // Taken: refused, and neither the metadata nor the log changes.
    let again = store.create_with_events(meta("w", OLD), events(0..2)).await;
    assert!(
        matches!(&again, Err(StoreError::Exists(id)) if id == "w"),
        "{again:?}"
    );
    let after = store.get(&cid("w")).await.expect("get").expect("exists");
    assert_eq!((after.meta.title, after.next_event_id), (m.title, 4));

    // A first event that is not id 0 is refused with nothing written.
    let gap = store
        .create_with_events(meta("gap", OLD), events(1..3))
        .await;
    assert!(gap.is_err(), "{gap:?}");
    assert_eq!(store.get(&cid("gap")).await.expect("get"), None);
    assert!(store
        .events(&cid("gap"), all())
        .await
        .expect("events")
        .is_empty());
}

/// Init data that fits with events that would not: the conversation is never created.
async fn create_with_events_quota<S: Store>(store: Arc<S>) {
    let limit = store.limits().max_bytes_per_conversation as usize;
    let first = vec![big_event(0, limit / 2), big_event(1, limit / 2)];
    let refused = store
        .create_with_events(meta("over", OLD), first)
        .await
        .expect_err("over the quota");
    assert_eq!(quota_of(refused), Quota::Conversation);
    assert_eq!(store.get(&cid("over")).await.expect("get"), None);
    assert!(store
        .events(&cid("over"), all())
        .await
        .expect("events")
        .is_empty());
    let fits = vec![big_event(0, limit / 4)];
    store
        .create_with_events(meta("over", OLD), fits)
        .await
        .expect("the same id with events that fit");
    assert_eq!(
        store
            .get(&cid("over"))
            .await
            .expect("get")
            .map(|r| r.next_event_id),
        Some(1)
    );
}

async fn get_and_next_event_id<S: Store>(store: Arc<S>) {
    assert_eq!(store.get(&cid("nope")).await.expect("get"), None);
    let m = rich_meta("g");
    store.create(m.clone()).await.expect("create");
    let record = store.get(&cid("g")).await.expect("get").expect("exists");
    assert_eq!(record.meta, m, "metadata round-trips, init data included");
    assert_eq!(record.next_event_id, 0);

    store.append(&cid("g"), events(0..3)).await.expect("append");
    let record = store.get(&cid("g")).await.expect("get").expect("exists");
    assert_eq!(record.next_event_id, 3);
    store.append(&cid("g"), events(3..4)).await.expect("append");
    store
        .append(&cid("g"), Vec::new())
        .await
        .expect("empty append");
    let record = store.get(&cid("g")).await.expect("get").expect("exists");
    assert_eq!(record.next_event_id, 4);
}

async fn append_and_query<S: Store>(store: Arc<S>) {
    store.create(meta("q", OLD)).await.expect("create");
    store.append(&cid("q"), events(0..4)).await.expect("append");
    store
        .append(&cid("q"), events(4..10))
        .await
        .expect("append");

    // JSON text is stored byte for byte.
    let got = store.events(&cid("q"), all()).await.expect("events");
    assert_eq!(got, events(0..10));

    let cases: Vec<(EventQuery, Vec<u64>)> = vec![
        // start inclusive, end inclusive
        (query(3, Some(6), false, 100), vec![3, 4, 5, 6]),
        (query(3, Some(3), false, 100), vec![3]),
        (query(0, None, false, 3), vec![0, 1, 2]),
        (query(7, None, false, 100), vec![7, 8, 9]),
        // reverse: newest first, the newest `limit` of the range
        (query(3, Some(6), true, 2), vec![6, 5]),
        (query(0, None, true, 3), vec![9, 8, 7]),
        (query(0, None, true, 100), (0..10).rev().collect()),
        (query(8, Some(100), true, 100), vec![9, 8]),
        // empty ranges
        (query(10, None, false, 100), vec![]),
        (query(6, Some(3), false, 100), vec![]),
        (query(6, Some(3), true, 100), vec![]),
        (query(0, None, false, 0), vec![]),
        (query(u64::MAX, None, false, 100), vec![]),
        (query(2, Some(u64::MAX), false, 2), vec![2, 3]),
        // the helper used by the API: after an id, exclusive
        (EventQuery::after(Some(7), 100), vec![8, 9]),
        (EventQuery::after(None, 2), vec![0, 1]),
    ];
    for (q, expected) in cases {
        let got = store.events(&cid("q"), q).await.expect("events");
        assert_eq!(ids(&got), expected, "{q:?}");
        for e in &got {
            assert_eq!(e, &event(e.id), "event {} round-trips", e.id);
        }
    }
    assert!(store
        .events(&cid("unknown"), all())
        .await
        .expect("events")
        .is_empty());
}

async fn append_moves_last_updated_at<S: Store>(store: Arc<S>) {
    store.create(meta("u", OLD)).await.expect("create");
    store.append(&cid("u"), events(0..1)).await.expect("append");
    let record = store.get(&cid("u")).await.expect("get").expect("exists");
    assert_ne!(record.meta.last_updated_at, OLD);
    assert!(
        is_meta_timestamp(&record.meta.last_updated_at),
        "{}",
        record.meta.last_updated_at
    );
    assert!(record.meta.last_updated_at.as_str() > OLD);
    assert_eq!(record.meta.created_at, OLD, "created_at never moves");
}

async fn list_order_and_paging<S: Store>(store: Arc<S>) {
    assert!(store.list(0, 20).await.expect("list").is_empty());
    let day1 = "2024-01-01T00:00:00.000000Z";
    let day2 = "2024-01-02T00:00:00.000000Z";
    let day0 = "2023-12-31T23:59:59.999999Z";
    for (id, at) in [
        ("a", day1),
        ("c", day2),
        ("d", day0),
        ("b", day1),
        ("0", day2),
    ] {
        store.create(meta(id, at)).await.expect("create");
    }
    let page = |offset, limit| {
        let store = store.clone();
        async move {
            store
                .list(offset, limit)
                .await
                .expect("list")
                .into_iter()
                .map(|m| m.conversation_id)
                .collect::<Vec<_>>()
        }
    };
    // Newest created_at first; equal created_at: larger id first.
    assert_eq!(page(0, 20).await, ["c", "0", "b", "a", "d"]);
    assert_eq!(page(0, 2).await, ["c", "0"]);
    assert_eq!(page(2, 2).await, ["b", "a"]);
    assert_eq!(page(4, 2).await, ["d"]);
    assert!(page(5, 2).await.is_empty());
    assert!(page(0, 0).await.is_empty());
    assert_eq!(page(1, usize::MAX).await, ["0", "b", "a", "d"]);
    assert!(page(usize::MAX, 5).await.is_empty());

    // Listing returns whole metadata; appends don't reorder (created_at is the key).
    store.append(&cid("d"), events(0..2)).await.expect("append");
    let listed = store.list(0, 20).await.expect("list");
    assert_eq!(listed[4].conversation_id, "d");
    assert_eq!(
        listed[4],
        store
            .get(&cid("d"))
            .await
            .expect("get")
            .expect("exists")
            .meta
    );
}

async fn set_title<S: Store>(store: Arc<S>) {
    store.create(meta("t", OLD)).await.expect("create");
    assert!(store
        .set_title(&cid("t"), "New title")
        .await
        .expect("set_title"));
    let record = store.get(&cid("t")).await.expect("get").expect("exists");
    assert_eq!(record.meta.title, "New title");
    assert!(record.meta.last_updated_at.as_str() > OLD);
    assert!(is_meta_timestamp(&record.meta.last_updated_at));
    assert!(!store
        .set_title(&cid("unknown"), "x")
        .await
        .expect("set_title"));
    assert_eq!(store.get(&cid("unknown")).await.expect("get"), None);
}

async fn delete_removes_only_one<S: Store>(store: Arc<S>) {
    for id in ["keep1", "gone", "keep2"] {
        store.create(rich_meta(id)).await.expect("create");
        store.append(&cid(id), events(0..5)).await.expect("append");
    }
    let before1 = store.get(&cid("keep1")).await.expect("get");
    let before2 = store.get(&cid("keep2")).await.expect("get");

    assert!(store.delete(&cid("gone")).await.expect("delete"));
    assert_eq!(store.get(&cid("gone")).await.expect("get"), None);
    assert!(store
        .events(&cid("gone"), all())
        .await
        .expect("events")
        .is_empty());
    assert!(!store.delete(&cid("gone")).await.expect("delete again"));
    assert!(!store
        .delete(&cid("never-existed"))
        .await
        .expect("delete unknown"));

    assert_eq!(store.get(&cid("keep1")).await.expect("get"), before1);
    assert_eq!(store.get(&cid("keep2")).await.expect("get"), before2);
    for id in ["keep1", "keep2"] {
        assert_eq!(
            store.events(&cid(id), all()).await.expect("events"),
            events(0..5)
        );
    }
    let listed: Vec<String> = store
        .list(0, 20)
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.conversation_id.to_string())
        .collect();
    assert_eq!(listed, ["keep2", "keep1"]);

    // The id can be used again, starting from an empty log.
    store.create(meta("gone", OLD)).await.expect("re-create");
    let record = store.get(&cid("gone")).await.expect("get").expect("exists");
    assert_eq!(record.next_event_id, 0);
}

/// Appends issued without awaiting in between complete in call order, and "append k completed"
/// means every earlier append is readable. The futures are spawned in REVERSE order, so a
/// backend that queued requests when first polled (instead of when called) would fail.
async fn append_fifo<S: Store>(store: Arc<S>, reverse_spawn: bool) {
    const N: u64 = 300;
    store.create(meta("fifo", OLD)).await.expect("create");
    store.create(meta("other", OLD)).await.expect("create");
    let mut calls = Vec::new();
    let mut titles = Vec::new();
    let mut next = 0;
    for i in 0..N {
        // Mix one- and multi-event appends, and interleave another conversation's writes.
        let n = 1 + i % 3;
        calls.push((
            next + n - 1,
            store.append(&cid("fifo"), events(next..next + n)),
        ));
        next += n;
        if i % 10 == 0 {
            titles.push(store.set_title(&cid("other"), &format!("title {i}")));
        }
    }
    let mut tasks = Vec::new();
    let mut order: Vec<_> = calls.into_iter().collect();
    if reverse_spawn {
        order.reverse();
    }
    for (last_id, future) in order {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            future.await.expect("append");
            let seen = store
                .events(&cid("fifo"), query(0, Some(last_id), false, usize::MAX))
                .await
                .expect("events");
            assert_eq!(
                ids(&seen),
                (0..=last_id).collect::<Vec<_>>(),
                "append ending at {last_id} completed before an earlier one"
            );
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    for title in titles {
        assert!(title.await.expect("set_title"));
    }
    let log = store.events(&cid("fifo"), all()).await.expect("events");
    assert_eq!(
        ids(&log),
        (0..next).collect::<Vec<_>>(),
        "dense and ordered"
    );
    assert_eq!(log, events(0..next));
    let record = store.get(&cid("fifo")).await.expect("get").expect("exists");
    assert_eq!(record.next_event_id, next);
    store.flush().await.expect("flush");
}

async fn flush_completes<S: Store>(store: Arc<S>) {
    store.flush().await.expect("flush on an idle store");
    let pending: Vec<_> = (0..50)
        .map(|i| store.create(meta(&format!("f{i}"), OLD)))
        .collect();
    store.flush().await.expect("flush");
    // Everything accepted before the flush is done by now.
    assert_eq!(store.list(0, 100).await.expect("list").len(), 50);
    for p in pending {
        p.await.expect("create");
    }
}

// ---------------------------------------------------------------------------------------------
// One module of tests per backend

async fn settings_round_trip<S: Store>(store: Arc<S>) {
    assert_eq!(store.settings("").await.expect("settings"), None);
    let first = json!({"llm_model": "a/b", "llm_api_key": "sk-1", "language": "en ✓"});
    store.save_settings("", first.clone()).await.expect("save");
    assert_eq!(store.settings("").await.expect("settings"), Some(first));
    // A save replaces the whole document, and users are kept apart.
    let second = json!({"llm_model": "c/d"});
    store.save_settings("", second.clone()).await.expect("save");
    store
        .save_settings("alice", json!({"agent": "X"}))
        .await
        .expect("save");
    assert_eq!(store.settings("").await.expect("settings"), Some(second));
    assert_eq!(
        store.settings("alice").await.expect("settings"),
        Some(json!({"agent": "X"}))
    );
    assert_eq!(store.settings("bob").await.expect("settings"), None);
    // Settings are not conversations.
    assert!(store.list(0, 10).await.expect("list").is_empty());
}

fn owned(id: &str, at: &str, owner: Option<&str>) -> ConversationMeta {
    ConversationMeta {
        owner: owner.map(str::to_string),
        ..meta(id, at)
    }
}

/// `list_owned` lists one owner's conversations in `list`'s order, with paging.
async fn list_owned_filters_by_owner<S: Store>(store: Arc<S>) {
    let day1 = "2024-01-01T00:00:00.000000Z";
    let day2 = "2024-01-02T00:00:00.000000Z";
    for (id, at, owner) in [
        ("a1", day1, Some("alice")),
        ("b1", day1, Some("bob")),
        ("a2", day2, Some("alice")),
        ("n1", day2, None),
        ("a3", day1, Some("alice")),
    ] {
        store.create(owned(id, at, owner)).await.expect("create");
    }
    let page = |owner: &'static str, offset, limit| {
        let store = store.clone();
        async move {
            store
                .list_owned(owner, offset, limit)
                .await
                .expect("list_owned")
                .into_iter()
                .map(|m| m.conversation_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page("alice", 0, 20).await, ["a2", "a3", "a1"]);
    assert_eq!(page("alice", 1, 1).await, ["a3"]);
    assert_eq!(page("bob", 0, 20).await, ["b1"]);
    assert!(page("carol", 0, 20).await.is_empty());
    // An owner is matched exactly, never by prefix or case.
    assert!(page("Alice", 0, 20).await.is_empty());
    assert!(page("ali", 0, 20).await.is_empty());
    let listed = store.list_owned("bob", 0, 1).await.expect("list_owned");
    assert_eq!(
        listed[0],
        store
            .get(&cid("b1"))
            .await
            .expect("get")
            .expect("exists")
            .meta
    );
    assert_eq!(store.list(0, 20).await.expect("list").len(), 5);
}

fn key(name: &str, admin: bool) -> ApiKey {
    ApiKey {
        name: name.to_string(),
        admin,
        created_at: "2024-05-01T12:00:00.000000Z".to_string(),
    }
}

/// Keys: added by hash, listed by name, found by hash, names unique, revoked for good.
async fn keys_round_trip<S: Store>(store: Arc<S>) {
    assert_eq!(
        store.lookup_key(None).await.expect("lookup"),
        KeyLookup::default()
    );
    assert_eq!(
        store.lookup_key(Some("h-alice")).await.expect("lookup"),
        KeyLookup::default()
    );
    assert!(store.list_keys().await.expect("list").is_empty());
    store
        .add_key(key("bob", true), "h-bob".into())
        .await
        .expect("add");
    store
        .add_key(key("alice", false), "h-alice".into())
        .await
        .expect("add");
    assert_eq!(
        store.list_keys().await.expect("list"),
        [key("alice", false), key("bob", true)]
    );
    assert_eq!(
        store.lookup_key(Some("h-alice")).await.expect("lookup"),
        KeyLookup {
            key: Some(key("alice", false)),
            any: true
        }
    );
    assert_eq!(
        store.lookup_key(Some("h-bob")).await.expect("lookup").key,
        Some(key("bob", true))
    );
    assert_eq!(
        store.lookup_key(Some("h-nobody")).await.expect("lookup"),
        KeyLookup {
            key: None,
            any: true
        }
    );
    assert!(store.lookup_key(None).await.expect("lookup").any);

    // A taken name is refused and changes nothing (not even with another hash).
    match store.add_key(key("alice", true), "h-other".into()).await {
        Err(StoreError::KeyExists(name)) => assert_eq!(name, "alice"),
        other => panic!("expected KeyExists, got {other:?}"),
    }
    assert_eq!(
        store.lookup_key(Some("h-other")).await.expect("lookup").key,
        None
    );
    assert_eq!(store.list_keys().await.expect("list").len(), 2);

    // Revoked: gone at once; unknown names are `false`; the name can be used again.
    assert!(store.revoke_key("alice").await.expect("revoke"));
    assert!(!store.revoke_key("alice").await.expect("revoke"));
    assert!(!store.revoke_key("carol").await.expect("revoke"));
    assert_eq!(
        store.lookup_key(Some("h-alice")).await.expect("lookup").key,
        None
    );
    assert_eq!(store.list_keys().await.expect("list"), [key("bob", true)]);
    store
        .add_key(key("alice", false), "h-alice-2".into())
        .await
        .expect("add again");
    assert_eq!(
        store
            .lookup_key(Some("h-alice-2"))
            .await
            .expect("lookup")
            .key,
        Some(key("alice", false))
    );
    assert!(store.revoke_key("alice").await.expect("revoke"));
    assert!(store.revoke_key("bob").await.expect("revoke"));
    assert_eq!(
        store.lookup_key(Some("h-bob")).await.expect("lookup"),
        KeyLookup::default()
    );
    // Keys are not conversations.
    assert!(store.list(0, 10).await.expect("list").is_empty());
}

/// An event whose stored JSON is about `size` bytes.
fn big_event(id: u64, size: usize) -> StoredEvent {
    EventBody::message(Source::User, &"x".repeat(size), json!([]), false)
        .stamp(id, "2024-05-01T12:00:00.000000")
}

fn quota_of(e: StoreError) -> Quota {
    match e {
        StoreError::QuotaExceeded { quota, message } => {
            assert!(message.contains("quota"), "{message}");
            quota
        }
        other => panic!("expected a quota refusal, got {other:?}"),
    }
}

/// A conversation is refused what would take it past its quota, with nothing written; others
/// are not affected, and deleting always works.
async fn conversation_quota<S: Store>(store: Arc<S>) {
    let limit = store.limits().max_bytes_per_conversation;
    store.create(meta("full", OLD)).await.expect("create");
    store.create(meta("other", OLD)).await.expect("create");
    let record = store.get(&cid("full")).await.expect("get").expect("exists");
    let init = serde_json::to_string(&record.meta.init).expect("json");
    assert_eq!(record.bytes, meta_bytes(&init));

    // Fill it to just under the quota, in a few appends.
    let mut held = record.bytes;
    let mut next = 0;
    loop {
        let event = big_event(next, 900);
        let size = events_bytes(std::slice::from_ref(&event));
        if held + size > limit {
            break;
        }
        store
            .append(&cid("full"), vec![event])
            .await
            .expect("append");
        held += size;
        next += 1;
    }
    assert!(next >= 2, "the quota {limit} is too small for this test");
    let record = store.get(&cid("full")).await.expect("get").expect("exists");
    assert_eq!((record.bytes, record.next_event_id), (held, next));

    // One more, alone or with a small event that would fit, is refused whole.
    let refused = store
        .append(&cid("full"), vec![event(next), big_event(next + 1, 900)])
        .await
        .expect_err("over the quota");
    assert_eq!(quota_of(refused), Quota::Conversation);
    let after = store.get(&cid("full")).await.expect("get").expect("exists");
    assert_eq!(after, record, "a refused append changes nothing");
    assert_eq!(
        store
            .events(&cid("full"), all())
            .await
            .expect("events")
            .len() as u64,
        next
    );

    // Another conversation still takes events, and a small one still fits here.
    store
        .append(&cid("other"), events(0..3))
        .await
        .expect("append other");
    let small = event(next);
    if held + events_bytes(std::slice::from_ref(&small)) <= limit {
        store
            .append(&cid("full"), vec![small])
            .await
            .expect("a small event fits");
    }

    // A conversation whose init data alone is over the quota is never created.
    let mut huge = meta("huge", OLD);
    huge.init.initial_user_msg = Some("y".repeat(limit as usize));
    assert_eq!(
        quota_of(store.create(huge).await.expect_err("over the quota")),
        Quota::Conversation
    );
    assert_eq!(store.get(&cid("huge")).await.expect("get"), None);

    assert!(store.delete(&cid("full")).await.expect("delete"));
    assert_eq!(store.get(&cid("full")).await.expect("get"), None);
}

/// The store is refused what would take it past its quota, with nothing written; deleting
/// always works and makes room again.
async fn store_quota<S: Store>(store: Arc<S>) {
    let limit = store.limits().max_store_bytes;
    assert!(store.used_bytes() < limit);
    let mut created = Vec::new();
    let refusal = 'fill: {
        for c in 0..1000 {
            let id = format!("c{c}");
            if let Err(e) = store.create(meta(&id, OLD)).await {
                break 'fill e;
            }
            created.push(id.clone());
            for i in 0..4 {
                if let Err(e) = store.append(&cid(&id), vec![big_event(i, 2000)]).await {
                    break 'fill e;
                }
            }
        }
        panic!(
            "the store never filled up; it uses {} bytes",
            store.used_bytes()
        );
    };
    assert_eq!(quota_of(refusal), Quota::Store);
    assert!(
        store.used_bytes() <= limit,
        "{} > {limit}",
        store.used_bytes()
    );
    let last = created.last().expect("a conversation").clone();
    let before = store.get(&cid(&last)).await.expect("get").expect("exists");
    let refused = store
        .append(&cid(&last), vec![big_event(before.next_event_id, 2000)])
        .await
        .expect_err("still full");
    assert_eq!(quota_of(refused), Quota::Store);
    assert_eq!(
        store.get(&cid(&last)).await.expect("get"),
        Some(before.clone())
    );

    // Deleting gives room back.
    let used = store.used_bytes();
    for id in &created[..created.len() / 2] {
        assert!(store
            .delete(&cid(id))
            .await
            .expect("delete on a full store"));
    }
    store.flush().await.expect("flush");
    assert!(
        store.used_bytes() < used,
        "{} !< {used}",
        store.used_bytes()
    );
    store
        .append(&cid(&last), vec![big_event(before.next_event_id, 2000)])
        .await
        .expect("room again");
}

fn quota_limits() -> StoreLimits {
    StoreLimits {
        max_bytes_per_conversation: 8 * 1024,
        max_store_bytes: 0,
        disk_reserve_bytes: 0,
    }
}

fn store_quota_limits() -> StoreLimits {
    StoreLimits {
        max_bytes_per_conversation: 0,
        max_store_bytes: 256 * 1024,
        disk_reserve_bytes: 0,
    }
}

macro_rules! contract_tests {
    ($backend:ident, $fixture:expr, $limited:path) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn conversation_quota() {
                let Some(f) = MaybeFixture::fixture($limited(quota_limits())) else {
                    return;
                };
                super::conversation_quota(f.store.clone()).await;
            }

            #[tokio::test]
            async fn store_quota() {
                let Some(f) = MaybeFixture::fixture($limited(store_quota_limits())) else {
                    return;
                };
                super::store_quota(f.store.clone()).await;
            }

            #[tokio::test]
            async fn create_with_events_quota() {
                let Some(f) = MaybeFixture::fixture($limited(quota_limits())) else {
                    return;
                };
                super::create_with_events_quota(f.store.clone()).await;
            }

            #[tokio::test]
            async fn create_with_events() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::create_with_events(f.store.clone()).await;
            }

            #[tokio::test]
            async fn exists_tells_existence_and_owner() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::exists_tells_existence_and_owner(f.store.clone()).await;
            }

            #[tokio::test]
            async fn create_then_exists() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::create_then_exists(f.store.clone()).await;
            }

            #[tokio::test]
            async fn get_and_next_event_id() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::get_and_next_event_id(f.store.clone()).await;
            }

            #[tokio::test]
            async fn append_and_query() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::append_and_query(f.store.clone()).await;
            }

            #[tokio::test]
            async fn append_moves_last_updated_at() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::append_moves_last_updated_at(f.store.clone()).await;
            }

            #[tokio::test]
            async fn list_order_and_paging() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::list_order_and_paging(f.store.clone()).await;
            }

            #[tokio::test]
            async fn set_title() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::set_title(f.store.clone()).await;
            }

            #[tokio::test]
            async fn delete_removes_only_one() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::delete_removes_only_one(f.store.clone()).await;
            }

            #[tokio::test]
            async fn append_fifo_spawned_in_order() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::append_fifo(f.store.clone(), false).await;
            }

            #[tokio::test]
            async fn append_fifo_spawned_in_reverse() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::append_fifo(f.store.clone(), true).await;
            }

            #[tokio::test]
            async fn settings_round_trip() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::settings_round_trip(f.store.clone()).await;
            }

            #[tokio::test]
            async fn list_owned_filters_by_owner() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::list_owned_filters_by_owner(f.store.clone()).await;
            }

            #[tokio::test]
            async fn keys_round_trip() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::keys_round_trip(f.store.clone()).await;
            }

            #[tokio::test]
            async fn flush_completes() {
                let Some(f) = MaybeFixture::fixture($fixture) else {
                    return;
                };
                super::flush_completes(f.store.clone()).await;
            }
        }
    };
}

contract_tests!(memory_store, memory(), memory_limited);
contract_tests!(sqlite_store, sqlite(), sqlite_limited);
contract_tests!(
    sqlite_store_one_request_batches,
    sqlite_tiny(),
    sqlite_tiny_limited
);
contract_tests!(
    sqlite_store_small_queue,
    sqlite_small(),
    sqlite_small_limited
);
contract_tests!(postgres_store, postgres(), postgres_limited);
contract_tests!(
    postgres_store_one_request_batches,
    postgres_tiny(),
    postgres_tiny_limited
);
