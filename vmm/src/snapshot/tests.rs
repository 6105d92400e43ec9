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
