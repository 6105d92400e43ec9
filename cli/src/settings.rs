//! Which runtime configuration the `husk` command reads, and where each of
//! its values came from: the file the shim would read (the `--config`
//! option, else `HUSK_CONFIG`, else the path containerd's configuration
//! gives the husk runtime as `ConfigPath`, else the default) and, key by
//! key, whether that file set the value or it is the default.

use std::path::{Path, PathBuf};

use husk_runtime_config::config::{self, Config, ConfigError, DEFAULT_PATH, ENV_VAR};
use serde::Serialize;

/// Where the configuration file's path came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathOrigin {
    /// `husk --config`.
    Option,
    /// The `HUSK_CONFIG` environment variable.
    Env,
    /// The husk runtime's `ConfigPath` in containerd's configuration.
    Containerd(PathBuf),
    Default,
}

impl std::fmt::Display for PathOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Option => write!(f, "--config"),
            Self::Env => write!(f, "environment {ENV_VAR}"),
            Self::Containerd(p) => write!(f, "ConfigPath in {}", p.display()),
            Self::Default => write!(f, "default"),
        }
    }
}

/// The configuration file chosen, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chosen {
    pub path: PathBuf,
    pub origin: PathOrigin,
}

/// Picks the configuration file as the shim would for the husk runtime.
pub fn choose(
    option: Option<&Path>,
    env: Option<&str>,
    containerd: Option<(PathBuf, PathBuf)>,
) -> Chosen {
    if let Some(p) = option.filter(|p| !p.as_os_str().is_empty()) {
        return Chosen {
            path: p.to_path_buf(),
            origin: PathOrigin::Option,
        };
    }
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return Chosen {
            path: p.into(),
            origin: PathOrigin::Env,
        };
    }
    if let Some((config_path, containerd_config)) = containerd {
        return Chosen {
            path: config_path,
            origin: PathOrigin::Containerd(containerd_config),
        };
    }
    Chosen {
        path: DEFAULT_PATH.into(),
        origin: PathOrigin::Default,
    }
}

/// The effective configuration: validated, with each key's value and
/// origin.
#[derive(Debug)]
pub struct Effective {
    pub chosen: Chosen,
    /// Whether the file exists (without it every value is a default).
    pub file_exists: bool,
    pub config: Config,
    pub entries: Vec<Entry>,
}

/// One key of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub key: &'static str,
    pub value: String,
    /// The file's path, or "default".
    pub origin: String,
}

/// Reads and validates the chosen configuration without checking the
/// files it names (that is `husk check`'s work). A missing file is the
/// defaults, as no file is an error only to the shim.
pub fn effective(chosen: Chosen) -> Result<Effective, ConfigError> {
    let (text, file_exists) = match config::read(&chosen.path) {
        Ok(text) => (text, true),
        Err(ConfigError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            (String::new(), false)
        }
        Err(e) => return Err(e),
    };
    let config = config::parse(&text, &chosen.path)?;
    let set = config::keys_set(&text);
    let entries = values(&config)
        .into_iter()
        .map(|(key, value)| Entry {
            key,
            value,
            origin: if set.contains(key) {
                chosen.path.display().to_string()
            } else {
                "default".into()
            },
        })
        .collect();
    Ok(Effective {
        chosen,
        file_exists,
        config,
        entries,
    })
}

