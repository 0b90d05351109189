//! User keys: who sees what. Each user sees and touches only its own conversations, on every
//! route and both socket routes, answered exactly as an unknown id is; admins (the session key,
//! admin user keys) see everything; with user keys and no session key a key is required.

use serde_json::{json, Value};
use switchboard::store::{ApiKey, Store};

use crate::helpers::*;

/// Adds a user key to the server's store (what `switchboard keys add` does) and returns it.
pub async fn add_user_key(store: &dyn Store, name: &str, admin: bool) -> String {
    let key = switchboard::keys::generate().expect("key");
    let record = ApiKey {
        name: name.to_string(),
        admin,
        created_at: "2026-01-01T00:00:00.000000Z".to_string(),
    };
    store
        .add_key(record, switchboard::keys::hash(&key))
        .await
        .expect("add key");
    key
}

/// Every route that names a conversation: method, path suffix after `/api/conversations/{id}`,
/// and a body.
fn conversation_routes() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("GET", "", None),
        ("PATCH", "", Some(json!({"title": "mine now"}))),
        ("POST", "/start", Some(json!({}))),
        ("POST", "/stop", None),
        ("GET", "/events", None),
        (
            "POST",
            "/events",
            Some(json!({"action": "message", "args": {"content": "alice-was-here"}})),
        ),
        ("GET", "/config", None),
        ("GET", "/vscode-url", None),
        ("GET", "/web-hosts", None),
        ("GET", "/git/changes", None),
        ("GET", "/list-files", None),
        ("GET", "/select-file?file=a", None),
        ("GET", "/microagents", None),
        ("GET", "/trajectory", None),
        ("DELETE", "", None),
    ]
}

