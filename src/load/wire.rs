//! What a payload from an OpenHands-compatible server means to a load client.
//!
//! Pure functions, no I/O, shared by every way of attaching (Socket.IO, plain WebSocket, REST
//! polling). RUNNING is recognised the way the OpenHands web app recognises it: the agent going
//! to `awaiting_user_input` or `running`, the `STATUS$READY` status update, or the conversation's
//! REST status — whichever arrives first. A message round trip ends at the first agent reply
//! (`message` or `finish` action) after the user's own message came back; with
//! [`Expect::Echo`] that reply must repeat the user's text exactly. Failures have short,
//! stable kinds, so a summary counts them.

use serde::Serialize;
use serde_json::Value;

use crate::events::{STATUS_READY, TOO_MANY_CONVERSATIONS};

/// Which agent reply ends a message round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// The first agent `message` or `finish` after the user's message, whatever it says.
    Any,
    /// The first agent `message` after the user's message, which must repeat it exactly
    /// (switchboard's echo runtime); any other reply is an `unexpected-reply` failure.
    Echo,
}

/// One payload, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// The conversation is ready for user messages.
    Ready,
    /// A user `message` action with this content (the server's copy of what a client sent).
    UserMessage(String),
    /// An agent reply: a `message` (its content) or a `finish` action (its final thought).
    AgentReply(String),
    /// Something that ends the conversation for the load client, by kind.
    Failure(String),
    /// Anything else.
    Other,
}

/// Classifies one event or status update.
pub fn classify(p: &Value) -> Signal {
    if p.get("error") == Some(&Value::Bool(true)) {
        return Signal::Failure("server-error-event".into());
    }
    if p.get("status_update") == Some(&Value::Bool(true)) {
        let id = p["id"].as_str().unwrap_or_default();
        return match (p["type"].as_str(), id) {
            (_, TOO_MANY_CONVERSATIONS) => Signal::Failure("evicted".into()),
            (Some("error"), id) => Signal::Failure(format!("status-error: {}", short(id))),
            (_, STATUS_READY) => Signal::Ready,
            _ => Signal::Other,
        };
    }
    if p["observation"] == "agent_state_changed" {
        return match p["extras"]["agent_state"].as_str() {
            Some("awaiting_user_input" | "running") => Signal::Ready,
            Some("error") => Signal::Failure("agent-error".into()),
            Some("rate_limited") => Signal::Failure("agent-rate-limited".into()),
            Some("stopped") => Signal::Failure("stopped".into()),
            _ => Signal::Other,
        };
    }
    let text = |key: &str| p["args"][key].as_str().unwrap_or_default().to_string();
    match (p["source"].as_str(), p["action"].as_str()) {
        (Some("user"), Some("message")) => Signal::UserMessage(text("content")),
        (Some("agent"), Some("message")) => Signal::AgentReply(text("content")),
        (Some("agent"), Some("finish")) => Signal::AgentReply(text("final_thought")),
        _ => Signal::Other,
    }
}

/// What a signal means while waiting for RUNNING: `Some` ends the wait.
pub fn readiness(signal: &Signal) -> Option<Result<(), String>> {
    match signal {
        Signal::Ready => Some(Ok(())),
        Signal::Failure(kind) => Some(Err(kind.clone())),
        _ => None,
    }
}

/// What a conversation's REST status (`GET /api/conversations/{id}`) says: `Some` ends the
/// wait. `RUNNING` counts only with no runtime status or `STATUS$READY`: OpenHands says
/// `RUNNING` with `STATUS$RUNTIME_STARTED` once its runtime is up but before its agent is, and
/// drops a message sent then. `stopped_fails` says whether `STOPPED` is final (nothing will
/// start it again).
pub fn rest_readiness(info: &Value, stopped_fails: bool) -> Option<Result<(), String>> {
    let runtime_ready = match &info["runtime_status"] {
        Value::Null => true,
        status => status == STATUS_READY,
    };
    match info["status"].as_str() {
        Some("RUNNING") if runtime_ready => Some(Ok(())),
        Some("STOPPED") if stopped_fails => Some(Err("stopped".into())),
        Some("ERROR") => Some(Err("status-error: ERROR".into())),
        _ if info.is_null() => Some(Err("conversation-not-found".into())),
        _ => None,
    }
}

/// One message round trip, fed every signal that arrives after the message was sent.
#[derive(Debug)]
pub struct Turn<'a> {
    content: &'a str,
    expect: Expect,
    seen_user: bool,
}

impl<'a> Turn<'a> {
    pub fn new(content: &'a str, expect: Expect) -> Self {
        Turn {
            content,
            expect,
            seen_user: false,
        }
    }

