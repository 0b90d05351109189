//! Prometheus metrics: what switchboard counts, and the `/metrics` text it serves.
//!
//! Names follow JupyterHub's `<prefix>_<noun>_<verb>_<unit>` scheme (`switchboard_…`); the
//! process series keep Prometheus' standard `process_*` names. Every label is bounded: HTTP
//! routes are actix route patterns (never raw paths or ids), methods outside the standard set
//! are `other`, reasons and results are fixed words.
//!
//! Counters and histograms are process-wide ([`metrics`]) and updated with atomics (histograms
//! with a short uncontended lock); the code that does the work calls them directly. Gauges are
//! read at scrape time: conversations by status from the supervisor's registry, and the
//! process' memory, CPU and open files from `/proc` — nothing is polled between scrapes.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::actors::SupervisorHandle;

/// The labels of one HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: &'static str,
    /// The route pattern (`/api/conversations/{conversation_id}`) or `unmatched`.
    pub route: String,
    pub status: u16,
}

/// One fixed-word label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Everything switchboard counts. Clones of these handles share their values.
pub struct Metrics {
    pub request_duration: HistogramFamily<HttpLabels>,
    pub conversation_start_duration: HistogramFamily<ResultLabel>,
    pub conversation_stops: Family<ReasonLabel, Counter>,
    pub clients_attached: Family<TransportLabel, Gauge>,
    pub clients_detached: Family<ReasonLabel, Counter>,
    /// Sockets this node relays to the cluster node that owns their conversation.
    pub spliced_sockets: Family<TransportLabel, Gauge>,
    pub admissions_rejected: Family<ReasonLabel, Counter>,
    /// HTTP connections accepted (a client that keeps its connection alive counts once).
    pub connections_accepted: Counter,
    pub events_appended: Counter,
    /// Appends the store refused because this node no longer owned the conversation.
    pub fenced_appends: Counter,
    pub store_commit_duration: Histogram,
    /// Pooled agents that could not be started or exited while waiting.
    pub pool_spawn_failures: Counter,
    pub store_commit_batch_size: Histogram,
    /// When this process started serving, seconds since the epoch.
    start_time: f64,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

fn start_histogram() -> Histogram {
    Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
        request_duration: Family::new_with_constructor(latency_histogram),
        conversation_start_duration: Family::new_with_constructor(start_histogram),
        conversation_stops: Family::default(),
        clients_attached: Family::default(),
        clients_detached: Family::default(),
        spliced_sockets: Family::default(),
        admissions_rejected: Family::default(),
        connections_accepted: Counter::default(),
        events_appended: Counter::default(),
        fenced_appends: Counter::default(),
        store_commit_duration: latency_histogram(),
        pool_spawn_failures: Counter::default(),
        store_commit_batch_size: Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 11),
        ),
        start_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    });
    &METRICS
}

impl Metrics {
    /// When this process started serving, seconds since the epoch.
    pub fn start_time(&self) -> f64 {
        self.start_time
    }

