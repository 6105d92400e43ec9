//! The agent's request decoding and checks: a ttrpc request body (protobuf)
//! from the shim, decoded as the agent's service does, then the checks the
//! agent runs before it touches anything (ids, storage, the OCI spec JSON
//! against a container rootfs, the process JSON of an exec, the cgroup
//! writes a resources JSON plans). The first byte picks the request.
//!
//! The agent is a binary crate: its modules are compiled in here from
//! agent/src, as the crate root that their `crate::` paths need (only the
//! modules the checks reach).
#![no_main]
#![allow(dead_code, unused_imports, unused_macros)]

#[macro_use]
#[path = "../../agent/src/log.rs"]
mod log;
#[path = "../../agent/src/cgroup.rs"]
mod cgroup;
#[path = "../../agent/src/init/mod.rs"]
mod init;
#[path = "../../agent/src/paths.rs"]
mod paths;
#[path = "../../agent/src/seccomp.rs"]
mod seccomp;
#[path = "../../agent/src/stdio.rs"]
mod stdio;
#[path = "../../agent/src/storage.rs"]
mod storage;
#[path = "../../agent/src/sync.rs"]
mod sync;
#[path = "../../agent/src/sys.rs"]
mod sys;
#[path = "../../agent/src/syscalls_x86_64.rs"]
mod syscalls_x86_64;
#[path = "../../agent/src/validate.rs"]
mod validate;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use husk_protocols::agent as pb;
use husk_protocols::agent::create_container_request::Rootfs;
use husk_protocols::guest;
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use protobuf::Message;

/// A container rootfs to check specs against: a few directories and
/// symlinks, one of which leads out.
fn rootfs() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("husk-fuzz-rootfs-{}", std::process::id()));
        let _ = std::fs::create_dir_all(root.join("etc"));
        let _ = std::fs::create_dir_all(root.join("proc"));
        let _ = std::os::unix::fs::symlink("/etc", root.join("abs"));
        let _ = std::os::unix::fs::symlink("../../..", root.join("up"));
        root
    })
}

fn create(body: &[u8]) {
    let Ok(req) = pb::CreateContainerRequest::parse_from_bytes(body) else {
        return;
    };
    if validate::id("container", &req.container_id).is_err() {
        return;
    }
    match &req.rootfs {
        Some(Rootfs::RootfsStorage(s)) => {
            let target = PathBuf::from(guest::container_rootfs(&req.container_id));
            if storage::validate(&s.serial, &s.fstype, &target).is_err() {
                return;
            }
        }
        Some(Rootfs::RootfsPath(_)) => {}
        _ => return,
    }
    let Ok(spec) = serde_json::from_slice::<Spec>(&req.oci_spec_json) else {
        return;
    };
    if validate::spec(&spec, rootfs()).is_err() {
        return;
    }
    let linux = spec.linux().as_ref().expect("validate::spec wants linux");
    if let Some(r) = linux.resources() {
        let _ = cgroup::plan(r);
    }
    for ns in linux.namespaces().iter().flatten() {
        let _ = validate::ns_flag(ns.typ());
    }
    let _ = validate::id_map("uid", linux.uid_mappings().as_ref());
    let _ = validate::id_map("gid", linux.gid_mappings().as_ref());
}

fn exec(body: &[u8]) {
    let Ok(req) = pb::ExecProcessRequest::parse_from_bytes(body) else {
        return;
    };
    if validate::id("exec", &req.exec_id).is_err() {
        return;
    }
    if let Ok(p) = serde_json::from_slice::<Process>(&req.process_json) {
        let _ = validate::process(&p);
    }
}

fn update(body: &[u8]) {
    let Ok(req) = pb::UpdateContainerRequest::parse_from_bytes(body) else {
        return;
    };
    if let Ok(r) = serde_json::from_slice::<LinuxResources>(&req.resources_json) {
        let _ = cgroup::plan(&r);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => create(body),
        1 => exec(body),
        _ => update(body),
    }
});
