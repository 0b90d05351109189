//! The `process` runtime: one agent process per conversation, spoken to in JSON lines.
//!
//! Each conversation gets its own child process (`runtime.process.command`), started in its own
//! working directory, watched, and stopped by the conversation's actor through this runtime. The
//! protocol (`docs/runtime-protocol.md`) is one JSON object per line: switchboard writes `init`,
//! then user `event`s and finally `stop` to the agent's stdin; the agent answers with `ready`,
//! `event` and `status` lines on its stdout. Its stderr goes to the server log. Agent events
//! are lossless (every field is kept); an event sent with a `ref` is answered with an `ack`
//! carrying its id once durable (the conversation calls [`Runtime::acknowledge`]).
//!
//! An [`Agent`] is one started agent process. It is launched in a [`Place`] (its directories)
//! and *attached* to its conversation, which writes `init`: at once for a conversation's own
//! agent, or later for one of the warm pool's ([`super::pool`]), started before its
//! conversation existed. Everything here is asynchronous and runs on the arbiter that launched
//! the agent (the conversation's, or the one the pool chose), also after it was handed to a
//! conversation elsewhere; `start`, `on_user_event` and `stop` never wait. Four small tasks
//! serve one agent, and until it is attached they only wait (its exit is then the pool's
//! business):
//!
//! - the **writer** owns the child's stdin: it writes the `init` line (streaming the
//!   conversation's history from the store, page by page), then every line from a bounded queue,
//!   and closes stdin when the runtime stops;
//! - the **reader** reads stdout with a bounded line buffer and hands each signal to the
//!   conversation with [`RuntimeSink::deliver`], which waits until the conversation handled it:
//!   an agent that floods its stdout is paced by its own conversation and cannot grow the
//!   server's memory or hold up other conversations;
//! - the **stderr reader** logs each line (tagged with the conversation id, rate-limited) and
//!   keeps the last few for the error shown when the agent exits;
//! - the **watcher** owns the [`Child`]: it reports an unexpected exit as
//!   [`RuntimeSignal::Failed`] (exit status and stderr tail), and on stop runs the stop sequence
//!   — `stop` line and stdin closed, SIGTERM after the grace period, SIGKILL after another —
//!   then reaps the child.
//!
//! No process is left behind: the agent runs in its own session as its tree's child subreaper,
//! recorded in the data directory, and every signal goes to every process it started
//! ([`super::process_tree`] finds them, even ones that left its session). Once the agent is
//! gone, whatever it left is killed; the child is killed when its watcher is dropped (server
//! shutdown) and, on Linux, by the kernel if the server dies (`PR_SET_PDEATHSIG`) — what it
//! started then is swept by the next start from the record. With `runtime.process.sandbox`
//! the command is wrapped by [`super::sandbox`] and the process started is the sandbox's.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::pool::AgentPool;
use super::process_tree::{AgentTree, TOKEN_ENV};
use super::sandbox;
use super::{ReferencedEvent, Runtime, RuntimeSignal, RuntimeSink, RuntimeStart};
use crate::config::{SandboxKind, Settings};
use crate::events::{EventBody, Source, StatusUpdate};
use crate::store::{EventQuery, InitData, Store};

/// The protocol version this runtime speaks (the `protocol` field of `init`).
pub const PROTOCOL_VERSION: u64 = 1;
/// Status id of the error reported for a line that is not valid protocol.
pub const STATUS_AGENT_PROTOCOL_ERROR: &str = "STATUS$ERROR_AGENT_PROTOCOL";
/// Status id of the error reported when a user event cannot be handed to the agent.
pub const STATUS_AGENT_INPUT_ERROR: &str = "STATUS$ERROR_AGENT_INPUT";

/// Lines waiting for the agent's stdin; a full queue means the agent does not read its input.
const INPUT_QUEUE_LINES: usize = 64;
/// Read buffer for the agent's stdout.
const STDOUT_BUFFER: usize = 16 * 1024;
/// A line buffer that grew past this after a long line shrinks back to it.
const LINE_BUFFER_KEEP: usize = 64 * 1024;
/// Longest stderr line logged; the rest of the line is dropped.
const STDERR_MAX_LINE: usize = 4096;
/// Longest stderr line kept in the tail quoted when the agent exits.
const STDERR_TAIL_LINE: usize = 1000;
/// Stderr lines logged per second per agent; the rest are counted, not logged.
const STDERR_LOG_PER_SEC: u32 = 200;
/// Invalid lines reported at once before the reports are limited to one per second.
const COMPLAINT_BURST: f64 = 5.0;
/// How long the readers may take to pass on what an exited agent wrote before it exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// History events read from the store at a time while writing `init`.
const HISTORY_PAGE: usize = 512;
/// Longest status id accepted from an agent.
const MAX_STATUS_ID: usize = 256;
/// Longest `ref` string accepted from an agent.
const MAX_REF_BYTES: usize = 256;

