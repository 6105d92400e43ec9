//! The OCI bundle as the shim reads it: which sandbox a container belongs
//! to (CRI annotations), and the spec rewritten for the guest.
//!
//! The spec is handled as JSON (serde_json::Value), so that fields the shim
//! does not know pass to the agent untouched.
//!
//! What changes on the way into the guest:
//! - `root.path` stays: it is a host path the agent does not read (the
//!   agent is told where the root file system is, `rootfs_storage`), and
//!   the shim does not read it either: the host tree is always
//!   `<bundle>/rootfs` (`rootfs::bundle_rootfs`);
//! - namespace `path`s are dropped: they name host namespaces (CRI's
//!   network namespace, the pause container's /proc/<pid>/ns/...), which
//!   mean nothing in the guest. A pod's containers join the pod's first
//!   container's IPC and UTS namespaces in the guest instead, and its PID
//!   namespace when the spec named one to join (CRI's
//!   shareProcessNamespace: [`GuestSpec::joins_pid_namespace`]). A network
//!   namespace with a path (the pod's, [`netns_path`]) is dropped whole:
//!   the VM's NICs stand for that namespace's interfaces, so the guest's
//!   own network namespace is the pod's, and every container uses it;
//! - `hooks` are dropped: they are host programs, and the container runs
//!   in the guest (husk does not run OCI hooks);
//! - bind mounts from the host (volumes: hostPath, emptyDir, configMap,
//!   secret, PVs, CRI's /etc/hosts, /etc/hostname, /etc/resolv.conf) reach
//!   the guest one of two ways (`shared_fs` in the configuration):
//!   - shared live ([`for_guest_shared`], `shared_fs = "virtiofs"`): the
//!     n-th bind's source becomes the container's volume `n` in the
//!     sandbox's virtio-fs share ([`SharedVolume`]; the shim binds it at
//!     `mounts/<id>/volumes/<n>`, read-only on the host when the spec says
//!     `ro`), and the mount's source is rewritten to its guest path
//!     (`guest::shared_volume`). A folder is shared as a folder, so the
//!     kubelet's atomic `..data` symlink swap shows in the guest. Sources
//!     that are neither folders nor regular files, and files of procfs,
//!     sysfs and the like, fail Create with an error naming the mount.
//!   - copied ([`for_guest`], `shared_fs = "none"`): the sources are copied
//!     into the guest instead ([`HostCopy`]), once per sandbox, and the
//!     mount's source is rewritten to the copy: files up to 16 MiB,
//!     directories of up to 1024 entries and 16 MiB (files and subfolders;
//!     symlinks inside are skipped). A one-way snapshot taken at create
//!     time: later host changes are not seen, guest writes do not reach
//!     the host. An empty host directory becomes a tmpfs of the
//!     container's own. Anything else (sockets, devices, larger trees)
//!     fails Create with an error naming the mount.
//!
//!   Either way the CRI /dev/shm bind becomes a bind of the pod's one
//!   /dev/shm in the guest ([`POD_SHM_DIR`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use husk_protocols::guest::{shared_volume, HOST_FILES_DIR, POD_SHM_DIR};
use serde_json::{json, Value};

/// CRI: "sandbox" or "container".
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI: the pod's sandbox (pause) container id.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Largest config.json read.
const MAX_SPEC: u64 = 16 << 20;
/// Largest bind-mounted file or directory tree copied into the guest.
pub const MAX_COPY_BYTES: u64 = 16 << 20;
/// Most entries of a bind-mounted directory copied into the guest.
pub const MAX_COPY_ENTRIES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: larger than 16 MiB")]
    TooLarge { path: PathBuf },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {what} {id:?}: 1 to 76 of [A-Za-z0-9_.-], starting with a letter or digit")]
    Id { what: &'static str, id: String },
    #[error("the spec: {0}")]
    Malformed(String),
    #[error("bind mount of {host:?} on {destination:?}: {reason} (husk copies host files into the VM: files and small directories only)")]
    UnsupportedMount {
        host: String,
        destination: String,
        reason: String,
    },
    #[error("bind mount of {host:?} on {destination:?}: {reason} (husk shares folders and regular files with the VM, nothing else)")]
    UnsharableMount {
        host: String,
        destination: String,
        reason: String,
    },
}

/// Checks a container or sandbox id before it becomes part of a path.
pub fn check_id(what: &'static str, id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= 76
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Id {
            what,
            id: id.to_string(),
        })
    }
}

