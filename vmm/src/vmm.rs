//! The running VM: vCPU threads, the devices the VMM talks to, and the
//! event loop that watches for the guest stopping and serves the control
//! socket, until the guest resets or powers off or is shut down.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use std::path::Path;

use husk_vm_config::control::{Request, Response, SnapshotInfo, VmCounters, VmState};

use crate::builder::SharedTransport;
use crate::control::ControlServer;
use crate::devices::bus::Bus;
use crate::devices::legacy::i8042::I8042Device;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::GuestMemory;
use crate::signals;
use crate::snapshot::{self, DeviceId, DeviceSnapshot, SnapshotError, SnapshotState, VmShape};
use crate::vstate::persist::{self, VmState as VmKvmState};
use crate::vstate::vcpu::{self, ExitReason, ExitSignal, VcpuHandle};
use crate::vstate::vm::Vm;

/// Everything the event loop dispatches to.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The VMM's event loop.
pub type EventManager = event_manager::EventManager<Subscriber>;

/// Errors from running the event loop.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("event loop: {0}")]
    EventLoop(#[from] event_manager::Error),
}

/// What the VMM keeps alive while the guest runs; the vCPU threads use
/// the buses and memory, KVM the memory and VM fd.
pub struct VmResources {
    pub vm: Vm,
    pub mem: GuestMemory,
    pub pio_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    /// What a snapshot saves besides KVM's state: the UART and each
    /// virtio device (in attach order, named as the shape names them).
    pub serial: Arc<Mutex<SerialDevice>>,
    pub transports: Vec<(DeviceId, SharedTransport)>,
    /// For the status's free page counters.
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel_bytes: Option<u64>,
    /// Why no snapshot of this VM is possible, if so.
    pub snapshot_refusal: Option<String>,
}

/// A running VM.
pub struct Vmm {
    // Field order matters for drop: vCPU threads are stopped in `Drop`,
    // before the resources they use go away.
    vcpus: Vec<VcpuHandle>,
    exit: Arc<ExitSignal>,
    reset_evt: EventFd,
    i8042: Arc<Mutex<I8042Device>>,
    control: Option<ControlServer>,
    state: VmState,
    /// When a graceful shutdown turns into a forced one.
    shutdown_deadline: Option<(Instant, u64)>,
    resources: VmResources,
}

