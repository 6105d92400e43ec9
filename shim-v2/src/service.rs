//! containerd's task API (shim v2) over husk sandboxes: every call of the
//! `Task` service, the process waiters, the reaction to a VMM that ends,
//! and OOM events.
//!
//! One shim process serves one sandbox: a container alone in its VM, or a
//! Kubernetes pod (its sandbox container first, then the pod's containers,
//! which join its VM). The VM goes when its last container is deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::api;
use containerd_shim::protos::cgroups::metrics;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, Message, MessageField};
use containerd_shim::protos::shim::oci::Options as RuncOptions;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};

use crate::agent::AgentError;
use crate::config::{self, Config};
use crate::events::{timestamp, Event, Events};
use crate::io::{Pumps, StdioPaths, DRAIN_IDLE};
use crate::process::{exit_status, Exit, Process, State, EXIT_VM_GONE};
use crate::rootfs::{self, RootfsError};
use crate::sandbox::{Sandbox, SandboxError, StateDir, ROOT_IMAGE};
use crate::spec::{self, Role, SpecError};

/// The file in a bundle that tells `shim delete` which sandbox state the
/// container had: the state folder, and whether the container owned it.
pub const BUNDLE_MARKER: &str = "husk-sandbox";
/// How long an exiting VM's processes may take to report their own exits
/// (with their output) before they are reported as killed.
const VM_EXIT_GRACE: Duration = Duration::from_secs(3);
/// How long a waiter retries a broken agent connection while the VMM runs.
const WAIT_RETRY_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0} is not supported by husk")]
    Unsupported(&'static str),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("container root file system: {0}")]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("container stdio: {0}")]
    Io(#[from] crate::io::IoError),
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    fn code(&self) -> Code {
        match self {
            ServiceError::NotFound(_) => Code::NOT_FOUND,
            ServiceError::Exists(_) => Code::ALREADY_EXISTS,
            ServiceError::Invalid(_) | ServiceError::Spec(_) => Code::INVALID_ARGUMENT,
            ServiceError::Precondition(_) | ServiceError::Config(_) => Code::FAILED_PRECONDITION,
            ServiceError::Unsupported(_) => Code::UNIMPLEMENTED,
            ServiceError::Agent(e) => match e.code() {
                Some(
                    c @ (Code::NOT_FOUND
                    | Code::ALREADY_EXISTS
                    | Code::INVALID_ARGUMENT
                    | Code::FAILED_PRECONDITION),
                ) => c,
                Some(_) => Code::INTERNAL,
                None => Code::UNAVAILABLE,
            },
            ServiceError::Rootfs(_)
            | ServiceError::Sandbox(_)
            | ServiceError::Io(_)
            | ServiceError::Internal(_) => Code::INTERNAL,
        }
    }
}

impl From<ServiceError> for ttrpc::Error {
    fn from(e: ServiceError) -> ttrpc::Error {
        // containerd asks about processes that are gone as a matter of
        // course: not worth a warning.
        if e.code() == Code::NOT_FOUND {
            log::debug!("{e}");
        } else {
            log::warn!("{e}");
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

type Result<T> = std::result::Result<T, ServiceError>;

/// The `ConfigPath` of CRI's runtime options for non-runc runtimes
/// (`runtimeoptions.v1.Options`, field 2), which also `ctr run
/// --runtime-config-path` sends. runc's own options carry none.
pub fn config_path_from_options(any: &Any) -> Option<String> {
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        if any.type_url.ends_with("containerd.runc.v1.Options") {
            // Decodes, to say so in the log if it is not runc's.
            if RuncOptions::parse_from_bytes(&any.value).is_err() {
                log::warn!("runtime options of type {} do not decode", any.type_url);
            }
        }
        return None;
    }
    let mut is = CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = is.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            return is.read_string().ok();
        }
        let wt = containerd_shim::protos::protobuf::rt::WireType::new(wire)?;
        is.skip_field(wt).ok()?;
    }
    None
}

struct Container {
    bundle: PathBuf,
    /// Where containerd's rootfs mounts went, if the shim mounted them.
    mounted: Option<PathBuf>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    fn exec(&self, exec_id: &str) -> Option<Arc<Process>> {
        lock(&self.execs).get(exec_id).cloned()
    }
}

#[derive(Default)]
struct Shared {
    sandbox: Option<Arc<Sandbox>>,
    containers: HashMap<String, Arc<Container>>,
}

struct Inner {
    events: Events,
    exit: Arc<ExitSignal>,
    /// Serialises Create (it may boot a VM) without blocking the rest.
    creating: Mutex<()>,
    /// Set by Shutdown: a Create that boots a VM gives up.
    cancel: AtomicBool,
    state: Mutex<Shared>,
    config: Mutex<Option<Arc<Config>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(events: Events, exit: Arc<ExitSignal>) -> Service {
        Service {
            inner: Arc::new(Inner {
                events,
                exit,
                creating: Mutex::new(()),
                cancel: AtomicBool::new(false),
                state: Mutex::new(Shared::default()),
                config: Mutex::new(None),
            }),
        }
    }
}

impl Inner {
    fn sandbox(&self) -> Result<Arc<Sandbox>> {
        lock(&self.state)
            .sandbox
            .clone()
            .ok_or_else(|| ServiceError::Precondition("the sandbox's VM is not running".into()))
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.state)
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(format!("container {id:?}")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            let p = c.init.clone();
            return Ok((c, p));
        }
        let p = c
            .exec(exec_id)
            .ok_or_else(|| ServiceError::NotFound(format!("exec {exec_id:?} of {id:?}")))?;
        Ok((c, p))
    }

    /// The configuration, read by the first Create.
    fn config(&self, options: &MessageField<Any>) -> Result<Arc<Config>> {
        let mut g = lock(&self.config);
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let from_options = options.as_ref().and_then(config_path_from_options);
        let env = std::env::var(config::ENV_VAR).ok();
        let path = config::choose_path(from_options.as_deref(), env.as_deref());
        let c = Arc::new(config::load(&path)?);
        log::set_max_level(c.log_level);
        log::info!("configuration from {}", path.display());
        *g = Some(c.clone());
        Ok(c)
    }

    /// Every process of the sandbox.
    fn all_processes(&self) -> Vec<Arc<Process>> {
        let st = lock(&self.state);
        let mut out = Vec::new();
        for c in st.containers.values() {
            out.push(c.init.clone());
            out.extend(lock(&c.execs).values().cloned());
        }
        out
    }

    fn report_exit(&self, p: &Process, status: u32, at: SystemTime) {
        if p.set_exited(status, at) {
            self.events.send(Event::Exit {
                id: p.container_id.clone(),
                exec_id: p.exec_id.clone(),
                pid: p.pid,
                status,
                at,
            });
        }
    }

    /// The VMM ended: every process still running is reported exited.
    fn vm_ended(&self, sandbox_id: &str, status: &str, diagnostics: &str) {
        let expected = lock(&self.state).containers.is_empty();
        if expected {
            log::debug!("sandbox {sandbox_id}: the VMM exited ({status})");
            return;
        }
        log::warn!(
            "sandbox {sandbox_id}: the VMM exited ({status}) under running containers{diagnostics}"
        );
        let deadline = std::time::Instant::now() + VM_EXIT_GRACE;
        for p in self.all_processes() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if matches!(p.state(), State::Running | State::Paused) && p.wait_timeout(left).is_some()
            {
                continue;
            }
            self.report_exit(&p, EXIT_VM_GONE, SystemTime::now());
        }
    }
}

