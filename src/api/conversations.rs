//! The `/api/conversations` routes.

use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use serde_json::{json, Value};

use super::schema::{
    self, ActionAccepted, ActionRefused, ConversationIdPath, ConversationInfo,
    ConversationInfoResultSet, ConversationNotFound, ConversationResponse, ErrorDetail, EventsPage,
    EventsQuery, HttpValidationError, InitSessionRequest, ListQuery, OkStatus, ProvidersSetModel,
    StoreFailed, Unauthorized, UpdateConversationRequest, UserAction,
};
use super::validation;
use crate::actors::messages::ConversationError;
use crate::actors::{
    Admit, AdmitError, AdmitMode, ClientId, ConversationHandle, DeleteError, OpenError, Shared,
    StopReason,
};
use crate::config::Limits;
use crate::conversation::{ConversationId, ConversationMeta, ConversationStatus};
use crate::http::access::{find, owned_here, visible, Found, Owner};
use crate::http::auth::Caller;
use crate::http::error::{ErrorMessage, ErrorStatus, FieldError};
use crate::http::ApiError;
use crate::http::{client_id, content_type, path_id, read_body, AppState};
use crate::store::EventQuery;

/// `msg_id` of a 429 for `limits.max_running_per_user`.
pub const USER_LIMIT: &str = "SWITCHBOARD$USER_LIMIT";

/// `ConversationInfo` for a stored conversation and its live state on this node, if any;
/// `elsewhere`: another live cluster node owns it, so it is live there (shown `RUNNING` — that
/// node's exact phase, runtime status and clients are its own).
pub fn conversation_info(
    meta: &ConversationMeta,
    live: Option<&Shared>,
    elsewhere: bool,
) -> ConversationInfo {
    let status = match live {
        Some(shared) => shared.status(),
        None if elsewhere => ConversationStatus::Running,
        None => ConversationStatus::Stopped,
    };
    let running = status != ConversationStatus::Stopped;
    let id = &meta.conversation_id;
    ConversationInfo {
        conversation_id: id.to_string(),
        title: meta.title.clone(),
        last_updated_at: meta.last_updated_at.clone(),
        status,
        runtime_status: live.filter(|_| running).map(Shared::runtime_status),
        selected_repository: meta.init.repository.clone(),
        selected_branch: meta.init.selected_branch.clone(),
        git_provider: meta.init.git_provider.clone(),
        trigger: meta.trigger,
        num_connections: live.map_or(0, Shared::connections),
        url: running.then(|| format!("/api/conversations/{id}")),
        session_api_key: None,
        created_at: meta.created_at.clone(),
        pr_number: Vec::new(),
    }
}

/// Whether a conversation does not run on this node: not live here, or only an incarnation
/// that stopped (say, one that lost the race to take it over) — so that another node's lease
/// decides what it shows.
fn stopped_here(live: Option<&Shared>) -> bool {
    live.is_none_or(|shared| shared.status() == ConversationStatus::Stopped)
}

fn conversation_response(
    id: &str,
    status: ConversationStatus,
    message: Option<String>,
) -> ConversationResponse {
    ConversationResponse {
        status: OkStatus::Ok,
        conversation_id: id.to_string(),
        message,
        conversation_status: status,
    }
}

fn admit_error(e: AdmitError, limits: &Limits) -> ApiError {
    match e {
        AdmitError::TooMany => ApiError::TooManyConversations,
        AdmitError::RateLimited { retry_after_secs } => ApiError::RateLimited {
            retry_after_secs,
            rate_per_sec: limits.create_rate_per_sec,
            burst: limits.create_burst,
        },
        AdmitError::ShuttingDown => ApiError::Unavailable("The server is shutting down".into()),
        e @ AdmitError::UserLimit { .. } => ApiError::Exact(
            actix_web::http::StatusCode::TOO_MANY_REQUESTS,
            schema::to_value(&ErrorMessage {
                status: ErrorStatus::Error,
                message: e.to_string(),
                msg_id: USER_LIMIT.into(),
                retry_after_secs: None,
            }),
        ),
        AdmitError::NotFound => ApiError::NotFound("Conversation not found".into()),
    }
}

