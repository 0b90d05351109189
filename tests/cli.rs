//! The real `switchboard` binary: refusing bad settings, serving, and stopping gracefully on
//! SIGTERM and SIGINT, and keeping what it stored across `kill -9` (on SQLite and on PostgreSQL).
//! Only std is used to talk to it (a tiny HTTP/1.1 client).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

mod cluster;
mod pg;
mod placement;
mod sandbox;

/// The binary, run in `dir` (so no `./config/default.toml` is layered in) with a clean
/// environment for its settings and logs.
fn switchboard(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.current_dir(dir)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SWITCHBOARD_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Kills the child if the test fails before it exited.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Guard {
    /// Waits for the exit, at most `limit`.
    fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn is_listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().expect("address"),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// Runs the binary with a bad setting and checks it refuses to start: a non-zero exit within a
/// few seconds, one line on stderr that contains `names`, nothing listening.
fn refuses(envs: &[(&str, &str)], args: &[&str], names: &str, port: Option<u16>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = switchboard(dir.path());
    cmd.arg("serve");
    if !envs.iter().any(|(name, _)| *name == "SWITCHBOARD_STORE") {
        cmd.args(["--store", "memory"]);
    }
    cmd.args(args).envs(envs.iter().copied());
    if let Some(port) = port {
        cmd.env("SWITCHBOARD_PORT", port.to_string());
    }
    let mut child = Guard(cmd.spawn().expect("spawn switchboard"));
    let status = child
        .wait_for_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{envs:?} {args:?}: still running after 5 s"));
    let mut stderr = String::new();
    if let Some(mut pipe) = child.0.stderr.take() {
        pipe.read_to_string(&mut stderr).expect("read stderr");
    }
    let stderr = strip_ansi(&stderr);
    assert!(!status.success(), "{envs:?} {args:?}: exited {status}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{envs:?} {args:?}: stderr is {stderr:?}");
    assert!(
        lines[0].contains(names),
        "{envs:?} {args:?}: {:?} should name {names:?}",
        lines[0]
    );
    if let Some(port) = port {
        assert!(
            !is_listening(port),
            "{envs:?} {args:?}: port {port} is open"
        );
    }
}

#[test]
fn bad_environment_settings_are_refused_with_one_line_naming_them() {
    refuses(&[("SWITCHBOARD_PORT", "abc")], &[], "`port`", None);
    refuses(&[("SWITCHBOARD_PORT", "70000")], &[], "`port`", None);
    refuses(
        &[("SWITCHBOARD_ON_LIMIT", "drop")],
        &[],
        "limits.on_limit",
        Some(free_port()),
    );
    refuses(
        &[("SWITCHBOARD_IDLE_TIMEOUT_SECS", "0")],
        &[],
        "limits.idle_timeout_secs",
        Some(free_port()),
    );
    refuses(
        &[("SWITCHBOARD_STORE", "mysql")],
        &[],
        "`store`",
        Some(free_port()),
    );
    refuses(
        &[("SWITCHBOARD_PROCESS_SANDBOX", "docker")],
        &[],
        "runtime.process.sandbox",
        Some(free_port()),
    );
    // The bwrap sandbox without bubblewrap (not on PATH).
    refuses(
        &[
            ("SWITCHBOARD_RUNTIME", "process"),
            ("SWITCHBOARD_PROCESS_COMMAND", "/bin/sh -c true"),
            ("SWITCHBOARD_PROCESS_SANDBOX", "bwrap"),
            ("PATH", "/nonexistent"),
        ],
        &[],
        "bwrap",
        Some(free_port()),
    );
    // A web app directory without index.html (or none at all), by flag and by environment.
    let empty = tempfile::tempdir().expect("temp dir");
    let empty = empty.path().display().to_string();
    refuses(
        &[],
        &["--frontend", &empty],
        "index.html",
        Some(free_port()),
    );
    refuses(
        &[("SWITCHBOARD_FRONTEND_DIR", "/no/such/dir")],
        &[],
        "frontend.dir",
        Some(free_port()),
    );
}

#[test]
fn bad_config_files_are_refused_with_one_line_naming_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let top = dir.path().join("top.toml");
    std::fs::write(&top, "prot = 3000\n").expect("write");
    refuses(
        &[],
        &["--config", top.to_str().expect("utf-8 path")],
        "prot",
        Some(free_port()),
    );
    let nested = dir.path().join("nested.toml");
    std::fs::write(&nested, "[limits]\nmax_runing = 3\n").expect("write");
    refuses(
        &[],
        &["--config", nested.to_str().expect("utf-8 path")],
        "limits.max_runing",
        Some(free_port()),
    );
    let missing = dir.path().join("missing.toml");
    let missing = missing.to_str().expect("utf-8 path");
    refuses(&[], &["--config", missing], missing, Some(free_port()));
}

/// A running server and its stderr, line by line.
struct Server {
    child: Guard,
    port: u16,
    lines: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
    seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        Server::start_in(dir, &data, "memory")
    }

    /// Starts the binary with the `store` backend on `data`; `dir` is its working directory.
    fn start_in(dir: tempfile::TempDir, data: &Path, store: &str) -> Server {
        Server::start_with(dir, data, store, &[])
    }

    /// [`Server::start_in`] with extra `SWITCHBOARD_*` settings in its environment.
    fn start_with(
        dir: tempfile::TempDir,
        data: &Path,
        store: &str,
        envs: &[(&str, &str)],
    ) -> Server {
        Server::start_with_args(dir, data, store, &[], envs)
    }

    /// [`Server::start_with`] with more command-line arguments.
    fn start_with_args(
        dir: tempfile::TempDir,
        data: &Path,
        store: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Server {
        let mut child = Guard(
            switchboard(dir.path())
                .arg("serve")
                .args(["--port", "0", "--store", store, "--data-dir"])
                .arg(data)
                .args(args)
                .envs(envs.iter().copied())
                .spawn()
                .expect("spawn switchboard"),
        );
        let stderr = child.0.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(strip_ansi(&line)).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            port: 0,
            lines,
            reader: Some(reader),
            seen: Vec::new(),
            _dir: dir,
        };
        let marker = "listening on http://127.0.0.1:";
        let line = server.wait_line(Duration::from_secs(15), |l| l.contains(marker));
        let digits: String = line[line.find(marker).expect("marker") + marker.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        server.port = digits.parse().expect("port in the listening line");
        server
    }

    /// Reads stderr until a line satisfies `check`, at most `limit`.
    fn wait_line(&mut self, limit: Duration, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if check(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no such line within {limit:?}; stderr so far: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Whatever stderr has said so far, without waiting.
    fn drain_nonblocking(&mut self) {
        self.seen.extend(self.lines.try_iter());
    }

    /// The rest of stderr, once the process has exited.
    fn drain(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.seen.extend(self.lines.try_iter());
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        http(self.port, method, path, body)
    }

    /// `kill -9` of the server; returns once it is gone.
    fn kill_9(&mut self) {
        let pid = self.child.0.id().to_string();
        let killed = Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        self.child
            .wait_for_exit(Duration::from_secs(10))
            .expect("killed");
    }
}

/// An answer: status, head (status line and headers, lower-cased names) and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    /// A header's value.
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.1 request with `Connection: close` and extra `headers`; the whole answer.
fn http_raw(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Answer {
    try_http_raw(port, method, path, headers, body).unwrap_or_else(|e| panic!("{e}"))
}

/// [`http_raw`], with a failure to get an answer as an error (see [`try_exchange`]).
fn try_http_raw(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<Answer, String> {
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    try_exchange(port, &request)
}

/// Sends `request` exactly as given on a new connection and reads the whole answer.
fn exchange(port: u16, request: &str) -> Answer {
    try_exchange(port, request).unwrap_or_else(|e| panic!("{e}"))
}

/// [`exchange`], with what went wrong (no connection, no complete answer within 10 s) as an
/// error instead of a panic: for a server that may be killed at any moment.
fn try_exchange(port: u16, request: &str) -> Result<Answer, String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("timeout: {e}"))?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read response: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("status line: {head}"))?;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked answers are not expected: {head}"
    );
    Ok(Answer {
        status,
        head: head.to_string(),
        body: payload.to_string(),
    })
}

/// One HTTP/1.1 request with `Connection: close`; the status and the JSON body.
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let Answer {
        status,
        body: payload,
        ..
    } = http_raw(port, method, path, &[], body);
    let json = serde_json::from_str(&payload)
        .unwrap_or_else(|e| panic!("{method} {path}: body {payload:?} is not JSON: {e}"));
    (status, json)
}

/// Starts the server, creates a conversation, sends `signal`, and checks a clean exit that
/// stopped the conversation on the way out.
fn stops_gracefully_on(signal: &str) {
    let mut server = Server::start();
    let (status, body) = server.request("GET", "/alive", None);
    assert_eq!((status, body), (200, serde_json::json!({"status": "ok"})));
    let (status, body) = server.request(
        "POST",
        "/api/conversations",
        Some(r#"{"initial_user_msg": "hello"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let id = body["conversation_id"]
        .as_str()
        .expect("conversation_id")
        .to_string();

    let pid = server.child.0.id().to_string();
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(&pid)
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal} {pid}: {sent}");
    let exit = server
        .child
        .wait_for_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("still running 15 s after SIG{signal}"));
    server.drain();
    assert!(
        exit.success(),
        "SIG{signal}: exited {exit}; stderr: {:#?}",
        server.seen
    );
    assert!(
        server.seen.iter().any(|l| l.contains("stopping")
            && l.contains(&id)
            && l.contains("server shutting down")),
        "SIG{signal}: no line says conversation {id} is stopping because the server shuts down: {:#?}",
        server.seen
    );
    assert!(
        !is_listening(server.port),
        "port {} still open",
        server.port
    );
}

#[test]
fn sigterm_stops_the_server_gracefully() {
    stops_gracefully_on("TERM");
}

#[test]
fn sigint_stops_the_server_gracefully() {
    stops_gracefully_on("INT");
}

/// The server runs without transparent huge pages (see `main.rs`): the process says so in
/// `/proc/<pid>/status` (`THP_enabled: 0`), where any other process of this machine says 1.
#[test]
fn the_server_runs_without_transparent_huge_pages() {
    let status = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("read /proc/<pid>/status")
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:").map(|v| v.trim().to_string()))
    };
    let Some(ours) = status(std::process::id()) else {
        println!("SKIPPED: this kernel does not report THP_enabled");
        return;
    };
    assert_eq!(
        ours, "1",
        "the test process itself has transparent huge pages"
    );
    let server = Server::start();
    let (status_code, _) = server.request("GET", "/alive", None);
    assert_eq!(status_code, 200);
    assert_eq!(status(server.child.0.id()).as_deref(), Some("0"));
}