/// Runs one agent process per conversation. See the module docs.
pub struct ProcessRuntime {
    settings: Arc<Settings>,
    pool: Option<Arc<AgentPool>>,
    running: Option<Agent>,
}

impl ProcessRuntime {
    pub fn new(settings: Arc<Settings>) -> Self {
        ProcessRuntime {
            settings,
            pool: None,
            running: None,
        }
    }

    /// Takes the agent from `pool` when one waits there ([`super::pool`]); starts its own
    /// otherwise.
    pub fn with_pool(mut self, pool: Option<Arc<AgentPool>>) -> Self {
        self.pool = pool;
        self
    }

    fn spawn(&mut self, start: RuntimeStart<'_>) -> Result<(), String> {
        let conversation_id: Arc<str> = start.conversation_id.into();
        let place = Place::conversation(&self.settings, &conversation_id);
        let head = init_head(
            &conversation_id,
            start.trigger,
            start.init,
            &place.working_dir,
            start.settings.as_ref(),
        )?;
        let history = History {
            store: start.store,
            before: start.history_before,
        };
        if let Some(mut agent) = self.pool.as_ref().and_then(|pool| pool.take(&place)) {
            if agent
                .attach(&conversation_id, &head, history.clone(), start.sink.clone())
                .is_ok()
            {
                info!(conversation_id = %conversation_id, "agent taken from the warm pool");
                self.running = Some(agent);
                return Ok(());
            }
            // It died just now; its directories are the conversation's already.
            debug!(conversation_id = %conversation_id, "the pooled agent exited before it was attached");
        }
        let mut agent = Agent::launch(&self.settings, place, None)?;
        agent
            .attach(&conversation_id, &head, history, start.sink)
            .map_err(|()| "the agent exited as soon as it started".to_string())?;
        self.running = Some(agent);
        Ok(())
    }
}

/// Where an agent runs: its working directory and, sandboxed, the other directories it may
/// write — a conversation's, or a pooled agent's own until it is handed out.
#[derive(Debug, Clone)]
pub struct Place {
    /// The conversation's id, or the pooled agent's name (never a valid conversation id).
    pub name: Arc<str>,
    /// Whether `name` is a conversation's id.
    pub conversation: bool,
    pub working_dir: PathBuf,
    /// Writable besides the working directory (sandboxed agents only).
    pub writable: Vec<PathBuf>,
}

impl Place {
    /// A conversation's directories.
    pub fn conversation(settings: &Settings, conversation_id: &str) -> Place {
        Place::new(settings, conversation_id, true)
    }

    /// The directories of a pooled agent named `name`.
    pub fn pooled(settings: &Settings, name: &str) -> Place {
        Place::new(settings, name, false)
    }

    fn new(settings: &Settings, name: &str, conversation: bool) -> Place {
        let p = &settings.runtime.process;
        Place {
            name: name.into(),
            conversation,
            working_dir: p.working_dir_for(&settings.data_dir, name),
            writable: match p.sandbox {
                SandboxKind::Bwrap => p.sandbox_writable_for(name),
                SandboxKind::None => Vec::new(),
            },
        }
    }

    /// Every directory of the place, the working directory first.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.working_dir.as_path())
            .chain(self.writable.iter().map(PathBuf::as_path))
    }

    /// For a pooled agent: each directory's ancestor (or itself) whose name holds the agent's
    /// name, i.e. what was made for it alone and is renamed when it is handed out (with
    /// `working_dir = "/srv/{conversation_id}/work"`, `/srv/.pool-…`). Empty for a
    /// conversation.
    pub fn own_roots(&self) -> Vec<PathBuf> {
        if self.conversation {
            return Vec::new();
        }
        self.dirs()
            .filter_map(|dir| {
                dir.ancestors()
                    .find(|a| {
                        a.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.contains(&*self.name))
                    })
                    .map(Path::to_path_buf)
            })
            .collect()
    }
}

/// The name an agent's log lines carry: its conversation's id once it has one.
#[derive(Clone)]
struct Label(Arc<Mutex<Arc<str>>>);

impl Label {
    fn new(name: Arc<str>) -> Self {
        Label(Arc::new(Mutex::new(name)))
    }

    fn get(&self) -> Arc<str> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, name: Arc<str>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = name;
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.get())
    }
}

/// What an agent's tasks wait for before `init`: the conversation it serves.
struct Attach {
    writer: oneshot::Sender<(String, History, RuntimeSink)>,
    /// With the links left at a pooled agent's old directory names, removed at its `ready`.
    reader: oneshot::Sender<(RuntimeSink, Vec<PathBuf>)>,
    watcher: oneshot::Sender<RuntimeSink>,
}

