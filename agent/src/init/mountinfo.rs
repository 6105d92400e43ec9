//! The container's view of /proc/self/mountinfo, for what rootfs set-up
//! must know about mounts it did not make: which mount holds a path, and
//! whether it is shared.

use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

/// One line of mountinfo: where the mount is and whether it is in a
/// shared peer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub shared: bool,
}

/// Undoes mountinfo's octal escapes (`\040` for a blank, `\134` for `\`).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\')
            .then(|| b.get(i + 1..i + 4))
            .flatten()
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                let v = d.iter().fold(0u16, |v, c| v * 8 + u16::from(c - b'0'));
                u8::try_from(v).ok()
            });
        if let Some(v) = octal {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mounts of a mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let mount_point = unescape(fields.nth(4)?);
            // After the mount options: optional fields up to "-".
            let shared = fields
                .skip(1)
                .take_while(|f| *f != "-")
                .any(|f| f.starts_with("shared:"));
            Some(Mount {
                mount_point,
                shared,
            })
        })
        .collect()
}

/// The mount that holds `path` (absolute, without `..`): the last one
/// mounted on the longest mount point that is an ancestor of `path`.
pub fn holding<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    if path.components().any(|c| c == Component::ParentDir) {
        return None;
    }
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.components().count(), *i))
        .map(|(_, m)| m)
}

/// The mount holding `path` in this mount namespace.
pub fn mount_holding(path: &Path) -> io::Result<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    holding(&parse(&text), path).cloned().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no mount holds {}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 0:21 / / rw,relatime shared:1 - tmpfs tmpfs rw
30 22 0:25 / /run rw,nosuid master:3 - tmpfs tmpfs rw
31 30 0:26 / /run/husk rw shared:7 master:3 - tmpfs tmpfs rw
32 31 0:27 / /run/husk/a\\040b rw - ext4 /dev/vda rw
33 30 0:28 / /run rw - tmpfs tmpfs rw
garbage
";

    #[test]
    fn parses_points_and_shared_peer_groups() {
        let m = parse(INFO);
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[0],
            Mount {
                mount_point: "/".into(),
                shared: true
            }
        );
        assert!(!m[1].shared, "master: alone is a slave, not shared");
        assert!(m[2].shared);
        assert_eq!(m[3].mount_point, PathBuf::from("/run/husk/a b"));
        assert!(!m[3].shared);
    }

    #[test]
    fn finds_the_holding_mount() {
        let m = parse(INFO);
        let at = |p: &str| holding(&m, Path::new(p)).map(|m| m.mount_point.clone());
        assert_eq!(at("/run/husk/c/rootfs"), Some("/run/husk".into()));
        assert_eq!(at("/run/husk/a b/rootfs"), Some("/run/husk/a b".into()));
        // Path components, not string prefixes.
        assert_eq!(at("/run/huskx"), Some("/run".into()));
        // The later of two mounts on one point is the visible one.
        assert!(!holding(&m, Path::new("/run/x")).unwrap().shared);
        assert_eq!(at("/etc"), Some("/".into()));
        assert_eq!(at("/run/husk/../etc"), None);
    }

    #[test]
    fn unescapes_only_octal_triples() {
        assert_eq!(unescape("a\\040b"), PathBuf::from("a b"));
        assert_eq!(unescape("a\\\\x"), PathBuf::from("a\\\\x"));
        assert_eq!(unescape("end\\04"), PathBuf::from("end\\04"));
    }
}
