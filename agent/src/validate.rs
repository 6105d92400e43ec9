//! Checks on what a request asks for, done before anything is changed: a
//! request that fails here leaves no trace. Mirrors the checks runc does at
//! `runc create` time, plus the limits of what husk supports.

use std::path::Path;

use oci_spec::runtime::{LinuxDeviceType, LinuxIdMapping, LinuxNamespaceType, Process, Spec};

use crate::init::rootfs::MOUNT_TYPES;
use crate::paths::{check_clean_absolute, resolve_in_root};

/// Longest container or exec id.
const ID_MAX: usize = 128;

/// Most lines a uid_map or gid_map takes (since Linux 4.15).
const ID_MAP_MAX: usize = 340;

/// The CLONE_NEW* flag and /proc/<pid>/ns name of a namespace type.
pub fn ns_flag(t: LinuxNamespaceType) -> (i32, &'static str) {
    match t {
        LinuxNamespaceType::Mount => (libc::CLONE_NEWNS, "mnt"),
        LinuxNamespaceType::Cgroup => (libc::CLONE_NEWCGROUP, "cgroup"),
        LinuxNamespaceType::Uts => (libc::CLONE_NEWUTS, "uts"),
        LinuxNamespaceType::Ipc => (libc::CLONE_NEWIPC, "ipc"),
        LinuxNamespaceType::Pid => (libc::CLONE_NEWPID, "pid"),
        LinuxNamespaceType::Network => (libc::CLONE_NEWNET, "net"),
        LinuxNamespaceType::Time => (libc::CLONE_NEWTIME, "time"),
        LinuxNamespaceType::User => (libc::CLONE_NEWUSER, "user"),
    }
}

