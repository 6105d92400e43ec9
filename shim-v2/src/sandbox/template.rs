//! VM templates (`template = true`): a snapshot of a VM booted to the
//! moment its agent answers, one per VM shape, from which later sandboxes
//! of that shape are restored instead of booted.
//!
//! - **Key**: a digest of everything the guest saw before its agent
//!   answered: the VMM, kernel and initrd files (device, inode, size,
//!   mtime), the VM description with the per-sandbox parts (paths, taps,
//!   MACs) left out, the disk slots' size and the jail's user.
//! - **Made** by the first sandbox of a shape, once its agent answers and
//!   before CreateSandbox: the VMM snapshots the VM into the jail's
//!   `run/template` and resumes it; the shim checks what it wrote, makes
//!   the files root's (mode 0600, in a 0700 folder, one link each) and
//!   renames them to `<state_dir>/.templates/<key>/`. No container has run
//!   in that VM yet, so no tenant's code touched the template. One shim
//!   makes a shape at a time (a lock file); the others boot cold meanwhile.
//! - **Used**: the shim opens the files and hands them to the VMM as
//!   inherited fds (`husk-vmm --restore-fds`): the jail's user cannot open
//!   them. A template that fails to restore is removed; the sandbox boots
//!   cold and makes a new one.
//! - At most [`MAX_TEMPLATES`] are kept: making one removes the least
//!   recently used beyond that, and templates whose files changed.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use husk_vm_config::VmSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;

pub use husk_runtime_config::state::TEMPLATES_DIR;

/// Templates kept at most (each holds the guest memory its VM had touched
/// by the time its agent answered: tens of MiB).
pub const MAX_TEMPLATES: usize = 8;
/// The snapshot folder the VMM writes, in its sockets folder.
pub const SNAPSHOT_DIR: &str = "template";
/// The snapshot's files (husk-vmm's names).
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
/// What the shim records beside them.
pub const META_FILE: &str = "template.json";
/// Largest state file taken (a few vCPUs and devices: tens of KiB).
const MAX_STATE_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {}: {what}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("template {}: {reason}", .path.display())]
    Bad { path: PathBuf, reason: String },
}

