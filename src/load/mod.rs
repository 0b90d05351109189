//! `switchboard load`: a load generator for any OpenHands-compatible server (switchboard,
//! OpenHands itself, or several of either).
//!
//! It creates conversations, attaches a client to each (Socket.IO, plain WebSocket, or none),
//! waits for RUNNING, sends user messages and waits for each reply, and reports throughput,
//! latency percentiles (HdrHistogram), `429` answers and every failure counted by kind
//! (see [`wire`] for what counts as ready, as a reply and as which failure). Closed loop
//! (`--concurrency` conversations in flight) or open loop (`--rate` starts per second whatever
//! the server's speed, every latency measured from the intended start, so a slow server cannot
//! hide its queueing). Several `--url`s share the conversations round-robin.
//!
//! Everything it does is bounded: by `--conversations`, by `--duration`, by a per-conversation
//! timeout, by `--max-in-flight`, and by Ctrl-C, which stops it early with a partial summary.
//! It runs on one actix thread; its traffic goes only to the `--url`s.

mod client;
pub mod wire;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::future::{select, Either};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;

use client::{user_message, Conn, Failure, Http, Target};
pub use wire::Expect;
use wire::{classify, readiness, rest_readiness, Turn};

/// How each load client attaches to its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attach {
    /// Socket.IO over WebSocket, as the OpenHands frontend does.
    Socketio,
    /// The plain JSON WebSocket route (switchboard only).
    Ws,
    /// No socket: REST only (polls for status and replies).
    None,
}

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Base URL of a server. Repeat it (or give a comma-separated list) to spread the
    /// conversations round-robin over several servers.
    #[arg(
        long = "url",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:3000"
    )]
    pub urls: Vec<String>,
    /// Conversations to create.
    #[arg(long, default_value_t = 100)]
    pub conversations: u64,
    /// Closed loop: conversations in flight at once (ignored with `--rate`).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Open loop: start this many conversations per second, however fast earlier ones finish;
    /// latencies count from each conversation's intended start.
    #[arg(long)]
    pub rate: Option<f64>,
    /// With `--rate`: most conversations in flight; a start beyond it fails as
    /// `client-in-flight-limit` (the load client, not the server, is then the bottleneck).
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// User messages per conversation (each waits for its reply).
    #[arg(long, default_value_t = 1)]
    pub messages: u64,
    /// Which reply ends a round trip: `any` agent reply, or the exact `echo` of the message
    /// (switchboard's echo runtime).
    #[arg(long, value_enum, default_value_t = Expect::Any)]
    pub expect: Expect,
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
    /// Seconds one conversation may take (from its intended start) before it counts as a
    /// timeout.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// With a socket attached, the first REST status poll (a fallback for servers that say
    /// nothing on the socket) waits this many milliseconds; the wait doubles up to 1 s.
    #[arg(long, default_value_t = 100)]
    pub poll_ms: u64,
    /// Keep every socket open this many seconds after the run (to measure memory per client).
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// Instead of many conversations: attach this many clients to ONE conversation, send one
    /// message, and measure how long the reply takes to reach each client.
    #[arg(long)]
    pub broadcast: Option<u64>,
}

impl LoadArgs {
    /// The arguments with every default, against `url`.
    pub fn new(url: &str) -> Self {
        LoadArgs {
            urls: vec![url.to_string()],
            conversations: 100,
            concurrency: 16,
            rate: None,
            max_in_flight: 10_000,
            messages: 1,
            expect: Expect::Any,
            attach: Attach::Socketio,
            session_api_key: None,
            duration: None,
            json: None,
            timeout: 30,
            poll_ms: 100,
            hold: 0,
            broadcast: None,
        }
    }

