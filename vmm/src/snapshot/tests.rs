//! Tests of the snapshot's shape checks and state file.

use super::*;

fn shape() -> VmShape {
    VmShape {
        vcpus: 2,
        memory_mib: 256,
        devices: vec![
            DeviceId {
                kind: "virtio-blk".into(),
                id: "root".into(),
            },
            DeviceId {
                kind: "virtio-vsock".into(),
                id: "vsock".into(),
            },
        ],
        kernel_bytes: Some(1000),
    }
}

#[test]
fn the_same_shape_passes() {
    shape().check(&shape()).unwrap();
    // An unknown kernel size is not a difference.
    let mut s = shape();
    s.kernel_bytes = None;
    shape().check(&s).unwrap();
}

/// A change to a shape and what the refusal must say.
type Case = (fn(&mut VmShape), &'static str);

#[test]
fn another_shape_is_refused_naming_the_difference() {
    let cases: [Case; 5] = [
        (|s| s.vcpus = 1, "vCPUs: 2 in the snapshot, 1 in the config"),
        (
            |s| s.memory_mib = 512,
            "memory_mib: 256 in the snapshot, 512 in the config",
        ),
        (|s| s.devices.pop().map(drop).unwrap_or(()), "devices:"),
        (|s| s.devices.reverse(), "devices:"),
        (|s| s.kernel_bytes = Some(999), "kernel size"),
    ];
    for (change, want) in cases {
        let mut other = shape();
        change(&mut other);
        let e = shape().check(&other).unwrap_err().to_string();
        assert!(e.contains("the snapshot is of another VM"), "{e}");
        assert!(e.contains(want), "{e} lacks {want}");
    }
}

#[test]
fn folder_is_0700_and_must_be_new() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("husk-snapdir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    create_folder(&dir).unwrap();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let e = create_folder(&dir).unwrap_err().to_string();
    assert!(e.contains(&dir.display().to_string()), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_state_file_that_is_not_json_of_a_state_is_refused() {
    let dir = std::env::temp_dir().join(format!("husk-snapstate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    create_folder(&dir).unwrap();
    format::write_file(&dir.join(STATE_FILE), b"{\"shape\":1}").unwrap();
    let e = SnapshotState::read(&dir).err().unwrap().to_string();
    assert!(e.contains("cannot decode the snapshot state"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restore_fds_parse_two_numbers_and_nothing_else() {
    assert_eq!(parse_fds("3,4").unwrap(), (3, 4));
    assert_eq!(parse_fds(" 7 , 9 ").unwrap(), (7, 9));
    for bad in ["", "3", "3,", ",4", "3,4,5", "a,b", "3;4", "99999999999,4"] {
        let e = parse_fds(bad).unwrap_err().to_string();
        assert!(e.contains("STATE_FD,MEMORY_FD"), "{bad:?}: {e}");
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-src-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    dir
}

fn open_fd(path: &Path) -> RawFd {
    use std::os::unix::io::IntoRawFd;
    File::open(path).unwrap().into_raw_fd()
}

#[test]
fn restore_fds_must_be_open_distinct_regular_files() {
    let dir = scratch("fds");
    std::fs::write(dir.join("state"), b"s").unwrap();
    std::fs::write(dir.join("memory"), b"m").unwrap();

    // Good: two open regular files; the source owns them.
    let (s, m) = (open_fd(&dir.join("state")), open_fd(&dir.join("memory")));
    let src = SnapshotSource::fds(s, m).unwrap();
    assert_eq!(src.state.metadata().unwrap().len(), 1);
    assert!(src
        .state_name
        .to_string_lossy()
        .contains(&format!("fd {s}")));
    drop(src);
    // Both were closed with the source.
    // SAFETY: a flag query on a number this test owned and closed.
    assert!(unsafe { libc::fcntl(s, libc::F_GETFD) } < 0);

    // The same number twice.
    let s = open_fd(&dir.join("state"));
    let e = SnapshotSource::fds(s, s).unwrap_err().to_string();
    assert!(e.contains("same file"), "{e}");
    // Two descriptors of one file.
    let s2 = open_fd(&dir.join("state"));
    let e = SnapshotSource::fds(s, s2).unwrap_err().to_string();
    assert!(e.contains("same file"), "{e}");

    // A closed number, and the standard streams.
    let m = open_fd(&dir.join("memory"));
    let closed = 1_000_000;
    let e = SnapshotSource::fds(m, closed).unwrap_err().to_string();
    assert!(e.contains("1000000 is not open"), "{e}");
    let e = SnapshotSource::fds(1, 2).unwrap_err().to_string();
    assert!(e.contains("standard streams"), "{e}");

    // A directory is not a snapshot file.
    use std::os::unix::io::IntoRawFd;
    let d = File::open(&dir).unwrap().into_raw_fd();
    let m = open_fd(&dir.join("memory"));
    let e = SnapshotSource::fds(d, m).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");

    // A folder: opens both, names the paths.
    let src = SnapshotSource::folder(&dir).unwrap();
    assert_eq!(src.memory_name, dir.join(MEMORY_FILE));
    std::fs::remove_file(dir.join("memory")).unwrap();
    let e = SnapshotSource::folder(&dir).unwrap_err().to_string();
    assert!(e.contains("memory"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
