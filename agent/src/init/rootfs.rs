//! The container's root filesystem, set up in its new mount namespace as
//! runc does: propagation, the rootfs bind, the OCI mounts, device nodes and
//! /dev links, pivot_root, masked and read-only paths, a read-only root.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use crate::paths::resolve_in_root;
use crate::sys::{self, ctx};

/// What a mount's `options` turn into.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: libc::c_ulong,
    /// Propagation changes applied after the mount (MS_SHARED etc.).
    pub propagation: Vec<libc::c_ulong>,
    /// What the file system gets as its data string.
    pub data: Vec<String>,
}

/// Parses mount options as runc's parseMountOptions does.
pub fn parse_options(options: &[String]) -> MountOptions {
    let mut out = MountOptions::default();
    for o in options {
        let set_clear: Option<(bool, libc::c_ulong)> = match o.as_str() {
            "ro" => Some((true, libc::MS_RDONLY)),
            "rw" => Some((false, libc::MS_RDONLY)),
            "nosuid" => Some((true, libc::MS_NOSUID)),
            "suid" => Some((false, libc::MS_NOSUID)),
            "nodev" => Some((true, libc::MS_NODEV)),
            "dev" => Some((false, libc::MS_NODEV)),
            "noexec" => Some((true, libc::MS_NOEXEC)),
            "exec" => Some((false, libc::MS_NOEXEC)),
            "sync" => Some((true, libc::MS_SYNCHRONOUS)),
            "async" => Some((false, libc::MS_SYNCHRONOUS)),
            "dirsync" => Some((true, libc::MS_DIRSYNC)),
            "remount" => Some((true, libc::MS_REMOUNT)),
            "mand" => Some((true, libc::MS_MANDLOCK)),
            "nomand" => Some((false, libc::MS_MANDLOCK)),
            "atime" => Some((false, libc::MS_NOATIME)),
            "noatime" => Some((true, libc::MS_NOATIME)),
            "diratime" => Some((false, libc::MS_NODIRATIME)),
            "nodiratime" => Some((true, libc::MS_NODIRATIME)),
            "bind" => Some((true, libc::MS_BIND)),
            "rbind" => Some((true, libc::MS_BIND | libc::MS_REC)),
            "relatime" => Some((true, libc::MS_RELATIME)),
            "norelatime" => Some((false, libc::MS_RELATIME)),
            "strictatime" => Some((true, libc::MS_STRICTATIME)),
            "nostrictatime" => Some((false, libc::MS_STRICTATIME)),
            _ => None,
        };
        if let Some((set, flag)) = set_clear {
            if set {
                out.flags |= flag;
            } else {
                out.flags &= !flag;
            }
            continue;
        }
        let prop = match o.as_str() {
            "private" => Some(libc::MS_PRIVATE),
            "rprivate" => Some(libc::MS_PRIVATE | libc::MS_REC),
            "shared" => Some(libc::MS_SHARED),
            "rshared" => Some(libc::MS_SHARED | libc::MS_REC),
            "slave" => Some(libc::MS_SLAVE),
            "rslave" => Some(libc::MS_SLAVE | libc::MS_REC),
            "unbindable" => Some(libc::MS_UNBINDABLE),
            "runbindable" => Some(libc::MS_UNBINDABLE | libc::MS_REC),
            _ => None,
        };
        match prop {
            Some(p) => out.propagation.push(p),
            None => out.data.push(o.clone()),
        }
    }
    out
}

/// The mount types husk knows how to mount (besides bind mounts).
pub const MOUNT_TYPES: &[&str] = &[
    "bind", "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

fn root_propagation(spec: &Spec) -> libc::c_ulong {
    match spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().clone())
        .as_deref()
    {
        Some("shared") | Some("rshared") => libc::MS_SHARED | libc::MS_REC,
        Some("private") | Some("rprivate") => libc::MS_PRIVATE | libc::MS_REC,
        Some("unbindable") | Some("runbindable") => libc::MS_UNBINDABLE | libc::MS_REC,
        _ => libc::MS_SLAVE | libc::MS_REC,
    }
}

