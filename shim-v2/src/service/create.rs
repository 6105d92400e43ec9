//! Create: a container in a new VM, or in the pod's VM it joins. It runs as
//! named steps (plan, rootfs, sandbox, guest create, register); whatever a
//! step set up, [`Undo`] takes back if a later one fails.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::api;
use husk_protocols::guest::ROOT_DISK_SERIAL;
use serde_json::Value;

use super::error::{Result, ServiceError};
use super::registry::{Container, Inner};
use super::watch;
use crate::agent::{GuestRootfs, PodJoin};
use crate::config::{Config, RootfsMode, SharedFs};
use crate::events::Event;
use crate::io::{Pumps, StdioPaths};
use crate::marker;
use crate::process::Process;
use crate::rootfs;
use crate::sandbox::state_dir::{StateDir, ROOT_IMAGE};
use crate::sandbox::Sandbox;
use crate::sizing::{self, Limits};
use crate::spec::{self, GuestSpec, Role};
use crate::sync::lock;
use crate::tool::ToolLimits;
use husk_runtime_config::state::SandboxRecord;

/// What a Create request asks for, checked, before anything is set up.
struct Plan {
    id: String,
    bundle: PathBuf,
    oci: Value,
    role: Role,
    sandbox_id: String,
    cfg: Arc<Config>,
    /// The running sandbox a pod container joins.
    joining: Option<Arc<Sandbox>>,
    guest: GuestSpec,
    /// The bundle's rootfs folder.
    root: PathBuf,
    /// What a new VM is sized for: the pod's totals, or the container's
    /// own limits outside a pod.
    vm_request: Limits,
    /// The container's own limits, reserved in its VM.
    limits: Limits,
    /// A new VM's pod network namespace (CNI's), whose interfaces it gets.
    netns: Option<PathBuf>,
}

/// Undoes the steps of a Create that did not finish.
#[derive(Default)]
struct Undo {
    mounted: Option<PathBuf>,
    sandbox: Option<Arc<Sandbox>>,
    /// A joined sandbox and the container whose memory it reserved.
    reserved: Option<(Arc<Sandbox>, String)>,
    /// A sandbox and the container whose folder it shares.
    shared: Option<(Arc<Sandbox>, String)>,
    marker: Option<PathBuf>,
}

impl Undo {
    /// The Create finished: keep everything. (Emptied field by field:
    /// assigning a new Undo would drop, and so run, the old one.)
    fn disarm(&mut self) {
        self.mounted = None;
        self.sandbox = None;
        self.reserved = None;
        self.shared = None;
        self.marker = None;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some((sb, id)) = self.shared.take() {
            sb.unshare_container(&id);
        }
        if let Some(m) = self.mounted.take() {
            if let Err(e) = rootfs::unmount(&m) {
                log::warn!("{e}");
            }
        }
        if let Some((sb, id)) = self.reserved.take() {
            sb.release(&id);
        }
        if let Some(sb) = self.sandbox.take() {
            sb.destroy();
        }
        if let Some(m) = self.marker.take() {
            let _ = std::fs::remove_file(m);
        }
    }
}

impl Inner {
    /// Creates the container of `req`; its pid for containerd (the VMM's).
    pub fn create(self: &Arc<Self>, req: &api::CreateTaskRequest) -> Result<u32> {
        let _creating = lock(&self.creating);
        let mut steps = Steps::new();
        let mut plan = self.plan(req)?;
        let mut undo = Undo::default();
        mount_rootfs(&plan, req, &mut undo)?;
        steps.done("rootfs");
        let (sb, rootfs) = self.sandbox_for(&plan, &mut undo)?;
        steps.done(if undo.sandbox.is_some() { "vm" } else { "join" });
        if rootfs != GuestRootfs::Shared {
            // The image holds the tree now: the host mount is not needed.
            if let Some(m) = undo.mounted.take() {
                if let Err(e) = rootfs::unmount(&m) {
                    undo.mounted = Some(m);
                    return Err(e.into());
                }
            }
        }
        // The shared rootfs and volumes: binds in the shared folder; the
        // snapshot at <bundle>/rootfs stays mounted until Delete.
        let shared_root = (rootfs == GuestRootfs::Shared).then_some(plan.root.as_path());
        if shared_root.is_some() || !plan.guest.volumes.is_empty() {
            undo.shared = Some((sb.clone(), plan.id.clone()));
            sb.share_container(&plan.id, shared_root, &plan.guest.volumes)?;
            steps.done("share");
        }
        let owner = !matches!(plan.role, Role::PodContainer { .. });
        undo.marker = Some(write_marker(&plan.bundle, &sb.dir, owner)?);
        let init = guest_create(&mut plan, req, &sb, &rootfs, &mut steps)?;
        let new_sandbox = undo.sandbox.is_some();
        undo.disarm();
        let (id, sandbox) = (plan.id.clone(), sb.id.clone());
        let pid = self.register(plan, req, sb, init, new_sandbox)?;
        log::info!("container {id} created in sandbox {sandbox} in {steps}");
        Ok(pid)
    }

