//! Socket transports: Socket.IO (Engine.IO v4 over WebSocket) at `/socket.io/` and plain JSON
//! at `/ws/conversations/{id}`. No business logic lives here.
//!
//! A [`Socket`] actor translates frames to typed messages and back. It attaches to the
//! conversation actor, which owns the subscriber set: subscribe first, then replay every
//! durable event after the client's `latest_event_id` from the store, then the conversation's
//! latest status update, then live frames — each event id exactly once, in order.
//!
//! Bounds: messages from the client are limited to `socket.max_frame_bytes`, whether in one
//! frame or fragmented into several (reassembled up to that size in all); frames to the client
//! pass through a channel of `socket.queue_frames`. The actor only runs while the HTTP
//! dispatcher takes its output, so a client that stops reading freezes its own socket: the
//! conversation then finds the channel full and drops the subscriber, and the client is told
//! it was too slow when it reads again. Memory per socket stays bounded either way.
//!
//! Cluster: a socket for a conversation another live node owns is spliced to the owner's
//! socket ([`splice`]) when a cluster key is configured, and refused with 503 before the
//! upgrade otherwise.
//!
//! Keys: a socket is let in by the key check ([`crate::http::auth`]) and sees only what its
//! caller may see ([`crate::http::access`]); a user key is checked again at every heartbeat, and
//! a socket whose key was revoked is detached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::actors::messages::ConversationError;
use crate::actors::{
    Admit, AdmitError, AdmitMode, ClientFrame, CloseReason, ConversationHandle, OpenError,
};
use crate::api::validation::parse_user_action;
use crate::conversation::ConversationId;
use crate::events::{StoredEvent, TOO_MANY_CONVERSATIONS_MESSAGE};
use crate::http::auth::{Caller, Presented};
use crate::http::{resource, resources, ApiError, AppState};
use crate::ops::metrics::metrics;
use crate::store::EventQuery;

pub mod socketio;
mod splice;

pub use splice::Splices;

use socketio::Packet;

/// Events read from the store per replay step.
const REPLAY_PAGE: usize = 256;

/// Registers the socket routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resources(&["/socket.io/", "/socket.io"], "GET").route(web::get().to(socketio_route)),
    )
    .service(
        resource("/ws/conversations/{conversation_id}", "GET").route(web::get().to(plain_route)),
    );
}

type Query = Vec<(String, String)>;

fn query(req: &HttpRequest) -> Result<Query, ApiError> {
    serde_urlencoded::from_str(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("Invalid query string: {e}")))
}

fn query_get<'a>(q: &'a Query, key: &str) -> Option<&'a str> {
    q.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `latest_event_id`: a non-integer (or negative) counts as "nothing seen".
fn latest_event_id(q: &Query) -> Option<u64> {
    query_get(q, "latest_event_id").and_then(|v| v.trim().parse::<u64>().ok())
}

fn bad_request(message: &str) -> ApiError {
    ApiError::Exact(StatusCode::BAD_REQUEST, json!({ "detail": message }))
}

fn codec(state: &AppState) -> actix_http::ws::Codec {
    actix_http::ws::Codec::new().max_size(state.settings.socket.max_frame_bytes)
}

fn start(
    socket: Socket,
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let mut response =
        ws::handshake(req).map_err(|e| bad_request(&format!("WebSocket handshake failed: {e}")))?;
    Ok(response.streaming(ws::WebsocketContext::with_codec(
        socket,
        payload,
        codec(state),
    )))
}

