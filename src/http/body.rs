//! Request bodies: bounded in size, in time, and in the memory all unfinished ones hold.
//!
//! [`BodyLimits::check`] runs before routing. A declared `Content-Length` over the route's limit
//! ([`BodyLimits::limit_for`]: [`upload_body_limit`] for file uploads, `limits.max_body_bytes`
//! for everything else) is refused with 413 before a byte of the body is
//! read (with
//! `Expect: 100-continue` too; the HTTP layer sends its interim `100 Continue` first, and the 413
//! right after it). Any other body is wrapped so that it
//! - must arrive in full within `limits.body_timeout_secs` of the request head, or the reader
//!   gets [`BodyError::Timeout`] (408, the connection is closed, the bytes are freed);
//! - is charged, chunk by chunk, against one budget of `limits.max_pending_body_bytes` shared by
//!   every connection, and released when it ends or is dropped; a chunk that would exceed it
//!   gets [`BodyError::Busy`] (503 with `Retry-After`).
//!
//! WebSocket upgrades carry no body and are left alone: their stream is the socket.

use futures_util::StreamExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::dev::{Payload, ServiceRequest};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::web::Bytes;
use futures_util::Stream;

use crate::config::Settings;
use crate::http::ApiError;

/// The last segment of the one route that takes files (`workspace.max_upload_bytes`).
pub const UPLOAD_ROUTE_SUFFIX: &str = "/upload-files";

/// The largest upload request body: `workspace.max_upload_bytes` of files plus room for the
/// multipart framing (64 KiB, and 1 KiB per file), so that the route itself answers an upload
/// whose files are too large, in its own words.
pub fn upload_body_limit(workspace: &crate::config::WorkspaceSettings) -> usize {
    workspace
        .max_upload_bytes
        .saturating_add(64 * 1024)
        .saturating_add(workspace.max_upload_files.saturating_mul(1024))
}

/// Why a body stopped arriving, carried inside the payload's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body did not arrive within {0} s")]
    Timeout(u64),
    #[error("too many request bodies are arriving at once")]
    Busy,
}

impl BodyError {
    /// The body error inside a payload error, if it is one of ours.
    pub fn of(error: &PayloadError) -> Option<BodyError> {
        match error {
            PayloadError::Io(e) => e.get_ref()?.downcast_ref::<BodyError>().copied(),
            _ => None,
        }
    }

    fn into_payload_error(self) -> PayloadError {
        PayloadError::Io(std::io::Error::other(self))
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::Timeout(secs) => ApiError::BodyTimeout(secs),
            BodyError::Busy => ApiError::BodiesBusy,
        }
    }
}

/// The body limits and the one budget every connection shares.
#[derive(Debug)]
pub struct BodyLimits {
    max_body: usize,
    max_upload: usize,
    timeout: Duration,
    timeout_secs: u64,
    budget: Arc<Budget>,
}

#[derive(Debug)]
struct Budget {
    max: usize,
    pending: AtomicUsize,
}

impl Budget {
    /// Takes `n` bytes from the budget, or nothing if they do not fit.
    fn charge(&self, n: usize) -> bool {
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                pending.checked_add(n).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.pending.fetch_sub(n, Ordering::AcqRel);
    }
}

impl BodyLimits {
    pub fn new(settings: &Settings) -> BodyLimits {
        let limits = &settings.limits;
        BodyLimits {
            max_body: limits.max_body_bytes,
            max_upload: upload_body_limit(&settings.workspace),
            timeout: Duration::from_secs(limits.body_timeout_secs),
            timeout_secs: limits.body_timeout_secs,
            budget: Arc::new(Budget {
                max: limits.max_pending_body_bytes,
                pending: AtomicUsize::new(0),
            }),
        }
    }

    /// The largest body a request to `path` may carry.
    pub fn limit_for(&self, path: &str) -> usize {
        if path.ends_with(UPLOAD_ROUTE_SUFFIX) {
            self.max_upload
        } else {
            self.max_body
        }
    }

    /// Bytes held by bodies still arriving right now.
    pub fn pending_bytes(&self) -> usize {
        self.budget.pending.load(Ordering::Acquire)
    }

