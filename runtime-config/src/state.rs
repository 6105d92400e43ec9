//! The layout of a sandbox's state folder `<state_dir>/<sandbox id>/`: the
//! names of the files the shim and the VMM keep there, and the sandbox
//! record the shim writes for the `husk` command.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The VM description husk-vmm runs.
pub const VM_SPEC: &str = "vm.json";
/// The VMM's pid, for a `shim delete` after this shim died.
pub const VMM_PID: &str = "vmm.pid";
/// The VMM's log (its stderr).
pub const VMM_LOG: &str = "vmm.log";
/// The guest console (with debug_console).
pub const CONSOLE_LOG: &str = "console.log";
/// The folder of the VMM's sockets (the jail's only writable folder).
pub const RUN_DIR: &str = "run";
/// The hybrid vsock socket, in [`RUN_DIR`].
pub const VSOCK: &str = "vsock";
/// The VMM's control socket, in [`RUN_DIR`].
pub const CONTROL_SOCKET: &str = "ctl.sock";
/// The cgroup folders the shim made for the sandbox, one a line, for a
/// `shim delete` after this shim died.
pub const CGROUPS: &str = "cgroups";
/// The first container's disk image.
pub const ROOT_IMAGE: &str = "root.erofs";
/// The VM templates' folder in the state folder's root (not a sandbox:
/// containerd's ids never start with a dot).
pub const TEMPLATES_DIR: &str = ".templates";
/// The bundle marker: a file in a container's bundle naming the state
/// folder of the container's sandbox, then "owner" or "member".
pub const BUNDLE_MARKER: &str = "husk-sandbox";
/// The sandbox record ([`SandboxRecord`]).
pub const SANDBOX_RECORD: &str = "sandbox.json";
/// Longest sandbox record read back.
const MAX_RECORD: u64 = 64 << 10;

/// What the shim records about a sandbox when it starts it: where
/// containerd keeps the sandbox's bundle (its `config.json` holds the CRI
/// annotations; containerd keeps it at
/// `<state>/io.containerd.runtime.v2.task/<namespace>/<id>`, so its sibling
/// folders are the namespace's other bundles).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub bundle: PathBuf,
    /// When the shim started the sandbox (Unix time, milliseconds).
    #[serde(default)]
    pub started_unix_ms: u64,
    /// How long the sandbox took to start (its root disk image, the VMM,
    /// the guest's boot) until its agent answered, in milliseconds; absent
    /// while it boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// At most `max` bytes of the file at `path`: the state folder's files are
/// written by the shim, but a reader never trusts their size.
pub(crate) fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut text = Vec::new();
    std::fs::File::open(path)?
        .take(max)
        .read_to_end(&mut text)?;
    Ok(text)
}

impl SandboxRecord {
    /// Writes the record into the state folder `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(SANDBOX_RECORD), json)
    }

    /// Reads the record of the state folder `dir` (at most 64 KiB).
    pub fn read(dir: &Path) -> Result<SandboxRecord, RecordError> {
        let path = dir.join(SANDBOX_RECORD);
        let text = read_bounded(&path, MAX_RECORD).map_err(|source| RecordError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| RecordError::Parse {
            path: path.clone(),
            source,
        })
    }
}

/// The file of pod disk slot `n` (from 1).
pub fn slot_file(n: usize) -> String {
    format!("slot{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_errors() {
        let dir = std::env::temp_dir().join(format!("husk-rec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let r = SandboxRecord {
            bundle: "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc".into(),
            started_unix_ms: 1_700_000_000_000,
            boot_ms: Some(1234),
        };
        r.write(&dir).unwrap();
        assert_eq!(SandboxRecord::read(&dir).unwrap(), r);
        std::fs::write(dir.join(SANDBOX_RECORD), b"{").unwrap();
        let e = SandboxRecord::read(&dir).unwrap_err().to_string();
        assert!(e.contains(SANDBOX_RECORD), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            SandboxRecord::read(&dir),
            Err(RecordError::Io { .. })
        ));
    }
}
