//! The husk runtime configuration (configs/configuration.toml documents
//! every key): where the shim finds it, parsing and validation into
//! [`Config`]. Every error names the key it is about.

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_vm_config::{limits, RateLimiterSpec, TokenBucketSpec};

use serde::Deserialize;

/// The configuration file when neither the runtime options nor the
/// environment name one.
pub const DEFAULT_PATH: &str = "/etc/husk/configuration.toml";
/// The environment variable that names the configuration file.
pub const ENV_VAR: &str = "HUSK_CONFIG";
/// Largest configuration file read.
const MAX_FILE: u64 = 1 << 20;
/// Longest `kernel_params`: half the command line the VMM takes; the shim's
/// own parameters use far less than the rest.
pub const MAX_KERNEL_PARAMS: usize = limits::MAX_CMDLINE_LEN / 2;
/// Every virtio device the VMM has room for, but the first container's disk,
/// vsock, rng and the most NICs a pod network has (and the balloon with
/// `free_page_reporting`: see [`max_pod_disk_slots`]).
#[allow(clippy::cast_possible_truncation)] // 12 fits
pub const MAX_POD_DISK_SLOTS: u32 = (limits::MAX_VIRTIO_DEVICES - 3 - MAX_INTERFACES) as u32;
/// At most this many network interfaces per pod (each is a virtio-net
/// device).
pub const MAX_INTERFACES: usize = 4;

/// The most pod disk slots a VM has room for: the balloon and the
/// virtio-fs device take one each.
pub fn max_pod_disk_slots(free_page_reporting: bool, virtio_fs: bool) -> u32 {
    MAX_POD_DISK_SLOTS - u32::from(free_page_reporting) - u32::from(virtio_fs)
}
/// Most threads of virtiofsd's pool.
pub const MAX_VIRTIOFSD_THREADS: u32 = 64;

/// How a container's volumes (the spec's bind mounts) reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedFs {
    /// Live, through the sandbox's virtio-fs share: writes reach the host
    /// at once, host changes reach the guest.
    Virtiofs,
    /// Copied into the guest at create time (files and small folders): a
    /// one-way snapshot, for hosts without virtiofsd.
    None,
}

/// How a container's root file system reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsMode {
    /// containerd's snapshot itself, through the virtio-fs share: start
    /// cost does not grow with the image.
    Virtiofs,
    /// An erofs image built per container, on a virtio-blk disk (with a
    /// tmpfs overlay in the guest).
    Block,
}

/// virtiofsd's cache policy (its `--cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtiofsdCache {
    Auto,
    Always,
    Never,
    Metadata,
}

impl VirtiofsdCache {
    pub fn as_str(self) -> &'static str {
        match self {
            VirtiofsdCache::Auto => "auto",
            VirtiofsdCache::Always => "always",
            VirtiofsdCache::Never => "never",
            VirtiofsdCache::Metadata => "metadata",
        }
    }
}

/// The sandbox's virtiofsd: where it is and how it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtiofsdConfig {
    pub path: PathBuf,
    pub cache: VirtiofsdCache,
    pub thread_pool_size: u32,
    pub xattr: bool,
}
/// Longest `state_dir`: `<state_dir>/<64-byte id>/run/ctl.sock` must be a
/// socket path the VMM can bind (CRI's ids are 64 bytes; a longer id gets
/// the VMM's error naming the socket path).
const MAX_STATE_DIR: usize = limits::MAX_SOCKET_PATH_LEN - "/".len() - 64 - "/run/ctl.sock".len();
/// Smallest guest RAM the shim asks for: the VMM boots a kernel in less,
/// but the agent and a container need this much.
const MIN_MEMORY_MIB: u64 = 64;
const _: () = assert!(MIN_MEMORY_MIB >= limits::MIN_MEMORY_MIB);
/// Default caps on a VM sized by its pod (`max_vcpus`, `max_memory_mib`).
const DEFAULT_MAX_VCPUS: u32 = 8;
const DEFAULT_MAX_MEMORY_MIB: u64 = 16 << 10;
/// The jailed VMM's default uid and gid: ids no account on the host uses
/// (Debian reserves 65000-65533 and never allocates them), so the VMMs
/// share them with no other process or file.
pub const DEFAULT_JAIL_ID: u32 = 65500;