impl Vmm {
    pub fn new(
        vcpus: Vec<VcpuHandle>,
        exit: Arc<ExitSignal>,
        reset_evt: EventFd,
        i8042: Arc<Mutex<I8042Device>>,
        control: Option<ControlServer>,
        resources: VmResources,
    ) -> Self {
        Self {
            vcpus,
            exit,
            reset_evt,
            i8042,
            control,
            state: VmState::Running,
            shutdown_deadline: None,
            resources,
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// Pauses the vCPUs.
    pub fn pause(&mut self) -> Result<(), String> {
        if self.state == VmState::Paused {
            return Ok(());
        }
        if !vcpu::pause_all(&self.vcpus) {
            // Leave them all running rather than half paused.
            vcpu::resume_all(&self.vcpus);
            return Err("vCPUs did not pause in time".into());
        }
        self.state = VmState::Paused;
        tracing::info!("VM paused");
        Ok(())
    }

    /// Resumes the vCPUs.
    pub fn resume(&mut self) {
        if self.state == VmState::Paused {
            vcpu::resume_all(&self.vcpus);
            self.state = VmState::Running;
            tracing::info!("VM resumed");
        }
    }

    /// Pauses the VM and writes its snapshot into the new folder `dir`;
    /// resumes afterwards only if `resume` (and it was running). A failed
    /// snapshot leaves no files and the VM as it was.
    pub fn snapshot(&mut self, dir: &Path, resume: bool) -> Result<SnapshotInfo, SnapshotError> {
        let start = Instant::now();
        if let Some(why) = &self.resources.snapshot_refusal {
            return Err(SnapshotError::Unsupported(why.clone()));
        }
        let was_running = self.state == VmState::Running;
        self.pause().map_err(SnapshotError::Unsupported)?;
        // Asked with the vCPUs paused: a device's answer may depend on
        // what the guest has put in its rings (virtio-fs).
        let supported = self.resources.transports.iter().try_for_each(|(id, t)| {
            lock_transport(t)
                .snapshot_support()
                .map_err(|e| SnapshotError::Unsupported(format!("{id}: {e}")))
        });
        let result = supported.and_then(|()| self.write_snapshot(dir));
        if was_running && (resume || result.is_err()) {
            self.resume();
        }
        let (state_bytes, memory_bytes_written) = result?;
        let info = SnapshotInfo {
            state_bytes,
            memory_bytes_written,
            memory_bytes: self.resources.memory_mib << 20,
            duration_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        tracing::info!(
            path = %dir.display(),
            state_bytes,
            memory_bytes_written,
            duration_ms = info.duration_ms,
            "snapshot written"
        );
        Ok(info)
    }

    /// Captures the paused VM and writes both files; on failure removes
    /// what it created.
    fn write_snapshot(&self, dir: &Path) -> Result<(u64, u64), SnapshotError> {
        let r = &self.resources;
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuHandle::save_state)
            .collect::<Result<Vec<_>, _>>()?;
        let vm = VmKvmState::save(r.vm.fd())?;
        let serial = r
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot();
        let devices = r
            .transports
            .iter()
            .map(|(id, t)| {
                let transport = lock_transport(t).snapshot()?;
                Ok(DeviceSnapshot {
                    id: id.clone(),
                    transport,
                })
            })
            .collect::<Result<Vec<_>, SnapshotError>>()?;
        let state = SnapshotState {
            shape: VmShape {
                vcpus: r.vcpus,
                memory_mib: r.memory_mib,
                devices: r.transports.iter().map(|(id, _)| id.clone()).collect(),
                kernel_bytes: r.kernel_bytes,
            },
            vm,
            vcpus,
            serial,
            devices,
        };
        snapshot::create_folder(dir)?;
        let written = (|| {
            let mem_path = dir.join(snapshot::MEMORY_FILE);
            let file = snapshot::format::create_private(&mem_path).map_err(|source| {
                SnapshotError::Folder {
                    path: mem_path.clone(),
                    source,
                }
            })?;
            let mem_bytes = persist::save_memory(&r.mem, &file, &mem_path)?;
            // The state file last: its presence means the snapshot is whole.
            let state_bytes = state.write(dir)?;
            Ok((state_bytes, mem_bytes))
        })();
        if written.is_err() {
            for f in [snapshot::STATE_FILE, snapshot::MEMORY_FILE] {
                let _ = rustix::fs::unlinkat(
                    rustix::fs::CWD,
                    dir.join(f),
                    rustix::fs::AtFlags::empty(),
                );
            }
            let _ = rustix::fs::unlinkat(rustix::fs::CWD, dir, rustix::fs::AtFlags::REMOVEDIR);
        }
        written
    }

    /// Asks the guest to shut down (Ctrl-Alt-Del) and stops it after
    /// `timeout_ms` if it has not.
    pub fn shutdown(&mut self, timeout_ms: u64) {
        self.resume();
        let sent = self
            .i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .trigger_ctrl_alt_del();
        match sent {
            Ok(()) => tracing::info!(
                "sent Ctrl-Alt-Del to the guest; forcing shutdown in {timeout_ms} ms"
            ),
            Err(e) => tracing::warn!(
                "cannot send Ctrl-Alt-Del ({e}); forcing shutdown in {timeout_ms} ms"
            ),
        }
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        // A second request may only bring the deadline closer.
        match self.shutdown_deadline {
            Some((d, _)) if d <= deadline => {}
            _ => self.shutdown_deadline = Some((deadline, timeout_ms)),
        }
    }

    /// What a status reports: the logger's counters and the balloon's.
    fn counters(&self) -> VmCounters {
        let mut counters = crate::logger::counters();
        if let Some(balloon) = &self.resources.balloon {
            counters.free_pages = balloon
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .free_page_count();
        }
        counters
    }

    fn handle_request(&mut self, request: Request) -> Response {
        tracing::debug!("control request {request:?}");
        match request {
            Request::Status {} => Response::status(self.state, self.counters()),
            Request::Pause {} => match self.pause() {
                Ok(()) => Response::state(self.state),
                Err(e) => Response::error(e),
            },
            Request::Resume {} => {
                self.resume();
                Response::state(self.state)
            }
            Request::Shutdown { timeout_ms } => {
                self.shutdown(timeout_ms);
                Response::ok()
            }
            Request::Snapshot { path, resume } => match self.snapshot(&path, resume) {
                Ok(info) => Response::snapshot(self.state, info),
                Err(e) => {
                    tracing::warn!("snapshot to {} failed: {e}", path.display());
                    Response::error(e.to_string())
                }
            },
        }
    }

    /// How long the event loop may sleep: until the shutdown deadline.
    fn poll_timeout_ms(&self) -> i32 {
        match self.shutdown_deadline {
            None => -1,
            Some((d, _)) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so we wake after, not just before, the deadline.
                // A deadline past i32::MAX ms (the control socket takes any
                // u64) waits in steps of i32::MAX ms rather than wrapping
                // into a negative (infinite) timeout.
                i32::try_from(left.as_millis())
                    .unwrap_or(i32::MAX)
                    .saturating_add(1)
            }
        }
    }

    /// The exit reason once the VM should stop.
    fn check_exit(&mut self) -> Option<ExitReason> {
        if let Some(r) = self.exit.reason() {
            return Some(r);
        }
        if let Some((deadline, ms)) = self.shutdown_deadline {
            if Instant::now() >= deadline {
                tracing::warn!("guest did not shut down within {ms} ms; stopping it");
                self.exit.report(ExitReason::Requested);
                return self.exit.reason();
            }
        }
        None
    }

    /// Stops the vCPU threads.
    pub fn stop(&mut self) {
        vcpu::stop_all(&mut self.vcpus);
    }
}

fn lock_transport(t: &SharedTransport) -> std::sync::MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}