/// `GET /socket.io/?EIO=4&transport=websocket&conversation_id=…&latest_event_id=…`
async fn socketio_route(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let q = query(&req)?;
    if query_get(&q, "EIO") != Some("4") {
        return Err(bad_request(
            "Unsupported Engine.IO protocol version: switchboard speaks EIO=4",
        ));
    }
    if query_get(&q, "transport") != Some("websocket") {
        return Err(bad_request(
            "Unsupported transport: switchboard speaks only transport=websocket",
        ));
    }
    // An invalid id is refused at CONNECT; no node owns it.
    if let Some(Ok(id)) = query_get(&q, "conversation_id").map(ConversationId::parse) {
        match crate::http::access::owned_here(&state, &id).await {
            Err(ApiError::Elsewhere(_, owner)) if splice::applies(&req, &state) => {
                return splice::splice(&req, payload, &state, &id, owner, "socketio").await;
            }
            other => other?,
        }
    }
    let sio = SocketIo {
        sid: socketio::new_sid(),
        connected: false,
        query_id: query_get(&q, "conversation_id").map(str::to_string),
        providers_set: query_get(&q, "providers_set").unwrap_or("").to_string(),
        presented: state.auth.presented(&req),
    };
    let socket = Socket::new(
        Proto::SocketIo(Box::new(sio)),
        state.clone(),
        latest_event_id(&q),
    );
    start(socket, &req, payload, &state)
}

/// `GET /ws/conversations/{id}?latest_event_id=N`: the same stream as plain JSON frames.
async fn plain_route(
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let q = query(&req)?;
    let id = crate::http::path_id(&path)?;
    let caller = state.auth.authenticate(&req).await?;
    if crate::http::access::visible(&state, &caller, &id)
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound("Conversation not found".into()));
    }
    match crate::http::access::owned_here(&state, &id).await {
        Err(ApiError::Elsewhere(_, owner)) if splice::applies(&req, &state) => {
            return splice::splice(&req, payload, &state, &id, owner, "ws").await;
        }
        other => other?,
    }
    let mut socket = Socket::new(Proto::Plain, state.clone(), latest_event_id(&q));
    socket.conversation_id = Some(id);
    socket.caller = Some((caller, state.auth.presented(&req)));
    start(socket, &req, payload, &state)
}

/// Finds (starting it if stopped) and subscribes to a conversation `caller` may see.
async fn open_conversation(
    state: web::Data<AppState>,
    caller: Caller,
    id: ConversationId,
) -> Result<
    (
        ConversationHandle,
        crate::actors::Subscribed,
        mpsc::Receiver<ClientFrame>,
    ),
    Refused,
> {
    let owner = match crate::http::access::visible(&state, &caller, &id).await {
        Ok(Some(owner)) => owner,
        Ok(None) => return Err(Refused::Reason("Conversation not found".into())),
        Err(e) => return Err(Refused::Reason(e.to_string())),
    };
    let queue = state.settings.socket.queue_frames;
    let opened = state
        .supervisor
        .open(
            Admit {
                id,
                mode: AdmitMode::LoadOnly,
                client: None,
                owner,
                brought_initial_message: false,
            },
            |mut admitted| async move {
                admitted.loaded().await?;
                let (tx, rx) = mpsc::channel(queue);
                let subscribed = admitted.conversation.subscribe(tx).await?;
                Ok((admitted.conversation, subscribed, rx))
            },
        )
        .await;
    opened.map_err(|e| {
        Refused::Reason(match e {
            OpenError::Conversation(ConversationError::Elsewhere(_)) => return Refused::Elsewhere,
            OpenError::Admit(AdmitError::TooMany) => TOO_MANY_CONVERSATIONS_MESSAGE.into(),
            OpenError::Admit(AdmitError::NotFound)
            | OpenError::Conversation(ConversationError::NotFound) => {
                "Conversation not found".into()
            }
            OpenError::Restarting(_) => "The conversation is restarting; try again".into(),
            e => e.to_string(),
        })
    })
}

/// Why a socket could not attach.
enum Refused {
    /// Told to the client: a Socket.IO `44`, a plain close with the reason.
    Reason(String),
    /// Another cluster node took the conversation between the upgrade and the attach: the
    /// transport is closed without a goodbye, so a Socket.IO client reconnects (and reaches
    /// the owner, spliced).
    Elsewhere,
}

struct SocketIo {
    sid: String,
    /// The default namespace is connected (CONNECT acknowledged).
    connected: bool,
    query_id: Option<String>,
    providers_set: String,
    /// The keys the upgrade request carried (header, cookie, query).
    presented: Presented,
}

enum Proto {
    SocketIo(Box<SocketIo>),
    Plain,
}

