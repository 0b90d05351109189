//! The PostgreSQL store (`store = "postgres"`): conversations, their event logs and the app
//! settings in a PostgreSQL database (`[postgres] url`), so that they outlive the machine a
//! switchboard runs on.
//!
//! This module owns that database's schema and migrations, the connections to it and the
//! thread that uses them. Besides the promises of every [`Store`], it promises:
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
    events_bytes, meta_bytes, Acquired, ApiKey, EventQuery, Existing, KeyLookup, Lease,
    NodeAddress, Store, StoreError, StoreFuture, StoreLimits, UserQuota,
};
use crate::config::{PostgresSettings, StoreTuning};
use crate::conversation::{ConversationId, ConversationMeta, ConversationRecord, InitData};
use crate::events::{meta_timestamp, StoredEvent};

/// Schema migrations: step `i` takes the database from version `i` to `i + 1`. All pending
/// steps run in one transaction together with the version bump. Only ever append here.
///
/// `seq` is an integer given in creation order; events are keyed by `(conv_seq, id)`, so one
/// conversation's log is one contiguous range of the primary key and new conversations land at
/// its right edge. Text that is sorted or compared (ids, timestamps) uses the "C" collation:
/// bytewise, as SQLite's, whatever the database's locale.
pub const MIGRATIONS: &[&str] = &[
    // 1: conversations, their event logs, the app settings.
    r#"
    CREATE TABLE conversations (
        seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id              TEXT COLLATE "C" NOT NULL UNIQUE,
        title           TEXT NOT NULL,
        created_at      TEXT COLLATE "C" NOT NULL,
        last_updated_at TEXT NOT NULL,
        "trigger"       TEXT NOT NULL,
        owner           TEXT,
        init_json       TEXT NOT NULL,
        -- What it holds against limits.max_bytes_per_conversation: init data + events' JSON.
        bytes           BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX conversations_by_created_at ON conversations (created_at, id);
    CREATE TABLE events (
        conv_seq BIGINT NOT NULL,
        id       BIGINT NOT NULL,
        json     TEXT NOT NULL,
        PRIMARY KEY (conv_seq, id)
    );
    CREATE TABLE settings (
        user_id TEXT COLLATE "C" PRIMARY KEY,
        json    TEXT NOT NULL
    );
    "#,
    // 2: user keys (only their SHA-256, see `crate::keys`), and each owner's conversations in
    // listing order.
    r#"
    CREATE TABLE api_keys (
        name       TEXT COLLATE "C" PRIMARY KEY,
        hash       TEXT COLLATE "C" NOT NULL UNIQUE,
        admin      BOOLEAN NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX conversations_by_owner ON conversations (owner, created_at, id);
    "#,
    // 3: cluster membership, conversation ownership, the epoch each event was written under.
    r#"
    CREATE TABLE cluster_nodes (
        node_id       TEXT COLLATE "C" PRIMARY KEY,
        incarnation   BIGINT NOT NULL,
        advertise_url TEXT NOT NULL,
        started_at    TIMESTAMPTZ NOT NULL,
        heartbeat_at  TIMESTAMPTZ NOT NULL,
        expires_at    TIMESTAMPTZ NOT NULL
    );
    -- The owner of a conversation (NULL once released) and its epoch, which only grows while
    -- the row exists; an owned append commits only under the current owner and epoch.
    CREATE TABLE ownership (
        conversation_id TEXT COLLATE "C" PRIMARY KEY,
        node_id         TEXT COLLATE "C",
        incarnation     BIGINT,
        epoch           BIGINT NOT NULL
    );
    ALTER TABLE events ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
    "#,
    // 4: the user whose conversation each ownership row is, for the per-user limit across
    // nodes (`limits.max_running_per_user`), and the held rows by user.
    r#"
    ALTER TABLE ownership ADD COLUMN user_id TEXT COLLATE "C";
    CREATE INDEX ownership_held_by_user ON ownership (user_id) WHERE node_id IS NOT NULL;
    "#,
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The advisory lock (`pg_advisory_xact_lock`) that serialises migrations ("SWBD").
const MIGRATION_LOCK: i64 = 0x5357_4244;

/// The first key of the advisory locks (`pg_advisory_xact_lock(int, int)`, the second key
/// the user's `hashtext`) that serialise one user's acquires under a per-user limit ("SWUS").
const USER_LOCK: i32 = 0x5357_5553;

/// How long connecting to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a read waits for a free connection before failing.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// The columns `meta_from_row` reads, in its order.
macro_rules! meta_columns {
    () => {
        r#"id, title, created_at, last_updated_at, "trigger", owner, init_json"#
    };
}

/// Every statement the store runs (opening prepares each one, so a schema that does not match
/// is refused at start).
mod sql {
    pub const CREATE: &str = concat!(
        "INSERT INTO conversations (",
        meta_columns!(),
        ", bytes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING"
    );
    pub const SET_TITLE: &str =
        "UPDATE conversations SET title = $2, last_updated_at = $3 WHERE id = $1";
    /// `$1` ids, `$2` the bytes appended to each, `$3` timestamp.
    pub const TOUCH: &str = "UPDATE conversations c SET last_updated_at = $3, \
         bytes = c.bytes + t.bytes FROM UNNEST($1::TEXT[], $2::BIGINT[]) AS t (id, bytes) \
         WHERE c.id = t.id";
    /// Inserts events `$3` (ids) / `$4` (JSON texts) into conversation `$1`'s log if its last
    /// stored id is `$2` (-1 for an empty log) and its bytes plus `$5` stay within `$6`, under
    /// epoch `$7` (0 for an unowned append); the checks and the insert are one statement.
    pub const APPEND: &str = "WITH c AS (SELECT seq, bytes FROM conversations WHERE id = $1) \
         INSERT INTO events (conv_seq, id, json, epoch) \
         SELECT c.seq, t.id, t.json, $7 FROM c, UNNEST($3::BIGINT[], $4::TEXT[]) AS t (id, json) \
         WHERE COALESCE((SELECT max(e.id) FROM events e WHERE e.conv_seq = c.seq), -1) = $2 \
         AND c.bytes + $5 <= $6";
    /// Whether conversation `$1` exists, its last event id and its bytes (for an append's
    /// refusal).
    pub const LOG_END: &str = "SELECT (SELECT max(e.id) FROM events e WHERE e.conv_seq = c.seq), \
         c.bytes FROM conversations c WHERE c.id = $1";
    /// Deletes conversation `$1` and its events; one row (its bytes) when it existed.
    pub const DELETE: &str = "WITH c AS (DELETE FROM conversations WHERE id = $1 \
         RETURNING seq, bytes), \
         e AS (DELETE FROM events WHERE conv_seq IN (SELECT seq FROM c)), \
         o AS (DELETE FROM ownership WHERE conversation_id = $1 AND node_id IS NULL) \
         SELECT bytes FROM c";
    /// The bytes every conversation holds, together (what `max_store_bytes` counts).
    pub const USED: &str = "SELECT COALESCE(sum(bytes), 0)::BIGINT FROM conversations";
    /// `$1` id → the metadata columns, then the last event id and the bytes.
    pub const GET: &str = concat!(
        "SELECT ",
        meta_columns!(),
        ", (SELECT max(e.id) FROM events e WHERE e.conv_seq = c.seq), bytes \
         FROM conversations c WHERE c.id = $1"
    );
    /// `$1` limit, `$2` offset.
    pub const LIST: &str = concat!(
        "SELECT ",
        meta_columns!(),
        " FROM conversations ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2"
    );
    /// A range of one conversation's events: `$1` conversation id, `$2`..=`$3` event ids, `$4`
    /// limit.
    pub const EVENTS_OLDEST_FIRST: &str = "SELECT id, json FROM events \
         WHERE conv_seq = (SELECT seq FROM conversations WHERE id = $1) \
         AND id BETWEEN $2 AND $3 ORDER BY id ASC LIMIT $4";
    /// As [`EVENTS_OLDEST_FIRST`], newest first.
    pub const EVENTS_NEWEST_FIRST: &str = "SELECT id, json FROM events \
         WHERE conv_seq = (SELECT seq FROM conversations WHERE id = $1) \
         AND id BETWEEN $2 AND $3 ORDER BY id DESC LIMIT $4";
    /// `$1` id → its owner (one lookup in the unique index on `id`); no row when it does not
    /// exist.
    pub const EXISTS: &str = "SELECT owner FROM conversations WHERE id = $1";
    pub const SETTINGS: &str = "SELECT json FROM settings WHERE user_id = $1";
    pub const SAVE_SETTINGS: &str = "INSERT INTO settings (user_id, json) VALUES ($1, $2) \
         ON CONFLICT (user_id) DO UPDATE SET json = excluded.json";
    /// `$1` owner, `$2` limit, `$3` offset.
    pub const LIST_OWNED: &str = concat!(
        "SELECT ",
        meta_columns!(),
        " FROM conversations WHERE owner = $1 ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3"
    );
    /// No row when the name is taken.
    pub const ADD_KEY: &str = "INSERT INTO api_keys (name, hash, admin, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING";
    pub const REVOKE_KEY: &str = "DELETE FROM api_keys WHERE name = $1";
    pub const LIST_KEYS: &str = "SELECT name, admin, created_at FROM api_keys ORDER BY name";
    /// `$1` hash (or NULL) → the key's columns (NULL when none matches) and whether any key
    /// exists, in one row.
    pub const LOOKUP_KEY: &str = "SELECT k.name, k.admin, k.created_at, \
         EXISTS (SELECT 1 FROM api_keys) FROM (SELECT 1) AS one \
         LEFT JOIN api_keys k ON k.hash = $1::TEXT";
    /// Of the leases `$2` (conversation ids), `$3` (incarnations), `$4` (epochs), the ones
    /// node `$1` still holds: each conversation's current owner and epoch, under a registration
    /// that has not expired. The ownership rows found stay locked until the transaction ends,
    /// so no other node takes those conversations over between this check and the commit of
    /// the writes it guards.
    pub const OWNS: &str = "SELECT o.conversation_id, o.incarnation, o.epoch FROM ownership o \
         JOIN cluster_nodes n ON n.node_id = o.node_id AND n.incarnation = o.incarnation \
         JOIN UNNEST($2::TEXT[], $3::BIGINT[], $4::BIGINT[]) AS l (id, incarnation, epoch) \
         ON o.conversation_id = l.id AND o.incarnation = l.incarnation AND o.epoch = l.epoch \
         WHERE o.node_id = $1 AND n.expires_at > now() FOR SHARE OF o";
    /// One row when node `$1`, incarnation `$2`, is registered and not expired.
    pub const NODE_LIVE: &str = "SELECT 1 FROM cluster_nodes \
         WHERE node_id = $1 AND incarnation = $2 AND expires_at > now()";
    /// Takes conversation `$1` of user `$4` (or NULL) for node `$2`, incarnation `$3`, unless
    /// another live node owns it: the new epoch, or no row (the conflicting row is then locked
    /// by this transaction).
    pub const ACQUIRE: &str = "INSERT INTO ownership AS o \
         (conversation_id, node_id, incarnation, epoch, user_id) VALUES ($1, $2, $3, 1, $4) \
         ON CONFLICT (conversation_id) DO UPDATE SET node_id = excluded.node_id, \
         incarnation = excluded.incarnation, epoch = o.epoch + 1, user_id = excluded.user_id \
         WHERE o.node_id IS NULL \
         OR (o.node_id = excluded.node_id AND o.incarnation = excluded.incarnation) \
         OR NOT EXISTS (SELECT 1 FROM cluster_nodes n WHERE n.node_id = o.node_id \
         AND n.incarnation = o.incarnation AND n.expires_at > now()) \
         RETURNING epoch";
    /// Waits until no other transaction holds user `$2`'s lock (`$1` is [`super::USER_LOCK`])
    /// and holds it until this one ends.
    pub const LOCK_USER: &str = "SELECT pg_advisory_xact_lock($1::INT, hashtext($2::TEXT))";
    /// How many conversations of user `$1` other than `$2` live nodes own.
    pub const HELD_BY_USER: &str = "SELECT count(*) FROM ownership o \
         JOIN cluster_nodes n ON n.node_id = o.node_id AND n.incarnation = o.incarnation \
         WHERE o.user_id = $1 AND o.node_id IS NOT NULL AND o.conversation_id <> $2 \
         AND n.expires_at > now()";
    /// Who owns conversation `$1`, and where that node is reached.
    pub const OWNER: &str = "SELECT o.node_id, n.advertise_url FROM ownership o \
         LEFT JOIN cluster_nodes n ON n.node_id = o.node_id AND n.incarnation = o.incarnation \
         WHERE o.conversation_id = $1";
    /// The live node that owns conversation `$1` and where it is reached; no row otherwise.
    pub const LIVE_OWNER: &str = "SELECT o.node_id, n.advertise_url FROM ownership o \
         JOIN cluster_nodes n ON n.node_id = o.node_id AND n.incarnation = o.incarnation \
         WHERE o.conversation_id = $1 AND n.expires_at > now()";
    /// Which of conversations `$1` (an array) a live node other than `$2` owns.
    pub const OWNED_ELSEWHERE: &str = "SELECT o.conversation_id FROM ownership o \
         JOIN cluster_nodes n ON n.node_id = o.node_id AND n.incarnation = o.incarnation \
         WHERE o.conversation_id = ANY($1) AND o.node_id <> $2 AND n.expires_at > now()";
    /// Gives back conversation `$1` held by node `$2`, incarnation `$3`, at epoch `$4`.
    pub const RELEASE: &str = "UPDATE ownership SET node_id = NULL, incarnation = NULL \
         WHERE conversation_id = $1 AND node_id = $2 AND incarnation = $3 AND epoch = $4";
    /// As [`RELEASE`] for a conversation that does not exist (a request for an unknown id):
    /// its row goes.
    pub const RELEASE_UNKNOWN: &str = "DELETE FROM ownership WHERE conversation_id = $1 \
         AND node_id = $2 AND incarnation = $3 AND epoch = $4 \
         AND NOT EXISTS (SELECT 1 FROM conversations WHERE id = $1)";

    /// Every statement above, for the check at open.
    pub const ALL: &[&str] = &[
        CREATE,
        SET_TITLE,
        TOUCH,
        APPEND,
        LOG_END,
        DELETE,
        USED,
        GET,
        LIST,
        EVENTS_OLDEST_FIRST,
        EVENTS_NEWEST_FIRST,
        SETTINGS,
        SAVE_SETTINGS,
        LIST_OWNED,
        ADD_KEY,
        REVOKE_KEY,
        LIST_KEYS,
        LOOKUP_KEY,
        OWNS,
        NODE_LIVE,
        ACQUIRE,
        LOCK_USER,
        HELD_BY_USER,
        OWNER,
        LIVE_OWNER,
        OWNED_ELSEWHERE,
        RELEASE,
        RELEASE_UNKNOWN,
    ];
}

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
    StoreError::Io(postgres_message(&e))
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
    match e {
        deadpool_postgres::PoolError::Backend(e) => {
            StoreError::Io(format!("cannot reach PostgreSQL: {}", postgres_message(&e)))
        }
        other => StoreError::Io(format!("cannot reach PostgreSQL: {other}")),
    }
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
            StoreError::Open(format!("[postgres] url is not a PostgreSQL URL: {e}"))
        })?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("switchboard");
        let target: Arc<str> = describe(&config).into();
        let open_error = {
            let target = target.clone();
            move |what: String| StoreError::Open(format!("{target}: {what}"))
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
            .map_err(|e| open_error(format!("cannot set up the connection pool: {e}")))?;

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
                        let _ = ready_tx.send(Err(format!("cannot start its runtime: {e}")));
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
                            let _ = ready_tx.send(Err(format!("cannot register the node: {e}")));
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
            .map_err(|e| open_error(format!("cannot start the store thread: {e}")))?;
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

    fn membership(&self) -> Option<watch::Receiver<Membership>> {
        Some(self.state.subscribe())
    }
}

// ---------------------------------------------------------------------------------------------
// Opening

/// Connects, migrates the schema to [`SCHEMA_VERSION`] and checks that every statement the store
/// runs fits it; returns the connection the writer keeps and the bytes the conversations hold.
/// The error is what to tell the operator.
async fn prepare_database(pool: &Pool) -> Result<(Object, u64), String> {
    let mut conn = pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => {
            format!(
                "cannot connect ({}); is PostgreSQL running there and the URL right?",
                postgres_message(&e)
            )
        }
        other => format!("cannot connect ({other})"),
    })?;
    if let Err(e) = migrate(&mut conn).await {
        // The migration's transaction may still be open on this connection: never reuse it.
        let _ = Object::take(conn);
        return Err(e);
    }
    for statement in sql::ALL {
        conn.prepare_cached(statement).await.map_err(|e| {
            format!(
                "the schema does not match schema version {SCHEMA_VERSION} ({}); refusing to \
                 start. Point [postgres] url at another database",
                postgres_message(&e)
            )
        })?;
    }
    let in_use: i64 = conn
        .query_one(sql::USED, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| format!("cannot read the bytes in use: {}", postgres_message(&e)))?;
    Ok((conn, u64::try_from(in_use).unwrap_or(0)))
}

