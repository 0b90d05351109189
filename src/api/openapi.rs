//! The OpenAPI 3.1 document of every route, served at `GET /openapi.json`.
//!
//! It is generated from the handlers' `#[utoipa::path]` annotations and the body types of
//! [`super::schema`], which the handlers serialize, so it follows the code. What JSON Schema
//! cannot say through the derive macros is added by [`Refinements`].

use std::sync::OnceLock;

use actix_web::HttpResponse;
use serde_json::json;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::Schema;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr};
use utoipa::{Modify, OpenApi};

use super::schema::*;
use super::{conversations, settings, workspace};
use crate::conversation::{ConversationStatus, RuntimeStatus, Trigger};

/// The name of the session-key security scheme (the `X-Session-API-Key` header).
pub const SECURITY_SCHEME: &str = "APIKeyHeader";
/// The name of the session key given as the `session_api_key` query parameter (sockets only).
pub const QUERY_SECURITY_SCHEME: &str = "APIKeyQuery";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "switchboard",
        description = "Self-hosted, OpenHands-compatible conversation orchestrator.\n\n\
            Every `/api` route needs the session key when the server has one: the \
            `X-Session-API-Key` header, the `session_api_key` query parameter, or the login \
            cookie a browser gets from `/login` or `/?session_api_key=…`. A user key \
            (`switchboard keys add`, sent the same ways) is needed once any exists; it sees \
            only its user's conversations: any other answers as an unknown id would (`null`, \
            404, `false`), and creating one with another user's `conversation_id` answers 409. \
            The session key and admin keys see every conversation. Every `/api` route \
            answers with `cache-control: no-cache, no-store, must-revalidate, max-age=0`. A \
            request body with no `Content-Type` is read as JSON. Any request with a `Host` \
            that is not the server's own answers 400; a state-changing request or a socket \
            upgrade with a foreign `Origin` answers 403; a body declared larger than \
            `limits.max_body_bytes` answers 413 before it is read, one slower than \
            `limits.body_timeout_secs` 408, and one that does not fit in \
            `limits.max_pending_body_bytes` 503. `HEAD` is answered wherever `GET` is. \
            Any other path answers `404 {\"detail\":\"Not Found\"}`, and a listed path with an \
            unlisted method answers `405 {\"detail\":\"Method Not Allowed\"}`."
    ),
    paths(
        alive,
        health,
        openapi_json,
        conversations::create,
        conversations::list,
        conversations::get,
        conversations::update,
        conversations::delete,
        conversations::start,
        conversations::stop,
        conversations::events,
        conversations::post_event,
        workspace::config,
        workspace::vscode_url,
        workspace::web_hosts,
        workspace::git_changes,
        workspace::list_files,
        workspace::select_file,
        workspace::upload_files,
        workspace::microagents,
        workspace::trajectory,
        settings::config,
        settings::models,
        settings::agents,
        settings::security_analyzers,
        settings::get,
        settings::post,
        socket_io,
        socket_io_no_slash,
        plain_socket,
        login_page,
        login_submit,
    ),
    components(schemas(
        ProviderType,
        TaskType,
        TaskProviderType,
        ConversationStatus,
        RuntimeStatus,
        Trigger,
        crate::events::Source,
        ValidationError,
        McpSseServerConfig,
        McpStdioServerConfig,
        McpShttpServerConfig,
    )),
    modifiers(&Refinements),
    tags(
        (name = "probes", description = "Liveness and health, no session key needed"),
        (name = "conversations", description = "The OpenHands-compatible conversation API"),
        (name = "workspace", description = "What the web app shows beside a conversation: its files, git changes, uploads, microagents, trajectory"),
        (name = "settings", description = "The web app's settings side (OpenHands' OSS mode)"),
        (name = "meta", description = "This document"),
        (name = "login", description = "The browser login: the session key becomes an \
            HttpOnly, SameSite=Strict cookie"),
        (name = "sockets", description = "Attach to a conversation over WebSocket (an HTTP upgrade). \
            After the 101 the connection speaks WebSocket, which HTTP fuzzers cannot follow: \
            exclude this tag when fuzzing."),
    )
)]
pub struct ApiDoc;