    /// Why these arguments cannot run, if they cannot.
    pub fn problem(&self) -> Option<String> {
        if self.urls.is_empty() {
            return Some("at least one --url is needed".into());
        }
        if let Some(bad) = self
            .urls
            .iter()
            .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
        {
            return Some(format!("--url {bad:?} must start with http:// or https://"));
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0 && r <= 1_000_000.0) {
                return Some(format!(
                    "--rate {r} must be a number of starts per second in (0, 1000000]"
                ));
            }
            if self.max_in_flight == 0 {
                return Some("--max-in-flight must be at least 1".into());
            }
        }
        None
    }
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
    pub urls: Vec<String>,
    /// `closed-loop`, `open-loop`, or `broadcast` (then the counts are clients reached).
    pub mode: &'static str,
    pub attach: Attach,
    pub expect: Expect,
    pub concurrency: usize,
    /// Intended starts per second (open loop).
    pub rate: Option<f64>,
    pub partial: bool,
    pub elapsed_secs: f64,
    pub conversations_ok: u64,
    pub conversations_failed: u64,
    pub messages_ok: u64,
    pub conversations_per_sec: f64,
    pub messages_per_sec: f64,
    /// `429` answers received (each retried after its `Retry-After`, or failed as
    /// `rate-limited` when the conversation's time was up).
    pub rate_limited: u64,
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

    fn fail(&mut self, kind: Failure) {
        self.failed += 1;
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// The longest wait between two REST polls.
const MAX_POLL: Duration = Duration::from_secs(1);

struct Ctx {
    args: LoadArgs,
    http: Http,
    targets: Vec<Target>,
    stats: RefCell<Stats>,
    held: RefCell<Vec<Conn>>,
}

impl Ctx {
    fn record(&self, step: &'static str, elapsed: Duration) {
        self.stats.borrow_mut().record(step, elapsed);
    }

    fn target(&self, n: u64) -> &Target {
        &self.targets[(n % self.targets.len() as u64) as usize]
    }

    /// Creates a conversation: its id, and whether the answer already says RUNNING.
    async fn create(&self, target: &Target, deadline: Instant) -> Result<(String, bool), Failure> {
        let created = self
            .http
            .post(target, "/api/conversations", &json!({}), deadline)
            .await?;
        let id = created["conversation_id"]
            .as_str()
            .ok_or("create-no-id")?
            .to_string();
        Ok((id, created["conversation_status"] == "RUNNING"))
    }

    /// Polls the conversation's REST status until it is RUNNING (first after `first`, then
    /// doubling up to [`MAX_POLL`]). With `events`, also reads its events from that id on (and
    /// moves it past them), for servers whose REST status says RUNNING before their agent is.
    async fn poll_status(
        &self,
        target: &Target,
        id: &str,
        first: Duration,
        mut events: Option<&mut u64>,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let stopped_fails = events.is_some();
        let mut wait = first;
        loop {
            actix_web::rt::time::sleep(wait).await;
            let info = self
                .http
                .get(target, &format!("/api/conversations/{id}"), deadline)
                .await?;
            if let Some(done) = rest_readiness(&info, stopped_fails) {
                return done;
            }
            if let Some(next_id) = events.as_deref_mut() {
                let page = self.events_page(target, id, *next_id, deadline).await?;
                for e in page["events"].as_array().into_iter().flatten() {
                    *next_id = e["id"].as_u64().map_or(*next_id, |i| i + 1);
                    if let Some(done) = readiness(&classify(e)) {
                        return done;
                    }
                }
            }
            wait = (wait * 2).min(MAX_POLL);
        }
    }

    /// Up to 100 events of a conversation from `start_id` on.
    async fn events_page(
        &self,
        target: &Target,
        id: &str,
        start_id: u64,
        deadline: Instant,
    ) -> Result<serde_json::Value, Failure> {
        let path = format!("/api/conversations/{id}/events?start_id={start_id}&limit=100");
        self.http.get(target, &path, deadline).await
    }

    /// Waits until the conversation is RUNNING: over the socket or over REST, whichever says
    /// so first; with a socket, also until the server acknowledged it.
    async fn wait_running(
        &self,
        target: &Target,
        id: &str,
        conn: Option<&mut Conn>,
        running: bool,
        next_id: &mut u64,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let Some(conn) = conn else {
            if !running {
                let first = Duration::from_millis(1);
                self.poll_status(target, id, first, Some(next_id), deadline)
                    .await?;
            }
            return Ok(());
        };
        if !running {
            let from_socket = async {
                loop {
                    if let Some(done) = readiness(&conn.next_signal().await?) {
                        return done;
                    }
                }
            };
            // REST is only a fallback here: its failures leave the socket to decide.
            let first = Duration::from_millis(self.args.poll_ms.max(1));
            let from_rest = async {
                match self.poll_status(target, id, first, None, deadline).await {
                    Ok(()) => Ok(()),
                    Err(_) => futures_util::future::pending().await,
                }
            };
            futures_util::pin_mut!(from_socket, from_rest);
            match select(from_socket, from_rest).await {
                Either::Left((done, _)) | Either::Right((done, _)) => done?,
            }
        }
        conn.wait_ack().await
    }

    /// One round trip over REST: post the message, poll the events until the reply.
    async fn rest_round_trip(
        &self,
        target: &Target,
        id: &str,
        content: &str,
        next_id: &mut u64,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let events = format!("/api/conversations/{id}/events");
        self.http
            .post(target, &events, &user_message(content), deadline)
            .await?;
        let mut turn = Turn::new(content, self.args.expect);
        let mut wait = Duration::from_millis(1);
        loop {
            let page = self.events_page(target, id, *next_id, deadline).await?;
            for e in page["events"].as_array().into_iter().flatten() {
                *next_id = e["id"].as_u64().map_or(*next_id, |i| i + 1);
                if let Some(done) = turn.feed(&classify(e)) {
                    return done;
                }
            }
            if page["has_more"] != true {
                actix_web::rt::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_POLL);
            }
        }
    }
}

