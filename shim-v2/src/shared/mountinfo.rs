//! The shim's mount table (`/proc/self/mountinfo`): which mounts lie under
//! a folder, and unmounting all of them, so that a folder is removed only
//! once nothing of the host (a volume, a snapshot) is mounted in it.

use std::io;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::UnmountFlags;

/// Rounds of unmounting before giving up (stacked and propagated mounts
/// may need more than one).
const ROUNDS: usize = 8;

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`,
/// `\134`).
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| {
            b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        if let Some(d) = octal {
            out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mount points of a mountinfo text, in its order (a stacked mount
/// point appears once per mount).
pub fn mount_points(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .collect()
}

/// The mounts at or under `dir` in a mountinfo text, deepest first.
pub fn under(text: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mount_points(text)
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    // Later mounts first among equals: reversing keeps a stack's top first.
    found.reverse();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

fn read() -> io::Result<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
}

/// The mounts at or under `dir` (an absolute path without symlinks) now.
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(under(&read()?, dir))
}

/// Unmounts (lazily, never following a symlink) every mount at or under
/// `dir`, deepest first, until none is left; the ones that stay, if any.
pub fn unmount_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    for _ in 0..ROUNDS {
        let found = mounts_under(dir)?;
        if found.is_empty() {
            return Ok(found);
        }
        for p in &found {
            match rustix::mount::unmount(p, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
                Ok(()) | Err(Errno::INVAL | Errno::NOENT) => {}
                Err(e) => log::warn!("unmounting {}: {e}", p.display()),
            }
        }
    }
    mounts_under(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /run rw shared:5 - tmpfs tmpfs rw
40 30 0:25 /husk/sb/mounts /run/husk/sb/mounts rw shared:9 - tmpfs tmpfs rw
41 30 0:25 /husk/sb/mounts /run/husk/sb/shared ro master:9 - tmpfs tmpfs rw
42 40 8:1 /data /run/husk/sb/mounts/c1/volumes/0 rw shared:10 - ext4 /dev/sda1 rw
43 42 0:40 / /run/husk/sb/mounts/c1/volumes/0 ro - tmpfs t rw
44 40 8:1 /my\\040dir /run/husk/sb/mounts/c\\0402/volumes/0 rw - ext4 /dev/sda1 rw
45 30 0:25 / /run/husk/sb2 rw - tmpfs tmpfs rw
";

    #[test]
    fn mounts_under_a_folder_deepest_first() {
        let got = under(TEXT, Path::new("/run/husk/sb"));
        // Deepest first; among equals, the latest mount first.
        let want: Vec<PathBuf> = [
            "/run/husk/sb/mounts/c 2/volumes/0",
            "/run/husk/sb/mounts/c1/volumes/0",
            "/run/husk/sb/mounts/c1/volumes/0",
            "/run/husk/sb/shared",
            "/run/husk/sb/mounts",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(got, want);
        // A sibling whose name starts the same is not under it.
        assert!(under(TEXT, Path::new("/run/husk/sb2"))
            .iter()
            .all(|p| p == Path::new("/run/husk/sb2")));
        assert!(under(TEXT, Path::new("/nowhere")).is_empty());
    }

    #[test]
    fn escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), Path::new("/a b\tc\\d"));
        // Not an escape: left as it is.
        assert_eq!(unescape("/a\\9b\\"), Path::new("/a\\9b\\"));
    }

    #[test]
    fn unmounting_nothing_is_fine() {
        assert!(unmount_under(Path::new("/nonexistent/husk/x"))
            .unwrap()
            .is_empty());
    }
}
