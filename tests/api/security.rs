//! Closed to strangers by default: the Origin and Host checks on every route and both sockets,
//! the cookie login, bounded request bodies, HEAD, and fragmented socket messages.

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::helpers::*;

const EVIL: &str = "http://evil.example";

/// A request with exactly the headers given (no Content-Type unless listed).
fn request(method: &str, path: &str, host: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    text.into_bytes()
}

/// [`request`] to the server under its own `Host`, on a new connection.
pub(crate) async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> RawReply {
    app.raw(&request(method, path, app.authority(), headers, body))
        .await
}

fn assert_refused_origin(reply: &RawReply, what: &str) {
    assert_eq!(reply.status, 403, "{what}: {reply:?}");
    let detail = reply.json()["detail"].as_str().unwrap_or("").to_string();
    assert!(
        detail.contains("evil.example") && detail.contains("allowed_origins"),
        "{what}: {detail}"
    );
}

#[actix_web::test]
async fn a_cross_site_page_cannot_create_change_or_delete_anything() {
    let app = spawn_app().await;
    let id = app.create(json!({"initial_user_msg": "hello"})).await;
    let host = app.authority().to_string();
    app.wait_events(&id, 5, |e| e.len() >= 5).await;
    let title = app.info(&id).await["title"].clone();
    // The attack as a browser sends it: a `fetch` with an untyped body, so no Content-Type
    // and no CORS preflight; the body names its own id and first message.
    let attack = r#"{"conversation_id":"pwned","initial_user_msg":"id > pwned"}"#;
    let r = call(
        &app,
        "POST",
        "/api/conversations",
        &[("Origin", EVIL)],
        attack,
    )
    .await;
    assert_refused_origin(&r, "the attack");
    assert_eq!(app.info("pwned").await, Value::Null, "nothing was created");
    let action = r#"{"action":"message","args":{"content":"rm -rf ~"}}"#;
    let cases = [
        (
            "PATCH",
            format!("/api/conversations/{id}"),
            r#"{"title":"owned"}"#,
        ),
        ("DELETE", format!("/api/conversations/{id}"), ""),
        ("POST", format!("/api/conversations/{id}/stop"), ""),
        ("POST", format!("/api/conversations/{id}/start"), ""),
        ("POST", format!("/api/conversations/{id}/events"), action),
        ("PUT", format!("/api/conversations/{id}"), "{}"),
    ];
    for (method, path, body) in &cases {
        let r = call(&app, method, path, &[("Origin", EVIL)], body).await;
        assert_refused_origin(&r, &format!("{method} {path}"));
    }
    // Nothing changed: same title, still running, no new event.
    let info = app.info(&id).await;
    assert_eq!(info["title"], title, "{info}");
    assert_eq!(info["status"], "RUNNING", "{info}");
    let events = app.events(&id).await;
    assert!(
        !events.iter().any(|e| e.to_string().contains("rm -rf")),
        "{events:#?}"
    );
    // A refused origin that differs only in port or scheme from an allowed one is foreign too.
    let own_other_port = format!("http://{}", host.replace(':', ":1"));
    let r = call(
        &app,
        "PATCH",
        &format!("/api/conversations/{id}"),
        &[("Origin", &own_other_port)],
        "{}",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");

    // The server's own origin, a loopback dev server and no Origin at all are served.
    let own = format!("http://{host}");
    for origin in [
        Some(own.as_str()),
        Some("http://localhost:5173"),
        Some("http://[::1]:8080"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
        let title = format!("renamed by {origin:?}");
        let body = json!({ "title": title }).to_string();
        let r = call(
            &app,
            "PATCH",
            &format!("/api/conversations/{id}"),
            &headers,
            &body,
        )
        .await;
        assert_eq!(r.status, 200, "{origin:?}: {r:?}");
        assert_eq!(app.info(&id).await["title"], title);
    }
    let r = call(
        &app,
        "POST",
        "/api/conversations",
        &[("Origin", &own)],
        r#"{"conversation_id":"mine"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = call(
        &app,
        "DELETE",
        "/api/conversations/mine",
        &[("Origin", "http://localhost:3001")],
        "",
    )
    .await;
    assert_eq!((r.status, r.json()), (200, json!(true)));
    // Reads are not state changes: a foreign origin may GET (CORS keeps the answer from its
    // page), and gets no CORS grant.
    let r = call(&app, "GET", "/api/conversations", &[("Origin", EVIL)], "").await;
    assert_ne!(r.status, 403, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), None, "{r:?}");
}

#[actix_web::test]
async fn cors_answers_follow_the_same_list() {
    let app =
        spawn_app_with(|s| s.http.allowed_origins = vec!["https://app.example.com".into()]).await;
    let host = app.authority().to_string();
    let preflight = |origin: &str| {
        request(
            "OPTIONS",
            "/api/conversations",
            &host,
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type"),
            ],
            "",
        )
    };
    for origin in ["https://app.example.com", "http://localhost:3001"] {
        let r = app.raw(&preflight(origin)).await;
        assert_eq!(r.status, 200, "{origin}: {r:?}");
        assert_eq!(
            r.header("access-control-allow-origin").as_deref(),
            Some(origin),
            "{r:?}"
        );
        let r = call(
            &app,
            "POST",
            "/api/conversations",
            &[("Origin", origin), ("Content-Type", "application/json")],
            "{}",
        )
        .await;
        assert_eq!(r.status, 200, "{origin}: {r:?}");
        assert_eq!(
            r.header("access-control-allow-origin").as_deref(),
            Some(origin),
            "{r:?}"
        );
    }
    let r = app.raw(&preflight(EVIL)).await;
    assert_eq!(r.header("access-control-allow-origin"), None, "{r:?}");
    let r = call(
        &app,
        "POST",
        "/api/conversations",
        &[("Origin", EVIL)],
        "{}",
    )
    .await;
    assert_refused_origin(&r, "POST from a foreign origin with a configured list");
    assert_eq!(app.listed().await, 2);
}

