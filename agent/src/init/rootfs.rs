//! The container's root filesystem, set up in its new mount namespace as
//! runc does: propagation, the rootfs bind, the OCI mounts, device nodes and
//! /dev links, pivot_root, masked and read-only paths, a read-only root.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use husk_protocols::mount::{self, MountFlags, MountOptions, MountPropagationFlags};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use crate::paths::resolve_in_root;
use crate::sys::{self, ctx};

/// The mount types husk knows how to mount (besides bind mounts).
pub const MOUNT_TYPES: &[&str] = &[
    "bind", "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

fn options(m: &Mount) -> MountOptions {
    mount::parse(m.options().as_deref().unwrap_or_default())
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind") || options(m).is_bind()
}

fn has_root_propagation(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .is_some_and(|l| l.rootfs_propagation().is_some())
}

fn root_propagation(spec: &Spec) -> MountPropagationFlags {
    match spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().clone())
        .as_deref()
    {
        Some("shared") | Some("rshared") => MountPropagationFlags::SHARED,
        Some("private") | Some("rprivate") => MountPropagationFlags::PRIVATE,
        Some("unbindable") | Some("runbindable") => MountPropagationFlags::UNBINDABLE,
        _ => MountPropagationFlags::DOWNSTREAM,
    }
    .union(MountPropagationFlags::REC)
}

/// Everything from the rootfs bind to pivot_root. Runs in the container's
/// new mount namespace, as root.
pub fn setup(spec: &Spec, rootfs: &Path) -> io::Result<()> {
    // Nothing done from here on may propagate back to the agent's mounts.
    sys::change_propagation(Path::new("/"), root_propagation(spec))?;
    // pivot_root(2) refuses (EINVAL) a new root whose parent mount is
    // shared, as it is once the root above was made rshared: make that one
    // mount private in this namespace, as runc does.
    let parent = ctx(
        super::mountinfo::mount_holding(rootfs),
        "finding the rootfs's mount",
    )?;
    if parent.shared {
        sys::change_propagation(&parent.mount_point, MountPropagationFlags::PRIVATE)?;
    }
    sys::bind(rootfs, rootfs, true)?;
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
    // The new root is the rootfs bind, private from its parent: give it
    // the propagation the spec asks for.
    if has_root_propagation(spec) {
        ctx(
            sys::change_propagation(Path::new("/"), root_propagation(spec)),
            "the root's propagation",
        )?;
    }
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
            sys::remount(
                Path::new("/"),
                MountFlags::BIND | MountFlags::RDONLY | keep,
                "",
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
    let opts = options(m);
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
        ctx(sys::bind(source, &target, opts.is_recursive()), &what)?;
        // Bind mounts ignore other flags on the first call (mount(2)).
        let rest = opts.flags - MountFlags::BIND - MountFlags::REC;
        if !rest.is_empty() {
            let keep = sys::kept_mount_flags(&target)? - MountFlags::RDONLY;
            let flags = MountFlags::BIND | rest | keep;
            ctx(sys::remount(&target, flags, ""), &what)?;
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
        let data = opts.data_string();
        // "remount" changes the mount already there (mount(2) then ignores
        // the source and type), as runc's mount(2) call with MS_REMOUNT does.
        let r = if opts.remount {
            sys::remount(&target, opts.flags, &data)
        } else {
            sys::mount(&source, &target, typ, opts.flags, &data)
        };
        ctx(r, &what)?;
    }
    for p in &opts.propagation {
        ctx(sys::change_propagation(&target, *p), &what)?;
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

/// A spec device's major and minor numbers (i64 in the spec), refused
/// when negative or over what mknod(2) takes rather than cut to another
/// device's.
pub fn device_numbers(d: &LinuxDevice) -> io::Result<(u32, u32)> {
    let check = |what: &str, n: i64, max: u32| {
        u32::try_from(n).ok().filter(|&n| n <= max).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "device {}: {what} number {n} is not in 0..={max}",
                    d.path().display()
                ),
            )
        })
    };
    Ok((
        check("major", d.major(), sys::MAJOR_MAX)?,
        check("minor", d.minor(), sys::MINOR_MAX)?,
    ))
}

fn create_devices(spec: &Spec, rootfs: &Path) -> io::Result<()> {
    let mut devices: Vec<(PathBuf, u32, u32, u32, u32, u32)> = default_devices()
        .into_iter()
        .map(|(p, maj, min)| (PathBuf::from(p), libc::S_IFCHR | 0o666, maj, min, 0, 0))
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
        let (major, minor) = device_numbers(d)?;
        devices.retain(|x| &x.0 != d.path());
        devices.push((
            d.path().clone(),
            kind | mode,
            major,
            minor,
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
        match sys::mknod(&target, mode, major, minor) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                // No CAP_MKNOD: bind the host's node, as runc does.
                fs::File::create(&target)?;
                ctx(sys::bind(&path, &target, false), &what)?;
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
        sys::mount(Path::new("tmpfs"), p, "tmpfs", MountFlags::RDONLY, "")
    } else {
        sys::bind(Path::new("/dev/null"), p, false)
    };
    ctx(r, format_args!("masked path {}", p.display()))
}

fn readonly_path(p: &Path) -> io::Result<()> {
    if !p.exists() {
        return Ok(());
    }
    let what = format!("read-only path {}", p.display());
    ctx(sys::bind(p, p, true), &what)?;
    let keep = sys::kept_mount_flags(p)?;
    let flags = MountFlags::BIND | MountFlags::RDONLY | MountFlags::REC | keep;
    ctx(sys::remount(p, flags, ""), what)
}
