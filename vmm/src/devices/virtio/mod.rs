//! Virtio devices and their virtio-mmio transport.
//!
//! A device implements [`VirtioDevice`] around a [`DeviceState`] (in
//! [`device`]), which holds what all devices share: type, features, config
//! space and the queues from activation to reset. The transport
//! ([`mmio::MmioTransport`]) owns the register file the guest driver
//! programs, and on DRIVER_OK hands the device its queues, guest memory and
//! interrupt line through [`VirtioDevice::activate`]. Each device lives in
//! its own module, as in Firecracker's `devices/virtio/<dev>/`.

pub mod balloon;
pub mod block;
pub mod chain;
pub mod device;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue_events;
pub mod rng;
#[cfg(test)]
pub mod test_utils;
pub mod vsock;

pub use device::{ActivateError, ActiveQueue, DeviceEvent, DeviceState, VirtioDevice};

use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Device type ids (virtio 1.x, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = fs::TYPE_FS;

/// Feature bit every husk device offers: virtio 1.x (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits of the mmio InterruptStatus register.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

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

    /// Sets the InterruptStatus register without raising the interrupt
    /// (a restored device: the interrupt controller's state came with the
    /// snapshot).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
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
