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

/// An HTTP client whose connections come from `ip` (every 127.x address reaches the server).
fn client_from(ip: &str) -> awc::Client {
    awc::Client::builder()
        .local_address(ip.parse().expect("address"))
        .finish()
}

/// `POST /api/conversations` with `body` from `client` (with the server's key, if any).
async fn post_from(client: &awc::Client, app: &TestApp, body: serde_json::Value) -> u16 {
    let mut req = client.post(format!("{}/api/conversations", app.url));
    if let Some(key) = &app.key {
        req = req.insert_header(("X-Session-API-Key", key.as_str()));
    }
    req.send_json(&body)
        .await
        .expect("request")
        .status()
        .as_u16()
}

/// Creates until the first refusal (a burst of `burst` is always granted first); returns how
/// many were created and the refusal.
async fn create_until_refused(app: &TestApp, burst: usize) -> (usize, Reply) {
    for created in 0..burst + 20 {
        let r = app.post("/api/conversations", json!({})).await;
        if r.status != 200 {
            assert!(created >= burst, "refused after {created}: {}", r.body);
            return (created, r);
        }
    }
    panic!("never refused");
}

#[actix_web::test]
async fn a_client_over_its_creation_rate_gets_429_with_retry_after_and_others_do_not() {
    let app = spawn_app_with(|s| {
        s.limits.create_rate_per_sec = 1;
        s.limits.create_burst = 3;
    })
    .await;
    let (created, r) = create_until_refused(&app, 3).await;
    assert_eq!(r.status, 429, "{}", r.body);
    let retry_after = r.headers.get("retry-after").expect("Retry-After");
    assert_eq!(retry_after.to_str().unwrap(), "1");
    assert_eq!(r.body["status"], "error");
    assert_eq!(r.body["msg_id"], "SWITCHBOARD$CREATE_RATE_LIMITED");
    assert_eq!(r.body["retry_after_secs"], 1);
    let message = r.body["message"].as_str().unwrap();
    assert!(
        message.contains("at most 1 per second (3 at once)"),
        "{message}"
    );
    // The refused request created nothing.
    assert_eq!(app.listed().await, created);

    // Joining a running conversation is not a creation; everything else keeps working.
    let running = app.get("/api/conversations?limit=1").await.body["results"][0]["conversation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .post("/api/conversations", json!({"conversation_id": running}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .post(
            &format!("/api/conversations/{running}/events"),
            json!({"action": "message", "args": {"content": "hi"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Another client (another address) has its own bucket.
    let other = client_from("127.0.0.2");
    for _ in 0..3 {
        assert_eq!(post_from(&other, &app, json!({})).await, 200);
    }
    assert_eq!(app.listed().await, created + 3);
}

#[actix_web::test]
async fn with_a_session_key_the_key_is_the_client() {
    let app = spawn_app_with(|s| {
        s.session_api_key = Some("k".into());
        s.limits.create_rate_per_sec = 1;
        s.limits.create_burst = 3;
    })
    .await;
    let (created, r) = create_until_refused(&app, 3).await;
    assert_eq!(r.status, 429, "{}", r.body);
    // The same key from another address is the same client: no fresh burst of 3 there (at
    // most a token that refilled meanwhile).
    let other = client_from("127.0.0.2");
    let mut more = 0;
    while post_from(&other, &app, json!({})).await == 200 {
        more += 1;
        assert!(more < 3, "the other address got a bucket of its own");
    }
    assert_eq!(app.listed().await, created + more);
}

#[actix_web::test]
async fn a_creation_rate_of_zero_switches_the_limit_off() {
    let app = spawn_app_with(|s| {
        s.limits.create_rate_per_sec = 0;
        s.limits.create_burst = 1;
    })
    .await;
    // Far more than the burst of 1, and than the default burst, as fast as one client can.
    let burst = switchboard::config::Settings::defaults()
        .limits
        .create_burst as usize;
    for _ in 0..burst + 20 {
        let r = app.post("/api/conversations", json!({})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

// ---- byte quotas ------------------------------------------------------------------------

fn message(content: &str) -> serde_json::Value {
    json!({"action": "message", "args": {"content": content}})
}

#[actix_web::test]
async fn a_message_over_the_conversation_quota_is_413_and_stores_nothing() {
    let app = spawn_app_with(|s| s.limits.max_bytes_per_conversation = 64 * 1024).await;
    let id = app.create(json!({"initial_user_msg": "hello"})).await;
    app.wait_events(&id, 10, |e| e.len() >= 5).await;
    let before = app.events(&id).await;

    let r = app
        .post(
            &format!("/api/conversations/{id}/events"),
            message(&"x".repeat(64 * 1024)),
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.body);
    let detail = r.body["detail"].as_str().expect("detail");
    assert!(
        detail.contains("limits.max_bytes_per_conversation") && detail.contains(&id),
        "{detail}"
    );
    assert_eq!(app.events(&id).await, before, "nothing was stored");
    assert_eq!(app.info(&id).await["status"], "RUNNING");

    // A message that fits still goes through, and is echoed.
    let r = app
        .post(&format!("/api/conversations/{id}/events"), message("small"))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    app.wait_events(&id, 10, |e| {
        e.iter()
            .any(|ev| ev["source"] == "agent" && ev["args"]["content"] == "small")
    })
    .await;
}

#[actix_web::test]
async fn an_agent_event_over_the_quota_stops_the_conversation_with_a_clear_error() {
    let app = spawn_app_with(|s| s.limits.max_bytes_per_conversation = 48 * 1024).await;
    // The first message fits; the echo runtime's copy of it would not.
    let big = "y".repeat(12 * 1024);
    let id = app.create(json!({"initial_user_msg": big})).await;
    app.wait_status(&id, "STOPPED", 10).await;
    let events = app.events(&id).await;
    assert_dense(&events);
    let error = error_observation(&events);
    assert!(
        error.contains("limits.max_bytes_per_conversation"),
        "{error}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["source"] == "agent" && e["args"]["content"] == big.as_str()),
        "the echo over the quota was stored"
    );
    assert_eq!(
        agent_states(&events).last().map(String::as_str),
        Some("stopped")
    );
}

#[actix_web::test]
async fn a_full_store_is_507_and_delete_makes_room() {
    let app = spawn_app_with(|s| s.limits.max_store_bytes = 96 * 1024).await;
    let body = json!({"initial_user_msg": "z".repeat(8 * 1024)});
    let mut created = Vec::new();
    let refused = loop {
        let r = app.post("/api/conversations", body.clone()).await;
        if r.status != 200 {
            break r;
        }
        created.push(r.body["conversation_id"].as_str().expect("id").to_string());
        assert!(created.len() < 50, "the store never filled up");
    };
    assert_eq!(refused.status, 507, "{}", refused.body);
    let detail = refused.body["detail"].as_str().expect("detail");
    assert!(detail.contains("limits.max_store_bytes"), "{detail}");
    let listed = app.listed().await;
    assert_eq!(
        listed,
        created.len(),
        "the refused conversation was not kept"
    );

    // A running conversation's message is refused too, with nothing stored.
    let id = &created[0];
    let before = app.events(id).await;
    let r = app
        .post(
            &format!("/api/conversations/{id}/events"),
            message(&"w".repeat(16 * 1024)),
        )
        .await;
    assert_eq!(r.status, 507, "{}", r.body);
    assert_eq!(app.events(id).await.len(), before.len());

    // Deleting works on a full store and makes room.
    for id in &created[..2] {
        let r = app
            .send("DELETE", &format!("/api/conversations/{id}"), None)
            .await;
        assert_eq!((r.status, &r.body), (200, &json!(true)));
    }
    let r = app.post("/api/conversations", body).await;
    assert_eq!(r.status, 200, "{}", r.body);
}
