//! What the shim and the agent agree on besides the API calls: where the
//! agent listens, how the host's disks are named, and the guest's paths the
//! shim writes into a container's spec.

/// The agent's vsock port, unless the kernel command line's
/// [`AGENT_PORT_PARAM`] says otherwise.
pub const AGENT_PORT: u32 = 1024;
/// The kernel command-line parameter naming the agent's vsock port.
pub const AGENT_PORT_PARAM: &str = "husk.agent_port";

/// The virtio-blk serial of the sandbox's first container's disk.
pub const ROOT_DISK_SERIAL: &str = "husk-root";
/// The virtio-blk serials of pod disk slots: this prefix, then the slot
/// number from 1.
pub const SLOT_DISK_SERIAL_PREFIX: &str = "husk-slot";

/// The virtio-blk serial of pod disk slot `n` (from 1).
pub fn slot_disk_serial(n: usize) -> String {
    format!("{SLOT_DISK_SERIAL_PREFIX}{n}")
}

/// Where the agent puts files the shim copies in from the host (a
/// container's /etc/hosts, resolv.conf, ...).
pub const HOST_FILES_DIR: &str = "/run/husk/host";
/// Where the agent puts each container's state, under the container's id.
pub const CONTAINERS_DIR: &str = "/run/husk/containers";

/// The guest path of container `id`'s root filesystem.
pub fn container_rootfs(id: &str) -> String {
    format!("{CONTAINERS_DIR}/{id}/rootfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(slot_disk_serial(3), "husk-slot3");
        assert_eq!(container_rootfs("c1"), "/run/husk/containers/c1/rootfs");
        // A serial fits virtio-blk's 20 bytes with any slot number we use.
        assert!(slot_disk_serial(99).len() <= 20 && ROOT_DISK_SERIAL.len() <= 20);
    }
}