/// Applies the pending [`MIGRATIONS`] in one transaction, under [`MIGRATION_LOCK`].
async fn migrate(conn: &mut Object) -> Result<(), String> {
    let fail =
        |e: tokio_postgres::Error| format!("preparing the schema failed: {}", postgres_message(&e));
    let tx = conn.transaction().await.map_err(fail)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(fail)?;
    let has_schema_table: bool = tx
        .query_one("SELECT to_regclass('switchboard_schema') IS NOT NULL", &[])
        .await
        .map_err(fail)?
        .get(0);
    let version: i64 =
        if has_schema_table {
            let row = tx
                .query_opt("SELECT version FROM switchboard_schema", &[])
                .await
                .map_err(fail)?;
            match row {
                Some(row) => row.get(0),
                None => return Err(
                    "the schema is damaged: switchboard_schema holds no version; refusing to start"
                        .into(),
                ),
            }
        } else {
            let foreign: Vec<String> = tx
                .query(
                    "SELECT table_name::TEXT FROM information_schema.tables \
                 WHERE table_schema = current_schema() ORDER BY table_name",
                    &[],
                )
                .await
                .map_err(fail)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !foreign.is_empty() {
                return Err(format!(
                    "holds tables that are not switchboard's ({}); refusing to use it. Point \
                 [postgres] url at an empty database",
                    foreign.join(", ")
                ));
            }
            tx.batch_execute(
                "CREATE TABLE switchboard_schema (\
                 one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), version BIGINT NOT NULL); \
             INSERT INTO switchboard_schema (version) VALUES (0)",
            )
            .await
            .map_err(fail)?;
            0
        };
    if version > SCHEMA_VERSION {
        return Err(format!(
            "the database has schema version {version}, but this build of switchboard only \
             knows versions up to {SCHEMA_VERSION}; it was written by a newer switchboard. \
             Upgrade switchboard (or use another database) — refusing to open it"
        ));
    }
    let from = version;
    for (step, migration) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let next = step as i64 + 1;
        tx.batch_execute(migration).await.map_err(|e| {
            format!(
                "migrating the schema from version {step} to {next} failed: {}",
                postgres_message(&e)
            )
        })?;
        tx.execute("UPDATE switchboard_schema SET version = $1", &[&next])
            .await
            .map_err(fail)?;
    }
    tx.commit().await.map_err(fail)?;
    if from < SCHEMA_VERSION {
        tracing::info!(from, to = SCHEMA_VERSION, "migrated the PostgreSQL schema");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The writer

/// The writer task's connection (re-made after it breaks) and the quotas it enforces.
struct Writer {
    pool: Pool,
    conn: Option<Object>,
    limits: StoreLimits,
    /// The bytes all conversations hold, as of the last commit (shared with the handles).
    used: Arc<AtomicU64>,
    /// This node, whose leases owned appends carry.
    node_id: String,
}

/// What one transaction attempt has done so far, besides its SQL.
struct Pending<'a> {
    conn: &'a Object,
    node_id: &'a str,
    limits: StoreLimits,
    /// `used` when the transaction began.
    used: u64,
    /// Bytes the transaction added (creates and appends).
    added: u64,
    /// Bytes of the conversations it deleted.
    freed: u64,
    /// The conversations appended to, with the bytes appended: their `last_updated_at` and
    /// `bytes` move once, at the end of the batch.
    appended: HashMap<String, u64>,
    /// The leases of the batch's owned creates and appends that this node still holds,
    /// checked (and their ownership rows locked) by one statement before the first write.
    held: HashSet<(String, i64, i64)>,
}

