//! Logging: `tracing` to stderr, as text or JSON, filtered by `RUST_LOG` or the `log` setting.
//!
//! A JSON line names the thread it was written on (`threadName`): HTTP workers and conversation
//! threads are actix arbiters (`actix-rt|system:S|arbiter:N`), and each says which it is in one
//! debug line when it starts, so where a conversation runs can be read off its lines. Text lines
//! leave the thread out: it is long and the same on most of a worker's lines.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, Settings};

/// Installs the global subscriber; later calls are no-ops.
pub fn init(settings: &Settings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match settings.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_thread_names(true).try_init(),
    };
}
