//! The SQLite store's reader threads: each owns a read-only connection and answers the
//! queued read requests, so reads never wait behind a write batch.

use crate::conversation::{
    ConversationId, ConversationMeta, ConversationRecord, InitData, Trigger,
};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::Value;
use tokio::sync::mpsc;

use super::io_error;
use super::sql::{self, last_event_id};
use crate::events::StoredEvent;
use crate::store::durable::{
    decode_init, decode_settings, event_range, next_after, sql_count, stored_event_id, ReadRequest,
};
use crate::store::{ApiKey, EventQuery, Existing, KeyLookup, StoreError};

pub(super) fn run_reader(mut conn: Connection, rx: Arc<Mutex<mpsc::Receiver<ReadRequest>>>) {
    loop {
        let request = {
            let mut rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.blocking_recv()
        };
        let Some(request) = request else { break };
        match request {
            ReadRequest::Exists { id, reply } => {
                let _ = reply.send(read_exists(&conn, &id));
            }
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
            ReadRequest::Settings { user, reply } => {
                let _ = reply.send(read_settings(&conn, &user));
            }
            ReadRequest::ListOwned {
                owner,
                offset,
                limit,
                reply,
            } => {
                let _ = reply.send(read_list_owned(&conn, &owner, offset, limit));
            }
            ReadRequest::ListKeys { reply } => {
                let _ = reply.send(read_keys(&conn));
            }
            ReadRequest::LookupKey { hash, reply } => {
                let _ = reply.send(read_lookup_key(&conn, hash.as_deref()));
            }
        }
    }
    tracing::debug!("store reader finished");
}

fn read_settings(conn: &Connection, user: &str) -> Result<Option<Value>, StoreError> {
    let text: Option<String> = conn
        .prepare_cached(sql::SETTINGS)
        .and_then(|mut stmt| stmt.query_row(params![user], |r| r.get(0)).optional())
        .map_err(io_error)?;
    decode_settings(text)
}

fn read_exists(conn: &Connection, id: &str) -> Result<Option<Existing>, StoreError> {
    conn.prepare_cached(sql::EXISTS)
        .and_then(|mut stmt| {
            stmt.query_row(params![id], |r| Ok(Existing { owner: r.get(0)? }))
                .optional()
        })
        .map_err(io_error)
}

fn meta_from_row(row: &Row<'_>) -> rusqlite::Result<(ConversationMeta, String)> {
    let conversation_id = ConversationId::parse(row.get_ref(0)?.as_str()?).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let trigger = Trigger::parse(row.get_ref(4)?.as_str()?).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let init_json: String = row.get(6)?;
    Ok((
        ConversationMeta {
            conversation_id,
            title: row.get(1)?,
            created_at: row.get(2)?,
            last_updated_at: row.get(3)?,
            trigger,
            owner: row.get(5)?,
            init: InitData::default(),
        },
        init_json,
    ))
}

fn read_get(conn: &mut Connection, id: &str) -> Result<Option<ConversationRecord>, StoreError> {
    // One read transaction: the metadata and next_event_id come from the same snapshot.
    let tx = conn.transaction().map_err(io_error)?;
    let row = tx
        .prepare_cached(sql::GET)
        .and_then(|mut s| {
            s.query_row(params![id], |r| {
                Ok((meta_from_row(r)?, r.get::<_, i64>(7)?, r.get::<_, i64>(8)?))
            })
            .optional()
        })
        .map_err(io_error)?;
    let Some((row, seq, bytes)) = row else {
        return Ok(None);
    };
    let meta = decode_init(row)?;
    let next_event_id = next_after(id, last_event_id(&tx, seq).map_err(io_error)?)?;
    Ok(Some(ConversationRecord {
        meta,
        next_event_id,
        bytes: u64::try_from(bytes).unwrap_or(0),
    }))
}

fn read_list(
    conn: &Connection,
    offset: usize,
    limit: usize,
) -> Result<Vec<ConversationMeta>, StoreError> {
    read_metas(
        conn,
        sql::LIST,
        params![sql_count(limit), sql_count(offset)],
    )
}

fn read_list_owned(
    conn: &Connection,
    owner: &str,
    offset: usize,
    limit: usize,
) -> Result<Vec<ConversationMeta>, StoreError> {
    let page = params![owner, sql_count(limit), sql_count(offset)];
    read_metas(conn, sql::LIST_OWNED, page)
}

/// The conversations a listing statement selects.
fn read_metas(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<ConversationMeta>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(io_error)?;
    let rows = stmt.query_map(params, meta_from_row).map_err(io_error)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(decode_init(row.map_err(io_error)?)?);
    }
    Ok(out)
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        name: row.get(0)?,
        admin: row.get(1)?,
        created_at: row.get(2)?,
    })
}

fn read_keys(conn: &Connection) -> Result<Vec<ApiKey>, StoreError> {
    let mut stmt = conn.prepare_cached(sql::LIST_KEYS).map_err(io_error)?;
    let rows = stmt.query_map([], key_from_row).map_err(io_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(io_error)
}

fn read_lookup_key(conn: &Connection, hash: Option<&str>) -> Result<KeyLookup, StoreError> {
    let key = match hash {
        Some(hash) => conn
            .prepare_cached(sql::KEY_BY_HASH)
            .and_then(|mut s| s.query_row(params![hash], key_from_row).optional())
            .map_err(io_error)?,
        None => None,
    };
    let any = key.is_some()
        || conn
            .prepare_cached(sql::ANY_KEY)
            .and_then(|mut s| s.query_row([], |r| r.get::<_, bool>(0)))
            .map_err(io_error)?;
    Ok(KeyLookup { key, any })
}

fn read_events(conn: &Connection, id: &str, q: EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
    let Some((start, end, limit)) = event_range(&q) else {
        return Ok(Vec::new());
    };
    let sql = if q.reverse {
        sql::EVENTS_NEWEST_FIRST
    } else {
        sql::EVENTS_OLDEST_FIRST
    };
    let mut stmt = conn.prepare_cached(sql).map_err(io_error)?;
    let rows = stmt
        .query_map(params![id, start, end, limit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(io_error)?;
    let mut out = Vec::new();
    for row in rows {
        let (event_id, json) = row.map_err(io_error)?;
        out.push(StoredEvent {
            id: stored_event_id(id, event_id)?,
            json: json.into(),
        });
    }
    Ok(out)
}