/// One started agent process. Its four tasks run on the arbiter that launched it for the
/// agent's whole life (also after it was handed to a conversation on another arbiter); this
/// handle talks to them through channels. Dropping it stops the agent.
pub struct Agent {
    label: Label,
    place: Place,
    /// Until [`Agent::attach`]: the agent waits for its conversation and has read nothing.
    attach: Option<Attach>,
    /// Lines for the agent's stdin; dropping it closes stdin once the queue is written.
    input: Option<mpsc::Sender<Vec<u8>>>,
    /// Tells the watcher to run the stop sequence, handing it the input queue to write `stop`
    /// to and close (dropping it stops too, with stdin closed at once).
    stop: Option<oneshot::Sender<mpsc::Sender<Vec<u8>>>>,
    /// The watcher: done once the agent is reaped.
    watcher: Option<JoinHandle<()>>,
    /// Set when the agent exited before it was attached.
    exited: Arc<AtomicBool>,
    /// Links from the directories' names in the pool to the conversation's.
    aliases: Vec<PathBuf>,
    started: std::time::Instant,
}

impl Agent {
    /// Starts an agent process in `place` with its tasks on the current arbiter. It gets its
    /// `init` once attached; `on_exit` is woken if it exits before that.
    pub fn launch(
        settings: &Settings,
        place: Place,
        on_exit: Option<Arc<Notify>>,
    ) -> Result<Agent, String> {
        let p = &settings.runtime.process;
        let words = resolve_command(&p.command);
        let Some((program, args)) = words.split_first() else {
            return Err("no agent command is configured (runtime.process.command)".into());
        };
        let shown = shown_command(&p.command);
        let dir = &place.working_dir;
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "cannot create the agent's working directory {}: {e}",
                dir.display()
            )
        })?;
        let records = AgentTree::prepare(&settings.data_dir).map_err(|e| {
            format!(
                "cannot keep the agent's record in {}: {e}",
                settings.data_dir.display()
            )
        })?;
        let token = uuid::Uuid::new_v4().simple().to_string();

        // Sandboxed, a pooled agent sees the directories its own are renamed in, so that its
        // bind mounts show under their new names once it is handed out.
        let renamed_in: Vec<PathBuf> = place
            .own_roots()
            .iter()
            .filter_map(|root| root.parent().map(Path::to_path_buf))
            .collect();
        let (program, args) =
            sandbox::command(p, program, args, dir, &place.writable, &renamed_in)?;
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
        command.envs(&p.env).env(TOKEN_ENV, &token);
        if place.conversation {
            // A pooled agent learns its conversation from `init` only.
            command.env("SWITCHBOARD_CONVERSATION_ID", &*place.name);
        }
        isolate(&mut command);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start the agent `{shown}`: {e}"))?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        let tree = pid
            .ok_or_else(|| std::io::Error::other("the agent has no pid"))
            .and_then(|pid| AgentTree::record(records, &place.name, pid, token));
        let tree = match tree {
            Ok(tree) => tree,
            Err(e) => {
                // Nothing of it may outlive an unrecorded start: it has not read `init` yet.
                let _ = child.start_kill();
                return Err(format!("cannot record the agent process: {e}"));
            }
        };
        info!(
            conversation_id = %place.name,
            pid,
            command = %shown,
            working_dir = %dir.display(),
            sandbox = ?p.sandbox,
            pooled = !place.conversation,
            "agent process started"
        );
        // From here on, dropping the guard kills and reaps the agent.
        let mut guard = ChildGuard {
            child,
            tree,
            reaped: false,
            ended: false,
        };
        let c = &mut guard.child;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (c.stdin.take(), c.stdout.take(), c.stderr.take())
        else {
            return Err("the agent's stdin, stdout and stderr could not be opened".into());
        };

        let label = Label::new(place.name.clone());
        let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE_LINES);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (writer_tx, writer_rx) = oneshot::channel();
        let (reader_tx, reader_rx) = oneshot::channel();
        let (watcher_tx, watcher_rx) = oneshot::channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let exited = Arc::new(AtomicBool::new(false));
        let writer =
            tokio::task::spawn_local(write_input(stdin, writer_rx, input_rx, label.clone()));
        let reader = tokio::task::spawn_local(read_output(
            stdout,
            reader_rx,
            p.max_line_bytes,
            label.clone(),
        ));
        let stderr_reader = tokio::task::spawn_local(read_stderr(
            stderr,
            tail.clone(),
            p.stderr_tail_lines,
            label.clone(),
        ));
        let watcher = tokio::task::spawn_local(watch(
            guard,
            Watch {
                attach: watcher_rx,
                stop: stop_rx,
                io: IoTasks {
                    writer,
                    reader,
                    stderr_reader,
                },
                tail,
                grace: Duration::from_secs(p.stop_grace_secs),
                label: label.clone(),
                exited: exited.clone(),
                on_exit,
            },
        ));
        Ok(Agent {
            label,
            place,
            attach: Some(Attach {
                writer: writer_tx,
                reader: reader_tx,
                watcher: watcher_tx,
            }),
            input: Some(input_tx),
            stop: Some(stop_tx),
            watcher: Some(watcher),
            exited,
            aliases: Vec::new(),
            started: std::time::Instant::now(),
        })
    }

    /// Where the agent runs.
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// The agent now runs in `place` (its directories were moved there); `aliases` are links
    /// left at the old names, removed at its `ready` (or when it is dropped before).
    pub fn moved_to(&mut self, place: Place, aliases: Vec<PathBuf>) {
        self.place = place;
        self.aliases = aliases;
    }

    /// When it was started.
    pub fn started(&self) -> std::time::Instant {
        self.started
    }

    /// Whether it exited while waiting to be attached.
    pub fn exited(&self) -> bool {
        self.exited.load(Ordering::Acquire)
    }

    /// Hands the agent its conversation: it is written `init` (`head`, then the history) and
    /// reports to `sink` from now on. `Err` when it is gone already.
    fn attach(
        &mut self,
        conversation_id: &Arc<str>,
        head: &str,
        history: History,
        sink: RuntimeSink,
    ) -> Result<(), ()> {
        let attach = self.attach.take().ok_or(())?;
        if self.exited() {
            return Err(());
        }
        self.label.set(conversation_id.clone());
        attach.watcher.send(sink.clone()).map_err(|_| ())?;
        let _ = attach.reader.send((sink.clone(), self.aliases.clone()));
        let _ = attach.writer.send((head.to_string(), history, sink));
        Ok(())
    }

    fn send(&self, line: Vec<u8>) -> Result<(), &'static str> {
        let input = self.input.as_ref().ok_or("the agent is stopping")?;
        input.try_send(line).map_err(|e| match e {
            TrySendError::Full(_) => "the agent is not reading its input",
            TrySendError::Closed(_) => "the agent closed its input",
        })
    }

    /// Starts the stop sequence (an agent never attached only sees its stdin close). Never
    /// waits.
    pub fn stop(&mut self) {
        self.attach = None;
        let input = self.input.take();
        if let (Some(stop), Some(input)) = (self.stop.take(), input) {
            let _ = stop.send(input);
        }
    }

    /// The watcher, done once the agent and everything it started are gone (taken once).
    pub fn take_watcher(&mut self) -> Option<JoinHandle<()>> {
        self.watcher.take()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        remove_aliases(&self.aliases);
    }
}

