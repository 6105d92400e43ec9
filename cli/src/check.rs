//! `husk check`: whether this host can run husk. Each check is one line,
//! OK, WARN or FAIL, with the reason and, when not OK, the fix.

use std::path::{Path, PathBuf};
use std::process::Command;

use husk_runtime_config::config::file_problem;
use serde::Serialize;

use crate::containerd::{self, ContainerdConfig};
use crate::kvm::{self, Backend};
use crate::settings::Effective;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ok => "OK",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(name: &'static str, reason: impl Into<String>) -> Check {
    Check {
        name,
        status: Status::Ok,
        reason: reason.into(),
        fix: None,
    }
}

fn bad(
    name: &'static str,
    status: Status,
    reason: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        name,
        status,
        reason: reason.into(),
        fix: Some(fix.into()),
    }
}

/// Where the host's facts are read (the real ones but in tests).
#[derive(Debug, Clone)]
pub struct Host {
    pub kvm: PathBuf,
    pub sys_module: PathBuf,
    pub cpuinfo: PathBuf,
    pub tun: PathBuf,
    pub vhost_vsock: PathBuf,
    pub mountinfo: PathBuf,
    pub containerd_bin: String,
    pub containerd_config: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            kvm: "/dev/kvm".into(),
            sys_module: "/sys/module".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            tun: "/dev/net/tun".into(),
            vhost_vsock: "/dev/vhost-vsock".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            containerd_bin: "containerd".into(),
            containerd_config: containerd::DEFAULT_CONFIG.into(),
        }
    }
}

/// Every check, in order.
pub fn run(host: &Host, config: Result<&Effective, String>) -> Vec<Check> {
    let mut out = vec![
        kvm_device(host),
        kvm_hardware(host),
        tun(host),
        vhost_vsock(host),
    ];
    out.push(cgroups(host));
    out.extend(containerd_checks(host));
    match config {
        Ok(eff) => out.extend(config_checks(eff)),
        Err(e) => out.push(bad(
            "configuration",
            Status::Fail,
            e,
            "fix the key the message names (configs/configuration.toml documents each)",
        )),
    }
    out
}

fn kvm_device(host: &Host) -> Check {
    match kvm::probe_device(&host.kvm) {
        Ok(()) => ok("kvm-device", format!("{}: KVM API 12, creates VMs", host.kvm.display())),
        Err(e) => bad(
            "kvm-device",
            Status::Fail,
            e.to_string(),
            "load kvm_intel or kvm_amd (modprobe), enable virtualization in the firmware, and run husk as root",
        ),
    }
}

fn kvm_hardware(host: &Host) -> Check {
    let flags = std::fs::read_to_string(&host.cpuinfo)
        .map(|t| kvm::cpu_flags(&t))
        .unwrap_or_default();
    let has = |f: &str| flags.iter().any(|x| x == f);
    let b = kvm::backend(&host.sys_module, &flags);
    match b.cpu_flag() {
        Some(flag) if has(flag) => ok(
            "kvm-hardware",
            format!("/dev/kvm is {} on the CPU's {flag}: hardware virtualization runs Linux guests", b.module()),
        ),
        Some(flag) => bad(
            "kvm-hardware",
            Status::Fail,
            format!("{} is loaded but the CPU does not show {flag}", b.module()),
            "enable VT-x/AMD-V in the firmware, or nested virtualization in the hypervisor this host runs in",
        ),
        None if b == Backend::Pvm => bad(
            "kvm-hardware",
            Status::Fail,
            format!(
                "/dev/kvm is kvm_pvm, a software hypervisor (PVM){}: a guest that is not PVM-aware runs in KVM's instruction emulator, and a Linux guest dies there (emulation failure)",
                if has("hypervisor") { " in a VM without nested virtualization" } else { "" }
            ),
            "run husk on a host with VT-x or AMD-V (bare metal, or a VM with nested virtualization: kvm_intel/kvm_amd loaded)",
        ),
        None => bad(
            "kvm-hardware",
            Status::Fail,
            "no kvm_intel or kvm_amd module is loaded",
            "modprobe kvm_intel (Intel) or kvm_amd (AMD); on a VM, enable nested virtualization",
        ),
    }
}

