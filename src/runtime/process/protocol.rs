//! The agent protocol's lines (`docs/runtime-protocol.md`): the `init` line's head, the
//! lines switchboard writes, and the checks every line an agent writes must pass.

use super::*;

/// The protocol version this runtime speaks (the `protocol` field of `init`).
pub const PROTOCOL_VERSION: u64 = 1;
/// Status id of the error reported for a line that is not valid protocol.
pub const STATUS_AGENT_PROTOCOL_ERROR: &str = "STATUS$ERROR_AGENT_PROTOCOL";
/// Status id of the error reported when a user event cannot be handed to the agent.
pub const STATUS_AGENT_INPUT_ERROR: &str = "STATUS$ERROR_AGENT_INPUT";
/// Longest status id accepted from an agent.
pub(super) const MAX_STATUS_ID: usize = 256;
/// Longest `ref` string accepted from an agent.
pub(super) const MAX_REF_BYTES: usize = 256;

/// The `init` line up to and including `"history":[`; the writer streams the rest.
pub(super) fn init_head(
    conversation_id: &str,
    trigger: &str,
    init: &InitData,
    working_dir: &Path,
    settings: Option<&Value>,
) -> Result<String, Failure> {
    let mut init = serde_json::to_value(init)
        .map_err(|e| Failure::of(e).within("cannot encode the conversation's init data"))?;
    if let Value::Object(map) = &mut init {
        map.insert("trigger".into(), json!(trigger));
    }
    let head = json!({
        "type": "init",
        "protocol": PROTOCOL_VERSION,
        "conversation_id": conversation_id,
        "working_dir": working_dir.to_string_lossy(),
        "init": init,
        "settings": settings,
    });
    let mut text = head.to_string();
    text.pop(); // the closing brace
    text.push_str(",\"history\":[");
    Ok(text)
}

/// One protocol message as a line.
pub(super) fn protocol_line(value: &Value) -> Vec<u8> {
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// A user event as the agent gets it: the stored event's keys without the timestamp.
pub(super) fn event_value(id: u64, body: &EventBody) -> Value {
    body.to_value(id, None)
}

/// Reads one agent line: `Ok(None)` for a blank line, `Err` for anything not valid protocol.
pub fn parse_line(bytes: &[u8]) -> Result<Option<RuntimeSignal>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the line is not UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("the line is not JSON ({e})"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "a message must be a JSON object".to_string())?;
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| "a message needs a string `type`".to_string())?;
    match kind {
        "ready" => {
            let manages_agent_state = match obj.get("manages_agent_state") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err("`manages_agent_state` must be true or false".into()),
            };
            Ok(Some(RuntimeSignal::Ready {
                manages_agent_state,
            }))
        }
        "event" => parse_event(obj).map(Some),
        "status" => {
            let status_type = match obj.get("status_type").and_then(Value::as_str) {
                Some(t @ ("info" | "error")) => t,
                _ => {
                    return Err(
                        "a `status` message needs `status_type` \"info\" or \"error\"".into(),
                    )
                }
            };
            let id = obj
                .get("id")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty() && id.len() <= MAX_STATUS_ID)
                .ok_or_else(|| {
                    format!("a `status` message needs a string `id` of 1-{MAX_STATUS_ID} bytes")
                })?;
            let message = match obj.get("message") {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s,
                Some(_) => return Err("a status `message` must be a string".into()),
            };
            Ok(Some(RuntimeSignal::Status(StatusUpdate::new(
                status_type,
                id,
                message,
            ))))
        }
        other => Err(format!("unknown message type {other:?}")),
    }
}

/// An agent's `event` message: the event, its `ref` and a `cause` that names a `ref`.
pub(super) fn parse_event(
    message: &serde_json::Map<String, Value>,
) -> Result<RuntimeSignal, String> {
    let reference = match message.get("ref") {
        None | Some(Value::Null) => None,
        Some(r) => Some(check_ref(r).map_err(|e| format!("invalid `ref`: {e}"))?),
    };
    let mut event = match message.get("event") {
        Some(Value::Object(event)) => event.clone(),
        _ => return Err("an `event` message needs an `event` object".into()),
    };
    let mut cause_ref = None;
    if let Some(Value::Object(cause)) = event.get("cause") {
        let r = match (cause.len(), cause.get("ref")) {
            (1, Some(r)) => check_ref(r).map_err(|e| format!("invalid event: `cause.ref`: {e}"))?,
            _ => {
                return Err("invalid event: `cause` must be an event id or {\"ref\": …}".to_string())
            }
        };
        cause_ref = Some(r);
        event.shift_remove("cause");
    }
    let body =
        EventBody::from_value(&Value::Object(event)).map_err(|e| format!("invalid event: {e}"))?;
    if body.source == Source::User && body.action_name() == Some("message") {
        return Err("invalid event: an agent cannot send a user `message`".into());
    }
    if reference.is_none() && cause_ref.is_none() {
        return Ok(RuntimeSignal::Event(body));
    }
    Ok(RuntimeSignal::Referenced(Box::new(ReferencedEvent {
        body,
        reference,
        cause_ref,
    })))
}

/// A `ref` is a string of 1–256 bytes or an integer.
pub(super) fn check_ref(reference: &Value) -> Result<Value, String> {
    match reference {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_REF_BYTES => Ok(reference.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(reference.clone()),
        _ => Err(format!(
            "a ref must be a string of 1-{MAX_REF_BYTES} bytes or an integer"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_protocol_lines() {
        assert_eq!(
            parse_line(br#"{"type":"ready"}"#).unwrap(),
            Some(RuntimeSignal::READY)
        );
        assert_eq!(parse_line(b"   ").unwrap(), None);
        let Some(RuntimeSignal::Event(body)) = parse_line(
            br#"{"type":"event","event":{"observation":"run","content":"hi","extras":{"exit_code":0}}}"#,
        )
        .unwrap() else {
            panic!("expected an event")
        };
        assert_eq!(body.source, Source::Agent);
        let Some(RuntimeSignal::Status(s)) =
            parse_line(br#"{"type":"status","status_type":"error","id":"STATUS$X","message":"m"}"#)
                .unwrap()
        else {
            panic!("expected a status")
        };
        assert_eq!(
            (s.kind.as_str(), s.id.as_deref(), s.message.as_str()),
            ("error", Some("STATUS$X"), "m")
        );
        for bad in [
            &b"not json"[..],
            b"[1]",
            b"{}",
            br#"{"type":"dance"}"#,
            br#"{"type":"event"}"#,
            br#"{"type":"event","event":{"source":"user","action":"message"}}"#,
            br#"{"type":"event","ref":"","event":{"action":"run"}}"#,
            br#"{"type":"event","ref":1.5,"event":{"action":"run"}}"#,
            br#"{"type":"event","event":{"observation":"run","cause":{"id":1}}}"#,
            br#"{"type":"event","event":{"observation":"run","cause":"3"}}"#,
            br#"{"type":"ready","manages_agent_state":"yes"}"#,
            br#"{"type":"status","status_type":"warning","id":"X"}"#,
            br#"{"type":"status","status_type":"info"}"#,
            b"\xff\xfe",
        ] {
            assert!(parse_line(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn user_events_keep_the_stored_layout_without_timestamp() {
        let body = EventBody::message(Source::User, "ls", json!([]), false);
        let v = event_value(7, &body);
        let stored: Value = serde_json::from_str(&body.stamp(7, "t").json).unwrap();
        let mut expected = stored.as_object().unwrap().clone();
        expected.shift_remove("timestamp");
        assert_eq!(v, Value::Object(expected));
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "source", "message", "action", "args"]);
    }
}
