//! Socket.IO and plain WebSocket attach: handshake, replay, live, refusals, tabs, stop, slowness.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

fn user_msg(content: &str) -> String {
    format!(
        r#"42["oh_user_action",{}]"#,
        json!({"action":"message","args":{"content":content,"image_urls":[],"file_urls":[],"timestamp":"2026-01-01T00:00:00"}})
    )
}

#[actix_web::test]
async fn socketio_handshake_replay_and_echo() {
    let app = spawn_app().await;
    let id = app.create(json!({"initial_user_msg": "hello"})).await;
    app.wait_events(&id, 5, |e| e.len() >= 5).await;

    let mut ws = app
        .ws(&format!("/socket.io/?latest_event_id=-1&conversation_id={id}&providers_set=&session_api_key=null&EIO=4&transport=websocket"), &[])
        .await
        .unwrap();
    let open = ws.text().await;
    let open: Value = serde_json::from_str(open.strip_prefix('0').unwrap()).unwrap();
    assert_eq!(open["sid"].as_str().unwrap().len(), 20);
    assert_eq!(open["upgrades"], json!([]));
    assert_eq!(open["pingInterval"], 25000);
    assert_eq!(open["pingTimeout"], 20000);
    assert!(open["maxPayload"].is_u64());

    ws.send("40").await;
    let ack = ws.text().await;
    assert!(ack.starts_with("40{\"sid\":"), "{ack}");
    // Replay: ids in order, then the latest status; an event stored just before the attach but
    // not yet released by the conversation follows the status live.
    let mut replay = ws
        .oh_events_until(|p| p.get("status_update").is_some())
        .await;
    assert_eq!(replay.last().unwrap()["id"], "STATUS$READY");
    while ids(&replay).len() < 5 {
        replay.push(ws.oh_event().await);
    }
    assert_eq!(ids(&replay), vec![0, 1, 2, 3, 4]);

    ws.send(&user_msg("ping")).await;
    let live = ws
        .oh_events_until(|p| p["extras"]["agent_state"] == "awaiting_user_input")
        .await;
    let live = stored(&live);
    assert_eq!(live[0]["id"], 5);
    assert_eq!(live[0]["source"], "user");
    assert_eq!(live[0]["args"]["content"], "ping");
    assert_eq!(live[2]["source"], "agent");
    assert_eq!(live[2]["args"]["content"], "ping");
    assert_eq!(app.info(&id).await["num_connections"], 1);
}

#[actix_web::test]
async fn reconnecting_with_latest_event_id_gets_only_what_was_missed() {
    let app = spawn_app().await;
    let id = app.create(json!({"initial_user_msg": "hello"})).await;
    app.wait_events(&id, 5, |e| e.len() >= 5).await;
    let (_ws, replay) = app
        .sio_attached(&format!("conversation_id={id}&latest_event_id=3"))
        .await;
    assert_eq!(ids(&replay), vec![4]);
    // Non-integer latest_event_id counts as -1.
    let (_ws, replay) = app
        .sio_attached(&format!("conversation_id={id}&latest_event_id=abc"))
        .await;
    assert_eq!(stored(&replay).len(), 5);
    // providers_set names the start body's providers, blanks and empty names aside.
    let (_ws, replay) = app
        .sio_attached(&format!(
            "conversation_id={id}&latest_event_id=3&providers_set=github,%20enterprise_sso%20,,"
        ))
        .await;
    assert_eq!(ids(&replay), vec![4]);
}

