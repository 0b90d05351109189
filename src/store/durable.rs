//! What the durable stores (SQLite, PostgreSQL) share: the write requests, the bounded queue
//! that admits them in call order, batching for group commit, the rules an append must follow
//! before anything is written, the read requests their readers answer, and how a store knows its
//! threads have ended.
//!
//! Promises (the stores' module docs repeat them for their callers):
//! - **FIFO writes, in call order.** A write request is admitted into the writer's bounded queue
//!   *when the method is called* if there is room; when the queue is full it waits in an ordered
//!   overflow list that the returned futures move into the queue front-first. Either way writes
//!   reach the writer in the order the methods were called. (A request still in the overflow
//!   list is cancelled only if its future and every later write's future are dropped.)
//! - **Dense logs.** [`check_append`] accepts an append only when its first id is the log's next
//!   one and its ids are consecutive and fit a signed 64-bit column.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};

use super::{ApiKey, EventQuery, Existing, Failure, KeyLookup, Lease, StoreError, StoreFuture};
use crate::conversation::{ConversationMeta, ConversationRecord};
use crate::events::StoredEvent;

/// The [`Store`](super::Store) methods every durable store serves the same way: writes through its
/// [`WriteQueue`] (`self.writes`), reads through its [`ReadQueue`] (`self.reads`), its limits
/// (`self.limits`) and the bytes in use as of the writer's last commit (`self.used`). Each store
/// expands it inside its `impl Store` and adds what it does its own way.
macro_rules! queued_store_methods {
    () => {
        fn create_with_events(
            &self,
            meta: $crate::conversation::ConversationMeta,
            events: Vec<$crate::events::StoredEvent>,
        ) -> $crate::store::StoreFuture<()> {
            self.writes.create_with_events(meta, events)
        }

        fn set_title(
            &self,
            id: &$crate::conversation::ConversationId,
            title: &str,
        ) -> $crate::store::StoreFuture<bool> {
            self.writes.set_title(id, title)
        }

        fn exists(
            &self,
            id: &$crate::conversation::ConversationId,
        ) -> $crate::store::StoreFuture<Option<$crate::store::Existing>> {
            self.reads.exists(id)
        }

        fn get(
            &self,
            id: &$crate::conversation::ConversationId,
        ) -> $crate::store::StoreFuture<Option<$crate::conversation::ConversationRecord>> {
            self.reads.get(id)
        }

        fn list(
            &self,
            offset: usize,
            limit: usize,
        ) -> $crate::store::StoreFuture<Vec<$crate::conversation::ConversationMeta>> {
            self.reads.list(offset, limit)
        }

        fn list_owned(
            &self,
            owner: &str,
            offset: usize,
            limit: usize,
        ) -> $crate::store::StoreFuture<Vec<$crate::conversation::ConversationMeta>> {
            self.reads.list_owned(owner, offset, limit)
        }

        fn append(
            &self,
            id: &$crate::conversation::ConversationId,
            events: Vec<$crate::events::StoredEvent>,
        ) -> $crate::store::StoreFuture<()> {
            self.writes.append(id, events)
        }

        fn events(
            &self,
            id: &$crate::conversation::ConversationId,
            query: $crate::store::EventQuery,
        ) -> $crate::store::StoreFuture<Vec<$crate::events::StoredEvent>> {
            self.reads.events(id, query)
        }

        fn delete(
            &self,
            id: &$crate::conversation::ConversationId,
        ) -> $crate::store::StoreFuture<bool> {
            self.writes.delete(id)
        }

        fn flush(&self) -> $crate::store::StoreFuture<()> {
            self.writes.flush()
        }

        fn limits(&self) -> $crate::store::StoreLimits {
            self.limits
        }

        fn used_bytes(&self) -> u64 {
            self.used.load(std::sync::atomic::Ordering::Relaxed)
        }

        fn settings(&self, user: &str) -> $crate::store::StoreFuture<Option<serde_json::Value>> {
            self.reads.settings(user)
        }

        fn save_settings(
            &self,
            user: &str,
            settings: serde_json::Value,
        ) -> $crate::store::StoreFuture<()> {
            self.writes.save_settings(user, settings)
        }

        /// An empty write transaction through the writer's queue and connection (so `/ready`
        /// turns 503 while the database cannot take a write).
        fn probe(&self) -> $crate::store::StoreFuture<()> {
            self.writes.probe()
        }

        fn add_key(
            &self,
            key: $crate::store::ApiKey,
            hash: String,
        ) -> $crate::store::StoreFuture<()> {
            self.writes.add_key(key, hash)
        }

        fn list_keys(&self) -> $crate::store::StoreFuture<Vec<$crate::store::ApiKey>> {
            self.reads.list_keys()
        }

        fn revoke_key(&self, name: &str) -> $crate::store::StoreFuture<bool> {
            self.writes.revoke_key(name)
        }

        fn lookup_key(
            &self,
            hash: Option<&str>,
        ) -> $crate::store::StoreFuture<$crate::store::KeyLookup> {
            self.reads.lookup_key(hash)
        }
    };
}
pub(super) use queued_store_methods;

