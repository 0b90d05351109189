//! Cluster membership for the PostgreSQL store: this node's registration in the shared
//! database, its heartbeat and its self-fencing.
//!
//! A node registers under its `[cluster] node_id` with a new *incarnation* (the previous
//! registration of that id plus one: a restarted node frees what its previous run held) and an
//! expiry `node_ttl_ms` ahead by the database's clock. Every `heartbeat_ms` it moves the expiry
//! forward, but only while it has not expired: an expired registration is never revived.
//!
//! Promises:
//! - **Self-fencing.** When the last heartbeat that succeeded was *sent* half a TTL ago or more
//!   (by this process's monotonic clock, which runs on while the process is stopped), or the
//!   database says the registration lapsed, the node is [`Membership::Fenced`]: the store grants
//!   no new ownership, and what the node still holds is refused by the database at the next
//!   append as soon as another node takes it over (its lease names the old incarnation). The
//!   server reacts to the state change (stops conversations without writing, closes transports).
//!   The node then registers again with a new incarnation and is live again.
//! - **Clean exit.** [`leave`] (graceful shutdown), or the store closing, removes the
//!   registration, so that every conversation the node still owned is free at once; after
//!   `leave` the node never registers again.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::{oneshot, watch};

use super::Failure;

/// Who this node is in the cluster and how it keeps its registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// `[cluster] node_id`.
    pub node_id: String,
    /// `[cluster] advertise_url`: where other nodes reach this one.
    pub advertise_url: String,
    /// `[cluster] heartbeat_ms`.
    pub heartbeat: Duration,
    /// `[cluster] node_ttl_ms`.
    pub ttl: Duration,
}

impl ClusterNode {
    /// A node of its own, for a store opened without cluster settings (tests, tools): a random
    /// id, no address, the default heartbeat and TTL.
    pub fn standalone() -> ClusterNode {
        ClusterNode {
            node_id: format!("standalone-{}", uuid::Uuid::new_v4().simple()),
            advertise_url: String::new(),
            heartbeat: Duration::from_millis(1000),
            ttl: Duration::from_millis(10_000),
        }
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }
}

/// This node's standing in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Registered and heartbeating under this incarnation.
    Live { incarnation: i64 },
    /// Fenced itself: it owns nothing and grants itself nothing until it registers again.
    Fenced,
}

/// The membership state shared by the heartbeat task and the store's handles.
#[derive(Debug)]
pub(super) struct NodeState {
    /// The live incarnation, 0 while fenced.
    incarnation: AtomicI64,
    /// Set by [`leave`]: the node stays out of the cluster.
    leaving: std::sync::atomic::AtomicBool,
    tx: watch::Sender<Membership>,
}

impl NodeState {
    /// Fenced until [`NodeState::set`] says otherwise.
    pub(super) fn new() -> Arc<NodeState> {
        let (tx, _) = watch::channel(Membership::Fenced);
        Arc::new(NodeState {
            incarnation: AtomicI64::new(0),
            leaving: std::sync::atomic::AtomicBool::new(false),
            tx,
        })
    }

    /// The live incarnation, or `None` while fenced.
    pub(super) fn incarnation(&self) -> Option<i64> {
        match self.incarnation.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Membership> {
        self.tx.subscribe()
    }

    pub(super) fn set(&self, state: Membership) {
        let n = match state {
            Membership::Live { incarnation } => incarnation,
            Membership::Fenced => 0,
        };
        self.incarnation.store(n, Ordering::Release);
        self.tx.send_replace(state);
    }
}

mod sql {
    /// `$1` node id, `$2` advertise URL, `$3` TTL in ms → the new incarnation.
    pub const REGISTER: &str = "INSERT INTO cluster_nodes AS n \
         (node_id, incarnation, advertise_url, started_at, heartbeat_at, expires_at) \
         VALUES ($1, 1, $2, now(), now(), now() + $3::BIGINT * interval '1 millisecond') \
         ON CONFLICT (node_id) DO UPDATE SET incarnation = n.incarnation + 1, \
         advertise_url = excluded.advertise_url, started_at = excluded.started_at, \
         heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at \
         RETURNING incarnation";
    /// `$1` node id, `$2` incarnation, `$3` TTL in ms; one row while the registration lives.
    pub const HEARTBEAT: &str = "UPDATE cluster_nodes \
         SET heartbeat_at = now(), expires_at = now() + $3::BIGINT * interval '1 millisecond' \
         WHERE node_id = $1 AND incarnation = $2 AND expires_at > now() RETURNING 1";
    /// `$1` node id, `$2` incarnation.
    pub const DEREGISTER: &str =
        "DELETE FROM cluster_nodes WHERE node_id = $1 AND incarnation = $2";
}

/// The connection membership statements run on: taken out of the pool (so that it never
/// holds a pooled slot, and a statement stuck behind a lock never delays the store's other
/// work), with the server cancelling any statement, or wait for a lock, that outlasts
/// `patience`. Made again after it breaks or times out.
struct Session {
    pool: Pool,
    patience: Duration,
    client: Option<deadpool_postgres::ClientWrapper>,
}

impl Session {
    fn new(pool: Pool, patience: Duration) -> Session {
        Session {
            pool,
            patience,
            client: None,
        }
    }

