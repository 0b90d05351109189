//! Paths inside a directory the server hands out: a conversation's working directory (what the
//! web app lists, reads, uploads into and asks `git status` of) and the web app's own build.
//!
//! The one rule, [`confine`]: a client-given relative path resolves inside its root or is
//! refused — absolute paths, `..` segments and symlinks that lead out of the root never reach
//! the file system's answer. Every route that turns client input into a path goes through it.

use std::path::{Component, Path, PathBuf};

use crate::config::Settings;

/// Why a client-given path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    #[error("the path must be relative to the working directory")]
    Absolute,
    #[error("the path must not contain '..'")]
    Parent,
    #[error("the path leads out of the working directory")]
    Escapes,
    #[error("the path is empty or contains a NUL character")]
    Invalid,
}

/// The working directory of a conversation, whatever its runtime: the process runtime's
/// `runtime.process.working_dir` rule (by default `<data_dir>/workspaces/<conversation_id>`).
pub fn working_dir(settings: &Settings, conversation_id: &str) -> PathBuf {
    settings
        .runtime
        .process
        .working_dir_for(&settings.data_dir, conversation_id)
}

/// Resolves `relative` inside `root` (which must be canonical, see [`canonical_root`]): the
/// resulting path, with every symlink on the way resolved, lies inside `root`. The path need
/// not exist yet (an upload's target): then its nearest existing ancestor is checked.
pub fn confine(root: &Path, relative: &Path) -> Result<PathBuf, PathRefusal> {
    if relative.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(PathRefusal::Invalid);
    }
    let mut joined = root.to_path_buf();
    for component in relative.components() {
        match component {
            Component::Normal(part) => joined.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(PathRefusal::Parent),
            Component::RootDir | Component::Prefix(_) => return Err(PathRefusal::Absolute),
        }
    }
    // The nearest existing ancestor, resolved, must be inside the root; the rest does not exist
    // yet and so holds no symlink.
    let mut existing = joined.as_path();
    let mut rest = Vec::new();
    let resolved = loop {
        match existing.canonicalize() {
            Ok(real) => break real,
            Err(_) => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(PathRefusal::Escapes);
                };
                rest.push(name.to_os_string());
                existing = parent;
            }
        }
    };
    if !resolved.starts_with(root) {
        return Err(PathRefusal::Escapes);
    }
    let mut out = resolved;
    for name in rest.into_iter().rev() {
        out.push(name);
    }
    Ok(out)
}

/// `root`, resolved (symlinks, `.`), for [`confine`]; the path itself when it does not exist.
pub fn canonical_root(root: &Path) -> PathBuf {
    root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = canonical_root(dir.path());
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.txt"), "a").unwrap();
        assert_eq!(
            confine(&root, Path::new("sub/a.txt")),
            Ok(root.join("sub/a.txt"))
        );
        assert_eq!(
            confine(&root, Path::new("./sub/new/b.txt")),
            Ok(root.join("sub/new/b.txt"))
        );
        assert_eq!(confine(&root, Path::new("")), Ok(root.clone()));
        assert_eq!(
            confine(&root, Path::new("sub/../../x")),
            Err(PathRefusal::Parent)
        );
        assert_eq!(
            confine(&root, Path::new("/etc/passwd")),
            Err(PathRefusal::Absolute)
        );
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
        std::os::unix::fs::symlink(root.join("sub"), root.join("in")).unwrap();
        assert_eq!(
            confine(&root, Path::new("out/secret")),
            Err(PathRefusal::Escapes)
        );
        assert_eq!(confine(&root, Path::new("out")), Err(PathRefusal::Escapes));
        assert_eq!(
            confine(&root, Path::new("in/a.txt")),
            Ok(root.join("sub/a.txt"))
        );
    }
}
