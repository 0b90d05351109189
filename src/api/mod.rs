//! HTTP routes: the OpenHands-compatible API, health probes, the OpenAPI document and its
//! interactive view (`/docs`).
//!
//! Handlers validate input, translate it into actor messages through the handles in
//! [`crate::actors`], and map every failure to an exact status and JSON body ([`ApiError`]).
//! Every `/api` route sits behind the key check ([`crate::http::auth`]), sees only what its
//! caller may see ([`access`]) and answers with
//! `cache-control: no-cache, no-store, must-revalidate, max-age=0`.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::middleware::{from_fn, DefaultHeaders};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;

use crate::actors::{ClientId, SupervisorHandle};
use crate::config::Settings;
use crate::http::auth::Caller;
use crate::store::Store;

pub mod access;
pub mod conversations;
pub mod docs;
pub mod errors;
pub mod openapi;
pub mod schema;
pub mod settings;
pub mod validation;
pub mod workspace;

pub use errors::ApiError;

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

/// Reads a request body of at most `limit` bytes: 413 over it, 408 when it does not arrive in
/// time, 503 when too many bodies are arriving at once (see [`crate::http::body`]).
pub async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
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

async fn alive() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json("OK")
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

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    use conversations as c;
    cfg.service(resource("/alive", "GET").route(web::get().to(alive)))
        .service(resource("/health", "GET").route(web::get().to(health)))
        .service(resource("/openapi.json", "GET").route(web::get().to(openapi::openapi_json)))
        .configure(docs::configure)
        .service(
            web::scope("/api")
                .wrap(from_fn(crate::http::auth::require_key))
                .wrap(DefaultHeaders::new().add((
                    header::CACHE_CONTROL,
                    "no-cache, no-store, must-revalidate, max-age=0",
                )))
                .service(
                    resource("/conversations", "GET, POST")
                        .route(web::post().to(c::create))
                        .route(web::get().to(c::list)),
                )
                .service(
                    resource("/conversations/{conversation_id}", "GET, PATCH, DELETE")
                        .route(web::get().to(c::get))
                        .route(web::patch().to(c::update))
                        .route(web::delete().to(c::delete)),
                )
                .service(
                    resource("/conversations/{conversation_id}/start", "POST")
                        .route(web::post().to(c::start)),
                )
                .service(
                    resource("/conversations/{conversation_id}/stop", "POST")
                        .route(web::post().to(c::stop)),
                )
                .service(
                    resource("/conversations/{conversation_id}/events", "GET, POST")
                        .route(web::get().to(c::events))
                        .route(web::post().to(c::post_event)),
                )
                .service(
                    resource("/conversations/{conversation_id}/config", "GET")
                        .route(web::get().to(workspace::config)),
                )
                .service(
                    resource("/conversations/{conversation_id}/vscode-url", "GET")
                        .route(web::get().to(workspace::vscode_url)),
                )
                .service(
                    resource("/conversations/{conversation_id}/web-hosts", "GET")
                        .route(web::get().to(workspace::web_hosts)),
                )
                .service(
                    resource("/conversations/{conversation_id}/git/changes", "GET")
                        .route(web::get().to(workspace::git_changes)),
                )
                .service(
                    resource("/conversations/{conversation_id}/list-files", "GET")
                        .route(web::get().to(workspace::list_files)),
                )
                .service(
                    resource("/conversations/{conversation_id}/select-file", "GET")
                        .route(web::get().to(workspace::select_file)),
                )
                .service(
                    resource("/conversations/{conversation_id}/upload-files", "POST")
                        .route(web::post().to(workspace::upload_files)),
                )
                .service(
                    resource("/conversations/{conversation_id}/microagents", "GET")
                        .route(web::get().to(workspace::microagents)),
                )
                .service(
                    resource("/conversations/{conversation_id}/trajectory", "GET")
                        .route(web::get().to(workspace::trajectory)),
                )
                .service(
                    resource("/status", "GET").route(web::get().to(crate::ops::status::api_status)),
                )
                .service(resource("/options/config", "GET").route(web::get().to(settings::config)))
                .service(resource("/options/models", "GET").route(web::get().to(settings::models)))
                .service(resource("/options/agents", "GET").route(web::get().to(settings::agents)))
                .service(
                    resource("/options/security-analyzers", "GET")
                        .route(web::get().to(settings::security_analyzers)),
                )
                .service(
                    resource("/settings", "GET, POST")
                        .route(web::get().to(settings::get))
                        .route(web::post().to(settings::post)),
                )
                .default_service(web::to(not_found)),
        );
}
