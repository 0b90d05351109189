//! The PostgreSQL store (`store = "postgres"`): conversations, their event logs and the app
//! settings in a PostgreSQL database (`[postgres] url`), so that they outlive the machine a
//! switchboard runs on.
//!
//! This module owns that database's schema and migrations (`open.rs`, statements in `sql.rs`),
//! the connections to it and the thread that uses them: the writer (`writer.rs`), the readers
//! (`reader.rs`) and the ownership requests (`ownership.rs`). Besides the promises of every
//! [`Store`], it promises:
//!
//! - **Durability.** A completed `create`, `set_title`, `append`, `delete`, `save_settings` (and
//!   a completed `flush`) is committed by PostgreSQL (with the server's `synchronous_commit`,
//!   `on` by default: flushed to its WAL). A write whose commit was sent but whose answer never
//!   came back (the connection broke at that moment) is reported as failed although PostgreSQL
//!   may have committed it.
//! - **Never blocking the caller.** Every operation only queues a request and returns a future.
//!   One dedicated thread runs a single-threaded tokio runtime with an async client
//!   (`tokio-postgres`) and a connection pool (`deadpool-postgres`, `[postgres] pool_size`
//!   connections at most). One task, the *writer*, owns one connection; reads run concurrently
//!   on the others, so they never wait behind a write batch.
//! - **Group commit.** As the SQLite store: the writer takes a request, drains whatever else is
//!   queued (up to [`StoreTuning::batch_max`] events/requests) and applies the lot in ONE
//!   transaction, then answers every request. A refusal (an id collision, a gap in event ids, an
//!   append to an unknown conversation) writes nothing and keeps the transaction healthy; should
//!   a statement fail otherwise, the transaction is rolled back and the batch run again with
//!   each request in its own savepoint, so that request alone fails. If the transaction itself
//!   fails (connection lost, server down), every request of the batch gets [`StoreError::Io`]
//!   and the writer reconnects for the next batch. `append` moves `last_updated_at` once per
//!   conversation per batch. Each append is one statement: the check that its ids continue the
//!   log and the insert go to the server together.
//! - **FIFO writes, in call order**, exactly as the SQLite store (the same queue).
//! - **Versioned migrations.** The table `switchboard_schema` holds the schema version. Opening
//!   applies the pending [`MIGRATIONS`] in one transaction under an advisory lock, so several
//!   switchboards starting at once on one database migrate it once. A database written by a
//!   newer switchboard (higher version), or one holding other tables but no
//!   `switchboard_schema`, is refused with [`StoreError::Open`]; it never starts empty on top of
//!   existing data.
//! - **Byte-identical events.** Event and init JSON are stored as text, exactly as given (not
//!   `jsonb`, which would reorder keys); ids and timestamps sort bytewise (`COLLATE "C"`), as in
//!   SQLite.
//! - **One writer per log across nodes.** The store is also this node's seat in the cluster of
//!   the nodes sharing the database (membership: [`super::membership`]). `acquire` takes a
//!   conversation in one transaction unless another live node owns it (the next epoch);
//!   `create_owned` and `append_owned` check, in the transaction that writes, that their lease is
//!   still the conversation's current owner and epoch and that its registration has not expired
//!   (the ownership row is held `FOR SHARE` until the commit), and refuse with
//!   [`StoreError::Fenced`] otherwise; every event row keeps the epoch it was written under. So
//!   once an event of epoch e+1 is committed, no event of an older epoch ever is. `release`
//!   and `leave` make what the node owned free at once.
//! - **A per-user limit exact across nodes.** An `acquire` under a [`UserQuota`] takes the
//!   user's advisory lock in its transaction (so one user's acquires on all nodes run one at a
//!   time) and grants only while fewer than the limit of the user's other conversations are
//!   owned by live nodes; a refusal writes nothing.
//! - **No TLS.** Connections are unencrypted: run PostgreSQL on a trusted network or the same
//!   machine. A URL that asks for `sslmode=require` fails to connect.
//! - **Clean shutdown.** [`PostgresStore`] is a cheap `Clone`; when the last clone (and every
//!   pending future) is dropped, the writer finishes the queued work, the pool closes and the
//!   thread exits. [`PostgresStore::close`] waits for that.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_postgres::{NoTls, Row};

use super::durable::{
    self, all_ended, check_append, decode_init, decode_settings, event_range, fail_batch,
    fill_batch, next_after, only_flushes, queued_store_methods, sql_count, stored_event_id,
    BatchError, Isolation, ReadQueue, ReadRequest, Running, WriteCommand, WriteQueue, WriteRequest,
};
use super::membership::{self, ClusterNode, Membership, NodeState};
use super::{
    encode_init, events_bytes, meta_bytes, Acquired, ApiKey, EventQuery, Existing, Failure,
    KeyLookup, Lease, NodeAddress, Orphan, Store, StoreError, StoreFuture, StoreLimits, UserQuota,
};
use crate::config::{PostgresSettings, StoreTuning};
use crate::conversation::{
    ConversationId, ConversationMeta, ConversationRecord, InitData, Trigger,
};
use crate::events::{meta_timestamp, StoredEvent};

