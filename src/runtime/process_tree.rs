//! Every process an agent starts, from its start to its end — even across a `kill -9` of the
//! server.
//!
//! This module owns three things for the `process` runtime:
//!
//! - **Finding an agent's processes.** The agent runs in its own session (its pid is also its
//!   session and process group id) and is its own tree's *child subreaper*
//!   (`PR_SET_CHILD_SUBREAPER`): whatever it starts stays its descendant even when an
//!   intermediate parent exits (`setsid -f`, `nohup … &`, double-fork daemons). Every process
//!   it starts also inherits [`TOKEN_ENV`], a token unique to this start of the agent. A
//!   process belongs to the agent when it started no earlier than the agent and it is the agent
//!   or its descendant, is in the agent's session or process group, carries the token in its
//!   environment, or was seen as a member before (same pid *and* start time). Once the agent
//!   itself is gone its descendants are re-parented away from it, and the other three rules
//!   still find them.
//! - **A durable record of each agent.** `<data_dir>/agents/<pid>-<start time>.json` (whatever
//!   the store; the process runtime keeps its workspaces in the data directory too) names the
//!   agent's pid, its start time (`/proc/<pid>/stat` field 22), its token, the machine's boot id,
//!   the server that started it, and the members seen so far — refreshed by one scan of `/proc`
//!   per second while agents run ([`SCAN_INTERVAL`]). The record is removed only once no process
//!   of the agent is left.
//! - **Ending them.** [`AgentTree::signal`] signals every member (SIGTERM in the stop sequence);
//!   [`AgentTree::end`] kills members until none is left, then drops the record. At start,
//!   [`sweep`] does the same for every record a previous server left (one killed with
//!   `kill -9`, say: its agents died with it through `PR_SET_PDEATHSIG`, but not what they
//!   started).
//!
//! A reused pid is never signalled: a session or process group is matched only when its leader
//! is gone or is the recorded process (same start time), every other match compares the start
//! time too, a record from before the last boot is dropped unread, a record of a server that is
//! still running is left alone, and each signal goes through a pidfd opened and checked against
//! the start time first, so a process that exits between the scan and the signal is never
//! confused with its successor.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// The directory inside the data directory that holds the agent records.
pub const RECORDS_DIR: &str = "agents";
/// The environment variable that marks every process one start of an agent starts.
pub const TOKEN_ENV: &str = "SWITCHBOARD_AGENT_TOKEN";
/// How often running agents' members are looked up and their records refreshed.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Pause between two rounds of killing.
const KILL_PAUSE: Duration = Duration::from_millis(20);
/// How long ending one agent's processes may take before the rest is left to the next start.
const END_LIMIT: Duration = Duration::from_secs(5);

// ---- /proc ------------------------------------------------------------------------------

/// One process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// Clock ticks after boot (field 22): with the pid, it names a process for good.
    pub start_time: u64,
    /// Exited, not yet reaped: it cannot be signalled and runs nothing.
    pub zombie: bool,
}

/// Parses the text of `/proc/<pid>/stat`.
fn parse_stat(pid: i32, text: &str) -> Option<ProcInfo> {
    // The command name (field 2) is in parentheses and may hold spaces and parentheses.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // `fields[0]` is field 3 (state), so field n is `fields[n - 3]`.
    Some(ProcInfo {
        pid,
        zombie: matches!(*fields.first()?, "Z" | "X" | "x"),
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// One process, or `None` when there is no such pid.
pub fn read_proc(pid: i32) -> Option<ProcInfo> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

/// The value of `name` in a process's initial environment.
fn environ_value(pid: i32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|entry| {
        let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        String::from_utf8(value.to_vec()).ok()
    })
}

/// This boot of the machine; start times count from it.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn own_pid() -> i32 {
    i32::try_from(std::process::id()).unwrap_or(i32::MAX)
}

/// Every process on the machine at one moment, with lookups by pid and by parent.
struct Procs {
    list: Vec<ProcInfo>,
    by_pid: HashMap<i32, usize>,
    children: HashMap<i32, Vec<usize>>,
}

impl Procs {
    /// A scan of `/proc` that began after this call: the one in progress is not good enough,
    /// but callers waiting together share the next one (many agents stopping at once cost a
    /// few scans, not one each).
    fn fresh() -> Arc<Procs> {
        static LAST: Mutex<Option<(Instant, Arc<Procs>)>> = Mutex::new(None);
        let asked = Instant::now();
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((began, procs)) = last.as_ref() {
            if *began >= asked {
                return procs.clone();
            }
        }
        let began = Instant::now();
        let procs = Arc::new(Procs::scan());
        *last = Some((began, procs.clone()));
        procs
    }

    fn scan() -> Procs {
        let mut list = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                if let Some(p) = read_proc(pid) {
                    list.push(p);
                }
            }
        }
        let mut by_pid = HashMap::with_capacity(list.len());
        let mut children: HashMap<i32, Vec<usize>> = HashMap::new();
        for (i, p) in list.iter().enumerate() {
            by_pid.insert(p.pid, i);
            children.entry(p.ppid).or_default().push(i);
        }
        Procs {
            list,
            by_pid,
            children,
        }
    }

    fn get(&self, pid: i32) -> Option<&ProcInfo> {
        self.by_pid.get(&pid).map(|&i| &self.list[i])
    }
}

