//! Forwarding commands to the cluster node that owns their conversation.
//!
//! On the PostgreSQL store with a `[cluster] cluster_key`, a command for a conversation (any
//! `/api/conversations/…` request but a read: POST, PATCH, DELETE) that this node cannot serve
//! because another live node owns the conversation ([`ApiError::Elsewhere`]) is sent on to that
//! node over HTTP, with the caller's own credentials and the cluster key
//! ([`CLUSTER_KEY_HEADER`]), and the owner's answer is the caller's answer: a 200 means the
//! owner handled it. Promises:
//!
//! - **Never forwarded twice.** A request carrying the cluster key is never forwarded again: a
//!   node that does not own its conversation (any more) answers it 421 Misdirected Request.
//!   The forwarding node then looks the owner up again, once, and forwards to the new owner if
//!   there is one; otherwise (or after a second 421) the caller gets 503 and retries.
//! - **A wrong cluster key is refused** with 403 and nothing is done.
//! - An owner that cannot be reached answers 503 (the caller retries; once the owner's
//!   registration has expired, another node takes the conversation over).
//! - **Connections to the owners are kept.** Each HTTP worker holds one client ([`Peers`], in
//!   the app data) whose pooled connections are reused by the commands it forwards next: at
//!   most [`PEER_CONNECTIONS`] at once per worker (more wait for one, within the forward
//!   timeout), each closed after [`PEER_IDLE`] unused, before the owner would close it.
//!
//! Sockets take the same way to the owner ([`to_owner`], [`caller_headers`]): see
//! [`crate::ws`]'s splice. A socket handshake carrying the cluster key is refused like a
//! command, 421 on a node that does not own its conversation.
//!
//! Reads (list, get, events) are never forwarded: every node reads the shared database (a
//! conversation another live node owns is shown running there, see
//! [`crate::store::Store::owned_elsewhere`]).

use std::future::Future;
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse, ResponseError};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::config::StoreKind;
use crate::conversation::ConversationId;
use crate::http::{ApiError, AppState};
use crate::store::NodeAddress;

/// The header a forwarded request carries the cluster key in.
pub const CLUSTER_KEY_HEADER: &str = "x-switchboard-cluster-key";

/// At most this many connections to other nodes are in use at once per HTTP worker; a
/// command forwarded while all are busy waits for one (within `forward_timeout_ms`).
pub const PEER_CONNECTIONS: usize = 64;

/// A kept connection to another node unused this long is closed: shorter than the 5 s an
/// idle connection stays open on the owner (actix-web's keep-alive), so that a command is
/// never sent on a connection the owner is closing.
pub const PEER_IDLE: Duration = Duration::from_secs(4);

/// The client one HTTP worker forwards commands with: its connections to the other nodes
/// are pooled and kept alive (see the module docs). Built once per worker, in the app data
/// (it is not `Send`).
#[derive(Clone)]
pub struct Peers(awc::Client);

impl Peers {
    pub fn new() -> Peers {
        let connector = awc::Connector::new()
            .limit(PEER_CONNECTIONS)
            .conn_keep_alive(PEER_IDLE);
        // Each request sets its own timeout (`forward_timeout_ms`).
        Peers(
            awc::Client::builder()
                .connector(connector)
                .disable_timeout()
                .finish(),
        )
    }
}

impl Default for Peers {
    fn default() -> Peers {
        Peers::new()
    }
}

/// The caller's headers a forwarded request keeps.
const KEPT_HEADERS: &[header::HeaderName] = &[
    header::CONTENT_TYPE,
    header::AUTHORIZATION,
    header::COOKIE,
    header::ACCEPT,
];

