//! Whether any user key exists, answered on the caller's thread without a trip to a reader.
//!
//! With no session key configured, every `/api` request asks the store whether a user key
//! exists (authentication is off only while none does). The answer is kept beside the
//! WAL-index header that SQLite keeps in the database's shared-memory file (`<db>-shm`, whose
//! layout is part of SQLite's documented file format: <https://www.sqlite.org/walformat.html>,
//! "The WAL-Index Header"): every commit, by any connection of any process — this server's
//! writer, or a `switchboard keys` command beside it — rewrites that header with a higher change
//! counter, so an unchanged header proves that nothing was committed since and the cached answer
//! still holds, and a changed one makes the call read `api_keys` again. Either way the answer
//! reflects every commit completed before the call: a key added or revoked beside a running
//! server counts from the next request on, exactly as with a read per request.
//!
//! Looking at the header is one `pread` of 96 bytes: no read transaction, so none of SQLite's
//! file locks (a read transaction takes and drops them with `fcntl` calls, which serialise on
//! the kernel's lock list). SQLite writes the header's second copy, then its first; reading
//! the first, then the second, and accepting them only when they agree is how SQLite itself
//! reads it, so a read torn by a concurrent commit is never taken for an unchanged header (it
//! just makes the call read `api_keys`). When the file cannot be read the call reads `api_keys`
//! every time. The connection never waits for a lock (a busy database makes the caller ask a
//! reader thread instead).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::Connection;

use super::sql;

/// The bytes of one copy of the WAL-index header.
const HEADER_BYTES: usize = 48;

/// Offset of the `isInit` byte in a copy of the header (0 until SQLite has written it).
const IS_INIT: usize = 12;

/// One copy of the WAL-index header, as read.
type Header = [u8; HEADER_BYTES];

/// The connection that watches `api_keys`, and what it saw last: the WAL-index header and
/// whether a key existed then.
pub(super) struct KeyWatch {
    watched: Mutex<Watched>,
}

struct Watched {
    conn: Connection,
    /// The database's shared-memory file; `None` when it could not be opened.
    shm: Option<File>,
    seen: Option<(Header, bool)>,
}

impl KeyWatch {
    /// Watches the database at `path` through `conn`, a read-only connection to it; the
    /// connection is made to fail at once rather than wait when the database is locked.
    pub(super) fn new(path: &Path, conn: Connection) -> rusqlite::Result<KeyWatch> {
        conn.busy_timeout(std::time::Duration::ZERO)?;
        let mut shm_path = path.as_os_str().to_owned();
        shm_path.push("-shm");
        let shm = match File::open(&shm_path) {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(path = ?shm_path, error = %e, "cannot read the database's shared-memory file; checking for user keys with a read per request");
                None
            }
        };
        Ok(KeyWatch {
            watched: Mutex::new(Watched {
                conn,
                shm,
                seen: None,
            }),
        })
    }

    /// Whether the database holds any user key, as of every commit completed before the
    /// call. `Err` when SQLite could not say at once (the caller asks a reader instead).
    pub(super) fn any_key(&self) -> rusqlite::Result<bool> {
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        let header = watched.shm.as_ref().and_then(read_header);
        if let (Some(header), Some((seen, any))) = (header, watched.seen) {
            if header == seen {
                return Ok(any);
            }
        }
        // Read after the header: it sees at least that header's state, so pairing the two is
        // safe (a commit in between only makes the next call read again).
        let any: bool = watched
            .conn
            .prepare_cached(sql::ANY_KEY)?
            .query_row([], |r| r.get(0))?;
        watched.seen = header.map(|header| (header, any));
        Ok(any)
    }
}

/// The WAL-index header as of now, or `None` when the two copies disagree (a commit is
/// rewriting them), SQLite has not written it yet, or the file cannot be read.
fn read_header(shm: &File) -> Option<Header> {
    let mut both = [0u8; 2 * HEADER_BYTES];
    shm.read_exact_at(&mut both, 0).ok()?;
    let (first, second) = both.split_at(HEADER_BYTES);
    if first != second || first[IS_INIT] == 0 {
        return None;
    }
    first.try_into().ok()
}

#[cfg(test)]
mod tests {
    use rusqlite::params;

    use super::super::open::{open_connection, prepare_database};
    use super::super::DB_FILE_NAME;
    use super::*;

    /// Every commit of another connection (the store's writer, or another process's) is seen
    /// by the next call; unrelated writes leave the answer as it was.
    #[test]
    fn sees_every_commit_of_another_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        let writer = open_connection(&path, false).expect("open");
        prepare_database(&path, &writer).expect("prepare");
        let watch =
            KeyWatch::new(&path, open_connection(&path, true).expect("open")).expect("watch");
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
        // The answer is kept beside the header it was read under (the shared-memory file is
        // readable), so an unchanged header answers without a read.
        let seen = watch.watched.lock().expect("lock").seen;
        assert!(matches!(seen, Some((_, false))), "no header cached");
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

    /// A header whose two copies disagree (a commit rewriting it), or that SQLite has not
    /// written yet, is never taken for one seen before.
    #[test]
    fn torn_or_unwritten_headers_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shm");
        let header = |fill: u8, init: u8| {
            let mut h = [fill; HEADER_BYTES];
            h[IS_INIT] = init;
            h
        };
        let read = |first: Header, second: Header| {
            std::fs::write(&path, [first, second].concat()).expect("write");
            read_header(&File::open(&path).expect("open"))
        };
        assert_eq!(read(header(7, 1), header(7, 1)), Some(header(7, 1)));
        assert_eq!(read(header(7, 1), header(8, 1)), None);
        assert_eq!(read(header(7, 0), header(7, 0)), None);
        std::fs::write(&path, [1u8; 10]).expect("write");
        assert_eq!(read_header(&File::open(&path).expect("open")), None);
    }
}
