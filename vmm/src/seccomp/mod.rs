//! Seccomp filters for husk-vmm's threads: a VMM that a guest takes over
//! through a device bug can still only make the system calls its thread
//! needs to serve that guest.
//!
//! This module owns compiling the allow-lists ([`filters`]) into BPF once
//! at start-up and installing one on the calling thread. There are two
//! kinds of thread and a list for each:
//! - each vCPU thread installs the vCPU list itself, before its first
//!   KVM_RUN, so no guest instruction runs before it;
//! - the main thread installs the main list after the VM is built and the
//!   vCPU threads are spawned (a filter is inherited by threads spawned
//!   after it, and a vCPU thread would otherwise be bound by both lists),
//!   before its event loop first runs: the main thread only acts on the
//!   guest from that loop.
//!
//! A call outside the list raises SIGSYS (SECCOMP_RET_TRAP, as
//! Firecracker does), and the handler ([`sigsys`]) logs the thread kind
//! and the call's name, then exits with [`BAD_SYSCALL_EXIT_CODE`]. That
//! ends the VMM as surely as SECCOMP_RET_KILL_PROCESS but leaves a line in
//! the VMM's log that names the call, where a kill would leave only a
//! signal status. The handler cannot be replaced once filters are on:
//! rt_sigaction is allowed for SIGABRT only.

mod filters;
mod sigsys;

use std::fmt;

use seccompiler::{BackendError, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use sigsys::BAD_SYSCALL_EXIT_CODE;

/// The kinds of husk-vmm thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: devices' back ends, the control socket.
    Main,
    /// A vCPU running KVM_RUN and handling its exits.
    Vcpu,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors preparing or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {kind} thread's seccomp filter: {source}")]
    Build {
        kind: ThreadKind,
        #[source]
        source: BackendError,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot install the {kind} thread's seccomp filter: {source}")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
}

/// The compiled filters of both thread kinds.
pub struct Filters {
    main: BpfProgram,
    vcpu: BpfProgram,
}

impl Filters {
    /// Compiles both lists for this process (the tgkill rules name its
    /// pid; `kick_signal` is the signal that interrupts KVM_RUN) and
    /// installs the SIGSYS handler that reports their violations.
    pub fn new(kick_signal: i32) -> Result<Self, SeccompError> {
        let pid = std::process::id();
        let filters = Self {
            main: compile(ThreadKind::Main, filters::main_thread(pid, kick_signal))?,
            vcpu: compile(ThreadKind::Vcpu, filters::vcpu_thread(pid))?,
        };
        sigsys::install_handler().map_err(SeccompError::Handler)?;
        Ok(filters)
    }

    /// Installs `kind`'s filter on the calling thread, for good: it also
    /// binds the threads this one spawns afterwards.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let program = match kind {
            ThreadKind::Main => &self.main,
            ThreadKind::Vcpu => &self.vcpu,
        };
        sigsys::set_thread_kind(kind.name());
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { kind, source })
    }
}

fn compile(
    kind: ThreadKind,
    rules: Result<filters::Rules, BackendError>,
) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let filter = SeccompFilter::new(
        rules.map_err(build)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        host_arch(),
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// The architecture the filters check every call against: an i386 call
/// (int 0x80) kills the process outright, an x32 one matches no allowed
/// number and traps. husk-vmm is x86-64 only, as are the lists.
fn host_arch() -> TargetArch {
    TargetArch::x86_64
}

#[cfg(test)]
mod tests;
