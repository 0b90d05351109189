//! The OpenHands event model and its JSON form.
//!
//! An [`EventBody`] is what a runtime or a user produces: an action or an observation without
//! id or timestamp. The conversation actor stamps it into a [`StoredEvent`], whose JSON text is
//! computed once and shared (`Arc<str>`) by the store, the REST API and every attached client,
//! so all three see byte-identical events. Key order is the wire contract's: `id`, `timestamp`,
//! `source`, `message`, `cause`, then `action` + `args` or `observation` + `content` + `extras`,
//! then every other key the producer sent, unchanged and in its order (an agent's
//! `tool_call_metadata`, `llm_metrics`, …): events are lossless.

use std::sync::{Arc, LazyLock, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::pattern::Pattern;

/// Who produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = EventSource)]
pub enum Source {
    User,
    Agent,
    Environment,
}

/// An action or observation before it has an id.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBody {
    pub source: Source,
    pub message: String,
    /// The id of the event this one answers.
    pub cause: Option<u64>,
    pub kind: EventKind,
    /// Every other top-level key the producer sent, unchanged and in its order.
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    Action {
        action: String,
        args: Value,
    },
    Observation {
        observation: String,
        content: String,
        extras: Value,
    },
}

/// The top-level keys switchboard reads itself; any other key of an event is kept as it is.
const KNOWN_KEYS: &[&str] = &[
    "id",
    "timestamp",
    "source",
    "message",
    "cause",
    "action",
    "args",
    "observation",
    "content",
    "extras",
];

/// An event with its id and timestamp, and its JSON text computed once.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: u64,
    pub json: Arc<str>,
}

/// Agent states an `agent_state_changed` observation can carry.
pub const AGENT_STATES: &[&str] = &[
    "loading",
    "running",
    "awaiting_user_input",
    "paused",
    "stopped",
    "finished",
    "rejected",
    "error",
    "awaiting_user_confirmation",
    "user_confirmed",
    "user_rejected",
    "rate_limited",
];

/// The current UTC time in the event timestamp form (`2026-11-29T17:41:25.002345`).
pub fn event_timestamp() -> String {
    let mut ts = meta_timestamp();
    ts.pop(); // the `Z`
    ts
}