/// The unprivileged user and group the VMM runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailUser {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the husk configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("husk configuration {path} is larger than 1 MiB")]
    TooLarge { path: PathBuf },
    #[error("husk configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("husk configuration {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// The file as written: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    vmm_path: Option<PathBuf>,
    kernel_path: Option<PathBuf>,
    initrd_path: Option<PathBuf>,
    kernel_params: Option<String>,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    max_vcpus: Option<u32>,
    max_memory_mib: Option<u64>,
    boot_timeout_secs: Option<u64>,
    request_timeout_secs: Option<u64>,
    log_level: Option<String>,
    debug_console: Option<bool>,
    template: Option<bool>,
    free_page_reporting: Option<bool>,
    state_dir: Option<PathBuf>,
    mkfs_erofs_path: Option<PathBuf>,
    rootfs_build_timeout_secs: Option<u64>,
    rootfs_image_max_mib: Option<u64>,
    pod_disk_slots: Option<u32>,
    pod_disk_slot_size_mib: Option<u64>,
    disk_bandwidth_bytes_per_sec: Option<u64>,
    disk_ops_per_sec: Option<u64>,
    net_rx_bytes_per_sec: Option<u64>,
    net_tx_bytes_per_sec: Option<u64>,
    jail: Option<bool>,
    sandbox_cgroup: Option<bool>,
    jail_uid: Option<u32>,
    jail_gid: Option<u32>,
    shared_fs: Option<String>,
    rootfs: Option<String>,
    virtiofsd: Option<PathBuf>,
    virtiofsd_cache: Option<String>,
    virtiofsd_thread_pool_size: Option<u32>,
    virtiofsd_xattr: Option<bool>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where it was read from (for messages).
    pub source: PathBuf,
    pub vmm_path: PathBuf,
    pub kernel_path: PathBuf,
    pub initrd_path: PathBuf,
    pub kernel_params: String,
    /// The VM's base vCPUs, before what the pod asks for.
    pub vcpus: u32,
    /// The VM's base memory (guest kernel, agent), before what the pod
    /// asks for.
    pub memory_mib: u64,
    /// Caps on a VM sized by its pod.
    pub max_vcpus: u32,
    pub max_memory_mib: u64,
    pub boot_timeout: Duration,
    pub request_timeout: Duration,
    pub log_level: log::LevelFilter,
    /// The guest console kept in console.log, and `husk exec` (the agent's
    /// ExecGuest) allowed.
    pub debug_console: bool,
    /// Start sandboxes by restoring a snapshot of a VM booted to its
    /// agent (one template per VM shape, under `<state_dir>/.templates`)
    /// rather than booting each.
    pub template: bool,
    /// Give the VM a virtio-balloon with free page reporting, so the
    /// memory its guest frees goes back to the host.
    pub free_page_reporting: bool,
    pub state_dir: PathBuf,
    pub mkfs_erofs_path: PathBuf,
    /// How long mkfs.erofs may take over one container's root.
    pub rootfs_build_timeout: Duration,
    /// The largest image it may write (and the sandbox's root image may be).
    pub rootfs_image_max_mib: u64,
    pub pod_disk_slots: u32,
    pub pod_disk_slot_size_mib: u64,
    /// The VMM's limit on each of the VM's disks; None: unlimited.
    pub disk_rate_limiter: Option<RateLimiterSpec>,
    /// The VMM's limits on what each NIC of the VM receives and sends;
    /// None: unlimited.
    pub net_rx_rate_limiter: Option<RateLimiterSpec>,
    pub net_tx_rate_limiter: Option<RateLimiterSpec>,
    /// The user the VMM runs as in its jail; `None`: no jail (`jail =
    /// false`, for debugging), the VMM runs as the shim does.
    pub jail: Option<JailUser>,
    /// Run the VMM in the sandbox's host cgroup, sized by the VM.
    pub sandbox_cgroup: bool,
    /// How volumes reach the guest.
    pub shared_fs: SharedFs,
    /// How root file systems reach the guest.
    pub rootfs: RootfsMode,
    pub virtiofsd: VirtiofsdConfig,
}

/// Picks the configuration file: the runtime option's path, else the
/// environment's, else the default.
pub fn choose_path(option_path: Option<&str>, env_path: Option<&str>) -> PathBuf {
    option_path
        .filter(|p| !p.is_empty())
        .or(env_path.filter(|p| !p.is_empty()))
        .unwrap_or(DEFAULT_PATH)
        .into()
}

/// Reads and validates the configuration at `path`, checking that the files
/// it names exist.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read(path)?;
    let cfg = parse(&text, path)?;
    cfg.check_files()?;
    Ok(cfg)
}