/// Removes the links [`Agent::moved_to`] was given (those still there).
fn remove_aliases(aliases: &[PathBuf]) {
    for alias in aliases {
        if std::fs::symlink_metadata(alias).is_ok_and(|m| m.file_type().is_symlink()) {
            let _ = std::fs::remove_file(alias);
        }
    }
}

impl Runtime for ProcessRuntime {
    fn start(&mut self, start: RuntimeStart<'_>) -> Vec<RuntimeSignal> {
        if self.running.is_some() {
            return Vec::new();
        }
        match self.spawn(start) {
            Ok(()) => Vec::new(),
            Err(why) => vec![RuntimeSignal::Failed(why)],
        }
    }

    fn on_user_event(&mut self, id: u64, event: &EventBody) -> Vec<RuntimeSignal> {
        let Some(agent) = self.running.as_ref() else {
            return Vec::new();
        };
        if agent.input.is_none() {
            return Vec::new();
        }
        let line = protocol_line(&json!({"type": "event", "event": event_value(id, event)}));
        let Err(why) = agent.send(line) else {
            return Vec::new();
        };
        warn!(conversation_id = %agent.label, event_id = id, "{why}; event not delivered");
        vec![RuntimeSignal::Status(StatusUpdate::error(
            STATUS_AGENT_INPUT_ERROR,
            &format!("Event {id} was not delivered to the agent: {why}."),
        ))]
    }

    fn acknowledge(&mut self, reference: &Value, id: u64, timestamp: &str) {
        let Some(agent) = self.running.as_ref() else {
            return;
        };
        if agent.input.is_none() {
            return;
        }
        let line = protocol_line(
            &json!({"type": "ack", "ref": reference, "id": id, "timestamp": timestamp}),
        );
        if let Err(why) = agent.send(line) {
            warn!(conversation_id = %agent.label, event_id = id, "{why}; ack not delivered");
        }
    }

    fn stop(&mut self) {
        if let Some(agent) = self.running.as_mut() {
            agent.stop();
        }
    }

    /// The agent's stop sequence runs to its end (`stop_grace_secs` twice, see
    /// [`stop_sequence`]), bounded a little beyond it should the agent not be reaped by then.
    fn finished(&mut self) -> Option<Pin<Box<dyn Future<Output = ()>>>> {
        let agent = self.running.as_mut()?;
        let watcher = agent.take_watcher()?;
        let label = agent.label.clone();
        let grace = self.settings.runtime.process.stop_grace_secs;
        let limit = Duration::from_secs(grace.saturating_mul(2) + 2);
        Some(Box::pin(async move {
            if tokio::time::timeout(limit, watcher).await.is_err() {
                warn!(conversation_id = %label, "runtime still stopping after its grace periods");
            }
        }))
    }
}

