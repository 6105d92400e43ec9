//! Legacy PC devices: the 8250 serial console and the i8042 reset line.

pub mod i8042;
pub mod serial;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd registered as a KVM irqfd.
pub struct IrqEvt(pub EventFd);

impl Trigger for IrqEvt {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}
