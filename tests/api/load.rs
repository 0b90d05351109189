//! The load generator against real servers (switchboard, and a fake that speaks like
//! OpenHands): every attach mode, readiness however the server reports it, round trips, open
//! loop, several servers, broadcast, and every failure counted by its own kind.

use switchboard::config::OnLimit;
use switchboard::load::{execute, Attach, Expect, LoadArgs};

use crate::fake_openhands::spawn_fake_openhands;
use crate::helpers::*;

fn args(url: &str, attach: Attach) -> LoadArgs {
    LoadArgs {
        conversations: 12,
        concurrency: 4,
        messages: 2,
        attach,
        timeout: 20,
        poll_ms: 10,
        ..LoadArgs::new(url)
    }
}

#[actix_web::test]
async fn every_attach_mode_completes_and_is_measured() {
    let app = spawn_app().await;
    for attach in [Attach::Socketio, Attach::Ws, Attach::None] {
        let mut a = args(&app.url, attach);
        a.expect = Expect::Echo;
        let s = execute(a).await;
        assert_eq!(s.conversations_ok, 12, "{attach:?}: {:?}", s.errors);
        assert_eq!(s.messages_ok, 24);
        assert!(s.errors.is_empty());
        assert!(!s.partial);
        assert_eq!(s.rate_limited, 0);
        assert_eq!(s.latency_ms["message_round_trip"].count, 24);
        assert_eq!(s.latency_ms["create_to_running"].count, 12);
        let text = switchboard::load::render(&s);
        assert!(text.contains("p99.9"), "{text}");
    }
    assert_eq!(app.listed().await, 36);
}

#[actix_web::test]
async fn readiness_is_detected_on_the_socket_when_the_create_answer_says_starting() {
    // With a start delay the create answer says STARTING: RUNNING must come from the socket
    // (STATUS$READY or the agent state) or from REST polling.
    let app = spawn_app_with(|s| s.runtime.echo.start_delay_ms = 50).await;
    for attach in [Attach::Socketio, Attach::None] {
        let s = execute(args(&app.url, attach)).await;
        assert_eq!(s.conversations_ok, 12, "{attach:?}: {:?}", s.errors);
        assert_eq!(s.latency_ms["create_to_running"].count, 12);
        assert_eq!(s.messages_ok, 24);
    }
}

#[actix_web::test]
async fn an_openhands_like_server_is_measured_and_its_failures_classified() {
    let fake = spawn_fake_openhands();
    // Socket.IO: no STATUS$READY, replies in the agent's own words, 429s, one conversation in
    // four failing, one evicted, one that reports RUNNING only over REST.
    let s = execute(args(&fake.url, Attach::Socketio)).await;
    assert_eq!(s.conversations_ok, 6, "{:?}", s.errors);
    assert_eq!(s.messages_ok, 12);
    assert_eq!(s.latency_ms["create_to_running"].count, 12);
    assert_eq!(s.latency_ms["message_round_trip"].count, 12);
    assert_eq!(
        s.errors,
        [("agent-error".to_string(), 3), ("evicted".to_string(), 3)].into(),
    );
    // Every third create is a 429, retried: 12 conversations need 6 of them at least.
    assert!(s.rate_limited >= 6, "{}", s.rate_limited);
    assert!(switchboard::load::render(&s).contains("429"));

    // The same over REST only.
    let s = execute(args(&fake.url, Attach::None)).await;
    assert_eq!(s.conversations_ok, 6, "{:?}", s.errors);
    assert_eq!(s.messages_ok, 12);
    assert_eq!(
        s.errors,
        [("agent-error".to_string(), 3), ("stopped".to_string(), 3)].into(),
    );

    // Expecting an echo from an agent that answers in its own words: counted, not a timeout.
    let mut echo = args(&fake.url, Attach::Socketio);
    echo.expect = Expect::Echo;
    let s = execute(echo).await;
    assert_eq!(s.conversations_ok, 0);
    assert_eq!(
        s.errors,
        [
            ("agent-error".to_string(), 3),
            ("evicted".to_string(), 3),
            ("unexpected-reply".to_string(), 6)
        ]
        .into(),
    );
}

