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
//!
//! Its parts: this module is the runtime and the [`Agent`] handle (launch, attach, stop);
//! `protocol` the lines of the protocol (the `init` head, what switchboard writes, the checks
//! of what an agent writes); `pipes` the writer, reader and stderr tasks; `child` the command,
//! the start with its record, and the watcher with the stop sequence.
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
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::pool::AgentPool;
use super::process_tree::{AgentTree, TOKEN_ENV};
use super::sandbox;
use super::{ReferencedEvent, Runtime, RuntimeSignal, RuntimeSink, RuntimeStart};
use crate::config::{ProcessSettings, SandboxKind, Settings};
use crate::conversation::{ConversationId, InitData};
use crate::events::{EventBody, Source, StatusUpdate};
use crate::failure::Failure;
use crate::store::{EventQuery, Store};

mod child;
mod pipes;
mod protocol;

use child::*;
use pipes::*;
use protocol::*;
pub use protocol::{
    parse_line, PROTOCOL_VERSION, STATUS_AGENT_INPUT_ERROR, STATUS_AGENT_PROTOCOL_ERROR,
};

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

    fn spawn(&mut self, start: RuntimeStart<'_>) -> Result<(), Failure> {
        let conversation_id: Arc<str> = start.conversation_id.as_str().into();
        let place = Place::conversation(&self.settings, &conversation_id);
        let head = init_head(
            &conversation_id,
            start.trigger,
            start.init,
            &place.working_dir,
            start.settings.as_ref(),
        )?;
        let history = History {
            id: start.conversation_id.clone(),
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
            .map_err(|()| Failure::new("the agent exited as soon as it started"))?;
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
    /// The started process (the sandbox's when there is one).
    pid: Option<u32>,
    sandbox: SandboxKind,
}

impl Agent {
    /// Starts an agent process in `place` with its tasks on the current arbiter. It gets its
    /// `init` once attached; `on_exit` is woken if it exits before that.
    pub fn launch(
        settings: &Settings,
        place: Place,
        on_exit: Option<Arc<Notify>>,
    ) -> Result<Agent, Failure> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let (command, shown) = agent_command(settings, &place, &token)?;
        let guard = start_recorded(command, &shown, settings, &place, token)?;
        Agent::serve(guard, place, &settings.runtime.process, on_exit)
    }

    /// Starts the four tasks that serve a started agent (see the module docs).
    fn serve(
        mut guard: ChildGuard,
        place: Place,
        p: &ProcessSettings,
        on_exit: Option<Arc<Notify>>,
    ) -> Result<Agent, Failure> {
        let Some((stdin, stdout, stderr)) = guard.take_stdio() else {
            return Err("the agent's stdin, stdout and stderr could not be opened".into());
        };
        let label = Label::new(place.name.clone());
        let pid = guard.id();
        let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE_LINES);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (writer_tx, writer_rx) = oneshot::channel();
        let (reader_tx, reader_rx) = oneshot::channel();
        let (watcher_tx, watcher_rx) = oneshot::channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let exited = Arc::new(AtomicBool::new(false));
        let io = IoTasks {
            writer: tokio::task::spawn_local(write_input(
                stdin,
                writer_rx,
                input_rx,
                label.clone(),
            )),
            reader: tokio::task::spawn_local(read_output(
                stdout,
                reader_rx,
                p.max_line_bytes,
                label.clone(),
            )),
            stderr_reader: tokio::task::spawn_local(read_stderr(
                stderr,
                tail.clone(),
                p.stderr_tail_lines,
                label.clone(),
            )),
        };
        let watcher = tokio::task::spawn_local(watch(
            guard,
            Watch {
                attach: watcher_rx,
                stop: stop_rx,
                io,
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
            pid,
            sandbox: p.sandbox,
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

    /// Whether its sandbox is set up ([`sandbox::is_set_up`]): from then on its directories
    /// may be renamed. Always true without a sandbox.
    pub fn set_up(&self) -> bool {
        self.pid
            .is_some_and(|pid| sandbox::is_set_up(self.sandbox, pid))
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
