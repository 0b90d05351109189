//! Real third-party Socket.IO clients (python-socketio, node's socket.io-client) against the
//! real server. `.ci/run` installs both and sets `SWITCHBOARD_REQUIRE_CLIENT_TESTS=1`, which
//! turns a missing client into a failure; elsewhere a missing client is reported and skipped.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn required() -> bool {
    std::env::var("SWITCHBOARD_REQUIRE_CLIENT_TESTS").is_ok_and(|v| v == "1")
}

async fn available(program: &str, args: &[&str]) -> bool {
    tokio::process::Command::new(program)
        .args(args)
        .current_dir(clients_dir())
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

async fn run_client(program: &str, script: &str, probe: &[&str]) {
    if !available(program, probe).await {
        assert!(
            !required(),
            "{program} client is required but not installed"
        );
        eprintln!("SKIPPED: {program} Socket.IO client not installed (see .ci/run)");
        return;
    }
    let app = spawn_app().await;
    let id = app.create(json!({"initial_user_msg": "first"})).await;
    app.wait_events(&id, 5, |e| e.len() >= 5).await;
    let child = tokio::process::Command::new(program)
        .arg(script)
        .arg(&app.url)
        .arg(&id)
        .current_dir(clients_dir())
        .kill_on_drop(true)
        .output();
    let out = actix_web::rt::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("client finished in time")
        .expect("client ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} client failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("\"ok\": true") || stdout.contains("\"ok\":true"),
        "{stdout}"
    );
    // The client's message was stored once and echoed.
    let events = app.events(&id).await;
    assert_dense(&events);
    let from_client = events
        .iter()
        .filter(|e| {
            e["source"] == "user"
                && e["args"]["content"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("hello from"))
        })
        .count();
    assert_eq!(from_client, 1);
}

#[actix_web::test]
async fn python_socketio_client() {
    run_client(
        "python3",
        "python_client.py",
        &["-c", "import socketio, websocket"],
    )
    .await;
}

#[actix_web::test]
async fn node_socketio_client() {
    run_client(
        "node",
        "node_client.mjs",
        &["-e", "require.resolve('socket.io-client')"],
    )
    .await;
}