/// Why one request was not applied.
type ApplyError = durable::ApplyError<tokio_postgres::Error>;

impl From<tokio_postgres::Error> for ApplyError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApplyError::Sql(e)
    }
}

/// A byte count as a BIGINT (saturating; no count gets near).
fn bigint(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>, batch_max: usize) {
        let mut batch: Vec<WriteRequest> = Vec::new();
        while let Some(first) = rx.recv().await {
            fill_batch(first, &mut rx, batch_max, &mut batch);
            self.commit_batch(&mut batch).await;
        }
        tracing::debug!("PostgreSQL store writer finished");
    }

    /// Applies `batch` in one transaction, then answers every request in it.
    async fn commit_batch(&mut self, batch: &mut Vec<WriteRequest>) {
        if only_flushes(batch) {
            for request in batch.drain(..) {
                request.reply.send(Ok(true));
            }
            return;
        }
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = None;
            match self.pool.get().await {
                Ok(conn) => self.conn = Some(conn),
                Err(e) => {
                    fail_batch(batch, &pool_error(e).to_string());
                    return;
                }
            }
        }
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let now = meta_timestamp();
        let used = self.used.load(Ordering::Relaxed);
        let mut outcome = self
            .transaction(conn, used, batch, &now, Isolation::Direct)
            .await;
        if let Err(BatchError::Retry) = outcome {
            outcome = self
                .transaction(conn, used, batch, &now, Isolation::Savepoints)
                .await;
        }
        match outcome {
            Ok((outcomes, used)) => {
                self.used.store(used, Ordering::Relaxed);
                for (request, outcome) in batch.drain(..).zip(outcomes) {
                    request.reply.send(outcome);
                }
            }
            Err(BatchError::Retry) => fail_batch(batch, "the write failed"),
            Err(BatchError::Failed(message)) => {
                // A connection left inside a failed transaction is not used again.
                if let Some(conn) = self.conn.take() {
                    if !conn.is_closed() && conn.batch_execute("ROLLBACK").await.is_ok() {
                        self.conn = Some(conn);
                    } else {
                        let _ = Object::take(conn);
                    }
                }
                fail_batch(batch, &message)
            }
        }
    }

    /// Runs the batch in one transaction and commits it; returns each request's outcome and
    /// the bytes in use after it. On failure the transaction is rolled back (or the connection
    /// is broken) and nothing of the batch is kept.
    async fn transaction(
        &self,
        conn: &Object,
        used: u64,
        batch: &[WriteRequest],
        now: &str,
        isolation: Isolation,
    ) -> Result<(Vec<Result<bool, StoreError>>, u64), BatchError> {
        let failed = |e: tokio_postgres::Error| BatchError::Failed(postgres_message(&e));
        conn.batch_execute("BEGIN").await.map_err(failed)?;
        let mut pending = Pending {
            conn,
            node_id: &self.node_id,
            limits: self.limits,
            used,
            added: 0,
            freed: 0,
            appended: HashMap::new(),
            held: HashSet::new(),
        };
        match pending.apply_batch(batch, now, isolation).await {
            Ok(outcomes) => {
                conn.batch_execute("COMMIT").await.map_err(failed)?;
                let used = used
                    .saturating_add(pending.added)
                    .saturating_sub(pending.freed);
                Ok((outcomes, used))
            }
            Err(e) => {
                if conn.batch_execute("ROLLBACK").await.is_err() {
                    return Err(BatchError::Failed(match e {
                        BatchError::Failed(message) => message,
                        BatchError::Retry => "the write failed and could not be rolled back".into(),
                    }));
                }
                Err(e)
            }
        }
    }
}

