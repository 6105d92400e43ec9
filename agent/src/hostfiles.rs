//! CopyFile's folder: files the shim copies in from the host (a container's
//! /etc/hosts, resolv.conf, bind-mounted files and trees), all under one
//! root (`HOST_FILES_DIR` in the guest, a scratch folder in host tests).
//!
//! Containers bind these files, so a container may have planted a symlink
//! in the folder. Every step therefore resolves with openat2 and
//! RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS from the root's fd: a symlink
//! (absolute, `../..`, a chain) resolves as if the root were `/`, and a
//! /proc magic link is refused, so no write lands outside the root.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use husk_protocols::guest::HOST_FILES_DIR;
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

#[derive(Debug, thiserror::Error)]
pub enum HostFilesError {
    #[error("{0:?} is not under {HOST_FILES_DIR}")]
    NotUnder(PathBuf),
    #[error("{0:?} names no file (or has a `.` or `..` component)")]
    BadName(PathBuf),
    #[error("{0:?} is not a regular file")]
    NotAFile(PathBuf),
    #[error("{what} {path:?}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One CopyFile chunk, checked by the caller (sizes, mode bits).
pub struct Chunk<'a> {
    pub offset: u64,
    pub data: &'a [u8],
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The folder CopyFile writes into.
#[derive(Debug, Clone)]
pub struct HostFiles {
    root: PathBuf,
}

fn resolve() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

impl HostFiles {
    pub fn new(root: impl Into<PathBuf>) -> HostFiles {
        HostFiles { root: root.into() }
    }

    /// The path under the root of a request's guest path (which must be
    /// `HOST_FILES_DIR/...`, plain names only).
    fn relative(guest: &Path) -> Result<PathBuf, HostFilesError> {
        let rel = guest
            .strip_prefix(HOST_FILES_DIR)
            .map_err(|_| HostFilesError::NotUnder(guest.to_path_buf()))?;
        let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain || rel.as_os_str().is_empty() {
            return Err(HostFilesError::BadName(guest.to_path_buf()));
        }
        Ok(rel.to_path_buf())
    }

