//! The `husk` binary run as an operator runs it, against temporary
//! configurations and state folders: each FAIL of `husk check` is made by
//! breaking one thing, and on a host whose /dev/kvm is software (PVM) the
//! check fails as it must.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        // Short: state_dir is at most 29 bytes.
        let dir = PathBuf::from(format!("/tmp/hk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A kernel with a bzImage header, a gzip initramfs, an executable
        // standing for the VMM and mkfs.erofs.
        let mut kernel = vec![0u8; 0x400];
        kernel[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(dir.join("bzImage"), kernel).unwrap();
        std::fs::write(dir.join("initrd"), [0x1f, 0x8b, 8, 0, 0, 0]).unwrap();
        for exe in ["husk-vmm", "mkfs.erofs"] {
            std::fs::write(dir.join(exe), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(dir.join(exe), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        std::fs::create_dir_all(dir.join("s")).unwrap();
        let f = Fixture { dir };
        f.config("");
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes the configuration: the fixture's files, then `extra`.
    fn config(&self, extra: &str) {
        let p = |n: &str| format!("{:?}", self.path(n).display().to_string());
        let text = format!(
            "vmm_path = {}\nkernel_path = {}\ninitrd_path = {}\nmkfs_erofs_path = {}\nstate_dir = {}\njail = false\n{extra}",
            p("husk-vmm"),
            p("bzImage"),
            p("initrd"),
            p("mkfs.erofs"),
            p("s"),
        );
        // A later key of the same name would be a TOML error: extra keys
        // replace the fixture's.
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        for e in extra.lines() {
            if let Some((k, _)) = e.split_once('=') {
                let k = k.trim();
                let last = lines
                    .iter()
                    .rposition(|l| l.starts_with(&format!("{k} =")))
                    .unwrap();
                lines.retain_with_index(last, k);
            }
        }
        std::fs::write(self.path("husk.toml"), lines.join("\n") + "\n").unwrap();
    }

    fn husk(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_husk"))
            .arg("--config")
            .arg(self.path("husk.toml"))
            .arg("--containerd-config")
            .arg(self.path("containerd.toml"))
            .args(args)
            .env_remove("HUSK_CONFIG")
            .output()
            .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Keeps only the last line setting key `k` (the extra's).
trait RetainLast {
    fn retain_with_index(&mut self, last: usize, k: &str);
}

impl RetainLast for Vec<String> {
    fn retain_with_index(&mut self, last: usize, k: &str) {
        let prefix = format!("{k} =");
        let mut i = 0;
        self.retain(|l| {
            let keep = i == last || !l.starts_with(&prefix);
            i += 1;
            keep
        });
    }
}

/// The status of check `name` in `husk check --json`'s output.
fn status(out: &Output, name: &str) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let c = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}"));
    (
        c["status"].as_str().unwrap().to_string(),
        c["reason"].as_str().unwrap().to_string(),
    )
}

#[test]
fn configured_files_pass_when_present() {
    let f = Fixture::new("ok");
    let out = f.husk(&["check", "--json"]);
    for name in ["configuration", "vmm", "kernel", "initrd", "mkfs-erofs"] {
        let (s, reason) = status(&out, name);
        assert_eq!(s, "OK", "{name}: {reason}");
    }
    assert!(status(&out, "kernel").1.contains("bzImage"));
    assert!(status(&out, "initrd").1.contains("gzip"));
}

#[test]
fn each_broken_file_is_a_fail_and_exits_non_zero() {
    let f = Fixture::new("broken");
    let cases: [(&str, &str, &str); 5] = [
        (
            "vmm_path = \"/nonexistent/husk-vmm\"",
            "vmm",
            "/nonexistent/husk-vmm",
        ),
        (
            "kernel_path = \"/nonexistent/bzImage\"",
            "kernel",
            "/nonexistent/bzImage",
        ),
        (
            "initrd_path = \"/nonexistent/initrd\"",
            "initrd",
            "/nonexistent/initrd",
        ),
        (
            "mkfs_erofs_path = \"/nonexistent/mkfs\"",
            "mkfs-erofs",
            "/nonexistent/mkfs",
        ),
        // The jail needs a static VMM; a shell script is not one.
        ("jail = true", "vmm", "not a statically linked"),
    ];
    for (extra, name, said) in cases {
        f.config(extra);
        let out = f.husk(&["check", "--json"]);
        assert_eq!(out.status.code(), Some(1), "{extra}");
        let (s, reason) = status(&out, name);
        assert_eq!(s, "FAIL", "{extra}: {reason}");
        assert!(reason.contains(said), "{extra}: {reason}");
        // The text report says FAIL and the fix.
        let text = String::from_utf8(f.husk(&["check"]).stdout).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("FAIL") && l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("{extra}:\n{text}"));
        assert!(line.contains(said), "{line}");
    }
    // A kernel that is not one.
    f.config("");
    std::fs::write(f.path("bzImage"), vec![0u8; 4096]).unwrap();
    let out = f.husk(&["check", "--json"]);
    assert_eq!(status(&out, "kernel").0, "FAIL");
    assert_eq!(out.status.code(), Some(1));
    // A configuration that does not validate.
    f.config("vcpus = 0");
    let out = f.husk(&["check", "--json"]);
    let (s, reason) = status(&out, "configuration");
    assert_eq!(
        (s.as_str(), reason.contains("vcpus")),
        ("FAIL", true),
        "{reason}"
    );
}

#[test]
fn a_software_kvm_is_unusable_for_linux_guests() {
    let hw = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).exists());
    if hw || !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("not a PVM host: nothing to check");
        return;
    }
    let f = Fixture::new("pvm");
    let out = f.husk(&["check", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let (s, reason) = status(&out, "kvm-hardware");
    assert_eq!(s, "FAIL");
    assert!(
        reason.contains("kvm_pvm") && reason.contains("emulat"),
        "{reason}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
}

#[test]
fn env_says_where_each_value_came_from() {
    let f = Fixture::new("env");
    f.config("vcpus = 3");
    let out = f.husk(&["env"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let conf = f.path("husk.toml").display().to_string();
    assert!(
        text.contains(&format!("configuration file: {conf} (from --config)")),
        "{text}"
    );
    let line = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{k} =")))
            .unwrap()
            .to_string()
    };
    assert!(
        line("vcpus").contains("3") && line("vcpus").ends_with(&conf),
        "{text}"
    );
    assert!(line("memory_mib").ends_with("# default"), "{text}");
    // HUSK_CONFIG is the next source.
    let out = Command::new(env!("CARGO_BIN_EXE_husk"))
        .args(["--containerd-config", "/nonexistent", "env", "--json"])
        .env("HUSK_CONFIG", f.path("husk.toml"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config_file_origin"], "environment HUSK_CONFIG");
}

#[test]
fn ps_logs_and_metrics_read_a_state_folder() {
    let f = Fixture::new("ps");
    let sb = f.path("s").join("sandbox1");
    std::fs::create_dir_all(&sb).unwrap();
    // This test's process stands for the VMM.
    std::fs::write(sb.join("vmm.pid"), std::process::id().to_string()).unwrap();
    std::fs::write(
        sb.join("vm.json"),
        r#"{"vcpus":2,"memory_mib":300,"kernel":{"path":"/k"}}"#,
    )
    .unwrap();
    std::fs::write(sb.join("vmm.log"), "vmm says hi\n").unwrap();
    std::fs::write(sb.join("console.log"), "Linux version 6.1\nlast line\n").unwrap();
    let out = f.husk(&["ps"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let row = text
        .lines()
        .find(|l| l.starts_with("sandbox1"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains(&std::process::id().to_string()) && row.contains("300MiB"),
        "{row}"
    );
    let out = f.husk(&["ps", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["vcpus"], 2);
    assert_eq!(v[0]["running"], true);

    let out = f.husk(&["logs", "sandbox"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("vmm says hi") && text.contains("Linux version"),
        "{text}"
    );
    let out = f.husk(&["logs", "--console", "--tail", "1", "sandbox1"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("console.log <==\nlast line\n"), "{text}");
    let out = f.husk(&["logs", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sandbox nosuch"));

    let out = f.husk(&["metrics", "--once"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("husk_sandboxes 1\n"), "{text}");
    assert!(
        text.contains("husk_sandbox_vcpus{sandbox_id=\"sandbox1\",pod=\"\",namespace=\"\"} 2\n"),
        "{text}"
    );
    // No control socket answers: the VMM is not up.
    assert!(
        text.contains("husk_sandbox_vmm_up{sandbox_id=\"sandbox1\",pod=\"\",namespace=\"\"} 0\n"),
        "{text}"
    );
}