    /// Counts a conversation stop.
    pub fn stopped(&self, reason: &'static str) {
        self.conversation_stops
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Records how a start ended (`ready`, `failed`, `timeout`, `stopped`) and how long it took.
    pub fn started(&self, result: &'static str, took: Duration) {
        self.conversation_start_duration
            .get_or_create(&ResultLabel { result })
            .observe(took.as_secs_f64());
    }

    /// Counts a client detaching.
    pub fn detached(&self, reason: &'static str) {
        self.clients_detached
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a refused admission.
    pub fn rejected(&self, reason: &'static str) {
        self.admissions_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// One more (or one fewer) client attached over `transport`.
    pub fn attached(&self, transport: &'static str, delta: i64) {
        self.clients_attached
            .get_or_create(&TransportLabel { transport })
            .inc_by(delta);
    }

    /// One more (or one fewer) socket relayed to another cluster node over `transport`.
    pub fn spliced(&self, transport: &'static str, delta: i64) {
        self.spliced_sockets
            .get_or_create(&TransportLabel { transport })
            .inc_by(delta);
    }

    /// One store transaction of `requests` writes that took `took`.
    pub fn committed(&self, requests: usize, took: Duration) {
        self.store_commit_duration.observe(took.as_secs_f64());
        self.store_commit_batch_size.observe(requests as f64);
    }
}

/// The label word for an HTTP method: the standard ones, or `other`.
pub fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// A registry for one server: the process-wide metrics plus its scrape-time gauges.
pub fn registry(supervisor: SupervisorHandle) -> Registry {
    let m = metrics();
    let mut r = Registry::with_prefix("switchboard");
    r.register_with_unit(
        "request_duration",
        "HTTP requests by method, route pattern and status",
        Unit::Seconds,
        m.request_duration.clone(),
    );
    r.register_with_unit(
        "conversation_start_duration",
        "Time from admission to RUNNING (result=ready) or to the start's end otherwise",
        Unit::Seconds,
        m.conversation_start_duration.clone(),
    );
    r.register(
        "conversation_stops",
        "Conversations stopped, by reason",
        m.conversation_stops.clone(),
    );
    r.register(
        "clients_attached",
        "Clients attached now, by transport",
        m.clients_attached.clone(),
    );
    r.register(
        "spliced_sockets",
        "Sockets relayed now to the cluster node that owns their conversation, by transport",
        m.spliced_sockets.clone(),
    );
    r.register(
        "clients_detached",
        "Clients detached, by reason",
        m.clients_detached.clone(),
    );
    r.register(
        "admissions_rejected",
        "Conversations refused admission, by reason",
        m.admissions_rejected.clone(),
    );
    r.register(
        "connections_accepted",
        "HTTP connections accepted (each serves requests for as long as its client keeps it)",
        m.connections_accepted.clone(),
    );
    r.register(
        "events_appended",
        "Events made durable in conversation logs",
        m.events_appended.clone(),
    );
    r.register(
        "fenced_appends",
        "Appends refused because another cluster node had taken the conversation over \
         (the stale conversation stopped)",
        m.fenced_appends.clone(),
    );
    r.register_with_unit(
        "store_commit_duration",
        "Store write transactions (group commits)",
        Unit::Seconds,
        m.store_commit_duration.clone(),
    );
    r.register(
        "store_commit_batch_size",
        "Write requests per store transaction",
        m.store_commit_batch_size.clone(),
    );
    r.register(
        "pool_spawn_failures",
        "Warm pool agents that could not be started or exited while waiting",
        m.pool_spawn_failures.clone(),
    );
    r.register_collector(Box::new(ScrapeTime { supervisor }));
    r
}

/// Gauges computed when scraped.
struct ScrapeTime {
    supervisor: SupervisorHandle,
}

impl std::fmt::Debug for ScrapeTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScrapeTime")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

fn gauge<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    values: &[(L, f64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn plain_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

impl prometheus_client::collector::Collector for ScrapeTime {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let census = self.supervisor.census();
        gauge(
            &mut encoder,
            "conversations",
            "Live conversations by status (stopping: stopped, still releasing its runtime)",
            None,
            &[
                (StatusLabel { status: "starting" }, census.starting as f64),
                (StatusLabel { status: "running" }, census.running as f64),
                (StatusLabel { status: "stopping" }, census.stopping as f64),
            ],
        )?;
        plain_gauge(
            &mut encoder,
            "pool_agents",
            "Agents started and waiting in the warm pool (runtime.process.warm)",
            None,
            self.supervisor.pooled_agents() as f64,
        )?;
        gauge(
            &mut encoder,
            "build_info",
            "The running build (value 1)",
            None,
            &[(
                BuildLabels {
                    version: env!("CARGO_PKG_VERSION"),
                },
                1.0,
            )],
        )?;
        plain_gauge(
            &mut encoder,
            "start_time",
            "When the server started, seconds since the Unix epoch",
            Some(&Unit::Seconds),
            metrics().start_time,
        )?;
        Ok(())
    }
}

/// The process' own figures, read from `/proc` when scraped (Linux; absent elsewhere).
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
}

/// Reads `/proc/self`; `None` where there is no procfs.
pub fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime 15, vsize 23, rss 24.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let cpu_seconds = (field(14)? + field(15)?) as f64 / ticks;
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        0
    };
    Some(ProcessStats {
        cpu_seconds,
        resident_bytes: field(24)? * page,
        virtual_bytes: field(23)?,
        open_fds,
        max_fds,
    })
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = process_stats() else {
            return Ok(());
        };
        ConstCounter::new(p.cpu_seconds).encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent",
            None,
            MetricType::Counter,
        )?)?;
        plain_gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size",
            None,
            p.resident_bytes as f64,
        )?;
        plain_gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size",
            None,
            p.virtual_bytes as f64,
        )?;
        plain_gauge(
            &mut encoder,
            "process_open_fds",
            "Open file descriptors",
            None,
            p.open_fds as f64,
        )?;
        plain_gauge(
            &mut encoder,
            "process_max_fds",
            "Limit on open file descriptors",
            None,
            p.max_fds as f64,
        )?;
        Ok(())
    }
}

/// A registry of the process series, kept unprefixed (`process_*`).
pub fn process_registry() -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ProcessCollector));
    r
}

/// The text exposition (Prometheus text format 0.0.4) of `registries`.
pub fn encode(registries: &[&Registry]) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    for r in registries {
        prometheus_client::encoding::prometheus_text::encode(&mut out, r)?;
    }
    Ok(out)
}

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
