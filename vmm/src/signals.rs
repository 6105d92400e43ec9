//! Process signals: SIGTERM and SIGINT become an eventfd the VMM's event
//! loop watches, so the VMM stops the VM and cleans up instead of dying.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::eventfd::EventFd;

/// Errors installing the handlers.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up termination signal handling: {0}")]
pub struct SignalError(String);

/// Written by the SIGTERM/SIGINT handler; never closed, so the handler's
/// raw fd stays valid for the life of the process.
static TERM_EVT: OnceLock<EventFd> = OnceLock::new();
static TERM_EVT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn handle_termination(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = TERM_EVT_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; `fd` is the eventfd in
        // TERM_EVT, which is never closed, and the buffer is 8 valid bytes.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Makes SIGTERM and SIGINT stop the VM through the event loop, so the VMM
/// exits cleanly (vCPUs joined, control socket removed) instead of dying.
pub fn install_termination_handler() -> Result<(), SignalError> {
    let evt = match TERM_EVT.get() {
        Some(evt) => evt,
        None => {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| SignalError(e.to_string()))?;
            TERM_EVT.get_or_init(|| evt)
        }
    };
    TERM_EVT_FD.store(evt.as_raw_fd(), Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, handle_termination)
            .map_err(|e| SignalError(format!("signal {sig}: {e}")))?;
    }
    Ok(())
}

/// The eventfd signalled on SIGTERM/SIGINT, once the handler is installed.
pub fn termination_evt() -> Option<&'static EventFd> {
    TERM_EVT.get()
}
