//! The SQLite store's writer thread: it owns the write connection, takes the queued write
//! requests in batches and applies each batch in one transaction (group commit), isolating
//! a failing request in a savepoint; it keeps the quotas and gives deleted conversations'
//! pages back to the file system.

use crate::conversation::ConversationMeta;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::mpsc;

use super::checkpoint::{Checkpoints, WalPages};
use super::reserve::Reserve;
use super::sql::{self, last_event_id};
use crate::events::{meta_timestamp, StoredEvent};
use crate::store::durable::{
    self, check_append, fail_batch, fill_batch, only_flushes, BatchError, Isolation, WriteCommand,
    WriteRequest,
};
use crate::store::{encode_init, events_bytes, meta_bytes, Failure, StoreError, StoreLimits};

/// Pages given back to the file system per step after a delete (1 MiB of 4 KiB pages).
const RECLAIM_PAGES: u32 = 256;

/// Entries the writer's id → seq cache holds at most.
const SEQ_CACHE_CAPACITY: usize = 4096;

/// Prepared statements the write connection keeps (rusqlite's default, 16, is about the number
/// of statements the writer runs: with room to spare none of them is ever compiled again).
const STATEMENT_CACHE_CAPACITY: usize = 32;

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
pub(super) struct Writer {
    /// Declared (so dropped) before `wal_pages`, which its WAL hook points at.
    conn: Connection,
    /// Pages in the WAL after the connection's last commit.
    wal_pages: Box<WalPages>,
    checkpoints: Checkpoints,
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
    last_failure: Option<Failure>,
    /// The database's page size in bytes (fixed once the database exists).
    page_size: u64,
}

/// Why a request was not applied.
type ApplyError = durable::ApplyError<rusqlite::Error>;

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::Sql(e)
    }
}

impl Writer {
    /// The writer of a prepared database whose pages in use are `used`; it checkpoints the WAL
    /// as `checkpoints` says instead of SQLite's automatic checkpoint.
    pub(super) fn new(
        conn: Connection,
        limits: StoreLimits,
        used: Arc<AtomicU64>,
        reserve: Reserve,
        checkpoints: Checkpoints,
    ) -> rusqlite::Result<Writer> {
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        let page_size = page_size(&conn)?;
        let wal_pages = WalPages::watch(&conn);
        Ok(Writer {
            conn,
            wal_pages,
            checkpoints,
            seqs: SeqCache::new(SEQ_CACHE_CAPACITY),
            appended: HashMap::new(),
            limits,
            used,
            added: 0,
            deleted: false,
            reserve,
            last_failure: None,
            page_size,
        })
    }