#[actix_web::test]
async fn every_refusal_is_a_44_with_a_reason() {
    let app = spawn_app_with(|s| s.session_api_key = Some("k3y".into())).await;
    let id = app.create(json!({})).await;
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "latest_event_id=-1&session_api_key=k3y".into(),
            "40",
            "No conversation_id in query params",
        ),
        (
            format!("conversation_id={id}"),
            "40",
            "invalid_session_api_key",
        ),
        (
            format!("conversation_id={id}&session_api_key=nope"),
            "40",
            "invalid_session_api_key",
        ),
        (
            format!("conversation_id={id}&session_api_key=null"),
            "40",
            "invalid_session_api_key",
        ),
        (
            "conversation_id=unknown&session_api_key=k3y".into(),
            "40",
            "Conversation not found",
        ),
        (
            "conversation_id=../x&session_api_key=k3y".into(),
            "40",
            "Invalid conversation_id",
        ),
        (
            format!("conversation_id={id}&session_api_key=k3y&providers_set=github,%20svn%20,x"),
            "40",
            r#"Invalid providers_set: unknown provider "svn""#,
        ),
        (
            format!("conversation_id={id}"),
            r#"40{"session_api_key":"bad"}"#,
            "invalid_session_api_key",
        ),
    ];
    for (query, connect, reason) in cases {
        let mut ws = app.sio(&query).await;
        ws.send(connect).await;
        let reply = ws.text().await;
        let body: Value = serde_json::from_str(
            reply
                .strip_prefix("44")
                .unwrap_or_else(|| panic!("{query}: {reply}")),
        )
        .unwrap();
        assert!(
            body["message"].as_str().unwrap().contains(reason),
            "{query}: {reply}"
        );
    }
    // Other namespaces.
    let mut ws = app
        .sio(&format!("conversation_id={id}&session_api_key=k3y"))
        .await;
    ws.send("40/foo,").await;
    assert_eq!(ws.text().await, r#"44/foo,"Unable to connect""#);
    // The key in the CONNECT auth payload, or in the upgrade header, is accepted.
    let mut ws = app.sio(&format!("conversation_id={id}")).await;
    ws.send(r#"40{"session_api_key":"k3y"}"#).await;
    assert!(ws.text().await.starts_with("40{"));
    let mut ws = app
        .ws(
            &format!("/socket.io/?EIO=4&transport=websocket&conversation_id={id}"),
            &[("X-Session-API-Key", "k3y")],
        )
        .await
        .unwrap();
    ws.text().await;
    ws.send("40").await;
    assert!(ws.text().await.starts_with("40{"));
    // Refusals created nothing.
    assert_eq!(app.listed().await, 1);
}

#[actix_web::test]
async fn old_engineio_and_polling_are_refused_with_400() {
    let app = spawn_app().await;
    for q in [
        "EIO=3&transport=websocket",
        "EIO=4&transport=polling",
        "transport=websocket",
    ] {
        let r = app.get(&format!("/socket.io/?{q}&conversation_id=x")).await;
        assert_eq!(r.status, 400, "{q}");
        assert!(r.body["detail"].is_string());
        assert_eq!(
            app.ws(&format!("/socket.io/?{q}"), &[]).await.err(),
            Some(400)
        );
    }
}

#[actix_web::test]
async fn acks_malformed_frames_and_unknown_events() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    app.wait_events(&id, 5, |e| e.len() >= 2).await;
    let mut ws = app.sio_caught_up(&id).await;
    let before = app.events(&id).await.len();
    for (bad, message) in [
        ("42{}", None),
        ("42[1]", None),
        (
            r#"42["oh_user_action",{"action":1}]"#,
            Some("Invalid action: the action needs an `action` name"),
        ),
        (
            r#"42["oh_user_action",{"action":"message","args":{}}]"#,
            Some("Invalid action: a message needs a string `args.content`"),
        ),
        (
            r#"42["oh_action",{"args":{"file_urls":[2],"content":"x"},"action":"message"}]"#,
            Some("Invalid action: `args.file_urls` must be a list of strings"),
        ),
        (
            r#"42["oh_user_action",{"action":"Run","args":[]}]"#,
            Some("Invalid action: `action` must be 1-64 characters of a-z, 0-9 or _"),
        ),
        (
            r#"42["oh_user_action",{"action":"run","args":[]}]"#,
            Some("Invalid action: `args` must be an object"),
        ),
        (
            r#"42["oh_user_action","message"]"#,
            Some("Invalid action: an action must be a JSON object"),
        ),
        (r#"42["oh_user_action"]"#, None),
        (r#"42["something_else",{}]"#, None),
        ("9zz", None),
    ] {
        ws.send(bad).await;
        let e = ws.oh_event().await;
        assert_eq!(e["error"], true, "{bad}: {e}");
        match message {
            Some(message) => assert_eq!(e["message"], message, "{bad}"),
            None => assert!(e["message"].is_string()),
        }
    }
    ws.send_binary(vec![1, 2, 3]).await;
    assert_eq!(ws.oh_event().await["error"], true);
    assert_eq!(
        app.events(&id).await.len(),
        before,
        "a malformed frame was stored"
    );
    // An ack-requesting emit is acknowledged.
    ws.send(&user_msg("acked").replacen("42", "421", 1)).await;
    assert_eq!(ws.text().await, "431[]");
    let live = ws.oh_events_until(|p| p["source"] == "agent").await;
    assert_eq!(live.last().unwrap()["args"]["content"], "acked");
}

#[actix_web::test]
async fn tabs_stay_in_sync_and_connections_are_counted() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    app.wait_events(&id, 5, |e| e.len() >= 2).await;
    let mut a = app.sio(&format!("conversation_id={id}")).await;
    let mut b = app.sio(&format!("conversation_id={id}")).await;
    for ws in [&mut a, &mut b] {
        ws.send("40").await;
        ws.text().await;
        ws.oh_events_until(|p| p.get("status_update").is_some())
            .await;
    }
    assert_eq!(app.info(&id).await["num_connections"], 2);
    a.send(&user_msg("from tab a")).await;
    for ws in [&mut a, &mut b] {
        let got = stored(&ws.oh_events_until(|p| p["source"] == "agent").await);
        assert_eq!(got[0]["args"]["content"], "from tab a");
        assert_eq!(got[0]["id"], 2);
    }
    let users = app
        .events(&id)
        .await
        .iter()
        .filter(|e| e["source"] == "user")
        .count();
    assert_eq!(users, 1, "stored once");
    a.send("41").await;
    drop(a);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while app.info(&id).await["num_connections"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "num_connections not exact"
        );
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn attaching_while_events_are_produced_has_no_gap_and_no_duplicate() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    app.wait_events(&id, 5, |e| e.len() >= 2).await;
    let messages = 150;
    let producer = {
        let client = awc::Client::default();
        let url = format!("{}/api/conversations/{id}/events", app.url);
        async move {
            for i in 0..messages {
                let r = client
                    .post(&url)
                    .send_json(&json!({"action":"message","args":{"content": format!("m{i}")}}))
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        }
    };
    let consumer = async {
        actix_web::rt::time::sleep(Duration::from_millis(30)).await;
        let mut ws = app
            .sio(&format!("conversation_id={id}&latest_event_id=-1"))
            .await;
        ws.send("40").await;
        ws.text().await;
        // 2 initial events + 4 per message (user, running, agent, awaiting).
        let total = 2 + 4 * messages as u64;
        let mut seen = Vec::new();
        while seen.len() < total as usize {
            let p = ws.oh_event().await;
            if let Some(i) = p["id"].as_u64() {
                seen.push(i);
            }
        }
        seen
    };
    let ((), seen) = futures_util::future::join(producer, consumer).await;
    let expected: Vec<u64> = (0..seen.len() as u64).collect();
    assert_eq!(seen, expected, "every id exactly once, in order");
}

#[actix_web::test]
async fn stop_tells_every_client_before_disconnecting() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    app.wait_events(&id, 5, |e| e.len() >= 2).await;
    let mut sio = app.sio_caught_up(&id).await;
    let mut plain = app
        .ws(&format!("/ws/conversations/{id}"), &[])
        .await
        .unwrap();
    let mut seen = 0;
    while seen < 3 {
        plain.text().await;
        seen += 1;
    }
    let r = app
        .post(&format!("/api/conversations/{id}/stop"), json!({}))
        .await;
    assert_eq!(r.body["conversation_status"], "STOPPED");
    let last = sio.oh_event().await;
    assert_eq!(last["extras"]["agent_state"], "stopped");
    assert_eq!(sio.text().await, "41");
    assert!(matches!(sio.read(5).await, WsRead::Closed(_)));
    let last: Value = serde_json::from_str(&plain.text().await).unwrap();
    assert_eq!(last["extras"]["agent_state"], "stopped");
    match plain.read(5).await {
        WsRead::Closed(Some(reason)) => {
            assert!(reason.description.unwrap().contains("stopped"))
        }
        other => panic!("expected a close with a reason, got {other:?}"),
    }
}

#[actix_web::test]
async fn an_attached_socket_keeps_its_conversation_from_eviction() {
    let app = spawn_app_limited(1, switchboard::config::OnLimit::EvictOldest).await;
    let id = app.create(json!({})).await;
    app.wait_events(&id, 5, |e| e.len() >= 2).await;
    let mut ws = app.sio_caught_up(&id).await;
    let r = app.post("/api/conversations", json!({})).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["msg_id"], "AGENT_ERROR$TOO_MANY_CONVERSATIONS");
    // The socket is still attached and live: a message makes the round trip.
    ws.send(&user_msg("still here")).await;
    let live = ws
        .oh_events_until(|p| p["extras"]["agent_state"] == "awaiting_user_input")
        .await;
    assert!(
        live.iter()
            .any(|p| p["source"] == "agent" && p["args"]["content"] == "still here"),
        "{live:#?}"
    );
    assert_eq!(app.info(&id).await["status"], "RUNNING");
}

