//! Create, join, join-restarts-stopped, and the race of concurrent joins.

use serde_json::{json, Value};

use crate::helpers::*;

#[actix_web::test]
async fn create_answers_ok_with_a_uuid_hex_id() {
    let app = spawn_app().await;
    let r = app.post("/api/conversations", json!({})).await;
    assert_eq!(r.status, 200);
    let id = r.body["conversation_id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(r.body["status"], "ok");
    assert_eq!(r.body["message"], Value::Null);
    assert!(["STARTING", "RUNNING"].contains(&r.body["conversation_status"].as_str().unwrap()));
    assert_eq!(
        r.headers.get("cache-control").unwrap(),
        "no-cache, no-store, must-revalidate, max-age=0"
    );
}

#[actix_web::test]
async fn a_new_conversation_without_message_awaits_input() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    let events = app
        .wait_events(&id, 5, |e| agent_states(e).len() >= 2)
        .await;
    assert_dense(&events);
    assert_eq!(
        agent_states(&events),
        vec!["loading", "awaiting_user_input"]
    );
    let info = app.wait_status(&id, "RUNNING", 5).await;
    assert_eq!(info["runtime_status"], "STATUS$READY");
    assert_eq!(info["title"], format!("Conversation {}", &id[..5]));
    assert_eq!(info["trigger"], "gui");
    assert_eq!(info["url"], format!("/api/conversations/{id}"));
    assert_eq!(info["num_connections"], 0);
    assert_eq!(info["pr_number"], json!([]));
    assert_eq!(info["session_api_key"], Value::Null);
}