/// Sends `signal` to the process `p` names, and only to it: through a pidfd, after checking
/// that the pid still has `p`'s start time. False when it is gone.
fn signal_exact(p: &ProcInfo, signal: libc::c_int) -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid, 0) };
        if fd >= 0 {
            let fd = fd as libc::c_int;
            let same = read_proc(p.pid).is_some_and(|q| q.start_time == p.start_time);
            if same {
                // SAFETY: `fd` is the pidfd opened above; a null siginfo is allowed.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd,
                        signal,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
            }
            // SAFETY: closes the descriptor opened above, once.
            unsafe { libc::close(fd) };
            return same;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
            return false;
        }
    }
    // No pidfds (an old kernel): check, then signal by pid.
    if read_proc(p.pid).is_some_and(|q| q.start_time == p.start_time) {
        // SAFETY: `kill` has no memory-safety preconditions.
        unsafe { libc::kill(p.pid, signal) };
        return true;
    }
    false
}

// ---- records ----------------------------------------------------------------------------

/// What identifies one started agent's processes, kept in the data directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub conversation_id: String,
    /// The agent: also the id of its session and process group.
    pub pid: i32,
    /// The agent's start time (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// The value of [`TOKEN_ENV`] every process of this agent inherits.
    pub token: String,
    /// The boot the start times count from.
    pub boot_id: String,
    /// The server that started the agent, and its start time.
    pub server_pid: i32,
    pub server_start_time: u64,
    /// Processes of the agent seen so far besides the agent: (pid, start time).
    #[serde(default)]
    pub members: Vec<(i32, u64)>,
}

impl AgentRecord {
    fn file_name(&self) -> String {
        format!("{}-{}.json", self.pid, self.start_time)
    }

    /// Every live process of the agent in `procs` (see the module docs for the rules).
    /// `others`: sessions of other agents that are running; their members are theirs unless
    /// recorded as ours, and their environments are not read (which keeps the cost of many
    /// agents stopping at once linear).
    fn members(&self, procs: &Procs, others: &HashSet<i32>) -> Vec<ProcInfo> {
        let me = own_pid();
        let leader = procs.get(self.pid);
        let leader_is_ours = leader.is_none_or(|l| l.start_time == self.start_time);
        // While the agent runs, it is its tree's subreaper: its descendants are all of it.
        // After it, the other rules find what it left; only then are environments read.
        let leader_running = leader.is_some_and(|l| l.start_time == self.start_time && !l.zombie);
        let recorded: HashSet<(i32, u64)> = self.members.iter().copied().collect();
        let candidate = |p: &ProcInfo| p.pid != me && !p.zombie && p.start_time >= self.start_time;
        let mut found: HashSet<i32> = HashSet::new();
        let mut stack: Vec<i32> = Vec::new();
        for p in procs.list.iter().filter(|p| candidate(p)) {
            let ours = (leader_is_ours
                && (p.pid == self.pid || p.session == self.pid || p.pgrp == self.pid))
                || recorded.contains(&(p.pid, p.start_time))
                || (!leader_running
                    && !others.contains(&p.session)
                    && environ_value(p.pid, TOKEN_ENV).is_some_and(|t| t == self.token));
            if ours && found.insert(p.pid) {
                stack.push(p.pid);
            }
        }
        while let Some(pid) = stack.pop() {
            for &i in procs.children.get(&pid).into_iter().flatten() {
                let child = &procs.list[i];
                if candidate(child) && found.insert(child.pid) {
                    stack.push(child.pid);
                }
            }
        }
        let mut out: Vec<ProcInfo> = found
            .into_iter()
            .filter_map(|pid| procs.get(pid).copied())
            .collect();
        out.sort_by_key(|p| p.pid);
        out
    }
}

/// Writes a record next to its final name, then renames it into place.
fn write_record(dir: &Path, record: &AgentRecord) -> io::Result<()> {
    let path = dir.join(record.file_name());
    let tmp = dir.join(format!(".{}.tmp", record.file_name()));
    let json = serde_json::to_vec(record).map_err(io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, &path)
}

