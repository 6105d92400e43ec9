//! End-to-end tests of what confines the VMM on the host's /dev/kvm: its
//! seccomp filters, and a hostile hand-made guest whose faults and output
//! stay bounded.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
mod common;

use common::*;

/// (thread name, the `Seccomp:` field) of each thread of process `pid`.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        modes.push((field("Name:"), field("Seccomp:")));
    }
    modes.sort();
    modes
}

/// Every thread of a running VMM (main, vcpu0, vcpu1) is in seccomp
/// filter mode (2) and keeps serving the guest and the control socket;
/// `--no-seccomp` leaves them unfiltered (0) and says so in the log.
#[test]
fn every_thread_runs_under_a_seccomp_filter() {
    for (args, mode) in [(&[][..], "2"), (&["--no-seccomp"][..], "0")] {
        let dir = TempDir::new(&format!("seccomp{mode}"));
        let guest = build_guest(&dir, "hello_spin");
        let serial = dir.path("serial.log");
        let sock = dir.path("ctl.sock");
        let child = spawn_vmm_with_args(
            &dir,
            &json!({
                "vcpus": 2, "memory_mib": 64,
                "kernel": {"path": guest, "cmdline": ""},
                "serial": {"output": "file", "path": serial},
                "control_socket": sock,
            }),
            args,
        );
        let mut ctl = Control::connect(&sock);
        wait_for("the guest's line", Duration::from_secs(30), || {
            std::fs::read(&serial).is_ok_and(|b| b == b"husk guest: spinning\r\n")
        });
        assert_eq!(ctl.status(), json!({"ok": true, "state": "running"}));
        // The VMM's own threads, and on newer host kernels KVM's NX huge
        // page recovery worker, which lives in the VM's process (it runs
        // no user code; it inherits the mode of the vCPU thread that
        // started it).
        let ours = |seen: &[(String, String)]| {
            let names: Vec<&str> = seen
                .iter()
                .map(|(n, _)| n.as_str())
                .filter(|n| !n.starts_with("kvm-"))
                .collect();
            names == ["husk-vmm", "vcpu0", "vcpu1"] && seen.iter().all(|(_, m)| m == mode)
        };
        // vCPU threads install their filter as they start: give them time.
        let start = Instant::now();
        let mut seen = seccomp_modes(child.id());
        while !ours(&seen) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
            seen = seccomp_modes(child.id());
        }
        assert!(ours(&seen), "threads and their seccomp mode: {seen:?}");
        assert_eq!(
            ctl.send(json!({"op": "pause"})),
            json!({"ok": true, "state": "paused"})
        );
        assert_eq!(
            ctl.send(json!({"op": "shutdown", "timeout_ms": 100})),
            json!({"ok": true})
        );
        let (status, stderr) = wait_exit(child, Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
        assert_eq!(
            stderr.contains("WITHOUT seccomp filters"),
            mode == "0",
            "{stderr}"
        );
        assert!(!sock.exists(), "control socket removed on exit");
    }
}

/// Bytes tests/guests/hostile.S sends to COM1's transmit register: its
/// "hostile: ..." lines (start, 8 rounds, devices done, flood done) and
/// its 256 KiB flood.
const HOSTILE_CONSOLE_BYTES: u64 = 15 + 8 * 20 + 22 + 20 + 256 * 1024;

