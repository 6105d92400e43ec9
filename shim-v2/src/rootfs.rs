//! A container's root file system on its way to the guest: containerd's
//! rootfs mounts (usually one overlay of the image's snapshots) are mounted
//! at `<bundle>/rootfs`, as runc's shim does; `mkfs.erofs` turns that tree
//! into a read-only image; the guest sees the image as a virtio-blk disk
//! and the agent mounts it under a tmpfs overlay.
//!
//! Why a block device with erofs (and not virtio-fs or 9p): no file server
//! process per pod on the host (virtiofsd), no host directory exposed to an
//! untrusted guest (the guest reads an image, not the host's file system,
//! and cannot write it: the disk is read-only), small images and a fast,
//! simple read-only file system in the guest; the container's writes go to
//! a tmpfs in guest memory and vanish with the container.
//!
//! The VMM has no disk hot-plug, so a pod's later containers use *slots*:
//! sparse files attached read-only when the VM boots. A container's image
//! is written into the next unused slot file, in place (same inode, so the
//! VMM's open file sees it); the guest has never read that disk (its
//! partition scan at boot read it while it was all zeros, but the kernel
//! drops a block device's cached pages when its last opener closes it, and
//! nothing keeps a slot open), and erofs does not mind a disk larger than
//! its image. A slot is never used twice: after a container used it, the
//! guest may cache its pages.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use containerd_shim::protos::api::Mount;
use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};
use rustix::thread::UnshareFlags;

use crate::tool::{self, ToolError, ToolLimits};

/// Bytes of mount data a single mount(2) takes (one page, with a margin).
const MAX_MOUNT_DATA: usize = 4000;
/// Longest mkfs.erofs output kept for an error.
const MAX_TOOL_OUTPUT: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs mount {index} (type {fstype:?}) on {target}: {source}")]
    Mount {
        index: usize,
        fstype: String,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("rootfs mount {index}: {message}")]
    BadMount { index: usize, message: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Run(#[from] ToolError),
    #[error("{tool} failed ({status}): {output}")]
    Tool {
        tool: PathBuf,
        status: String,
        output: String,
    },
    #[error(
        "the pod's {total} disk slots are all used: raise pod_disk_slots in the husk configuration"
    )]
    SlotsExhausted { total: usize },
    #[error("the container's root file system image is {size} bytes, larger than a pod disk slot ({slot} bytes): raise pod_disk_slot_size_mib in the husk configuration")]
    ImageTooLarge { size: u64, slot: u64 },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io { what, path, source }
}

/// A mount(2) call made from one containerd mount: flags and data.
#[derive(Debug, PartialEq, Eq)]
pub struct MountPlan {
    pub flags: MountFlags,
    /// Change an existing mount's flags (MS_REMOUNT) rather than mount.
    pub remount: bool,
    pub data: String,
    /// Remount read-only after a bind (a bind ignores MS_RDONLY).
    pub bind_ro: bool,
}

/// Splits mount options into flags and file system data with the parser
/// the agent uses too (`husk_protocols::mount`). Propagation options are
/// dropped: propagation is the bundle's business, not the image's.
pub fn plan_options(options: &[String]) -> MountPlan {
    let parsed = husk_protocols::mount::parse(options);
    MountPlan {
        flags: parsed.flags,
        remount: parsed.remount,
        data: parsed.data_string(),
        bind_ro: parsed.bind_ro(),
    }
}

/// For overlay data too long for one page: the longest common directory
/// of the lowerdirs and the data with lowerdirs relative to it (the mount
/// is then made from that directory). None when there is nothing to gain.
pub fn compact_overlay_data(data: &str) -> Option<(PathBuf, String)> {
    let mut parts: Vec<String> = data.split(',').map(str::to_string).collect();
    let idx = parts.iter().position(|p| p.starts_with("lowerdir="))?;
    let lowers: Vec<&str> = parts[idx]["lowerdir=".len()..].split(':').collect();
    if lowers.len() < 2 || lowers.iter().any(|l| !l.starts_with('/')) {
        return None;
    }
    let first = Path::new(lowers[0]);
    let mut common: PathBuf = first.parent()?.to_path_buf();
    while !lowers.iter().all(|l| Path::new(l).starts_with(&common)) {
        common = common.parent()?.to_path_buf();
    }
    if common == Path::new("/") {
        return None;
    }
    let rel: Vec<String> = lowers
        .iter()
        .map(|l| {
            Path::new(l)
                .strip_prefix(&common)
                .map(|p| p.display().to_string())
        })
        .collect::<Result<_, _>>()
        .ok()?;
    parts[idx] = format!("lowerdir={}", rel.join(":"));
    Some((common, parts.join(",")))
}