    /// Checks the request and finds the sandbox the container goes into.
    fn plan(&self, req: &api::CreateTaskRequest) -> Result<Plan> {
        let id = req.id.clone();
        spec::check_id("container", &id)?;
        if lock(&self.state).containers.contains_key(&id) {
            return Err(ServiceError::Exists(format!("container {id:?}")));
        }
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(ServiceError::Unsupported("checkpoint/restore"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let oci = spec::read(&bundle)?;
        let role = Role::of(&id, &oci);
        let sandbox_id = role.sandbox_id(&id).to_string();
        spec::check_id("sandbox", &sandbox_id)?;
        let cfg = self.config(&req.options)?;
        let existing = lock(&self.state).sandbox.clone();
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
        let netns = match (&role, spec::network_namespace(&oci)) {
            (Role::PodContainer { .. }, _) => None,
            (_, None) => {
                return Err(ServiceError::Unsupported(
                    "the host's network namespace (hostNetwork, ctr --net-host)",
                ))
            }
            (_, Some(path)) => path,
        };
        let guest = match cfg.shared_fs {
            SharedFs::Virtiofs => {
                spec::for_guest_shared(&oci, req.terminal, &id, spec::source_kind)?
            }
            SharedFs::None => spec::for_guest(&oci, req.terminal, spec::inspect_host)?,
        };
        let root = rootfs::bundle_rootfs(&bundle);
        let limits = Limits::of_container(&oci)?;
        let vm_request = match role {
            Role::PodSandbox => Limits::of_pod(&oci)?,
            _ => limits,
        };
        Ok(Plan {
            id,
            bundle,
            oci,
            role,
            sandbox_id,
            cfg,
            joining,
            guest,
            root,
            vm_request,
            limits,
            netns,
        })
    }

    /// Boots the sandbox's VM, or (with `rootfs = "block"`) puts the
    /// container's image into the joined one; either way reserves the
    /// container's memory in the VM. The sandbox and where the container's
    /// root file system is for the guest.
    fn sandbox_for(&self, plan: &Plan, undo: &mut Undo) -> Result<(Arc<Sandbox>, GuestRootfs)> {
        let cfg = &plan.cfg;
        let block = cfg.rootfs == RootfsMode::Block;
        if let Some(sb) = &plan.joining {
            // Before the image takes a disk slot: a container that does
            // not fit takes nothing.
            sb.reserve(&plan.id, plan.limits)?;
            undo.reserved = Some((sb.clone(), plan.id.clone()));
            if !block {
                return Ok((sb.clone(), GuestRootfs::Shared));
            }
            return Ok((sb.clone(), image_into_slot(plan, sb)?));
        }
        let dir = StateDir::create(&cfg.state_dir, &plan.sandbox_id)?;
        // From now on `shim delete` can clean up, should this shim die in
        // the middle of the boot.
        undo.marker = Some(write_marker(&plan.bundle, &dir.path, true)?);
        // For the `husk` command (`husk ps`, metrics): where the sandbox's
        // bundle is, when it started and, once booted, how long that took.
        let mut record = SandboxRecord {
            bundle: plan.bundle.clone(),
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            boot_ms: None,
        };
        let write_record = |record: &SandboxRecord, dir: &Path| {
            record
                .write(dir)
                .map_err(|e| ServiceError::Internal(format!("writing the sandbox record: {e}")))
        };
        write_record(&record, &dir.path)?;
        let boot_start = std::time::Instant::now();
        if cfg.root_disk_at_boot() {
            rootfs::build_erofs(
                &cfg.mkfs_erofs_path,
                &plan.root,
                &dir.path.join(ROOT_IMAGE),
                &ToolLimits::for_rootfs(cfg),
            )?;
        }
        // Disk slots are for later containers' images, and with templates
        // for the first one's too (Config::root_disk_at_boot).
        let pod_slots = if plan.role == Role::PodSandbox && block {
            cfg.pod_disk_slots as usize
        } else {
            0
        };
        let slots = pod_slots + usize::from(cfg.first_image_in_slot());
        let boot = || {
            Sandbox::boot(
                &plan.sandbox_id,
                dir,
                cfg,
                sizing::size(cfg, plan.vm_request),
                slots,
                &spec::hostname(&plan.oci),
                plan.netns.as_deref(),
                spec::cgroups_path(&plan.oci).as_deref(),
                &self.cancel,
            )
        };
        // The image for the slot does not need the VM: built while it
        // boots or restores.
        let (booted, image) = if cfg.first_image_in_slot() {
            let (booted, image) = build_beside(plan, boot);
            (booted, Some(image))
        } else {
            (boot(), None)
        };
        let sb = Arc::new(booted?);
        undo.sandbox = Some(sb.clone());
        record.boot_ms = Some(u64::try_from(boot_start.elapsed().as_millis()).unwrap_or(u64::MAX));
        write_record(&record, &sb.dir)?;
        // The VM was sized for these limits; only the caps can refuse them.
        sb.reserve(&plan.id, plan.limits)?;
        let rootfs = if let Some(image) = image {
            GuestRootfs::Disk(attach_built(&sb, image)?)
        } else if block {
            GuestRootfs::Disk(ROOT_DISK_SERIAL.to_string())
        } else {
            GuestRootfs::Shared
        };
        Ok((sb, rootfs))
    }

    /// Records the created container, watches a new sandbox, and starts
    /// the init's waiter.
    fn register(
        self: &Arc<Self>,
        plan: Plan,
        req: &api::CreateTaskRequest,
        sb: Arc<Sandbox>,
        init: Arc<Process>,
        new_sandbox: bool,
    ) -> Result<u32> {
        let container = Arc::new(Container {
            bundle: plan.bundle,
            init: init.clone(),
            execs: Mutex::new(HashMap::new()),
        });
        {
            let mut st = lock(&self.state);
            st.containers.insert(plan.id.clone(), container);
            if st.sandbox.is_none() {
                st.sandbox = Some(sb.clone());
            }
        }
        if new_sandbox {
            watch::watch_sandbox(self, &sb);
        }
        // The init waits in the guest for Start; its waiter runs from now
        // on, so that a kill before Start is reported too.
        watch::spawn_waiter(self.clone(), sb.clone(), init);
        self.events.send(Event::Create {
            id: plan.id.clone(),
            bundle: req.bundle.clone(),
            pid: sb.vmm_pid(),
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        });
        Ok(sb.vmm_pid())
    }
}

/// Builds the container's image and writes it into a free disk slot of
/// `sb`'s VM; the disk as the guest finds it.
fn image_into_slot(plan: &Plan, sb: &Sandbox) -> Result<GuestRootfs> {
    let image = ImageFile(sb.dir.join(format!("image-{}.erofs", plan.id)));
    let built = build_image(plan, &image.0);
    Ok(GuestRootfs::Disk(attach_built(sb, (image, built))?))
}

/// An image file, removed when dropped (once in a slot, or on failure).
struct ImageFile(PathBuf);

impl Drop for ImageFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An image built (its file and the build's outcome), not yet in a slot.
type Built = (ImageFile, Result<u64>);

/// Builds the container's erofs image of `plan`'s rootfs at `image`.
fn build_image(plan: &Plan, image: &Path) -> Result<u64> {
    let cfg = &plan.cfg;
    rootfs::build_erofs(
        &cfg.mkfs_erofs_path,
        &plan.root,
        image,
        &ToolLimits::for_rootfs(cfg),
    )
    .map_err(ServiceError::from)
}

/// Runs `boot` while a thread builds the container's image, beside the
/// bundle's rootfs (not in the state folder, which a failed boot removes
/// while the build may still write there).
fn build_beside<T>(plan: &Plan, boot: impl FnOnce() -> T) -> (T, Built) {
    let image = ImageFile(plan.bundle.join(format!("husk-image-{}.erofs", plan.id)));
    let (booted, built) = std::thread::scope(|s| {
        let build = s.spawn(|| build_image(plan, &image.0));
        let booted = boot();
        let built = build
            .join()
            .unwrap_or_else(|_| Err(ServiceError::Internal("building the image panicked".into())));
        (booted, built)
    });
    (booted, (image, built))
}

/// Writes a built image into a free disk slot of `sb`'s VM (the image
/// file goes); the disk as the guest finds it.
fn attach_built(sb: &Sandbox, (image, built): Built) -> Result<String> {
    built.and_then(|size| sb.attach_image(&image.0, size).map_err(ServiceError::from))
}

/// How long each step of a Create took, for its log line: where a slow
/// start went (the VM, the shared folder, the guest's own create).
struct Steps {
    start: Instant,
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new() -> Self {
        let now = Instant::now();
        Steps {
            start: now,
            last: now,
            done: Vec::new(),
        }
    }

    fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        self.done.push((step, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ms (", self.start.elapsed().as_millis())?;
        for (i, (step, took)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{step} {} ms", took.as_millis())?;
        }
        write!(f, ")")
    }
}

/// Mounts containerd's rootfs mounts at the bundle's rootfs, if it sent
/// any (otherwise the bundle's rootfs is a ready tree). With a block rootfs
/// Create unmounts them once the image is built; a shared rootfs stays
/// mounted (and bound into the shared folder) until Delete.
fn mount_rootfs(plan: &Plan, req: &api::CreateTaskRequest, undo: &mut Undo) -> Result<()> {
    if req.rootfs.is_empty() {
        return Ok(());
    }
    rootfs::prepare_mountpoint(&plan.root)?;
    // Armed before the first mount: mount_all may stop half-way.
    undo.mounted = Some(plan.root.clone());
    rootfs::mount_all(&req.rootfs, &plan.root)?;
    Ok(())
}

/// Creates the container in the guest and connects its stdio; its init.
fn guest_create(
    plan: &mut Plan,
    req: &api::CreateTaskRequest,
    sb: &Sandbox,
    rootfs: &GuestRootfs,
    steps: &mut Steps,
) -> Result<Arc<Process>> {
    if !plan.guest.copies.is_empty() {
        copy_host_files(sb, &plan.guest.copies)?;
        steps.done("copies");
    }
    let id = plan.id.as_str();
    let join = match (&plan.role, plan.guest.joins_pid_namespace) {
        (Role::PodContainer { .. }, true) => PodJoin::WithPid,
        (Role::PodContainer { .. }, false) => PodJoin::Shared,
        _ => PodJoin::Nothing,
    };
    sb.agent
        .create_container(id, std::mem::take(&mut plan.guest.json), join, rootfs)
        .map_err(|e| {
            let diagnostics = if sb.is_dead() {
                sb.diagnostics()
            } else {
                String::new()
            };
            ServiceError::Internal(format!(
                "creating the container in the VM: {e}{diagnostics}"
            ))
        })?;
    steps.done("guest");
    let stdio = StdioPaths {
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        terminal: req.terminal,
    };
    let init = Arc::new(Process::new(id, "", sb.vmm_pid(), stdio.clone()));
    match Pumps::start(&sb.agent, id, "", &stdio) {
        Ok(p) => {
            init.set_pumps(p);
            steps.done("stdio");
        }
        Err(e) => {
            let _ = sb.agent.remove_container(id);
            return Err(e.into());
        }
    }
    Ok(init)
}

/// Copies the host files of bind mounts into the guest.
fn copy_host_files(sb: &Sandbox, copies: &[spec::HostCopy]) -> Result<()> {
    let copy_one = |host: &Path, guest: &str| -> Result<()> {
        let err = |e: std::io::Error| {
            ServiceError::Invalid(format!("bind mount source {}: {e}", host.display()))
        };
        let meta = std::fs::metadata(host).map_err(err)?;
        let mut data = Vec::new();
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

/// Writes the bundle marker (see [`marker`]); its path.
fn write_marker(bundle: &Path, state: &Path, owner: bool) -> Result<PathBuf> {
    marker::write(bundle, state, owner).map_err(|e| {
        ServiceError::Internal(format!(
            "writing {}: {e}",
            bundle.join(marker::BUNDLE_MARKER).display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undo_takes_back_only_what_is_not_disarmed() {
        let dir = std::env::temp_dir().join(format!("husk-undo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let marker = write_marker(&dir, Path::new("/run/husk/sb"), true).unwrap();
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap(),
            "/run/husk/sb\nowner\n"
        );
        let mut undo = Undo::default();
        undo.marker = Some(marker.clone());
        undo.disarm();
        drop(undo);
        assert!(marker.exists(), "a disarmed Undo removed the marker");
        let mut undo = Undo::default();
        undo.marker = Some(marker.clone());
        drop(undo);
        assert!(!marker.exists(), "an armed Undo left the marker");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