impl Pending<'_> {
    async fn apply_batch(
        &mut self,
        batch: &[WriteRequest],
        now: &str,
        isolation: Isolation,
    ) -> Result<Vec<Result<bool, StoreError>>, BatchError> {
        let statement_failed = |e: tokio_postgres::Error| match isolation {
            Isolation::Direct => BatchError::Retry,
            Isolation::Savepoints => BatchError::Failed(postgres_message(&e)),
        };
        self.held = self.check_leases(batch).await.map_err(statement_failed)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for request in batch {
            let outcome = match isolation {
                Isolation::Direct => match self.apply(&request.command, now).await {
                    Ok(value) => Ok(value),
                    Err(ApplyError::Refused(e)) => Err(e),
                    Err(ApplyError::Sql(_)) => return Err(BatchError::Retry),
                },
                Isolation::Savepoints => self.apply_in_savepoint(&request.command, now).await?,
            };
            outcomes.push(outcome);
        }
        // One `last_updated_at` and `bytes` update per conversation appended to.
        if !self.appended.is_empty() {
            let (ids, bytes): (Vec<&str>, Vec<i64>) = self
                .appended
                .iter()
                .map(|(id, bytes)| (id.as_str(), bigint(*bytes)))
                .unzip();
            let touch = self
                .conn
                .prepare_cached(sql::TOUCH)
                .await
                .map_err(statement_failed)?;
            self.conn
                .execute(&touch, &[&ids, &bytes, &now])
                .await
                .map_err(statement_failed)?;
        }
        Ok(outcomes)
    }

    /// Runs one request inside a savepoint, so that its failure leaves the rest of the batch
    /// alone. `Err` when the failure took the whole transaction with it.
    async fn apply_in_savepoint(
        &mut self,
        command: &WriteCommand,
        now: &str,
    ) -> Result<Result<bool, StoreError>, BatchError> {
        if matches!(command, WriteCommand::Flush | WriteCommand::Probe) {
            return Ok(Ok(true));
        }
        let failed = |e: tokio_postgres::Error| BatchError::Failed(postgres_message(&e));
        self.conn
            .batch_execute("SAVEPOINT request")
            .await
            .map_err(failed)?;
        let outcome = match self.apply(command, now).await {
            Ok(value) => {
                self.conn
                    .batch_execute("RELEASE SAVEPOINT request")
                    .await
                    .map_err(failed)?;
                return Ok(Ok(value));
            }
            Err(ApplyError::Refused(e)) => e,
            Err(ApplyError::Sql(e)) => io_error(e),
        };
        self.conn
            .batch_execute("ROLLBACK TO SAVEPOINT request; RELEASE SAVEPOINT request")
            .await
            .map_err(failed)?;
        Ok(Err(outcome))
    }

    /// Applies one request. A refusal writes nothing and leaves the transaction healthy; the
    /// writer's bookkeeping changes only once every statement of the request has succeeded.
    async fn apply(&mut self, command: &WriteCommand, now: &str) -> Result<bool, ApplyError> {
        let conn = self.conn;
        match command {
            WriteCommand::Create {
                meta,
                events,
                lease,
            } => {
                if let Some(lease) = lease {
                    self.check_lease(&meta.conversation_id, *lease)?;
                }
                self.create(meta, events, lease.map_or(0, |l| l.epoch))
                    .await
            }
            WriteCommand::SetTitle { id, title } => {
                let statement = conn.prepare_cached(sql::SET_TITLE).await?;
                let changed = conn.execute(&statement, &[id, title, &now]).await?;
                Ok(changed > 0)
            }
            WriteCommand::Append { id, events, lease } => {
                if let Some(lease) = lease {
                    self.check_lease(id, *lease)?;
                }
                self.append(id, events, lease.map_or(0, |l| l.epoch)).await
            }
            WriteCommand::Delete { id } => {
                let statement = conn.prepare_cached(sql::DELETE).await?;
                let Some(row) = conn.query_opt(&statement, &[id]).await? else {
                    return Ok(false);
                };
                let bytes: i64 = row.try_get(0)?;
                self.freed = self.freed.saturating_add(u64::try_from(bytes).unwrap_or(0));
                self.appended.remove(id);
                Ok(true)
            }
            WriteCommand::SaveSettings { user, json } => {
                let statement = conn.prepare_cached(sql::SAVE_SETTINGS).await?;
                conn.execute(&statement, &[user, json]).await?;
                Ok(true)
            }
            WriteCommand::AddKey { key, hash } => {
                let statement = conn.prepare_cached(sql::ADD_KEY).await?;
                let added = conn
                    .execute(&statement, &[&key.name, hash, &key.admin, &key.created_at])
                    .await?;
                if added == 0 {
                    return Err(ApplyError::Refused(StoreError::KeyExists(key.name.clone())));
                }
                Ok(true)
            }
            WriteCommand::RevokeKey { name } => {
                let statement = conn.prepare_cached(sql::REVOKE_KEY).await?;
                Ok(conn.execute(&statement, &[name]).await? > 0)
            }
            WriteCommand::Flush | WriteCommand::Probe => Ok(true),
        }
    }

    /// The bytes in use if this transaction commits now (deletes not subtracted: they may yet
    /// roll back with their savepoint).
    fn in_use(&self) -> u64 {
        self.used.saturating_add(self.added)
    }

    /// Inserts a new conversation and its first events. Everything the append could refuse is
    /// checked before the first write, so a refusal writes nothing.
    async fn create(
        &mut self,
        meta: &ConversationMeta,
        events: &[StoredEvent],
        epoch: i64,
    ) -> Result<bool, ApplyError> {
        let id = &meta.conversation_id;
        let init = serde_json::to_string(&meta.init).map_err(|e| {
            ApplyError::Refused(StoreError::Io(format!("cannot encode init data: {e}")))
        })?;
        let bytes = meta_bytes(&init);
        let more = events_bytes(events);
        self.limits.check_conversation(id, 0, bytes)?;
        self.limits.check_store(self.in_use(), bytes)?;
        check_append(id, None, events)?;
        self.limits.check_conversation(id, bytes, more)?;
        self.limits
            .check_store(self.in_use(), bytes.saturating_add(more))?;
        let statement = self.conn.prepare_cached(sql::CREATE).await?;
        let inserted = self
            .conn
            .execute(
                &statement,
                &[
                    &meta.conversation_id.as_str(),
                    &meta.title,
                    &meta.created_at,
                    &meta.last_updated_at,
                    &meta.trigger,
                    &meta.owner,
                    &init,
                    &bigint(bytes),
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(ApplyError::Refused(StoreError::Exists(
                meta.conversation_id.clone(),
            )));
        }
        self.added = self.added.saturating_add(bytes);
        self.append(id, events, epoch).await
    }

    /// Which leases of `batch`'s owned creates and appends this node still holds, with one
    /// statement ([`sql::OWNS`]) that also holds their ownership rows (shared) until the
    /// transaction ends; nothing is asked when the batch has none.
    async fn check_leases(
        &self,
        batch: &[WriteRequest],
    ) -> Result<HashSet<(String, i64, i64)>, tokio_postgres::Error> {
        let asked: HashSet<(&str, i64, i64)> = batch
            .iter()
            .filter_map(|request| match &request.command {
                WriteCommand::Create {
                    meta,
                    lease: Some(lease),
                    ..
                } => Some((
                    meta.conversation_id.as_str(),
                    lease.incarnation,
                    lease.epoch,
                )),
                WriteCommand::Append {
                    id,
                    lease: Some(lease),
                    ..
                } => Some((id.as_str(), lease.incarnation, lease.epoch)),
                _ => None,
            })
            .collect();
        if asked.is_empty() {
            return Ok(HashSet::new());
        }
        let mut ids = Vec::with_capacity(asked.len());
        let mut incarnations = Vec::with_capacity(asked.len());
        let mut epochs = Vec::with_capacity(asked.len());
        for &(id, incarnation, epoch) in &asked {
            ids.push(id);
            incarnations.push(incarnation);
            epochs.push(epoch);
        }
        let statement = self.conn.prepare_cached(sql::OWNS).await?;
        let rows = self
            .conn
            .query(&statement, &[&self.node_id, &ids, &incarnations, &epochs])
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect()
    }

    /// Refuses an owned create or append whose lease [`Pending::check_leases`] did not find
    /// held.
    fn check_lease(&self, id: &str, lease: Lease) -> Result<(), ApplyError> {
        if !self
            .held
            .contains(&(id.to_string(), lease.incarnation, lease.epoch))
        {
            return Err(ApplyError::Refused(StoreError::Fenced(format!(
                "conversation {id}: this node (incarnation {}) no longer owns it at epoch {} \
                 (taken over, or the node's registration lapsed); nothing was written",
                lease.incarnation, lease.epoch
            ))));
        }
        Ok(())
    }

    /// Appends `events` under `epoch` in one statement that inserts them only if the log ends
    /// right before the first and the conversation's quota has room; when it does not (or the
    /// conversation is unknown), reads why and refuses.
    async fn append(
        &mut self,
        id: &str,
        events: &[StoredEvent],
        epoch: i64,
    ) -> Result<bool, ApplyError> {
        let Some(first) = events.first() else {
            // Nothing to store; an unknown conversation is fine too (as in every store).
            return Ok(true);
        };
        // The ids must be consecutive and fit the column; `first - 1` is then the log's end.
        let Ok(first_id) = i64::try_from(first.id) else {
            return Err(ApplyError::Refused(StoreError::Io(format!(
                "conversation {id}: event id {} is too large",
                first.id
            ))));
        };
        let expected_last = (first_id > 0).then(|| first_id - 1);
        check_append(id, expected_last, events)?;
        let more = events_bytes(events);
        self.limits.check_store(self.in_use(), more)?;
        let earlier = self.appended.get(id).copied().unwrap_or(0);
        let room = match self.limits.max_bytes_per_conversation {
            0 => i64::MAX,
            limit => bigint(limit),
        };
        let ids: Vec<i64> = events.iter().map(|e| e.id as i64).collect();
        let texts: Vec<&str> = events.iter().map(|e| &*e.json).collect();
        let statement = self.conn.prepare_cached(sql::APPEND).await?;
        let expected_end = expected_last.unwrap_or(-1);
        let inserted = self
            .conn
            .execute(
                &statement,
                &[
                    &id,
                    &expected_end,
                    &ids,
                    &texts,
                    &bigint(earlier.saturating_add(more)),
                    &room,
                    &epoch,
                ],
            )
            .await?;
        if inserted as usize == events.len() {
            self.added = self.added.saturating_add(more);
            *self.appended.entry(id.to_string()).or_default() += more;
            return Ok(true);
        }
        // Nothing was inserted (the statement is all or nothing): say why.
        let statement = self.conn.prepare_cached(sql::LOG_END).await?;
        let Some(row) = self.conn.query_opt(&statement, &[&id]).await? else {
            return Err(ApplyError::Refused(StoreError::Io(format!(
                "conversation {id} does not exist; cannot append events to it"
            ))));
        };
        let last: Option<i64> = row.try_get(0)?;
        let held: i64 = row.try_get(1)?;
        check_append(id, last, events)?;
        let held = u64::try_from(held).unwrap_or(0).saturating_add(earlier);
        self.limits.check_conversation(id, held, more)?;
        // Cannot happen while this writer is the only one; said plainly if it does.
        Err(ApplyError::Refused(StoreError::Io(format!(
            "conversation {id}: the log changed while appending at event id {}",
            first.id
        ))))
    }
}