/// Every event of a conversation, over REST.
fn all_events(port: u16, id: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    loop {
        let (status, page) = http(
            port,
            "GET",
            &format!(
                "/api/conversations/{id}/events?start_id={}&limit=100",
                out.len()
            ),
            None,
        );
        assert_eq!(status, 200, "{page}");
        out.extend(page["events"].as_array().expect("events").iter().cloned());
        if page["has_more"] != true {
            return out;
        }
    }
}

/// A plain-WebSocket client on its own thread, keeping every frame it receives.
fn watch(
    port: u16,
    id: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            use futures_util::StreamExt;
            let url = format!("ws://127.0.0.1:{port}/ws/conversations/{id}");
            let Ok((_, mut ws)) = awc::Client::new().ws(url).connect().await else {
                return;
            };
            while let Some(Ok(frame)) = ws.next().await {
                if let awc::ws::Frame::Text(text) = frame {
                    if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                        if v.get("id").is_some_and(Value::is_u64) {
                            seen.lock().expect("lock").push(v);
                        }
                    }
                }
            }
        })
    })
}

#[test]
fn kill_9_loses_no_event_a_client_has_seen() {
    kill_9_then_restart_loses_nothing("sqlite", &[]);
}

/// The server runs on PostgreSQL end to end: what a client saw survives `kill -9` and a restart
/// on the same database, and the conversation goes on there.
#[test]
fn on_postgres_kill_9_loses_no_event_a_client_has_seen() {
    let Some(db) = pg::database() else { return };
    // The restart is the same cluster node: it takes its registration over, and with it what
    // the killed process owned.
    kill_9_then_restart_loses_nothing(
        "postgres",
        &[
            ("SWITCHBOARD_POSTGRES_URL", &db.url),
            ("SWITCHBOARD_NODE_ID", "restarting"),
        ],
    );
}

/// Serves on `store` (with `envs`), kills the server with `kill -9` while a client watches a busy
/// conversation, restarts it on the same store and checks that every event the client saw is
/// there, unchanged, with dense ids, and that the conversation resumes.
fn kill_9_then_restart_loses_nothing(store: &str, envs: &[(&str, &str)]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let work = tempfile::tempdir().expect("temp dir");
    let mut server = Server::start_with(work, &data, store, envs);
    let port = server.port;
    let (status, body) = http(port, "POST", "/api/conversations", Some("{}"));
    assert_eq!(status, 200, "{body}");
    let id = body["conversation_id"].as_str().expect("id").to_string();

    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = watch(port, id.clone(), seen.clone());
    // A producer keeps the conversation busy until the server dies under it.
    let producer = {
        let id = id.clone();
        std::thread::spawn(move || {
            for i in 0..100_000 {
                let body = format!(r#"{{"action":"message","args":{{"content":"m{i}"}}}}"#);
                let path = format!("/api/conversations/{id}/events");
                let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
                    return;
                };
                let request = format!(
                    "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(request.as_bytes()).is_err() {
                    return;
                }
                let mut sink = Vec::new();
                if stream.read_to_end(&mut sink).is_err() || sink.is_empty() {
                    return;
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().expect("lock").len() < 400 {
        assert!(Instant::now() < deadline, "the client saw too few events");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill_9();
    let _ = producer.join();
    let _ = client.join();
    let received = seen.lock().expect("lock").clone();
    assert!(received.len() >= 400);

    // Restart on the same data: everything the client saw is there, byte for byte.
    let work = tempfile::tempdir().expect("temp dir");
    let server = Server::start_with(work, &data, store, envs);
    let stored = all_events(server.port, &id);
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e["id"], i as u64, "ids dense after the restart");
    }
    for event in &received {
        let i = event["id"].as_u64().expect("id") as usize;
        assert!(
            i < stored.len(),
            "event {i} was seen but is gone after kill -9"
        );
        assert_eq!(&stored[i], event, "event {i} changed");
    }
    // And the conversation goes on from there: started again (by the request, or on
    // PostgreSQL already by the restarted node taking over what its killed run held), its
    // runtime loading after everything the client saw.
    let (status, _) = http(
        server.port,
        "POST",
        "/api/conversations",
        Some(&format!(r#"{{"conversation_id":"{id}"}}"#)),
    );
    assert_eq!(status, 200);
    let last_seen = received
        .iter()
        .filter_map(|e| e["id"].as_u64())
        .max()
        .expect("seen events") as usize;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = all_events(server.port, &id);
        let resumed = events
            .iter()
            .skip(last_seen + 1)
            .any(|e| e["extras"]["agent_state"] == "loading");
        if resumed {
            for (i, e) in events.iter().enumerate() {
                assert_eq!(e["id"], i as u64);
            }
            break;
        }
        assert!(Instant::now() < deadline, "the conversation did not resume");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unusable_data_directories_are_refused_clearly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").expect("write");
    let sqlite = [("SWITCHBOARD_STORE", "sqlite")];
    refuses(
        &sqlite,
        &["--data-dir", file.to_str().expect("utf-8")],
        "not a directory",
        Some(free_port()),
    );
    refuses(
        &sqlite,
        &["--data-dir", "/proc/switchboard-data"],
        "/proc/switchboard-data",
        Some(free_port()),
    );
    let garbage = dir.path().join("garbage");
    std::fs::create_dir(&garbage).expect("mkdir");
    std::fs::write(garbage.join("switchboard.db"), vec![7u8; 8192]).expect("write");
    refuses(
        &sqlite,
        &["--data-dir", garbage.to_str().expect("utf-8")],
        "switchboard.db",
        Some(free_port()),
    );
    // The garbage is left as it was: nothing started on top of it.
    assert_eq!(
        std::fs::read(garbage.join("switchboard.db")).expect("read"),
        vec![7u8; 8192]
    );
}

/// A mounted tmpfs of `size` (e.g. `256k`), unmounted when dropped; `None` (the test prints
/// `SKIPPED`) where mounting needs rights this process lacks.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_str().expect("utf-8");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", path])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("SKIPPED: cannot mount a small tmpfs here (needs root)");
            return None;
        }
        Some(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Free bytes on it.
    fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(self.path())
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Creates conversations with big first messages until the server refuses one; their ids and
/// the refusal.
fn fill_up(port: u16) -> (Vec<String>, (u16, Value)) {
    let big = "x".repeat(16 * 1024);
    let mut created = Vec::new();
    for _ in 0..200 {
        let body = format!(r#"{{"initial_user_msg":"{big}"}}"#);
        let (status, body) = http(port, "POST", "/api/conversations", Some(&body));
        if status != 200 {
            return (created, (status, body));
        }
        created.push(body["conversation_id"].as_str().expect("id").to_string());
    }
    panic!("the disk never filled up");
}

#[test]
fn a_full_disk_is_a_clear_503_not_a_crash() {
    let Some(disk) = SmallDisk::mount("256k") else {
        return;
    };
    let work = tempfile::tempdir().expect("temp dir");
    let mut server = Server::start_in(work, disk.path(), "sqlite");
    let (_, (status, body)) = fill_up(server.port);
    assert_eq!(status, 503, "{body}");
    // Readiness says so (its store probe is reused for a second, then asked again).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, ready) = http(server.port, "GET", "/ready", None);
        if status == 503 {
            assert_eq!(ready["status"], "store_unavailable", "{ready}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready stayed 200 on a full disk"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Storage error")),
        "{body}"
    );
    let (status, _) = http(server.port, "GET", "/alive", None);
    assert_eq!(status, 200, "the server must survive a full disk");
    let (status, list) = http(server.port, "GET", "/api/conversations?limit=5", None);
    assert_eq!(status, 200);
    assert!(!list["results"].as_array().expect("results").is_empty());
    server.drain_nonblocking();
    assert!(
        !server.seen.iter().any(|l| l.contains("panicked")),
        "{:#?}",
        server.seen
    );
}

#[test]
fn two_servers_never_share_a_data_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let first = Server::start_in(tempfile::tempdir().expect("temp dir"), &data, "sqlite");
    let (status, _) = http(first.port, "GET", "/alive", None);
    assert_eq!(status, 200);
    refuses(
        &[("SWITCHBOARD_STORE", "sqlite")],
        &["--data-dir", data.to_str().expect("utf-8")],
        "in use by another switchboard process",
        Some(free_port()),
    );
}

/// What one round of the delete/join/attach race saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Seen {
    /// The join reached the old conversation (and was deleted with it).
    JoinedOld,
    /// The join came after the delete and created a new conversation.
    CreatedNew,
    /// The socket was attached to the old conversation and told it was deleted.
    SocketToldDeleted,
    /// The socket was attached to the new conversation.
    SocketOnNew,
    /// The socket found no conversation.
    SocketNotFound,
}

/// Attaches a plain WebSocket to `id` and reads until the outcome is clear.
async fn race_socket(client: &awc::Client, port: u16, id: &str, old: &str, new: &str) -> Seen {
    use futures_util::StreamExt;
    let url = format!("ws://127.0.0.1:{port}/ws/conversations/{id}?latest_event_id=-1");
    let mut ws = match client.ws(url).connect().await {
        Ok((_, ws)) => ws,
        Err(awc::error::WsClientError::InvalidResponseStatus(s)) if s.as_u16() == 404 => {
            return Seen::SocketNotFound
        }
        Err(e) => panic!("{id}: socket failed: {e}"),
    };
    let mut messages = Vec::new();
    let mut deleted = false;
    loop {
        let frame = actix_web::rt::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap_or_else(|_| panic!("{id}: the socket heard nothing for 10 s: {messages:?}"));
        match frame {
            Some(Ok(awc::ws::Frame::Text(text))) => {
                let v: Value = serde_json::from_slice(&text).expect("JSON frame");
                if v["action"] == "message" && v["source"] == "user" {
                    messages.push(v["args"]["content"].as_str().unwrap_or("").to_string());
                }
                if v["observation"] == "agent_state_changed"
                    && v["extras"]["agent_state"] == "stopped"
                {
                    assert_eq!(v["extras"]["reason"], "conversation deleted", "{id}: {v}");
                    deleted = true;
                }
                if messages.iter().any(|m| m == new) {
                    assert!(!messages.iter().any(|m| m == old), "{id}: {messages:?}");
                    return Seen::SocketOnNew;
                }
            }
            Some(Ok(awc::ws::Frame::Close(reason))) => {
                let reason = reason.and_then(|r| r.description).unwrap_or_default();
                if reason.contains("not found") {
                    assert!(messages.is_empty(), "{id}: {messages:?}");
                    return Seen::SocketNotFound;
                }
                // Attached to the old one: told it was deleted, then closed. (Its history may
                // be gone before the replay read it; the live `stopped` event never is.)
                assert!(reason.contains("conversation deleted"), "{id}: {reason:?}");
                assert!(
                    deleted,
                    "{id}: closed without the stopped event: {reason:?}"
                );
                assert!(messages.iter().all(|m| m == old), "{id}: {messages:?}");
                return Seen::SocketToldDeleted;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{id}: socket error: {e}"),
            None => panic!("{id}: the socket ended without a close frame: {messages:?}"),
        }
    }
}

/// One round: a conversation, then DELETE, a POST that joins it and a socket, all at once.
async fn race_round(client: &awc::Client, port: u16, round: usize) -> Vec<Seen> {
    let base = format!("http://127.0.0.1:{port}/api/conversations");
    let id = format!("race-{round}");
    let (old, new) = (format!("old {round}"), format!("new {round}"));
    let body = |msg: &str| serde_json::json!({"conversation_id": id, "initial_user_msg": msg});
    let mut created = client
        .post(&base)
        .send_json(&body(&old))
        .await
        .expect("POST");
    assert_eq!(created.status(), 200, "{:?}", created.body().await);
    let delete = async {
        let mut r = client
            .delete(format!("{base}/{id}"))
            .send()
            .await
            .expect("DELETE");
        let answer: Value = r.json().await.expect("DELETE body");
        (r.status().as_u16(), answer)
    };
    let join = async {
        let mut r = client
            .post(&base)
            .send_json(&body(&new))
            .await
            .expect("POST");
        let answer: Value = r.json().await.expect("POST body");
        (r.status().as_u16(), answer)
    };
    let attach = race_socket(client, port, &id, &old, &new);
    // Which request leaves first alternates, so both orders of delete and join are seen.
    let ((deleted, deleted_body), (joined, join_body), socket) = if round.is_multiple_of(2) {
        futures_util::future::join3(delete, join, attach).await
    } else {
        let (j, d, a) = futures_util::future::join3(join, delete, attach).await;
        (d, j, a)
    };
    assert_eq!((deleted, deleted_body), (200, Value::Bool(true)), "{id}");
    assert_eq!(joined, 200, "{id}: {join_body}");
    let mut after = client
        .get(format!("{base}/{id}"))
        .send()
        .await
        .expect("GET");
    let info: Value = after.json().await.expect("GET body");
    let join_seen = if join_body["message"].is_string() {
        // Joined the old one before the delete: deleted with it, nothing is left.
        assert_eq!(info, Value::Null, "{id}: joined the old one, yet: {info}");
        assert_ne!(socket, Seen::SocketOnNew, "{id}");
        Seen::JoinedOld
    } else {
        // Came after the delete: a brand-new conversation with only the new message.
        assert_eq!(info["conversation_id"], id.as_str(), "{id}: {info}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The answer does not wait for the first events to be durable.
            let said: Vec<String> = all_events(port, &id)
                .iter()
                .filter(|e| e["action"] == "message" && e["source"] == "user")
                .filter_map(|e| e["args"]["content"].as_str().map(str::to_string))
                .collect();
            if !said.is_empty() || Instant::now() > deadline {
                assert_eq!(said, [new.as_str()], "{id}");
                break;
            }
            actix_web::rt::time::sleep(Duration::from_millis(10)).await;
        }
        Seen::CreatedNew
    };
    vec![join_seen, socket]
}

#[test]
fn delete_racing_a_join_and_an_attach_is_consistent_and_logs_no_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let work = tempfile::tempdir().expect("temp dir");
    // Every round creates conversations quickly: the creation rate limit is not under test.
    let mut server = Server::start_with(
        work,
        &data,
        "sqlite",
        &[("SWITCHBOARD_CREATE_RATE_PER_SEC", "0")],
    );
    let port = server.port;
    let rounds = 200;
    let seen = actix_web::rt::System::new().block_on(async move {
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(30))
            .finish();
        let mut seen = std::collections::BTreeMap::<Seen, usize>::new();
        for round in 0..rounds {
            for s in race_round(&client, port, round).await {
                *seen.entry(s).or_default() += 1;
            }
        }
        seen
    });
    eprintln!("{rounds} rounds of DELETE + joining POST + socket: {seen:?}");
    let pid = server.child.0.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let exit = server.child.wait_for_exit(Duration::from_secs(30));
    server.drain();
    assert!(exit.is_some_and(|e| e.success()), "exit {exit:?}");
    let errors: Vec<&String> = server.seen.iter().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "ERROR lines in the server log: {errors:#?}"
    );
}

// ---- no process left behind --------------------------------------------------------------

/// An agent that starts five sleepers in every way a process can try to get away — a plain
/// child, `nohup … &` from a shell that exits, `setsid`, a daemonizing `setsid -f`, and a
/// daemon with a cleared environment — then says `ready`, and exits on `stop`.
const RUNAWAY_AGENT: &str = r#"
import json, subprocess, sys
mark = sys.argv[1]
if not sys.stdin.readline():
    sys.exit(0)
subprocess.Popen(["sleep", mark])
subprocess.run(["sh", "-c", "nohup sleep " + mark + " >/dev/null 2>&1 &"])
subprocess.Popen(["setsid", "sleep", mark])
subprocess.run(["setsid", "-f", "sleep", mark])
subprocess.run(["setsid", "-f", "env", "-i", "sleep", mark])
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    if json.loads(line).get("type") == "stop":
        break
"#;

/// How many sleepers each runaway agent starts.
const RUNAWAYS: usize = 5;

/// A `sleep` argument no other test uses, so that this test's sleepers are found by it alone.
fn unique_mark() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}.{}{n:03}", 7000 + n, std::process::id())
}

/// Live (non-zombie) processes whose command line is `sleep <mark>`.
fn sleepers(mark: &str) -> Vec<u32> {
    let want = format!("sleep\0{mark}\0");
    live_with_cmdline(|c| c == want.as_bytes())
}

/// Live (non-zombie) processes whose command line (`/proc/<pid>/cmdline`) passes `check`.
fn live_with_cmdline(check: impl Fn(&[u8]) -> bool) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| check(&c))
                && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
                    == Some(false)
        })
        .collect()
}

