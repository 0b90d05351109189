//! The durable store across restarts: everything is kept, ids continue, replay works.

use serde_json::{json, Value};

use crate::helpers::*;

#[actix_web::test]
async fn a_restart_keeps_conversations_titles_init_data_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_sqlite_in(dir.path(), |_| {}).await;
    let a = app
        .create(json!({
            "initial_user_msg": "remember me", "repository": "acme/widgets", "selected_branch": "main",
            "git_provider": "github", "conversation_instructions": "be kind",
            "mcp_config": {"stdio_servers": [{"name": "fs", "command": "mcp-fs", "env": {"TOKEN": "t0k"}}]}
        }))
        .await;
    let b = app.create(json!({"conversation_id": "second"})).await;
    app.wait_events(&a, 5, |e| e.len() >= 5).await;
    app.wait_events(&b, 5, |e| e.len() >= 2).await;
    let r = app
        .send(
            "PATCH",
            &format!("/api/conversations/{a}"),
            Some(&json!({"title": "Kept title"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let before_a = app.events(&a).await;
    app.shutdown().await;

    let app = spawn_sqlite_in(dir.path(), |_| {}).await;
    let list = app.get("/api/conversations").await.body;
    let results = list["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|c| c["status"] == "STOPPED"));
    assert_eq!(results[0]["conversation_id"], "second", "newest first");
    let info = app.info(&a).await;
    assert_eq!(info["title"], "Kept title");
    assert_eq!(info["selected_repository"], "acme/widgets");
    assert_eq!(info["selected_branch"], "main");
    assert_eq!(info["git_provider"], "github");
    assert!(!info.to_string().contains("t0k"));
    let record = app.store.get(&cid(&a)).await.unwrap().unwrap();
    assert_eq!(
        record.meta.init.conversation_instructions.as_deref(),
        Some("be kind")
    );
    assert_eq!(
        record.meta.init.mcp_config.unwrap()["stdio_servers"][0]["env"]["TOKEN"],
        "t0k"
    );
    // Every event is there, byte for byte, plus the stop the shutdown recorded.
    let after_a = app.events(&a).await;
    assert_eq!(&after_a[..before_a.len()], &before_a[..]);
    assert_eq!(after_a.last().unwrap()["extras"]["agent_state"], "stopped");

    // Joining resumes with the same id and dense ids.
    let r = app
        .post("/api/conversations", json!({"conversation_id": a}))
        .await;
    assert_eq!(r.status, 200);
    app.wait_status(&a, "RUNNING", 5).await;
    let events = app
        .wait_events(&a, 5, |e| e.len() >= after_a.len() + 2)
        .await;
    assert_dense(&events);
    assert_eq!(events[after_a.len()]["extras"]["agent_state"], "loading");

    // A socket replays the whole history with dense ids, then goes live: it catches up with
    // every stored event (those released just after the replay included).
    app.sio_caught_up(&a).await;
}

#[actix_web::test]
async fn deleting_removes_the_conversation_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_sqlite_in(dir.path(), |_| {}).await;
    let keep = app.create(json!({"initial_user_msg": "keep"})).await;
    let gone = app.create(json!({"initial_user_msg": "gone"})).await;
    app.wait_events(&gone, 5, |e| e.len() >= 5).await;
    app.wait_events(&keep, 5, |e| e.len() >= 5).await;
    assert_eq!(
        app.send("DELETE", &format!("/api/conversations/{gone}"), None)
            .await
            .body,
        json!(true)
    );
    app.shutdown().await;
    let app = spawn_sqlite_in(dir.path(), |_| {}).await;
    assert_eq!(app.info(&gone).await, Value::Null);
    assert_eq!(app.events(&keep).await.len(), 6);
}
