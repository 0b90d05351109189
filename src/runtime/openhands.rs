//! The `openhands` runtime preset: the process runtime with OpenHands' CodeActAgent as the
//! agent, through the adapter shipped in `agents/openhands/adapter.py`.
//!
//! The adapter is compiled into the binary and written to `<data_dir>/openhands/` at
//! start (so a release binary needs no checkout); it runs with the Python of the OpenHands
//! environment that `agents/openhands/install.sh` creates (`runtime.openhands.venv`). Each
//! conversation's OpenHands state goes to `<data_dir>/openhands/state/<conversation_id>`
//! (`OPENHANDS_STATE_DIR`), outside its working directory and the user's home. Everything
//! else — working directory, grace periods, limits, extra environment — is
//! `[runtime.process]`'s.

use std::path::{Path, PathBuf};

use crate::config::{RuntimeKind, Settings};
use crate::failure::Failure;

/// The adapter's source, as shipped in the repository.
pub const ADAPTER: &str = include_str!("../../agents/openhands/adapter.py");
/// The OpenHands version the adapter and the install script are pinned to.
pub const OPENHANDS_VERSION: &str = "0.53.0";

/// Where `agents/openhands/install.sh` puts the OpenHands environment by default:
/// `$XDG_CACHE_HOME/switchboard/openhands-<version>` (`~/.cache/…` without XDG_CACHE_HOME).
pub fn default_venv() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(
        cache
            .join("switchboard")
            .join(format!("openhands-{OPENHANDS_VERSION}")),
    )
}

/// The OpenHands environment the settings name.
pub fn venv(settings: &Settings) -> Option<PathBuf> {
    let configured = &settings.runtime.openhands.venv;
    if configured.is_empty() {
        default_venv()
    } else {
        Some(PathBuf::from(configured))
    }
}

/// With `runtime.kind = "openhands"`: writes the adapter into the data directory and makes it
/// the process runtime's command. Other settings pass through unchanged.
pub fn prepare(mut settings: Settings) -> Result<Settings, Failure> {
    if settings.runtime.kind != RuntimeKind::Openhands {
        return Ok(settings);
    }
    let venv = venv(&settings).ok_or_else(|| {
        Failure::new("cannot find the OpenHands environment: set runtime.openhands.venv")
    })?;
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        return Err(format!(
            "the OpenHands environment is not installed at {} (runtime.openhands.venv): \
             run agents/openhands/install.sh",
            venv.display()
        )
        .into());
    }
    let data_dir = std::path::absolute(&settings.data_dir).map_err(|e| {
        Failure::of(e).within(format_args!(
            "cannot resolve the data directory {}",
            settings.data_dir.display()
        ))
    })?;
    let adapter = write_adapter(&data_dir.join("openhands"))?;
    let process = &mut settings.runtime.process;
    process.command = vec![
        python.to_string_lossy().into_owned(),
        adapter.to_string_lossy().into_owned(),
    ];
    let state_root = process
        .env
        .entry("OPENHANDS_STATE_DIR".into())
        .or_insert_with(|| {
            data_dir
                .join("openhands")
                .join("state")
                .to_string_lossy()
                .into_owned()
        })
        .clone();
    // A sandboxed agent writes its own conversation's state, and no other's.
    process.sandbox_writable.push(
        Path::new(&state_root)
            .join("{conversation_id}")
            .to_string_lossy()
            .into_owned(),
    );
    Ok(settings)
}

/// Writes the adapter into `dir` unless it is there already; returns its path.
fn write_adapter(dir: &Path) -> Result<PathBuf, Failure> {
    let path = dir.join("adapter.py");
    if std::fs::read_to_string(&path).is_ok_and(|text| text == ADAPTER) {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::of(e).within(format_args!("cannot create {}", dir.display())))?;
    // Written aside and renamed: an agent starting meanwhile never reads half a file.
    let partial = dir.join("adapter.py.partial");
    std::fs::write(&partial, ADAPTER)
        .and_then(|()| std::fs::rename(&partial, &path))
        .map_err(|e| {
            Failure::of(e).within(format_args!(
                "cannot write the OpenHands adapter to {}",
                path.display()
            ))
        })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openhands_settings(data_dir: &Path, venv: &Path) -> Settings {
        let mut s = Settings::defaults();
        s.data_dir = data_dir.to_path_buf();
        s.runtime.kind = RuntimeKind::Openhands;
        s.runtime.openhands.venv = venv.display().to_string();
        s
    }

    /// An environment in `dir` that looks installed (its `bin/python` exists).
    fn installed_venv(dir: &Path) -> PathBuf {
        let venv = dir.join("venv");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        std::fs::write(venv.join("bin/python"), "").unwrap();
        venv
    }

    #[test]
    fn a_missing_environment_is_refused_with_the_install_script_named() {
        let dir = tempfile::tempdir().unwrap();
        let why = prepare(openhands_settings(dir.path(), &dir.path().join("none"))).unwrap_err();
        assert!(why.contains("agents/openhands/install.sh"), "{why}");
        assert!(why.contains("runtime.openhands.venv"), "{why}");
        assert!(!dir.path().join("openhands").exists(), "nothing written");
    }

    /// A data directory the adapter cannot be written to is refused naming the directory, with
    /// the system's error as the cause.
    #[test]
    fn an_unwritable_data_directory_keeps_the_system_error() {
        let dir = tempfile::tempdir().unwrap();
        let venv = installed_venv(dir.path());
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let why = prepare(openhands_settings(&file, &venv)).unwrap_err();
        assert!(
            why.starts_with(&format!(
                "cannot create {}",
                file.join("openhands").display()
            )),
            "{why}"
        );
        let cause =
            std::error::Error::source(&why).and_then(|e| e.downcast_ref::<std::io::Error>());
        assert!(cause.is_some(), "{why:?}");
    }

    #[test]
    fn the_adapter_becomes_the_process_command() {
        let dir = tempfile::tempdir().unwrap();
        let venv = installed_venv(dir.path());
        let mut settings = openhands_settings(&dir.path().join("data"), &venv);
        settings
            .runtime
            .process
            .env
            .insert("LLM_MODEL".into(), "openai/x".into());
        let s = prepare(settings).unwrap();
        let adapter = dir.path().join("data/openhands/adapter.py");
        assert_eq!(
            s.runtime.process.command,
            [
                venv.join("bin/python").display().to_string(),
                adapter.display().to_string()
            ]
        );
        assert_eq!(std::fs::read_to_string(&adapter).unwrap(), ADAPTER);
        assert_eq!(
            s.runtime.process.env["OPENHANDS_STATE_DIR"],
            dir.path()
                .join("data/openhands/state")
                .display()
                .to_string()
        );
        assert_eq!(s.runtime.process.env["LLM_MODEL"], "openai/x");
        // A sandboxed agent may write its own conversation's state.
        assert_eq!(
            s.runtime.process.sandbox_writable_for("c1"),
            [dir.path().join("data/openhands/state/c1")]
        );
        // Other kinds pass through untouched.
        let mut echo = Settings::defaults();
        echo.data_dir = dir.path().join("echo");
        let echo = prepare(echo).unwrap();
        assert!(echo.runtime.process.command.is_empty());
        assert!(!dir.path().join("echo").exists());
    }
}
