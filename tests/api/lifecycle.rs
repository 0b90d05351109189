//! Idle stop, the start deadline, and graceful shutdown, on a real server and real time (the
//! same timers at their exact boundaries, on paused time: `tests/paused_time.rs`).

use serde_json::{json, Value};
use switchboard::store::EventQuery;

use crate::helpers::*;

#[actix_web::test]
async fn an_idle_conversation_stops_by_itself() {
    let app = spawn_app_with(|s| s.limits.idle_timeout_secs = 1).await;
    let id = app.create(json!({})).await;
    app.wait_status(&id, "RUNNING", 5).await;
    let info = app.wait_status(&id, "STOPPED", 10).await;
    assert_eq!(info["runtime_status"], Value::Null);
    let events = app.events(&id).await;
    let last = events.last().unwrap();
    assert_eq!(last["extras"]["agent_state"], "stopped");
    assert_eq!(last["extras"]["reason"], "idle timeout");
}

#[actix_web::test]
async fn starting_past_the_deadline_stops_with_a_readable_error() {
    let app = spawn_app_with(|s| {
        s.runtime.echo.start_delay_ms = 5_000;
        s.limits.start_timeout_secs = 1;
    })
    .await;
    let id = app.create(json!({})).await;
    let info = app.info(&id).await;
    assert_eq!(info["status"], "STARTING");
    assert_eq!(info["runtime_status"], "STATUS$STARTING_RUNTIME");
    app.wait_status(&id, "STOPPED", 10).await;
    let events = app.events(&id).await;
    assert_dense(&events);
    assert!(error_observation(&events).contains("deadline"));
    assert_eq!(agent_states(&events).last().unwrap(), "stopped");
}

#[actix_web::test]
async fn a_delayed_start_reports_ready_later() {
    let app = spawn_app_with(|s| s.runtime.echo.start_delay_ms = 300).await;
    let id = app.create(json!({"initial_user_msg": "early"})).await;
    assert_eq!(app.info(&id).await["status"], "STARTING");
    let events = app.wait_events(&id, 5, |e| e.len() >= 5).await;
    assert_eq!(events[3]["args"]["content"], "early");
    app.wait_status(&id, "RUNNING", 5).await;
}

#[actix_web::test]
async fn graceful_shutdown_stops_every_conversation_durably() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = app
            .create(json!({"initial_user_msg": format!("m{i}")}))
            .await;
        ids.push(id);
    }
    for id in &ids {
        app.wait_events(id, 5, |e| e.len() >= 5).await;
    }
    let store = app.shutdown().await;
    for id in &ids {
        let events = store
            .events(
                &cid(id),
                EventQuery {
                    start_id: 0,
                    end_id: None,
                    reverse: false,
                    limit: 1000,
                },
            )
            .await
            .unwrap();
        let last: Value = serde_json::from_str(&events.last().unwrap().json).unwrap();
        assert_eq!(last["extras"]["agent_state"], "stopped", "{id}");
        assert_eq!(last["extras"]["reason"], "server shutting down");
    }
}