/// The uid_map or gid_map text of a new user namespace's mappings.
pub fn id_map(kind: &str, maps: Option<&Vec<LinuxIdMapping>>) -> Result<String, String> {
    let maps = maps.map(Vec::as_slice).unwrap_or_default();
    if maps.is_empty() {
        return Err(format!("a new user namespace needs linux.{kind}Mappings"));
    }
    if maps.len() > ID_MAP_MAX {
        return Err(format!(
            "linux.{kind}Mappings has over {ID_MAP_MAX} entries"
        ));
    }
    let mut text = String::new();
    for m in maps {
        if m.size() == 0
            || m.container_id().checked_add(m.size()).is_none()
            || m.host_id().checked_add(m.size()).is_none()
        {
            return Err(format!("linux.{kind}Mappings entry {m:?} is malformed"));
        }
        text.push_str(&format!(
            "{} {} {}\n",
            m.container_id(),
            m.host_id(),
            m.size()
        ));
    }
    Ok(text)
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`, as containerd's identifiers.
pub fn id(kind: &str, id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    let ok = id.len() <= ID_MAX
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} id {id:?} is malformed: want [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}"
        ))
    }
}

pub fn process(p: &Process) -> Result<(), String> {
    let args = p.args().as_deref().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err("process.args must name a program".into());
    }
    if !p.cwd().is_absolute() {
        return Err(format!("process.cwd {:?} is not absolute", p.cwd()));
    }
    Ok(())
}

/// A sysctl key: dotted lower-case words, nothing that could leave
/// /proc/sys once dots become slashes.
pub fn sysctl_key(k: &str) -> Result<(), String> {
    let ok = !k.is_empty()
        && k.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("sysctl key {k:?} is malformed"))
    }
}

/// Everything checkable about a container spec and its rootfs.
pub fn spec(spec: &Spec, rootfs: &Path) -> Result<(), String> {
    if !spec.version().starts_with("1.") {
        return Err(format!(
            "ociVersion {:?} is not supported (want 1.x)",
            spec.version()
        ));
    }
    check_clean_absolute(rootfs).map_err(|e| format!("rootfs: {e}"))?;
    match std::fs::metadata(rootfs) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("rootfs {rootfs:?} is not a directory")),
        Err(e) => return Err(format!("rootfs {rootfs:?}: {e}")),
    }
    let p = spec.process().as_ref().ok_or("the spec has no process")?;
    process(p)?;
    let linux = spec
        .linux()
        .as_ref()
        .ok_or("the spec has no linux section")?;
    let mut seen = Vec::new();
    for ns in linux.namespaces().iter().flatten() {
        let (flag, _) = ns_flag(ns.typ());
        if flag == libc::CLONE_NEWUSER && ns.path().is_none() {
            id_map("uid", linux.uid_mappings().as_ref())?;
            id_map("gid", linux.gid_mappings().as_ref())?;
        }
        if seen.contains(&flag) {
            return Err(format!("namespace {:?} is listed twice", ns.typ()));
        }
        seen.push(flag);
        if let Some(path) = ns.path() {
            check_clean_absolute(path).map_err(|e| format!("namespace path: {e}"))?;
            if !path.exists() {
                return Err(format!("namespace path {path:?} does not exist"));
            }
        }
    }
    if !seen.contains(&libc::CLONE_NEWNS) {
        return Err("a mount namespace is required".into());
    }
    let new_uts = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::Uts && n.path().is_none());
    if spec.hostname().as_deref().is_some_and(|h| !h.is_empty()) && !new_uts {
        return Err("unable to set hostname without a new UTS namespace".into());
    }
    if let Some(profile) = linux.seccomp() {
        crate::seccomp::compile(profile).map_err(|e| e.to_string())?;
    }
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination();
        check_clean_absolute(dest).map_err(|e| format!("mount destination: {e}"))?;
        resolve_in_root(rootfs, dest).map_err(|e| format!("mount destination: {e}"))?;
        let bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if bind {
            let src = m
                .source()
                .as_deref()
                .ok_or(format!("bind mount on {dest:?} has no source"))?;
            if !src.is_absolute() || !src.exists() {
                return Err(format!("bind mount source {src:?} does not exist"));
            }
        } else {
            let t = m.typ().as_deref().unwrap_or_default();
            if !MOUNT_TYPES.contains(&t) {
                return Err(format!("mount type {t:?} on {dest:?} is not supported"));
            }
        }
    }
    for d in linux.devices().iter().flatten() {
        check_clean_absolute(d.path()).map_err(|e| format!("device: {e}"))?;
        if !d.path().starts_with("/dev") {
            return Err(format!("device {:?} is not under /dev", d.path()));
        }
        // Type "a" is skipped when the devices are made.
        if d.typ() != LinuxDeviceType::A {
            crate::init::rootfs::device_numbers(d).map_err(|e| e.to_string())?;
        }
    }
    for p in linux
        .masked_paths()
        .iter()
        .flatten()
        .chain(linux.readonly_paths().iter().flatten())
    {
        check_clean_absolute(Path::new(p)).map_err(|e| format!("masked/readonly path: {e}"))?;
    }
    for k in linux.sysctl().iter().flatten().map(|(k, _)| k) {
        sysctl_key(k)?;
    }
    // linux.cgroupsPath is ignored: the agent names each container's
    // cgroup after its id, under its own base group.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(id("container", "abc-1_2.3").is_ok());
        for bad in ["", "-a", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(id("container", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_numbers_are_checked() {
        let numbers = |major: i64, minor: i64| {
            let d: oci_spec::runtime::LinuxDevice = serde_json::from_str(&format!(
                r#"{{"path":"/dev/x","type":"c","major":{major},"minor":{minor}}}"#
            ))
            .unwrap();
            crate::init::rootfs::device_numbers(&d).ok()
        };
        assert_eq!(numbers(1, 3), Some((1, 3)));
        assert_eq!(numbers(4095, 0xf_ffff), Some((4095, 0xf_ffff)));
        // 4097:1 would have been made as 1:1 (/dev/mem), 1:0x100000 as 1:0.
        for (major, minor) in [(4097, 1), (1, 0x10_0000), (-1, 3), (1, -1), (1 << 32, 3)] {
            assert_eq!(numbers(major, minor), None, "{major}:{minor}");
        }
    }

    #[test]
    fn sysctl_keys() {
        assert!(sysctl_key("net.ipv4.ip_forward").is_ok());
        for bad in ["", "net..x", "net/../x", "../../etc", "a.b/c"] {
            assert!(sysctl_key(bad).is_err(), "{bad:?}");
        }
    }
}
