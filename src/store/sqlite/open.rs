//! Opening the SQLite database: the connection settings (WAL, `synchronous=NORMAL`), the
//! checks that refuse a file that is not a healthy switchboard database, and the schema
//! migrations. Runs once, at [`SqliteStore::open`](super::SqliteStore::open), before any
//! store thread starts.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::{open_caused, open_error, open_failed};
use crate::store::StoreError;

/// `PRAGMA application_id` of a switchboard database ("SWBD"); tells our files from other
/// programs' SQLite files.
const APPLICATION_ID: i32 = 0x5357_4244;

/// Schema migrations: step `i` takes the database from `user_version` `i` to `i + 1`. Each step
/// runs in its own transaction together with the `user_version` bump. Only ever append here.
///
/// Layout: conversation ids may be anything a client chose, so nothing that grows per
/// conversation is keyed by them except the one small unique index that maps an id to its
/// `seq` (the ids the server generates are time-ordered UUIDv7s, which land at that index's
/// right edge too; a client's random ids land on random leaves). `seq` is an
/// integer given in creation order (SQLite's rowid: `max + 1`), and the conversation rows, the
/// listing index (created_at grows with time) and the events (keyed by `(conv_seq, id)`) all
/// grow at the right edge of their B-trees: a group commit of `n` new conversations dirties a
/// handful of shared pages there (plus up to `n` leaves of `conversations_by_id` for random
/// client-chosen ids), instead of `n` random leaves in every tree. (Version 1 was never
/// released in another shape; it was rewritten in place rather than migrated.)
const MIGRATIONS: &[&str] = &[
    // 1: conversations and their event logs.
    r#"
    CREATE TABLE conversations (
        seq             INTEGER PRIMARY KEY,
        id              TEXT NOT NULL,
        title           TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        last_updated_at TEXT NOT NULL,
        "trigger"       TEXT NOT NULL,
        owner           TEXT,
        init_json       TEXT NOT NULL
    );
    CREATE UNIQUE INDEX conversations_by_id ON conversations (id);
    -- Ascending, so that new conversations land at its right edge; `list` walks it backwards.
    CREATE INDEX conversations_by_created_at ON conversations (created_at, id);
    CREATE TABLE events (
        conv_seq INTEGER NOT NULL,
        id       INTEGER NOT NULL,
        json     TEXT NOT NULL,
        PRIMARY KEY (conv_seq, id)
    ) WITHOUT ROWID;
    "#,
    // 2: the app settings (`GET`/`POST /api/settings`), one JSON document per user.
    r#"
    CREATE TABLE settings (
        user_id TEXT PRIMARY KEY NOT NULL,
        json    TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 3: the bytes each conversation holds against `limits.max_bytes_per_conversation`: its
    // init data and its events' JSON, in bytes.
    r#"
    ALTER TABLE conversations ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE conversations SET bytes = length(CAST(init_json AS BLOB)) + coalesce(
        (SELECT sum(length(CAST(json AS BLOB))) FROM events WHERE conv_seq = conversations.seq),
        0);
    "#,
    // 4: user keys (only their SHA-256, see `crate::keys`), and each owner's conversations
    // in listing order.
    r#"
    CREATE TABLE api_keys (
        name       TEXT PRIMARY KEY NOT NULL,
        hash       TEXT NOT NULL UNIQUE,
        admin      INTEGER NOT NULL,
        created_at TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX conversations_by_owner ON conversations (owner, created_at, id);
    "#,
];

/// The tables and indexes this build uses; `open` refuses a file that lacks one.
const SCHEMA_OBJECTS: &[(&str, &str)] = &[
    ("table", "conversations"),
    ("table", "events"),
    ("table", "settings"),
    ("table", "api_keys"),
    ("index", "conversations_by_id"),
    ("index", "conversations_by_created_at"),
    ("index", "conversations_by_owner"),
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Up to this file size, `open` runs `PRAGMA quick_check` (which reads every page: tens of
/// milliseconds here). Bigger files get the cheap structural checks only, so that startup time
/// does not grow with the amount of history; corruption in a page they do not read is still
/// reported (as [`StoreError::Io`]) by the first operation that touches it, never hidden.
pub const QUICK_CHECK_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens one connection and sets it up.
///
/// Durability: WAL with `synchronous=NORMAL`. A commit appends its pages to the `-wal` file with
/// `write()`; once that returns, the data sits in the operating system's page cache, which the
/// death of *this process* (`kill -9`, a panic, OOM kill) cannot lose — the next open replays the
/// WAL. What NORMAL gives up compared with FULL is an `fsync` per commit, i.e. the last commits
/// before an operating-system crash or power loss may roll back (the database stays consistent
/// either way). That is the durability switchboard promises, at a fraction of FULL's cost.
pub(super) fn open_connection(path: &Path, reader: bool) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| open_caused(path, format!("cannot open the database file: {e}"), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| open_failed(path, e))?;
    // The first statement reads the header: this is where a file that is not a database fails.
    let _: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| describe_open_failure(path, e))?;
    if conn
        .is_readonly(rusqlite::DatabaseName::Main)
        .map_err(|e| open_failed(path, e))?
    {
        return Err(open_error(
            path,
            "the database file is read-only; switchboard needs to write it",
        ));
    }
    if reader {
        conn.pragma_update(None, "query_only", true)
            .map_err(|e| open_failed(path, e))?;
    } else {
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| describe_open_failure(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_error(
                path,
                format_args!(
                    "cannot switch the database to WAL mode (journal mode stays {mode:?}); \
                     is the file on a filesystem without shared-memory support?"
                ),
            ));
        }
    }
    // See above: NORMAL is durable across process crashes in WAL mode.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| open_failed(path, e))?;
    // SQLite's default page cache (2 MiB) and no memory map, on evidence: a 16 MiB cache made no
    // measurable difference even with 200,000 conversations, and `mmap_size` made the writer
    // slower (a page read through the map is wrapped anew on every fetch; the writer fetches the
    // same hot pages over and over).
    Ok(conn)
}

/// Turns an error met while first reading the file into a message a person can act on.
fn describe_open_failure(path: &Path, e: rusqlite::Error) -> StoreError {
    let what = match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => format!(
            "is not a SQLite database ({e}); refusing to start on top of it. \
             Move the file away or point data_dir elsewhere"
        ),
        Some(ErrorCode::DatabaseCorrupt) => format!(
            "the database is corrupt ({e}); refusing to start. \
             Restore it from a backup or move it away"
        ),
        Some(ErrorCode::CannotOpen) | Some(ErrorCode::PermissionDenied) => {
            format!("cannot open the database file ({e}); check the path and permissions")
        }
        Some(ErrorCode::ReadOnly) => {
            format!("the database is read-only ({e}); switchboard needs to write it")
        }
        _ => e.to_string(),
    };
    open_caused(path, what, e)
}

