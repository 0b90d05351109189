//! `switchboard load`: a load generator for a running switchboard server.
//!
//! It creates conversations with a bounded number in flight, attaches a client to each
//! (Socket.IO, plain WebSocket, or none), sends user messages and waits for each echo, and
//! reports throughput, latency percentiles (HdrHistogram) and every error counted by kind.
//! Everything it does is bounded: by `--conversations`, by `--duration`, by a per-conversation
//! timeout, and by Ctrl-C, which stops it early with a partial summary.
//!
//! It runs on one actix thread; the loopback traffic it sends goes only to `--url`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

/// How each load client attaches to its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attach {
    /// Socket.IO over WebSocket, as the OpenHands frontend does.
    Socketio,
    /// The plain JSON WebSocket route.
    Ws,
    /// No socket: REST only (polls for status and replies).
    None,
}

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    pub url: String,
    /// Conversations to create.
    #[arg(long, default_value_t = 100)]
    pub conversations: u64,
    /// Conversations in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// User messages per conversation (each waits for its echo).
    #[arg(long, default_value_t = 1)]
    pub messages: u64,
    /// How clients attach.
    #[arg(long, value_enum, default_value_t = Attach::Socketio)]
    pub attach: Attach,
    /// Session API key, when the server has one.
    #[arg(long)]
    pub session_api_key: Option<String>,
    /// Stop starting conversations after this many seconds.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seconds one conversation may take before it counts as a timeout.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Keep every socket open this many seconds after the run (to measure memory per client).
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// Instead of many conversations: attach this many clients to ONE conversation, send one
    /// message, and measure how long the reply takes to reach each client.
    #[arg(long)]
    pub broadcast: Option<u64>,
}

/// Latency percentiles of one measured step, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The run's result.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub url: String,
    /// `conversations`, or `broadcast` (then the counts are clients reached).
    pub mode: &'static str,
    pub attach: Attach,
    pub concurrency: usize,
    pub partial: bool,
    pub elapsed_secs: f64,
    pub conversations_ok: u64,
    pub conversations_failed: u64,
    pub messages_ok: u64,
    pub conversations_per_sec: f64,
    pub messages_per_sec: f64,
    pub latency_ms: BTreeMap<String, Percentiles>,
    pub errors: BTreeMap<String, u64>,
}

struct Stats {
    histograms: BTreeMap<&'static str, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    ok: u64,
    failed: u64,
    messages: u64,
}

impl Stats {
    fn new() -> Self {
        Stats {
            histograms: BTreeMap::new(),
            errors: BTreeMap::new(),
            ok: 0,
            failed: 0,
            messages: 0,
        }
    }

    fn record(&mut self, step: &'static str, elapsed: Duration) {
        let h = self.histograms.entry(step).or_insert_with(|| {
            Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
        });
        let _ = h.record((elapsed.as_micros() as u64).clamp(1, 120_000_000));
    }
}

type Shared = Rc<RefCell<Stats>>;
type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

/// Why one conversation failed, as a short kind for counting.
type Failure = String;

struct Ctx {
    args: LoadArgs,
    client: awc::Client,
    ws_base: String,
    stats: Shared,
    held: RefCell<Vec<Socket>>,
}

impl Ctx {
    fn with_key(&self, req: awc::ClientRequest) -> awc::ClientRequest {
        match &self.args.session_api_key {
            Some(k) => req.insert_header(("X-Session-API-Key", k.as_str())),
            None => req,
        }
    }

    async fn post_json(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        let req = self.with_key(self.client.post(format!("{}{path}", self.args.url)));
        let mut resp = req
            .send_json(body)
            .await
            .map_err(|e| format!("http-send: {}", short(&e.to_string())))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body()
            .await
            .map_err(|e| format!("http-body: {}", short(&e.to_string())))?;
        if status != 200 {
            return Err(format!("http-{status}"));
        }
        serde_json::from_slice(&bytes).map_err(|_| "http-bad-json".to_string())
    }

