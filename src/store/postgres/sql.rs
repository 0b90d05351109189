//! Every statement the PostgreSQL store runs (opening prepares each one, so a schema that does
//! not match is refused at start).

/// The columns `meta_from_row` reads, in its order.
macro_rules! meta_columns {
    () => {
        r#"id, title, created_at, last_updated_at, "trigger", owner, init_json"#
    };
}

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
/// Up to `$1` conversations held under a registration that expired or is gone (a node that
/// died, or was fenced, holding them), with their owners, in random order (so that nodes
/// sweeping at once spread them).
pub const ORPHANED: &str = "SELECT o.conversation_id, c.owner FROM ownership o \
     JOIN conversations c ON c.id = o.conversation_id \
     WHERE o.node_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM cluster_nodes n \
     WHERE n.node_id = o.node_id AND n.incarnation = o.incarnation AND n.expires_at > now()) \
     ORDER BY random() LIMIT $1";
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
    ORPHANED,
    RELEASE,
    RELEASE_UNKNOWN,
];
