//! The sandbox process agents run in (`runtime.process.sandbox`).
//!
//! This module is the one place an agent's command is wrapped. With `"none"` the command runs
//! as it is. With `"bwrap"` it runs under bubblewrap:
//!
//! - the whole filesystem read-only (`--ro-bind / /`), a fresh `/dev` and `/proc`;
//! - a private, empty `/tmp` (`--tmpfs /tmp`) that disappears with the agent — but for the
//!   agent's own program and script files, when they are under `/tmp` (read-only);
//! - writable: its working directory, and the directories a runtime preset names
//!   ([`ProcessSettings::sandbox_writable_for`], e.g. the OpenHands state directory), each
//!   created before the start;
//! - its own PID namespace (`--unshare-pid`) and `--die-with-parent`: when the namespace's
//!   first process ends, the kernel kills every process in it, so nothing the agent started
//!   outlives it; seen from the server the agent's process is `bwrap`, which is what
//!   [`super::process_tree`] records and signals (and its scan of `/proc` still finds every
//!   process inside, which carry the agent's token);
//! - with `sandbox_network = false`, its own network namespace with only a loopback
//!   (`--unshare-net`).
//!
//! It does not change the user id, hide files from reading, or limit CPU and memory.
//! [`check`] runs `bwrap` once at start, so a missing or unusable bubblewrap stops the server
//! with one line instead of failing every conversation.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::{ProcessSettings, SandboxKind, Settings};
use crate::failure::Failure;

/// The bubblewrap program, looked up on PATH.
pub const BWRAP: &str = "bwrap";

/// With `runtime.process.sandbox = "bwrap"` and an agent-process runtime: checks that `bwrap`
/// exists and can create its sandbox here (`bwrap --ro-bind / / true`).
pub fn check(settings: &Settings) -> Result<(), Failure> {
    if !settings.runtime.kind.runs_agent_process()
        || settings.runtime.process.sandbox != SandboxKind::Bwrap
    {
        return Ok(());
    }
    let output = Command::new(BWRAP)
        .args(["--ro-bind", "/", "/", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match output {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Failure::caused(
            format!(
                "runtime.process.sandbox = \"bwrap\" needs bubblewrap, but `{BWRAP}` is not on \
                 PATH: install it (apt-get install bubblewrap) or set sandbox = \"none\""
            ),
            e,
        )),
        Err(e) => Err(Failure::of(e).within(format_args!(
            "runtime.process.sandbox = \"bwrap\": cannot run `{BWRAP}`"
        ))),
        Ok(out) if !out.status.success() => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.lines().next().unwrap_or("").trim();
            Err(format!(
                "runtime.process.sandbox = \"bwrap\": `{BWRAP} --ro-bind / / true` fails \
                 ({}{}{why}): bubblewrap cannot create its sandbox on this machine \
                 (unprivileged user namespaces disabled?)",
                out.status,
                if why.is_empty() { "" } else { ": " },
            )
            .into())
        }
        Ok(_) => Ok(()),
    }
}

/// The program and arguments that run `program args` for one agent, sandboxed as
/// `settings.sandbox` says, in `working_dir`, with `writable` writable too (its
/// [`super::process::Place`]) and `visible` shown read-only even under the private `/tmp` (the
/// directories a pooled agent's own are renamed in). Creates the extra writable directories.
pub fn command(
    settings: &ProcessSettings,
    program: &OsString,
    args: &[OsString],
    working_dir: &Path,
    writable: &[PathBuf],
    visible: &[PathBuf],
) -> Result<(OsString, Vec<OsString>), Failure> {
    match settings.sandbox {
        SandboxKind::None => Ok((program.clone(), args.to_vec())),
        SandboxKind::Bwrap => {
            for dir in writable {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Failure::of(e).within(format_args!(
                        "cannot create the agent's writable directory {}",
                        dir.display()
                    ))
                })?;
            }
            Ok((
                BWRAP.into(),
                bwrap_args(
                    working_dir,
                    writable,
                    visible,
                    settings.sandbox_network,
                    program,
                    args,
                ),
            ))
        }
    }
}