/// Opens and joins `id` of `owner` ([`crate::actors::SupervisorHandle::open`]). Bringing the
/// conversation up counts against `client`'s creation rate limit when one is given.
async fn admit_and_join(
    state: &AppState,
    id: ConversationId,
    mode: AdmitMode,
    client: Option<ClientId>,
    owner: Owner,
    brings_initial_message: bool,
) -> Result<(ConversationHandle, ConversationStatus, Option<String>), ApiError> {
    let fresh = matches!(mode, AdmitMode::Fresh(_));
    state
        .supervisor
        .open(
            Admit {
                id: id.clone(),
                mode,
                client,
                owner,
                brought_initial_message: brings_initial_message,
            },
            |mut admitted| async move {
                match admitted.join(brings_initial_message).await {
                    Ok(reply) => Ok((admitted.conversation, reply.status, reply.message)),
                    // This request created it, and it stopped before the join was answered
                    // (its runtime failed at once): it exists, stopped; creating it again
                    // would fail.
                    Err(ConversationError::Stopping) if fresh => {
                        Ok((admitted.conversation, ConversationStatus::Stopped, None))
                    }
                    Err(e) => Err(e),
                }
            },
        )
        .await
        .map_err(|e| match e {
            OpenError::Admit(e) => admit_error(e, &state.settings.limits),
            OpenError::Conversation(ConversationError::NotFound) => {
                ApiError::NotFound("Conversation not found".into())
            }
            OpenError::Conversation(ConversationError::Storage(e)) => ApiError::Storage(e),
            OpenError::Conversation(ConversationError::OverQuota(quota, why)) => {
                ApiError::OverQuota(quota, why)
            }
            OpenError::Conversation(ConversationError::Elsewhere(owner)) => {
                ApiError::Elsewhere(id.to_string(), owner)
            }
            OpenError::Conversation(e) => ApiError::Internal(e.into()),
            OpenError::Restarting(last) => ApiError::Unavailable(format!(
                "conversation {id} is restarting; try again ({last})"
            )),
        })
}