// ---- starting ---------------------------------------------------------------------------

/// Makes words that are relative paths to something that exists (relative to the server's
/// working directory) absolute: the agent runs in its own working directory.
fn resolve_command(words: &[String]) -> Vec<OsString> {
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

fn shown_command(words: &[String]) -> String {
    shlex::try_join(words.iter().map(String::as_str)).unwrap_or_else(|_| words.join(" "))
}

/// Puts the agent in its own session (its own process group too, so a terminal's Ctrl-C does
/// not reach it) and, on Linux, makes it its tree's child subreaper (whatever it starts stays
/// its descendant, so it can be found) and has the kernel kill it if the thread that started it
/// — the conversation's arbiter — ever dies without stopping it.
#[cfg(unix)]
fn isolate(command: &mut Command) {
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
fn isolate(_command: &mut Command) {}

/// The `init` line up to and including `"history":[`; the writer streams the rest.
fn init_head(
    conversation_id: &str,
    trigger: &str,
    init: &InitData,
    working_dir: &Path,
    settings: Option<&Value>,
) -> Result<String, String> {
    let mut init = serde_json::to_value(init)
        .map_err(|e| format!("cannot encode the conversation's init data: {e}"))?;
    if let Value::Object(map) = &mut init {
        map.insert("trigger".into(), json!(trigger));
    }
    let head = json!({
        "type": "init",
        "protocol": PROTOCOL_VERSION,
        "conversation_id": conversation_id,
        "working_dir": working_dir.to_string_lossy(),
        "init": init,
        "settings": settings,
    });
    let mut text = head.to_string();
    text.pop(); // the closing brace
    text.push_str(",\"history\":[");
    Ok(text)
}

/// Where the `init` line's history comes from: every event with an id below `before`.
#[derive(Clone)]
struct History {
    store: Arc<dyn Store>,
    before: u64,
}

/// One protocol message as a line.
fn protocol_line(value: &Value) -> Vec<u8> {
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// A user event as the agent gets it: the stored event's keys without the timestamp.
fn event_value(id: u64, body: &EventBody) -> Value {
    body.to_value(id, None)
}

// ---- the writer -------------------------------------------------------------------------

enum InitError {
    Store(String),
    Io(io::Error),
}

impl From<io::Error> for InitError {
    fn from(e: io::Error) -> Self {
        InitError::Io(e)
    }
}

/// Once attached, writes `init`, then every queued line; closes stdin when the queue closes
/// (or at once when the agent is stopped before it was attached).
async fn write_input(
    mut stdin: ChildStdin,
    attach: oneshot::Receiver<(String, History, RuntimeSink)>,
    mut lines: mpsc::Receiver<Vec<u8>>,
    label: Label,
) {
    let Ok((head, history, sink)) = attach.await else {
        debug!(conversation_id = %label, "agent stdin closed before init");
        return;
    };
    let conversation_id = label.get();
    match write_init(&mut stdin, &head, &history, &conversation_id).await {
        Ok(()) => {}
        Err(InitError::Store(why)) => {
            sink.send(RuntimeSignal::Failed(why));
            return;
        }
        Err(InitError::Io(e)) => {
            debug!(conversation_id = %conversation_id, error = %e, "agent stdin closed during init");
            return;
        }
    }
    while let Some(line) = lines.recv().await {
        if let Err(e) = stdin.write_all(&line).await {
            debug!(conversation_id = %conversation_id, error = %e, "agent stdin closed");
            return;
        }
    }
    let _ = stdin.shutdown().await;
    debug!(conversation_id = %conversation_id, "agent stdin closed by switchboard");
}

async fn write_init(
    stdin: &mut ChildStdin,
    head: &str,
    history: &History,
    conversation_id: &str,
) -> Result<(), InitError> {
    let mut out = BufWriter::with_capacity(16 * 1024, stdin);
    out.write_all(head.as_bytes()).await?;
    let mut next = 0;
    let mut first = true;
    while next < history.before {
        let query = EventQuery {
            start_id: next,
            end_id: Some(history.before - 1),
            reverse: false,
            limit: HISTORY_PAGE,
        };
        let page = history
            .store
            .events(conversation_id, query)
            .await
            .map_err(|e| {
                InitError::Store(format!("cannot read the conversation's history: {e}"))
            })?;
        if page.is_empty() {
            break;
        }
        for event in &page {
            if !first {
                out.write_all(b",").await?;
            }
            first = false;
            out.write_all(event.json.as_bytes()).await?;
            next = event.id + 1;
        }
    }
    out.write_all(b"]}\n").await?;
    out.flush().await?;
    Ok(())
}

// ---- the readers ------------------------------------------------------------------------

/// Reads lines of at most `max` bytes; a longer line is cut to `max` and its length reported.
struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    max: usize,
}

/// One line, without its newline.
struct Line<'a> {
    bytes: &'a [u8],
    /// The full length when the line was longer than the limit (`bytes` is its start).
    cut_from: Option<usize>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(inner: R, buffer: usize, max: usize) -> Self {
        LineReader {
            inner: BufReader::with_capacity(buffer, inner),
            buf: Vec::new(),
            max,
        }
    }

    /// The next line; `None` at the end of the stream. Memory stays within `max` bytes.
    async fn next_line(&mut self) -> io::Result<Option<Line<'_>>> {
        self.buf.clear();
        if self.buf.capacity() > LINE_BUFFER_KEEP {
            self.buf.shrink_to(LINE_BUFFER_KEEP);
        }
        let mut len = 0usize;
        let mut seen = false;
        loop {
            let chunk = self.inner.fill_buf().await?;
            if chunk.is_empty() {
                if !seen {
                    return Ok(None);
                }
                break;
            }
            seen = true;
            let (part, used, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], i + 1, true),
                None => (chunk, chunk.len(), false),
            };
            len = len.saturating_add(part.len());
            let room = self.max.saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&part[..part.len().min(room)]);
            self.inner.consume(used);
            if done {
                break;
            }
        }
        let mut bytes = &self.buf[..];
        if len <= self.max {
            if let Some(stripped) = bytes.strip_suffix(b"\r") {
                bytes = stripped;
            }
        }
        Ok(Some(Line {
            bytes,
            cut_from: (len > self.max).then_some(len),
        }))
    }
}

