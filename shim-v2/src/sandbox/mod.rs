//! One sandbox = one micro-VM: its state folder ([`state_dir`]), the VM
//! description ([`vm_spec`]), the husk-vmm process ([`vmm`]) in its jail
//! ([`jail`]) and host cgroup ([`cgroup`]), its control socket
//! ([`control`]), its shared folder (`crate::shared`) and the virtiofsd
//! serving it ([`virtiofsd`]), the connection to the agent, and the
//! teardown that removes all of it. The folder goes when the sandbox ends,
//! or when its creation fails.

mod boot;
pub mod cgroup;
pub mod control;
pub mod jail;
pub mod logs;
pub mod state_dir;
pub mod template;
pub mod virtiofsd;
pub mod vm_spec;
pub mod vmm;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_protocols::guest::{slot_disk_serial, AGENT_PORT};
use husk_vm_config::control::Request;

use crate::agent::Agent;
use crate::config::Config;
use crate::metrics::SandboxStats;
use crate::network::{NetworkError, PodNetwork};
use crate::rootfs::{self, RootfsError, Slots};
use crate::shared::{SharedError, SharedFolder};
use crate::sizing::{Limits, Reservations, SizingError, VmSize};
use crate::spec::SharedVolume;
use crate::sync::lock;
use boot::{Boot, TemplatePlan};
use cgroup::{CgroupLimits, Hierarchy, SandboxCgroup};
use husk_vm_config::vsock;
use state_dir::{
    slot_file, StateDir, CGROUPS, CONSOLE_LOG, CONTROL_SOCKET, ROOT_IMAGE, RUN_DIR, VMM_LOG,
    VMM_PID, VM_SPEC, VSOCK,
};
use virtiofsd::{Virtiofsd, VirtiofsdError};
use vm_spec::VmPaths;
use vmm::{Confinement, VmmProcess};