fn char_device(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_char_device() => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(drop)
            .map_err(|e| format!("{}: {e}", path.display())),
        Ok(_) => Err(format!("{} is not a character device", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn tun(host: &Host) -> Check {
    match char_device(&host.tun) {
        Ok(()) => ok(
            "tun",
            format!("{} opens: pod NICs get their taps", host.tun.display()),
        ),
        Err(e) => bad(
            "tun",
            Status::Fail,
            e,
            "modprobe tun (a pod's network needs a tap per interface)",
        ),
    }
}

fn vhost_vsock(host: &Host) -> Check {
    let how = "husk-vmm emulates virtio-vsock itself (hybrid vsock over a Unix socket)";
    match char_device(&host.vhost_vsock) {
        Ok(()) => ok(
            "vhost-vsock",
            format!("{} present; not needed: {how}", host.vhost_vsock.display()),
        ),
        Err(e) => ok("vhost-vsock", format!("{e}; not needed: {how}")),
    }
}

/// The cgroup layout from mountinfo's text: (layout, v1 controllers,
/// whether a cgroup2 is mounted at /sys/fs/cgroup).
pub fn cgroup_layout(mountinfo: &str) -> (String, Vec<String>) {
    let mut v1 = Vec::new();
    let mut v2: Option<String> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split_whitespace().nth(4).unwrap_or("");
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or("");
        let opts = r.nth(1).unwrap_or("");
        match fstype {
            "cgroup2" => v2 = Some(mount_point.to_string()),
            "cgroup" => v1.extend(
                opts.split(',')
                    .filter(|o| ["memory", "cpu", "pids", "cpuacct", "cpuset"].contains(o))
                    .map(String::from),
            ),
            _ => {}
        }
    }
    v1.sort();
    v1.dedup();
    let layout = match (&v2, v1.is_empty()) {
        (Some(p), true) if p == "/sys/fs/cgroup" => "v2 (unified)".to_string(),
        (Some(p), true) => format!("v2 at {p}"),
        (Some(p), false) => format!("hybrid (v1 controllers, cgroup2 at {p})"),
        (None, false) => "v1".to_string(),
        (None, true) => "none".to_string(),
    };
    (layout, v1)
}

fn cgroups(host: &Host) -> Check {
    let text = std::fs::read_to_string(&host.mountinfo).unwrap_or_default();
    let (layout, v1) = cgroup_layout(&text);
    let need = ["memory", "cpu", "pids"];
    let v2_controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    let missing: Vec<&str> = need
        .iter()
        .copied()
        .filter(|c| {
            !v1.iter().any(|x| x == c) && !v2_controllers.split_whitespace().any(|x| x == *c)
        })
        .collect();
    if layout == "none" {
        bad(
            "cgroups",
            Status::Fail,
            "no cgroup file system is mounted",
            "mount cgroup2 at /sys/fs/cgroup (systemd does)",
        )
    } else if missing.is_empty() {
        ok("cgroups", format!("{layout}; memory, cpu and pids controllers present: the VMM's host cgroup can be sized"))
    } else {
        bad(
            "cgroups",
            Status::Fail,
            format!("{layout}; missing controllers: {}", missing.join(", ")),
            "enable the memory, cpu and pids controllers (or set sandbox_cgroup = false, which leaves a VM's host usage unbounded)",
        )
    }
}

fn containerd_checks(host: &Host) -> Vec<Check> {
    let mut out = Vec::new();
    match Command::new(&host.containerd_bin).arg("--version").output() {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            match containerd::parse_version(&text) {
                Some(v) if v >= (1, 6) => out.push(ok(
                    "containerd",
                    format!("containerd {}.{} (runtime v2 shims)", v.0, v.1),
                )),
                Some(v) => out.push(bad(
                    "containerd",
                    Status::Fail,
                    format!("containerd {}.{} is older than 1.6", v.0, v.1),
                    "install containerd 1.6 or newer",
                )),
                None => out.push(bad(
                    "containerd",
                    Status::Warn,
                    format!("cannot read a version in {:?}", text.trim()),
                    "check containerd's installation",
                )),
            }
        }
        Ok(o) => out.push(bad(
            "containerd",
            Status::Fail,
            format!("{} --version: {}", host.containerd_bin, o.status),
            "check containerd's installation",
        )),
        Err(e) => out.push(bad(
            "containerd",
            Status::Fail,
            format!("{}: {e}", host.containerd_bin),
            "apt-get install containerd",
        )),
    }
    out.push(match containerd::read_config(&host.containerd_config) {
        Ok(ContainerdConfig { husk_handlers, .. }) if !husk_handlers.is_empty() => ok(
            "containerd-config",
            format!(
                "{} names io.containerd.husk.v2 as CRI handler {}",
                host.containerd_config.display(),
                husk_handlers.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        ),
        Ok(_) => bad(
            "containerd-config",
            Status::Warn,
            format!("{} names no runtime io.containerd.husk.v2: CRI pods cannot use husk (ctr --runtime still can)", host.containerd_config.display()),
            "configs/install.sh --containerd-config FILE, then restart containerd",
        ),
        Err(e) => bad(
            "containerd-config",
            Status::Warn,
            e.to_string(),
            "configs/install.sh --containerd-config /etc/containerd/config.toml, then restart containerd",
        ),
    });
    let shim = "containerd-shim-husk-v2";
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| file_problem(&d.join(shim), true).is_none()))
        .unwrap_or(false);
    out.push(if on_path {
        ok(
            "shim",
            format!("{shim} is on PATH, where containerd looks for io.containerd.husk.v2"),
        )
    } else {
        bad(
            "shim",
            Status::Fail,
            format!("{shim} is not on PATH"),
            "configs/install.sh (puts it in /usr/local/bin)",
        )
    });
    out
}