    /// Refuses a body declared too large; bounds any other body in time and memory.
    pub fn check(&self, req: &mut ServiceRequest) -> Result<(), ApiError> {
        let headers = req.headers();
        let declared = match headers.get(header::CONTENT_LENGTH) {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| ApiError::BadRequest("Invalid Content-Length".into()))?,
            ),
            None => None,
        };
        let limit = self.limit_for(req.path());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        let chunked = headers.contains_key(header::TRANSFER_ENCODING);
        let upgrade = headers.contains_key(header::UPGRADE);
        if upgrade || !(chunked || declared.is_some_and(|n| n > 0)) {
            return Ok(());
        }
        let (_, payload) = req.parts_mut();
        let inner = std::mem::replace(payload, Payload::None);
        let guarded = Guarded {
            inner,
            deadline: Box::pin(actix_web::rt::time::sleep(self.timeout)),
            timeout_secs: self.timeout_secs,
            budget: self.budget.clone(),
            charged: 0,
            done: false,
        };
        req.set_payload(Payload::from(
            Box::pin(guarded) as actix_http::BoxedPayloadStream
        ));
        Ok(())
    }
}

/// A request body under a deadline and the shared budget.
struct Guarded {
    inner: Payload,
    deadline: Pin<Box<actix_web::rt::time::Sleep>>,
    timeout_secs: u64,
    budget: Arc<Budget>,
    charged: usize,
    done: bool,
}

impl Guarded {
    fn finish(&mut self) {
        self.done = true;
        self.budget.release(std::mem::take(&mut self.charged));
        self.inner = Payload::None;
    }

    fn fail(&mut self, error: BodyError) -> Poll<Option<Result<Bytes, PayloadError>>> {
        self.finish();
        Poll::Ready(Some(Err(error.into_payload_error())))
    }
}

impl Stream for Guarded {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // The deadline first: a client trickling bytes must not keep it from firing.
        if this.deadline.as_mut().poll(cx).is_ready() {
            return this.fail(BodyError::Timeout(this.timeout_secs));
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if !this.budget.charge(chunk.len()) {
                    return this.fail(BodyError::Busy);
                }
                this.charged += chunk.len();
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.budget.release(std::mem::take(&mut self.charged));
    }
}

/// Reads a request body of at most `limit` bytes: 413 over it, 408 when it does not arrive in
/// time, 503 when too many bodies are arriving at once (see [`crate::http::body`]).
pub async fn read_body(
    mut payload: actix_web::web::Payload,
    limit: usize,
) -> Result<actix_web::web::BytesMut, ApiError> {
    let mut body = actix_web::web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match crate::http::body::BodyError::of(&e) {
            Some(why) => ApiError::from(why),
            None => ApiError::BadRequest(format!("Could not read body: {e}")),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_never_goes_over_and_is_returned() {
        let budget = Budget {
            max: 10,
            pending: AtomicUsize::new(0),
        };
        assert!(budget.charge(6));
        assert!(!budget.charge(5));
        assert!(budget.charge(4));
        budget.release(6);
        assert!(budget.charge(5));
        budget.release(9);
        assert_eq!(budget.pending.load(Ordering::Acquire), 0);
    }

    #[test]
    fn uploads_have_their_own_limit() {
        let mut settings = Settings::defaults();
        settings.limits.max_body_bytes = 100;
        settings.workspace.max_upload_bytes = 1000;
        settings.workspace.max_upload_files = 2;
        let limits = BodyLimits::new(&settings);
        assert_eq!(
            limits.limit_for("/api/conversations/abc/upload-files"),
            1000 + 64 * 1024 + 2 * 1024
        );
        assert_eq!(limits.limit_for("/api/conversations/abc/events"), 100);
        assert_eq!(limits.limit_for("/api/settings"), 100);
    }

    #[test]
    fn body_errors_survive_the_payload_error() {
        let e = BodyError::Timeout(3).into_payload_error();
        assert_eq!(BodyError::of(&e), Some(BodyError::Timeout(3)));
        assert_eq!(BodyError::of(&PayloadError::Overflow), None);
    }
}
