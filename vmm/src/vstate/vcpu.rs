//! vCPUs: their boot configuration, and one thread each running KVM_RUN and
//! dispatching port I/O and MMIO exits to the buses.
//!
//! Pausing follows Firecracker: the VMM posts a request and kicks the vCPU
//! thread with a real-time signal whose handler sets `immediate_exit` in the
//! thread's `kvm_run`, so KVM_RUN returns EINTR even if the signal lands
//! just before the vCPU enters the guest.

use crate::guest_debug;
use husk_vm_config::control::GuestFaultKind;
use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::exit_stats::{self, ExitKind, ExitStats};
use super::persist::{PersistError, VcpuState};
use super::vm::Vm;
use crate::arch::x86_64::{cpuid, interrupts, msr, regs, BootProtocol};
use crate::devices::bus::Bus;
use crate::devices::virtio::GuestMemory;
use crate::seccomp::{Filters, SeccompError, ThreadKind};

/// The kick signal is SIGRTMIN + this.
const KICK_SIGNAL_OFFSET: i32 = 0;
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset, triple fault, KVM reset event).
    Reset,
    /// The guest powered off (KVM shutdown event, or HLT exit).
    PowerOff,
    /// The VMM was asked to stop (control socket shutdown).
    Requested,
    /// Something went wrong; the message says what.
    Error(String),
}

impl ExitReason {
    /// The VMM's exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Error(_) => 1,
            _ => 0,
        }
    }
}

/// Where vCPUs (and devices) report that the VM should stop: the first
/// reason wins, and the eventfd wakes the VMM's event loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the VMM.
    pub fn report(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot signal the VMM exit eventfd: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn evt(&self) -> &EventFd {
        &self.evt
    }
}

/// Errors configuring or starting a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {what}: {source}")]
    Kvm {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted {set} of {total} boot MSRs")]
    Msrs { index: u8, set: usize, total: usize },
    #[error("vCPU {index}: {source}")]
    Msr {
        index: u8,
        #[source]
        source: msr::MsrError,
    },
    #[error("vCPU {index}: cannot write boot tables: {source}")]
    Memory {
        index: u8,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("vCPU {index}: {source}")]
    Seccomp {
        index: u8,
        #[source]
        source: SeccompError,
    },
    /// The source names the vCPU already.
    #[error("{source}")]
    State {
        index: u8,
        #[source]
        source: PersistError,
    },
    #[error("vCPU {index} is not paused or did not answer in time")]
    NotPaused { index: u8 },
    #[error("cannot spawn the thread of vCPU {index}: {source}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
}

/// What the VMM asks of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// What a vCPU thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Running,
    Paused,
    Exited,
}

struct ControlState {
    request: Request,
    state: State,
    /// A paused vCPU is asked for its state (snapshot).
    save_requested: bool,
    /// What the thread answered.
    saved: Option<Result<VcpuState, PersistError>>,
}

/// What a vCPU thread does next.
enum Action {
    Run,
    Save,
    Stop,
}

