//! The agent's process: how its command is resolved and isolated, and the watcher that owns
//! the child, reports an unexpected exit and runs the stop sequence.

use super::*;

/// Makes words that are relative paths to something that exists (relative to the server's
/// working directory) absolute: the agent runs in its own working directory.
pub(super) fn resolve_command(words: &[String]) -> Vec<OsString> {
    let cwd = std::env::current_dir().ok();
    words
        .iter()
        .map(|word| {
            let path = Path::new(word);
            if let Some(cwd) = &cwd {
                if word.contains('/') && path.is_relative() {
                    let absolute = cwd.join(path);
                    if absolute.exists() {
                        return absolute.into_os_string();
                    }
                }
            }
            OsString::from(word)
        })
        .collect()
}

pub(super) fn shown_command(words: &[String]) -> String {
    shlex::try_join(words.iter().map(String::as_str)).unwrap_or_else(|_| words.join(" "))
}

/// Puts the agent in its own session (its own process group too, so a terminal's Ctrl-C does
/// not reach it) and, on Linux, makes it its tree's child subreaper (whatever it starts stays
/// its descendant, so it can be found) and has the kernel kill it if the thread that started it
/// — the conversation's arbiter — ever dies without stopping it.
#[cfg(unix)]
pub(super) fn isolate(command: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and only calls `setsid` and
    // `prctl`, which are async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            #[cfg(target_os = "linux")]
            if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) != 0
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(unix))]
pub(super) fn isolate(_command: &mut Command) {}

/// The agent's command for `place`: the configured command (wrapped by the sandbox when one is
/// configured) in the agent's working directory, created here, with piped stdio and the
/// server's environment minus switchboard's own settings. Also the command as logged.
pub(super) fn agent_command(
    settings: &Settings,
    place: &Place,
    token: &str,
) -> Result<(Command, String), Failure> {
    let p = &settings.runtime.process;
    let words = resolve_command(&p.command);
    let Some((program, args)) = words.split_first() else {
        return Err("no agent command is configured (runtime.process.command)".into());
    };
    let shown = shown_command(&p.command);
    let dir = &place.working_dir;
    std::fs::create_dir_all(dir).map_err(|e| {
        Failure::of(e).within(format_args!(
            "cannot create the agent's working directory {}",
            dir.display()
        ))
    })?;
    // Sandboxed, a pooled agent sees the directories its own are renamed in, so that its
    // bind mounts show under their new names once it is handed out.
    let renamed_in: Vec<PathBuf> = place
        .own_roots()
        .iter()
        .filter_map(|root| root.parent().map(Path::to_path_buf))
        .collect();
    let (program, args) = sandbox::command(p, program, args, dir, &place.writable, &renamed_in)?;
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // The agent inherits the server's environment, except switchboard's own settings (the
    // session API key among them).
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SWITCHBOARD_") {
            command.env_remove(name);
        }
    }
    command.envs(&p.env).env(TOKEN_ENV, token);
    if place.conversation {
        // A pooled agent learns its conversation from `init` only.
        command.env("SWITCHBOARD_CONVERSATION_ID", &*place.name);
    }
    isolate(&mut command);
    Ok((command, shown))
}

/// Starts the agent and records its process in the data directory (so that nothing it starts
/// outlives it, see [`super::super::process_tree`]); from then on dropping the returned guard
/// kills and reaps it. An agent that cannot be recorded is killed before it read anything.
pub(super) fn start_recorded(
    mut command: Command,
    shown: &str,
    settings: &Settings,
    place: &Place,
    token: String,
) -> Result<ChildGuard, Failure> {
    let records = AgentTree::prepare(&settings.data_dir).map_err(|e| {
        Failure::of(e).within(format_args!(
            "cannot keep the agent's record in {}",
            settings.data_dir.display()
        ))
    })?;
    let mut child = command
        .spawn()
        .map_err(|e| Failure::of(e).within(format_args!("cannot start the agent `{shown}`")))?;
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let tree = pid
        .ok_or_else(|| std::io::Error::other("the agent has no pid"))
        .and_then(|pid| AgentTree::record(records, &place.name, pid, token));
    let tree = match tree {
        Ok(tree) => tree,
        Err(e) => {
            // Nothing of it may outlive an unrecorded start: it has not read `init` yet.
            let _ = child.start_kill();
            return Err(Failure::of(e).within("cannot record the agent process"));
        }
    };
    info!(
        conversation_id = %place.name,
        pid,
        command = %shown,
        working_dir = %place.working_dir.display(),
        sandbox = ?settings.runtime.process.sandbox,
        pooled = !place.conversation,
        "agent process started"
    );
    Ok(ChildGuard::new(child, tree))
}