fn remove_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %path.display(), error = %e, "cannot remove an agent record"),
    }
}

// ---- one running agent ------------------------------------------------------------------

/// The processes of one started agent, tracked while the server runs.
pub struct AgentTree {
    dir: PathBuf,
    record: Mutex<AgentRecord>,
}

impl AgentTree {
    /// The records directory of a data directory, created if needed. Called before the agent
    /// is started, so that a directory that cannot hold records stops the start.
    pub fn prepare(data_dir: &Path) -> io::Result<PathBuf> {
        let dir = data_dir.join(RECORDS_DIR);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Records the agent just started as `pid` (whose environment holds `token`) and tracks it
    /// from now on.
    pub fn record(
        dir: PathBuf,
        conversation_id: &str,
        pid: i32,
        token: String,
    ) -> io::Result<Arc<AgentTree>> {
        let me = read_proc(own_pid());
        let agent = read_proc(pid)
            .ok_or_else(|| io::Error::other(format!("the agent (pid {pid}) is already gone")))?;
        let record = AgentRecord {
            conversation_id: conversation_id.to_string(),
            pid,
            start_time: agent.start_time,
            token,
            boot_id: boot_id(),
            server_pid: own_pid(),
            server_start_time: me.map_or(0, |m| m.start_time),
            members: Vec::new(),
        };
        write_record(&dir, &record)?;
        let tree = Arc::new(AgentTree {
            dir,
            record: Mutex::new(record),
        });
        Tracker::get().add(&tree);
        Ok(tree)
    }

    fn lock(&self) -> MutexGuard<'_, AgentRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks the members up in `procs` and keeps the record up to date.
    fn update(&self, procs: &Procs) -> Vec<ProcInfo> {
        // Other trees' records are read before this one is locked: never two locks at once.
        let pid = self.lock().pid;
        let others = Tracker::get().running_sessions(procs, pid);
        let mut record = self.lock();
        let members = record.members(procs, &others);
        let seen: Vec<(i32, u64)> = members
            .iter()
            .filter(|p| p.pid != record.pid)
            .map(|p| (p.pid, p.start_time))
            .collect();
        if seen != record.members {
            record.members = seen;
            if let Err(e) = write_record(&self.dir, &record) {
                warn!(conversation_id = %record.conversation_id, error = %e, "cannot update the agent record");
            }
        }
        members
    }

    /// Looks the members up now and records them, off the caller's thread.
    pub async fn refresh(self: &Arc<Self>) {
        let tree = self.clone();
        let _ = tokio::task::spawn_blocking(move || tree.update(&Procs::fresh())).await;
    }

    /// Sends `signal` to every process of the agent; how many got it.
    pub fn signal_now(&self, signal: libc::c_int) -> usize {
        let members = self.update(&Procs::fresh());
        members.iter().filter(|p| signal_exact(p, signal)).count()
    }

    /// [`AgentTree::signal_now`] off the caller's thread.
    pub async fn signal(self: &Arc<Self>, signal: libc::c_int) -> usize {
        let tree = self.clone();
        tokio::task::spawn_blocking(move || tree.signal_now(signal))
            .await
            .unwrap_or(0)
    }

    /// Kills every process of the agent until none is left (at most `limit`), then forgets
    /// the agent and removes its record. False when some process outlived `limit`; its record
    /// stays for the next start's sweep.
    pub fn end_now(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.signal_now(libc::SIGKILL) == 0 {
                let record = self.lock();
                remove_file(&self.dir.join(record.file_name()));
                drop(record);
                Tracker::get().remove(self);
                return true;
            }
            if Instant::now() >= deadline {
                let record = self.lock();
                warn!(
                    conversation_id = %record.conversation_id,
                    pid = record.pid,
                    left = record.members.len(),
                    "agent processes survive SIGKILL; the next start sweeps them"
                );
                return false;
            }
            std::thread::sleep(KILL_PAUSE);
        }
    }

    /// [`AgentTree::end_now`] off the caller's thread.
    pub async fn end(self: &Arc<Self>) -> bool {
        let tree = self.clone();
        tokio::task::spawn_blocking(move || tree.end_now(END_LIMIT))
            .await
            .unwrap_or(false)
    }
}

// ---- the scanner ------------------------------------------------------------------------

/// The agents of this process, refreshed every [`SCAN_INTERVAL`] by one thread.
struct Tracker {
    live: Mutex<Vec<Weak<AgentTree>>>,
}

