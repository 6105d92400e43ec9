//! The plumbing between a device's virtqueues and the event manager: the
//! eventfd that tells the event loop about an activation or reset, draining
//! queue notify eventfds, the pop / handle / add_used loop of a request
//! queue, and interrupting the guest about used buffers. [`DeviceState`]
//! puts these together for every device.
//!
//! [`DeviceState`]: super::DeviceState

use crate::{guest_error, guest_warn};
use husk_vm_config::control::GuestFaultKind;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events};
use tracing::{error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActiveQueue, GuestMemory, IrqTrigger, INT_VRING};

/// Errors from telling the guest about used buffers.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("reading the used event index: {0}")]
    Queue(#[source] virtio_queue::Error),
    #[error("raising the queue interrupt: {0}")]
    Irq(#[source] io::Error),
}

/// Interrupts the guest if it wants to hear about the buffers just added to
/// `queue`'s used ring.
pub fn signal_used(
    mem: &GuestMemory,
    queue: &mut Queue,
    irq: &IrqTrigger,
) -> Result<(), SignalError> {
    if queue.needs_notification(mem).map_err(SignalError::Queue)? {
        irq.trigger(INT_VRING).map_err(SignalError::Irq)?;
    }
    Ok(())
}

/// Resets an eventfd's counter. The nonblocking read fails only when the
/// counter is already 0, though epoll just said it was not.
fn drain(evt: &EventFd, dev: &str, what: &str) {
    if let Err(e) = evt.read() {
        warn!(error = %e, "{dev}: reading {what}");
    }
}

/// Wakes the event loop to (un)register queue eventfds after an activation
/// or reset.
pub struct ActivateEvt(EventFd);

impl ActivateEvt {
    pub fn new() -> io::Result<Self> {
        EventFd::new(EFD_NONBLOCK).map(Self)
    }

    /// Called from `activate`/`reset`, on the vCPU thread.
    pub fn signal(&self) -> io::Result<()> {
        self.0.write(1)
    }

    /// Whether an event on `fd` is this one.
    pub fn is(&self, fd: RawFd) -> bool {
        fd == self.0.as_raw_fd()
    }

    /// Watches the eventfd (from `MutEventSubscriber::init`).
    pub fn register(&self, ops: &mut EventOps, dev: &str) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            error!(error = ?e, "{dev}: registering the activation eventfd");
        }
    }

    /// Consumes a delivered activation event.
    pub fn consume(&self, dev: &str) {
        drain(&self.0, dev, "the activation eventfd");
    }
}

/// If `fd` is one of `queues`' notify eventfds, consumes the notification
/// and returns the queue's index.
pub fn take_notification(queues: &[ActiveQueue], fd: RawFd, dev: &str) -> Option<usize> {
    let i = queues.iter().position(|q| q.notify.as_raw_fd() == fd)?;
    drain(&queues[i].notify, dev, "a queue eventfd");
    Some(i)
}

/// Hands every available chain of `queue` to `handle`, which returns the
/// bytes it wrote to the chain, puts it in the used ring and interrupts the
/// guest if it asked for it. `dev` names the device in logs.
///
/// A handler may refuse a chain for now (a rate limiter's) by returning
/// None: the chain goes back to the avail ring, where the next call finds
/// it first, and processing stops. Queue notifications then stay off: the
/// device resumes the queue by itself (on its timer), and a guest kick
/// meanwhile would be a wasted exit.
pub fn process_chains(
    dev: &str,
    mem: &GuestMemory,
    queue: &mut Queue,
    irq: &IrqTrigger,
    mut handle: impl FnMut(DescriptorChain<&GuestMemory>, &GuestMemory) -> Option<u32>,
) {
    let mut used_any = false;
    'rounds: loop {
        if let Err(e) = queue.disable_notification(mem) {
            guest_warn!(GuestFaultKind::Queue, error = %e, "{dev}: disabling queue notifications");
            break;
        }
        let mut popped = 0usize;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped += 1;
            let head = chain.head_index();
            let Some(len) = handle(chain, mem) else {
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                break 'rounds;
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                guest_warn!(GuestFaultKind::Queue, error = %e, head, "{dev}: adding a used element");
            }
            used_any = true;
        }
        // Re-enabling reports chains added meanwhile; a round that found
        // nothing means the avail index is bogus, so don't spin on it.
        match queue.enable_notification(mem) {
            Ok(true) if popped > 0 => continue,
            Ok(true) => {
                guest_warn!(GuestFaultKind::Queue, "{dev}: avail ring index is invalid");
                break;
            }
            Ok(false) => break,
            Err(e) => {
                guest_warn!(GuestFaultKind::Queue, error = %e, "{dev}: enabling queue notifications");
                break;
            }
        }
    }
    if !used_any {
        return;
    }
    if let Err(e) = signal_used(mem, queue, irq) {
        guest_error!(GuestFaultKind::Queue, error = %e, "{dev}: telling the guest about used buffers");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{active_queue, guest_memory, irq};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn take_notification_drains_only_the_queue_it_names() {
        let mem = guest_memory(0x10_0000);
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let queues = [active_queue(&vq), active_queue(&vq)];
        queues[0].notify.write(1).unwrap();
        queues[1].notify.write(1).unwrap();
        let fd = queues[1].notify.as_raw_fd();
        assert_eq!(take_notification(&queues, fd, "test"), Some(1));
        assert!(queues[1].notify.read().is_err());
        assert_eq!(queues[0].notify.read().unwrap(), 1);
        let other = EventFd::new(EFD_NONBLOCK).unwrap();
        assert_eq!(take_notification(&queues, other.as_raw_fd(), "test"), None);
    }

    #[test]
    fn signal_used_raises_the_vring_interrupt() {
        let mem = guest_memory(0x10_0000);
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut queue = active_queue(&vq).queue;
        let irq = irq();
        signal_used(&mem, &mut queue, &irq).unwrap();
        assert_eq!(irq.status(), INT_VRING);
        assert_eq!(irq.irq_evt().read().unwrap(), 1);
    }
}
