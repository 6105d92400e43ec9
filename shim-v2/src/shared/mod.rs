//! A sandbox's shared folder: what its virtiofsd serves the guest, and
//! the host mounts in it (each container's root file system and volumes).
//!
//! Three folders of the sandbox's state folder (Kata's layout):
//! - `mounts/`, host-only (0700, under the 0700 state folder): a mount point
//!   of its own with shared propagation. The shim makes each container's
//!   folder in it, `mounts/<id>/rootfs` (a bind of `<bundle>/rootfs`, the
//!   snapshot containerd's mounts make) and `mounts/<id>/volumes/<n>` (a
//!   bind of the spec's n-th bind-mount source).
//! - `shared/`, what virtiofsd serves: a read-only bind of `mounts/` that
//!   is its slave, so every mount made in `mounts/` appears in it (and, as
//!   virtiofsd's namespace is a slave too, in virtiofsd's view). Read-only,
//!   the guest cannot create, rename or replace anything in the folders the
//!   shim makes (so no symlink of the guest's is ever on a path the shim
//!   mounts on); only inside the rootfs and read-write volumes, which are
//!   mounts of their own, can it write.
//! - `staging/`, host-only and private: where a bind is made and given its
//!   flags (read-only, nosuid, nodev) before it is moved into `mounts/`. A
//!   remount does not propagate; a moved mount propagates as it is, so the
//!   copies the guest reaches are read-only when the spec says so, whatever
//!   the guest asks.
//!
//! Nothing is ever removed recursively while something may be mounted in
//! it: folders go with rmdir, after every mount under them is gone.

pub mod mountinfo;

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use husk_protocols::guest::{SHARED_ROOTFS, SHARED_VOLUMES};
use rustix::mount::{MountFlags, MountPropagationFlags};

use crate::spec::SharedVolume;

/// The host-only folder the shim mounts in.
pub const MOUNTS_DIR: &str = "mounts";
/// What virtiofsd serves: a read-only slave bind of [`MOUNTS_DIR`].
pub const SHARED_DIR: &str = "shared";
/// Where binds get their flags before they move into [`MOUNTS_DIR`].
pub const STAGING_DIR: &str = "staging";
/// The name of the bind being prepared in [`STAGING_DIR`].
const STAGED: &str = "next";

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("shared folder: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("shared folder: {path} still has mounts after unmounting: {left:?}")]
    Busy { path: PathBuf, left: Vec<PathBuf> },
    #[error("shared folder: container {0:?} already has a folder")]
    Exists(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SharedError + 'a {
    move |source| SharedError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn errno<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustix::io::Errno) -> SharedError + 'a {
    move |e| io_err(what, path)(e.into())
}

/// A sandbox's shared folder (see the module's comment).
#[derive(Debug, Clone)]
pub struct SharedFolder {
    mounts: PathBuf,
    shared: PathBuf,
    staging: PathBuf,
}

fn mkdir(path: &Path, mode: u32) -> Result<(), SharedError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(io_err("creating", path))
}

impl SharedFolder {
    /// The shared folder of the sandbox whose state folder is `state` (an
    /// absolute path); nothing is made.
    pub fn at(state: &Path) -> SharedFolder {
        SharedFolder {
            mounts: state.join(MOUNTS_DIR),
            shared: state.join(SHARED_DIR),
            staging: state.join(STAGING_DIR),
        }
    }

    /// Makes the three folders and their mounts in `state`; on failure,
    /// takes back what it did.
    pub fn create(state: &Path) -> Result<SharedFolder, SharedError> {
        let f = SharedFolder::at(state);
        let made = f.make();
        if made.is_err() {
            if let Err(e) = f.remove() {
                log::warn!("{e}");
            }
        }
        made.map(|()| f)
    }

    fn make(&self) -> Result<(), SharedError> {
        let (mounts, shared, staging) = (&self.mounts, &self.shared, &self.staging);
        for d in [mounts, shared, staging] {
            mkdir(d, 0o700)?;
        }
        // Each a mount of its own, in a peer group of its own.
        for d in [mounts, staging] {
            rustix::mount::mount_bind(d, d).map_err(errno("binding", d))?;
            rustix::mount::mount_change(d, MountPropagationFlags::PRIVATE)
                .map_err(errno("making private", d))?;
        }
        rustix::mount::mount_change(mounts, MountPropagationFlags::SHARED)
            .map_err(errno("making shared", mounts))?;
        rustix::mount::mount_bind(mounts, shared).map_err(errno("binding", shared))?;
        rustix::mount::mount_change(shared, MountPropagationFlags::DOWNSTREAM)
            .map_err(errno("making a slave", shared))?;
        rustix::mount::mount_remount(
            shared,
            MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
            c"",
        )
        .map_err(errno("making read-only", shared))
    }

    /// The folder virtiofsd serves.
    pub fn shared(&self) -> &Path {
        &self.shared
    }