/// Everything from the rootfs bind to pivot_root. Runs in the container's
/// new mount namespace, as root.
pub fn setup(spec: &Spec, rootfs: &Path) -> io::Result<()> {
    // Nothing done from here on may propagate back to the agent's mounts.
    sys::mount(None, Path::new("/"), None, root_propagation(spec), None)?;
    sys::mount(
        Some(rootfs),
        rootfs,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    let mounts = spec.mounts().clone().unwrap_or_default();
    for m in &mounts {
        mount_one(rootfs, m)?;
    }
    let dev_bound = mounts
        .iter()
        .any(|m| m.destination() == Path::new("/dev") && is_bind(m));
    if !dev_bound {
        create_devices(spec, rootfs)?;
        dev_links(rootfs)?;
    }
    ctx(std::env::set_current_dir(rootfs), "chdir to rootfs")?;
    ctx(sys::pivot_root_here(), "pivot_root")?;
    // The old root is now stacked under the new one at "."; detach it.
    ctx(sys::umount_detach(Path::new(".")), "detaching the old root")?;
    ctx(std::env::set_current_dir("/"), "chdir /")?;
    Ok(())
}

/// After the sysctls (which write through /proc/sys before it turns
/// read-only): masked and read-only paths, then the read-only root.
pub fn finish(spec: &Spec) -> io::Result<()> {
    if let Some(linux) = spec.linux() {
        for p in linux.masked_paths().iter().flatten() {
            mask_path(Path::new(p))?;
        }
        for p in linux.readonly_paths().iter().flatten() {
            readonly_path(Path::new(p))?;
        }
    }
    if spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
        let keep = sys::kept_mount_flags(Path::new("/"))?;
        ctx(
            sys::mount(
                None,
                Path::new("/"),
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | keep,
                None,
            ),
            "read-only root",
        )?;
    }
    Ok(())
}

fn resolve(rootfs: &Path, dest: &Path) -> io::Result<PathBuf> {
    resolve_in_root(rootfs, dest).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn mount_one(rootfs: &Path, m: &Mount) -> io::Result<()> {
    let target = resolve(rootfs, m.destination())?;
    let opts = parse_options(m.options().as_deref().unwrap_or_default());
    let what = format!("mount {:?} on {:?}", m.source(), m.destination());
    if is_bind(m) {
        let source = m
            .source()
            .as_deref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bind without source"))?;
        let md = ctx(fs::metadata(source), &what)?;
        if md.is_dir() {
            ctx(fs::create_dir_all(&target), &what)?;
        } else {
            if let Some(parent) = target.parent() {
                ctx(fs::create_dir_all(parent), &what)?;
            }
            if fs::symlink_metadata(&target).is_err() {
                ctx(fs::File::create(&target), &what)?;
            }
        }
        let bind = libc::MS_BIND | (opts.flags & libc::MS_REC);
        ctx(sys::mount(Some(source), &target, None, bind, None), &what)?;
        // Bind mounts ignore other flags on the first call (mount(2)).
        let rest = opts.flags & !(libc::MS_BIND | libc::MS_REC | libc::MS_REMOUNT);
        if rest != 0 {
            let keep = sys::kept_mount_flags(&target)? & !libc::MS_RDONLY;
            let flags = libc::MS_BIND | libc::MS_REMOUNT | rest | keep;
            ctx(sys::mount(None, &target, None, flags, None), &what)?;
        }
    } else {
        ctx(fs::create_dir_all(&target), &what)?;
        let typ = match m.typ().as_deref() {
            // A cgroup mount in a cgroup v2 guest is cgroup2, as runc does
            // on a unified host.
            Some("cgroup") | Some("cgroup2") => "cgroup2",
            Some(t) => t,
            None => return Err(io::Error::new(io::ErrorKind::InvalidInput, "mount type")),
        };
        let source = m.source().clone().unwrap_or_else(|| PathBuf::from(typ));
        let data = opts.data.join(",");
        ctx(
            sys::mount(Some(&source), &target, Some(typ), opts.flags, Some(&data)),
            &what,
        )?;
    }
    for p in &opts.propagation {
        ctx(sys::mount(None, &target, None, *p, None), &what)?;
    }
    Ok(())
}

/// runc's default devices, created in every container.
fn default_devices() -> Vec<(&'static str, u32, u32)> {
    vec![
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ]
}

fn create_devices(spec: &Spec, rootfs: &Path) -> io::Result<()> {
    let mut devices: Vec<(PathBuf, libc::mode_t, u64, u64, u32, u32)> = default_devices()
        .into_iter()
        .map(|(p, maj, min)| {
            (
                PathBuf::from(p),
                libc::S_IFCHR | 0o666,
                maj.into(),
                min.into(),
                0,
                0,
            )
        })
        .collect();
    let extra: &[LinuxDevice] = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().as_deref())
        .unwrap_or_default();
    for d in extra {
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
            LinuxDeviceType::B => libc::S_IFBLK,
            LinuxDeviceType::P => libc::S_IFIFO,
            LinuxDeviceType::A => continue,
        };
        let mode = d.file_mode().unwrap_or(0o666) & 0o7777;
        devices.retain(|x| &x.0 != d.path());
        devices.push((
            d.path().clone(),
            kind | mode,
            d.major() as u64,
            d.minor() as u64,
            d.uid().unwrap_or(0),
            d.gid().unwrap_or(0),
        ));
    }
    for (path, mode, major, minor, uid, gid) in devices {
        let target = resolve(rootfs, &path)?;
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        let _ = fs::remove_file(&target);
        let what = format!("device {}", path.display());
        match sys::mknod(&target, mode, libc::makedev(major as u32, minor as u32)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                // No CAP_MKNOD: bind the host's node, as runc does.
                fs::File::create(&target)?;
                ctx(
                    sys::mount(Some(&path), &target, None, libc::MS_BIND, None),
                    &what,
                )?;
                continue;
            }
            Err(e) => return ctx(Err(e), what),
        }
        ctx(sys::chown(&target, uid, gid), &what)?;
        // mknod applies the umask; the spec's mode is what counts.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&target, fs::Permissions::from_mode(mode & 0o7777))?;
    }
    Ok(())
}