/// The current UTC time in the metadata form (`2026-11-29T17:41:25.002345Z`).
pub fn meta_timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl EventBody {
    /// `agent_state_changed` observation from the environment.
    pub fn agent_state(state: &str, reason: &str) -> Self {
        EventBody {
            source: Source::Environment,
            message: String::new(),
            cause: None,
            kind: EventKind::Observation {
                observation: "agent_state_changed".into(),
                content: String::new(),
                extras: json!({"agent_state": state, "reason": reason}),
            },
            extra: Map::new(),
        }
    }

    /// A chat `message` action.
    pub fn message(source: Source, content: &str, image_urls: Value, wait: bool) -> Self {
        let file_urls = if source == Source::User {
            json!([])
        } else {
            Value::Null
        };
        Self::chat(source, content, file_urls, image_urls, wait)
    }

    /// A chat `message` the user sent with these files and images.
    pub fn user_message(content: &str, image_urls: Vec<String>, file_urls: Vec<String>) -> Self {
        Self::chat(
            Source::User,
            content,
            json!(file_urls),
            json!(image_urls),
            false,
        )
    }

    fn chat(
        source: Source,
        content: &str,
        file_urls: Value,
        image_urls: Value,
        wait: bool,
    ) -> Self {
        EventBody {
            source,
            message: content.to_string(),
            cause: None,
            kind: EventKind::Action {
                action: "message".into(),
                args: json!({
                    "content": content,
                    "file_urls": file_urls,
                    "image_urls": image_urls,
                    "wait_for_response": wait,
                }),
            },
            extra: Map::new(),
        }
    }

    /// An `error` observation, stored so that a failure survives restarts.
    pub fn error(message: &str) -> Self {
        EventBody {
            source: Source::Environment,
            message: message.to_string(),
            cause: None,
            kind: EventKind::Observation {
                observation: "error".into(),
                content: message.to_string(),
                extras: json!({"error_id": ""}),
            },
            extra: Map::new(),
        }
    }

    /// The agent state this event announces, if it is an `agent_state_changed` observation.
    pub fn announced_agent_state(&self) -> Option<&str> {
        match &self.kind {
            EventKind::Observation {
                observation,
                extras,
                ..
            } if observation == "agent_state_changed" => {
                extras.get("agent_state").and_then(Value::as_str)
            }
            _ => None,
        }
    }

    /// The action name, for actions.
    pub fn action_name(&self) -> Option<&str> {
        match &self.kind {
            EventKind::Action { action, .. } => Some(action),
            EventKind::Observation { .. } => None,
        }
    }

    /// Stamps the body with an id and timestamp and renders its JSON once, in wire key order,
    /// straight from the body (no intermediate `Value`).
    pub fn stamp(&self, id: u64, timestamp: &str) -> StoredEvent {
        let wire = Wire {
            body: self,
            id,
            timestamp: Some(timestamp),
        };
        // Serializing values with string keys cannot fail; an empty object never is stored.
        let json = serde_json::to_string(&wire).unwrap_or_else(|_| "{}".to_string());
        StoredEvent {
            id,
            json: json.into(),
        }
    }

    /// The event object in wire key order; without `timestamp` when none is given.
    pub fn to_value(&self, id: u64, timestamp: Option<&str>) -> Value {
        let wire = Wire {
            body: self,
            id,
            timestamp,
        };
        serde_json::to_value(&wire).unwrap_or_else(|_| Value::Object(Map::new()))
    }

    /// Reads a body from an event object (ignoring any `id` and `timestamp` it carries), as
    /// replayed from `replay_json` or sent by an agent process. Only the fields switchboard
    /// relies on are checked; every other top-level key is kept unchanged in [`EventBody::extra`].
    pub fn from_value(value: &Value) -> Result<Self, String> {
        let obj = value
            .as_object()
            .ok_or_else(|| "an event must be a JSON object".to_string())?;
        let source = match obj.get("source") {
            None | Some(Value::Null) => Source::Agent,
            Some(v) => serde_json::from_value::<Source>(v.clone())
                .map_err(|_| "`source` must be user, agent or environment".to_string())?,
        };
        let message = match obj.get("message") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err("`message` must be a string".into()),
        };
        let cause = match obj.get("cause") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| "`cause` must be an event id".to_string())?,
            ),
        };
        let kind = if let Some(action) = obj.get("action") {
            if obj.contains_key("observation") {
                return Err("an event cannot be both an `action` and an `observation`".into());
            }
            let action = action
                .as_str()
                .filter(|a| is_event_name(a))
                .ok_or_else(|| "`action` must be a lowercase name".to_string())?;
            let args = match obj.get("args") {
                None | Some(Value::Null) => json!({}),
                Some(v @ Value::Object(_)) => v.clone(),
                Some(_) => return Err("`args` must be an object".into()),
            };
            EventKind::Action {
                action: action.to_string(),
                args,
            }
        } else if let Some(observation) = obj.get("observation") {
            let observation = observation
                .as_str()
                .filter(|a| is_event_name(a))
                .ok_or_else(|| "`observation` must be a lowercase name".to_string())?;
            let content = match obj.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err("`content` must be a string".into()),
            };
            let extras = match obj.get("extras") {
                None | Some(Value::Null) => json!({}),
                Some(v @ Value::Object(_)) => v.clone(),
                Some(_) => return Err("`extras` must be an object".into()),
            };
            if obj.contains_key("args") {
                return Err("an observation has `extras`, not `args`".into());
            }
            EventKind::Observation {
                observation: observation.to_string(),
                content,
                extras,
            }
        } else {
            return Err("an event needs `action` or `observation`".into());
        };
        let extra = obj
            .iter()
            .filter(|(key, _)| !KNOWN_KEYS.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        Ok(EventBody {
            source,
            message,
            cause,
            kind,
            extra,
        })
    }
}

