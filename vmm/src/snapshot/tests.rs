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
fn restore_fds_must_be_distinct_open_regular_files() {
    use std::os::fd::IntoRawFd;
    let e = |r: Result<SnapshotSource, SnapshotError>| r.err().unwrap().to_string();
    assert!(e(SnapshotSource::from_fds(1, 2)).contains("stdin, stdout or stderr"));
    let dir = std::env::temp_dir().join(format!("husk-snapfds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let file = |n: &str| {
        std::fs::write(dir.join(n), n).unwrap();
        File::open(dir.join(n)).unwrap().into_raw_fd()
    };
    let (s, m) = (file("state"), file("memory"));
    assert!(e(SnapshotSource::from_fds(s, s)).contains("the same"));
    // A folder is not a snapshot file.
    let d = File::open(&dir).unwrap().into_raw_fd();
    assert!(e(SnapshotSource::from_fds(s, d)).contains("not a regular file"));
    // SAFETY (test): d was opened above and is closed once, here.
    drop(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(d) });
    // A closed fd.
    assert!(e(SnapshotSource::from_fds(s, 1_000_000)).contains("not open"));
    let src = SnapshotSource::from_fds(s, m).unwrap();
    assert_eq!(src.state_name, PathBuf::from(format!("fd {s} (state)")));
    let mut text = String::new();
    use std::io::Read;
    (&src.memory).read_to_string(&mut text).unwrap();
    assert_eq!(text, "memory");
    // A state file that is no snapshot: a clear error naming the fd.
    let err = SnapshotState::read_from(&src).err().unwrap().to_string();
    assert!(err.contains(&format!("fd {s} (state)")), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
