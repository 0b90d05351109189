//! The web app's settings side: `GET /api/options/*`, `GET`/`POST /api/settings` (shapes,
//! OpenHands' merge rules, secrets never echoed, pydantic-shaped 422s, persistence across a
//! restart).

use serde_json::{json, Value};

use crate::helpers::*;

/// The first body the web app's AI-provider modal sends.
fn first_run_body() -> Value {
    json!({"llm_model":"anthropic/claude-sonnet-4-20250514","agent":"CodeActAgent","language":"en",
        "confirmation_mode":false,"llm_api_key":"sk-secret","remote_runtime_resource_factor":1,
        "enable_default_condenser":true,"enable_sound_notifications":false,"provider_tokens_set":{},
        "mcp_config":{"sse_servers":[],"stdio_servers":[]},
        "enable_proactive_conversation_starters":false,"enable_solvability_analysis":false,
        "search_api_key":"","max_budget_per_task":null,"git_user_name":"openhands",
        "git_user_email":"openhands@all-hands.dev"})
}

/// The body the analytics-consent modal sends next.
fn consent_body() -> Value {
    json!({"llm_model":"anthropic/claude-sonnet-4-20250514","llm_base_url":null,"agent":"CodeActAgent",
        "language":"en","confirmation_mode":false,"security_analyzer":null,
        "remote_runtime_resource_factor":1,"enable_default_condenser":true,
        "enable_sound_notifications":false,"user_consents_to_analytics":false,
        "provider_tokens_set":{},"mcp_config":{"sse_servers":[],"stdio_servers":[]},
        "enable_proactive_conversation_starters":false,"enable_solvability_analysis":false,
        "search_api_key":"","max_budget_per_task":null,"git_user_name":"openhands",
        "git_user_email":"openhands@all-hands.dev"})
}

#[actix_web::test]
async fn options_come_from_configuration() {
    let app = spawn_app().await;
    let r = app.get("/api/options/config").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        json!({"APP_MODE":"oss","GITHUB_CLIENT_ID":"","POSTHOG_CLIENT_KEY":"",
               "FEATURE_FLAGS":{"ENABLE_BILLING":false,"HIDE_LLM_SETTINGS":false,
                                "HIDE_MICROAGENT_MANAGEMENT":true}})
    );
    let models = app.get("/api/options/models").await;
    assert_eq!(models.status, 200);
    let models = models.body.as_array().expect("list").clone();
    assert!(models.contains(&json!("anthropic/claude-sonnet-4-20250514")));
    assert!(models
        .iter()
        .all(|m| m.as_str().is_some_and(|m| m.contains('/'))));
    assert_eq!(
        app.get("/api/options/agents").await.body,
        json!(["CodeActAgent"])
    );
    assert_eq!(
        app.get("/api/options/security-analyzers").await.body,
        json!([])
    );

    let custom = spawn_app_with(|s| {
        s.frontend.app_mode = switchboard::config::AppMode::Saas;
        s.frontend.posthog_client_key = "phc_x".into();
        s.frontend.github_client_id = "gh".into();
        s.frontend.enable_billing = true;
        s.frontend.models = vec!["openai/gpt-4o".into()];
        s.frontend.agents = vec!["A".into(), "B".into()];
        s.frontend.security_analyzers = vec!["invariant".into()];
    })
    .await;
    let r = custom.get("/api/options/config").await.body;
    assert_eq!(r["APP_MODE"], "saas");
    assert_eq!(r["POSTHOG_CLIENT_KEY"], "phc_x");
    assert_eq!(r["GITHUB_CLIENT_ID"], "gh");
    assert_eq!(r["FEATURE_FLAGS"]["ENABLE_BILLING"], true);
    assert_eq!(
        custom.get("/api/options/models").await.body,
        json!(["openai/gpt-4o"])
    );
    assert_eq!(
        custom.get("/api/options/agents").await.body,
        json!(["A", "B"])
    );
    assert_eq!(
        custom.get("/api/options/security-analyzers").await.body,
        json!(["invariant"])
    );
}

#[actix_web::test]
async fn settings_are_not_found_until_saved_then_shown_without_secrets() {
    let app = spawn_app().await;
    let r = app.get("/api/settings").await;
    assert_eq!(
        (r.status, r.body),
        (404, json!({"error": "Settings not found"}))
    );

    let r = app.post("/api/settings", first_run_body()).await;
    assert_eq!(
        (r.status, r.body),
        (200, json!({"message": "Settings stored"}))
    );
    let r = app.post("/api/settings", consent_body()).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let r = app.get("/api/settings").await;
    assert_eq!(r.status, 200);
    // Exactly OpenHands' answer after the two first-run modals.
    assert_eq!(
        r.body,
        json!({"language": "en", "agent": "CodeActAgent", "max_iterations": null,
            "security_analyzer": null, "confirmation_mode": false,
            "llm_model": "anthropic/claude-sonnet-4-20250514", "llm_api_key": null,
            "llm_base_url": null, "remote_runtime_resource_factor": 1,
            "secrets_store": {"provider_tokens": {}}, "enable_default_condenser": true,
            "enable_sound_notifications": false,
            "enable_proactive_conversation_starters": false,
            "enable_solvability_analysis": false, "user_consents_to_analytics": false,
            "sandbox_base_container_image": null, "sandbox_runtime_container_image": null,
            "mcp_config": {"sse_servers": [], "stdio_servers": [], "shttp_servers": []},
            "search_api_key": null, "sandbox_api_key": null, "max_budget_per_task": null,
            "email": null, "email_verified": null, "git_user_name": "openhands",
            "git_user_email": "openhands@all-hands.dev", "provider_tokens_set": {},
            "llm_api_key_set": true, "search_api_key_set": false})
    );
    let keys: Vec<&String> = r.body.as_object().expect("object").keys().collect();
    assert_eq!(
        keys.first().map(|k| k.as_str()),
        Some("language"),
        "OpenHands' key order"
    );
    assert!(
        !r.body.to_string().contains("sk-secret"),
        "the key is never echoed"
    );
}