/// The request/acknowledge channel between the VMM and one vCPU thread.
struct VcpuControl {
    inner: Mutex<ControlState>,
    cv: Condvar,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, state: State) {
        self.lock().state = state;
        self.cv.notify_all();
    }

    /// Blocks while paused; says whether to run, save the state or stop.
    fn wait_for_run(&self) -> Action {
        let mut st = self.lock();
        loop {
            match st.request {
                Request::Run => {
                    st.state = State::Running;
                    return Action::Run;
                }
                Request::Stop => return Action::Stop,
                Request::Pause => {
                    if st.state != State::Paused {
                        st.state = State::Paused;
                        self.cv.notify_all();
                    }
                    if std::mem::take(&mut st.save_requested) {
                        return Action::Save;
                    }
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    fn put_saved(&self, saved: Result<VcpuState, PersistError>) {
        self.lock().saved = Some(saved);
        self.cv.notify_all();
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only touches a const-initialized thread-local without destructor and
    // a byte store: async-signal-safe.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer targets the kvm_run mapping of the VcpuFd this
        // thread owns; it is set after that mapping exists and cleared
        // before the VcpuFd is dropped (see `Vcpu::thread_main`).
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// The real-time signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick signal handler (once per process is enough; repeated
/// calls are harmless).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// The MSRs a snapshot saves (KVM's saveable list, filtered).
    msrs_to_save: Arc<Vec<u32>>,
}

/// What one KVM_RUN ended with.
enum RunOutcome {
    Continue,
    Interrupted,
    Stop(ExitReason),
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and sets its CPUID, MSRs, local APIC,
    /// FPU and boot registers. `supported_cpuid` is KVM's supported set.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &Vm,
        mem: &GuestMemory,
        index: u8,
        count: u8,
        supported_cpuid: &CpuId,
        entry: u64,
        protocol: BootProtocol,
    ) -> Result<Self, VcpuError> {
        let kvm_err = |what| {
            move |source| VcpuError::Kvm {
                index,
                what,
                source,
            }
        };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("cannot create vCPU"))?;

        let mut cpuid = supported_cpuid.clone();
        cpuid::adjust(cpuid.as_mut_slice(), index, count);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("cannot set CPUID"))?;

        let msrs = msr::boot_msrs().map_err(|source| VcpuError::Msr { index, source })?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err("cannot set MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                index,
                set,
                total: msrs.as_slice().len(),
            });
        }

        let mut lapic = fd
            .get_lapic()
            .map_err(kvm_err("cannot get the local APIC"))?;
        interrupts::set_lint(&mut lapic);
        fd.set_lapic(&lapic)
            .map_err(kvm_err("cannot set the local APIC"))?;

        fd.set_fpu(&regs::boot_fpu())
            .map_err(kvm_err("cannot set FPU registers"))?;
        fd.set_regs(&regs::boot_regs(entry, protocol))
            .map_err(kvm_err("cannot set registers"))?;
        let mut sregs = fd.get_sregs().map_err(kvm_err("cannot get sregs"))?;
        regs::setup_sregs(mem, protocol, &mut sregs)
            .map_err(|source| VcpuError::Memory { index, source })?;
        fd.set_sregs(&sregs).map_err(kvm_err("cannot set sregs"))?;
        Ok(Self {
            index,
            fd,
            msrs_to_save: Arc::default(),
        })
    }

    /// Creates vCPU `index` with the state a snapshot saved.
    pub fn restore(vm: &Vm, index: u8, state: &VcpuState) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                what: "cannot create vCPU",
                source,
            })?;
        state
            .restore(&fd, index)
            .map_err(|source| VcpuError::State { index, source })?;
        Ok(Self {
            index,
            fd,
            msrs_to_save: Arc::default(),
        })
    }

    /// The MSRs a snapshot of this vCPU saves.
    pub fn with_msrs_to_save(mut self, msrs: Arc<Vec<u32>>) -> Self {
        self.msrs_to_save = msrs;
        self
    }

    /// Starts the vCPU's thread; with `seccomp`, the thread installs the
    /// vCPU filter before it first enters the guest.
    pub fn start(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        seccomp: Option<Arc<Filters>>,
    ) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let control = Arc::new(VcpuControl {
            inner: Mutex::new(ControlState {
                request: Request::Run,
                state: State::Starting,
                save_requested: false,
                saved: None,
            }),
            cv: Condvar::new(),
        });
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let filtered = seccomp.map_or(Ok(()), |f| f.install(ThreadKind::Vcpu));
                match filtered {
                    Ok(()) => self.thread_main(&pio, &mmio, &exit, &thread_control),
                    // The guest never runs unfiltered: this vCPU stays out
                    // and the VM stops on the error.
                    Err(source) => {
                        exit.report(ExitReason::Error(
                            VcpuError::Seccomp { index, source }.to_string(),
                        ));
                        thread_control.set_state(State::Exited);
                    }
                }
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            thread: Some(thread),
            control,
        })
    }

    fn thread_main(mut self, pio: &Bus, mmio: &Bus, exit: &ExitSignal, control: &VcpuControl) {
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        let mut first_run = true;
        let mut stats = exit_stats::enabled().then(ExitStats::new);
        loop {
            match control.wait_for_run() {
                Action::Run => {}
                Action::Stop => break,
                Action::Save => {
                    control.put_saved(self.save_state());
                    continue;
                }
            }
            if std::mem::take(&mut first_run) && self.index == 0 {
                // The boot benchmark sets this event's timestamp against the
                // process start: the guest's first instruction follows it.
                tracing::debug!(vcpu = 0, "first KVM_RUN");
            }
            match self.run_once(pio, mmio, stats.as_mut()) {
                RunOutcome::Continue => {}
                // A kick: clear immediate_exit and look at the request.
                RunOutcome::Interrupted => {
                    self.fd.set_kvm_immediate_exit(0);
                    // Where a kicked vCPU was: what a stuck guest was doing.
                    if let Ok(regs) = self.fd.get_regs() {
                        tracing::debug!(
                            vcpu = self.index,
                            rip = format_args!("{:#x}", regs.rip),
                            rflags = format_args!("{:#x}", regs.rflags),
                            "vCPU interrupted"
                        );
                    }
                }
                RunOutcome::Stop(reason) => {
                    // The VMM logs the reason when it stops the VM.
                    tracing::debug!(vcpu = self.index, "vCPU stopped: {reason:?}");
                    exit.report(reason);
                    break;
                }
            }
        }
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        if let Some(stats) = stats {
            // The boot benchmark reads this line (tests/bench/vmm.py).
            tracing::info!(
                vcpu = self.index,
                total = stats.total(),
                counts = %stats.summary(),
                "exit counts"
            );
        }
        control.set_state(State::Exited);
    }

    /// The vCPU's state, for a snapshot; the thread is paused.
    fn save_state(&mut self) -> Result<VcpuState, PersistError> {
        // An I/O or MMIO read the guest is waiting on completes only on the
        // next KVM_RUN: enter with immediate_exit set, so KVM finishes it
        // into the registers and returns at once (EINTR), as Firecracker does.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        VcpuState::save(&self.fd, self.index, &self.msrs_to_save)
    }

    /// Runs the guest until its next exit and handles the exit.
    fn run_once(&mut self, pio: &Bus, mmio: &Bus, stats: Option<&mut ExitStats>) -> RunOutcome {
        let index = self.index;
        let exit = self.fd.run();
        if let Some(stats) = stats {
            let (kind, addr) = match &exit {
                Ok(VcpuExit::IoIn(port, _)) => (ExitKind::PioIn, u64::from(*port)),
                Ok(VcpuExit::IoOut(port, _)) => (ExitKind::PioOut, u64::from(*port)),
                Ok(VcpuExit::MmioRead(addr, _)) => (ExitKind::MmioRead, *addr),
                Ok(VcpuExit::MmioWrite(addr, _)) => (ExitKind::MmioWrite, *addr),
                Ok(VcpuExit::Intr) => (ExitKind::Interrupted, 0),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    (ExitKind::Interrupted, 0)
                }
                _ => (ExitKind::Other, 0),
            };
            stats.record(kind, addr);
        }
        let failure = match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(u64::from(port), data) {
                    // Nothing decodes the port: the ISA bus floats high.
                    data.fill(0xff);
                }
                return RunOutcome::Continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
                return RunOutcome::Continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    guest_debug!(
                        GuestFaultKind::Unmapped,
                        vcpu = index,
                        "MMIO read of unmapped {addr:#x}"
                    );
                    data.fill(0xff);
                }
                return RunOutcome::Continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !mmio.write(addr, data) {
                    guest_debug!(
                        GuestFaultKind::Unmapped,
                        vcpu = index,
                        "MMIO write to unmapped {addr:#x}"
                    );
                }
                return RunOutcome::Continue;
            }
            Ok(VcpuExit::Intr) => return RunOutcome::Interrupted,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return RunOutcome::Interrupted
            }
            Ok(VcpuExit::Hlt) => return RunOutcome::Stop(ExitReason::PowerOff),
            // A triple fault: on a PC that resets the machine.
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
                return RunOutcome::Stop(ExitReason::Reset)
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
                return RunOutcome::Stop(ExitReason::PowerOff)
            }
            Ok(VcpuExit::SystemEvent(kind, data)) => {
                format!("system event {kind} (data {data:x?})")
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the exit union is the one KVM filled.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let what = match suberror {
                    1 => ": emulation failure",
                    2 => ": exception while delivering an exception",
                    3 => ": delivery event",
                    _ => "",
                };
                format!("KVM internal error (suberror {suberror}{what})")
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("VM entry failed (hardware reason {reason:#x}, host cpu {cpu})")
            }
            Ok(other) => format!("unexpected exit {other:?}"),
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        RunOutcome::Stop(ExitReason::Error(format!(
            "vCPU {index}: {failure}{}",
            self.rip_suffix()
        )))
    }

    /// ", RIP 0x..." for error messages (empty if the registers are unreadable).
    fn rip_suffix(&self) -> String {
        match self.fd.get_regs() {
            Ok(r) => format!(", RIP {:#x}", r.rip),
            Err(_) => String::new(),
        }
    }
}