/// Once attached, reads the agent's stdout and hands each message to the conversation, one at
/// a time. A pooled agent's links to its moved directories go at its `ready`: it has read
/// `init` by then, and whatever it looks up by path uses the conversation's names.
async fn read_output(
    stdout: impl AsyncRead + Unpin,
    attach: oneshot::Receiver<(RuntimeSink, Vec<PathBuf>)>,
    max_line_bytes: usize,
    label: Label,
) {
    let mut reader = LineReader::new(stdout, STDOUT_BUFFER, max_line_bytes);
    let mut complaints = Complaints::new();
    // Never attached: the output is read and dropped, so that the agent never blocks.
    let (sink, mut aliases, mut attached) = match attach.await {
        Ok((sink, aliases)) => (Some(sink), aliases, true),
        Err(_) => (None, Vec::new(), false),
    };
    let conversation_id = label.get();
    loop {
        let line = match reader.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                warn!(conversation_id = %conversation_id, error = %e, "cannot read the agent's stdout");
                break;
            }
        };
        if !attached {
            // The conversation is gone; keep reading so that the agent never blocks on a full
            // pipe while it stops.
            continue;
        }
        let signal = match line.cut_from {
            Some(len) => Err(format!(
                "a line of {len} bytes is longer than the limit of {max_line_bytes} bytes \
                 (runtime.process.max_line_bytes)"
            )),
            None => parse_line(line.bytes),
        };
        let signal = match signal {
            Ok(Some(signal)) => signal,
            Ok(None) => continue,
            Err(why) => match complaints.complain(&conversation_id, &why, line.bytes) {
                Some(signal) => signal,
                None => continue,
            },
        };
        if matches!(signal, RuntimeSignal::Ready { .. }) {
            remove_aliases(&std::mem::take(&mut aliases));
        }
        if let Some(sink) = &sink {
            if !sink.deliver(signal).await {
                attached = false;
            }
        }
    }
    debug!(conversation_id = %conversation_id, "agent stdout closed");
}

/// Reads one agent line: `Ok(None)` for a blank line, `Err` for anything not valid protocol.
pub fn parse_line(bytes: &[u8]) -> Result<Option<RuntimeSignal>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the line is not UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("the line is not JSON ({e})"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "a message must be a JSON object".to_string())?;
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| "a message needs a string `type`".to_string())?;
    match kind {
        "ready" => {
            let manages_agent_state = match obj.get("manages_agent_state") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err("`manages_agent_state` must be true or false".into()),
            };
            Ok(Some(RuntimeSignal::Ready {
                manages_agent_state,
            }))
        }
        "event" => parse_event(obj).map(Some),
        "status" => {
            let status_type = match obj.get("status_type").and_then(Value::as_str) {
                Some(t @ ("info" | "error")) => t,
                _ => {
                    return Err(
                        "a `status` message needs `status_type` \"info\" or \"error\"".into(),
                    )
                }
            };
            let id = obj
                .get("id")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty() && id.len() <= MAX_STATUS_ID)
                .ok_or_else(|| {
                    format!("a `status` message needs a string `id` of 1-{MAX_STATUS_ID} bytes")
                })?;
            let message = match obj.get("message") {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s,
                Some(_) => return Err("a status `message` must be a string".into()),
            };
            Ok(Some(RuntimeSignal::Status(StatusUpdate::new(
                status_type,
                id,
                message,
            ))))
        }
        other => Err(format!("unknown message type {other:?}")),
    }
}

