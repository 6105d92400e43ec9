//! A [`VmSpec`] validated into a [`VmConfig`], whose fields the VMM can
//! trust. Every error names the field it is about, e.g.
//! `vcpus: must be between 1 and 64, got 0` or `kernel.path: /x: No such file`.

use std::collections::HashSet;
use std::fmt;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use crate::limits::*;
use crate::spec::{
    BalloonSpec, BlockSpec, FsSpec, KernelSpec, LogSpec, NetSpec, RateLimiterSpec, SerialKind,
    SerialSpec, TokenBucketSpec, VmSpec, VsockSpec,
};

/// An error in the VM description.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    File(PathBuf),
    None,
}

/// A validated VM description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub hugepages: bool,
    pub kernel: KernelConfig,
    pub serial: SerialOutput,
    pub console_limits: ConsoleLimits,
    pub block: Vec<BlockConfig>,
    pub vsock: Option<VsockConfig>,
    pub net: Vec<NetConfig>,
    pub fs: Vec<FsConfig>,
    pub rng: bool,
    pub balloon: Option<BalloonConfig>,
    pub control_socket: Option<PathBuf>,
    pub log: LogLimits,
}

/// Bounds on the guest console's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleLimits {
    pub max_bytes: u64,
    pub bytes_per_sec: u64,
}

impl Default for ConsoleLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_CONSOLE_MAX_BYTES,
            bytes_per_sec: DEFAULT_CONSOLE_BYTES_PER_SEC,
        }
    }
}

/// Bounds on the VMM's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    pub max_bytes: u64,
    pub burst: u32,
    pub interval_ms: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_LOG_MAX_BYTES,
            burst: DEFAULT_LOG_BURST,
            interval_ms: DEFAULT_LOG_INTERVAL_MS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    pub path: PathBuf,
    pub cmdline: String,
    pub initrd: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: Option<String>,
    /// None: unlimited.
    pub rate_limiter: Option<RateLimiterConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub id: String,
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    /// None: unlimited.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// None: unlimited.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// A virtio-fs device: a tag the guest mounts by, the backend's socket,
/// and its queues (request queues besides the high-priority one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    pub tag: String,
    pub socket: PathBuf,
    pub num_request_queues: u16,
    pub queue_size: u16,
}

/// A rate limiter with at least one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimiterConfig {
    pub bandwidth: Option<TokenBucketConfig>,
    pub ops: Option<TokenBucketConfig>,
}

/// A token bucket whose numbers are in range: a size and refill time of at
/// least 1, so the VMM's rate arithmetic never divides by zero, and at most
/// [`MAX_BUCKET_SIZE`] and [`MAX_REFILL_TIME_MS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucketConfig {
    pub size: NonZeroU64,
    pub one_time_burst: u64,
    pub refill_time_ms: NonZeroU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    pub free_page_reporting: bool,
}

impl VmConfig {
    /// Reads and validates the VM description at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates a VM description.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str::<VmSpec>(text)?.validate()
    }

    /// How many virtio-mmio devices the description asks for.
    pub fn virtio_device_count(&self) -> usize {
        self.block.len()
            + self.net.len()
            + self.fs.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + usize::from(self.balloon.is_some())
    }
}

