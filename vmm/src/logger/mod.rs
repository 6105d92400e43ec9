//! Everything the guest can make the VMM write, bounded.
//!
//! - [`guest`]: log lines the guest causes (bad register accesses, bad
//!   descriptors, failed requests), counted and rate-limited per
//!   [`GuestFaultKind`]; devices log them with [`guest_warn!`] and
//!   [`guest_debug!`].
//! - [`log_file`]: the VMM's log writer (stderr), which stops after its
//!   size cap with one final line saying so.
//! - [`console`]: the serial console's output, size-capped and
//!   rate-limited; what is dropped is counted, and the guest's UART never
//!   waits for it.
//!
//! [`counters`] gathers what the control socket's status reports. The
//! limits are token buckets of [`crate::rate_limiter::bucket`].
//!
//! [`GuestFaultKind`]: husk_vm_config::control::GuestFaultKind

pub mod console;
pub mod guest;
pub mod log_file;

use husk_vm_config::control::VmCounters;
use husk_vm_config::VmConfig;

/// Applies the description's log limits to the process's limiter and log
/// writer (the logger is set up before the description is read, with the
/// defaults).
pub fn configure(config: &VmConfig) {
    guest::FAULTS.configure(config.log.burst, config.log.interval_ms);
    log_file::LOG.set_cap(config.log.max_bytes);
}

/// The counters of this process's VM, for a status reply.
pub fn counters() -> VmCounters {
    VmCounters {
        guest_faults: guest::FAULTS.counts(),
        console: console::COUNTERS.count(),
        log: log_file::LOG.count(),
        // The balloon's, which the VMM adds (it is no logger counter).
        free_pages: Default::default(),
    }
}

/// A warning about something the guest did: counted under `kind`, and
/// logged unless `kind`'s rate limit suppresses it; the next line logged
/// says how many were suppressed since the last one
/// (`suppressed=K`).
///
/// `guest_warn!(GuestFaultKind::Mmio, offset, "virtio-mmio: ...")`
#[macro_export]
macro_rules! guest_warn {
    ($kind:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $crate::logger::guest::FAULTS.admit($kind) {
            if suppressed > 0 {
                ::tracing::warn!(suppressed, $($arg)+);
            } else {
                ::tracing::warn!($($arg)+);
            }
        }
    };
}

/// [`guest_warn!`] at debug level. Counted all the same; when debug lines
/// are not logged it takes nothing from the kind's rate limit, which is
/// left to the warnings.
#[macro_export]
macro_rules! guest_debug {
    ($kind:expr, $($arg:tt)+) => {
        if !::tracing::enabled!(::tracing::Level::DEBUG) {
            $crate::logger::guest::FAULTS.count($kind);
        } else if let Some(suppressed) = $crate::logger::guest::FAULTS.admit($kind) {
            if suppressed > 0 {
                ::tracing::debug!(suppressed, $($arg)+);
            } else {
                ::tracing::debug!($($arg)+);
            }
        }
    };
}

/// [`guest_warn!`] at info level, for events the guest may repeat at will
/// (device activations).
#[macro_export]
macro_rules! guest_info {
    ($kind:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $crate::logger::guest::FAULTS.admit($kind) {
            if suppressed > 0 {
                ::tracing::info!(suppressed, $($arg)+);
            } else {
                ::tracing::info!($($arg)+);
            }
        }
    };
}

/// [`guest_warn!`] at error level.
#[macro_export]
macro_rules! guest_error {
    ($kind:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $crate::logger::guest::FAULTS.admit($kind) {
            if suppressed > 0 {
                ::tracing::error!(suppressed, $($arg)+);
            } else {
                ::tracing::error!($($arg)+);
            }
        }
    };
}
