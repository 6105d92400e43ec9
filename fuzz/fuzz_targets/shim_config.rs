//! The shim's configuration (TOML) and VM sizing: the input is a
//! configuration, then a NUL byte, then a JSON spec whose sizing
//! annotations and limits (CRI's pod totals, a container's limits) size the
//! VM and reserve a container's share of it.
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

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |&b| b == 0);
    let Ok(text) = std::str::from_utf8(parts.next().unwrap_or_default()) else {
        return;
    };
    let Ok(cfg) = config::parse(text, Path::new("/etc/husk/config.toml")) else {
        return;
    };
    let _ = config::max_pod_disk_slots(cfg.free_page_reporting, cfg.uses_virtio_fs());
    let spec = parts
        .next()
        .and_then(|j| serde_json::from_slice::<Value>(j).ok())
        .unwrap_or(Value::Null);
    let pod = sizing::Limits::of_pod(&spec).unwrap_or_default();
    let size = sizing::size(&cfg, pod);
    assert!(size.vcpus <= cfg.max_vcpus.max(cfg.vcpus));
    assert!(size.reservable_mib <= size.memory_mib);
    let mut r = sizing::Reservations::new(size);
    if let Ok(c) = sizing::Limits::of_container(&spec) {
        let _ = r.reserve("c1", c);
        let _ = r.reserve("c2", c);
        r.release("c1");
    }
});