impl TemplateError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TemplateError + 'a {
        move |source| TemplateError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    fn bad(path: &Path, reason: impl Into<String>) -> TemplateError {
        TemplateError::Bad {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// A file as the key sees it: replaced or rebuilt, it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileId {
    fn of(path: &Path) -> Result<FileId, TemplateError> {
        let m = fs::metadata(path).map_err(TemplateError::io("reading", path))?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// The files a template depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub vmm: FileId,
    pub kernel: FileId,
    pub initrd: FileId,
}

impl Inputs {
    pub fn of(cfg: &Config) -> Result<Inputs, TemplateError> {
        Ok(Inputs {
            vmm: FileId::of(&cfg.vmm_path)?,
            kernel: FileId::of(&cfg.kernel_path)?,
            initrd: FileId::of(&cfg.initrd_path)?,
        })
    }
}

/// What the shim keeps beside a template's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub key: String,
    pub inputs: Inputs,
    /// The MACs the template's guest probed its NICs with, in order: a
    /// clone's guest has them too until the agent sets the pod's.
    pub macs: Vec<Option<String>>,
}

/// The key of the VM `spec` describes (built with the jail's fixed paths,
/// or any paths: they are left out), for files `inputs`.
pub fn key(cfg: &Config, inputs: &Inputs, spec: &VmSpec) -> String {
    let mut shape = spec.clone();
    shape.kernel.path = PathBuf::new();
    shape.kernel.initrd = None;
    for b in &mut shape.block {
        b.path = PathBuf::new();
        b.rate_limiter = None;
    }
    for n in &mut shape.net {
        n.tap = String::new();
        n.mac = None;
        n.rx_rate_limiter = None;
        n.tx_rate_limiter = None;
    }
    for f in &mut shape.fs {
        f.socket = PathBuf::new();
    }
    if let Some(v) = &mut shape.vsock {
        v.uds_path = PathBuf::new();
    }
    shape.serial = None;
    shape.control_socket = None;
    shape.log = None;
    #[derive(Serialize)]
    struct KeyInputs<'a> {
        husk: &'static str,
        inputs: &'a Inputs,
        shape: &'a VmSpec,
        slot_bytes: u64,
        jail: Option<(u32, u32)>,
    }
    let k = KeyInputs {
        husk: env!("CARGO_PKG_VERSION"),
        inputs,
        shape: &shape,
        slot_bytes: cfg.slot_bytes(),
        jail: cfg.jail.map(|j| (j.uid, j.gid)),
    };
    // Plain data: serializing cannot fail.
    let digest = Sha256::digest(serde_json::to_vec(&k).unwrap_or_default());
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// A template's files, open for a restore.
#[derive(Debug)]
pub struct Opened {
    pub key: String,
    pub state: OwnedFd,
    pub memory: OwnedFd,
    pub meta: Meta,
}

/// The templates folder of a state folder root.
pub struct Templates {
    dir: PathBuf,
}

impl Templates {
    pub fn new(state_dir: &Path) -> Templates {
        Templates {
            dir: state_dir.join(TEMPLATES_DIR),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The template `key`, open for a restore; None if there is none.
    pub fn open(&self, key: &str) -> Result<Option<Opened>, TemplateError> {
        let dir = self.path(key);
        if !dir.exists() {
            return Ok(None);
        }
        let meta_path = dir.join(META_FILE);
        let text = read_owned(&meta_path, 64 << 10)?;
        let meta: Meta = serde_json::from_slice(&text)
            .map_err(|e| TemplateError::bad(&meta_path, format!("unreadable: {e}")))?;
        if meta.key != key {
            return Err(TemplateError::bad(&meta_path, "made for another key"));
        }
        let state = open_owned(&dir.join(STATE_FILE))?;
        let memory = open_owned(&dir.join(MEMORY_FILE))?;
        // Its age for the eviction: when it was last used.
        let _ = File::from(
            state
                .try_clone()
                .map_err(TemplateError::io("opening", &dir))?,
        )
        .set_modified(SystemTime::now());
        Ok(Some(Opened {
            key: key.to_string(),
            state,
            memory,
            meta,
        }))
    }

    /// Takes lock of making template `key`; None if another shim holds it.
    pub fn lock(&self, key: &str) -> Result<Option<File>, TemplateError> {
        make_dir(&self.dir)?;
        let path = self.dir.join(format!(".{key}.lock"));
        let f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(TemplateError::io("creating", &path))?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(f)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(TemplateError::io("locking", &path)(e.into())),
        }
    }

    /// Moves the snapshot a VMM wrote in `made` (its sockets folder's
    /// [`SNAPSHOT_DIR`]) in as template `meta.key`, of `memory_bytes` of
    /// guest RAM: two regular files with one link each, made root's and
    /// 0600. `made` is removed either way.
    pub fn adopt(&self, made: &Path, memory_bytes: u64, meta: &Meta) -> Result<(), TemplateError> {
        let result = self.adopt_files(made, memory_bytes, meta);
        let _ = fs::remove_dir_all(made);
        result
    }

    fn adopt_files(
        &self,
        made: &Path,
        memory_bytes: u64,
        meta: &Meta,
    ) -> Result<(), TemplateError> {
        make_dir(&self.dir)?;
        let m = fs::symlink_metadata(made).map_err(TemplateError::io("reading", made))?;
        if !m.is_dir() {
            return Err(TemplateError::bad(made, "not a folder"));
        }
        let mut names: Vec<_> = fs::read_dir(made)
            .map_err(TemplateError::io("listing", made))?
            .take(8)
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(TemplateError::io("listing", made))?;
        names.sort();
        if names != [MEMORY_FILE, STATE_FILE] {
            return Err(TemplateError::bad(
                made,
                format!("holds {names:?}, not exactly {MEMORY_FILE} and {STATE_FILE}"),
            ));
        }
        let tmp = self
            .dir
            .join(format!(".new-{}-{}", meta.key, std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        make_dir(&tmp)?;
        let moved = (|| {
            for (name, max) in [(STATE_FILE, MAX_STATE_BYTES), (MEMORY_FILE, memory_bytes)] {
                let (from, to) = (made.join(name), tmp.join(name));
                fs::rename(&from, &to).map_err(TemplateError::io("moving", &from))?;
                secure(&to, max, name == MEMORY_FILE)?;
            }
            let meta_path = tmp.join(META_FILE);
            let mut f = fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(&meta_path)
                .map_err(TemplateError::io("creating", &meta_path))?;
            f.write_all(&serde_json::to_vec(meta).unwrap_or_default())
                .map_err(TemplateError::io("writing", &meta_path))?;
            let to = self.path(&meta.key);
            // Another shim's template of the same key may have won.
            fs::rename(&tmp, &to).map_err(TemplateError::io("renaming into place", &to))
        })();
        if moved.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        moved?;
        self.evict(&meta.key, &meta.inputs);
        Ok(())
    }

    /// Removes template `key` (refused by a restore, or stale).
    pub fn remove(&self, key: &str) {
        let p = self.path(key);
        if let Err(e) = fs::remove_dir_all(&p) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("removing template {}: {e}", p.display());
            }
        }
    }

    /// After `kept` was made: removes templates of other files than
    /// `inputs` (a new kernel, initrd or VMM), then the least recently
    /// used beyond [`MAX_TEMPLATES`].
    fn evict(&self, kept: &str, inputs: &Inputs) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut live = Vec::new();
        for e in entries.flatten().take(1024) {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') || name == kept {
                continue;
            }
            let dir = e.path();
            let meta = read_owned(&dir.join(META_FILE), 64 << 10)
                .ok()
                .and_then(|t| serde_json::from_slice::<Meta>(&t).ok());
            match meta {
                Some(m) if m.inputs == *inputs => {
                    let used = fs::metadata(dir.join(STATE_FILE))
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    live.push((used, name));
                }
                _ => {
                    log::info!("template {name}: removed (made from other files)");
                    self.remove(&name);
                }
            }
        }
        live.sort();
        let over = (live.len() + 1).saturating_sub(MAX_TEMPLATES);
        for (_, name) in live.into_iter().take(over) {
            log::info!(
                "template {name}: removed (least recently used of more than {MAX_TEMPLATES})"
            );
            self.remove(&name);
        }
    }
}