// ---------------------------------------------------------------------------------------------
// Ownership

/// Serves ownership requests concurrently on pooled connections until the queue closes, as
/// [`run_readers`] serves reads.
async fn run_ownership(
    pool: Pool,
    rx: mpsc::Receiver<OwnershipRequest>,
    node: Arc<ClusterNode>,
    state: Arc<NodeState>,
) {
    let most = pool.status().max_size.max(1);
    serve_concurrently(most, rx, move |request| {
        let (pool, node, state) = (pool.clone(), node.clone(), state.clone());
        async move {
            // A caller that dropped its future no longer wants the answer; that is fine.
            match request {
                OwnershipRequest::Acquire { id, quota, reply } => {
                    let acquired = acquire(&pool, &node.node_id, &state, &id, quota).await;
                    let _ = reply.send(acquired);
                }
                OwnershipRequest::Release { id, lease, reply } => {
                    let _ = reply.send(release(&pool, &node.node_id, &id, lease).await);
                }
                OwnershipRequest::Owner { id, reply } => {
                    let _ = reply.send(owner(&pool, &node.node_id, &id).await);
                }
                OwnershipRequest::OwnedElsewhere { ids, reply } => {
                    let _ = reply.send(owned_elsewhere(&pool, &node.node_id, &ids).await);
                }
                OwnershipRequest::Leave { reply } => {
                    let left = membership::leave(&pool, &node, &state).await;
                    let _ = reply.send(left.map_err(StoreError::Io));
                }
            }
        }
    })
    .await
}

