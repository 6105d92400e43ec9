//! The agent's state and operations: the sandbox and its containers, each
//! call of the API as a method that validates first and changes things
//! after. `service` turns these into ttrpc answers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use husk_protocols::agent as pb;
use husk_protocols::agent::create_container_request::Rootfs;
use husk_protocols::guest;
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use rustix::process::Signal;

use crate::cgroup::{Cgroup, CgroupRoot};
use crate::container::{self, Container, IdMaps, Process, Status};
use crate::devices::DeviceError;
use crate::error::{invalid, io_ctx, AgentError, Result};
use crate::hostfiles::{HostFiles, HostFilesError};
use crate::oom::OomWatcher;
use crate::reaper::{Exit, Reaper};
use crate::sync::{InitConfig, NsAction, Work};
use crate::{debug, sandbox, storage, validate};

/// Largest file CopyFile writes, and its largest chunk.
const COPY_FILE_MAX: i64 = 64 << 20;
/// How long a forced remove waits for the init to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's shared state.
pub struct Agent {
    pub reaper: Arc<Reaper>,
    pub oom: Arc<OomWatcher>,
    cgroups: CgroupRoot,
    containers: RwLock<HashMap<String, Arc<Container>>>,
    /// Serialises creations so that an id is checked and taken atomically
    /// without holding the map's lock through the set-up.
    creating: Mutex<()>,
    sandbox_created: Mutex<bool>,
    /// The first container: whose namespaces pod containers join.
    sandbox_leader: Mutex<Option<String>>,
    /// Root file systems the agent mounted from disks, by container id.
    storages: Mutex<HashMap<String, storage::RootfsMount>>,
    pub pid1: bool,
    cap_last_cap: u32,
    /// CopyFile's folder.
    host_files: HostFiles,
    /// ExecGuest's gate and processes.
    debug: debug::DebugConsole,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lazily unmounts what the guest kernel mounted under container `id`'s
/// folder of the shared folder (virtio-fs submounts for the host's binds:
/// its rootfs and volumes), deepest first, so that a long-lived pod does
/// not keep one per container it ever ran. The host unmounts its side.
fn unmount_shared(id: &str) {
    let dir = Path::new(guest::SHARED_DIR).join(id);
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut under: Vec<PathBuf> = crate::init::mountinfo::parse(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&dir))
        .collect();
    under.reverse();
    under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in under {
        if let Err(e) = crate::sys::umount_detach(&p) {
            crate::log!("unmounting {}: {e}", p.display());
        }
    }
}

