//! The sandboxes on this host, as their state folders under the
//! configuration's `state_dir` tell: one folder per sandbox (the shim's
//! layout, `husk_runtime_config::state`), its VMM's pid and VM description,
//! the sandbox record that leads to the bundle (the pod's CRI annotations)
//! and to the containers whose bundle markers name the folder. Everything
//! here is read bounded: a state folder is the shim's, but the VMM beside
//! it is the guest's neighbour.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_runtime_config::metrics::{now_unix_ms, SandboxMetrics};
use husk_runtime_config::state::{
    SandboxRecord, BUNDLE_MARKER, CONTROL_SOCKET, RUN_DIR, VMM_PID, VM_SPEC,
};
use husk_vm_config::control::{Request, VmCounters, VmState};
use husk_vm_config::VmSpec;
use serde::Serialize;

use crate::procfs::{self, ProcStats};

/// The CRI annotations naming a sandbox's pod.
pub const POD_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const POD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// Most sandboxes and bundles looked at (a host runs far fewer).
const MAX_ENTRIES: usize = 4096;
/// Largest file read from a state folder or bundle.
const MAX_FILE: u64 = 1 << 20;
/// How long a VMM has to answer a status request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SandboxesError {
    #[error("listing the state folder {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no sandbox {id} in {state_dir}")]
    NotFound { id: String, state_dir: PathBuf },
    #[error("{0:?} is not a sandbox id")]
    BadId(String),
}

/// What the VMM's control socket said.
#[derive(Debug, Clone, Serialize)]
pub struct VmmStatus {
    pub state: Option<VmState>,
    pub counters: Option<VmCounters>,
}

/// One sandbox.
#[derive(Debug, Clone, Serialize)]
pub struct Sandbox {
    pub id: String,
    #[serde(skip)]
    pub dir: PathBuf,
    /// containerd's namespace (the bundle's parent folder's name).
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_namespace: Option<String>,
    pub vmm_pid: Option<i32>,
    /// Whether the VMM process runs.
    pub running: bool,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub uptime_seconds: Option<f64>,
    pub started_unix_secs: Option<f64>,
    pub boot_seconds: Option<f64>,
    /// The containers whose bundle markers name this sandbox.
    pub containers: Vec<String>,
    #[serde(skip)]
    pub status: Option<VmmStatus>,
    /// The shim's metrics file, if it is there, well-formed and fresh.
    #[serde(skip)]
    pub metrics: Option<SandboxMetrics>,
}

/// Reads a file of a state folder or bundle, at most [`MAX_FILE`] bytes.
fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE).read_to_end(&mut v))
        .ok()?;
    Some(v)
}

