//! Following a request: its id, its span, its access log line and its duration metric.
//!
//! Every request gets an id: the client's `X-Request-Id` when it is sane (1–128 visible ASCII
//! characters), a fresh one otherwise. The id is echoed in the response's `X-Request-Id`, and
//! the handler runs inside a `request` span carrying it, so every log line the request causes
//! on its worker carries it without passing it by hand. When the response is ready one access
//! line is logged (target `access`: method, route pattern, status, duration, bytes, user) and
//! the request is counted in `switchboard_request_duration_seconds`. Probes (`/alive`,
//! `/health`, `/ready`, `/metrics`) log at debug level so that they do not drown the log.
//! No key ever reaches a log line: `user` is the caller's name as the key check found it
//! ([`crate::http::auth::Caller::log_name`]): a user key's user, `key` for the session key,
//! `anonymous` otherwise (also for requests refused or never checked, such as probes).

use std::time::Instant;

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::HttpMessage;
use tracing::Instrument;

use super::metrics::{method_label, metrics, HttpLabels};
use crate::http::auth::Caller;

/// The request id header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-chosen request id kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's id when it is 1–[`MAX_REQUEST_ID_LEN`] visible ASCII characters.
pub fn sane_request_id(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID_LEN
        && bytes.iter().all(|b| b.is_ascii_graphic());
    ok.then(|| value.to_str().ok()).flatten()
}

fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn is_probe(route: &str) -> bool {
    matches!(route, "/alive" | "/health" | "/ready" | "/metrics")
}

/// Who made the request, for the log: the caller its key check found, if any.
fn user(req: &actix_web::HttpRequest) -> String {
    req.extensions()
        .get::<Caller>()
        .map_or("anonymous", Caller::log_name)
        .to_string()
}

/// The middleware (wrap the whole `App` with `from_fn(observe)`).
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let id = match req.headers().get(REQUEST_ID).and_then(sane_request_id) {
        Some(id) => id.to_string(),
        None => new_request_id(),
    };
    let method = method_label(req.method());
    let span = tracing::info_span!("request", request_id = %id);
    let result = next.call(req).instrument(span.clone()).await;
    let took = started.elapsed();
    let _entered = span.enter();
    match result {
        Ok(mut res) => {
            let route = res
                .request()
                .match_pattern()
                .unwrap_or_else(|| "unmatched".to_string());
            let status = res.status().as_u16();
            let user = user(res.request());
            let user = user.as_str();
            if let Ok(value) = HeaderValue::from_str(&id) {
                res.headers_mut().insert(REQUEST_ID, value);
            }
            let bytes = match res.response().body().size() {
                BodySize::Sized(n) => n.to_string(),
                BodySize::None => "0".to_string(),
                BodySize::Stream => "stream".to_string(),
            };
            let duration_ms = took.as_secs_f64() * 1000.0;
            if is_probe(&route) {
                tracing::debug!(target: "access", method, route, status, duration_ms, bytes, user, "request");
            } else {
                tracing::info!(target: "access", method, route, status, duration_ms, bytes, user, "request");
            }
            metrics()
                .request_duration
                .get_or_create(&HttpLabels {
                    method,
                    route,
                    status,
                })
                .observe(took.as_secs_f64());
            Ok(res)
        }
        Err(e) => {
            let status = e.as_response_error().status_code().as_u16();
            let duration_ms = took.as_secs_f64() * 1000.0;
            tracing::info!(target: "access", method, route = "unmatched", status, duration_ms, user = "anonymous", error = %e, "request failed");
            metrics()
                .request_duration
                .get_or_create(&HttpLabels {
                    method,
                    route: "unmatched".to_string(),
                    status,
                })
                .observe(took.as_secs_f64());
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let ok = HeaderValue::from_static("abc-123_X.y:z");
        assert_eq!(sane_request_id(&ok), Some("abc-123_X.y:z"));
        for bad in ["", "has space", "tab\there"] {
            let v = HeaderValue::from_str(bad).unwrap();
            assert_eq!(sane_request_id(&v), None, "{bad:?}");
        }
        let long = HeaderValue::from_str(&"a".repeat(MAX_REQUEST_ID_LEN + 1)).unwrap();
        assert_eq!(sane_request_id(&long), None);
        let max = HeaderValue::from_str(&"a".repeat(MAX_REQUEST_ID_LEN)).unwrap();
        assert!(sane_request_id(&max).is_some());
        let non_ascii = HeaderValue::from_bytes("é".as_bytes()).unwrap();
        assert_eq!(sane_request_id(&non_ascii), None);
    }
}
