//! Duties of the agent as PID 1 of the guest: the early mounts, the
//! kernel command line, the vsock listener and ending the VM.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use crate::sys;

/// The vsock port when the kernel command line names none.
pub use husk_protocols::guest::AGENT_PORT as DEFAULT_PORT;
use husk_protocols::guest::AGENT_PORT_PARAM;

/// Set in the environment of the agent once it runs from its own tmpfs.
const REROOTED: &str = "HUSK_AGENT_REROOTED";
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Moves the agent off the initramfs onto a tmpfs root of its own, as
/// switch_root does, then re-executes it there.
///
/// The initramfs is the root mount of the initial mount namespace, which
/// pivot_root(2) cannot leave (EINVAL): without this step no container
/// could pivot_root. A tmpfs moved onto "/" has the initramfs as its parent
/// mount, so containers' pivot_root works. Returns only on failure (or
/// when there is nothing to do).
pub fn leave_initramfs() -> io::Result<()> {
    if std::env::var_os(REROOTED).is_some() {
        return Ok(());
    }
    // SAFETY: zeroed statfs is a valid out buffer; the path is a literal.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c"/".as_ptr(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if st.f_type != RAMFS_MAGIC && st.f_type != TMPFS_MAGIC {
        return Ok(());
    }
    // Only the initramfs's /init (not, say, a test's PID 1 of a namespace).
    if std::env::args().next().as_deref() != Some("/init") {
        return Ok(());
    }
    let exe = "/init";
    let new = Path::new("/.husk-root");
    fs::create_dir_all(new)?;
    sys::mount(
        Some(Path::new("tmpfs")),
        new,
        Some("tmpfs"),
        0,
        Some("mode=0755"),
    )?;
    fs::copy(exe, new.join("init"))?;
    // Free the initramfs copy (it stays below, hidden, otherwise).
    let _ = fs::remove_file(exe);
    std::env::set_current_dir(new)?;
    sys::mount(
        Some(Path::new(".")),
        Path::new("/"),
        None,
        libc::MS_MOVE,
        None,
    )?;
    // SAFETY: chroot and chdir with literal paths.
    if unsafe { libc::chroot(c".".as_ptr()) } < 0 || unsafe { libc::chdir(c"/".as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let argv: Vec<std::ffi::CString> =
        std::env::args().map(sys::cstr).collect::<io::Result<_>>()?;
    let mut env: Vec<std::ffi::CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            sys::cstr(kv)
        })
        .collect::<io::Result<_>>()?;
    env.push(sys::cstr(format!("{REROOTED}=1"))?);
    let (argv_p, env_p) = (sys::ptr_array(&argv), sys::ptr_array(&env));
    // SAFETY: NUL-terminated strings in NULL-terminated arrays, all alive
    // across the call; returns only on failure.
    unsafe { libc::execve(c"/init".as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
    Err(io::Error::last_os_error())
}

/// Mounts what every guest needs; an already mounted target is fine.
pub fn mount_all() {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let table: &[(&str, &str, &str, libc::c_ulong, &str)] = &[
        ("proc", "/proc", "proc", nosuid_nodev | libc::MS_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", nosuid_nodev | libc::MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        ("shm", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_nodev | libc::MS_NOEXEC,
            "",
        ),
    ];
    for (src, target, fstype, flags, data) in table {
        let _ = fs::create_dir_all(target);
        match sys::mount(
            Some(Path::new(src)),
            Path::new(target),
            Some(fstype),
            *flags,
            Some(data),
        ) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {}
            Err(e) => crate::log!("{e}"),
        }
    }
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
}

/// The virtio device id of vsock.
const VIRTIO_ID_VSOCK: &str = "0x0013";

/// Whether the guest has a virtio vsock device (built-in drivers have
/// probed every device by the time init runs).
pub fn has_vsock_device() -> bool {
    let Ok(dir) = fs::read_dir("/sys/bus/virtio/devices") else {
        return false;
    };
    dir.filter_map(|e| e.ok()).any(|e| {
        fs::read_to_string(e.path().join("device")).is_ok_and(|d| d.trim() == VIRTIO_ID_VSOCK)
    })
}

/// `husk.agent_port=N` from a kernel command line.
pub fn port_from_cmdline(cmdline: &str) -> Result<u32, String> {
    match cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(AGENT_PORT_PARAM)?.strip_prefix('='))
    {
        None => Ok(DEFAULT_PORT),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{AGENT_PORT_PARAM}={v:?} is not a port number")),
    }
}

/// `husk.log_port=N` from a kernel command line: where the shim may
/// connect to receive the agent's log.
pub fn log_port_from_cmdline(cmdline: &str) -> Result<Option<u32>, String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("husk.log_port="))
        .map(|v| {
            v.parse()
                .map_err(|_| format!("husk.log_port={v:?} is not a port number"))
        })
        .transpose()
}

/// A listening vsock stream socket on `port`, any CID.
pub fn vsock_listener(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket returned a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_vm is valid; the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    use std::os::fd::AsRawFd;
    // SAFETY: `addr` is a sockaddr_vm of the length given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Ends the VM. A reset is what both husk's VMM (i8042) and QEMU
/// (`-no-reboot`) turn into a clean exit; the guest kernel has no ACPI, so a
/// power-off request would only halt the CPUs.
pub fn end_vm() -> ! {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with a valid command; we are PID 1 with
    // CAP_SYS_BOOT. It returns only on failure.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    crate::log!("reboot failed: {}", io::Error::last_os_error());
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_from_the_command_line() {
        assert_eq!(port_from_cmdline("console=ttyS0 quiet"), Ok(DEFAULT_PORT));
        assert_eq!(port_from_cmdline("husk.agent_port=2048 x=1"), Ok(2048));
        assert!(port_from_cmdline("husk.agent_port=http").is_err());
        assert_eq!(log_port_from_cmdline("quiet"), Ok(None));
        assert_eq!(log_port_from_cmdline("husk.log_port=1025"), Ok(Some(1025)));
        assert!(log_port_from_cmdline("husk.log_port=x").is_err());
    }
}
