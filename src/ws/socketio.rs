//! Engine.IO v4 / Socket.IO v5 text packets: parsing and encoding, for both ends.
//!
//! Pure functions, no I/O. The socket actor in [`super`] uses them to translate frames from
//! clients, and the load generator ([`crate::load`]) uses the same parser and encoders as a
//! client, so switchboard has one Socket.IO codec.

use serde_json::Value;

/// A text packet, as far as switchboard cares (either end may send most of them).
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// Engine.IO open (`0{…}`), sent by a server with its handshake data.
    Open(Value),
    /// Engine.IO ping (`2`), answered with a pong.
    Ping,
    /// Engine.IO pong (`3`), answering our ping.
    Pong,
    /// Engine.IO close (`1`).
    Close,
    /// Socket.IO CONNECT (`40`, `40{auth}`, `40/ns,{auth}`); from a server, the ack `40{"sid":…}`.
    Connect {
        namespace: String,
        auth: Option<Value>,
    },
    /// Socket.IO DISCONNECT (`41`).
    Disconnect { namespace: String },
    /// Socket.IO EVENT (`42[...]`, `421[...]` with an ack id).
    Event {
        namespace: String,
        ack: Option<u64>,
        name: String,
        args: Vec<Value>,
    },
    /// Socket.IO ACK (`43…`): nothing to do.
    Ack,
    /// Socket.IO CONNECT_ERROR (`44{"message":…}`), a server's refusal.
    ConnectError { namespace: String, data: Value },
    /// Anything else, with the reason it cannot be used.
    Invalid(String),
}

/// Splits `/ns,rest` into (`/ns`, `rest`); the default namespace is `/`.
fn split_namespace(s: &str) -> (String, &str) {
    if let Some(rest) = s.strip_prefix('/') {
        match rest.find(',') {
            Some(i) => (format!("/{}", &rest[..i]), &rest[i + 1..]),
            None => (s.to_string(), ""),
        }
    } else {
        ("/".to_string(), s)
    }
}

/// Parses one text frame.
pub fn parse(frame: &str) -> Packet {
    let mut chars = frame.chars();
    match chars.next() {
        Some('0') => match serde_json::from_str::<Value>(chars.as_str()) {
            Ok(v @ Value::Object(_)) => Packet::Open(v),
            _ => Packet::Invalid("OPEN payload must be a JSON object".into()),
        },
        Some('1') => Packet::Close,
        Some('2') => Packet::Ping,
        Some('3') => Packet::Pong,
        Some('4') => parse_socketio(chars.as_str()),
        Some('6') => Packet::Pong, // NOOP: harmless
        _ => Packet::Invalid("unknown Engine.IO packet".into()),
    }
}

fn parse_socketio(s: &str) -> Packet {
    let mut chars = s.chars();
    let kind = chars.next();
    let (namespace, rest) = split_namespace(chars.as_str());
    match kind {
        Some('0') => {
            if rest.trim().is_empty() {
                return Packet::Connect {
                    namespace,
                    auth: None,
                };
            }
            match serde_json::from_str::<Value>(rest) {
                Ok(v @ Value::Object(_)) => Packet::Connect {
                    namespace,
                    auth: Some(v),
                },
                _ => Packet::Invalid("CONNECT payload must be a JSON object".into()),
            }
        }
        Some('1') => Packet::Disconnect { namespace },
        Some('2') => {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let ack = if digits > 0 {
                match rest[..digits].parse::<u64>() {
                    Ok(n) => Some(n),
                    Err(_) => return Packet::Invalid("ack id too large".into()),
                }
            } else {
                None
            };
            match serde_json::from_str::<Value>(&rest[digits..]) {
                Ok(Value::Array(mut items)) if items.first().is_some_and(Value::is_string) => {
                    let name = items.remove(0).as_str().unwrap_or_default().to_string();
                    Packet::Event {
                        namespace,
                        ack,
                        name,
                        args: items,
                    }
                }
                _ => Packet::Invalid(
                    "an EVENT must be a JSON array starting with the event name".into(),
                ),
            }
        }
        Some('3') => Packet::Ack,
        Some('4') => Packet::ConnectError {
            namespace,
            data: serde_json::from_str(rest).unwrap_or_else(|_| Value::String(rest.to_string())),
        },
        Some('5') | Some('6') => Packet::Invalid("binary packets are not supported".into()),
        _ => Packet::Invalid("unknown Socket.IO packet".into()),
    }
}

/// The Engine.IO open packet.
pub fn open_packet(
    sid: &str,
    ping_interval_ms: u64,
    ping_timeout_ms: u64,
    max_payload: usize,
) -> String {
    format!(
        "0{}",
        serde_json::json!({
            "sid": sid,
            "upgrades": [],
            "pingInterval": ping_interval_ms,
            "pingTimeout": ping_timeout_ms,
            "maxPayload": max_payload,
        })
    )
}

/// `42["oh_event",<payload>]` from an already encoded JSON payload.
pub fn oh_event(payload_json: &str) -> String {
    let mut out = String::with_capacity(payload_json.len() + 16);
    out.push_str("42[\"oh_event\",");
    out.push_str(payload_json);
    out.push(']');
    out
}

