//! One load client's I/O: REST calls that back off on `429`, and a socket attached to one
//! conversation (Socket.IO through switchboard's own codec, or the plain JSON WebSocket).
//!
//! Every wait is bounded by the caller's deadline; a `429` is retried after its `Retry-After`
//! (or a doubling backoff) and counted, and becomes the `rate-limited` failure only when the
//! deadline leaves no time for another try.

use std::cell::Cell;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

use super::wire::{classify, short, Signal};
use super::Attach;
use crate::ws::socketio::{self, Packet};

/// Why one conversation failed, as a short kind for counting.
pub type Failure = String;

type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

/// The largest frame or body a load client reads.
const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// One server under load.
pub struct Target {
    pub url: String,
    ws_base: String,
}

impl Target {
    pub fn new(url: &str) -> Self {
        let url = url.trim_end_matches('/').to_string();
        let ws_base = url
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        Target { url, ws_base }
    }
}

/// An HTTP client shared by every conversation of a run.
pub struct Http {
    pub client: awc::Client,
    pub key: Option<String>,
    /// `429` answers seen (each one retried or, at the deadline, a `rate-limited` failure).
    pub rate_limited: Cell<u64>,
}

impl Http {
    fn with_key(&self, req: awc::ClientRequest) -> awc::ClientRequest {
        match &self.key {
            Some(k) => req.insert_header(("X-Session-API-Key", k.as_str())),
            None => req,
        }
    }

    /// A JSON request; a `429` is retried until `deadline`.
    pub async fn json(
        &self,
        target: &Target,
        method: awc::http::Method,
        path: &str,
        body: Option<&Value>,
        deadline: Instant,
    ) -> Result<Value, Failure> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let req = self.with_key(
                self.client
                    .request(method.clone(), format!("{}{path}", target.url)),
            );
            let sent = match body {
                Some(b) => req.send_json(b).await,
                None => req.send().await,
            };
            let mut resp = sent.map_err(|e| format!("http-send: {}", short(&e.to_string())))?;
            let status = resp.status().as_u16();
            if status == 429 {
                self.rate_limited.set(self.rate_limited.get() + 1);
                let wait = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| Duration::from_secs_f64(s.min(60.0)))
                    .unwrap_or(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                // Read the body, or the pooled connection is not fit for the next request.
                let _ = resp.body().limit(MAX_FRAME_BYTES).await;
                if Instant::now() + wait >= deadline {
                    return Err("rate-limited".into());
                }
                actix_web::rt::time::sleep(wait).await;
                continue;
            }
            let bytes = resp
                .body()
                .limit(MAX_FRAME_BYTES)
                .await
                .map_err(|e| format!("http-body: {}", short(&e.to_string())))?;
            if status != 200 {
                return Err(format!("http-{status}"));
            }
            return serde_json::from_slice(&bytes).map_err(|_| "http-bad-json".to_string());
        }
    }

    pub async fn post(
        &self,
        target: &Target,
        path: &str,
        body: &Value,
        deadline: Instant,
    ) -> Result<Value, Failure> {
        self.json(target, awc::http::Method::POST, path, Some(body), deadline)
            .await
    }

    pub async fn get(
        &self,
        target: &Target,
        path: &str,
        deadline: Instant,
    ) -> Result<Value, Failure> {
        self.json(target, awc::http::Method::GET, path, None, deadline)
            .await
    }
}

/// A user `message` action.
pub fn user_message(content: &str) -> Value {
    json!({"action": "message", "args": {"content": content, "image_urls": [], "file_urls": []}})
}

/// A socket attached to one conversation.
pub struct Conn {
    ws: Socket,
    attach: Attach,
    /// The server acknowledged the Socket.IO CONNECT (always true for plain WebSocket). A
    /// server may replay events before its ack (OpenHands does), so readiness can come first.
    pub acked: bool,
}

