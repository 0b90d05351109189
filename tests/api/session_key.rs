//! The session key guards every /api route and nothing else.

use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn every_api_route_requires_the_key() {
    let mut app = spawn_app_with(|s| s.session_api_key = Some("s3cret".into())).await;
    let id = app.create(json!({})).await;
    let routes = [
        ("POST", "/api/conversations".to_string()),
        ("GET", "/api/conversations".to_string()),
        ("GET", format!("/api/conversations/{id}")),
        ("PATCH", format!("/api/conversations/{id}")),
        ("DELETE", format!("/api/conversations/{id}")),
        ("POST", format!("/api/conversations/{id}/start")),
        ("POST", format!("/api/conversations/{id}/stop")),
        ("GET", format!("/api/conversations/{id}/events")),
        ("POST", format!("/api/conversations/{id}/events")),
        ("GET", "/api/unknown".to_string()),
    ];
    for key in [None, Some("wrong"), Some("s3cre"), Some("s3cret2")] {
        app.key = key.map(str::to_string);
        for (method, path) in &routes {
            let r = app.send(method, path, Some(&json!({"title": "x"}))).await;
            assert_eq!(r.status, 401, "{method} {path} with {key:?}");
            assert_eq!(r.body, json!({"detail": "Unauthorized"}));
        }
    }
    app.key = None;
    assert_eq!(app.get("/alive").await.status, 200);
    assert_eq!(app.get("/health").await.status, 200);
    app.key = Some("s3cret".into());
    assert_eq!(
        app.get(&format!("/api/conversations/{id}")).await.body["conversation_id"],
        id
    );
    assert_eq!(app.listed().await, 1);
}
