//! Checkpoints (copying the WAL's pages back into the database file), mostly off the writer's
//! thread.
//!
//! SQLite's own automatic checkpoint runs inside the `COMMIT` that takes the WAL past
//! `wal_autocheckpoint` pages, so every few thousand creates one batch's answers, and every
//! request queued behind it, waited for a checkpoint of the whole WAL and its two `fsync`s.
//! Instead the writer's connection reports how many pages the WAL holds after each commit, and:
//!
//! - every quarter of the limit, a *checkpoint thread* with a connection of its own copies what
//!   the WAL holds so far (a passive checkpoint: it never waits for, nor holds up, the writer,
//!   which goes on appending to the WAL meanwhile);
//! - at the limit itself the writer checkpoints, after answering its batch, as SQLite would have
//!   (so that the WAL starts over from its beginning and never grows past the limit, which keeps
//!   it within half the disk reserve, see `fit_wal_to_reserve`), but only the pages written
//!   since the checkpoint thread's last pass are left to copy.
//!
//! Durability does not change: a commit is durable once it is in the WAL, whoever copies it into
//! the database later. The work moves rather than shrinks (the server's CPU per request stays
//! about the same); what it gives is shorter stalls of the writer, so lower tail latency.
//! Only one checkpoint of this process runs at a time (SQLite refuses a second one at once
//! rather than waiting): the writer's waits for the checkpoint thread's pass to end.

use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use rusqlite::{ffi, Connection};

/// Pages in the WAL after the last commit of the connection whose hook points at it.
pub(super) struct WalPages(AtomicU32);

impl WalPages {
    /// Starts counting the WAL pages after each commit of `conn`, in place of SQLite's
    /// automatic checkpoint. The returned box must outlive `conn` (the hook points at it).
    pub(super) fn watch(conn: &Connection) -> Box<WalPages> {
        let pages = Box::new(WalPages(AtomicU32::new(0)));
        let arg = &*pages as *const WalPages as *mut c_void;
        // SAFETY: `conn.handle()` is the connection's open database handle, used on this
        // thread only here. `arg` points into a heap allocation whose owner keeps it alive as
        // long as the connection (see above), and `on_commit` only reads it as a `WalPages`,
        // through a shared reference to an atomic.
        unsafe {
            ffi::sqlite3_wal_hook(conn.handle(), Some(on_commit), arg);
        }
        pages
    }

    /// Pages in the WAL after the last commit.
    pub(super) fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// SQLite's WAL hook: called after each commit with the pages now in the WAL.
unsafe extern "C" fn on_commit(
    arg: *mut c_void,
    _db: *mut ffi::sqlite3,
    _name: *const c_char,
    pages: c_int,
) -> c_int {
    // SAFETY: `arg` is the `WalPages` registered by `WalPages::watch`, alive while the
    // connection is.
    let counter = unsafe { &*(arg as *const WalPages) };
    counter
        .0
        .store(u32::try_from(pages).unwrap_or(0), Ordering::Relaxed);
    ffi::SQLITE_OK
}

/// The writer's side: when to ask the checkpoint thread for a pass and when to checkpoint
/// itself.
pub(super) struct Checkpoints {
    /// WAL pages at which the writer checkpoints itself (the connection's
    /// `wal_autocheckpoint`).
    limit: u32,
    /// A pass of the checkpoint thread every this many pages.
    step: u32,
    /// WAL pages at which the next pass is asked for.
    next: u32,
    /// Held by whichever checkpoint of this process runs.
    running: Arc<Mutex<()>>,
    passes: SyncSender<()>,
}

impl Checkpoints {
    /// The writer's side for `limit` WAL pages, and the checkpoint thread's body (to run on
    /// its own thread with its own connection).
    pub(super) fn new(limit: u32) -> (Checkpoints, impl FnOnce(Connection) + Send + 'static) {
        let limit = limit.max(1);
        let step = (limit / 4).max(1);
        let running = Arc::new(Mutex::new(()));
        let (passes, asked) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let running = running.clone();
            move |conn: Connection| run_thread(conn, &running, asked)
        };
        let checkpoints = Checkpoints {
            limit,
            step,
            next: step,
            running,
            passes,
        };
        (checkpoints, thread)
    }