/// CONNECT ack `40{"sid":…}`.
pub fn connect_ack(sid: &str) -> String {
    format!("40{}", serde_json::json!({ "sid": sid }))
}

/// CONNECT_ERROR `44{"message":…}` on the default namespace.
pub fn connect_error(message: &str) -> String {
    format!("44{}", serde_json::json!({ "message": message }))
}

/// ACK `43<id>[]` (with namespace when not the default).
pub fn ack(namespace: &str, id: u64) -> String {
    if namespace == "/" {
        format!("43{id}[]")
    } else {
        format!("43{namespace},{id}[]")
    }
}

/// Engine.IO pong, the answer to a ping (`2`).
pub const PONG: &str = "3";

/// Socket.IO DISCONNECT from the default namespace.
pub const DISCONNECT: &str = "41";

/// Socket.IO CONNECT to the default namespace, with an optional auth payload.
pub fn connect(auth: Option<&Value>) -> String {
    match auth {
        Some(a) => format!("40{a}"),
        None => "40".to_string(),
    }
}

/// Socket.IO EVENT `42["<name>",<payload>]`.
pub fn event(name: &str, payload: &Value) -> String {
    format!(
        "42{}",
        Value::Array(vec![Value::String(name.into()), payload.clone()])
    )
}

/// A random 20-character session id.
pub fn new_sid() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    hex[..20].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_what_clients_send() {
        assert_eq!(parse("3"), Packet::Pong);
        assert_eq!(
            parse("40"),
            Packet::Connect {
                namespace: "/".into(),
                auth: None
            }
        );
        assert_eq!(
            parse(r#"40{"session_api_key":"k"}"#),
            Packet::Connect {
                namespace: "/".into(),
                auth: Some(json!({"session_api_key":"k"}))
            }
        );
        assert_eq!(
            parse("40/foo,"),
            Packet::Connect {
                namespace: "/foo".into(),
                auth: None
            }
        );
        assert_eq!(
            parse(r#"42["oh_user_action",{"action":"message"}]"#),
            Packet::Event {
                namespace: "/".into(),
                ack: None,
                name: "oh_user_action".into(),
                args: vec![json!({"action":"message"})]
            }
        );
        assert_eq!(
            parse(r#"4212["x"]"#),
            Packet::Event {
                namespace: "/".into(),
                ack: Some(12),
                name: "x".into(),
                args: vec![]
            }
        );
        assert_eq!(
            parse("41"),
            Packet::Disconnect {
                namespace: "/".into()
            }
        );
        assert!(matches!(parse("42{}"), Packet::Invalid(_)));
        assert!(matches!(parse("42[1]"), Packet::Invalid(_)));
        assert!(matches!(parse("9"), Packet::Invalid(_)));
        assert!(matches!(parse("0[]"), Packet::Invalid(_)));
        assert!(matches!(parse(""), Packet::Invalid(_)));
        assert!(matches!(
            parse("4299999999999999999999999[\"x\"]"),
            Packet::Invalid(_)
        ));
    }

    #[test]
    fn parses_what_servers_send() {
        assert_eq!(
            parse(r#"0{"sid":"s","pingInterval":25000}"#),
            Packet::Open(json!({"sid":"s","pingInterval":25000}))
        );
        assert_eq!(
            parse(&connect_ack("abc")),
            Packet::Connect {
                namespace: "/".into(),
                auth: Some(json!({"sid":"abc"}))
            }
        );
        assert_eq!(
            parse(&connect_error("invalid_session_api_key")),
            Packet::ConnectError {
                namespace: "/".into(),
                data: json!({"message":"invalid_session_api_key"})
            }
        );
        assert_eq!(
            parse(r#"44/foo,"Unable to connect""#),
            Packet::ConnectError {
                namespace: "/foo".into(),
                data: json!("Unable to connect")
            }
        );
        assert_eq!(
            parse(&oh_event(r#"{"id":1}"#)),
            Packet::Event {
                namespace: "/".into(),
                ack: None,
                name: "oh_event".into(),
                args: vec![json!({"id":1})]
            }
        );
    }

    #[test]
    fn encodes_what_a_client_sends() {
        assert_eq!(connect(None), "40");
        assert_eq!(connect(Some(&json!({"k":"v"}))), r#"40{"k":"v"}"#);
        let frame = event("oh_user_action", &json!({"action":"message"}));
        assert_eq!(frame, r#"42["oh_user_action",{"action":"message"}]"#);
        assert!(matches!(parse(&frame), Packet::Event { name, .. } if name == "oh_user_action"));
        assert_eq!(parse(PONG), Packet::Pong);
        assert_eq!(
            parse(DISCONNECT),
            Packet::Disconnect {
                namespace: "/".into()
            }
        );
    }

    #[test]
    fn encodes_what_we_send() {
        assert_eq!(oh_event(r#"{"id":1}"#), r#"42["oh_event",{"id":1}]"#);
        assert_eq!(ack("/", 1), "431[]");
        assert_eq!(connect_error("nope"), r#"44{"message":"nope"}"#);
        assert_eq!(new_sid().len(), 20);
        assert!(open_packet("s", 25000, 20000, 100).starts_with(r#"0{"sid":"s","upgrades":[]"#));
    }
}
