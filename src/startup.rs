//! Builds and runs the server from [`Settings`]: the store, the supervisor, the HTTP server.
//!
//! Building first sweeps the processes agents of a previous run on the same data directory left
//! behind (see [`crate::runtime::process_tree`]). [`Application::build`] binds the listener (port 0 picks a free one, which the tests use) and
//! must run inside an actix `System`. [`Application::run_until_stopped`] serves until the HTTP
//! server stops (SIGINT/SIGTERM, or [`ServerHandle::stop`]), then stops every conversation
//! through the supervisor and flushes the store, so nothing accepted is lost.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_cors::Cors;
use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, App, HttpServer};

use crate::actors::supervisor::Supervisor;
use crate::actors::SupervisorHandle;
use crate::api::{self, AppState};
use crate::config::{Settings, StoreKind};
use crate::store::{MemoryStore, SqliteStore, Store};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(String),
}

/// A built, bound, not yet running server.
pub struct Application {
    port: u16,
    host: String,
    server: Server,
    supervisor: SupervisorHandle,
    store: Arc<dyn Store>,
    /// Held for the process's life: one server per data directory.
    _data_dir_lock: Option<std::fs::File>,
}

/// Opens the store the settings ask for.
pub fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StartupError> {
    match settings.store {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new())),
        StoreKind::Sqlite => SqliteStore::open(&settings.data_dir, &settings.store_tuning)
            .map(|store| Arc::new(store) as Arc<dyn Store>)
            .map_err(|e| StartupError::Store(e.to_string())),
    }
}

/// Takes the data directory's lock file, so that two servers never share one database. Only the
/// durable store has a data directory to protect; a directory that cannot be created is left
/// for the store to report.
pub fn lock_data_dir(settings: &Settings) -> Result<Option<std::fs::File>, StartupError> {
    if settings.store != StoreKind::Sqlite || std::fs::create_dir_all(&settings.data_dir).is_err() {
        return Ok(None);
    }
    let path = settings.data_dir.join("switchboard.lock");
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    else {
        return Ok(None);
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartupError::Store(format!(
            "the data directory {} is in use by another switchboard process (lock {})",
            settings.data_dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(error = %e, "cannot lock the data directory; continuing without");
            Ok(None)
        }
    }
}

fn cors(settings: &Settings) -> Cors {
    let allowed = settings.cors_allowed_origins.clone();
    Cors::default()
        .allowed_origin_fn(move |origin, _| {
            let Ok(origin) = origin.to_str() else {
                return false;
            };
            if allowed.is_empty() {
                is_local_origin(origin)
            } else {
                allowed.iter().any(|a| a == origin)
            }
        })
        .allow_any_method()
        .allow_any_header()
        .max_age(3600)
}

/// `http://localhost[:port]` or `http://127.0.0.1[:port]`.
fn is_local_origin(origin: &str) -> bool {
    ["http://localhost", "http://127.0.0.1"]
        .iter()
        .any(|prefix| {
            origin.strip_prefix(prefix).is_some_and(|rest| {
                rest.is_empty()
                    || rest
                        .strip_prefix(':')
                        .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            })
        })
}

impl Application {
    /// Opens the store, starts the supervisor and binds the HTTP listener.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let lock = lock_data_dir(&settings)?;
        let store = open_store(&settings)?;
        let mut app = Self::build_with_store(settings, store).await?;
        app._data_dir_lock = lock;
        Ok(app)
    }

    /// Like [`Application::build`] with an already opened store.
    pub async fn build_with_store(
        settings: Settings,
        store: Arc<dyn Store>,
    ) -> Result<Application, StartupError> {
        let settings = Arc::new(settings);
        // Whatever agents of a previous run on this data directory left running ends here.
        crate::runtime::process_tree::sweep(&settings.data_dir);
        let addr = format!("{}:{}", settings.host, settings.port);
        let listener = TcpListener::bind(&addr).map_err(|source| StartupError::Bind {
            addr: addr.clone(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                addr: addr.clone(),
                source,
            })?
            .port();
        let supervisor = Supervisor::start(settings.clone(), store.clone());
        let state = web::Data::new(AppState {
            settings: settings.clone(),
            store: store.clone(),
            supervisor: supervisor.clone(),
        });
        let cors_settings = settings.clone();
        let frontend =
            (!settings.frontend.dir.as_os_str().is_empty()).then(|| settings.frontend.dir.clone());
        if let Some(dir) = &frontend {
            tracing::info!(dir = %dir.display(), "serving the web app at /");
        }
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(cors(&cors_settings))
                .configure(api::configure)
                .configure(crate::ws::configure)
                .configure(|cfg| {
                    if let Some(dir) = &frontend {
                        crate::frontend::configure(cfg, dir);
                    }
                })
                .default_service(web::to(api::not_found))
        })
        .shutdown_timeout(settings.limits.shutdown_timeout_secs)
        // Small frames (events) must not wait for the peer's delayed ACK.
        .tcp_nodelay(true)
        .disable_signals()
        .listen(listener)
        .map_err(|source| StartupError::Bind {
            addr: addr.clone(),
            source,
        })?;
        if settings.workers > 0 {
            server = server.workers(settings.workers);
        }
        Ok(Application {
            port,
            host: settings.host.clone(),
            server: server.run(),
            supervisor,
            store,
            _data_dir_lock: None,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// Stops the HTTP server (gracefully or not) from elsewhere.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Stops the server gracefully on SIGINT or SIGTERM (both mean "finish what was accepted").
    /// The signal handlers are installed before this returns.
    pub fn stop_on_signals(&self) {
        let handle = self.server.handle();
        let signal = shutdown_signal();
        actix_web::rt::spawn(async move {
            signal.await;
            tracing::info!("shutdown signal received; finishing in-flight requests");
            handle.stop(true).await;
        });
    }

    /// Serves until stopped, then stops every conversation and flushes the store.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        tracing::info!("HTTP server stopped; stopping conversations");
        self.supervisor.shutdown().await;
        match tokio::time::timeout(Duration::from_secs(30), self.store.flush()).await {
            Ok(Ok(())) => tracing::info!("store flushed; goodbye"),
            Ok(Err(e)) => tracing::error!(error = %e, "store flush failed"),
            Err(_) => tracing::error!("store flush timed out"),
        }
        result
    }
}

/// Registers for SIGINT and SIGTERM now; the future completes on the first of them.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        match handlers {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::is_local_origin;

    #[test]
    fn local_origins() {
        assert!(is_local_origin("http://localhost:3001"));
        assert!(is_local_origin("http://127.0.0.1"));
        assert!(!is_local_origin("http://localhost.evil.com"));
        assert!(!is_local_origin("https://example.com"));
        assert!(!is_local_origin("http://localhost:"));
    }
}
