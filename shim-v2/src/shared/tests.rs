//! Real mounts (the shim runs as root; skipped otherwise): the layout,
//! propagation into the served folder, read-only volumes that stay
//! read-only whatever is asked of the served copy, and cleanup that never
//! deletes through a mount.

use super::*;
use std::os::unix::fs::symlink;

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Option<Scratch> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return None;
        }
        let top = std::env::temp_dir().join(format!("husk-shared-{tag}-{}", std::process::id()));
        let top = Scratch(top);
        let _ = mountinfo::unmount_under(&top.0);
        let _ = fs::remove_dir_all(&top.0);
        fs::create_dir_all(top.0.join("state")).unwrap();
        fs::create_dir_all(top.0.join("host/vol")).unwrap();
        fs::create_dir_all(top.0.join("host/ro")).unwrap();
        fs::create_dir_all(top.0.join("host/rootfs/bin")).unwrap();
        fs::write(top.0.join("host/vol/a"), b"from the host").unwrap();
        fs::write(top.0.join("host/ro/keep"), b"read-only").unwrap();
        fs::write(top.0.join("host/hosts"), b"127.0.0.1 localhost\n").unwrap();
        fs::write(top.0.join("host/rootfs/bin/sh"), b"#!").unwrap();
        Some(top)
    }
    fn state(&self) -> PathBuf {
        fs::canonicalize(self.0.join("state")).unwrap()
    }
    fn host(&self, p: &str) -> PathBuf {
        self.0.join("host").join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = mountinfo::unmount_under(&self.0);
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn volume(index: usize, host: PathBuf, dir: bool, read_only: bool) -> SharedVolume {
    SharedVolume {
        index,
        host,
        dir,
        read_only,
    }
}

#[test]
fn containers_appear_in_the_served_folder_and_go_cleanly() {
    let Some(t) = Scratch::new("layout") else {
        return;
    };
    let state = t.state();
    let f = SharedFolder::create(&state).unwrap();
    let vols = [
        volume(0, t.host("vol"), true, false),
        volume(1, t.host("ro"), true, true),
        volume(2, t.host("hosts"), false, true),
    ];
    f.add_container("c1", Some(&t.host("rootfs")), &vols)
        .unwrap();
    let served = f.shared().join("c1");
    // Mounted in mounts/ after shared/ was made: propagated.
    assert_eq!(
        fs::read(served.join("volumes/0/a")).unwrap(),
        b"from the host"
    );
    assert!(served.join("rootfs/bin/sh").is_file());
    assert_eq!(
        fs::read(served.join("volumes/2")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    // Live both ways: a write through the served copy is on the host.
    fs::write(served.join("volumes/0/b"), b"from the guest").unwrap();
    assert_eq!(fs::read(t.host("vol/b")).unwrap(), b"from the guest");
    fs::write(t.host("vol/c"), b"later").unwrap();
    assert_eq!(fs::read(served.join("volumes/0/c")).unwrap(), b"later");
    // Read-only where asked, in the served copy too (a remount would not
    // have propagated), and the shim's own folders are read-only there.
    let rofs = |r: io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EROFS);
    assert!(rofs(fs::write(served.join("volumes/1/x"), b"x")));
    assert!(rofs(fs::write(served.join("volumes/2"), b"x")));
    assert!(rofs(fs::create_dir(served.join("volumes/9"))));
    assert!(rofs(symlink("/etc", served.join("volumes/8"))));
    assert!(rofs(fs::create_dir(f.shared().join("c2"))));
    // A second folder for the same id is refused.
    assert!(matches!(
        f.add_container("c1", None, &[]),
        Err(SharedError::Exists(_))
    ));

    f.remove_container("c1").unwrap();
    assert!(!state.join("mounts/c1").exists());
    assert!(!served.exists());
    assert_eq!(fs::read(t.host("vol/a")).unwrap(), b"from the host");
    assert_eq!(fs::read(t.host("ro/keep")).unwrap(), b"read-only");
    assert!(t.host("rootfs/bin/sh").exists());
    f.remove().unwrap();
    assert!(mountinfo::mounts_under(&state).unwrap().is_empty());
    assert_eq!(fs::read_dir(&state).unwrap().count(), 0);
}

/// A sandbox that ends with its containers' binds still there: every mount
/// goes, the host's files stay.
#[test]
fn removing_the_folder_unmounts_before_it_deletes() {
    let Some(t) = Scratch::new("remove") else {
        return;
    };
    let state = t.state();
    let f = SharedFolder::create(&state).unwrap();
    f.add_container(
        "c1",
        Some(&t.host("rootfs")),
        &[volume(0, t.host("vol"), true, false)],
    )
    .unwrap();
    f.add_container("c2", None, &[volume(0, t.host("vol"), true, true)])
        .unwrap();
    f.remove().unwrap();
    assert!(mountinfo::mounts_under(&state).unwrap().is_empty());
    assert_eq!(fs::read_dir(&state).unwrap().count(), 0);
    assert_eq!(fs::read(t.host("vol/a")).unwrap(), b"from the host");
    assert!(t.host("rootfs/bin/sh").exists());
}

/// A source that cannot be bound: the error names it, and nothing of the
/// container stays (the volume bound before it neither).
#[test]
fn a_failed_bind_takes_back_the_container() {
    let Some(t) = Scratch::new("fail") else {
        return;
    };
    let state = t.state();
    let f = SharedFolder::create(&state).unwrap();
    let e = f
        .add_container(
            "c1",
            None,
            &[
                volume(0, t.host("vol"), true, false),
                volume(1, t.host("missing"), true, false),
            ],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing"), "{e}");
    assert!(!state.join("mounts/c1").exists());
    let left = mountinfo::mounts_under(&state).unwrap();
    assert_eq!(left.len(), 3, "only the folder's own mounts: {left:?}");
    f.remove().unwrap();
    assert!(mountinfo::mounts_under(&state).unwrap().is_empty());
}