/// Waits until `check` holds for the sleepers of `mark`, at most `secs`.
fn wait_sleepers(mark: &str, secs: u64, check: impl Fn(usize) -> bool) -> Vec<u32> {
    wait_pids(
        &format!("sleepers of {mark}"),
        secs,
        || sleepers(mark),
        check,
    )
}

/// Waits until `check` holds for the number of processes `find` finds, at most `secs`.
fn wait_pids(
    what: &str,
    secs: u64,
    find: impl Fn() -> Vec<u32>,
    check: impl Fn(usize) -> bool,
) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let found = find();
        if check(found.len()) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {found:?} after {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the sleepers of `mark` should the test fail before the server did.
struct KillSleepers(String);

impl Drop for KillSleepers {
    fn drop(&mut self) {
        for pid in sleepers(&self.0) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// A data directory, a runaway agent and the mark of its sleepers, for one test; kills the
/// sleepers should the test fail before the server did.
struct Runaways {
    dir: tempfile::TempDir,
    mark: String,
    _cleanup: KillSleepers,
}

impl Runaways {
    fn new() -> Runaways {
        // Not under /tmp: a sandboxed agent sees a private, empty one.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        std::fs::write(dir.path().join("runaway.py"), RUNAWAY_AGENT).expect("write agent");
        let mark = unique_mark();
        Runaways {
            dir,
            _cleanup: KillSleepers(mark.clone()),
            mark,
        }
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// A server with the `store` backend on the data directory, running the runaway agent.
    fn server(&self, store: &str) -> Server {
        self.server_with(store, &[])
    }

    /// Like [`Runaways::server`], with more settings.
    fn server_with(&self, store: &str, more: &[(&str, &str)]) -> Server {
        let command = format!(
            "python3 {} {}",
            self.dir.path().join("runaway.py").display(),
            self.mark
        );
        let mut envs = vec![
            ("SWITCHBOARD_RUNTIME", "process"),
            ("SWITCHBOARD_PROCESS_COMMAND", command.as_str()),
            ("SWITCHBOARD_PROCESS_STOP_GRACE_SECS", "2"),
            // Not about authentication: keep the generated key out of the way.
            ("SWITCHBOARD_SESSION_API_KEY", ""),
        ];
        envs.extend_from_slice(more);
        let work = tempfile::tempdir().expect("temp dir");
        Server::start_with(work, &self.data(), store, &envs)
    }
}

/// The agent records in a data directory.
fn agent_records(data: &Path) -> Vec<switchboard::runtime::process_tree::AgentRecord> {
    let Ok(dir) = std::fs::read_dir(data.join("agents")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let path = e.ok()?.path();
        if path.extension()? != "json" {
            return None;
        }
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    })
    .collect()
}

#[test]
fn stopping_a_conversation_ends_everything_its_agent_started() {
    let runaways = Runaways::new();
    let (mark, data) = (runaways.mark.as_str(), runaways.data());
    let server = runaways.server("memory");

    let (status, body) = server.request("POST", "/api/conversations", Some("{}"));
    assert_eq!(status, 200, "{body}");
    let id = body["conversation_id"].as_str().expect("id").to_string();
    wait_sleepers(mark, 30, |n| n == RUNAWAYS);
    assert_eq!(
        agent_records(&data).len(),
        1,
        "the running agent is recorded"
    );

    let (status, body) =
        server.request("POST", &format!("/api/conversations/{id}/stop"), Some("{}"));
    assert_eq!(status, 200, "{body}");
    wait_sleepers(mark, 15, |n| n == 0);
    // The record goes once the server has seen that all is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent_records(&data).is_empty() {
        assert!(Instant::now() < deadline, "the agent record stays");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the agent records in `data` name every one of `pids`: the daemon with a cleared
/// environment is found through the records alone once the server is gone.
fn wait_recorded(data: &Path, pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let recorded: Vec<u32> = agent_records(data)
            .iter()
            .flat_map(|r| r.members.iter().map(|(pid, _)| *pid as u32))
            .collect();
        if pids.iter().all(|p| recorded.contains(p)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pids:?} not all in {recorded:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kill_9_of_the_server_then_a_restart_leaves_no_agent_process() {
    let runaways = Runaways::new();
    let (mark, data) = (runaways.mark.as_str(), runaways.data());
    let mut server = runaways.server("sqlite");
    for _ in 0..2 {
        let (status, body) = server.request("POST", "/api/conversations", Some("{}"));
        assert_eq!(status, 200, "{body}");
    }
    let pids = wait_sleepers(mark, 30, |n| n == 2 * RUNAWAYS);
    wait_recorded(&data, &pids);

    server.kill_9();
    // The agents died with the server; what they started did not.
    let survivors = sleepers(mark);
    assert_eq!(survivors.len(), 2 * RUNAWAYS, "{survivors:?}");

    // The next start on the same data directory sweeps them before it listens.
    let server = runaways.server("sqlite");
    let left = sleepers(mark);
    assert!(left.is_empty(), "left after the restart: {left:?}");
    assert!(agent_records(&data).is_empty());
    let (status, _) = server.request("GET", "/alive", None);
    assert_eq!(status, 200);
}

/// Live agent processes of the runaway agent with `mark` (pooled or serving a conversation).
fn runaway_agents(mark: &str) -> Vec<u32> {
    let tail = format!("runaway.py\0{mark}\0");
    live_with_cmdline(|c| c.ends_with(tail.as_bytes()))
}

/// Waits until `check` holds for the runaway agents of `mark`, at most `secs`.
fn wait_runaway_agents(mark: &str, secs: u64, check: impl Fn(usize) -> bool) -> Vec<u32> {
    wait_pids(
        &format!("agents of {mark}"),
        secs,
        || runaway_agents(mark),
        check,
    )
}

/// The directories pooled agents use in a data directory (`workspaces/.pool-…`).
fn pool_dirs(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("workspaces"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(".pool-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn warm_agents_never_outlive_the_server_killed_or_stopped() {
    let runaways = Runaways::new();
    let (mark, data) = (runaways.mark.as_str(), runaways.data());
    let warm = [("SWITCHBOARD_PROCESS_WARM", "2")];
    let mut server = runaways.server_with("sqlite", &warm);
    // Two agents wait before any request, in directories of their own.
    wait_runaway_agents(mark, 30, |n| n == 2);
    let pooled = scrape_until(server.port, "two pooled agents", |s| {
        sample(s, "switchboard_pool_agents", &[]) == Some(2.0)
    });
    assert_eq!(
        sample(
            &pooled,
            "switchboard_conversations",
            &[("status", "running")]
        ),
        Some(0.0)
    );
    assert_eq!(pool_dirs(&data).len(), 2);
    assert_eq!(agent_records(&data).len(), 2, "pooled agents are recorded");

    // A conversation takes one (it starts its sleepers once it has its init); the pool refills.
    let (status, body) = server.request("POST", "/api/conversations", Some("{}"));
    assert_eq!(status, 200, "{body}");
    let id = body["conversation_id"].as_str().expect("id").to_string();
    wait_status(server.port, &id, "RUNNING");
    let pids = wait_sleepers(mark, 30, |n| n == RUNAWAYS);
    wait_recorded(&data, &pids);
    wait_runaway_agents(mark, 30, |n| n == 3);
    assert!(data.join("workspaces").join(&id).is_dir());

    // kill -9: the agents, pooled or not, die with the server; what the conversation's agent
    // started is swept by the next start, which also removes the pooled agents' directories.
    server.kill_9();
    wait_runaway_agents(mark, 10, |n| n == 0);
    assert_eq!(sleepers(mark).len(), RUNAWAYS);
    assert!(!pool_dirs(&data).is_empty());
    let server = runaways.server("sqlite");
    assert!(sleepers(mark).is_empty());
    assert!(agent_records(&data).is_empty());
    assert!(pool_dirs(&data).is_empty(), "{:?}", pool_dirs(&data));
    drop(server);

    // SIGTERM: the shutdown stops the pooled agents too, and removes their directories.
    let mut server = runaways.server_with("sqlite", &warm);
    wait_runaway_agents(mark, 30, |n| n == 2);
    signal(&server, "TERM");
    let exit = server
        .child
        .wait_for_exit(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    server.drain();
    assert!(exit.success(), "{exit}: {:#?}", server.seen);
    assert!(runaway_agents(mark).is_empty());
    assert!(sleepers(mark).is_empty());
    assert!(agent_records(&data).is_empty());
    assert!(pool_dirs(&data).is_empty(), "{:?}", pool_dirs(&data));
}

#[test]
fn a_broken_agent_command_backs_off_instead_of_spinning() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let envs = [
        ("SWITCHBOARD_RUNTIME", "process"),
        (
            "SWITCHBOARD_PROCESS_COMMAND",
            "sh -c 'echo broken >&2; exit 3'",
        ),
        ("SWITCHBOARD_PROCESS_WARM", "3"),
        ("SWITCHBOARD_SESSION_API_KEY", ""),
    ];
    let work = tempfile::tempdir().expect("temp dir");
    let mut server = Server::start_with(work, &data, "memory", &envs);
    let failed = scrape_until(server.port, "a failed start", |s| {
        sample(s, "switchboard_pool_spawn_failures_total", &[]).is_some_and(|n| n >= 1.0)
    });
    let first = sample(&failed, "switchboard_pool_spawn_failures_total", &[]).unwrap_or(0.0);
    std::thread::sleep(Duration::from_secs(3));
    let later = scrape(server.port, &[]);
    let failures = sample(&later, "switchboard_pool_spawn_failures_total", &[]).unwrap_or(0.0);
    // Backing off from half a second, doubling: a handful of tries in three seconds, where a
    // loop without a pause would have made thousands.
    assert!(failures - first <= 6.0, "{first} then {failures}");
    server.wait_line(Duration::from_secs(5), |l| {
        l.contains("pooled agent exited while waiting")
    });
    // A create is not held up by the pool: it starts its own agent, which fails as usual.
    let (status, body) = server.request("POST", "/api/conversations", Some("{}"));
    assert_eq!(status, 200, "{body}");
    let id = body["conversation_id"].as_str().expect("id").to_string();
    wait_status(server.port, &id, "STOPPED");
}

#[test]
fn a_sandboxed_agent_takes_everything_it_started_with_it() {
    if !sandbox::bwrap_works() {
        return;
    }
    let runaways = Runaways::new();
    let mark = runaways.mark.as_str();
    let sandbox = [("SWITCHBOARD_PROCESS_SANDBOX", "bwrap")];
    let mut server = runaways.server_with("sqlite", &sandbox);

    // Stopping the conversation: every sleeper, those that left the agent's session included.
    let (status, body) = server.request("POST", "/api/conversations", Some("{}"));
    assert_eq!(status, 200, "{body}");
    let id = body["conversation_id"].as_str().expect("id").to_string();
    wait_sleepers(mark, 30, |n| n == RUNAWAYS);
    let (status, body) =
        server.request("POST", &format!("/api/conversations/{id}/stop"), Some("{}"));
    assert_eq!(status, 200, "{body}");
    wait_sleepers(mark, 15, |n| n == 0);

    // `kill -9` of the server: the agent dies with it, and everything it started with the
    // agent's PID namespace, with no restart to sweep them.
    let (status, body) = server.request("POST", "/api/conversations", Some("{}"));
    assert_eq!(status, 200, "{body}");
    wait_sleepers(mark, 30, |n| n == RUNAWAYS);
    server.kill_9();
    wait_sleepers(mark, 15, |n| n == 0);
}

/// `setsid sleep <mark>`: a process that leads its own session, like an agent.
fn session_leader(mark: &str) -> Guard {
    Guard(
        Command::new("setsid")
            .args(["sleep", mark])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn setsid sleep"),
    )
}

fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    rest.split(' ')
        .nth(19)
        .and_then(|s| s.parse().ok())
        .expect("start time")
}

#[test]
fn the_sweep_never_kills_a_reused_pid() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let records = data.join("agents");
    std::fs::create_dir_all(&records).expect("mkdir");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("boot id")
        .trim()
        .to_string();
    // Two live session leaders; a previous run (a server that is gone) recorded an agent at
    // each pid, one with the right start time, one a tick earlier — the pid was reused since.
    let mark = unique_mark();
    let _cleanup = KillSleepers(mark.clone());
    let mut innocent = session_leader(&mark);
    let mut agent = session_leader(&mark);
    wait_sleepers(&mark, 10, |n| n == 2);
    for (child, shift) in [(&innocent, 1), (&agent, 0)] {
        let pid = child.0.id();
        let record = switchboard::runtime::process_tree::AgentRecord {
            conversation_id: format!("c{pid}"),
            pid: pid as i32,
            start_time: start_time(pid) - shift,
            token: format!("token-{pid}"),
            boot_id: boot_id.clone(),
            server_pid: i32::MAX,
            server_start_time: 1,
            members: Vec::new(),
        };
        std::fs::write(
            records.join(format!("{pid}.json")),
            serde_json::to_vec(&record).expect("json"),
        )
        .expect("write record");
    }

    let server = Server::start_with(tempfile::tempdir().expect("temp dir"), &data, "memory", &[]);
    let exit = agent.wait_for_exit(Duration::from_secs(5));
    assert!(exit.is_some(), "the recorded agent was not killed");
    assert_eq!(
        innocent.0.try_wait().expect("try_wait"),
        None,
        "a process whose start time differs from the record was killed"
    );
    assert!(
        agent_records(&data).is_empty(),
        "both records are done with"
    );
    drop(server);
    let _ = innocent.0.kill();
}

// ---- operations: metrics, readiness, shutdown, request ids, configuration -------------------

/// One sample of a scrape.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    value: f64,
}

/// A scrape, parsed strictly: every line must be a `# HELP`/`# TYPE` comment or a sample of a
/// declared family in the Prometheus text format (0.0.4); anything else fails the test.
#[derive(Debug, Default)]
struct Scrape {
    types: std::collections::HashMap<String, String>,
    samples: Vec<Sample>,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses `{k="v",…}` (escapes `\\`, `\"`, `\n`); the rest of the line after `}`.
fn parse_labels(text: &str) -> (std::collections::BTreeMap<String, String>, &str) {
    let mut labels = std::collections::BTreeMap::new();
    let mut rest = text.strip_prefix('{').expect("labels start with {");
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after);
        }
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label in {text}"));
        assert!(valid_name(key), "label name {key:?} in {text}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => panic!("bad escape {other:?} in {text}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {text}"),
            }
        };
        assert!(
            labels.insert(key.to_string(), value).is_none(),
            "repeated label in {text}"
        );
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("HELP"), Some(name), _) => assert!(valid_name(name), "{line}"),
                    (Some("TYPE"), Some(name), Some(kind)) => {
                        assert!(valid_name(name), "{line}");
                        let kinds = ["counter", "gauge", "histogram", "summary", "untyped"];
                        assert!(kinds.contains(&kind), "{line}");
                        scrape.types.insert(name.to_string(), kind.to_string());
                    }
                    _ => panic!("unexpected comment: {line}"),
                }
                continue;
            }
            let name_end = line
                .find(['{', ' '])
                .unwrap_or_else(|| panic!("sample: {line}"));
            let name = &line[..name_end];
            assert!(valid_name(name), "{line}");
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..])
            } else {
                (Default::default(), &line[name_end..])
            };
            let value = rest.trim();
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                "NaN" => f64::NAN,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line}")),
            };
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| {
                    let base = name.strip_suffix(suffix)?;
                    (scrape.types.get(base).map(String::as_str) == Some("histogram"))
                        .then_some(base)
                })
                .unwrap_or(name);
            assert!(scrape.types.contains_key(family), "no TYPE for {line}");
            scrape.samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        scrape
    }
}

