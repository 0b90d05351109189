//! Every route's success and error answers.

use serde_json::{json, Value};

use crate::helpers::*;

#[actix_web::test]
async fn probes_and_unknown_paths() {
    let app = spawn_app().await;
    let r = app.get("/alive").await;
    assert_eq!((r.status, r.body.clone()), (200, json!({"status": "ok"})));
    let r = app.get("/health").await;
    assert_eq!((r.status, r.body.clone()), (200, json!("OK")));
    let r = app.get("/nope").await;
    assert_eq!(
        (r.status, r.body.clone()),
        (404, json!({"detail": "Not Found"}))
    );
    let r = app.get("/api/nope").await;
    assert_eq!(
        (r.status, r.body.clone()),
        (404, json!({"detail": "Not Found"}))
    );
    let r = app.send("PUT", "/api/conversations", None).await;
    assert_eq!(
        (r.status, r.body.clone()),
        (405, json!({"detail": "Method Not Allowed"}))
    );
    assert_eq!(r.headers.get("allow").unwrap(), "GET, POST");
    let r = app.send("DELETE", "/alive", None).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers.get("allow").unwrap(), "GET");
    for path in [
        "/socket.io/?EIO=4&transport=websocket",
        "/ws/conversations/x",
    ] {
        let r = app.send("POST", path, None).await;
        assert_eq!(
            (r.status, r.body.clone()),
            (405, json!({"detail": "Method Not Allowed"})),
            "{path}"
        );
        assert_eq!(r.headers.get("allow").unwrap(), "GET");
    }
}

#[actix_web::test]
async fn get_unknown_is_null_and_bad_ids_are_422() {
    let app = spawn_app().await;
    let r = app.get("/api/conversations/unknown").await;
    assert_eq!((r.status, r.body.clone()), (200, Value::Null));
    for path in [
        "/api/conversations/a.b",
        "/api/conversations/a.b/events",
        "/api/conversations/%2e%2e/stop",
    ] {
        let method = if path.ends_with("stop") {
            "POST"
        } else {
            "GET"
        };
        let r = app.send(method, path, None).await;
        assert_eq!(r.status, 422, "{path}: {}", r.body);
        assert_eq!(
            r.body["detail"][0]["loc"],
            json!(["path", "conversation_id"])
        );
    }
}

#[actix_web::test]
async fn listing_pages_newest_first() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(
            app.create(json!({"conversation_id": format!("c{i:02}")}))
                .await,
        );
    }
    let mut seen = Vec::new();
    let mut page_id: Option<String> = None;
    loop {
        let path = match &page_id {
            Some(p) => format!("/api/conversations?limit=10&page_id={p}"),
            None => "/api/conversations?limit=10".to_string(),
        };
        let r = app.get(&path).await;
        assert_eq!(r.status, 200);
        let results = r.body["results"].as_array().unwrap();
        assert!(results.len() <= 10);
        seen.extend(
            results
                .iter()
                .map(|c| c["conversation_id"].as_str().unwrap().to_string()),
        );
        match r.body["next_page_id"].as_str() {
            Some(p) => page_id = Some(p.to_string()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, every conversation exactly once");
    for bad in ["limit=0", "limit=101", "limit=x", "page_id=!!!"] {
        let r = app.get(&format!("/api/conversations?{bad}")).await;
        assert_eq!(r.status, 400, "{bad}");
    }
}

#[actix_web::test]
async fn patch_title() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    let path = format!("/api/conversations/{id}");
    let r = app
        .send("PATCH", &path, Some(&json!({"title": "Renamed"})))
        .await;
    assert_eq!((r.status, r.body.clone()), (200, json!(true)));
    assert_eq!(app.info(&id).await["title"], "Renamed");
    for (body, kind) in [
        (json!({"title": ""}), "string_too_short"),
        (json!({"title": "x".repeat(201)}), "string_too_long"),
        (json!({"title": 5}), "string_type"),
        (json!({}), "missing"),
        (json!({"title": "ok", "color": "red"}), "extra_forbidden"),
    ] {
        let r = app.send("PATCH", &path, Some(&body)).await;
        assert_eq!(r.status, 422, "{body}");
        assert_eq!(r.body["detail"][0]["type"], kind);
    }
    assert_eq!(app.info(&id).await["title"], "Renamed");
    // Every error of the body at once, as pydantic reports them.
    let r = app
        .send("PATCH", &path, Some(&json!({"title": 5, "x": 1})))
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.body["detail"],
        json!([
            {"type":"string_type","loc":["body","title"],"msg":"Input should be a valid string","input":5},
            {"type":"extra_forbidden","loc":["body","x"],"msg":"Extra inputs are not permitted","input":1}
        ])
    );
    // Stopped conversations can be renamed too.
    app.post(&format!("{path}/stop"), json!({})).await;
    let r = app
        .send("PATCH", &path, Some(&json!({"title": "Later"})))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(app.info(&id).await["title"], "Later");
    let r = app
        .send(
            "PATCH",
            "/api/conversations/nope",
            Some(&json!({"title": "x"})),
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.body,
        json!({"status":"error","message":"Conversation not found","msg_id":"CONVERSATION$NOT_FOUND"})
    );
}

