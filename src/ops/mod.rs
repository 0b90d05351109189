//! What an operator runs switchboard with: readiness, metrics and request tracing.
//!
//! - [`Readiness`] and `GET /ready`: 503 while the server is starting (until the store has
//!   answered a first write probe), while it drains after a shutdown signal, and whenever the
//!   store cannot write (a probe through the store's writer, at most one per second, its result
//!   shared by the requests in between); 200 otherwise. `/alive` and `/health` stay liveness
//!   probes.
//! - `GET /metrics` ([`metrics`]): the Prometheus text exposition, behind the session key when
//!   one is set and `metrics.require_key` is on (header `X-Session-API-Key` or
//!   `Authorization: Bearer <key>`).
//! - [`request::observe`]: request ids, spans, access log lines and request metrics.
//! - `GET /status` and `GET /api/status` ([`status`]): the operators' page and its JSON.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use prometheus_client::registry::Registry;

use crate::actors::SupervisorHandle;
use crate::config::Settings;
use crate::store::Store;

pub mod metrics;
pub mod request;
pub mod status;

/// How long a store probe's answer is reused.
const PROBE_EVERY_MS: u64 = 1000;
/// A store that has not answered a probe by then cannot write.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Ready = 1,
    Draining = 2,
}

/// Whether the server should receive traffic.
pub struct Readiness {
    phase: AtomicU8,
    store: Arc<dyn Store>,
    /// `now_ms` of the last probe (0: never).
    probed_at: AtomicU64,
    store_ok: AtomicBool,
    store_error: std::sync::Mutex<String>,
}

impl Readiness {
    pub fn new(store: Arc<dyn Store>) -> Arc<Readiness> {
        Arc::new(Readiness {
            phase: AtomicU8::new(Phase::Starting as u8),
            store,
            probed_at: AtomicU64::new(0),
            store_ok: AtomicBool::new(false),
            store_error: std::sync::Mutex::new(String::new()),
        })
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    /// Starting → ready; never leaves draining.
    pub fn set_ready(&self) {
        let _ = self.phase.compare_exchange(
            Phase::Starting as u8,
            Phase::Ready as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// From now on `/ready` says 503.
    pub fn set_draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::Release);
    }

    /// Whether this node has fenced itself from its cluster (never on a single-node store).
    pub fn fenced(&self) -> bool {
        self.store
            .membership()
            .is_some_and(|m| *m.borrow() == crate::store::Membership::Fenced)
    }

    /// Probes the store now (a write through its writer), remembering the answer.
    pub async fn probe_store(&self) -> Result<(), String> {
        let result = match tokio::time::timeout(PROBE_TIMEOUT, self.store.probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the store did not answer a write probe within {} s",
                PROBE_TIMEOUT.as_secs()
            )),
        };
        if let Err(e) = &result {
            *self.store_error.lock().unwrap_or_else(|p| p.into_inner()) = e.clone();
        }
        self.store_ok.store(result.is_ok(), Ordering::Release);
        self.probed_at
            .store(crate::actors::now_ms().max(1), Ordering::Release);
        result
    }

    /// The store's health, probing it when the last answer is older than a second.
    async fn store_health(&self) -> Result<(), String> {
        let last = self.probed_at.load(Ordering::Acquire);
        if last != 0 && crate::actors::now_ms().saturating_sub(last) < PROBE_EVERY_MS {
            return if self.store_ok.load(Ordering::Acquire) {
                Ok(())
            } else {
                Err(self
                    .store_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone())
            };
        }
        self.probe_store().await
    }
}

/// What the operations routes share (registered as app data next to the API's state).
pub struct Ops {
    pub readiness: Arc<Readiness>,
    registry: Registry,
    process_registry: Registry,
    settings: Arc<Settings>,
}

impl Ops {
    pub fn new(
        settings: Arc<Settings>,
        readiness: Arc<Readiness>,
        supervisor: SupervisorHandle,
    ) -> Ops {
        Ops {
            readiness,
            registry: metrics::registry(supervisor),
            process_registry: metrics::process_registry(),
            settings,
        }
    }
}

/// Registers `/ready`, `/metrics` and the `/status` page (its JSON is under `/api`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::http::resource("/ready", "GET").route(web::get().to(ready)))
        .service(crate::http::resource("/metrics", "GET").route(web::get().to(scrape)))
        .service(crate::http::resource("/status", "GET").route(web::get().to(status::page)));
}

async fn ready(ops: web::Data<Ops>) -> HttpResponse {
    let unavailable = |status: &str, detail: &str| {
        HttpResponse::ServiceUnavailable()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(serde_json::json!({"status": status, "detail": detail}))
    };
    match ops.readiness.phase() {
        Phase::Starting => unavailable("starting", "the server is starting"),
        Phase::Draining => unavailable("draining", "the server is shutting down"),
        Phase::Ready if ops.readiness.fenced() => unavailable(
            "fenced",
            "this node lost its cluster membership and is registering again",
        ),
        Phase::Ready => match ops.readiness.store_health().await {
            Ok(()) => HttpResponse::Ok()
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .json(serde_json::json!({"status": "ready"})),
            Err(e) => unavailable("store_unavailable", &e),
        },
    }
}

/// `/metrics`: behind an admin key (the session key or an admin user key) when
/// `metrics.require_key` (a scraper may send it as `Authorization: Bearer <key>`, see
/// [`crate::http::auth`]); a user key gets 403.
async fn scrape(
    req: HttpRequest,
    ops: web::Data<Ops>,
    state: web::Data<crate::http::AppState>,
) -> HttpResponse {
    if ops.settings.metrics.require_key {
        use actix_web::ResponseError;
        let allowed = state
            .auth
            .authenticate(&req)
            .await
            .and_then(|caller| caller.require_admin());
        if let Err(refused) = allowed {
            return refused.error_response();
        }
    }
    match metrics::encode(&[&ops.registry, &ops.process_registry]) {
        Ok(text) => HttpResponse::Ok()
            .content_type(metrics::CONTENT_TYPE)
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(text),
        Err(_) => HttpResponse::InternalServerError().json(serde_json::json!({
            "detail": "could not encode the metrics"
        })),
    }
}