impl Conn {
    /// Opens the socket (and, for Socket.IO, sends CONNECT; the ack is read with the events).
    /// The session key goes in the query and a header, never in the CONNECT payload, which
    /// OpenHands does not answer.
    pub async fn open(
        http: &Http,
        target: &Target,
        id: &str,
        attach: Attach,
    ) -> Result<Conn, Failure> {
        let path = match attach {
            Attach::Socketio => {
                let mut query = vec![
                    ("EIO", "4"),
                    ("transport", "websocket"),
                    ("conversation_id", id),
                    ("latest_event_id", "-1"),
                    ("providers_set", ""),
                ];
                if let Some(k) = &http.key {
                    query.push(("session_api_key", k));
                }
                let query =
                    serde_urlencoded::to_string(query).map_err(|_| "bad-query".to_string())?;
                format!("/socket.io/?{query}")
            }
            Attach::Ws => format!("/ws/conversations/{id}"),
            Attach::None => return Err("no-socket".into()),
        };
        let mut req = http
            .client
            .ws(format!("{}{path}", target.ws_base))
            .max_frame_size(MAX_FRAME_BYTES);
        if let Some(k) = &http.key {
            req = req.header("X-Session-API-Key", k.as_str());
        }
        let ws = req
            .connect()
            .await
            .map(|(_, framed)| framed)
            .map_err(|e| format!("ws-connect: {}", short(&e.to_string())))?;
        let mut conn = Conn {
            ws,
            attach,
            acked: attach == Attach::Ws,
        };
        if attach == Attach::Socketio {
            let open = conn.next_text().await?;
            if !matches!(socketio::parse(&open), Packet::Open(_)) {
                return Err("sio-no-open".into());
            }
            conn.send(socketio::connect(None)).await?;
        }
        Ok(conn)
    }

    async fn send(&mut self, text: String) -> Result<(), Failure> {
        self.ws
            .send(awc::ws::Message::Text(text.into()))
            .await
            .map_err(|_| "ws-send".to_string())
    }

    /// The next text frame (answering WebSocket pings on the way).
    async fn next_text(&mut self) -> Result<String, Failure> {
        loop {
            match self.ws.next().await {
                None => return Err("ws-closed".into()),
                Some(Err(e)) => return Err(format!("ws-error: {}", short(&e.to_string()))),
                Some(Ok(awc::ws::Frame::Text(b))) => {
                    return Ok(String::from_utf8_lossy(&b).into_owned())
                }
                Some(Ok(awc::ws::Frame::Ping(p))) => {
                    let _ = self.ws.send(awc::ws::Message::Pong(p)).await;
                }
                Some(Ok(awc::ws::Frame::Close(_))) => return Err("ws-closed".into()),
                Some(Ok(_)) => {}
            }
        }
    }

    /// The next event or status update, classified; the Socket.IO CONNECT ack is
    /// [`Signal::Other`] (and sets [`Conn::acked`]).
    pub async fn next_signal(&mut self) -> Result<Signal, Failure> {
        loop {
            let text = self.next_text().await?;
            if self.attach == Attach::Ws {
                let value: Value =
                    serde_json::from_str(&text).map_err(|_| "ws-bad-json".to_string())?;
                return Ok(classify(&value));
            }
            match socketio::parse(&text) {
                Packet::Ping => self.send(socketio::PONG.to_string()).await?,
                Packet::Connect { .. } => {
                    self.acked = true;
                    return Ok(Signal::Other);
                }
                Packet::ConnectError { .. } => return Err("sio-refused".into()),
                Packet::Disconnect { .. } | Packet::Close => return Err("disconnected".into()),
                Packet::Event { name, args, .. } if name == "oh_event" => {
                    if let Some(payload) = args.first() {
                        return Ok(classify(payload));
                    }
                }
                Packet::Invalid(_) => return Err("sio-bad-packet".into()),
                _ => {}
            }
        }
    }

    /// Reads until the Socket.IO CONNECT is acknowledged.
    pub async fn wait_ack(&mut self) -> Result<(), Failure> {
        while !self.acked {
            if let Signal::Failure(kind) = self.next_signal().await? {
                return Err(kind);
            }
        }
        Ok(())
    }

    /// Sends a user message.
    pub async fn send_message(&mut self, content: &str) -> Result<(), Failure> {
        let action = user_message(content);
        let text = match self.attach {
            Attach::Socketio => socketio::event("oh_user_action", &action),
            _ => action.to_string(),
        };
        self.send(text).await
    }

    /// Detaches politely.
    pub async fn close(mut self) {
        if self.attach == Attach::Socketio {
            let _ = self.send(socketio::DISCONNECT.to_string()).await;
        }
        let _ = self.ws.send(awc::ws::Message::Close(None)).await;
    }
}