/// Reads `<bundle>/config.json`.
pub fn read(bundle: &Path) -> Result<Value, SpecError> {
    let path = bundle.join("config.json");
    let read = |source| SpecError::Read {
        path: path.clone(),
        source,
    };
    if fs::metadata(&path).map_err(read)?.len() > MAX_SPEC {
        return Err(SpecError::TooLarge { path });
    }
    let text = fs::read(&path).map_err(read)?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| SpecError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if !v.is_object() {
        return Err(SpecError::Parse {
            path,
            message: "not a JSON object".into(),
        });
    }
    Ok(v)
}

/// A container's place: alone in its VM, a pod's first (sandbox) container,
/// or a later container of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Standalone,
    PodSandbox,
    PodContainer { sandbox_id: String },
}

impl Role {
    /// From the spec's CRI annotations.
    pub fn of(id: &str, spec: &Value) -> Role {
        let ann = |k: &str| {
            spec.pointer("/annotations")
                .and_then(|a| a.get(k))
                .and_then(Value::as_str)
        };
        match (ann(CONTAINER_TYPE), ann(SANDBOX_ID)) {
            (Some("sandbox"), _) => Role::PodSandbox,
            (Some("container"), Some(s)) if !s.is_empty() && s != id => Role::PodContainer {
                sandbox_id: s.to_string(),
            },
            _ => Role::Standalone,
        }
    }

    /// The sandbox (and shim, and VM) the container belongs to.
    pub fn sandbox_id<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::PodContainer { sandbox_id } => sandbox_id,
            _ => id,
        }
    }
}

/// The spec's hostname (empty if none).
/// The spec's network namespace: `None` when it asks for none (the
/// host's: CRI's hostNetwork, `ctr run --net-host`), `Some(None)` for a new
/// one, `Some(Some(path))` for one to join (the pod's, which CNI set up).
pub fn network_namespace(spec: &Value) -> Option<Option<PathBuf>> {
    spec.pointer("/linux/namespaces")
        .and_then(Value::as_array)?
        .iter()
        .find(|ns| ns.get("type") == Some(&json!("network")))
        .map(|ns| ns.get("path").and_then(Value::as_str).map(PathBuf::from))
}

/// The spec's `linux.cgroupsPath`, if it names one.
pub fn cgroups_path(spec: &Value) -> Option<String> {
    spec.pointer("/linux/cgroupsPath")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
}

pub fn hostname(spec: &Value) -> String {
    spec.get("hostname")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// What a host path is, for the bind-mount policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKind {
    File {
        size: u64,
    },
    Dir {
        files: Vec<(PathBuf, u64)>,
        total: u64,
    },
    EmptyDir,
    Other(String),
}

/// Looks at a bind mount source on the host (following symlinks).
pub fn inspect_host(path: &Path) -> HostKind {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return HostKind::Other(e.to_string()),
    };
    if meta.is_file() {
        return HostKind::File { size: meta.len() };
    }
    if !meta.is_dir() {
        return HostKind::Other("not a regular file or directory".into());
    }
    let mut files = Vec::new();
    let mut total = 0u64;
    let mut entries = 0usize;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let rd = match fs::read_dir(path.join(&rel)) {
            Ok(rd) => rd,
            Err(e) => return HostKind::Other(e.to_string()),
        };
        for entry in rd.flatten() {
            entries += 1;
            if entries > MAX_COPY_ENTRIES {
                return HostKind::Other(format!(
                    "a directory of more than {MAX_COPY_ENTRIES} entries"
                ));
            }
            let r = rel.join(entry.file_name());
            // Kubernetes' atomic-writer volumes are symlinks to a
            // timestamped folder: follow them, skip anything that is not
            // a file or folder.
            let Ok(m) = fs::metadata(path.join(&r)) else {
                continue;
            };
            if m.is_dir() {
                if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                    // ..data -> ..2024_xx: its files are reached through
                    // the top-level symlinks; do not copy them twice.
                    continue;
                }
                stack.push(r);
            } else if m.is_file() {
                total += m.len();
                if total > MAX_COPY_BYTES {
                    return HostKind::Other("a directory of more than 16 MiB".into());
                }
                files.push((r, m.len()));
            }
        }
    }
    if files.is_empty() {
        HostKind::EmptyDir
    } else {
        HostKind::Dir { files, total }
    }
}

