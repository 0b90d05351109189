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
//!   only queues a request and returns a future (`any_key` alone answers at once, from a
//!   cache it checks against the database without waiting for a lock; see `key_watch`). One dedicated *writer* thread owns the write
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
//!   the WAL (1 MiB at a time). Quotas ([`StoreLimits`]) count each conversation's
//!   `bytes` column and, for the whole store, the pages in use.
//! - **Deletes work on a full disk.** [`StoreLimits::disk_reserve_bytes`] stay allocated in
//!   `<data_dir>/switchboard.reserve`; a failing batch with a delete gives them up and runs
//!   again, and the WAL is kept within half the reserve so that the checkpoint after the delete
//!   fits as well.
//! - **Clean shutdown.** [`SqliteStore`] is a cheap `Clone`; when the last clone (and every
//!   pending future) is dropped, the threads finish the queued work, close their connections and
//!   exit. [`SqliteStore::close`] waits for that.
//!
//! Its parts, one job each: this module is the handle (it starts the threads and turns each
//! [`Store`] call into a queued request, through the queues of [`super::durable`]); `open`
//! sets up connections, refuses unusable files and migrates the schema; `sql` holds every
//! statement; `writer` is the writer thread (group commit, savepoints, quotas, giving space
//! back); `reader` the reader threads; `reserve` the disk reserve; `key_watch` answers whether
//! any user key exists without a trip to a reader; `checkpoint` copies the WAL back into the
//! database, mostly on a thread of its own so that the writer seldom waits for it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::durable::{all_ended, queued_store_methods, ReadQueue, Running, WriteQueue};
use super::{Failure, Store, StoreError, StoreLimits};
use crate::config::StoreTuning;

#[macro_use]
mod sql;
mod checkpoint;
mod key_watch;
mod open;
mod reader;
mod reserve;
mod writer;

use checkpoint::Checkpoints;
use key_watch::KeyWatch;
use open::{open_connection, prepare_database};
pub use open::{QUICK_CHECK_MAX_BYTES, SCHEMA_VERSION};
use reader::run_reader;
use reserve::Reserve;
use writer::{fit_wal_to_reserve, pages_in_use, wal_limit, Writer};

/// The database file's name inside the data directory.
pub const DB_FILE_NAME: &str = "switchboard.db";

/// The disk reserve's file name inside the data directory (see [`Reserve`]).
pub const RESERVE_FILE_NAME: &str = "switchboard.reserve";

/// Threads serving reads, each with its own connection.
const READER_THREADS: usize = 2;

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
    /// Whether any user key exists, without a trip to a reader.
    keys: Arc<KeyWatch>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// An open refused in the store's own words, naming the file.
fn open_error(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Open(format!("{}: {what}", path.display()).into())
}

/// An open that `cause` failed, saying `what` (which includes what `cause` says), naming the
/// file; `cause` is kept as the source.
fn open_caused(
    path: &Path,
    what: impl std::fmt::Display,
    cause: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::Open(Failure::caused(
        format!("{}: {what}", path.display()),
        cause,
    ))
}

/// An open that `cause` failed, in its own words, naming the file.
fn open_failed(path: &Path, cause: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Open(Failure::of(cause).within(path.display()))
}

fn io_error(e: rusqlite::Error) -> StoreError {
    StoreError::Io(Failure::of(e))
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
            open_caused(
                data_dir,
                format!("cannot create the data directory: {e}"),
                e,
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
            pages_in_use(&write_conn).map_err(|e| open_failed(&path, e))?,
        ));
        let reserve = Reserve::new(data_dir.join(RESERVE_FILE_NAME), limits.disk_reserve_bytes);
        fit_wal_to_reserve(&write_conn, limits.disk_reserve_bytes)
            .map_err(|e| open_failed(&path, e))?;
        let keys = KeyWatch::new(&path, open_connection(&path, true)?)
            .map(Arc::new)
            .map_err(|e| open_failed(&path, e))?;
        let mut read_conns = Vec::with_capacity(READER_THREADS);
        for _ in 0..READER_THREADS {
            read_conns.push(open_connection(&path, true)?);
        }
        let wal_limit = wal_limit(&write_conn).map_err(|e| open_failed(&path, e))?;
        let checkpoint_conn = open_connection(&path, false)?;

        let queue = tuning.queue.max(1);
        let batch_max = tuning.batch_max.max(1);
        let (writes, write_rx) = WriteQueue::new(queue);
        let (reads, read_rx) = ReadQueue::new(queue);
        let read_rx = Arc::new(Mutex::new(read_rx));
        let running = Running::new();

        let spawn = |name: String, body: Box<dyn FnOnce() + Send>| {
            let exit = running.thread();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let _exit = exit;
                    body();
                })
                .map(|_| ())
                .map_err(|e| open_caused(&path, format!("cannot start a store thread: {e}"), e))
        };

        let (checkpoints, checkpointer) = Checkpoints::new(wal_limit);
        spawn(
            "store-checkpoint".into(),
            Box::new(move || checkpointer(checkpoint_conn)),
        )?;
        spawn("store-writer".into(), {
            let writer = Writer::new(write_conn, limits, used.clone(), reserve, checkpoints)
                .map_err(|e| open_failed(&path, e))?;
            Box::new(move || writer.run(write_rx, batch_max))
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
            running: running.receiver(),
            path: Arc::new(path),
            limits,
            used,
            keys,
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
        let running = self.running.clone();
        drop(self);
        all_ended(running)
    }
}

impl Store for SqliteStore {
    queued_store_methods!();

    /// From the [`KeyWatch`] on the caller's thread; from a reader when the database is busy.
    fn any_key(&self) -> super::StoreFuture<bool> {
        match self.keys.any_key() {
            Ok(any) => Box::pin(std::future::ready(Ok(any))),
            Err(e) => {
                tracing::debug!(error = %e, "store: the key watch cannot say; asking a reader");
                let lookup = self.reads.lookup_key(None);
                Box::pin(async move { Ok(lookup.await?.any) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::{params, Connection};

    use super::open::{open_connection, prepare_database};
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