/// `POST /api/conversations`: create a conversation or join an existing one.
#[utoipa::path(
    post,
    path = "/api/conversations",
    tag = "conversations",
    operation_id = "new_conversation",
    summary = "Create a conversation, or join an existing one",
    request_body(content = InitSessionRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Created (`STARTING`), or joined (its live status)", body = ConversationResponse),
        (status = 400, description = "The request body could not be read", body = ErrorDetail),
        Unauthorized,
        (status = 404, description = "The conversation could not be loaded (deleted while joining)", body = ErrorDetail),
        (status = 409, description = "The client-chosen `conversation_id` is another user's conversation (user keys): it is neither joined nor created", body = ErrorMessage, example = json!({"status": "error", "msg_id": "CONVERSATION$ID_TAKEN", "message": "The conversation id … is taken; choose another one, or leave conversation_id out to get a new one"})),
        (status = 413, description = "The request body is larger than `limits.max_body_bytes`", body = ErrorDetail),
        (status = 422, description = "Validation error", body = HttpValidationError),
        (status = 429, description = "Too many conversations are running (`limits.on_limit = \"reject\"`, or `evict_oldest` with every running conversation attached or mid-turn), or this client has used up its creation rate limit (`limits.create_rate_per_sec`; `msg_id` `SWITCHBOARD$CREATE_RATE_LIMITED`, with `retry_after_secs` and `Retry-After`)", body = ErrorMessage, headers(("Retry-After" = u64, description = "Seconds until this client may create again (rate limit only)")), example = json!({"status": "error", "message": crate::events::TOO_MANY_CONVERSATIONS_MESSAGE, "msg_id": crate::events::TOO_MANY_CONVERSATIONS})),
        (status = 500, description = "Internal error", body = ErrorDetail, example = json!({"detail": "Internal Server Error"})),
        (status = 503, description = "The store failed (`Storage error: …`), the server is shutting down, or the conversation is restarting; try again", body = ErrorDetail),
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn create(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.settings.limits.max_body_bytes).await?;
    let new =
        validation::parse_init_session(content_type(&req), &body).map_err(ApiError::Validation)?;
    let generated = new.conversation_id.is_none();
    let id = new
        .conversation_id
        .clone()
        .unwrap_or_else(ConversationId::generate);
    // A new conversation is the caller's; an existing one is joined only when visible, and
    // one another live cluster node runs is answered as its owner's (`Elsewhere`, which the
    // cluster forwards) before anything starts here, so no creation token is spent on it.
    // (Other commands find out from the store's refusal to hand the conversation over.)
    let owner = if generated {
        caller.name().cloned()
    } else {
        match find(&state, &caller, &id).await? {
            Found::Visible(owner) => {
                owned_here(&state, &id).await?;
                owner
            }
            Found::Missing => caller.name().cloned(),
            Found::Hidden => return Err(id_taken(&id)),
        }
    };
    let brings_initial_message = new.brings_initial_message;
    let meta = Box::new(new.meta(id.clone(), owner.as_deref().map(str::to_string)));
    let mode = if generated {
        AdmitMode::Fresh(meta)
    } else {
        AdmitMode::LoadOrCreate(meta)
    };
    let client = client_id(&req, &caller);
    let (_, status, message) = admit_and_join(
        &state,
        id.clone(),
        mode,
        Some(client),
        owner,
        brings_initial_message,
    )
    .await?;
    Ok(HttpResponse::Ok().json(conversation_response(&id, status, message)))
}

/// 409: a client-chosen id that another user's conversation has (see [`super::access`]).
fn id_taken(id: &str) -> ApiError {
    ApiError::Exact(
        actix_web::http::StatusCode::CONFLICT,
        schema::to_value(&ErrorMessage {
            status: ErrorStatus::Error,
            message: format!(
                "The conversation id {id} is taken; choose another one, or leave \
                 conversation_id out to get a new one"
            ),
            msg_id: "CONVERSATION$ID_TAKEN".into(),
            retry_after_secs: None,
        }),
    )
}

/// Query parameters as a list of pairs; a malformed query string is a 422.
pub(super) fn query_pairs(req: &HttpRequest) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(req.query_string()).map_err(|e| {
        ApiError::one(FieldError::new(
            "value_error",
            vec![json!("query")],
            format!("Invalid query string: {e}"),
            json!(req.query_string()),
        ))
    })
}

pub(super) fn query_get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn query_int(pairs: &[(String, String)], key: &str) -> Result<Option<u64>, ApiError> {
    match query_get(pairs, key) {
        None => Ok(None),
        Some(raw) => raw.trim().parse::<u64>().map(Some).map_err(|_| {
            ApiError::one(FieldError::new(
                "int_parsing",
                vec![json!("query"), json!(key)],
                "Input should be a valid integer, unable to parse string as an integer",
                json!(raw),
            ))
        }),
    }
}

fn page_limit(pairs: &[(String, String)]) -> Result<usize, ApiError> {
    match query_get(pairs, "limit") {
        None => Ok(schema::PAGE_LIMIT_DEFAULT),
        Some(raw) => raw
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=schema::PAGE_LIMIT_MAX).contains(l))
            .ok_or_else(|| ApiError::BadRequest("Invalid limit".into())),
    }
}