#[actix_web::test]
async fn the_initial_message_is_the_first_user_event_and_is_echoed() {
    let app = spawn_app().await;
    let id = app
        .create(json!({"initial_user_msg": "What is 2+2?", "image_urls": ["http://x/y.png"]}))
        .await;
    let events = app.wait_events(&id, 5, |e| e.len() >= 5).await;
    assert_dense(&events);
    assert_eq!(events[0]["observation"], "agent_state_changed");
    assert_eq!(events[0]["extras"]["agent_state"], "loading");
    assert_eq!(events[1]["source"], "user");
    assert_eq!(events[1]["action"], "message");
    assert_eq!(events[1]["args"]["content"], "What is 2+2?");
    assert_eq!(events[1]["args"]["image_urls"], json!(["http://x/y.png"]));
    assert_eq!(events[2]["extras"]["agent_state"], "running");
    assert_eq!(events[3]["source"], "agent");
    assert_eq!(events[3]["message"], "What is 2+2?");
    assert_eq!(events[3]["args"]["wait_for_response"], true);
    assert_eq!(events[4]["extras"]["agent_state"], "awaiting_user_input");
    assert_eq!(events.len(), 5, "{events:#?}");
    // Key order and timestamp form of the wire contract.
    let text = serde_json::to_string(&events[0]).unwrap();
    assert!(text.starts_with(r#"{"id":0,"timestamp":""#), "{text}");
    let ts = events[0]["timestamp"].as_str().unwrap();
    assert_eq!(ts.len(), 26, "{ts}");
    assert!(!ts.ends_with('Z'));
}

#[actix_web::test]
async fn a_suggested_task_becomes_the_prompt_and_the_trigger() {
    let app = spawn_app().await;
    let id = app
        .create(json!({"suggested_task":{"git_provider":"github","task_type":"FAILING_CHECKS","repo":"acme/widgets","issue_number":"42","title":"Fix CI"}}))
        .await;
    let events = app.wait_events(&id, 5, |e| e.len() >= 2).await;
    let prompt = events[1]["args"]["content"].as_str().unwrap();
    assert!(
        prompt.contains("#42") && prompt.contains("acme/widgets") && prompt.contains("Fix CI"),
        "{prompt}"
    );
    let info = app.info(&id).await;
    assert_eq!(info["trigger"], "suggested_task");
    assert_eq!(info["selected_repository"], "acme/widgets");
    assert_eq!(info["git_provider"], "github");
}

#[actix_web::test]
async fn init_data_is_kept_and_secrets_are_not_echoed() {
    let app = spawn_app().await;
    let id = app
        .create(json!({
            "repository": "acme/widgets", "selected_branch": "dev", "git_provider": "gitlab",
            "conversation_instructions": "be brief",
            "mcp_config": {"sse_servers": [{"url": "https://mcp.example", "api_key": "sekrit-123"}]}
        }))
        .await;
    let info = app.info(&id).await;
    assert_eq!(info["selected_repository"], "acme/widgets");
    assert_eq!(info["selected_branch"], "dev");
    assert_eq!(info["git_provider"], "gitlab");
    for path in [
        format!("/api/conversations/{id}"),
        "/api/conversations".to_string(),
        format!("/api/conversations/{id}/events"),
    ] {
        let r = app.get(&path).await;
        assert!(
            !r.body.to_string().contains("sekrit-123"),
            "{path} leaks a secret"
        );
    }
    let record = app.store.get(&cid(&id)).await.unwrap().unwrap();
    assert_eq!(
        record.meta.init.conversation_instructions.as_deref(),
        Some("be brief")
    );
    assert_eq!(
        record.meta.init.mcp_config.unwrap()["sse_servers"][0]["api_key"],
        "sekrit-123"
    );
}

#[actix_web::test]
async fn create_with_a_chosen_id_then_join_it() {
    let app = spawn_app().await;
    let r = app
        .post(
            "/api/conversations",
            json!({"conversation_id": "my-conv_1", "repository": "a/b", "initial_user_msg": "first"}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["conversation_id"], "my-conv_1");
    assert_eq!(r.body["message"], Value::Null);
    app.wait_events("my-conv_1", 5, |e| e.len() >= 5).await;

    let r = app
        .post(
            "/api/conversations",
            json!({"conversation_id": "my-conv_1", "repository": "c/d", "initial_user_msg": "second"}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["conversation_status"], "RUNNING");
    assert!(r.body["message"].as_str().unwrap().contains("not applied"));
    let info = app.info("my-conv_1").await;
    assert_eq!(
        info["selected_repository"], "a/b",
        "join overwrote metadata"
    );
    let events = app.events("my-conv_1").await;
    assert!(!events.iter().any(|e| e["args"]["content"] == "second"));
    // Joining without a message says nothing.
    let r = app
        .post(
            "/api/conversations",
            json!({"conversation_id": "my-conv_1"}),
        )
        .await;
    assert_eq!(r.body["message"], Value::Null);
}

#[actix_web::test]
async fn joining_a_stopped_conversation_starts_it_and_ids_continue() {
    let app = spawn_app().await;
    let id = app.create(json!({"initial_user_msg": "hi"})).await;
    app.wait_events(&id, 5, |e| e.len() >= 5).await;
    let r = app
        .post(&format!("/api/conversations/{id}/stop"), json!({}))
        .await;
    assert_eq!(r.body["conversation_status"], "STOPPED");
    assert_eq!(app.info(&id).await["status"], "STOPPED");

    let r = app
        .post("/api/conversations", json!({"conversation_id": id}))
        .await;
    assert_eq!(r.status, 200);
    assert!(["STARTING", "RUNNING"].contains(&r.body["conversation_status"].as_str().unwrap()));
    let events = app
        .wait_events(&id, 5, |e| {
            agent_states(e).last().map(String::as_str) == Some("awaiting_user_input") && e.len() > 6
        })
        .await;
    assert_dense(&events);
    assert_eq!(
        agent_states(&events),
        vec![
            "loading",
            "running",
            "awaiting_user_input",
            "stopped",
            "loading",
            "awaiting_user_input"
        ]
    );
    app.wait_status(&id, "RUNNING", 5).await;
}

#[actix_web::test]
async fn a_hundred_concurrent_posts_with_one_new_id_start_one_conversation() {
    let app = spawn_app().await;
    let requests = (0..100).map(|i| {
        let app = &app;
        async move {
            app.post(
                "/api/conversations",
                json!({"conversation_id": "race", "initial_user_msg": format!("msg {i}")}),
            )
            .await
        }
    });
    let replies = futures_util::future::join_all(requests).await;
    assert!(replies.iter().all(|r| r.status == 200), "not all 200");
    let creators = replies
        .iter()
        .filter(|r| r.body["message"].is_null())
        .count();
    assert_eq!(creators, 1, "exactly one request creates");
    let events = app.wait_events("race", 5, |e| e.len() >= 5).await;
    actix_web::rt::time::sleep(std::time::Duration::from_millis(200)).await;
    let events_after = app.events("race").await;
    assert_eq!(events.len(), events_after.len());
    assert_dense(&events_after);
    let loading = agent_states(&events_after)
        .iter()
        .filter(|s| *s == "loading")
        .count();
    assert_eq!(loading, 1, "more than one actor started: {events_after:#?}");
    let user_msgs = events_after
        .iter()
        .filter(|e| e["source"] == "user")
        .count();
    assert_eq!(user_msgs, 1);
    assert_eq!(app.listed().await, 1);
}

#[actix_web::test]
async fn replay_json_events_are_replayed_into_the_log() {
    let app = spawn_app().await;
    let replay = json!([
        {"id": 7, "timestamp": "2020-01-01T00:00:00", "source": "user", "message": "old", "action": "message", "args": {"content": "old"}},
        {"source": "agent", "message": "older reply", "action": "message", "args": {"content": "older reply"}}
    ]);
    let id = app.create(json!({"replay_json": replay.to_string()})).await;
    let events = app.wait_events(&id, 5, |e| e.len() >= 4).await;
    assert_dense(&events);
    assert_eq!(events[1]["args"]["content"], "old");
    assert_eq!(events[1]["source"], "user");
    assert_eq!(events[2]["source"], "agent");
    assert_eq!(
        agent_states(&events),
        vec!["loading", "awaiting_user_input"]
    );
    // Replayed user messages are history: the echo runtime did not answer them.
    assert_eq!(events.len(), 4, "{events:#?}");
}

#[actix_web::test]
async fn the_first_user_message_titles_the_conversation() {
    let app = spawn_app().await;
    // From the initial message: stripped, 30 characters, `...` when longer.
    let id = app
        .create(json!({"initial_user_msg": "   Please refactor the parser module today  "}))
        .await;
    assert_eq!(
        app.info(&id).await["title"],
        "Please refactor the parser mod..."
    );

    // From the first non-blank chat message; attached clients are told after the message.
    let id = app.create(json!({})).await;
    let (mut ws, _) = app
        .sio_attached(&format!("conversation_id={id}&latest_event_id=-1"))
        .await;
    ws.send(r#"42["oh_user_action",{"action":"message","args":{"content":"  \n "}}]"#)
        .await;
    ws.send(r#"42["oh_user_action",{"action":"message","args":{"content":" short one "}}]"#)
        .await;
    let seen = ws
        .oh_events_until(|p| p.get("conversation_title").is_some())
        .await;
    let update = seen.last().expect("the title update");
    assert_eq!(
        update,
        &json!({"status_update": true, "type": "info", "message": id,
                "conversation_title": "short one"})
    );
    assert!(
        seen.iter().any(|p| p["args"]["content"] == " short one "),
        "the message comes before its title: {seen:?}"
    );
    assert_eq!(app.info(&id).await["title"], "short one");
    // Only while the title is the default one: later messages and renamed ones keep theirs.
    app.post(
        &format!("/api/conversations/{id}/events"),
        json!({"action": "message", "args": {"content": "another message"}}),
    )
    .await;
    let renamed = app.create(json!({})).await;
    app.send(
        "PATCH",
        &format!("/api/conversations/{renamed}"),
        Some(&json!({"title": "Mine"})),
    )
    .await;
    app.post(
        &format!("/api/conversations/{renamed}/events"),
        json!({"action": "message", "args": {"content": "hello"}}),
    )
    .await;
    app.wait_events(&renamed, 10, |e| e.iter().any(|ev| ev["source"] == "agent"))
        .await;
    assert_eq!(app.info(&id).await["title"], "short one");
    assert_eq!(app.info(&renamed).await["title"], "Mine");
    // Stored: a listing (read from the store) shows it.
    let listed = app.get("/api/conversations").await.body;
    assert!(
        listed["results"]
            .as_array()
            .expect("results")
            .iter()
            .any(|c| c["conversation_id"] == id.as_str() && c["title"] == "short one"),
        "{listed}"
    );
}
