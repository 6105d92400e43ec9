//! Starting a sandbox's VM: launching the VMM (booting the guest, or
//! restoring it from a template) until its agent answers, and setting the
//! sandbox up in the guest. With `template = true`, the plan of
//! [`TemplatePlan`]: restore the shape's template if there is one, falling
//! back to a cold boot (the template removed) if it fails; make it from
//! this cold boot if there is none.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use husk_vm_config::control::{Request, Response};
use husk_vm_config::NetSpec;

use super::template::{self, Inputs, Meta, Opened, Templates};
use super::*;

/// How long a snapshot for a template may take (it writes the guest's
/// touched memory).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Most a template waits for its guest's first free page report (the
/// guest's kernel sends it 2 s after its balloon driver starts).
const FREE_PAGE_WAIT: Duration = Duration::from_secs(6);
/// A report is over once the VMM's count has held this long.
const FREE_PAGE_QUIET: Duration = Duration::from_millis(600);
const STATUS_POLL: Duration = Duration::from_millis(100);

/// A template to restore: its open files (state, memory) and the MACs its
/// guest's NICs have.
pub(super) struct Restore {
    pub fds: (OwnedFd, OwnedFd),
    pub macs: Vec<Option<String>>,
}

/// What starting one sandbox's VM needs.
pub(super) struct Boot<'a> {
    pub id: &'a str,
    pub dir: &'a StateDir,
    pub cfg: &'a Config,
    pub size: VmSize,
    pub slots: usize,
    pub network: Option<&'a PodNetwork>,
    pub cgroup: Option<&'a SandboxCgroup>,
    pub cancel: &'a AtomicBool,
}

impl Boot<'_> {
    fn nics(&self) -> Vec<NetSpec> {
        self.network.map(PodNetwork::nics).unwrap_or_default()
    }

    fn paths(&self) -> VmPaths {
        match self.cfg.jail {
            Some(_) => VmPaths::jailed(),
            None => VmPaths::host(self.cfg, &self.dir.path),
        }
    }

    /// Starts virtiofsd and the VMM (restoring a template if given) and
    /// waits up to `timeout` for the agent.
    pub fn launch(
        &self,
        restore: Option<Restore>,
        timeout: Duration,
    ) -> Result<Sandbox, SandboxError> {
        let Boot {
            id,
            dir,
            cfg,
            size,
            slots,
            ..
        } = *self;
        let spec_path = dir.path.join(VM_SPEC);
        make_dir(&dir.path.join(RUN_DIR))?;
        let mut nics = self.nics();
        let (fds, macs) = match restore {
            Some(r) => (Some(r.fds), Some(r.macs)),
            None => (None, None),
        };
        // A restored NIC keeps the template's MAC (the config space the
        // guest read must match); the agent gives it the pod's.
        for (nic, mac) in nics.iter_mut().zip(macs.unwrap_or_default()) {
            nic.mac = mac;
        }
        let spec = vm_spec::vm_spec(cfg, size, &self.paths(), slots, nics);
        // Before the VMM, which connects to virtiofsd's socket at once;
        // dropped (virtiofsd stopped, folder removed) on any failure below.
        let share = if cfg.uses_virtio_fs() {
            Some(Share::start(id, &dir.path, cfg, self.cgroup)?)
        } else {
            None
        };
        // A VmSpec is plain data: serializing it cannot fail.
        write(
            spec_path.clone(),
            &serde_json::to_vec_pretty(&spec).unwrap_or_default(),
        )?;
        let jail = cfg
            .jail
            .map(|user| prepare_jail(user, cfg, &dir.path, slots))
            .transpose()?;
        let (program, spec_arg) = match jail {
            Some(_) => (PathBuf::from(jail::VMM), PathBuf::from(jail::SPEC)),
            None => (cfg.vmm_path.clone(), spec_path.clone()),
        };
        let confine = Confinement {
            cgroup_procs: self
                .cgroup
                .map(SandboxCgroup::procs)
                .transpose()?
                .unwrap_or_default(),
            jail,
        };
        let log_path = dir.path.join(VMM_LOG);
        let log = fs::File::create(&log_path).map_err(|source| SandboxError::Write {
            path: log_path.clone(),
            source,
        })?;
        let name = format!("vmm-{}", id.get(..8).unwrap_or(id));
        let netns = self.network.map(|n| n.netns.fd());
        let vmm = VmmProcess::spawn(
            &program,
            &spec_arg,
            cfg.log_level,
            log,
            &name,
            netns,
            confine,
            fds,
        )?;
        log::info!("sandbox {id}: VMM pid {} started", vmm.pid);
        // For `shim delete`, should this shim die during the boot.
        let _ = write(dir.path.join(VMM_PID), vmm.pid.to_string().as_bytes());
        let agent = match connect(&dir.path, cfg, &vmm, self.cancel, timeout) {
            Ok(a) => a,
            Err(reason) => {
                vmm.kill();
                return Err(SandboxError::Boot {
                    reason,
                    diagnostics: logs::diagnostics(&dir.path, cfg.debug_console),
                });
            }
        };
        log::info!(
            "sandbox {id}: {} vCPUs, {} MiB",
            size.vcpus,
            size.memory_mib
        );
        Ok(Sandbox {
            id: id.to_string(),
            dir: dir.path.clone(),
            agent,
            stats: SandboxStats::new(dir.path.clone(), size.memory_mib.saturating_mul(1 << 20)),
            vmm,
            slots: Mutex::new(Slots::new(slots, cfg.slot_bytes())),
            memory: Mutex::new(Reservations::new(size)),
            debug_console: cfg.debug_console,
            network: Mutex::new(None),
            cgroup: Mutex::new(None),
            share: Mutex::new(share),
        })
    }
}

