//! The bounds of a tool run, on real processes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::*;

fn limits(timeout_ms: u64) -> ToolLimits {
    ToolLimits {
        timeout: Duration::from_millis(timeout_ms),
        max_file_bytes: 1 << 20,
        max_address_space: 1 << 30,
        user: None,
    }
}

fn sh(script: &str) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script);
    cmd
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-tool-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_tool_past_its_time_is_killed_and_reaped() {
    let started = Instant::now();
    let e = run(sh("echo started; exec sleep 30"), &limits(300)).unwrap_err();
    assert!(matches!(e, ToolError::TimedOut { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("/bin/sh ran longer than its 0 s limit"),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn output_and_status_come_back() {
    let out = run(sh("echo to-out; echo to-err >&2; exit 3"), &limits(10_000)).unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.output), "to-err\nto-out\n");
    let e = run(Command::new("/nonexistent/mkfs"), &limits(10_000)).unwrap_err();
    assert!(
        e.to_string().starts_with("running /nonexistent/mkfs: "),
        "{e}"
    );
}

#[test]
fn endless_output_is_cut_and_the_tool_still_finishes() {
    let out = run(
        sh("head -c 50000000 /dev/zero; head -c 50000000 /dev/zero >&2"),
        &limits(60_000),
    )
    .unwrap();
    assert!(out.status.success());
    assert_eq!(out.output.len() as u64, 2 * MAX_OUTPUT);
}

#[test]
fn a_file_past_the_size_limit_is_refused() {
    let dir = temp_dir("fsize");
    let file = dir.join("big");
    let script = format!("head -c 2097152 /dev/zero > {}", file.display());
    let out = run(sh(&script), &limits(30_000)).unwrap();
    assert!(!out.status.success(), "{:?}", out.status);
    assert_eq!(fs::metadata(&file).unwrap().len(), 1 << 20);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn with_a_user_it_reads_everything_and_writes_nothing_of_roots() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = temp_dir("user");
    let secret = dir.join("secret");
    fs::write(&secret, "root-only\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    let mut l = limits(30_000);
    l.user = Some(JailUser {
        uid: 65500,
        gid: 65501,
    });
    let script = format!(
        "cat {secret}; grep -E '^(Uid|Gid|CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status; \
         if echo x > {dir}/new; then echo WROTE; fi",
        secret = secret.display(),
        dir = dir.display()
    );
    let out = run(sh(&script), &l).unwrap();
    let text = String::from_utf8_lossy(&out.output);
    assert!(text.contains("root-only"), "{text}");
    for want in [
        "Uid:\t65500\t65500\t65500\t65500",
        "Gid:\t65501\t65501\t65501\t65501",
        // CAP_DAC_READ_SEARCH (bit 2) and nothing else, in every set.
        "CapEff:\t0000000000000004",
        "CapPrm:\t0000000000000004",
        "CapBnd:\t0000000000000004",
        "CapAmb:\t0000000000000004",
        "NoNewPrivs:\t1",
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
    assert!(!text.contains("WROTE"), "{text}");
    assert!(!dir.join("new").exists());
    fs::remove_dir_all(&dir).unwrap();
}
