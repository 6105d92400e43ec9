//! Snapshots of a running VM, and what a restore checks before it trusts
//! one.
//!
//! A snapshot is a folder of two files, both mode 0600:
//! - `state`: the [framed](format) JSON of [`SnapshotState`]: the VM's
//!   [shape](VmShape), KVM's VM-wide and per-vCPU state
//!   ([`crate::vstate::persist`]), the serial port, and each virtio-mmio
//!   device's transport and queues ([`crate::devices::virtio::mmio::persist`]);
//! - `memory`: guest RAM, raw and sparse, which a restore maps
//!   copy-on-write, so clones of one snapshot share the pages none of them
//!   wrote. A VM with a virtio-fs device is the exception: virtiofsd maps
//!   guest RAM by fd, so it is restored into a fresh shared memfd filled
//!   with the file's data (holes stay unallocated) and shares no pages with
//!   other clones ([`crate::vstate::persist::restore_memory_shared`]).
//!
//! A restore reads both files through a [`SnapshotSource`]: opened from a
//! folder (`--restore DIR`) or inherited as open descriptors
//! (`--restore-fds`, for a jailed VMM that may not open them).
//!
//! A restore takes the devices' host side (disk files, sockets, console)
//! from its own VM description, whose shape must equal the snapshot's.

pub mod format;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::mmio::persist::TransportSnapshot;
use crate::vstate::persist::{VcpuState, VmState};
use husk_vm_config::VmConfig;

pub use format::FormatError;

/// The state file in a snapshot folder.
pub const STATE_FILE: &str = "state";
/// The memory file in a snapshot folder.
pub const MEMORY_FILE: &str = "memory";

/// Errors taking, reading or checking a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{path}: cannot decode the snapshot state: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the snapshot state: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("snapshot folder {path}: {source}")]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the snapshot is of another VM: {0}")]
    Shape(String),
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(String),
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
    #[error("cannot snapshot: {0}")]
    Kvm(#[from] crate::vstate::persist::PersistError),
    #[error("cannot snapshot: {0}")]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("cannot snapshot: {0}")]
    Device(#[from] crate::devices::virtio::mmio::persist::PersistError),
}

/// One device as the shape names it: its kind and its id in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceId {
    pub kind: String,
    pub id: String,
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.kind, self.id)
    }
}

/// What a VM must look like to take a snapshot's state: vCPUs, memory,
/// the devices in their order (their MMIO slots and IRQs follow from it),
/// and the kernel file's size where known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub devices: Vec<DeviceId>,
    pub kernel_bytes: Option<u64>,
}

impl VmShape {
    /// The shape `config` describes, with its devices in attach order.
    pub fn of(config: &VmConfig) -> Self {
        let d = |kind: &str, id: &str| DeviceId {
            kind: kind.into(),
            id: id.into(),
        };
        let mut devices = Vec::new();
        devices.extend(config.block.iter().map(|b| d("virtio-blk", &b.id)));
        devices.extend(config.net.iter().map(|n| d("virtio-net", &n.id)));
        devices.extend(config.fs.iter().map(|f| d("virtio-fs", &f.tag)));
        if config.vsock.is_some() {
            devices.push(d("virtio-vsock", "vsock"));
        }
        if config.rng {
            devices.push(d("virtio-rng", "rng"));
        }
        if config.balloon.is_some() {
            devices.push(d("virtio-balloon", "balloon"));
        }
        Self {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            devices,
            kernel_bytes: std::fs::metadata(&config.kernel.path).ok().map(|m| m.len()),
        }
    }

    /// Refuses a VM of another shape, naming the first difference.
    pub fn check(&self, config: &Self) -> Result<(), SnapshotError> {
        let differ = |what: &str, snap: &dyn std::fmt::Debug, cfg: &dyn std::fmt::Debug| {
            Err(SnapshotError::Shape(format!(
                "{what}: {snap:?} in the snapshot, {cfg:?} in the config"
            )))
        };
        if self.vcpus != config.vcpus {
            return differ("vCPUs", &self.vcpus, &config.vcpus);
        }
        if self.memory_mib != config.memory_mib {
            return differ("memory_mib", &self.memory_mib, &config.memory_mib);
        }
        if self.devices != config.devices {
            let names = |d: &[DeviceId]| d.iter().map(ToString::to_string).collect::<Vec<_>>();
            return differ("devices", &names(&self.devices), &names(&config.devices));
        }
        if let (Some(a), Some(b)) = (self.kernel_bytes, config.kernel_bytes) {
            if a != b {
                return differ("kernel size (bytes)", &a, &b);
            }
        }
        Ok(())
    }
}

/// One virtio device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    pub id: DeviceId,
    pub transport: TransportSnapshot,
}

/// Everything in the state file.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    pub shape: VmShape,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub devices: Vec<DeviceSnapshot>,
}

impl SnapshotState {
    /// Writes the state file into `dir` (which exists); returns its size.
    pub fn write(&self, dir: &Path) -> Result<u64, SnapshotError> {
        let payload = serde_json::to_vec(self).map_err(SnapshotError::Encode)?;
        Ok(format::write_file(&dir.join(STATE_FILE), &payload)?)
    }

