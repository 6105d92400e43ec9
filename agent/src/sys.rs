//! Thin, checked wrappers over the Linux system calls the agent and the
//! container set-up use, turning C strings and return codes into Rust types.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub fn cstr(p: impl AsRef<std::ffi::OsStr>) -> io::Result<CString> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a string"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Adds the path to an error so that it tells what failed.
pub fn ctx<T>(r: io::Result<T>, what: impl std::fmt::Display) -> io::Result<T> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}

pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.filter(|d| !d.is_empty()).map(cstr).transpose()?;
    let opt = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // until the call returns.
    let rc = unsafe {
        libc::mount(
            opt(&source),
            target_c.as_ptr(),
            opt(&fstype),
            flags,
            opt(&data).cast(),
        )
    };
    ctx(check(rc), format_args!("mount {}", target.display()))
}

pub fn umount_detach(target: &Path) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: `t` is a valid C string for the call.
    check(unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) })
}

pub fn pivot_root_here() -> io::Result<()> {
    // SAFETY: pivot_root(".", ".") with static C strings; see pivot_root(2)
    // for the stacking trick this relies on.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check(rc as libc::c_int)
}

pub fn unshare(flags: i32) -> io::Result<()> {
    // SAFETY: unshare takes only flags.
    check(unsafe { libc::unshare(flags) })
}

pub fn setns(fd: i32, nstype: i32) -> io::Result<()> {
    // SAFETY: setns on an fd we own; the kernel validates it.
    check(unsafe { libc::setns(fd, nstype) })
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

pub fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid C string for the call.
    check(unsafe { libc::mknod(p.as_ptr(), mode, dev) })
}

pub fn chown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid C string for the call.
    check(unsafe { libc::chown(p.as_ptr(), uid, gid) })
}

pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes only integers.
    check(unsafe { libc::kill(pid, sig) })
}

pub fn prctl(option: i32, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: every prctl option used here takes integer arguments only.
    check(unsafe { libc::prctl(option, arg, 0, 0, 0) })
}

/// The mount flags (ST_*) of the file system holding `path`, as MS_* flags
/// a bind remount must keep (the kernel refuses to clear locked ones).
pub fn kept_mount_flags(path: &Path) -> io::Result<libc::c_ulong> {
    let p = cstr(path)?;
    // SAFETY: zeroed statvfs is a valid out buffer; `p` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_RDONLY, libc::MS_RDONLY),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

/// A NULL-terminated array of C string pointers borrowing `strings`.
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
