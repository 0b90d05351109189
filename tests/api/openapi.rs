//! `GET /openapi.json`: the document describes every route the server serves, and only those.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::helpers::*;

/// Every (method, path) the server serves.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/alive"),
    ("get", "/health"),
    ("get", "/openapi.json"),
    ("get", "/api/conversations"),
    ("post", "/api/conversations"),
    ("get", "/api/conversations/{conversation_id}"),
    ("patch", "/api/conversations/{conversation_id}"),
    ("delete", "/api/conversations/{conversation_id}"),
    ("post", "/api/conversations/{conversation_id}/start"),
    ("post", "/api/conversations/{conversation_id}/stop"),
    ("get", "/api/conversations/{conversation_id}/events"),
    ("post", "/api/conversations/{conversation_id}/events"),
    ("get", "/api/conversations/{conversation_id}/config"),
    ("get", "/api/conversations/{conversation_id}/vscode-url"),
    ("get", "/api/conversations/{conversation_id}/web-hosts"),
    ("get", "/api/conversations/{conversation_id}/git/changes"),
    ("get", "/api/conversations/{conversation_id}/list-files"),
    ("get", "/api/conversations/{conversation_id}/select-file"),
    ("post", "/api/conversations/{conversation_id}/upload-files"),
    ("get", "/api/conversations/{conversation_id}/microagents"),
    ("get", "/api/conversations/{conversation_id}/trajectory"),
    ("get", "/api/options/config"),
    ("get", "/api/options/models"),
    ("get", "/api/options/agents"),
    ("get", "/api/options/security-analyzers"),
    ("get", "/api/settings"),
    ("post", "/api/settings"),
    ("get", "/socket.io/"),
    ("get", "/socket.io"),
    ("get", "/ws/conversations/{conversation_id}"),
    ("get", "/login"),
    ("post", "/login"),
];

const METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').expect("local $ref");
            resolve(doc, doc.pointer(pointer).unwrap_or_else(|| panic!("{r}")))
        }
        None => node,
    }
}

async fn fetch_doc(app: &TestApp) -> Value {
    let r = app.get("/openapi.json").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    r.body
}

#[actix_web::test]
async fn the_document_lists_exactly_the_served_routes() {
    let app = spawn_app().await;
    let doc = fetch_doc(&app).await;
    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3."), "{version}");

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);

    // Every listed route answers (none is a 404), in an order where each one can succeed:
    // the delete last.
    let id = app.create(json!({})).await;
    let mut probes = ROUTES.to_vec();
    // (Settings are read after they are saved: before, the answer is a documented 404.)
    probes.sort_by_key(|(method, path)| {
        (
            *method == "delete",
            (*method, *path) == ("get", "/api/settings"),
        )
    });
    for (method, path) in probes {
        let mut concrete = path.replace("{conversation_id}", &id);
        if path.starts_with("/socket.io") {
            concrete.push_str(&format!("?EIO=4&transport=websocket&conversation_id={id}"));
        }
        if path == "/login" {
            // Redirects and HTML, not JSON: tests/api/security.rs drives the login.
            continue;
        }
        if path.ends_with("/select-file") {
            concrete.push_str("?file=README.md");
        }
        if path.starts_with("/socket.io") || path.starts_with("/ws/") {
            // A socket route: a plain GET (no upgrade) is a documented 400.
            let r = app.get(&concrete).await;
            assert_eq!(r.status, 400, "{method} {concrete}: {}", r.body);
            assert!(
                doc["paths"][path][method]["responses"]["400"].is_object()
                    && doc["paths"][path][method]["responses"]["101"].is_object(),
                "{path}"
            );
            assert!(r.body["detail"].is_string(), "{}", r.body);
            continue;
        }
        let body = match (method, path) {
            ("post", "/api/conversations") => Some(json!({"initial_user_msg": "hello"})),
            ("patch", _) => Some(json!({"title": "renamed"})),
            ("post", p) if p.ends_with("/events") => {
                Some(json!({"action": "message", "args": {"content": "hi"}}))
            }
            ("post", _) => Some(json!({})),
            _ => None,
        };
        let r = app
            .send(&method.to_uppercase(), &concrete, body.as_ref())
            .await;
        let op = &doc["paths"][path][method];
        // A fresh conversation has no git repository and no files, and a JSON body is no
        // upload: documented refusals.
        let expected = match (method, path.rsplit('/').next()) {
            ("get", Some("changes" | "select-file")) => 404,
            ("post", Some("upload-files")) => 400,
            _ => 200,
        };
        assert_eq!(r.status, expected, "{method} {concrete}: {}", r.body);
        if expected != 200 {
            assert!(
                op["responses"][expected.to_string()].is_object(),
                "{method} {path}: {expected} is not documented"
            );
            continue;
        }
        // The answer has the keys its documented schema requires.
        let schema = resolve(
            &doc,
            &op["responses"]["200"]["content"]["application/json"]["schema"],
        );
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().expect("key");
            assert!(
                r.body.get(key).is_some(),
                "{method} {path}: {key} missing in {}",
                r.body
            );
        }
    }
    // A listed path with an unlisted method is a 405: the document lists every method served.
    let paths: BTreeSet<&str> = ROUTES.iter().map(|(_, p)| *p).collect();
    for path in paths {
        let concrete = path.replace("{conversation_id}", &id);
        for method in METHODS {
            if ROUTES.contains(&(*method, path)) {
                continue;
            }
            let r = app.send(&method.to_uppercase(), &concrete, None).await;
            assert_eq!(r.status, 405, "{method} {concrete}: {}", r.body);
        }
    }
}

