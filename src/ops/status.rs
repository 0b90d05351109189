//! The operators' page: `GET /status` and the JSON it reads, `GET /api/status`.
//!
//! The page is one HTML file compiled into the binary (`status.html`, no build step, nothing
//! fetched from elsewhere). It polls `/api/status` and tails one conversation's events over
//! the plain socket route (`/ws/conversations/{id}`). Both sit behind the key check the usual
//! way ([`crate::http::auth`]): `/api/status` under `/api`'s check and for admins only (it
//! lists every user's conversations), the page under the cookie login (a browser without
//! credentials is sent to `/login`).
//!
//! `/api/status` reads what the metrics read, at request time and without an actor hop: the
//! supervisor's registry (conversations by status, attached clients), the process-wide
//! counters ([`super::metrics::metrics`]) and the store's byte count. It lists at most
//! [`STATUS_ROWS`] live conversations, the most recently active first (ordered by the registry's
//! own activity time, so only the listed ones are read from the store for their owner, title,
//! age and event count): a poll every 2 s costs the same with 100 or 10,000 live
//! conversations. Events per second are the page's own difference of `events_appended`
//! between two polls.

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use serde_json::json;

use super::metrics::metrics;
use crate::actors::now_ms;
use crate::conversation::ConversationStatus;
use crate::http::{ApiError, AppState};

/// Most live conversations one `/api/status` answer lists.
pub const STATUS_ROWS: usize = 100;

/// The page, compiled in.
const PAGE: &str = include_str!("status.html");

/// One live conversation as `/api/status` lists it.
#[derive(Debug, Serialize)]
struct Row {
    conversation_id: String,
    /// `STARTING`, `RUNNING`, or `STOPPED` while its runtime is being released.
    status: ConversationStatus,
    title: Option<String>,
    owner: Option<String>,
    clients: u32,
    /// Events in its log (the id its next event gets).
    events: Option<u64>,
    created_at: Option<String>,
    /// Seconds since it was created.
    age_seconds: Option<i64>,
    /// Seconds since a client or the agent last did something.
    idle_seconds: u64,
}

/// `GET /api/status`: totals and the [`STATUS_ROWS`] most recently active live conversations.
/// For admins only (a user key gets 403): it shows every user's conversations.
pub async fn api_status(
    state: web::Data<AppState>,
    caller: web::ReqData<crate::http::auth::Caller>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let census = state.supervisor.census();
    let mut live = state.supervisor.conversations();
    let live_count = live.len();
    live.sort_by(|(a_id, a), (b_id, b)| {
        b.last_active_ms()
            .cmp(&a.last_active_ms())
            .then_with(|| a_id.cmp(b_id))
    });
    live.truncate(STATUS_ROWS);
    let records =
        futures_util::future::join_all(live.iter().map(|(id, _)| state.store.get(id))).await;
    let now = chrono::Utc::now();
    let now_ms = now_ms();
    let rows: Vec<Row> = live
        .iter()
        .zip(records)
        .map(|((id, shared), record)| {
            // A store error for one row leaves its stored fields empty; the rest still show.
            let record = record.ok().flatten();
            let created_at = record.as_ref().map(|r| r.meta.created_at.clone());
            let age_seconds = created_at.as_deref().and_then(|c| {
                chrono::DateTime::parse_from_rfc3339(c)
                    .ok()
                    .map(|t| (now - t.with_timezone(&chrono::Utc)).num_seconds().max(0))
            });
            Row {
                conversation_id: id.to_string(),
                status: shared.status(),
                title: record.as_ref().map(|r| r.meta.title.clone()),
                owner: record.as_ref().and_then(|r| r.meta.owner.clone()),
                clients: shared.connections(),
                events: record.as_ref().map(|r| r.next_event_id),
                created_at,
                age_seconds,
                idle_seconds: now_ms.saturating_sub(shared.last_active_ms()) / 1000,
            }
        })
        .collect();
    let m = metrics();
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": (now.timestamp_millis() as f64 / 1000.0 - m.start_time()).max(0.0).round(),
        "totals": {
            "running": census.running,
            "starting": census.starting,
            "stopping": census.stopping,
            "clients": census.clients,
            "events_appended": m.events_appended.get(),
            "store_bytes": state.store.used_bytes(),
            "live": live_count,
        },
        "conversations": rows,
    });
    Ok(HttpResponse::Ok().json(body))
}

/// `GET /status`: the page.
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(PAGE)
}