impl VmSpec {
    /// Checks every field, naming the first bad one.
    pub fn validate(self) -> Result<VmConfig, ConfigError> {
        let vcpus = u8::try_from(self.vcpus)
            .ok()
            .filter(|n| (1..=MAX_VCPUS).contains(&u32::from(*n)))
            .ok_or_else(|| {
                invalid(
                    "vcpus",
                    format!("must be between 1 and {MAX_VCPUS}, got {}", self.vcpus),
                )
            })?;
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, got {}",
                    self.memory_mib
                ),
            ));
        }
        if self.hugepages && !self.memory_mib.is_multiple_of(2) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "must be a multiple of 2 with hugepages (2 MiB pages), got {}",
                    self.memory_mib
                ),
            ));
        }

        let kernel = self.kernel.validate()?;
        let (serial, console_limits) = validate_serial(self.serial)?;
        let log = self.log.unwrap_or_default().validate()?;

        let mut ids = HashSet::new();
        let mut unique_id = |field: String, id: &str| -> Result<(), ConfigError> {
            validate_id(&field, id)?;
            if !ids.insert(id.to_owned()) {
                return Err(invalid(field, format!("duplicate device id {id:?}")));
            }
            Ok(())
        };

        let mut block = Vec::with_capacity(self.block.len());
        for (i, b) in self.block.into_iter().enumerate() {
            unique_id(format!("block[{i}].id"), &b.id)?;
            block.push(b.validate(i)?);
        }
        let mut net = Vec::with_capacity(self.net.len());
        for (i, n) in self.net.into_iter().enumerate() {
            unique_id(format!("net[{i}].id"), &n.id)?;
            net.push(n.validate(i)?);
        }
        let mut tags = HashSet::new();
        let mut fs = Vec::with_capacity(self.fs.len());
        for (i, f) in self.fs.into_iter().enumerate() {
            if !tags.insert(f.tag.clone()) {
                return Err(invalid(
                    format!("fs[{i}].tag"),
                    format!("duplicate tag {:?}", f.tag),
                ));
            }
            fs.push(f.validate(i)?);
        }
        let vsock = self.vsock.map(VsockSpec::validate).transpose()?;
        let balloon = self
            .balloon
            .map(|b| b.validate(self.hugepages))
            .transpose()?;
        let control_socket = self
            .control_socket
            .map(|p| socket_path("control_socket", p))
            .transpose()?;

        let config = VmConfig {
            vcpus,
            memory_mib: self.memory_mib,
            hugepages: self.hugepages,
            kernel,
            serial,
            console_limits,
            block,
            vsock,
            net,
            fs,
            rng: self.rng,
            balloon,
            control_socket,
            log,
        };
        let devices = config.virtio_device_count();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "block",
                format!(
                    "{devices} virtio devices (block + net + fs + vsock + rng + balloon), at most {MAX_VIRTIO_DEVICES}"
                ),
            ));
        }
        Ok(config)
    }
}

impl KernelSpec {
    fn validate(self) -> Result<KernelConfig, ConfigError> {
        let path = existing_file("kernel.path", self.path)?;
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(invalid(
                "kernel.cmdline",
                format!("{} bytes, at most {MAX_CMDLINE_LEN}", self.cmdline.len()),
            ));
        }
        if let Some(c) = self
            .cmdline
            .chars()
            .find(|c| !c.is_ascii() || c.is_ascii_control())
        {
            return Err(invalid(
                "kernel.cmdline",
                format!("must be printable ASCII, found {c:?}"),
            ));
        }
        let initrd = self
            .initrd
            .map(|p| existing_file("kernel.initrd", p))
            .transpose()?;
        Ok(KernelConfig {
            path,
            cmdline: self.cmdline,
            initrd,
        })
    }
}

fn validate_serial(
    serial: Option<SerialSpec>,
) -> Result<(SerialOutput, ConsoleLimits), ConfigError> {
    let Some(serial) = serial else {
        return Ok((SerialOutput::Stdout, ConsoleLimits::default()));
    };
    let limits = ConsoleLimits {
        max_bytes: in_range(
            "serial.max_bytes",
            serial.max_bytes,
            DEFAULT_CONSOLE_MAX_BYTES,
            MIN_CONSOLE_MAX_BYTES..=MAX_CONSOLE_MAX_BYTES,
        )?,
        bytes_per_sec: in_range(
            "serial.bytes_per_sec",
            serial.bytes_per_sec,
            DEFAULT_CONSOLE_BYTES_PER_SEC,
            MIN_CONSOLE_BYTES_PER_SEC..=MAX_CONSOLE_BYTES_PER_SEC,
        )?,
    };
    let output = match (serial.output, serial.path) {
        (SerialKind::File, Some(p)) => SerialOutput::File(new_file_path("serial.path", p)?),
        (SerialKind::File, None) => {
            return Err(invalid("serial.path", "required with output \"file\""))
        }
        (_, Some(_)) => return Err(invalid("serial.path", "only allowed with output \"file\"")),
        (SerialKind::Stdout, None) => SerialOutput::Stdout,
        (SerialKind::None, None) => SerialOutput::None,
    };
    Ok((output, limits))
}

impl LogSpec {
    fn validate(self) -> Result<LogLimits, ConfigError> {
        Ok(LogLimits {
            max_bytes: in_range(
                "log.max_bytes",
                self.max_bytes,
                DEFAULT_LOG_MAX_BYTES,
                MIN_LOG_MAX_BYTES..=MAX_LOG_MAX_BYTES,
            )?,
            burst: in_range(
                "log.burst",
                self.burst,
                DEFAULT_LOG_BURST,
                1..=MAX_LOG_BURST,
            )?,
            interval_ms: in_range(
                "log.interval_ms",
                self.interval_ms,
                DEFAULT_LOG_INTERVAL_MS,
                MIN_LOG_INTERVAL_MS..=MAX_LOG_INTERVAL_MS,
            )?,
        })
    }
}