/// An agent's `event` message: the event, its `ref` and a `cause` that names a `ref`.
fn parse_event(message: &serde_json::Map<String, Value>) -> Result<RuntimeSignal, String> {
    let reference = match message.get("ref") {
        None | Some(Value::Null) => None,
        Some(r) => Some(check_ref(r).map_err(|e| format!("invalid `ref`: {e}"))?),
    };
    let mut event = match message.get("event") {
        Some(Value::Object(event)) => event.clone(),
        _ => return Err("an `event` message needs an `event` object".into()),
    };
    let mut cause_ref = None;
    if let Some(Value::Object(cause)) = event.get("cause") {
        let r = match (cause.len(), cause.get("ref")) {
            (1, Some(r)) => check_ref(r).map_err(|e| format!("invalid event: `cause.ref`: {e}"))?,
            _ => {
                return Err("invalid event: `cause` must be an event id or {\"ref\": …}".to_string())
            }
        };
        cause_ref = Some(r);
        event.shift_remove("cause");
    }
    let body =
        EventBody::from_value(&Value::Object(event)).map_err(|e| format!("invalid event: {e}"))?;
    if body.source == Source::User && body.action_name() == Some("message") {
        return Err("invalid event: an agent cannot send a user `message`".into());
    }
    if reference.is_none() && cause_ref.is_none() {
        return Ok(RuntimeSignal::Event(body));
    }
    Ok(RuntimeSignal::Referenced(Box::new(ReferencedEvent {
        body,
        reference,
        cause_ref,
    })))
}

/// A `ref` is a string of 1–256 bytes or an integer.
fn check_ref(reference: &Value) -> Result<Value, String> {
    match reference {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_REF_BYTES => Ok(reference.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(reference.clone()),
        _ => Err(format!(
            "a ref must be a string of 1-{MAX_REF_BYTES} bytes or an integer"
        )),
    }
}

/// Turns invalid lines into error statuses: a few at once, then at most one per second (the
/// next one says how many were skipped), so that a misbehaving agent cannot flood its clients.
struct Complaints {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

impl Complaints {
    fn new() -> Self {
        Complaints {
            tokens: COMPLAINT_BURST,
            refilled: Instant::now(),
            suppressed: 0,
        }
    }

    fn complain(&mut self, conversation_id: &str, why: &str, line: &[u8]) -> Option<RuntimeSignal> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed).min(COMPLAINT_BURST);
        self.refilled = now;
        let preview = preview(line);
        if self.tokens < 1.0 {
            self.suppressed += 1;
            debug!(conversation_id = %conversation_id, line = %preview, "invalid agent line: {why}");
            return None;
        }
        self.tokens -= 1.0;
        let suppressed = std::mem::take(&mut self.suppressed);
        warn!(
            conversation_id = %conversation_id,
            line = %preview,
            suppressed,
            "invalid agent line ignored: {why}"
        );
        let mut message = format!("The agent sent an invalid line, which was ignored: {why}.");
        if suppressed > 0 {
            message.push_str(&format!(
                " {suppressed} more invalid lines were ignored before it."
            ));
        }
        Some(RuntimeSignal::Status(StatusUpdate::error(
            STATUS_AGENT_PROTOCOL_ERROR,
            &message,
        )))
    }
}

/// The start of a line, for logs.
fn preview(line: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&line[..line.len().min(MAX)]);
    if line.len() > MAX {
        format!("{text}…")
    } else {
        text.into_owned()
    }
}

/// Logs the agent's stderr and keeps its last `keep` lines in `tail`.
async fn read_stderr(
    stderr: impl AsyncRead + Unpin,
    tail: Arc<Mutex<VecDeque<String>>>,
    keep: usize,
    conversation_id: Label,
) {
    let mut reader = LineReader::new(stderr, 4096, STDERR_MAX_LINE);
    let mut window = Instant::now();
    let mut logged = 0u32;
    let mut skipped = 0u64;
    while let Ok(Some(line)) = reader.next_line().await {
        let mut text = String::from_utf8_lossy(line.bytes).into_owned();
        if line.cut_from.is_some() {
            text.push('…');
        }
        if window.elapsed() >= Duration::from_secs(1) {
            if skipped > 0 {
                warn!(conversation_id = %conversation_id, skipped, "agent stderr lines not logged (too many)");
            }
            window = Instant::now();
            logged = 0;
            skipped = 0;
        }
        if logged < STDERR_LOG_PER_SEC {
            logged += 1;
            info!(conversation_id = %conversation_id, "agent stderr: {text}");
        } else {
            skipped += 1;
        }
        if keep > 0 {
            if text.len() > STDERR_TAIL_LINE {
                let mut cut = STDERR_TAIL_LINE;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
            }
            let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
            if tail.len() >= keep {
                tail.pop_front();
            }
            tail.push_back(text);
        }
    }
    if skipped > 0 {
        warn!(conversation_id = %conversation_id, skipped, "agent stderr lines not logged (too many)");
    }
}