impl EventBody {
    /// An action other than `message` the user sent, with its `args` and `message`.
    pub fn user_action(action: String, args: Map<String, Value>, message: String) -> Self {
        EventBody {
            source: Source::User,
            message,
            cause: None,
            kind: EventKind::Action {
                action,
                args: Value::Object(args),
            },
            extra: Map::new(),
        }
    }
}

/// The event-name rule's constants, made from its one length (a literal, so that the pattern
/// is built at compile time).
macro_rules! event_name_rule {
    ($max_len:literal) => {
        /// Most characters of an action or observation name.
        pub const EVENT_NAME_MAX_LEN: usize = $max_len;
        /// Action and observation names as a JSON Schema pattern (the OpenAPI document states
        /// it): 1–[`EVENT_NAME_MAX_LEN`] characters of `[a-z0-9_]`.
        pub const EVENT_NAME_PATTERN: &str = concat!("^[a-z0-9_]{1,", $max_len, "}$");
    };
}

event_name_rule!(64);

/// Whether `name` is an action or observation name: it matches [`EVENT_NAME_PATTERN`].
pub fn is_event_name(name: &str) -> bool {
    static RULE: LazyLock<Pattern> = LazyLock::new(|| Pattern::new(EVENT_NAME_PATTERN));
    RULE.is_match(name)
}

/// A conversation's title until it is renamed or titled from its first message:
/// `Conversation <first 5 characters of its id>`, as OpenHands names them.
pub fn default_title(conversation_id: &str) -> String {
    format!(
        "Conversation {}",
        conversation_id.chars().take(5).collect::<String>()
    )
}

/// The title OpenHands gives a conversation from its first user message when no LLM titles it:
/// the stripped message's first 30 characters, plus `...` when it is longer. `None` for a
/// blank message.
pub fn title_from_message(message: &str) -> Option<String> {
    let stripped = message.trim();
    if stripped.is_empty() {
        return None;
    }
    let mut title: String = stripped.chars().take(30).collect();
    if stripped.chars().nth(30).is_some() {
        title.push_str("...");
    }
    Some(title)
}

impl EventBody {
    /// The text of a user's chat `message` action.
    pub fn user_message_content(&self) -> Option<&str> {
        match &self.kind {
            EventKind::Action { action, args }
                if self.source == Source::User && action == "message" =>
            {
                args.get("content").and_then(Value::as_str)
            }
            _ => None,
        }
    }
}

/// A payload sent to clients as `oh_event` that is not a stored event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusUpdate {
    pub status_update: bool,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_title: Option<String>,
}

impl StatusUpdate {
    pub fn info(id: &str) -> Self {
        Self::new("info", id, "")
    }

    pub fn error(id: &str, message: &str) -> Self {
        Self::new("error", id, message)
    }

    /// Whether it reports an error (made by [`StatusUpdate::error`] or sent so by a runtime).
    pub fn is_error(&self) -> bool {
        self.kind == "error"
    }

    pub fn new(kind: &str, id: &str, message: &str) -> Self {
        StatusUpdate {
            status_update: true,
            kind: kind.to_string(),
            id: Some(id.to_string()),
            message: message.to_string(),
            conversation_title: None,
        }
    }

    pub fn title(conversation_id: &str, title: &str) -> Self {
        StatusUpdate {
            status_update: true,
            kind: "info".into(),
            id: None,
            message: conversation_id.to_string(),
            conversation_title: Some(title.to_string()),
        }
    }

    /// The JSON text; the two updates every conversation sends share one allocation.
    pub fn to_json(&self) -> Arc<str> {
        static READY: OnceLock<Arc<str>> = OnceLock::new();
        static STARTING: OnceLock<Arc<str>> = OnceLock::new();
        if self.kind == "info" && self.message.is_empty() && self.conversation_title.is_none() {
            let cache = match self.id.as_deref() {
                Some(STATUS_READY) => Some(&READY),
                Some(STATUS_STARTING_RUNTIME) => Some(&STARTING),
                _ => None,
            };
            if let Some(cache) = cache {
                return cache.get_or_init(|| self.render()).clone();
            }
        }
        self.render()
    }

