//! Settings: one typed [`Settings`] built from layered sources.
//!
//! Precedence, later wins: the built-in defaults (`config/default.toml`, compiled in), then
//! `./config/default.toml` when present, then an optional `--config FILE`, then `SWITCHBOARD_*`
//! environment variables, then command-line flags. Every layer is merged as TOML and the result
//! is deserialized once with unknown keys denied, then range-checked by [`Settings::validate`].
//! A bad value yields a [`ConfigError`] naming the setting and the expected form; the server
//! refuses to start on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The built-in defaults: the same text operators read in `config/default.toml`.
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

/// A setting that could not be read or is out of range.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid setting `{setting}`: {message}")]
    Invalid { setting: String, message: String },
    #[error("unknown environment variable {name}{}", suggestion.as_ref().map(|s| format!("; did you mean {s}?")).unwrap_or_else(|| "; `switchboard config` lists every setting and config/default.toml names each one's variable".into()))]
    UnknownEnv {
        name: String,
        suggestion: Option<&'static str>,
    },
}

/// Persistence backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    Sqlite,
    Memory,
    Postgres,
}

/// What the supervisor does when the running-conversation limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// Refuse the new conversation with 429.
    Reject,
    /// Stop the least recently active conversation with no client attached and no turn under
    /// way to make room; refuse with 429 when there is none.
    EvictOldest,
}

/// What runs behind each conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    Echo,
    Process,
    /// The process runtime running the OpenHands adapter (`agents/openhands/`).
    Openhands,
}

impl RuntimeKind {
    /// Whether each conversation runs an agent process (`process`, and the `openhands` preset).
    pub fn runs_agent_process(self) -> bool {
        matches!(self, RuntimeKind::Process | RuntimeKind::Openhands)
    }
}

/// How each agent process is confined (`runtime.process.sandbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxKind {
    /// Not at all: the agent runs as a plain child process.
    None,
    /// Under bubblewrap (`bwrap`), see [`crate::runtime::sandbox`].
    Bwrap,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub store: StoreKind,
    /// The session key as configured: `None` when no layer set it (the default), `Some("")`
    /// when one set it empty on purpose. [`Settings::session_key_policy`] says what it means.
    #[serde(default)]
    pub session_api_key: Option<String>,
    pub workers: usize,
    pub conversation_threads: usize,
    pub log: String,
    pub log_format: LogFormat,
    pub http: HttpSettings,
    pub limits: Limits,
    pub socket: SocketSettings,
    pub runtime: RuntimeSettings,
    pub frontend: FrontendSettings,
    pub workspace: WorkspaceSettings,
    pub store_tuning: StoreTuning,
    pub metrics: MetricsSettings,
    pub postgres: PostgresSettings,
    pub cluster: ClusterSettings,
}

/// `[cluster]`: how a node on the PostgreSQL store takes part in the cluster of the nodes
/// sharing its database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// This node's id in the cluster; empty: `host:port`.
    pub node_id: String,
    /// The URL other nodes reach this node at; empty: `http://host:port` with the port the
    /// listener got.
    pub advertise_url: String,
    /// The shared secret that authenticates node-to-node calls; empty: none configured.
    pub cluster_key: String,
    /// How often the node renews its registration.
    pub heartbeat_ms: u64,
    /// How long a registration lives without a heartbeat; a node fences itself after half.
    pub node_ttl_ms: u64,
    /// How long a socket handshake spliced to the conversation's owner waits for the owner to
    /// accept its upgrade.
    pub splice_timeout_ms: u64,
    /// How long a command forwarded to the conversation's owner may take there.
    pub forward_timeout_ms: u64,
    /// Largest frame a spliced socket takes from the owner.
    pub splice_max_frame_bytes: usize,
}

/// `GET /metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Whether scraping needs the session key (when one is set).
    pub require_key: bool,
}

/// The PostgreSQL store (`store = "postgres"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/dbname` (or the `key=value` form); required when
    /// `store = "postgres"`. Connections are unencrypted (no TLS).
    pub url: String,
    /// Connections at most: one for the writer, the rest for reads.
    pub pool_size: usize,
}

/// The OpenHands web app: where its build is, and what `GET /api/options/*` tell it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendSettings {
    /// The built app to serve at `/`; empty for none.
    pub dir: PathBuf,
    pub app_mode: AppMode,
    pub github_client_id: String,
    pub posthog_client_key: String,
    pub enable_billing: bool,
    pub hide_llm_settings: bool,
    pub hide_microagent_management: bool,
    pub models: Vec<String>,
    pub agents: Vec<String>,
    pub security_analyzers: Vec<String>,
}

/// The web app's mode (`APP_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppMode {
    Oss,
    Saas,
}

/// Bounds on what the workspace routes read and write.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSettings {
    pub max_upload_files: usize,
    pub max_upload_bytes: usize,
    pub max_read_file_bytes: u64,
    pub max_list_files: usize,
}

/// Who may talk to the server over HTTP: the allow-lists behind the Origin and Host checks (and
/// the CORS answers), see [`crate::http::origin`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Origins allowed besides the server's own and loopback ones: `scheme://host[:port]`,
    /// `scheme://host:*`, or `*` (no Origin check at all).
    pub allowed_origins: Vec<String>,
    /// `Host` names allowed besides loopback names, IP addresses and the bound host: `name`,
    /// `*.domain`, or `*` (no Host check at all).
    pub allowed_hosts: Vec<String>,
}

/// What the configured session key means, once the runtime is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKeyPolicy {
    /// This key is required.
    Required(String),
    /// No key was configured and the runtime runs code (an agent process): generate one at
    /// start.
    Generate,
    /// No key was configured and the runtime runs no code: no authentication.
    Off,
    /// The key was set empty on purpose while the runtime runs code: no authentication,
    /// with a warning.
    ExplicitlyOff,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_running_conversations: usize,
    /// Most conversations one user key's user may have running at once (0: no limit).
    pub max_running_per_user: usize,
    pub on_limit: OnLimit,
    pub idle_timeout_secs: u64,
    pub start_timeout_secs: u64,
    pub max_body_bytes: usize,
    /// Seconds a request body may take to arrive in full (408 after).
    pub body_timeout_secs: u64,
    /// Bytes held by request bodies still arriving, across all connections (503 over it).
    pub max_pending_body_bytes: usize,
    pub max_events_per_conversation: u64,
    pub max_clients_per_conversation: usize,
    pub mailbox_capacity: usize,
    pub shutdown_timeout_secs: u64,
    /// New conversations per second one client may start, sustained; 0 switches the limit off.
    pub create_rate_per_sec: u32,
    /// How many a client may start at once before the rate applies.
    pub create_burst: u32,
    /// Most bytes one conversation keeps in the store; 0: no limit.
    pub max_bytes_per_conversation: u64,
    /// Most bytes the whole store uses; 0: no limit.
    pub max_store_bytes: u64,
    /// Bytes of disk kept in reserve for deletes on a full disk; 0: none.
    pub disk_reserve_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketSettings {
    pub queue_frames: usize,
    pub max_frame_bytes: usize,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSettings {
    pub kind: RuntimeKind,
    pub echo: EchoSettings,
    pub process: ProcessSettings,
    pub openhands: OpenhandsSettings,
}

/// The `openhands` runtime: the process runtime with the OpenHands adapter as its agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenhandsSettings {
    /// The Python environment with OpenHands installed; empty means where
    /// `agents/openhands/install.sh` installs it (`~/.cache/switchboard/openhands-0.53.0`).
    pub venv: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EchoSettings {
    pub start_delay_ms: u64,
}

/// The `process` runtime: one agent process per conversation (see `docs/runtime-protocol.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSettings {
    /// Program and arguments, run without a shell.
    pub command: Vec<String>,
    /// The agent's working directory; empty means `<data_dir>/workspaces/<conversation_id>`.
    /// `{conversation_id}` in it is replaced by the conversation's id.
    pub working_dir: String,
    /// Extra environment variables for the agent.
    pub env: BTreeMap<String, String>,
    /// Seconds between `stop` and SIGTERM, and again between SIGTERM and SIGKILL.
    pub stop_grace_secs: u64,
    /// Longest line accepted from the agent's stdout, in bytes.
    pub max_line_bytes: usize,
    /// Last stderr lines kept for the error shown when the agent exits.
    pub stderr_tail_lines: usize,
    /// How each agent is confined.
    pub sandbox: SandboxKind,
    /// Whether a sandboxed agent keeps the network (`false`: only its own loopback).
    pub sandbox_network: bool,
    /// Agents kept started and waiting for their conversation (see [`crate::runtime::pool`]);
    /// 0: every conversation starts its own.
    pub warm: usize,
    /// Directories, besides the working directory, a sandboxed agent may write; set by runtime
    /// presets, not configurable. `{conversation_id}` is replaced as in `working_dir`.
    #[serde(skip)]
    pub sandbox_writable: Vec<String>,
}