/// `value`, or `default` if absent; refused outside `range`.
fn in_range<T: Copy + PartialOrd + fmt::Display>(
    field: &str,
    value: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    let v = value.unwrap_or(default);
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(invalid(
            field,
            format!(
                "must be between {} and {}, got {v}",
                range.start(),
                range.end()
            ),
        ))
    }
}

impl FsSpec {
    fn validate(self, i: usize) -> Result<FsConfig, ConfigError> {
        let field = |name: &str| format!("fs[{i}].{name}");
        if self.tag.is_empty() || self.tag.len() > MAX_FS_TAG_LEN {
            return Err(invalid(
                field("tag"),
                format!(
                    "must be 1 to {MAX_FS_TAG_LEN} bytes, got {}",
                    self.tag.len()
                ),
            ));
        }
        if !self.tag.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                field("tag"),
                "must be printable ASCII without spaces",
            ));
        }
        let socket = socket_path(&field("socket"), self.socket)?;
        let num_request_queues = in_range(
            &field("num_request_queues"),
            self.num_request_queues,
            1,
            1..=MAX_FS_REQUEST_QUEUES,
        )?;
        let queue_size = in_range(
            &field("queue_size"),
            self.queue_size,
            MAX_FS_QUEUE_SIZE,
            1..=MAX_FS_QUEUE_SIZE,
        )?;
        if !queue_size.is_power_of_two() {
            return Err(invalid(
                field("queue_size"),
                format!("must be a power of two, got {queue_size}"),
            ));
        }
        Ok(FsConfig {
            tag: self.tag,
            socket,
            num_request_queues,
            queue_size,
        })
    }
}

impl BlockSpec {
    fn validate(self, i: usize) -> Result<BlockConfig, ConfigError> {
        let path = existing_file(format!("block[{i}].path"), self.path)?;
        if let Some(s) = &self.serial {
            if s.len() > MAX_BLOCK_SERIAL_LEN {
                return Err(invalid(
                    format!("block[{i}].serial"),
                    format!("{} bytes, at most {MAX_BLOCK_SERIAL_LEN}", s.len()),
                ));
            }
            if !s.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    format!("block[{i}].serial"),
                    "must be printable ASCII without spaces",
                ));
            }
        }
        let rate_limiter =
            validate_rate_limiter(&format!("block[{i}].rate_limiter"), self.rate_limiter)?;
        Ok(BlockConfig {
            id: self.id,
            path,
            read_only: self.read_only,
            serial: self.serial,
            rate_limiter,
        })
    }
}

impl VsockSpec {
    fn validate(self) -> Result<VsockConfig, ConfigError> {
        // 0-2 are the hypervisor, local and host CIDs; u32::MAX is VMADDR_CID_ANY.
        let guest_cid = u32::try_from(self.guest_cid)
            .ok()
            .filter(|cid| (MIN_GUEST_CID..u32::MAX).contains(cid))
            .ok_or_else(|| {
                invalid(
                    "vsock.guest_cid",
                    format!(
                        "must be between {MIN_GUEST_CID} and {}, got {}",
                        u32::MAX - 1,
                        self.guest_cid
                    ),
                )
            })?;
        let uds_path = socket_path("vsock.uds_path", self.uds_path)?;
        Ok(VsockConfig {
            guest_cid,
            uds_path,
        })
    }
}

impl BalloonSpec {
    fn validate(self, hugepages: bool) -> Result<BalloonConfig, ConfigError> {
        // Huge pages are reserved for the VM up front and reported 4 KiB
        // ranges could not be dropped from them: reporting would gain
        // nothing, so it is refused rather than silently useless.
        if self.free_page_reporting && hugepages {
            return Err(invalid(
                "balloon.free_page_reporting",
                "cannot give huge pages back to the host (hugepages is true)",
            ));
        }
        Ok(BalloonConfig {
            free_page_reporting: self.free_page_reporting,
        })
    }
}

