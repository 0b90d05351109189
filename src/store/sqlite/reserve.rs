//! The disk reserve: space held next to the database so that deletes work on a full disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a reserve that could not be taken is tried again (besides after every delete).
const RESERVE_RETRY: Duration = Duration::from_secs(60);

/// Disk space held for deletes on a full disk: a file of `bytes` allocated (not sparse) bytes
/// next to the database. A write batch with a delete that fails gives it up and runs again —
/// the delete's transaction needs a little room in the WAL, and then gives pages back — and
/// the reserve is taken again once there is room.
pub(super) struct Reserve {
    path: PathBuf,
    bytes: u64,
    held: bool,
    /// When taking it last failed.
    missed: Option<std::time::Instant>,
}

impl Reserve {
    /// Takes the reserve (or removes a stale one when `bytes` is 0).
    pub(super) fn new(path: PathBuf, bytes: u64) -> Reserve {
        let mut reserve = Reserve {
            path,
            bytes,
            held: false,
            missed: None,
        };
        if bytes == 0 {
            reserve.held = true;
            let _ = std::fs::remove_file(&reserve.path);
        } else if !reserve.take() {
            tracing::warn!(
                path = %reserve.path.display(),
                bytes,
                "no room for the disk reserve; deletes on a full disk may fail until there is"
            );
        }
        reserve
    }

    /// Allocates the reserve unless it is held; false when the disk has no room for it.
    pub(super) fn take(&mut self) -> bool {
        if self.held {
            return true;
        }
        match allocate(&self.path, self.bytes) {
            Ok(()) => {
                self.held = true;
                self.missed = None;
                true
            }
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot take the disk reserve");
                let _ = std::fs::remove_file(&self.path);
                self.missed = Some(std::time::Instant::now());
                false
            }
        }
    }

    /// Not held, and the last try was long enough ago to try again ([`RESERVE_RETRY`]).
    pub(super) fn due(&self) -> bool {
        !self.held && self.missed.is_none_or(|at| at.elapsed() >= RESERVE_RETRY)
    }

    /// Gives the reserve's space back to the disk; false when there was none to give.
    pub(super) fn release(&mut self) -> bool {
        if !self.held || self.bytes == 0 {
            return false;
        }
        self.held = false;
        std::fs::remove_file(&self.path).is_ok()
    }
}

/// Makes `path` a file of exactly `bytes` allocated bytes.
fn allocate(path: &Path, bytes: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    if file.metadata()?.len() > bytes {
        file.set_len(bytes)?;
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(bytes)
            .map_err(|_| std::io::Error::other("the reserve is too large"))?;
        // SAFETY: `file` is open for writing; posix_fallocate only reads its arguments.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Written out, so that the blocks are really taken (a sparse file would take none).
        use std::io::Write;
        let mut file = file;
        let chunk = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        file.sync_all()
    }
}
