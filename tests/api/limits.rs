//! The running-conversation limit under both policies.

use serde_json::json;
use switchboard::config::OnLimit;

use crate::helpers::*;

#[actix_web::test]
async fn reject_answers_429_and_creates_nothing() {
    let app = spawn_app_with(|s| s.limits.max_running_conversations = 2).await;
    let a = app.create(json!({})).await;
    app.create(json!({})).await;
    let r = app
        .post("/api/conversations", json!({"initial_user_msg": "x"}))
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.body,
        json!({"status":"error","message":"Too many conversations at once. If you are still using this one, try reactivating it by prompting the agent to continue","msg_id":"AGENT_ERROR$TOO_MANY_CONVERSATIONS"})
    );
    assert_eq!(app.listed().await, 2);
    // Joining a running one is still fine at the limit.
    let r = app
        .post("/api/conversations", json!({"conversation_id": a}))
        .await;
    assert_eq!(r.status, 200);
    // Stopping one makes room.
    app.post(&format!("/api/conversations/{a}/stop"), json!({}))
        .await;
    assert_eq!(app.post("/api/conversations", json!({})).await.status, 200);
    // Restarting a stopped one counts too.
    let r = app
        .post(&format!("/api/conversations/{a}/start"), json!({}))
        .await;
    assert_eq!(r.status, 429);
}

/// A server for two running conversations under `evict_oldest`, and two conversations.
async fn two_under_evict_oldest() -> (TestApp, String, String) {
    let app = spawn_app_limited(2, OnLimit::EvictOldest).await;
    let a = app.create(json!({})).await;
    let b = app.create(json!({})).await;
    (app, a, b)
}

#[actix_web::test]
async fn evict_oldest_stops_the_least_recently_active() {
    let (app, a, b) = two_under_evict_oldest().await;
    app.wait_events(&b, 5, |e| e.len() >= 2).await;
    actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    // A becomes the most recently active.
    let r = app
        .post(
            &format!("/api/conversations/{a}/events"),
            json!({"action": "message", "args": {"content": "still here"}}),
        )
        .await;
    assert_eq!(r.status, 200);
    app.wait_events(&a, 5, |e| e.len() >= 6).await;
    let c = app.create(json!({})).await;
    wait_evicted(&app, &b).await;
    app.wait_status(&a, "RUNNING", 5).await;
    app.wait_status(&c, "RUNNING", 5).await;
}

/// Waits until `id` is stopped by eviction.
async fn wait_evicted(app: &TestApp, id: &str) {
    app.wait_status(id, "STOPPED", 5).await;
    let events = app
        .wait_events(id, 5, |e| {
            agent_states(e).last().map(String::as_str) == Some("stopped")
        })
        .await;
    assert_eq!(
        events.last().unwrap()["extras"]["reason"],
        "too many conversations"
    );
}

/// Polls until the conversation reports `n` attached clients.
async fn wait_connections(app: &TestApp, id: &str, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.info(id).await["num_connections"] != n {
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never had {n} clients: {}",
            app.info(id).await
        );
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn evict_oldest_never_evicts_an_attached_conversation() {
    let (app, a, b) = two_under_evict_oldest().await;
    let _client_a = app
        .ws(&format!("/ws/conversations/{a}"), &[])
        .await
        .unwrap();
    let client_b = app
        .ws(&format!("/ws/conversations/{b}"), &[])
        .await
        .unwrap();
    wait_connections(&app, &a, 1).await;
    wait_connections(&app, &b, 1).await;

    // Every running conversation has a client: nothing may be evicted, the new one is refused.
    let r = app.post("/api/conversations", json!({})).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["msg_id"], "AGENT_ERROR$TOO_MANY_CONVERSATIONS");
    assert_eq!(app.listed().await, 2);
    for id in [&a, &b] {
        let info = app.info(id).await;
        assert_eq!(info["status"], "RUNNING", "{info}");
        assert_eq!(info["num_connections"], 1, "{info}");
    }

    // B's client leaves: B is the only one that may go, although A is older.
    drop(client_b);
    wait_connections(&app, &b, 0).await;
    let c = app.create(json!({})).await;
    wait_evicted(&app, &b).await;
    let info = app.info(&a).await;
    assert_eq!(info["status"], "RUNNING", "{info}");
    assert_eq!(info["num_connections"], 1, "{info}");
    assert!(!agent_states(&app.events(&a).await).contains(&"stopped".to_string()));
    app.wait_status(&c, "RUNNING", 5).await;
}