/// `GET /api/conversations?page_id=&limit=`: newest first.
#[utoipa::path(
    get,
    path = "/api/conversations",
    tag = "conversations",
    operation_id = "search_conversations",
    summary = "List conversations, newest first",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of conversations", body = ConversationInfoResultSet),
        (status = 400, description = "Invalid `limit` or `page_id`", body = ErrorDetail, example = json!({"detail": "Invalid limit"})),
        Unauthorized,
        (status = 422, description = "Malformed query string", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn list(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let pairs = query_pairs(&req)?;
    let limit = page_limit(&pairs)?;
    let offset = match query_get(&pairs, "page_id") {
        None => 0,
        Some(page) => base64::engine::general_purpose::STANDARD
            .decode(page)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| ApiError::BadRequest("Invalid page_id".into()))?,
    };
    // A user lists its own conversations only; admins list them all.
    let mut page = match caller.name() {
        Some(name) if !caller.sees_all() => state.store.list_owned(name, offset, limit + 1),
        _ => state.store.list(offset, limit + 1),
    }
    .await?;
    let next_page_id = (page.len() > limit).then(|| {
        page.truncate(limit);
        base64::engine::general_purpose::STANDARD.encode((offset + limit).to_string())
    });
    let live: Vec<_> = page
        .iter()
        .map(|meta| state.supervisor.shared(&meta.conversation_id))
        .collect();
    // Those not running here may be live on another cluster node: one query for the page.
    let others = page
        .iter()
        .zip(&live)
        .filter(|(_, live)| stopped_here(live.as_deref()))
        .map(|(meta, _)| meta.conversation_id.clone())
        .collect();
    let elsewhere = state.store.owned_elsewhere(others).await?;
    let results = page
        .iter()
        .zip(&live)
        .map(|(meta, live)| {
            let there = elsewhere.contains(&meta.conversation_id);
            conversation_info(meta, live.as_deref().filter(|_| !there), there)
        })
        .collect();
    Ok(HttpResponse::Ok().json(ConversationInfoResultSet {
        results,
        next_page_id,
    }))
}

