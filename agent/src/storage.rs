//! Container root file systems the agent makes itself: a read-only disk the
//! host attached (found by its virtio-blk serial) under a tmpfs overlay, so
//! the container can write while the host's image stays as it was.
//!
//! Layout for a rootfs at `R`: the disk at `R.lower`, a tmpfs at `R.rw` with
//! `upper` and `work`, and the overlay at `R`. Dropping nothing by accident:
//! a failed mount unwinds what it did, and [`RootfsMount::unmount`] removes
//! all three mounts and their folders.

use std::fs;
use std::path::{Path, PathBuf};

use rustix::mount::MountFlags;

use crate::sys;

/// The source of a mount that has none (as /proc/mounts shows it).
const NONE: &str = "none";

/// File systems a rootfs disk may carry.
const FSTYPES: &[&str] = &["erofs", "ext4"];

/// Errors mounting a rootfs disk.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage fstype {0:?} is not supported (erofs or ext4)")]
    Fstype(String),
    #[error("storage serial {0:?} is malformed")]
    Serial(String),
    #[error("no disk with serial {0:?}")]
    NoDisk(String),
    #[error("rootfs {0}: must be an absolute path without '..'")]
    Target(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io { what, path, source }
}

/// The mounts that make one container's rootfs.
#[derive(Debug)]
pub struct RootfsMount {
    target: PathBuf,
    rw: PathBuf,
    lower: PathBuf,
}

/// Finds the block device whose virtio serial is `serial` under `sys_block`
/// (normally /sys/block).
fn find_disk(sys_block: &Path, serial: &str) -> Result<PathBuf, StorageError> {
    let entries = fs::read_dir(sys_block).map_err(io("listing", sys_block))?;
    for entry in entries.flatten() {
        let got = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if got.trim_end_matches(['\n', '\0']) == serial {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(StorageError::NoDisk(serial.to_string()))
}

fn sibling(target: &Path, suffix: &str) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Checks a request's storage before anything is touched.
pub fn validate(serial: &str, fstype: &str, target: &Path) -> Result<(), StorageError> {
    if !FSTYPES.contains(&fstype) {
        return Err(StorageError::Fstype(fstype.to_string()));
    }
    // A virtio-blk serial is at most 20 printable bytes.
    if serial.is_empty() || serial.len() > 20 || !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(StorageError::Serial(serial.to_string()));
    }
    let escapes = target
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir));
    if !target.is_absolute() || escapes || target == Path::new("/") {
        return Err(StorageError::Target(target.to_path_buf()));
    }
    Ok(())
}

/// Mounts the disk with `serial` read-only as `fstype` and a tmpfs overlay
/// on it at `target`.
pub fn mount_rootfs(
    serial: &str,
    fstype: &str,
    target: &Path,
) -> Result<RootfsMount, StorageError> {
    validate(serial, fstype, target)?;
    let disk = find_disk(Path::new("/sys/block"), serial)?;
    let m = RootfsMount {
        target: target.to_path_buf(),
        rw: sibling(target, ".rw"),
        lower: sibling(target, ".lower"),
    };
    // Each step that succeeds is undone by unmount() if a later one fails.
    let result = (|| {
        for dir in [&m.lower, &m.rw, &m.target] {
            fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        sys::mount(&disk, &m.lower, fstype, MountFlags::RDONLY, "")
            .map_err(io("mounting", &disk))?;
        // "none": what mount(2) shows for a mount without a source.
        sys::mount(
            Path::new(NONE),
            &m.rw,
            "tmpfs",
            MountFlags::empty(),
            "mode=0755",
        )
        .map_err(io("mounting tmpfs on", &m.rw))?;
        let (upper, work) = (m.rw.join("upper"), m.rw.join("work"));
        for dir in [&upper, &work] {
            fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            m.lower.display(),
            upper.display(),
            work.display()
        );
        sys::mount(
            Path::new(NONE),
            &m.target,
            "overlay",
            MountFlags::empty(),
            &data,
        )
        .map_err(io("mounting overlay on", &m.target))
    })();
    match result {
        Ok(()) => Ok(m),
        Err(e) => {
            m.unmount();
            Err(e)
        }
    }
}

impl RootfsMount {
    /// Unmounts the overlay, the tmpfs and the disk and removes their
    /// folders; what is not mounted is skipped.
    pub fn unmount(&self) {
        for dir in [&self.target, &self.rw, &self.lower] {
            let _ = sys::umount_detach(dir);
            let _ = fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_refuses_bad_input() {
        let t = Path::new("/run/husk/c1/rootfs");
        assert!(validate("rootfs0", "erofs", t).is_ok());
        assert!(validate("rootfs0", "ext4", t).is_ok());
        assert!(matches!(
            validate("rootfs0", "xfs", t),
            Err(StorageError::Fstype(_))
        ));
        for bad in ["", "has space", "way-more-than-twenty-bytes"] {
            assert!(matches!(
                validate(bad, "erofs", t),
                Err(StorageError::Serial(_))
            ));
        }
        for bad in ["relative", "/", "/run/../etc"] {
            assert!(matches!(
                validate("rootfs0", "erofs", Path::new(bad)),
                Err(StorageError::Target(_))
            ));
        }
    }

    #[test]
    fn finds_a_disk_by_serial() {
        let dir = std::env::temp_dir().join(format!("husk-storage-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (name, serial) in [("vda", "other\n"), ("vdb", "rootfs0\n"), ("vdc", "")] {
            fs::create_dir_all(dir.join(name)).unwrap();
            fs::write(dir.join(name).join("serial"), serial).unwrap();
        }
        assert_eq!(find_disk(&dir, "rootfs0").unwrap(), Path::new("/dev/vdb"));
        assert!(matches!(
            find_disk(&dir, "nope"),
            Err(StorageError::NoDisk(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
