//! Every error an HTTP route or socket handshake can answer, and its exact status and JSON
//! body: [`ApiError`], with the bodies it answers in ([`FieldError`] entries of a 422's
//! pydantic-shaped `detail`, [`ErrorMessage`]). The API's contract lists these bodies too
//! ([`crate::api::schema`]); they are defined here, below every route.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::{json, Value};

use actix_web::http::header;

use crate::conversation::ConversationId;
use crate::events::TOO_MANY_CONVERSATIONS;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One entry of a 422 `detail` list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub loc: Vec<Value>,
    pub msg: String,
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Value>,
}

impl FieldError {
    pub fn new(kind: &'static str, loc: Vec<Value>, msg: impl Into<String>, input: Value) -> Self {
        FieldError {
            kind,
            loc,
            msg: msg.into(),
            input,
            ctx: None,
        }
    }

    pub fn value_error(loc: Vec<Value>, msg: &str, input: Value) -> Self {
        let mut e = FieldError::new("value_error", loc, format!("Value error, {msg}"), input);
        e.ctx = Some(json!({"error": msg}));
        e
    }
}

/// `"error"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ErrorStatus {
    #[serde(rename = "error")]
    Error,
}

/// `{"status":"error","message":…,"msg_id":…}`: too many conversations or the client's
/// creation rate limit (429, the latter with `retry_after_secs`), or an unknown conversation on
/// `PATCH` (404).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorMessage {
    #[schema(inline)]
    pub status: ErrorStatus,
    pub message: String,
    pub msg_id: String,
    /// Seconds until the client may create again (also the `Retry-After` header); only on the
    /// creation rate limit's 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

/// The id at `loc` as a [`ConversationId`], or the 422 entry stating the rule.
pub fn conversation_id(id: &str, loc: Vec<Value>) -> Result<ConversationId, Box<FieldError>> {
    ConversationId::parse(id)
        .map_err(|e| Box::new(FieldError::value_error(loc, &e.to_string(), json!(id))))
}

/// A body as the JSON value an error answers with.
fn body_value<T: Serialize>(body: &T) -> Value {
    serde_json::to_value(body).unwrap_or(Value::Null)
}