/// Checks that the file is a healthy switchboard database and migrates it to
/// [`SCHEMA_VERSION`]. Runs on the write connection before any thread starts.
pub(super) fn prepare_database(path: &Path, conn: &Connection) -> Result<(), StoreError> {
    let fail = |e: rusqlite::Error| describe_open_failure(path, e);
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(fail)?;
    if version > SCHEMA_VERSION {
        return Err(open_error(
            path,
            format_args!(
                "the database has schema version {version}, but this build of switchboard only \
                 knows versions up to {SCHEMA_VERSION}; it was written by a newer switchboard. \
                 Upgrade switchboard (or use another data_dir) — refusing to open it"
            ),
        ));
    }
    let app_id: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(fail)?;
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(open_error(
            path,
            format_args!(
                "is another program's SQLite database (application_id {app_id:#x}); \
                 refusing to use it"
            ),
        ));
    }
    // Reading the schema parses every CREATE statement: a damaged first page or schema shows
    // up here.
    let objects: Vec<String> = {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
            .map_err(fail)?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(fail)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        names
    };
    if version == 0 && !objects.is_empty() {
        return Err(open_error(
            path,
            format_args!(
                "holds tables that are not switchboard's ({}); refusing to use it",
                objects.join(", ")
            ),
        ));
    }

    if version == 0 && objects.is_empty() {
        // Before the first table: deletes give their pages back (see `Writer::reclaim`).
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(fail)?;
    }

    // Pages: full check while that is cheap, see QUICK_CHECK_MAX_BYTES.
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size <= QUICK_CHECK_MAX_BYTES {
        let verdict: String = conn
            .pragma_query_value(None, "quick_check", |r| r.get(0))
            .map_err(fail)?;
        if verdict != "ok" {
            // The verdict can list thousands of damaged pages; the first few lines tell enough.
            let mut verdict: String = verdict.lines().take(4).collect::<Vec<_>>().join("; ");
            if verdict.len() > 400 {
                let cut = (0..=400)
                    .rev()
                    .find(|&i| verdict.is_char_boundary(i))
                    .unwrap_or(0);
                verdict.truncate(cut);
                verdict.push_str("...");
            }
            return Err(open_error(
                path,
                format_args!(
                    "the database is corrupt (quick_check: {verdict}); refusing to start. \
                     Restore it from a backup or move it away"
                ),
            ));
        }
    }

    migrate(path, conn)?;
    enable_incremental_vacuum(path, conn);

    // The tables and indexes this build uses must exist (a damaged or hand-edited schema is
    // refused here rather than failing on the first request).
    for (kind, name) in SCHEMA_OBJECTS {
        let found: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = ?1 AND name = ?2",
                params![kind, name],
                |r| r.get(0),
            )
            .optional()
            .map_err(fail)?;
        if found.is_none() {
            return Err(open_error(
                path,
                format_args!(
                    "the schema is damaged: {kind} {name} is missing at schema version \
                     {SCHEMA_VERSION}; refusing to start"
                ),
            ));
        }
    }
    // Compile the hot statements' shapes (a column missing from a table fails here) and touch
    // the roots of the trees they use.
    let probes = [
        concat!(
            "SELECT seq, ",
            meta_columns!(),
            " FROM conversations ORDER BY created_at DESC, id DESC LIMIT 1"
        ),
        "SELECT seq FROM conversations WHERE id = ''",
        "SELECT conv_seq, id, json FROM events LIMIT 1",
        "SELECT bytes FROM conversations LIMIT 1",
    ];
    for sql in probes {
        let mut stmt = conn.prepare(sql).map_err(|e| {
            open_caused(
                path,
                format!(
                    "the schema does not match schema version {SCHEMA_VERSION} ({e}); \
                     refusing to start. Move the file away or point data_dir elsewhere"
                ),
                e,
            )
        })?;
        stmt.query_row([], |_| Ok(())).optional().map_err(fail)?;
    }
    Ok(())
}

