//! Serving a built web app (`frontend.dir`): files from the directory only, `index.html` for
//! the app's own pages, cache headers, MIME types, gzip, and the API untouched.

use std::path::Path;

use serde_json::json;

use crate::helpers::*;

const INDEX: &str = "<!doctype html><html><body><div id=\"root\"></div></body></html>";

/// A small built app: index.html, a hashed asset, an icon, a hidden file, a symlink out.
fn build_app(dir: &Path, outside: &Path) {
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    std::fs::write(dir.join("index.html"), INDEX).unwrap();
    std::fs::write(
        dir.join("assets/app-Ab12Cd.js"),
        "console.log('hello');".repeat(200),
    )
    .unwrap();
    std::fs::write(dir.join("assets/app-Ab12Cd.css"), "body{margin:0}").unwrap();
    std::fs::write(
        dir.join("favicon.svg"),
        "<svg xmlns='http://www.w3.org/2000/svg'/>",
    )
    .unwrap();
    std::fs::write(dir.join(".env"), "SECRET=1").unwrap();
    std::fs::write(outside.join("secret.txt"), "top secret").unwrap();
    std::os::unix::fs::symlink(outside, dir.join("escape")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), dir.join("assets/linked.js")).unwrap();
}

/// GET with headers; the status, headers and raw body.
async fn fetch(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, awc::http::header::HeaderMap, Vec<u8>) {
    let mut req = app.client.get(format!("{}{}", app.url, path));
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let mut resp = req.send().await.expect("request");
    let body = resp.body().limit(16 << 20).await.expect("body").to_vec();
    (resp.status().as_u16(), resp.headers().clone(), body)
}

fn header<'a>(headers: &'a awc::http::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[actix_web::test]
async fn the_web_app_is_served_with_its_pages_caching_and_compression() {
    let site = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    build_app(site.path(), outside.path());
    let dir = site.path().to_path_buf();
    let app = spawn_app_with(|s| s.frontend.dir = dir).await;
    const HTML: (&str, &str) = ("accept", "text/html,application/xhtml+xml,*/*;q=0.8");

    // `/` and the app's own pages are index.html, never cached.
    for path in ["/", "/conversations/abc123", "/settings"] {
        let (status, headers, body) = fetch(&app, path, &[HTML]).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(String::from_utf8_lossy(&body), INDEX, "{path}");
        assert!(
            header(&headers, "content-type").starts_with("text/html"),
            "{path}"
        );
        assert_eq!(header(&headers, "cache-control"), "no-cache", "{path}");
    }
    // Hashed assets: a year, immutable, with their MIME types.
    let (status, headers, body) = fetch(&app, "/assets/app-Ab12Cd.js", &[]).await;
    assert_eq!(status, 200);
    assert!(body.starts_with(b"console.log"));
    assert_eq!(
        header(&headers, "cache-control"),
        "public, max-age=31536000, immutable"
    );
    assert_eq!(header(&headers, "content-type"), "text/javascript");
    let (_, headers, _) = fetch(&app, "/assets/app-Ab12Cd.css", &[]).await;
    assert!(header(&headers, "content-type").starts_with("text/css"));
    let (_, headers, _) = fetch(&app, "/favicon.svg", &[]).await;
    assert_eq!(header(&headers, "content-type"), "image/svg+xml");
    assert_eq!(header(&headers, "cache-control"), "no-cache");
    // gzip when accepted, identity otherwise.
    let (status, headers, gz) = fetch(
        &app,
        "/assets/app-Ab12Cd.js",
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-encoding"), "gzip");
    assert!(gz.len() < 1000, "compressed to {} bytes", gz.len());
    assert!(gz.starts_with(&[0x1f, 0x8b]), "a gzip stream");
    let (_, headers, _) = fetch(&app, "/assets/app-Ab12Cd.js", &[]).await;
    assert_eq!(header(&headers, "content-encoding"), "");

    // Nothing outside the directory, nothing hidden; unknown non-pages are the JSON 404.
    for path in [
        "/escape/secret.txt",
        "/assets/linked.js",
        "/.env",
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/assets/missing-X1.js",
    ] {
        // (A hidden or `..` segment is actix-files' 400, anything else not served a 404.)
        let (status, _, body) = fetch(&app, path, &[]).await;
        assert!(
            status == 404 || status == 400,
            "{path}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        assert!(!String::from_utf8_lossy(&body).contains("secret"), "{path}");
        let (_, _, body) = fetch(&app, path, &[HTML]).await;
        assert!(!String::from_utf8_lossy(&body).contains("secret"), "{path}");
    }
    let (_, _, body) = fetch(&app, "/assets/missing-X1.js", &[]).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        json!({"detail": "Not Found"})
    );

    // The API and the probes are untouched: JSON, not index.html, and not compressed.
    let r = app.get("/api/nope").await;
    assert_eq!((r.status, r.body), (404, json!({"detail": "Not Found"})));
    let (status, headers, body) = fetch(
        &app,
        "/api/conversations/unknown",
        &[HTML, ("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!((status, body.as_slice()), (200, b"null".as_slice()));
    assert_eq!(header(&headers, "content-encoding"), "");
    assert_eq!(app.get("/alive").await.status, 200);
    let id = app.create(json!({})).await;
    let (_ws, _) = app
        .sio_attached(&format!("conversation_id={id}&latest_event_id=-1"))
        .await;
}

#[actix_web::test]
async fn without_a_frontend_nothing_is_served_at_the_root() {
    let app = spawn_app().await;
    let (status, _, body) = fetch(&app, "/", &[("accept", "text/html")]).await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        json!({"detail": "Not Found"})
    );
}