    async fn get_json(&self, path: &str) -> Result<Value, Failure> {
        let req = self.with_key(self.client.get(format!("{}{path}", self.args.url)));
        let mut resp = req
            .send()
            .await
            .map_err(|e| format!("http-send: {}", short(&e.to_string())))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body()
            .limit(16 * 1024 * 1024)
            .await
            .map_err(|e| format!("http-body: {}", short(&e.to_string())))?;
        if status != 200 {
            return Err(format!("http-{status}"));
        }
        serde_json::from_slice(&bytes).map_err(|_| "http-bad-json".to_string())
    }

    async fn connect(&self, path: &str) -> Result<Socket, Failure> {
        let mut req = self
            .client
            .ws(format!("{}{path}", self.ws_base))
            .max_frame_size(16 * 1024 * 1024);
        if let Some(k) = &self.args.session_api_key {
            req = req.header("X-Session-API-Key", k.as_str());
        }
        req.connect()
            .await
            .map(|(_, framed)| framed)
            .map_err(|e| format!("ws-connect: {}", short(&e.to_string())))
    }
}

fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

/// The next text frame (answering pings on the way).
async fn next_text(ws: &mut Socket) -> Result<String, Failure> {
    loop {
        match ws.next().await {
            None => return Err("ws-closed".into()),
            Some(Err(e)) => return Err(format!("ws-error: {}", short(&e.to_string()))),
            Some(Ok(awc::ws::Frame::Text(b))) => {
                let text = String::from_utf8_lossy(&b).into_owned();
                if text == "2" {
                    ws.send(awc::ws::Message::Text("3".into()))
                        .await
                        .map_err(|_| "ws-send".to_string())?;
                    continue;
                }
                return Ok(text);
            }
            Some(Ok(awc::ws::Frame::Ping(p))) => {
                let _ = ws.send(awc::ws::Message::Pong(p)).await;
            }
            Some(Ok(awc::ws::Frame::Close(_))) => return Err("ws-closed".into()),
            Some(Ok(_)) => {}
        }
    }
}

/// The next payload: `oh_event` for Socket.IO, the frame itself for plain.
async fn next_payload(ws: &mut Socket, attach: Attach) -> Result<Value, Failure> {
    loop {
        let text = next_text(ws).await?;
        let value = if attach == Attach::Socketio {
            let Some(rest) = text.strip_prefix("42") else {
                if text.starts_with("41") || text.starts_with("44") {
                    return Err("sio-disconnected".into());
                }
                continue;
            };
            let mut arr: Vec<Value> =
                serde_json::from_str(rest).map_err(|_| "sio-bad-event".to_string())?;
            if arr.len() < 2 {
                continue;
            }
            arr.swap_remove(1)
        } else {
            serde_json::from_str(&text).map_err(|_| "ws-bad-json".to_string())?
        };
        if value.get("error") == Some(&Value::Bool(true)) {
            return Err("server-error-event".into());
        }
        return Ok(value);
    }
}

fn is_ready(p: &Value) -> bool {
    p["status_update"] == true && p["id"] == "STATUS$READY"
}

fn is_reply(p: &Value, content: &str) -> bool {
    p["source"] == "agent" && p["action"] == "message" && p["args"]["content"] == content
}

