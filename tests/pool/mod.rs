//! The warm pool (`runtime.process.warm`) with real servers and real agents: agents waiting
//! before any request, a create taking one (its directory becoming the conversation's, also in
//! the sandbox), the refill, the limits, a pooled agent dying, the OpenHands agent from the
//! pool, and nothing left once the server stops.
//!
//! Each test marks its agents with an environment variable of its own (pooled agents have no
//! `SWITCHBOARD_CONVERSATION_ID` to be found by); a pooled agent is one whose current directory
//! is a `.pool-…` directory.

use super::*;

/// The environment variable that marks one test's agents and everything they start.
const MARK: &str = "POOL_TEST_MARK";

/// A mark no other test uses.
fn new_mark() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The live processes of the test marked `mark`.
fn marked(mark: &str) -> Vec<u32> {
    pids_with_env(&format!("{MARK}={mark}"))
}

/// The process's current directory.
fn cwd(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// The marked agent processes: the server's (this process's) children, not what they run (a
/// shell wrapper's subshells included).
fn agents(mark: &str) -> Vec<u32> {
    let me = std::process::id();
    marked(mark)
        .into_iter()
        .filter(|pid| proc_state(*pid).is_some_and(|(_, ppid)| ppid == me))
        .collect()
}

/// The agents waiting in the pool: in a `.pool-…` directory.
fn pooled(mark: &str) -> Vec<u32> {
    agents(mark)
        .into_iter()
        .filter(|pid| {
            cwd(*pid).is_some_and(|d| {
                d.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(".pool-"))
            })
        })
        .collect()
}

/// Waits until `check` holds for what `find` finds, at most `secs`; returns it.
async fn wait_for(
    what: &str,
    secs: u64,
    find: impl Fn() -> Vec<u32>,
    check: impl Fn(&[u32]) -> bool,
) -> Vec<u32> {
    let start = Instant::now();
    loop {
        let found = find();
        if check(&found) {
            return found;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: {found:?} after {secs} s"
        );
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the server's pool holds `n` agents ready to be handed out (its
/// `switchboard_pool_agents` gauge): an agent's process exists a little before that.
async fn wait_pool_holds(app: &TestApp, n: usize) {
    let start = Instant::now();
    loop {
        let (status, text) = app.get_text("/metrics").await;
        assert_eq!(status, 200, "{text}");
        let held = text.lines().find_map(|l| {
            l.strip_prefix("switchboard_pool_agents ")?
                .trim()
                .parse::<f64>()
                .ok()
        });
        if held == Some(n as f64) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the pool never held {n} agents: {text}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a command output holding `text`; the events then, and that output.
async fn wait_output(app: &TestApp, id: &str, text: &str) -> (Vec<Value>, String) {
    let events = app
        .wait_events(id, 30, |e| run_output_containing(e, text).is_some())
        .await;
    let output = run_output_containing(&events, text)
        .and_then(|e| e["content"].as_str())
        .unwrap_or_default()
        .to_string();
    (events, output)
}

/// The `.pool-…` directories of a data directory's workspaces (not the links left where a
/// handed-out agent's directory was).
fn pool_dirs(app: &TestApp) -> Vec<String> {
    std::fs::read_dir(app._data_dir.path().join("workspaces"))
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                e.file_type()
                    .ok()?
                    .is_dir()
                    .then_some(e.file_name().into_string().ok()?)
            })
            .filter(|n| n.starts_with(".pool-"))
            .collect()
        })
        .unwrap_or_default()
}

/// A server running the shell agent with `warm` pooled agents, marked `mark`.
async fn pooled_app(mark: &str, warm: usize, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    process_app(vec![python(), SHELL_AGENT.into()], |s| {
        s.runtime.process.warm = warm;
        s.runtime.process.env.insert(MARK.into(), mark.into());
        tweak(s);
    })
    .await
}