impl ProcessSettings {
    /// The working directory of one conversation's agent.
    pub fn working_dir_for(&self, data_dir: &Path, conversation_id: &str) -> PathBuf {
        if self.working_dir.is_empty() {
            data_dir.join("workspaces").join(conversation_id)
        } else {
            for_conversation(&self.working_dir, conversation_id)
        }
    }

    /// The directories besides its working directory one conversation's sandboxed agent may
    /// write.
    pub fn sandbox_writable_for(&self, conversation_id: &str) -> Vec<PathBuf> {
        self.sandbox_writable
            .iter()
            .map(|dir| for_conversation(dir, conversation_id))
            .collect()
    }
}

/// A configured path with `{conversation_id}` replaced.
fn for_conversation(path: &str, conversation_id: &str) -> PathBuf {
    PathBuf::from(path.replace("{conversation_id}", conversation_id))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTuning {
    pub batch_max: usize,
    pub queue: usize,
}

/// How an environment variable's text becomes a TOML value.
#[derive(Clone, Copy)]
enum EnvKind {
    /// Taken verbatim as a string.
    Str,
    /// Parsed as a TOML literal (numbers); a non-literal stays a string so the type error
    /// names the setting.
    Literal,
    /// Comma-separated list of strings.
    List,
    /// A command line split the way a POSIX shell would (quotes, backslashes), not run by one.
    Shell,
}

/// Every environment variable and the setting it sets.
const ENV_VARS: &[(&str, &str, EnvKind)] = &[
    ("SWITCHBOARD_HOST", "host", EnvKind::Str),
    ("SWITCHBOARD_PORT", "port", EnvKind::Literal),
    ("SWITCHBOARD_DATA_DIR", "data_dir", EnvKind::Str),
    ("SWITCHBOARD_STORE", "store", EnvKind::Str),
    (
        "SWITCHBOARD_SESSION_API_KEY",
        "session_api_key",
        EnvKind::Str,
    ),
    ("SWITCHBOARD_WORKERS", "workers", EnvKind::Literal),
    (
        "SWITCHBOARD_CONVERSATION_THREADS",
        "conversation_threads",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_ALLOWED_ORIGINS",
        "http.allowed_origins",
        EnvKind::List,
    ),
    (
        "SWITCHBOARD_ALLOWED_HOSTS",
        "http.allowed_hosts",
        EnvKind::List,
    ),
    ("SWITCHBOARD_LOG", "log", EnvKind::Str),
    ("SWITCHBOARD_LOG_FORMAT", "log_format", EnvKind::Str),
    (
        "SWITCHBOARD_MAX_RUNNING_CONVERSATIONS",
        "limits.max_running_conversations",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAX_RUNNING_PER_USER",
        "limits.max_running_per_user",
        EnvKind::Literal,
    ),
    ("SWITCHBOARD_ON_LIMIT", "limits.on_limit", EnvKind::Str),
    (
        "SWITCHBOARD_IDLE_TIMEOUT_SECS",
        "limits.idle_timeout_secs",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_START_TIMEOUT_SECS",
        "limits.start_timeout_secs",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAX_BODY_BYTES",
        "limits.max_body_bytes",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_BODY_TIMEOUT_SECS",
        "limits.body_timeout_secs",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAX_PENDING_BODY_BYTES",
        "limits.max_pending_body_bytes",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAX_EVENTS_PER_CONVERSATION",
        "limits.max_events_per_conversation",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAX_CLIENTS_PER_CONVERSATION",
        "limits.max_clients_per_conversation",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAILBOX_CAPACITY",
        "limits.mailbox_capacity",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_SHUTDOWN_TIMEOUT_SECS",
        "limits.shutdown_timeout_secs",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_CREATE_RATE_PER_SEC",
        "limits.create_rate_per_sec",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_CREATE_BURST",
        "limits.create_burst",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAX_BYTES_PER_CONVERSATION",
        "limits.max_bytes_per_conversation",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAX_STORE_BYTES",
        "limits.max_store_bytes",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_DISK_RESERVE_BYTES",
        "limits.disk_reserve_bytes",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_SOCKET_QUEUE_FRAMES",
        "socket.queue_frames",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_SOCKET_MAX_FRAME_BYTES",
        "socket.max_frame_bytes",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_PING_INTERVAL_MS",
        "socket.ping_interval_ms",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_PING_TIMEOUT_MS",
        "socket.ping_timeout_ms",
        EnvKind::Literal,
    ),
    ("SWITCHBOARD_RUNTIME", "runtime.kind", EnvKind::Str),
    (
        "SWITCHBOARD_ECHO_START_DELAY_MS",
        "runtime.echo.start_delay_ms",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_OPENHANDS_VENV",
        "runtime.openhands.venv",
        EnvKind::Str,
    ),
    (
        "SWITCHBOARD_PROCESS_COMMAND",
        "runtime.process.command",
        EnvKind::Shell,
    ),
    (
        "SWITCHBOARD_PROCESS_WORKING_DIR",
        "runtime.process.working_dir",
        EnvKind::Str,
    ),
    (
        "SWITCHBOARD_PROCESS_STOP_GRACE_SECS",
        "runtime.process.stop_grace_secs",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_PROCESS_MAX_LINE_BYTES",
        "runtime.process.max_line_bytes",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_PROCESS_STDERR_TAIL_LINES",
        "runtime.process.stderr_tail_lines",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_PROCESS_SANDBOX",
        "runtime.process.sandbox",
        EnvKind::Str,
    ),
    (
        "SWITCHBOARD_PROCESS_SANDBOX_NETWORK",
        "runtime.process.sandbox_network",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_PROCESS_WARM",
        "runtime.process.warm",
        EnvKind::Literal,
    ),
    ("SWITCHBOARD_FRONTEND_DIR", "frontend.dir", EnvKind::Str),
    ("SWITCHBOARD_APP_MODE", "frontend.app_mode", EnvKind::Str),
    (
        "SWITCHBOARD_GITHUB_CLIENT_ID",
        "frontend.github_client_id",
        EnvKind::Str,
    ),
    (
        "SWITCHBOARD_POSTHOG_CLIENT_KEY",
        "frontend.posthog_client_key",
        EnvKind::Str,
    ),
    (
        "SWITCHBOARD_ENABLE_BILLING",
        "frontend.enable_billing",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_HIDE_LLM_SETTINGS",
        "frontend.hide_llm_settings",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_HIDE_MICROAGENT_MANAGEMENT",
        "frontend.hide_microagent_management",
        EnvKind::Literal,
    ),
    ("SWITCHBOARD_MODELS", "frontend.models", EnvKind::List),
    ("SWITCHBOARD_AGENTS", "frontend.agents", EnvKind::List),
    (
        "SWITCHBOARD_SECURITY_ANALYZERS",
        "frontend.security_analyzers",
        EnvKind::List,
    ),
    (
        "SWITCHBOARD_MAX_UPLOAD_FILES",
        "workspace.max_upload_files",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAX_UPLOAD_BYTES",
        "workspace.max_upload_bytes",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAX_READ_FILE_BYTES",
        "workspace.max_read_file_bytes",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_MAX_LIST_FILES",
        "workspace.max_list_files",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_STORE_BATCH_MAX",
        "store_tuning.batch_max",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_STORE_QUEUE",
        "store_tuning.queue",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_METRICS_REQUIRE_KEY",
        "metrics.require_key",
        EnvKind::Literal,
    ),
    ("SWITCHBOARD_POSTGRES_URL", "postgres.url", EnvKind::Str),
    ("SWITCHBOARD_NODE_ID", "cluster.node_id", EnvKind::Str),
    (
        "SWITCHBOARD_ADVERTISE_URL",
        "cluster.advertise_url",
        EnvKind::Str,
    ),
    (
        "SWITCHBOARD_CLUSTER_KEY",
        "cluster.cluster_key",
        EnvKind::Str,
    ),
    (
        "SWITCHBOARD_HEARTBEAT_MS",
        "cluster.heartbeat_ms",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_NODE_TTL_MS",
        "cluster.node_ttl_ms",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_SPLICE_TIMEOUT_MS",
        "cluster.splice_timeout_ms",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_SPLICE_MAX_FRAME_BYTES",
        "cluster.splice_max_frame_bytes",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_FORWARD_TIMEOUT_MS",
        "cluster.forward_timeout_ms",
        EnvKind::Literal,
    ),
    (
        "SWITCHBOARD_POSTGRES_POOL_SIZE",
        "postgres.pool_size",
        EnvKind::Literal,
    ),
];

/// `SWITCHBOARD_*` variables that are not settings but that switchboard or its tests and
/// benchmarks read, so they are never refused as unknown. Besides these, any
/// `SWITCHBOARD_REQUIRE_<PART>_TESTS` (tests that must not skip a missing part).
pub const OTHER_ENV_VARS: &[&str] = &[
    // Given to agents by the process runtime (an agent may itself run switchboard).
    "SWITCHBOARD_CONVERSATION_ID",
    // Benchmarks and tests.
    "SWITCHBOARD_BENCH_SECS",
    "SWITCHBOARD_BENCH_QUICK",
    "SWITCHBOARD_STORE_TEST_KILL9_DIR",
    // The tests' PostgreSQL (`.ci/postgres.sh start` exports it).
    "SWITCHBOARD_TEST_POSTGRES_URL",
];

/// Whether `name` is a `SWITCHBOARD_*` variable that is known: a setting or one of
/// [`OTHER_ENV_VARS`].
pub fn is_known_env_var(name: &str) -> bool {
    ENV_VARS.iter().any(|(n, _, _)| *n == name)
        || OTHER_ENV_VARS.contains(&name)
        || name
            .strip_prefix("SWITCHBOARD_REQUIRE_")
            .and_then(|rest| rest.strip_suffix("_TESTS"))
            .is_some_and(|part| !part.is_empty())
}

/// The known variable closest to an unknown `name`, if one is close enough to be a typo
/// (compared without the common `SWITCHBOARD_` prefix).
fn closest_env_var(name: &str) -> Option<&'static str> {
    let wanted = name.strip_prefix("SWITCHBOARD_").unwrap_or(name);
    ENV_VARS
        .iter()
        .map(|(n, _, _)| *n)
        .chain(OTHER_ENV_VARS.iter().copied())
        .filter_map(|known| {
            let suffix = known.strip_prefix("SWITCHBOARD_").unwrap_or(known);
            let score = strsim::normalized_damerau_levenshtein(wanted, suffix);
            let truncated = !wanted.is_empty() && suffix.starts_with(wanted);
            (score >= 0.5 || truncated).then_some((known, score))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(known, _)| known)
}

/// Where the effective value of a setting came from.
pub type Sources = BTreeMap<String, String>;

/// One line of `switchboard config`: a setting, its value (TOML, secrets redacted) and the
/// layer that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explained {
    pub setting: String,
    pub value: String,
    pub source: String,
}

