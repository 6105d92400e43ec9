//! The jail husk-vmm runs in (Firecracker's jailer is the model): what it
//! may see, who it runs as, and entering it between fork and exec.
//!
//! Privilege split (the "shim does the privileged work" design, no fd
//! passing): the shim, as root, prepares everything the VMM will open and
//! the VMM starts with nothing but what the jail shows it.
//!
//! - The shim: creates the taps owned by the jail's uid and gid
//!   (`ip tuntap add ... user U group G`: TUNSETIFF on a persistent tap then
//!   needs no CAP_NET_ADMIN), chowns the disks, the console log and the
//!   sockets folder (`run/`) to the jail's user, and writes vm.json with the
//!   paths as the jail shows them ([`super::vm_spec::VmPaths::jailed`]).
//! - The VMM's child, still root, between fork and exec ([`Jail::enter`],
//!   [`Jail::drop_privileges`]): a new mount namespace, every mount made a
//!   slave (nothing propagates back to the host), a small tmpfs as the new
//!   root on `<state folder>/jail` with read-only bind mounts of the VMM
//!   binary, vm.json, kernel, initrd and disks, a writable bind of the
//!   console log and of `run/` (where it binds its vsock and control
//!   sockets, which the shim connects to from the host side), device nodes
//!   made there by mknod (`/dev/kvm`, `/dev/net/tun` owned by the jail's
//!   user, `/dev/urandom`; the tmpfs is the jail's own, so a nodev host
//!   `/run` does not matter and the host's nodes keep their modes), the
//!   tmpfs remounted read-only, pivot_root into it and the old root
//!   detached. Then: no supplementary groups, the jail's gid and uid, every
//!   capability gone (bounding, ambient, inheritable, permitted,
//!   effective), no_new_privs, the parent-death signal (set after the uid
//!   change, which clears it), RLIMIT_NOFILE and a core limit of 0 (a core
//!   would hold the guest's memory), and every fd above stderr marked
//!   close-on-exec. RLIMIT_FSIZE is not set: it would cap a writable disk
//!   image as much as a log; RLIMIT_NPROC neither: it counts every process
//!   of the uid, which all jailed VMMs share (the sandbox's cgroup bounds
//!   its tasks instead).
//! - The PID namespace: the VMM's spawning thread unshares CLONE_NEWPID
//!   before it forks ([`new_pid_namespace`]), so the VMM is PID 1 of its own
//!   namespace while it stays the shim's child (waited for, pidfd, SIGKILL
//!   work from the shim's namespace).
//!
//! All jailed VMMs share one uid: each sees only its own tmpfs root and
//! its own PID namespace (no /proc, no other process), so the uid gives it
//! nothing over another VMM. The jail needs a statically linked VMM: it
//! holds no shared libraries (`husk_runtime_config::elf::check_static`).

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Dev, FileType, Gid, Mode, OFlags, Uid, CWD};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Resource, Rlimit, Signal};
use rustix::thread::{CapabilitySet, CapabilitySets, UnshareFlags};

/// Where the VMM binary is inside the jail.
pub const VMM: &str = "/husk-vmm";
/// Where vm.json is inside the jail.
pub const SPEC: &str = "/vm.json";
pub const KERNEL: &str = "/kernel";
pub const INITRD: &str = "/initrd";
/// The jail's writable folder (the VMM's sockets): `<state folder>/run`.
pub const RUN: &str = "/run";
/// The state folder's subfolder the jail's root tmpfs is mounted on (empty
/// on the host).
pub const ROOT_DIR: &str = "jail";

/// Open files a VMM may hold: KVM (VM, vCPUs), eventfds and fds of every
/// device, disks, taps, and the host ends of vsock connections.
pub const NOFILE: u64 = 4096;
/// The jail's root tmpfs: mount points and three device nodes.
const ROOT_TMPFS: &CStr = c"size=64k,nr_inodes=128,mode=0755";
/// The device nodes the VMM needs: (host node, jail path, mode, owned by
/// the jail's user).
const NODES: [(&str, &str, u32, bool); 3] = [
    ("/dev/kvm", "dev/kvm", 0o600, true),
    ("/dev/net/tun", "dev/net/tun", 0o600, true),
    ("/dev/urandom", "dev/urandom", 0o444, false),
];
/// Folders made in the jail's root before its nodes.
const NODE_DIRS: [&str; 2] = ["dev", "dev/net"];

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("jail: the path {0:?} holds a NUL byte")]
    Nul(PathBuf),
    #[error("jail: bind target {0:?} must be one plain name under the jail's root")]
    BadTarget(String),
}