impl Tracker {
    fn get() -> &'static Tracker {
        static TRACKER: OnceLock<Tracker> = OnceLock::new();
        TRACKER.get_or_init(|| {
            let spawned = std::thread::Builder::new()
                .name("agent-tracker".into())
                .spawn(|| loop {
                    std::thread::sleep(SCAN_INTERVAL);
                    Tracker::get().tick();
                });
            if let Err(e) = spawned {
                warn!(error = %e, "cannot start the agent tracker; agent members are found only at stop");
            }
            Tracker {
                live: Mutex::new(Vec::new()),
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Weak<AgentTree>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, tree: &Arc<AgentTree>) {
        self.lock().push(Arc::downgrade(tree));
    }

    fn remove(&self, tree: &AgentTree) {
        self.lock()
            .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), tree));
    }

    /// The sessions of the tracked agents other than `except` that are running in `procs`.
    fn running_sessions(&self, procs: &Procs, except: i32) -> HashSet<i32> {
        let trees: Vec<Arc<AgentTree>> = self.lock().iter().filter_map(Weak::upgrade).collect();
        trees
            .iter()
            .filter_map(|tree| {
                let record = tree.lock();
                let leader = procs.get(record.pid)?;
                (record.pid != except && leader.start_time == record.start_time && !leader.zombie)
                    .then_some(record.pid)
            })
            .collect()
    }

    fn tick(&self) {
        let trees: Vec<Arc<AgentTree>> = {
            let mut live = self.lock();
            live.retain(|w| w.strong_count() > 0);
            live.iter().filter_map(Weak::upgrade).collect()
        };
        if trees.is_empty() {
            return;
        }
        let procs = Procs::fresh();
        for tree in trees {
            tree.update(&procs);
        }
    }
}

// ---- the sweep at start -----------------------------------------------------------------

/// What [`sweep`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Records of agents whose server is gone.
    pub records: usize,
    /// Processes killed.
    pub killed: usize,
    /// Records kept because some of their processes survived.
    pub kept: usize,
}

/// Ends whatever the agents of a previous server on `data_dir` left running, and removes their
/// records. Records of a server that still runs (this one included) are left alone. Blocking;
/// call it at start.
pub fn sweep(data_dir: &Path) -> SweepReport {
    let dir = data_dir.join(RECORDS_DIR);
    let mut report = SweepReport::default();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return report;
    };
    let boot = boot_id();
    let mut records: Vec<(PathBuf, AgentRecord)> = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") {
            // A record that was never renamed into place: its agent is recorded elsewhere or
            // was never started.
            remove_file(&path);
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let record = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<AgentRecord>(&bytes).ok());
        let Some(record) = record else {
            warn!(path = %path.display(), "unreadable agent record removed");
            remove_file(&path);
            continue;
        };
        if record.boot_id != boot {
            // Everything it names ended with the previous boot.
            remove_file(&path);
            continue;
        }
        let server_alive = read_proc(record.server_pid)
            .is_some_and(|s| s.start_time == record.server_start_time && !s.zombie);
        if server_alive {
            continue;
        }
        records.push((path, record));
    }
    report.records = records.len();
    let deadline = Instant::now() + END_LIMIT;
    let mut killed: HashSet<(i32, u64)> = HashSet::new();
    while !records.is_empty() {
        let procs = Procs::scan();
        let mut left = Vec::new();
        for (path, record) in records {
            let members = record.members(&procs, &HashSet::new());
            if members.is_empty() {
                debug!(conversation_id = %record.conversation_id, pid = record.pid, "agent record swept");
                remove_file(&path);
                continue;
            }
            for p in &members {
                if signal_exact(p, libc::SIGKILL) {
                    killed.insert((p.pid, p.start_time));
                }
            }
            left.push((path, record));
        }
        records = left;
        if records.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            report.kept = records.len();
            warn!(
                records = records.len(),
                "processes of a previous run survive SIGKILL; their records are kept"
            );
            break;
        }
        std::thread::sleep(KILL_PAUSE);
    }
    report.killed = killed.len();
    if report.records > 0 {
        info!(
            records = report.records,
            killed = report.killed,
            "swept the processes agents of a previous run left behind"
        );
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines_with_odd_names() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 10 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let p = parse_stat(4242, line).expect("parsed");
        assert_eq!(
            p,
            ProcInfo {
                pid: 4242,
                ppid: 1,
                pgrp: 4242,
                session: 4242,
                start_time: 987654,
                zombie: false,
            }
        );
        assert!(parse_stat(1, "1 (x) Z 0 1 1").is_none());
        let zombie = line.replace(") S 1", ") Z 1");
        assert!(parse_stat(4242, &zombie).expect("parsed").zombie);
    }

    #[test]
    fn this_process_is_readable() {
        let me = read_proc(own_pid()).expect("own stat");
        assert!(me.start_time > 0);
        assert!(!boot_id().is_empty());
    }
}