/// Settings whose values are never printed.
fn is_secret(setting: &str) -> bool {
    setting == "session_api_key"
        || setting == "cluster.cluster_key"
        || setting.starts_with("runtime.process.env.")
}

/// The setting `[http] allowed_origins` replaced, and why it is refused rather than read.
const REPLACED_CORS_SETTING: &str = "was replaced by `[http] allowed_origins` \
     (env SWITCHBOARD_ALLOWED_ORIGINS): one list now governs both the Origin check and CORS, \
     and it adds to the built-in loopback origins instead of replacing them; move the origins \
     there and remove the old setting";

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub data_dir: Option<PathBuf>,
    pub store: Option<String>,
    pub session_api_key: Option<String>,
    pub runtime: Option<String>,
    pub frontend: Option<PathBuf>,
}

/// Builds [`Settings`] from one TOML layer at a time.
pub struct SettingsBuilder {
    table: toml::Table,
    /// Which layer set each leaf, by dotted path.
    sources: Sources,
    /// A layer that could not be read as a value (reported by `build`).
    pending_error: Option<ConfigError>,
}

/// Records `origin` for every leaf of `layer`.
fn note_sources(sources: &mut Sources, layer: &toml::Table, origin: &str) {
    let mut all = Vec::new();
    leaves("", layer, &mut all);
    for (dotted, _) in all {
        sources.insert(dotted, origin.to_string());
    }
}