/// How long a graceful end (DestroySandbox) may take before SIGKILL.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to answer DestroySandbox.
const DESTROY_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the VMM gives a guest told to shut down through the control
/// socket (the agent did not answer) before it stops the VM itself.
const CONTROL_SHUTDOWN_MS: u64 = 3000;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox state folder {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sandbox state folder {0} already exists (a sandbox of that id runs, or was not cleaned up)")]
    Exists(PathBuf),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Spawn(#[from] vmm::SpawnError),
    #[error("the VM did not boot: {reason}{diagnostics}")]
    Boot { reason: String, diagnostics: String },
    #[error("setting up the sandbox in the VM: {source}{diagnostics}")]
    Agent {
        #[source]
        source: crate::agent::AgentError,
        diagnostics: String,
    },
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Shared(#[from] SharedError),
    #[error(transparent)]
    Virtiofsd(#[from] VirtiofsdError),
}

/// The sandbox's shared folder and the virtiofsd serving it. Dropped, it
/// stops virtiofsd and removes the folder (every mount in it first).
pub struct Share {
    folder: SharedFolder,
    virtiofsd: Option<Virtiofsd>,
    /// Set when the sandbox ends it: virtiofsd's exit is then expected.
    stopping: Arc<AtomicBool>,
}

impl Share {
    /// Makes the shared folder of the sandbox in `dir` and starts its
    /// virtiofsd (in `cgroup`), its socket ready for the VMM.
    fn start(
        id: &str,
        dir: &Path,
        cfg: &Config,
        cgroup: Option<&SandboxCgroup>,
    ) -> Result<Share, SandboxError> {
        let canonical = fs::canonicalize(dir).map_err(|source| SandboxError::StateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut share = Share {
            folder: SharedFolder::create(&canonical)?,
            virtiofsd: None,
            stopping: Arc::default(),
        };
        let listener = virtiofsd::listen(&dir.join(RUN_DIR).join(virtiofsd::SOCKET), cfg.jail)?;
        let procs = cgroup
            .map(SandboxCgroup::procs)
            .transpose()?
            .unwrap_or_default();
        let v = Virtiofsd::start(
            &cfg.virtiofsd,
            share.folder.shared(),
            listener,
            procs,
            &dir.join(virtiofsd::LOG),
            cfg.log_level,
            &format!("vfsd-{}", id.get(..8).unwrap_or(id)),
        )?;
        log::info!("sandbox {id}: virtiofsd pid {} started", v.pid());
        let (stopping, sid) = (share.stopping.clone(), id.to_string());
        v.on_exit(move |status| {
            if !stopping.load(Ordering::SeqCst) {
                log::error!(
                    "sandbox {sid}: virtiofsd exited ({status}): the guest's shared folder (root file systems, volumes) is gone; its I/O there fails"
                );
            }
        });
        share.virtiofsd = Some(v);
        Ok(share)
    }

    /// From now on virtiofsd's exit is expected (the VM is being ended:
    /// virtiofsd leaves when its VMM does), not an error to log.
    fn expect_exit(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Stops virtiofsd and removes the folder.
    fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(v) = self.virtiofsd.take() {
            v.stop();
        }
        if let Err(e) = self.folder.remove() {
            log::error!("{e}");
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running VM and its agent.
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub agent: Agent,
    /// What the shim measures of the sandbox, for its metrics file.
    pub stats: SandboxStats,
    vmm: VmmProcess,
    slots: Mutex<Slots>,
    memory: Mutex<Reservations>,
    debug_console: bool,
    /// The pod network's taps and redirects, removed after the VMM ends.
    network: Mutex<Option<PodNetwork>>,
    /// The VMM's host cgroup, removed after the VMM ends.
    cgroup: Mutex<Option<SandboxCgroup>>,
    /// The shared folder and its virtiofsd, ended after the VMM.
    share: Mutex<Option<Share>>,
}

/// Writes `data` to `path`, naming the file in the error.
fn write(path: PathBuf, data: &[u8]) -> Result<(), SandboxError> {
    fs::write(&path, data).map_err(|source| SandboxError::Write { path, source })
}

impl Sandbox {
    /// Boots the VM of sandbox `id` in `dir` (which holds root.erofs), with
    /// `slots` pod disk slots and, given the pod's network namespace
    /// `netns`, a NIC on each of its interfaces, in its host cgroup (from
    /// the spec's `cgroups_path`); and sets the sandbox up in the guest. On
    /// failure the VMM is killed, the network taken back, the cgroup and
    /// the folder removed.
    #[allow(clippy::too_many_arguments)]
    pub fn boot(
        id: &str,
        dir: StateDir,
        cfg: &Config,
        size: VmSize,
        slots: usize,
        hostname: &str,
        netns: Option<&Path>,
        cgroups_path: Option<&str>,
        cancel: &AtomicBool,
    ) -> Result<Sandbox, SandboxError> {
        for n in 1..=slots {
            rootfs::create_sparse(&dir.path.join(slot_file(n)), cfg.slot_bytes())?;
        }
        let mut cgroup = if cfg.sandbox_cgroup {
            let rel = cgroup::relative_path(cgroups_path, id)?;
            let hierarchy = Hierarchy::detect(Path::new(cgroup::CGROUP_ROOT))?;
            let mut limits = CgroupLimits::of(size);
            if cfg.uses_virtio_fs() {
                limits = limits.with_virtiofsd(cfg.virtiofsd.thread_pool_size);
            }
            let cg = SandboxCgroup::create(&hierarchy, &rel, limits)?;
            // For `shim delete`, should this shim die.
            let _ = write(dir.path.join(CGROUPS), cg.record().as_bytes());
            log::info!("sandbox {id}: cgroup {}", rel.display());
            Some(cg)
        } else {
            None
        };
        let booted = netns
            .map(|p| PodNetwork::setup(p, cfg.jail))
            .transpose()
            .map_err(SandboxError::from)
            .and_then(|network| {
                let booted = Sandbox::boot_vm(
                    id,
                    &dir,
                    cfg,
                    size,
                    slots,
                    hostname,
                    network.as_ref(),
                    cgroup.as_ref(),
                    cancel,
                );
                match booted {
                    Ok(sandbox) => Ok((sandbox, network)),
                    Err(e) => {
                        if let Some(mut n) = network {
                            n.teardown();
                        }
                        Err(e)
                    }
                }
            });
        match booted {
            Ok((mut sandbox, network)) => {
                sandbox.network = Mutex::new(network);
                sandbox.cgroup = Mutex::new(cgroup);
                dir.keep();
                Ok(sandbox)
            }
            Err(e) => {
                if let Some(cg) = cgroup.as_mut() {
                    cg.remove();
                }
                Err(e)
            }
        }
    }

    /// Starts the VM: restored from its shape's template when there is one
    /// (`template = true`), else booted (making the template when there
    /// is none); then sets the sandbox up in the guest.
    #[allow(clippy::too_many_arguments)]
    fn boot_vm(
        id: &str,
        dir: &StateDir,
        cfg: &Config,
        size: VmSize,
        slots: usize,
        hostname: &str,
        network: Option<&PodNetwork>,
        cgroup: Option<&SandboxCgroup>,
        cancel: &AtomicBool,
    ) -> Result<Sandbox, SandboxError> {
        let boot = Boot {
            id,
            dir,
            cfg,
            size,
            slots,
            network,
            cgroup,
            cancel,
        };
        let plan = TemplatePlan::new(&boot);
        if let Some(plan) = &plan {
            if let Some(sandbox) = plan.restore(&boot, hostname)? {
                return Ok(sandbox);
            }
        }
        let making = plan.as_ref().and_then(TemplatePlan::lock);
        let sandbox = boot.launch(None, cfg.boot_timeout)?;
        sandbox.log_details()?;
        if let (Some(plan), Some(_lock)) = (&plan, &making) {
            plan.make(&boot, &sandbox);
        }
        sandbox.set_up(&boot, hostname, None)?;
        Ok(sandbox)
    }

    /// The VMM's pid: the task pid containerd sees.
    pub fn vmm_pid(&self) -> u32 {
        self.vmm.pid
    }

    /// Registers what to do when the VMM exits (at once if it has).
    pub fn on_exit(&self, f: impl FnOnce(String) + Send + 'static) {
        self.vmm.on_exit(f);
    }

    pub fn is_dead(&self) -> bool {
        self.vmm.is_dead()
    }

    /// The guest console's last lines (with debug_console), for errors.
    pub fn diagnostics(&self) -> String {
        logs::diagnostics(&self.dir, self.debug_console)
    }

    /// Writes a pod container's image (`size` bytes, as its build said)
    /// into the next free slot; the slot's serial.
    pub fn attach_image(&self, image: &Path, size: u64) -> Result<String, SandboxError> {
        let n = lock(&self.slots).take(size)?;
        rootfs::write_into_slot(image, &self.dir.join(slot_file(n)))?;
        Ok(slot_disk_serial(n))
    }

    /// Shares container `id`'s root file system (a bind of `rootfs`, if
    /// given) and volumes with the guest.
    pub fn share_container(
        &self,
        id: &str,
        rootfs: Option<&Path>,
        volumes: &[SharedVolume],
    ) -> Result<(), SandboxError> {
        match lock(&self.share).as_ref() {
            Some(share) => Ok(share.folder.add_container(id, rootfs, volumes)?),
            None => Err(SandboxError::Shared(SharedError::Io {
                what: "sharing container",
                path: self.dir.clone(),
                source: io::Error::other("the sandbox has no shared folder"),
            })),
        }
    }

    /// Unmounts and removes container `id`'s shared folder, if it has one.
    pub fn unshare_container(&self, id: &str) {
        if let Some(share) = lock(&self.share).as_ref() {
            if let Err(e) = share.folder.remove_container(id) {
                log::error!("container {id}: {e}");
            }
        }
    }

    /// Reserves container `id`'s memory limit in the VM, or says why it
    /// does not fit.
    pub fn reserve(&self, id: &str, limits: Limits) -> Result<(), SizingError> {
        lock(&self.memory).reserve(id, limits)
    }

    /// Gives back what container `id` reserved.
    pub fn release(&self, id: &str) {
        lock(&self.memory).release(id);
    }

    /// SIGKILLs the VMM and waits for it.
    pub fn kill(&self) {
        self.vmm.kill();
    }

    /// Ends the VM: DestroySandbox, whose answer says the guest's
    /// containers are gone and its writes are on its disks (synced), so the
    /// VMM is stopped at once (SIGTERM) rather than after the guest's own
    /// reboot (150-200 ms of a teardown in the test machine); if the agent
    /// does not answer, the VMM's control socket asks for a shutdown
    /// (Ctrl-Alt-Del, then a forced stop); SIGKILL if the VM is still there
    /// after that. Then removes the state folder.
    pub fn destroy(&self) {
        if let Some(share) = lock(&self.share).as_ref() {
            share.expect_exit();
        }
        if !self.vmm.is_dead() {
            if let Err(e) = self.agent.destroy_sandbox(DESTROY_REQUEST_TIMEOUT) {
                log::warn!("sandbox {}: {e}; asking the VMM to shut down", self.id);
                let shutdown = Request::Shutdown {
                    timeout_ms: CONTROL_SHUTDOWN_MS,
                };
                let socket = self.dir.join(RUN_DIR).join(CONTROL_SOCKET);
                if let Err(e) = control::request(&socket, shutdown, DESTROY_REQUEST_TIMEOUT) {
                    log::warn!("sandbox {}: {e}", self.id);
                }
            } else {
                self.vmm.terminate();
            }
            if !self.vmm.wait(DESTROY_TIMEOUT) {
                log::warn!(
                    "sandbox {}: the VM did not power off in {DESTROY_TIMEOUT:?}; killing it",
                    self.id
                );
                self.kill();
            }
        }
        if let Some(mut share) = lock(&self.share).take() {
            share.stop();
        }
        if let Some(mut n) = lock(&self.network).take() {
            n.teardown();
        }
        if let Some(mut cg) = lock(&self.cgroup).take() {
            cg.remove();
        }
        self.stats.file.close();
        state_dir::remove(&self.dir);
        log::info!("sandbox {}: ended", self.id);
    }
}

/// Readies the jail of the sandbox in `dir`: what the VMM opens in the
/// state folder becomes `user`'s (its sockets folder, vm.json, disks,
/// console log; the kernel and initrd must be readable by it), and the
/// root's mount point is made.
fn prepare_jail(
    user: jail::JailUser,
    cfg: &Config,
    dir: &Path,
    slots: usize,
) -> Result<jail::Jail, SandboxError> {
    jail::give(user, &dir.join(RUN_DIR))?;
    jail::give(user, &dir.join(VM_SPEC))?;
    if cfg.root_disk_at_boot() {
        jail::give(user, &dir.join(ROOT_IMAGE))?;
    }
    for n in 1..=slots {
        jail::give(user, &dir.join(slot_file(n)))?;
    }
    if cfg.debug_console {
        let console = dir.join(CONSOLE_LOG);
        fs::File::create(&console).map_err(|source| SandboxError::Write {
            path: console.clone(),
            source,
        })?;
        jail::give(user, &console)?;
    }
    let root = dir.join(jail::ROOT_DIR);
    boot::make_dir(&root)?;
    Ok(jail::Jail::new(
        user,
        &root,
        &vm_spec::jail_binds(cfg, dir, slots),
    )?)
}

/// Waits for the agent to answer, until the boot timeout (or until `cancel`
/// is set: the shim is told to shut down).
fn connect(
    dir: &Path,
    cfg: &Config,
    vmm: &VmmProcess,
    cancel: &AtomicBool,
    timeout: Duration,
) -> Result<Agent, String> {
    let start = Instant::now();
    let uds = dir.join(RUN_DIR).join(VSOCK);
    let mut last = String::from("the VMM's vsock socket never appeared");
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err("cancelled: the shim is shutting down".into());
        }
        if let Some(status) = vmm.exit_status() {
            return Err(format!("the VMM exited ({status}) while the guest booted"));
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            let limit = if timeout == cfg.boot_timeout {
                format!("boot_timeout_secs ({}s)", timeout.as_secs())
            } else {
                format!(
                    "{}s (a restore's half of boot_timeout_secs)",
                    timeout.as_secs()
                )
            };
            return Err(format!(
                "the agent did not answer within {limit}; last: {last}"
            ));
        }
        if uds.exists() {
            let why = match vsock::connect(&uds, AGENT_PORT, left.min(Duration::from_secs(2))) {
                Ok((stream, _)) => match Agent::new(stream, cfg.request_timeout) {
                    Ok(agent) => match agent.check(left.min(Duration::from_secs(5))) {
                        Ok(true) => return Ok(agent),
                        Ok(false) => "the agent is not serving yet".into(),
                        Err(e) => e.to_string(),
                    },
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            // Once per new reason: where a boot or restore waits.
            if why != last {
                log::debug!("agent not ready after {:?}: {why}", start.elapsed());
            }
            last = why;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests;