    /// After a batch committed (and was answered): the WAL holds `pages`.
    pub(super) fn committed(&mut self, conn: &Connection, pages: u32) {
        if pages < self.next.saturating_sub(self.step) {
            // The WAL started over from its beginning.
            self.next = self.step;
        }
        if pages >= self.limit {
            if let Err(e) = self.now(conn, "PASSIVE") {
                tracing::debug!(error = %e, "store: checkpoint failed");
            }
            self.next = self.step;
        } else if pages >= self.next {
            match self.passes.try_send(()) {
                // Full: a pass is asked for already and will copy these pages too.
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => {
                    tracing::debug!("store: the checkpoint thread is gone");
                }
            }
            self.next = (pages / self.step + 1).saturating_mul(self.step);
        }
    }

    /// Checkpoints through `conn` in `mode` (`PASSIVE`, `TRUNCATE`) once no other checkpoint
    /// of this process runs. A busy reader leaves the rest for the next one (that is no error).
    pub(super) fn now(&self, conn: &Connection, mode: &str) -> rusqlite::Result<()> {
        let _running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        checkpoint(conn, mode)
    }
}

fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<()> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))
}

/// The checkpoint thread: a passive checkpoint each time the writer asks, until the writer is
/// gone.
fn run_thread(conn: Connection, running: &Mutex<()>, asked: Receiver<()>) {
    while asked.recv().is_ok() {
        let _running = running.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = checkpoint(&conn, "PASSIVE") {
            tracing::debug!(error = %e, "store: checkpoint failed");
        }
    }
    tracing::debug!("store checkpoint thread finished");
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use futures_util::future::join_all;
    use serde_json::json;

    use crate::config::StoreTuning;
    use crate::conversation::{ConversationId, ConversationMeta, InitData, Trigger};
    use crate::events::{EventBody, Source};
    use crate::store::{EventQuery, SqliteStore, Store, StoreLimits};

    fn meta(id: &ConversationId) -> ConversationMeta {
        ConversationMeta {
            conversation_id: id.clone(),
            title: "t".into(),
            created_at: "2024-01-01T00:00:00.000000Z".into(),
            last_updated_at: "2024-01-01T00:00:00.000000Z".into(),
            trigger: Trigger::Gui,
            owner: None,
            init: InitData::default(),
        }
    }

    /// With writes queued back to back (the writer never idle, so the checkpoint thread's
    /// passes alone would never let the WAL start over), the WAL still stays within its limit:
    /// the writer checkpoints at `wal_autocheckpoint` pages as SQLite would have, so that it
    /// fits in half the disk reserve. Everything written is there after a reopen.
    #[tokio::test]
    async fn the_wal_stays_within_its_limit_under_back_to_back_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A 256 KiB reserve: the WAL is checkpointed at 32 pages (128 KiB).
        let limits = StoreLimits {
            disk_reserve_bytes: 256 * 1024,
            ..Default::default()
        };
        let small_batches = StoreTuning {
            batch_max: 4,
            queue: 1024,
        };
        let store = SqliteStore::open_with(dir.path(), &small_batches, limits).expect("open");
        let wal = store.path().with_extension("db-wal");
        let watching = std::sync::Arc::new(AtomicBool::new(true));
        let watcher = {
            let (wal, watching) = (wal.clone(), watching.clone());
            std::thread::spawn(move || {
                let mut largest = 0;
                while watching.load(Ordering::Relaxed) {
                    largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
                    std::thread::sleep(Duration::from_micros(200));
                }
                largest
            })
        };
        let text = "w".repeat(3000);
        let ids: Vec<ConversationId> = (0..600)
            .map(|c| ConversationId::parse(&format!("c{c}")).expect("id"))
            .collect();
        let writes = ids.iter().map(|id| {
            let first = EventBody::message(Source::User, &text, json!([]), false).stamp(0, "t");
            store.create_with_events(meta(id), vec![first])
        });
        for written in join_all(writes).await {
            written.expect("create");
        }
        watching.store(false, Ordering::Relaxed);
        let largest = watcher.join().expect("watcher");
        let frame = 4096 + 24;
        eprintln!("largest WAL: {largest} bytes ({} frames)", largest / frame);
        // The limit, plus the batches committed while the checkpoint that brings it back to
        // its start waits its turn (twice the limit at most; without that checkpoint it grows
        // to thousands of frames).
        assert!(
            largest <= 32 + 64 * frame,
            "the WAL grew to {largest} bytes"
        );
        tokio::time::timeout(Duration::from_secs(30), store.close())
            .await
            .expect("closed");
        let store = SqliteStore::open(dir.path(), &small_batches).expect("reopen");
        assert_eq!(store.list(0, 1000).await.expect("list").len(), 600);
        for id in [&ids[0], &ids[299], &ids[599]] {
            let stored = store.events(id, EventQuery::after(None, 10)).await;
            assert_eq!(stored.expect("events").len(), 1);
        }
    }
}