/// A value as TOML text (strings quoted JSON-style, which TOML reads the same).
fn toml_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => serde_json::Value::String(s.clone()).to_string(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_text).collect();
            format!("[{}]", items.join(", "))
        }
        toml::Value::Table(t) => {
            let items: Vec<String> = t
                .iter()
                .map(|(k, v)| format!("{k} = {}", toml_text(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

/// Every leaf of `table` as (dotted path, value).
fn leaves(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (key, value) in table {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(t) if !t.is_empty() => leaves(&dotted, t, out),
            v => out.push((dotted, v.clone())),
        }
    }
}

impl SettingsBuilder {
    /// Starts from the built-in defaults.
    pub fn new() -> Self {
        let table = DEFAULTS_TOML
            .parse::<toml::Table>()
            .expect("built-in config/default.toml is valid TOML");
        let mut sources = Sources::new();
        note_sources(&mut sources, &table, "default");
        Self {
            table,
            sources,
            pending_error: None,
        }
    }

    /// Merges a TOML text; `origin` names it in errors.
    pub fn merge_toml(mut self, origin: &str, text: &str) -> Result<Self, ConfigError> {
        let layer = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Parse {
                path: origin.to_string(),
                message: e.message().to_string(),
            })?;
        note_sources(&mut self.sources, &layer, &format!("file {origin}"));
        merge(&mut self.table, layer);
        Ok(self)
    }

    /// Merges a TOML file.
    pub fn merge_file(self, path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.merge_toml(&path.display().to_string(), &text)
    }

    /// Sets one setting by its dotted path, noting `origin` as where it came from.
    fn set_from(mut self, dotted: &str, value: toml::Value, origin: String) -> Self {
        self.sources.insert(dotted.to_string(), origin);
        self.set(dotted, value)
    }

    /// Sets one setting by its dotted path (`limits.on_limit`).
    pub fn set(mut self, dotted: &str, value: toml::Value) -> Self {
        let mut parts: Vec<&str> = dotted.split('.').collect();
        let last = parts.pop().unwrap_or(dotted);
        let mut table = &mut self.table;
        for part in parts {
            let entry = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            table = entry.as_table_mut().expect("just made a table");
        }
        table.insert(last.to_string(), value);
        self
    }

    /// Applies `SWITCHBOARD_*` variables from `vars` (usually `std::env::vars()`).
    pub fn merge_env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        for (name, raw) in vars {
            if name == "SWITCHBOARD_CORS_ALLOWED_ORIGINS" {
                self.pending_error.get_or_insert_with(|| {
                    invalid(
                        "cors_allowed_origins",
                        format!("SWITCHBOARD_CORS_ALLOWED_ORIGINS {REPLACED_CORS_SETTING}"),
                    )
                });
                continue;
            }
            let Some((_, dotted, kind)) = ENV_VARS.iter().find(|(n, _, _)| *n == name) else {
                if name.starts_with("SWITCHBOARD_") && !is_known_env_var(&name) {
                    let suggestion = closest_env_var(&name);
                    self.pending_error
                        .get_or_insert(ConfigError::UnknownEnv { name, suggestion });
                }
                continue;
            };
            let value = match kind {
                EnvKind::Str => toml::Value::String(raw),
                EnvKind::Literal => parse_literal(&raw),
                EnvKind::List => toml::Value::Array(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.to_string()))
                        .collect(),
                ),
                EnvKind::Shell => match shlex::split(&raw) {
                    Some(words) => {
                        toml::Value::Array(words.into_iter().map(toml::Value::String).collect())
                    }
                    None => {
                        self.pending_error.get_or_insert_with(|| {
                            invalid(
                                dotted,
                                format!(
                                    "{name} is not a valid shell-style command line \
                                     (unbalanced quote or trailing backslash): {raw:?}"
                                ),
                            )
                        });
                        continue;
                    }
                },
            };
            self = self.set_from(dotted, value, format!("env {name}"));
        }
        self
    }

    /// Applies command-line flags.
    pub fn merge_overrides(mut self, o: &Overrides) -> Self {
        let flag = |name: &str| format!("flag --{name}");
        if let Some(v) = &o.host {
            self = self.set_from("host", toml::Value::String(v.clone()), flag("host"));
        }
        if let Some(v) = o.port {
            self = self.set_from("port", toml::Value::Integer(i64::from(v)), flag("port"));
        }
        if let Some(v) = &o.data_dir {
            let v = toml::Value::String(v.display().to_string());
            self = self.set_from("data_dir", v, flag("data-dir"));
        }
        if let Some(v) = &o.store {
            self = self.set_from("store", toml::Value::String(v.clone()), flag("store"));
        }
        if let Some(v) = &o.session_api_key {
            let v = toml::Value::String(v.clone());
            self = self.set_from("session_api_key", v, flag("session-api-key"));
        }
        if let Some(v) = &o.runtime {
            let v = toml::Value::String(v.clone());
            self = self.set_from("runtime.kind", v, flag("runtime"));
        }
        if let Some(v) = &o.frontend {
            let v = toml::Value::String(v.display().to_string());
            self = self.set_from("frontend.dir", v, flag("frontend"));
        }
        self
    }

    /// Builds the settings (refusing what `build` refuses) and lists every setting's effective
    /// value and the layer that set it, secrets redacted.
    pub fn explain(self) -> Result<(Settings, Vec<Explained>), ConfigError> {
        let mut all = Vec::new();
        leaves("", &self.table, &mut all);
        let sources = self.sources.clone();
        let settings = self.build()?;
        let lines = all
            .into_iter()
            .map(|(setting, value)| {
                let value = match &value {
                    toml::Value::String(s) if is_secret(&setting) && !s.is_empty() => {
                        "\"<redacted>\"".to_string()
                    }
                    v if is_secret(&setting) && !v.is_str() => "\"<redacted>\"".to_string(),
                    v => toml_text(v),
                };
                let source = sources
                    .get(&setting)
                    .cloned()
                    .unwrap_or_else(|| "default".to_string());
                Explained {
                    setting,
                    value,
                    source,
                }
            })
            .collect();
        Ok((settings, lines))
    }

    /// Deserializes and range-checks the merged layers.
    pub fn build(self) -> Result<Settings, ConfigError> {
        if let Some(error) = self.pending_error {
            return Err(error);
        }
        if self.table.contains_key("cors_allowed_origins") {
            return Err(invalid("cors_allowed_origins", REPLACED_CORS_SETTING));
        }
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(self.table))
            .map_err(|e| ConfigError::Invalid {
            setting: e.path().to_string(),
            message: e.inner().message().to_string(),
        })?;
        settings.validate()?;
        Ok(settings)
    }
}

impl Default for SettingsBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn parse_literal(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (key, value) in layer {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(l)) => merge(b, l),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

fn invalid(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.to_string(),
        message: message.into(),
    }
}

fn positive(setting: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(setting, "expected a whole number greater than 0"));
    }
    Ok(())
}

/// Whether `program` names an executable file: a path (with a `/`) or a name found on PATH.
fn program_exists(program: &str) -> bool {
    fn executable(path: &Path) -> bool {
        match std::fs::metadata(path) {
            #[cfg(unix)]
            Ok(meta) => {
                use std::os::unix::fs::PermissionsExt;
                meta.is_file() && meta.permissions().mode() & 0o111 != 0
            }
            #[cfg(not(unix))]
            Ok(meta) => meta.is_file(),
            Err(_) => false,
        }
    }
    if program.contains('/') {
        return executable(Path::new(program));
    }
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| executable(&dir.join(program)))
    })
}

impl Settings {
    /// The full precedence chain: defaults, `./config/default.toml`, `--config`, env, flags.
    pub fn load(overrides: &Overrides) -> Result<Settings, ConfigError> {
        Self::layers(overrides)?.build()
    }

    /// Like [`Settings::load`], with every setting's value and source (`switchboard config`).
    pub fn explain(overrides: &Overrides) -> Result<(Settings, Vec<Explained>), ConfigError> {
        Self::layers(overrides)?.explain()
    }

    fn layers(overrides: &Overrides) -> Result<SettingsBuilder, ConfigError> {
        let mut builder = SettingsBuilder::new();
        let local = Path::new("config/default.toml");
        if local.is_file() {
            builder = builder.merge_file(local)?;
        }
        if let Some(file) = &overrides.config_file {
            builder = builder.merge_file(file)?;
        }
        Ok(builder
            .merge_env(std::env::vars())
            .merge_overrides(overrides))
    }

    /// Built-in defaults only (plus nothing): what tests start from.
    pub fn defaults() -> Settings {
        SettingsBuilder::new()
            .build()
            .expect("built-in defaults are valid")
    }