/// The agent's process and everything it started; all killed, and the agent reaped, if
/// dropped while running.
pub(super) struct ChildGuard {
    child: Child,
    tree: Arc<AgentTree>,
    /// The agent was reaped.
    reaped: bool,
    /// No process of the agent is left (its record is gone).
    ended: bool,
}

impl ChildGuard {
    /// Guards a started agent recorded in `tree`.
    pub(super) fn new(child: Child, tree: Arc<AgentTree>) -> ChildGuard {
        ChildGuard {
            child,
            tree,
            reaped: false,
            ended: false,
        }
    }

    /// The agent's process id (`None` once it was reaped).
    pub(super) fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The agent's stdin, stdout and stderr (once; `None` when one is missing).
    pub(super) fn take_stdio(&mut self) -> Option<(ChildStdin, ChildStdout, ChildStderr)> {
        let c = &mut self.child;
        Some((c.stdin.take()?, c.stdout.take()?, c.stderr.take()?))
    }

    /// SIGTERM to every process of the agent.
    async fn terminate(&self) {
        #[cfg(unix)]
        self.tree.signal(libc::SIGTERM).await;
    }

    /// SIGKILL to every process of the agent.
    async fn kill(&mut self) {
        #[cfg(unix)]
        self.tree.signal(libc::SIGKILL).await;
        let _ = self.child.start_kill();
    }

    /// Once the agent exited: kills whatever it left until nothing is.
    async fn end(&mut self) {
        self.ended = self.tree.end().await;
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await;
        if status.is_ok() {
            self.reaped = true;
        }
        status
    }

    /// Waits at most `limit` for the agent to exit.
    async fn wait_for(&mut self, limit: Duration) -> Option<io::Result<ExitStatus>> {
        tokio::time::timeout(limit, self.wait()).await.ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.reaped && self.ended {
            return;
        }
        // The watcher was dropped with the agent still running: the arbiter is shutting down.
        // Kill everything and reap the child here, briefly and synchronously, since no runtime
        // will be left to do it. What survives is swept by the next start.
        if !self.ended {
            self.ended = self.tree.end_now(Duration::from_millis(500));
        }
        if self.reaped {
            return;
        }
        let _ = self.child.start_kill();
        for _ in 0..250 {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Ok(Some(_)) | Err(_) => return,
            }
        }
    }
}

/// The agent's I/O tasks, stopped once the agent is gone.
pub(super) struct IoTasks {
    pub(super) writer: JoinHandle<()>,
    pub(super) reader: JoinHandle<()>,
    pub(super) stderr_reader: JoinHandle<()>,
}

impl IoTasks {
    /// Lets the readers pass on what the agent wrote before it exited, then ends all three.
    async fn finish(mut self) {
        let drain = async {
            let _ = (&mut self.reader).await;
            let _ = (&mut self.stderr_reader).await;
        };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
        self.writer.abort();
        self.reader.abort();
        self.stderr_reader.abort();
    }
}

/// What the watcher of one agent is given besides its process.
pub(super) struct Watch {
    /// The conversation's sink once attached; dropped unsent when the agent is stopped before.
    pub(super) attach: oneshot::Receiver<RuntimeSink>,
    pub(super) stop: oneshot::Receiver<mpsc::Sender<Vec<u8>>>,
    pub(super) io: IoTasks,
    pub(super) tail: Arc<Mutex<VecDeque<String>>>,
    pub(super) grace: Duration,
    pub(super) label: Label,
    /// Set, and `on_exit` woken, when the agent exits before it was attached.
    pub(super) exited: Arc<AtomicBool>,
    pub(super) on_exit: Option<Arc<Notify>>,
}