/// Additions the derive macros cannot express.
struct Refinements;

impl Modify for Refinements {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Session-API-Key",
                "The session key; required on every /api route when the server is configured \
                 with one (`session_api_key`), ignored otherwise.",
            ))),
        );
        components.add_security_scheme(
            QUERY_SECURITY_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "session_api_key",
                "The session key as a query parameter (meant for the sockets; /api takes it too).",
            ))),
        );
        // Answers of no listed operation, kept for reference.
        for (name, description, detail) in [
            ("NotFound", "Unknown path", "Not Found"),
            (
                "MethodNotAllowed",
                "A listed path with an unlisted method",
                "Method Not Allowed",
            ),
        ] {
            components.responses.insert(
                name.to_string(),
                RefOr::T(
                    ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                                    "ErrorDetail",
                                ))))
                                .example(Some(json!({ "detail": detail })))
                                .build(),
                        )
                        .build(),
                ),
            );
        }
        // The body of `start` is optional, but not nullable: an empty body is `{}`.
        if let Some(body) = openapi
            .paths
            .paths
            .get_mut("/api/conversations/{conversation_id}/start")
            .and_then(|item| item.post.as_mut())
            .and_then(|op| op.request_body.as_mut())
        {
            body.required = Some(utoipa::openapi::Required::False);
        }
        let components = openapi.components.get_or_insert_with(Default::default);
        // `replay_json` holds a JSON list of events, and cannot come with `initial_user_msg`.
        if let Some(RefOr::T(Schema::Object(init))) =
            components.schemas.get_mut("InitSessionRequest")
        {
            let mut not: Extensions = [(
                "not",
                json!({
                    "description": "`replay_json` and `initial_user_msg` cannot be used together",
                    "required": ["replay_json", "initial_user_msg"],
                    "properties": {
                        "replay_json": {"type": "string"},
                        "initial_user_msg": {"type": "string"},
                    },
                }),
            )]
            .into_iter()
            .collect();
            init.extensions
                .get_or_insert_with(Default::default)
                .merge(std::mem::take(&mut not));
            if let Some(RefOr::T(Schema::Object(replay))) = init.properties.get_mut("replay_json") {
                replay
                    .extensions
                    .get_or_insert_with(Default::default)
                    .merge(
                        [("contentSchema", replay_events_schema())]
                            .into_iter()
                            .collect(),
                    );
            }
        }
    }
}

/// What `replay_json` must decode to: a list of events as `EventBody::from_value` reads them.
fn replay_events_schema() -> serde_json::Value {
    let name = json!({"type": "string", "pattern": crate::events::EVENT_NAME_PATTERN});
    let common = json!({
        "source": {"enum": ["user", "agent", "environment", null]},
        "message": {"type": ["string", "null"]},
    });
    let with = |extra: serde_json::Value| {
        let mut props = common.clone();
        if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        props
    };
    json!({
        "type": "array",
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "required": ["action"],
                    "properties": with(json!({
                        "action": name,
                        "args": {"type": ["object", "null"]},
                    })),
                },
                {
                    "type": "object",
                    "required": ["observation"],
                    "not": {"required": ["action"]},
                    "properties": with(json!({
                        "observation": name,
                        "content": {"type": ["string", "null"]},
                        "extras": {"type": ["object", "null"]},
                        "cause": {"type": ["integer", "null"], "minimum": 0},
                    })),
                },
            ],
        },
    })
}

/// The document as JSON text, built once.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|e| format!("{{\"detail\":\"cannot render the document: {e}\"}}"))
    })
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    summary = "This OpenAPI document",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)),
)]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}

// `/alive` and `/health` are served by `super::alive` and `super::health`; these describe them.

/// Liveness probe.
#[utoipa::path(
    get,
    path = "/alive",
    tag = "probes",
    operation_id = "alive",
    responses((status = 200, description = "The server is up", body = Alive, example = json!({"status": "ok"}))),
)]
#[allow(dead_code)]
fn alive() {}

