//! Builds and runs the server from [`Settings`]: the store, the supervisor, the HTTP server.
//!
//! Building first sweeps the processes agents of a previous run on the same data directory left
//! behind (see [`crate::runtime::process_tree`]). [`Application::build`] binds the listener (port 0 picks a free one, which the tests use) and
//! must run inside an actix `System`. [`Application::run_until_stopped`] serves until the HTTP
//! server stops (SIGINT/SIGTERM, or [`StopHandle::stop`]), then flushes the store, so nothing
//! accepted is lost. Conversations run on the HTTP workers that brought them up (see
//! [`crate::actors::supervisor`]), so every way of stopping stops the conversations first and
//! the HTTP server after.
//!
//! Shutdown on a signal ([`Application::stop_on_signals`]) is one bounded sequence:
//! `/ready` turns 503 at once; every conversation is stopped while the listener still answers
//! (agents get `stop`, and are ended when the bound comes near); then in-flight requests finish
//! and the store is flushed. All of it within `limits.shutdown_timeout_secs`; past that (plus a
//! moment) the process exits with status 1 whatever is left. A second signal exits at once.
//!
//! The session key is settled here ([`Settings::session_key_policy`]): with a runtime that
//! runs agent processes and no key configured, a random one is generated for this run and
//! [`Application::login_line`] tells the operator how to use it.

use std::net::TcpListener;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix_cors::Cors;
use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};

use crate::actors::supervisor::Supervisor;
use crate::actors::SupervisorHandle;
use crate::api;
use crate::config::{SessionKeyPolicy, Settings, StoreKind};
use crate::http::auth::SessionAuth;
use crate::http::origin::AllowList;
use crate::http::AppState;
use crate::ops::{Ops, Readiness};
use crate::store::{MemoryStore, PostgresStore, SqliteStore, Store, StoreError, StoreLimits};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    /// The store cannot be opened; its message says why and what to do.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the data directory {} is in use by another switchboard process (lock {})",
        dir.display(),
        lock.display()
    )]
    DataDirInUse {
        dir: std::path::PathBuf,
        lock: std::path::PathBuf,
    },
    /// The agent runtime cannot be set up here (its environment, its sandbox); the message
    /// says what to do, the system's error is the source when there is one.
    #[error("{0}")]
    Agent(#[source] crate::failure::Failure),
    #[error("cannot generate a session key: {0}")]
    Key(#[source] std::io::Error),
    /// The HTTP server stopped with an I/O error while serving.
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// A built, bound, not yet running server.
pub struct Application {
    port: u16,
    host: String,
    server: Server,
    supervisor: SupervisorHandle,
    store: Arc<dyn Store>,
    readiness: Arc<Readiness>,
    shutdown: Arc<ShutdownClock>,
    /// The sockets relayed to other cluster nodes.
    splices: crate::ws::Splices,
    /// The key every client must present, if any.
    session_key: Option<String>,
    /// Whether that key was generated for this run.
    key_generated: bool,
    /// Held for the process's life: one server per data directory.
    _data_dir_lock: Option<std::fs::File>,
}

/// Stops a running [`Application`] from elsewhere (its signal handling does the same).
#[derive(Clone)]
pub struct StopHandle {
    server: ServerHandle,
    supervisor: SupervisorHandle,
    readiness: Arc<Readiness>,
    clock: Arc<ShutdownClock>,
}

impl StopHandle {
    /// `/ready` turns 503, every conversation stops (within the shutdown bound), then the
    /// HTTP server stops: gracefully (in-flight requests finish) or not. The conversations go
    /// first because they run on the HTTP workers.
    pub async fn stop(&self, graceful: bool) {
        self.readiness.set_draining();
        self.clock.start();
        let reserve = after_conversations(self.clock.bound);
        self.supervisor.shutdown(self.clock.left(reserve)).await;
        self.server.stop(graceful).await;
    }
}

/// The one bound on a shutdown: set when it begins, shared by every step.
struct ShutdownClock {
    bound: Duration,
    deadline: OnceLock<Instant>,
}

impl ShutdownClock {
    /// Starts the clock (the first call wins); the deadline.
    fn start(&self) -> Instant {
        *self.deadline.get_or_init(|| Instant::now() + self.bound)
    }

    /// Time left before the deadline, less `reserve` kept for the steps after.
    fn left(&self, reserve: Duration) -> Duration {
        self.start()
            .saturating_duration_since(Instant::now())
            .saturating_sub(reserve)
    }
}

/// What the steps after stopping conversations keep of the shutdown bound: finishing requests
/// and flushing the store.
fn after_conversations(bound: Duration) -> Duration {
    (bound / 5).min(Duration::from_secs(2))
}

/// Opens the store the settings ask for.
pub fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StoreError> {
    open_store_on(settings, settings.port)
}

/// [`open_store`] for a server listening on `port` (the PostgreSQL store registers the node
/// under its `[cluster]` id and address, which default to the host and this port).
pub fn open_store_on(settings: &Settings, port: u16) -> Result<Arc<dyn Store>, StoreError> {
    let limits = StoreLimits::from_limits(&settings.limits);
    match settings.store {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::with_limits(limits))),
        StoreKind::Sqlite => {
            SqliteStore::open_with(&settings.data_dir, &settings.store_tuning, limits)
                .map(|store| Arc::new(store) as Arc<dyn Store>)
        }
        StoreKind::Postgres => {
            let node = settings.cluster_node(port);
            PostgresStore::open_node(&settings.postgres, &settings.store_tuning, limits, node)
                .map(|store| Arc::new(store) as Arc<dyn Store>)
        }
    }
}