/// Reads the text of the configuration file at `path` (at most 1 MiB).
pub fn read(path: &Path) -> Result<String, ConfigError> {
    let read = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if meta.len() > MAX_FILE {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    std::fs::read_to_string(path).map_err(read)
}

/// The keys a configuration's text sets (for telling a value the file
/// gave from a default); empty if the text does not parse.
pub fn keys_set(text: &str) -> std::collections::BTreeSet<String> {
    toml::from_str::<toml::Table>(text)
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

/// Parses and validates the text of a configuration (no file checks).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', " "),
    })?;
    let invalid = |key: &'static str, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        message,
    };
    let abs = |key: &'static str, v: Option<PathBuf>, default: &str| {
        let p = v.unwrap_or_else(|| default.into());
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(invalid(
                key,
                format!(
                    "must be an absolute path, got {:?}",
                    p.display().to_string()
                ),
            ))
        }
    };
    let range = |key: &'static str, v: u64, lo: u64, hi: u64| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(invalid(
                key,
                format!("must be between {lo} and {hi}, got {v}"),
            ))
        }
    };
    // A rate: 0 (the default) is no limit; the VMM takes up to its
    // largest bucket.
    let rate =
        |key: &'static str, v: Option<u64>| range(key, v.unwrap_or(0), 0, limits::MAX_BUCKET_SIZE);
    let kernel_params = raw.kernel_params.unwrap_or_default();
    if kernel_params.len() > MAX_KERNEL_PARAMS {
        return Err(invalid(
            "kernel_params",
            format!(
                "at most {MAX_KERNEL_PARAMS} bytes, got {}",
                kernel_params.len()
            ),
        ));
    }
    if !kernel_params.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(invalid(
            "kernel_params",
            "must be printable ASCII on one line".into(),
        ));
    }
    let log_level = match raw.log_level.as_deref().unwrap_or("info") {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(invalid(
                "log_level",
                format!("must be error, warn, info, debug or trace, got {other:?}"),
            ))
        }
    };
    let state_dir = abs("state_dir", raw.state_dir, "/run/husk")?;
    let free_page_reporting = raw.free_page_reporting.unwrap_or(true);
    let shared_fs = match raw.shared_fs.as_deref().unwrap_or("virtiofs") {
        "virtiofs" => SharedFs::Virtiofs,
        "none" => SharedFs::None,
        other => {
            return Err(invalid(
                "shared_fs",
                format!("must be virtiofs or none, got {other:?}"),
            ))
        }
    };
    let rootfs = match raw.rootfs.as_deref().unwrap_or("virtiofs") {
        "virtiofs" => RootfsMode::Virtiofs,
        "block" => RootfsMode::Block,
        other => {
            return Err(invalid(
                "rootfs",
                format!("must be virtiofs or block, got {other:?}"),
            ))
        }
    };
    let virtio_fs = shared_fs == SharedFs::Virtiofs || rootfs == RootfsMode::Virtiofs;
    let cache = match raw.virtiofsd_cache.as_deref().unwrap_or("auto") {
        "auto" => VirtiofsdCache::Auto,
        "always" => VirtiofsdCache::Always,
        "never" => VirtiofsdCache::Never,
        "metadata" => VirtiofsdCache::Metadata,
        other => {
            return Err(invalid(
                "virtiofsd_cache",
                format!("must be auto, always, never or metadata, got {other:?}"),
            ))
        }
    };
    let virtiofsd = VirtiofsdConfig {
        path: abs("virtiofsd", raw.virtiofsd, "/usr/local/bin/virtiofsd")?,
        cache,
        thread_pool_size: u32::try_from(range(
            "virtiofsd_thread_pool_size",
            raw.virtiofsd_thread_pool_size.unwrap_or(0).into(),
            0,
            MAX_VIRTIOFSD_THREADS.into(),
        )?)
        .unwrap_or(0),
        xattr: raw.virtiofsd_xattr.unwrap_or(false),
    };
    // <state_dir>/<64-hex sandbox id>/ctl.sock must fit sun_path.
    if state_dir.as_os_str().len() > MAX_STATE_DIR {
        return Err(invalid(
            "state_dir",
            format!(
                "at most {MAX_STATE_DIR} bytes (the VMM's socket paths under it must fit 107), got {}",
                state_dir.as_os_str().len()
            ),
        ));
    }
    let vcpus = u32::try_from(range(
        "vcpus",
        raw.vcpus.unwrap_or(1).into(),
        1,
        limits::MAX_VCPUS.into(),
    )?)
    .unwrap_or(1);
    let memory_mib = range(
        "memory_mib",
        raw.memory_mib.unwrap_or(256),
        MIN_MEMORY_MIB,
        limits::MAX_MEMORY_MIB,
    )?;
    let max_vcpus = u32::try_from(range(
        "max_vcpus",
        raw.max_vcpus.unwrap_or(DEFAULT_MAX_VCPUS.max(vcpus)).into(),
        vcpus.into(),
        limits::MAX_VCPUS.into(),
    )?)
    .unwrap_or(vcpus);
    let max_memory_mib = range(
        "max_memory_mib",
        raw.max_memory_mib
            .unwrap_or(DEFAULT_MAX_MEMORY_MIB.max(memory_mib)),
        memory_mib,
        limits::MAX_MEMORY_MIB,
    )?;
    let template = raw.template.unwrap_or(false);
    let jail = match (raw.jail.unwrap_or(true), raw.jail_uid, raw.jail_gid) {
        (false, _, _) => None,
        (true, None, None) => Some(JailUser {
            uid: DEFAULT_JAIL_ID,
            gid: DEFAULT_JAIL_ID,
        }),
        (true, Some(_), None) => {
            return Err(invalid("jail_gid", "must be set with jail_uid".into()))
        }
        (true, None, Some(_)) => {
            return Err(invalid("jail_uid", "must be set with jail_gid".into()))
        }
        (true, Some(uid), Some(gid)) => Some(JailUser {
            uid: jail_id("jail_uid", uid).map_err(|m| invalid("jail_uid", m))?,
            gid: jail_id("jail_gid", gid).map_err(|m| invalid("jail_gid", m))?,
        }),
    };
    Ok(Config {
        source: path.to_path_buf(),
        vmm_path: abs("vmm_path", raw.vmm_path, "/usr/local/bin/husk-vmm")?,
        kernel_path: abs("kernel_path", raw.kernel_path, "/usr/share/husk/bzImage")?,
        initrd_path: abs(
            "initrd_path",
            raw.initrd_path,
            "/usr/share/husk/husk-agent.initrd",
        )?,
        kernel_params,
        vcpus,
        memory_mib,
        max_vcpus,
        max_memory_mib,
        boot_timeout: Duration::from_secs(range(
            "boot_timeout_secs",
            raw.boot_timeout_secs.unwrap_or(60),
            1,
            3600,
        )?),
        request_timeout: Duration::from_secs(range(
            "request_timeout_secs",
            raw.request_timeout_secs.unwrap_or(30),
            1,
            3600,
        )?),
        log_level,
        debug_console: raw.debug_console.unwrap_or(false),
        template,
        free_page_reporting,
        state_dir,
        mkfs_erofs_path: abs(
            "mkfs_erofs_path",
            raw.mkfs_erofs_path,
            "/usr/bin/mkfs.erofs",
        )?,
        rootfs_build_timeout: Duration::from_secs(range(
            "rootfs_build_timeout_secs",
            raw.rootfs_build_timeout_secs.unwrap_or(300),
            1,
            86_400,
        )?),
        rootfs_image_max_mib: range(
            "rootfs_image_max_mib",
            raw.rootfs_image_max_mib.unwrap_or(16 << 10),
            16,
            1 << 20,
        )?,
        pod_disk_slots: u32::try_from(range(
            "pod_disk_slots",
            raw.pod_disk_slots.unwrap_or(4).into(),
            0,
            max_pod_disk_slots(free_page_reporting, virtio_fs).into(),
        )?)
        .unwrap_or(0),
        pod_disk_slot_size_mib: range(
            "pod_disk_slot_size_mib",
            raw.pod_disk_slot_size_mib.unwrap_or(2048),
            16,
            1 << 20,
        )?,
        disk_rate_limiter: per_second_limiter(
            rate(
                "disk_bandwidth_bytes_per_sec",
                raw.disk_bandwidth_bytes_per_sec,
            )?,
            rate("disk_ops_per_sec", raw.disk_ops_per_sec)?,
        ),
        net_rx_rate_limiter: per_second_limiter(
            rate("net_rx_bytes_per_sec", raw.net_rx_bytes_per_sec)?,
            0,
        ),
        net_tx_rate_limiter: per_second_limiter(
            rate("net_tx_bytes_per_sec", raw.net_tx_bytes_per_sec)?,
            0,
        ),
        jail,
        sandbox_cgroup: raw.sandbox_cgroup.unwrap_or(true),
        shared_fs,
        rootfs,
        virtiofsd,
    })
}