/// One round trip over a socket: send the message, read until the reply.
async fn socket_round_trip(conn: &mut Conn, content: &str, expect: Expect) -> Result<(), Failure> {
    conn.send_message(content).await?;
    let mut turn = Turn::new(content, expect);
    loop {
        if let Some(done) = turn.feed(&conn.next_signal().await?) {
            return done;
        }
    }
}

/// One conversation: create, attach, wait for RUNNING, M round trips, detach. Latencies
/// count from `t0`, the conversation's intended start.
async fn one_conversation(
    ctx: &Ctx,
    n: u64,
    t0: Instant,
    deadline: Instant,
) -> Result<(), Failure> {
    let target = ctx.target(n);
    let (id, running) = ctx.create(target, deadline).await?;
    ctx.record("create", t0.elapsed());
    let mut conn = match ctx.args.attach {
        Attach::None => None,
        attach => {
            let t = Instant::now();
            let conn = Conn::open(&ctx.http, target, &id, attach).await?;
            ctx.record("attach", t.elapsed());
            Some(conn)
        }
    };
    // REST only: events read while waiting are not read again for the replies.
    let mut next_id = 0u64;
    ctx.wait_running(target, &id, conn.as_mut(), running, &mut next_id, deadline)
        .await?;
    ctx.record("create_to_running", t0.elapsed());
    for m in 0..ctx.args.messages {
        let content = format!("load {n}.{m}");
        let t = Instant::now();
        match conn.as_mut() {
            Some(conn) => socket_round_trip(conn, &content, ctx.args.expect).await?,
            None => {
                ctx.rest_round_trip(target, &id, &content, &mut next_id, deadline)
                    .await?
            }
        }
        let mut stats = ctx.stats.borrow_mut();
        stats.record("message_round_trip", t.elapsed());
        stats.messages += 1;
    }
    if let Some(conn) = conn {
        if ctx.args.hold > 0 {
            ctx.held.borrow_mut().push(conn);
        } else {
            conn.close().await;
        }
    }
    Ok(())
}

/// Runs conversation `n` from its intended start `t0` to its end or deadline, and counts it.
async fn run_one(ctx: Rc<Ctx>, n: u64, t0: Instant) {
    let deadline = t0 + Duration::from_secs(ctx.args.timeout.max(1));
    let result = tokio::time::timeout_at(
        tokio::time::Instant::from_std(deadline),
        one_conversation(&ctx, n, t0, deadline),
    )
    .await
    .unwrap_or_else(|_| Err("timeout".into()));
    let mut stats = ctx.stats.borrow_mut();
    match result {
        Ok(()) => stats.ok += 1,
        Err(kind) => stats.fail(kind),
    }
}

/// Many clients on one conversation: how long one reply takes to reach each of them.
async fn broadcast(ctx: Rc<Ctx>, clients: u64) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(ctx.args.timeout.max(1));
    let target = ctx.target(0);
    let (id, running) = ctx.create(target, deadline).await?;
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
            async move {
                let target = ctx.target(0);
                let t = Instant::now();
                let mut conn = Conn::open(&ctx.http, target, &id, attach_mode).await?;
                ctx.wait_running(target, &id, Some(&mut conn), running, &mut 0, deadline)
                    .await?;
                ctx.record("attach", t.elapsed());
                Ok::<_, Failure>(conn)
            }
        })
        .buffer_unordered(ctx.args.concurrency.max(1));
    futures_util::pin_mut!(connect_all);
    while let Some(res) = connect_all.next().await {
        match res {
            Ok(conn) => sockets.push(conn),
            Err(kind) => *ctx.stats.borrow_mut().errors.entry(kind).or_default() += 1,
        }
    }
    let Some(mut sender) = sockets.pop() else {
        return Err("no-client-attached".into());
    };
    let content = "broadcast".to_string();
    let t = Instant::now();
    sender.send_message(&content).await?;
    sockets.push(sender);
    let waits = sockets.into_iter().map(|mut conn| {
        let ctx = ctx.clone();
        let content = content.clone();
        async move {
            let mut turn = Turn::new(&content, ctx.args.expect);
            loop {
                let done = match conn.next_signal().await {
                    Ok(signal) => turn.feed(&signal),
                    Err(kind) => Some(Err(kind)),
                };
                match done {
                    Some(Ok(())) => {
                        let mut s = ctx.stats.borrow_mut();
                        s.record("broadcast_delivery", t.elapsed());
                        s.ok += 1;
                        break;
                    }
                    Some(Err(kind)) => {
                        *ctx.stats.borrow_mut().errors.entry(kind).or_default() += 1;
                        break;
                    }
                    None => {}
                }
            }
            conn
        }
    });
    let held = futures_util::future::join_all(waits).await;
    if ctx.args.hold > 0 {
        ctx.held.borrow_mut().extend(held);
    }
    Ok(())
}