    fn render(&self) -> Arc<str> {
        serde_json::to_string(self)
            .unwrap_or_else(|_| "{}".into())
            .into()
    }
}

pub const STATUS_STARTING_RUNTIME: &str = "STATUS$STARTING_RUNTIME";
pub const STATUS_READY: &str = "STATUS$READY";
pub const STATUS_ERROR_RUNTIME_DISCONNECTED: &str = "STATUS$ERROR_RUNTIME_DISCONNECTED";
pub const TOO_MANY_CONVERSATIONS: &str = "AGENT_ERROR$TOO_MANY_CONVERSATIONS";
pub const TOO_MANY_CONVERSATIONS_MESSAGE: &str = "Too many conversations at once. If you are still using this one, try reactivating it by prompting the agent to continue";

/// An event as written to the wire: `id`, `timestamp` (when given), `source`, `message`, `cause` (when
/// set), then the action's `action`/`args` or the observation's `observation`/`content`/`extras`,
/// then the unknown fields kept from the event as sent. An unknown field named like a known one
/// takes the known one's place.
struct Wire<'a> {
    body: &'a EventBody,
    id: u64,
    timestamp: Option<&'a str>,
}

impl Wire<'_> {
    /// Whether `key` is one of the known fields this event writes.
    fn known(&self, key: &str) -> bool {
        match key {
            "id" | "source" | "message" => true,
            "timestamp" => self.timestamp.is_some(),
            "cause" => self.body.cause.is_some(),
            "action" | "args" => matches!(self.body.kind, EventKind::Action { .. }),
            "observation" | "content" | "extras" => {
                matches!(self.body.kind, EventKind::Observation { .. })
            }
            _ => false,
        }
    }
}

