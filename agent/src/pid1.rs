//! Duties of the agent as PID 1 of the guest: the early mounts, the
//! kernel command line, the vsock listener and ending the VM.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::mount::MountFlags;

use crate::sys;

/// The vsock port when the kernel command line names none.
pub use husk_protocols::guest::AGENT_PORT as DEFAULT_PORT;
use husk_protocols::guest::AGENT_PORT_PARAM;

/// Set in the environment of the agent once it runs from its own tmpfs.
const REROOTED: &str = "HUSK_AGENT_REROOTED";
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The initramfs folders that follow the agent to its new root: the debug
/// console's busybox and applet links (rootfs-image/build.sh).
const DEBUG_TOOL_DIRS: [&str; 3] = ["bin", "sbin", "usr"];

/// Moves the files, symlinks and folders under `from` (on the initramfs)
/// to `to` (on the new root): copied, then removed from the initramfs so
/// that its memory is freed. A missing `from` is nothing to do.
fn carry_over(from: &Path, to: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(from) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
        fs::remove_file(from)
    } else if kind.is_dir() {
        fs::create_dir_all(to)?;
        fs::set_permissions(to, meta.permissions())?;
        for entry in fs::read_dir(from)? {
            let name = entry?.file_name();
            carry_over(&from.join(&name), &to.join(&name))?;
        }
        Ok(())
    } else if kind.is_file() {
        fs::copy(from, to)?;
        fs::remove_file(from)
    } else {
        Ok(())
    }
}

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
    let st = rustix::fs::statfs("/")?;
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
        Path::new("tmpfs"),
        new,
        "tmpfs",
        MountFlags::empty(),
        "mode=0755",
    )?;
    fs::copy(exe, new.join("init"))?;
    // Free the initramfs copy (it stays below, hidden, otherwise).
    let _ = fs::remove_file(exe);
    // The debug console's tools (busybox and its applet links), if the
    // image has them; without them only `husk exec` lacks its shell.
    for dir in DEBUG_TOOL_DIRS {
        if let Err(e) = carry_over(Path::new("/").join(dir).as_path(), &new.join(dir)) {
            eprintln!("husk-agent: carrying /{dir} to the new root: {e}");
        }
    }
    std::env::set_current_dir(new)?;
    sys::move_mount(Path::new("."), Path::new("/"))?;
    rustix::process::chroot(".")?;
    rustix::process::chdir("/")?;
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
    // across the call; returns only on failure. (libc: rustix's execve is
    // unsafe as well.)
    unsafe { libc::execve(c"/init".as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
    Err(io::Error::last_os_error())
}

/// Mounts what every guest needs; an already mounted target is fine.
pub fn mount_all() {
    let nosuid_nodev = MountFlags::NOSUID | MountFlags::NODEV;
    let table: &[(&str, &str, &str, MountFlags, &str)] = &[
        (
            "proc",
            "/proc",
            "proc",
            nosuid_nodev | MountFlags::NOEXEC,
            "",
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            nosuid_nodev | MountFlags::NOEXEC,
            "",
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MountFlags::NOSUID,
            "mode=0755",
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        ("shm", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_nodev | MountFlags::NOEXEC,
            "",
        ),
    ];
    for (src, target, fstype, flags, data) in table {
        let _ = fs::create_dir_all(target);
        match sys::mount(Path::new(src), Path::new(target), fstype, *flags, data) {
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
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::VSOCK,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::bind(&fd, &VsockAddr { port })?;
    rustix::net::listen(&fd, 128)?;
    Ok(fd)
}

/// The length of a sockaddr_vm, as rustix takes it.
// Fits: the struct is 16 bytes.
#[allow(clippy::cast_possible_truncation)]
const VSOCK_ADDR_LEN: rustix::net::addr::SocketAddrLen =
    std::mem::size_of::<libc::sockaddr_vm>() as rustix::net::addr::SocketAddrLen;

/// A vsock address of any CID (rustix has the address family but no
/// address type for it).
struct VsockAddr {
    port: u32,
}

// SAFETY: `with_sockaddr` passes `f` a pointer to a whole, initialised
// sockaddr_vm on the stack, alive for the call, and its exact length.
unsafe impl rustix::net::addr::SocketAddrArg for VsockAddr {
    unsafe fn with_sockaddr<R>(
        &self,
        f: impl FnOnce(
            *const rustix::net::addr::SocketAddrOpaque,
            rustix::net::addr::SocketAddrLen,
        ) -> R,
    ) -> R {
        // SAFETY: all-zero bytes are a valid sockaddr_vm (plain integers);
        // the fields that matter are set below.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = rustix::net::AddressFamily::VSOCK.as_raw();
        addr.svm_port = self.port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        f((&addr as *const libc::sockaddr_vm).cast(), VSOCK_ADDR_LEN)
    }
}

/// Ends the VM. A reset is what both husk's VMM (i8042) and QEMU
/// (`-no-reboot`) turn into a clean exit; the guest kernel has no ACPI, so a
/// power-off request would only halt the CPUs.
pub fn end_vm() -> ! {
    rustix::fs::sync();
    // As PID 1 with CAP_SYS_BOOT this does not return.
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::Restart) {
        crate::log!("reboot failed: {}", io::Error::from(e));
    }
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files, symlinks and folders move; the source is emptied.
    #[test]
    fn debug_tools_are_carried_over() {
        let root = std::env::temp_dir().join(format!("husk-carry-{}", std::process::id()));
        let (from, to) = (root.join("from"), root.join("to"));
        fs::create_dir_all(from.join("sbin")).unwrap();
        fs::write(from.join("busybox"), b"bb").unwrap();
        std::os::unix::fs::symlink("/bin/busybox", from.join("sh")).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", from.join("sbin/ip")).unwrap();
        carry_over(&from, &to).unwrap();
        assert_eq!(fs::read(to.join("busybox")).unwrap(), b"bb");
        assert_eq!(
            fs::read_link(to.join("sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert_eq!(
            fs::read_link(to.join("sbin/ip")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert!(!from.join("busybox").exists() && fs::symlink_metadata(from.join("sh")).is_err());
        carry_over(&root.join("missing"), &root.join("x")).unwrap();
        assert!(!root.join("x").exists());
        fs::remove_dir_all(&root).unwrap();
    }

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