/// Runs `serve` on every request from `rx`, at most `most` at once, until the queue closes and
/// every started one has finished; further requests wait in the (bounded) queue, so a flood
/// holds back its senders instead of piling up here.
async fn serve_concurrently<R, F, Fut>(most: usize, mut rx: mpsc::Receiver<R>, serve: F)
where
    F: Fn(R) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut running = JoinSet::new();
    loop {
        if running.len() >= most {
            running.join_next().await;
            continue;
        }
        let Some(request) = rx.recv().await else {
            break;
        };
        running.spawn(serve(request));
    }
    while running.join_next().await.is_some() {}
}

/// Takes conversation `id` for this node in one transaction (see [`sql::ACQUIRE`]); refused
/// while the node is fenced or its registration has lapsed. Under a `quota` with a limit, the
/// transaction first takes the user's advisory lock, so that the acquires of one user on every
/// node run one at a time, and takes the conversation only while fewer than the limit of the
/// user's other conversations are owned by live nodes (nothing is written otherwise).
async fn acquire(
    pool: &Pool,
    node_id: &str,
    state: &NodeState,
    id: &str,
    quota: Option<UserQuota>,
) -> Result<Acquired, StoreError> {
    let Some(incarnation) = state.incarnation() else {
        return Err(StoreError::Fenced(
            "this node has fenced itself and owns nothing until it registers again".into(),
        ));
    };
    let mut conn = pool.get().await.map_err(pool_error)?;
    let tx = conn.transaction().await.map_err(io_error)?;
    let live = tx.prepare_cached(sql::NODE_LIVE).await.map_err(io_error)?;
    if tx
        .query_opt(&live, &[&node_id, &incarnation])
        .await
        .map_err(io_error)?
        .is_none()
    {
        return Err(StoreError::Fenced(format!(
            "this node's registration (incarnation {incarnation}) has lapsed"
        )));
    }
    let user = quota.as_ref().map(|q| q.user.as_str());
    let limit = quota.as_ref().map_or(0, |q| q.max_running);
    if let (Some(user), true) = (user, limit > 0) {
        let lock = tx.prepare_cached(sql::LOCK_USER).await.map_err(io_error)?;
        tx.execute(&lock, &[&USER_LOCK, &user])
            .await
            .map_err(io_error)?;
    }
    let statement = tx.prepare_cached(sql::ACQUIRE).await.map_err(io_error)?;
    let taken = tx
        .query_opt(&statement, &[&id, &node_id, &incarnation, &user])
        .await
        .map_err(io_error)?;
    let acquired = match taken {
        Some(row) => {
            if let (Some(user), true) = (user, limit > 0) {
                let held = tx
                    .prepare_cached(sql::HELD_BY_USER)
                    .await
                    .map_err(io_error)?;
                let row = tx.query_one(&held, &[&user, &id]).await.map_err(io_error)?;
                let held: i64 = row.try_get(0).map_err(io_error)?;
                if usize::try_from(held).unwrap_or(usize::MAX) >= limit {
                    tx.rollback().await.map_err(io_error)?;
                    return Ok(Acquired::UserLimit { limit });
                }
            }
            Acquired::Owned(Lease {
                incarnation,
                epoch: row.try_get(0).map_err(io_error)?,
            })
        }
        None => {
            let statement = tx.prepare_cached(sql::OWNER).await.map_err(io_error)?;
            let row = tx.query_one(&statement, &[&id]).await.map_err(io_error)?;
            Acquired::Elsewhere(NodeAddress {
                node_id: row
                    .try_get::<_, Option<String>>(0)
                    .map_err(io_error)?
                    .unwrap_or_default(),
                url: row
                    .try_get::<_, Option<String>>(1)
                    .map_err(io_error)?
                    .unwrap_or_default(),
            })
        }
    };
    tx.commit().await.map_err(io_error)?;
    Ok(acquired)
}