    async fn connect(&self) -> Result<deadpool_postgres::ClientWrapper, Failure> {
        let conn = self.pool.get().await.map_err(Failure::of)?;
        let client = deadpool_postgres::Object::take(conn);
        let ms = self.patience.as_millis();
        client
            .batch_execute(&format!(
                "SET lock_timeout = {ms}; SET statement_timeout = {ms}"
            ))
            .await
            .map_err(super::postgres::postgres_failure)?;
        Ok(client)
    }

    /// Runs `statement` with `params`: the rows it changed or returned (`query` for one that
    /// returns rows). A connection that failed or timed out is dropped, not reused.
    async fn run(
        &mut self,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, Failure> {
        let limit = self.patience * 2;
        let work = async {
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                self.client = Some(self.connect().await?);
            }
            let Some(client) = self.client.as_ref() else {
                return Err("no connection".into());
            };
            client
                .query(statement, params)
                .await
                .map_err(super::postgres::postgres_failure)
        };
        let outcome = match tokio::time::timeout(limit, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err("PostgreSQL did not answer in time".into()),
        };
        if outcome.is_err() {
            self.client = None;
        }
        outcome
    }

    /// Registers `node` with a new incarnation.
    async fn register(&mut self, node: &ClusterNode) -> Result<i64, Failure> {
        let rows = self
            .run(
                sql::REGISTER,
                &[&node.node_id, &node.advertise_url, &node.ttl_ms()],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| Failure::new("the registration returned nothing"))?;
        row.try_get(0).map_err(super::postgres::postgres_failure)
    }

    /// Whether the registration still lives after moving its expiry forward.
    async fn heartbeat(&mut self, node: &ClusterNode, incarnation: i64) -> Result<bool, Failure> {
        let rows = self
            .run(
                sql::HEARTBEAT,
                &[&node.node_id, &incarnation, &node.ttl_ms()],
            )
            .await?;
        Ok(!rows.is_empty())
    }
}

/// Registers `node` with a new incarnation (at open); the error is PostgreSQL's message.
pub(super) async fn register(pool: &Pool, node: &ClusterNode) -> Result<i64, Failure> {
    Session::new(pool.clone(), node.ttl / 2)
        .register(node)
        .await
}

/// Keeps `node`'s registration alive (see the module docs) until `stop` fires or its sender is
/// dropped; then removes it.
pub(super) async fn run(
    pool: Pool,
    node: ClusterNode,
    state: Arc<NodeState>,
    mut stop: oneshot::Receiver<()>,
) {
    let half_ttl = node.ttl / 2;
    // A heartbeat that takes longer than this is as good as failed.
    let patience = node.heartbeat.min(half_ttl).max(Duration::from_millis(10));
    let mut session = Session::new(pool, patience);
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(node.heartbeat) => {}
        }
        if state.leaving.load(Ordering::Acquire) {
            break;
        }
        let sent = Instant::now();
        match state.incarnation() {
            Some(incarnation) => match session.heartbeat(&node, incarnation).await {
                Ok(true) if sent.duration_since(last_ok) < half_ttl => last_ok = sent,
                // It came through, but too late to vouch for the time in between.
                Ok(true) => fence(&state, &node, "no heartbeat succeeded for half the TTL"),
                Ok(false) => fence(&state, &node, "its registration lapsed"),
                Err(e) => {
                    tracing::warn!(error = %e, "cluster heartbeat failed");
                    if last_ok.elapsed() >= half_ttl {
                        fence(&state, &node, "no heartbeat succeeded for half the TTL");
                    }
                }
            },
            None => match session.register(&node).await {
                Ok(incarnation) => {
                    tracing::info!(node_id = %node.node_id, incarnation, "cluster node registered again");
                    last_ok = sent;
                    state.set(Membership::Live { incarnation });
                }
                Err(e) => tracing::warn!(error = %e, "cannot register the cluster node yet"),
            },
        }
    }
    if let Some(incarnation) = state.incarnation() {
        state.set(Membership::Fenced);
        match session
            .run(sql::DEREGISTER, &[&node.node_id, &incarnation])
            .await
        {
            Ok(_) => tracing::info!(node_id = %node.node_id, incarnation, "cluster node left"),
            Err(e) => tracing::warn!(error = %e, "cannot remove the cluster node's registration"),
        }
    }
}

/// Leaves the cluster for good (graceful shutdown): the registration goes at once, so what the
/// node still owns is free for the other nodes; no heartbeat or registration follows.
pub(super) async fn leave(
    pool: &Pool,
    node: &ClusterNode,
    state: &NodeState,
) -> Result<(), Failure> {
    state.leaving.store(true, Ordering::Release);
    let Some(incarnation) = state.incarnation() else {
        return Ok(());
    };
    state.set(Membership::Fenced);
    let mut session = Session::new(pool.clone(), node.ttl / 2);
    session
        .run(sql::DEREGISTER, &[&node.node_id, &incarnation])
        .await?;
    tracing::info!(node_id = %node.node_id, incarnation, "cluster node left");
    Ok(())
}

fn fence(state: &NodeState, node: &ClusterNode, why: &str) {
    tracing::error!(node_id = %node.node_id, why, "cluster node fenced itself");
    state.set(Membership::Fenced);
}