fn dev_links(rootfs: &Path) -> io::Result<()> {
    let dev = resolve(rootfs, Path::new("/dev"))?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let l = dev.join(link);
        if fs::symlink_metadata(&l).is_err() {
            ctx(symlink(target, &l), format_args!("/dev/{link}"))?;
        }
    }
    if dev.join("pts/ptmx").exists() {
        let _ = fs::remove_file(dev.join("ptmx"));
        ctx(symlink("pts/ptmx", dev.join("ptmx")), "/dev/ptmx")?;
    }
    Ok(())
}

fn mask_path(p: &Path) -> io::Result<()> {
    let md = match fs::metadata(p) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return ctx(Err(e), format_args!("masked path {}", p.display())),
    };
    let r = if md.is_dir() {
        sys::mount(
            Some(Path::new("tmpfs")),
            p,
            Some("tmpfs"),
            libc::MS_RDONLY,
            None,
        )
    } else {
        sys::mount(Some(Path::new("/dev/null")), p, None, libc::MS_BIND, None)
    };
    ctx(r, format_args!("masked path {}", p.display()))
}

fn readonly_path(p: &Path) -> io::Result<()> {
    if !p.exists() {
        return Ok(());
    }
    let what = format!("read-only path {}", p.display());
    ctx(
        sys::mount(Some(p), p, None, libc::MS_BIND | libc::MS_REC, None),
        &what,
    )?;
    let keep = sys::kept_mount_flags(p)?;
    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC | keep;
    ctx(sys::mount(None, p, None, flags, None), what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_as_runc_parses_them() {
        let o: Vec<String> = [
            "nosuid",
            "strictatime",
            "mode=755",
            "size=65536k",
            "rslave",
            "ro",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = parse_options(&o);
        assert_eq!(
            p.flags,
            libc::MS_NOSUID | libc::MS_STRICTATIME | libc::MS_RDONLY
        );
        assert_eq!(p.data, vec!["mode=755", "size=65536k"]);
        assert_eq!(p.propagation, vec![libc::MS_SLAVE | libc::MS_REC]);
        let p = parse_options(&["ro".into(), "rw".into(), "rbind".into()]);
        assert_eq!(p.flags, libc::MS_BIND | libc::MS_REC);
    }
}
