//! Every row of the compat page's validation table, and more: exact 422 bodies, nothing created.

use serde_json::{json, Value};

use crate::helpers::*;

/// Posts `body` as JSON text and returns the 422 `detail` list, checking nothing was created.
async fn rejected(app: &TestApp, content_type: Option<&str>, body: &str) -> Vec<Value> {
    let r = app
        .send_raw(
            "POST",
            "/api/conversations",
            content_type,
            body.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(r.status, 422, "body {body}: {}", r.body);
    assert_eq!(app.listed().await, 0, "a rejected body created something");
    r.body["detail"].as_array().expect("detail list").clone()
}

fn entry(detail: &[Value], loc: Value) -> &Value {
    detail
        .iter()
        .find(|d| d["loc"] == loc)
        .unwrap_or_else(|| panic!("no error at {loc}: {detail:#?}"))
}

const JSON: Option<&str> = Some("application/json");

#[actix_web::test]
async fn missing_and_null_bodies() {
    let app = spawn_app().await;
    for body in ["", "null", "  "] {
        let d = rejected(&app, JSON, body).await;
        assert_eq!(
            d,
            vec![json!({"type":"missing","loc":["body"],"msg":"Field required","input":null})]
        );
    }
}

#[actix_web::test]
async fn broken_json_reports_the_offset() {
    let app = spawn_app().await;
    let d = rejected(&app, JSON, r#"{"initial_user_msg": "#).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["type"], "json_invalid");
    assert_eq!(d[0]["loc"], json!(["body", 21]));
    assert_eq!(d[0]["msg"], "JSON decode error");
    assert_eq!(d[0]["input"], json!({}));
    assert!(d[0]["ctx"]["error"].is_string());
}

#[actix_web::test]
async fn non_objects_and_text_plain() {
    let app = spawn_app().await;
    for (ct, body) in [
        (JSON, "[]"),
        (JSON, "\"hello\""),
        (JSON, "3"),
        (Some("text/plain"), "{}"),
    ] {
        let d = rejected(&app, ct, body).await;
        assert_eq!(d.len(), 1, "{body}");
        assert_eq!(d[0]["type"], "model_attributes_type");
        assert_eq!(d[0]["loc"], json!(["body"]));
        assert_eq!(
            d[0]["msg"],
            "Input should be a valid dictionary or object to extract fields from"
        );
    }
}

#[actix_web::test]
async fn no_content_type_is_parsed_as_json() {
    let app = spawn_app().await;
    let r = app
        .send_raw("POST", "/api/conversations", None, b"{}".to_vec())
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[actix_web::test]
async fn the_compat_table() {
    let app = spawn_app().await;
    let cases: Vec<(Value, &str, Value, &str)> = vec![
        (
            json!({"foo":1}),
            "extra_forbidden",
            json!(["body", "foo"]),
            "Extra inputs are not permitted",
        ),
        (
            json!({"initial_user_msg":123}),
            "string_type",
            json!(["body", "initial_user_msg"]),
            "Input should be a valid string",
        ),
        (
            json!({"image_urls":"x"}),
            "list_type",
            json!(["body", "image_urls"]),
            "Input should be a valid list",
        ),
        (
            json!({"image_urls":[1,"a"]}),
            "string_type",
            json!(["body", "image_urls", 0]),
            "Input should be a valid string",
        ),
        (
            json!({"git_provider":"svn"}),
            "enum",
            json!(["body", "git_provider"]),
            "Input should be 'github', 'gitlab', 'bitbucket' or 'enterprise_sso'",
        ),
        (
            json!({"suggested_task":{"git_provider":"github","task_type":"OPEN_ISSUE","repo":"a/b","title":"t","issue_number":"x"}}),
            "int_parsing",
            json!(["body", "suggested_task", "issue_number"]),
            "Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            json!({"mcp_config":{"foo":[]}}),
            "extra_forbidden",
            json!(["body", "mcp_config", "foo"]),
            "Extra inputs are not permitted",
        ),
        (
            json!({"mcp_config":{"sse_servers":[{"url":"ftp://x"}]}}),
            "value_error",
            json!(["body", "mcp_config", "sse_servers", 0, "url"]),
            "Value error, URL scheme must be http, https, ws, or wss",
        ),
        (
            json!({"mcp_config":{"stdio_servers":[{"name":"x"}]}}),
            "missing",
            json!(["body", "mcp_config", "stdio_servers", 0, "command"]),
            "Field required",
        ),
        (
            json!({"create_microagent":{}}),
            "missing",
            json!(["body", "create_microagent", "repo"]),
            "Field required",
        ),
        (
            json!({"selected_branch":["main"]}),
            "string_type",
            json!(["body", "selected_branch"]),
            "Input should be a valid string",
        ),
        (
            json!({"repository":5}),
            "string_type",
            json!(["body", "repository"]),
            "Input should be a valid string",
        ),
        (
            json!({"conversation_instructions":{}}),
            "string_type",
            json!(["body", "conversation_instructions"]),
            "Input should be a valid string",
        ),
        (
            json!({"replay_json":[]}),
            "string_type",
            json!(["body", "replay_json"]),
            "Input should be a valid string",
        ),
        (
            json!({"suggested_task":"x"}),
            "model_attributes_type",
            json!(["body", "suggested_task"]),
            "Input should be a valid dictionary or object to extract fields from",
        ),
        (
            json!({"mcp_config":[]}),
            "model_attributes_type",
            json!(["body", "mcp_config"]),
            "Input should be a valid dictionary or object to extract fields from",
        ),
        (
            json!({"mcp_config":{"sse_servers":["x"]}}),
            "model_attributes_type",
            json!(["body", "mcp_config", "sse_servers", 0]),
            "Input should be a valid dictionary or object to extract fields from",
        ),
        (
            json!({"mcp_config":{"sse_servers":{}}}),
            "list_type",
            json!(["body", "mcp_config", "sse_servers"]),
            "Input should be a valid list",
        ),
        (
            json!({"mcp_config":{"stdio_servers":[{"name":"x","command":"y","env":{"A":1}}]}}),
            "string_type",
            json!(["body", "mcp_config", "stdio_servers", 0, "env", "A"]),
            "Input should be a valid string",
        ),
        (
            json!({"mcp_config":{"shttp_servers":[{"url":"gopher://x"}]}}),
            "value_error",
            json!(["body", "mcp_config", "shttp_servers", 0, "url"]),
            "Value error, URL scheme must be http, https, ws, or wss",
        ),
        (
            json!({"conversation_id":null}),
            "string_type",
            json!(["body", "conversation_id"]),
            "Input should be a valid string",
        ),
        (
            json!({"create_microagent":{"repo":"a/b","git_provider":"cvs"}}),
            "enum",
            json!(["body", "create_microagent", "git_provider"]),
            "Input should be 'github', 'gitlab', 'bitbucket' or 'enterprise_sso'",
        ),
    ];
    for (body, kind, loc, msg) in cases {
        let d = rejected(&app, JSON, &body.to_string()).await;
        let e = entry(&d, loc.clone());
        assert_eq!(e["type"], kind, "{body}: {d:#?}");
        assert_eq!(e["msg"], msg, "{body}");
        assert!(e.get("input").is_some(), "{body}: input missing");
    }
}

#[actix_web::test]
async fn enum_errors_carry_the_expected_values() {
    let app = spawn_app().await;
    let d = rejected(&app, JSON, r#"{"git_provider":"svn"}"#).await;
    assert_eq!(
        d[0],
        json!({"type":"enum","loc":["body","git_provider"],"msg":"Input should be 'github', 'gitlab', 'bitbucket' or 'enterprise_sso'","input":"svn","ctx":{"expected":"'github', 'gitlab', 'bitbucket' or 'enterprise_sso'"}})
    );
}

#[actix_web::test]
async fn an_empty_suggested_task_reports_every_missing_field() {
    let app = spawn_app().await;
    let d = rejected(&app, JSON, r#"{"suggested_task":{}}"#).await;
    let locs: Vec<Value> = d.iter().map(|e| e["loc"].clone()).collect();
    for field in ["git_provider", "task_type", "repo", "issue_number", "title"] {
        assert!(
            locs.contains(&json!(["body", "suggested_task", field])),
            "{field} not reported: {d:#?}"
        );
    }
    assert!(d
        .iter()
        .all(|e| e["type"] == "missing" && e["msg"] == "Field required"));
}

#[actix_web::test]
async fn all_errors_at_once_known_fields_before_unknown() {
    let app = spawn_app().await;
    let d = rejected(
        &app,
        JSON,
        r#"{"zzz":1,"initial_user_msg":1,"image_urls":"x","aaa":2}"#,
    )
    .await;
    let kinds: Vec<&str> = d.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        vec![
            "string_type",
            "list_type",
            "extra_forbidden",
            "extra_forbidden"
        ]
    );
}

#[actix_web::test]
async fn nested_objects_other_than_mcp_accept_unknown_keys() {
    let app = spawn_app().await;
    let id = app
        .create(json!({"create_microagent":{"repo":"o/r","extra":true},"suggested_task":null}))
        .await;
    assert_eq!(app.info(&id).await["trigger"], "microagent_management");
}

#[actix_web::test]
async fn unsupported_suggested_tasks_are_422_not_500() {
    let app = spawn_app().await;
    for (provider, task_type, bad) in [
        ("github", "OPEN_PR", "task_type"),
        ("github", "CREATE_MICROAGENT", "task_type"),
        ("enterprise_sso", "OPEN_ISSUE", "git_provider"),
    ] {
        let body = json!({"suggested_task":{"git_provider":provider,"task_type":task_type,"repo":"a/b","issue_number":1,"title":"t"}});
        let d = rejected(&app, JSON, &body.to_string()).await;
        let e = entry(&d, json!(["body", "suggested_task", bad]));
        assert_eq!(e["type"], "value_error", "{d:#?}");
    }
}

#[actix_web::test]
async fn replay_json_must_be_a_list_of_events_and_excludes_initial_message() {
    let app = spawn_app().await;
    for body in [
        json!({"replay_json":"not json"}),
        json!({"replay_json":"{}"}),
        json!({"replay_json":"[1]"}),
        json!({"replay_json":"[]","initial_user_msg":"hi"}),
    ] {
        let d = rejected(&app, JSON, &body.to_string()).await;
        assert!(
            d.iter().all(|e| e["type"] == "value_error"),
            "{body}: {d:#?}"
        );
    }
}

#[actix_web::test]
async fn conversation_ids_are_checked() {
    let app = spawn_app().await;
    for bad in ["../../etc/passwd", "a b", &"x".repeat(65), "ü"] {
        let body = json!({ "conversation_id": bad });
        let d = rejected(&app, JSON, &body.to_string()).await;
        assert_eq!(d[0]["type"], "value_error");
        assert_eq!(d[0]["loc"], json!(["body", "conversation_id"]));
    }
    // An empty id counts as absent: a fresh id is generated.
    let id = app.create(json!({"conversation_id": ""})).await;
    assert_eq!(id.len(), 32);
}

#[actix_web::test]
async fn repository_must_look_like_owner_repo() {
    let app = spawn_app().await;
    let d = rejected(&app, JSON, r#"{"repository":"justaname"}"#).await;
    assert_eq!(d[0]["loc"], json!(["body", "repository"]));
    let id = app.create(json!({"repository":"group/sub/repo"})).await;
    assert_eq!(app.info(&id).await["selected_repository"], "group/sub/repo");
}

#[actix_web::test]
async fn oversized_bodies_are_413() {
    let app = spawn_app_with(|s| s.limits.max_body_bytes = 1024).await;
    let big = json!({"initial_user_msg": "x".repeat(2000)}).to_string();
    let r = app
        .send_raw("POST", "/api/conversations", JSON, big.into_bytes())
        .await;
    assert_eq!(r.status, 413);
    assert!(r.body["detail"].as_str().unwrap().contains("1024"));
    assert_eq!(app.listed().await, 0);
}