/// `GET /api/conversations/{id}`: `ConversationInfo`, or `null` when unknown.
#[utoipa::path(
    get,
    path = "/api/conversations/{conversation_id}",
    tag = "conversations",
    operation_id = "get_conversation",
    summary = "Get a conversation",
    params(ConversationIdPath),
    responses(
        (status = 200, description = "The conversation, or `null` when it is unknown", body = Option<ConversationInfo>),
        Unauthorized,
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn get(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    let record = state.store.get(&id).await?;
    let Some(record) = record.filter(|r| caller.may_see(r.meta.owner.as_deref())) else {
        return Ok(HttpResponse::Ok().json(None::<ConversationInfo>));
    };
    let live = state.supervisor.shared(&id);
    let elsewhere = stopped_here(live.as_deref())
        && !state
            .store
            .owned_elsewhere(vec![id.clone()])
            .await?
            .is_empty();
    let info = conversation_info(
        &record.meta,
        live.as_deref().filter(|_| !elsewhere),
        elsewhere,
    );
    Ok(HttpResponse::Ok().json(info))
}

fn not_found_patch() -> ApiError {
    ApiError::Exact(
        actix_web::http::StatusCode::NOT_FOUND,
        schema::to_value(&ErrorMessage {
            status: ErrorStatus::Error,
            message: "Conversation not found".into(),
            msg_id: "CONVERSATION$NOT_FOUND".into(),
            retry_after_secs: None,
        }),
    )
}

/// `PATCH /api/conversations/{id}` with `{"title": …}`.
#[utoipa::path(
    patch,
    path = "/api/conversations/{conversation_id}",
    tag = "conversations",
    operation_id = "update_conversation",
    summary = "Rename a conversation",
    params(ConversationIdPath),
    request_body(content = UpdateConversationRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Renamed (always `true`)", body = bool, content_type = "application/json", example = json!(true)),
        (status = 400, description = "The request body could not be read", body = ErrorDetail),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ErrorMessage, example = json!({"status": "error", "message": "Conversation not found", "msg_id": "CONVERSATION$NOT_FOUND"})),
        (status = 413, description = "The request body is larger than `limits.max_body_bytes`", body = ErrorDetail),
        (status = 422, description = "Validation error", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn update(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    let body = read_body(payload, state.settings.limits.max_body_bytes).await?;
    let obj =
        validation::parse_object_body(content_type(&req), &body).map_err(ApiError::Validation)?;
    let title = validation::parse_conversation_update(&obj).map_err(ApiError::Validation)?;
    let Some(owner) = visible(&state, &caller, &id).await? else {
        return Err(not_found_patch());
    };
    let updated = match live_of(&state, &id, &owner) {
        Some(conversation) => match conversation.set_title(title.clone()).await {
            Ok(()) => true,
            Err(ConversationError::Stopping) => state.store.set_title(&id, &title).await?,
            Err(_) => false,
        },
        None => {
            owned_here(&state, &id).await?;
            state.store.set_title(&id, &title).await?
        }
    };
    if !updated {
        return Err(not_found_patch());
    }
    Ok(HttpResponse::Ok().json(true))
}

/// `DELETE /api/conversations/{id}`: `true` when it existed.
#[utoipa::path(
    delete,
    path = "/api/conversations/{conversation_id}",
    tag = "conversations",
    operation_id = "delete_conversation",
    summary = "Stop and delete a conversation with its events",
    params(ConversationIdPath),
    responses(
        (status = 200, description = "`true` when it existed and was deleted, `false` when unknown", body = bool, content_type = "application/json"),
        Unauthorized,
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        (status = 503, description = "The store failed, or the server is shutting down", body = ErrorDetail, example = json!({"detail": "Storage error: …"})),
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn delete(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    if visible(&state, &caller, &id).await?.is_none() {
        return Ok(HttpResponse::Ok().json(false));
    }
    owned_here(&state, &id).await?;
    let deleted = state.supervisor.delete(id).await.map_err(|e| match e {
        DeleteError::ShuttingDown => ApiError::Unavailable("The server is shutting down".into()),
        DeleteError::Store(e) => ApiError::Storage(e),
    })?;
    Ok(HttpResponse::Ok().json(deleted))
}

fn not_found_status(id: &str) -> ApiError {
    ApiError::Exact(
        actix_web::http::StatusCode::NOT_FOUND,
        schema::to_value(&ConversationNotFound {
            status: ErrorStatus::Error,
            conversation_id: id.to_string(),
        }),
    )
}

/// `POST /api/conversations/{id}/start` with `{}` or `{"providers_set": […]}`.
#[utoipa::path(
    post,
    path = "/api/conversations/{conversation_id}/start",
    tag = "conversations",
    operation_id = "start_conversation",
    summary = "Start a stopped conversation (or join a running one)",
    params(ConversationIdPath),
    request_body(content = ProvidersSetModel, content_type = "application/json", description = "Optional: an empty body, or `null`, is the same as `{}`"),
    responses(
        (status = 200, description = "Its live status", body = ConversationResponse),
        (status = 400, description = "The request body could not be read", body = ErrorDetail),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ConversationNotFound),
        (status = 413, description = "The request body is larger than `limits.max_body_bytes`", body = ErrorDetail),
        (status = 422, description = "Validation error", body = HttpValidationError),
        (status = 429, description = "Too many conversations are running (`limits.on_limit = \"reject\"`)", body = ErrorMessage, example = json!({"status": "error", "message": crate::events::TOO_MANY_CONVERSATIONS_MESSAGE, "msg_id": crate::events::TOO_MANY_CONVERSATIONS})),
        (status = 500, description = "Internal error", body = ErrorDetail, example = json!({"detail": "Internal Server Error"})),
        (status = 503, description = "The store failed (`Storage error: …`), the server is shutting down, or the conversation is restarting; try again", body = ErrorDetail),
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn start(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    let body = read_body(payload, state.settings.limits.max_body_bytes).await?;
    // No body, or `null`, means no options.
    let trimmed = body.trim_ascii();
    if !trimmed.is_empty() && trimmed != b"null" {
        let obj = validation::parse_object_body(content_type(&req), &body)
            .map_err(ApiError::Validation)?;
        validation::parse_start_body(&obj).map_err(ApiError::Validation)?;
    }
    let Some(owner) = visible(&state, &caller, &id).await? else {
        return Err(not_found_status(&id));
    };
    let (_, status, _) =
        admit_and_join(&state, id.clone(), AdmitMode::LoadOnly, None, owner, false)
            .await
            .map_err(|e| match e {
                ApiError::NotFound(_) => not_found_status(&id),
                other => other,
            })?;
    Ok(HttpResponse::Ok().json(conversation_response(&id, status, None)))
}

/// `POST /api/conversations/{id}/stop`.
#[utoipa::path(
    post,
    path = "/api/conversations/{conversation_id}/stop",
    tag = "conversations",
    operation_id = "stop_conversation",
    summary = "Stop a conversation",
    params(ConversationIdPath),
    responses(
        (status = 200, description = "Stopped (`message` says whether it was running)", body = ConversationResponse),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ConversationNotFound),
        (status = 422, description = "Invalid `conversation_id`", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn stop(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    let Some(owner) = visible(&state, &caller, &id).await? else {
        return Err(not_found_status(&id));
    };
    let message = match live_of(&state, &id, &owner) {
        Some(conversation) => {
            conversation.stop(StopReason::User).await;
            "Conversation stopped successfully"
        }
        None => {
            owned_here(&state, &id).await?;
            "Conversation was not running"
        }
    };
    Ok(HttpResponse::Ok().json(conversation_response(
        &id,
        ConversationStatus::Stopped,
        Some(message.to_string()),
    )))
}

/// `GET /api/conversations/{id}/events?start_id=&end_id=&reverse=&limit=`.
#[utoipa::path(
    get,
    path = "/api/conversations/{conversation_id}/events",
    tag = "conversations",
    operation_id = "search_events",
    summary = "Read a page of events",
    params(ConversationIdPath, EventsQuery),
    responses(
        (status = 200, description = "A page of events", body = EventsPage),
        (status = 400, description = "Invalid `limit`", body = ErrorDetail, example = json!({"detail": "Invalid limit"})),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ErrorDetail),
        (status = 422, description = "Invalid `conversation_id` or query parameter", body = HttpValidationError),
        StoreFailed,
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn events(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    let pairs = query_pairs(&req)?;
    let limit = page_limit(&pairs)?;
    let start_id = query_int(&pairs, "start_id")?.unwrap_or(0);
    let end_id = query_int(&pairs, "end_id")?;
    let reverse = match query_get(&pairs, "reverse")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("false" | "0" | "no" | "off") => false,
        Some("true" | "1" | "yes" | "on") => true,
        Some(other) => {
            return Err(ApiError::one(FieldError::new(
                "bool_parsing",
                vec![json!("query"), json!("reverse")],
                "Input should be a valid boolean, unable to interpret input",
                json!(other),
            )))
        }
    };
    require_conversation(&state, &caller, &id).await?;
    let query = EventQuery {
        start_id,
        end_id,
        reverse,
        limit: limit + 1,
    };
    let mut events = state.store.events(&id, query).await?;
    let has_more = events.len() > limit;
    events.truncate(limit);
    // The stored JSON texts are spliced in as they are: no re-encoding.
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(EventsPage::render(&events, has_more)))
}

/// The conversation's owner; 404 `{"detail": "Conversation <id> not found"}` unless it is
/// live or stored and the caller may see it.
pub(super) async fn require_conversation(
    state: &AppState,
    caller: &Caller,
    id: &ConversationId,
) -> Result<Owner, ApiError> {
    visible(state, caller, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("Conversation {id} not found")))
}

/// The live conversation `id` when it is `owner`'s.
fn live_of(state: &AppState, id: &ConversationId, owner: &Owner) -> Option<ConversationHandle> {
    state
        .supervisor
        .live(id)
        .filter(|c| c.shared().owner() == owner.as_ref())
}

/// `POST /api/conversations/{id}/events` with a user action: same as the socket's
/// `oh_user_action`. A stopped conversation is started again first.
#[utoipa::path(
    post,
    path = "/api/conversations/{conversation_id}/events",
    tag = "conversations",
    operation_id = "add_event",
    summary = "Send a user action (starts a stopped conversation first)",
    params(ConversationIdPath),
    request_body(content = UserAction, content_type = "application/json"),
    responses(
        (status = 200, description = "Accepted", body = ActionAccepted, example = json!({"success": true})),
        (status = 400, description = "The request body could not be read", body = ErrorDetail),
        Unauthorized,
        (status = 404, description = "Unknown conversation", body = ErrorDetail),
        (status = 409, description = "The conversation refused the action (event limit reached, or it is stopping)", body = ActionRefused),
        (status = 413, description = "The request body is larger than `limits.max_body_bytes`", body = ErrorDetail),
        (status = 422, description = "Validation error", body = HttpValidationError),
        (status = 429, description = "Too many conversations are running (`limits.on_limit = \"reject\"`)", body = ErrorMessage, example = json!({"status": "error", "message": crate::events::TOO_MANY_CONVERSATIONS_MESSAGE, "msg_id": crate::events::TOO_MANY_CONVERSATIONS})),
        (status = 500, description = "Internal error", body = ErrorDetail, example = json!({"detail": "Internal Server Error"})),
        (status = 503, description = "The store failed (`Storage error: …`), the server is shutting down, or the conversation is restarting; try again", body = ErrorDetail),
    ),
    security(("APIKeyHeader" = [])),
)]
pub async fn post_event(
    state: web::Data<AppState>,
    caller: web::ReqData<Caller>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&path)?;
    let body = read_body(payload, state.settings.limits.max_body_bytes).await?;
    let obj =
        validation::parse_object_body(content_type(&req), &body).map_err(ApiError::Validation)?;
    let event = validation::parse_user_action(&Value::Object(obj.clone())).map_err(|why| {
        ApiError::one(FieldError::value_error(
            vec![json!("body")],
            &why,
            Value::Object(obj),
        ))
    })?;
    let owner = require_conversation(&state, &caller, &id).await?;
    let conversation = match live_of(&state, &id, &owner) {
        Some(c) => c,
        None => {
            admit_and_join(&state, id.clone(), AdmitMode::LoadOnly, None, owner, false)
                .await?
                .0
        }
    };
    match conversation.user_action(event).await {
        Ok(()) => Ok(HttpResponse::Ok().json(ActionAccepted { success: true })),
        Err(ConversationError::Refused(why)) => Err(refused(why)),
        Err(ConversationError::NotFound) => {
            Err(ApiError::NotFound(format!("Conversation {id} not found")))
        }
        Err(ConversationError::Stopping) => Err(refused("The conversation is stopping".into())),
        Err(ConversationError::Storage(e)) => Err(ApiError::Storage(e)),
        Err(ConversationError::OverQuota(quota, why)) => Err(ApiError::OverQuota(quota, why)),
        Err(ConversationError::Elsewhere(owner)) => Err(ApiError::Elsewhere(id.to_string(), owner)),
        Err(ConversationError::Admit(e)) => Err(admit_error(e, &state.settings.limits)),
    }
}

fn refused(detail: String) -> ApiError {
    ApiError::Exact(
        actix_web::http::StatusCode::CONFLICT,
        schema::to_value(&ActionRefused {
            success: false,
            detail,
        }),
    )
}