    /// Reads and checks the state file of snapshot folder `dir`: framing,
    /// checksum, and that its parts agree with its shape.
    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let payload = format::read_file(&path)?;
        Self::decode(&path, &payload)
    }

    /// Reads and checks the state file of `source`, as [`Self::read`].
    pub fn read_source(source: &SnapshotSource) -> Result<Self, SnapshotError> {
        let payload = format::read_from(&source.state, &source.state_name)?;
        Self::decode(&source.state_name, &payload)
    }

    /// Decodes a checked payload (read from `path`) and checks that its
    /// parts agree with its shape.
    pub fn decode(path: &Path, payload: &[u8]) -> Result<Self, SnapshotError> {
        let state: Self =
            serde_json::from_slice(payload).map_err(|source| SnapshotError::Decode {
                path: path.to_owned(),
                source,
            })?;
        state.check_consistent()?;
        Ok(state)
    }

    fn check_consistent(&self) -> Result<(), SnapshotError> {
        if self.vcpus.len() != usize::from(self.shape.vcpus) {
            return Err(SnapshotError::Inconsistent(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.shape.vcpus
            )));
        }
        let ids: Vec<_> = self.devices.iter().map(|d| &d.id).collect();
        if ids.len() != self.shape.devices.len()
            || ids.iter().zip(&self.shape.devices).any(|(a, b)| *a != b)
        {
            return Err(SnapshotError::Inconsistent(
                "device states do not match the device list".into(),
            ));
        }
        Ok(())
    }
}

/// Where a restore reads a snapshot from: its two files, already open, and
/// the names errors give them. A snapshot folder (`--restore DIR`) and
/// inherited descriptors (`--restore-fds`, for a jailed VMM that may not
/// open the files itself) both become one of these.
#[derive(Debug)]
pub struct SnapshotSource {
    pub state: File,
    pub state_name: PathBuf,
    pub memory: File,
    pub memory_name: PathBuf,
}

/// Why a snapshot's files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{name}: {source}")]
    Open {
        name: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} is not a regular file")]
    NotRegular { name: PathBuf },
    #[error("{0} and {1} are the same file: the state and the memory must be two files")]
    SameFile(PathBuf, PathBuf),
    #[error("file descriptor {0} is not open")]
    NotOpen(RawFd),
    #[error("file descriptor {0} is not a snapshot file's (0, 1 and 2 are the standard streams)")]
    BadFd(RawFd),
    #[error("--restore-fds takes STATE_FD,MEMORY_FD (two numbers), not {0:?}")]
    FdSyntax(String),
}

impl SnapshotSource {
    /// Opens the two files of snapshot folder `dir`, read-only.
    pub fn folder(dir: &Path) -> Result<Self, SourceError> {
        let open = |name: PathBuf| {
            File::open(&name)
                .map_err(|source| SourceError::Open {
                    name: name.clone(),
                    source,
                })
                .map(|f| (f, name))
        };
        let (state, state_name) = open(dir.join(STATE_FILE))?;
        let (memory, memory_name) = open(dir.join(MEMORY_FILE))?;
        Self::checked(state, state_name, memory, memory_name)
    }

    /// Takes over inherited open descriptors `state_fd` and `memory_fd`
    /// (the caller opened the files, read-only), checking that both are
    /// open, regular files, and not the same file.
    pub fn fds(state_fd: RawFd, memory_fd: RawFd) -> Result<Self, SourceError> {
        if state_fd == memory_fd {
            return Err(SourceError::SameFile(
                fd_name(state_fd, "state"),
                fd_name(memory_fd, "memory"),
            ));
        }
        let state = take_fd(state_fd)?;
        let memory = take_fd(memory_fd)?;
        Self::checked(
            state,
            fd_name(state_fd, "state"),
            memory,
            fd_name(memory_fd, "memory"),
        )
    }

    fn checked(
        state: File,
        state_name: PathBuf,
        memory: File,
        memory_name: PathBuf,
    ) -> Result<Self, SourceError> {
        let meta = |f: &File, name: &PathBuf| {
            let m = f.metadata().map_err(|source| SourceError::Open {
                name: name.clone(),
                source,
            })?;
            if !m.file_type().is_file() {
                return Err(SourceError::NotRegular { name: name.clone() });
            }
            Ok(m)
        };
        let (a, b) = (meta(&state, &state_name)?, meta(&memory, &memory_name)?);
        if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
            return Err(SourceError::SameFile(state_name, memory_name));
        }
        Ok(Self {
            state,
            state_name,
            memory,
            memory_name,
        })
    }
}

/// Parses `--restore-fds`' "STATE_FD,MEMORY_FD".
pub fn parse_fds(arg: &str) -> Result<(RawFd, RawFd), SourceError> {
    let bad = || SourceError::FdSyntax(arg.to_string());
    let (a, b) = arg.split_once(',').ok_or_else(bad)?;
    let num = |s: &str| s.trim().parse::<RawFd>().map_err(|_| bad());
    Ok((num(a)?, num(b)?))
}

fn fd_name(fd: RawFd, what: &str) -> PathBuf {
    PathBuf::from(format!("{what} file (fd {fd})"))
}

/// Owns inherited descriptor `fd` once fcntl shows it is open; marks it
/// close-on-exec so it does not leak further.
fn take_fd(fd: RawFd) -> Result<File, SourceError> {
    if fd < 3 {
        return Err(SourceError::BadFd(fd));
    }
    // SAFETY: only a query of the descriptor's flags; an unused number
    // fails with EBADF and changes nothing.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(SourceError::NotOpen(fd));
    }
    // SAFETY: fd is open (above) and inherited for this purpose alone: no
    // other owner in this process closes or uses it.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: sets a flag on the descriptor this function now owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    Ok(file)
}

/// Creates the snapshot folder `dir` (mode 0700); an existing path is an
/// error, so a snapshot never mixes with older files.
pub fn create_folder(dir: &Path) -> Result<(), SnapshotError> {
    // mkdirat, the call the main thread's seccomp filter allows.
    rustix::fs::mkdirat(rustix::fs::CWD, dir, rustix::fs::Mode::RWXU).map_err(|e| {
        SnapshotError::Folder {
            path: dir.to_owned(),
            source: e.into(),
        }
    })
}

#[cfg(test)]
mod tests;
