//! What the shim and the agent agree on besides the API calls: where the
//! agent listens, how much entropy CreateSandbox carries, how the host's
//! disks are named, and the guest's paths the shim writes into a
//! container's spec.

/// The agent's vsock port, unless the kernel command line's
/// [`AGENT_PORT_PARAM`] says otherwise.
pub const AGENT_PORT: u32 = 1024;
/// The kernel command-line parameter naming the agent's vsock port.
pub const AGENT_PORT_PARAM: &str = "husk.agent_port";

/// The sizes of CreateSandbox's `entropy` the agent takes, in bytes: at
/// least a CRNG key's worth (256 bits), at most what one request needs.
pub const ENTROPY_MIN: usize = 32;
pub const ENTROPY_MAX: usize = 512;
/// What the shim sends: twice the minimum, from the host's getrandom(2).
pub const ENTROPY_SENT: usize = 64;

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
/// The pod's /dev/shm: a tmpfs the agent mounts at CreateSandbox (mode
/// 1777, 64 MiB, CRI's default size), which the shim binds at /dev/shm in
/// each container of the pod in place of CRI's host /dev/shm, so that the
/// pod's containers share it as they share its IPC namespace.
pub const POD_SHM_DIR: &str = "/run/husk/shm";
/// Its size and mode, as tmpfs options.
pub const POD_SHM_OPTIONS: &str = "mode=1777,size=65536k";
/// Where the agent puts each container's state, under the container's id.
pub const CONTAINERS_DIR: &str = "/run/husk/containers";

/// The virtio-fs tag of the sandbox's shared folder (the host's
/// `<state folder>/shared`, served by the sandbox's virtiofsd).
pub const SHARED_FS_TAG: &str = "husk-shared";
/// Where the agent mounts the shared folder (once, at CreateSandbox).
pub const SHARED_DIR: &str = "/run/husk/shared";
/// A container's folder in the shared folder is its id; in it, its root
/// file system is this folder...
pub const SHARED_ROOTFS: &str = "rootfs";
/// ...and its volumes are numbered in this folder (`volumes/0`, ...), in
/// the order of the spec's bind mounts.
pub const SHARED_VOLUMES: &str = "volumes";

/// The guest path of container `id`'s root file system in the shared
/// folder.
pub fn shared_rootfs(id: &str) -> String {
    format!("{SHARED_DIR}/{id}/{SHARED_ROOTFS}")
}

/// The guest path of container `id`'s volume `n` in the shared folder.
pub fn shared_volume(id: &str, n: usize) -> String {
    format!("{SHARED_DIR}/{id}/{SHARED_VOLUMES}/{n}")
}

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
        assert_eq!(shared_rootfs("c1"), "/run/husk/shared/c1/rootfs");
        assert_eq!(shared_volume("c1", 3), "/run/husk/shared/c1/volumes/3");
        // The tag fits virtio-fs's 36-byte config field.
        assert!(SHARED_FS_TAG.len() <= 36);
        // A serial fits virtio-blk's 20 bytes with any slot number we use.
        assert!(slot_disk_serial(99).len() <= 20 && ROOT_DISK_SERIAL.len() <= 20);
    }
}
