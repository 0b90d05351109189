//! The per-conversation routes the web app calls: shapes, `git status` of the working
//! directory, path confinement of list-files / select-file / upload-files, upload limits.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::helpers::*;

/// The working directory of a conversation of a test server (`<data_dir>/workspaces/<id>`).
fn workdir(app: &TestApp, id: &str) -> PathBuf {
    app._data_dir.path().join("workspaces").join(id)
}

/// A multipart body of `files` parts; returns the content type and the body.
fn multipart(files: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----switchboard-test-boundary";
    let mut body = Vec::new();
    for (name, data) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload(app: &TestApp, id: &str, files: &[(&str, &[u8])]) -> Reply {
    let (ct, body) = multipart(files);
    app.send_raw(
        "POST",
        &format!("/api/conversations/{id}/upload-files"),
        Some(&ct),
        body,
    )
    .await
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .status()
        .expect("git runs");
    assert!(status.success(), "git {args:?}");
}

#[actix_web::test]
async fn the_conversation_panels_answer_with_openhands_shapes() {
    let app = spawn_app().await;
    let id = app.create(json!({"initial_user_msg": "hello there"})).await;
    let base = format!("/api/conversations/{id}");
    let r = app.get(&format!("{base}/config")).await;
    assert_eq!(
        (r.status, r.body),
        (200, json!({"runtime_id": null, "session_id": id}))
    );
    let r = app.get(&format!("{base}/vscode-url")).await;
    assert_eq!((r.status, r.body), (200, json!({"vscode_url": null})));
    let r = app.get(&format!("{base}/web-hosts")).await;
    assert_eq!((r.status, r.body), (200, json!({"hosts": {}})));
    let r = app.get(&format!("{base}/microagents")).await;
    assert_eq!((r.status, r.body), (200, json!({"microagents": []})));
    // The trajectory is the stored events.
    let events = app
        .wait_events(&id, 10, |e| e.iter().any(|ev| ev["source"] == "agent"))
        .await;
    let r = app.get(&format!("{base}/trajectory")).await;
    assert_eq!(r.status, 200);
    let trajectory = r.body["trajectory"].as_array().expect("list").clone();
    assert_eq!(trajectory[..events.len()], events[..]);
    // A stopped conversation still answers; an unknown one is a 404, a bad id a 422.
    app.post(&format!("{base}/stop"), json!({})).await;
    assert_eq!(app.get(&format!("{base}/config")).await.status, 200);
    for route in [
        "config",
        "vscode-url",
        "web-hosts",
        "git/changes",
        "list-files",
        "select-file?file=a",
        "microagents",
        "trajectory",
    ] {
        let r = app.get(&format!("/api/conversations/nope/{route}")).await;
        assert_eq!(r.status, 404, "{route}: {}", r.body);
        let r = app.get(&format!("/api/conversations/b%20d/{route}")).await;
        assert_eq!(r.status, 422, "{route}: {}", r.body);
    }
    assert_eq!(upload(&app, "nope", &[("a.txt", b"x")]).await.status, 404);
}

#[actix_web::test]
async fn git_changes_is_git_status_of_the_working_directory() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    let path = format!("/api/conversations/{id}/git/changes");
    // No working directory yet, then one that is not a repository.
    let r = app.get(&path).await;
    assert_eq!(
        (r.status, r.body),
        (404, json!({"error": "Not a git repository"}))
    );
    let dir = workdir(&app, &id);
    std::fs::create_dir_all(&dir).unwrap();
    let r = app.get(&path).await;
    assert_eq!(
        (r.status, r.body),
        (404, json!({"error": "Not a git repository"}))
    );
    // A repository: modified, added, deleted and untracked files.
    git(&dir, &["init", "-q"]);
    std::fs::write(dir.join("kept.txt"), "1").unwrap();
    std::fs::write(dir.join("gone.txt"), "1").unwrap();
    git(&dir, &["add", "."]);
    git(&dir, &["commit", "-qm", "first"]);
    std::fs::write(dir.join("kept.txt"), "2").unwrap();
    std::fs::remove_file(dir.join("gone.txt")).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/new.txt"), "new").unwrap();
    std::fs::write(dir.join("staged.txt"), "s").unwrap();
    git(&dir, &["add", "staged.txt"]);
    let r = app.get(&path).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut changes: Vec<(String, String)> = r
        .body
        .as_array()
        .expect("list")
        .iter()
        .map(|c| {
            (
                c["status"].as_str().unwrap().into(),
                c["path"].as_str().unwrap().into(),
            )
        })
        .collect();
    changes.sort_by(|a, b| a.1.cmp(&b.1));
    let expected: Vec<(String, String)> = [
        ("D", "gone.txt"),
        ("M", "kept.txt"),
        ("A", "staged.txt"),
        ("A", "sub/new.txt"),
    ]
    .iter()
    .map(|(s, p)| (s.to_string(), p.to_string()))
    .collect();
    assert_eq!(changes, expected);
    // A repository above the working directory is not the conversation's.
    let other = app.create(json!({})).await;
    let nested = workdir(&app, &other);
    std::fs::create_dir_all(&nested).unwrap();
    git(nested.parent().unwrap(), &["init", "-q"]);
    let r = app
        .get(&format!("/api/conversations/{other}/git/changes"))
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
}