/// A host file or tree to copy into the guest before the container is
/// created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCopy {
    pub host: PathBuf,
    pub guest: String,
    /// For a directory: the files under it (relative paths).
    pub files: Option<Vec<PathBuf>>,
}

/// A stable short name for a host path in the guest (FNV-1a).
fn guest_name(host: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let base: String = Path::new(host)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(40)
        .collect();
    format!("{HOST_FILES_DIR}/{h:016x}-{base}")
}

fn is_bind(m: &Value) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind")
        || m.get("options").and_then(Value::as_array).is_some_and(|o| {
            o.iter()
                .any(|o| o.as_str() == Some("bind") || o.as_str() == Some("rbind"))
        })
}

/// What a bind-mount source is, for sharing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    Dir,
    File,
    /// Not shareable, and why.
    Refused(String),
}

/// File systems whose files are the host kernel's interfaces, not data:
/// never shared with a guest (procfs, sysfs, debugfs, tracefs,
/// securityfs, cgroup, cgroup2, bpf, configfs, efivarfs, pstore).
const REFUSED_FS: [(i64, &str); 11] = [
    (0x9fa0, "procfs"),
    (0x6265_6572, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7365_6373, "securityfs"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0xcafe_4a11, "bpf"),
    (0x6265_6570, "configfs"),
    (0xde5e_81e4, "efivarfs"),
    (0x6165_676c, "pstore"),
];

/// Looks at a bind-mount source on the host (following symlinks: the path
/// is containerd's or the kubelet's, never the guest's) for sharing.
pub fn source_kind(path: &Path) -> SourceKind {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return SourceKind::Refused(e.to_string()),
    };
    let kind = if meta.is_dir() {
        SourceKind::Dir
    } else if meta.is_file() {
        SourceKind::File
    } else {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        let what = if t.is_socket() {
            "a socket"
        } else if t.is_block_device() || t.is_char_device() {
            "a device"
        } else if t.is_fifo() {
            "a FIFO"
        } else {
            "not a regular file or directory"
        };
        return SourceKind::Refused(what.into());
    };
    match rustix::fs::statfs(path) {
        Ok(st) => {
            #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
            let magic = i64::from(st.f_type as i64);
            match REFUSED_FS.iter().find(|(m, _)| *m == magic) {
                Some((_, name)) => SourceKind::Refused(format!("a {name} file, not data")),
                None => kind,
            }
        }
        Err(e) => SourceKind::Refused(e.to_string()),
    }
}

/// A volume shared with the guest: container's volume `index` is the host
/// path `host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedVolume {
    pub index: usize,
    pub host: PathBuf,
    pub dir: bool,
    pub read_only: bool,
}

/// The result of rewriting a spec for the guest.
#[derive(Debug)]
pub struct GuestSpec {
    pub json: Vec<u8>,
    /// What to copy into the guest (copied volumes).
    pub copies: Vec<HostCopy>,
    /// What to share with the guest (shared volumes).
    pub volumes: Vec<SharedVolume>,
    /// The spec named a PID namespace to join: in a pod, CRI's
    /// shareProcessNamespace (the pause container's).
    pub joins_pid_namespace: bool,
}

/// How bind mounts reach the guest.
enum Binds<'a> {
    /// Copied; `inspect` tells what a host path is.
    Copy(&'a dyn Fn(&Path) -> HostKind),
    /// Shared as container `id`'s volumes; `kind` tells what a host path
    /// is.
    Share {
        id: &'a str,
        kind: &'a dyn Fn(&Path) -> SourceKind,
    },
}

/// Whether a mount's options say read-only (the last of ro/rw wins).
fn read_only(m: &Value) -> bool {
    m.get("options")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .fold(false, |ro, o| match o {
            "ro" => true,
            "rw" => false,
            _ => ro,
        })
}

/// Rewrites `spec` for the guest with its volumes copied (see the
/// module's comment); `inspect` tells what a host path is.
pub fn for_guest(
    spec: &Value,
    terminal: bool,
    inspect: impl Fn(&Path) -> HostKind,
) -> Result<GuestSpec, SpecError> {
    rewrite(spec, terminal, &Binds::Copy(&inspect))
}

