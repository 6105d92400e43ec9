//! The VM description as written (`vm.json`): what the shim serializes and
//! the VMM parses. Unknown fields are refused; absent optional fields take
//! the defaults below, and are left out when serialized. Nothing here is
//! checked: [`VmSpec::validate`](crate::VmSpec::validate) does that.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A VM: its size, kernel and devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub hugepages: bool,
    pub kernel: KernelSpec,
    /// Where the guest's serial console goes; stdout if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block: Vec<BlockSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetSpec>,
    /// virtio-fs devices, each served by a vhost-user backend (virtiofsd).
    /// With any, guest RAM is a shared memfd mapping the backends map too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsSpec>,
    /// A virtio-rng device fed from the host's getrandom(2).
    #[serde(default, skip_serializing_if = "is_false")]
    pub rng: bool,
    /// A virtio-balloon device; absent, none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonSpec>,
    /// Where the VMM serves its control socket ([`crate::control`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Bounds on the VMM's own log (its stderr); defaults if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSpec {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialKind {
    Stdout,
    File,
    None,
}

/// `{"output": "file", "path": ...}`, `{"output": "stdout"}` or
/// `{"output": "none"}`, optionally with `max_bytes` and `bytes_per_sec`
/// (the guest writes this output: both bound what it can make the host
/// store; [`crate::limits`] has the defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSpec {
    pub output: SerialKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Most bytes written in all; later output is dropped and counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Most bytes written per second (a token bucket holding one second's
    /// worth); the excess is dropped and counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<u64>,
}

impl SerialSpec {
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            output: SerialKind::File,
            path: Some(path.into()),
            max_bytes: None,
            bytes_per_sec: None,
        }
    }

    pub fn none() -> Self {
        Self {
            output: SerialKind::None,
            path: None,
            max_bytes: None,
            bytes_per_sec: None,
        }
    }
}

/// The VMM's log (stderr): its size cap and how lines the guest causes
/// (bad register accesses, bad descriptors, failed requests) are rate
/// limited: per kind, the first `burst` lines, then one per `interval_ms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
}

/// A virtio-blk disk backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockSpec {
    pub id: String,
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// What the guest reads as the disk's serial (VIRTIO_BLK_T_GET_ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Limits on the guest's requests: bytes read or written, and requests;
    /// absent, unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterSpec>,
}

/// A virtio-vsock device, served on the host as a hybrid vsock Unix socket
/// (Firecracker's: `CONNECT <port>\n` to reach a guest port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    /// u64 so that a value out of u32's range gets a clear error.
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// A virtio-fs device whose requests a vhost-user backend (virtiofsd)
/// serves: the VMM connects to `socket` and hands the backend guest memory
/// and the request queues. The guest mounts it with `mount -t virtiofs
/// <tag> <dir>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsSpec {
    pub tag: String,
    /// The backend's vhost-user socket, listening when the VMM starts.
    pub socket: PathBuf,
    /// Request queues (besides the high-priority queue); 1 if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_request_queues: Option<u16>,
    /// Descriptors per queue, a power of two; 1024 if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
}

/// A virtio-net device on a host tap interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    pub id: String,
    pub tap: String,
    /// `xx:xx:xx:xx:xx:xx`; the guest picks one if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Limits on the frames the guest receives (bytes, frames); absent,
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterSpec>,
    /// Limits on the frames the guest sends (bytes, frames); absent,
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterSpec>,
}

/// Rate limits of one device path, as Firecracker's: a token bucket of
/// bytes and one of operations (requests or frames), each optional. An
/// operation goes ahead when both buckets hold enough tokens; otherwise the
/// device stops taking requests until the buckets have refilled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketSpec>,
}

/// A token bucket: it holds up to `size` tokens, starts full, and refills
/// from empty to full in `refill_time_ms` (a rate of `size` tokens per
/// `refill_time_ms`). `one_time_burst` tokens more are there at the start
/// and never refill. An operation larger than `size` still goes ahead once
/// the bucket is full, and the bucket then stays empty for as long as the
/// excess takes to refill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketSpec {
    pub size: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub one_time_burst: u64,
    pub refill_time_ms: u64,
}

/// A virtio-balloon device. husk never inflates it; it is there for free
/// page reporting, by which the guest hands the pages it frees back to the
/// host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonSpec {
    /// Offer VIRTIO_BALLOON_F_REPORTING.
    #[serde(default, skip_serializing_if = "is_false")]
    pub free_page_reporting: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