/// Whether the sandbox started as process `pid` (by [`command`]) is set up. bubblewrap makes
/// its mounts and enters the working directory by the names it was given, and only then starts
/// the agent's program: until a process below it runs something other than bubblewrap, those
/// names must stay where they are (a pooled agent's directories must not be renamed yet).
/// Always true without a sandbox.
pub fn is_set_up(kind: SandboxKind, pid: u32) -> bool {
    match kind {
        SandboxKind::None => true,
        SandboxKind::Bwrap => {
            let Some(own) = comm(pid) else {
                return false;
            };
            let mut below = children(pid);
            while let Some(child) = below.pop() {
                match comm(child) {
                    Some(name) if name == own => below.extend(children(child)),
                    Some(_) => return true,
                    None => {}
                }
            }
            false
        }
    }
}

/// A process's command name (what it runs), `None` once it is gone.
fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|name| name.trim_end().to_string())
}

/// A process's children: from `/proc/<pid>/task/<pid>/children` (bubblewrap forks from its
/// only thread), or by their parent in `/proc` where the kernel does not offer that file.
fn children(pid: u32) -> Vec<u32> {
    match std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        Ok(list) => list
            .split_ascii_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        Err(_) => std::fs::read_dir("/proc")
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter_map(super::process_tree::read_proc)
                    .filter(|p| u32::try_from(p.ppid).is_ok_and(|ppid| ppid == pid))
                    .filter_map(|p| u32::try_from(p.pid).ok())
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// bubblewrap's arguments. Order matters: later mounts go on top of earlier ones, so the
/// writable directories come after the private `/tmp` (a working directory under `/tmp` stays
/// the real one).
fn bwrap_args(
    working_dir: &Path,
    writable: &[PathBuf],
    visible: &[PathBuf],
    network: bool,
    program: &OsString,
    args: &[OsString],
) -> Vec<OsString> {
    let mut out: Vec<OsString> = [
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    // The agent's own program and script stay visible when they live under /tmp.
    for word in std::iter::once(program).chain(args) {
        let path = Path::new(word);
        if path.is_absolute() && path.starts_with("/tmp") && path.exists() {
            out.extend(["--ro-bind".into(), word.clone(), word.clone()]);
        }
    }
    // A bind mount stays on its directory when that is renamed outside, and shows under the
    // new name wherever the directory around it is the real one (not the private /tmp).
    for dir in visible {
        out.extend(["--ro-bind".into(), dir.into(), dir.into()]);
    }
    for dir in std::iter::once(working_dir).chain(writable.iter().map(PathBuf::as_path)) {
        out.extend(["--bind".into(), dir.into(), dir.into()]);
    }
    out.extend(["--chdir".into(), working_dir.into()]);
    out.extend(["--unshare-pid".into(), "--die-with-parent".into()]);
    if !network {
        out.push("--unshare-net".into());
    }
    out.push("--".into());
    out.push(program.clone());
    out.extend(args.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_directories_are_bound_after_the_private_tmp() {
        let args = bwrap_args(
            Path::new("/tmp/w"),
            &[PathBuf::from("/data/state/c1")],
            &[],
            false,
            &"python3".into(),
            &["agent.py".into()],
        );
        let text: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let at = |word: &str| text.iter().position(|a| a == word).unwrap();
        assert!(at("--tmpfs") < at("--bind"), "{text:?}");
        assert!(text.windows(3).any(|w| w == ["--bind", "/tmp/w", "/tmp/w"]));
        assert!(text
            .windows(3)
            .any(|w| w == ["--bind", "/data/state/c1", "/data/state/c1"]));
        assert!(text.contains(&"--unshare-net".to_string()));
        assert_eq!(&text[text.len() - 3..], ["--", "python3", "agent.py"]);
    }

    #[test]
    fn a_sandbox_is_set_up_once_a_process_below_it_runs_another_program() {
        // Nothing below it yet: not set up (bubblewrap still making its mounts).
        let mut alone = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(!is_set_up(SandboxKind::Bwrap, alone.id()));
        assert!(is_set_up(SandboxKind::None, alone.id()));
        let _ = alone.kill();
        let _ = alone.wait();
        // A child running another program: set up.
        let mut parent = Command::new("sh")
            .args(["-c", "sleep 30; true"])
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while !is_set_up(SandboxKind::Bwrap, parent.id()) {
            assert!(started.elapsed() < std::time::Duration::from_secs(30));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for child in children(parent.id()) {
            // SAFETY: kill has no memory-safety preconditions; the pid is this test's `sleep`.
            unsafe { libc::kill(child as i32, libc::SIGKILL) };
        }
        let _ = parent.kill();
        let _ = parent.wait();
        // Gone: not set up.
        assert!(!is_set_up(SandboxKind::Bwrap, parent.id()));
    }
}