#[actix_web::test]
async fn files_are_listed_read_and_uploaded_inside_the_working_directory_only() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    let base = format!("/api/conversations/{id}");
    // Nothing yet.
    assert_eq!(app.get(&format!("{base}/list-files")).await.body, json!([]));

    let r = upload(
        &app,
        &id,
        &[
            ("notes.md", b"# Notes\n"),
            ("src/main.rs", b"fn main() {}\n"),
            ("../escape.txt", b"x"),
            ("/etc/evil", b"x"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["uploaded_files"], json!(["notes.md", "src/main.rs"]));
    let skipped: Vec<&str> = r.body["skipped_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(skipped, ["../escape.txt", "/etc/evil"]);
    assert!(!app._data_dir.path().join("workspaces/escape.txt").exists());
    let dir = workdir(&app, &id);
    assert_eq!(
        std::fs::read(dir.join("src/main.rs")).unwrap(),
        b"fn main() {}\n"
    );

    let r = app.get(&format!("{base}/list-files")).await;
    assert_eq!(r.body, json!(["src/", "notes.md"]));
    let r = app.get(&format!("{base}/list-files?path=src")).await;
    assert_eq!(r.body, json!(["src/main.rs"]));
    let r = app
        .get(&format!("{base}/select-file?file=src/main.rs"))
        .await;
    assert_eq!((r.status, r.body), (200, json!({"code": "fn main() {}\n"})));

    // Outside the working directory: `..`, absolute paths, symlinks out.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.join("out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), dir.join("link.txt")).unwrap();
    for file in [
        "../x",
        "/etc/passwd",
        "out/secret.txt",
        "link.txt",
        "src/../../x",
    ] {
        let r = app
            .get(&format!("{base}/select-file?file={}", urlencode(file)))
            .await;
        assert_eq!(r.status, 400, "{file}: {}", r.body);
        assert!(r.body["error"].is_string(), "{file}: {}", r.body);
        assert!(!r.body.to_string().contains("secret\""), "{file}");
    }
    for path in ["..", "/", "out"] {
        let r = app
            .get(&format!("{base}/list-files?path={}", urlencode(path)))
            .await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
    }
    let r = upload(&app, &id, &[("out/planted.txt", b"x")]).await;
    assert_eq!(r.body["uploaded_files"], json!([]));
    assert!(!outside.path().join("planted.txt").exists());

    // Other bad input.
    let r = app.get(&format!("{base}/select-file")).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["detail"][0]["loc"], json!(["query", "file"]));
    let r = app
        .get(&format!("{base}/select-file?file=missing.txt"))
        .await;
    assert_eq!(
        (r.status, r.body),
        (404, json!({"error": "File not found: missing.txt"}))
    );
    let r = app.get(&format!("{base}/select-file?file=src")).await;
    assert_eq!(r.status, 400);
    std::fs::write(dir.join("blob.bin"), [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let r = app.get(&format!("{base}/select-file?file=blob.bin")).await;
    assert_eq!(
        (r.status, r.body),
        (
            415,
            json!({"error": "Unable to open binary file: blob.bin"})
        )
    );
    let r = app.get(&format!("{base}/list-files?path=notes.md")).await;
    assert_eq!(r.status, 400);
    let r = app.get(&format!("{base}/list-files?path=nowhere")).await;
    assert_eq!(r.status, 404);
    let r = app
        .send_raw(
            "POST",
            &format!("{base}/upload-files"),
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
}

#[actix_web::test]
async fn uploads_and_reads_are_bounded() {
    let app = spawn_app_with(|s| {
        s.workspace.max_upload_files = 2;
        s.workspace.max_upload_bytes = 1000;
        s.workspace.max_read_file_bytes = 10;
    })
    .await;
    let id = app.create(json!({})).await;
    let dir = workdir(&app, &id);
    let r = upload(&app, &id, &[("a", b"1"), ("b", b"2"), ("c", b"3")]).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.body, json!({"error": "At most 2 files per upload"}));
    let big = vec![b'x'; 1001];
    let r = upload(&app, &id, &[("big", &big)]).await;
    assert_eq!(
        (r.status, r.body),
        (413, json!({"error": "At most 1000 bytes per upload"}))
    );
    assert!(
        !dir.join("a").exists() && !dir.join("big").exists(),
        "a refused upload writes nothing"
    );
    let r = upload(&app, &id, &[("a", b"12345678901"), ("b", b"2")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .get(&format!("/api/conversations/{id}/select-file?file=a"))
        .await;
    assert_eq!(
        (r.status, r.body),
        (413, json!({"error": "a is larger than 10 bytes"}))
    );
    let r = app
        .get(&format!("/api/conversations/{id}/select-file?file=b"))
        .await;
    assert_eq!(r.body, json!({"code": "2"}));
}

#[actix_web::test]
async fn microagents_in_the_workspace_are_listed() {
    let app = spawn_app().await;
    let id = app.create(json!({})).await;
    let dir = workdir(&app, &id).join(".openhands/microagents");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("repo.md"), "Run `cargo test`.").unwrap();
    std::fs::write(dir.join("notes.txt"), "not a microagent").unwrap();
    let r = app
        .get(&format!("/api/conversations/{id}/microagents"))
        .await;
    assert_eq!(
        r.body,
        json!({"microagents": [{"name": "repo", "type": "repo", "content": "Run `cargo test`.",
                                "triggers": [], "inputs": [], "tools": []}]})
    );
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)])
        .unwrap()
        .trim_start_matches("v=")
        .to_string()
}
