//! The warm pool (`runtime.process.warm = N`): agent processes started ahead of their
//! conversations, so that a new conversation only waits for its agent to answer `init`.
//!
//! What it promises:
//!
//! - **N agents wait**, each started exactly like a conversation's own ([`Agent::launch`], the
//!   same command, environment, sandbox and records under `<data_dir>/agents/`), but in a
//!   directory of its own named `.pool-<hex>` (never a conversation id), without
//!   `SWITCHBOARD_CONVERSATION_ID`, and with nothing written to its stdin yet. It joins the
//!   pool only once its sandbox is set up ([`Agent::set_up`]): bubblewrap mounts and enters the
//!   `.pool-<hex>` directories by name after the start, and fails if they were renamed first.
//! - **A conversation takes one at once** ([`AgentPool::take`], the oldest first): its
//!   directories — the working directory and, sandboxed, the other writable ones such as the
//!   OpenHands state directory — are renamed to the conversation's (a sandbox's bind mount and
//!   the agent's current directory follow the renamed directory; the old names stay links to
//!   the new ones until the agent's `ready`, for an agent still looking itself up by path), and
//!   it gets `init` as a cold agent would. When the conversation's directory already holds files (a conversation started
//!   again, usually) the rename cannot replace it: the agent stays in the pool and the
//!   conversation starts its own.
//! - **Refilled in the background**, one start at a time, spread over the conversation threads
//!   (the agent's I/O stays on the thread that started it). Starts that fail — and pooled
//!   agents that exit while waiting, which are replaced — pause the refill from 0.5 s doubling
//!   to 30 s, one start per pause until an agent was handed out or has waited 10 s, so a broken
//!   agent command costs a start every 30 s, not a spinning CPU. Both are logged and counted
//!   (`switchboard_pool_agents`, `switchboard_pool_spawn_failures`).
//! - **Counted against `limits.max_running_conversations`**: the pool holds at most
//!   `min(N, limit − live conversations)` agents and stops the extra ones when conversations
//!   need the room; admission never looks at the pool, so no create is ever refused because of
//!   it.
//! - **Nothing runs while the node is fenced** from the cluster ([`AgentPool::set_fenced`]):
//!   every pooled agent is told to stop and none is started until the node has registered
//!   again.
//! - **Nothing outlives the server**: [`AgentPool::shut_down`] stops every pooled agent (its
//!   stdin closes, then the usual grace periods), the arbiters' teardown kills what is left, and
//!   after a `kill -9` the next start sweeps the agents' records ([`super::process_tree`]) and
//!   the leftover `.pool-*` directories ([`sweep_dirs`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::process::{Agent, Place};
use crate::config::Settings;
use crate::failure::Failure;
use crate::ops::metrics::metrics;

