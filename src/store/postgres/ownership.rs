//! Conversation ownership on the PostgreSQL store: acquire, release and owner lookups, each in
//! its own transaction on a pooled connection.

use super::reader::stored_id;
use super::*;

/// The first key of the advisory locks (`pg_advisory_xact_lock(int, int)`, the second key
/// the user's `hashtext`) that serialise one user's acquires under a per-user limit ("SWUS").
const USER_LOCK: i32 = 0x5357_5553;

/// Serves ownership requests concurrently on pooled connections until the queue closes, as
/// [`run_readers`] serves reads.
pub(super) async fn run_ownership(
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
                OwnershipRequest::Orphaned { limit, reply } => {
                    let _ = reply.send(orphaned(&pool, limit).await);
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
pub(super) async fn serve_concurrently<R, F, Fut>(most: usize, mut rx: mpsc::Receiver<R>, serve: F)
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

/// Up to `limit` conversations held under a registration that lapsed, with their owners.
async fn orphaned(pool: &Pool, limit: i64) -> Result<Vec<Orphan>, StoreError> {
    let conn = pool.get().await.map_err(pool_error)?;
    let statement = conn.prepare_cached(sql::ORPHANED).await.map_err(io_error)?;
    let rows = conn.query(&statement, &[&limit]).await.map_err(io_error)?;
    rows.iter()
        .map(|row| {
            let id = row
                .try_get::<_, &str>(0)
                .map_err(io_error)
                .and_then(stored_id)?;
            let owner: Option<String> = row.try_get(1).map_err(io_error)?;
            Ok(Orphan {
                id,
                owner: owner.map(Arc::from),
            })
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