pub use husk_runtime_config::JailUser;

/// The jail user's ids as rustix takes them.
pub(crate) fn ids(user: JailUser) -> (Uid, Gid) {
    (Uid::from_raw(user.uid), Gid::from_raw(user.gid))
}

/// What one bind mount shows in the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The host file or folder.
    pub source: PathBuf,
    /// Its name in the jail's root (one component: `vm.json`, `run`).
    pub target: String,
    pub dir: bool,
    pub writable: bool,
    pub exec: bool,
}

impl Bind {
    pub fn file(source: impl Into<PathBuf>, target: &str) -> Bind {
        Bind {
            source: source.into(),
            target: target.trim_start_matches('/').to_string(),
            dir: false,
            writable: false,
            exec: false,
        }
    }

    pub fn writable(mut self) -> Bind {
        self.writable = true;
        self
    }

    pub fn dir(mut self) -> Bind {
        self.dir = true;
        self
    }

    pub fn exec(mut self) -> Bind {
        self.exec = true;
        self
    }
}

/// A bind mount ready for the child: C strings made before fork.
struct ReadyBind {
    source: CString,
    target: CString,
    dir: bool,
    flags: MountFlags,
}

/// A device node ready for the child.
struct ReadyNode {
    path: CString,
    rdev: Dev,
    mode: Mode,
    owned: bool,
}

/// A jail prepared before fork; [`Jail::enter`] and
/// [`Jail::drop_privileges`] run in the child and only make system calls.
pub struct Jail {
    user: JailUser,
    root: CString,
    binds: Vec<ReadyBind>,
    dirs: Vec<CString>,
    nodes: Vec<ReadyNode>,
}

fn cstring(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Nul(p.to_path_buf()))
}

/// Whether `t` is one plain name: no `/`, not `.` or `..`, not empty.
fn plain_name(t: &str) -> bool {
    !t.is_empty() && t != "." && t != ".." && !t.contains('/') && !t.contains('\0')
}