/// Whether `id` can be a sandbox folder's name (containerd's ids: letters,
/// digits, `_.-`, at most 76 bytes).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 76
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Every sandbox under `state_dir`, by id; none if it does not exist.
/// `status` asks each running VMM's control socket too.
pub fn list(state_dir: &Path, status: bool) -> Result<Vec<Sandbox>, SandboxesError> {
    let entries = match std::fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SandboxesError::List {
                path: state_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten().take(MAX_ENTRIES) {
        let Ok(id) = entry.file_name().into_string() else {
            continue;
        };
        if !valid_id(&id) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        out.push(read(state_dir, &id, status));
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The sandbox `id`: the whole id, or a prefix only one sandbox has.
pub fn find(state_dir: &Path, id: &str, status: bool) -> Result<Sandbox, SandboxesError> {
    if !valid_id(id) {
        return Err(SandboxesError::BadId(id.to_string()));
    }
    if state_dir.join(id).is_dir() {
        return Ok(read(state_dir, id, status));
    }
    let mut matches: Vec<Sandbox> = list(state_dir, false)?
        .into_iter()
        .filter(|s| s.id.starts_with(id))
        .collect();
    match matches.len() {
        1 => {
            let only = matches.remove(0);
            Ok(read(state_dir, &only.id, status))
        }
        _ => Err(SandboxesError::NotFound {
            id: id.to_string(),
            state_dir: state_dir.to_path_buf(),
        }),
    }
}

/// Reads what the state folder `<state_dir>/<id>` tells of its sandbox;
/// what is missing or unreadable is left out.
pub fn read(state_dir: &Path, id: &str, status: bool) -> Sandbox {
    let dir = state_dir.join(id);
    let vmm_pid = read_bounded(&dir.join(VMM_PID))
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|&p| p > 1);
    let running = vmm_pid.is_some_and(procfs::alive);
    let stats: Option<ProcStats> = vmm_pid
        .filter(|_| running)
        .and_then(|p| procfs::stats(p).ok());
    let spec: Option<VmSpec> =
        read_bounded(&dir.join(VM_SPEC)).and_then(|b| serde_json::from_slice(&b).ok());
    let record = SandboxRecord::read(&dir).ok();
    let (pod, pod_namespace) = record
        .as_ref()
        .map(|r| pod_of(&r.bundle))
        .unwrap_or_default();
    let namespace = record
        .as_ref()
        .and_then(|r| r.bundle.parent()?.file_name()?.to_str().map(String::from));
    let containers = record
        .as_ref()
        .map(|r| containers_of(&r.bundle, &dir))
        .unwrap_or_default();
    // Missing, corrupt or stale: left out (husk_sandbox_metrics_file_ok 0).
    let metrics = (status && running)
        .then(|| SandboxMetrics::read(&dir, now_unix_ms()).ok())
        .flatten();
    let status = (status && running).then(|| control_status(&dir)).flatten();
    #[allow(clippy::cast_precision_loss)] // milliseconds of a boot
    let boot_seconds = record
        .as_ref()
        .and_then(|r| r.boot_ms)
        .map(|ms| ms as f64 / 1000.0);
    Sandbox {
        id: id.to_string(),
        dir,
        namespace,
        pod,
        pod_namespace,
        vmm_pid,
        running,
        vcpus: spec.as_ref().map(|s| s.vcpus),
        memory_mib: spec.as_ref().map(|s| s.memory_mib),
        rss_bytes: stats.map(|s| s.rss_bytes),
        cpu_seconds: stats.map(|s| s.cpu.as_secs_f64()),
        uptime_seconds: stats.map(|s| s.age.as_secs_f64()),
        started_unix_secs: stats.map(|s| s.start_unix_secs),
        boot_seconds,
        containers,
        status,
        metrics,
    }
}

/// The pod name and namespace in the CRI annotations of the bundle's
/// `config.json`.
fn pod_of(bundle: &Path) -> (Option<String>, Option<String>) {
    let Some(spec) = read_bounded(&bundle.join("config.json"))
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return (None, None);
    };
    let annotation = |key: &str| {
        spec.get("annotations")?
            .get(key)?
            .as_str()
            .map(|s| s.chars().take(253).collect::<String>())
    };
    (annotation(POD_NAME), annotation(POD_NAMESPACE))
}

/// The containers of the sandbox in `state`: the bundles beside the
/// sandbox's own whose marker names `state`.
fn containers_of(bundle: &Path, state: &Path) -> Vec<String> {
    let Some(parent) = bundle.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .take(MAX_ENTRIES)
        .filter_map(|e| {
            let marker = read_bounded(&e.path().join(BUNDLE_MARKER))?;
            let text = String::from_utf8(marker).ok()?;
            (Path::new(text.lines().next()?) == state)
                .then(|| e.file_name().into_string().ok())
                .flatten()
        })
        .collect();
    out.sort();
    out
}

/// The VMM's answer to a status request, if it gives one in time.
fn control_status(dir: &Path) -> Option<VmmStatus> {
    let socket = dir.join(RUN_DIR).join(CONTROL_SOCKET);
    let r = husk_vm_config::control_client::request(&socket, Request::Status {}, CONTROL_TIMEOUT)
        .ok()?;
    Some(VmmStatus {
        state: r.state,
        counters: r.counters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("abc-1.2_3"));
        for bad in ["", ".", "..", "a/b", ".hidden", &"x".repeat(77)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_state_folder_is_read_and_gaps_are_left_out() {
        let root = std::env::temp_dir().join(format!("husk-cli-sb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let state = root.join("state");
        let ns = root.join("tasks").join("k8s.io");
        let bundle = ns.join("sb1");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(ns.join("c1")).unwrap();
        std::fs::create_dir_all(ns.join("other")).unwrap();
        let dir = state.join("sb1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            format!(r#"{{"annotations":{{"{POD_NAME}":"web","{POD_NAMESPACE}":"prod"}}}}"#),
        )
        .unwrap();
        for (b, target) in [("sb1", &dir), ("c1", &dir), ("other", &state.join("x"))] {
            std::fs::write(
                ns.join(b).join(BUNDLE_MARKER),
                format!("{}\nmember\n", target.display()),
            )
            .unwrap();
        }
        SandboxRecord {
            bundle: bundle.clone(),
            started_unix_ms: 1,
            boot_ms: Some(1500),
        }
        .write(&dir)
        .unwrap();
        std::fs::write(dir.join(VMM_PID), format!("{}\n", std::process::id())).unwrap();
        std::fs::write(
            dir.join(VM_SPEC),
            r#"{"vcpus":2,"memory_mib":512,"kernel":{"path":"/k"}}"#,
        )
        .unwrap();
        // A stray file and a bad name are not sandboxes.
        std::fs::write(state.join("junk"), b"").unwrap();
        std::fs::create_dir_all(state.join(".tmp")).unwrap();
        std::fs::create_dir_all(state.join("sb2")).unwrap();

        let all = list(&state, false).unwrap();
        let ids: Vec<_> = all.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["sb1", "sb2"]);
        let s = &all[0];
        assert_eq!(s.pod.as_deref(), Some("web"));
        assert_eq!(s.pod_namespace.as_deref(), Some("prod"));
        assert_eq!(s.namespace.as_deref(), Some("k8s.io"));
        assert_eq!(s.containers, ["c1", "sb1"]);
        assert!(s.running);
        assert_eq!((s.vcpus, s.memory_mib), (Some(2), Some(512)));
        assert!(s.rss_bytes.unwrap() > 0);
        assert_eq!(s.boot_seconds, Some(1.5));
        let empty = &all[1];
        assert!(!empty.running && empty.pod.is_none() && empty.containers.is_empty());

        assert_eq!(
            find(&state, "sb", false).unwrap_err().to_string(),
            format!("no sandbox sb in {}", state.display())
        );
        assert_eq!(find(&state, "sb1", false).unwrap().id, "sb1");
        assert!(matches!(
            find(&state, "../x", false),
            Err(SandboxesError::BadId(_))
        ));
        assert!(list(&root.join("none"), false).unwrap().is_empty());

        // The shim's metrics file: read when fresh, left out when missing,
        // corrupt or stale, the rest of the sandbox read all the same.
        assert!(read(&state, "sb1", true).metrics.is_none());
        let m = SandboxMetrics {
            written_unix_ms: now_unix_ms(),
            vm_memory_bytes: 512 << 20,
            ..SandboxMetrics::default()
        };
        m.write(&dir).unwrap();
        assert_eq!(read(&state, "sb1", true).metrics, Some(m.clone()));
        assert!(
            read(&state, "sb1", false).metrics.is_none(),
            "only with status"
        );
        let file = dir.join(husk_runtime_config::metrics::METRICS_FILE);
        std::fs::write(&file, b"{\"written_unix_ms\":").unwrap();
        let s = read(&state, "sb1", true);
        assert!(s.metrics.is_none() && s.running && s.vcpus == Some(2));
        SandboxMetrics {
            written_unix_ms: 1,
            ..m
        }
        .write(&dir)
        .unwrap();
        assert!(read(&state, "sb1", true).metrics.is_none(), "stale");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