/// `app` as `key` sees `path`.
async fn as_key(
    app: &mut TestApp,
    key: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Reply {
    app.key = Some(key.to_string());
    app.send(method, path, body).await
}

/// What a Socket.IO CONNECT to `id` with `key` answers.
async fn sio_connect(app: &TestApp, id: &str, key: &str) -> String {
    let mut ws = app
        .sio(&format!("conversation_id={id}&session_api_key={key}"))
        .await;
    ws.send("40").await;
    ws.text().await
}

#[actix_web::test]
async fn each_user_sees_only_its_own_conversations_on_every_route_and_socket() {
    let mut app = spawn_app_with(|s| s.session_api_key = Some("s3cret".into())).await;
    let alice = add_user_key(app.store.as_ref(), "alice", false).await;
    let bob = add_user_key(app.store.as_ref(), "bob", false).await;
    let root = add_user_key(app.store.as_ref(), "root", true).await;

    app.key = Some(alice.clone());
    let a = app.create(json!({"initial_user_msg": "alice's"})).await;
    app.key = Some(bob.clone());
    let b = app.create(json!({"initial_user_msg": "bob's"})).await;
    app.key = Some("s3cret".into());
    let s = app.create(json!({})).await;
    app.wait_events(&b, 5, |e| e.len() >= 3).await;

    // `owner` is filled with the key's name; the session key's conversations have none.
    for (id, owner) in [(&a, Some("alice")), (&b, Some("bob")), (&s, None)] {
        let record = app.store.get(&cid(id)).await.expect("get").expect("stored");
        assert_eq!(record.meta.owner.as_deref(), owner, "{id}");
    }

    // Listing: a user lists its own; admins list all.
    let listed = |reply: Reply| -> Vec<String> {
        let mut ids: Vec<String> = reply.body["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|c| c["conversation_id"].as_str().expect("id").to_string())
            .collect();
        ids.sort();
        ids
    };
    let mut all = vec![a.clone(), b.clone(), s.clone()];
    all.sort();
    assert_eq!(
        listed(as_key(&mut app, &alice, "GET", "/api/conversations", None).await),
        std::slice::from_ref(&a)
    );
    assert_eq!(
        listed(as_key(&mut app, &bob, "GET", "/api/conversations", None).await),
        std::slice::from_ref(&b)
    );
    for admin in ["s3cret", root.as_str()] {
        assert_eq!(
            listed(as_key(&mut app, admin, "GET", "/api/conversations", None).await),
            all
        );
    }

    // Every route: alice on bob's conversation (and on the session key's) answers exactly what
    // she gets for an id that does not exist, and changes nothing.
    let unknown = "0123456789abcdef0123456789abcdef";
    let untouched = |events: &[Value]| {
        !events.iter().any(|e| {
            e.to_string().contains("alice-was-here") || e.to_string().contains("let me in")
        })
    };
    for (method, suffix, body) in conversation_routes() {
        let answer = |id: &str, r: &Reply| (r.status, r.body.to_string().replace(id, "<id>"));
        let path = |id: &str| format!("/api/conversations/{id}{suffix}");
        let r = as_key(&mut app, &alice, method, &path(unknown), body.as_ref()).await;
        let expected = answer(unknown, &r);
        assert!(
            r.status == 404 || r.body == Value::Null || r.body == json!(false),
            "{method} {suffix}: an unknown id gives {expected:?}"
        );
        for other in [&b, &s] {
            let r = as_key(&mut app, &alice, method, &path(other), body.as_ref()).await;
            assert_eq!(answer(other, &r), expected, "{method} {suffix} on {other}");
        }
    }
    // File uploads too.
    let upload = |id: &str| format!("/api/conversations/{id}/upload-files");
    app.key = Some(alice.clone());
    let form = "--XX\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f.txt\"\r\n\r\nhi\r\n--XX--\r\n";
    let ct = Some("multipart/form-data; boundary=XX");
    let r_unknown = app
        .send_raw("POST", &upload(unknown), ct, form.as_bytes().to_vec())
        .await;
    let r_other = app
        .send_raw("POST", &upload(&b), ct, form.as_bytes().to_vec())
        .await;
    assert_eq!(r_unknown.status, 404);
    assert_eq!(
        (r_other.status, r_other.body.to_string().replace(&b, "<id>")),
        (
            r_unknown.status,
            r_unknown.body.to_string().replace(unknown, "<id>")
        )
    );
    // Nothing of bob's changed: his conversation is there, running, with its title and events.
    app.key = Some(bob.clone());
    let info = app.info(&b).await;
    assert_eq!(info["status"], "RUNNING", "{info}");
    assert_ne!(info["title"], "mine now");
    assert!(untouched(&app.events(&b).await));

    // Creating with bob's id does not join it: 409, saying only that the id is taken.
    let r = as_key(
        &mut app,
        &alice,
        "POST",
        "/api/conversations",
        Some(&json!({"conversation_id": b, "initial_user_msg": "let me in"})),
    )
    .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(r.body["msg_id"], "CONVERSATION$ID_TAKEN");
    assert!(!r.body.to_string().contains("bob"), "{:?}", r.body);
    app.key = Some(bob.clone());
    assert!(untouched(&app.events(&b).await));
    // Her own id she joins; an unused id she creates, as hers.
    for id in [a.as_str(), "alices-own-id"] {
        let body = json!({ "conversation_id": id });
        let r = as_key(&mut app, &alice, "POST", "/api/conversations", Some(&body)).await;
        assert_eq!(r.status, 200, "{id}: {:?}", r.body);
    }
    let record = app.store.get(&cid("alices-own-id")).await.unwrap().unwrap();
    assert_eq!(record.meta.owner.as_deref(), Some("alice"));

    // Both socket routes refuse another user's conversation exactly as an unknown one.
    let plain = |id: &str| format!("/ws/conversations/{id}");
    let header = [("X-Session-API-Key", alice.as_str())];
    assert_eq!(app.ws(&plain(unknown), &header).await.err(), Some(404));
    assert_eq!(app.ws(&plain(&b), &header).await.err(), Some(404));
    let refused = r#"44{"message":"Conversation not found"}"#;
    assert_eq!(sio_connect(&app, unknown, &alice).await, refused);
    assert_eq!(sio_connect(&app, &b, &alice).await, refused);
    assert_eq!(sio_connect(&app, &s, &alice).await, refused);
    // Her own she attaches to, on both.
    assert!(sio_connect(&app, &a, &alice).await.starts_with("40{"));
    assert!(app.ws(&plain(&a), &header).await.is_ok());
    // Admins attach to anyone's.
    for admin in ["s3cret", root.as_str()] {
        assert!(sio_connect(&app, &b, admin).await.starts_with("40{"));
        let header = [("X-Session-API-Key", admin)];
        assert!(app.ws(&plain(&a), &header).await.is_ok());
    }

    // Admins see and touch everyone's conversations.
    for admin in ["s3cret", root.as_str()] {
        let r = as_key(
            &mut app,
            admin,
            "GET",
            &format!("/api/conversations/{a}"),
            None,
        )
        .await;
        assert_eq!(r.body["conversation_id"], a.as_str());
        let r = as_key(
            &mut app,
            admin,
            "GET",
            &format!("/api/conversations/{b}/events"),
            None,
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let r = as_key(
        &mut app,
        &root,
        "POST",
        &format!("/api/conversations/{b}/stop"),
        None,
    )
    .await;
    assert_eq!(r.body["message"], "Conversation stopped successfully");
    let r = as_key(
        &mut app,
        "s3cret",
        "DELETE",
        &format!("/api/conversations/{a}"),
        None,
    )
    .await;
    assert_eq!(r.body, json!(true));

    // The operators' routes are for admins.
    let r = as_key(&mut app, &alice, "GET", "/api/status", None).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    for admin in ["s3cret", root.as_str()] {
        assert_eq!(
            as_key(&mut app, admin, "GET", "/api/status", None)
                .await
                .status,
            200
        );
    }
}

#[actix_web::test]
async fn settings_are_per_user() {
    let mut app = spawn_app_with(|s| s.session_api_key = Some("s3cret".into())).await;
    let alice = add_user_key(app.store.as_ref(), "alice", false).await;
    let bob = add_user_key(app.store.as_ref(), "bob", false).await;
    let saved = json!({"llm_model": "alice/model", "language": "fr"});
    let r = as_key(&mut app, &alice, "POST", "/api/settings", Some(&saved)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = as_key(&mut app, &alice, "GET", "/api/settings", None).await;
    assert_eq!(r.body["llm_model"], "alice/model");
    for other in [bob.as_str(), "s3cret"] {
        let r = as_key(&mut app, other, "GET", "/api/settings", None).await;
        assert_eq!(r.status, 404, "{:?}", r.body);
    }
    assert_eq!(
        app.store
            .settings("alice")
            .await
            .expect("settings")
            .unwrap()["language"],
        "fr"
    );
}

#[actix_web::test]
async fn with_user_keys_and_no_session_key_a_key_is_required() {
    let mut app = spawn_app().await;
    assert_eq!(app.key, None);
    // No key configured, none in the store: open, as before.
    let open = app.create(json!({})).await;
    assert_eq!(app.get("/api/conversations").await.status, 200);
    let alice = add_user_key(app.store.as_ref(), "alice", false).await;
    // From the next request on, a key is needed.
    for key in [None, Some("sbk_0000"), Some("wrong")] {
        app.key = key.map(str::to_string);
        let r = app.get("/api/conversations").await;
        assert_eq!(r.status, 401, "{key:?}");
        assert_eq!(r.body, json!({"detail": "Unauthorized"}));
        let r = app.post("/api/conversations", json!({})).await;
        assert_eq!(r.status, 401, "{key:?}");
    }
    let refused = r#"44{"message":"invalid_session_api_key"}"#;
    let mut ws = app.sio(&format!("conversation_id={open}")).await;
    ws.send("40").await;
    assert_eq!(ws.text().await, refused);
    assert_eq!(
        app.ws(&format!("/ws/conversations/{open}"), &[])
            .await
            .err(),
        Some(401)
    );
    // Alice gets in, and does not see what was made while the server was open.
    app.key = Some(alice.clone());
    assert_eq!(app.listed().await, 0);
    assert_eq!(app.info(&open).await, Value::Null);
    let mine = app.create(json!({})).await;
    assert_eq!(app.listed().await, 1);
    // Revoked: the next request with it is refused; with no key left the server is open again
    // to requests without a key.
    app.store.revoke_key("alice").await.expect("revoke");
    assert_eq!(app.get("/api/conversations").await.status, 401);
    let mut ws = app
        .sio(&format!("conversation_id={mine}&session_api_key={alice}"))
        .await;
    ws.send("40").await;
    assert_eq!(ws.text().await, refused);
    app.key = None;
    assert_eq!(app.listed().await, 2);
    assert_eq!(app.info(&mine).await["conversation_id"], mine.as_str());
}

/// Creates conversations as the app's current key until one is refused; the refusal and how
/// many were made before it (at most `most` tries).
async fn create_until_refused(app: &TestApp, most: usize) -> (Reply, usize) {
    for made in 0..most {
        let r = app.post("/api/conversations", json!({})).await;
        if r.status != 200 {
            return (r, made);
        }
    }
    panic!("{most} conversations were all created");
}

#[actix_web::test]
async fn a_user_at_its_running_limit_is_refused_and_nobody_else_is() {
    let mut app = spawn_app_with(|s| {
        s.session_api_key = Some("s3cret".into());
        s.limits.max_running_per_user = 2;
    })
    .await;
    let alice = add_user_key(app.store.as_ref(), "alice", false).await;
    let bob = add_user_key(app.store.as_ref(), "bob", false).await;
    app.key = Some(alice.clone());
    let (refused, made) = create_until_refused(&app, 10).await;
    assert_eq!(made, 2);
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(refused.body["msg_id"], "SWITCHBOARD$USER_LIMIT");
    let message = refused.body["message"].as_str().expect("message");
    assert!(message.contains("limits.max_running_per_user"), "{message}");
    assert!(message.contains("at most 2"), "{message}");
    // Nothing was made by the refused request.
    assert_eq!(app.listed().await, 2);
    // Others are not counted against her: bob, and the session key (no owner, no limit).
    app.key = Some(bob.clone());
    app.create(json!({})).await;
    app.key = Some("s3cret".into());
    for _ in 0..3 {
        app.create(json!({})).await;
    }

    // Her stopped conversation is not counted: once one has stopped she may start another.
    app.key = Some(alice.clone());
    let page = app.get("/api/conversations").await.body;
    let first = page["results"][0]["conversation_id"]
        .as_str()
        .expect("id")
        .to_string();
    let r = app
        .post(&format!("/api/conversations/{first}/stop"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = app.post("/api/conversations", json!({})).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.body["msg_id"], "SWITCHBOARD$USER_LIMIT");
        assert!(
            std::time::Instant::now() < deadline,
            "the stop was never counted"
        );
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // At the limit again: starting her stopped conversation is refused too, even by an admin
    // (counted per owner), and so is attaching to it (which would start it).
    let r = app
        .post(&format!("/api/conversations/{first}/start"), json!({}))
        .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    app.key = Some("s3cret".into());
    let r = app
        .post(&format!("/api/conversations/{first}/start"), json!({}))
        .await;
    assert_eq!(r.body["msg_id"], "SWITCHBOARD$USER_LIMIT", "{:?}", r.body);
    let reply = sio_connect(&app, &first, &alice).await;
    assert!(reply.contains("limits.max_running_per_user"), "{reply}");
    // Counted as a rejection by reason (no user label: names are unbounded).
    let (status, metrics) = app.get_text("/metrics").await;
    assert_eq!(status, 200, "{metrics}");
    assert!(
        metrics.contains(r#"switchboard_admissions_rejected_total{reason="user_limit"}"#),
        "{metrics}"
    );
    assert!(!metrics.contains("alice"));
}

#[actix_web::test]
async fn creation_rate_limits_count_per_user() {
    let mut app = spawn_app_with(|s| {
        s.session_api_key = Some("s3cret".into());
        s.limits.create_rate_per_sec = 1;
        s.limits.create_burst = 3;
    })
    .await;
    let alice = add_user_key(app.store.as_ref(), "alice", false).await;
    let bob = add_user_key(app.store.as_ref(), "bob", false).await;
    app.key = Some(alice.clone());
    let (refused, made) = create_until_refused(&app, 20).await;
    assert!(made >= 3, "{made}");
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(refused.body["msg_id"], "SWITCHBOARD$CREATE_RATE_LIMITED");
    // Same address, other users: buckets of their own.
    app.key = Some(bob.clone());
    app.create(json!({})).await;
    app.key = Some("s3cret".into());
    app.create(json!({})).await;
}

/// Reads until the socket is closed; the close reason's description.
async fn closed(ws: &mut WsClient) -> String {
    loop {
        match ws.read(10).await {
            WsRead::Text(_) => {}
            WsRead::Closed(reason) => {
                return reason.and_then(|r| r.description).unwrap_or_default();
            }
            WsRead::Timeout => panic!("the socket stayed open"),
        }
    }
}

#[actix_web::test]
async fn a_revoked_key_is_detached_from_its_sockets_at_the_next_heartbeat() {
    let mut app = spawn_app_with(|s| {
        s.session_api_key = Some("s3cret".into());
        s.socket.ping_interval_ms = 100;
    })
    .await;
    let alice = add_user_key(app.store.as_ref(), "alice", false).await;
    app.key = Some(alice.clone());
    let id = app.create(json!({})).await;
    let (mut sio, _) = app
        .sio_attached(&format!("conversation_id={id}&session_api_key={alice}"))
        .await;
    let path = format!("/ws/conversations/{id}");
    let mut plain = app
        .ws(&path, &[("X-Session-API-Key", alice.as_str())])
        .await
        .expect("upgrade");
    let mut admin = app
        .ws(&path, &[("X-Session-API-Key", "s3cret")])
        .await
        .expect("upgrade");
    app.store.revoke_key("alice").await.expect("revoke");
    assert_eq!(closed(&mut sio).await, "the key was revoked");
    assert_eq!(closed(&mut plain).await, "the key was revoked");
    // The session key's socket stays: its next action is accepted and comes back.
    admin
        .send(r#"{"action":"message","args":{"content":"still here"}}"#)
        .await;
    loop {
        match admin.read(10).await {
            WsRead::Text(t) if t.contains("still here") => break,
            WsRead::Text(_) => {}
            other => panic!("the admin's socket: {other:?}"),
        }
    }
}
