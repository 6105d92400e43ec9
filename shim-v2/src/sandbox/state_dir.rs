//! A sandbox's state folder `<state_dir>/<sandbox id>/` (mode 0700) and the
//! names of what it holds. Nothing in it is mounted in the host's mount
//! namespace (the jail's mounts live in the VMM's own), so removing it is
//! removing files. The names of what it holds are
//! `husk_runtime_config::state`'s, shared with the `husk` command.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::SandboxError;

pub use husk_runtime_config::state::{
    slot_file, CGROUPS, CONSOLE_LOG, CONTROL_SOCKET, ROOT_IMAGE, RUN_DIR, VMM_LOG, VMM_PID,
    VM_SPEC, VSOCK,
};

/// The sandbox's state folder; removed on drop unless kept.
pub struct StateDir {
    pub path: PathBuf,
    keep: bool,
}

impl StateDir {
    /// Creates `<root>/<id>` (mode 0700); it must not exist.
    pub fn create(root: &Path, id: &str) -> Result<StateDir, SandboxError> {
        let path = root.join(id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(root)
            .map_err(|source| SandboxError::StateDir {
                path: root.to_path_buf(),
                source,
            })?;
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => Ok(StateDir { path, keep: false }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(SandboxError::Exists(path)),
            Err(source) => Err(SandboxError::StateDir { path, source }),
        }
    }

    /// Hands the folder over to a running sandbox: no longer removed on drop.
    pub(super) fn keep(mut self) -> PathBuf {
        self.keep = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if !self.keep && !self.path.as_os_str().is_empty() {
            remove(&self.path);
        }
    }
}

/// Removes a state folder and everything in it.
pub fn remove(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path) {
        if e.kind() != io::ErrorKind::NotFound {
            log::warn!("removing {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dirs_are_exclusive_and_removed() {
        let root = std::env::temp_dir().join(format!("husk-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let d = StateDir::create(&root, "sb1").unwrap();
        assert!(matches!(
            StateDir::create(&root, "sb1"),
            Err(SandboxError::Exists(_))
        ));
        fs::write(d.path.join("x"), b"1").unwrap();
        drop(d);
        assert!(!root.join("sb1").exists());
        let d = StateDir::create(&root, "sb2").unwrap();
        let kept = d.keep();
        assert!(kept.exists());
        remove(&kept);
        assert!(!kept.exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