/// Open loop: conversation `n` starts at `started + n / rate`, whatever is still in flight.
async fn open_loop(ctx: Rc<Ctx>, rate: f64, started: Instant, keep_going: impl Fn() -> bool) {
    let mut in_flight = FuturesUnordered::new();
    for n in 0..ctx.args.conversations {
        let intended = started + Duration::from_secs_f64(n as f64 / rate);
        loop {
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(intended));
            futures_util::pin_mut!(sleep);
            if in_flight.is_empty() {
                sleep.await;
                break;
            }
            if let Either::Left(_) = select(sleep, in_flight.next()).await {
                break;
            }
        }
        if !keep_going() {
            break;
        }
        if in_flight.len() >= ctx.args.max_in_flight {
            ctx.stats.borrow_mut().fail("client-in-flight-limit".into());
        } else {
            in_flight.push(run_one(ctx.clone(), n, intended));
        }
    }
    while in_flight.next().await.is_some() {}
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
    let ctx = Rc::new(Ctx {
        targets: args.urls.iter().map(|u| Target::new(u)).collect(),
        http: Http {
            client,
            key: args.session_api_key.clone(),
            rate_limited: Cell::new(0),
        },
        args: args.clone(),
        stats: RefCell::new(Stats::new()),
        held: RefCell::new(Vec::new()),
    });
    let stop = Rc::new(Cell::new(false));
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
    let keep_going = {
        let stop = stop.clone();
        move || !stop.get() && deadline.is_none_or(|d| Instant::now() < d)
    };
    let total = args.broadcast.unwrap_or(args.conversations);
    let bar = progress_bar(total);
    let plain_progress = bar.is_hidden();
    let reporter = {
        let ctx = ctx.clone();
        let bar = bar.clone();
        actix_web::rt::spawn(async move {
            let mut tick = actix_web::rt::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = ctx.stats.borrow();
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

    let mode = match (args.broadcast, args.rate) {
        (Some(clients), _) => {
            if let Err(kind) = broadcast(ctx.clone(), clients).await {
                *ctx.stats.borrow_mut().errors.entry(kind).or_default() += 1;
            }
            "broadcast"
        }
        (None, Some(rate)) => {
            open_loop(ctx.clone(), rate, started, keep_going).await;
            "open-loop"
        }
        (None, None) => {
            futures_util::stream::iter(0..args.conversations)
                .for_each_concurrent(args.concurrency.max(1), |n| {
                    let ctx = ctx.clone();
                    let go = keep_going();
                    async move {
                        if go {
                            run_one(ctx, n, Instant::now()).await;
                        }
                    }
                })
                .await;
            "closed-loop"
        }
    };
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
        urls: ctx.targets.iter().map(|t| t.url.clone()).collect(),
        mode,
        attach: args.attach,
        expect: args.expect,
        concurrency: args.concurrency,
        rate: args.rate,
        partial: stop.get() || (args.broadcast.is_none() && attempted < args.conversations),
        elapsed_secs: elapsed,
        conversations_ok: stats.ok,
        conversations_failed: stats.failed,
        messages_ok: stats.messages,
        conversations_per_sec: stats.ok as f64 / elapsed.max(1e-9),
        messages_per_sec: stats.messages as f64 / elapsed.max(1e-9),
        rate_limited: ctx.http.rate_limited.get(),
        latency_ms: stats
            .histograms
            .iter()
            .map(|(k, h)| (k.to_string(), percentiles(h)))
            .collect(),
        errors: stats.errors.clone(),
    }
}

fn label<T: Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Human-readable summary.
pub fn render(s: &Summary) -> String {
    let mut out = String::new();
    let load = match s.rate {
        Some(r) if s.mode == "open-loop" => format!("open loop, {r} starts/s"),
        _ => format!("concurrency {}", s.concurrency),
    };
    out.push_str(&format!(
        "switchboard load: {} ({} attach, expect {}, {load}){}\n",
        s.urls.join(", "),
        label(s.attach),
        label(s.expect),
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
    if s.rate_limited > 0 {
        out.push_str(&format!(
            "  {} answers were 429 (retried after Retry-After or a backoff)\n",
            s.rate_limited
        ));
    }
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

/// Checks the arguments, runs the load in its own actix system, prints the summary, writes
/// `--json`.
pub fn run(args: LoadArgs) -> std::io::Result<Summary> {
    if let Some(problem) = args.problem() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            problem,
        ));
    }
    let json_path = args.json.clone();
    let summary = actix_web::rt::System::new().block_on(execute(args));
    print!("{}", render(&summary));
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&summary).map_err(std::io::Error::other)?;
        std::fs::write(path, text)?;
    }
    Ok(summary)
}