impl Sandbox {
    /// Logs the guest's kernel and agent (and fails if the agent cannot
    /// say).
    pub(super) fn log_details(&self) -> Result<(), SandboxError> {
        match self.agent.guest_details() {
            Ok((release, version)) => {
                log::info!(
                    "sandbox {}: guest kernel {release}, agent {version}",
                    self.id
                );
                Ok(())
            }
            Err(source) => Err(self.abandon(source)),
        }
    }

    /// CreateSandbox: the pod's hostname, network (its NICs found by
    /// `device_macs` where a template gave the guest other MACs than the
    /// pod's), shared folder, entropy and clock.
    pub(super) fn set_up(
        &self,
        boot: &Boot,
        hostname: &str,
        device_macs: Option<&[Option<String>]>,
    ) -> Result<(), SandboxError> {
        let guest_net = boot.network.map(|n| n.guest_for(device_macs));
        let r = self.agent.create_sandbox(
            boot.id,
            hostname,
            guest_net.as_ref(),
            boot.cfg.uses_virtio_fs(),
            boot.cfg.debug_console,
        );
        r.map_err(|source| self.abandon(source))
    }

    /// Ends a VM whose setup failed: kills it and stops its virtiofsd; the
    /// error, with the VM's last words.
    fn abandon(&self, source: crate::agent::AgentError) -> SandboxError {
        let diagnostics = self.diagnostics();
        self.kill();
        if let Some(mut share) = lock(&self.share).take() {
            share.stop();
        }
        SandboxError::Agent {
            source,
            diagnostics,
        }
    }
}

/// A sandbox's use of its shape's template (`template = true`).
pub(super) struct TemplatePlan {
    templates: Templates,
    key: String,
    inputs: Inputs,
}

impl TemplatePlan {
    /// The plan for `boot`'s VM; None without templates, or if the key
    /// cannot be computed (logged; the sandbox boots cold).
    pub fn new(boot: &Boot) -> Option<TemplatePlan> {
        if !boot.cfg.template {
            return None;
        }
        let inputs = match Inputs::of(boot.cfg) {
            Ok(i) => i,
            Err(e) => {
                log::warn!("sandbox {}: no template: {e}", boot.id);
                return None;
            }
        };
        // The jail's fixed paths: the key leaves paths out anyway.
        let spec = vm_spec::vm_spec(
            boot.cfg,
            boot.size,
            &VmPaths::jailed(),
            boot.slots,
            boot.nics(),
        );
        Some(TemplatePlan {
            templates: Templates::new(&boot.cfg.state_dir),
            key: template::key(boot.cfg, &inputs, &spec),
            inputs,
        })
    }