/// One attached client.
pub struct Socket {
    proto: Proto,
    state: web::Data<AppState>,
    /// Who the client is, once its key was checked (plain: at the upgrade; Socket.IO: at
    /// CONNECT), and the keys it presented (a user key is checked again at every heartbeat).
    caller: Option<(Caller, Presented)>,
    conversation_id: Option<ConversationId>,
    /// Events up to this id are already with the client.
    after: Option<u64>,
    attached: Option<(ConversationHandle, u64)>,
    attaching: bool,
    closing: bool,
    last_heard: Instant,
    /// Counted in `switchboard_clients_attached` (from a successful attach to `stopped`).
    counted: bool,
    /// Why the server detached the client (metrics); `None`: the client left.
    detach_reason: Option<&'static str>,
    /// A fragmented message being reassembled: whether it is text, and its bytes so far.
    fragments: Option<(bool, web::BytesMut)>,
}

impl Socket {
    fn new(proto: Proto, state: web::Data<AppState>, after: Option<u64>) -> Self {
        Socket {
            proto,
            state,
            caller: None,
            conversation_id: None,
            after,
            attached: None,
            attaching: false,
            closing: false,
            last_heard: Instant::now(),
            counted: false,
            detach_reason: None,
            fragments: None,
        }
    }

    fn is_socketio(&self) -> bool {
        matches!(self.proto, Proto::SocketIo(_))
    }