/// The live node other than `node_id` that owns `id`, if any.
async fn owner(pool: &Pool, node_id: &str, id: &str) -> Result<Option<NodeAddress>, StoreError> {
    let conn = pool.get().await.map_err(pool_error)?;
    let statement = conn
        .prepare_cached(sql::LIVE_OWNER)
        .await
        .map_err(io_error)?;
    let Some(row) = conn.query_opt(&statement, &[&id]).await.map_err(io_error)? else {
        return Ok(None);
    };
    let owner = NodeAddress {
        node_id: row.try_get(0).map_err(io_error)?,
        url: row.try_get(1).map_err(io_error)?,
    };
    Ok((owner.node_id != node_id).then_some(owner))
}

/// Which of `ids` a live node other than `node_id` owns.
async fn owned_elsewhere(
    pool: &Pool,
    node_id: &str,
    ids: &[String],
) -> Result<HashSet<ConversationId>, StoreError> {
    let conn = pool.get().await.map_err(pool_error)?;
    let statement = conn
        .prepare_cached(sql::OWNED_ELSEWHERE)
        .await
        .map_err(io_error)?;
    let rows = conn
        .query(&statement, &[&ids, &node_id])
        .await
        .map_err(io_error)?;
    rows.iter()
        .map(|row| {
            row.try_get::<_, &str>(0)
                .map_err(io_error)
                .and_then(stored_id)
        })
        .collect()
}