    /// Restores the template and sets the sandbox up, if there is a
    /// template. Ok(None): there is none, or it failed (then it is removed
    /// and the state folder is ready for a cold boot).
    pub fn restore(&self, boot: &Boot, hostname: &str) -> Result<Option<Sandbox>, SandboxError> {
        let id = boot.id;
        let opened = match self.templates.open(&self.key) {
            Ok(Some(o)) => o,
            Ok(None) => return Ok(None),
            Err(e) => {
                log::warn!("sandbox {id}: {e}; removing it, booting cold");
                self.templates.remove(&self.key);
                return Ok(None);
            }
        };
        let started = Instant::now();
        let Opened {
            key,
            state,
            memory,
            meta,
        } = opened;
        // A restore answers in seconds; one that hangs must leave time for
        // the cold boot.
        let timeout = boot.cfg.boot_timeout / 2;
        let restore = Restore {
            fds: (state, memory),
            macs: meta.macs.clone(),
        };
        let restored = boot.launch(Some(restore), timeout).and_then(|sandbox| {
            sandbox.log_details()?;
            sandbox.set_up(boot, hostname, Some(&meta.macs))?;
            Ok(sandbox)
        });
        match restored {
            Ok(sandbox) => {
                log::info!(
                    "sandbox {id}: restored from template {key} in {} ms",
                    started.elapsed().as_millis()
                );
                Ok(Some(sandbox))
            }
            Err(e) => {
                log::warn!(
                    "sandbox {id}: template {key} did not restore ({e}); removing it, booting cold"
                );
                self.templates.remove(&key);
                clear_run_dir(&boot.dir.path.join(RUN_DIR));
                Ok(None)
            }
        }
    }

    /// The lock of making this template, if no template is there and no
    /// other shim is making it.
    pub fn lock(&self) -> Option<fs::File> {
        match self.templates.lock(&self.key) {
            Ok(Some(f)) => Some(f),
            Ok(None) => {
                log::info!("template {}: another shim is making it", self.key);
                None
            }
            Err(e) => {
                log::warn!("template {}: {e}", self.key);
                None
            }
        }
    }

    /// Snapshots `sandbox`'s VM (its agent answered; no container yet) as
    /// the template, resuming it at once. Failures are logged: the sandbox
    /// goes on either way.
    pub fn make(&self, boot: &Boot, sandbox: &Sandbox) {
        let started = Instant::now();
        let made = boot.dir.path.join(RUN_DIR).join(template::SNAPSHOT_DIR);
        let request = Request::Snapshot {
            path: boot.paths().run.join(template::SNAPSHOT_DIR),
            resume: true,
        };
        let socket = sandbox.dir.join(RUN_DIR).join(CONTROL_SOCKET);
        let freed_mib = if boot.cfg.free_page_reporting {
            await_free_page_report(&socket) >> 20
        } else {
            0
        };
        let meta = Meta {
            key: self.key.clone(),
            inputs: self.inputs.clone(),
            macs: boot.nics().into_iter().map(|n| n.mac).collect(),
        };
        let result = match control::request(&socket, request, SNAPSHOT_TIMEOUT) {
            Ok(Response { snapshot, .. }) => self
                .templates
                .adopt(&made, boot.size.memory_mib << 20, &meta)
                .map(|()| snapshot)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(info) => log::info!(
                "sandbox {}: template {} made in {} ms ({} of {} MiB of memory written; \
                 {freed_mib} MiB free memory given back before)",
                boot.id,
                self.key,
                started.elapsed().as_millis(),
                info.map_or(0, |i| i.memory_bytes_written),
                boot.size.memory_mib
            ),
            Err(e) => {
                let _ = fs::remove_dir_all(&made);
                log::warn!("sandbox {}: no template made: {e}", boot.id);
            }
        }
    }
}