mod open;
mod ownership;
mod reader;
mod sql;
mod writer;

use open::prepare_database;
pub use open::{MIGRATIONS, SCHEMA_VERSION};
use ownership::run_ownership;
use reader::run_readers;
use writer::Writer;

/// How long connecting to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a read waits for a free connection before failing.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// The PostgreSQL-backed [`Store`]. Cheap to clone; all clones share the same thread.
#[derive(Clone)]
pub struct PostgresStore {
    writes: Arc<WriteQueue>,
    reads: ReadQueue,
    running: watch::Receiver<usize>,
    limits: StoreLimits,
    /// The bytes all conversations hold, as of the writer's last commit.
    used: Arc<AtomicU64>,
    /// The database, as `postgres://user@host:port/dbname` (never with the password).
    target: Arc<str>,
    /// Ownership requests, served on pooled connections by the store's thread.
    ownership: mpsc::Sender<OwnershipRequest>,
    node: Arc<ClusterNode>,
    state: Arc<NodeState>,
}

/// A request about conversation ownership, in its own transaction on a pooled connection.
enum OwnershipRequest {
    Acquire {
        id: String,
        quota: Option<UserQuota>,
        reply: super::durable::Reply<Acquired>,
    },
    Release {
        id: String,
        lease: Lease,
        reply: super::durable::Reply<()>,
    },
    Leave {
        reply: super::durable::Reply<()>,
    },
    Owner {
        id: String,
        reply: super::durable::Reply<Option<NodeAddress>>,
    },
    OwnedElsewhere {
        ids: Vec<String>,
        reply: super::durable::Reply<HashSet<ConversationId>>,
    },
    Orphaned {
        limit: i64,
        reply: super::durable::Reply<Vec<Orphan>>,
    },
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Names a database without its password: `postgres://user@host:port/dbname`.
fn describe(config: &tokio_postgres::Config) -> String {
    let user = config.get_user().unwrap_or("");
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
            tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
        })
        .collect();
    let dbname = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{}/{dbname}", hosts.join(","))
}

fn io_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Io(postgres_failure(e))
}

/// `e` as a [`Failure`] saying [`postgres_message`].
pub(super) fn postgres_failure(e: tokio_postgres::Error) -> Failure {
    Failure::caused(postgres_message(&e), e)
}

/// An error's text with the server's own message when there is one.
pub(super) fn postgres_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {}", db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Io(pool_failure(e))
}

/// Why no pooled connection could be had.
fn pool_failure(e: deadpool_postgres::PoolError) -> Failure {
    match e {
        deadpool_postgres::PoolError::Backend(e) => postgres_failure(e),
        other => Failure::of(other),
    }
    .within("cannot reach PostgreSQL")
}

impl PostgresStore {
    /// Connects to the database `settings.url` names, migrates its schema and starts the store's
    /// thread. Blocks for the duration of the open; call it at startup.
    pub fn open(
        settings: &PostgresSettings,
        tuning: &StoreTuning,
    ) -> Result<PostgresStore, StoreError> {
        Self::open_with(settings, tuning, StoreLimits::default())
    }

    /// [`PostgresStore::open`] enforcing `limits`' quotas (`max_store_bytes` counts the bytes
    /// the conversations hold; the disk reserve is the SQLite store's and does not apply).
    pub fn open_with(
        settings: &PostgresSettings,
        tuning: &StoreTuning,
        limits: StoreLimits,
    ) -> Result<PostgresStore, StoreError> {
        Self::open_node(settings, tuning, limits, ClusterNode::standalone())
    }

    /// [`PostgresStore::open_with`] as cluster node `node`: registers it (see
    /// [`super::membership`]) and keeps it registered while the store is open.
    pub fn open_node(
        settings: &PostgresSettings,
        tuning: &StoreTuning,
        limits: StoreLimits,
        node: ClusterNode,
    ) -> Result<PostgresStore, StoreError> {
        let mut config: tokio_postgres::Config = settings.url.parse().map_err(|e| {
            StoreError::Open(Failure::of(e).within("[postgres] url is not a PostgreSQL URL"))
        })?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("switchboard");
        let target: Arc<str> = describe(&config).into();
        let open_error = {
            let target = target.clone();
            move |what: Failure| StoreError::Open(what.within(&target))
        };

        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(POOL_WAIT))
            .build()
            .map_err(|e| open_error(Failure::of(e).within("cannot set up the connection pool")))?;

