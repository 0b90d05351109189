//! HTTP routes: the OpenHands-compatible API, health probes, the OpenAPI document and its
//! interactive view (`/docs`).
//!
//! Handlers validate input, translate it into actor messages through the handles in
//! [`crate::actors`], and map every failure to an exact status and JSON body
//! ([`crate::http::ApiError`]).
//! Every `/api` route sits behind the key check ([`crate::http::auth`]), sees only what its
//! caller may see ([`crate::http::access`]) and answers with
//! `cache-control: no-cache, no-store, must-revalidate, max-age=0`.

use actix_web::http::header;
use actix_web::middleware::{from_fn, DefaultHeaders};
use actix_web::{web, HttpResponse};

use crate::http::{not_found, resource};

pub mod conversations;
pub mod docs;
pub mod openapi;
pub mod schema;
pub mod settings;
pub mod validation;
pub mod workspace;

async fn alive() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json("OK")
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
