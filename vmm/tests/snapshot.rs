//! End-to-end tests of snapshots on the host's /dev/kvm with a hand-made
//! guest (tests/guests/counter.S): a counter kept both in a register and
//! in memory survives into a new husk-vmm process, which resumes the
//! guest; restores of another shape or of a damaged state file are refused.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use serde_json::{json, Value};
mod common;

use common::*;

/// Where counter.S keeps its count.
const COUNTER: u64 = 0x50000;

fn config(guest: &Path, serial: &Path, sock: &Path, memory_mib: u64) -> Value {
    json!({
        "vcpus": 1, "memory_mib": memory_mib,
        "kernel": {"path": guest, "cmdline": ""},
        "serial": {"output": "file", "path": serial},
        "control_socket": sock,
    })
}

fn console(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

fn counter_in(snapshot: &Path) -> u64 {
    let f = std::fs::File::open(snapshot.join("memory")).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, COUNTER).unwrap();
    u64::from_le_bytes(b)
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts a VMM in its own folder `name` under `dir`, from `restore` if given.
fn start(dir: &TempDir, name: &str, guest: &Path, mem: u64, restore: Option<&Path>) -> Child {
    let sub = TempDir(dir.path(name));
    std::fs::create_dir_all(&sub.0).unwrap();
    let cfg = config(guest, &sub.path("serial.log"), &sub.path("ctl.sock"), mem);
    let child = match restore {
        Some(r) => spawn_vmm_with_args(&sub, &cfg, &["--restore", r.to_str().unwrap()]),
        None => spawn_vmm(&sub, &cfg),
    };
    // The folder is the parent's to remove.
    std::mem::forget(sub);
    child
}

#[test]
fn a_counting_guest_continues_in_a_new_process() {
    let dir = TempDir::new("snapshot");
    let guest = build_guest(&dir, "counter");
    let a = start(&dir, "a", &guest, 64, None);
    let serial_a = dir.path("a/serial.log");
    wait_for("the guest's first tick", Duration::from_secs(60), || {
        console(&serial_a).starts_with("St")
    });
    let mut ctl = Control::connect(&dir.path("a/ctl.sock"));
    let snap = dir.path("snap");
    let r = ctl.send(json!({"op": "snapshot", "path": snap}));
    assert_eq!(r["ok"], json!(true), "{r}");
    assert_eq!(r["state"], json!("paused"), "{r}");
    assert_eq!(r["snapshot"]["memory_bytes"], json!(64 << 20), "{r}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&snap), 0o700);
    assert_eq!(mode(&snap.join("state")), 0o600);
    assert_eq!(mode(&snap.join("memory")), 0o600);
    let c1 = counter_in(&snap);
    assert!(c1 >= 0x10000, "counter {c1:#x} after a tick");
    // The same path again is refused; the VM stays as it was (paused).
    let r = ctl.send(json!({"op": "snapshot", "path": snap}));
    assert_eq!(r["ok"], json!(false), "{r}");
    assert!(r["error"].as_str().unwrap().contains("File exists"), "{r}");
    assert_eq!(ctl.status()["state"], json!("paused"));
    stop(a);

    // Restored: no new "S" (no boot), no "M" (register and memory agree),
    // new ticks, and a count that went on from where it was.
    let b = start(&dir, "b", &guest, 64, Some(&snap));
    let serial_b = dir.path("b/serial.log");
    wait_for(
        "a tick of the restored guest",
        Duration::from_secs(60),
        || console(&serial_b).contains("tt"),
    );
    let out = console(&serial_b);
    assert!(!out.contains('S') && !out.contains('M'), "console: {out}");
    let mut ctl_b = Control::connect(&dir.path("b/ctl.sock"));
    assert_eq!(ctl_b.status()["state"], json!("running"));
    let snap2 = dir.path("snap2");
    let r = ctl_b.send(json!({"op": "snapshot", "path": snap2, "resume": true}));
    assert_eq!(r["ok"], json!(true), "{r}");
    assert_eq!(r["state"], json!("running"), "{r}");
    let c2 = counter_in(&snap2);
    // Two ticks after c1: past the second multiple of 0x10000 above it.
    let two_ticks_on = ((c1 >> 16) + 2) << 16;
    assert!(c2 >= two_ticks_on, "counter went from {c1:#x} to {c2:#x}");
    // The clone's writes did not reach the first snapshot's file.
    assert_eq!(counter_in(&snap), c1);
    stop(b);
}

#[test]
fn restores_of_another_shape_or_a_damaged_file_are_refused() {
    let dir = TempDir::new("snaprefuse");
    let guest = build_guest(&dir, "counter");
    let a = start(&dir, "a", &guest, 64, None);
    wait_for("the guest's start", Duration::from_secs(60), || {
        console(&dir.path("a/serial.log")).starts_with('S')
    });
    let mut ctl = Control::connect(&dir.path("a/ctl.sock"));
    let snap = dir.path("snap");
    let r = ctl.send(json!({"op": "snapshot", "path": snap}));
    assert_eq!(r["ok"], json!(true), "{r}");
    stop(a);

    let refused = |name: &str, mem: u64, from: &Path, want: &str| {
        let child = start(&dir, name, &guest, mem, Some(from));
        let (status, stderr) = wait_exit(child, Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(want), "{name}: {stderr}");
        assert!(!dir.path(&format!("{name}/ctl.sock")).exists());
    };
    refused(
        "bigger",
        128,
        &snap,
        "memory_mib: 64 in the snapshot, 128 in the config",
    );

    let copy = |name: &str| {
        let to = dir.path(name);
        std::fs::create_dir(&to).unwrap();
        for f in ["state", "memory"] {
            std::fs::copy(snap.join(f), to.join(f)).unwrap();
        }
        to
    };
    let flipped = copy("flipped");
    let mut state = std::fs::read(flipped.join("state")).unwrap();
    let mid = state.len() / 2;
    state[mid] ^= 0x04;
    std::fs::write(flipped.join("state"), &state).unwrap();
    refused("c1", 64, &flipped, "checksum mismatch");

    let cut = copy("cut");
    let state = std::fs::read(cut.join("state")).unwrap();
    std::fs::write(cut.join("state"), &state[..state.len() - 100]).unwrap();
    refused("c2", 64, &cut, "truncated");

    let short_mem = copy("shortmem");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(short_mem.join("memory"))
        .unwrap();
    f.set_len(32 << 20).unwrap();
    refused("c3", 64, &short_mem, "holds 33554432 bytes");
}
