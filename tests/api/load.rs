//! The load generator against a real server: every attach mode, broadcast, and errors counted.

use switchboard::load::{execute, Attach, LoadArgs};

use crate::helpers::*;

fn args(url: &str, attach: Attach) -> LoadArgs {
    LoadArgs {
        url: url.to_string(),
        conversations: 12,
        concurrency: 4,
        messages: 2,
        attach,
        session_api_key: None,
        duration: None,
        json: None,
        timeout: 20,
        hold: 0,
        broadcast: None,
    }
}

#[actix_web::test]
async fn every_attach_mode_completes_and_is_measured() {
    let app = spawn_app().await;
    for attach in [Attach::Socketio, Attach::Ws, Attach::None] {
        let s = execute(args(&app.url, attach)).await;
        assert_eq!(s.conversations_ok, 12, "{attach:?}: {:?}", s.errors);
        assert_eq!(s.messages_ok, 24);
        assert!(s.errors.is_empty());
        assert!(!s.partial);
        assert_eq!(s.latency_ms["message_round_trip"].count, 24);
        assert_eq!(s.latency_ms["create_to_running"].count, 12);
        let text = switchboard::load::render(&s);
        assert!(text.contains("p99.9"), "{text}");
    }
    assert_eq!(app.listed().await, 36);
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

#[actix_web::test]
async fn refusals_are_counted_by_kind() {
    let app = spawn_app_with(|s| s.session_api_key = "k".into()).await;
    let s = execute(args(&app.url, Attach::Socketio)).await;
    assert_eq!(s.conversations_ok, 0);
    assert_eq!(s.conversations_failed, 12);
    assert_eq!(s.errors.get("http-401"), Some(&12));
    let mut with_key = args(&app.url, Attach::Socketio);
    with_key.session_api_key = Some("k".into());
    let s = execute(with_key).await;
    assert_eq!(s.conversations_ok, 12, "{:?}", s.errors);
}
