//! Starting a real server for a test and talking to it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard::config::{Settings, StoreKind};
use switchboard::conversation::ConversationId;
use switchboard::startup::Application;
use switchboard::store::Store;

pub struct TestApp {
    pub url: String,
    pub client: awc::Client,
    pub handle: switchboard::startup::StopHandle,
    pub store: Arc<dyn Store>,
    pub key: Option<String>,
    pub done: Option<tokio::sync::oneshot::Receiver<()>>,
    pub _data_dir: tempfile::TempDir,
}

/// The conversation id `text` (a valid one), for reading a test server's store directly.
pub fn cid(text: impl AsRef<str>) -> ConversationId {
    ConversationId::parse(text.as_ref()).expect("a valid conversation id")
}

pub fn test_settings() -> Settings {
    let mut s = Settings::defaults();
    s.port = 0;
    s.workers = 1;
    s.conversation_threads = 2;
    s.store = StoreKind::Memory;
    s
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings();
    settings.data_dir = dir.path().to_path_buf();
    tweak(&mut settings);
    let store = switchboard::startup::open_store(&settings).expect("store");
    spawn_with_store(settings, store, dir).await
}

/// A server that runs at most `max` conversations, with the `on_limit` policy at that limit.
pub async fn spawn_app_limited(max: usize, on_limit: switchboard::config::OnLimit) -> TestApp {
    spawn_app_with(|s| {
        s.limits.max_running_conversations = max;
        s.limits.on_limit = on_limit;
    })
    .await
}

/// A server with the durable SQLite store in `dir` (which outlives the server).
pub async fn spawn_sqlite_in(dir: &std::path::Path, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings();
    settings.store = StoreKind::Sqlite;
    settings.data_dir = dir.to_path_buf();
    tweak(&mut settings);
    let store = switchboard::startup::open_store(&settings).expect("store opens");
    spawn_with_store(settings, store, tempfile::tempdir().expect("temp dir")).await
}

pub async fn spawn_with_store(
    settings: Settings,
    store: Arc<dyn Store>,
    dir: tempfile::TempDir,
) -> TestApp {
    let app = Application::build_with_store(settings, store.clone())
        .await
        .expect("server starts");
    let key = app.session_key().map(str::to_string);
    let url = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let (tx, rx) = tokio::sync::oneshot::channel();
    actix_web::rt::spawn(async move {
        let _ = app.run_until_stopped().await;
        let _ = tx.send(());
    });
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    TestApp {
        url,
        client,
        handle,
        store,
        key,
        done: Some(rx),
        _data_dir: dir,
    }
}

/// A response: status and parsed JSON body (`Value::Null` for an empty body).
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: awc::http::header::HeaderMap,
}

impl TestApp {
    fn request(&self, method: awc::http::Method, path: &str) -> awc::ClientRequest {
        let mut req = self.client.request(method, format!("{}{}", self.url, path));
        if let Some(key) = &self.key {
            req = req.insert_header(("X-Session-API-Key", key.as_str()));
        }
        req
    }

    async fn finish(
        mut resp: awc::ClientResponse<
            impl futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>>
                + Unpin,
        >,
    ) -> Reply {
        let bytes = resp.body().limit(64 * 1024 * 1024).await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!("response is not JSON: {}", String::from_utf8_lossy(&bytes))
            })
        };
        Reply {
            status: resp.status().as_u16(),
            body,
            headers: resp.headers().clone(),
        }
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
        let req = self.request(method, path);
        let resp = match body {
            Some(b) => req.send_json(b).await,
            None => req.send().await,
        }
        .expect("request");
        Self::finish(resp).await
    }

    /// Sends raw bytes with an optional content type.
    pub async fn send_raw(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.request(method, path);
        if let Some(ct) = content_type {
            req = req.insert_header(("content-type", ct));
        }
        let resp = req.send_body(body).await.expect("request");
        Self::finish(resp).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, None).await
    }

    /// A GET whose answer is text (not JSON): its status and body.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let mut resp = self
            .request(awc::http::Method::GET, path)
            .send()
            .await
            .expect("request");
        let bytes = resp.body().limit(64 * 1024 * 1024).await.expect("body");
        (
            resp.status().as_u16(),
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send("POST", path, Some(&body)).await
    }

    /// Creates a conversation and returns its id.
    pub async fn create(&self, body: Value) -> String {
        let r = self.post("/api/conversations", body).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["conversation_id"].as_str().expect("id").to_string()
    }

    /// How many conversations the first listing page holds (up to 100).
    pub async fn listed(&self) -> usize {
        let r = self.get("/api/conversations?limit=100").await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["results"].as_array().expect("results").len()
    }

    pub async fn info(&self, id: &str) -> Value {
        self.get(&format!("/api/conversations/{id}")).await.body
    }

    /// Every event of a conversation (pages through the REST API).
    pub async fn events(&self, id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let r = self
                .get(&format!(
                    "/api/conversations/{id}/events?start_id={}&limit=100",
                    out.len()
                ))
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            let page = r.body["events"].as_array().expect("events").clone();
            let more = r.body["has_more"].as_bool().expect("has_more");
            out.extend(page);
            if !more {
                return out;
            }
        }
    }

    /// Polls until `check` holds for the conversation's events, or panics after `secs`.
    pub async fn wait_events(
        &self,
        id: &str,
        secs: u64,
        check: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let events = self.events(id).await;
            if check(&events) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "condition not met in {secs}s; events: {events:#?}"
            );
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until the conversation's status is `status`.
    pub async fn wait_status(&self, id: &str, status: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let info = self.info(id).await;
            if info["status"] == status {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "status never became {status}: {info}"
            );
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the HTTP server gracefully and waits for the full shutdown.
    pub async fn shutdown(mut self) -> Arc<dyn Store> {
        self.handle.stop(true).await;
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        self.store.clone()
    }
}

