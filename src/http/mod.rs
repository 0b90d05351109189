//! The HTTP layer under the API routes ([`crate::api`]), the sockets ([`crate::ws`]) and the
//! operations routes ([`crate::ops`]): what every handler shares ([`AppState`]), every error
//! it can answer ([`ApiError`], [`error`]), reading a bounded body ([`read_body`]) and the
//! `{conversation_id}` path segment ([`path_id`]), the resource helpers that answer 405 and 404
//! alike everywhere, the key check and login ([`auth`]), which conversations a caller may see
//! and whether this node serves them ([`access`]), forwarding to a conversation's owner
//! ([`forward`]), and the server's front gate.
//!
//! [`gate`] runs first for every request, in this order:
//! 1. a `Host` that is not ours is refused with 400 (DNS rebinding), see [`origin`];
//! 2. a state-changing request (any method but GET, HEAD, OPTIONS) or a WebSocket upgrade (the
//!    socket routes) whose `Origin` is not allowed is refused with 403 — sockets before the
//!    upgrade; requests without an `Origin` pass;
//! 3. a body is bounded in size, time and shared memory, see [`body`];
//! 4. `HEAD` is served as `GET` (the HTTP layer sends the head without the body).
//!
//! Then [`auth::login`] turns `?session_api_key=` into a login cookie for pages, and the routes
//! find their caller through [`auth::SessionAuth::resolve`] (the session key, a user key, or
//! no key while authentication is off).

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde_json::json;

use std::sync::Arc;

use crate::actors::{ClientId, SupervisorHandle};
use crate::config::Settings;
use crate::conversation::ConversationId;
use crate::store::Store;
use auth::Caller;

pub mod access;
pub mod auth;
pub mod body;
pub mod error;
pub mod forward;
pub mod origin;

pub use body::read_body;
pub use error::ApiError;

/// What every handler shares.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub supervisor: SupervisorHandle,
    /// The session key and the login cookie.
    pub auth: crate::http::auth::SessionAuth,
    /// The checks every request passes before routing.
    pub gate: crate::http::Gate,
    /// The sockets this node relays to other cluster nodes (closed when it shuts down).
    pub splices: crate::ws::Splices,
}

/// The request's `Content-Type`, when readable.
pub fn content_type(req: &actix_web::HttpRequest) -> Option<&str> {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// The identity a request's creations are counted against ([`ClientId`]): its user, the
/// session key, or without a key the peer's address.
pub fn client_id(req: &HttpRequest, caller: &Caller) -> ClientId {
    caller.client_id(req.peer_addr().map(|a| a.ip()))
}

/// Reads and checks the `{id}` path segment: a 422 stating the id rule when it breaks it.
pub fn path_id(path: &web::Path<String>) -> Result<ConversationId, ApiError> {
    error::conversation_id(path.as_str(), vec![json!("path"), json!("conversation_id")])
        .map_err(|e| ApiError::one(*e))
}

/// 404 `{"detail":"Not Found"}` for every unknown path.
pub async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(serde_json::json!({"detail": "Not Found"}))
}

/// 405 `{"detail":"Method Not Allowed"}` with the `Allow` header, for a known path with
/// another method.
fn method_not_allowed(allow: &'static str) -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header((header::ALLOW, allow))
        .json(serde_json::json!({"detail": "Method Not Allowed"}))
}

/// A resource whose other methods answer 405 naming the `allow`ed ones.
pub fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move || async move { method_not_allowed(allow) }))
}

/// [`resource`] for several paths served alike.
pub fn resources(paths: &[&str], allow: &'static str) -> actix_web::Resource {
    web::resource(paths.to_vec())
        .default_service(web::to(move || async move { method_not_allowed(allow) }))
}

/// The allow-lists and body limits every request is checked against.
#[derive(Debug)]
pub struct Gate {
    pub allow: origin::AllowList,
    pub bodies: body::BodyLimits,
}

impl Gate {
    pub fn new(settings: &Settings) -> Gate {
        Gate {
            allow: origin::AllowList::from_settings(settings),
            bodies: body::BodyLimits::new(settings),
        }
    }

    /// Why `req` is refused before routing, if it is; prepares its body and method otherwise.
    fn check(&self, req: &mut ServiceRequest) -> Result<(), ApiError> {
        let headers = req.headers();
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if let Some(h) = headers.get(header::HOST) {
            if host.is_none_or(|h| !self.allow.host_allowed(h)) {
                let shown = String::from_utf8_lossy(h.as_bytes());
                tracing::info!(host = %shown, path = req.path(), "refused a request for a foreign Host");
                return Err(refusal(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Host {shown:?} is not allowed: this server answers only to its own \
                         names (DNS rebinding protection). Add the name to [http] allowed_hosts \
                         or SWITCHBOARD_ALLOWED_HOSTS."
                    ),
                ));
            }
        }
        if let Some(o) = headers.get(header::ORIGIN) {
            let guarded = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
                || is_socket_path(req.path())
                || headers.contains_key(header::UPGRADE);
            let allowed = || {
                o.to_str()
                    .is_ok_and(|origin| self.allow.origin_allowed(origin, host))
            };
            if guarded && !allowed() {
                let shown = String::from_utf8_lossy(o.as_bytes());
                tracing::info!(origin = %shown, method = %req.method(), path = req.path(), "refused a cross-site request");
                return Err(refusal(
                    StatusCode::FORBIDDEN,
                    format!(
                        "Origin {shown:?} is not allowed to change anything or open a socket \
                         here (cross-site request). Add it to [http] allowed_origins or \
                         SWITCHBOARD_ALLOWED_ORIGINS."
                    ),
                ));
            }
        }
        self.bodies.check(req)?;
        if req.method() == Method::HEAD {
            req.head_mut().method = Method::GET;
        }
        Ok(())
    }
}

/// The socket routes: `/socket.io/` and `/ws/…`.
fn is_socket_path(path: &str) -> bool {
    path == "/socket.io" || path.starts_with("/socket.io/") || path.starts_with("/ws/")
}

fn refusal(status: StatusCode, detail: String) -> ApiError {
    ApiError::Exact(status, json!({ "detail": detail }))
}

/// The middleware around the whole app; see the module docs.
pub async fn gate(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let checked = match req.app_data::<web::Data<AppState>>().cloned() {
        Some(state) => state.gate.check(&mut req),
        None => Ok(()),
    };
    if let Err(refused) = checked {
        return Ok(req
            .into_response(refused.error_response())
            .map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}
