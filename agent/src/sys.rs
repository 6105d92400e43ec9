//! The agent's system call layer: the Linux calls the agent and the
//! container set-up make, on rustix's safe API, with errors that say what
//! failed. What rustix cannot do safely (seccomp, fork and exec, signal
//! masks) stays with libc in the module that needs it, each `unsafe` with
//! its reason.

use std::ffi::CString;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{FileType, Gid, Mode, StatVfsMountFlags, Uid, CWD};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Pid, Signal};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

pub fn cstr(p: impl AsRef<std::ffi::OsStr>) -> io::Result<CString> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a string"))
}

/// Adds the path to an error so that it tells what failed.
pub fn ctx<T>(r: io::Result<T>, what: impl std::fmt::Display) -> io::Result<T> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}

fn mount_ctx(r: rustix::io::Result<()>, target: &Path) -> io::Result<()> {
    ctx(
        r.map_err(io::Error::from),
        format_args!("mount {}", target.display()),
    )
}

/// Mounts a new `fstype` file system from `source` (what /proc/mounts
/// shows: "none" where the file system takes no source) with `data` (none
/// when empty).
pub fn mount(
    source: &Path,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> io::Result<()> {
    let data = if data.is_empty() {
        None
    } else {
        Some(cstr(data)?)
    };
    mount_ctx(
        rustix::mount::mount(source, target, fstype, flags, data.as_deref()),
        target,
    )
}

/// Binds `source` on `target`, with the mounts below it if `recursive`.
pub fn bind(source: &Path, target: &Path, recursive: bool) -> io::Result<()> {
    let r = if recursive {
        rustix::mount::mount_bind_recursive(source, target)
    } else {
        rustix::mount::mount_bind(source, target)
    };
    mount_ctx(r, target)
}

/// Remounts `target` with `flags` (MS_REMOUNT added); with MS_BIND in
/// `flags` it changes only the mount's flags, and `data` is ignored.
pub fn remount(target: &Path, flags: MountFlags, data: &str) -> io::Result<()> {
    let data = cstr(data)?;
    mount_ctx(
        rustix::mount::mount_remount(target, flags, data.as_c_str()),
        target,
    )
}

/// Changes the propagation of the mount at `target`.
pub fn change_propagation(target: &Path, flags: MountPropagationFlags) -> io::Result<()> {
    mount_ctx(rustix::mount::mount_change(target, flags), target)
}

/// Moves the mount at `source` onto `target` (MS_MOVE).
pub fn move_mount(source: &Path, target: &Path) -> io::Result<()> {
    mount_ctx(rustix::mount::mount_move(source, target), target)
}

pub fn umount_detach(target: &Path) -> io::Result<()> {
    Ok(rustix::mount::unmount(target, UnmountFlags::DETACH)?)
}

/// pivot_root(".", "."): see pivot_root(2) for the stacking trick this
/// relies on.
pub fn pivot_root_here() -> io::Result<()> {
    Ok(rustix::process::pivot_root(".", ".")?)
}

/// Leaves namespaces for new ones. CLONE_FILES is refused: it is what could
/// take fds away from other threads, and the agent never needs it.
pub fn unshare(flags: UnshareFlags) -> io::Result<()> {
    if flags.contains(UnshareFlags::FILES) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unshare CLONE_FILES",
        ));
    }
    // SAFETY: without CLONE_FILES (refused above) unshare cannot make a
    // file descriptor another thread holds invalid; namespaces and CLONE_FS
    // change only this thread's view of the system.
    Ok(unsafe { rustix::thread::unshare_unsafe(flags) }?)
}

/// The namespace type of a CLONE_NEW* flag.
fn ns_type(flag: i32) -> Option<LinkNameSpaceType> {
    Some(match flag {
        libc::CLONE_NEWNS => LinkNameSpaceType::Mount,
        libc::CLONE_NEWCGROUP => LinkNameSpaceType::ControlGroup,
        libc::CLONE_NEWUTS => LinkNameSpaceType::HostNameAndNISDomainName,
        libc::CLONE_NEWIPC => LinkNameSpaceType::InterProcessCommunication,
        libc::CLONE_NEWPID => LinkNameSpaceType::ProcessID,
        libc::CLONE_NEWNET => LinkNameSpaceType::Network,
        libc::CLONE_NEWTIME => LinkNameSpaceType::Time,
        libc::CLONE_NEWUSER => LinkNameSpaceType::User,
        _ => return None,
    })
}

/// Enters the namespace `fd` refers to, which must be of type `flag`
/// (a CLONE_NEW* flag).
pub fn setns(fd: BorrowedFd<'_>, flag: i32) -> io::Result<()> {
    let ns = ns_type(flag).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("namespace flag {flag:#x}"),
        )
    })?;
    Ok(rustix::thread::move_into_link_name_space(fd, Some(ns))?)
}

/// The flags of unshare(2) for CLONE_NEW* flags.
// The flags are a bit set of libc's CLONE_NEW* constants (i32, all under
// bit 31), reinterpreted bit for bit as the u32 rustix takes.
#[allow(clippy::cast_sign_loss)]
pub fn unshare_flags(flags: i32) -> UnshareFlags {
    UnshareFlags::from_bits_retain(flags as u32)
}