#[actix_web::test]
async fn api_routes_need_the_session_key_and_the_probes_do_not() {
    let app = spawn_app().await;
    let doc = fetch_doc(&app).await;
    let scheme = &doc["components"]["securitySchemes"]["APIKeyHeader"];
    assert_eq!(scheme["type"], "apiKey");
    assert_eq!(scheme["in"], "header");
    assert_eq!(scheme["name"], "X-Session-API-Key");
    for (method, path) in ROUTES {
        let security = &doc["paths"][path][method]["security"];
        if path.starts_with("/api/") {
            assert_eq!(security, &json!([{"APIKeyHeader": []}]), "{method} {path}");
            assert!(
                doc["paths"][path][method]["responses"]["401"].is_object(),
                "{method} {path} has no 401"
            );
        } else if path.starts_with("/ws/") {
            assert_eq!(
                security,
                &json!([{"APIKeyHeader": []}, {"APIKeyQuery": []}]),
                "{method} {path}"
            );
        } else {
            assert!(security.is_null(), "{method} {path}");
        }
    }
    // The document itself needs no key.
    let mut keyed = spawn_app_with(|s| s.session_api_key = Some("k".into())).await;
    keyed.key = None;
    assert_eq!(keyed.get("/openapi.json").await.status, 200);
}

#[actix_web::test]
async fn path_ids_carry_the_id_rule_and_422s_the_validation_error() {
    let app = spawn_app().await;
    let doc = fetch_doc(&app).await;
    let validation = &doc["components"]["schemas"]["HTTPValidationError"];
    let items = resolve(&doc, &validation["properties"]["detail"]["items"]);
    for key in ["type", "loc", "msg", "input"] {
        assert!(
            items["required"]
                .as_array()
                .is_some_and(|r| r.contains(&json!(key))),
            "ValidationError requires {key}: {items}"
        );
    }
    let mut count_422 = 0;
    for (method, path) in ROUTES {
        let op = &doc["paths"][path][method];
        if path.contains("{conversation_id}") {
            let params = op["parameters"].as_array().expect("parameters");
            let id = params
                .iter()
                .find(|p| p["name"] == "conversation_id")
                .expect("conversation_id parameter");
            assert_eq!(id["in"], "path");
            assert_eq!(id["required"], true);
            assert_eq!(id["schema"]["pattern"], "^[A-Za-z0-9_-]{1,64}$");
            assert!(
                op["responses"]["422"].is_object(),
                "{method} {path}: bad ids are 422s"
            );
        }
        if let Some(r422) = op["responses"].get("422") {
            count_422 += 1;
            assert_eq!(
                r422["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/HTTPValidationError",
                "{method} {path}"
            );
        }
    }
    assert!(count_422 >= 9, "{count_422}");
}

/// The property names of `InitSessionRequest` in OpenHands' YAML schema, and whether it says
/// `additionalProperties: false` (a small indentation-based reader: no YAML crate needed).
fn openhands_init_session(yaml: &str) -> (Vec<String>, bool) {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim_end() != "    InitSessionRequest:")
        .skip(1)
        .take_while(|l| l.trim().is_empty() || indent(l) > 4);
    let block: Vec<&str> = lines.by_ref().collect();
    let forbids_extra = block
        .iter()
        .any(|l| indent(l) == 6 && l.trim() == "additionalProperties: false");
    let properties = block
        .iter()
        .skip_while(|l| !(indent(l) == 6 && l.trim() == "properties:"))
        .skip(1)
        .take_while(|l| l.trim().is_empty() || indent(l) > 6)
        .filter(|l| indent(l) == 8 && l.trim_end().ends_with(':'))
        .map(|l| l.trim().trim_end_matches(':').to_string())
        .collect();
    (properties, forbids_extra)
}

#[actix_web::test]
async fn new_conversation_body_is_openhands_init_session_request() {
    let app = spawn_app().await;
    let doc = fetch_doc(&app).await;
    let op = &doc["paths"]["/api/conversations"]["post"];
    assert_eq!(op["requestBody"]["required"], true);
    let schema = resolve(
        &doc,
        &op["requestBody"]["content"]["application/json"]["schema"],
    );
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["additionalProperties"], false, "{schema}");
    let ours: Vec<String> = schema["properties"]
        .as_object()
        .expect("properties")
        .keys()
        .cloned()
        .collect();
    // What the server does with them: an unknown key is refused, every listed one accepted.
    let r = app
        .post("/api/conversations", json!({"not_a_field": 1}))
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["detail"][0]["type"], "extra_forbidden");
    let mcp = resolve(&doc, &schema["properties"]["mcp_config"]["oneOf"][1]);
    assert_eq!(mcp["additionalProperties"], false, "{mcp}");

    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/spec/new-conversation.openapi.yaml");
    let Ok(yaml) = std::fs::read_to_string(&spec) else {
        println!(
            "note: {} not found; skipping the comparison with OpenHands' schema",
            spec.display()
        );
        return;
    };
    let (theirs, forbids_extra) = openhands_init_session(&yaml);
    assert_eq!(theirs.len(), 11, "read the YAML wrong: {theirs:?}");
    assert!(forbids_extra);
    assert_eq!(ours, theirs);
    for key in &ours {
        let null = json!({ key.as_str(): null });
        let r = app.post("/api/conversations", null.clone()).await;
        if key == "conversation_id" {
            // Typed `string`, not nullable, in both documents.
            assert_eq!(r.status, 422, "{null}: {}", r.body);
        } else {
            assert_eq!(r.status, 200, "{null}: {}", r.body);
        }
    }
}