/// How a writer isolates the requests of one batch from each other.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Isolation {
    /// No savepoints. Every refusal (id taken, gap in the event ids, unknown conversation) is
    /// found before the request writes anything, so a refused request leaves no trace; any
    /// other failure rolls the whole transaction back and the batch is run again with
    /// `Savepoints`.
    Direct,
    /// Each request in its own savepoint, so that a request failing halfway through its writes
    /// is undone alone.
    Savepoints,
}

/// Why one request of a batch was not applied; `E` is the database driver's error.
pub(super) enum ApplyError<E> {
    /// Refused before anything was written (the transaction is healthy); the request's answer.
    Refused(StoreError),
    /// A statement failed; the request may have written part of its changes.
    Sql(E),
}

impl<E> From<StoreError> for ApplyError<E> {
    fn from(e: StoreError) -> Self {
        ApplyError::Refused(e)
    }
}

/// Why a batch's transaction did not commit.
pub(super) enum BatchError {
    /// In `Direct` mode a request failed after writing: rolled back, run it again with
    /// savepoints.
    Retry,
    /// The transaction failed (BEGIN or COMMIT failed, or the database rolled it back): every
    /// request of the batch fails with this (the driver's error its source).
    Failed(Failure),
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A change, applied by a store's writer.
pub(super) enum WriteCommand {
    /// A new conversation with its first events (ids from 0): both or neither.
    Create {
        meta: Box<ConversationMeta>,
        events: Vec<StoredEvent>,
        /// Created under this lease (PostgreSQL only; `None` for an unowned create).
        lease: Option<Lease>,
    },
    SetTitle {
        id: String,
        title: String,
    },
    Append {
        id: String,
        events: Vec<StoredEvent>,
        /// Appended under this lease (PostgreSQL only; `None` for an unowned append).
        lease: Option<Lease>,
    },
    Delete {
        id: String,
    },
    SaveSettings {
        user: String,
        json: String,
    },
    /// Refused with [`StoreError::KeyExists`] when the name is taken.
    AddKey {
        key: ApiKey,
        hash: String,
    },
    RevokeKey {
        name: String,
    },
    Flush,
    /// An empty write transaction: answers whether the store can write now (and, for SQLite,
    /// whether the last batch committed).
    Probe,
}

/// Where a write's outcome goes.
pub(super) enum WriteReply {
    Unit(Reply<()>),
    Flag(Reply<bool>),
}

impl WriteReply {
    pub(super) fn send(self, outcome: Result<bool, StoreError>) {
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

pub(super) struct WriteRequest {
    pub(super) command: WriteCommand,
    pub(super) reply: WriteReply,
}

impl WriteRequest {
    /// How much of a batch this request uses: its events, or 1.
    fn weight(&self) -> usize {
        match &self.command {
            WriteCommand::Append { events, .. } | WriteCommand::Create { events, .. } => {
                events.len().max(1)
            }
            _ => 1,
        }
    }
}

/// Whether every request of a batch is a `Flush` (such a batch needs no transaction: everything
/// queued before it has been committed by earlier batches).
pub(super) fn only_flushes(batch: &[WriteRequest]) -> bool {
    batch
        .iter()
        .all(|r| matches!(r.command, WriteCommand::Flush))
}

/// Answers every request of a failed batch with `failure`.
pub(super) fn fail_batch(batch: &mut Vec<WriteRequest>, failure: &Failure) {
    tracing::error!(requests = batch.len(), error = %failure, "store write batch failed");
    for request in batch.drain(..) {
        request.reply.send(Err(StoreError::Io(failure.clone())));
    }
}

/// Starts a batch with `first` and adds whatever is already queued, up to `batch_max`
/// events/requests in all (group commit).
pub(super) fn fill_batch(
    first: WriteRequest,
    rx: &mut mpsc::Receiver<WriteRequest>,
    batch_max: usize,
    batch: &mut Vec<WriteRequest>,
) {
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
}

/// Admits write requests into the writer's bounded queue in call order (see the module docs).
pub(super) struct WriteQueue {
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
    /// A queue of `capacity` requests and the writer's end of it.
    pub(super) fn new(capacity: usize) -> (Arc<WriteQueue>, mpsc::Receiver<WriteRequest>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let queue = WriteQueue {
            tx,
            overflow: Mutex::new(Overflow::default()),
        };
        (Arc::new(queue), rx)
    }

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

    pub(super) fn submit<T: Send + 'static>(
        self: &Arc<Self>,
        command: WriteCommand,
        make_reply: impl FnOnce(Reply<T>) -> WriteReply,
    ) -> StoreFuture<T> {
        let (tx, rx) = oneshot::channel();
        let request = WriteRequest {
            command,
            reply: make_reply(tx),
        };
        let admission = self.admit(request);
        let queue = self.clone();
        Box::pin(async move {
            if let Admission::Waiting(ticket) = admission? {
                queue.wait_admitted(ticket).await?;
            }
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    // The write half of the `Store` trait, for the stores to delegate to.

    pub(super) fn create_with_events(
        self: &Arc<Self>,
        meta: ConversationMeta,
        events: Vec<StoredEvent>,
    ) -> StoreFuture<()> {
        self.create_owned(meta, None, events)
    }

    pub(super) fn create_owned(
        self: &Arc<Self>,
        meta: ConversationMeta,
        lease: Option<Lease>,
        events: Vec<StoredEvent>,
    ) -> StoreFuture<()> {
        let command = WriteCommand::Create {
            meta: Box::new(meta),
            events,
            lease,
        };
        self.submit(command, WriteReply::Unit)
    }

    pub(super) fn set_title(self: &Arc<Self>, id: &str, title: &str) -> StoreFuture<bool> {
        let command = WriteCommand::SetTitle {
            id: id.to_string(),
            title: title.to_string(),
        };
        self.submit(command, WriteReply::Flag)
    }

    pub(super) fn append(self: &Arc<Self>, id: &str, events: Vec<StoredEvent>) -> StoreFuture<()> {
        self.append_owned(id, None, events)
    }

    pub(super) fn append_owned(
        self: &Arc<Self>,
        id: &str,
        lease: Option<Lease>,
        events: Vec<StoredEvent>,
    ) -> StoreFuture<()> {
        let command = WriteCommand::Append {
            id: id.to_string(),
            events,
            lease,
        };
        self.submit(command, WriteReply::Unit)
    }

    pub(super) fn delete(self: &Arc<Self>, id: &str) -> StoreFuture<bool> {
        let command = WriteCommand::Delete { id: id.to_string() };
        self.submit(command, WriteReply::Flag)
    }

    pub(super) fn flush(self: &Arc<Self>) -> StoreFuture<()> {
        self.submit(WriteCommand::Flush, WriteReply::Unit)
    }

    pub(super) fn probe(self: &Arc<Self>) -> StoreFuture<()> {
        self.submit(WriteCommand::Probe, WriteReply::Unit)
    }

    pub(super) fn save_settings(
        self: &Arc<Self>,
        user: &str,
        settings: serde_json::Value,
    ) -> StoreFuture<()> {
        let command = WriteCommand::SaveSettings {
            user: user.to_string(),
            json: settings.to_string(),
        };
        self.submit(command, WriteReply::Unit)
    }

    pub(super) fn add_key(self: &Arc<Self>, key: ApiKey, hash: String) -> StoreFuture<()> {
        self.submit(WriteCommand::AddKey { key, hash }, WriteReply::Unit)
    }

    pub(super) fn revoke_key(self: &Arc<Self>, name: &str) -> StoreFuture<bool> {
        let command = WriteCommand::RevokeKey {
            name: name.to_string(),
        };
        self.submit(command, WriteReply::Flag)
    }
}

/// The id the event after `last` gets (0 for an empty log). `id` is for messages.
pub(super) fn next_after(id: &str, last: Option<i64>) -> Result<u64, StoreError> {
    match last {
        None => Ok(0),
        Some(last) => u64::try_from(last)
            .ok()
            .and_then(|l| l.checked_add(1))
            .ok_or_else(|| {
                StoreError::Io(
                    format!("conversation {id}: stored event id {last} is invalid").into(),
                )
            }),
    }
}

/// Checks that `events` continue conversation `id`'s log, whose largest stored id is `last`:
/// the first id is the next one, the ids are consecutive and fit an `i64`. The refusal says
/// which rule was broken.
pub(super) fn check_append(
    id: &str,
    last: Option<i64>,
    events: &[StoredEvent],
) -> Result<(), StoreError> {
    let Some(first) = events.first() else {
        return Ok(());
    };
    let refused = |message: String| StoreError::Io(message.into());
    let next = next_after(id, last)?;
    if first.id != next {
        return Err(refused(format!(
            "conversation {id}: append starts at event id {} but the log continues at {next}",
            first.id
        )));
    }
    for (expected, event) in (next..).zip(events) {
        if event.id != expected {
            return Err(refused(format!(
                "conversation {id}: event ids in one append must be consecutive; \
                 got {} where {expected} was due",
                event.id
            )));
        }
    }
    let last = events.last().map_or(next, |e| e.id);
    if i64::try_from(last).is_err() {
        return Err(refused(format!(
            "conversation {id}: event id {last} is too large"
        )));
    }
    Ok(())
}

/// A query, answered by a store's readers.
pub(super) enum ReadRequest {
    Exists {
        id: String,
        reply: Reply<Option<Existing>>,
    },
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
    Settings {
        user: String,
        reply: Reply<Option<Value>>,
    },
    ListOwned {
        owner: String,
        offset: usize,
        limit: usize,
        reply: Reply<Vec<ConversationMeta>>,
    },
    ListKeys {
        reply: Reply<Vec<ApiKey>>,
    },
    LookupKey {
        hash: Option<String>,
        reply: Reply<KeyLookup>,
    },
}

/// The read half of the `Store` trait: queues [`ReadRequest`]s for the store's readers.
#[derive(Clone)]
pub(super) struct ReadQueue(mpsc::Sender<ReadRequest>);

impl ReadQueue {
    /// A queue of `capacity` requests and the readers' end of it.
    pub(super) fn new(capacity: usize) -> (ReadQueue, mpsc::Receiver<ReadRequest>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (ReadQueue(tx), rx)
    }

    pub(super) fn read<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> ReadRequest,
    ) -> StoreFuture<T> {
        let (tx, rx) = oneshot::channel();
        let request = make(tx);
        let reads = self.0.clone();
        Box::pin(async move {
            reads.send(request).await.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    pub(super) fn exists(&self, id: &str) -> StoreFuture<Option<Existing>> {
        let id = id.to_string();
        self.read(|reply| ReadRequest::Exists { id, reply })
    }

    pub(super) fn get(&self, id: &str) -> StoreFuture<Option<ConversationRecord>> {
        let id = id.to_string();
        self.read(|reply| ReadRequest::Get { id, reply })
    }

    pub(super) fn list(&self, offset: usize, limit: usize) -> StoreFuture<Vec<ConversationMeta>> {
        self.read(|reply| ReadRequest::List {
            offset,
            limit,
            reply,
        })
    }

    pub(super) fn events(&self, id: &str, query: EventQuery) -> StoreFuture<Vec<StoredEvent>> {
        let id = id.to_string();
        self.read(|reply| ReadRequest::Events { id, query, reply })
    }

    pub(super) fn settings(&self, user: &str) -> StoreFuture<Option<Value>> {
        let user = user.to_string();
        self.read(|reply| ReadRequest::Settings { user, reply })
    }

    pub(super) fn list_owned(
        &self,
        owner: &str,
        offset: usize,
        limit: usize,
    ) -> StoreFuture<Vec<ConversationMeta>> {
        let owner = owner.to_string();
        self.read(|reply| ReadRequest::ListOwned {
            owner,
            offset,
            limit,
            reply,
        })
    }

    pub(super) fn list_keys(&self) -> StoreFuture<Vec<ApiKey>> {
        self.read(|reply| ReadRequest::ListKeys { reply })
    }

    pub(super) fn lookup_key(&self, hash: Option<&str>) -> StoreFuture<KeyLookup> {
        let hash = hash.map(str::to_string);
        self.read(|reply| ReadRequest::LookupKey { hash, reply })
    }
}

/// Counts a store's running threads: [`Running::thread`] before starting one, and the count
/// drops when the returned guard does (however the thread ends).
pub(super) struct Running {
    tx: Arc<watch::Sender<usize>>,
    rx: watch::Receiver<usize>,
}

/// Decrements the running-thread count when dropped.
pub(super) struct ThreadExit(Arc<watch::Sender<usize>>);

impl Drop for ThreadExit {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Running {
    pub(super) fn new() -> Running {
        let (tx, rx) = watch::channel(0usize);
        Running {
            tx: Arc::new(tx),
            rx,
        }
    }

    /// Counts one more thread; drop the guard when it ends.
    pub(super) fn thread(&self) -> ThreadExit {
        self.tx.send_modify(|n| *n += 1);
        ThreadExit(self.tx.clone())
    }

    /// What the store keeps to wait for its threads.
    pub(super) fn receiver(&self) -> watch::Receiver<usize> {
        self.rx.clone()
    }
}

/// Completes once every thread counted by `running` has ended.
pub(super) async fn all_ended(mut running: watch::Receiver<usize>) {
    // An error means every thread (and the sender) is gone: ended as well.
    let _ = running.wait_for(|n| *n == 0).await;
}

/// A count for `LIMIT`/`OFFSET`; anything beyond `i64::MAX` is as good as unlimited.
pub(super) fn sql_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// An event query as the bounds of an SQL range: `(start, end, limit)`, all inclusive; `None`
/// when it can match nothing. Stored ids are at most `i64::MAX`, so a start beyond it matches
/// nothing and an end beyond it is no bound.
pub(super) fn event_range(q: &EventQuery) -> Option<(i64, i64, i64)> {
    let start = i64::try_from(q.start_id).ok()?;
    let end = q
        .end_id
        .map_or(i64::MAX, |e| i64::try_from(e).unwrap_or(i64::MAX));
    if q.limit == 0 || start > end {
        return None;
    }
    Some((start, end, sql_count(q.limit)))
}

/// A stored event id, checked: `id` names the conversation in the error.
pub(super) fn stored_event_id(id: &str, event_id: i64) -> Result<u64, StoreError> {
    u64::try_from(event_id).map_err(|_| {
        StoreError::Io(format!("conversation {id}: stored event id {event_id} is invalid").into())
    })
}

/// Fills `meta.init` from its stored JSON text.
pub(super) fn decode_init(
    (mut meta, init_json): (ConversationMeta, String),
) -> Result<ConversationMeta, StoreError> {
    meta.init = serde_json::from_str(&init_json).map_err(|e| {
        StoreError::Io(Failure::of(e).within(format_args!(
            "conversation {}: stored init data is unreadable",
            meta.conversation_id
        )))
    })?;
    Ok(meta)
}

/// Reads stored settings JSON text.
pub(super) fn decode_settings(text: Option<String>) -> Result<Option<Value>, StoreError> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| {
            StoreError::Io(Failure::of(e).within("the stored settings are unreadable"))
        })
    })
    .transpose()
}