/// Creates folder `path` (0700) if it is not there.
fn make_dir(path: &Path) -> Result<(), TemplateError> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(TemplateError::io("creating", path)(e)),
    }
}

/// Makes the file at `path` (just moved out of a jail's folder) root's and
/// 0600, after checking that it is a regular file of one link and at most
/// `max` bytes (exactly `max` with `exact`).
fn secure(path: &Path, max: u64, exact: bool) -> Result<(), TemplateError> {
    let (f, m) = open_nofollow(path)?;
    if !m.is_file() || m.nlink() != 1 {
        return Err(TemplateError::bad(path, "not a regular file of one link"));
    }
    if m.len() > max || (exact && m.len() != max) {
        return Err(TemplateError::bad(
            path,
            format!(
                "{} bytes, expected {}{max}",
                m.len(),
                if exact { "" } else { "at most " }
            ),
        ));
    }
    rustix::fs::fchown(
        f.as_fd(),
        Some(rustix::process::Uid::ROOT),
        Some(rustix::process::Gid::ROOT),
    )
    .map_err(|e| TemplateError::io("chowning", path)(e.into()))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(TemplateError::io("chmod", path))
}

/// Opens `path` read-only without following a symlink, with its metadata.
fn open_nofollow(path: &Path) -> Result<(File, fs::Metadata), TemplateError> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(TemplateError::io("opening", path))?;
    let m = f.metadata().map_err(TemplateError::io("reading", path))?;
    Ok((f, m))
}

/// Opens a template file read-only, refusing one that is not root's own
/// regular file of mode 0600.
fn open_owned(path: &Path) -> Result<OwnedFd, TemplateError> {
    let (f, m) = open_nofollow(path)?;
    if !m.is_file() || m.uid() != 0 || m.mode() & 0o077 != 0 {
        return Err(TemplateError::bad(
            path,
            format!(
                "not a regular file of root's, mode 0600 (uid {}, mode {:o})",
                m.uid(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(OwnedFd::from(f))
}

/// Reads a small template file (as [`open_owned`] checks it).
fn read_owned(path: &Path, max: u64) -> Result<Vec<u8>, TemplateError> {
    use std::io::Read;
    let mut out = Vec::new();
    File::from(open_owned(path)?)
        .take(max)
        .read_to_end(&mut out)
        .map_err(TemplateError::io("reading", path))?;
    Ok(out)
}

#[cfg(test)]
mod tests;