/// Owns the agent's process: reports its exit, or stops it when told to. Until the agent is
/// attached to a conversation its exit is only recorded (the pool replaces it).
pub(super) async fn watch(mut child: ChildGuard, w: Watch) {
    let Watch {
        mut attach,
        stop,
        io,
        tail,
        grace,
        label,
        exited,
        on_exit,
    } = w;
    let (mut sink, mut status) = tokio::select! {
        biased;
        sink = &mut attach => (sink.ok(), None),
        status = child.wait() => {
            // Exited while waiting: from now on it is not handed out.
            exited.store(true, Ordering::Release);
            (attach.try_recv().ok(), Some(status))
        }
    };
    if let (Some(_), None) = (&sink, &status) {
        status = tokio::select! {
            status = child.wait() => Some(status),
            // A stop request, or the runtime dropped without one: stop either way.
            input = stop => {
                // While the agent runs, every process it started is its descendant: note them
                // all before it hears `stop` and exits, leaving them orphans.
                child.tree.refresh().await;
                if let Ok(input) = input {
                    // When the queue is full the agent does not read anyway; it still sees
                    // stdin close.
                    let _ = input.try_send(protocol_line(&json!({"type": "stop"})));
                }
                None
            }
        };
    } else if status.is_none() {
        // Stopped before it was attached: its stdin is closed (no `init` was written).
        child.tree.refresh().await;
    }
    match status {
        Some(status) => {
            // Whatever the agent left running goes with it.
            child.end().await;
            io.finish().await;
            if sink.is_none() {
                // Attached after all while it was ending: its conversation hears of the exit.
                attach.close();
                sink = attach.try_recv().ok();
            }
            let message = describe_exit(status, &tail);
            match sink {
                Some(sink) => {
                    warn!(conversation_id = %label, "{message}");
                    sink.send(RuntimeSignal::Failed(message));
                }
                None => {
                    warn!(agent = %label, "pooled agent exited while waiting: {message}");
                    if let Some(wake) = on_exit {
                        wake.notify_one();
                    }
                }
            }
        }
        None => {
            let status = stop_sequence(&mut child, grace, &label.get()).await;
            match status {
                Ok(status) => {
                    info!(conversation_id = %label, %status, "agent process stopped")
                }
                Err(e) => {
                    warn!(conversation_id = %label, error = %e, "cannot wait for the agent process")
                }
            }
            child.end().await;
            io.finish().await;
        }
    }
}

/// `stop` was written and stdin closed by the runtime: wait `grace`, SIGTERM, wait `grace`,
/// SIGKILL.
pub(super) async fn stop_sequence(
    child: &mut ChildGuard,
    grace: Duration,
    conversation_id: &str,
) -> io::Result<ExitStatus> {
    if let Some(status) = child.wait_for(grace).await {
        return status;
    }
    info!(conversation_id = %conversation_id, grace_secs = grace.as_secs(), "agent still running after `stop`; sending SIGTERM");
    child.terminate().await;
    if let Some(status) = child.wait_for(grace).await {
        return status;
    }
    warn!(conversation_id = %conversation_id, grace_secs = grace.as_secs(), "agent ignored SIGTERM; killing it");
    child.kill().await;
    child.wait().await
}

/// The error stored when the agent exits on its own: its exit status and the agent's own last
/// words on stderr, as text (they are the agent's, not an error of ours); the system's error
/// when its exit status could not be had is kept as the source.
pub(super) fn describe_exit(
    status: io::Result<ExitStatus>,
    tail: &Mutex<VecDeque<String>>,
) -> Failure {
    let how = match &status {
        Ok(status) => status.to_string(),
        Err(e) => format!("its exit status is unknown: {e}"),
    };
    let tail = tail.lock().unwrap_or_else(|p| p.into_inner());
    let message = if tail.is_empty() {
        format!("The agent process exited unexpectedly ({how}); it wrote nothing to stderr.")
    } else {
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        format!(
            "The agent process exited unexpectedly ({how}). Last lines of its stderr:\n{}",
            lines.join("\n")
        )
    };
    match status {
        Ok(_) => Failure::new(message),
        Err(e) => Failure::caused(message, e),
    }
}
