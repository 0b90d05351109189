//! The operators' pages: `GET /status` (HTML behind the cookie login) and the JSON it reads,
//! `GET /api/status` (behind the key); `GET /docs`, Swagger UI over `/openapi.json`.

use serde_json::{json, Value};

use crate::helpers::*;
use crate::security::call;

/// The row of `id` in an `/api/status` answer.
fn row<'a>(status: &'a Value, id: &str) -> Option<&'a Value> {
    status["conversations"]
        .as_array()
        .expect("conversations")
        .iter()
        .find(|c| c["conversation_id"] == id)
}

#[actix_web::test]
async fn the_status_json_counts_the_live_conversations() {
    let mut app = spawn_app_with(|s| s.session_api_key = Some("s3cret".into())).await;
    app.key = None;
    let r = app.get("/api/status").await;
    assert_eq!((r.status, r.body), (401, json!({"detail": "Unauthorized"})));
    app.key = Some("s3cret".into());

    let first = app.create(json!({})).await;
    let second = app.create(json!({})).await;
    app.wait_status(&first, "RUNNING", 10).await;
    app.wait_status(&second, "RUNNING", 10).await;
    let before = app.get("/api/status").await;
    assert_eq!(before.status, 200, "{}", before.body);
    let totals = &before.body["totals"];
    assert_eq!(totals["running"], 2, "{}", before.body);
    assert_eq!(totals["starting"], 0, "{}", before.body);
    assert_eq!(totals["clients"], 0, "{}", before.body);
    assert!(totals["store_bytes"].as_u64().expect("store_bytes") > 0);
    assert_eq!(before.body["version"], env!("CARGO_PKG_VERSION"));
    let row_first = row(&before.body, &first).expect("listed");
    assert_eq!(row_first["status"], "RUNNING");
    assert_eq!(row_first["title"], app.info(&first).await["title"]);
    assert_eq!(row_first["clients"], 0);
    assert!(row_first["age_seconds"].as_i64().is_some(), "{row_first}");
    assert!(row(&before.body, &second).is_some());
    let events_before = row_first["events"].as_u64().expect("events");

    // A message and its echo: the row's events and the appended counter move; a client shows.
    let r = app
        .post(
            &format!("/api/conversations/{first}/events"),
            json!({"action": "message", "args": {"content": "hi"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    app.wait_events(&first, 10, |e| {
        e.iter().filter(|e| e["action"] == "message").count() == 2
    })
    .await;
    let _ws = app
        .ws(
            &format!("/ws/conversations/{second}?session_api_key=s3cret"),
            &[],
        )
        .await
        .expect("attached");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let after = loop {
        let after = app.get("/api/status").await.body;
        if after["totals"]["clients"] == 1 {
            break after;
        }
        assert!(std::time::Instant::now() < deadline, "{after}");
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(row(&after, &second).expect("listed")["clients"], 1);
    let events_after = row(&after, &first).expect("listed")["events"]
        .as_u64()
        .expect("events");
    assert!(
        events_after >= events_before + 2,
        "{events_before} → {events_after}"
    );
    assert!(
        after["totals"]["events_appended"]
            .as_u64()
            .expect("counter")
            >= before.body["totals"]["events_appended"]
                .as_u64()
                .expect("counter")
                + 2
    );

    // Deleted: gone from the list.
    assert_eq!(
        app.send("DELETE", &format!("/api/conversations/{first}"), None)
            .await
            .status,
        200
    );
    let status = app.get("/api/status").await.body;
    assert!(row(&status, &first).is_none(), "{status}");
}

/// `path` asked for by a browser: without credentials, a redirect to `login`; with the key
/// (the app's is `s3cret`), the page (200).
async fn html_page_behind_login(app: &TestApp, path: &str, login: &str) -> RawReply {
    let html = ("Accept", "text/html");
    let r = call(app, "GET", path, &[html], "").await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location").as_deref(), Some(login));
    let r = call(
        app,
        "GET",
        path,
        &[html, ("X-Session-API-Key", "s3cret")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    r
}

#[actix_web::test]
async fn the_status_page_is_served_behind_the_login() {
    let app = spawn_app_with(|s| s.session_api_key = Some("s3cret".into())).await;
    let r = html_page_behind_login(&app, "/status", "/login?next=%2Fstatus").await;
    assert!(r
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("text/html")));
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("/api/status") && body.contains("/ws/conversations/"));
}

#[actix_web::test]
async fn the_api_docs_are_served_from_the_binary_behind_the_login() {
    let app = spawn_app_with(|s| s.session_api_key = Some("s3cret".into())).await;
    let r = html_page_behind_login(&app, "/docs", "/login?next=%2Fdocs").await;
    let page = String::from_utf8_lossy(&r.body).to_string();
    for needed in [
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css",
        "\"/openapi.json\"",
        "validatorUrl: null",
    ] {
        assert!(page.contains(needed), "{needed}: {page}");
    }
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );

    // The vendored files: no key needed (they hold nothing of the server's), gzip on request.
    for (path, content_type, start) in [
        (
            "/docs/swagger-ui-bundle.js",
            "text/javascript",
            "/*! For license information",
        ),
        ("/docs/swagger-ui.css", "text/css", ".swagger-ui"),
    ] {
        let plain = call(&app, "GET", path, &[], "").await;
        assert_eq!(plain.status, 200, "{path}");
        assert!(
            plain
                .header("content-type")
                .is_some_and(|ct| ct.starts_with(content_type)),
            "{path}: {:?}",
            plain.header("content-type")
        );
        assert!(
            String::from_utf8_lossy(&plain.body[..200.min(plain.body.len())]).contains(start),
            "{path}"
        );
        let gz = call(&app, "GET", path, &[("Accept-Encoding", "gzip")], "").await;
        assert_eq!(gz.status, 200, "{path}");
        assert_eq!(
            gz.header("content-encoding").as_deref(),
            Some("gzip"),
            "{path}"
        );
    }
    let r = call(
        &app,
        "POST",
        "/docs",
        &[("X-Session-API-Key", "s3cret")],
        "",
    )
    .await;
    assert_eq!(r.status, 405, "{r:?}");
}

#[actix_web::test]
async fn the_status_json_lists_a_bounded_number_of_the_most_recently_active() {
    use switchboard::ops::status::STATUS_ROWS;
    let app = spawn_app_with(|s| s.limits.create_rate_per_sec = 0).await;
    let mut ids = Vec::new();
    for _ in 0..=STATUS_ROWS {
        ids.push(app.create(json!({})).await);
    }
    // The first one created becomes the most recently active.
    let oldest = &ids[0];
    app.wait_status(oldest, "RUNNING", 10).await;
    let r = app
        .post(
            &format!("/api/conversations/{oldest}/events"),
            json!({"action": "message", "args": {"content": "hi"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    app.wait_events(oldest, 10, |e| {
        e.iter().filter(|e| e["action"] == "message").count() == 2
    })
    .await;
    let status = app.get("/api/status").await.body;
    let rows = status["conversations"].as_array().expect("conversations");
    assert_eq!(rows.len(), STATUS_ROWS);
    assert_eq!(status["totals"]["live"], STATUS_ROWS + 1);
    assert_eq!(rows[0]["conversation_id"], oldest.as_str(), "{}", rows[0]);
}
