//! A small server that behaves like OpenHands 0.53 on the wire, for testing the load command
//! against something that is not switchboard.
//!
//! What it copies from OpenHands: conversations start `STARTING`; a little later their REST
//! status says `RUNNING` with `STATUS$RUNTIME_STARTED` while the agent is still loading, and a
//! message sent then is stored but never answered; the agent's readiness is an
//! `agent_state_changed` event, never a `STATUS$READY` status; nothing is replayed but stored
//! events (the last agent state last), before the CONNECT ack; the agent answers in its own
//! words, not with an echo; now and then a request gets a `429`.
//! What it does per conversation, by creation order `k`:
//! - `k % 4 == 0`: a normal agent, ready before any client attaches (so a client learns it
//!   from the replay, before the CONNECT ack);
//! - `k % 4 == 1`: the agent fails (`agent_state_changed: error`) on the first message;
//! - `k % 4 == 2`: a normal agent that never reports its state (ready only over REST, as
//!   `RUNNING` with `STATUS$READY`);
//! - `k % 4 == 3`: evicted on the first message (the OpenHands status update, then `41`).
//!
//! Every third `POST /api/conversations` and every fifth status `GET` is a `429`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, ActorContext, Addr, AsyncContext, Handler, Message, StreamHandler};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actix_web_actors::ws;
use serde_json::{json, Value};
use switchboard::ws::socketio::{self, Packet};

/// How long a conversation stays `STARTING`, then how long its agent takes after that.
const START_DELAY: Duration = Duration::from_millis(30);
const AGENT_DELAY: Duration = Duration::from_millis(40);

#[derive(Message, Clone)]
#[rtype(result = "()")]
struct Out(String);

struct Conversation {
    k: usize,
    running: bool,
    agent_ready: bool,
    stopped: bool,
    events: Vec<Value>,
    sockets: Vec<Addr<FakeSocket>>,
}

#[derive(Default)]
struct State {
    creates: usize,
    status_gets: usize,
    conversations: HashMap<String, Conversation>,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A stored event: OpenHands numbers them densely per conversation.
fn push(conv: &mut Conversation, mut event: Value) -> Value {
    event["id"] = json!(conv.events.len());
    event["timestamp"] = json!("2025-08-14T10:00:00.000000");
    conv.events.push(event.clone());
    event
}

/// Stores an event and sends it to the sockets in the conversation's room; environment
/// events reach sockets as agent events, as in OpenHands' `Session._on_event`.
fn emit(conv: &mut Conversation, event: Value) {
    let mut sent = push(conv, event);
    if sent["source"] == "environment" {
        sent["source"] = json!("agent");
    }
    send_all(conv, &socketio::oh_event(&sent.to_string()));
}

fn send_all(conv: &Conversation, frame: &str) {
    for s in &conv.sockets {
        s.do_send(Out(frame.to_string()));
    }
}

fn agent_state(state: &str) -> Value {
    json!({"source":"environment","message":"","observation":"agent_state_changed","content":"","extras":{"agent_state":state,"reason":""}})
}

/// What the fake agent does with one user action.
fn on_user_action(conv: &mut Conversation, action: &Value) {
    let content = action["args"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    emit(
        conv,
        json!({"source":"user","message":content,"action":"message","args":{"content":content,"image_urls":[],"file_urls":[],"wait_for_response":false}}),
    );
    if !conv.agent_ready {
        return; // lost, as in OpenHands before its agent controller exists
    }
    let silent = conv.k % 4 == 2;
    if !silent {
        emit(conv, agent_state("running"));
    }
    match conv.k % 4 {
        1 => emit(conv, agent_state("error")),
        3 => {
            conv.stopped = true;
            push(conv, agent_state("stopped"));
            let status = json!({"status_update":true,"type":"error","id":"AGENT_ERROR$TOO_MANY_CONVERSATIONS","message":"Too many conversations at once."});
            send_all(conv, &socketio::oh_event(&status.to_string()));
            send_all(conv, socketio::DISCONNECT);
            conv.sockets.clear();
        }
        _ => {
            let reply = format!("I read your message ({} characters).", content.len());
            emit(
                conv,
                json!({"source":"agent","message":reply,"action":"message","args":{"content":reply,"image_urls":null,"file_urls":null,"wait_for_response":true}}),
            );
            if !silent {
                emit(conv, agent_state("awaiting_user_input"));
            }
        }
    }
}

struct FakeSocket {
    state: Shared,
    conversation: String,
}

impl Actor for FakeSocket {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.text(socketio::open_packet(
            &socketio::new_sid(),
            25_000,
            20_000,
            1 << 22,
        ));
    }
}

impl Handler<Out> for FakeSocket {
    type Result = ();