/// Stops the server and checks that none of its processes and none of its pool's directories
/// (or links) are left.
async fn shut_down_clean(app: TestApp, mark: &str) {
    let workspaces = app._data_dir.path().join("workspaces");
    let data = app._data_dir.path().to_path_buf();
    let dirs_left = || {
        std::fs::read_dir(&workspaces)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with(".pool-"))
                    .count()
            })
            .unwrap_or(0)
    };
    let keep = app._data_dir.path().to_path_buf();
    let _store = app.shutdown().await;
    wait_for(
        "processes left after the shutdown",
        30,
        || marked(mark),
        <[u32]>::is_empty,
    )
    .await;
    assert_eq!(
        dirs_left(),
        0,
        "pool directories left in {}",
        keep.display()
    );
    let records = std::fs::read_dir(data.join("agents"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(records, 0, "agent records left");
    assert_no_lasting_zombies().await;
}

#[actix_web::test]
async fn warm_agents_wait_before_any_request_and_a_create_takes_one() {
    let mark = new_mark();
    let app = pooled_app(&mark, 2, |_| {}).await;
    let waiting = wait_for("two pooled agents", 30, || pooled(&mark), |p| p.len() == 2).await;
    assert_eq!(app.listed().await, 0, "no conversation yet");
    assert_eq!(pool_dirs(&app).len(), 2);

    // The conversation gets one of them: its commands run in the pooled process, in the
    // conversation's own working directory.
    let id = app
        .create(json!({"initial_user_msg": "echo ppid=$PPID; pwd"}))
        .await;
    app.wait_status(&id, "RUNNING", 30).await;
    let (events, output) = wait_output(&app, &id, "ppid=").await;
    let mut lines = output.lines();
    let ppid: u32 = lines
        .next()
        .and_then(|l| l.strip_prefix("ppid="))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{output}"));
    assert!(waiting.contains(&ppid), "{ppid} not in {waiting:?}");
    let workspace = app._data_dir.path().join("workspaces").join(&id);
    assert_eq!(
        std::fs::canonicalize(lines.next().unwrap()).unwrap(),
        std::fs::canonicalize(&workspace).unwrap()
    );
    assert_eq!(
        cwd(ppid).map(|d| std::fs::canonicalize(d).unwrap()),
        Some(std::fs::canonicalize(&workspace).unwrap())
    );
    // Everything else as a cold agent: the states, the dense log.
    assert_dense(&events);
    assert_eq!(agent_states(&events)[..2], ["loading", "running"]);

    // The pool refills with a new agent; the taken one's directory is the conversation's now.
    let refilled = wait_for(
        "the pool refilled",
        30,
        || pooled(&mark),
        |p| p.len() == 2 && !p.contains(&ppid),
    )
    .await;
    assert_eq!(pool_dirs(&app).len(), 2);

    // Stopping the conversation ends its agent, and only it.
    stop(&app, &id).await;
    wait_for(
        "the conversation's agent gone",
        30,
        || agents(&mark),
        |a| !a.contains(&ppid),
    )
    .await;
    assert_eq!(pooled(&mark), refilled);

    shut_down_clean(app, &mark).await;
}

#[actix_web::test]
async fn pooled_agents_count_toward_the_running_limit_and_give_way_to_conversations() {
    let mark = new_mark();
    let app = pooled_app(&mark, 2, |s| {
        s.limits.max_running_conversations = 2;
        s.limits.on_limit = switchboard::config::OnLimit::Reject;
    })
    .await;
    let shell_agents = || agents(&mark);
    wait_for("two pooled agents", 30, || pooled(&mark), |p| p.len() == 2).await;

    // One conversation: it takes a pooled agent, and the pool keeps room for one more
    // conversation only (two agents in all).
    let first = app.create(json!({})).await;
    app.wait_status(&first, "RUNNING", 30).await;
    wait_for("one pooled agent", 30, || pooled(&mark), |p| p.len() == 1).await;
    actix_web::rt::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(shell_agents().len(), 2);

    // A conversation whose working directory already holds files cannot take the pooled one:
    // it starts its own, is not refused, and the pooled agent makes room.
    let second = "pool-limit-second";
    let workspace = app._data_dir.path().join("workspaces").join(second);
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::write(workspace.join("kept.txt"), "mine").unwrap();
    let r = app
        .post("/api/conversations", json!({"conversation_id": second}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    app.wait_status(second, "RUNNING", 30).await;
    assert!(!agent_pids(second).is_empty(), "a cold agent of its own");
    wait_for("the pool emptied", 30, || pooled(&mark), <[u32]>::is_empty).await;
    wait_for("two agents in all", 30, shell_agents, |a| a.len() == 2).await;
    assert_eq!(
        std::fs::read_to_string(workspace.join("kept.txt")).unwrap(),
        "mine"
    );

    // The limit is the conversations' as before.
    let r = app.post("/api/conversations", json!({})).await;
    assert_ne!(r.status, 200, "{}", r.body);

    // A conversation gone gives the pool its room back.
    stop(&app, &first).await;
    wait_for(
        "one pooled agent again",
        30,
        || pooled(&mark),
        |p| p.len() == 1,
    )
    .await;

    shut_down_clean(app, &mark).await;
}

#[actix_web::test]
async fn a_pooled_agent_that_dies_is_replaced() {
    let mark = new_mark();
    let app = pooled_app(&mark, 1, |_| {}).await;
    let first = wait_for("a pooled agent", 30, || pooled(&mark), |p| p.len() == 1).await;
    // SAFETY: kill has no memory-safety preconditions; the pid is this test's agent.
    unsafe { libc::kill(first[0] as i32, libc::SIGKILL) };
    let second = wait_for(
        "a new pooled agent",
        30,
        || pooled(&mark),
        |p| p.len() == 1 && p[0] != first[0],
    )
    .await;
    // The replacement serves a conversation like any other.
    let id = app
        .create(json!({"initial_user_msg": "echo ppid=$PPID"}))
        .await;
    app.wait_status(&id, "RUNNING", 30).await;
    app.wait_events(&id, 30, |e| {
        run_output_containing(e, &format!("ppid={}", second[0])).is_some()
    })
    .await;
    assert_eq!(pool_dirs(&app).len(), 1);
    shut_down_clean(app, &mark).await;
}

#[actix_web::test]
async fn a_sandboxed_pooled_agent_writes_in_its_conversation_directory() {
    if !sandbox::bwrap_works() {
        return;
    }
    let mark = new_mark();
    let app = pooled_app(&mark, 1, |s| {
        s.runtime.process.sandbox = SandboxKind::Bwrap;
    })
    .await;
    // The sandbox's own process (bwrap), in the pool directory.
    let waiting = wait_for("a pooled agent", 30, || pooled(&mark), |p| !p.is_empty()).await;
    wait_pool_holds(&app, 1).await;
    let id = app.create(json!({})).await;
    app.wait_status(&id, "RUNNING", 30).await;
    let workspace = app._data_dir.path().join("workspaces").join(&id);
    let command = format!(
        "echo in > relative.txt && echo relative=ok; \
         echo in > {}/absolute.txt && echo absolute=ok; pwd",
        workspace.display()
    );
    post_message(&app, &id, &command).await;
    let (_, output) = wait_output(&app, &id, "relative=").await;
    assert!(output.contains("relative=ok"), "{output}");
    assert!(output.contains("absolute=ok"), "{output}");
    assert!(
        output.contains(&workspace.display().to_string()),
        "{output}"
    );
    assert!(workspace.join("relative.txt").is_file());
    assert!(workspace.join("absolute.txt").is_file());
    // It was one of the pooled processes.
    let canonical = std::fs::canonicalize(&workspace).unwrap();
    assert!(
        waiting
            .iter()
            .any(|pid| cwd(*pid).is_some_and(|d| d == canonical)),
        "none of {waiting:?} moved to {}",
        canonical.display()
    );
    shut_down_clean(app, &mark).await;
}

/// A sandbox slow to set up (bubblewrap started half a second late by a wrapper found first on
/// the agents' PATH): its agent joins the pool only once bubblewrap has made its mounts and
/// entered the pool directory, so a create right after finds it working (renaming the directory
/// before made the sandbox's setup fail and the conversation stop).
#[actix_web::test]
async fn a_pooled_agent_is_handed_out_only_once_its_sandbox_is_set_up() {
    if !sandbox::bwrap_works() {
        return;
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let real = std::env::split_paths(&path)
        .map(|dir| dir.join("bwrap"))
        .find(|p| p.is_file())
        .expect("bwrap on PATH");
    // The interpreter itself (a `python3` on PATH may be a shell wrapper starting it as a
    // child, which would look like bubblewrap's own start).
    let exe = std::process::Command::new(python())
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python");
    let exe = String::from_utf8_lossy(&exe.stdout).trim().to_string();
    let bin = tempfile::tempdir().unwrap();
    let wrapper = bin.path().join("bwrap");
    std::fs::write(
        &wrapper,
        format!(
            "#!{exe}\nimport os, sys, time\ntime.sleep(0.5)\n\
             os.execv({real:?}, [{real:?}] + sys.argv[1:])\n",
            real = real.display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mark = new_mark();
    let app = pooled_app(&mark, 1, |s| {
        s.runtime.process.sandbox = SandboxKind::Bwrap;
        let path = format!("{}:{path}", bin.path().display());
        s.runtime.process.env.insert("PATH".into(), path);
    })
    .await;
    wait_pool_holds(&app, 1).await;
    let id = app
        .create(json!({"initial_user_msg": "echo pooled=ok; pwd"}))
        .await;
    app.wait_status(&id, "RUNNING", 30).await;
    let (_, output) = wait_output(&app, &id, "pooled=").await;
    assert!(output.contains("pooled=ok"), "{output}");
    let workspace = app._data_dir.path().join("workspaces").join(&id);
    assert!(
        output.contains(&workspace.display().to_string()),
        "{output}"
    );
    assert_eq!(app.info(&id).await["status"], "RUNNING");
    shut_down_clean(app, &mark).await;
}

#[actix_web::test]
async fn an_openhands_agent_from_the_pool_runs_in_its_conversation() {
    openhands_from_the_pool(SandboxKind::None).await;
}

#[actix_web::test]
async fn a_sandboxed_openhands_agent_from_the_pool_keeps_its_state_in_its_conversation() {
    if sandbox::bwrap_works() {
        openhands_from_the_pool(SandboxKind::Bwrap).await;
    }
}

/// A conversation served by a pooled OpenHands agent, confined as `sandbox` says: its state
/// directory (writable in the sandbox) moves with it.
async fn openhands_from_the_pool(sandbox: SandboxKind) {
    let Some(venv) = openhands_venv() else {
        return;
    };
    let mark = new_mark();
    let llm = MockLlm::start();
    let base_url = format!("{}/v1", llm.url);
    let app = spawn_app_with(|s| {
        s.runtime.kind = RuntimeKind::Openhands;
        s.runtime.openhands.venv = venv;
        s.runtime.process.sandbox = sandbox;
        s.runtime.process.warm = 1;
        s.runtime.process.stop_grace_secs = 10;
        s.limits.start_timeout_secs = 180;
        let env = &mut s.runtime.process.env;
        env.insert("LLM_NATIVE_TOOL_CALLING".into(), "true".into());
        env.insert(MARK.into(), mark.clone());
    })
    .await;
    // Saved after the agent started: a pooled agent gets the settings with its `init`.
    wait_for("a pooled agent", 60, || pooled(&mark), |p| p.len() == 1).await;
    wait_pool_holds(&app, 1).await;
    let (id, events) = echo_hi_with_saved_settings(&app, &base_url, "sk-switchboard-pool").await;
    let output = find(&events, |e| e["observation"] == "run").expect("the run observation");
    assert_eq!(output["content"].as_str().map(str::trim), Some("hi"));
    let requests = llm.requests().await;
    assert_eq!(requests[0]["authorization"], "Bearer sk-switchboard-pool");
    // Its OpenHands state is the conversation's, as for a cold agent.
    let state = app._data_dir.path().join("openhands/state").join(&id);
    assert!(state.join("home/.openhands/microagents").is_dir());
    stop(&app, &id).await;
    shut_down_clean(app, &mark).await;
}