        let batch_max = tuning.batch_max.max(1);
        let (writes, write_rx) = WriteQueue::new(tuning.queue);
        let (reads, read_rx) = ReadQueue::new(tuning.queue);
        let (ownership, ownership_rx) = mpsc::channel(tuning.queue.max(1));
        let node = Arc::new(node);
        let thread_node = node.clone();
        let state = NodeState::new();
        let thread_state = state.clone();
        let running = Running::new();
        let exit = running.thread();
        let used = Arc::new(AtomicU64::new(0));
        let writer_used = used.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_target = target.clone();
        std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || {
                let _exit = exit;
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ =
                            ready_tx.send(Err(Failure::of(e).within("cannot start its runtime")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let conn = match prepare_database(&pool).await {
                        Ok((conn, in_use)) => {
                            writer_used.store(in_use, Ordering::Relaxed);
                            conn
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            pool.close();
                            return;
                        }
                    };
                    match membership::register(&pool, &thread_node).await {
                        Ok(incarnation) => {
                            tracing::info!(
                                node_id = %thread_node.node_id,
                                incarnation,
                                "cluster node registered"
                            );
                            thread_state.set(Membership::Live { incarnation })
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.within("cannot register the node")));
                            pool.close();
                            return;
                        }
                    }
                    let _ = ready_tx.send(Ok(()));
                    let writer = Writer {
                        pool: pool.clone(),
                        conn: Some(conn),
                        limits,
                        used: writer_used,
                        node_id: thread_node.node_id.clone(),
                    };
                    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
                    let served_state = thread_state.clone();
                    let served_node = thread_node.clone();
                    let served = async {
                        tokio::join!(
                            writer.run(write_rx, batch_max),
                            run_readers(pool.clone(), read_rx),
                            run_ownership(pool.clone(), ownership_rx, served_node, served_state)
                        );
                        let _ = stop_tx.send(());
                    };
                    tokio::join!(
                        served,
                        membership::run(
                            pool.clone(),
                            (*thread_node).clone(),
                            thread_state,
                            stop_rx
                        )
                    );
                    pool.close();
                    tracing::debug!(target = %thread_target, "PostgreSQL store finished");
                });
            })
            .map_err(|e| open_error(Failure::of(e).within("cannot start the store thread")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(what)) => return Err(open_error(what)),
            Err(_) => return Err(open_error("the store thread ended while opening".into())),
        }
        tracing::info!(target = %target, schema_version = SCHEMA_VERSION, "PostgreSQL store open");
        Ok(PostgresStore {
            limits,
            used,
            writes,
            reads,
            running: running.receiver(),
            target,
            ownership,
            node,
            state,
        })
    }

    /// This node's id and address.
    pub fn node(&self) -> &ClusterNode {
        &self.node
    }

    fn ownership_request<T: Send + 'static>(
        &self,
        make: impl FnOnce(super::durable::Reply<T>) -> OwnershipRequest,
    ) -> StoreFuture<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Queued now when there is room, so that a caller that never polls the future (a
        // release on the way out) still has it done.
        let waiting = match self.ownership.try_send(make(tx)) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(request)) => Some(request),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Box::pin(std::future::ready(Err(StoreError::Closed)))
            }
        };
        let queue = self.ownership.clone();
        Box::pin(async move {
            if let Some(request) = waiting {
                queue.send(request).await.map_err(|_| StoreError::Closed)?;
            }
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    /// The database, as `postgres://user@host:port/dbname` (without the password).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Drops this handle and completes once the store's thread has finished every queued
    /// request and closed its connections — i.e. once this was the last handle and no operation
    /// future is left.
    pub fn close(self) -> impl Future<Output = ()> + Send + 'static {
        let running = self.running.clone();
        drop(self);
        all_ended(running)
    }
}

impl Store for PostgresStore {
    queued_store_methods!();

    fn acquire(&self, id: &ConversationId, quota: Option<UserQuota>) -> StoreFuture<Acquired> {
        let id = id.to_string();
        self.ownership_request(|reply| OwnershipRequest::Acquire { id, quota, reply })
    }

    fn create_owned(
        &self,
        meta: ConversationMeta,
        lease: Lease,
        events: Vec<StoredEvent>,
    ) -> StoreFuture<()> {
        self.writes.create_owned(meta, Some(lease), events)
    }

    fn append_owned(
        &self,
        id: &ConversationId,
        lease: Lease,
        events: Vec<StoredEvent>,
    ) -> StoreFuture<()> {
        self.writes.append_owned(id, Some(lease), events)
    }

    fn release(&self, id: &ConversationId, lease: Lease) -> StoreFuture<()> {
        let id = id.to_string();
        self.ownership_request(|reply| OwnershipRequest::Release { id, lease, reply })
    }

    fn owner(&self, id: &ConversationId) -> StoreFuture<Option<NodeAddress>> {
        let id = id.to_string();
        self.ownership_request(|reply| OwnershipRequest::Owner { id, reply })
    }

    fn owned_elsewhere(&self, ids: Vec<ConversationId>) -> StoreFuture<HashSet<ConversationId>> {
        if ids.is_empty() {
            return Box::pin(std::future::ready(Ok(HashSet::new())));
        }
        let ids = ids.iter().map(ToString::to_string).collect();
        self.ownership_request(|reply| OwnershipRequest::OwnedElsewhere { ids, reply })
    }

    fn leave(&self) -> StoreFuture<()> {
        self.ownership_request(|reply| OwnershipRequest::Leave { reply })
    }

    fn orphaned(&self, limit: usize) -> StoreFuture<Vec<Orphan>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.ownership_request(|reply| OwnershipRequest::Orphaned { limit, reply })
    }

    fn membership(&self) -> Option<watch::Receiver<Membership>> {
        Some(self.state.subscribe())
    }
}