/// A jail uid or gid: not root's, and not -1 (which set*id(2) read as
/// "leave unchanged": the VMM would stay root).
fn jail_id(key: &str, id: u32) -> Result<u32, String> {
    match id {
        0 => Err(format!(
            "{key} 0 is root's: the jail is there to run the VMM unprivileged"
        )),
        u32::MAX => Err(format!("{key} {id} is -1, which set*id(2) ignores")),
        id => Ok(id),
    }
}

/// A rate limiter of `bytes` and `ops` per second (0: no limit on that),
/// None when neither is limited. Each bucket holds one second's worth: a
/// device idle for a second may go that far at full speed, and over any
/// longer time the rate holds.
fn per_second_limiter(bytes: u64, ops: u64) -> Option<RateLimiterSpec> {
    let bucket = |per_sec: u64| {
        (per_sec > 0).then_some(TokenBucketSpec {
            size: per_sec,
            one_time_burst: 0,
            refill_time_ms: 1000,
        })
    };
    let spec = RateLimiterSpec {
        bandwidth: bucket(bytes),
        ops: bucket(ops),
    };
    (spec.bandwidth.is_some() || spec.ops.is_some()).then_some(spec)
}

/// What is wrong with a file the configuration names, if anything: it
/// must be a regular file, and executable if `exec`.
pub fn file_problem(path: &Path, exec: bool) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Some("is not a regular file".to_string()),
        Ok(m) if exec && m.permissions().mode() & 0o111 == 0 => {
            Some("is not executable".to_string())
        }
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

