//! The settings side of OpenHands' OSS mode: `GET /api/options/*` (what the web app may offer,
//! from [`crate::config::FrontendSettings`]) and `GET`/`POST /api/settings` (the user's own
//! choices, kept durably in the store).
//!
//! Promises: secrets (`llm_api_key`, `search_api_key`, `sandbox_api_key`) are stored but never
//! echoed — `GET` says only whether they are set. `POST` follows OpenHands' merge rules: the
//! body is a whole `Settings` (absent fields at their defaults), except that `llm_api_key`,
//! `llm_model`, `llm_base_url`, `search_api_key` and `user_consents_to_analytics` keep their
//! stored values when sent `null` or left out. A body with a wrong type changes nothing.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::schema::{
    AppSettings, ErrorDetail, ErrorMessageOnly, HttpValidationError, ServerConfig, SettingsStored,
    StoreFailed, StoredSettings, Unauthorized,
};
use super::validation;
use crate::conversation::settings::user_of;
use crate::http::auth::Caller;
use crate::http::ApiError;
use crate::http::{content_type, read_body, AppState};
use crate::store::Store;

/// Fields kept from the stored settings when a `POST` sends them `null` or leaves them out.
const KEPT_WHEN_NULL: &[&str] = &[
    "llm_api_key",
    "llm_model",
    "llm_base_url",
    "search_api_key",
    "user_consents_to_analytics",
];

/// Fields never echoed by `GET`.
const SECRETS: &[&str] = &["llm_api_key", "search_api_key", "sandbox_api_key"];

/// `GET /api/options/config`.
#[utoipa::path(
    get,
    path = "/api/options/config",
    tag = "settings",
    operation_id = "get_config",
    summary = "What the web app needs to know about this server",
    responses(
        (status = 200, description = "The server's configuration for the web app", body = ServerConfig),
        Unauthorized,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn config(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(ServerConfig::from(&state.settings.frontend))
}

/// `GET /api/options/models`.
#[utoipa::path(
    get,
    path = "/api/options/models",
    tag = "settings",
    operation_id = "get_litellm_models",
    summary = "The LLM models the settings form offers (`provider/model`)",
    responses(
        (status = 200, description = "Model names", body = Vec<String>, example = json!(["anthropic/claude-sonnet-4-20250514"])),
        Unauthorized,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(&state.settings.frontend.models)
}

/// `GET /api/options/agents`.
#[utoipa::path(
    get,
    path = "/api/options/agents",
    tag = "settings",
    operation_id = "get_agents",
    summary = "The agents the settings form offers",
    responses(
        (status = 200, description = "Agent names", body = Vec<String>, example = json!(["CodeActAgent"])),
        Unauthorized,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn agents(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(&state.settings.frontend.agents)
}

/// `GET /api/options/security-analyzers`.
#[utoipa::path(
    get,
    path = "/api/options/security-analyzers",
    tag = "settings",
    operation_id = "get_security_analyzers",
    summary = "The security analyzers the settings form offers",
    responses(
        (status = 200, description = "Analyzer names", body = Vec<String>, example = json!([])),
        Unauthorized,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn security_analyzers(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(&state.settings.frontend.security_analyzers)
}

/// Whether a stored secret is set (present and non-empty).
fn secret_set(stored: &Map<String, Value>, key: &str) -> bool {
    stored
        .get(key)
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
}

/// The stored settings as `GET` shows them: secrets replaced by `*_set` flags.
fn shown(stored: &Map<String, Value>) -> Map<String, Value> {
    let mut out = stored.clone();
    for key in SECRETS {
        out.insert((*key).to_string(), Value::Null);
    }
    out.insert("provider_tokens_set".into(), json!({}));
    out.insert(
        "llm_api_key_set".into(),
        json!(secret_set(stored, "llm_api_key")),
    );
    out.insert(
        "search_api_key_set".into(),
        json!(secret_set(stored, "search_api_key")),
    );
    out
}

/// The stored settings of `user`, if any were saved.
pub async fn load(store: &dyn Store, user: &str) -> Result<Option<Map<String, Value>>, ApiError> {
    match store.settings(user).await? {
        None => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(ApiError::Internal(
            "the stored settings are not a JSON object".into(),
        )),
    }
}

/// `GET /api/settings`.
#[utoipa::path(
    get,
    path = "/api/settings",
    tag = "settings",
    operation_id = "load_settings",
    summary = "The saved settings, secrets never echoed",
    responses(
        (status = 200, description = "The saved settings", body = AppSettings),
        Unauthorized,
        (status = 404, description = "Nothing saved yet (the web app then opens its first-run settings)", body = ErrorMessageOnly, example = json!({"error": "Settings not found"})),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn get(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
) -> Result<HttpResponse, ApiError> {
    let user = user_of(caller.name().map(|n| &**n));
    match load(state.store.as_ref(), user).await? {
        Some(stored) => Ok(HttpResponse::Ok().json(Value::Object(shown(&stored)))),
        None => Err(ApiError::Exact(
            StatusCode::NOT_FOUND,
            json!({"error": "Settings not found"}),
        )),
    }
}

/// `POST /api/settings`.
#[utoipa::path(
    post,
    path = "/api/settings",
    tag = "settings",
    operation_id = "store_settings",
    summary = "Save the settings (OpenHands' merge rules)",
    request_body(content = StoredSettings, content_type = "application/json"),
    responses(
        (status = 200, description = "Saved", body = SettingsStored, example = json!({"message": "Settings stored"})),
        (status = 400, description = "The request body could not be read", body = ErrorDetail),
        Unauthorized,
        (status = 413, description = "The request body is larger than `limits.max_body_bytes`", body = ErrorDetail),
        (status = 422, description = "Validation error", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn post(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let user = user_of(caller.name().map(|n| &**n));
    let body = read_body(payload, state.settings.limits.max_body_bytes).await?;
    let obj =
        validation::parse_object_body(content_type(&req), &body).map_err(ApiError::Validation)?;
    let mut settings = validation::parse_settings(&obj).map_err(ApiError::Validation)?;
    if let Some(existing) = load(state.store.as_ref(), user).await? {
        for key in KEPT_WHEN_NULL {
            if settings.get(*key).is_none_or(Value::is_null) {
                if let Some(old) = existing.get(*key) {
                    settings.insert((*key).to_string(), old.clone());
                }
            }
        }
    }
    state
        .store
        .save_settings(user, Value::Object(settings))
        .await?;
    tracing::info!("settings stored");
    Ok(HttpResponse::Ok().json(SettingsStored {
        message: "Settings stored".into(),
    }))
}