/// `msg_id` of the creation rate limit's 429.
pub const CREATE_RATE_LIMITED: &str = "SWITCHBOARD$CREATE_RATE_LIMITED";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 422 with pydantic-shaped `detail`.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// 401 `{"detail":"Unauthorized"}`.
    #[error("unauthorized")]
    Unauthorized,
    /// 400 `{"detail": …}`.
    #[error("{0}")]
    BadRequest(String),
    /// 404 `{"detail": …}`.
    #[error("{0}")]
    NotFound(String),
    /// 413 `{"detail": …}`.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 408 `{"detail": …}`: the body did not arrive in time; the connection is closed.
    #[error("Request body not received within {0} s (limits.body_timeout_secs)")]
    BodyTimeout(u64),
    /// 503 `{"detail": …}` with `Retry-After`: too many bodies are arriving at once.
    #[error(
        "Too many request bodies are arriving at once (limits.max_pending_body_bytes); \
         try again shortly"
    )]
    BodiesBusy,
    /// 429 with the OpenHands too-many-conversations body.
    #[error("too many conversations")]
    TooManyConversations,
    /// 429 with `Retry-After`: the client's creation rate limit.
    #[error("too many new conversations from this client")]
    RateLimited {
        retry_after_secs: u64,
        rate_per_sec: u32,
        burst: u32,
    },
    /// 503 `{"detail": …}`.
    #[error("{0}")]
    Unavailable(String),
    /// 503 `{"detail": "Storage error: …"}`: the store failed (disk full, I/O error); the
    /// store's error is kept as the source.
    #[error("Storage error: {0}")]
    Storage(#[source] crate::store::StoreError),
    /// 413 (the conversation's quota) or 507 (the store's) `{"detail": …}`: nothing was stored.
    #[error("{1}")]
    OverQuota(crate::store::Quota, String),
    /// A status with an exact body (OpenHands' route-specific shapes).
    #[error("{0}")]
    Exact(StatusCode, Value),
    /// 503 `{"detail": …}`: another live cluster node owns the conversation. The response
    /// carries the owner (an extension) for [`crate::http::forward`], which sends the request on.
    #[error("Conversation {0} is owned by cluster node {node} ({url})", node = .1.node_id, url = .1.url)]
    Elsewhere(String, crate::store::NodeAddress),
    /// 500; the cause (typed, with its own sources) is logged, not shown.
    #[error("internal error: {0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What was being done when `source` failed: an [`ApiError::Internal`]'s cause.
#[derive(Debug, thiserror::Error)]
#[error("{doing}: {source}")]
pub struct InternalCause {
    doing: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl ApiError {
    /// A 500 whose cause is `source`, which failed while doing `doing`.
    pub fn internal(
        doing: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> ApiError {
        ApiError::Internal(Box::new(InternalCause {
            doing,
            source: source.into(),
        }))
    }

    pub fn one(error: FieldError) -> Self {
        ApiError::Validation(vec![error])
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::BodiesBusy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyConversations | ApiError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable(_) | ApiError::Storage(_) | ApiError::Elsewhere(..) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::OverQuota(crate::store::Quota::Conversation, _) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::OverQuota(crate::store::Quota::Store, _) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Exact(status, _) => *status,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let body = match self {
            ApiError::Validation(errors) => json!({ "detail": errors }),
            ApiError::Unauthorized => json!({"detail": "Unauthorized"}),
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::Unavailable(m)
            | ApiError::OverQuota(_, m) => {
                json!({ "detail": m })
            }
            ApiError::PayloadTooLarge(_)
            | ApiError::Storage(_)
            | ApiError::BodyTimeout(_)
            | ApiError::BodiesBusy => {
                json!({ "detail": self.to_string() })
            }
            ApiError::Elsewhere(_, owner) => {
                let mut response = HttpResponse::build(self.status_code());
                response.extensions_mut().insert(owner.clone());
                return response.json(json!({ "detail": self.to_string() }));
            }
            ApiError::TooManyConversations => json!({
                "status": "error",
                "message": crate::events::TOO_MANY_CONVERSATIONS_MESSAGE,
                "msg_id": TOO_MANY_CONVERSATIONS,
            }),
            ApiError::RateLimited {
                retry_after_secs,
                rate_per_sec,
                burst,
            } => {
                let body = body_value(&ErrorMessage {
                    status: ErrorStatus::Error,
                    message: format!(
                        "Too many new conversations from this client: at most {rate_per_sec} \
                         per second ({burst} at once). Try again in {retry_after_secs} s."
                    ),
                    msg_id: CREATE_RATE_LIMITED.into(),
                    retry_after_secs: Some(*retry_after_secs),
                });
                return HttpResponse::build(self.status_code())
                    .insert_header((header::RETRY_AFTER, retry_after_secs.to_string()))
                    .json(body);
            }
            ApiError::Exact(_, body) => body.clone(),
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                json!({"detail": "Internal Server Error"})
            }
        };
        let mut response = HttpResponse::build(self.status_code());
        match self {
            // The rest of the body may still be on its way: do not read it, close.
            ApiError::BodyTimeout(_) | ApiError::PayloadTooLarge(_) => {
                response.force_close();
            }
            ApiError::BodiesBusy => {
                response
                    .force_close()
                    .insert_header((actix_web::http::header::RETRY_AFTER, "1"));
            }
            _ => {}
        }
        response.json(body)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        if let crate::store::StoreError::QuotaExceeded { quota, message } = e {
            return ApiError::OverQuota(quota, message);
        }
        tracing::error!(error = %e, "store operation failed");
        ApiError::Storage(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 500 keeps its cause (what was being done, and the system's error under it) for the
    /// log, and shows the client only the generic body.
    #[actix_web::test]
    async fn an_internal_error_keeps_its_cause_and_shows_none() {
        let error = ApiError::internal(
            "cannot create the working directory",
            std::io::Error::other("disk full"),
        );
        assert_eq!(
            error.to_string(),
            "internal error: cannot create the working directory: disk full"
        );
        let mut chain =
            std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            });
        assert!(chain.any(|e| e.downcast_ref::<std::io::Error>().is_some()));
        let response = error.error_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = actix_web::body::to_bytes(response.into_body())
            .await
            .expect("body");
        assert_eq!(body, r#"{"detail":"Internal Server Error"}"#);
    }
}