/// The agent states announced in a list of events, in order.
pub fn agent_states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["observation"] == "agent_state_changed")
        .map(|e| {
            e["extras"]["agent_state"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// Asserts ids are 0..n, dense and ordered.
/// The content of the first `error` observation; panics when there is none.
pub fn error_observation(events: &[Value]) -> String {
    events
        .iter()
        .find(|e| e["observation"] == "error")
        .and_then(|e| e["content"].as_str())
        .unwrap_or_else(|| panic!("no error observation in {events:#?}"))
        .to_string()
}

pub fn assert_dense(events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["id"], i as u64, "ids not dense at {i}: {events:#?}");
    }
}

/// A raw WebSocket client.
pub struct WsClient {
    framed: actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>,
    /// Answer Engine.IO pings (`2`) with pongs (`3`) automatically.
    pub auto_pong: bool,
}

/// What a WebSocket read produced.
#[derive(Debug, PartialEq)]
pub enum WsRead {
    Text(String),
    Closed(Option<awc::ws::CloseReason>),
    Timeout,
}

impl TestApp {
    /// Opens a WebSocket; `Err(status)` when the upgrade is refused.
    pub async fn ws(&self, path: &str, headers: &[(&str, &str)]) -> Result<WsClient, u16> {
        let url = format!("{}{}", self.url.replace("http://", "ws://"), path);
        let mut req = self.client.ws(url).max_frame_size(64 * 1024 * 1024);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        match req.connect().await {
            Ok((_, framed)) => Ok(WsClient {
                framed,
                auto_pong: true,
            }),
            Err(awc::error::WsClientError::InvalidResponseStatus(s)) => Err(s.as_u16()),
            Err(e) => panic!("websocket connect failed: {e}"),
        }
    }

    /// Opens a Socket.IO connection the way the OpenHands frontend does and reads the open
    /// packet; does not CONNECT yet.
    pub async fn sio(&self, query: &str) -> WsClient {
        let mut ws = self
            .ws(
                &format!("/socket.io/?EIO=4&transport=websocket&{query}"),
                &[],
            )
            .await
            .expect("upgrade");
        match ws.read(5).await {
            WsRead::Text(t) => assert!(t.starts_with("0{"), "expected the open packet, got {t}"),
            other => panic!("expected the open packet, got {other:?}"),
        }
        ws
    }
}

impl TestApp {
    /// Connects like the OpenHands frontend, CONNECTs, and reads the replay up to and including
    /// the status update that ends it.
    pub async fn sio_attached(&self, query: &str) -> (WsClient, Vec<Value>) {
        let mut ws = self.sio(query).await;
        ws.send("40").await;
        let ack = ws.text().await;
        assert!(
            ack.starts_with("40{"),
            "expected the CONNECT ack, got {ack}"
        );
        let replay = ws
            .oh_events_until(|p| p.get("status_update").is_some())
            .await;
        (ws, replay)
    }

    /// [`TestApp::sio_attached`] to conversation `id`, then reads on until the client holds
    /// every event the store held once the replay ended: events stored before the conversation
    /// actor released them reach the client live, after the status update that ends the replay.
    pub async fn sio_caught_up(&self, id: &str) -> WsClient {
        let (mut ws, replay) = self.sio_attached(&format!("conversation_id={id}")).await;
        let before = self.events(id).await.len();
        let replayed = stored(&replay);
        assert_dense(&replayed);
        let mut seen = replayed.len();
        while seen < before {
            let e = ws.oh_event().await;
            if e.get("id").is_some_and(Value::is_u64) {
                assert_eq!(e["id"], seen, "{e}");
                seen += 1;
            }
        }
        ws
    }
}

/// An answer read off a raw connection.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// The head, interim `1xx` answers included.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "{}: body is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// One header's value (the last one of that name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().rev().find_map(|line| {
            let (n, value) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

impl TestApp {
    /// A raw TCP connection to the server, for requests no client library would send.
    pub async fn connect(&self) -> actix_web::rt::net::TcpStream {
        let addr = self.url.trim_start_matches("http://");
        actix_web::rt::net::TcpStream::connect(addr)
            .await
            .expect("connect")
    }

    /// `host:port` of the server, as a `Host` header names it.
    pub fn authority(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Sends `request` (head and body, exactly as given) on a new connection and reads the
    /// answer.
    pub async fn raw(&self, request: &[u8]) -> RawReply {
        use tokio::io::AsyncWriteExt;
        let mut stream = self.connect().await;
        stream.write_all(request).await.expect("send");
        read_reply(&mut stream, 30)
            .await
            .expect("an answer within 30 s")
    }
}

/// Reads one final HTTP/1.1 answer (after any interim `1xx` ones) with a `Content-Length` body,
/// or `None` when the connection closes or `secs` pass first.
pub async fn read_reply(stream: &mut actix_web::rt::net::TcpStream, secs: u64) -> Option<RawReply> {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = Vec::new();
    let mut heads = String::new();
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
            heads.push_str(&head);
            heads.push('\n');
            if (100..200).contains(&status) {
                buf.drain(..end + 4);
                continue;
            }
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let mut chunk = [0u8; 8192];
                let left = deadline.checked_duration_since(Instant::now())?;
                match actix_web::rt::time::timeout(left, stream.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return None,
                }
            }
            return Some(RawReply {
                status,
                head: heads,
                body: buf[end + 4..end + 4 + length].to_vec(),
            });
        }
        let mut chunk = [0u8; 8192];
        let left = deadline.checked_duration_since(Instant::now())?;
        match actix_web::rt::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

impl WsClient {
    /// Sends one message split into `parts` frames (a first frame and continuations, RFC 6455
    /// 5.4), the way a client that fragments does.
    pub async fn send_fragmented(&mut self, text: &str, parts: usize) {
        use actix_http::ws::Item;
        use awc::ws::Message;
        use futures_util::SinkExt;
        let bytes = text.as_bytes();
        let size = bytes.len().div_ceil(parts.max(2));
        let chunks: Vec<&[u8]> = bytes.chunks(size.max(1)).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let data = actix_web::web::Bytes::copy_from_slice(chunk);
            let item = match i {
                0 => Item::FirstText(data),
                i if i + 1 == chunks.len() => Item::Last(data),
                _ => Item::Continue(data),
            };
            self.framed
                .send(Message::Continuation(item))
                .await
                .expect("send a fragment");
        }
    }

    pub async fn send(&mut self, text: &str) {
        use futures_util::SinkExt;
        self.framed
            .send(awc::ws::Message::Text(text.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        use futures_util::SinkExt;
        let _ = self
            .framed
            .send(awc::ws::Message::Binary(data.into()))
            .await;
    }

    /// The next text frame, close, or a timeout after `secs`.
    pub async fn read(&mut self, secs: u64) -> WsRead {
        use futures_util::{SinkExt, StreamExt};
        let deadline = Duration::from_secs(secs);
        loop {
            let next = actix_web::rt::time::timeout(deadline, self.framed.next()).await;
            match next {
                Err(_) => return WsRead::Timeout,
                Ok(None) => return WsRead::Closed(None),
                Ok(Some(Err(e))) => panic!("websocket error: {e}"),
                Ok(Some(Ok(frame))) => match frame {
                    awc::ws::Frame::Text(b) => {
                        let text = String::from_utf8(b.to_vec()).expect("utf8");
                        if self.auto_pong && text == "2" {
                            let _ = self.framed.send(awc::ws::Message::Text("3".into())).await;
                            continue;
                        }
                        return WsRead::Text(text);
                    }
                    awc::ws::Frame::Close(reason) => return WsRead::Closed(reason),
                    awc::ws::Frame::Ping(p) => {
                        let _ = self.framed.send(awc::ws::Message::Pong(p)).await;
                    }
                    _ => {}
                },
            }
        }
    }

    /// The next text frame; panics on anything else.
    pub async fn text(&mut self) -> String {
        match self.read(10).await {
            WsRead::Text(t) => t,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next Socket.IO `oh_event` payload; panics on anything else.
    pub async fn oh_event(&mut self) -> Value {
        let text = self.text().await;
        let rest = text
            .strip_prefix("42")
            .unwrap_or_else(|| panic!("expected an event, got {text}"));
        let mut arr: Vec<Value> = serde_json::from_str(rest).expect("event json");
        assert_eq!(arr[0], "oh_event", "{text}");
        arr.remove(1)
    }

    /// Reads `oh_event` payloads until one satisfies `done`; returns all read.
    pub async fn oh_events_until(&mut self, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let ev = self.oh_event().await;
            let stop = done(&ev);
            out.push(ev);
            if stop {
                return out;
            }
        }
    }
}

/// The ids in an events page (`GET …/events`).
pub fn page_ids(page: &Value) -> Vec<u64> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["id"].as_u64())
        .collect()
}

/// The ids of the stored events among payloads.
pub fn ids(payloads: &[Value]) -> Vec<u64> {
    stored(payloads)
        .iter()
        .filter_map(|e| e["id"].as_u64())
        .collect()
}

/// Stored events among payloads (status updates and errors filtered out).
pub fn stored(payloads: &[Value]) -> Vec<Value> {
    payloads
        .iter()
        .filter(|p| p.get("id").is_some_and(Value::is_u64))
        .cloned()
        .collect()
}