impl Jail {
    /// A jail whose root tmpfs goes on `root` (an empty folder), showing
    /// `binds`, for `user`. Reads the host's device numbers; a node the host
    /// lacks (no /dev/net/tun) is left out, and the VMM says what it misses.
    pub fn new(user: JailUser, root: &Path, binds: &[Bind]) -> Result<Jail, JailError> {
        let binds = binds
            .iter()
            .map(|b| {
                if !plain_name(&b.target) {
                    return Err(JailError::BadTarget(b.target.clone()));
                }
                let mut flags = MountFlags::BIND | MountFlags::NOSUID;
                flags |= MountFlags::NODEV;
                if !b.writable {
                    flags |= MountFlags::RDONLY;
                }
                if !b.exec {
                    flags |= MountFlags::NOEXEC;
                }
                Ok(ReadyBind {
                    source: cstring(&b.source)?,
                    target: cstring(&root.join(&b.target))?,
                    dir: b.dir,
                    flags,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dirs = NODE_DIRS
            .iter()
            .map(|d| cstring(&root.join(d)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut nodes = Vec::new();
        for (host, path, mode, owned) in NODES {
            match fs::metadata(host) {
                Ok(m) => nodes.push(ReadyNode {
                    path: cstring(&root.join(path))?,
                    rdev: m.rdev(),
                    mode: Mode::from_raw_mode(mode),
                    owned,
                }),
                Err(e) => log::warn!("jail: {host}: {e}; the VMM will not have it"),
            }
        }
        Ok(Jail {
            user,
            root: cstring(root)?,
            binds,
            dirs,
            nodes,
        })
    }

    /// In the child, as root: a new mount namespace whose root holds only
    /// the binds and nodes. Only system calls: safe between fork and exec.
    pub fn enter(&self) -> io::Result<()> {
        let (uid, gid) = ids(self.user);
        // SAFETY: the child has one thread; its fs and mount namespace are
        // its own after this, and nothing else in it holds paths.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }?;
        // Nothing this child mounts reaches the host; the host's unmounts
        // still reach the child.
        rustix::mount::mount_change(
            c"/",
            MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
        )?;
        rustix::mount::mount(
            c"tmpfs",
            self.root.as_c_str(),
            c"tmpfs",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            ROOT_TMPFS,
        )?;
        for b in &self.binds {
            if b.dir {
                rustix::fs::mkdirat(CWD, b.target.as_c_str(), Mode::from_raw_mode(0o700))?;
            } else {
                drop(rustix::fs::openat(
                    CWD,
                    b.target.as_c_str(),
                    OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::EXCL,
                    Mode::from_raw_mode(0o600),
                )?);
            }
            rustix::mount::mount_bind(b.source.as_c_str(), b.target.as_c_str())?;
            // A bind takes its flags only from a remount.
            rustix::mount::mount_remount(b.target.as_c_str(), b.flags, c"")?;
        }
        for d in &self.dirs {
            rustix::fs::mkdirat(CWD, d.as_c_str(), Mode::from_raw_mode(0o755))?;
        }
        for n in &self.nodes {
            rustix::fs::mknodat(
                CWD,
                n.path.as_c_str(),
                FileType::CharacterDevice,
                n.mode,
                n.rdev,
            )?;
            // mknod applies the umask: set the mode as meant.
            rustix::fs::chmodat(CWD, n.path.as_c_str(), n.mode, rustix::fs::AtFlags::empty())?;
            if n.owned {
                rustix::fs::chown(n.path.as_c_str(), Some(uid), Some(gid))?;
            }
        }
        rustix::mount::mount_remount(
            self.root.as_c_str(),
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NOEXEC,
            c"",
        )?;
        rustix::process::chdir(self.root.as_c_str())?;
        // pivot_root(".", "."): the old root ends up on top of the new one,
        // and is detached at once.
        rustix::process::pivot_root(c".", c".")?;
        rustix::mount::unmount(c".", UnmountFlags::DETACH)?;
        rustix::process::chdir(c"/")?;
        Ok(())
    }

    /// In the child, after [`Jail::enter`] (and after anything else that
    /// needs root: the netns, the cgroup): becomes the jail's user with no
    /// capability left. Only system calls: safe between fork and exec.
    pub fn drop_privileges(&self) -> io::Result<()> {
        let (uid, gid) = ids(self.user);
        // The bounding set first: dropping from it needs CAP_SETPCAP.
        drop_bounding_set_except(CapabilitySet::empty())?;
        rustix::thread::set_thread_groups(&[])?;
        rustix::thread::set_thread_res_gid(gid, gid, gid)?;
        rustix::thread::set_thread_res_uid(uid, uid, uid)?;
        // A uid change clears permitted and effective, not inheritable.
        rustix::thread::set_capabilities(
            None,
            CapabilitySets {
                effective: CapabilitySet::empty(),
                permitted: CapabilitySet::empty(),
                inheritable: CapabilitySet::empty(),
            },
        )?;
        match rustix::thread::clear_ambient_capability_set() {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }
        rustix::thread::set_no_new_privs(true)?;
        // The uid change cleared the parent-death signal: set it again.
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
        rustix::process::setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(NOFILE),
                maximum: Some(NOFILE),
            },
        )?;
        rustix::process::setrlimit(
            Resource::Core,
            Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        )?;
        close_range_on_exec()
    }
}

/// Drops every capability but `keep` from the bounding set (this needs
/// CAP_SETPCAP, so before any uid change). Only system calls: safe between
/// fork and exec.
pub(crate) fn drop_bounding_set_except(keep: CapabilitySet) -> io::Result<()> {
    for n in 0..64u32 {
        let cap = CapabilitySet::from_bits_retain(1 << n);
        if keep.contains(cap) {
            continue;
        }
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            Ok(()) => {}
            // Past the kernel's last capability.
            Err(rustix::io::Errno::INVAL) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Marks every fd above stderr close-on-exec (not closed now: std's
/// exec-error pipe must live until exec).
fn close_range_on_exec() -> io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range(2) takes three integers and touches no memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes this thread's next child the first process of a new PID
/// namespace. The calling thread must create no thread after this (the
/// kernel refuses threads whose children's namespace differs) and fork
/// once: the VMM's own spawning thread.
pub fn new_pid_namespace() -> io::Result<()> {
    // SAFETY: CLONE_NEWPID changes only which namespace this thread's
    // children are created in; the thread forks the VMM and waits for it,
    // nothing else.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWPID) }?;
    Ok(())
}

/// Makes `path` the jail user's (a disk, the console log, `run/`).
pub fn give(user: JailUser, path: &Path) -> Result<(), JailError> {
    let (uid, gid) = ids(user);
    rustix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| JailError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// Creates folder `path` (mode 0700) for the jail: `run/` or the root's
/// mount point.
pub fn make_dir(path: &Path) -> Result<(), JailError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|source| JailError::Io {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests;
