//! The durable store: one SQLite database file, `<data_dir>/switchboard.db` (`store = "sqlite"`).
//!
//! This module owns that file: its schema and migrations, the connections to it and the threads
//! that use them. Besides the promises of every [`Store`], it promises:
//!
//! - **Durability.** A completed `create`, `set_title`, `append` or `delete` (and a completed
//!   `flush`) is committed: it survives the process being killed (`kill -9`) at any moment after.
//!   The database runs in WAL mode with `synchronous=NORMAL` (see `open_connection` for why
//!   that is enough for process crashes and what it does not cover).
//! - **Never blocking the caller.** Callers are actor threads and HTTP workers; every operation
//!   only queues a request and returns a future. One dedicated *writer* thread owns the write
//!   connection, and a small pool of *reader* threads own read-only connections, so reads never
//!   wait behind a large write batch.
//! - **Group commit.** The writer takes one request, drains whatever else is already queued (up
//!   to [`StoreTuning::batch_max`] events/requests) and applies the lot in ONE transaction, then
//!   answers every request of the batch. One failing request does not fail its neighbours: a
//!   refusal (an id collision, a gap in event ids, an append to an unknown conversation) is
//!   found before the request writes anything, and should a statement fail halfway through a
//!   request, the transaction is rolled back and the batch run again with each request in its
//!   own savepoint, so that request alone fails. If the transaction itself fails (disk full, I/O
//!   error), every request of the batch gets [`StoreError::Io`] and the writer carries on with
//!   the next batch. `append` moves `last_updated_at` once per conversation per batch.
//! - **Dense event logs.** An `append` whose first id is not the log's next one, whose ids are
//!   not consecutive, or whose conversation does not exist is refused with [`StoreError::Io`]
//!   and stores nothing (an empty `append` to an unknown conversation is a no-op).
//! - **FIFO writes, in call order.** A write request is admitted into the writer's bounded queue
//!   (capacity [`StoreTuning::queue`]) *when the method is called* if there is room; when the
//!   queue is full it waits in an ordered overflow list that the returned futures move into the
//!   queue front-first. Either way writes are applied, and complete, in the order the methods
//!   were called — so "append k completed ⇒ every earlier append completed" holds even if the
//!   caller polls the futures in another order. (A request still in the overflow list is
//!   cancelled only if its future and every later write's future are dropped.)
//! - **Fast start.** Opening reads the header, the schema and the schema version, applies pending
//!   migrations and checks the file's pages only while the file is small
//!   ([`QUICK_CHECK_MAX_BYTES`]); it never loads conversations, so startup with 100,000 stored
//!   conversations costs the same as with ten.
//! - **Refusing rather than guessing.** A file that is not a SQLite database, a corrupt one, one
//!   written by a newer switchboard (higher schema version), another program's SQLite database or
//!   an unusable location makes [`SqliteStore::open`] fail with [`StoreError::Open`] naming the
//!   file and the reason; it never starts empty on top of existing data.
//! - **Space comes back.** The database uses incremental auto-vacuum (a database from before
//!   schema version 3 is converted once at open, with a `VACUUM`); after a batch that deleted
//!   a conversation the writer moves freed pages off the end of the file and truncates it and
//!   the WAL ([`RECLAIM_PAGES`] at a time). Quotas ([`StoreLimits`]) count each conversation's
//!   `bytes` column and, for the whole store, the pages in use.
//! - **Deletes work on a full disk.** [`StoreLimits::disk_reserve_bytes`] stay allocated in
//!   `<data_dir>/switchboard.reserve`; a failing batch with a delete gives them up and runs
//!   again, and the WAL is kept within half the reserve so that the checkpoint after the delete
//!   fits as well.
//! - **Clean shutdown.** [`SqliteStore`] is a cheap `Clone`; when the last clone (and every
//!   pending future) is dropped, the threads finish the queued work, close their connections and
//!   exit. [`SqliteStore::close`] waits for that.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::durable::{
    check_append, decode_init, decode_settings, event_range, fail_batch, fill_batch, next_after,
    sql_count, stored_event_id, ReadQueue, ReadRequest, Reply, WriteCommand, WriteQueue,
    WriteReply, WriteRequest,
};
use super::{
    events_bytes, meta_bytes, ApiKey, ConversationMeta, ConversationRecord, EventQuery, InitData,
    KeyLookup, Store, StoreError, StoreFuture, StoreLimits,
};
use crate::config::StoreTuning;
use crate::events::{meta_timestamp, StoredEvent};

/// The database file's name inside the data directory.
pub const DB_FILE_NAME: &str = "switchboard.db";

/// The disk reserve's file name inside the data directory (see [`Reserve`]).
pub const RESERVE_FILE_NAME: &str = "switchboard.reserve";

/// How often a reserve that could not be taken is tried again (besides after every delete).
const RESERVE_RETRY: Duration = Duration::from_secs(60);

/// Pages given back to the file system per step after a delete (1 MiB of 4 KiB pages).
const RECLAIM_PAGES: u32 = 256;

/// `PRAGMA application_id` of a switchboard database ("SWBD"); tells our files from other
/// programs' SQLite files.
const APPLICATION_ID: i32 = 0x5357_4244;