    fn handle(&mut self, msg: Out, ctx: &mut Self::Context) {
        let disconnect = msg.0 == socketio::DISCONNECT;
        ctx.text(msg.0);
        if disconnect {
            ctx.stop();
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for FakeSocket {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let Ok(ws::Message::Text(text)) = msg else {
            if let Ok(ws::Message::Close(_)) | Err(_) = msg {
                ctx.stop();
            }
            return;
        };
        let mut state = lock(&self.state);
        let Some(conv) = state.conversations.get_mut(&self.conversation) else {
            ctx.text(socketio::connect_error("Conversation not found"));
            return;
        };
        match socketio::parse(&text) {
            Packet::Ping => ctx.text(socketio::PONG),
            Packet::Connect { .. } => {
                // Replay, agent state last, then join and ack.
                let mut last_state = None;
                for e in &conv.events {
                    let mut e = e.clone();
                    if e["source"] == "environment" {
                        e["source"] = json!("agent");
                    }
                    if e["observation"] == "agent_state_changed" {
                        last_state = Some(e);
                    } else {
                        ctx.text(socketio::oh_event(&e.to_string()));
                    }
                }
                if let Some(e) = last_state {
                    ctx.text(socketio::oh_event(&e.to_string()));
                }
                conv.sockets.push(ctx.address());
                ctx.text(socketio::connect_ack(&socketio::new_sid()));
            }
            Packet::Event { name, args, .. } if name == "oh_user_action" => {
                if let Some(action) = args.first() {
                    on_user_action(conv, action);
                }
            }
            Packet::Disconnect { .. } | Packet::Close => ctx.stop(),
            _ => {}
        }
    }
}

async fn socket(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<Shared>,
) -> actix_web::Result<HttpResponse> {
    let query = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .unwrap_or_default();
    let conversation = query.get("conversation_id").cloned().unwrap_or_default();
    ws::start(
        FakeSocket {
            state: state.get_ref().clone(),
            conversation,
        },
        &req,
        body,
    )
}

fn too_many() -> HttpResponse {
    HttpResponse::TooManyRequests().json(json!({"message":"Too many requests"}))
}

async fn create(state: web::Data<Shared>) -> HttpResponse {
    let id = {
        let mut s = lock(&state);
        s.creates += 1;
        if s.creates.is_multiple_of(3) {
            return too_many();
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut conv = Conversation {
            k: s.conversations.len(),
            running: false,
            agent_ready: false,
            stopped: false,
            events: Vec::new(),
            sockets: Vec::new(),
        };
        emit(&mut conv, agent_state("loading"));
        if conv.k.is_multiple_of(4) {
            conv.running = true;
            conv.agent_ready = true;
            emit(&mut conv, agent_state("awaiting_user_input"));
        }
        s.conversations.insert(id.clone(), conv);
        id
    };
    let shared = state.get_ref().clone();
    let started = id.clone();
    actix_web::rt::spawn(async move {
        actix_web::rt::time::sleep(START_DELAY).await;
        if let Some(conv) = lock(&shared).conversations.get_mut(&started) {
            conv.running = true;
        }
        actix_web::rt::time::sleep(AGENT_DELAY).await;
        if let Some(conv) = lock(&shared).conversations.get_mut(&started) {
            if !conv.agent_ready {
                conv.agent_ready = true;
                if conv.k % 4 != 2 {
                    emit(conv, agent_state("awaiting_user_input"));
                }
            }
        }
    });
    HttpResponse::Ok().json(
        json!({"status":"ok","conversation_id":id,"message":null,"conversation_status":"STARTING"}),
    )
}

async fn info(path: web::Path<String>, state: web::Data<Shared>) -> HttpResponse {
    let mut s = lock(&state);
    s.status_gets += 1;
    if s.status_gets.is_multiple_of(5) {
        return too_many();
    }
    let id = path.into_inner();
    match s.conversations.get(&id) {
        None => HttpResponse::Ok().json(Value::Null),
        Some(c) => {
            let status = match (c.stopped, c.running) {
                (true, _) => "STOPPED",
                (false, true) => "RUNNING",
                (false, false) => "STARTING",
            };
            let runtime_status = match (c.running, c.agent_ready && c.k % 4 == 2) {
                (false, _) => Value::Null,
                (true, false) => json!("STATUS$RUNTIME_STARTED"),
                (true, true) => json!("STATUS$READY"),
            };
            HttpResponse::Ok()
                .json(json!({"conversation_id":id,"status":status,"runtime_status":runtime_status}))
        }
    }
}

async fn events(
    path: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
    state: web::Data<Shared>,
) -> HttpResponse {
    let s = lock(&state);
    let Some(c) = s.conversations.get(&path.into_inner()) else {
        return HttpResponse::NotFound().json(json!({"detail":"not found"}));
    };
    let start: usize = query
        .get("start_id")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let page: Vec<Value> = c.events.iter().skip(start).take(limit).cloned().collect();
    let has_more = start + page.len() < c.events.len();
    HttpResponse::Ok().json(json!({"events":page,"has_more":has_more}))
}

async fn post_event(
    path: web::Path<String>,
    action: web::Json<Value>,
    state: web::Data<Shared>,
) -> HttpResponse {
    let mut s = lock(&state);
    match s.conversations.get_mut(&path.into_inner()) {
        Some(c) => {
            on_user_action(c, &action);
            HttpResponse::Ok().json(json!({"success":true}))
        }
        None => HttpResponse::NotFound().json(json!({"detail":"not found"})),
    }
}

/// A running fake; dropping it stops the server.
pub struct FakeOpenHands {
    pub url: String,
    handle: actix_web::dev::ServerHandle,
}

impl Drop for FakeOpenHands {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        actix_web::rt::spawn(async move { handle.stop(false).await });
    }
}

/// Starts the fake on 127.0.0.1:0.
pub fn spawn_fake_openhands() -> FakeOpenHands {
    let state: Shared = Arc::new(Mutex::new(State::default()));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .route("/socket.io/", web::get().to(socket))
            .route("/api/conversations", web::post().to(create))
            .route("/api/conversations/{id}", web::get().to(info))
            .route("/api/conversations/{id}/events", web::get().to(events))
            .route("/api/conversations/{id}/events", web::post().to(post_event))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .expect("fake binds");
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    FakeOpenHands {
        url: format!("http://127.0.0.1:{port}"),
        handle,
    }
}
