//! Making a conversation's runtime: the one place that turns `runtime.kind` into a [`Runtime`].

use std::sync::Arc;
use std::time::Duration;

use super::pool::AgentPool;
use super::{EchoRuntime, ProcessRuntime, Runtime};
use crate::config::{RuntimeKind, Settings};

/// Makes each conversation's runtime from the settings; cheap to clone.
#[derive(Clone)]
pub struct RuntimeFactory {
    settings: Arc<Settings>,
    /// The warm pool a process runtime takes its agent from.
    pool: Option<Arc<AgentPool>>,
}

impl RuntimeFactory {
    pub fn new(settings: Arc<Settings>, pool: Option<Arc<AgentPool>>) -> Self {
        RuntimeFactory { settings, pool }
    }

    /// A new runtime of the configured kind, not started yet.
    pub fn make(&self) -> Box<dyn Runtime> {
        match self.settings.runtime.kind {
            RuntimeKind::Echo => Box::new(EchoRuntime::new(Duration::from_millis(
                self.settings.runtime.echo.start_delay_ms,
            ))),
            RuntimeKind::Process | RuntimeKind::Openhands => {
                Box::new(ProcessRuntime::new(self.settings.clone()).with_pool(self.pool.clone()))
            }
        }
    }

    /// Whether the runtime's start and its work stay off blocking system calls, so that its
    /// conversation may share a thread with HTTP requests: the echo runtime does; an agent
    /// process is spawned, and recorded on disk, with blocking calls.
    pub fn never_blocks(&self) -> bool {
        !self.settings.runtime.kind.runs_agent_process()
    }

    /// Whether the runtime is started with the user's saved LLM and agent settings (an agent
    /// process uses them; the echo runtime has no use for them).
    pub fn wants_user_settings(&self) -> bool {
        self.settings.runtime.kind.runs_agent_process()
    }
}