/// Attaches to `id`; returns the socket once the conversation is RUNNING.
async fn attach(ctx: &Ctx, id: &str, t0: Instant) -> Result<Socket, Failure> {
    let t1 = Instant::now();
    let mut ws = match ctx.args.attach {
        Attach::Socketio => {
            let mut ws = ctx
                .connect(&format!(
                    "/socket.io/?EIO=4&transport=websocket&conversation_id={id}&latest_event_id=-1&providers_set="
                ))
                .await?;
            let open = next_text(&mut ws).await?;
            if !open.starts_with('0') {
                return Err("sio-no-open".into());
            }
            let connect = match &ctx.args.session_api_key {
                Some(k) => format!("40{}", json!({ "session_api_key": k })),
                None => "40".to_string(),
            };
            ws.send(awc::ws::Message::Text(connect.into()))
                .await
                .map_err(|_| "ws-send".to_string())?;
            let ack = next_text(&mut ws).await?;
            if ack.starts_with("44") {
                return Err("sio-refused".into());
            }
            ws
        }
        Attach::Ws => ctx.connect(&format!("/ws/conversations/{id}")).await?,
        Attach::None => unreachable!("attach() is only called with a socket"),
    };
    ctx.stats.borrow_mut().record("attach", t1.elapsed());
    loop {
        let p = next_payload(&mut ws, ctx.args.attach).await?;
        if is_ready(&p) {
            break;
        }
    }
    ctx.stats
        .borrow_mut()
        .record("create_to_running", t0.elapsed());
    Ok(ws)
}

async fn send_message(ws: &mut Socket, attach: Attach, content: &str) -> Result<(), Failure> {
    let action = json!({"action": "message", "args": {"content": content, "image_urls": [], "file_urls": []}});
    let text = match attach {
        Attach::Socketio => format!("42[\"oh_user_action\",{action}]"),
        _ => action.to_string(),
    };
    ws.send(awc::ws::Message::Text(text.into()))
        .await
        .map_err(|_| "ws-send".to_string())
}

async fn close(ws: &mut Socket, attach: Attach) {
    if attach == Attach::Socketio {
        let _ = ws.send(awc::ws::Message::Text("41".into())).await;
    }
    let _ = ws.send(awc::ws::Message::Close(None)).await;
}

/// One conversation: create, attach, M round trips, detach.
async fn one_conversation(ctx: &Ctx, n: u64) -> Result<(), Failure> {
    let t0 = Instant::now();
    let created = ctx.post_json("/api/conversations", &json!({})).await?;
    ctx.stats.borrow_mut().record("create", t0.elapsed());
    let id = created["conversation_id"]
        .as_str()
        .ok_or("create-no-id")?
        .to_string();
    if ctx.args.attach == Attach::None {
        return rest_only(ctx, &id, t0, n).await;
    }
    let mut ws = attach(ctx, &id, t0).await?;
    for m in 0..ctx.args.messages {
        let content = format!("load {n}.{m}");
        let t = Instant::now();
        send_message(&mut ws, ctx.args.attach, &content).await?;
        loop {
            let p = next_payload(&mut ws, ctx.args.attach).await?;
            if is_reply(&p, &content) {
                break;
            }
        }
        let mut stats = ctx.stats.borrow_mut();
        stats.record("message_round_trip", t.elapsed());
        stats.messages += 1;
    }
    if ctx.args.hold > 0 {
        ctx.held.borrow_mut().push(ws);
    } else {
        close(&mut ws, ctx.args.attach).await;
    }
    Ok(())
}

async fn rest_only(ctx: &Ctx, id: &str, t0: Instant, n: u64) -> Result<(), Failure> {
    loop {
        let info = ctx.get_json(&format!("/api/conversations/{id}")).await?;
        if info["status"] == "RUNNING" {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(1)).await;
    }
    ctx.stats
        .borrow_mut()
        .record("create_to_running", t0.elapsed());
    let mut next_id = 0u64;
    for m in 0..ctx.args.messages {
        let content = format!("load {n}.{m}");
        let t = Instant::now();
        let action = json!({"action": "message", "args": {"content": content}});
        ctx.post_json(&format!("/api/conversations/{id}/events"), &action)
            .await?;
        'wait: loop {
            let page = ctx
                .get_json(&format!(
                    "/api/conversations/{id}/events?start_id={next_id}&limit=100"
                ))
                .await?;
            for e in page["events"].as_array().into_iter().flatten() {
                next_id = e["id"].as_u64().map_or(next_id, |i| i + 1);
                if is_reply(e, &content) {
                    break 'wait;
                }
            }
            actix_web::rt::time::sleep(Duration::from_millis(1)).await;
        }
        let mut stats = ctx.stats.borrow_mut();
        stats.record("message_round_trip", t.elapsed());
        stats.messages += 1;
    }
    Ok(())
}

