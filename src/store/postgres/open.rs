//! Opening the PostgreSQL store's database: the schema's versioned migrations, applied once
//! under an advisory lock, and the check that every statement fits the schema.

use super::*;

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

/// Connects, migrates the schema to [`SCHEMA_VERSION`] and checks that every statement the store
/// runs fits it; returns the connection the writer keeps and the bytes the conversations hold.
/// The error is what to tell the operator.
pub(super) async fn prepare_database(pool: &Pool) -> Result<(Object, u64), Failure> {
    let mut conn = pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => Failure::caused(
            format!(
                "cannot connect ({}); is PostgreSQL running there and the URL right?",
                postgres_message(&e)
            ),
            e,
        ),
        other => Failure::caused(format!("cannot connect ({other})"), other),
    })?;
    if let Err(e) = migrate(&mut conn).await {
        // The migration's transaction may still be open on this connection: never reuse it.
        let _ = Object::take(conn);
        return Err(e);
    }
    for statement in sql::ALL {
        conn.prepare_cached(statement).await.map_err(|e| {
            Failure::caused(
                format!(
                    "the schema does not match schema version {SCHEMA_VERSION} ({}); refusing \
                     to start. Point [postgres] url at another database",
                    postgres_message(&e)
                ),
                e,
            )
        })?;
    }
    let in_use: i64 = conn
        .query_one(sql::USED, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| postgres_failure(e).within("cannot read the bytes in use"))?;
    Ok((conn, u64::try_from(in_use).unwrap_or(0)))
}

/// Applies the pending [`MIGRATIONS`] in one transaction, under [`MIGRATION_LOCK`].
async fn migrate(conn: &mut Object) -> Result<(), Failure> {
    let fail = |e: tokio_postgres::Error| postgres_failure(e).within("preparing the schema failed");
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
                )
                .into());
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
        )
        .into());
    }
    let from = version;
    for (step, migration) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let next = step as i64 + 1;
        tx.batch_execute(migration).await.map_err(|e| {
            postgres_failure(e).within(format_args!(
                "migrating the schema from version {step} to {next} failed"
            ))
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