/// Rewrites `spec` of container `id` (checked) for the guest with its
/// volumes shared (see the module's comment); `kind` tells what a host
/// path is.
pub fn for_guest_shared(
    spec: &Value,
    terminal: bool,
    id: &str,
    kind: impl Fn(&Path) -> SourceKind,
) -> Result<GuestSpec, SpecError> {
    rewrite(spec, terminal, &Binds::Share { id, kind: &kind })
}

fn rewrite(spec: &Value, terminal: bool, binds: &Binds<'_>) -> Result<GuestSpec, SpecError> {
    let mut spec = spec.clone();
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| SpecError::Malformed("not an object".into()))?;
    obj.remove("hooks");
    let mut joins_pid_namespace = false;
    if let Some(p) = obj.get_mut("process").and_then(Value::as_object_mut) {
        p.insert("terminal".into(), Value::Bool(terminal));
    }
    if let Some(nss) = obj
        .get_mut("linux")
        .and_then(|l| l.get_mut("namespaces"))
        .and_then(Value::as_array_mut)
    {
        nss.retain(|ns| !(ns.get("type") == Some(&json!("network")) && ns.get("path").is_some()));
        for ns in nss.iter_mut().filter_map(Value::as_object_mut) {
            let had_path = ns.remove("path").is_some();
            joins_pid_namespace |= had_path && ns.get("type") == Some(&json!("pid"));
        }
    }
    let mut copies: BTreeMap<String, HostCopy> = BTreeMap::new();
    let mut volumes = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        for m in mounts.iter_mut() {
            if !is_bind(m) {
                continue;
            }
            let source = m
                .get("source")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let destination = m
                .get("destination")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let unsupported = |reason: String| SpecError::UnsupportedMount {
                host: source.clone(),
                destination: destination.clone(),
                reason,
            };
            if !source.starts_with('/') {
                return Err(unsupported("the source is not an absolute path".into()));
            }
            let tmpfs = |m: &mut Value, opts: Value| {
                *m = json!({
                    "destination": destination,
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": opts,
                });
            };
            if destination == "/dev/shm" {
                *m = json!({
                    "destination": destination,
                    "type": "bind",
                    "source": POD_SHM_DIR,
                    "options": ["rbind", "nosuid", "noexec", "nodev"],
                });
                continue;
            }
            let inspect = match binds {
                Binds::Copy(inspect) => inspect,
                Binds::Share { id, kind } => {
                    let dir = match kind(Path::new(&source)) {
                        SourceKind::Dir => true,
                        SourceKind::File => false,
                        SourceKind::Refused(reason) => {
                            return Err(SpecError::UnsharableMount {
                                host: source.clone(),
                                destination: destination.clone(),
                                reason,
                            })
                        }
                    };
                    let index = volumes.len();
                    volumes.push(SharedVolume {
                        index,
                        host: source.clone().into(),
                        dir,
                        read_only: read_only(m),
                    });
                    if let Some(o) = m.as_object_mut() {
                        o.insert("source".into(), Value::String(shared_volume(id, index)));
                    }
                    continue;
                }
            };
            let guest = guest_name(&source);
            match inspect(Path::new(&source)) {
                HostKind::File { size } if size <= MAX_COPY_BYTES => {
                    copies.entry(source.clone()).or_insert(HostCopy {
                        host: source.clone().into(),
                        guest: guest.clone(),
                        files: None,
                    });
                }
                HostKind::File { size } => {
                    return Err(unsupported(format!(
                        "a file of {size} bytes, more than 16 MiB"
                    )))
                }
                HostKind::Dir { files, .. } => {
                    copies.entry(source.clone()).or_insert(HostCopy {
                        host: source.clone().into(),
                        guest: guest.clone(),
                        files: Some(files.into_iter().map(|(p, _)| p).collect()),
                    });
                }
                HostKind::EmptyDir => {
                    let ro = read_only(m);
                    let mut opts = vec!["nosuid", "nodev", "mode=755"];
                    if ro {
                        opts.push("ro");
                    }
                    tmpfs(m, json!(opts));
                    continue;
                }
                HostKind::Other(reason) => return Err(unsupported(reason)),
            }
            if let Some(o) = m.as_object_mut() {
                o.insert("source".into(), Value::String(guest));
            }
        }
    }
    let json = serde_json::to_vec(&spec).map_err(|e| SpecError::Malformed(e.to_string()))?;
    Ok(GuestSpec {
        json,
        copies: copies.into_values().collect(),
        volumes,
        joins_pid_namespace,
    })
}

#[cfg(test)]
mod tests;