    /// `Some` ends the round trip: `Ok` at the awaited reply, `Err(kind)` at a failure.
    pub fn feed(&mut self, signal: &Signal) -> Option<Result<(), String>> {
        match signal {
            Signal::UserMessage(c) if c == self.content => {
                self.seen_user = true;
                None
            }
            Signal::AgentReply(reply) if self.seen_user => match self.expect {
                Expect::Any => Some(Ok(())),
                Expect::Echo if reply == self.content => Some(Ok(())),
                Expect::Echo => Some(Err("unexpected-reply".into())),
            },
            Signal::Failure(kind) => Some(Err(kind.clone())),
            _ => None,
        }
    }
}

/// At most 60 characters of `s`, for error kinds built from server text.
pub fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state(s: &str) -> Value {
        json!({"id":3,"source":"agent","observation":"agent_state_changed","extras":{"agent_state":s}})
    }

    fn message(source: &str, content: &str) -> Value {
        json!({"id":4,"source":source,"action":"message","args":{"content":content}})
    }

    #[test]
    fn readiness_comes_from_state_changes_or_the_ready_status() {
        for ready in [
            state("awaiting_user_input"),
            state("running"),
            json!({"status_update":true,"type":"info","id":"STATUS$READY","message":""}),
        ] {
            assert_eq!(readiness(&classify(&ready)), Some(Ok(())), "{ready}");
        }
        for not_yet in [
            state("loading"),
            json!({"status_update":true,"type":"info","id":"STATUS$STARTING_RUNTIME"}),
            json!({"id":1,"source":"agent","action":"system","args":{"content":"You are…"}}),
        ] {
            assert_eq!(readiness(&classify(&not_yet)), None, "{not_yet}");
        }
        assert_eq!(
            rest_readiness(&json!({"status":"RUNNING"}), false),
            Some(Ok(()))
        );
        assert_eq!(
            rest_readiness(
                &json!({"status":"RUNNING","runtime_status":"STATUS$READY"}),
                false
            ),
            Some(Ok(()))
        );
        assert_eq!(
            rest_readiness(
                &json!({"status":"RUNNING","runtime_status":"STATUS$RUNTIME_STARTED"}),
                false
            ),
            None
        );
        assert_eq!(rest_readiness(&json!({"status":"STARTING"}), true), None);
        assert_eq!(rest_readiness(&json!({"status":"STOPPED"}), false), None);
        assert_eq!(
            rest_readiness(&json!({"status":"STOPPED"}), true),
            Some(Err("stopped".into()))
        );
        assert_eq!(
            rest_readiness(&Value::Null, false),
            Some(Err("conversation-not-found".into()))
        );
    }

    #[test]
    fn failures_have_their_own_kinds() {
        let kind = |p: Value| match classify(&p) {
            Signal::Failure(k) => k,
            other => panic!("{p} gave {other:?}"),
        };
        assert_eq!(
            kind(
                json!({"status_update":true,"type":"error","id":TOO_MANY_CONVERSATIONS,"message":"Too many"})
            ),
            "evicted"
        );
        assert_eq!(
            kind(
                json!({"status_update":true,"type":"error","id":"STATUS$ERROR_LLM_AUTHENTICATION"})
            ),
            "status-error: STATUS$ERROR_LLM_AUTHENTICATION"
        );
        assert_eq!(kind(state("error")), "agent-error");
        assert_eq!(kind(state("rate_limited")), "agent-rate-limited");
        assert_eq!(kind(state("stopped")), "stopped");
        assert_eq!(
            kind(json!({"error":true,"message":"bad"})),
            "server-error-event"
        );
    }

    #[test]
    fn a_round_trip_ends_at_the_first_agent_reply_after_the_users_message() {
        let mut any = Turn::new("hi", Expect::Any);
        assert_eq!(any.feed(&classify(&message("agent", "stale reply"))), None);
        assert_eq!(any.feed(&classify(&message("user", "someone else"))), None);
        assert_eq!(any.feed(&classify(&message("user", "hi"))), None);
        assert_eq!(any.feed(&classify(&state("running"))), None);
        assert_eq!(
            any.feed(&classify(&message("agent", "Hello! How can I help?"))),
            Some(Ok(()))
        );
        let mut finish = Turn::new("hi", Expect::Any);
        finish.feed(&classify(&message("user", "hi")));
        let done = json!({"source":"agent","action":"finish","args":{"final_thought":"done"}});
        assert_eq!(finish.feed(&classify(&done)), Some(Ok(())));

        let mut echo = Turn::new("hi", Expect::Echo);
        echo.feed(&classify(&message("user", "hi")));
        assert_eq!(echo.feed(&classify(&message("agent", "hi"))), Some(Ok(())));
        let mut wrong = Turn::new("hi", Expect::Echo);
        wrong.feed(&classify(&message("user", "hi")));
        assert_eq!(
            wrong.feed(&classify(&message("agent", "Hello"))),
            Some(Err("unexpected-reply".into()))
        );
        let mut failed = Turn::new("hi", Expect::Any);
        assert_eq!(
            failed.feed(&classify(&state("error"))),
            Some(Err("agent-error".into()))
        );
    }
}