pub fn sethostname(name: &str) -> io::Result<()> {
    Ok(rustix::system::sethostname(name.as_bytes())?)
}

/// The largest major and minor device numbers mknod(2) takes: its `dev`
/// argument is 32 bits (a 12-bit major, a 20-bit minor), and the bits of a
/// larger number are dropped, which names another device.
pub const MAJOR_MAX: u32 = 0xfff;
pub const MINOR_MAX: u32 = 0xf_ffff;

/// mknod(2) with `mode` as st_mode (file type and permissions); numbers
/// over MAJOR_MAX or MINOR_MAX are refused.
pub fn mknod(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    if major > MAJOR_MAX || minor > MINOR_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device number {major}:{minor} is over {MAJOR_MAX}:{MINOR_MAX}"),
        ));
    }
    Ok(rustix::fs::mknodat(
        CWD,
        path,
        FileType::from_raw_mode(mode),
        Mode::from_raw_mode(mode),
        rustix::fs::makedev(major, minor),
    )?)
}

/// A user id for a call that takes one; -1 (u32::MAX) means "unchanged",
/// as in chown(2) and setresuid(2).
pub fn uid(raw: u32) -> Option<Uid> {
    (raw != u32::MAX).then(|| Uid::from_raw_unchecked(raw))
}

/// As `uid`, for group ids.
pub fn gid(raw: u32) -> Option<Gid> {
    (raw != u32::MAX).then(|| Gid::from_raw_unchecked(raw))
}

pub fn chown(path: &Path, uid_raw: u32, gid_raw: u32) -> io::Result<()> {
    Ok(rustix::fs::chown(path, uid(uid_raw), gid(gid_raw))?)
}

/// A signal by number (1 to 64, real-time signals included).
pub fn signal(n: i32) -> Option<Signal> {
    if let Some(s) = Signal::from_named_raw(n) {
        return Some(s);
    }
    if !(1..=64).contains(&n) {
        return None;
    }
    // SAFETY: `n` is a valid, non-zero Linux signal number (checked
    // above). rustix's caveat is about libc's reserved real-time signals:
    // the agent only sends them to other processes (`kill`), it never
    // blocks or handles them.
    Some(unsafe { Signal::from_raw_unchecked(n) })
}

/// Sends `sig` to process `pid` (a positive pid: never a group or all).
pub fn kill(pid: i32, sig: Signal) -> io::Result<()> {
    // Checked before Pid::from_raw, which asserts a non-negative pid.
    let pid = Some(pid)
        .filter(|p| *p > 0)
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid}")))?;
    Ok(rustix::process::kill_process(pid, sig)?)
}

/// The mount flags (ST_*) of the file system holding `path`, as MS_* flags
/// a bind remount must keep (the kernel refuses to clear locked ones).
pub fn kept_mount_flags(path: &Path) -> io::Result<MountFlags> {
    let st = rustix::fs::statvfs(path)?;
    let mut flags = MountFlags::empty();
    for (st_flag, ms_flag) in [
        (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
        (StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
        (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
        (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
        (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
        (StatVfsMountFlags::RDONLY, MountFlags::RDONLY),
    ] {
        if st.f_flag.contains(st_flag) {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

/// A NULL-terminated array of C string pointers borrowing `strings`, for
/// execve (which stays with libc: rustix's is unsafe too).
pub fn ptr_array(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

pub fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// (MemTotal, MemAvailable) of a /proc/meminfo text, in bytes; 0 for a
/// field that is missing.
pub fn meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
            })
            .map_or(0, |kib| kib.saturating_mul(1024))
    };
    (field("MemTotal"), field("MemAvailable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_in_bytes() {
        let text = "MemTotal:         238424 kB\nMemFree:          200000 kB\nMemAvailable:     190000 kB\n";
        assert_eq!(meminfo(text), (238_424 * 1024, 190_000 * 1024));
        assert_eq!(meminfo("MemTotalX: 5 kB\n"), (0, 0));
    }

    #[test]
    fn ids_and_signals() {
        assert_eq!(uid(u32::MAX), None);
        assert_eq!(uid(0), Some(Uid::ROOT));
        assert_eq!(gid(5).map(Gid::as_raw), Some(5));
        assert_eq!(signal(9), Some(Signal::KILL));
        assert_eq!(signal(40).map(Signal::as_raw), Some(40));
        assert_eq!(signal(0), None);
        assert_eq!(signal(65), None);
        assert!(kill(0, Signal::KILL).is_err());
        assert!(kill(-1, Signal::KILL).is_err());
        assert!(setns(std::os::fd::AsFd::as_fd(&std::io::stdin()), 0).is_err());
    }

    #[test]
    fn mount_flags_of_a_path() {
        let f = kept_mount_flags(Path::new("/")).unwrap();
        assert!(!f.contains(MountFlags::BIND), "{f:?}");
        assert!(kept_mount_flags(Path::new("/nonexistent/husk")).is_err());
    }
}
