//! The PostgreSQL store's reads, served concurrently on pooled connections.

use super::ownership::serve_concurrently;
use super::*;

/// Serves read requests concurrently, each on a pooled connection, until the queue closes and
/// every started read has answered. At most as many reads run as the pool has connections;
/// further requests wait in the (bounded) queue, so a flood of reads holds back its senders
/// instead of piling up here.
pub(super) async fn run_readers(pool: Pool, rx: mpsc::Receiver<ReadRequest>) {
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
pub(super) fn stored_id(text: &str) -> Result<ConversationId, StoreError> {
    ConversationId::parse(text).map_err(|e| {
        StoreError::Io(Failure::of(e).within(format_args!("stored conversation id {text:?}")))
    })
}

fn meta_from_row(row: &Row) -> Result<(ConversationMeta, String), StoreError> {
    let get = |e: tokio_postgres::Error| io_error(e);
    Ok((
        ConversationMeta {
            conversation_id: stored_id(row.try_get(0).map_err(get)?)?,
            title: row.try_get(1).map_err(get)?,
            created_at: row.try_get(2).map_err(get)?,
            last_updated_at: row.try_get(3).map_err(get)?,
            trigger: Trigger::parse(row.try_get(4).map_err(get)?)
                .map_err(|e| StoreError::Io(Failure::of(e).within("stored trigger")))?,
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
