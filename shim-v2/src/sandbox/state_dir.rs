//! A sandbox's state folder `<state_dir>/<sandbox id>/` (mode 0700) and the
//! names of what it holds. The shared folder (`crate::shared`) mounts in
//! it (the jail's mounts live in the VMM's own namespace): removing it
//! unmounts everything under it first, and removes nothing if a mount
//! stays (a recursive delete would go through a volume into the host's
//! files). The names of what it holds are
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

/// Removes a state folder and everything in it, once nothing is mounted
/// under it.
pub fn remove(path: &Path) {
    let Ok(canonical) = fs::canonicalize(path) else {
        return;
    };
    match crate::shared::mountinfo::unmount_under(&canonical) {
        Ok(left) if left.is_empty() => {}
        Ok(left) => {
            log::error!(
                "{}: not removed, mounts stay under it: {left:?}",
                path.display()
            );
            return;
        }
        Err(e) => {
            log::error!("{}: not removed, reading the mounts: {e}", path.display());
            return;
        }
    }
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

    /// A folder with a host folder bound in it: the bind goes, the host's
    /// files stay, the folder goes.
    #[test]
    fn removal_unmounts_before_it_deletes() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let root = std::env::temp_dir().join(format!("husk-state-mnt-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let host = root.join("host");
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("precious"), b"keep").unwrap();
        let d = StateDir::create(&root, "sb").unwrap();
        fs::create_dir_all(d.path.join("mounts/v")).unwrap();
        rustix::mount::mount_bind(&host, d.path.join("mounts/v")).unwrap();
        drop(d);
        assert!(!root.join("sb").exists());
        assert_eq!(fs::read(host.join("precious")).unwrap(), b"keep");
        fs::remove_dir_all(&root).unwrap();
    }
}