    /// The writer thread's body: applies batches until every sender is gone and the queue is
    /// drained, then folds the WAL back into the database file.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>, batch_max: usize) {
        let mut batch: Vec<WriteRequest> = Vec::new();
        // `None` once every sender is gone and the queue is drained.
        while let Some(first) = rx.blocking_recv() {
            fill_batch(first, &mut rx, batch_max, &mut batch);
            self.commit_batch(&mut batch);
        }
        // Fold the WAL back into the database file so that a closed store is one self-contained
        // file. Best effort: if a reader is still busy the WAL stays, which is just as durable.
        if let Err(e) = self.checkpoints.now(&self.conn, "TRUNCATE") {
            tracing::warn!(error = %e, "store: final checkpoint failed; the WAL file stays");
        }
        tracing::debug!("store writer finished");
    }

    /// Applies `batch` in one transaction, then answers every request in it.
    fn commit_batch(&mut self, batch: &mut Vec<WriteRequest>) {
        if only_flushes(batch) {
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
                        (WriteCommand::Probe, Some(failure)) => Err(StoreError::Io(
                            failure.clone().within("the last write transaction failed"),
                        )),
                        _ => outcome,
                    };
                    request.reply.send(outcome);
                }
            }
            Err(BatchError::Retry) => {
                let failure = Failure::from("the write failed");
                fail_batch(batch, &failure);
                self.last_failure = Some(failure);
            }
            Err(BatchError::Failed(failure)) => {
                fail_batch(batch, &failure);
                self.last_failure = Some(failure);
            }
        }
        // Only once every request of the batch has its answer.
        self.checkpoints.committed(&self.conn, self.wal_pages.get());
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
        if let Err(e) = self.checkpoints.now(&self.conn, "TRUNCATE") {
            tracing::debug!(error = %e, "store: checkpoint failed");
        }
    }

    /// Runs one of the writer's fixed statements that return no rows (`BEGIN IMMEDIATE`,
    /// `COMMIT`), compiled once.
    fn exec_fixed(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    /// The bytes of the pages in use as the current transaction leaves them (inside the
    /// transaction, so that reading them needs no read transaction of its own); `None`, logged,
    /// when SQLite cannot say.
    fn used_now(&self) -> Option<u64> {
        let pages = self
            .conn
            .prepare_cached(sql::PAGES_IN_USE)
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)));
        match pages {
            Ok(pages) => Some(
                u64::try_from(pages)
                    .unwrap_or(0)
                    .saturating_mul(self.page_size),
            ),
            Err(e) => {
                tracing::debug!(error = %e, "store: cannot read the database size");
                None
            }
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
        if let Err(e) = self.exec_fixed("BEGIN IMMEDIATE") {
            return Err(BatchError::Failed(Failure::of(e)));
        }
        let result = self
            .apply_batch(batch, now, isolation)
            .and_then(|outcomes| {
                let used = self.used_now();
                self.exec_fixed("COMMIT")
                    .map_err(|e| BatchError::Failed(Failure::of(e)))?;
                // Published before any request of the batch is answered.
                if let Some(used) = used {
                    self.used.store(used, Ordering::Relaxed);
                }
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
            Isolation::Savepoints => BatchError::Failed(Failure::of(e)),
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
            .map_err(|e| BatchError::Failed(Failure::of(e)))?;
        let outcome = match self.apply(command, now) {
            Ok(value) => {
                self.conn
                    .execute_batch("RELEASE request")
                    .map_err(|e| BatchError::Failed(Failure::of(e)))?;
                return Ok(Ok(value));
            }
            Err(ApplyError::Refused(e)) => e,
            Err(ApplyError::Sql(e)) => StoreError::Io(Failure::of(e)),
        };
        if self.conn.is_autocommit() {
            // SQLite rolled the whole transaction back (I/O error, disk full, ...).
            let StoreError::Io(failure) = outcome else {
                return Err(BatchError::Failed(outcome.to_string().into()));
            };
            return Err(BatchError::Failed(failure));
        }
        // Undoes what the request wrote. The writer's memory needs no undoing: `apply` records
        // a request in `appended` or the cache only once all its statements have succeeded.
        self.conn
            .execute_batch("ROLLBACK TO request; RELEASE request")
            .map_err(|e| BatchError::Failed(Failure::of(e)))?;
        Ok(Err(outcome))
    }

    /// Applies one request. A refusal comes before its first write, and it changes the writer's
    /// memory (`appended`, cache entries for rows it wrote or deleted) only after its last
    /// statement succeeded; caching a seq it merely read is always right.
    fn apply(&mut self, command: &WriteCommand, now: &str) -> Result<bool, ApplyError> {
        match command {
            WriteCommand::Create { meta, events, .. } => self.create(meta, events, now),
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
                    return Err(ApplyError::Refused(StoreError::Io(
                        format!("conversation {id} does not exist; cannot append events to it")
                            .into(),
                    )));
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
    /// write. The row is written once, final: with events, its `last_updated_at` is the
    /// batch's `now` and its `bytes` count them, as an `append` at the end of the batch would
    /// have made them.
    fn create(
        &mut self,
        meta: &ConversationMeta,
        events: &[StoredEvent],
        now: &str,
    ) -> Result<bool, ApplyError> {
        let id = meta.conversation_id.as_str();
        let init = encode_init(&meta.init).map_err(ApplyError::Refused)?;
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
        let total = bytes.saturating_add(more);
        let last_updated_at = if events.is_empty() {
            meta.last_updated_at.as_str()
        } else {
            now
        };
        let inserted = self.conn.prepare_cached(sql::CREATE)?.execute(params![
            id,
            meta.title,
            meta.created_at,
            last_updated_at,
            meta.trigger.as_str(),
            meta.owner,
            init,
            i64::try_from(total).unwrap_or(i64::MAX),
        ])?;
        if inserted == 0 {
            return Err(ApplyError::Refused(StoreError::Exists(
                meta.conversation_id.clone(),
            )));
        }
        let seq = self.conn.last_insert_rowid();
        if !events.is_empty() {
            self.insert_events(seq, events)?;
        }
        self.added += total;
        self.seqs.insert(id.to_string(), seq);
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
pub(super) fn fit_wal_to_reserve(conn: &Connection, reserve: u64) -> rusqlite::Result<()> {
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

/// The WAL pages after which the WAL is checkpointed (`wal_autocheckpoint`, as
/// [`fit_wal_to_reserve`] set it; see `checkpoint`).
pub(super) fn wal_limit(conn: &Connection) -> rusqlite::Result<u32> {
    let pages = conn.pragma_query_value(None, "wal_autocheckpoint", |r| r.get::<_, i64>(0))?;
    Ok(u32::try_from(pages).unwrap_or(u32::MAX))
}

/// The bytes of the database's pages in use (its size without its free pages).
pub(super) fn pages_in_use(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.query_row(sql::PAGES_IN_USE, [], |r| r.get(0))?;
    Ok(u64::try_from(pages)
        .unwrap_or(0)
        .saturating_mul(page_size(conn)?))
}

/// The database's page size in bytes.
fn page_size(conn: &Connection) -> rusqlite::Result<u64> {
    let size = conn.pragma_query_value(None, "page_size", |r| r.get::<_, i64>(0))?;
    Ok(u64::try_from(size).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