/// `GET /metrics`, parsed strictly.
fn scrape(port: u16, headers: &[(&str, &str)]) -> Scrape {
    let answer = http_raw(port, "GET", "/metrics", headers, None);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        answer
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{}",
        answer.head
    );
    Scrape::parse(&answer.body)
}

/// Scrapes until `done` holds for a scrape (at most 10 s), and returns that scrape.
fn scrape_until(port: u16, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = scrape(port, &[]);
        if done(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the sample `name` whose labels include `labels` (for a histogram, ask for
/// `<name>_count`).
fn sample(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// Polls `GET /api/conversations/{id}` until its status is `status`.
fn wait_status(port: u16, id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, info) = http(port, "GET", &format!("/api/conversations/{id}"), None);
        if info["status"] == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never became {status}: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_are_prometheus_text_and_move_as_conversations_start_and_stop() {
    let mut server = Server::start();
    let port = server.port;
    let before = scrape(port, &[]);
    for name in [
        "switchboard_conversations",
        "switchboard_build_info",
        "switchboard_start_time_seconds",
        "switchboard_events_appended_total",
        "switchboard_store_commit_duration_seconds_count",
        "switchboard_store_commit_batch_size_count",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            before.samples.iter().any(|s| s.name == name),
            "{name} missing"
        );
    }
    assert_eq!(
        sample(
            &before,
            "switchboard_conversations",
            &[("status", "running")]
        ),
        Some(0.0)
    );
    assert!(sample(&before, "process_resident_memory_bytes", &[]).unwrap_or(0.0) > 1e6);
    let events_before = sample(&before, "switchboard_events_appended_total", &[]).unwrap_or(-1.0);

    let (status, body) = http(port, "POST", "/api/conversations", Some("{}"));
    assert_eq!(status, 200, "{body}");
    let id = body["conversation_id"].as_str().expect("id").to_string();
    wait_status(port, &id, "RUNNING");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = watch(port, id.clone(), seen.clone());
    let running = scrape_until(port, "the client never counted as attached", |now| {
        sample(now, "switchboard_clients_attached", &[("transport", "ws")]) == Some(1.0)
    });
    assert_eq!(
        sample(
            &running,
            "switchboard_conversations",
            &[("status", "running")]
        ),
        Some(1.0)
    );
    assert!(sample(
        &running,
        "switchboard_conversation_start_duration_seconds_count",
        &[("result", "ready")]
    )
    .is_some_and(|n| n >= 1.0));
    assert!(sample(&running, "switchboard_events_appended_total", &[])
        .is_some_and(|n| n > events_before));
    // Request durations are labelled by route pattern, never by the raw path or id.
    assert!(sample(
        &running,
        "switchboard_request_duration_seconds_count",
        &[
            ("method", "POST"),
            ("route", "/api/conversations"),
            ("status", "200")
        ]
    )
    .is_some_and(|n| n >= 1.0));
    assert!(sample(
        &running,
        "switchboard_request_duration_seconds_count",
        &[
            ("method", "GET"),
            ("route", "/api/conversations/{conversation_id}")
        ]
    )
    .is_some());
    assert!(
        !running
            .samples
            .iter()
            .any(|s| s.labels.values().any(|v| v.contains(&id))),
        "a conversation id leaked into a label"
    );

    let (status, _) = http(port, "POST", &format!("/api/conversations/{id}/stop"), None);
    assert_eq!(status, 200);
    let _ = client.join();
    let stopped = scrape_until(port, "the stop never showed in the metrics", |now| {
        sample(now, "switchboard_clients_attached", &[("transport", "ws")]) == Some(0.0)
            && sample(now, "switchboard_conversations", &[("status", "running")]) == Some(0.0)
    });
    assert_eq!(
        sample(
            &stopped,
            "switchboard_conversation_stops_total",
            &[("reason", "user")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &stopped,
            "switchboard_clients_detached_total",
            &[("reason", "conversation_stopped")]
        ),
        Some(1.0)
    );
    server.drain_nonblocking();
}

#[test]
fn metrics_need_the_key_when_one_is_set_unless_configured_otherwise() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = Server::start_with_args(dir, &data, "memory", &["--session-api-key", "k3y"], &[]);
    let answer = http_raw(server.port, "GET", "/metrics", &[], None);
    assert_eq!(answer.status, 401, "{}", answer.body);
    let wrong = http_raw(
        server.port,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer nope")],
        None,
    );
    assert_eq!(wrong.status, 401);
    scrape(server.port, &[("Authorization", "Bearer k3y")]);
    scrape(server.port, &[("X-Session-API-Key", "k3y")]);
    // Readiness and liveness never need it.
    assert_eq!(http(server.port, "GET", "/ready", None).0, 200);

    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let open = Server::start_with_args(
        dir,
        &data,
        "memory",
        &["--session-api-key", "k3y"],
        &[("SWITCHBOARD_METRICS_REQUIRE_KEY", "false")],
    );
    scrape(open.port, &[]);
}

#[test]
fn request_ids_round_trip_and_appear_in_the_access_log() {
    let mut server = Server::start();
    let port = server.port;
    let answer = http_raw(
        port,
        "POST",
        "/api/conversations",
        &[("X-Request-Id", "trace-me-42")],
        Some("{}"),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("x-request-id"), Some("trace-me-42"));
    let line = server.wait_line(Duration::from_secs(10), |l| {
        l.contains("trace-me-42") && l.contains("status=200")
    });
    assert!(line.contains("route=\"/api/conversations\""), "{line}");
    assert!(line.contains("method=\"POST\""), "{line}");
    assert!(line.contains("duration_ms="), "{line}");

    // No id, or one that is not sane: a fresh one is made and echoed.
    let long = "x".repeat(300);
    for headers in [
        vec![],
        vec![("X-Request-Id", "two words")],
        vec![("X-Request-Id", long.as_str())],
    ] {
        let answer = http_raw(port, "GET", "/api/conversations/nope", &headers, None);
        let id = answer.header("x-request-id").expect("an id").to_string();
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        let route = "route=\"/api/conversations/{conversation_id}\"";
        server.wait_line(Duration::from_secs(10), |l| {
            l.contains(&id) && l.contains(route)
        });
    }
    // The session key never reaches the log.
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut keyed = Server::start_with_args(
        dir,
        &data,
        "memory",
        &["--session-api-key", "s3cret-key"],
        &[],
    );
    let answer = http_raw(
        keyed.port,
        "GET",
        "/api/conversations",
        &[
            ("X-Session-API-Key", "s3cret-key"),
            ("X-Request-Id", "keyed-1"),
        ],
        None,
    );
    assert_eq!(answer.status, 200);
    let line = keyed.wait_line(Duration::from_secs(10), |l| l.contains("keyed-1"));
    assert!(line.contains("user=\"key\""), "{line}");
    keyed.drain_nonblocking();
    assert!(!keyed.seen.iter().any(|l| l.contains("s3cret-key")));
}

/// A process-runtime agent that ignores `stop`, the end of its input and SIGTERM, and writes
/// its pid to `<dir>/agent-<conversation id>.pid`.
fn stubborn_agent_config(dir: &Path, bound_secs: u64) -> std::path::PathBuf {
    let script = format!(
        "trap '' TERM; echo $$ > {dir}/agent-$SWITCHBOARD_CONVERSATION_ID.pid; read -r init; \
         echo '{{\"type\":\"ready\"}}'; while true; do sleep 0.2; done",
        dir = dir.display()
    );
    let config = dir.join("stubborn.toml");
    let text = format!(
        "# Not about authentication: no generated key.\nsession_api_key = \"\"\n\
         [limits]\nshutdown_timeout_secs = {bound_secs}\n[runtime]\nkind = \"process\"\n\
         [runtime.process]\nstop_grace_secs = 600\ncommand = [\"sh\", \"-c\", {script:?}]\n"
    );
    std::fs::write(&config, text).expect("write config");
    config
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_string()))
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// A server with one conversation whose agent ignores `stop`; the server and the agent's pid.
fn server_with_a_stubborn_agent(bound_secs: u64) -> (Server, u32, tempfile::TempDir) {
    let agents = tempfile::tempdir().expect("temp dir");
    let config = stubborn_agent_config(agents.path(), bound_secs);
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let config = config.to_str().expect("utf-8").to_string();
    let server = Server::start_with_args(dir, &data, "memory", &["--config", &config], &[]);
    let (status, body) = http(server.port, "POST", "/api/conversations", Some("{}"));
    assert_eq!(status, 200, "{body}");
    let id = body["conversation_id"].as_str().expect("id").to_string();
    wait_status(server.port, &id, "RUNNING");
    let pid_file = agents.path().join(format!("agent-{id}.pid"));
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("agent pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(alive(pid));
    (server, pid, agents)
}

fn signal(server: &Server, name: &str) {
    let pid = server.child.0.id().to_string();
    let sent = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(&pid)
        .status()
        .expect("run kill");
    assert!(sent.success());
}

#[test]
fn ready_turns_503_on_sigterm_before_the_listener_closes_and_the_bound_holds() {
    let bound = 3;
    let (mut server, agent, _agents) = server_with_a_stubborn_agent(bound);
    let port = server.port;
    let (status, body) = http(port, "GET", "/ready", None);
    assert_eq!(
        (status, &body["status"]),
        (200, &Value::from("ready")),
        "{body}"
    );

    let signalled = Instant::now();
    signal(&server, "TERM");
    // The agent ignores `stop`: conversations take until near the bound to stop, and all that
    // time the listener answers, and says it is not ready.
    let deadline = Instant::now() + Duration::from_secs(bound);
    let draining = loop {
        let (status, body) = http(port, "GET", "/ready", None);
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "/ready never turned 503");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(draining["status"], "draining", "{draining}");
    assert_eq!(
        http(port, "GET", "/alive", None).0,
        200,
        "liveness stays 200"
    );
    let exit = server
        .child
        .wait_for_exit(Duration::from_secs(bound + 10))
        .expect("the server exits");
    let took = signalled.elapsed();
    server.drain();
    assert!(exit.success(), "{exit}: {:#?}", server.seen);
    assert!(
        took <= Duration::from_secs(bound) + Duration::from_millis(1500),
        "shutdown took {took:?}, more than its bound of {bound} s: {:#?}",
        server.seen
    );
    assert!(!is_listening(port));
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(agent) {
        assert!(
            Instant::now() < deadline,
            "agent {agent} outlived the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_signal_ends_the_process_at_once() {
    let (mut server, agent, _agents) = server_with_a_stubborn_agent(120);
    let port = server.port;
    signal(&server, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(port, "GET", "/ready", None).0 != 503 {
        assert!(Instant::now() < deadline, "/ready never turned 503");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&server, "INT");
    // Far sooner than the 120 s bound or the agent's 600 s grace period.
    let exit = server
        .child
        .wait_for_exit(Duration::from_secs(10))
        .expect("a second signal ends the process");
    server.drain();
    assert!(!exit.success(), "{exit}");
    assert!(
        server.seen.iter().any(|l| l.contains("second signal")),
        "{:#?}",
        server.seen
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(agent) {
        assert!(
            Instant::now() < deadline,
            "agent {agent} outlived the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unknown_environment_variables_are_refused_with_the_closest_name() {
    refuses(
        &[("SWITCHBOARD_PROT", "4000")],
        &[],
        "unknown environment variable SWITCHBOARD_PROT; did you mean SWITCHBOARD_PORT?",
        Some(free_port()),
    );
    refuses(
        &[("SWITCHBOARD_SHUTDOWN_TIMEOUT", "5")],
        &[],
        "did you mean SWITCHBOARD_SHUTDOWN_TIMEOUT_SECS?",
        Some(free_port()),
    );
    refuses(
        &[("SWITCHBOARD_NOTHING_LIKE_IT", "1")],
        &[],
        "unknown environment variable SWITCHBOARD_NOTHING_LIKE_IT",
        Some(free_port()),
    );
}

#[test]
fn config_prints_the_effective_settings_and_where_each_came_from() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("team.toml");
    std::fs::write(&file, "[limits]\nidle_timeout_secs = 120\n").expect("write");
    let file = file.to_str().expect("utf-8");
    let output = switchboard(dir.path())
        .args(["config", "--config", file, "--port", "4100"])
        .env("SWITCHBOARD_SESSION_API_KEY", "very-secret")
        .env("SWITCHBOARD_LOG", "debug")
        // Not settings, but known: never refused.
        .env("SWITCHBOARD_REQUIRE_CLIENT_TESTS", "1")
        .stdout(Stdio::piped())
        .output()
        .expect("run switchboard config");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |setting: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{setting} = ")))
            .unwrap_or_else(|| panic!("no line for {setting}: {stdout}"))
            .to_string()
    };
    let port = line("port");
    assert!(
        port.contains("4100") && port.ends_with("# flag --port"),
        "{port}"
    );
    let idle = line("limits.idle_timeout_secs");
    assert!(
        idle.contains("120") && idle.ends_with(&format!("# file {file}")),
        "{idle}"
    );
    let log = line("log");
    assert!(
        log.contains("\"debug\"") && log.ends_with("# env SWITCHBOARD_LOG"),
        "{log}"
    );
    let on_limit = line("limits.on_limit");
    assert!(
        on_limit.contains("\"reject\"") && on_limit.ends_with("# default"),
        "{on_limit}"
    );
    let key = line("session_api_key");
    assert!(key.contains("<redacted>"), "{key}");
    assert!(!stdout.contains("very-secret"), "{stdout}");

    // `serve --help` points to every setting without a flag.
    let help = switchboard(dir.path())
        .args(["serve", "--help"])
        .stdout(Stdio::piped())
        .output()
        .expect("run serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("config/default.toml") && help.contains("switchboard config"),
        "{help}"
    );
}

// ---- the OpenHands web app, end to end ----------------------------------------------------

/// Whether CI demands the browser test (`.ci/run` installs Chromium and Playwright).
fn browser_required() -> bool {
    std::env::var("SWITCHBOARD_REQUIRE_BROWSER_TESTS").is_ok_and(|v| v == "1")
}

/// The built OpenHands 0.53.0 web app: `SWITCHBOARD_WEBAPP_FIXTURE`, or the project's shared
/// fixture next to the repository (a test fixture, never part of switchboard).
fn webapp_fixture() -> std::path::PathBuf {
    std::env::var_os("SWITCHBOARD_WEBAPP_FIXTURE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures/openhands-frontend-0.53.0.tar.gz")
        })
}

/// The system Chromium: `SWITCHBOARD_CHROMIUM`, or Debian's paths.
fn chromium() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("SWITCHBOARD_CHROMIUM") {
        return Some(path.into());
    }
    ["/usr/bin/chromium", "/usr/lib/chromium/chromium"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
}

/// Where a failed run's screenshots are kept for CI: `SWITCHBOARD_E2E_ARTIFACTS`, or
/// `<target dir>/e2e-artifacts`.
fn e2e_artifacts_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("SWITCHBOARD_E2E_ARTIFACTS") {
        return dir.into();
    }
    // The test binary is `<target>/<profile>/deps/cli-<hash>`.
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(std::env::temp_dir)
        .join("e2e-artifacts")
}

/// Chromium and a Python with Playwright, or why the browser tests cannot run here.
fn browser() -> Result<(std::path::PathBuf, String), String> {
    let chromium = chromium().ok_or("no Chromium (apt-get install chromium)")?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let playwright = Command::new(&python)
        .args(["-c", "import playwright.async_api"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !playwright {
        return Err("no Playwright for Python (pip install playwright)".into());
    }
    Ok((chromium, python))
}

/// Skips a browser test (`SKIPPED: why`), or fails it when CI demands browser tests.
fn skip_browser_test(why: &str) {
    assert!(!browser_required(), "the browser test is required: {why}");
    eprintln!("SKIPPED: {why}");
}

/// Runs `tests/e2e/<script>` (Playwright, headless Chromium) against `server`, its
/// screenshots going to `shots`: whether it passed, its JSON report and its stderr.
fn drive_browser(
    (chromium, python): &(std::path::PathBuf, String),
    script: &str,
    server: &Server,
    shots: &Path,
    args: &[&str],
) -> (bool, Value, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e")
        .join(script);
    let mut child = Guard(
        Command::new(python)
            .arg(&script)
            .arg("--url")
            .arg(format!("http://127.0.0.1:{}", server.port))
            .arg("--artifacts")
            .arg(shots)
            .arg("--chromium")
            .arg(chromium)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python runs"),
    );
    let mut stdout = child.0.stdout.take().expect("stdout");
    let mut stderr = child.0.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = child.wait_for_exit(Duration::from_secs(300));
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    let report: Value = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    let passed = status.is_some_and(|s| s.success()) && report["ok"] == true;
    (passed, report, err)
}

/// The OpenHands web app, unpacked from its build and served by the real binary with
/// `--frontend`, driven in headless Chromium through `tests/e2e/webapp.py` (Playwright):
/// first-run modals → launch → chat → echo → reload → listed → rename → stop → resume →
/// delete → settings page, with no `/api` answer of 404 or 5xx beyond OpenHands' own protocol.
/// Prints the time from clicking "Launch" to an enabled chat box.
#[test]
fn the_openhands_web_app_works_end_to_end() {
    run_the_web_app(None);
}

/// The same with a session key: the browser logs in once through `/?session_api_key=K` and
/// the HttpOnly cookie carries the key for every `/api` call and socket after that.
#[test]
fn the_openhands_web_app_works_with_a_session_key_through_the_cookie_login() {
    run_the_web_app(Some("e2e-key-5b1c0d"));
}

/// Runs `tests/e2e/webapp.py` against a fresh server; SKIPPED without the fixture, Chromium
/// or Playwright unless `SWITCHBOARD_REQUIRE_BROWSER_TESTS=1`.
fn run_the_web_app(session_key: Option<&str>) {
    let fixture = webapp_fixture();
    if !fixture.is_file() {
        return skip_browser_test(&format!("no web app build at {}", fixture.display()));
    }
    let browser = match browser() {
        Ok(b) => b,
        Err(why) => return skip_browser_test(&why),
    };

    let site = tempfile::tempdir().expect("temp dir");
    let unpacked = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(site.path())
        .status()
        .expect("tar runs");
    assert!(unpacked.success(), "cannot unpack {}", fixture.display());
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let site_arg = site.path().to_str().expect("utf-8 path").to_string();
    let mut args = vec!["--frontend", site_arg.as_str()];
    let mut script_args = Vec::new();
    if let Some(key) = session_key {
        args.extend(["--session-api-key", key]);
        script_args.extend(["--session-key", key]);
    }
    let server = Server::start_with_args(dir, &data, "sqlite", &args, &[]);
    let shots = tempfile::tempdir().expect("temp dir");
    let (passed, report, err) =
        drive_browser(&browser, "webapp.py", &server, shots.path(), &script_args);
    if !passed {
        let keep = e2e_artifacts_dir().join(format!(
            "webapp{}-{}",
            if session_key.is_some() { "-key" } else { "" },
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ));
        let _ = std::fs::create_dir_all(&keep);
        for entry in std::fs::read_dir(shots.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
        }
        panic!(
            "the web app run failed; screenshots in {}\nreport: {report}\n{err}",
            keep.display()
        );
    }
    println!(
        "e2e{}: launch to an enabled chat box: {} ms ({} steps)",
        if session_key.is_some() {
            " with a session key"
        } else {
            ""
        },
        report["launch_to_chat_enabled_ms"],
        report["steps"]
    );
    drop(server);
}

/// The operators' page in headless Chromium (`tests/e2e/status.py`), on a server with a
/// session key: `/status` sends the browser to the login form, the key logs it in, the page
/// lists a conversation created through the API with the totals counting it, its live tail
/// attaches over the plain socket route, and a message posted through the API shows up in the
/// tail. The screenshots stay in `<target>/e2e-artifacts/status/`.
#[test]
fn the_status_page_lists_conversations_and_tails_one_live() {
    let browser = match browser() {
        Ok(b) => b,
        Err(why) => return skip_browser_test(&why),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let key = "status-page-test-key";
    let server = Server::start_with(
        dir,
        &data,
        "sqlite",
        &[("SWITCHBOARD_SESSION_API_KEY", key)],
    );
    let shots = e2e_artifacts_dir().join("status");
    std::fs::create_dir_all(&shots).expect("artifacts dir");
    let (passed, report, err) = drive_browser(
        &browser,
        "status.py",
        &server,
        &shots,
        &["--session-key", key],
    );
    assert!(
        passed,
        "the status page run failed; screenshots in {}\nreport: {report}\n{err}",
        shots.display()
    );
    assert!(shots.join("status-2-tail.png").is_file());
    println!("e2e: status page screenshots in {}", shots.display());
    drop(server);
}

#[test]
fn delete_on_a_full_disk_succeeds_and_gives_the_space_back() {
    let Some(disk) = SmallDisk::mount("1m") else {
        return;
    };
    let work = tempfile::tempdir().expect("temp dir");
    let mut server = Server::start_with(
        work,
        disk.path(),
        "sqlite",
        &[("SWITCHBOARD_DISK_RESERVE_BYTES", "131072")],
    );
    let (created, (status, body)) = fill_up(server.port);
    assert_eq!(status, 503, "{body}");
    assert!(
        created.len() >= 4,
        "only {} conversations fit",
        created.len()
    );
    let full = disk.available();

    let half = created.len() / 2;
    for id in &created[..half] {
        let (status, body) = http(
            server.port,
            "DELETE",
            &format!("/api/conversations/{id}"),
            None,
        );
        if status != 200 {
            server.drain_nonblocking();
        }
        assert_eq!(
            (status, &body),
            (200, &Value::Bool(true)),
            "DELETE {id}: {:#?}",
            server.seen
        );
    }
    let freed = disk.available().saturating_sub(full);
    eprintln!(
        "deleting {half} of {} conversations on a full 1 MiB disk gave back {freed} bytes",
        created.len()
    );
    assert!(freed >= 64 * 1024, "only {freed} bytes came back");
    for id in &created[..half] {
        let (status, body) = http(
            server.port,
            "GET",
            &format!("/api/conversations/{id}"),
            None,
        );
        assert_eq!((status, body), (200, Value::Null), "{id} is gone");
    }
    let (status, body) = http(
        server.port,
        "GET",
        &format!("/api/conversations/{}", created[half]),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(
        body["conversation_id"],
        created[half].as_str(),
        "the rest is kept"
    );
    // And there is room for new work.
    let (status, body) = http(
        server.port,
        "POST",
        "/api/conversations",
        Some(r#"{"initial_user_msg":"hello again"}"#),
    );
    assert_eq!(status, 200, "{body}");
    server.drain_nonblocking();
    assert!(
        !server.seen.iter().any(|l| l.contains("panicked")),
        "{:#?}",
        server.seen
    );
}

// ---- safe by default: the generated key, an explicitly empty key, unfinished bodies ----------

/// The binary with the process runtime running the example shell agent, plus `args`; and the
/// directory that holds the conversations' working directories.
fn shell_agent_server(args: &[&str]) -> (Server, std::path::PathBuf) {
    let agent = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/agents/shell_agent.py"
    );
    let command = format!("python3 '{agent}'");
    let work = tempfile::tempdir().expect("temp dir");
    let data = work.path().join("data");
    let mut all = vec!["--runtime", "process"];
    all.extend_from_slice(args);
    let server = Server::start_with_args(
        work,
        &data,
        "memory",
        &all,
        &[("SWITCHBOARD_PROCESS_COMMAND", command.as_str())],
    );
    (server, data.join("workspaces"))
}

/// What a cross-site page sends: a JSON body with no Content-Type (no CORS preflight) that
/// names its own conversation and first message.
fn cross_site_attack(port: u16) -> (u16, String) {
    let body = r#"{"conversation_id":"pwned","initial_user_msg":"id > pwned"}"#;
    let request = format!(
        "POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Origin: http://evil.example\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange(port, &request);
    (answer.status, answer.body)
}

/// Polls `check` for up to 20 s.
fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "{what} did not happen in 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_process_runtime_requires_a_generated_key_printed_at_start() {
    let (mut server, workspaces) = shell_agent_server(&[]);
    let port = server.port;
    let line = server.wait_line(Duration::from_secs(10), |l| l.contains("session_api_key="));
    let key: String = line[line.find("session_api_key=").expect("key") + 16..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    assert_eq!(key.len(), 48, "{line}");
    assert!(
        line.contains(&format!("http://127.0.0.1:{port}/?session_api_key={key}")),
        "the line names the URL that logs a browser in: {line}"
    );
    assert!(line.contains("X-Session-API-Key"), "{line}");

    // Without the key nothing runs; with it (header, query or login cookie) the agent does.
    let (status, body) = http(
        port,
        "POST",
        "/api/conversations",
        Some(r#"{"conversation_id":"nokey","initial_user_msg":"echo ran > proof"}"#),
    );
    assert_eq!(
        (status, body),
        (401, serde_json::json!({"detail": "Unauthorized"}))
    );
    let body = r#"{"conversation_id":"withkey","initial_user_msg":"echo ran > proof"}"#;
    let request = format!(
        "POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         X-Session-API-Key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange(port, &request);
    assert_eq!(answer.status, 200, "{}", answer.body);
    eventually("the agent's command", || {
        workspaces.join("withkey").join("proof").is_file()
    });
    assert!(!workspaces.join("nokey").exists());
    let login = exchange(
        port,
        &format!(
            "GET /?session_api_key={key} HTTP/1.1\r\nHost: localhost:{port}\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    assert_eq!(login.status, 303, "{}", login.head);
    let cookie = login
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no login cookie: {}", login.head))
        .to_string();
    let list = exchange(
        port,
        &format!(
            "GET /api/conversations HTTP/1.1\r\nHost: localhost:{port}\r\nCookie: {cookie}\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    assert_eq!(list.status, 200, "{}", list.body);
    let (status, _) = http(
        port,
        "GET",
        &format!("/api/conversations?session_api_key={key}"),
        None,
    );
    assert_eq!(status, 200);
    let (status, _) = http(
        port,
        "GET",
        "/api/conversations?session_api_key=wrong",
        None,
    );
    assert_eq!(status, 401);

    // The key is in that one line and in no log line.
    let pid = server.child.0.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    server
        .child
        .wait_for_exit(Duration::from_secs(20))
        .expect("stops on SIGTERM");
    server.drain();
    let with_key: Vec<&String> = server.seen.iter().filter(|l| l.contains(&key)).collect();
    assert_eq!(with_key, vec![&line], "{:#?}", server.seen);

    // Every start has its own key.
    let (mut again, _) = shell_agent_server(&[]);
    let second = again.wait_line(Duration::from_secs(10), |l| l.contains("session_api_key="));
    assert!(!second.contains(&key));
}

#[test]
fn an_explicitly_empty_key_keeps_authentication_off_with_a_warning() {
    let (mut server, workspaces) = shell_agent_server(&["--session-api-key", ""]);
    let port = server.port;
    server.drain_nonblocking();
    let warning = match server
        .seen
        .iter()
        .find(|l| l.contains("authentication is OFF"))
    {
        Some(line) => line.clone(),
        None => server.wait_line(Duration::from_secs(10), |l| {
            l.contains("authentication is OFF")
        }),
    };
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("run commands"),
        "names the risk: {warning}"
    );
    // No key is required …
    let (status, body) = http(
        port,
        "POST",
        "/api/conversations",
        Some(r#"{"conversation_id":"legit","initial_user_msg":"echo ran > proof"}"#),
    );
    assert_eq!(status, 200, "{body}");
    eventually("the agent's command", || {
        workspaces.join("legit").join("proof").is_file()
    });
    // … yet the same request from a web page on another site is refused, and runs nothing.
    let (status, payload) = cross_site_attack(port);
    assert_eq!(status, 403, "{payload}");
    assert!(payload.contains("allowed_origins"), "{payload}");
    let (status, info) = http(port, "GET", "/api/conversations/pwned", None);
    assert_eq!((status, info), (200, Value::Null));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!workspaces.join("pwned").exists());
    server.drain_nonblocking();
    assert!(
        !server.seen.iter().any(|l| l.contains("session_api_key=")),
        "no login line without a key: {:#?}",
        server.seen
    );
}

/// The resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn unfinished_bodies_are_cut_at_the_deadline_and_their_memory_freed() {
    const CLIENTS: usize = 100;
    let work = tempfile::tempdir().expect("temp dir");
    let data = work.path().join("data");
    let mut server = Server::start_with(
        work,
        &data,
        "memory",
        &[("SWITCHBOARD_BODY_TIMEOUT_SECS", "5")],
    );
    let pid = server.child.0.id();
    let port = server.port;
    let before = rss_kib(pid);
    // Three rounds: freed memory may stay with the allocator, but later rounds must not
    // grow the server further (a plateau, not a leak).
    for round in 1..=3 {
        // Each client announces 1 MiB, sends half of it and stops.
        let half = vec![b' '; 512 * 1024];
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let head = format!(
                "POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).expect("head");
            stream.write_all(&half).expect("half a body");
            clients.push(stream);
        }
        std::thread::sleep(Duration::from_millis(500));
        let during = rss_kib(pid);
        let mut statuses = Vec::new();
        for mut stream in clients {
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            let mut raw = Vec::new();
            let _ = stream.read_to_end(&mut raw);
            let text = String::from_utf8_lossy(&raw);
            statuses.push(
                text.split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse::<u16>().ok())
                    .unwrap_or(0),
            );
            assert!(text.contains("body_timeout_secs"), "a clear reason: {text}");
        }
        std::thread::sleep(Duration::from_millis(500));
        let after = rss_kib(pid);
        eprintln!(
            "server RSS, round {round}: {CLIENTS} unfinished 1 MiB bodies (512 KiB sent each): \
             before {before} KiB, while pending {during} KiB, after all were cut {after} KiB"
        );
        assert!(statuses.iter().all(|s| *s == 408), "{statuses:?}");
    }
    let (status, _) = http(port, "GET", "/alive", None);
    assert_eq!(status, 200);
    server.drain_nonblocking();
    assert!(!server.seen.iter().any(|l| l.contains("panicked")));
}

/// What one `switchboard keys …` run said: its success, stdout and stderr.
struct KeysRun {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `switchboard keys ARGS --data-dir DATA` (SQLite, the default store) in `dir`.
fn keys_cli(dir: &Path, data: &Path, args: &[&str]) -> KeysRun {
    keys_cli_on(dir, data, "sqlite", &[], args)
}

/// [`keys_cli`] on the `store` backend, with `envs` (the PostgreSQL URL).
fn keys_cli_on(
    dir: &Path,
    data: &Path,
    store: &str,
    envs: &[(&str, &str)],
    args: &[&str],
) -> KeysRun {
    let output = switchboard(dir)
        .arg("keys")
        .args(args)
        .args(["--store", store, "--data-dir"])
        .arg(data)
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .output()
        .expect("run switchboard keys");
    KeysRun {
        ok: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: strip_ansi(&String::from_utf8_lossy(&output.stderr)),
    }
}

/// `keys add` and returns the key it printed.
fn add_key(dir: &Path, data: &Path, name: &str, admin: bool) -> String {
    add_key_on(dir, data, "sqlite", &[], name, admin)
}

/// [`add_key`] on the `store` backend, with `envs`.
fn add_key_on(
    dir: &Path,
    data: &Path,
    store: &str,
    envs: &[(&str, &str)],
    name: &str,
    admin: bool,
) -> String {
    let mut args = vec!["add", name];
    if admin {
        args.push("--admin");
    }
    let run = keys_cli_on(dir, data, store, envs, &args);
    assert!(run.ok, "keys add {name}: {}", run.stderr);
    let key = run.stdout.trim().to_string();
    assert!(key.starts_with("sbk_") && key.len() == 68, "{key:?}");
    assert!(run.stderr.contains("shown only now"), "{}", run.stderr);
    key
}

/// The `keys list` table as (name, admin) pairs.
fn listed_keys(dir: &Path, data: &Path) -> Vec<(String, String)> {
    let run = keys_cli(dir, data, &["list"]);
    assert!(run.ok, "keys list: {}", run.stderr);
    let mut lines = run.stdout.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(header, ["name", "admin", "created"]);
    lines
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cols.len(), 3, "{l:?}");
            assert!(cols[2].starts_with("20") && cols[2].ends_with('Z'), "{l:?}");
            (cols[0].to_string(), cols[1].to_string())
        })
        .collect()
}

#[test]
fn keys_are_added_listed_and_revoked_and_bad_input_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let d = dir.path();
    assert!(listed_keys(d, &data).is_empty());
    let alice = add_key(d, &data, "alice", false);
    let root = add_key(d, &data, "root", true);
    assert_ne!(alice, root);
    let expected = vec![
        ("alice".to_string(), "no".to_string()),
        ("root".to_string(), "yes".to_string()),
    ];
    assert_eq!(listed_keys(d, &data), expected);
    // The store keeps no key, only hashes.
    let db = std::fs::read(data.join("switchboard.db")).expect("database");
    let db = String::from_utf8_lossy(&db);
    for key in [&alice, &root] {
        assert!(!db.contains(key.as_str()), "a key is stored in clear");
    }
    // The list never shows a key.
    let run = keys_cli(d, &data, &["list"]);
    assert!(!run.stdout.contains("sbk_"), "{}", run.stdout);

    // Bad input: a clear error, exit status 2, nothing printed on stdout, nothing changed.
    let long = "x".repeat(65);
    for (args, says) in [
        (vec!["add", ""], "needs a name"),
        (vec!["add", "alice"], "exists already"),
        (vec!["add", "alice", "--admin"], "exists already"),
        (vec!["add", "has space"], "character ' '"),
        (vec!["add", long.as_str()], "at most 64"),
        (vec!["add", "key"], "reserved"),
        (vec!["revoke", "nobody"], "no key named \"nobody\""),
        (vec!["revoke", ""], "needs a name"),
    ] {
        let run = keys_cli(d, &data, &args);
        assert!(!run.ok, "{args:?} succeeded");
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{args:?}: {:?}", run.stderr);
        assert_eq!(run.stdout, "", "{args:?}");
        assert_eq!(listed_keys(d, &data), expected, "{args:?} changed the keys");
    }

    // Revoked: gone from the list; the name can be given a new key.
    let run = keys_cli(d, &data, &["revoke", "alice"]);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(
        listed_keys(d, &data),
        vec![("root".to_string(), "yes".to_string())]
    );
    let again = add_key(d, &data, "alice", false);
    assert_ne!(again, alice);

    // The memory store cannot hold keys: said clearly.
    let run = switchboard(d)
        .args(["keys", "list", "--store", "memory"])
        .output()
        .expect("run");
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("memory store keeps nothing"));
    // The keys command reads the same configuration layers as `serve`.
    let run = switchboard(d)
        .args(["keys", "list"])
        .env("SWITCHBOARD_DATA_DIR", &data)
        .stdout(Stdio::piped())
        .output()
        .expect("run");
    assert!(run.status.success());
    assert!(String::from_utf8_lossy(&run.stdout).contains("alice"));
}

/// `method path` with `key` and a request id; the answer.
fn keyed(port: u16, method: &str, path: &str, key: &str, request_id: &str) -> Answer {
    let body = (method == "POST").then_some("{}");
    http_raw(
        port,
        method,
        path,
        &[("X-Session-API-Key", key), ("X-Request-Id", request_id)],
        body,
    )
}

#[test]
fn keys_added_and_revoked_beside_a_running_server_count_from_the_next_request() {
    keys_beside_a_running_server("sqlite", &[]);
}

#[test]
fn on_postgres_keys_added_and_revoked_beside_a_running_server_count_from_the_next_request() {
    let Some(db) = pg::database() else { return };
    keys_beside_a_running_server("postgres", &[("SWITCHBOARD_POSTGRES_URL", &db.url)]);
}

#[test]
fn a_key_added_beside_an_open_server_closes_it_from_the_next_request() {
    keys_beside_an_open_server("sqlite", &[]);
}

#[test]
fn on_postgres_a_key_added_beside_an_open_server_closes_it_from_the_next_request() {
    let Some(db) = pg::database() else { return };
    keys_beside_an_open_server("postgres", &[("SWITCHBOARD_POSTGRES_URL", &db.url)]);
}

/// A server with no session key is open while no user key exists; `switchboard keys` run beside
/// it closes and reopens it from the next request on, whatever the server itself wrote (and
/// whatever it remembered about the keys) in between.
fn keys_beside_an_open_server(store: &str, envs: &[(&str, &str)]) {
    let cwd = tempfile::tempdir().expect("temp dir");
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = Server::start_with_args(dir, &data, store, &[], envs);
    let port = server.port;
    let unkeyed = |method: &str, request_id: &str| {
        let body = (method == "POST").then_some("{}");
        http_raw(
            port,
            method,
            "/api/conversations",
            &[("X-Request-Id", request_id)],
            body,
        )
    };
    for (method, request_id) in [("GET", "open-1"), ("POST", "open-2"), ("GET", "open-3")] {
        let answer = unkeyed(method, request_id);
        assert_eq!(answer.status, 200, "{request_id}: {}", answer.body);
    }

    let alice = add_key_on(cwd.path(), &data, store, envs, "alice", false);
    let refused = unkeyed("GET", "closed-1");
    assert_eq!(refused.status, 401, "{}", refused.body);
    // The server's own writes in between change nothing.
    let made = keyed(port, "POST", "/api/conversations", &alice, "alice-1");
    assert_eq!(made.status, 200, "{}", made.body);
    for (method, request_id) in [("POST", "closed-2"), ("GET", "closed-3")] {
        let refused = unkeyed(method, request_id);
        assert_eq!(refused.status, 401, "{request_id}: {}", refused.body);
    }

    // The last key revoked: open again from the next request, but never with that key.
    let run = keys_cli_on(cwd.path(), &data, store, envs, &["revoke", "alice"]);
    assert!(run.ok, "{}", run.stderr);
    let open = unkeyed("GET", "open-4");
    assert_eq!(open.status, 200, "{}", open.body);
    let revoked = keyed(port, "GET", "/api/conversations", &alice, "alice-2");
    assert_eq!(revoked.status, 401, "{}", revoked.body);
}

/// `switchboard keys` run beside a server on the `store` backend (`envs`: its settings).
fn keys_beside_a_running_server(store: &str, envs: &[(&str, &str)]) {
    let cwd = tempfile::tempdir().expect("temp dir");
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let add = |name: &str| add_key_on(cwd.path(), &data, store, envs, name, false);
    let alice = add("alice");
    let mut server = Server::start_with_args(
        dir,
        &data,
        store,
        &["--session-api-key", "s3cret-key"],
        envs,
    );
    let port = server.port;
    let made = keyed(port, "POST", "/api/conversations", &alice, "alice-1");
    assert_eq!(made.status, 200, "{}", made.body);
    let id = serde_json::from_str::<Value>(&made.body).expect("json")["conversation_id"]
        .as_str()
        .expect("id")
        .to_string();
    // The access log names the user, never the key.
    let line = server.wait_line(Duration::from_secs(10), |l| l.contains("alice-1"));
    assert!(line.contains("user=\"alice\""), "{line}");

    // A key added while the server runs works at once, and sees only its own.
    let bob = add("bob");
    let listed = keyed(port, "GET", "/api/conversations", &bob, "bob-1");
    assert_eq!(listed.status, 200, "{}", listed.body);
    let results = serde_json::from_str::<Value>(&listed.body).expect("json")["results"].clone();
    assert_eq!(results, serde_json::json!([]));
    let theirs = keyed(
        port,
        "GET",
        &format!("/api/conversations/{id}"),
        &bob,
        "bob-2",
    );
    assert_eq!((theirs.status, theirs.body.trim()), (200, "null"));
    // The session key is an admin: it sees alice's conversation.
    let admin = keyed(
        port,
        "GET",
        &format!("/api/conversations/{id}"),
        "s3cret-key",
        "k-1",
    );
    assert!(admin.body.contains(&id), "{}", admin.body);

    // Revoked beside the running server: the next request with that key is refused.
    let run = keys_cli_on(cwd.path(), &data, store, envs, &["revoke", "alice"]);
    assert!(run.ok, "{}", run.stderr);
    let refused = keyed(port, "GET", "/api/conversations", &alice, "alice-2");
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.body, r#"{"detail":"Unauthorized"}"#);
    // Her conversation stays, and an admin still sees it.
    let admin = keyed(
        port,
        "GET",
        &format!("/api/conversations/{id}"),
        "s3cret-key",
        "k-2",
    );
    assert!(admin.body.contains(&id), "{}", admin.body);
    server.drain_nonblocking();
    for key in [&alice, &bob] {
        assert!(
            !server.seen.iter().any(|l| l.contains(key.as_str())),
            "a key was logged"
        );
    }
}