/// The start of every pooled agent's name (a conversation id never contains a dot).
const NAME_PREFIX: &str = ".pool-";
/// The first pause after a failed start; it doubles with each failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest pause between two failing starts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a just started pooled agent is looked at until its sandbox is set up.
const SET_UP_POLL: Duration = Duration::from_millis(5);
/// How long a pooled agent must have waited for the starts to count as working again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// The pool of one server. See the module docs.
pub struct AgentPool {
    settings: Arc<Settings>,
    /// Live conversations (the supervisor's registry size), which the pool makes room for.
    live: AtomicUsize,
    state: Mutex<State>,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct State {
    /// Agents waiting for a conversation, the oldest first.
    waiting: VecDeque<Agent>,
    /// Watchers of pooled agents told to stop and not yet gone.
    stopping: Vec<JoinHandle<()>>,
    /// A start is under way.
    launching: bool,
    /// An agent was handed out since the refill last looked.
    handed_out: bool,
    /// The node fenced itself from the cluster: no agent waits until it has registered again.
    fenced: bool,
    shut: bool,
    arbiter: Option<ArbiterHandle>,
}

impl AgentPool {
    /// With `runtime.process.warm > 0` and an agent-process runtime: starts the pool's refill on
    /// an arbiter of its own; its agents are started on `arbiters` in turn.
    pub fn start(settings: Arc<Settings>, arbiters: Vec<ArbiterHandle>) -> Option<Arc<AgentPool>> {
        if settings.runtime.process.warm == 0
            || !settings.runtime.kind.runs_agent_process()
            || arbiters.is_empty()
        {
            return None;
        }
        let pool = Arc::new(AgentPool {
            settings,
            live: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            wake: Arc::new(Notify::new()),
        });
        let arbiter = Arbiter::new().handle();
        pool.lock().arbiter = Some(arbiter.clone());
        arbiter.spawn(pool.clone().refill(arbiters));
        info!(
            warm = pool.settings.runtime.process.warm,
            "warm pool of agents started"
        );
        Some(pool)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many live conversations there are now (the pool shrinks to leave them room).
    pub fn set_live(&self, conversations: usize) {
        if self.live.swap(conversations, Ordering::AcqRel) != conversations {
            self.wake.notify_one();
        }
    }

    /// How many agents the pool should hold now.
    fn target(&self) -> usize {
        let limit = self.settings.limits.max_running_conversations;
        let live = self.live.load(Ordering::Acquire);
        self.settings
            .runtime
            .process
            .warm
            .min(limit.saturating_sub(live))
    }

    /// How many agents wait in the pool now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// A waiting agent, its directories moved to `place`; `None` when none waits or the
    /// directories cannot be moved (the conversation then starts its own agent).
    pub fn take(&self, place: &Place) -> Option<Agent> {
        let mut state = self.lock();
        // One that exited is left for the refill to count and replace.
        let at = state.waiting.iter().position(|a| !a.exited())?;
        let mut taken = state.waiting.remove(at)?;
        let aliases = match move_dirs(taken.place(), place) {
            Ok(aliases) => aliases,
            Err(why) => {
                debug!(conversation_id = %place.name, "not taking a pooled agent: {why}");
                state.waiting.insert(at, taken);
                return None;
            }
        };
        taken.moved_to(place.clone(), aliases);
        state.handed_out = true;
        drop(state);
        self.wake.notify_one();
        Some(taken)
    }

    /// While `fenced` (the node fenced itself from the cluster), every pooled agent is told to
    /// stop and none is started; once the node has registered again the refill starts them
    /// anew.
    pub fn set_fenced(&self, fenced: bool) {
        {
            let mut state = self.lock();
            if state.fenced == fenced {
                return;
            }
            state.fenced = fenced;
            if fenced {
                let stopped: Vec<Agent> = state.waiting.drain(..).collect();
                info!(
                    agents = stopped.len(),
                    "fenced from the cluster: stopping the pooled agents"
                );
                for agent in stopped {
                    stop(&mut state, agent);
                }
            }
        }
        self.wake.notify_one();
    }

    /// Stops the pool: no more starts, every pooled agent told to stop. Completes once all of
    /// them are gone (the caller bounds the wait; past it, the arbiters' teardown kills them).
    pub fn shut_down(self: &Arc<Self>) -> impl std::future::Future<Output = ()> + 'static {
        {
            let mut state = self.lock();
            state.shut = true;
            let stopped: Vec<Agent> = state.waiting.drain(..).collect();
            for agent in stopped {
                stop(&mut state, agent);
            }
        }
        self.wake.notify_one();
        let pool = self.clone();
        async move {
            loop {
                let (handles, launching) = {
                    let mut state = pool.lock();
                    (std::mem::take(&mut state.stopping), state.launching)
                };
                if handles.is_empty() && !launching {
                    break;
                }
                for handle in handles {
                    let _ = handle.await;
                }
                if launching {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            pool.stop_thread();
            info!("warm pool stopped");
        }
    }

    /// Ends the thread the refill runs on (the agents run elsewhere).
    pub fn stop_thread(&self) {
        if let Some(arbiter) = self.lock().arbiter.take() {
            arbiter.stop();
        }
    }

    /// Keeps the pool at its target, one start at a time, until shut down.
    async fn refill(self: Arc<Self>, arbiters: Vec<ArbiterHandle>) {
        let mut next_arbiter = 0usize;
        let mut failures = 0u32;
        let mut retry_at: Option<Instant> = None;
        loop {
            let (waiting, target, died) = {
                let mut state = self.lock();
                if state.shut {
                    return;
                }
                // An agent handed out, or one that has waited a while, shows that starts work.
                let healthy = state
                    .waiting
                    .front()
                    .is_some_and(|a| !a.exited() && a.started().elapsed() >= HEALTHY_AFTER);
                if std::mem::take(&mut state.handed_out) || healthy {
                    failures = 0;
                    retry_at = None;
                }
                let before = state.waiting.len();
                let (dead, alive): (VecDeque<Agent>, VecDeque<Agent>) =
                    state.waiting.drain(..).partition(Agent::exited);
                state.waiting = alive;
                for agent in &dead {
                    remove_dirs(agent.place());
                }
                drop(dead);
                let died = before - state.waiting.len();
                let target = if state.fenced { 0 } else { self.target() };
                while state.waiting.len() > target {
                    if let Some(agent) = state.waiting.pop_back() {
                        debug!(agent = %agent.place().name, "stopping a pooled agent to make room");
                        stop(&mut state, agent);
                    }
                }
                state.stopping.retain(|h| !h.is_finished());
                (state.waiting.len(), target, died)
            };
            if died > 0 {
                failures = failures.saturating_add(died as u32);
                metrics().pool_spawn_failures.inc_by(died as u64);
                retry_at = Some(Instant::now() + backoff(failures));
            }
            let due = retry_at.is_none_or(|at| Instant::now() >= at);
            if waiting < target && due {
                let arbiter = &arbiters[next_arbiter % arbiters.len()];
                next_arbiter = next_arbiter.wrapping_add(1);
                self.lock().launching = true;
                let result = self.launch_on(arbiter).await;
                let mut state = self.lock();
                state.launching = false;
                match result {
                    Ok(agent) if state.shut || state.fenced => stop(&mut state, agent),
                    Ok(agent) => {
                        debug!(agent = %agent.place().name, "pooled agent started");
                        state.waiting.push_back(agent);
                        if failures > 0 {
                            // Until starts work again, one at a time, each after a pause.
                            retry_at = Some(Instant::now() + backoff(failures));
                        }
                    }
                    Err(why) => {
                        failures = failures.saturating_add(1);
                        let wait = backoff(failures);
                        retry_at = Some(Instant::now() + wait);
                        metrics().pool_spawn_failures.inc();
                        warn!(
                            retry_in_ms = wait.as_millis() as u64,
                            "cannot start a pooled agent: {why}"
                        );
                    }
                }
                continue;
            }
            match retry_at {
                Some(at) if waiting < target => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                _ => self.wake.notified().await,
            }
        }
    }

    /// Starts one pooled agent on `arbiter`, where its I/O tasks will run.
    async fn launch_on(&self, arbiter: &ArbiterHandle) -> Result<Agent, Failure> {
        let name = format!("{NAME_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let place = Place::pooled(&self.settings, &name);
        let settings = self.settings.clone();
        let wake = self.wake.clone();
        let (tx, rx) = oneshot::channel();
        let sent = arbiter.spawn(async move {
            let _ = tx.send(Agent::launch(&settings, place.clone(), Some(wake)));
        });
        let result = if sent {
            rx.await
                .unwrap_or_else(|_| Err("the conversation thread stopped".into()))
        } else {
            Err("the conversation thread stopped".into())
        };
        let agent = match result {
            Ok(agent) => agent,
            Err(why) => {
                // Its directories were made for nothing.
                remove_dirs(&Place::pooled(&self.settings, &name));
                return Err(why);
            }
        };
        self.until_set_up(agent).await
    }

    /// Waits until a just started agent's sandbox is set up ([`Agent::set_up`]), so that only
    /// agents whose directories may be renamed are ever handed out. One that exits meanwhile, or
    /// is not set up within `limits.start_timeout_secs`, is a failed start (stopped, its
    /// directories removed once it is gone).
    async fn until_set_up(&self, agent: Agent) -> Result<Agent, Failure> {
        let limit = Duration::from_secs(self.settings.limits.start_timeout_secs);
        let began = Instant::now();
        loop {
            let closed = {
                let state = self.lock();
                state.shut || state.fenced
            };
            // Shut or fenced meanwhile: the refill stops it.
            if closed || agent.set_up() {
                return Ok(agent);
            }
            let why = if agent.exited() {
                "it exited while its sandbox was being set up"
            } else if began.elapsed() >= limit {
                "its sandbox was not set up within limits.start_timeout_secs"
            } else {
                tokio::time::sleep(SET_UP_POLL).await;
                continue;
            };
            stop(&mut self.lock(), agent);
            return Err(format!("the pooled agent did not start: {why}").into());
        }
    }
}

/// Tells a pooled agent to stop and keeps its watcher for the shutdown to wait on; its
/// directories go once it is gone.
fn stop(state: &mut State, mut agent: Agent) {
    agent.stop();
    let place = agent.place().clone();
    if let Some(watcher) = agent.take_watcher() {
        state.stopping.push(actix::spawn(async move {
            let _ = watcher.await;
            remove_dirs(&place);
        }));
    }
}

fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1u32 << doublings)
        .min(MAX_BACKOFF)
}

/// Renames `from`'s directories to `to`'s (an existing empty directory is replaced; one that
/// holds files is not, and then nothing is moved). Where the old names were, symbolic links to
/// the new ones are left (returned): an agent still starting may look its directory up by the
/// name it started in (a shell wrapper returning to its `$PWD`, say). A directory that is its own
/// root and moves to a new name trades places with its link in one step, so that name is never
/// missing in between ([`exchange_with_link`]).
fn move_dirs(from: &Place, to: &Place) -> Result<Vec<PathBuf>, String> {
    let pairs: Vec<(&Path, &Path)> = from.dirs().zip(to.dirs()).filter(|(a, b)| a != b).collect();
    let roots = from.own_roots();
    let mut aliases = Vec::new();
    for (i, (a, b)) in pairs.iter().enumerate() {
        let moved = match b.parent() {
            Some(parent) => std::fs::create_dir_all(parent),
            None => Ok(()),
        }
        .and_then(|()| {
            if roots.iter().any(|r| r == a) && exchange_with_link(a, b)? {
                aliases.push(a.to_path_buf());
                Ok(())
            } else {
                std::fs::rename(a, b)
            }
        });
        if let Err(e) = moved {
            for (a, b) in pairs[..i].iter().rev() {
                if aliases.iter().any(|l| l == a) {
                    let _ = std::fs::remove_file(a);
                }
                let _ = std::fs::rename(b, a);
            }
            return Err(format!(
                "cannot move {} to {}: {e}",
                a.display(),
                b.display()
            ));
        }
    }
    remove_emptied_roots(from);
    for root in roots {
        if aliases.contains(&root) {
            continue;
        }
        let Some(own) = root.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let target = root.with_file_name(own.replace(&*from.name, &to.name));
        #[cfg(unix)]
        if std::os::unix::fs::symlink(&target, &root).is_ok() {
            aliases.push(root);
        }
    }
    Ok(aliases)
}

/// Moves directory `a` to `b` (which must not exist) and leaves a link to `b` at `a` in one step:
/// a link made at `b` is exchanged with the directory (`renameat2` with `RENAME_EXCHANGE`), so a
/// process looking `a` up by name never finds it missing. `Ok(false)`, with nothing changed,
/// where `b` exists or the file system cannot exchange (the caller then renames and links in
/// two steps).
#[cfg(target_os = "linux")]
fn exchange_with_link(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    if std::fs::symlink_metadata(b).is_ok() {
        return Ok(false);
    }
    std::os::unix::fs::symlink(b, b)?;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (Ok(ca), Ok(cb)) = (c(a), c(b)) else {
        let _ = std::fs::remove_file(b);
        return Ok(false);
    };
    // SAFETY: both paths are NUL-terminated strings that outlive the call; AT_FDCWD makes
    // them relative to the current directory, like `std::fs::rename`.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let _ = std::fs::remove_file(b);
    Ok(false)
}

#[cfg(not(target_os = "linux"))]
fn exchange_with_link(_a: &Path, _b: &Path) -> std::io::Result<bool> {
    Ok(false)
}

/// Removes a pooled agent's directories (after it is gone).
fn remove_dirs(place: &Place) {
    for root in place.own_roots() {
        let _ = std::fs::remove_dir_all(root);
    }
}

/// After `from`'s directories were moved away: removes the now empty directories above them
/// that were made for it alone.
fn remove_emptied_roots(from: &Place) {
    for (dir, root) in from.dirs().zip(from.own_roots()) {
        for a in dir.ancestors().skip(1) {
            if !a.starts_with(&root) || std::fs::remove_dir(a).is_err() {
                break;
            }
        }
    }
}

/// At start (after the agents of a previous run were swept): removes the directories pooled
/// agents of a previous run left, found as `.pool-<32 hex>` where the configured paths put a
/// conversation id.
pub fn sweep_dirs(settings: &Settings) {
    if !settings.runtime.kind.runs_agent_process() {
        return;
    }
    let sample = format!("{NAME_PREFIX}{}", "0".repeat(32));
    let place = Place::pooled(settings, &sample);
    let mut removed = 0usize;
    for top in place.own_roots() {
        let (Some(parent), Some(pattern)) =
            (top.parent(), top.file_name().and_then(|n| n.to_str()))
        else {
            continue;
        };
        let Some((before, after)) = pattern.split_once(&sample) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(n) = file_name.to_str() else {
                continue;
            };
            let hex = n
                .strip_prefix(before)
                .and_then(|n| n.strip_suffix(after))
                .and_then(|n| n.strip_prefix(NAME_PREFIX));
            if hex.is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                && std::fs::remove_dir_all(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    if removed > 0 {
        info!(
            removed,
            "removed directories of pooled agents a previous run left"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(9), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_pooled_directory_trades_places_with_its_link_at_once() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join(".pool-x"), root.path().join("c1"));
        std::fs::create_dir(&a).unwrap();
        std::fs::write(a.join("f"), "x").unwrap();
        assert!(
            exchange_with_link(&a, &b).unwrap(),
            "the exchange is supported here"
        );
        assert!(std::fs::symlink_metadata(&a)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_link(&a).unwrap(), b);
        assert!(std::fs::symlink_metadata(&b).unwrap().is_dir());
        assert_eq!(std::fs::read_to_string(a.join("f")).unwrap(), "x");
        // A name that exists is not exchanged: nothing changes.
        let c = root.path().join(".pool-y");
        std::fs::create_dir(&c).unwrap();
        assert!(!exchange_with_link(&c, &b).unwrap());
        assert!(std::fs::symlink_metadata(&c).unwrap().is_dir());
        assert_eq!(std::fs::read_to_string(b.join("f")).unwrap(), "x");

        // Through move_dirs, a pooled working directory that is its own root.
        let mut s = Settings::defaults();
        s.data_dir = root.path().to_path_buf();
        s.runtime.process.working_dir = root.path().join("{conversation_id}").display().to_string();
        let name = format!("{NAME_PREFIX}{}", "c".repeat(32));
        let pooled = Place::pooled(&s, &name);
        std::fs::create_dir_all(&pooled.working_dir).unwrap();
        std::fs::write(pooled.working_dir.join("g"), "y").unwrap();
        let to = Place::conversation(&s, "c2");
        let aliases = move_dirs(&pooled, &to).unwrap();
        assert_eq!(aliases, std::slice::from_ref(&pooled.working_dir));
        assert_eq!(
            std::fs::read_link(&pooled.working_dir).unwrap(),
            to.working_dir
        );
        assert_eq!(
            std::fs::read_to_string(to.working_dir.join("g")).unwrap(),
            "y"
        );
    }

    #[test]
    fn directories_move_to_the_conversation_and_nested_leftovers_go() {
        let root = tempfile::tempdir().unwrap();
        let mut s = Settings::defaults();
        s.data_dir = root.path().to_path_buf();
        s.runtime.process.working_dir = root
            .path()
            .join("{conversation_id}/work")
            .display()
            .to_string();
        let name = format!("{NAME_PREFIX}{}", "a".repeat(32));
        let pooled = Place::pooled(&s, &name);
        std::fs::create_dir_all(&pooled.working_dir).unwrap();
        std::fs::write(pooled.working_dir.join("f"), "x").unwrap();
        let to = Place::conversation(&s, "c1");
        let aliases = move_dirs(&pooled, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("c1/work/f")).unwrap(),
            "x"
        );
        // The old name is a link to the new one.
        assert_eq!(aliases, [root.path().join(&name)]);
        assert_eq!(
            std::fs::read_link(root.path().join(&name)).unwrap(),
            root.path().join("c1")
        );
        assert_eq!(
            std::fs::read_to_string(pooled.working_dir.join("f")).unwrap(),
            "x"
        );

        // A conversation directory holding files is never replaced.
        let other = format!("{NAME_PREFIX}{}", "b".repeat(32));
        let pooled = Place::pooled(&s, &other);
        std::fs::create_dir_all(&pooled.working_dir).unwrap();
        assert!(move_dirs(&pooled, &to).is_err());
        assert!(pooled.working_dir.is_dir());
        assert_eq!(
            std::fs::read_to_string(root.path().join("c1/work/f")).unwrap(),
            "x"
        );

        // Left over by a previous run: swept (a link too, not what it points to); a
        // conversation's directory is not.
        sweep_dirs(&{
            let mut s = s.clone();
            s.runtime.kind = crate::config::RuntimeKind::Process;
            s
        });
        assert!(!root.path().join(&other).exists());
        assert!(std::fs::symlink_metadata(root.path().join(&name)).is_err());
        assert!(root.path().join("c1/work/f").exists());
    }
}