// ---- the watcher ------------------------------------------------------------------------

/// The agent's process and everything it started; all killed, and the agent reaped, if
/// dropped while running.
struct ChildGuard {
    child: Child,
    tree: Arc<AgentTree>,
    /// The agent was reaped.
    reaped: bool,
    /// No process of the agent is left (its record is gone).
    ended: bool,
}

impl ChildGuard {
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
struct IoTasks {
    writer: JoinHandle<()>,
    reader: JoinHandle<()>,
    stderr_reader: JoinHandle<()>,
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
struct Watch {
    /// The conversation's sink once attached; dropped unsent when the agent is stopped before.
    attach: oneshot::Receiver<RuntimeSink>,
    stop: oneshot::Receiver<mpsc::Sender<Vec<u8>>>,
    io: IoTasks,
    tail: Arc<Mutex<VecDeque<String>>>,
    grace: Duration,
    label: Label,
    /// Set, and `on_exit` woken, when the agent exits before it was attached.
    exited: Arc<AtomicBool>,
    on_exit: Option<Arc<Notify>>,
}

/// Owns the agent's process: reports its exit, or stops it when told to. Until the agent is
/// attached to a conversation its exit is only recorded (the pool replaces it).
async fn watch(mut child: ChildGuard, w: Watch) {
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
            let message = describe_exit(&status, &tail);
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
async fn stop_sequence(
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

/// The error stored when the agent exits on its own.
fn describe_exit(status: &io::Result<ExitStatus>, tail: &Mutex<VecDeque<String>>) -> String {
    let how = match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("its exit status is unknown: {e}"),
    };
    let tail = tail.lock().unwrap_or_else(|p| p.into_inner());
    if tail.is_empty() {
        format!("The agent process exited unexpectedly ({how}); it wrote nothing to stderr.")
    } else {
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        format!(
            "The agent process exited unexpectedly ({how}). Last lines of its stderr:\n{}",
            lines.join("\n")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_protocol_lines() {
        assert_eq!(
            parse_line(br#"{"type":"ready"}"#).unwrap(),
            Some(RuntimeSignal::READY)
        );
        assert_eq!(parse_line(b"   ").unwrap(), None);
        let Some(RuntimeSignal::Event(body)) = parse_line(
            br#"{"type":"event","event":{"observation":"run","content":"hi","extras":{"exit_code":0}}}"#,
        )
        .unwrap() else {
            panic!("expected an event")
        };
        assert_eq!(body.source, Source::Agent);
        let Some(RuntimeSignal::Status(s)) =
            parse_line(br#"{"type":"status","status_type":"error","id":"STATUS$X","message":"m"}"#)
                .unwrap()
        else {
            panic!("expected a status")
        };
        assert_eq!(
            (s.kind.as_str(), s.id.as_deref(), s.message.as_str()),
            ("error", Some("STATUS$X"), "m")
        );
        for bad in [
            &b"not json"[..],
            b"[1]",
            b"{}",
            br#"{"type":"dance"}"#,
            br#"{"type":"event"}"#,
            br#"{"type":"event","event":{"source":"user","action":"message"}}"#,
            br#"{"type":"event","ref":"","event":{"action":"run"}}"#,
            br#"{"type":"event","ref":1.5,"event":{"action":"run"}}"#,
            br#"{"type":"event","event":{"observation":"run","cause":{"id":1}}}"#,
            br#"{"type":"event","event":{"observation":"run","cause":"3"}}"#,
            br#"{"type":"ready","manages_agent_state":"yes"}"#,
            br#"{"type":"status","status_type":"warning","id":"X"}"#,
            br#"{"type":"status","status_type":"info"}"#,
            b"\xff\xfe",
        ] {
            assert!(parse_line(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[actix::test]
    async fn line_reader_bounds_lines() {
        let data: &[u8] = b"short\nabcdefghijkl\r\n\nlast";
        let mut r = LineReader::new(data, 4, 8);
        let mut out = Vec::new();
        while let Some(line) = r.next_line().await.unwrap() {
            out.push((
                String::from_utf8_lossy(line.bytes).into_owned(),
                line.cut_from,
            ));
        }
        assert_eq!(
            out,
            [
                ("short".to_string(), None),
                ("abcdefgh".to_string(), Some(13)),
                (String::new(), None),
                ("last".to_string(), None),
            ]
        );
    }

    #[test]
    fn user_events_keep_the_stored_layout_without_timestamp() {
        let body = EventBody::message(Source::User, "ls", json!([]), false);
        let v = event_value(7, &body);
        let stored: Value = serde_json::from_str(&body.stamp(7, "t").json).unwrap();
        let mut expected = stored.as_object().unwrap().clone();
        expected.shift_remove("timestamp");
        assert_eq!(v, Value::Object(expected));
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "source", "message", "action", "args"]);
    }
}