/// Gives `lease` on `id` back (the row goes when the conversation does not exist).
async fn release(pool: &Pool, node_id: &str, id: &str, lease: Lease) -> Result<(), StoreError> {
    let conn = pool.get().await.map_err(pool_error)?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&id, &node_id, &lease.incarnation, &lease.epoch];
    for sql in [sql::RELEASE_UNKNOWN, sql::RELEASE] {
        let statement = conn.prepare_cached(sql).await.map_err(io_error)?;
        conn.execute(&statement, &params).await.map_err(io_error)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The readers

/// Serves read requests concurrently, each on a pooled connection, until the queue closes and
/// every started read has answered. At most as many reads run as the pool has connections;
/// further requests wait in the (bounded) queue, so a flood of reads holds back its senders
/// instead of piling up here.
async fn run_readers(pool: Pool, rx: mpsc::Receiver<ReadRequest>) {
    let most = pool.status().max_size.max(1);
    serve_concurrently(most, rx, move |request| {
        let pool = pool.clone();
        async move { serve(&pool, request).await }
    })
    .await
}

async fn serve(pool: &Pool, request: ReadRequest) {
    // A caller that dropped its future no longer wants the answer; that is fine.
    match request {
        ReadRequest::Exists { id, reply } => {
            let _ = reply.send(read_exists(pool, &id).await);
        }
        ReadRequest::Get { id, reply } => {
            let _ = reply.send(read_get(pool, &id).await);
        }
        ReadRequest::List {
            offset,
            limit,
            reply,
        } => {
            let _ = reply.send(read_list(pool, offset, limit).await);
        }
        ReadRequest::Events { id, query, reply } => {
            let _ = reply.send(read_events(pool, &id, query).await);
        }
        ReadRequest::Settings { user, reply } => {
            let _ = reply.send(read_settings(pool, &user).await);
        }
        ReadRequest::ListOwned {
            owner,
            offset,
            limit,
            reply,
        } => {
            let _ = reply.send(read_list_owned(pool, &owner, offset, limit).await);
        }
        ReadRequest::ListKeys { reply } => {
            let _ = reply.send(read_keys(pool).await);
        }
        ReadRequest::LookupKey { hash, reply } => {
            let _ = reply.send(read_lookup_key(pool, hash.as_deref()).await);
        }
    }
}

/// Runs one query on a pooled connection.
async fn query(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let conn = pool.get().await.map_err(pool_error)?;
    let statement = conn.prepare_cached(sql).await.map_err(io_error)?;
    conn.query(&statement, params).await.map_err(io_error)
}

/// A conversation id read back from the database.
fn stored_id(text: &str) -> Result<ConversationId, StoreError> {
    ConversationId::parse(text)
        .map_err(|e| StoreError::Io(format!("stored conversation id {text:?}: {e}")))
}

fn meta_from_row(row: &Row) -> Result<(ConversationMeta, String), StoreError> {
    let get = |e: tokio_postgres::Error| io_error(e);
    Ok((
        ConversationMeta {
            conversation_id: stored_id(row.try_get(0).map_err(get)?)?,
            title: row.try_get(1).map_err(get)?,
            created_at: row.try_get(2).map_err(get)?,
            last_updated_at: row.try_get(3).map_err(get)?,
            trigger: row.try_get(4).map_err(get)?,
            owner: row.try_get(5).map_err(get)?,
            init: InitData::default(),
        },
        row.try_get(6).map_err(get)?,
    ))
}

async fn read_get(pool: &Pool, id: &str) -> Result<Option<ConversationRecord>, StoreError> {
    // One statement: the metadata and the log's end come from the same snapshot.
    let rows = query(pool, sql::GET, &[&id]).await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let meta = decode_init(meta_from_row(row)?)?;
    let last: Option<i64> = row.try_get(7).map_err(io_error)?;
    let bytes: i64 = row.try_get(8).map_err(io_error)?;
    Ok(Some(ConversationRecord {
        meta,
        next_event_id: next_after(id, last)?,
        bytes: u64::try_from(bytes).unwrap_or(0),
    }))
}

async fn read_list(
    pool: &Pool,
    offset: usize,
    limit: usize,
) -> Result<Vec<ConversationMeta>, StoreError> {
    let rows = query(pool, sql::LIST, &[&sql_count(limit), &sql_count(offset)]).await?;
    rows.iter()
        .map(|row| decode_init(meta_from_row(row)?))
        .collect()
}

async fn read_list_owned(
    pool: &Pool,
    owner: &str,
    offset: usize,
    limit: usize,
) -> Result<Vec<ConversationMeta>, StoreError> {
    let rows = query(
        pool,
        sql::LIST_OWNED,
        &[&owner, &sql_count(limit), &sql_count(offset)],
    )
    .await?;
    rows.iter()
        .map(|row| decode_init(meta_from_row(row)?))
        .collect()
}

/// A key from columns 0–2 of `row`; `None` when its name is NULL (no key matched).
fn key_from_row(row: &Row) -> Result<Option<ApiKey>, StoreError> {
    let name: Option<String> = row.try_get(0).map_err(io_error)?;
    let Some(name) = name else {
        return Ok(None);
    };
    Ok(Some(ApiKey {
        name,
        admin: row.try_get(1).map_err(io_error)?,
        created_at: row.try_get(2).map_err(io_error)?,
    }))
}

async fn read_keys(pool: &Pool) -> Result<Vec<ApiKey>, StoreError> {
    let rows = query(pool, sql::LIST_KEYS, &[]).await?;
    let keys = rows
        .iter()
        .map(key_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(keys.into_iter().flatten().collect())
}

async fn read_lookup_key(pool: &Pool, hash: Option<&str>) -> Result<KeyLookup, StoreError> {
    let rows = query(pool, sql::LOOKUP_KEY, &[&hash]).await?;
    let Some(row) = rows.first() else {
        return Ok(KeyLookup::default());
    };
    Ok(KeyLookup {
        key: key_from_row(row)?,
        any: row.try_get(3).map_err(io_error)?,
    })
}

async fn read_events(pool: &Pool, id: &str, q: EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
    let Some((start, end, limit)) = event_range(&q) else {
        return Ok(Vec::new());
    };
    let sql = if q.reverse {
        sql::EVENTS_NEWEST_FIRST
    } else {
        sql::EVENTS_OLDEST_FIRST
    };
    let rows = query(pool, sql, &[&id, &start, &end, &limit]).await?;
    rows.iter()
        .map(|row| {
            let event_id: i64 = row.try_get(0).map_err(io_error)?;
            let json: String = row.try_get(1).map_err(io_error)?;
            Ok(StoredEvent {
                id: stored_event_id(id, event_id)?,
                json: json.into(),
            })
        })
        .collect()
}

async fn read_exists(pool: &Pool, id: &str) -> Result<Option<Existing>, StoreError> {
    let rows = query(pool, sql::EXISTS, &[&id]).await?;
    rows.first()
        .map(|row| {
            Ok(Existing {
                owner: row.try_get(0).map_err(io_error)?,
            })
        })
        .transpose()
}

async fn read_settings(pool: &Pool, user: &str) -> Result<Option<Value>, StoreError> {
    let rows = query(pool, sql::SETTINGS, &[&user]).await?;
    let text: Option<String> = match rows.first() {
        Some(row) => Some(row.try_get(0).map_err(io_error)?),
        None => None,
    };
    decode_settings(text)
}