/// The VMM's own resident memory: its RSS outside guest RAM (the one
/// mapping of `guest_kib`), which the guest fills as it likes up to its size.
fn rss_kib(pid: u32, guest_kib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let kib = |l: &str, key: &str| -> Option<u64> {
        l.strip_prefix(key)?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    let (mut size, mut total) = (0, 0);
    for l in smaps.lines() {
        if let Some(v) = kib(l, "Size:") {
            size = v;
        } else if let Some(v) = kib(l, "Rss:") {
            if size != guest_kib {
                total += v;
            }
        }
    }
    total
}

/// Boots tests/guests/hostile.S with a disk, vsock, rng and balloon and
/// the log limits `log`; waits (answering status all along) until every
/// byte of its console flood is accounted for. Returns the last status,
/// the VMM's stderr, the console file's size, the VMM's own RSS (outside
/// guest RAM) when the guest started and when it was done, and how long it
/// took.
fn run_hostile(name: &str, log: Value) -> (Value, String, u64, u64, u64, Duration) {
    let dir = TempDir::new(name);
    let guest = build_guest(&dir, "hostile");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let serial = dir.path("serial.log");
    let sock = dir.path("ctl.sock");
    let child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 1, "memory_mib": 64,
            "kernel": {"path": guest},
            "serial": {"output": "file", "path": serial, "max_bytes": 8192, "bytes_per_sec": 1024},
            "block": [{"id": "disk0", "path": disk}],
            "vsock": {"guest_cid": 3, "uds_path": dir.path("v.sock")},
            "rng": true,
            "balloon": {"free_page_reporting": true},
            "control_socket": sock,
            "log": log,
        }),
    );
    let start = Instant::now();
    let mut ctl = Control::connect(&sock);
    wait_for("the guest's first line", Duration::from_secs(30), || {
        std::fs::read(&serial).is_ok_and(|b| b.starts_with(b"hostile: start\n"))
    });
    let rss_start = rss_kib(child.id(), 64 << 10);
    let mut status;
    loop {
        status = ctl.send(json!({"op": "status"}));
        assert_eq!(status["state"], "running", "{status}");
        let c = &status["counters"]["console"];
        let offered = ["written_bytes", "dropped_rate_bytes", "dropped_cap_bytes"]
            .iter()
            .map(|k| c[k].as_u64().unwrap())
            .sum::<u64>();
        // The cap's note is written on top of what the guest sent.
        let note = if c["dropped_cap_bytes"].as_u64() > Some(0) {
            "\n[husk-vmm: console output capped at 8192 bytes; the rest is dropped]\n".len() as u64
        } else {
            0
        };
        if offered - note == HOSTILE_CONSOLE_BYTES {
            break;
        }
        assert!(offered - note < HOSTILE_CONSOLE_BYTES, "{status}");
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the hostile guest did not finish: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = start.elapsed();
    let rss_end = rss_kib(child.id(), 64 << 10);
    assert_eq!(
        ctl.send(json!({"op": "shutdown", "timeout_ms": 100})),
        json!({"ok": true})
    );
    let (exit, stderr) = wait_exit(child, Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "{stderr}");
    let console_len = std::fs::metadata(&serial).unwrap().len();
    (status, stderr, console_len, rss_start, rss_end, took)
}

fn fault_count(status: &Value, kind: &str, what: &str) -> u64 {
    status["counters"]["guest_faults"][kind][what]
        .as_u64()
        .unwrap_or(0)
}

/// A hostile guest kernel (tests/guests/hostile.S: garbage to every
/// register, looping, overlapping and out-of-memory descriptor chains, bad
/// rings, a console flood) against the default log limits: the VMM keeps
/// answering, logs at most `burst` lines per kind plus one per second,
/// counts the rest, and keeps the console under its cap and rate.
#[test]
fn hostile_guest_is_bounded() {
    let (status, stderr, console_len, rss_start, rss_end, took) = run_hostile("hostile", json!({}));
    eprintln!(
        "hostile guest: {took:?}, RSS {rss_start} -> {rss_end} KiB, log {} bytes, console {console_len} bytes\n{status}",
        stderr.len()
    );
    for kind in ["mmio", "queue", "request", "unmapped", "device"] {
        assert!(fault_count(&status, kind, "events") > 0, "{kind}: {status}");
    }
    // The register faults come from the vCPU, thousands at once; the queue
    // faults from the device's thread, as many as it got to before the
    // guest reset it.
    assert!(
        fault_count(&status, "mmio", "suppressed") > 20_000,
        "{status}"
    );
    // Per kind: the burst of 10, then one a second (the run took `took`).
    let warnings = stderr.lines().filter(|l| l.contains(" WARN ")).count() as u64;
    let bound = 6 * (10 + took.as_secs() + 1);
    assert!(
        warnings <= bound,
        "{warnings} > {bound} warnings:\n{stderr}"
    );
    assert!(stderr.contains("suppressed="), "{stderr}");
    let c = &status["counters"]["console"];
    assert!(console_len <= 8192, "console {console_len} bytes");
    assert_eq!(c["written_bytes"].as_u64(), Some(console_len));
    assert!(c["dropped_rate_bytes"].as_u64() > Some(0), "{status}");
    assert!(
        rss_end < rss_start + rss_start / 20,
        "RSS grew from {rss_start} to {rss_end} KiB"
    );
}

/// The same guest with a generous rate limit and the smallest log cap: the
/// log stops at its cap with one line saying so, and still ends with why
/// the VMM stopped.
#[test]
fn hostile_guest_log_stops_at_its_cap() {
    let (status, stderr, ..) = run_hostile(
        "hostile-cap",
        json!({"max_bytes": 65536, "burst": 10000, "interval_ms": 10}),
    );
    eprintln!("log {} bytes: {status}", stderr.len());
    assert!(stderr.len() <= 65536, "log {} bytes", stderr.len());
    assert_eq!(stderr.matches("log capped at 65536 bytes").count(), 1);
    let log = &status["counters"]["log"];
    assert_eq!(log["capped"], true, "{status}");
    assert!(log["dropped_lines"].as_u64() > Some(0), "{status}");
    let after_cap = &stderr[stderr.find("log capped at").unwrap()..];
    assert!(after_cap.contains("VM stopped"), "{after_cap}");
}
