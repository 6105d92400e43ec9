//! Virtio devices and their virtio-mmio transport.
//!
//! A device implements [`VirtioDevice`]: its type, features, config space and
//! queue handling. The transport ([`mmio::MmioTransport`]) owns the register
//! file the guest driver programs, and on DRIVER_OK hands the device its
//! queues, guest memory and interrupt line through [`VirtioDevice::activate`].

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod queue_events;
pub mod rng;
#[cfg(test)]
pub mod test_utils;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Device type ids (virtio 1.x, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit every husk device offers: virtio 1.x (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits of the mmio InterruptStatus register.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Errors from activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device back end: {0}")]
    Backend(#[source] std::io::Error),
    #[error("device is already active")]
    AlreadyActive,
}

/// A device's interrupt line: the status bits the guest reads and acks through
/// the transport, and the irqfd KVM injects the interrupt from.
pub struct IrqTrigger {
    status: AtomicU32,
    irq_evt: EventFd,
}

impl IrqTrigger {
    pub fn new(irq_evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq_evt,
        }
    }

    /// Raises the interrupt with `bits` (INT_VRING or INT_CONFIG) set.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irq_evt.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the bits the driver handled.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd to register as KVM irqfd for the device's GSI.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }
}

/// One activated queue: the queue state the driver programmed and the
/// eventfd KVM signals when the guest writes its index to QueueNotify.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// Serves a read of a device's config space `config` at `offset`; bytes past
/// its end read as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| config.get(usize::try_from(o).ok()?))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (TYPE_*).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues; its length is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers (including VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of the offered ones;
    /// the transport masks the rest off).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific config space; out of range reads zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space; read-only fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on DRIVER_OK with the queues the driver set up.
    fn activate(
        &mut self,
        mem: GuestMemory,
        irq: Arc<IrqTrigger>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Whether `activate` has run (and no reset since).
    fn is_activated(&self) -> bool;
    /// Resets the device on a driver reset (status 0). Returns false when the
    /// device cannot be reset, in which case the transport marks it
    /// DEVICE_NEEDS_RESET.
    fn reset(&mut self) -> bool {
        false
    }
}