/// One mount(2): a new mount of `source` (may be empty) as `fstype` (empty
/// for a bind), or with `remount` a change of the mount at `target`.
fn sys_mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MountFlags,
    remount: bool,
    data: Option<&str>,
) -> io::Result<()> {
    let data = data
        .map(|d| CString::new(d).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput)))
        .transpose()?;
    if remount {
        let data = data.unwrap_or_default();
        return Ok(rustix::mount::mount_remount(
            target,
            flags,
            data.as_c_str(),
        )?);
    }
    // The kernel ignores the type of a bind and the source of a pseudo
    // file system: empty strings stand for mount(2)'s NULLs.
    Ok(rustix::mount::mount(
        source.unwrap_or(Path::new("")),
        target,
        fstype.unwrap_or(""),
        flags,
        data.as_deref(),
    )?)
}

/// Runs `f` in a thread of its own whose working directory is `dir` (the
/// thread unshares its fs attributes, so the process's stays).
fn in_directory<T: Send>(dir: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: CLONE_FS only detaches this thread's cwd, root and
            // umask; the fd table (what unshare_unsafe warns about) stays
            // shared.
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::FS) }?;
            std::env::set_current_dir(dir)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("mount thread panicked")))
    })
}

/// Mounts containerd's rootfs mounts, in order, at `target`.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), RootfsError> {
    for (index, m) in mounts.iter().enumerate() {
        if m.type_.is_empty() && m.source.is_empty() {
            return Err(RootfsError::BadMount {
                index,
                message: "neither type nor source".into(),
            });
        }
        let plan = plan_options(&m.options);
        let fstype = if m.type_.is_empty() || m.type_ == "bind" {
            None
        } else {
            Some(m.type_.as_str())
        };
        let source = (!m.source.is_empty()).then(|| Path::new(&m.source));
        let err = |source: io::Error| RootfsError::Mount {
            index,
            fstype: m.type_.clone(),
            target: target.to_path_buf(),
            source,
        };
        let mut flags = plan.flags;
        if m.type_ == "bind" {
            flags |= MountFlags::BIND;
        }
        let result = if fstype == Some("overlay") && plan.data.len() > MAX_MOUNT_DATA {
            let (dir, data) =
                compact_overlay_data(&plan.data).ok_or_else(|| RootfsError::BadMount {
                    index,
                    message: format!("overlay options are {} bytes, too long", plan.data.len()),
                })?;
            if data.len() > MAX_MOUNT_DATA {
                return Err(RootfsError::BadMount {
                    index,
                    message: format!("overlay options are {} bytes, too long", data.len()),
                });
            }
            in_directory(&dir, || {
                sys_mount(source, target, fstype, flags, plan.remount, Some(&data))
            })
        } else {
            let data = (!plan.data.is_empty()).then_some(plan.data.as_str());
            sys_mount(source, target, fstype, flags, plan.remount, data)
        };
        result.map_err(err)?;
        if plan.bind_ro {
            sys_mount(None, target, None, flags | MountFlags::RDONLY, true, None).map_err(err)?;
        }
    }
    Ok(())
}

/// Where the shim mounts containerd's rootfs mounts and what it builds the
/// image from: always `<bundle>/rootfs`, as runc's shim does, whatever the
/// spec's `root.path` says (a spec naming `/` or `../..` must not make the
/// shim mount over, image, or unmount a host path).
pub fn bundle_rootfs(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// Creates `<bundle>/rootfs` for the rootfs mounts; a symlink there is
/// refused (mount(2) would follow it out of the bundle).
pub fn prepare_mountpoint(root: &Path) -> Result<(), RootfsError> {
    match fs::symlink_metadata(root) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io_err("preparing", root)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory (a symlink?)",
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(root).map_err(io_err("creating", root))
        }
        Err(e) => Err(io_err("preparing", root)(e)),
    }
}

/// Unmounts everything mounted at `target` (stacked mounts included);
/// nothing mounted is not an error. A symlink at `target` is not followed.
pub fn unmount(target: &Path) -> Result<(), RootfsError> {
    for _ in 0..64 {
        match rustix::mount::unmount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
            Ok(()) => {}
            Err(Errno::INVAL | Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io_err("unmounting", target)(e.into())),
        }
    }
    Ok(())
}

/// Output of a tool, cut for an error message.
fn tool_output(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out);
    let text = text.trim();
    let start = text.len().saturating_sub(MAX_TOOL_OUTPUT);
    let start = (start..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].replace('\n', " | ")
}