/// Many clients on one conversation: how long one reply takes to reach each of them.
async fn broadcast(ctx: Rc<Ctx>, clients: u64) -> Result<(), Failure> {
    let created = ctx.post_json("/api/conversations", &json!({})).await?;
    let id = created["conversation_id"]
        .as_str()
        .ok_or("create-no-id")?
        .to_string();
    let attach_mode = if ctx.args.attach == Attach::None {
        Attach::Socketio
    } else {
        ctx.args.attach
    };
    let mut sockets = Vec::new();
    let connect_all = futures_util::stream::iter(0..clients)
        .map(|_| {
            let ctx = ctx.clone();
            let id = id.clone();
            async move { attach(&ctx, &id, Instant::now()).await }
        })
        .buffer_unordered(ctx.args.concurrency.max(1));
    futures_util::pin_mut!(connect_all);
    while let Some(res) = connect_all.next().await {
        match res {
            Ok(ws) => sockets.push(ws),
            Err(kind) => *ctx.stats.borrow_mut().errors.entry(kind).or_default() += 1,
        }
    }
    let Some(mut sender) = sockets.pop() else {
        return Err("no-client-attached".into());
    };
    let content = "broadcast".to_string();
    let t = Instant::now();
    send_message(&mut sender, attach_mode, &content).await?;
    sockets.push(sender);
    let waits = sockets.into_iter().map(|mut ws| {
        let ctx = ctx.clone();
        let content = content.clone();
        async move {
            loop {
                match next_payload(&mut ws, attach_mode).await {
                    Ok(p) if is_reply(&p, &content) => {
                        let mut s = ctx.stats.borrow_mut();
                        s.record("broadcast_delivery", t.elapsed());
                        s.ok += 1;
                        break;
                    }
                    Ok(_) => {}
                    Err(kind) => {
                        *ctx.stats.borrow_mut().errors.entry(kind).or_default() += 1;
                        break;
                    }
                }
            }
            ws
        }
    });
    let held = futures_util::future::join_all(waits).await;
    if ctx.args.hold > 0 {
        ctx.held.borrow_mut().extend(held);
    }
    Ok(())
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} conversations {per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// Runs the load and returns its summary. Needs an actix system (see [`run`]).
pub async fn execute(args: LoadArgs) -> Summary {
    // No pool limit: `--concurrency` bounds requests, and held sockets must not starve it.
    let connector = awc::Connector::new().limit(0);
    let client = awc::Client::builder()
        .connector(connector)
        .timeout(Duration::from_secs(args.timeout.max(1)))
        .finish();
    let ws_base = args
        .url
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    let ctx = Rc::new(Ctx {
        args: args.clone(),
        client,
        ws_base,
        stats: Rc::new(RefCell::new(Stats::new())),
        held: RefCell::new(Vec::new()),
    });
    let stop = Rc::new(std::cell::Cell::new(false));
    {
        let stop = stop.clone();
        actix_web::rt::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: finishing conversations in flight");
                stop.set(true);
            }
        });
    }
    let started = Instant::now();
    let deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let total = args.broadcast.unwrap_or(args.conversations);
    let bar = progress_bar(total);
    let plain_progress = bar.is_hidden();
    let reporter = {
        let stats = ctx.stats.clone();
        let bar = bar.clone();
        actix_web::rt::spawn(async move {
            let mut tick = actix_web::rt::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = stats.borrow();
                bar.set_position(s.ok + s.failed);
                bar.set_message(format!("{} messages, {} errors", s.messages, s.failed));
                if plain_progress {
                    eprintln!(
                        "progress: {}/{} conversations, {} messages, {} failed, {:.0}s",
                        s.ok + s.failed,
                        total,
                        s.messages,
                        s.failed,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        })
    };

    if let Some(clients) = args.broadcast {
        if let Err(kind) = broadcast(ctx.clone(), clients).await {
            *ctx.stats.borrow_mut().errors.entry(kind).or_default() += 1;
        }
    } else {
        let timeout = Duration::from_secs(args.timeout.max(1));
        futures_util::stream::iter(0..args.conversations)
            .for_each_concurrent(args.concurrency.max(1), |n| {
                let ctx = ctx.clone();
                let stop = stop.clone();
                async move {
                    if stop.get() || deadline.is_some_and(|d| Instant::now() >= d) {
                        return;
                    }
                    let result = actix_web::rt::time::timeout(timeout, one_conversation(&ctx, n))
                        .await
                        .unwrap_or_else(|_| Err("timeout".into()));
                    let mut stats = ctx.stats.borrow_mut();
                    match result {
                        Ok(()) => stats.ok += 1,
                        Err(kind) => {
                            stats.failed += 1;
                            *stats.errors.entry(kind).or_default() += 1;
                        }
                    }
                }
            })
            .await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    reporter.abort();
    bar.finish_and_clear();
    if args.hold > 0 {
        let held = ctx.held.borrow().len();
        eprintln!("holding {held} sockets open for {}s", args.hold);
        actix_web::rt::time::sleep(Duration::from_secs(args.hold)).await;
    }
    let stats = ctx.stats.borrow();
    let attempted = stats.ok + stats.failed;
    Summary {
        url: args.url.clone(),
        mode: if args.broadcast.is_some() {
            "broadcast"
        } else {
            "conversations"
        },
        attach: args.attach,
        concurrency: args.concurrency,
        partial: stop.get() || (args.broadcast.is_none() && attempted < args.conversations),
        elapsed_secs: elapsed,
        conversations_ok: stats.ok,
        conversations_failed: stats.failed,
        messages_ok: stats.messages,
        conversations_per_sec: stats.ok as f64 / elapsed.max(1e-9),
        messages_per_sec: stats.messages as f64 / elapsed.max(1e-9),
        latency_ms: stats
            .histograms
            .iter()
            .map(|(k, h)| (k.to_string(), percentiles(h)))
            .collect(),
        errors: stats.errors.clone(),
    }
}

/// Human-readable summary.
pub fn render(s: &Summary) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "switchboard load: {} ({} attach, concurrency {}){}\n",
        s.url,
        serde_json::to_value(s.attach)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        s.concurrency,
        if s.partial { " — PARTIAL" } else { "" }
    ));
    let unit = if s.mode == "broadcast" {
        "clients reached"
    } else {
        "conversations ok"
    };
    out.push_str(&format!(
        "  {} {unit}, {} failed, {} messages in {:.2}s\n  {:.1} conversations/s, {:.1} messages/s\n",
        s.conversations_ok,
        s.conversations_failed,
        s.messages_ok,
        s.elapsed_secs,
        s.conversations_per_sec,
        s.messages_per_sec
    ));
    out.push_str(&format!(
        "  {:<20} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
    ));
    for (name, p) in &s.latency_ms {
        out.push_str(&format!(
            "  {:<20} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\n",
            name, p.count, p.p50, p.p90, p.p99, p.p999, p.max
        ));
    }
    if s.errors.is_empty() {
        out.push_str("  errors: none\n");
    } else {
        out.push_str("  errors:\n");
        for (kind, n) in &s.errors {
            out.push_str(&format!("    {n:>8}  {kind}\n"));
        }
    }
    out
}

/// Runs the load in its own actix system, prints the summary, writes `--json`.
pub fn run(args: LoadArgs) -> std::io::Result<Summary> {
    let json_path = args.json.clone();
    let summary = actix_web::rt::System::new().block_on(execute(args));
    print!("{}", render(&summary));
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&summary).map_err(std::io::Error::other)?;
        std::fs::write(path, text)?;
    }
    Ok(summary)
}