#[actix_web::test]
async fn both_socket_routes_refuse_a_foreign_origin_before_the_upgrade() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    let sio = format!("/socket.io/?EIO=4&transport=websocket&conversation_id={id}");
    let plain = format!("/ws/conversations/{id}");
    for path in [&sio, &plain] {
        assert_eq!(
            app.ws(path, &[("Origin", EVIL)]).await.err(),
            Some(403),
            "{path}"
        );
        let own = app.url.clone();
        for origin in [
            own.as_str(),
            "http://localhost:3001",
            "https://127.0.0.1:8443",
        ] {
            assert!(
                app.ws(path, &[("Origin", origin)]).await.is_ok(),
                "{path} from {origin}"
            );
        }
        assert!(app.ws(path, &[]).await.is_ok(), "{path} without Origin");
    }
    // The refusal is a clear JSON body, before any upgrade.
    let r = call(
        &app,
        "GET",
        &plain,
        &[
            ("Origin", EVIL),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        "",
    )
    .await;
    assert_refused_origin(&r, "plain socket upgrade");
    assert_eq!(r.header("upgrade"), None);
}

#[actix_web::test]
async fn a_foreign_host_is_refused_and_the_lists_can_be_opened() {
    let app = spawn_app().await;
    for host in [
        "evil.example",
        "evil.example:3000",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
    ] {
        for (method, path) in [
            ("GET", "/alive"),
            ("GET", "/api/conversations"),
            ("POST", "/api/conversations"),
        ] {
            let r = app.raw(&request(method, path, host, &[], "")).await;
            assert_eq!(r.status, 400, "{host} {method} {path}: {r:?}");
            let detail = r.json()["detail"].as_str().unwrap_or("").to_string();
            assert!(detail.contains("allowed_hosts"), "{detail}");
        }
    }
    assert_eq!(
        app.listed().await,
        0,
        "nothing was created through a foreign Host"
    );
    let port = app.authority().rsplit(':').next().unwrap().to_string();
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "LOCALHOST".to_string(),
        "192.168.1.20:3000".to_string(),
    ] {
        let r = call(&app, "GET", "/alive", &[], "").await;
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }
    let open = spawn_app_with(|s| {
        s.http.allowed_hosts = vec!["*".into()];
        s.http.allowed_origins = vec!["*".into()];
    })
    .await;
    let r = open
        .raw(&request(
            "POST",
            "/api/conversations",
            "evil.example",
            &[("Origin", EVIL)],
            "{}",
        ))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let named = spawn_app_with(|s| {
        s.http.allowed_hosts = vec!["*.lan".into(), "switchboard.example.com".into()]
    })
    .await;
    for (host, status) in [
        ("mybox.lan:3000", 200),
        ("switchboard.example.com", 200),
        ("evil.example", 400),
    ] {
        assert_eq!(
            named
                .raw(&request("GET", "/alive", host, &[], ""))
                .await
                .status,
            status,
            "{host}"
        );
    }
}