/// Binds the HTTP listener (port 0 picks a free one); returns it with its port.
fn bind(settings: &Settings) -> Result<(TcpListener, u16), StartupError> {
    let addr = format!("{}:{}", settings.host, settings.port);
    let listener = TcpListener::bind(&addr).map_err(|source| StartupError::Bind {
        addr: addr.clone(),
        source,
    })?;
    let port = listener
        .local_addr()
        .map_err(|source| StartupError::Bind { addr, source })?
        .port();
    Ok((listener, port))
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
        Err(std::fs::TryLockError::WouldBlock) => Err(StartupError::DataDirInUse {
            dir: settings.data_dir.clone(),
            lock: path,
        }),
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(error = %e, "cannot lock the data directory; continuing without");
            Ok(None)
        }
    }
}

/// CORS answers follow the same origin rule as the Origin check.
fn cors(allow: AllowList) -> Cors {
    Cors::default()
        .allowed_origin_fn(move |origin, head| {
            let host = head
                .headers()
                .get(actix_web::http::header::HOST)
                .and_then(|h| h.to_str().ok());
            origin
                .to_str()
                .is_ok_and(|origin| allow.origin_allowed(origin, host))
        })
        .allow_any_method()
        .allow_any_header()
        .max_age(3600)
}

/// A new random session key: 24 bytes from the OS, as 48 hex digits.
fn generate_key() -> std::io::Result<String> {
    crate::keys::random_hex(24)
}