impl Serialize for Wire<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let body = self.body;
        let mut map = serializer.serialize_map(None)?;
        // A known field, unless an unknown field of the same name takes its place.
        macro_rules! entry {
            ($key:literal, $own:expr) => {
                match body.extra.get($key) {
                    Some(sent) => map.serialize_entry($key, sent),
                    None => map.serialize_entry($key, $own),
                }
            };
        }
        entry!("id", &self.id)?;
        if let Some(timestamp) = self.timestamp {
            entry!("timestamp", timestamp)?;
        }
        entry!("source", &body.source)?;
        entry!("message", &body.message)?;
        if let Some(cause) = &body.cause {
            entry!("cause", cause)?;
        }
        match &body.kind {
            EventKind::Action { action, args } => {
                entry!("action", action)?;
                entry!("args", args)?;
            }
            EventKind::Observation {
                observation,
                content,
                extras,
            } => {
                entry!("observation", observation)?;
                entry!("content", content)?;
                entry!("extras", extras)?;
            }
        }
        for (key, value) in &body.extra {
            if !self.known(key) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_from_messages_follow_openhands() {
        assert_eq!(title_from_message("  \n "), None);
        assert_eq!(title_from_message("  hello \n").as_deref(), Some("hello"));
        let exactly = "x".repeat(30);
        assert_eq!(
            title_from_message(&exactly).as_deref(),
            Some(exactly.as_str())
        );
        assert_eq!(
            title_from_message(&format!(" {}é ", "ü".repeat(30))).as_deref(),
            Some(format!("{}...", "ü".repeat(30)).as_str())
        );
        assert_eq!(default_title("abcdef123"), "Conversation abcde");
    }

    #[test]
    fn stamped_events_keep_the_wire_key_order() {
        let ev = EventBody::agent_state("loading", "").stamp(0, "2026-11-29T17:41:23.572547");
        assert_eq!(
            &*ev.json,
            r#"{"id":0,"timestamp":"2026-11-29T17:41:23.572547","source":"environment","message":"","observation":"agent_state_changed","content":"","extras":{"agent_state":"loading","reason":""}}"#
        );
        let ev = EventBody::message(Source::User, "What is 2+2?", json!([]), false)
            .stamp(4, "2026-11-29T17:41:25.002345");
        assert_eq!(
            &*ev.json,
            r#"{"id":4,"timestamp":"2026-11-29T17:41:25.002345","source":"user","message":"What is 2+2?","action":"message","args":{"content":"What is 2+2?","file_urls":[],"image_urls":[],"wait_for_response":false}}"#
        );
    }

    /// The wire rendering is what inserting the fields into an ordered map gives: known fields
    /// first, an unknown field named like a known one in the known one's place.
    #[test]
    fn stamped_json_is_the_ordered_map_of_the_fields() {
        let mut body = EventBody::error("disk full");
        body.extra.insert("zz".into(), json!(1));
        body.extra.insert("message".into(), json!("from the agent"));
        body.extra.insert("cause".into(), json!(7));
        body.extra.insert("aa".into(), json!({"b": [1.5, null]}));
        let mut expected = Map::new();
        expected.insert("id".into(), json!(3));
        expected.insert("timestamp".into(), json!("t"));
        expected.insert("source".into(), json!("environment"));
        expected.insert("message".into(), json!("disk full"));
        expected.insert("observation".into(), json!("error"));
        expected.insert("content".into(), json!("disk full"));
        expected.insert("extras".into(), json!({"error_id": ""}));
        for (key, value) in &body.extra {
            expected.insert(key.clone(), value.clone());
        }
        let expected = Value::Object(expected);
        assert_eq!(&*body.stamp(3, "t").json, expected.to_string());
        assert_eq!(body.to_value(3, Some("t")), expected);
        let untimed = body.to_value(3, None);
        assert_eq!(untimed.get("timestamp"), None);
        assert_eq!(
            untimed
                .as_object()
                .map(|o| o.keys().take(3).cloned().collect::<Vec<_>>()),
            Some(vec![
                "id".to_string(),
                "source".to_string(),
                "message".to_string()
            ])
        );
    }

    #[test]
    fn timestamps_have_microseconds_and_no_offset_in_events() {
        let e = event_timestamp();
        assert_eq!(e.len(), 26, "{e}");
        assert_eq!(&e[10..11], "T");
        assert_eq!(&e[19..20], ".");
        let m = meta_timestamp();
        assert_eq!(m.len(), 27, "{m}");
        assert!(m.ends_with('Z'));
    }

    #[test]
    fn unknown_fields_round_trip_after_the_known_ones() {
        let sent = json!({"timestamp": "ignored", "llm_metrics": {"b": 1, "a": [1.5, null]},
            "action": "run", "args": {"command": "ls"}, "cause": 3, "timeout": 120,
            "source": "agent"});
        let body = EventBody::from_value(&sent).unwrap();
        assert_eq!(body.cause, Some(3));
        let stored = body.stamp(9, "t");
        assert_eq!(
            &*stored.json,
            r#"{"id":9,"timestamp":"t","source":"agent","message":"","cause":3,"action":"run","args":{"command":"ls"},"llm_metrics":{"b":1,"a":[1.5,null]},"timeout":120}"#
        );
        assert!(EventBody::from_value(&json!({"action": "run", "observation": "run"})).is_err());
        assert!(EventBody::from_value(&json!({"observation": "run", "args": {}})).is_err());
    }

    #[test]
    fn from_value_rejects_malformed_events() {
        assert!(EventBody::from_value(&json!([])).is_err());
        assert!(EventBody::from_value(&json!({"message": "x"})).is_err());
        assert!(EventBody::from_value(&json!({"action": "Bad Name"})).is_err());
        assert!(EventBody::from_value(&json!({"action": "run", "args": 3})).is_err());
        let ok =
            EventBody::from_value(&json!({"id": 9, "action": "run", "args": {"command": "ls"}}))
                .unwrap();
        assert_eq!(ok.action_name(), Some("run"));
    }
}