#[actix_web::test]
async fn attaching_to_a_stopped_conversation_starts_it() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    app.post(&format!("/api/conversations/{id}/stop"), json!({}))
        .await;
    let mut ws = app.sio(&format!("conversation_id={id}")).await;
    ws.send("40").await;
    assert!(ws.text().await.starts_with("40{"));
    app.wait_status(&id, "RUNNING", 5).await;
    let got = ws
        .oh_events_until(|p| {
            p["extras"]["agent_state"] == "awaiting_user_input" && p["id"].as_u64() > Some(3)
        })
        .await;
    let got = ids(&got);
    let expected: Vec<u64> = (0..got.len() as u64).collect();
    assert_eq!(got, expected);
}

#[actix_web::test]
async fn a_slow_consumer_is_detached_with_a_reason() {
    let app = spawn_app_with(|s| s.socket.queue_frames = 8).await;
    let id = app.create(json!({})).await;
    app.wait_events(&id, 5, |e| e.len() >= 2).await;
    let mut ws = app
        .ws(&format!("/ws/conversations/{id}"), &[])
        .await
        .unwrap();
    ws.text().await; // it reads the first frame, then stops reading
    assert_eq!(app.info(&id).await["num_connections"], 1);
    let big = "x".repeat(64 * 1024);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // Produce until the conversation gives up on the client.
    while app.info(&id).await["num_connections"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "slow client never detached"
        );
        let r = app
            .post(
                &format!("/api/conversations/{id}/events"),
                json!({"action":"message","args":{"content": big}}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    // The conversation is unaffected, and what it produces now is not queued for the client.
    assert_eq!(app.info(&id).await["status"], "RUNNING");
    for i in 0..50 {
        let content = format!("after-detach {i} {big}");
        let r = app
            .post(
                &format!("/api/conversations/{id}/events"),
                json!({"action":"message","args":{"content": content}}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    // Reading again: the backlog (bounded), then the reason, then the close.
    let mut frames = 0;
    loop {
        match ws.read(10).await {
            WsRead::Text(t) => {
                frames += 1;
                assert!(frames < 10_000);
                // Bounded: what was queued before the detach, never what came after it.
                assert!(
                    !t.contains("after-detach"),
                    "the server kept queueing for a detached client"
                );
                if t.contains("did not keep up") {
                    break;
                }
            }
            other => panic!("expected the reason before the close, got {other:?}"),
        }
    }
    match ws.read(10).await {
        WsRead::Closed(Some(r)) => assert_eq!(r.description.as_deref(), Some("client too slow")),
        other => panic!("expected a close, got {other:?}"),
    }
}

#[actix_web::test]
async fn plain_websocket_route() {
    let app = spawn_app_with(|s| s.socket.max_frame_bytes = 4096).await;
    let id = app.create(json!({"initial_user_msg": "hi"})).await;
    app.wait_events(&id, 5, |e| e.len() >= 5).await;
    let mut ws = app
        .ws(&format!("/ws/conversations/{id}?latest_event_id=1"), &[])
        .await
        .unwrap();
    // The replay ends with a status update; an event stored just before the attach but not yet
    // released by the conversation follows it live.
    let mut ids = Vec::new();
    let mut replayed = false;
    while !replayed || ids.len() < 3 {
        let v: Value = serde_json::from_str(&ws.text().await).unwrap();
        if v.get("status_update").is_some() {
            replayed = true;
        } else {
            ids.push(v["id"].as_u64().unwrap());
        }
    }
    assert_eq!(ids, vec![2, 3, 4]);
    ws.send(r#"{"action":"message","args":{"content":"plain"}}"#)
        .await;
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(serde_json::from_str::<Value>(&ws.text().await).unwrap());
    }
    assert_eq!(got[2]["args"]["content"], "plain");
    ws.send("not json").await;
    let e: Value = serde_json::from_str(&ws.text().await).unwrap();
    assert_eq!(e["error"], true);
    // Oversized frames close the socket with 1009.
    ws.send(&"y".repeat(10_000)).await;
    match ws.read(5).await {
        WsRead::Closed(Some(r)) => assert_eq!(r.code, awc::ws::CloseCode::Size),
        other => panic!("expected a 1009 close, got {other:?}"),
    }
    assert_eq!(
        app.ws("/ws/conversations/unknown", &[]).await.err(),
        Some(404)
    );
    assert_eq!(app.ws("/ws/conversations/a.b", &[]).await.err(), Some(422));
}

#[actix_web::test]
async fn plain_websocket_route_needs_the_key() {
    let app = spawn_app_with(|s| s.session_api_key = Some("k".into())).await;
    let id = app.create(json!({})).await;
    assert_eq!(
        app.ws(&format!("/ws/conversations/{id}"), &[]).await.err(),
        Some(401)
    );
    assert!(app
        .ws(&format!("/ws/conversations/{id}?session_api_key=k"), &[])
        .await
        .is_ok());
    assert!(app
        .ws(
            &format!("/ws/conversations/{id}"),
            &[("X-Session-API-Key", "k")]
        )
        .await
        .is_ok());
}

#[actix_web::test]
async fn a_client_that_stops_answering_pings_is_closed() {
    let app = spawn_app_with(|s| {
        s.socket.ping_interval_ms = 200;
        s.socket.ping_timeout_ms = 200;
    })
    .await;
    let id = app.create(json!({})).await;
    let mut ws = app.sio(&format!("conversation_id={id}")).await;
    ws.auto_pong = false;
    ws.send("40").await;
    let mut pings = 0;
    loop {
        match ws.read(5).await {
            WsRead::Text(t) if t == "2" => pings += 1,
            WsRead::Text(_) => {}
            WsRead::Closed(_) => break,
            WsRead::Timeout => panic!("never closed"),
        }
    }
    assert!(pings >= 1);
}
