//! The built-in echo runtime: the default, what local development and load tests run on.
//!
//! After an optional start delay it reports ready; on each user `message` it answers with
//! `agent_state_changed: running`, an agent `message` with the same content
//! (`wait_for_response: true`), and `agent_state_changed: awaiting_user_input`. It keeps no
//! per-conversation state besides the delay, so an idle echo conversation costs nothing extra.

use std::time::Duration;

use serde_json::Value;

use super::{Runtime, RuntimeSignal, RuntimeStart};
use crate::events::{EventBody, EventKind, Source};

/// Echoes every user message back as the agent.
pub struct EchoRuntime {
    start_delay: Duration,
}

impl EchoRuntime {
    pub fn new(start_delay: Duration) -> Self {
        EchoRuntime { start_delay }
    }
}

impl Runtime for EchoRuntime {
    fn start(&mut self, start: RuntimeStart<'_>) -> Vec<RuntimeSignal> {
        if self.start_delay.is_zero() {
            return vec![RuntimeSignal::READY];
        }
        let delay = self.start_delay;
        let sink = start.sink;
        tokio::task::spawn_local(async move {
            tokio::time::sleep(delay).await;
            sink.send(RuntimeSignal::READY);
        });
        Vec::new()
    }

    fn on_user_event(&mut self, _id: u64, event: &EventBody) -> Vec<RuntimeSignal> {
        let EventKind::Action { action, args } = &event.kind else {
            return Vec::new();
        };
        if action != "message" {
            return Vec::new();
        }
        let content = args.get("content").and_then(Value::as_str).unwrap_or("");
        vec![
            RuntimeSignal::Event(EventBody::agent_state("running", "")),
            RuntimeSignal::Event(EventBody::message(
                Source::Agent,
                content,
                Value::Null,
                true,
            )),
            RuntimeSignal::Event(EventBody::agent_state("awaiting_user_input", "")),
        ]
    }

    fn stop(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn echoes_messages_and_ignores_other_actions() {
        let mut rt = EchoRuntime::new(Duration::ZERO);
        let msg = EventBody::message(Source::User, "hi", json!([]), false);
        let out = rt.on_user_event(1, &msg);
        assert_eq!(out.len(), 3);
        let RuntimeSignal::Event(reply) = &out[1] else {
            panic!("expected an event")
        };
        assert_eq!(reply.source, Source::Agent);
        assert_eq!(reply.message, "hi");
        let mut args = serde_json::Map::new();
        args.insert("agent_state".into(), json!("paused"));
        let other = EventBody::user_action("change_agent_state".into(), args, String::new());
        assert!(rt.on_user_event(2, &other).is_empty());
    }
}