#[actix_web::test]
async fn refusals_and_rate_limits_are_counted_by_kind() {
    let app = spawn_app_with(|s| s.session_api_key = Some("k".into())).await;
    let s = execute(args(&app.url, Attach::Socketio)).await;
    assert_eq!(s.conversations_ok, 0);
    assert_eq!(s.conversations_failed, 12);
    assert_eq!(s.errors.get("http-401"), Some(&12));
    let mut with_key = args(&app.url, Attach::Socketio);
    with_key.session_api_key = Some("k".into());
    let s = execute(with_key).await;
    assert_eq!(s.conversations_ok, 12, "{:?}", s.errors);

    // At the conversation limit with `reject`, creates are 429s: retried with backoff until
    // the conversation's time is up, then `rate-limited`.
    let app = spawn_app_limited(2, OnLimit::Reject).await;
    let mut a = args(&app.url, Attach::Socketio);
    a.conversations = 5;
    a.concurrency = 5;
    a.timeout = 2;
    let s = execute(a).await;
    assert_eq!(s.conversations_ok, 2, "{:?}", s.errors);
    assert_eq!(s.errors, [("rate-limited".to_string(), 3)].into());
    assert!(s.rate_limited >= 3, "{}", s.rate_limited);
}

#[actix_web::test]
async fn open_loop_spreads_conversations_over_several_servers() {
    let a = spawn_app().await;
    let b = spawn_app().await;
    let mut load = args(&a.url, Attach::Socketio);
    load.urls = vec![a.url.clone(), b.url.clone()];
    load.rate = Some(200.0);
    load.conversations = 20;
    let s = execute(load).await;
    assert_eq!(s.mode, "open-loop");
    assert_eq!(s.conversations_ok, 20, "{:?}", s.errors);
    assert_eq!(s.latency_ms["create"].count, 20);
    assert_eq!(a.listed().await, 10);
    assert_eq!(b.listed().await, 10);
}

#[actix_web::test]
async fn open_loop_counts_starts_beyond_the_in_flight_limit() {
    // Conversations take a second to start; at 100 starts/s with 2 in flight at most, the
    // other 8 starts find the client full and are counted, not delayed.
    let app = spawn_app_with(|s| s.runtime.echo.start_delay_ms = 1000).await;
    let mut load = args(&app.url, Attach::Socketio);
    load.rate = Some(100.0);
    load.conversations = 10;
    load.max_in_flight = 2;
    load.messages = 0;
    let s = execute(load).await;
    assert_eq!(s.conversations_ok, 2, "{:?}", s.errors);
    assert_eq!(s.errors, [("client-in-flight-limit".to_string(), 8)].into());
}

#[actix_web::test]
async fn broadcast_reaches_every_client() {
    let app = spawn_app().await;
    let mut a = args(&app.url, Attach::Socketio);
    a.broadcast = Some(20);
    let s = execute(a).await;
    assert_eq!(s.conversations_ok, 20, "{:?}", s.errors);
    assert_eq!(s.latency_ms["broadcast_delivery"].count, 20);
}

#[test]
fn bad_arguments_are_refused_before_anything_runs() {
    let mut a = LoadArgs::new("http://127.0.0.1:1");
    assert_eq!(a.problem(), None);
    a.rate = Some(0.0);
    assert!(a.problem().expect("refused").contains("--rate"));
    a.rate = Some(f64::NAN);
    assert!(a.problem().is_some());
    let mut b = LoadArgs::new("127.0.0.1:3000");
    assert!(b.problem().expect("refused").contains("http://"));
    b.urls.clear();
    assert!(b.problem().is_some());
}