impl Application {
    /// Opens the store, starts the supervisor and binds the HTTP listener.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let lock = lock_data_dir(&settings)?;
        let (listener, port) = bind(&settings)?;
        let store = open_store_on(&settings, port)?;
        let mut app = Self::build_on(settings, store, listener, port).await?;
        app._data_dir_lock = lock;
        Ok(app)
    }

    /// Like [`Application::build`] with an already opened store.
    pub async fn build_with_store(
        settings: Settings,
        store: Arc<dyn Store>,
    ) -> Result<Application, StartupError> {
        let (listener, port) = bind(&settings)?;
        Self::build_on(settings, store, listener, port).await
    }

    async fn build_on(
        settings: Settings,
        store: Arc<dyn Store>,
        listener: TcpListener,
        port: u16,
    ) -> Result<Application, StartupError> {
        let addr = format!("{}:{port}", settings.host);
        let settings =
            Arc::new(crate::runtime::openhands::prepare(settings).map_err(StartupError::Agent)?);
        crate::runtime::sandbox::check(&settings).map_err(StartupError::Agent)?;
        // Whatever agents of a previous run on this data directory left running ends here.
        crate::runtime::process_tree::sweep(&settings.data_dir);
        crate::runtime::pool::sweep_dirs(&settings);
        let (session_key, key_generated) = match settings.session_key_policy() {
            SessionKeyPolicy::Required(key) => (Some(key), false),
            SessionKeyPolicy::Generate => {
                let key = generate_key().map_err(StartupError::Key)?;
                (Some(key), true)
            }
            SessionKeyPolicy::Off => (None, false),
            SessionKeyPolicy::ExplicitlyOff => {
                tracing::warn!(
                    "session_api_key is set empty: authentication is OFF while agents run as \
                     processes; anyone who can connect to {}:{port} can run commands as this \
                     user. Set a key, or leave it unset to get a generated one.",
                    settings.host
                );
                (None, false)
            }
        };
        let supervisor = Supervisor::start(settings.clone(), store.clone());
        crate::actors::takeover::start(
            supervisor.clone(),
            store.clone(),
            Duration::from_millis(settings.cluster.heartbeat_ms),
        );
        let state = web::Data::new(AppState {
            settings: settings.clone(),
            store: store.clone(),
            supervisor: supervisor.clone(),
            auth: SessionAuth::new(session_key.clone(), port, store.clone()),
            gate: crate::http::Gate::new(&settings),
            splices: crate::ws::Splices::default(),
        });
        let readiness = Readiness::new(store.clone());
        let ops = web::Data::new(Ops::new(
            settings.clone(),
            readiness.clone(),
            supervisor.clone(),
        ));
        let frontend =
            (!settings.frontend.dir.as_os_str().is_empty()).then(|| settings.frontend.dir.clone());
        if let Some(dir) = &frontend {
            tracing::info!(dir = %dir.display(), "serving the web app at /");
        }
        let allow = state.gate.allow.clone();
        let splices = state.splices.clone();
        let mut server = HttpServer::new(move || {
            // Runs once on each worker's thread as it starts.
            crate::actors::supervisor::host_conversations_here();
            // The last `wrap` runs first: the access log, the gate, CORS, then the login.
            App::new()
                .app_data(state.clone())
                .app_data(ops.clone())
                .app_data(crate::http::forward::Peers::new())
                .wrap(from_fn(crate::http::forward::forward))
                .wrap(from_fn(crate::http::auth::login))
                .wrap(cors(allow.clone()))
                .wrap(from_fn(crate::http::gate))
                .wrap(from_fn(crate::ops::request::observe))
                .configure(api::configure)
                .configure(crate::ops::configure)
                .configure(crate::ws::configure)
                .configure(crate::http::auth::configure)
                .configure(|cfg| {
                    if let Some(dir) = &frontend {
                        crate::frontend::configure(cfg, dir);
                    }
                })
                .default_service(web::to(crate::http::not_found))
        })
        .shutdown_timeout(settings.limits.shutdown_timeout_secs)
        // Small frames (events) must not wait for the peer's delayed ACK.
        .tcp_nodelay(true)
        .on_connect(|_, _| {
            crate::ops::metrics::metrics().connections_accepted.inc();
        })
        .disable_signals()
        .listen(listener)
        .map_err(|source| StartupError::Bind {
            addr: addr.clone(),
            source,
        })?;
        if settings.workers > 0 {
            server = server.workers(settings.workers);
        }
        // Ready once the store has taken a first write.
        let first_probe = readiness.clone();
        actix_web::rt::spawn(async move {
            loop {
                match first_probe.probe_store().await {
                    Ok(()) => {
                        first_probe.set_ready();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "store not writable yet; not ready");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(Application {
            splices,
            port,
            host: settings.host.clone(),
            server: server.run(),
            supervisor,
            store,
            readiness,
            shutdown: Arc::new(ShutdownClock {
                bound: Duration::from_secs(settings.limits.shutdown_timeout_secs),
                deadline: OnceLock::new(),
            }),
            session_key,
            key_generated,
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

    /// The key every client must present, if any (configured or generated).
    pub fn session_key(&self) -> Option<&str> {
        self.session_key.as_deref()
    }

    /// When the key was generated for this run: the one line that tells the operator how to
    /// log a browser in and what API clients must send (the key is in it, on purpose; no log
    /// line carries it).
    pub fn login_line(&self) -> Option<String> {
        let key = self.session_key.as_deref().filter(|_| self.key_generated)?;
        let unspecified = self
            .host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
        let host = match self.host.as_str() {
            _ if unspecified => "127.0.0.1".to_string(),
            h if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
            h => h.to_string(),
        };
        Some(format!(
            "switchboard: no session key was configured and the agents run code, so this run \
             requires a generated one. Log a browser in at \
             http://{host}:{port}/?session_api_key={key} ; API clients send the header \
             X-Session-API-Key: {key}",
            port = self.port
        ))
    }

    /// Stops the server from elsewhere: see [`StopHandle`].
    pub fn handle(&self) -> StopHandle {
        StopHandle {
            server: self.server.handle(),
            supervisor: self.supervisor.clone(),
            readiness: self.readiness.clone(),
            clock: self.shutdown.clone(),
        }
    }

    /// `/ready`'s state.
    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    /// On SIGINT or SIGTERM: the bounded shutdown described in the module docs. A second
    /// signal, or the bound passing, ends the process at once (status 1). The signal handlers
    /// are installed before this returns. For the `serve` command: it may exit the process.
    pub fn stop_on_signals(&self) {
        let handle = self.server.handle();
        let supervisor = self.supervisor.clone();
        let readiness = self.readiness.clone();
        let clock = self.shutdown.clone();
        let splices = self.splices.clone();
        let mut signals = Signals::new();
        actix_web::rt::spawn(async move {
            signals.next().await;
            readiness.set_draining();
            clock.start();
            tracing::info!(
                bound_secs = clock.bound.as_secs(),
                "shutdown signal received; not ready, draining (a second signal exits at once)"
            );
            // The hard bound: whatever is still running then is ended with the process.
            let grace = clock.bound + Duration::from_millis(500);
            std::thread::spawn(move || {
                std::thread::sleep(grace);
                tracing::error!("shutdown did not finish within its bound; exiting now");
                std::process::exit(1);
            });
            actix_web::rt::spawn(async move {
                signals.next().await;
                tracing::warn!("second signal; exiting now");
                std::process::exit(1);
            });
            // Clients relayed to other nodes reconnect elsewhere at once.
            splices.close_all();
            // Conversations first, while the listener still answers (/ready says 503).
            let reserve = after_conversations(clock.bound);
            supervisor.shutdown(clock.left(reserve)).await;
            tracing::info!("conversations stopped; finishing in-flight requests");
            let left = clock.left(reserve / 2);
            if tokio::time::timeout(left, handle.stop(true)).await.is_err() {
                tracing::warn!("in-flight requests did not finish in time; closing them");
                handle.stop(false).await;
            }
        });
    }

    /// Serves until stopped, then stops every conversation and flushes the store, within the
    /// shutdown bound (counted from the signal, or from now when stopped otherwise).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.readiness.set_draining();
        self.shutdown.start();
        tracing::info!("HTTP server stopped; stopping conversations");
        let reserve = after_conversations(self.shutdown.bound) / 2;
        self.supervisor.shutdown(self.shutdown.left(reserve)).await;
        let left = self
            .shutdown
            .left(Duration::ZERO)
            .max(Duration::from_millis(100));
        match tokio::time::timeout(left, self.store.flush()).await {
            Ok(Ok(())) => tracing::info!("store flushed; goodbye"),
            Ok(Err(e)) => tracing::error!(error = %e, "store flush failed"),
            Err(_) => tracing::error!("store flush timed out"),
        }
        // Whatever this node still owns is free for the other nodes of its cluster now.
        let left = self
            .shutdown
            .left(Duration::ZERO)
            .max(Duration::from_millis(100));
        match tokio::time::timeout(left, self.store.leave()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not leave the cluster"),
            Err(_) => tracing::warn!("leaving the cluster timed out"),
        }
        result
    }
}

/// Makes the allocator give large blocks (request bodies, big pages of events) back to the OS
/// when they are freed, so a burst of large bodies does not stay in the server's memory.
///
/// glibc serves blocks from 128 KiB up with their own mappings, but raises that threshold to
/// the size of each such block freed (up to 32 MiB), after which bodies land in the heap arenas,
/// which rarely shrink. Setting the threshold explicitly turns that adjustment off. Call it once
/// at start, before the server's threads exist.
pub fn return_large_frees_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is called before other threads
    // start allocating.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// SIGINT and SIGTERM, registered when made; each `next` completes on the next of either.
struct Signals {
    #[cfg(unix)]
    handlers: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let handlers = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(int), Ok(term)) => Some((int, term)),
                _ => None,
            };
            Signals { handlers }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some((int, term)) = &mut self.handlers {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn startup_errors_say_which_part_failed_and_keep_their_cause() {
        let serve = StartupError::Serve(std::io::Error::other("accept failed"));
        assert_eq!(serve.to_string(), "the HTTP server failed: accept failed");
        assert!(serve.source().is_some());
        let store = StartupError::from(StoreError::Open("the file is not a database".into()));
        assert_eq!(
            store.to_string(),
            "cannot open the store: the file is not a database"
        );
        let in_use = StartupError::DataDirInUse {
            dir: "/srv/sb".into(),
            lock: "/srv/sb/switchboard.lock".into(),
        };
        assert_eq!(
            in_use.to_string(),
            "the data directory /srv/sb is in use by another switchboard process (lock /srv/sb/switchboard.lock)"
        );
    }
}