/// Builds an uncompressed erofs image of `dir` at `image` within
/// `limits` ([`crate::tool`]); its size. With a user in the limits, the
/// image file is made first and given to it.
pub fn build_erofs(
    mkfs: &Path,
    dir: &Path,
    image: &Path,
    limits: &ToolLimits,
) -> Result<u64, RootfsError> {
    if let Some(user) = limits.user {
        File::create(image).map_err(io_err("creating", image))?;
        let (uid, gid) = crate::sandbox::jail::ids(user);
        rustix::fs::chown(image, Some(uid), Some(gid))
            .map_err(|e| io_err("giving away", image)(e.into()))?;
    }
    let mut cmd = Command::new(mkfs);
    cmd.arg("--quiet").arg(image).arg(dir);
    let out = tool::run(cmd, limits);
    let failed = match out {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(RootfsError::Tool {
            tool: mkfs.to_path_buf(),
            status: out.status.to_string(),
            output: tool_output(&out.output),
        }),
        Err(e) => Some(RootfsError::Run(e)),
    };
    if let Some(e) = failed {
        let _ = fs::remove_file(image);
        return Err(e);
    }
    Ok(fs::metadata(image).map_err(io_err("reading", image))?.len())
}

/// A sparse file of `size` bytes (a pod disk slot).
pub fn create_sparse(path: &Path, size: u64) -> Result<(), RootfsError> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.set_len(size).map_err(io_err("sizing", path))
}

/// Copies `image` over the start of `slot` without truncating or
/// replacing it (the VMM holds it open).
pub fn write_into_slot(image: &Path, slot: &Path) -> Result<(), RootfsError> {
    let mut src = File::open(image).map_err(io_err("opening", image))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .open(slot)
        .map_err(io_err("opening", slot))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading", image)(e)),
        };
        dst.write_all(&buf[..n]).map_err(io_err("writing", slot))?;
    }
    dst.sync_data().map_err(io_err("syncing", slot))
}

/// A pod's disk slots: which is next. Slots are numbered from 1; a used
/// slot is never handed out again.
#[derive(Debug)]
pub struct Slots {
    total: usize,
    used: usize,
    slot_bytes: u64,
}

impl Slots {
    pub fn new(total: usize, slot_bytes: u64) -> Slots {
        Slots {
            total,
            used: 0,
            slot_bytes,
        }
    }