    /// The transport, as the metrics name it.
    fn transport(&self) -> &'static str {
        if self.is_socketio() {
            "socketio"
        } else {
            "ws"
        }
    }

    /// Sends one payload (an event or a status/error object) in this transport's framing.
    fn send_payload(&self, ctx: &mut ws::WebsocketContext<Self>, json: &str) {
        if self.is_socketio() {
            ctx.text(socketio::oh_event(json));
        } else {
            ctx.text(json.to_string());
        }
    }

    fn send_event(&self, ctx: &mut ws::WebsocketContext<Self>, event: &StoredEvent) {
        if self.after.is_some_and(|a| event.id <= a) {
            return;
        }
        self.send_payload(ctx, &event.json);
    }

    fn send_error(&self, ctx: &mut ws::WebsocketContext<Self>, message: &str) {
        let body = json!({"error": true, "message": message}).to_string();
        self.send_payload(ctx, &body);
    }

    /// Detaches with a reason: Socket.IO `41` then close; plain: a close frame with the reason.
    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: ws::CloseCode, reason: &str) {
        if !self.closing && self.is_socketio() {
            ctx.text(socketio::DISCONNECT);
        }
        self.close_transport(ctx, code, reason);
    }

    /// Closes the WebSocket without a Socket.IO goodbye: a Socket.IO client reconnects.
    fn close_transport(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        code: ws::CloseCode,
        reason: &str,
    ) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.detach_reason = Some(match code {
            ws::CloseCode::Normal => "conversation_stopped",
            ws::CloseCode::Away => "ping_timeout",
            ws::CloseCode::Size => "frame_too_large",
            ws::CloseCode::Protocol => "protocol_error",
            ws::CloseCode::Policy => "too_slow",
            ws::CloseCode::Restart => "fenced",
            _ => "server_error",
        });
        ctx.close(Some(ws::CloseReason {
            code,
            description: Some(reason.to_string()),
        }));
        ctx.stop();
    }

    fn attach(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let (Some(id), Some((caller, _))) = (self.conversation_id.clone(), self.caller.clone())
        else {
            return;
        };
        self.attaching = true;
        let fut = open_conversation(self.state.clone(), caller, id);
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            act.attaching = false;
            match res {
                Ok((handle, subscribed, rx)) => {
                    act.attached = Some((handle, subscribed.subscriber_id));
                    act.counted = true;
                    metrics().attached(act.transport(), 1);
                    if let Proto::SocketIo(sio) = &mut act.proto {
                        sio.connected = true;
                        let ack = socketio::connect_ack(&socketio::new_sid());
                        ctx.text(ack);
                    }
                    let start = act.after.map_or(0, |a| a + 1);
                    act.replay(
                        ctx,
                        start,
                        subscribed.replay_before,
                        subscribed.last_status,
                        rx,
                    );
                }
                Err(Refused::Elsewhere) => act.close_transport(
                    ctx,
                    ws::CloseCode::Restart,
                    "another cluster node serves this conversation; reconnect",
                ),
                Err(Refused::Reason(reason)) => {
                    if act.is_socketio() {
                        ctx.text(socketio::connect_error(&reason));
                    } else {
                        act.close(ctx, ws::CloseCode::Policy, &reason);
                    }
                }
            }
        }));
    }

    /// Replays durable events `[next, before)` page by page, then goes live.
    fn replay(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        next: u64,
        before: u64,
        last_status: Option<Arc<str>>,
        rx: mpsc::Receiver<ClientFrame>,
    ) {
        let Some(id) = self.conversation_id.clone() else {
            return;
        };
        if next >= before {
            if let Some(status) = last_status {
                self.send_payload(ctx, &status);
            }
            let mut rx = rx;
            ctx.add_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
            return;
        }
        let query = EventQuery {
            start_id: next,
            end_id: Some(before - 1),
            reverse: false,
            limit: REPLAY_PAGE,
        };
        let fut = self.state.store.events(&id, query);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(events) if !events.is_empty() => {
                let mut upto = next;
                for event in &events {
                    act.send_event(ctx, event);
                    upto = event.id + 1;
                }
                act.replay(ctx, upto, before, last_status, rx);
            }
            Ok(_) => act.replay(ctx, before, before, last_status, rx),
            Err(e) => {
                tracing::error!(conversation_id = %id, error = %e, "replay failed");
                act.close(
                    ctx,
                    ws::CloseCode::Error,
                    "could not read the conversation's history",
                );
            }
        }));
    }

    /// One complete text message from the client.
    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        if self.is_socketio() {
            self.on_socketio_text(text, ctx);
        } else {
            match serde_json::from_str::<Value>(text) {
                Ok(action) => self.user_action(action, ctx),
                Err(e) => self.send_error(ctx, &format!("Malformed JSON: {e}")),
            }
        }
    }

    /// One frame of a fragmented message (RFC 6455 5.4): reassembled up to
    /// `socket.max_frame_bytes` in all, then handled like an unfragmented one.
    fn on_fragment(&mut self, item: actix_http::ws::Item, ctx: &mut ws::WebsocketContext<Self>) {
        let (first, data, last) = match item {
            actix_http::ws::Item::FirstText(data) => (Some(true), data, false),
            actix_http::ws::Item::FirstBinary(data) => (Some(false), data, false),
            actix_http::ws::Item::Continue(data) => (None, data, false),
            actix_http::ws::Item::Last(data) => (None, data, true),
        };
        if let Some(text) = first {
            if self.fragments.is_some() {
                self.close(
                    ctx,
                    ws::CloseCode::Protocol,
                    "a new message began inside a fragmented one",
                );
                return;
            }
            self.fragments = Some((text, web::BytesMut::new()));
        }
        let max = self.state.settings.socket.max_frame_bytes;
        let Some((_, buffer)) = self.fragments.as_mut() else {
            self.close(
                ctx,
                ws::CloseCode::Protocol,
                "a continuation frame without a first frame",
            );
            return;
        };
        if buffer.len() + data.len() > max {
            self.fragments = None;
            self.close(ctx, ws::CloseCode::Size, "message too large");
            return;
        }
        buffer.extend_from_slice(&data);
        if !last {
            return;
        }
        let Some((text, buffer)) = self.fragments.take() else {
            return;
        };
        if !text {
            self.send_error(ctx, "Binary frames are not supported");
            return;
        }
        match std::str::from_utf8(&buffer) {
            Ok(text) => self.on_text(text, ctx),
            Err(_) => self.close(
                ctx,
                ws::CloseCode::Invalid,
                "a text message that is not UTF-8",
            ),
        }
    }

    fn on_socketio_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        match socketio::parse(text) {
            Packet::Pong => {}
            Packet::Ping => ctx.text(socketio::PONG),
            Packet::Close => ctx.stop(),
            Packet::Ack => {}
            Packet::Connect { namespace, auth } => self.on_connect(&namespace, auth, ctx),
            Packet::Disconnect { .. } => ctx.stop(),
            Packet::Event {
                namespace,
                ack,
                name,
                args,
            } => {
                if namespace != "/" {
                    return;
                }
                if let Some(id) = ack {
                    ctx.text(socketio::ack(&namespace, id));
                }
                match name.as_str() {
                    "oh_user_action" | "oh_action" => match args.first() {
                        Some(action) => self.user_action(action.clone(), ctx),
                        None => self.send_error(ctx, "oh_user_action needs an action object"),
                    },
                    other => self.send_error(ctx, &format!("Unknown event {other:?}")),
                }
            }
            Packet::Invalid(why) => self.send_error(ctx, &format!("Malformed packet: {why}")),
            Packet::Open(_) | Packet::ConnectError { .. } => {
                self.send_error(ctx, "Malformed packet: only a server sends that")
            }
        }
    }

    fn on_connect(
        &mut self,
        namespace: &str,
        auth: Option<Value>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        if namespace != "/" {
            ctx.text(format!("44{namespace},\"Unable to connect\""));
            return;
        }
        let Proto::SocketIo(sio) = &self.proto else {
            return;
        };
        if sio.connected || self.attaching {
            self.send_error(ctx, "Already connected");
            return;
        }
        let (query_id, providers_set) = (sio.query_id.clone(), sio.providers_set.clone());
        let from_auth = auth
            .as_ref()
            .and_then(|a| a.get("session_api_key"))
            .and_then(Value::as_str);
        let presented = sio.presented.clone().with(from_auth);
        // Checking the key may read the store: no other frame is handled meanwhile.
        self.attaching = true;
        let state = self.state.clone();
        let resolve = async move { (state.auth.resolve(&presented).await, presented) };
        ctx.wait(
            resolve
                .into_actor(self)
                .map(move |(resolved, presented), act, ctx| {
                    act.attaching = false;
                    let refusal = match resolved {
                        Ok(Some(caller)) => {
                            act.caller = Some((caller, presented));
                            act.connect_refusal(query_id.as_deref(), &providers_set)
                        }
                        Ok(None) => Some("invalid_session_api_key".into()),
                        Err(e) => Some(ApiError::Storage(e).to_string()),
                    };
                    match refusal {
                        Some(reason) => ctx.text(socketio::connect_error(&reason)),
                        None => act.attach(ctx),
                    }
                }),
        );
    }

    /// Why a CONNECT must be refused, if it must; also records the conversation id.
    fn connect_refusal(&mut self, query_id: Option<&str>, providers_set: &str) -> Option<String> {
        let id = match query_id {
            None | Some("") => return Some("No conversation_id in query params".into()),
            Some(id) => match ConversationId::parse(id) {
                Ok(id) => id,
                Err(_) => return Some(
                    "Invalid conversation_id: expected 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"
                        .into(),
                ),
            },
        };
        if let Err(bad) = crate::api::validation::read_providers_set_query(providers_set) {
            return Some(format!("Invalid providers_set: unknown provider {bad:?}"));
        }
        self.conversation_id = Some(id);
        None
    }

    fn user_action(&mut self, action: Value, ctx: &mut ws::WebsocketContext<Self>) {
        let Some((handle, _)) = self.attached.clone() else {
            self.send_error(ctx, "Not connected to a conversation");
            return;
        };
        let event = match parse_user_action(&action) {
            Ok(e) => e,
            Err(why) => {
                self.send_error(ctx, &format!("Invalid action: {why}"));
                return;
            }
        };
        let fut = async move { handle.user_action(event).await };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            if let Err(e) = res {
                act.send_error(ctx, &format!("Action refused: {e}"));
            }
        }));
    }

    fn heartbeat(&self, ctx: &mut ws::WebsocketContext<Self>) {
        let socket = &self.state.settings.socket;
        let interval = Duration::from_millis(socket.ping_interval_ms);
        let timeout = Duration::from_millis(socket.ping_timeout_ms);
        ctx.run_interval(interval, move |act, ctx| {
            if act.closing {
                return;
            }
            if act.last_heard.elapsed() > interval + timeout {
                tracing::info!(conversation_id = ?act.conversation_id, "client missed its pongs; closing");
                act.close(ctx, ws::CloseCode::Away, "ping timeout");
                return;
            }
            if act.is_socketio() {
                ctx.text("2");
            } else {
                ctx.ping(b"");
            }
            act.check_key(ctx);
        });
    }

    /// Checks a user key again (it may have been revoked since the client attached): a
    /// revoked key is detached. The session key cannot be revoked, and nothing is checked
    /// while authentication is off; a store that cannot answer leaves the client attached.
    fn check_key(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let Some((caller @ Caller::User { .. }, presented)) = self.caller.clone() else {
            return;
        };
        let state = self.state.clone();
        let resolve = async move { state.auth.resolve(&presented).await };
        ctx.spawn(resolve.into_actor(self).map(move |resolved, act, ctx| {
            let revoked = match resolved {
                Ok(now) => now.as_ref() != Some(&caller),
                Err(_) => false,
            };
            if revoked && !act.closing {
                tracing::info!(conversation_id = ?act.conversation_id, "the client's key was revoked; closing");
                act.close(ctx, ws::CloseCode::Policy, "the key was revoked");
                act.detach_reason = Some("key_revoked");
            }
        }));
    }
}

