//! Every statement the SQLite store's threads run (the plan tests in `super` check these very
//! texts), and the one query the writer and the readers share.

use rusqlite::{params, Connection, OptionalExtension};

/// The columns `meta_from_row` reads, in its order.
macro_rules! meta_columns {
    () => {
        r#"id, title, created_at, last_updated_at, "trigger", owner, init_json"#
    };
}

/// `?1` id → seq, through `conversations_by_id`.
pub(super) const SEQ_BY_ID: &str = "SELECT seq FROM conversations WHERE id = ?1";
pub(super) const CREATE: &str = concat!(
    "INSERT INTO conversations (",
    meta_columns!(),
    ", bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING"
);
pub(super) const SET_TITLE: &str =
    "UPDATE conversations SET title = ?2, last_updated_at = ?3 WHERE id = ?1";
/// `?1` seq: `?2` the new `last_updated_at`, `?3` bytes appended.
pub(super) const TOUCH: &str =
    "UPDATE conversations SET last_updated_at = ?2, bytes = bytes + ?3 WHERE seq = ?1";
/// `?1` seq → the bytes the conversation holds.
pub(super) const BYTES: &str = "SELECT bytes FROM conversations WHERE seq = ?1";
pub(super) const INSERT_EVENT: &str = "INSERT INTO events (conv_seq, id, json) VALUES (?1, ?2, ?3)";
pub(super) const LAST_EVENT_ID: &str =
    "SELECT id FROM events WHERE conv_seq = ?1 ORDER BY id DESC LIMIT 1";
pub(super) const DELETE_EVENTS: &str = "DELETE FROM events WHERE conv_seq = ?1";
pub(super) const DELETE_CONVERSATION: &str = "DELETE FROM conversations WHERE seq = ?1";
/// `?1` id → its owner (one lookup in `conversations_by_id`); no row when it does not exist.
pub(super) const EXISTS: &str = "SELECT owner FROM conversations WHERE id = ?1";
/// `?1` id → the metadata columns, then seq and bytes.
pub(super) const GET: &str = concat!(
    "SELECT ",
    meta_columns!(),
    ", seq, bytes FROM conversations WHERE id = ?1"
);
/// `?1` limit, `?2` offset.
pub(super) const LIST: &str = concat!(
    "SELECT ",
    meta_columns!(),
    " FROM conversations ORDER BY created_at DESC, id DESC LIMIT ?1 OFFSET ?2"
);
/// A range of one conversation's events: `?1` conversation id, `?2`..=`?3` event ids, `?4`
/// limit.
pub(super) const EVENTS_OLDEST_FIRST: &str = "SELECT id, json FROM events \
     WHERE conv_seq = (SELECT seq FROM conversations WHERE id = ?1) \
     AND id BETWEEN ?2 AND ?3 ORDER BY id ASC LIMIT ?4";
pub(super) const SETTINGS: &str = "SELECT json FROM settings WHERE user_id = ?1";
pub(super) const SAVE_SETTINGS: &str = "INSERT INTO settings (user_id, json) VALUES (?1, ?2) \
     ON CONFLICT (user_id) DO UPDATE SET json = excluded.json";
/// As [`EVENTS_OLDEST_FIRST`], newest first.
pub(super) const EVENTS_NEWEST_FIRST: &str = "SELECT id, json FROM events \
     WHERE conv_seq = (SELECT seq FROM conversations WHERE id = ?1) \
     AND id BETWEEN ?2 AND ?3 ORDER BY id DESC LIMIT ?4";
/// `?1` owner, `?2` limit, `?3` offset.
pub(super) const LIST_OWNED: &str = concat!(
    "SELECT ",
    meta_columns!(),
    " FROM conversations WHERE owner = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2 OFFSET ?3"
);
pub(super) const KEY_EXISTS: &str = "SELECT 1 FROM api_keys WHERE name = ?1";
pub(super) const ADD_KEY: &str =
    "INSERT INTO api_keys (name, hash, admin, created_at) VALUES (?1, ?2, ?3, ?4)";
pub(super) const REVOKE_KEY: &str = "DELETE FROM api_keys WHERE name = ?1";
pub(super) const LIST_KEYS: &str = "SELECT name, admin, created_at FROM api_keys ORDER BY name";
pub(super) const KEY_BY_HASH: &str = "SELECT name, admin, created_at FROM api_keys WHERE hash = ?1";
pub(super) const ANY_KEY: &str = "SELECT EXISTS (SELECT 1 FROM api_keys)";
/// The database's pages in use: its size in pages without its free pages.
pub(super) const PAGES_IN_USE: &str = "SELECT p.page_count - f.freelist_count \
     FROM pragma_page_count() AS p, pragma_freelist_count() AS f";

/// The largest event id of a conversation; one primary-key seek.
pub(super) fn last_event_id(conn: &Connection, seq: i64) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(LAST_EVENT_ID)?
        .query_row(params![seq], |r| r.get(0))
        .optional()
}