/// Schema migrations: step `i` takes the database from `user_version` `i` to `i + 1`. Each step
/// runs in its own transaction together with the `user_version` bump. Only ever append here.
///
/// Layout: conversation ids are random (uuid4 hex), so nothing that grows per conversation is
/// keyed by them except the one small unique index that maps an id to its `seq`. `seq` is an
/// integer given in creation order (SQLite's rowid: `max + 1`), and the conversation rows, the
/// listing index (created_at grows with time) and the events (keyed by `(conv_seq, id)`) all
/// grow at the right edge of their B-trees: a group commit of `n` new conversations dirties a
/// handful of shared pages there plus `n` leaves of `conversations_by_id`, instead of `n` random
/// leaves in every tree. (Version 1 was never released in another shape; it was rewritten in
/// place rather than migrated.)
const MIGRATIONS: &[&str] = &[
    // 1: conversations and their event logs.
    r#"
    CREATE TABLE conversations (
        seq             INTEGER PRIMARY KEY,
        id              TEXT NOT NULL,
        title           TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        last_updated_at TEXT NOT NULL,
        "trigger"       TEXT NOT NULL,
        owner           TEXT,
        init_json       TEXT NOT NULL
    );
    CREATE UNIQUE INDEX conversations_by_id ON conversations (id);
    -- Ascending, so that new conversations land at its right edge; `list` walks it backwards.
    CREATE INDEX conversations_by_created_at ON conversations (created_at, id);
    CREATE TABLE events (
        conv_seq INTEGER NOT NULL,
        id       INTEGER NOT NULL,
        json     TEXT NOT NULL,
        PRIMARY KEY (conv_seq, id)
    ) WITHOUT ROWID;
    "#,
    // 2: the app settings (`GET`/`POST /api/settings`), one JSON document per user.
    r#"
    CREATE TABLE settings (
        user_id TEXT PRIMARY KEY NOT NULL,
        json    TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 3: the bytes each conversation holds against `limits.max_bytes_per_conversation`: its
    // init data and its events' JSON, in bytes.
    r#"
    ALTER TABLE conversations ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE conversations SET bytes = length(CAST(init_json AS BLOB)) + coalesce(
        (SELECT sum(length(CAST(json AS BLOB))) FROM events WHERE conv_seq = conversations.seq),
        0);
    "#,
    // 4: user keys (only their SHA-256, see `crate::keys`), and each owner's conversations
    // in listing order.
    r#"
    CREATE TABLE api_keys (
        name       TEXT PRIMARY KEY NOT NULL,
        hash       TEXT NOT NULL UNIQUE,
        admin      INTEGER NOT NULL,
        created_at TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX conversations_by_owner ON conversations (owner, created_at, id);
    "#,
];

/// The tables and indexes this build uses; `open` refuses a file that lacks one.
const SCHEMA_OBJECTS: &[(&str, &str)] = &[
    ("table", "conversations"),
    ("table", "events"),
    ("table", "settings"),
    ("table", "api_keys"),
    ("index", "conversations_by_id"),
    ("index", "conversations_by_created_at"),
    ("index", "conversations_by_owner"),
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Up to this file size, `open` runs `PRAGMA quick_check` (which reads every page: tens of
/// milliseconds here). Bigger files get the cheap structural checks only, so that startup time
/// does not grow with the amount of history; corruption in a page they do not read is still
/// reported (as [`StoreError::Io`]) by the first operation that touches it, never hidden.
pub const QUICK_CHECK_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Threads serving reads, each with its own connection.
const READER_THREADS: usize = 2;

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The columns `meta_from_row` reads, in its order.
macro_rules! meta_columns {
    () => {
        r#"id, title, created_at, last_updated_at, "trigger", owner, init_json"#
    };
}

/// Every statement the store threads run (the plan tests below check these very texts).
mod sql {
    /// `?1` id → seq, through `conversations_by_id`.
    pub const SEQ_BY_ID: &str = "SELECT seq FROM conversations WHERE id = ?1";
    pub const CREATE: &str = concat!(
        "INSERT INTO conversations (",
        meta_columns!(),
        ", bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING"
    );
    pub const SET_TITLE: &str =
        "UPDATE conversations SET title = ?2, last_updated_at = ?3 WHERE id = ?1";
    /// `?1` seq: `?2` the new `last_updated_at`, `?3` bytes appended.
    pub const TOUCH: &str =
        "UPDATE conversations SET last_updated_at = ?2, bytes = bytes + ?3 WHERE seq = ?1";
    /// `?1` seq → the bytes the conversation holds.
    pub const BYTES: &str = "SELECT bytes FROM conversations WHERE seq = ?1";
    pub const INSERT_EVENT: &str = "INSERT INTO events (conv_seq, id, json) VALUES (?1, ?2, ?3)";
    pub const LAST_EVENT_ID: &str =
        "SELECT id FROM events WHERE conv_seq = ?1 ORDER BY id DESC LIMIT 1";
    pub const DELETE_EVENTS: &str = "DELETE FROM events WHERE conv_seq = ?1";
    pub const DELETE_CONVERSATION: &str = "DELETE FROM conversations WHERE seq = ?1";
    /// `?1` id → the metadata columns, then seq and bytes.
    pub const GET: &str = concat!(
        "SELECT ",
        meta_columns!(),
        ", seq, bytes FROM conversations WHERE id = ?1"
    );
    /// `?1` limit, `?2` offset.
    pub const LIST: &str = concat!(
        "SELECT ",
        meta_columns!(),
        " FROM conversations ORDER BY created_at DESC, id DESC LIMIT ?1 OFFSET ?2"
    );
    /// A range of one conversation's events: `?1` conversation id, `?2`..=`?3` event ids, `?4`
    /// limit.
    pub const EVENTS_OLDEST_FIRST: &str = "SELECT id, json FROM events \
         WHERE conv_seq = (SELECT seq FROM conversations WHERE id = ?1) \
         AND id BETWEEN ?2 AND ?3 ORDER BY id ASC LIMIT ?4";
    /// As [`EVENTS_OLDEST_FIRST`], newest first.
    pub const SETTINGS: &str = "SELECT json FROM settings WHERE user_id = ?1";
    pub const SAVE_SETTINGS: &str = "INSERT INTO settings (user_id, json) VALUES (?1, ?2) \
         ON CONFLICT (user_id) DO UPDATE SET json = excluded.json";
    pub const EVENTS_NEWEST_FIRST: &str = "SELECT id, json FROM events \
         WHERE conv_seq = (SELECT seq FROM conversations WHERE id = ?1) \
         AND id BETWEEN ?2 AND ?3 ORDER BY id DESC LIMIT ?4";
    /// `?1` owner, `?2` limit, `?3` offset.
    pub const LIST_OWNED: &str = concat!(
        "SELECT ",
        meta_columns!(),
        " FROM conversations WHERE owner = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2 OFFSET ?3"
    );
    pub const KEY_EXISTS: &str = "SELECT 1 FROM api_keys WHERE name = ?1";
    pub const ADD_KEY: &str =
        "INSERT INTO api_keys (name, hash, admin, created_at) VALUES (?1, ?2, ?3, ?4)";
    pub const REVOKE_KEY: &str = "DELETE FROM api_keys WHERE name = ?1";
    pub const LIST_KEYS: &str = "SELECT name, admin, created_at FROM api_keys ORDER BY name";
    pub const KEY_BY_HASH: &str = "SELECT name, admin, created_at FROM api_keys WHERE hash = ?1";
    pub const ANY_KEY: &str = "SELECT EXISTS (SELECT 1 FROM api_keys)";
}

/// The SQLite-backed [`Store`]. Cheap to clone; all clones share the same threads.
#[derive(Clone)]
pub struct SqliteStore {
    writes: Arc<WriteQueue>,
    reads: ReadQueue,
    /// Number of store threads still running.
    running: watch::Receiver<usize>,
    path: Arc<PathBuf>,
    limits: StoreLimits,
    /// The bytes of the database pages in use, as of the writer's last commit.
    used: Arc<AtomicU64>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Decrements the running-thread count when a store thread ends, however it ends.
struct ThreadExit(Arc<watch::Sender<usize>>);

impl Drop for ThreadExit {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

fn open_error(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Open(format!("{}: {what}", path.display()))
}

fn io_error(e: rusqlite::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/switchboard.db`, migrates its schema and starts the
    /// writer and reader threads. Blocks for the duration of the open; call it at startup.
    pub fn open(data_dir: &Path, tuning: &StoreTuning) -> Result<SqliteStore, StoreError> {
        Self::open_with(data_dir, tuning, StoreLimits::default())
    }

    /// [`SqliteStore::open`] enforcing `limits` (quotas, and the disk reserve in
    /// `<data_dir>/switchboard.reserve`).
    pub fn open_with(
        data_dir: &Path,
        tuning: &StoreTuning,
        limits: StoreLimits,
    ) -> Result<SqliteStore, StoreError> {
        if data_dir.exists() && !data_dir.is_dir() {
            return Err(open_error(
                data_dir,
                "the data directory path exists but is not a directory",
            ));
        }
        std::fs::create_dir_all(data_dir).map_err(|e| {
            open_error(
                data_dir,
                format_args!("cannot create the data directory: {e}"),
            )
        })?;
        if !data_dir.is_dir() {
            return Err(open_error(
                data_dir,
                "the data directory is not a directory",
            ));
        }
        let path = data_dir.join(DB_FILE_NAME);
        if path.is_dir() {
            return Err(open_error(
                &path,
                "is a directory, expected a database file",
            ));
        }

        let write_conn = open_connection(&path, false)?;
        prepare_database(&path, &write_conn)?;
        let used = Arc::new(AtomicU64::new(
            pages_in_use(&write_conn).map_err(|e| open_error(&path, e))?,
        ));
        let reserve = Reserve::new(data_dir.join(RESERVE_FILE_NAME), limits.disk_reserve_bytes);
        fit_wal_to_reserve(&write_conn, limits.disk_reserve_bytes)
            .map_err(|e| open_error(&path, e))?;
        let mut read_conns = Vec::with_capacity(READER_THREADS);
        for _ in 0..READER_THREADS {
            read_conns.push(open_connection(&path, true)?);
        }

        let queue = tuning.queue.max(1);
        let batch_max = tuning.batch_max.max(1);
        let (writes, write_rx) = WriteQueue::new(queue);
        let (reads, read_rx) = ReadQueue::new(queue);
        let read_rx = Arc::new(Mutex::new(read_rx));
        let (running_tx, running_rx) = watch::channel(0usize);
        let running_tx = Arc::new(running_tx);

        let spawn = |name: String, body: Box<dyn FnOnce() + Send>| {
            running_tx.send_modify(|n| *n += 1);
            let exit = ThreadExit(running_tx.clone());
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let _exit = exit;
                    body();
                })
                .map(|_| ())
                .map_err(|e| open_error(&path, format_args!("cannot start a store thread: {e}")))
        };

        spawn("store-writer".into(), {
            let writer = Writer {
                conn: write_conn,
                seqs: SeqCache::new(SEQ_CACHE_CAPACITY),
                appended: HashMap::new(),
                limits,
                used: used.clone(),
                added: 0,
                deleted: false,
                reserve,
                last_failure: None,
            };
            Box::new(move || run_writer(writer, write_rx, batch_max))
        })?;
        for (i, conn) in read_conns.into_iter().enumerate() {
            let rx = read_rx.clone();
            spawn(
                format!("store-reader-{i}"),
                Box::new(move || run_reader(conn, rx)),
            )?;
        }

        tracing::info!(path = %path.display(), schema_version = SCHEMA_VERSION, "SQLite store open");
        Ok(SqliteStore {
            writes,
            reads,
            running: running_rx,
            path: Arc::new(path),
            limits,
            used,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drops this handle and completes once the store's threads have finished every queued
    /// request and closed the database — i.e. once this was the last handle and no operation
    /// future is left. Use `flush` instead to wait for durability while keeping the store.
    pub fn close(self) -> impl Future<Output = ()> + Send + 'static {
        let mut running = self.running.clone();
        drop(self);
        async move {
            // An error means every thread (and the sender) is gone: closed as well.
            let _ = running.wait_for(|n| *n == 0).await;
        }
    }

    fn write<T: Send + 'static>(
        &self,
        command: WriteCommand,
        make_reply: impl FnOnce(Reply<T>) -> WriteReply,
    ) -> StoreFuture<T> {
        self.writes.submit(command, make_reply)
    }

    fn read<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> ReadRequest,
    ) -> StoreFuture<T> {
        self.reads.read(make)
    }
}

impl Store for SqliteStore {
    fn create_with_events(
        &self,
        meta: ConversationMeta,
        events: Vec<StoredEvent>,
    ) -> StoreFuture<()> {
        self.writes.create_with_events(meta, events)
    }

    fn set_title(&self, id: &str, title: &str) -> StoreFuture<bool> {
        let command = WriteCommand::SetTitle {
            id: id.to_string(),
            title: title.to_string(),
        };
        self.write(command, WriteReply::Flag)
    }

    fn get(&self, id: &str) -> StoreFuture<Option<ConversationRecord>> {
        let id = id.to_string();
        self.read(|reply| ReadRequest::Get { id, reply })
    }

    fn list(&self, offset: usize, limit: usize) -> StoreFuture<Vec<ConversationMeta>> {
        self.read(|reply| ReadRequest::List {
            offset,
            limit,
            reply,
        })
    }

    fn list_owned(
        &self,
        owner: &str,
        offset: usize,
        limit: usize,
    ) -> StoreFuture<Vec<ConversationMeta>> {
        self.reads.list_owned(owner, offset, limit)
    }

    fn append(&self, id: &str, events: Vec<StoredEvent>) -> StoreFuture<()> {
        let command = WriteCommand::Append {
            id: id.to_string(),
            events,
            lease: None,
        };
        self.write(command, WriteReply::Unit)
    }

    fn events(&self, id: &str, query: EventQuery) -> StoreFuture<Vec<StoredEvent>> {
        let id = id.to_string();
        self.read(|reply| ReadRequest::Events { id, query, reply })
    }

    fn delete(&self, id: &str) -> StoreFuture<bool> {
        let command = WriteCommand::Delete { id: id.to_string() };
        self.write(command, WriteReply::Flag)
    }

    fn flush(&self) -> StoreFuture<()> {
        self.write(WriteCommand::Flush, WriteReply::Unit)
    }

    fn limits(&self) -> StoreLimits {
        self.limits
    }

    fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn settings(&self, user: &str) -> StoreFuture<Option<Value>> {
        let user = user.to_string();
        self.read(|reply| ReadRequest::Settings { user, reply })
    }

    fn save_settings(&self, user: &str, settings: Value) -> StoreFuture<()> {
        let command = WriteCommand::SaveSettings {
            user: user.to_string(),
            json: settings.to_string(),
        };
        self.write(command, WriteReply::Unit)
    }

    fn probe(&self) -> StoreFuture<()> {
        self.write(WriteCommand::Probe, WriteReply::Unit)
    }

    fn add_key(&self, key: ApiKey, hash: String) -> StoreFuture<()> {
        self.writes.add_key(key, hash)
    }

    fn list_keys(&self) -> StoreFuture<Vec<ApiKey>> {
        self.reads.list_keys()
    }

    fn revoke_key(&self, name: &str) -> StoreFuture<bool> {
        self.writes.revoke_key(name)
    }

    fn lookup_key(&self, hash: Option<&str>) -> StoreFuture<KeyLookup> {
        self.reads.lookup_key(hash)
    }
}

// ---------------------------------------------------------------------------------------------
// Opening

/// Opens one connection and sets it up.
///
/// Durability: WAL with `synchronous=NORMAL`. A commit appends its pages to the `-wal` file with
/// `write()`; once that returns, the data sits in the operating system's page cache, which the
/// death of *this process* (`kill -9`, a panic, OOM kill) cannot lose — the next open replays the
/// WAL. What NORMAL gives up compared with FULL is an `fsync` per commit, i.e. the last commits
/// before an operating-system crash or power loss may roll back (the database stays consistent
/// either way). That is the durability switchboard promises, at a fraction of FULL's cost.
fn open_connection(path: &Path, reader: bool) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| open_error(path, format_args!("cannot open the database file: {e}")))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| open_error(path, e))?;
    // The first statement reads the header: this is where a file that is not a database fails.
    let _: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| describe_open_failure(path, e))?;
    if conn
        .is_readonly(rusqlite::DatabaseName::Main)
        .map_err(|e| open_error(path, e))?
    {
        return Err(open_error(
            path,
            "the database file is read-only; switchboard needs to write it",
        ));
    }
    if reader {
        conn.pragma_update(None, "query_only", true)
            .map_err(|e| open_error(path, e))?;
    } else {
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| describe_open_failure(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_error(
                path,
                format_args!(
                    "cannot switch the database to WAL mode (journal mode stays {mode:?}); \
                     is the file on a filesystem without shared-memory support?"
                ),
            ));
        }
    }
    // See above: NORMAL is durable across process crashes in WAL mode.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| open_error(path, e))?;
    // SQLite's default page cache (2 MiB) and no memory map, on evidence: a 16 MiB cache made no
    // measurable difference even with 200,000 conversations, and `mmap_size` made the writer
    // slower (a page read through the map is wrapped anew on every fetch; the writer fetches the
    // same hot pages over and over).
    Ok(conn)
}

/// Turns an error met while first reading the file into a message a person can act on.
fn describe_open_failure(path: &Path, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => open_error(
            path,
            format_args!(
                "is not a SQLite database ({e}); refusing to start on top of it. \
                 Move the file away or point data_dir elsewhere"
            ),
        ),
        Some(ErrorCode::DatabaseCorrupt) => open_error(
            path,
            format_args!(
                "the database is corrupt ({e}); refusing to start. \
                 Restore it from a backup or move it away"
            ),
        ),
        Some(ErrorCode::CannotOpen) | Some(ErrorCode::PermissionDenied) => open_error(
            path,
            format_args!("cannot open the database file ({e}); check the path and permissions"),
        ),
        Some(ErrorCode::ReadOnly) => open_error(
            path,
            format_args!("the database is read-only ({e}); switchboard needs to write it"),
        ),
        _ => open_error(path, e),
    }
}

/// Checks that the file is a healthy switchboard database and migrates it to
/// [`SCHEMA_VERSION`]. Runs on the write connection before any thread starts.
fn prepare_database(path: &Path, conn: &Connection) -> Result<(), StoreError> {
    let fail = |e: rusqlite::Error| describe_open_failure(path, e);
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(fail)?;
    if version > SCHEMA_VERSION {
        return Err(open_error(
            path,
            format_args!(
                "the database has schema version {version}, but this build of switchboard only \
                 knows versions up to {SCHEMA_VERSION}; it was written by a newer switchboard. \
                 Upgrade switchboard (or use another data_dir) — refusing to open it"
            ),
        ));
    }
    let app_id: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(fail)?;
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(open_error(
            path,
            format_args!(
                "is another program's SQLite database (application_id {app_id:#x}); \
                 refusing to use it"
            ),
        ));
    }
    // Reading the schema parses every CREATE statement: a damaged first page or schema shows
    // up here.
    let objects: Vec<String> = {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
            .map_err(fail)?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(fail)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        names
    };
    if version == 0 && !objects.is_empty() {
        return Err(open_error(
            path,
            format_args!(
                "holds tables that are not switchboard's ({}); refusing to use it",
                objects.join(", ")
            ),
        ));
    }

    if version == 0 && objects.is_empty() {
        // Before the first table: deletes give their pages back (see `Writer::reclaim`).
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(fail)?;
    }

    // Pages: full check while that is cheap, see QUICK_CHECK_MAX_BYTES.
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size <= QUICK_CHECK_MAX_BYTES {
        let verdict: String = conn
            .pragma_query_value(None, "quick_check", |r| r.get(0))
            .map_err(fail)?;
        if verdict != "ok" {
            // The verdict can list thousands of damaged pages; the first few lines tell enough.
            let mut verdict: String = verdict.lines().take(4).collect::<Vec<_>>().join("; ");
            if verdict.len() > 400 {
                let cut = (0..=400)
                    .rev()
                    .find(|&i| verdict.is_char_boundary(i))
                    .unwrap_or(0);
                verdict.truncate(cut);
                verdict.push_str("...");
            }
            return Err(open_error(
                path,
                format_args!(
                    "the database is corrupt (quick_check: {verdict}); refusing to start. \
                     Restore it from a backup or move it away"
                ),
            ));
        }
    }

    migrate(path, conn)?;
    enable_incremental_vacuum(path, conn);

    // The tables and indexes this build uses must exist (a damaged or hand-edited schema is
    // refused here rather than failing on the first request).
    for (kind, name) in SCHEMA_OBJECTS {
        let found: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = ?1 AND name = ?2",
                params![kind, name],
                |r| r.get(0),
            )
            .optional()
            .map_err(fail)?;
        if found.is_none() {
            return Err(open_error(
                path,
                format_args!(
                    "the schema is damaged: {kind} {name} is missing at schema version \
                     {SCHEMA_VERSION}; refusing to start"
                ),
            ));
        }
    }
    // Compile the hot statements' shapes (a column missing from a table fails here) and touch
    // the roots of the trees they use.
    let probes = [
        concat!(
            "SELECT seq, ",
            meta_columns!(),
            " FROM conversations ORDER BY created_at DESC, id DESC LIMIT 1"
        ),
        "SELECT seq FROM conversations WHERE id = ''",
        "SELECT conv_seq, id, json FROM events LIMIT 1",
        "SELECT bytes FROM conversations LIMIT 1",
    ];
    for sql in probes {
        let mut stmt = conn.prepare(sql).map_err(|e| {
            open_error(
                path,
                format_args!(
                    "the schema does not match schema version {SCHEMA_VERSION} ({e}); \
                     refusing to start. Move the file away or point data_dir elsewhere"
                ),
            )
        })?;
        stmt.query_row([], |_| Ok(())).optional().map_err(fail)?;
    }
    Ok(())
}

/// Converts a database created without incremental auto-vacuum (before schema version 3): its
/// `auto_vacuum` mode can only change with a `VACUUM`, which rewrites the file once (it needs
/// about the file's size in free disk space for a moment). If that fails the database works as
/// before, deletes leaving free pages inside the file for later writes; the next start tries
/// again.
fn enable_incremental_vacuum(path: &Path, conn: &Connection) {
    const INCREMENTAL: i64 = 2;
    let mode = conn.pragma_query_value(None, "auto_vacuum", |r| r.get::<_, i64>(0));
    if mode.is_ok_and(|m| m == INCREMENTAL) {
        return;
    }
    tracing::info!(path = %path.display(), "converting the database to incremental auto-vacuum (a one-time VACUUM)");
    let converted = conn
        .pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .and_then(|()| conn.execute_batch("VACUUM"));
    if let Err(e) = converted {
        tracing::warn!(path = %path.display(), error = %e, "cannot convert the database to incremental auto-vacuum; deleted conversations' space stays inside the file");
    }
}

/// Applies the pending [`MIGRATIONS`], each in one transaction with its version bump.
fn migrate(path: &Path, conn: &Connection) -> Result<(), StoreError> {
    loop {
        // IMMEDIATE takes the write lock first, so the version read below cannot be raced by
        // another process migrating the same file.
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| describe_open_failure(path, e))?;
        let step = (|| -> Result<bool, StoreError> {
            let version: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(|e| describe_open_failure(path, e))?;
            let Some(sql) = usize::try_from(version)
                .ok()
                .and_then(|v| MIGRATIONS.get(v))
            else {
                return Ok(false);
            };
            let next = version + 1;
            let fail = |e: rusqlite::Error| {
                open_error(
                    path,
                    format_args!(
                        "migrating the schema from version {version} to {next} failed: {e}"
                    ),
                )
            };
            conn.execute_batch(sql).map_err(fail)?;
            conn.pragma_update(None, "user_version", next)
                .map_err(fail)?;
            conn.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(fail)?;
            tracing::info!(path = %path.display(), from = version, to = next, "migrated store schema");
            Ok(true)
        })();
        match step {
            Ok(true) => conn
                .execute_batch("COMMIT")
                .map_err(|e| describe_open_failure(path, e))?,
            Ok(false) => {
                conn.execute_batch("COMMIT")
                    .map_err(|e| describe_open_failure(path, e))?;
                return Ok(());
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer

/// Entries the writer's id → seq cache holds at most.
const SEQ_CACHE_CAPACITY: usize = 4096;

/// A bounded map from conversation id to `seq`, sparing the writer the lookup in
/// `conversations_by_id` for the conversations it wrote lately (typically: created in one batch,
/// appended to in the next ones). Two generations: entries go into `young`; when it is full it
/// becomes `old` (the previous `old` is dropped) and a hit in `old` moves the entry back to
/// `young`. Correct, not just likely: an entry is added only for a row this transaction wrote or
/// read, removed when its conversation is deleted, and the whole cache is cleared whenever a
/// transaction rolls back (so it never keeps a seq that was not committed).
struct SeqCache {
    young: HashMap<String, i64>,
    old: HashMap<String, i64>,
    /// Entries per generation; 0 disables the cache.
    generation: usize,
}

impl SeqCache {
    fn new(capacity: usize) -> Self {
        SeqCache {
            young: HashMap::new(),
            old: HashMap::new(),
            generation: capacity / 2,
        }
    }

    fn get(&mut self, id: &str) -> Option<i64> {
        if let Some(&seq) = self.young.get(id) {
            return Some(seq);
        }
        let (id, seq) = self.old.remove_entry(id)?;
        self.insert(id, seq);
        Some(seq)
    }

    fn insert(&mut self, id: String, seq: i64) {
        if self.generation == 0 {
            return;
        }
        if self.young.len() >= self.generation {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(id, seq);
    }

    fn remove(&mut self, id: &str) {
        self.young.remove(id);
        self.old.remove(id);
    }

    fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
    }
}

/// The writer thread's connection and what it remembers between requests.
struct Writer {
    conn: Connection,
    seqs: SeqCache,
    /// The conversations appended to in the current transaction, with the bytes appended:
    /// their `last_updated_at` and `bytes` move once, at the end of the batch, rather than once
    /// per append (every request of a batch uses the same timestamp, and nobody sees the batch
    /// before it commits).
    appended: HashMap<i64, u64>,
    limits: StoreLimits,
    /// The bytes of the database pages in use after the last commit (shared with the handles).
    used: Arc<AtomicU64>,
    /// Bytes the current transaction added so far (counted against `max_store_bytes` on top of
    /// `used`).
    added: u64,
    /// The current transaction deleted a conversation: its pages go back to the file system
    /// once it commits.
    deleted: bool,
    reserve: Reserve,
    /// Why the last batch with writes failed to commit, until one commits: a probe reports it.
    last_failure: Option<String>,
}

/// How a batch's requests are isolated from each other.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// No savepoints. Every refusal (id taken, gap in the event ids, unknown conversation) is
    /// found before the request writes anything, so a refused request leaves no trace; any
    /// other failure rolls the whole transaction back and the batch is run again with
    /// `Savepoints`.
    Direct,
    /// Each request in its own savepoint, so that a request failing halfway through its writes
    /// is undone alone.
    Savepoints,
}

/// Why a request was not applied.
enum ApplyError {
    /// Refused before anything was written; the answer for that request.
    Refused(StoreError),
    /// A statement failed; the request may have written part of its changes.
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::Sql(e)
    }
}

/// Why a batch's transaction did not commit.
enum BatchError {
    /// In `Direct` mode a request failed after writing: rolled back, run it again with
    /// savepoints.
    Retry,
    /// The transaction failed (BEGIN or COMMIT failed, or SQLite rolled it back): every request
    /// of the batch fails with this message.
    Failed(String),
}

fn run_writer(mut writer: Writer, mut rx: mpsc::Receiver<WriteRequest>, batch_max: usize) {
    let mut batch: Vec<WriteRequest> = Vec::new();
    // `None` once every sender is gone and the queue is drained.
    while let Some(first) = rx.blocking_recv() {
        fill_batch(first, &mut rx, batch_max, &mut batch);
        writer.commit_batch(&mut batch);
    }
    // Fold the WAL back into the database file so that a closed store is one self-contained
    // file. Best effort: if a reader is still busy the WAL stays, which is just as durable.
    if let Err(e) = writer
        .conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    {
        tracing::warn!(error = %e, "store: final checkpoint failed; the WAL file stays");
    }
    tracing::debug!("store writer finished");
}

impl Writer {
    /// Applies `batch` in one transaction, then answers every request in it.
    fn commit_batch(&mut self, batch: &mut Vec<WriteRequest>) {
        if batch
            .iter()
            .all(|r| matches!(r.command, WriteCommand::Flush))
        {
            // Everything queued before these flushes has been committed by earlier batches.
            for request in batch.drain(..) {
                request.reply.send(Ok(true));
            }
            return;
        }
        let now = meta_timestamp();
        let started = std::time::Instant::now();
        let mut outcome = self.run_batch(batch, &now);
        if outcome.is_err()
            && batch
                .iter()
                .any(|r| matches!(r.command, WriteCommand::Delete { .. }))
            && self.reserve.release()
        {
            // Most likely the disk is full: deleting needs a little room in the WAL. The
            // reserve gives it; the delete gives more back.
            tracing::warn!(
                "store write failed with a delete pending; released the disk reserve and retrying"
            );
            outcome = self.run_batch(batch, &now);
        }
        let deleted = std::mem::take(&mut self.deleted);
        if outcome.is_ok() && deleted {
            self.reclaim();
        }
        if deleted || self.reserve.due() {
            // Space came back (or may have): hold the reserve again.
            self.reserve.take();
        }
        self.refresh_used();
        let probes_only = batch
            .iter()
            .all(|r| matches!(r.command, WriteCommand::Flush | WriteCommand::Probe));
        match outcome {
            Ok(outcomes) => {
                if !probes_only {
                    self.last_failure = None;
                    crate::ops::metrics::metrics().committed(batch.len(), started.elapsed());
                }
                for (request, outcome) in batch.drain(..).zip(outcomes) {
                    let outcome = match (&request.command, &self.last_failure) {
                        (WriteCommand::Probe, Some(failure)) => Err(StoreError::Io(format!(
                            "the last write transaction failed: {failure}"
                        ))),
                        _ => outcome,
                    };
                    request.reply.send(outcome);
                }
            }
            Err(BatchError::Retry) => {
                self.last_failure = Some("the write failed".into());
                fail_batch(batch, "the write failed")
            }
            Err(BatchError::Failed(message)) => {
                self.last_failure = Some(message.clone());
                fail_batch(batch, &message)
            }
        }
    }

    /// Runs the batch in one transaction, then (should a request fail halfway) again with each
    /// request in its own savepoint.
    fn run_batch(
        &mut self,
        batch: &[WriteRequest],
        now: &str,
    ) -> Result<Vec<Result<bool, StoreError>>, BatchError> {
        match self.transaction(batch, now, Isolation::Direct) {
            Err(BatchError::Retry) => self.transaction(batch, now, Isolation::Savepoints),
            other => other,
        }
    }

    /// Gives the pages deleted conversations freed back to the file system: moves them off the
    /// end of the file and truncates it ([`RECLAIM_PAGES`] at a time, with a checkpoint after
    /// each, so that the WAL never needs much room on a nearly full disk). Best effort: pages
    /// it leaves stay free inside the file for later writes.
    fn reclaim(&mut self) {
        let free = |conn: &Connection| {
            conn.pragma_query_value(None, "freelist_count", |r| r.get::<_, i64>(0))
                .unwrap_or(0)
        };
        let mut left = free(&self.conn);
        while left > 0 {
            let vacuum = format!("PRAGMA incremental_vacuum({RECLAIM_PAGES})");
            if let Err(e) = self.conn.execute_batch(&vacuum) {
                tracing::warn!(error = %e, "store: cannot give freed pages back to the file system");
                break;
            }
            self.checkpoint();
            let now = free(&self.conn);
            if now >= left {
                break;
            }
            left = now;
        }
        self.checkpoint();
    }

    /// Copies the WAL into the database and truncates both; best effort (a busy reader leaves
    /// the WAL for the next one).
    fn checkpoint(&self) {
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::debug!(error = %e, "store: checkpoint failed");
        }
    }

    /// Publishes the bytes of the pages in use.
    fn refresh_used(&self) {
        match pages_in_use(&self.conn) {
            Ok(bytes) => self.used.store(bytes, Ordering::Relaxed),
            Err(e) => tracing::debug!(error = %e, "store: cannot read the database size"),
        }
    }

    /// Runs the batch in one transaction and commits it; returns each request's outcome. On
    /// failure the transaction is rolled back and nothing of the batch is kept.
    fn transaction(
        &mut self,
        batch: &[WriteRequest],
        now: &str,
        isolation: Isolation,
    ) -> Result<Vec<Result<bool, StoreError>>, BatchError> {
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            return Err(BatchError::Failed(e.to_string()));
        }
        let result = self
            .apply_batch(batch, now, isolation)
            .and_then(|outcomes| {
                self.conn
                    .execute_batch("COMMIT")
                    .map_err(|e| BatchError::Failed(e.to_string()))?;
                Ok(outcomes)
            });
        self.appended.clear();
        self.added = 0;
        if result.is_err() {
            self.deleted = false;
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            // The cache may hold seqs of rows that are gone with the transaction.
            self.seqs.clear();
        }
        result
    }

    fn apply_batch(
        &mut self,
        batch: &[WriteRequest],
        now: &str,
        isolation: Isolation,
    ) -> Result<Vec<Result<bool, StoreError>>, BatchError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for request in batch {
            let outcome = match isolation {
                Isolation::Direct => match self.apply(&request.command, now) {
                    Ok(value) => Ok(value),
                    // (A refusal writes nothing and leaves the transaction open; checked
                    // all the same, since going on in autocommit mode would be wrong.)
                    Err(ApplyError::Refused(_)) if self.conn.is_autocommit() => {
                        return Err(BatchError::Retry)
                    }
                    Err(ApplyError::Refused(e)) => Err(e),
                    Err(ApplyError::Sql(_)) => return Err(BatchError::Retry),
                },
                Isolation::Savepoints => self.apply_in_savepoint(&request.command, now)?,
            };
            outcomes.push(outcome);
        }
        // One `last_updated_at` and `bytes` update per conversation appended to.
        let mut appended: Vec<(i64, u64)> = self.appended.iter().map(|(s, b)| (*s, *b)).collect();
        appended.sort_unstable();
        let mut touch = self
            .conn
            .prepare_cached(sql::TOUCH)
            .map_err(|e| self.statement_failed(isolation, e))?;
        for (seq, bytes) in appended {
            let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
            touch
                .execute(params![seq, now, bytes])
                .map_err(|e| self.statement_failed(isolation, e))?;
        }
        Ok(outcomes)
    }

    /// What a failed statement outside any request means for the batch.
    fn statement_failed(&self, isolation: Isolation, e: rusqlite::Error) -> BatchError {
        match isolation {
            Isolation::Direct => BatchError::Retry,
            Isolation::Savepoints => BatchError::Failed(e.to_string()),
        }
    }

    /// Runs one request inside a savepoint, so that its failure leaves the rest of the batch
    /// alone. `Err` when the failure took the whole transaction with it.
    fn apply_in_savepoint(
        &mut self,
        command: &WriteCommand,
        now: &str,
    ) -> Result<Result<bool, StoreError>, BatchError> {
        if matches!(command, WriteCommand::Flush | WriteCommand::Probe) {
            return Ok(Ok(true));
        }
        self.conn
            .execute_batch("SAVEPOINT request")
            .map_err(|e| BatchError::Failed(e.to_string()))?;
        let outcome = match self.apply(command, now) {
            Ok(value) => {
                self.conn
                    .execute_batch("RELEASE request")
                    .map_err(|e| BatchError::Failed(e.to_string()))?;
                return Ok(Ok(value));
            }
            Err(ApplyError::Refused(e)) => e,
            Err(ApplyError::Sql(e)) => StoreError::Io(e.to_string()),
        };
        if self.conn.is_autocommit() {
            // SQLite rolled the whole transaction back (I/O error, disk full, ...).
            let StoreError::Io(message) = outcome else {
                return Err(BatchError::Failed(outcome.to_string()));
            };
            return Err(BatchError::Failed(message));
        }
        // Undoes what the request wrote. The writer's memory needs no undoing: `apply` records
        // a request in `appended` or the cache only once all its statements have succeeded.
        self.conn
            .execute_batch("ROLLBACK TO request; RELEASE request")
            .map_err(|e| BatchError::Failed(e.to_string()))?;
        Ok(Err(outcome))
    }

    /// Applies one request. A refusal comes before its first write, and it changes the writer's
    /// memory (`appended`, cache entries for rows it wrote or deleted) only after its last
    /// statement succeeded; caching a seq it merely read is always right.
    fn apply(&mut self, command: &WriteCommand, now: &str) -> Result<bool, ApplyError> {
        match command {
            WriteCommand::Create { meta, events, .. } => self.create(meta, events),
            WriteCommand::SetTitle { id, title } => {
                let changed = self
                    .conn
                    .prepare_cached(sql::SET_TITLE)?
                    .execute(params![id, title, now])?;
                Ok(changed > 0)
            }
            WriteCommand::Append { id, events, .. } => {
                let Some(seq) = self.seq(id)? else {
                    if events.is_empty() {
                        return Ok(true);
                    }
                    return Err(ApplyError::Refused(StoreError::Io(format!(
                        "conversation {id} does not exist; cannot append events to it"
                    ))));
                };
                let bytes = events_bytes(events);
                self.check_quotas(id, seq, bytes)?;
                self.append_events(id, seq, events)?;
                *self.appended.entry(seq).or_default() += bytes;
                self.added += bytes;
                Ok(true)
            }
            WriteCommand::Delete { id } => {
                let Some(seq) = self.seq(id)? else {
                    return Ok(false);
                };
                self.conn
                    .prepare_cached(sql::DELETE_EVENTS)?
                    .execute(params![seq])?;
                self.conn
                    .prepare_cached(sql::DELETE_CONVERSATION)?
                    .execute(params![seq])?;
                // A later conversation may get the same seq (rowids restart from the largest
                // in use): nothing may remember this one.
                self.seqs.remove(id);
                self.appended.remove(&seq);
                self.deleted = true;
                Ok(true)
            }
            WriteCommand::SaveSettings { user, json } => {
                self.conn
                    .prepare_cached(sql::SAVE_SETTINGS)?
                    .execute(params![user, json])?;
                Ok(true)
            }
            WriteCommand::AddKey { key, hash } => {
                let taken = self
                    .conn
                    .prepare_cached(sql::KEY_EXISTS)?
                    .exists(params![key.name])?;
                if taken {
                    return Err(ApplyError::Refused(StoreError::KeyExists(key.name.clone())));
                }
                self.conn.prepare_cached(sql::ADD_KEY)?.execute(params![
                    key.name,
                    hash,
                    key.admin,
                    key.created_at
                ])?;
                Ok(true)
            }
            WriteCommand::RevokeKey { name } => {
                let removed = self
                    .conn
                    .prepare_cached(sql::REVOKE_KEY)?
                    .execute(params![name])?;
                Ok(removed > 0)
            }
            WriteCommand::Flush | WriteCommand::Probe => Ok(true),
        }
    }

    /// Inserts a new conversation and its first events; every refusal comes before the first
    /// write.
    fn create(
        &mut self,
        meta: &ConversationMeta,
        events: &[StoredEvent],
    ) -> Result<bool, ApplyError> {
        let id = &meta.conversation_id;
        let init = serde_json::to_string(&meta.init).map_err(|e| {
            ApplyError::Refused(StoreError::Io(format!("cannot encode init data: {e}")))
        })?;
        let bytes = meta_bytes(&init);
        let more = events_bytes(events);
        let quota = self
            .limits
            .check_conversation(id, 0, bytes)
            .and_then(|()| self.check_store(bytes))
            .and_then(|()| check_append(id, None, events))
            .and_then(|()| self.limits.check_conversation(id, bytes, more))
            .and_then(|()| self.check_store(bytes.saturating_add(more)));
        quota.map_err(ApplyError::Refused)?;
        let inserted = self.conn.prepare_cached(sql::CREATE)?.execute(params![
            id,
            meta.title,
            meta.created_at,
            meta.last_updated_at,
            meta.trigger,
            meta.owner,
            init,
            i64::try_from(bytes).unwrap_or(i64::MAX),
        ])?;
        if inserted == 0 {
            return Err(ApplyError::Refused(StoreError::Exists(id.clone())));
        }
        let seq = self.conn.last_insert_rowid();
        if !events.is_empty() {
            self.insert_events(seq, events)?;
            *self.appended.entry(seq).or_default() += more;
        }
        self.added += bytes.saturating_add(more);
        self.seqs.insert(id.clone(), seq);
        Ok(true)
    }

    /// Refuses `more` bytes past the store's quota, counting what this transaction added.
    fn check_store(&self, more: u64) -> Result<(), StoreError> {
        let used = self.used.load(Ordering::Relaxed).saturating_add(self.added);
        self.limits.check_store(used, more)
    }

    /// Refuses an append of `more` bytes to conversation `seq` past either quota.
    fn check_quotas(&mut self, id: &str, seq: i64, more: u64) -> Result<(), ApplyError> {
        if self.limits.max_bytes_per_conversation > 0 {
            let stored: i64 = self
                .conn
                .prepare_cached(sql::BYTES)?
                .query_row(params![seq], |r| r.get(0))?;
            let held = u64::try_from(stored)
                .unwrap_or(0)
                .saturating_add(self.appended.get(&seq).copied().unwrap_or(0));
            self.limits
                .check_conversation(id, held, more)
                .map_err(ApplyError::Refused)?;
        }
        self.check_store(more).map_err(ApplyError::Refused)
    }

    /// The conversation's `seq`, from the cache or `conversations_by_id`.
    fn seq(&mut self, id: &str) -> Result<Option<i64>, rusqlite::Error> {
        if let Some(seq) = self.seqs.get(id) {
            return Ok(Some(seq));
        }
        let seq: Option<i64> = self
            .conn
            .prepare_cached(sql::SEQ_BY_ID)?
            .query_row(params![id], |r| r.get(0))
            .optional()?;
        if let Some(seq) = seq {
            self.seqs.insert(id.to_string(), seq);
        }
        Ok(seq)
    }

    /// Inserts events, checking first that their ids continue the log densely (the contract
    /// every caller relies on); a gap or an overlap is refused, with nothing written.
    fn append_events(
        &mut self,
        id: &str,
        seq: i64,
        events: &[StoredEvent],
    ) -> Result<(), ApplyError> {
        if events.is_empty() {
            return Ok(());
        }
        let last = last_event_id(&self.conn, seq)?;
        check_append(id, last, events).map_err(ApplyError::Refused)?;
        Ok(self.insert_events(seq, events)?)
    }

    /// Inserts events that [`check_append`] accepted.
    fn insert_events(&self, seq: i64, events: &[StoredEvent]) -> Result<(), rusqlite::Error> {
        let mut insert = self.conn.prepare_cached(sql::INSERT_EVENT)?;
        for event in events {
            // Checked by `check_append`: every id fits an i64.
            let key = event.id as i64;
            insert.execute(params![seq, key, &*event.json])?;
        }
        Ok(())
    }
}

/// Keeps the WAL within half the disk reserve (SQLite's default is 1000 pages, 4 MiB): on a
/// full disk, the reserve must hold a delete's transaction and the checkpoint that gives its
/// pages back, which writes at most what the WAL holds into the database file.
fn fit_wal_to_reserve(conn: &Connection, reserve: u64) -> rusqlite::Result<()> {
    if reserve == 0 {
        return Ok(());
    }
    let page = conn
        .pragma_query_value(None, "page_size", |r| r.get::<_, i64>(0))?
        .max(512);
    let half = i64::try_from(reserve / 2).unwrap_or(i64::MAX);
    conn.pragma_update(None, "wal_autocheckpoint", (half / page).clamp(8, 1000))?;
    conn.pragma_update(None, "journal_size_limit", half)
}

/// The bytes of the database's pages in use (its size without its free pages).
fn pages_in_use(conn: &Connection) -> rusqlite::Result<u64> {
    let value = |name: &str| conn.pragma_query_value(None, name, |r| r.get::<_, i64>(0));
    let pages = value("page_count")?.saturating_sub(value("freelist_count")?);
    Ok(u64::try_from(pages.saturating_mul(value("page_size")?)).unwrap_or(0))
}

/// Disk space held for deletes on a full disk: a file of `bytes` allocated (not sparse) bytes
/// next to the database. A write batch with a delete that fails gives it up and runs again —
/// the delete's transaction needs a little room in the WAL, and then gives pages back — and
/// the reserve is taken again once there is room.
struct Reserve {
    path: PathBuf,
    bytes: u64,
    held: bool,
    /// When taking it last failed.
    missed: Option<std::time::Instant>,
}

impl Reserve {
    /// Takes the reserve (or removes a stale one when `bytes` is 0).
    fn new(path: PathBuf, bytes: u64) -> Reserve {
        let mut reserve = Reserve {
            path,
            bytes,
            held: false,
            missed: None,
        };
        if bytes == 0 {
            reserve.held = true;
            let _ = std::fs::remove_file(&reserve.path);
        } else if !reserve.take() {
            tracing::warn!(
                path = %reserve.path.display(),
                bytes,
                "no room for the disk reserve; deletes on a full disk may fail until there is"
            );
        }
        reserve
    }

    /// Allocates the reserve unless it is held; false when the disk has no room for it.
    fn take(&mut self) -> bool {
        if self.held {
            return true;
        }
        match allocate(&self.path, self.bytes) {
            Ok(()) => {
                self.held = true;
                self.missed = None;
                true
            }
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot take the disk reserve");
                let _ = std::fs::remove_file(&self.path);
                self.missed = Some(std::time::Instant::now());
                false
            }
        }
    }

    /// Not held, and the last try was long enough ago to try again ([`RESERVE_RETRY`]).
    fn due(&self) -> bool {
        !self.held && self.missed.is_none_or(|at| at.elapsed() >= RESERVE_RETRY)
    }

    /// Gives the reserve's space back to the disk; false when there was none to give.
    fn release(&mut self) -> bool {
        if !self.held || self.bytes == 0 {
            return false;
        }
        self.held = false;
        std::fs::remove_file(&self.path).is_ok()
    }
}

/// Makes `path` a file of exactly `bytes` allocated bytes.
fn allocate(path: &Path, bytes: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    if file.metadata()?.len() > bytes {
        file.set_len(bytes)?;
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(bytes)
            .map_err(|_| std::io::Error::other("the reserve is too large"))?;
        // SAFETY: `file` is open for writing; posix_fallocate only reads its arguments.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Written out, so that the blocks are really taken (a sparse file would take none).
        use std::io::Write;
        let mut file = file;
        let chunk = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        file.sync_all()
    }
}

/// The largest event id of a conversation; one primary-key seek.
fn last_event_id(conn: &Connection, seq: i64) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(sql::LAST_EVENT_ID)?
        .query_row(params![seq], |r| r.get(0))
        .optional()
}

// ---------------------------------------------------------------------------------------------
// The readers

fn run_reader(mut conn: Connection, rx: Arc<Mutex<mpsc::Receiver<ReadRequest>>>) {
    loop {
        let request = {
            let mut rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.blocking_recv()
        };
        let Some(request) = request else { break };
        match request {
            ReadRequest::Get { id, reply } => {
                let _ = reply.send(read_get(&mut conn, &id));
            }
            ReadRequest::List {
                offset,
                limit,
                reply,
            } => {
                let _ = reply.send(read_list(&conn, offset, limit));
            }
            ReadRequest::Events { id, query, reply } => {
                let _ = reply.send(read_events(&conn, &id, query));
            }
            ReadRequest::Settings { user, reply } => {
                let _ = reply.send(read_settings(&conn, &user));
            }
            ReadRequest::ListOwned {
                owner,
                offset,
                limit,
                reply,
            } => {
                let _ = reply.send(read_list_owned(&conn, &owner, offset, limit));
            }
            ReadRequest::ListKeys { reply } => {
                let _ = reply.send(read_keys(&conn));
            }
            ReadRequest::LookupKey { hash, reply } => {
                let _ = reply.send(read_lookup_key(&conn, hash.as_deref()));
            }
        }
    }
    tracing::debug!("store reader finished");
}

fn read_settings(conn: &Connection, user: &str) -> Result<Option<Value>, StoreError> {
    let text: Option<String> = conn
        .prepare_cached(sql::SETTINGS)
        .and_then(|mut stmt| stmt.query_row(params![user], |r| r.get(0)).optional())
        .map_err(io_error)?;
    decode_settings(text)
}

fn meta_from_row(row: &Row<'_>) -> rusqlite::Result<(ConversationMeta, String)> {
    let conversation_id: String = row.get(0)?;
    let init_json: String = row.get(6)?;
    Ok((
        ConversationMeta {
            conversation_id,
            title: row.get(1)?,
            created_at: row.get(2)?,
            last_updated_at: row.get(3)?,
            trigger: row.get(4)?,
            owner: row.get(5)?,
            init: InitData::default(),
        },
        init_json,
    ))
}

fn read_get(conn: &mut Connection, id: &str) -> Result<Option<ConversationRecord>, StoreError> {
    // One read transaction: the metadata and next_event_id come from the same snapshot.
    let tx = conn.transaction().map_err(io_error)?;
    let row = tx
        .prepare_cached(sql::GET)
        .and_then(|mut s| {
            s.query_row(params![id], |r| {
                Ok((meta_from_row(r)?, r.get::<_, i64>(7)?, r.get::<_, i64>(8)?))
            })
            .optional()
        })
        .map_err(io_error)?;
    let Some((row, seq, bytes)) = row else {
        return Ok(None);
    };
    let meta = decode_init(row)?;
    let next_event_id = next_after(id, last_event_id(&tx, seq).map_err(io_error)?)?;
    Ok(Some(ConversationRecord {
        meta,
        next_event_id,
        bytes: u64::try_from(bytes).unwrap_or(0),
    }))
}

fn read_list(
    conn: &Connection,
    offset: usize,
    limit: usize,
) -> Result<Vec<ConversationMeta>, StoreError> {
    read_metas(
        conn,
        sql::LIST,
        params![sql_count(limit), sql_count(offset)],
    )
}

fn read_list_owned(
    conn: &Connection,
    owner: &str,
    offset: usize,
    limit: usize,
) -> Result<Vec<ConversationMeta>, StoreError> {
    let page = params![owner, sql_count(limit), sql_count(offset)];
    read_metas(conn, sql::LIST_OWNED, page)
}

/// The conversations a listing statement selects.
fn read_metas(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<ConversationMeta>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(io_error)?;
    let rows = stmt.query_map(params, meta_from_row).map_err(io_error)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(decode_init(row.map_err(io_error)?)?);
    }
    Ok(out)
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        name: row.get(0)?,
        admin: row.get(1)?,
        created_at: row.get(2)?,
    })
}

fn read_keys(conn: &Connection) -> Result<Vec<ApiKey>, StoreError> {
    let mut stmt = conn.prepare_cached(sql::LIST_KEYS).map_err(io_error)?;
    let rows = stmt.query_map([], key_from_row).map_err(io_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(io_error)
}

fn read_lookup_key(conn: &Connection, hash: Option<&str>) -> Result<KeyLookup, StoreError> {
    let key = match hash {
        Some(hash) => conn
            .prepare_cached(sql::KEY_BY_HASH)
            .and_then(|mut s| s.query_row(params![hash], key_from_row).optional())
            .map_err(io_error)?,
        None => None,
    };
    let any = key.is_some()
        || conn
            .prepare_cached(sql::ANY_KEY)
            .and_then(|mut s| s.query_row([], |r| r.get::<_, bool>(0)))
            .map_err(io_error)?;
    Ok(KeyLookup { key, any })
}

fn read_events(conn: &Connection, id: &str, q: EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
    let Some((start, end, limit)) = event_range(&q) else {
        return Ok(Vec::new());
    };
    let sql = if q.reverse {
        sql::EVENTS_NEWEST_FIRST
    } else {
        sql::EVENTS_OLDEST_FIRST
    };
    let mut stmt = conn.prepare_cached(sql).map_err(io_error)?;
    let rows = stmt
        .query_map(params![id, start, end, limit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(io_error)?;
    let mut out = Vec::new();
    for row in rows {
        let (event_id, json) = row.map_err(io_error)?;
        out.push(StoredEvent {
            id: stored_event_id(id, event_id)?,
            json: json.into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        let conn = open_connection(&path, false).expect("open");
        prepare_database(&path, &conn).expect("prepare");
        (dir, conn)
    }

    /// The query plan of `sql`, its parameters bound to NULL.
    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("prepare");
        let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
        let rows = stmt
            .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
            .expect("query")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        rows.join(" | ")
    }

    /// Every statement the store runs seeks through an index or walks one in order; none scans
    /// a table or sorts.
    #[test]
    fn queries_use_indexes() {
        let (_dir, conn) = prepared();
        let expect = |sql: &str, uses: &[&str]| {
            let plan = plan(&conn, sql);
            for used in uses {
                assert!(plan.contains(used), "{sql}: expected {used:?} in {plan}");
            }
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: sorts: {plan}");
            let scans = plan.split(" | ").filter(|step| step.starts_with("SCAN"));
            for step in scans {
                assert!(
                    step.contains("USING INDEX") || step.contains("USING COVERING INDEX"),
                    "{sql}: scans a table: {plan}"
                );
            }
        };
        let by_id = "USING INDEX conversations_by_id (id=?)";
        let covering_by_id = "USING COVERING INDEX conversations_by_id (id=?)";
        // Newest first, straight off the (ascending) index walked backwards.
        expect(
            sql::LIST,
            &["SCAN conversations USING INDEX conversations_by_created_at"],
        );
        expect(
            sql::LIST_OWNED,
            &["SEARCH conversations USING INDEX conversations_by_owner (owner=?)"],
        );
        expect(
            sql::KEY_BY_HASH,
            &["USING INDEX sqlite_autoindex_api_keys_2"],
        );
        expect(sql::KEY_EXISTS, &["USING PRIMARY KEY (name=?)"]);
        expect(sql::REVOKE_KEY, &["USING PRIMARY KEY (name=?)"]);
        expect(sql::GET, &[by_id]);
        expect(sql::SEQ_BY_ID, &[covering_by_id]);
        expect(sql::SET_TITLE, &[by_id]);
        expect(sql::TOUCH, &["USING INTEGER PRIMARY KEY (rowid=?)"]);
        expect(sql::BYTES, &["USING INTEGER PRIMARY KEY (rowid=?)"]);
        expect(
            sql::DELETE_CONVERSATION,
            &["USING INTEGER PRIMARY KEY (rowid=?)"],
        );
        expect(sql::DELETE_EVENTS, &["USING PRIMARY KEY (conv_seq=?)"]);
        expect(
            sql::LAST_EVENT_ID,
            &["SEARCH events USING PRIMARY KEY (conv_seq=?)"],
        );
        for events in [sql::EVENTS_OLDEST_FIRST, sql::EVENTS_NEWEST_FIRST] {
            expect(
                events,
                &[
                    "SEARCH events USING PRIMARY KEY (conv_seq=? AND id>? AND id<?)",
                    covering_by_id,
                ],
            );
        }
    }

    /// Conversations get increasing seqs in creation order whatever their ids, so their rows
    /// and events are appended at the right edge of the trees.
    #[test]
    fn seq_follows_creation_order() {
        let (_dir, conn) = prepared();
        let ids = ["f3a9", "0b12", "zz", "a"];
        for id in ids {
            conn.execute(
                sql::CREATE,
                params![
                    id,
                    "t",
                    "2024-01-01T00:00:00.000000Z",
                    "x",
                    "gui",
                    None::<String>,
                    "{}",
                    2
                ],
            )
            .expect("insert");
        }
        let seqs: Vec<i64> = ids
            .iter()
            .map(|id| {
                conn.query_row(sql::SEQ_BY_ID, params![id], |r| r.get(0))
                    .expect("seq")
            })
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }

    #[test]
    fn seq_cache_stays_bounded_and_forgets() {
        let mut cache = SeqCache::new(8);
        for i in 0..100 {
            cache.insert(format!("c{i}"), i);
            assert!(cache.young.len() + cache.old.len() <= 8);
        }
        assert_eq!(cache.get("c99"), Some(99));
        assert_eq!(cache.get("c0"), None);
        // A hit in the old generation survives the next turnover.
        assert_eq!(cache.get("c95"), Some(95));
        for i in 100..104 {
            cache.insert(format!("c{i}"), i);
        }
        assert_eq!(cache.get("c95"), Some(95));
        cache.remove("c95");
        assert_eq!(cache.get("c95"), None);
        cache.clear();
        assert_eq!(cache.get("c103"), None);
        let mut off = SeqCache::new(0);
        off.insert("a".into(), 1);
        assert_eq!(off.get("a"), None);
    }

    #[test]
    fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        for _ in 0..2 {
            let conn = open_connection(&path, false).expect("open");
            prepare_database(&path, &conn).expect("prepare");
            let v: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .expect("version");
            assert_eq!(v, SCHEMA_VERSION);
        }
    }
}
