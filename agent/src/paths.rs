//! Paths inside a container's root filesystem: lexical checks on what a
//! request names, and symlink resolution that stays inside the root.
//!
//! An absolute symlink target is taken from the container's root, as the
//! container sees it. A `..` that climbs above the root is where runc clamps
//! silently; husk refuses such a mount destination instead, with an error
//! naming it: it is either a mistake or an attack, and the caller should
//! hear about it.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Symlinks followed at most while resolving one path (as the kernel's 40).
const MAX_LINKS: usize = 40;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(PathBuf),
    #[error("{0:?} has a `..` component")]
    DotDot(PathBuf),
    #[error("{0:?} resolves outside the container's root (through a symlink)")]
    Escapes(PathBuf),
    #[error("{0:?} has too many levels of symlinks")]
    Loop(PathBuf),
    #[error("reading {0:?}: {1}")]
    Io(PathBuf, String),
}

/// An absolute path without `..` (what a request may name).
pub fn check_clean_absolute(p: &Path) -> Result<(), PathError> {
    if !p.is_absolute() {
        return Err(PathError::NotAbsolute(p.to_path_buf()));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(PathError::DotDot(p.to_path_buf()));
    }
    Ok(())
}

/// Resolves `path` (as seen inside the container) to a host path under
/// `root`, following symlinks as the container would see them. A missing
/// tail is fine (it will be created); a symlink leading out of the root is
/// an error.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, PathError> {
    check_clean_absolute(path)?;
    // Components still to walk, last first.
    let mut todo: Vec<PathBuf> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            _ => None,
        })
        .rev()
        .collect();
    let mut done = PathBuf::new(); // relative to root
    let mut links = 0;
    while let Some(next) = todo.pop() {
        if next.as_os_str() == ".." {
            if !done.pop() {
                return Err(PathError::Escapes(path.to_path_buf()));
            }
            continue;
        }
        let candidate = done.join(&next);
        let host = root.join(&candidate);
        match fs::symlink_metadata(&host) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(PathError::Loop(path.to_path_buf()));
                }
                let target =
                    fs::read_link(&host).map_err(|e| PathError::Io(host.clone(), e.to_string()))?;
                if target.is_absolute() {
                    // Absolute inside the container means from its root.
                    done = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push(PathBuf::from(n)),
                        Component::ParentDir => todo.push(PathBuf::from("..")),
                        _ => {}
                    }
                }
            }
            Ok(_) => done = candidate,
            Err(e) if e.kind() == io::ErrorKind::NotFound => done = candidate,
            Err(e) => return Err(PathError::Io(host, e.to_string())),
        }
    }
    Ok(root.join(done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-paths-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("etc")).unwrap();
        d
    }

    #[test]
    fn lexical_checks() {
        assert_eq!(
            check_clean_absolute(Path::new("a/b")),
            Err(PathError::NotAbsolute("a/b".into()))
        );
        assert_eq!(
            check_clean_absolute(Path::new("/a/../../etc")),
            Err(PathError::DotDot("/a/../../etc".into()))
        );
        assert!(check_clean_absolute(Path::new("/a/./b")).is_ok());
    }

    #[test]
    fn relative_symlinks_stay_inside() {
        let r = tmp("rel");
        symlink("etc", r.join("conf")).unwrap();
        assert_eq!(
            resolve_in_root(&r, Path::new("/conf/x")).unwrap(),
            r.join("etc/x")
        );
        assert_eq!(
            resolve_in_root(&r, Path::new("/new/dir")).unwrap(),
            r.join("new/dir")
        );
        fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn symlinks_climbing_out_are_refused() {
        let r = tmp("esc");
        symlink("/etc", r.join("abs")).unwrap();
        symlink("../../..", r.join("etc/up")).unwrap();
        symlink("loop", r.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(&r, Path::new("/abs/passwd")).unwrap(),
            r.join("etc/passwd"),
            "absolute targets start at the container's root"
        );
        assert_eq!(
            resolve_in_root(&r, Path::new("/etc/up/x")),
            Err(PathError::Escapes("/etc/up/x".into()))
        );
        assert_eq!(
            resolve_in_root(&r, Path::new("/loop")),
            Err(PathError::Loop("/loop".into()))
        );
        fs::remove_dir_all(&r).unwrap();
    }
}