/// The VMM's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: Option<JoinHandle<()>>,
    control: Arc<VcpuControl>,
}

impl VcpuHandle {
    fn request(&self, request: Request) {
        let mut st = self.control.lock();
        if st.request != Request::Stop {
            st.request = request;
        }
        drop(st);
        self.control.cv.notify_all();
        if request != Request::Run {
            self.kick();
        }
    }

    /// Interrupts KVM_RUN so the thread looks at its request.
    fn kick(&self) {
        if let Some(t) = &self.thread {
            if let Err(e) = t.kill(kick_signal()) {
                tracing::warn!(vcpu = self.index, "cannot kick vCPU thread: {e}");
            }
        }
    }

    /// Waits until the thread is paused or exited; false on timeout.
    fn wait_paused(&self, timeout: Duration) -> bool {
        let st = self.control.lock();
        let (st, _) = self
            .control
            .cv
            .wait_timeout_while(st, timeout, |s| {
                !matches!(s.state, State::Paused | State::Exited)
            })
            .unwrap_or_else(|e| e.into_inner());
        matches!(st.state, State::Paused | State::Exited)
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// Has the paused vCPU thread read its state; an error if KVM refused,
    /// or if the vCPU is not paused or did not answer in time.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let index = self.index;
        let mut st = self.control.lock();
        if st.state != State::Paused || st.request != Request::Pause {
            return Err(VcpuError::NotPaused { index });
        }
        st.saved = None;
        st.save_requested = true;
        drop(st);
        self.control.cv.notify_all();
        let st = self.control.lock();
        let (mut st, _) = self
            .control
            .cv
            .wait_timeout_while(st, PAUSE_TIMEOUT, |s| {
                s.saved.is_none() && s.state == State::Paused
            })
            .unwrap_or_else(|e| e.into_inner());
        st.save_requested = false;
        match st.saved.take() {
            Some(r) => r.map_err(|source| VcpuError::State { index, source }),
            None => Err(VcpuError::NotPaused { index }),
        }
    }
}

