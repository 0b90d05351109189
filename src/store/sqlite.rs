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
//!   answers every request of the batch. Each request runs in its own savepoint, so one failing
//!   request (an id collision, say) does not fail its neighbours; if the transaction itself fails
//!   (disk full, I/O error), every request of the batch gets [`StoreError::Io`] and the writer
//!   carries on with the next batch.
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
//! - **Clean shutdown.** [`SqliteStore`] is a cheap `Clone`; when the last clone (and every
//!   pending future) is dropped, the threads finish the queued work, close their connections and
//!   exit. [`SqliteStore::close`] waits for that.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    ConversationMeta, ConversationRecord, EventQuery, InitData, Store, StoreError, StoreFuture,
};
use crate::config::StoreTuning;
use crate::events::{meta_timestamp, StoredEvent};

/// The database file's name inside the data directory.
pub const DB_FILE_NAME: &str = "switchboard.db";

/// `PRAGMA application_id` of a switchboard database ("SWBD"); tells our files from other
/// programs' SQLite files.
const APPLICATION_ID: i32 = 0x5357_4244;

/// Schema migrations: step `i` takes the database from `user_version` `i` to `i + 1`. Each step
/// runs in its own transaction together with the `user_version` bump. Only ever append here.
const MIGRATIONS: &[&str] = &[
    // 1: conversations and their event logs.
    r#"
    CREATE TABLE conversations (
        id              TEXT PRIMARY KEY NOT NULL,
        title           TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        last_updated_at TEXT NOT NULL,
        "trigger"       TEXT NOT NULL,
        owner           TEXT,
        init_json       TEXT NOT NULL
    );
    CREATE INDEX conversations_newest_first ON conversations (created_at DESC, id DESC);
    CREATE TABLE events (
        conversation_id TEXT NOT NULL,
        id              INTEGER NOT NULL,
        json            TEXT NOT NULL,
        PRIMARY KEY (conversation_id, id)
    ) WITHOUT ROWID;
    "#,
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

const META_COLUMNS: &str = r#"id, title, created_at, last_updated_at, "trigger", owner, init_json"#;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A change, applied by the writer thread.
enum WriteCommand {
    Create(Box<ConversationMeta>),
    SetTitle {
        id: String,
        title: String,
    },
    Append {
        id: String,
        events: Vec<StoredEvent>,
    },
    Delete {
        id: String,
    },
    Flush,
}

/// Where a write's outcome goes.
enum WriteReply {
    Unit(Reply<()>),
    Flag(Reply<bool>),
}

impl WriteReply {
    fn send(self, outcome: Result<bool, StoreError>) {
        // A caller that dropped its future no longer wants the answer; that is fine.
        match self {
            WriteReply::Unit(tx) => {
                let _ = tx.send(outcome.map(|_| ()));
            }
            WriteReply::Flag(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

struct WriteRequest {
    command: WriteCommand,
    reply: WriteReply,
}

impl WriteRequest {
    /// How much of a batch this request uses: its events, or 1.
    fn weight(&self) -> usize {
        match &self.command {
            WriteCommand::Append { events, .. } => events.len().max(1),
            _ => 1,
        }
    }
}

/// A query, answered by a reader thread.
enum ReadRequest {
    Get {
        id: String,
        reply: Reply<Option<ConversationRecord>>,
    },
    List {
        offset: usize,
        limit: usize,
        reply: Reply<Vec<ConversationMeta>>,
    },
    Events {
        id: String,
        query: EventQuery,
        reply: Reply<Vec<StoredEvent>>,
    },
}

/// Admits write requests into the writer's bounded queue in call order (see the module docs).
struct WriteQueue {
    tx: mpsc::Sender<WriteRequest>,
    overflow: Mutex<Overflow>,
}

/// Requests that found the queue full, oldest first. `moved` counts the requests ever moved
/// from here into the queue; the request with ticket `t` sits at index `t - moved`.
#[derive(Default)]
struct Overflow {
    waiting: VecDeque<WriteRequest>,
    issued: u64,
    moved: u64,
}

/// Whether a request is in the writer's queue yet.
enum Admission {
    Queued,
    /// In the overflow list with this ticket.
    Waiting(u64),
}

impl WriteQueue {
    fn lock(&self) -> MutexGuard<'_, Overflow> {
        self.overflow.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `request` now if nothing is waiting and there is room; otherwise puts it at the
    /// end of the overflow list. Every send happens under the lock, so the queue's order is the
    /// call order.
    fn admit(&self, request: WriteRequest) -> Result<Admission, StoreError> {
        let mut overflow = self.lock();
        let request = if overflow.waiting.is_empty() {
            match self.tx.try_send(request) {
                Ok(()) => return Ok(Admission::Queued),
                Err(TrySendError::Full(request)) => request,
                Err(TrySendError::Closed(_)) => return Err(StoreError::Closed),
            }
        } else {
            request
        };
        let ticket = overflow.issued;
        overflow.issued += 1;
        overflow.waiting.push_back(request);
        Ok(Admission::Waiting(ticket))
    }

    /// Moves overflow requests into the queue, front first, until the one with `ticket` is in.
    async fn wait_admitted(&self, ticket: u64) -> Result<(), StoreError> {
        loop {
            if self.lock().moved > ticket {
                return Ok(());
            }
            let permit = self.tx.reserve().await.map_err(|_| StoreError::Closed)?;
            let mut overflow = self.lock();
            if overflow.moved > ticket {
                return Ok(());
            }
            if let Some(front) = overflow.waiting.pop_front() {
                permit.send(front);
                overflow.moved += 1;
            }
        }
    }
}

/// The SQLite-backed [`Store`]. Cheap to clone; all clones share the same threads.
#[derive(Clone)]
pub struct SqliteStore {
    writes: Arc<WriteQueue>,
    reads: mpsc::Sender<ReadRequest>,
    /// Number of store threads still running.
    running: watch::Receiver<usize>,
    path: Arc<PathBuf>,
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
        let mut read_conns = Vec::with_capacity(READER_THREADS);
        for _ in 0..READER_THREADS {
            read_conns.push(open_connection(&path, true)?);
        }

        let queue = tuning.queue.max(1);
        let batch_max = tuning.batch_max.max(1);
        let (write_tx, write_rx) = mpsc::channel(queue);
        let (read_tx, read_rx) = mpsc::channel(queue);
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

        spawn(
            "store-writer".into(),
            Box::new(move || run_writer(write_conn, write_rx, batch_max)),
        )?;
        for (i, conn) in read_conns.into_iter().enumerate() {
            let rx = read_rx.clone();
            spawn(
                format!("store-reader-{i}"),
                Box::new(move || run_reader(conn, rx)),
            )?;
        }

        tracing::info!(path = %path.display(), schema_version = SCHEMA_VERSION, "SQLite store open");
        Ok(SqliteStore {
            writes: Arc::new(WriteQueue {
                tx: write_tx,
                overflow: Mutex::new(Overflow::default()),
            }),
            reads: read_tx,
            running: running_rx,
            path: Arc::new(path),
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
        let (tx, rx) = oneshot::channel();
        let request = WriteRequest {
            command,
            reply: make_reply(tx),
        };
        let admission = self.writes.admit(request);
        let queue = self.writes.clone();
        Box::pin(async move {
            if let Admission::Waiting(ticket) = admission? {
                queue.wait_admitted(ticket).await?;
            }
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn read<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> ReadRequest,
    ) -> StoreFuture<T> {
        let (tx, rx) = oneshot::channel();
        let request = make(tx);
        let reads = self.reads.clone();
        Box::pin(async move {
            reads.send(request).await.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }
}

impl Store for SqliteStore {
    fn create(&self, meta: ConversationMeta) -> StoreFuture<()> {
        self.write(WriteCommand::Create(Box::new(meta)), WriteReply::Unit)
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

    fn append(&self, id: &str, events: Vec<StoredEvent>) -> StoreFuture<()> {
        let command = WriteCommand::Append {
            id: id.to_string(),
            events,
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

    // The tables and index this build uses must exist (a damaged or hand-edited schema is
    // refused here rather than failing on the first request).
    for (kind, name) in [
        ("table", "conversations"),
        ("table", "events"),
        ("index", "conversations_newest_first"),
    ] {
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
    // Touch the roots of the tables and the index the hot paths use.
    let probes = [
        "SELECT id FROM conversations ORDER BY created_at DESC, id DESC LIMIT 1",
        "SELECT conversation_id FROM events LIMIT 1",
    ];
    for sql in probes {
        conn.query_row(sql, [], |_| Ok(()))
            .optional()
            .map_err(fail)?;
    }
    Ok(())
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

fn run_writer(conn: Connection, mut rx: mpsc::Receiver<WriteRequest>, batch_max: usize) {
    let mut batch: Vec<WriteRequest> = Vec::new();
    // `None` once every sender is gone and the queue is drained.
    while let Some(first) = rx.blocking_recv() {
        let mut weight = first.weight();
        batch.push(first);
        while weight < batch_max {
            match rx.try_recv() {
                Ok(next) => {
                    weight += next.weight();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        commit_batch(&conn, &mut batch);
    }
    // Fold the WAL back into the database file so that a closed store is one self-contained
    // file. Best effort: if a reader is still busy the WAL stays, which is just as durable.
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
        tracing::warn!(error = %e, "store: final checkpoint failed; the WAL file stays");
    }
    tracing::debug!("store writer finished");
}

/// Applies `batch` in one transaction, then answers every request in it.
fn commit_batch(conn: &Connection, batch: &mut Vec<WriteRequest>) {
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
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        fail_batch(batch, &e.to_string());
        return;
    }
    let mut outcomes = Vec::with_capacity(batch.len());
    for request in batch.iter() {
        let outcome = apply_in_savepoint(conn, &request.command, &now);
        if let Err(StoreError::Io(message)) = &outcome {
            if conn.is_autocommit() {
                // SQLite rolled the whole transaction back (I/O error, disk full, ...).
                let message = message.clone();
                fail_batch(batch, &message);
                return;
            }
        }
        outcomes.push(outcome);
    }
    match conn.execute_batch("COMMIT") {
        Ok(()) => {
            for (request, outcome) in batch.drain(..).zip(outcomes) {
                request.reply.send(outcome);
            }
        }
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            fail_batch(batch, &e.to_string());
        }
    }
}

fn fail_batch(batch: &mut Vec<WriteRequest>, message: &str) {
    tracing::error!(requests = batch.len(), error = %message, "store write batch failed");
    for request in batch.drain(..) {
        request.reply.send(Err(StoreError::Io(message.to_string())));
    }
}

/// Runs one request inside a savepoint, so that its failure leaves the rest of the batch alone.
fn apply_in_savepoint(
    conn: &Connection,
    command: &WriteCommand,
    now: &str,
) -> Result<bool, StoreError> {
    if matches!(command, WriteCommand::Flush) {
        return Ok(true);
    }
    conn.execute_batch("SAVEPOINT request").map_err(io_error)?;
    match apply(conn, command, now) {
        Ok(value) => {
            conn.execute_batch("RELEASE request").map_err(io_error)?;
            Ok(value)
        }
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK TO request; RELEASE request");
            }
            Err(e)
        }
    }
}

fn apply(conn: &Connection, command: &WriteCommand, now: &str) -> Result<bool, StoreError> {
    match command {
        WriteCommand::Create(meta) => {
            let init = serde_json::to_string(&meta.init)
                .map_err(|e| StoreError::Io(format!("cannot encode init data: {e}")))?;
            let inserted = conn
                .prepare_cached(
                    r#"INSERT INTO conversations
                         (id, title, created_at, last_updated_at, "trigger", owner, init_json)
                       VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                       ON CONFLICT (id) DO NOTHING"#,
                )
                .and_then(|mut s| {
                    s.execute(params![
                        meta.conversation_id,
                        meta.title,
                        meta.created_at,
                        meta.last_updated_at,
                        meta.trigger,
                        meta.owner,
                        init,
                    ])
                })
                .map_err(io_error)?;
            if inserted == 0 {
                return Err(StoreError::Exists(meta.conversation_id.clone()));
            }
            Ok(true)
        }
        WriteCommand::SetTitle { id, title } => {
            let changed = conn
                .prepare_cached(
                    "UPDATE conversations SET title = ?2, last_updated_at = ?3 WHERE id = ?1",
                )
                .and_then(|mut s| s.execute(params![id, title, now]))
                .map_err(io_error)?;
            Ok(changed > 0)
        }
        WriteCommand::Append { id, events } => {
            append_events(conn, id, events)?;
            conn.prepare_cached("UPDATE conversations SET last_updated_at = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id, now]))
                .map_err(io_error)?;
            Ok(true)
        }
        WriteCommand::Delete { id } => {
            conn.prepare_cached("DELETE FROM events WHERE conversation_id = ?1")
                .and_then(|mut s| s.execute(params![id]))
                .map_err(io_error)?;
            let removed = conn
                .prepare_cached("DELETE FROM conversations WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id]))
                .map_err(io_error)?;
            Ok(removed > 0)
        }
        WriteCommand::Flush => Ok(true),
    }
}

/// Inserts events, checking that their ids continue the log densely (the contract every caller
/// relies on); a gap or an overlap is refused instead of stored.
fn append_events(conn: &Connection, id: &str, events: &[StoredEvent]) -> Result<(), StoreError> {
    let Some(first) = events.first() else {
        return Ok(());
    };
    let next = next_event_id(conn, id)?;
    if first.id != next {
        return Err(StoreError::Io(format!(
            "conversation {id}: append starts at event id {} but the log continues at {next}",
            first.id
        )));
    }
    let mut insert = conn
        .prepare_cached("INSERT INTO events (conversation_id, id, json) VALUES (?1, ?2, ?3)")
        .map_err(io_error)?;
    for (expected, event) in (next..).zip(events) {
        if event.id != expected {
            return Err(StoreError::Io(format!(
                "conversation {id}: event ids in one append must be consecutive; \
                 got {} where {expected} was due",
                event.id
            )));
        }
        let key = i64::try_from(event.id).map_err(|_| {
            StoreError::Io(format!(
                "conversation {id}: event id {} is too large",
                event.id
            ))
        })?;
        insert
            .execute(params![id, key, &*event.json])
            .map_err(io_error)?;
    }
    Ok(())
}

/// `max(id) + 1` of a conversation's events, or 0; one primary-key seek.
fn next_event_id(conn: &Connection, id: &str) -> Result<u64, StoreError> {
    let last: Option<i64> = conn
        .prepare_cached("SELECT id FROM events WHERE conversation_id = ?1 ORDER BY id DESC LIMIT 1")
        .and_then(|mut s| s.query_row(params![id], |r| r.get(0)).optional())
        .map_err(io_error)?;
    match last {
        None => Ok(0),
        Some(last) => u64::try_from(last)
            .ok()
            .and_then(|l| l.checked_add(1))
            .ok_or_else(|| {
                StoreError::Io(format!(
                    "conversation {id}: stored event id {last} is invalid"
                ))
            }),
    }
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
        }
    }
    tracing::debug!("store reader finished");
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

fn decode_init(
    (mut meta, init_json): (ConversationMeta, String),
) -> Result<ConversationMeta, StoreError> {
    meta.init = serde_json::from_str(&init_json).map_err(|e| {
        StoreError::Io(format!(
            "conversation {}: stored init data is unreadable: {e}",
            meta.conversation_id
        ))
    })?;
    Ok(meta)
}

fn read_get(conn: &mut Connection, id: &str) -> Result<Option<ConversationRecord>, StoreError> {
    // One read transaction: the metadata and next_event_id come from the same snapshot.
    let tx = conn.transaction().map_err(io_error)?;
    let row = tx
        .prepare_cached(&format!(
            "SELECT {META_COLUMNS} FROM conversations WHERE id = ?1"
        ))
        .and_then(|mut s| s.query_row(params![id], meta_from_row).optional())
        .map_err(io_error)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let meta = decode_init(row)?;
    let next_event_id = next_event_id(&tx, id)?;
    Ok(Some(ConversationRecord {
        meta,
        next_event_id,
    }))
}

/// A count for `LIMIT`/`OFFSET`; anything beyond `i64::MAX` is as good as unlimited.
fn sql_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn read_list(
    conn: &Connection,
    offset: usize,
    limit: usize,
) -> Result<Vec<ConversationMeta>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {META_COLUMNS} FROM conversations \
             ORDER BY created_at DESC, id DESC LIMIT ?1 OFFSET ?2"
        ))
        .map_err(io_error)?;
    let rows = stmt
        .query_map(params![sql_count(limit), sql_count(offset)], meta_from_row)
        .map_err(io_error)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(decode_init(row.map_err(io_error)?)?);
    }
    Ok(out)
}

fn read_events(conn: &Connection, id: &str, q: EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
    // Stored ids are at most i64::MAX, so a start beyond it matches nothing and an end beyond
    // it is no bound.
    let Ok(start) = i64::try_from(q.start_id) else {
        return Ok(Vec::new());
    };
    let end = q
        .end_id
        .map_or(i64::MAX, |e| i64::try_from(e).unwrap_or(i64::MAX));
    if q.limit == 0 || start > end {
        return Ok(Vec::new());
    }
    let sql = if q.reverse {
        "SELECT id, json FROM events WHERE conversation_id = ?1 AND id BETWEEN ?2 AND ?3 \
         ORDER BY id DESC LIMIT ?4"
    } else {
        "SELECT id, json FROM events WHERE conversation_id = ?1 AND id BETWEEN ?2 AND ?3 \
         ORDER BY id ASC LIMIT ?4"
    };
    let mut stmt = conn.prepare_cached(sql).map_err(io_error)?;
    let rows = stmt
        .query_map(params![id, start, end, sql_count(q.limit)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(io_error)?;
    let mut out = Vec::new();
    for row in rows {
        let (event_id, json) = row.map_err(io_error)?;
        let event_id = u64::try_from(event_id).map_err(|_| {
            StoreError::Io(format!(
                "conversation {id}: stored event id {event_id} is invalid"
            ))
        })?;
        out.push(StoredEvent {
            id: event_id,
            json: json.into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(3))
            .expect("query")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        rows.join(" | ")
    }

    /// The hot queries seek through indexes; none scans a table or sorts.
    #[test]
    fn queries_use_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        let conn = open_connection(&path, false).expect("open");
        prepare_database(&path, &conn).expect("prepare");
        let list = plan(
            &conn,
            &format!(
                "SELECT {META_COLUMNS} FROM conversations \
                 ORDER BY created_at DESC, id DESC LIMIT 20 OFFSET 0"
            ),
        );
        assert!(list.contains("conversations_newest_first"), "{list}");
        assert!(!list.contains("TEMP B-TREE"), "{list}");
        let last = plan(
            &conn,
            "SELECT id FROM events WHERE conversation_id = 'a' ORDER BY id DESC LIMIT 1",
        );
        assert!(last.contains("PRIMARY KEY"), "{last}");
        assert!(!last.contains("TEMP B-TREE"), "{last}");
        for reverse in ["ASC", "DESC"] {
            let events = plan(
                &conn,
                &format!(
                    "SELECT id, json FROM events WHERE conversation_id = 'a' \
                     AND id BETWEEN 3 AND 9 ORDER BY id {reverse} LIMIT 5"
                ),
            );
            assert!(events.contains("PRIMARY KEY"), "{events}");
            assert!(!events.contains("TEMP B-TREE"), "{events}");
        }
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