/// Waits for a started process's exit in the guest, then for its output,
/// then reports it.
fn spawn_waiter(inner: Arc<Inner>, sb: Arc<Sandbox>, p: Arc<Process>) {
    let name = format!("wait-{}", &p.container_id[..p.container_id.len().min(8)]);
    let inner2 = inner.clone();
    let p2 = p.clone();
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let (inner, p) = (inner2, p2);
        let mut failing_since: Option<std::time::Instant> = None;
        let status = loop {
            match sb.agent.wait_process(&p.container_id, &p.exec_id) {
                Ok(s) => break exit_status(s),
                Err(e) => {
                    if sb.is_dead() {
                        break EXIT_VM_GONE;
                    }
                    if e.code().is_some() {
                        log::warn!("waiting for {}/{}: {e}", p.container_id, p.exec_id);
                        break EXIT_VM_GONE;
                    }
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > WAIT_RETRY_LIMIT {
                        log::error!(
                            "waiting for {}/{}: {e}; giving up",
                            p.container_id,
                            p.exec_id
                        );
                        break EXIT_VM_GONE;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        let at = SystemTime::now();
        if let Some(pumps) = p.pumps() {
            pumps.wait_outputs(DRAIN_IDLE);
        }
        let _started = lock(&p.starting);
        inner.report_exit(&p, status, at);
    });
    if let Err(e) = spawned {
        log::error!("starting a waiter thread: {e}");
        inner.report_exit(&p, EXIT_VM_GONE, SystemTime::now());
    }
}

/// Reports the guest's OOM kills as TaskOOM.
fn spawn_oom_watcher(inner: Arc<Inner>, sb: Arc<Sandbox>) {
    let spawned = std::thread::Builder::new()
        .name("oom".into())
        .spawn(move || loop {
            if sb.is_dead() {
                return;
            }
            match sb.agent.oom_event() {
                Ok(id) => {
                    let known = lock(&inner.state).containers.contains_key(&id);
                    if known {
                        log::info!("container {id}: OOM kill in the guest");
                        inner.events.send(Event::Oom { id });
                    }
                }
                Err(e) => {
                    if sb.is_dead() {
                        return;
                    }
                    log::debug!("OOM events: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("starting the OOM watcher: {e}");
    }
}

/// Copies the host files of bind mounts into the guest.
fn copy_host_files(sb: &Sandbox, copies: &[spec::HostCopy]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let copy_one = |host: &Path, guest: &str| -> Result<()> {
        let err = |e: std::io::Error| {
            ServiceError::Invalid(format!("bind mount source {}: {e}", host.display()))
        };
        let meta = std::fs::metadata(host).map_err(err)?;
        let mut data = Vec::new();
        use std::io::Read;
        std::fs::File::open(host)
            .map_err(err)?
            .take(spec::MAX_COPY_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(err)?;
        if data.len() as u64 > spec::MAX_COPY_BYTES {
            return Err(ServiceError::Invalid(format!(
                "bind mount source {} grew beyond 16 MiB",
                host.display()
            )));
        }
        sb.agent
            .copy_file(guest, &data, meta.mode(), meta.uid(), meta.gid())?;
        Ok(())
    };
    for c in copies {
        match &c.files {
            None => copy_one(&c.host, &c.guest)?,
            Some(files) => {
                for rel in files {
                    let guest = format!("{}/{}", c.guest, rel.display());
                    copy_one(&c.host.join(rel), &guest)?;
                }
            }
        }
    }
    Ok(())
}

/// Writes the bundle marker for `shim delete` (see [`BUNDLE_MARKER`]).
fn write_marker(bundle: &Path, state: &Path, owner: bool) -> Result<()> {
    let marker = bundle.join(BUNDLE_MARKER);
    let owner_word = if owner { "owner" } else { "member" };
    std::fs::write(&marker, format!("{}\n{owner_word}\n", state.display()))
        .map_err(|e| ServiceError::Internal(format!("writing {}: {e}", marker.display())))
}

/// Undoes a failed Create.
struct CreateGuard<'a> {
    mounted: Option<&'a Path>,
    sandbox: Option<Arc<Sandbox>>,
    marker: Option<PathBuf>,
}

impl Drop for CreateGuard<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.mounted {
            if let Err(e) = rootfs::unmount(m) {
                log::warn!("{e}");
            }
        }
        if let Some(sb) = self.sandbox.take() {
            sb.destroy();
        }
        if let Some(m) = self.marker.take() {
            let _ = std::fs::remove_file(m);
        }
    }
}

impl Service {
    fn do_create(&self, req: &api::CreateTaskRequest) -> Result<u32> {
        let inner = &self.inner;
        let _creating = lock(&inner.creating);
        let id = req.id.as_str();
        spec::check_id("container", id)?;
        if lock(&inner.state).containers.contains_key(id) {
            return Err(ServiceError::Exists(format!("container {id:?}")));
        }
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(ServiceError::Unsupported("checkpoint/restore"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let oci = spec::read(&bundle)?;
        let role = Role::of(id, &oci);
        let sandbox_id = role.sandbox_id(id).to_string();
        spec::check_id("sandbox", &sandbox_id)?;
        let cfg = inner.config(&req.options)?;
        let existing = lock(&inner.state).sandbox.clone();
        let joining = match (&role, existing) {
            (Role::PodContainer { .. }, Some(sb)) if sb.id == sandbox_id => {
                if sb.is_dead() {
                    return Err(ServiceError::Precondition(format!(
                        "the VM of sandbox {sandbox_id} has ended"
                    )));
                }
                Some(sb)
            }
            (Role::PodContainer { .. }, _) => {
                return Err(ServiceError::Precondition(format!(
                    "sandbox {sandbox_id} does not run in this shim"
                )))
            }
            (_, Some(sb)) => {
                return Err(ServiceError::Precondition(format!(
                    "this shim already runs sandbox {}",
                    sb.id
                )))
            }
            (_, None) => None,
        };
        let guest = spec::for_guest(&oci, id, req.terminal, spec::inspect_host)?;
        let root = spec::root_path(&bundle, &oci);
        let mut guard = CreateGuard {
            mounted: None,
            sandbox: None,
            marker: None,
        };
        let mounted = if req.rootfs.is_empty() {
            None
        } else {
            std::fs::create_dir_all(&root).map_err(|source| RootfsError::Io {
                what: "creating",
                path: root.clone(),
                source,
            })?;
            rootfs::mount_all(&req.rootfs, &root)?;
            guard.mounted = Some(&root);
            Some(root.clone())
        };
        let (sb, serial) = match joining {
            Some(sb) => {
                let image = sb.dir.join(format!("image-{id}.erofs"));
                let built = rootfs::build_erofs(&cfg.mkfs_erofs_path, &root, &image)
                    .map_err(ServiceError::from)
                    .and_then(|_| sb.attach_image(&image).map_err(ServiceError::from));
                let _ = std::fs::remove_file(&image);
                (sb, built?)
            }
            None => {
                let dir = StateDir::create(&cfg.state_dir, &sandbox_id)?;
                // From now on `shim delete` can clean up, should this
                // shim die in the middle of the boot.
                write_marker(&bundle, &dir.path, true)?;
                guard.marker = Some(bundle.join(BUNDLE_MARKER));
                rootfs::build_erofs(&cfg.mkfs_erofs_path, &root, &dir.path.join(ROOT_IMAGE))?;
                let slots = if role == Role::PodSandbox {
                    cfg.pod_disk_slots as usize
                } else {
                    0
                };
                let sb = Arc::new(Sandbox::boot(
                    &sandbox_id,
                    dir,
                    &cfg,
                    slots,
                    &spec::hostname(&oci),
                    &inner.cancel,
                )?);
                guard.sandbox = Some(sb.clone());
                (sb, rootfs::ROOT_SERIAL.to_string())
            }
        };
        // The image holds the tree now: the host mount is not needed.
        if let Some(m) = guard.mounted.take() {
            rootfs::unmount(m)?;
        }
        let owner = !matches!(role, Role::PodContainer { .. });
        let marker = bundle.join(BUNDLE_MARKER);
        let owner_word = if owner { "owner" } else { "member" };
        std::fs::write(&marker, format!("{}\n{owner_word}\n", sb.dir.display()))
            .map_err(|e| ServiceError::Internal(format!("writing {}: {e}", marker.display())))?;
        guard.marker = Some(marker);
        copy_host_files(&sb, &guest.copies)?;
        let join = matches!(role, Role::PodContainer { .. });
        sb.agent
            .create_container(id, guest.json, &spec::guest_rootfs(id), join, &serial)
            .map_err(|e| {
                ServiceError::Internal(format!("creating the container in the VM: {e}{}", {
                    if sb.is_dead() {
                        sb.diagnostics()
                    } else {
                        String::new()
                    }
                }))
            })?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Arc::new(Process::new(id, "", sb.vmm_pid, stdio.clone()));
        match Pumps::start(&sb.agent, id, "", &stdio) {
            Ok(p) => init.set_pumps(p),
            Err(e) => {
                let _ = sb.agent.remove_container(id);
                return Err(e.into());
            }
        }
        let container = Arc::new(Container {
            bundle,
            mounted,
            init: init.clone(),
            execs: Mutex::new(HashMap::new()),
        });
        {
            let mut st = lock(&inner.state);
            st.containers.insert(id.to_string(), container);
            if st.sandbox.is_none() {
                st.sandbox = Some(sb.clone());
            }
        }
        if guard.sandbox.take().is_some() {
            let weak = Arc::downgrade(inner);
            let sb_id = sb.id.clone();
            let sb_weak = Arc::downgrade(&sb);
            sb.on_exit(move |status| {
                let diag = sb_weak
                    .upgrade()
                    .map(|s| s.diagnostics())
                    .unwrap_or_default();
                if let Some(inner) = weak.upgrade() {
                    inner.vm_ended(&sb_id, &status, &diag);
                }
            });
            spawn_oom_watcher(inner.clone(), sb.clone());
        }
        guard.marker = None;
        // The init waits in the guest for Start; its waiter runs from now
        // on, so that a kill before Start is reported too.
        spawn_waiter(inner.clone(), sb.clone(), init);
        inner.events.send(Event::Create {
            id: id.to_string(),
            bundle: req.bundle.clone(),
            pid: sb.vmm_pid,
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        });
        log::info!("container {id} created in sandbox {}", sb.id);
        Ok(sb.vmm_pid)
    }

    fn do_start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let inner = &self.inner;
        let (_c, p) = inner.process(id, exec_id)?;
        let sb = inner.sandbox()?;
        let _starting = lock(&p.starting);
        if p.state() != State::Created {
            return Err(ServiceError::Precondition(format!(
                "process {id}/{exec_id} is {:?}, not created",
                p.state()
            )));
        }
        if exec_id.is_empty() {
            sb.agent.start_container(id)?;
            p.transition(State::Created, State::Running);
            inner.events.send(Event::Start {
                id: id.to_string(),
                pid: p.pid,
            });
        } else {
            let spec = lock(&p.spec).take().unwrap_or_default();
            sb.agent.exec_process(id, exec_id, spec)?;
            match Pumps::start(&sb.agent, id, exec_id, &p.stdio) {
                Ok(pumps) => p.set_pumps(pumps),
                Err(e) => {
                    let _ = sb.agent.signal(id, exec_id, libc::SIGKILL as u32, false);
                    spawn_waiter(inner.clone(), sb, p.clone());
                    return Err(e.into());
                }
            }
            p.transition(State::Created, State::Running);
            spawn_waiter(inner.clone(), sb, p.clone());
            inner.events.send(Event::ExecStarted {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
                pid: p.pid,
            });
        }
        Ok(p.pid)
    }

    fn do_exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        let inner = &self.inner;
        let c = inner.container(&req.id)?;
        spec::check_id("exec", &req.exec_id)?;
        if !matches!(c.init.state(), State::Running | State::Paused) {
            return Err(ServiceError::Precondition(format!(
                "container {} is not running",
                req.id
            )));
        }
        let any = req
            .spec
            .as_ref()
            .ok_or_else(|| ServiceError::Invalid("exec without a process spec".into()))?;
        let mut process: serde_json::Value = serde_json::from_slice(&any.value)
            .map_err(|e| ServiceError::Invalid(format!("exec process spec: {e}")))?;
        if let Some(o) = process.as_object_mut() {
            o.insert("terminal".into(), serde_json::Value::Bool(req.terminal));
        }
        let json =
            serde_json::to_vec(&process).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let p = Arc::new(Process::new(
            &req.id,
            &req.exec_id,
            c.init.pid,
            StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        ));
        *lock(&p.spec) = Some(json);
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(ServiceError::Exists(format!("exec {:?}", req.exec_id)));
            }
            execs.insert(req.exec_id.clone(), p);
        }
        inner.events.send(Event::ExecAdded {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
        });
        Ok(())
    }

    fn do_kill(&self, req: &api::KillRequest) -> Result<()> {
        let inner = &self.inner;
        let (_c, p) = inner.process(&req.id, &req.exec_id)?;
        let finished = || ServiceError::NotFound("process already finished".into());
        if p.exit().is_some() {
            return Err(finished());
        }
        let sb = inner.sandbox()?;
        if sb.is_dead() {
            return Err(finished());
        }
        match sb.agent.signal(&req.id, &req.exec_id, req.signal, req.all) {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(Code::FAILED_PRECONDITION) => Err(finished()),
            Err(e) => Err(e.into()),
        }
    }

    fn do_delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse> {
        let inner = &self.inner;
        let (c, p) = inner.process(&req.id, &req.exec_id)?;
        if matches!(p.state(), State::Running | State::Paused) {
            return Err(ServiceError::Precondition(format!(
                "process {}/{} is running; kill it first",
                req.id, req.exec_id
            )));
        }
        let sb = lock(&inner.state).sandbox.clone();
        let response = |e: Exit| api::DeleteResponse {
            pid: p.pid,
            exit_status: e.status,
            exited_at: Some(timestamp(e.at)).into(),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            p.stop_io();
            lock(&c.execs).remove(&req.exec_id);
            let exit = p.exit().unwrap_or(Exit {
                status: 0,
                at: SystemTime::now(),
            });
            return Ok(response(exit));
        }
        if let Some(sb) = sb.as_ref().filter(|sb| !sb.is_dead()) {
            if let Err(e) = sb.agent.remove_container(&req.id) {
                if !e.is_not_found() {
                    log::warn!("container {}: {e}", req.id);
                }
            }
        }
        // A created container's init dies with RemoveContainer; its waiter
        // reports that.
        let exit = p.wait_timeout(Duration::from_secs(5)).unwrap_or_else(|| {
            inner.report_exit(&p, EXIT_VM_GONE, SystemTime::now());
            p.exit().unwrap_or(Exit {
                status: EXIT_VM_GONE,
                at: SystemTime::now(),
            })
        });
        p.stop_io();
        for e in lock(&c.execs).drain().map(|(_, e)| e) {
            e.stop_io();
        }
        if let Some(m) = c.mounted.as_ref() {
            if let Err(e) = rootfs::unmount(m) {
                log::warn!("{e}");
            }
        }
        let _ = std::fs::remove_file(c.bundle.join(BUNDLE_MARKER));
        let last = {
            let mut st = lock(&inner.state);
            st.containers.remove(&req.id);
            if st.containers.is_empty() {
                st.sandbox.take()
            } else {
                None
            }
        };
        inner.events.send(Event::Delete {
            id: req.id.clone(),
            pid: p.pid,
            status: exit.status,
            at: exit.at,
        });
        if let Some(sb) = last {
            sb.destroy();
        }
        log::info!("container {} deleted", req.id);
        Ok(response(exit))
    }

    fn do_pause(&self, id: &str, pause: bool) -> Result<()> {
        let inner = &self.inner;
        let (_c, p) = inner.process(id, "")?;
        let (from, to) = if pause {
            (State::Running, State::Paused)
        } else {
            (State::Paused, State::Running)
        };
        if p.state() != from {
            return Err(ServiceError::Precondition(format!(
                "container {id} is {:?}",
                p.state()
            )));
        }
        inner.sandbox()?.agent.pause(id, pause)?;
        p.transition(from, to);
        inner.events.send(if pause {
            Event::Paused { id: id.into() }
        } else {
            Event::Resumed { id: id.into() }
        });
        Ok(())
    }

    fn do_stats(&self, id: &str) -> Result<Any> {
        let inner = &self.inner;
        inner.container(id)?;
        let s = inner.sandbox()?.agent.stats(id)?;
        let mut m = metrics::Metrics::new();
        if let Some(cpu) = s.cpu.as_ref() {
            let mut usage = metrics::CPUUsage::new();
            usage.total = cpu.usage_usec.saturating_mul(1000);
            usage.user = cpu.user_usec.saturating_mul(1000);
            usage.kernel = cpu.system_usec.saturating_mul(1000);
            let mut throttle = metrics::Throttle::new();
            throttle.throttled_periods = cpu.nr_throttled;
            throttle.throttled_time = cpu.throttled_usec.saturating_mul(1000);
            let mut c = metrics::CPUStat::new();
            c.usage = Some(usage).into();
            c.throttling = Some(throttle).into();
            m.cpu = Some(c).into();
        }
        if let Some(mem) = s.memory.as_ref() {
            let mut usage = metrics::MemoryEntry::new();
            usage.usage = mem.usage_bytes;
            usage.limit = if mem.limit_bytes == 0 {
                u64::MAX
            } else {
                mem.limit_bytes
            };
            usage.max = mem.max_usage_bytes;
            let mut swap = metrics::MemoryEntry::new();
            swap.usage = mem.swap_usage_bytes;
            let mut mm = metrics::MemoryStat::new();
            mm.usage = Some(usage).into();
            mm.swap = Some(swap).into();
            m.memory = Some(mm).into();
            let mut oom = metrics::MemoryOomControl::new();
            oom.oom_kill = mem.oom_kills;
            m.memory_oom_control = Some(oom).into();
        }
        if let Some(pids) = s.pids.as_ref() {
            let mut p = metrics::PidsStat::new();
            p.current = pids.current;
            p.limit = pids.limit;
            m.pids = Some(p).into();
        }
        if let Some(io) = s.io.as_ref() {
            let entry = |op: &str, value: u64| {
                let mut e = metrics::BlkIOEntry::new();
                e.op = op.into();
                e.value = value;
                e
            };
            let mut b = metrics::BlkIOStat::new();
            b.io_service_bytes_recursive =
                vec![entry("Read", io.read_bytes), entry("Write", io.write_bytes)];
            b.io_serviced_recursive =
                vec![entry("Read", io.read_ios), entry("Write", io.write_ios)];
            m.blkio = Some(b).into();
        }
        let mut any = Any::new();
        any.type_url = "io.containerd.cgroups.v1.Metrics".into();
        any.value = m
            .write_to_bytes()
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(any)
    }

    fn teardown(&self) {
        let sb = lock(&self.inner.state).sandbox.take();
        if let Some(sb) = sb {
            sb.destroy();
        }
    }
}

fn state_response(c: &Container, p: &Process) -> api::StateResponse {
    let exit = p.exit();
    api::StateResponse {
        id: if p.exec_id.is_empty() {
            p.container_id.clone()
        } else {
            p.exec_id.clone()
        },
        bundle: c.bundle.display().to_string(),
        pid: p.pid,
        status: p.state().to_proto().into(),
        stdin: p.stdio.stdin.clone(),
        stdout: p.stdio.stdout.clone(),
        stderr: p.stdio.stderr.clone(),
        terminal: p.stdio.terminal,
        exit_status: exit.map_or(0, |e| e.status),
        exited_at: exit.map(|e| timestamp(e.at)).into(),
        exec_id: p.exec_id.clone(),
        ..Default::default()
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.do_create(&req)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.do_start(&req.id, &req.exec_id)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (c, p) = self.inner.process(&req.id, &req.exec_id)?;
        Ok(state_response(&c, &p))
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.do_delete(&req)?)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        self.inner.container(&req.id)?;
        let sb = self.inner.sandbox()?;
        let pids = sb.agent.pids(&req.id).map_err(ServiceError::from)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.do_pause(&req.id, true)?;
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.do_pause(&req.id, false)?;
        Ok(api::Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(ServiceError::Unsupported("checkpoint").into())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.do_kill(&req)?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        self.do_exec(&req)?;
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.inner.process(&req.id, &req.exec_id)?;
        let sb = self.inner.sandbox()?;
        sb.agent
            .resize(&req.id, &req.exec_id, req.height, req.width)
            .map_err(ServiceError::from)?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let (_c, p) = self.inner.process(&req.id, &req.exec_id)?;
        if req.stdin {
            p.close_stdin();
        }
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        self.inner.container(&req.id)?;
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| ServiceError::Invalid("update without resources".into()))?;
        let sb = self.inner.sandbox()?;
        sb.agent
            .update(&req.id, any.value.clone())
            .map_err(ServiceError::from)?;
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (_c, p) = self.inner.process(&req.id, &req.exec_id)?;
        let e = p.wait();
        Ok(api::WaitResponse {
            exit_status: e.status,
            exited_at: Some(timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let any = self.do_stats(&req.id)?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = lock(&self.inner.state)
            .sandbox
            .as_ref()
            .map_or(0, |s| s.vmm_pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: format!("husk {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let busy = !lock(&self.inner.state).containers.is_empty();
        if busy && !req.now {
            return Ok(api::Empty::new());
        }
        // A Create still booting a VM (containerd gave up on it) stops and
        // cleans up before the shim exits.
        self.inner.cancel.store(true, Ordering::SeqCst);
        let creating = lock(&self.inner.creating);
        let busy = !lock(&self.inner.state).containers.is_empty();
        if busy && !req.now {
            self.inner.cancel.store(false, Ordering::SeqCst);
            return Ok(api::Empty::new());
        }
        drop(creating);
        self.teardown();
        log::info!("shim shutting down");
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::CodedOutputStream;

    fn any(type_url: &str, build: impl FnOnce(&mut CodedOutputStream)) -> Any {
        let mut buf = Vec::new();
        {
            let mut os = CodedOutputStream::vec(&mut buf);
            build(&mut os);
            os.flush().unwrap();
        }
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = buf;
        a
    }

    #[test]
    fn config_path_from_runtime_options() {
        let a = any("runtimeoptions.v1.Options", |os| {
            os.write_string(1, "io.containerd.husk.v1.Config").unwrap();
            os.write_string(2, "/etc/husk/other.toml").unwrap();
        });
        assert_eq!(
            config_path_from_options(&a).as_deref(),
            Some("/etc/husk/other.toml")
        );
        let a = any("types.googleapis.com/runtimeoptions.v1.Options", |os| {
            os.write_bytes(3, b"vcpus = 2").unwrap();
        });
        assert_eq!(config_path_from_options(&a), None);
        let a = any("containerd.runc.v1.Options", |os| {
            os.write_string(7, "/usr/bin/runc").unwrap();
        });
        assert_eq!(config_path_from_options(&a), None);
        let mut bad = Any::new();
        bad.type_url = "runtimeoptions.v1.Options".into();
        bad.value = vec![0x12, 0x50, b'a'];
        assert_eq!(config_path_from_options(&bad), None);
    }

    #[test]
    fn errors_map_to_codes() {
        assert_eq!(ServiceError::NotFound("x".into()).code(), Code::NOT_FOUND);
        assert_eq!(
            ServiceError::Unsupported("checkpoint").code(),
            Code::UNIMPLEMENTED
        );
        let e: ttrpc::Error = ServiceError::Exists("container \"a\"".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::ALREADY_EXISTS);
                assert_eq!(s.message(), "container \"a\" already exists");
            }
            other => panic!("{other:?}"),
        }
    }
}