/// Every key of the configuration with its effective value, as the file
/// would write it.
fn values(c: &Config) -> Vec<(&'static str, String)> {
    let path = |p: &Path| format!("{:?}", p.display().to_string());
    let rate = |r: &Option<husk_vm_config::RateLimiterSpec>, ops: bool| {
        r.as_ref()
            .and_then(|r| {
                if ops {
                    r.ops.as_ref()
                } else {
                    r.bandwidth.as_ref()
                }
            })
            .map_or(0, |b| b.size)
            .to_string()
    };
    let (jail, uid, gid) = match c.jail {
        Some(u) => (true, u.uid, u.gid),
        None => (false, config::DEFAULT_JAIL_ID, config::DEFAULT_JAIL_ID),
    };
    vec![
        ("vmm_path", path(&c.vmm_path)),
        ("kernel_path", path(&c.kernel_path)),
        ("initrd_path", path(&c.initrd_path)),
        ("kernel_params", format!("{:?}", c.kernel_params)),
        ("vcpus", c.vcpus.to_string()),
        ("memory_mib", c.memory_mib.to_string()),
        ("max_vcpus", c.max_vcpus.to_string()),
        ("max_memory_mib", c.max_memory_mib.to_string()),
        ("free_page_reporting", c.free_page_reporting.to_string()),
        ("boot_timeout_secs", c.boot_timeout.as_secs().to_string()),
        (
            "request_timeout_secs",
            c.request_timeout.as_secs().to_string(),
        ),
        (
            "log_level",
            format!("{:?}", c.log_level.to_string().to_lowercase()),
        ),
        ("debug_console", c.debug_console.to_string()),
        ("template", c.template.to_string()),
        ("state_dir", path(&c.state_dir)),
        ("mkfs_erofs_path", path(&c.mkfs_erofs_path)),
        (
            "rootfs_build_timeout_secs",
            c.rootfs_build_timeout.as_secs().to_string(),
        ),
        ("rootfs_image_max_mib", c.rootfs_image_max_mib.to_string()),
        ("pod_disk_slots", c.pod_disk_slots.to_string()),
        (
            "pod_disk_slot_size_mib",
            c.pod_disk_slot_size_mib.to_string(),
        ),
        (
            "disk_bandwidth_bytes_per_sec",
            rate(&c.disk_rate_limiter, false),
        ),
        ("disk_ops_per_sec", rate(&c.disk_rate_limiter, true)),
        ("net_rx_bytes_per_sec", rate(&c.net_rx_rate_limiter, false)),
        ("net_tx_bytes_per_sec", rate(&c.net_tx_rate_limiter, false)),
        ("jail", jail.to_string()),
        ("sandbox_cgroup", c.sandbox_cgroup.to_string()),
        ("jail_uid", uid.to_string()),
        ("jail_gid", gid.to_string()),
        (
            "shared_fs",
            match c.shared_fs {
                config::SharedFs::Virtiofs => "\"virtiofs\"",
                config::SharedFs::None => "\"none\"",
            }
            .to_string(),
        ),
        (
            "rootfs",
            match c.rootfs {
                config::RootfsMode::Virtiofs => "\"virtiofs\"",
                config::RootfsMode::Block => "\"block\"",
            }
            .to_string(),
        ),
        ("virtiofsd", path(&c.virtiofsd.path)),
        (
            "virtiofsd_cache",
            format!("{:?}", c.virtiofsd.cache.as_str()),
        ),
        (
            "virtiofsd_thread_pool_size",
            c.virtiofsd.thread_pool_size.to_string(),
        ),
        ("virtiofsd_xattr", c.virtiofsd.xattr.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_precedence_is_the_shims() {
        let cd = Some((
            PathBuf::from("/c.toml"),
            PathBuf::from("/etc/containerd/config.toml"),
        ));
        let c = choose(Some(Path::new("/a.toml")), Some("/b.toml"), cd.clone());
        assert_eq!(
            (c.path.as_path(), c.origin),
            (Path::new("/a.toml"), PathOrigin::Option)
        );
        let c = choose(None, Some("/b.toml"), cd.clone());
        assert_eq!(c.origin, PathOrigin::Env);
        let c = choose(None, Some(""), cd);
        assert_eq!(c.path, Path::new("/c.toml"));
        assert!(matches!(c.origin, PathOrigin::Containerd(_)));
        assert_eq!(choose(None, None, None).path, Path::new(DEFAULT_PATH));
    }

    #[test]
    fn every_key_has_its_origin() {
        let dir = std::env::temp_dir().join(format!("husk-cli-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "vcpus = 2\ndebug_console = true\n").unwrap();
        let e = effective(choose(Some(&file), None, None)).unwrap();
        assert!(e.file_exists);
        let get = |k: &str| e.entries.iter().find(|x| x.key == k).unwrap().clone();
        assert_eq!(get("vcpus").value, "2");
        assert_eq!(get("vcpus").origin, file.display().to_string());
        assert_eq!(get("debug_console").value, "true");
        assert_eq!(get("memory_mib").value, "256");
        assert_eq!(get("memory_mib").origin, "default");
        assert_eq!(get("log_level").value, "\"info\"");
        // The shipped file names every key there is.
        let shipped = include_str!("../../configs/configuration.toml");
        let keys = config::keys_set(shipped);
        let listed: std::collections::BTreeSet<String> =
            e.entries.iter().map(|x| x.key.to_string()).collect();
        for k in &keys {
            assert!(listed.contains(k), "{k} missing from husk env");
        }
        // A bad file is an error naming the key, a missing one the defaults.
        std::fs::write(&file, "vcpus = 0\n").unwrap();
        let err = effective(choose(Some(&file), None, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("vcpus"), "{err}");
        let e = effective(choose(Some(&dir.join("none.toml")), None, None)).unwrap();
        assert!(!e.file_exists);
        assert!(e.entries.iter().all(|x| x.origin == "default"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