/// The middleware; see the module docs.
pub async fn forward(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    let key = &state.settings.cluster.cluster_key;
    if state.settings.store != StoreKind::Postgres || key.is_empty() {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    if let Some(presented) = req.headers().get(CLUSTER_KEY_HEADER) {
        if !bool::from(presented.as_bytes().ct_eq(key.as_bytes())) {
            let refused = refusal(StatusCode::FORBIDDEN, "wrong cluster key".into());
            return Ok(req.into_response(refused).map_into_boxed_body());
        }
        // Forwarded once already: never again.
        let res = next.call(req).await?;
        if let Some(owner) = elsewhere(&res) {
            let detail = format!(
                "this node does not own the conversation (cluster node {} does)",
                owner.node_id
            );
            let (req, _) = res.into_parts();
            let answer = refusal(StatusCode::MISDIRECTED_REQUEST, detail);
            return Ok(ServiceResponse::new(req, answer));
        }
        return Ok(res.map_into_boxed_body());
    }
    let command = match *req.method() {
        Method::POST => {
            req.path() == "/api/conversations" || req.path().starts_with("/api/conversations/")
        }
        Method::PATCH | Method::DELETE => req.path().starts_with("/api/conversations/"),
        _ => false,
    };
    if !command {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    // Kept, to send on if the owner is another node.
    let payload = req.extract::<web::Payload>().await?;
    let body = match crate::http::read_body(payload, state.settings.limits.max_body_bytes).await {
        Ok(body) => body.freeze(),
        Err(e) => return Ok(req.into_response(e.error_response()).map_into_boxed_body()),
    };
    req.set_payload(actix_web::dev::Payload::from(body.clone()));
    let res = next.call(req).await?;
    let Some(owner) = elsewhere(&res) else {
        return Ok(res.map_into_boxed_body());
    };
    let (req, _) = res.into_parts();
    let id = req
        .match_info()
        .get("conversation_id")
        .unwrap_or_default()
        .to_string();
    let timeout = Duration::from_millis(state.settings.cluster.forward_timeout_ms);
    let peers = req.app_data::<Peers>().cloned().unwrap_or_default();
    let attempt = |owner: NodeAddress| {
        let (req, body, peers) = (&req, body.clone(), &peers);
        async move {
            match send(peers, req, &owner, key, body, timeout).await {
                Ok(answer) if answer.status() == StatusCode::MISDIRECTED_REQUEST => {
                    Attempt::Misdirected
                }
                Ok(answer) => Attempt::Answered(answer),
                Err(why) => Attempt::Unreachable(why),
            }
        }
    };
    let answer = match to_owner(&state, &id, owner, attempt).await {
        Ok(answer) | Err(answer) => answer,
    };
    Ok(ServiceResponse::new(req, answer))
}

/// What one attempt to reach a conversation's owner came to.
pub(crate) enum Attempt<T> {
    /// The owner answered; its answer.
    Answered(T),
    /// The node does not own the conversation (any more): it answered 421.
    Misdirected,
    /// The node could not be reached; why.
    Unreachable(String),
}

/// Tries `attempt` on `owner`, conversation `id`'s owner as this node last saw it. After a 421
/// it looks the owner up again, once, and tries the new one; no owner, the same one, a second
/// 421 or an owner that cannot be reached is the 503 the caller gets (and retries).
pub(crate) async fn to_owner<T, F, Fut>(
    state: &AppState,
    id: &str,
    mut owner: NodeAddress,
    mut attempt: F,
) -> Result<T, HttpResponse>
where
    F: FnMut(NodeAddress) -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let mut reresolved = false;
    loop {
        match attempt(owner.clone()).await {
            Attempt::Answered(answer) => return Ok(answer),
            Attempt::Misdirected if !reresolved => {
                // Ownership moved meanwhile: look the owner up again, once.
                reresolved = true;
                let found = match ConversationId::parse(id) {
                    Ok(id) => state.store.owner(&id).await,
                    Err(_) => Ok(None),
                };
                match found {
                    Ok(Some(next)) if next.url != owner.url => owner = next,
                    _ => return Err(unavailable(id, "its ownership is moving")),
                }
            }
            Attempt::Misdirected => return Err(unavailable(id, "its ownership is moving")),
            Attempt::Unreachable(why) => {
                tracing::warn!(conversation_id = %id, owner = %owner.node_id, url = %owner.url, error = %why, "cannot reach the owner");
                return Err(unavailable(
                    id,
                    &format!("its owner {} cannot be reached", owner.node_id),
                ));
            }
        }
    }
}

/// The caller's headers a request sent on to the owner keeps: its credentials (the key
/// header, `Authorization`, cookies) and what its body is.
pub(crate) fn caller_headers(
    req: &actix_web::HttpRequest,
) -> Vec<(header::HeaderName, header::HeaderValue)> {
    let key = header::HeaderName::from_bytes(crate::http::auth::KEY_HEADER.as_bytes()).ok();
    KEPT_HEADERS
        .iter()
        .cloned()
        .chain(key)
        .filter_map(|name| {
            let value = req.headers().get(&name)?.clone();
            Some((name, value))
        })
        .collect()
}

/// The owner a response says the conversation has, when it was refused for that.
fn elsewhere<B>(res: &ServiceResponse<B>) -> Option<NodeAddress> {
    res.response().extensions().get::<NodeAddress>().cloned()
}

/// Sends the request on to `owner` over one of `peers`' connections; its answer as this
/// node's, if it comes within `timeout`.
async fn send(
    peers: &Peers,
    req: &actix_web::HttpRequest,
    owner: &NodeAddress,
    key: &str,
    body: web::Bytes,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    if owner.url.is_empty() {
        return Err("it has no address".into());
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or(req.path(), |p| p.as_str());
    let mut out = peers
        .0
        .request(req.method().clone(), format!("{}{path}", owner.url))
        .timeout(timeout)
        .insert_header((CLUSTER_KEY_HEADER, key));
    for (name, value) in caller_headers(req) {
        out = out.insert_header((name, value));
    }
    let mut answer = out.send_body(body).await.map_err(|e| e.to_string())?;
    let bytes = answer
        .body()
        .limit(64 * 1024 * 1024)
        .await
        .map_err(|e| e.to_string())?;
    let mut response = HttpResponse::build(answer.status());
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
        if let Some(value) = answer.headers().get(&name) {
            response.insert_header((name, value.clone()));
        }
    }
    Ok(response.body(bytes))
}

pub(crate) fn unavailable(id: &str, why: &str) -> HttpResponse {
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("Conversation {id} is served by another cluster node, but {why}; try again"),
    )
}

fn refusal(status: StatusCode, detail: String) -> HttpResponse {
    ApiError::Exact(status, json!({ "detail": detail })).error_response()
}