impl NetSpec {
    fn validate(self, i: usize) -> Result<NetConfig, ConfigError> {
        let tap_ok = !self.tap.is_empty()
            && self.tap.len() <= MAX_TAP_NAME_LEN
            && !self.tap.contains(['/', ' ', '\0', ':']);
        if !tap_ok {
            return Err(invalid(
                format!("net[{i}].tap"),
                format!(
                    "{:?} is not an interface name (1 to {MAX_TAP_NAME_LEN} bytes, no '/', ':' or spaces)",
                    self.tap
                ),
            ));
        }
        let mac = self
            .mac
            .as_deref()
            .map(|m| parse_mac(m).map_err(|r| invalid(format!("net[{i}].mac"), r)))
            .transpose()?;
        let rx_rate_limiter =
            validate_rate_limiter(&format!("net[{i}].rx_rate_limiter"), self.rx_rate_limiter)?;
        let tx_rate_limiter =
            validate_rate_limiter(&format!("net[{i}].tx_rate_limiter"), self.tx_rate_limiter)?;
        Ok(NetConfig {
            id: self.id,
            tap: self.tap,
            mac,
            rx_rate_limiter,
            tx_rate_limiter,
        })
    }
}

/// A rate limiter's buckets; one with neither bucket limits nothing and
/// is None, as an absent one.
fn validate_rate_limiter(
    field: &str,
    spec: Option<RateLimiterSpec>,
) -> Result<Option<RateLimiterConfig>, ConfigError> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    let bucket = |name: &str, b: Option<TokenBucketSpec>| {
        b.map(|b| b.validate(&format!("{field}.{name}")))
            .transpose()
    };
    let config = RateLimiterConfig {
        bandwidth: bucket("bandwidth", spec.bandwidth)?,
        ops: bucket("ops", spec.ops)?,
    };
    Ok((config.bandwidth.is_some() || config.ops.is_some()).then_some(config))
}

impl TokenBucketSpec {
    fn validate(self, field: &str) -> Result<TokenBucketConfig, ConfigError> {
        let out_of_range = |name: &str, v: u64, lo: u64, hi: u64| {
            invalid(
                format!("{field}.{name}"),
                format!("must be between {lo} and {hi}, got {v}"),
            )
        };
        let positive = |name: &str, v: u64, hi: u64| {
            NonZeroU64::new(v)
                .filter(|n| n.get() <= hi)
                .ok_or_else(|| out_of_range(name, v, 1, hi))
        };
        let size = positive("size", self.size, MAX_BUCKET_SIZE)?;
        let refill_time_ms = positive("refill_time_ms", self.refill_time_ms, MAX_REFILL_TIME_MS)?;
        if self.one_time_burst > MAX_BUCKET_SIZE {
            return Err(out_of_range(
                "one_time_burst",
                self.one_time_burst,
                0,
                MAX_BUCKET_SIZE,
            ));
        }
        Ok(TokenBucketConfig {
            size,
            one_time_burst: self.one_time_burst,
            refill_time_ms,
        })
    }
}

fn validate_id(field: &str, id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{id:?} must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_-]"),
        ))
    }
}

/// A file the VMM reads: it must exist and not be a directory.
fn existing_file(field: impl Into<String>, path: PathBuf) -> Result<PathBuf, ConfigError> {
    let field = field.into();
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => Err(invalid(
            field,
            format!("{}: is a directory", path.display()),
        )),
        Ok(_) => Ok(path),
        Err(e) => Err(invalid(
            field,
            format!("{}: {}", path.display(), io_reason(&e)),
        )),
    }
}

/// A file the VMM creates: its parent directory must exist.
fn new_file_path(field: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(invalid(
            field,
            format!("{}: parent directory does not exist", path.display()),
        ));
    }
    Ok(path)
}

/// A socket the VMM binds: a new file whose path fits sun_path.
fn socket_path(field: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH_LEN {
        return Err(invalid(
            field,
            format!(
                "{}: {len} bytes, a socket path has at most {MAX_SOCKET_PATH_LEN}",
                path.display()
            ),
        ));
    }
    new_file_path(field, path)
}

/// "No such file" rather than "No such file or directory (os error 2)".
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "No such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => "Permission denied".to_owned(),
        _ => e.to_string(),
    }
}

/// Parses a unicast MAC address `xx:xx:xx:xx:xx:xx`.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC address like 02:00:00:00:00:01");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s:?} is a multicast address"));
    }
    Ok(mac)
}

impl fmt::Display for SerialOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOutput::Stdout => write!(f, "stdout"),
            SerialOutput::File(p) => write!(f, "file {}", p.display()),
            SerialOutput::None => write!(f, "none"),
        }
    }
}

#[cfg(test)]
mod tests;