#[actix_web::test]
async fn posting_merges_like_openhands() {
    let app = spawn_app().await;
    let r = app
        .post(
            "/api/settings",
            json!({"llm_model": "openai/gpt-4o", "llm_api_key": "sk-1",
                   "llm_base_url": "http://llm", "search_api_key": "tv-1",
                   "user_consents_to_analytics": true, "language": "fr",
                   "max_iterations": 50, "enable_sound_notifications": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Kept when null or absent: the LLM triple, the search key, the consent. Everything else is
    // the body's (absent → the default).
    let r = app
        .post(
            "/api/settings",
            json!({"llm_model": null, "llm_api_key": null, "agent": "X", "unknown_key": 5}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = app.get("/api/settings").await.body;
    assert_eq!(s["llm_model"], "openai/gpt-4o");
    assert_eq!(s["llm_base_url"], "http://llm");
    assert_eq!(s["llm_api_key_set"], true);
    assert_eq!(s["search_api_key_set"], true);
    assert_eq!(s["user_consents_to_analytics"], true);
    assert_eq!(s["agent"], "X");
    assert_eq!(
        s["language"],
        Value::Null,
        "not kept: absent means the default"
    );
    assert_eq!(s["max_iterations"], Value::Null);
    assert_eq!(s["enable_sound_notifications"], false);
    assert_eq!(s["enable_default_condenser"], true);
    assert!(s.get("unknown_key").is_none());
    // An empty key replaces the stored one and counts as not set.
    app.post(
        "/api/settings",
        json!({"llm_api_key": "", "search_api_key": ""}),
    )
    .await;
    let s = app.get("/api/settings").await.body;
    assert_eq!(s["llm_api_key_set"], false);
    assert_eq!(s["search_api_key_set"], false);
    assert_eq!(s["llm_model"], "openai/gpt-4o");
}

#[actix_web::test]
async fn wrong_types_are_pydantic_422s_and_change_nothing() {
    let app = spawn_app().await;
    app.post(
        "/api/settings",
        json!({"language": "en", "llm_api_key": "sk-1"}),
    )
    .await;
    let before = app.get("/api/settings").await.body;
    let r = app
        .post(
            "/api/settings",
            json!({"language": 5, "max_iterations": "many", "confirmation_mode": "perhaps",
                   "enable_default_condenser": null, "max_budget_per_task": "lots",
                   "mcp_config": [], "secrets_store": "x", "llm_api_key": 7}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let got: Vec<(String, Value)> = r.body["detail"]
        .as_array()
        .expect("detail")
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_string(),
                e["loc"].clone(),
            )
        })
        .collect();
    let expected: Vec<(String, Value)> = [
        ("string_type", json!(["body", "language"])),
        ("int_parsing", json!(["body", "max_iterations"])),
        ("bool_parsing", json!(["body", "confirmation_mode"])),
        ("string_type", json!(["body", "llm_api_key"])),
        ("model_attributes_type", json!(["body", "secrets_store"])),
        ("bool_type", json!(["body", "enable_default_condenser"])),
        ("model_attributes_type", json!(["body", "mcp_config"])),
        ("float_parsing", json!(["body", "max_budget_per_task"])),
    ]
    .into_iter()
    .map(|(t, l)| (t.to_string(), l))
    .collect();
    assert_eq!(got, expected);
    assert_eq!(
        r.body["detail"][1]["msg"],
        "Input should be a valid integer, unable to parse string as an integer"
    );
    // Lax mode, as pydantic: numeric strings and boolean words are accepted.
    let r = app
        .post(
            "/api/settings",
            json!({"max_iterations": "12", "confirmation_mode": "yes", "max_budget_per_task": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = app.get("/api/settings").await.body;
    assert_eq!(s["max_iterations"], 12);
    assert_eq!(s["confirmation_mode"], true);
    assert_eq!(s["max_budget_per_task"], 2.0);
    // Not an object at all; a bad MCP server.
    for body in [
        json!([1]),
        json!({"mcp_config": {"sse_servers": [{"url": "ftp://x"}]}}),
    ] {
        let r = app.post("/api/settings", body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {}", r.body);
    }
    let s = app.get("/api/settings").await.body;
    assert_eq!(s["max_iterations"], 12, "a refused body changed nothing");
    assert_ne!(s, before);
}

#[actix_web::test]
async fn settings_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = spawn_sqlite_in(dir.path(), |_| {}).await;
    assert_eq!(app.get("/api/settings").await.status, 404);
    app.post("/api/settings", first_run_body()).await;
    let before = app.get("/api/settings").await.body;
    app.shutdown().await;

    let app = spawn_sqlite_in(dir.path(), |_| {}).await;
    let after = app.get("/api/settings").await;
    assert_eq!(after.status, 200);
    assert_eq!(after.body, before);
    // The key survived too (not echoed, but kept when a later save leaves it out).
    app.post("/api/settings", json!({"language": "de"})).await;
    assert_eq!(app.get("/api/settings").await.body["llm_api_key_set"], true);
    app.shutdown().await;
}
