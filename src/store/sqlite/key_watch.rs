//! Whether any user key exists, answered on the caller's thread without a trip to a reader.
//!
//! With no session key configured, every `/api` request asks the store whether a user key
//! exists (authentication is off only while none does). The answer is kept beside the
//! database's `PRAGMA data_version` as this module's own read-only connection last saw it:
//! SQLite changes that number whenever *another* connection — this server's writer, or a
//! `switchboard keys` command beside it — commits, so an unchanged number proves the cached
//! answer still holds, and a changed one makes the next call read `api_keys` again. Either
//! way the answer reflects every commit completed before the call: a key added or revoked
//! beside a running server counts from the next request on, exactly as with a read per
//! request. Reading the number is a look at the WAL index in shared memory (no disk read,
//! no thread hop); the connection never waits for a lock (a busy database makes the caller
//! ask a reader thread instead).

use std::sync::Mutex;

use rusqlite::Connection;

use super::sql;

/// The connection that watches `api_keys`, and what it saw last: the data version and
/// whether a key existed then.
pub(super) struct KeyWatch {
    watched: Mutex<Watched>,
}

struct Watched {
    conn: Connection,
    seen: Option<(i64, bool)>,
}

impl KeyWatch {
    /// Watches through `conn`, a read-only connection to the store's database; it is made to
    /// fail at once rather than wait when the database is locked.
    pub(super) fn new(conn: Connection) -> rusqlite::Result<KeyWatch> {
        conn.busy_timeout(std::time::Duration::ZERO)?;
        Ok(KeyWatch {
            watched: Mutex::new(Watched { conn, seen: None }),
        })
    }

    /// Whether the database holds any user key, as of every commit completed before the
    /// call. `Err` when SQLite could not say at once (the caller asks a reader instead).
    pub(super) fn any_key(&self) -> rusqlite::Result<bool> {
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        let version: i64 = watched
            .conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        if let Some((seen, any)) = watched.seen {
            if seen == version {
                return Ok(any);
            }
        }
        // Read after the version: it sees at least that version's state, so pairing the two is
        // safe (a commit in between only makes the next call read again).
        let any: bool = watched
            .conn
            .prepare_cached(sql::ANY_KEY)?
            .query_row([], |r| r.get(0))?;
        watched.seen = Some((version, any));
        Ok(any)
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::params;

    use super::super::open::{open_connection, prepare_database};
    use super::super::DB_FILE_NAME;
    use super::*;

    /// Every commit of another connection (the store's writer, or another process's) is seen
    /// by the next call; the server's own unrelated writes keep the answer.
    #[test]
    fn sees_every_commit_of_another_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        let writer = open_connection(&path, false).expect("open");
        prepare_database(&path, &writer).expect("prepare");
        let watch = KeyWatch::new(open_connection(&path, true).expect("open")).expect("watch");
        let add = |name: &str| {
            writer
                .execute(
                    sql::ADD_KEY,
                    params![name, name, false, "2024-01-01T00:00:00.000000Z"],
                )
                .expect("add key");
        };
        let revoke = |name: &str| {
            writer
                .execute(sql::REVOKE_KEY, params![name])
                .expect("revoke key");
        };
        let create = |id: &str| {
            writer
                .execute(
                    sql::CREATE,
                    params![id, "t", "2024", "2024", "gui", None::<String>, "{}", 2],
                )
                .expect("create");
        };
        let any = || watch.any_key().expect("any key");
        assert!(!any());
        assert!(!any());
        add("alice");
        assert!(any());
        create("c1");
        assert!(any());
        add("bob");
        revoke("alice");
        assert!(any());
        create("c2");
        revoke("bob");
        assert!(!any());
        assert!(!any());
        add("carol");
        assert!(any());
    }
}
