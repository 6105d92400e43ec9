//! `containerd-shim-husk-v2`: containerd's runtime `io.containerd.husk.v2`.
//! Runs each container (or each Kubernetes pod) in a husk micro-VM: one VM
//! per sandbox, the container's root file system as a read-only erofs disk,
//! the agent in the guest driven over vsock. See README.md.
//!
//! Modules: `config` (configuration file), `options` (runtime options),
//! `spec` (bundle, CRI grouping, spec for the guest), `sizing` (the VM's
//! size from the pod's or container's limits), `rootfs` (mounts,
//! erofs images, pod disk slots), `sandbox` (the VM: state folder, VM
//! description, the husk-vmm process and its control socket, teardown),
//! `vsock` (hybrid vsock handshake), `agent` (the agent client), `io`
//! (stdio threads), `process` (process state), `events` (events to
//! containerd), `service` (the task API), `marker` (the bundle file `shim
//! delete` reads), `shim` (start/delete and the shim lifecycle), `sync`
//! (the lock helper).

mod agent;
mod config;
mod events;
mod io;
mod marker;
mod metrics;
mod network;
mod options;
mod process;
mod rootfs;
mod sandbox;
mod service;
mod shared;
mod shim;
mod sizing;
mod spec;
mod sync;
mod tool;

fn main() {
    let cfg = containerd_shim::Config {
        // Every child of the shim (the VMMs, mkfs.erofs) is waited for by
        // whoever started it: the framework's reaper would steal their
        // exit statuses.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<shim::HuskShim>("io.containerd.husk.v2", Some(cfg));
}