/// Waits, at most [`FREE_PAGE_WAIT`], until the guest has reported its
/// free memory and the VMM's count has held for [`FREE_PAGE_QUIET`]; the
/// bytes given back. Its clones then find their free memory reported
/// already, and do not repeat the report (and the host work it makes) as
/// their containers start.
fn await_free_page_report(socket: &Path) -> u64 {
    let started = Instant::now();
    let mut last = 0u64;
    let mut held_since = Instant::now();
    loop {
        let left = FREE_PAGE_WAIT.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        // A status that hangs must not stretch the wait past its bound.
        let reported = match control::request(socket, Request::Status {}, left.max(STATUS_POLL)) {
            Ok(Response {
                counters: Some(c), ..
            }) => c.free_pages.reported_bytes,
            Ok(_) => return last,
            Err(e) => {
                log::debug!("template: status for the free page report: {e}");
                return last;
            }
        };
        if reported != last {
            last = reported;
            held_since = Instant::now();
        } else if reported > 0 && held_since.elapsed() >= FREE_PAGE_QUIET {
            return reported;
        }
        std::thread::sleep(STATUS_POLL);
    }
    log::debug!(
        "template: the guest's free page report did not settle in {} s",
        FREE_PAGE_WAIT.as_secs()
    );
    last
}

/// Creates a folder of the jail (0700) unless a failed restore left it.
pub(super) fn make_dir(path: &Path) -> Result<(), SandboxError> {
    if path.is_dir() {
        return Ok(());
    }
    Ok(jail::make_dir(path)?)
}

/// Empties the VMM's sockets folder after a failed restore (its sockets,
/// virtiofsd's, a half-written snapshot), for the cold boot's.
fn clear_run_dir(run: &Path) {
    let Ok(entries) = fs::read_dir(run) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let gone = if e.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        if let Err(err) = gone {
            log::warn!("{}: {err}", p.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_vm_config::control::{FreePageCount, VmCounters, VmState};
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A stand-in VMM control socket answering each status with the next
    /// of `reported` (then the last one), or with `reply` as given.
    fn serve(
        reported: Vec<u64>,
        reply: Option<&'static str>,
    ) -> (PathBuf, std::thread::JoinHandle<usize>) {
        let dir = std::env::temp_dir().join(format!(
            "husk-free-pages-{}-{}",
            std::process::id(),
            reported.len()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let handle = std::thread::spawn(move || {
            let mut served = 0;
            let idle = Instant::now();
            while idle.elapsed() < Duration::from_secs(10) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                let mut line = Vec::new();
                BufReader::new(&s).read_until(b'\n', &mut line).unwrap();
                let text = match reply {
                    Some(r) => r.to_string(),
                    None => {
                        let n = reported[served.min(reported.len() - 1)];
                        let counters = VmCounters {
                            free_pages: FreePageCount {
                                reported_bytes: n,
                                ..Default::default()
                            },
                            ..Default::default()
                        };
                        serde_json::to_string(&Response::status(VmState::Running, counters))
                            .unwrap()
                    }
                };
                s.write_all(format!("{text}\n").as_bytes()).unwrap();
                served += 1;
                if reply.is_some() {
                    break;
                }
            }
            served
        });
        (path, handle)
    }

    #[test]
    fn a_template_waits_for_the_report_to_settle() {
        let (path, server) = serve(vec![0, 0, 0, 128 << 20, 216 << 20], None);
        let t0 = Instant::now();
        assert_eq!(await_free_page_report(&path), 216 << 20);
        // It held for the quiet time after the last change, and no longer
        // than the wait.
        assert!(t0.elapsed() >= FREE_PAGE_QUIET + STATUS_POLL * 4);
        assert!(t0.elapsed() < FREE_PAGE_WAIT);
        drop(server);
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_guest_that_never_reports_costs_the_bounded_wait_only() {
        let (path, server) = serve(vec![0], None);
        let t0 = Instant::now();
        assert_eq!(await_free_page_report(&path), 0);
        assert!(t0.elapsed() >= FREE_PAGE_WAIT);
        assert!(t0.elapsed() < FREE_PAGE_WAIT + Duration::from_secs(2));
        drop(server);
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_refused_status_ends_the_wait() {
        let (path, server) = serve(vec![1, 2, 3], Some(r#"{"ok":false,"error":"nope"}"#));
        let t0 = Instant::now();
        assert_eq!(await_free_page_report(&path), 0);
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert_eq!(server.join().unwrap(), 1);
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }
}
