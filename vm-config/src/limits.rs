//! The VMM's limits. The shim sizes what it asks for from these, so a
//! configuration the VMM would refuse is refused when it is read.

/// Most vCPUs a VM may have (the guest kernel's NR_CPUS, and well below the
/// 8-bit APIC id space the MP table uses).
pub const MAX_VCPUS: u32 = 64;
/// Smallest guest RAM: room for the kernel, the initrd and early allocations.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest guest RAM (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Longest kernel command line the VMM accepts (x86 COMMAND_LINE_SIZE is 2048
/// with the NUL; the rest is headroom for the devices the VMM appends).
pub const MAX_CMDLINE_LEN: usize = 1024;
/// Virtio-mmio devices get IRQs 5..=23 (the IOAPIC has 24 pins).
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Longest virtio-blk serial (VIRTIO_BLK_ID_BYTES).
pub const MAX_BLOCK_SERIAL_LEN: usize = 20;
/// Longest virtio-fs tag (the config space's `tag` field, 36 bytes).
pub const MAX_FS_TAG_LEN: usize = 36;
/// Most virtio-fs request queues a device may have.
pub const MAX_FS_REQUEST_QUEUES: u16 = 16;
/// Largest virtio-fs queue (descriptors), and the default.
pub const MAX_FS_QUEUE_SIZE: u16 = 1024;
/// Longest tap interface name (IFNAMSIZ - 1).
pub const MAX_TAP_NAME_LEN: usize = 15;
/// Longest device id.
pub const MAX_ID_LEN: usize = 32;
/// Longest path of a Unix socket the VMM binds (sun_path is 108 bytes with
/// the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// Smallest guest vsock context id: 0-2 are the hypervisor, local and host.
pub const MIN_GUEST_CID: u32 = 3;
/// Largest rate-limiter token bucket (`size` and `one_time_burst`), in bytes
/// or operations: 1 TiB, far above any real limit, so that a value past it
/// is a mistake (a unit confused, a digit too many) and is refused.
pub const MAX_BUCKET_SIZE: u64 = 1 << 40;
/// Longest rate-limiter refill time: one hour.
pub const MAX_REFILL_TIME_MS: u64 = 3_600_000;

/// The VMM's log (stderr, a file the shim keeps in host memory): its
/// default size cap and the range a description may ask for.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 4 << 20;
pub const MIN_LOG_MAX_BYTES: u64 = 64 << 10;
pub const MAX_LOG_MAX_BYTES: u64 = 1 << 30;
/// Guest-caused log lines per kind: the first `burst`, then one per
/// interval.
pub const DEFAULT_LOG_BURST: u32 = 10;
pub const MAX_LOG_BURST: u32 = 10_000;
pub const DEFAULT_LOG_INTERVAL_MS: u64 = 1000;
pub const MIN_LOG_INTERVAL_MS: u64 = 10;
pub const MAX_LOG_INTERVAL_MS: u64 = 3_600_000;
/// The guest console's output: its default size cap and rate, and their
/// ranges.
pub const DEFAULT_CONSOLE_MAX_BYTES: u64 = 4 << 20;
pub const MIN_CONSOLE_MAX_BYTES: u64 = 4 << 10;
pub const MAX_CONSOLE_MAX_BYTES: u64 = 1 << 30;
pub const DEFAULT_CONSOLE_BYTES_PER_SEC: u64 = 256 << 10;
pub const MIN_CONSOLE_BYTES_PER_SEC: u64 = 1 << 10;
pub const MAX_CONSOLE_BYTES_PER_SEC: u64 = 1 << 30;