/// Converts a database created without incremental auto-vacuum (before schema version 3): its
/// `auto_vacuum` mode can only change with a `VACUUM`, which rewrites the file once (it needs
/// about the file's size in free disk space for a moment). If that fails the database works as
/// before, deletes leaving free pages inside the file for later writes; the next start tries
/// again.
fn enable_incremental_vacuum(path: &Path, conn: &Connection) {
    const INCREMENTAL: i64 = 2;
    let mode = conn.pragma_query_value(None, "auto_vacuum", |r| r.get::<_, i64>(0));
    if mode.is_ok_and(|m| m == INCREMENTAL) {
        return;
    }
    tracing::info!(path = %path.display(), "converting the database to incremental auto-vacuum (a one-time VACUUM)");
    let converted = conn
        .pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .and_then(|()| conn.execute_batch("VACUUM"));
    if let Err(e) = converted {
        tracing::warn!(path = %path.display(), error = %e, "cannot convert the database to incremental auto-vacuum; deleted conversations' space stays inside the file");
    }
}

/// Applies the pending [`MIGRATIONS`], each in one transaction with its version bump.
fn migrate(path: &Path, conn: &Connection) -> Result<(), StoreError> {
    loop {
        // IMMEDIATE takes the write lock first, so the version read below cannot be raced by
        // another process migrating the same file.
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| describe_open_failure(path, e))?;
        let step = (|| -> Result<bool, StoreError> {
            let version: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(|e| describe_open_failure(path, e))?;
            let Some(sql) = usize::try_from(version)
                .ok()
                .and_then(|v| MIGRATIONS.get(v))
            else {
                return Ok(false);
            };
            let next = version + 1;
            let fail = |e: rusqlite::Error| {
                open_caused(
                    path,
                    format!("migrating the schema from version {version} to {next} failed: {e}"),
                    e,
                )
            };
            conn.execute_batch(sql).map_err(fail)?;
            conn.pragma_update(None, "user_version", next)
                .map_err(fail)?;
            conn.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(fail)?;
            tracing::info!(path = %path.display(), from = version, to = next, "migrated store schema");
            Ok(true)
        })();
        match step {
            Ok(true) => conn
                .execute_batch("COMMIT")
                .map_err(|e| describe_open_failure(path, e))?,
            Ok(false) => {
                conn.execute_batch("COMMIT")
                    .map_err(|e| describe_open_failure(path, e))?;
                return Ok(());
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
}