/// Health probe.
#[utoipa::path(
    get,
    path = "/health",
    tag = "probes",
    operation_id = "health",
    responses((status = 200, description = "The JSON string `\"OK\"`", body = Health, example = json!("OK"))),
)]
#[allow(dead_code)]
fn health() {}

// The socket routes are served by `crate::ws`; these describe their HTTP side.

/// Socket.IO (Engine.IO v4, WebSocket transport only).
///
/// Without a WebSocket upgrade (or with another `EIO` or `transport`) the answer is a 400. The
/// session key, the conversation and `providers_set` are checked at the Socket.IO CONNECT:
/// a refusal is a `44{"message": …}` packet, never an HTTP status.
#[utoipa::path(
    get,
    path = "/socket.io/",
    tag = "sockets",
    operation_id = "socket_io",
    params(SocketIoQuery, WebSocketUpgrade),
    responses(
        (status = 101, description = "Switching Protocols: the WebSocket speaking Socket.IO"),
        (status = 400, description = "Not a valid WebSocket upgrade, unsupported `EIO` or `transport`, or a malformed query string", body = ErrorDetail),
    ),
)]
#[allow(dead_code)]
fn socket_io() {}

/// Socket.IO, as `/socket.io/`.
#[utoipa::path(
    get,
    path = "/socket.io",
    tag = "sockets",
    operation_id = "socket_io_no_slash",
    params(SocketIoQuery, WebSocketUpgrade),
    responses(
        (status = 101, description = "Switching Protocols: the WebSocket speaking Socket.IO"),
        (status = 400, description = "Not a valid WebSocket upgrade, unsupported `EIO` or `transport`, or a malformed query string", body = ErrorDetail),
    ),
)]
#[allow(dead_code)]
fn socket_io_no_slash() {}

/// The conversation's events as plain JSON WebSocket frames.
#[utoipa::path(
    get,
    path = "/ws/conversations/{conversation_id}",
    tag = "sockets",
    operation_id = "plain_socket",
    params(ConversationIdPath, PlainSocketQuery, WebSocketUpgrade),
    responses(
        (status = 101, description = "Switching Protocols: the WebSocket"),
        (status = 400, description = "Not a valid WebSocket upgrade, or a malformed query string", body = ErrorDetail),
        (status = 401, description = "Missing or wrong session key (only when one is configured)", body = ErrorDetail, example = json!({"detail": "Unauthorized"})),
        (status = 404, description = "Unknown conversation", body = ErrorDetail, example = json!({"detail": "Conversation not found"})),
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = []), ("APIKeyQuery" = [])),
)]
#[allow(dead_code)]
fn plain_socket() {}

// `/login` is served by `crate::http::auth`; these describe it.

/// The login form (HTML).
///
/// Without a configured key, or with the browser already logged in, a 303 to `next`.
#[utoipa::path(
    get,
    path = "/login",
    tag = "login",
    operation_id = "login_page",
    params(("next" = Option<String>, Query, description = "A local path to go back to (default `/`)")),
    responses(
        (status = 200, description = "The login form", content_type = "text/html"),
        (status = 303, description = "Nothing to log in to: back to `next`"),
    ),
)]
#[allow(dead_code)]
fn login_page() {}

/// The login form's answer (`application/x-www-form-urlencoded`: `session_api_key`, `next`).
#[utoipa::path(
    post,
    path = "/login",
    tag = "login",
    operation_id = "login_submit",
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "`session_api_key=…&next=/path`"),
    responses(
        (status = 303, description = "Logged in: the cookie is set, back to `next`"),
        (status = 400, description = "Not a login form", body = ErrorDetail),
        (status = 401, description = "The wrong key: the form again", content_type = "text/html"),
        (status = 403, description = "Posted from a foreign origin", body = ErrorDetail),
    ),
)]
#[allow(dead_code)]
fn login_submit() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_renders() {
        let doc: serde_json::Value = serde_json::from_str(document()).expect("JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["components"]["schemas"]["InitSessionRequest"]["not"].is_object());
    }
}