impl Actor for Socket {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.heartbeat(ctx);
        let socket = &self.state.settings.socket;
        if let Proto::SocketIo(sio) = &self.proto {
            ctx.text(socketio::open_packet(
                &sio.sid,
                socket.ping_interval_ms,
                socket.ping_timeout_ms,
                socket.max_frame_bytes,
            ));
        } else {
            self.attach(ctx);
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some((handle, subscriber)) = self.attached.take() {
            handle.unsubscribe(subscriber);
        }
        if self.counted {
            metrics().attached(self.transport(), -1);
            metrics().detached(self.detach_reason.unwrap_or("client_left"));
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Socket {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        match msg {
            Ok(ws::Message::Text(text)) => self.on_text(&text, ctx),
            Ok(ws::Message::Binary(_)) => self.send_error(ctx, "Binary frames are not supported"),
            Ok(ws::Message::Ping(p)) => ctx.pong(&p),
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => {}
            Ok(ws::Message::Continuation(item)) => self.on_fragment(item, ctx),
            Ok(ws::Message::Close(reason)) => {
                self.closing = true;
                ctx.close(reason);
                ctx.stop();
            }
            Err(ws::ProtocolError::Overflow) => {
                self.close(ctx, ws::CloseCode::Size, "frame too large");
            }
            Err(e) => {
                self.close(
                    ctx,
                    ws::CloseCode::Protocol,
                    &format!("protocol error: {e}"),
                );
            }
        }
    }
}

impl StreamHandler<ClientFrame> for Socket {
    fn handle(&mut self, frame: ClientFrame, ctx: &mut Self::Context) {
        match frame {
            ClientFrame::Event(event) => self.send_event(ctx, &event),
            ClientFrame::Payload(json) => self.send_payload(ctx, &json),
            ClientFrame::Close(CloseReason::Stopped(reason)) => {
                self.attached = None;
                self.close(
                    ctx,
                    ws::CloseCode::Normal,
                    &format!("conversation stopped: {reason}"),
                );
            }
            ClientFrame::Close(CloseReason::Fenced) => {
                self.attached = None;
                self.close_transport(
                    ctx,
                    ws::CloseCode::Restart,
                    "this node left its cluster; reconnect",
                );
            }
        }
    }

    /// The conversation dropped us without a `Close`: we did not keep up.
    fn finished(&mut self, ctx: &mut Self::Context) {
        if self.closing {
            return;
        }
        tracing::info!(conversation_id = ?self.conversation_id, "client too slow; disconnecting");
        self.attached = None;
        self.send_error(
            ctx,
            "Disconnected: the client did not keep up with the conversation's events",
        );
        self.close(ctx, ws::CloseCode::Policy, "client too slow");
    }
}