    /// Writes one chunk of `guest` (created, truncated and given its mode
    /// and owner at offset 0), creating missing folders, all inside the root.
    pub fn write(&self, guest: &Path, chunk: &Chunk<'_>) -> Result<(), HostFilesError> {
        let rel = Self::relative(guest)?;
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |e: rustix::io::Errno| HostFilesError::Io {
                what,
                path,
                source: e.into(),
            }
        };
        std::fs::create_dir_all(&self.root).map_err(|source| HostFilesError::Io {
            what: "creating",
            path: self.root.clone(),
            source,
        })?;
        let root = rustix::fs::open(
            &self.root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io("opening", &self.root))?;
        // Each folder on the way: made in the folder resolved so far (a name
        // that exists, symlink included, is left alone), then opened by its
        // whole path from the root, so a symlink resolves inside it.
        let mut walked = PathBuf::new();
        let mut dir: OwnedFd = root.try_clone().map_err(|e| HostFilesError::Io {
            what: "opening",
            path: self.root.clone(),
            source: e,
        })?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        for name in parent.components() {
            walked.push(name);
            match rustix::fs::mkdirat(&dir, name.as_os_str(), Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io("creating", &walked)(e)),
            }
            dir = rustix::fs::openat2(
                &root,
                &walked,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                resolve(),
            )
            .map_err(io("opening", &walked))?;
        }
        let mut flags = OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NONBLOCK;
        if chunk.offset == 0 {
            flags |= OFlags::TRUNC;
        }
        // NONBLOCK: a FIFO planted at the name must not hang the call; the
        // type is checked right after.
        let f = rustix::fs::openat2(
            &root,
            &rel,
            flags,
            Mode::from_raw_mode(chunk.mode),
            resolve(),
        )
        .map_err(io("opening", &rel))?;
        let st = rustix::fs::fstat(&f).map_err(io("stat", &rel))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(HostFilesError::NotAFile(guest.to_path_buf()));
        }
        if chunk.offset == 0 {
            // On the fd: the path may have changed since it was opened.
            rustix::fs::fchmod(&f, Mode::from_raw_mode(chunk.mode)).map_err(io("chmod", &rel))?;
            rustix::fs::fchown(&f, crate::sys::uid(chunk.uid), crate::sys::gid(chunk.gid))
                .map_err(io("chown", &rel))?;
        }
        let mut done = 0;
        while done < chunk.data.len() {
            let at = chunk.offset + done as u64;
            match rustix::io::pwrite(f.as_fd(), &chunk.data[done..], at) {
                Ok(0) => return Err(io("writing", &rel)(rustix::io::Errno::IO)),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(io("writing", &rel)(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn chunk(data: &[u8]) -> Chunk<'_> {
        Chunk {
            offset: 0,
            data,
            mode: 0o644,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
        }
    }

    fn guest(rel: &str) -> PathBuf {
        Path::new(HOST_FILES_DIR).join(rel)
    }

    /// A temp folder holding `root` (CopyFile's root) and `outside`, a
    /// folder next to it that a write must never reach.
    struct Scratch {
        top: PathBuf,
    }

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let top =
                std::env::temp_dir().join(format!("husk-hostfiles-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&top);
            std::fs::create_dir_all(top.join("root")).unwrap();
            std::fs::create_dir_all(top.join("outside")).unwrap();
            Scratch { top }
        }
        fn root(&self) -> PathBuf {
            self.top.join("root")
        }
        fn outside(&self) -> PathBuf {
            self.top.join("outside")
        }
        fn outside_is_empty(&self) -> bool {
            std::fs::read_dir(self.outside()).unwrap().next().is_none()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.top);
        }
    }

    #[test]
    fn writes_files_and_folders_under_the_root() {
        let s = Scratch::new("plain");
        let h = HostFiles::new(s.root());
        h.write(&guest("a/b/c"), &chunk(b"hello")).unwrap();
        let mut c = chunk(b" world");
        c.offset = 5;
        h.write(&guest("a/b/c"), &c).unwrap();
        assert_eq!(
            std::fs::read(s.root().join("a/b/c")).unwrap(),
            b"hello world"
        );
    }

    #[test]
    fn refuses_paths_not_under_the_folder() {
        let s = Scratch::new("names");
        let h = HostFiles::new(s.root());
        for bad in [
            "/etc/passwd",
            "/run/husk/hostile",
            HOST_FILES_DIR,
            "/run/husk/host/../x",
            "/run/husk/host/a/../../x",
            "relative",
        ] {
            assert!(h.write(Path::new(bad), &chunk(b"x")).is_err(), "{bad}");
        }
        assert!(s.outside_is_empty());
    }

    /// Symlinks planted in the folder (absolute, `../..`, a chain, in a
    /// folder on the way or at the file itself) resolve inside the root.
    #[test]
    fn symlinks_do_not_lead_out() {
        let s = Scratch::new("links");
        let root = s.root();
        let out = s.outside();
        // The file itself: absolute, relative climbing, and a chain.
        symlink(out.join("abs"), root.join("abs")).unwrap();
        symlink("../outside/rel", root.join("rel")).unwrap();
        symlink("../../../../../../..", root.join("up")).unwrap();
        symlink("hop2", root.join("chain")).unwrap();
        symlink("hop3", root.join("hop2")).unwrap();
        symlink(out.join("chained"), root.join("hop3")).unwrap();
        // A folder on the way.
        symlink(&out, root.join("dirlink")).unwrap();
        symlink("../outside", root.join("reldir")).unwrap();
        // A magic link.
        symlink("/proc/self/cwd", root.join("magic")).unwrap();

        // Where those links lead once taken from the root: present, so
        // that the writes inside succeed and can be checked.
        let inside = root.join(out.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(root.join("outside")).unwrap();

        let h = HostFiles::new(&root);
        for name in [
            "abs",
            "rel",
            "chain",
            "dirlink/f",
            "reldir/f",
            "up/f",
            "dirlink/new/deeper/f",
        ] {
            // Either written inside the root or refused; never outside.
            let _ = h.write(&guest(name), &chunk(b"x"));
            assert!(s.outside_is_empty(), "{name} wrote outside the root");
        }
        // An absolute link's target is taken from the root.
        assert_eq!(std::fs::read(inside.join("abs")).unwrap(), b"x");
        assert_eq!(std::fs::read(inside.join("chained")).unwrap(), b"x");
        assert_eq!(std::fs::read(inside.join("f")).unwrap(), b"x");
        assert!(inside.join("new/deeper/f").is_file());
        // `../outside` clamps at the root: root/outside.
        assert_eq!(std::fs::read(root.join("outside/rel")).unwrap(), b"x");
        assert_eq!(std::fs::read(root.join("outside/f")).unwrap(), b"x");
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"x");
        // /proc/self/cwd is a magic link: refused.
        assert!(h.write(&guest("magic/f"), &chunk(b"x")).is_err());
        assert!(s.outside_is_empty());
    }

    #[test]
    fn a_fifo_is_refused_without_hanging() {
        let s = Scratch::new("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            s.root().join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // Opening a FIFO for writing with no reader fails (ENXIO) with
        // O_NONBLOCK rather than block.
        assert!(HostFiles::new(s.root())
            .write(&guest("fifo"), &chunk(b"x"))
            .is_err());
    }
}