/// The cookie a login answer sets, as `name=value`.
fn login_cookie(reply: &RawReply) -> String {
    let set = reply
        .header("set-cookie")
        .unwrap_or_else(|| panic!("no cookie: {reply:?}"));
    assert!(set.contains("; HttpOnly"), "{set}");
    assert!(set.contains("; SameSite=Strict"), "{set}");
    assert!(set.contains("; Path=/"), "{set}");
    set.split(';').next().unwrap().to_string()
}

#[actix_web::test]
async fn a_browser_logs_in_with_the_key_once_and_then_carries_a_cookie() {
    let mut app = spawn_app_with(|s| s.session_api_key = Some("s3cret".into())).await;
    let id = app.create(json!({})).await;
    let host = app.authority().to_string();
    let html = [("Accept", "text/html,application/xhtml+xml")];

    // `/?session_api_key=K`: a cookie and the same URL without the key.
    let r = call(&app, "GET", "/?session_api_key=s3cret&x=1", &[], "").await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location").as_deref(), Some("/?x=1"));
    let cookie = login_cookie(&r);
    assert!(!r.header("location").unwrap().contains("s3cret"));
    // Any HTML page does the same.
    let r = call(
        &app,
        "GET",
        &format!("/conversations/{id}?session_api_key=s3cret"),
        &html,
        "",
    )
    .await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some(format!("/conversations/{id}")));
    assert_eq!(login_cookie(&r), cookie);

    // The cookie authenticates the API …
    app.key = None;
    let r = call(
        &app,
        "GET",
        "/api/conversations",
        &[("Cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = call(
        &app,
        "POST",
        "/api/conversations",
        &[("Cookie", &cookie), ("Origin", &format!("http://{host}"))],
        "{}",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    for wrong in [
        "switchboard-session-1=s3cret".to_string(),
        format!("{}x", cookie),
        String::new(),
    ] {
        let r = call(&app, "GET", "/api/conversations", &[("Cookie", &wrong)], "").await;
        assert_eq!(r.status, 401, "{wrong}: {r:?}");
    }
    // … and both sockets, from the server's own page …
    let own = app.url.clone();
    let sio = format!("/socket.io/?EIO=4&transport=websocket&conversation_id={id}");
    let mut ws = app
        .ws(&sio, &[("Cookie", &cookie), ("Origin", &own)])
        .await
        .expect("upgrade");
    assert!(ws.text().await.starts_with("0{"));
    ws.send("40").await;
    assert!(
        ws.text().await.starts_with("40{"),
        "CONNECT with the cookie is accepted"
    );
    let mut plain = app
        .ws(
            &format!("/ws/conversations/{id}"),
            &[("Cookie", &cookie), ("Origin", &own)],
        )
        .await
        .expect("upgrade");
    assert!(matches!(plain.read(5).await, WsRead::Text(_)));
    // … but never from a foreign page, cookie or not.
    assert_eq!(
        app.ws(&sio, &[("Cookie", &cookie), ("Origin", EVIL)])
            .await
            .err(),
        Some(403)
    );
    assert_eq!(
        app.ws(
            &format!("/ws/conversations/{id}"),
            &[("Cookie", &cookie), ("Origin", EVIL)]
        )
        .await
        .err(),
        Some(403)
    );
    // Header and query keep working for other clients.
    assert!(app
        .ws(
            &format!("/ws/conversations/{id}?session_api_key=s3cret"),
            &[]
        )
        .await
        .is_ok());
    app.key = Some("s3cret".into());
    assert_eq!(app.get("/api/conversations").await.status, 200);

    // A wrong key is the login form again, with no cookie.
    let r = call(&app, "GET", "/?session_api_key=nope", &[], "").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("set-cookie"), None);
    assert!(String::from_utf8_lossy(&r.body).contains("<form"), "{r:?}");
    // A page without credentials goes to the login form, which comes back to it.
    let r = call(&app, "GET", &format!("/conversations/{id}"), &html, "").await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("/login?next=%2Fconversations%2F{id}"))
    );
    let r = call(&app, "GET", "/login?next=/settings", &html, "").await;
    assert_eq!(r.status, 200, "{r:?}");
    let page = String::from_utf8_lossy(&r.body).to_string();
    assert!(
        page.contains(r#"name="session_api_key""#) && page.contains(r#"value="/settings""#),
        "{page}"
    );
    let form = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Origin", own.as_str()),
    ];
    let r = call(
        &app,
        "POST",
        "/login",
        &form,
        "session_api_key=s3cret&next=%2Fsettings",
    )
    .await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location").as_deref(), Some("/settings"));
    assert_eq!(login_cookie(&r), cookie);
    let r = call(
        &app,
        "POST",
        "/login",
        &form,
        "session_api_key=nope&next=//evil.example",
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("set-cookie"), None);
    assert!(String::from_utf8_lossy(&r.body).contains(r#"value="/""#));
    // With the cookie the form sends the browser straight on.
    let r = call(
        &app,
        "GET",
        "/login?next=%2Fsettings",
        &[("Cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(
        (r.status, r.header("location").as_deref()),
        (303, Some("/settings"))
    );
    // The form posted from a foreign page is refused like any state change.
    let r = call(
        &app,
        "POST",
        "/login",
        &[("Origin", EVIL)],
        "session_api_key=s3cret",
    )
    .await;
    assert_refused_origin(&r, "POST /login");
}

#[actix_web::test]
async fn without_a_key_pages_are_not_redirected() {
    let app = spawn_app().await;
    let r = call(
        &app,
        "GET",
        "/?session_api_key=x",
        &[("Accept", "text/html")],
        "",
    )
    .await;
    assert_ne!(r.status, 303, "{r:?}");
    assert_eq!(r.header("set-cookie"), None);
    let r = call(&app, "GET", "/login?next=/x", &[], "").await;
    assert_eq!(
        (r.status, r.header("location").as_deref()),
        (303, Some("/x"))
    );
}

#[actix_web::test]
async fn head_works_wherever_get_does() {
    let app = spawn_app().await;
    let id = app.create(json!({"initial_user_msg": "hi"})).await;
    let paths = [
        "/alive".to_string(),
        "/health".to_string(),
        "/openapi.json".to_string(),
        "/api/conversations".to_string(),
        format!("/api/conversations/{id}"),
        format!("/api/conversations/{id}/events"),
    ];
    for path in &paths {
        let get = call(&app, "GET", path, &[], "").await;
        assert_eq!(get.status, 200, "GET {path}");
        // The answer to HEAD has the GET's head and no body: the next answer on the same
        // connection starts right after it.
        let mut stream = app.connect().await;
        let head = format!("HEAD {path} HTTP/1.1\r\nHost: {}\r\n\r\n", app.authority());
        let alive = format!("GET /alive HTTP/1.1\r\nHost: {}\r\n\r\n", app.authority());
        stream
            .write_all(format!("{head}{alive}").as_bytes())
            .await
            .unwrap();
        let first = read_reply_head_only(&mut stream).await;
        assert!(first.starts_with("http/1.1 200"), "HEAD {path}: {first}");
        assert!(
            first.contains(&format!("content-length: {}", get.body.len())),
            "HEAD {path} names the GET's length: {first}"
        );
        let second = read_reply(&mut stream, 10).await.expect("the next answer");
        assert_eq!(
            (second.status, second.json()),
            (200, json!({"status": "ok"})),
            "after HEAD {path}"
        );
    }
    let r = app.send("HEAD", "/api/nothing-here", None).await;
    assert_eq!(r.status, 404);
}

/// Reads exactly one answer head (up to the blank line), leaving what follows unread.
async fn read_reply_head_only(stream: &mut actix_web::rt::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = actix_web::rt::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read(&mut byte),
        )
        .await
        .expect("in time")
        .expect("read");
        assert_eq!(n, 1, "closed after {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

#[actix_web::test]
async fn fragmented_messages_are_reassembled_on_both_sockets() {
    let app = spawn_app_with(|s| s.socket.max_frame_bytes = 4096).await;
    let id = app.create(json!({})).await;
    app.wait_events(&id, 5, |e| e.len() >= 2).await;
    let (mut sio, _) = app
        .sio_attached(&format!("conversation_id={id}&latest_event_id=-1"))
        .await;
    let long = "x".repeat(1500);
    let packet = json!(["oh_user_action", {"action": "message", "args": {"content": format!("sio {long}")}}]);
    sio.send_fragmented(&format!("42{packet}"), 3).await;
    let echo = sio
        .oh_events_until(|e| {
            e["source"] == "agent" && e["message"].as_str().is_some_and(|m| m.contains("sio x"))
        })
        .await;
    assert!(!echo.is_empty());

    let mut plain = app
        .ws(
            &format!("/ws/conversations/{id}?latest_event_id=1000000"),
            &[],
        )
        .await
        .expect("upgrade");
    let action = json!({"action": "message", "args": {"content": format!("plain {long}")}});
    plain.send_fragmented(&action.to_string(), 4).await;
    let events = app
        .wait_events(&id, 10, |e| {
            e.iter()
                .any(|e| e["source"] == "agent" && e.to_string().contains("plain x"))
        })
        .await;
    assert!(events
        .iter()
        .any(|e| e["source"] == "user" && e.to_string().contains("plain x")));
    // Fragments adding up to more than max_frame_bytes close the socket with 1009.
    plain.send_fragmented(&"y".repeat(6000), 3).await;
    loop {
        match plain.read(10).await {
            WsRead::Closed(Some(reason)) => {
                assert_eq!(reason.code, awc::ws::CloseCode::Size, "{reason:?}");
                break;
            }
            WsRead::Text(_) => continue,
            other => panic!("expected a close for the oversized message, got {other:?}"),
        }
    }
}

#[actix_web::test]
async fn bodies_are_bounded_in_size_time_and_memory() {
    let app = spawn_app_with(|s| {
        s.limits.max_body_bytes = 4096;
        s.limits.max_pending_body_bytes = 4096;
        s.limits.body_timeout_secs = 1;
    })
    .await;
    let host = app.authority().to_string();
    // A declared length over the limit: 413 without sending a byte of the body, also when the
    // client asks whether to go on.
    for expect in [false, true] {
        let mut stream = app.connect().await;
        let extra = if expect {
            "Expect: 100-continue\r\n"
        } else {
            ""
        };
        let head = format!(
            "POST /api/conversations HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let r = read_reply(&mut stream, 10)
            .await
            .expect("an answer before the body");
        assert_eq!(r.status, 413, "{r:?}");
        assert!(
            r.json()["detail"].as_str().unwrap().contains("4096"),
            "{r:?}"
        );
    }
    // A body that stops arriving: 408 at the deadline, the connection closed.
    let mut slow = app.connect().await;
    let head =
        format!("POST /api/conversations HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4000\r\n\r\n");
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&[b' '; 3000]).await.unwrap();
    // Meanwhile the budget is nearly used up: another body does not fit and gets 503 at once.
    actix_web::rt::time::sleep(std::time::Duration::from_millis(200)).await;
    let r = call(
        &app,
        "POST",
        "/api/conversations",
        &[],
        &format!("{{\"title\":\"{}\"}}", "t".repeat(2000)),
    )
    .await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("max_pending_body_bytes"));
    let r = read_reply(&mut slow, 30).await.expect("408");
    assert_eq!(r.status, 408, "{r:?}");
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("body_timeout_secs"));
    // Once it is cut, its bytes are back in the budget.
    let r = call(
        &app,
        "POST",
        "/api/conversations",
        &[],
        &format!(
            "{{\"conversation_id\":\"after\",\"initial_user_msg\":\"{}\"}}",
            "t".repeat(2000)
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(app.listed().await, 1);
}

#[actix_web::test]
async fn the_web_app_is_behind_the_login_when_a_key_is_set() {
    let site = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(site.path().join("assets")).unwrap();
    std::fs::write(site.path().join("index.html"), "<html>the app</html>").unwrap();
    std::fs::write(site.path().join("assets/app-1.js"), "console.log(1)").unwrap();
    let dir = site.path().to_path_buf();
    let app = spawn_app_with(|s| {
        s.session_api_key = Some("k3y".into());
        s.frontend.dir = dir;
    })
    .await;
    let html = ("Accept", "text/html");
    let r = call(&app, "GET", "/", &[html], "").await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location").as_deref(), Some("/login?next=%2F"));
    let r = call(&app, "GET", "/?session_api_key=k3y", &[html], "").await;
    assert_eq!(
        (r.status, r.header("location").as_deref()),
        (303, Some("/"))
    );
    let cookie = login_cookie(&r);
    for path in ["/", "/conversations/abc", "/settings"] {
        let r = call(&app, "GET", path, &[html, ("Cookie", &cookie)], "").await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.body, b"<html>the app</html>", "{path}");
    }
    // The app's code is no secret: assets load without credentials.
    let r = call(&app, "GET", "/assets/app-1.js", &[], "").await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, b"console.log(1)".as_slice())
    );
}