    /// Container `id`'s folder in `mounts/`.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.mounts.join(id)
    }

    /// Makes container `id`'s folder: its root file system (a bind of
    /// `rootfs`, if given) and its volumes. On failure, takes back what it
    /// did. `id` must be checked (`spec::check_id`).
    pub fn add_container(
        &self,
        id: &str,
        rootfs: Option<&Path>,
        volumes: &[SharedVolume],
    ) -> Result<(), SharedError> {
        let dir = self.container_dir(id);
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            _ => return Err(SharedError::Exists(id.to_string())),
        }
        let made = self.make_container(&dir, rootfs, volumes);
        if made.is_err() {
            if let Err(e) = self.remove_container(id) {
                log::warn!("{e}");
            }
        }
        made
    }

    fn make_container(
        &self,
        dir: &Path,
        rootfs: Option<&Path>,
        volumes: &[SharedVolume],
    ) -> Result<(), SharedError> {
        // 0755: the guest's non-root users traverse these (they are
        // read-only to the guest, and under 0700 folders on the host).
        mkdir(dir, 0o755)?;
        if let Some(source) = rootfs {
            self.bind(source, &dir.join(SHARED_ROOTFS), true, false)?;
        }
        if !volumes.is_empty() {
            let vdir = dir.join(SHARED_VOLUMES);
            mkdir(&vdir, 0o755)?;
            for v in volumes {
                self.bind(&v.host, &vdir.join(v.index.to_string()), v.dir, v.read_only)?;
            }
        }
        Ok(())
    }

    /// Binds `source` (recursively) on a new folder or file `target`, via
    /// the staging folder: read-only (every mount of the tree) if asked,
    /// always nosuid and nodev for the host.
    fn bind(
        &self,
        source: &Path,
        target: &Path,
        dir: bool,
        read_only: bool,
    ) -> Result<(), SharedError> {
        let staged = self.staging.join(STAGED);
        let make_point = |p: &Path| {
            if dir {
                mkdir(p, 0o755)
            } else {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(p)
                    .map(drop)
                    .map_err(io_err("creating", p))
            }
        };
        make_point(&staged)?;
        make_point(target)?;
        let flags =
            |extra: MountFlags| MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV | extra;
        let ro = if read_only {
            MountFlags::RDONLY
        } else {
            MountFlags::empty()
        };
        let staged_bind = (|| {
            rustix::mount::mount_bind_recursive(source, &staged)
                .map_err(errno("binding", source))?;
            rustix::mount::mount_remount(&staged, flags(ro), c"")
                .map_err(errno("setting the flags of", source))?;
            if read_only {
                // The tree's other mounts too: a remount is per mount.
                for m in mountinfo::mounts_under(&staged).map_err(io_err("reading", &staged))? {
                    if m != staged {
                        rustix::mount::mount_remount(&m, flags(ro), c"")
                            .map_err(errno("making read-only", &m))?;
                    }
                }
            }
            rustix::mount::mount_move(&staged, target).map_err(errno("moving a bind to", target))
        })();
        if staged_bind.is_err() {
            let _ = mountinfo::unmount_under(&staged);
        }
        let _ = remove_point(&staged);
        staged_bind
    }

    /// Unmounts everything in container `id`'s folder and removes it
    /// (rmdir and unlink only: if a mount stayed, its files stay too).
    pub fn remove_container(&self, id: &str) -> Result<(), SharedError> {
        let dir = self.container_dir(id);
        if fs::symlink_metadata(&dir).is_err() {
            return Ok(());
        }
        unmount_all(&dir)?;
        let vdir = dir.join(SHARED_VOLUMES);
        if let Ok(entries) = fs::read_dir(&vdir) {
            for e in entries.flatten() {
                remove_point(&e.path())?;
            }
        }
        for p in [vdir, dir.join(SHARED_ROOTFS), dir.clone()] {
            remove_point(&p)?;
        }
        Ok(())
    }

    /// Unmounts everything in the three folders and removes them.
    pub fn remove(&self) -> Result<(), SharedError> {
        for d in [&self.shared, &self.mounts, &self.staging] {
            unmount_all(d)?;
        }
        if let Ok(entries) = fs::read_dir(&self.mounts) {
            for e in entries.flatten() {
                if let Some(id) = e.file_name().to_str() {
                    self.remove_container(id)?;
                }
            }
        }
        for d in [&self.shared, &self.mounts, &self.staging] {
            remove_point(d)?;
        }
        Ok(())
    }
}

/// Unmounts every mount at or under `dir`; an error names what stayed.
fn unmount_all(dir: &Path) -> Result<(), SharedError> {
    let left = mountinfo::unmount_under(dir).map_err(io_err("unmounting under", dir))?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(SharedError::Busy {
            path: dir.to_path_buf(),
            left,
        })
    }
}

/// Removes an empty folder or a file (a mount point); absent is fine.
fn remove_point(p: &Path) -> Result<(), SharedError> {
    let r = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(io_err("removing", p))
}

#[cfg(test)]
mod tests;
