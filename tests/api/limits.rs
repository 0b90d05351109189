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

#[actix_web::test]
async fn evict_oldest_stops_the_least_recently_active() {
    let app = spawn_app_with(|s| {
        s.limits.max_running_conversations = 2;
        s.limits.on_limit = OnLimit::EvictOldest;
    })
    .await;
    let a = app.create(json!({})).await;
    let b = app.create(json!({})).await;
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
    app.wait_status(&b, "STOPPED", 5).await;
    let events = app
        .wait_events(&b, 5, |e| {
            agent_states(e).last().map(String::as_str) == Some("stopped")
        })
        .await;
    assert_eq!(
        events.last().unwrap()["extras"]["reason"],
        "too many conversations"
    );
    app.wait_status(&a, "RUNNING", 5).await;
    app.wait_status(&c, "RUNNING", 5).await;
}