impl MutEventSubscriber for Vmm {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.exit.evt(), &self.reset_evt] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                tracing::error!("cannot watch VMM eventfd: {e}");
            }
        }
        if let Some(evt) = signals::termination_evt() {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("cannot watch the termination eventfd: {e}");
            }
        }
        if let Some(c) = &self.control {
            c.init(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit.evt().as_raw_fd() {
            let _ = self.exit.evt().read();
        } else if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.exit.report(ExitReason::Reset);
        } else if let Some(evt) = signals::termination_evt().filter(|e| e.as_raw_fd() == fd) {
            let _ = evt.read();
            tracing::info!("termination signal received; stopping the VM");
            self.exit.report(ExitReason::Requested);
        } else if let Some(mut control) = self.control.take() {
            if control.owns(fd) {
                control.process(events, ops, &mut |req| self.handle_request(req));
            }
            self.control = Some(control);
        }
    }
}

/// Runs the event loop until the VM stops; returns why it stopped. The
/// vCPU threads are stopped before this returns.
pub fn run(
    vmm: &Arc<Mutex<Vmm>>,
    event_manager: &mut EventManager,
) -> Result<ExitReason, VmmError> {
    fn lock(v: &Arc<Mutex<Vmm>>) -> std::sync::MutexGuard<'_, Vmm> {
        v.lock().unwrap_or_else(|e| e.into_inner())
    }
    loop {
        let timeout = lock(vmm).poll_timeout_ms();
        event_manager.run_with_timeout(timeout)?;
        let mut v = lock(vmm);
        if let Some(reason) = v.check_exit() {
            v.stop();
            return Ok(reason);
        }
    }
}