#[actix_web::test]
async fn delete_removes_only_that_conversation() {
    let app = spawn_app().await;
    let keep = app.create(json!({"initial_user_msg": "keep"})).await;
    let gone = app.create(json!({"initial_user_msg": "gone"})).await;
    app.wait_events(&gone, 5, |e| e.len() >= 5).await;
    let r = app
        .send("DELETE", &format!("/api/conversations/{gone}"), None)
        .await;
    assert_eq!((r.status, r.body.clone()), (200, json!(true)));
    assert_eq!(app.info(&gone).await, Value::Null);
    assert_eq!(
        app.get(&format!("/api/conversations/{gone}/events"))
            .await
            .status,
        404
    );
    let r = app
        .send("DELETE", &format!("/api/conversations/{gone}"), None)
        .await;
    assert_eq!(r.body, json!(false));
    assert!(app.info(&keep).await.is_object());
    assert!(app.events(&keep).await.len() >= 2);
    // A deleted id can be created afresh.
    let r = app
        .post("/api/conversations", json!({"conversation_id": gone}))
        .await;
    assert_eq!(r.status, 200);
    let events = app.wait_events(&gone, 5, |e| e.len() >= 2).await;
    assert_eq!(events[0]["extras"]["agent_state"], "loading");
}

#[actix_web::test]
async fn start_and_stop() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    let base = format!("/api/conversations/{id}");
    let r = app.post(&format!("{base}/stop"), json!({})).await;
    assert_eq!(
        r.body,
        json!({"status":"ok","conversation_id":id,"message":"Conversation stopped successfully","conversation_status":"STOPPED"})
    );
    let r = app.post(&format!("{base}/stop"), json!({})).await;
    assert_eq!(r.body["message"], "Conversation was not running");
    assert_eq!(app.info(&id).await["url"], Value::Null);

    let r = app
        .send_raw(
            "POST",
            &format!("{base}/start"),
            Some("application/json"),
            b"null".to_vec(),
        )
        .await;
    assert_eq!(r.status, 200, "a null body means no options: {}", r.body);
    app.post(&format!("{base}/stop"), json!({})).await;
    let r = app
        .post(
            &format!("{base}/start"),
            json!({"providers_set": ["github"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "ok");
    app.wait_status(&id, "RUNNING", 5).await;
    let r = app.post(&format!("{base}/start"), json!({})).await;
    assert_eq!(r.body["conversation_status"], "RUNNING");

    let r = app
        .post(
            &format!("{base}/start"),
            json!({"providers_set": ["github", "svn", null]}),
        )
        .await;
    assert_eq!(r.status, 422);
    let expected = "'github', 'gitlab', 'bitbucket' or 'enterprise_sso'";
    let enum_error = |i: usize, input: Value| {
        json!({"type": "enum", "loc": ["body", "providers_set", i],
               "msg": format!("Input should be {expected}"), "input": input,
               "ctx": {"expected": expected}})
    };
    assert_eq!(
        r.body,
        json!({"detail": [enum_error(1, json!("svn")), enum_error(2, Value::Null)]})
    );
    let r = app
        .post(&format!("{base}/start"), json!({"providers_set": "github"}))
        .await;
    assert_eq!(r.status, 422);

    let r = app.post("/api/conversations/nope/start", json!({})).await;
    assert_eq!(
        (r.status, r.body.clone()),
        (404, json!({"status":"error","conversation_id":"nope"}))
    );
    let r = app.post("/api/conversations/nope/stop", json!({})).await;
    assert_eq!(r.status, 404);
    assert_eq!(app.listed().await, 1);
}

#[actix_web::test]
async fn events_query_and_errors() {
    let app = spawn_app().await;
    let id = app.create(json!({"initial_user_msg": "hi"})).await;
    app.wait_events(&id, 5, |e| e.len() >= 5).await;
    let base = format!("/api/conversations/{id}/events");
    let r = app.get(&format!("{base}?limit=2")).await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 2);
    assert_eq!(r.body["has_more"], true);
    let r = app.get(&format!("{base}?start_id=3")).await;
    assert_eq!(page_ids(&r.body), vec![3, 4]);
    assert_eq!(r.body["has_more"], false);
    let r = app.get(&format!("{base}?start_id=1&end_id=2")).await;
    assert_eq!(page_ids(&r.body), vec![1, 2]);
    let r = app.get(&format!("{base}?reverse=true&limit=2")).await;
    assert_eq!(page_ids(&r.body), vec![4, 3]);
    for bad in ["limit=0", "limit=101", "limit=abc"] {
        let r = app.get(&format!("{base}?{bad}")).await;
        assert_eq!(
            (r.status, r.body.clone()),
            (400, json!({"detail": "Invalid limit"})),
            "{bad}"
        );
    }
    let r = app.get(&format!("{base}?start_id=-1")).await;
    assert_eq!(r.status, 422);
    let r = app.get(&format!("{base}?reverse=maybe")).await;
    assert_eq!(r.status, 422);
    let r = app.get("/api/conversations/nope/events").await;
    assert_eq!(
        (r.status, r.body.clone()),
        (404, json!({"detail": "Conversation nope not found"}))
    );
}

#[actix_web::test]
async fn posting_a_user_action_is_stored_and_echoed() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    app.wait_events(&id, 5, |e| e.len() >= 2).await;
    let path = format!("/api/conversations/{id}/events");
    let r = app
        .post(&path, json!({"id": 999, "timestamp": "x", "action": "message", "args": {"content": "ping", "image_urls": [], "file_urls": []}}))
        .await;
    assert_eq!((r.status, r.body.clone()), (200, json!({"success": true})));
    let events = app.wait_events(&id, 5, |e| e.len() >= 6).await;
    assert_dense(&events);
    assert_eq!(events[2]["source"], "user");
    assert_eq!(events[2]["args"]["content"], "ping");
    assert_eq!(events[4]["source"], "agent");
    assert_eq!(events[4]["args"]["content"], "ping");

    for bad in [
        json!({"args": {}}),
        json!({"action": "message"}),
        json!({"action": "message", "args": {"content": 1}}),
        json!({"action": "message", "args": {"content": "x", "image_urls": [1]}}),
        json!({"action": "Not A Name", "args": {}}),
        json!([]),
    ] {
        let r = app.post(&path, bad.clone()).await;
        assert_eq!(r.status, 422, "{bad}: {}", r.body);
    }
    // A refused action is a pydantic value error around switchboard's own sentence.
    let bad = json!({"action": "message", "args": {"content": "x", "image_urls": [1]}});
    let why = "`args.image_urls` must be a list of strings";
    let r = app.post(&path, bad.clone()).await;
    assert_eq!(
        (r.status, r.body),
        (
            422,
            json!({"detail": [{"type": "value_error", "loc": ["body"],
                "msg": format!("Value error, {why}"), "input": bad, "ctx": {"error": why}}]})
        )
    );
    assert_eq!(
        app.events(&id).await.len(),
        events.len(),
        "a bad action changed the log"
    );
    let r = app
        .post(
            "/api/conversations/nope/events",
            json!({"action": "message", "args": {"content": "x"}}),
        )
        .await;
    assert_eq!(r.status, 404);
}

#[actix_web::test]
async fn posting_to_a_stopped_conversation_resumes_it() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    app.post(&format!("/api/conversations/{id}/stop"), json!({}))
        .await;
    let r = app
        .post(
            &format!("/api/conversations/{id}/events"),
            json!({"action": "message", "args": {"content": "wake"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let events = app
        .wait_events(&id, 5, |e| e.iter().any(|ev| ev["source"] == "agent"))
        .await;
    assert_dense(&events);
    let reply = events.iter().find(|e| e["source"] == "agent").unwrap();
    assert_eq!(reply["args"]["content"], "wake");
}
