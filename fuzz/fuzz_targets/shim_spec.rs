//! The shim's spec rewriting: an OCI spec (config.json, from containerd and
//! the image) in, the spec the guest gets out, plus what the shim reads of
//! it (network namespace, hostname, root path, sizing limits and
//! annotations). Host paths are not looked at: bind-mount sources are
//! classified from their name (`file`, `dir`, `empty`, `big` in it), so
//! every branch of the mount policy is reachable.
//!
//! The shim is a binary crate: spec.rs, config.rs and sizing.rs are compiled
//! in here from shim-v2/src as the crate root their `crate::` paths need.
#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../shim-v2/src/config.rs"]
mod config;
#[path = "../../shim-v2/src/network/mod.rs"]
mod network;
#[path = "../../shim-v2/src/sizing.rs"]
mod sizing;
/// What config.rs and network/ take from the sandbox module.
#[path = "../../shim-v2/src/sandbox"]
mod sandbox {
    pub mod jail;
}
#[path = "../../shim-v2/src/spec.rs"]
mod spec;

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use spec::HostKind;

fn inspect(path: &Path) -> HostKind {
    let s = path.to_string_lossy();
    if s.contains("big") {
        HostKind::File {
            size: spec::MAX_COPY_BYTES + 1,
        }
    } else if s.contains("file") {
        HostKind::File { size: 10 }
    } else if s.contains("empty") {
        HostKind::EmptyDir
    } else if s.contains("dir") {
        HostKind::Dir {
            files: vec![(PathBuf::from("a"), 1), (PathBuf::from("b/c"), 2)],
            total: 3,
        }
    } else {
        HostKind::Other("not a regular file or directory".into())
    }
}

fn kind(path: &Path) -> spec::SourceKind {
    let s = path.to_string_lossy();
    if s.contains("dir") {
        spec::SourceKind::Dir
    } else if s.contains("file") {
        spec::SourceKind::File
    } else {
        spec::SourceKind::Refused("a socket".into())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let _ = spec::network_namespace(&value);
    let _ = spec::hostname(&value);
    let _ = sizing::Limits::of_pod(&value).map(|l| (l.vcpus(), l.memory_mib()));
    let _ = sizing::Limits::of_container(&value).map(|l| (l.vcpus(), l.memory_mib()));
    for terminal in [false, true] {
        if let Ok(out) = spec::for_guest(&value, terminal, inspect) {
            let out: Value = serde_json::from_slice(&out.json).expect("the rewritten spec is JSON");
            assert!(out.get("hooks").is_none(), "hooks reach the guest");
            // Rewriting is idempotent on what it changes: the guest's spec
            // rewritten again binds nothing new from the host.
            if let Ok(again) =
                spec::for_guest(&out, terminal, |_| HostKind::Other("a guest path".into()))
            {
                assert!(again.copies.is_empty());
            }
        }
        // Shared volumes: numbered in order, each source rewritten to its
        // guest path in the share.
        if let Ok(out) = spec::for_guest_shared(&value, terminal, "c1", kind) {
            let json: Value = serde_json::from_slice(&out.json).expect("the rewritten spec is JSON");
            assert!(json.get("hooks").is_none(), "hooks reach the guest");
            for (n, v) in out.volumes.iter().enumerate() {
                assert_eq!(v.index, n);
                let guest = husk_protocols::guest::shared_volume("c1", n);
                let found = json["mounts"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["source"] == guest.as_str()));
                assert!(found, "volume {n} is not in the guest's spec");
            }
        }
    }
});