/// What a kernel image is, by its magic: a bzImage ("HdrS" at 0x202) or
/// an ELF vmlinux.
fn kernel_kind(path: &Path) -> Option<&'static str> {
    use std::io::Read;
    let mut head = [0u8; 0x206];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    if head.starts_with(b"\x7fELF") {
        Some("ELF vmlinux")
    } else if &head[0x202..0x206] == b"HdrS" {
        Some("bzImage")
    } else {
        None
    }
}

/// What an initramfs is, by its magic.
fn initrd_kind(path: &Path) -> Option<&'static str> {
    use std::io::Read;
    let mut head = [0u8; 6];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    match head {
        [0x1f, 0x8b, ..] => Some("gzip"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd"),
        [0xfd, b'7', b'z', b'X', b'Z', 0] => Some("xz"),
        [b'0', b'7', b'0', b'7', b'0', b'1' | b'2'] => Some("cpio"),
        _ => None,
    }
}

fn config_checks(eff: &Effective) -> Vec<Check> {
    let c = &eff.config;
    let mut out = vec![if eff.file_exists {
        ok(
            "configuration",
            format!(
                "{} ({}) is valid",
                eff.chosen.path.display(),
                eff.chosen.origin
            ),
        )
    } else {
        bad(
            "configuration",
            Status::Warn,
            format!(
                "{} ({}) does not exist: the shim refuses to start without it",
                eff.chosen.path.display(),
                eff.chosen.origin
            ),
            "configs/install.sh (writes /etc/husk/configuration.toml)",
        )
    }];
    for (key, path, exec) in c.files() {
        let name: &'static str = match key {
            "vmm_path" => "vmm",
            "kernel_path" => "kernel",
            "initrd_path" => "initrd",
            _ => "mkfs-erofs",
        };
        if let Some(problem) = file_problem(path, exec) {
            out.push(bad(
                name,
                Status::Fail,
                format!("{key} = {}: {problem}", path.display()),
                format!(
                    "install it there (configs/install.sh) or set {key} in {}",
                    eff.chosen.path.display()
                ),
            ));
            continue;
        }
        let check = match key {
            "vmm_path" if c.jail.is_some() => match husk_runtime_config::elf::check_static(path) {
                Ok(()) => ok(
                    name,
                    format!(
                        "{key} = {}: a static executable, as the jail needs",
                        path.display()
                    ),
                ),
                Err(e) => bad(
                    name,
                    Status::Fail,
                    format!("{key}: {e}; the jail holds no shared libraries"),
                    "use the static build (scripts/build.sh) or set jail = false",
                ),
            },
            "kernel_path" => match kernel_kind(path) {
                Some(kind) => ok(name, format!("{key} = {}: {kind}", path.display())),
                None => bad(
                    name,
                    Status::Fail,
                    format!(
                        "{key} = {}: neither a bzImage nor an ELF vmlinux",
                        path.display()
                    ),
                    "point kernel_path at the guest kernel (guest-kernel/build.sh guest)",
                ),
            },
            "initrd_path" => match initrd_kind(path) {
                Some(kind) => ok(
                    name,
                    format!("{key} = {}: {kind} initramfs", path.display()),
                ),
                None => bad(
                    name,
                    Status::Fail,
                    format!(
                        "{key} = {}: not a gzip, zstd, xz or cpio initramfs",
                        path.display()
                    ),
                    "point initrd_path at the agent initramfs (rootfs-image/build.sh agent)",
                ),
            },
            _ => ok(name, format!("{key} = {}", path.display())),
        };
        out.push(check);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_layouts_are_told_apart() {
        let v1 =
            "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n\
                  31 25 0:27 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let v2 = "40 25 0:30 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        let hybrid = format!("{v1}41 25 0:31 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n");
        assert_eq!(
            cgroup_layout(v1),
            ("v1".into(), vec!["memory".into(), "pids".into()])
        );
        assert_eq!(cgroup_layout(v2).0, "v2 (unified)");
        assert!(cgroup_layout(&hybrid).0.starts_with("hybrid"));
        assert_eq!(cgroup_layout("").0, "none");
    }
}