impl Config {
    /// The files the configuration names: (key, path, must be executable).
    /// virtiofsd's only when something uses virtio-fs.
    pub fn files(&self) -> Vec<(&'static str, &Path, bool)> {
        let mut files = vec![
            ("vmm_path", self.vmm_path.as_path(), true),
            ("kernel_path", self.kernel_path.as_path(), false),
            ("initrd_path", self.initrd_path.as_path(), false),
            ("mkfs_erofs_path", self.mkfs_erofs_path.as_path(), true),
        ];
        if self.uses_virtio_fs() {
            files.push(("virtiofsd", self.virtiofsd.path.as_path(), true));
        }
        files
    }

    /// Checks that the files the configuration names are there.
    fn check_files(&self) -> Result<(), ConfigError> {
        let files = self.files();
        for (key, path, exec) in files {
            if let Some(message) = file_problem(path, exec) {
                return Err(ConfigError::Invalid {
                    path: self.source.clone(),
                    key,
                    message: format!("{}: {message}", path.display()),
                });
            }
        }
        if self.jail.is_some() {
            crate::elf::check_static(&self.vmm_path).map_err(|e| ConfigError::Invalid {
                path: self.source.clone(),
                key: "vmm_path",
                message: format!("jail: {e} (the jail holds no shared libraries; set jail = false to run a dynamic one)"),
            })?;
        }
        Ok(())
    }

    /// Whether sandboxes get a virtio-fs share (and a virtiofsd): for
    /// volumes, root file systems, or both.
    pub fn uses_virtio_fs(&self) -> bool {
        self.shared_fs == SharedFs::Virtiofs || self.rootfs == RootfsMode::Virtiofs
    }

    /// Whether a new VM boots with the first container's image as its root
    /// disk (`rootfs = "block"`). Not with templates: the disk would be
    /// part of the template's VM, whose guest probed another image. A
    /// templated VM boots with one more pod disk slot instead, and the
    /// first container's image goes into it after the boot (or restore),
    /// as a later pod container's does.
    pub fn root_disk_at_boot(&self) -> bool {
        self.rootfs == RootfsMode::Block && !self.template
    }

    /// Whether the first container's image goes into a pod disk slot (see
    /// [`Config::root_disk_at_boot`]).
    pub fn first_image_in_slot(&self) -> bool {
        self.rootfs == RootfsMode::Block && self.template
    }

    /// Size of a pod disk slot in bytes.
    pub fn slot_bytes(&self) -> u64 {
        self.pod_disk_slot_size_mib << 20
    }
}

#[cfg(test)]
mod tests;