impl Agent {
    pub fn new(
        reaper: Arc<Reaper>,
        oom: Arc<OomWatcher>,
        cgroups: CgroupRoot,
        pid1: bool,
        host_files: HostFiles,
    ) -> Agent {
        let cap_last_cap = crate::sys::read_trimmed("/proc/sys/kernel/cap_last_cap")
            .parse()
            .unwrap_or(40);
        Agent {
            reaper,
            oom,
            cgroups,
            containers: RwLock::default(),
            creating: Mutex::default(),
            sandbox_created: Mutex::new(false),
            sandbox_leader: Mutex::default(),
            storages: Mutex::default(),
            pid1,
            cap_last_cap,
            host_files,
            debug: debug::DebugConsole::default(),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("container {id:?}")))
    }

    pub fn create_sandbox(&self, req: &pb::CreateSandboxRequest) -> Result<()> {
        let mut created = lock(&self.sandbox_created);
        if *created {
            return Err(AgentError::Exists("the sandbox".into()));
        }
        sandbox::setup(req, self.pid1)?;
        if req.debug_console {
            self.debug.enable();
            crate::log!("the debug console is enabled");
        }
        *created = true;
        Ok(())
    }

    /// Kills and removes every container.
    pub fn destroy_all(&self) {
        let ids: Vec<String> = self
            .containers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if let Err(e) = self.remove_container(&id, true) {
                crate::log!("removing {id}: {e}");
            }
        }
        if self.debug.len() > 0 {
            if let Err(e) = self
                .cgroups
                .open_or_create(debug::CGROUP)
                .and_then(|c| c.kill_all())
            {
                crate::log!("killing the debug processes: {e}");
            }
        }
    }

    /// Creates a container on the root file system the request names: a
    /// directory in the guest, or a disk it first mounts at the container's
    /// rootfs path (undone if the creation fails).
    pub fn create_container(&self, req: &pb::CreateContainerRequest) -> Result<()> {
        let id = req.container_id.as_str();
        validate::id("container", id).map_err(invalid)?;
        let storage = match &req.rootfs {
            Some(Rootfs::RootfsPath(path)) => {
                return self.create_container_on(req, Path::new(path));
            }
            Some(Rootfs::RootfsShared(_)) => {
                // The host's snapshot in the shared folder: nothing to
                // mount, nothing to unmount at RemoveContainer.
                let path = PathBuf::from(guest::shared_rootfs(id));
                if !Path::new(guest::SHARED_DIR).join(id).is_dir() {
                    return Err(AgentError::State(format!(
                        "container {id:?}: no root file system at {} (is the shared folder mounted?)",
                        path.display()
                    )));
                }
                return self.create_container_on(req, &path);
            }
            Some(Rootfs::RootfsStorage(storage)) => storage,
            // The generated oneof enum is non-exhaustive.
            _ => {
                return Err(invalid(
                    "no rootfs: rootfs_storage, rootfs_path or rootfs_shared is required",
                ))
            }
        };
        let target = PathBuf::from(guest::container_rootfs(id));
        storage::validate(&storage.serial, &storage.fstype, &target).map_err(invalid)?;
        {
            let _creating = lock(&self.creating);
            if self.get(id).is_ok() || lock(&self.storages).contains_key(id) {
                return Err(AgentError::Exists(format!("container {id:?}")));
            }
        }
        let mount = storage::mount_rootfs(&storage.serial, &storage.fstype, &target)
            .map_err(|e| AgentError::State(format!("container {id:?} rootfs: {e}")))?;
        match self.create_container_on(req, &target) {
            Ok(()) => {
                lock(&self.storages).insert(id.to_string(), mount);
                Ok(())
            }
            Err(e) => {
                mount.unmount();
                Err(e)
            }
        }
    }

    fn create_container_on(&self, req: &pb::CreateContainerRequest, rootfs: &Path) -> Result<()> {
        let id = req.container_id.as_str();
        let spec: Spec = serde_json::from_slice(&req.oci_spec_json)
            .map_err(|e| invalid(format!("config.json: {e}")))?;
        let rootfs = rootfs.to_path_buf();
        validate::spec(&spec, &rootfs).map_err(invalid)?;
        let resources = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().clone())
            .unwrap_or_default();
        let writes = Cgroup::check(&self.cgroups, &resources).map_err(invalid)?;
        let device_rules =
            crate::devices::rules(resources.devices().as_deref().unwrap_or_default())
                .map_err(invalid)?;
        let _creating = lock(&self.creating);
        if self.get(id).is_ok() {
            return Err(AgentError::Exists(format!("container {id:?}")));
        }
        let linux = spec.linux().clone().unwrap_or_default();
        let leader = if req.join_sandbox_namespaces {
            lock(&self.sandbox_leader)
                .clone()
                .and_then(|l| self.get(&l).ok())
        } else {
            None
        };
        let mut namespaces = Vec::new();
        let mut actions = Vec::new();
        for ns in linux.namespaces().iter().flatten() {
            let (flag, name) = validate::ns_flag(ns.typ());
            namespaces.push((flag, name));
            let shared = [libc::CLONE_NEWNET, libc::CLONE_NEWIPC, libc::CLONE_NEWUTS];
            let shared_pid = req.join_sandbox_pid_namespace && flag == libc::CLONE_NEWPID;
            let path = match (ns.path(), &leader) {
                (Some(p), _) => Some(p.clone()),
                (None, Some(l)) if shared.contains(&flag) || shared_pid => Some(
                    Path::new("/proc")
                        .join(l.init.pid.to_string())
                        .join("ns")
                        .join(name),
                ),
                _ => None,
            };
            actions.push(NsAction { flag, path });
        }
        let new_user_ns = actions
            .iter()
            .any(|a| a.flag == libc::CLONE_NEWUSER && a.path.is_none());
        let id_maps = if new_user_ns {
            Some(IdMaps {
                uid: validate::id_map("uid", linux.uid_mappings().as_ref()).map_err(invalid)?,
                gid: validate::id_map("gid", linux.gid_mappings().as_ref()).map_err(invalid)?,
            })
        } else {
            None
        };
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let seccomp = linux.seccomp().clone();
        let cgroup = self.cgroups.create(id)?;
        let spawned = cgroup
            .apply(&writes)
            .map_err(AgentError::from)
            .and_then(|()| {
                crate::devices::attach(cgroup.path(), &device_rules).map_err(|e| match e {
                    DeviceError::Bpf { what, path, source } => AgentError::Io {
                        context: format!("{what} the device filter of {path}"),
                        source,
                    },
                    other => invalid(other),
                })
            })
            .and_then(|()| {
                let cfg = InitConfig {
                    namespaces: actions,
                    work: Work::Container {
                        spec: Box::new(spec),
                        rootfs,
                    },
                    cap_last_cap: self.cap_last_cap,
                };
                container::spawn(&self.reaper, cfg, terminal, &cgroup, id_maps.as_ref())
                    .map_err(AgentError::from)
            });
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                let _ = cgroup.kill_all();
                let _ = cgroup.remove();
                return Err(e);
            }
        };
        self.oom.watch(id, cgroup.path());
        let c = Arc::new(Container::new(spawned, cgroup, namespaces, seccomp));
        self.containers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), c);
        lock(&self.sandbox_leader).get_or_insert_with(|| id.to_string());
        crate::log!("container {id} created");
        Ok(())
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut ch = c
            .take_start()
            .ok_or_else(|| AgentError::State(format!("container {id:?} is already started")))?;
        container::run(&mut ch, true)?;
        crate::log!("container {id} started");
        Ok(())
    }

    pub fn remove_container(&self, id: &str, force: bool) -> Result<()> {
        let c = self.get(id)?;
        let status = c.status(&self.reaper);
        if matches!(status, Status::Running | Status::Paused) && !force {
            return Err(AgentError::State(format!(
                "container {id:?} is running; stop it first or force"
            )));
        }
        // A created container's init exits once its channel closes.
        drop(c.take_start());
        c.cgroup.kill_all()?;
        if status == Status::Paused {
            let _ = c.cgroup.freeze(false);
        }
        let _ = crate::sys::kill(c.init.pid, Signal::KILL);
        if self.reaper.wait(c.init.pid, Some(KILL_TIMEOUT)).is_none() {
            return Err(AgentError::State(format!(
                "container {id:?} did not die within {KILL_TIMEOUT:?}"
            )));
        }
        for pid in c.exec_pids() {
            self.reaper.wait(pid, Some(KILL_TIMEOUT));
            self.reaper.forget(pid);
        }
        self.reaper.forget(c.init.pid);
        self.oom.unwatch(id);
        c.cgroup.remove()?;
        if let Some(mount) = lock(&self.storages).remove(id) {
            mount.unmount();
        }
        if self.pid1 {
            unmount_shared(id);
        }
        self.containers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let mut leader = lock(&self.sandbox_leader);
        if leader.as_deref() == Some(id) {
            *leader = None;
        }
        crate::log!("container {id} removed");
        Ok(())
    }

    fn running(&self, id: &str) -> Result<Arc<Container>> {
        let c = self.get(id)?;
        match c.status(&self.reaper) {
            Status::Running | Status::Paused => Ok(c),
            s => Err(AgentError::State(format!(
                "container {id:?} is {s:?}, not running"
            ))),
        }
    }

    pub fn exec_process(&self, req: &pb::ExecProcessRequest) -> Result<()> {
        let c = self.running(&req.container_id)?;
        validate::id("exec", &req.exec_id).map_err(invalid)?;
        if c.exec(&req.exec_id).is_some() {
            return Err(AgentError::Exists(format!("exec {:?}", req.exec_id)));
        }
        let process: OciProcess = serde_json::from_slice(&req.process_json)
            .map_err(|e| invalid(format!("process: {e}")))?;
        validate::process(&process).map_err(invalid)?;
        let terminal = process.terminal().unwrap_or(false);
        let cfg = InitConfig {
            namespaces: c
                .ns_paths()
                .into_iter()
                .map(|(flag, p)| NsAction {
                    flag,
                    path: Some(p),
                })
                .collect(),
            work: Work::Exec {
                process: Box::new(process),
                seccomp: c.seccomp.clone().map(Box::new),
            },
            cap_last_cap: self.cap_last_cap,
        };
        let mut spawned = container::spawn(&self.reaper, cfg, terminal, &c.cgroup, None)?;
        let pid = spawned.process.pid;
        if let Err(e) = container::run(&mut spawned.channel, false) {
            self.reaper.wait(pid, Some(KILL_TIMEOUT));
            self.reaper.forget(pid);
            return Err(e.into());
        }
        if !c.add_exec(&req.exec_id, spawned.process) {
            let _ = crate::sys::kill(pid, Signal::KILL);
            return Err(AgentError::Exists(format!("exec {:?}", req.exec_id)));
        }
        Ok(())
    }

    /// Starts a debug process in the guest itself (see `debug`).
    pub fn exec_guest(&self, req: &pb::ExecGuestRequest) -> Result<()> {
        self.debug.check_enabled()?;
        validate::id("exec", &req.exec_id).map_err(invalid)?;
        let process = debug::process(req).map_err(invalid)?;
        let _starting = lock(&self.debug.starting);
        self.debug.make_room(&self.reaper, &req.exec_id)?;
        let cgroup = self.cgroups.open_or_create(debug::CGROUP)?;
        let cfg = InitConfig {
            // The agent's own: the guest's.
            namespaces: Vec::new(),
            work: Work::Exec {
                process: Box::new(process),
                seccomp: None,
            },
            cap_last_cap: self.cap_last_cap,
        };
        let mut spawned = container::spawn(&self.reaper, cfg, req.terminal, &cgroup, None)?;
        let pid = spawned.process.pid;
        if req.terminal && req.rows > 0 && req.columns > 0 {
            // Checked by debug::process: both fit.
            let (rows, cols) = (
                u16::try_from(req.rows).unwrap_or(u16::MAX),
                u16::try_from(req.columns).unwrap_or(u16::MAX),
            );
            if let Err(e) = spawned.process.stdio.resize(rows, cols) {
                crate::log!("guest exec {}: window size: {e}", req.exec_id);
            }
        }
        if let Err(e) = container::run(&mut spawned.channel, false) {
            self.reaper.wait(pid, Some(KILL_TIMEOUT));
            self.reaper.forget(pid);
            return Err(e.into());
        }
        self.debug.insert(&req.exec_id, spawned.process);
        crate::log!("guest exec {} started (pid {pid})", req.exec_id);
        Ok(())
    }

    /// Runs `f` on the container's init (empty `exec_id`) or an exec.
    fn with_process<R>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&Container, &Process) -> Result<R>,
    ) -> Result<R> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            return f(&c, &c.init);
        }
        let p = c
            .exec(exec_id)
            .ok_or_else(|| AgentError::NotFound(format!("exec {exec_id:?} of {id:?}")))?;
        f(&c, &p)
    }

    pub fn signal(&self, req: &pb::SignalProcessRequest) -> Result<()> {
        let sig = i32::try_from(req.signal)
            .ok()
            .and_then(crate::sys::signal)
            .ok_or_else(|| invalid(format!("signal {} is out of range", req.signal)))?;
        if req.container_id.is_empty() {
            let p = self.debug.get(&req.exec_id)?;
            if self.reaper.try_exit(p.pid).is_some() {
                return Err(AgentError::State("the process has exited".into()));
            }
            return crate::sys::kill(p.pid, sig).map_err(io_ctx("kill"));
        }
        self.with_process(&req.container_id, &req.exec_id, |c, p| {
            if req.all {
                for pid in c.cgroup.pids()? {
                    let _ = crate::sys::kill(pid, sig);
                }
                return Ok(());
            }
            if self.reaper.try_exit(p.pid).is_some() {
                return Err(AgentError::State("the process has exited".into()));
            }
            crate::sys::kill(p.pid, sig).map_err(io_ctx("kill"))
        })
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        if id.is_empty() {
            let pid = self.debug.get(exec_id)?.pid;
            return self.reaper.wait(pid, None).ok_or_else(|| {
                AgentError::NotFound(format!("guest exec {exec_id:?} was removed"))
            });
        }
        let pid = self.with_process(id, exec_id, |_, p| Ok(p.pid))?;
        self.reaper
            .wait(pid, None)
            .ok_or_else(|| AgentError::NotFound(format!("process of {id:?} was removed")))
    }

    pub fn write_stdin(&self, req: &pb::WriteStreamRequest) -> Result<usize> {
        if req.container_id.is_empty() {
            let p = self.debug.get(&req.exec_id)?;
            return p.stdio.write_stdin(&req.data).map_err(io_ctx("stdin"));
        }
        self.with_process(&req.container_id, &req.exec_id, |_, p| {
            p.stdio.write_stdin(&req.data).map_err(io_ctx("stdin"))
        })
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        if id.is_empty() {
            let p = self.debug.get(exec_id)?;
            return p.stdio.close_stdin().map_err(io_ctx("closing stdin"));
        }
        self.with_process(id, exec_id, |_, p| {
            p.stdio.close_stdin().map_err(io_ctx("closing stdin"))
        })
    }

    pub fn read(&self, req: &pb::ReadStreamRequest, stderr: bool) -> Result<Vec<u8>> {
        // Hold the process (not the container map or the debug table)
        // while blocking.
        let p: Arc<Process> = if req.container_id.is_empty() {
            self.debug.get(&req.exec_id)?
        } else {
            let c = self.get(&req.container_id)?;
            if req.exec_id.is_empty() {
                return Self::read_from(&c.init, req.len, stderr);
            }
            c.exec(&req.exec_id)
                .ok_or_else(|| AgentError::NotFound(format!("exec {:?}", req.exec_id)))?
        };
        Self::read_from(&p, req.len, stderr)
    }

    fn read_from(p: &Process, len: u32, stderr: bool) -> Result<Vec<u8>> {
        if stderr {
            p.stdio.read_stderr(len as usize)
        } else {
            p.stdio.read_stdout(len as usize)
        }
        .map_err(io_ctx("reading"))
    }

    pub fn resize(&self, req: &pb::TtyWinResizeRequest) -> Result<()> {
        let rows = u16::try_from(req.row).map_err(|_| invalid("row is over 65535"))?;
        let cols = u16::try_from(req.column).map_err(|_| invalid("column is over 65535"))?;
        if req.container_id.is_empty() {
            let p = self.debug.get(&req.exec_id)?;
            return p.stdio.resize(rows, cols).map_err(io_ctx("resize"));
        }
        self.with_process(&req.container_id, &req.exec_id, |_, p| {
            p.stdio.resize(rows, cols).map_err(io_ctx("resize"))
        })
    }

    pub fn pids(&self, id: &str) -> Result<Vec<i32>> {
        Ok(self.get(id)?.cgroup.pids()?)
    }

    pub fn stats(&self, id: &str) -> Result<pb::StatsContainerResponse> {
        Ok(self.get(id)?.cgroup.stats())
    }

    pub fn pause(&self, id: &str, paused: bool) -> Result<()> {
        let c = self.running(id)?;
        c.cgroup.freeze(paused)?;
        c.set_paused(paused);
        Ok(())
    }

    pub fn update(&self, req: &pb::UpdateContainerRequest) -> Result<()> {
        let c = self.running(&req.container_id)?;
        let r: LinuxResources = serde_json::from_slice(&req.resources_json)
            .map_err(|e| invalid(format!("resources: {e}")))?;
        let writes = Cgroup::check(&self.cgroups, &r).map_err(invalid)?;
        c.cgroup.apply(&writes)?;
        Ok(())
    }

    pub fn copy_file(&self, req: &pb::CopyFileRequest) -> Result<()> {
        let path = Path::new(&req.path);
        crate::paths::check_clean_absolute(path).map_err(invalid)?;
        if !(0..=COPY_FILE_MAX).contains(&req.file_size) {
            return Err(invalid(format!(
                "file_size {} is out of range",
                req.file_size
            )));
        }
        let offset = u64::try_from(req.offset)
            .map_err(|_| invalid(format!("offset {} is negative", req.offset)))?;
        let end = i64::try_from(req.data.len())
            .ok()
            .and_then(|len| req.offset.checked_add(len));
        if end.is_none_or(|e| e > req.file_size) {
            return Err(invalid("offset and data go beyond file_size"));
        }
        if req.file_mode & !0o7777 != 0 {
            return Err(invalid(format!("file_mode {:o}", req.file_mode)));
        }
        let chunk = crate::hostfiles::Chunk {
            offset,
            data: &req.data,
            mode: req.file_mode,
            uid: req.uid,
            gid: req.gid,
        };
        self.host_files.write(path, &chunk).map_err(|e| match e {
            HostFilesError::Io { what, path, source } => AgentError::Io {
                context: format!("CopyFile: {what} {}", path.display()),
                source,
            },
            other => invalid(other),
        })
    }
}