    /// Takes the next slot for an image of `size` bytes; its number.
    pub fn take(&mut self, size: u64) -> Result<usize, RootfsError> {
        if size > self.slot_bytes {
            return Err(RootfsError::ImageTooLarge {
                size,
                slot: self.slot_bytes,
            });
        }
        if self.used >= self.total {
            return Err(RootfsError::SlotsExhausted { total: self.total });
        }
        self.used += 1;
        Ok(self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[&str]) -> Vec<String> {
        o.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let p = plan_options(&opts(&[
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/a:/b",
        ]));
        assert_eq!(p.flags, MountFlags::empty());
        assert_eq!(p.data, "index=off,workdir=/w,upperdir=/u,lowerdir=/a:/b");
        let p = plan_options(&opts(&["rbind", "ro", "nosuid", "rprivate"]));
        assert_eq!(
            p.flags,
            MountFlags::BIND | MountFlags::REC | MountFlags::RDONLY | MountFlags::NOSUID
        );
        assert!(p.bind_ro);
        assert_eq!(p.data, "");
        let p = plan_options(&opts(&["ro", "rw"]));
        assert_eq!(p.flags, MountFlags::empty());
        assert!(!p.bind_ro);
        let p = plan_options(&opts(&["remount", "nodiratime", "diratime", "defaults"]));
        assert!(p.remount);
        assert_eq!(p.flags, MountFlags::empty());
        assert_eq!(p.data, "");
    }

    #[test]
    fn long_overlay_lowerdirs_are_made_relative() {
        let base = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots";
        let data = format!("index=off,lowerdir={base}/3/fs:{base}/2/fs:{base}/1/fs,upperdir=/u");
        let (dir, short) = compact_overlay_data(&data).unwrap();
        assert_eq!(dir, Path::new(base));
        assert_eq!(short, "index=off,lowerdir=3/fs:2/fs:1/fs,upperdir=/u");
        assert!(compact_overlay_data("lowerdir=/a/x:/b/y").is_none());
        assert!(compact_overlay_data("lowerdir=/a/x").is_none());
        assert!(compact_overlay_data("upperdir=/u").is_none());
    }

    #[test]
    fn slots_run_out_and_refuse_large_images() {
        let mut s = Slots::new(2, 1000);
        assert_eq!(s.take(10).unwrap(), 1);
        assert!(matches!(
            s.take(1001),
            Err(RootfsError::ImageTooLarge {
                size: 1001,
                slot: 1000
            })
        ));
        assert_eq!(s.take(1000).unwrap(), 2);
        let e = s.take(1).unwrap_err();
        assert!(matches!(e, RootfsError::SlotsExhausted { total: 2 }));
        assert!(e.to_string().contains("pod_disk_slots"));
        assert!(matches!(
            Slots::new(0, 1000).take(1),
            Err(RootfsError::SlotsExhausted { total: 0 })
        ));
    }

    #[test]
    fn slot_writes_keep_the_inode_and_size() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("husk-slot-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let slot = dir.join("slot1");
        create_sparse(&slot, 1 << 20).unwrap();
        let before = fs::metadata(&slot).unwrap();
        let image = dir.join("img");
        fs::write(&image, b"erofs image bytes").unwrap();
        write_into_slot(&image, &slot).unwrap();
        let after = fs::metadata(&slot).unwrap();
        assert_eq!(before.ino(), after.ino());
        assert_eq!(after.len(), 1 << 20);
        let data = fs::read(&slot).unwrap();
        assert_eq!(&data[..17], b"erofs image bytes");
        assert!(data[17..].iter().all(|&b| b == 0));
        assert!(create_sparse(&slot, 1).is_err(), "never reuses a file");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn erofs_images_build_when_the_tool_is_there() {
        use std::os::unix::fs::PermissionsExt;
        let mkfs = Path::new("/usr/bin/mkfs.erofs");
        let dir = std::env::temp_dir().join(format!("husk-erofs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("tree/bin")).unwrap();
        fs::write(dir.join("tree/bin/hello"), b"hi").unwrap();
        // A file and a folder only their owner (root) may read.
        fs::create_dir_all(dir.join("tree/root")).unwrap();
        fs::write(dir.join("tree/root/secret"), vec![7u8; 100_000]).unwrap();
        fs::set_permissions(
            dir.join("tree/root/secret"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        fs::set_permissions(dir.join("tree/root"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let image = dir.join("img.erofs");
        let mut limits = ToolLimits {
            timeout: std::time::Duration::from_secs(60),
            max_file_bytes: 1 << 20,
            max_address_space: 4 << 30,
            // As the shim runs it: the jail's user, when the test can.
            user: rustix::process::geteuid()
                .is_root()
                .then_some(crate::sandbox::jail::JailUser {
                    uid: 65500,
                    gid: 65501,
                }),
        };
        if mkfs.exists() {
            let size = build_erofs(mkfs, &dir.join("tree"), &image, &limits).unwrap();
            assert!(size >= 100_000, "{size}");
            let e = build_erofs(mkfs, &dir.join("missing"), &dir.join("x"), &limits).unwrap_err();
            assert!(matches!(e, RootfsError::Tool { .. }), "{e}");
            assert!(!dir.join("x").exists());
            // An image past its size limit fails and is removed.
            limits.max_file_bytes = 64 << 10;
            let e = build_erofs(mkfs, &dir.join("tree"), &dir.join("y"), &limits).unwrap_err();
            assert!(matches!(e, RootfsError::Tool { .. }), "{e}");
            assert!(!dir.join("y").exists());
        }
        let e = build_erofs(Path::new("/nonexistent/mkfs"), &dir, &image, &limits).unwrap_err();
        assert!(
            matches!(e, RootfsError::Run(ToolError::Spawn { .. })),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unmount_of_nothing_is_fine() {
        unmount(Path::new("/nonexistent/husk/rootfs")).unwrap();
    }

    /// Real mounts (needs root, as the shim runs): a tmpfs with data, a
    /// read-only bind of it on top, and an unmount of the whole stack.
    #[test]
    fn mounts_binds_read_only_and_unmounts_the_stack() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("husk-mnt-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dst).unwrap();
        let mount = |type_: &str, source: &Path, options: &[&str]| Mount {
            type_: type_.into(),
            source: source.display().to_string(),
            options: opts(options),
            ..Default::default()
        };
        mount_all(
            &[mount("tmpfs", Path::new("husk"), &["size=1m", "mode=0755"])],
            &src,
        )
        .unwrap();
        fs::write(src.join("f"), b"hello").unwrap();
        mount_all(&[mount("bind", &src, &["rbind", "ro"])], &dst).unwrap();
        assert_eq!(fs::read(dst.join("f")).unwrap(), b"hello");
        let e = fs::write(dst.join("g"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(Errno::ROFS.raw_os_error()));
        // A mount the kernel refuses names its index and type.
        let e = mount_all(&[mount("nosuchfs", Path::new("x"), &[])], &dst).unwrap_err();
        assert!(
            e.to_string().contains("rootfs mount 0 (type \"nosuchfs\")"),
            "{e}"
        );
        unmount(&dst).unwrap();
        unmount(&src).unwrap();
        assert!(!src.join("f").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