/// How long a vCPU may take to acknowledge a pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Pauses every vCPU; false if one did not acknowledge in time.
pub fn pause_all(vcpus: &[VcpuHandle]) -> bool {
    vcpus.iter().for_each(|v| v.request(Request::Pause));
    vcpus.iter().all(|v| {
        // Re-kick in case the first signal landed between the request
        // check and KVM_RUN of an already cleared immediate_exit.
        v.wait_paused(PAUSE_TIMEOUT / 2) || {
            v.kick();
            v.wait_paused(PAUSE_TIMEOUT / 2)
        }
    })
}

/// Resumes every vCPU.
pub fn resume_all(vcpus: &[VcpuHandle]) {
    vcpus.iter().for_each(|v| v.request(Request::Run));
}

/// Stops every vCPU thread and joins it.
pub fn stop_all(vcpus: &mut [VcpuHandle]) {
    vcpus.iter().for_each(|v| v.request(Request::Stop));
    for v in vcpus.iter_mut() {
        if let Some(t) = v.thread.take() {
            // A vCPU that ignores the first kick (signal raced KVM_RUN entry)
            // gets more until it exits.
            while !t.is_finished() {
                let exited = {
                    let st = v.control.lock();
                    let (st, _) = v
                        .control
                        .cv
                        .wait_timeout_while(st, Duration::from_millis(100), |s| {
                            s.state != State::Exited
                        })
                        .unwrap_or_else(|e| e.into_inner());
                    st.state == State::Exited
                };
                if exited {
                    break;
                }
                if let Err(e) = t.kill(kick_signal()) {
                    tracing::warn!(vcpu = v.index, "cannot kick vCPU thread: {e}");
                    break;
                }
            }
            if t.join().is_err() {
                tracing::error!(vcpu = v.index, "vCPU thread panicked");
            }
        }
    }
}