    /// Range checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.host.trim().is_empty() {
            return Err(invalid("host", "expected an IP address or host name"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "expected a directory path"));
        }
        if let Some(key) = &self.session_api_key {
            if key.len() > 1024 || key.chars().any(char::is_control) {
                return Err(invalid(
                    "session_api_key",
                    "expected at most 1024 characters, none of them control characters",
                ));
            }
        }
        for origin in &self.http.allowed_origins {
            crate::http::origin::OriginPattern::parse(origin)
                .map_err(|why| invalid("http.allowed_origins", why))?;
        }
        for host in &self.http.allowed_hosts {
            crate::http::origin::HostPattern::parse(host)
                .map_err(|why| invalid("http.allowed_hosts", why))?;
        }
        let l = &self.limits;
        positive(
            "limits.max_running_conversations",
            l.max_running_conversations as u64,
        )?;
        positive("limits.idle_timeout_secs", l.idle_timeout_secs)?;
        positive("limits.start_timeout_secs", l.start_timeout_secs)?;
        positive("limits.max_body_bytes", l.max_body_bytes as u64)?;
        positive("limits.body_timeout_secs", l.body_timeout_secs)?;
        let largest = l
            .max_body_bytes
            .max(crate::http::body::upload_body_limit(&self.workspace));
        if l.max_pending_body_bytes < largest {
            return Err(invalid(
                "limits.max_pending_body_bytes",
                format!(
                    "expected at least the largest request body: limits.max_body_bytes, or \
                     workspace.max_upload_bytes with room for the multipart framing \
                     ({largest}); otherwise no body of that size could ever arrive"
                ),
            ));
        }
        positive(
            "limits.max_events_per_conversation",
            l.max_events_per_conversation,
        )?;
        positive(
            "limits.max_clients_per_conversation",
            l.max_clients_per_conversation as u64,
        )?;
        positive("limits.mailbox_capacity", l.mailbox_capacity as u64)?;
        if l.create_rate_per_sec > 0 {
            positive("limits.create_burst", u64::from(l.create_burst))?;
        }
        positive("limits.shutdown_timeout_secs", l.shutdown_timeout_secs)?;
        positive("socket.queue_frames", self.socket.queue_frames as u64)?;
        positive("socket.max_frame_bytes", self.socket.max_frame_bytes as u64)?;
        positive("socket.ping_interval_ms", self.socket.ping_interval_ms)?;
        positive("socket.ping_timeout_ms", self.socket.ping_timeout_ms)?;
        positive("store_tuning.batch_max", self.store_tuning.batch_max as u64)?;
        positive("store_tuning.queue", self.store_tuning.queue as u64)?;
        self.validate_postgres()?;
        self.validate_cluster()?;
        self.validate_process()?;
        let w = &self.workspace;
        positive("workspace.max_upload_files", w.max_upload_files as u64)?;
        positive("workspace.max_upload_bytes", w.max_upload_bytes as u64)?;
        positive("workspace.max_read_file_bytes", w.max_read_file_bytes)?;
        positive("workspace.max_list_files", w.max_list_files as u64)?;
        self.validate_frontend()?;
        Ok(())
    }

    /// The PostgreSQL settings: a URL that parses when the store needs one (the message never
    /// repeats the URL, which may hold a password), and room for the writer plus a reader.
    fn validate_postgres(&self) -> Result<(), ConfigError> {
        let p = &self.postgres;
        if p.pool_size < 2 {
            return Err(invalid(
                "postgres.pool_size",
                "expected a whole number of at least 2 (one connection writes, the others read)",
            ));
        }
        if self.store != StoreKind::Postgres {
            return Ok(());
        }
        if p.url.trim().is_empty() {
            return Err(invalid(
                "postgres.url",
                "store = \"postgres\" needs the database's URL \
                 (postgres://user:password@host:port/dbname; env SWITCHBOARD_POSTGRES_URL)",
            ));
        }
        if let Err(e) = p.url.parse::<tokio_postgres::Config>() {
            return Err(invalid(
                "postgres.url",
                format!("not a PostgreSQL connection URL: {e}"),
            ));
        }
        Ok(())
    }

    /// The cluster's timings: a heartbeat, and a TTL whose half leaves room for two of them
    /// (so that one late heartbeat does not fence a node); an advertised URL that is http(s).
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        positive("cluster.heartbeat_ms", c.heartbeat_ms)?;
        positive("cluster.splice_timeout_ms", c.splice_timeout_ms)?;
        positive("cluster.forward_timeout_ms", c.forward_timeout_ms)?;
        positive(
            "cluster.splice_max_frame_bytes",
            c.splice_max_frame_bytes as u64,
        )?;
        if c.node_ttl_ms < c.heartbeat_ms.saturating_mul(4) {
            return Err(invalid(
                "cluster.node_ttl_ms",
                format!(
                    "expected at least 4 × cluster.heartbeat_ms ({} ms): a node fences itself \
                     when no heartbeat succeeded for half the TTL",
                    c.heartbeat_ms.saturating_mul(4)
                ),
            ));
        }
        let url = c.advertise_url.trim();
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "cluster.advertise_url",
                "expected an http:// or https:// URL other nodes reach this one at",
            ));
        }
        Ok(())
    }

    /// This node in the cluster: `[cluster]` with its defaults filled in (`port`: the port the
    /// listener got, for the default address).
    pub fn cluster_node(&self, port: u16) -> crate::store::ClusterNode {
        let c = &self.cluster;
        // A wildcard address names no machine: the host's name does.
        let host = match self.host.as_str() {
            "0.0.0.0" | "::" | "[::]" => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| self.host.clone()),
            host => host.to_string(),
        };
        let node_id = match c.node_id.trim() {
            "" => format!("{host}:{port}"),
            id => id.to_string(),
        };
        let advertise_url = match c.advertise_url.trim() {
            "" => format!("http://{host}:{port}"),
            url => url.trim_end_matches('/').to_string(),
        };
        crate::store::ClusterNode {
            node_id,
            advertise_url,
            heartbeat: std::time::Duration::from_millis(c.heartbeat_ms),
            ttl: std::time::Duration::from_millis(c.node_ttl_ms),
        }
    }

    /// The web app's directory must hold a built app: checked at start, so that a wrong path is
    /// one clear line instead of a blank page.
    fn validate_frontend(&self) -> Result<(), ConfigError> {
        let f = &self.frontend;
        for (setting, names) in [
            ("frontend.models", &f.models),
            ("frontend.agents", &f.agents),
            ("frontend.security_analyzers", &f.security_analyzers),
        ] {
            if names.iter().any(|n| n.trim().is_empty()) {
                return Err(invalid(setting, "expected a list of non-empty names"));
            }
        }
        if f.dir.as_os_str().is_empty() {
            return Ok(());
        }
        let index = f.dir.join("index.html");
        if !index.is_file() {
            return Err(invalid(
                "frontend.dir",
                format!(
                    "{} holds no index.html; expected the directory of a built OpenHands web app \
                     (its frontend/build: index.html, assets/)",
                    f.dir.display()
                ),
            ));
        }
        Ok(())
    }

    fn validate_process(&self) -> Result<(), ConfigError> {
        let p = &self.runtime.process;
        if self.runtime.kind == RuntimeKind::Process
            && p.command.first().is_none_or(|c| c.trim().is_empty())
        {
            return Err(invalid(
                "runtime.process.command",
                "the process runtime needs the agent's command, e.g. \
                 command = [\"python3\", \"examples/agents/shell_agent.py\"] in [runtime.process] \
                 or SWITCHBOARD_PROCESS_COMMAND=\"python3 examples/agents/shell_agent.py\"",
            ));
        }
        if self.runtime.kind == RuntimeKind::Process && !program_exists(&p.command[0]) {
            return Err(invalid(
                "runtime.process.command",
                format!(
                    "cannot find the agent program {:?}: expected an executable file, a path \
                     relative to the server's working directory, or a program on PATH",
                    p.command[0]
                ),
            ));
        }
        if p.command.iter().any(|c| c.contains('\0')) {
            return Err(invalid(
                "runtime.process.command",
                "expected words without NUL characters",
            ));
        }
        if p.working_dir.contains('\0') {
            return Err(invalid(
                "runtime.process.working_dir",
                "expected a directory path",
            ));
        }
        for (name, value) in &p.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0')
            {
                return Err(invalid(
                    &format!("runtime.process.env.{name}"),
                    "expected NAME = \"value\" with a name without '=' and no NUL characters",
                ));
            }
        }
        if p.max_line_bytes < 1024 {
            return Err(invalid(
                "runtime.process.max_line_bytes",
                "expected a whole number of at least 1024",
            ));
        }
        if p.stderr_tail_lines > 1000 {
            return Err(invalid(
                "runtime.process.stderr_tail_lines",
                "expected a whole number from 0 to 1000",
            ));
        }
        if p.stop_grace_secs > 3600 {
            return Err(invalid(
                "runtime.process.stop_grace_secs",
                "expected a whole number of seconds from 0 to 3600",
            ));
        }
        if p.warm > 0 && !self.runtime.kind.runs_agent_process() {
            return Err(invalid(
                "runtime.process.warm",
                "keeps agent processes started, but this runtime starts none: set warm = 0, \
                 or runtime.kind = \"process\" or \"openhands\"",
            ));
        }
        if p.warm > self.limits.max_running_conversations {
            return Err(invalid(
                "runtime.process.warm",
                format!(
                    "expected at most limits.max_running_conversations ({}): warm agents count \
                     toward that limit",
                    self.limits.max_running_conversations
                ),
            ));
        }
        Ok(())
    }

    /// What the session key means here: a key to require, one to generate, or none.
    pub fn session_key_policy(&self) -> SessionKeyPolicy {
        let runs_code = self.runtime.kind.runs_agent_process();
        match self.session_api_key.as_deref() {
            Some("") if runs_code => SessionKeyPolicy::ExplicitlyOff,
            Some("") => SessionKeyPolicy::Off,
            Some(key) => SessionKeyPolicy::Required(key.to_string()),
            None if runs_code => SessionKeyPolicy::Generate,
            None => SessionKeyPolicy::Off,
        }
    }

    /// Number of threads hosting the conversations of agent processes, those no request
    /// brought up, and the warm pool (see `crate::actors::supervisor`).
    pub fn conversation_thread_count(&self) -> usize {
        if self.conversation_threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            self.conversation_threads
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = Settings::defaults();
        assert_eq!(s.host, "127.0.0.1");
        assert_eq!(s.port, 3000);
        assert_eq!(s.data_dir, PathBuf::from("./data"));
        assert_eq!(s.session_api_key, None);
        assert_eq!(s.runtime.kind, RuntimeKind::Echo);
        assert_eq!(s.runtime.echo.start_delay_ms, 0);
        assert_eq!(s.limits.max_running_conversations, 10000);
        assert_eq!(s.limits.max_running_per_user, 100);
        assert_eq!(s.limits.on_limit, OnLimit::Reject);
        assert_eq!(s.limits.idle_timeout_secs, 900);
        assert_eq!(s.limits.start_timeout_secs, 60);
        assert_eq!(s.limits.create_rate_per_sec, 10);
        assert_eq!(s.limits.create_burst, 100);
    }

    #[test]
    fn the_creation_rate_limit_is_set_from_env_and_checked() {
        let s = SettingsBuilder::new()
            .merge_env(env(&[
                ("SWITCHBOARD_CREATE_RATE_PER_SEC", "0"),
                ("SWITCHBOARD_CREATE_BURST", "0"),
            ]))
            .build()
            .unwrap();
        assert_eq!(s.limits.create_rate_per_sec, 0);
        let err = SettingsBuilder::new()
            .merge_env(env(&[("SWITCHBOARD_CREATE_BURST", "0")]))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("limits.create_burst"), "{err}");
        let err = SettingsBuilder::new()
            .merge_env(env(&[("SWITCHBOARD_CREATE_RATE_PER_SEC", "-1")]))
            .build()
            .unwrap_err();
        assert!(
            err.to_string().contains("limits.create_rate_per_sec"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let s = SettingsBuilder::new()
            .merge_toml("test", "port = 4000\n[limits]\non_limit = \"evict_oldest\"")
            .unwrap()
            .merge_env(env(&[
                ("SWITCHBOARD_PORT", "5000"),
                ("SWITCHBOARD_SESSION_API_KEY", "12345"),
                ("SWITCHBOARD_ECHO_START_DELAY_MS", "250"),
                ("UNRELATED", "x"),
            ]))
            .merge_overrides(&Overrides {
                port: Some(6000),
                ..Default::default()
            })
            .build()
            .unwrap();
        assert_eq!(s.port, 6000);
        assert_eq!(s.session_api_key.as_deref(), Some("12345"));
        assert_eq!(s.limits.on_limit, OnLimit::EvictOldest);
        assert_eq!(s.runtime.echo.start_delay_ms, 250);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases: &[(&str, &str, &str)] = &[
            ("SWITCHBOARD_PORT", "abc", "port"),
            ("SWITCHBOARD_PORT", "70000", "port"),
            ("SWITCHBOARD_ON_LIMIT", "drop", "limits.on_limit"),
            (
                "SWITCHBOARD_IDLE_TIMEOUT_SECS",
                "0",
                "limits.idle_timeout_secs",
            ),
            (
                "SWITCHBOARD_IDLE_TIMEOUT_SECS",
                "-5",
                "limits.idle_timeout_secs",
            ),
            ("SWITCHBOARD_RUNTIME", "docker", "runtime.kind"),
            ("SWITCHBOARD_STORE", "mysql", "store"),
            ("SWITCHBOARD_STORE", "postgres", "postgres.url"),
            ("SWITCHBOARD_POSTGRES_POOL_SIZE", "1", "postgres.pool_size"),
            ("SWITCHBOARD_HEARTBEAT_MS", "0", "cluster.heartbeat_ms"),
            ("SWITCHBOARD_NODE_TTL_MS", "3999", "cluster.node_ttl_ms"),
            (
                "SWITCHBOARD_SPLICE_TIMEOUT_MS",
                "0",
                "cluster.splice_timeout_ms",
            ),
            (
                "SWITCHBOARD_SPLICE_MAX_FRAME_BYTES",
                "0",
                "cluster.splice_max_frame_bytes",
            ),
            (
                "SWITCHBOARD_FORWARD_TIMEOUT_MS",
                "0",
                "cluster.forward_timeout_ms",
            ),
            (
                "SWITCHBOARD_ADVERTISE_URL",
                "10.0.0.5:3000",
                "cluster.advertise_url",
            ),
        ];
        for (var, value, setting) in cases {
            let err = SettingsBuilder::new()
                .merge_env(env(&[(var, value)]))
                .build()
                .expect_err(var);
            let text = err.to_string();
            assert!(
                text.contains(setting),
                "{var}={value}: {text} should name {setting}"
            );
        }
    }

    #[test]
    fn cluster_settings_from_env_and_their_defaults() {
        let defaults = Settings::defaults();
        assert_eq!(defaults.cluster.heartbeat_ms, 1000);
        assert_eq!(defaults.cluster.node_ttl_ms, 10_000);
        assert_eq!(defaults.cluster.splice_timeout_ms, 5000);
        assert_eq!(defaults.cluster.splice_max_frame_bytes, 16 << 20);
        assert_eq!(defaults.cluster.forward_timeout_ms, 30_000);
        let mut local = defaults.clone();
        local.host = "127.0.0.1".into();
        let node = local.cluster_node(4321);
        assert_eq!(node.node_id, "127.0.0.1:4321");
        assert_eq!(node.advertise_url, "http://127.0.0.1:4321");
        assert_eq!(node.ttl, std::time::Duration::from_secs(10));

        let s = SettingsBuilder::new()
            .merge_env(env(&[
                ("SWITCHBOARD_NODE_ID", "node-a"),
                ("SWITCHBOARD_ADVERTISE_URL", "http://10.0.0.5:3000/"),
                ("SWITCHBOARD_CLUSTER_KEY", "shared secret"),
                ("SWITCHBOARD_HEARTBEAT_MS", "250"),
                ("SWITCHBOARD_NODE_TTL_MS", "1000"),
                ("SWITCHBOARD_SPLICE_TIMEOUT_MS", "750"),
                ("SWITCHBOARD_FORWARD_TIMEOUT_MS", "1500"),
            ]))
            .build()
            .unwrap();
        assert_eq!(s.cluster.cluster_key, "shared secret");
        assert_eq!(s.cluster.splice_timeout_ms, 750);
        assert_eq!(s.cluster.forward_timeout_ms, 1500);
        let node = s.cluster_node(1);
        assert_eq!(node.node_id, "node-a");
        assert_eq!(node.advertise_url, "http://10.0.0.5:3000");
        assert_eq!(node.heartbeat, std::time::Duration::from_millis(250));
        assert_eq!(node.ttl, std::time::Duration::from_millis(1000));
        assert!(is_secret("cluster.cluster_key"));
    }

    #[test]
    fn process_runtime_settings_from_env() {
        let s = SettingsBuilder::new()
            .merge_env(env(&[
                ("SWITCHBOARD_RUNTIME", "process"),
                (
                    "SWITCHBOARD_PROCESS_COMMAND",
                    r#"sh "examples/agents/shell agent.py" --flag='a b' c\ d"#,
                ),
                ("SWITCHBOARD_PROCESS_STOP_GRACE_SECS", "3"),
                (
                    "SWITCHBOARD_PROCESS_WORKING_DIR",
                    "/srv/{conversation_id}/work",
                ),
                ("SWITCHBOARD_PROCESS_SANDBOX", "bwrap"),
                ("SWITCHBOARD_PROCESS_SANDBOX_NETWORK", "false"),
            ]))
            .build()
            .unwrap();
        assert_eq!(s.runtime.kind, RuntimeKind::Process);
        assert_eq!(s.runtime.process.sandbox, SandboxKind::Bwrap);
        assert!(!s.runtime.process.sandbox_network);
        assert_eq!(
            s.runtime.process.command,
            ["sh", "examples/agents/shell agent.py", "--flag=a b", "c d"]
        );
        assert_eq!(s.runtime.process.stop_grace_secs, 3);
        assert_eq!(
            s.runtime.process.working_dir_for(Path::new("/data"), "abc"),
            PathBuf::from("/srv/abc/work")
        );
        let d = Settings::defaults();
        assert_eq!(d.runtime.process.stop_grace_secs, 10);
        assert_eq!(d.runtime.process.sandbox, SandboxKind::None);
        assert!(d.runtime.process.sandbox_network);
        assert!(d.runtime.process.command.is_empty());
        assert_eq!(
            d.runtime.process.working_dir_for(Path::new("/data"), "abc"),
            PathBuf::from("/data/workspaces/abc")
        );
    }

    #[test]
    fn warm_agents_need_a_process_runtime_and_fit_the_running_limit() {
        let process = [
            ("SWITCHBOARD_RUNTIME", "process"),
            ("SWITCHBOARD_PROCESS_COMMAND", "sh agent.sh"),
        ];
        let build = |more: &[(&str, &str)]| {
            let mut pairs = process.to_vec();
            pairs.extend_from_slice(more);
            SettingsBuilder::new().merge_env(env(&pairs)).build()
        };
        assert_eq!(Settings::defaults().runtime.process.warm, 0);
        let s = build(&[("SWITCHBOARD_PROCESS_WARM", "3")]).unwrap();
        assert_eq!(s.runtime.process.warm, 3);
        for bad in ["-1", "many", "1.5"] {
            let err = build(&[("SWITCHBOARD_PROCESS_WARM", bad)]).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("runtime.process.warm"), "{bad}: {text}");
        }
        let err = SettingsBuilder::new()
            .merge_toml("f", "[runtime.process]\nwarm = -2\n")
            .and_then(|b| b.build())
            .unwrap_err();
        assert!(err.to_string().contains("runtime.process.warm"), "{err}");
        // The echo runtime starts no agent to keep warm.
        let err = SettingsBuilder::new()
            .merge_env(env(&[("SWITCHBOARD_PROCESS_WARM", "2")]))
            .build()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("runtime.process.warm"), "{text}");
        assert!(text.contains("starts none"), "{text}");
        // Warm agents count toward the running limit: more than it is refused.
        let err = build(&[
            ("SWITCHBOARD_PROCESS_WARM", "5"),
            ("SWITCHBOARD_MAX_RUNNING_CONVERSATIONS", "4"),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("limits.max_running_conversations (4)"),
            "{text}"
        );
    }

    #[test]
    fn process_runtime_needs_a_valid_command() {
        let err = SettingsBuilder::new()
            .merge_env(env(&[("SWITCHBOARD_RUNTIME", "process")]))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("runtime.process.command"), "{err}");
        let err = SettingsBuilder::new()
            .merge_env(env(&[
                ("SWITCHBOARD_RUNTIME", "process"),
                ("SWITCHBOARD_PROCESS_COMMAND", "python3 'agent.py"),
            ]))
            .build()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("runtime.process.command"), "{text}");
        assert!(text.contains("SWITCHBOARD_PROCESS_COMMAND"), "{text}");
        let err = SettingsBuilder::new()
            .merge_env(env(&[("SWITCHBOARD_PROCESS_STOP_GRACE_SECS", "soon")]))
            .build()
            .unwrap_err();
        assert!(
            err.to_string().contains("runtime.process.stop_grace_secs"),
            "{err}"
        );
        let err = SettingsBuilder::new()
            .merge_env(env(&[
                ("SWITCHBOARD_RUNTIME", "process"),
                (
                    "SWITCHBOARD_PROCESS_COMMAND",
                    "no-such-agent-program --flag",
                ),
            ]))
            .build()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("runtime.process.command"), "{text}");
        assert!(text.contains("no-such-agent-program"), "{text}");
        let s = SettingsBuilder::new()
            .merge_toml(
                "f",
                "[runtime]\nkind = \"process\"\n[runtime.process]\ncommand = [\"sh\"]\n\
                 [runtime.process.env]\nAGENT_MODEL = \"small\"",
            )
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(s.runtime.process.env["AGENT_MODEL"], "small");
    }

    #[test]
    fn frontend_settings_from_env_and_a_dir_without_index_is_refused() {
        let d = Settings::defaults();
        assert_eq!(d.frontend.dir, PathBuf::new());
        assert_eq!(d.frontend.app_mode, AppMode::Oss);
        assert_eq!(d.frontend.posthog_client_key, "");
        assert_eq!(d.frontend.agents, ["CodeActAgent"]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().display().to_string();
        let err = SettingsBuilder::new()
            .merge_env(env(&[("SWITCHBOARD_FRONTEND_DIR", &path)]))
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("frontend.dir"), "{err}");
        assert!(err.contains("index.html"), "{err}");
        std::fs::write(dir.path().join("index.html"), "<html></html>").unwrap();
        let s = SettingsBuilder::new()
            .merge_env(env(&[
                ("SWITCHBOARD_FRONTEND_DIR", &path),
                ("SWITCHBOARD_APP_MODE", "saas"),
                ("SWITCHBOARD_POSTHOG_CLIENT_KEY", "phc"),
                ("SWITCHBOARD_HIDE_LLM_SETTINGS", "true"),
                ("SWITCHBOARD_MODELS", "a/b, c/d"),
                ("SWITCHBOARD_MAX_UPLOAD_FILES", "3"),
            ]))
            .build()
            .unwrap();
        assert_eq!(s.frontend.dir, dir.path());
        assert_eq!(s.frontend.app_mode, AppMode::Saas);
        assert_eq!(s.frontend.posthog_client_key, "phc");
        assert!(s.frontend.hide_llm_settings);
        assert_eq!(s.frontend.models, ["a/b", "c/d"]);
        assert_eq!(s.workspace.max_upload_files, 3);
        let err = SettingsBuilder::new()
            .merge_env(env(&[("SWITCHBOARD_APP_MODE", "cloud")]))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("frontend.app_mode"), "{err}");
    }

    #[test]
    fn unknown_switchboard_variables_are_errors_and_known_others_are_not() {
        let err = SettingsBuilder::new()
            .merge_env(env(&[("SWITCHBOARD_PROT", "1")]))
            .build()
            .unwrap_err();
        assert!(
            err.to_string().contains("did you mean SWITCHBOARD_PORT?"),
            "{err}"
        );
        SettingsBuilder::new()
            .merge_env(env(&[
                ("SWITCHBOARD_REQUIRE_CLIENT_TESTS", "1"),
                ("SWITCHBOARD_REQUIRE_SANDBOX_TESTS", "1"),
                ("SWITCHBOARD_CONVERSATION_ID", "abc"),
                ("SWITCHBOARD_BENCH_SECS", "5"),
                ("NOT_OURS", "x"),
            ]))
            .build()
            .expect("known variables are accepted");
        // Built from parts so that no scan for test switches mistakes it for one.
        assert!(!is_known_env_var(concat!("SWITCHBOARD_REQUIRE_", "_TESTS")));
    }

    #[test]
    fn explain_names_each_layer_and_redacts_secrets() {
        let (_, lines) = SettingsBuilder::new()
            .merge_toml("team.toml", "[limits]\nidle_timeout_secs = 5")
            .unwrap()
            .merge_env(env(&[("SWITCHBOARD_SESSION_API_KEY", "hush")]))
            .merge_overrides(&Overrides {
                port: Some(7),
                ..Default::default()
            })
            .explain()
            .unwrap();
        let find = |s: &str| lines.iter().find(|l| l.setting == s).unwrap().clone();
        assert_eq!(find("limits.idle_timeout_secs").source, "file team.toml");
        assert_eq!(find("port").source, "flag --port");
        assert_eq!(find("port").value, "7");
        assert_eq!(find("host").source, "default");
        let key = find("session_api_key");
        assert_eq!(key.source, "env SWITCHBOARD_SESSION_API_KEY");
        assert!(!key.value.contains("hush"));
    }

    #[test]
    fn an_unset_key_differs_from_an_empty_one() {
        let process = |pairs: &[(&str, &str)]| {
            let mut all = vec![
                ("SWITCHBOARD_RUNTIME", "process"),
                ("SWITCHBOARD_PROCESS_COMMAND", "sh"),
            ];
            all.extend_from_slice(pairs);
            SettingsBuilder::new().merge_env(env(&all)).build().unwrap()
        };
        assert_eq!(
            process(&[]).session_key_policy(),
            SessionKeyPolicy::Generate
        );
        assert_eq!(
            process(&[("SWITCHBOARD_SESSION_API_KEY", "")]).session_key_policy(),
            SessionKeyPolicy::ExplicitlyOff
        );
        assert_eq!(
            process(&[("SWITCHBOARD_SESSION_API_KEY", "k")]).session_key_policy(),
            SessionKeyPolicy::Required("k".into())
        );
        assert_eq!(
            Settings::defaults().session_key_policy(),
            SessionKeyPolicy::Off
        );
        // A file can set it empty on purpose; a flag wins over both.
        let s = SettingsBuilder::new()
            .merge_toml("f", "session_api_key = \"\"")
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(s.session_api_key.as_deref(), Some(""));
        let s = SettingsBuilder::new()
            .merge_env(env(&[("SWITCHBOARD_SESSION_API_KEY", "from-env")]))
            .merge_overrides(&Overrides {
                session_api_key: Some(String::new()),
                ..Default::default()
            })
            .build()
            .unwrap();
        assert_eq!(s.session_api_key.as_deref(), Some(""));
    }

    #[test]
    fn origin_and_host_lists_and_body_limits() {
        let s = SettingsBuilder::new()
            .merge_env(env(&[
                (
                    "SWITCHBOARD_ALLOWED_ORIGINS",
                    "https://app.example.com, http://dev.example.com:*",
                ),
                ("SWITCHBOARD_ALLOWED_HOSTS", "*"),
                ("SWITCHBOARD_BODY_TIMEOUT_SECS", "3"),
            ]))
            .build()
            .unwrap();
        assert_eq!(
            s.http.allowed_origins,
            ["https://app.example.com", "http://dev.example.com:*"]
        );
        assert_eq!(s.http.allowed_hosts, ["*"]);
        assert_eq!(s.limits.body_timeout_secs, 3);
        let d = Settings::defaults();
        assert!(d.http.allowed_origins.is_empty() && d.http.allowed_hosts.is_empty());
        assert_eq!(d.limits.body_timeout_secs, 10);
        assert_eq!(d.limits.max_pending_body_bytes, 64 * 1024 * 1024);
        let cases: &[(&str, &str, &str)] = &[
            (
                "SWITCHBOARD_ALLOWED_ORIGINS",
                "example.com",
                "http.allowed_origins",
            ),
            (
                "SWITCHBOARD_ALLOWED_ORIGINS",
                "https://a.example/x",
                "http.allowed_origins",
            ),
            (
                "SWITCHBOARD_ALLOWED_HOSTS",
                "http://a.example",
                "http.allowed_hosts",
            ),
            (
                "SWITCHBOARD_BODY_TIMEOUT_SECS",
                "0",
                "limits.body_timeout_secs",
            ),
            (
                "SWITCHBOARD_MAX_PENDING_BODY_BYTES",
                "1000",
                "limits.max_pending_body_bytes",
            ),
            ("SWITCHBOARD_SESSION_API_KEY", "a\nb", "session_api_key"),
        ];
        for (var, value, setting) in cases {
            let err = SettingsBuilder::new()
                .merge_env(env(&[(var, value)]))
                .build()
                .expect_err(var);
            assert!(err.to_string().contains(setting), "{var}={value}: {err}");
        }
    }

    #[test]
    fn the_replaced_cors_setting_is_refused_with_its_successor() {
        let from_file = SettingsBuilder::new()
            .merge_toml("f", "cors_allowed_origins = [\"http://a.example\"]")
            .unwrap()
            .build()
            .unwrap_err()
            .to_string();
        let from_env = SettingsBuilder::new()
            .merge_env(env(&[(
                "SWITCHBOARD_CORS_ALLOWED_ORIGINS",
                "http://a.example",
            )]))
            .build()
            .unwrap_err()
            .to_string();
        for text in [from_file, from_env] {
            assert!(text.contains("cors_allowed_origins"), "{text}");
            assert!(text.contains("[http] allowed_origins"), "{text}");
            assert!(text.contains("SWITCHBOARD_ALLOWED_ORIGINS"), "{text}");
        }
    }

    #[test]
    fn unknown_keys_in_files_are_errors() {
        let err = SettingsBuilder::new()
            .merge_toml("f", "prot = 3000")
            .unwrap()
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }
}
