//! The plumbing between a device's virtqueues and the event manager that
//! every virtio device needs: the eventfd that tells the event loop about an
//! activation or reset, registering and draining queue notify eventfds, and
//! interrupting the guest about used buffers.
//!
//! Activation and reset run on a vCPU thread, which has no `EventOps`: the
//! device signals its [`ActivateEvt`] there and (un)registers its eventfds
//! when the event loop delivers that event.
//!
//! [`SingleQueue`] is the whole of it for a device with one request queue
//! that can be reset (block, rng): it owns the queue from activation to reset
//! and runs the pop / handle / add_used loop.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use tracing::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, ActiveQueue, GuestMemory, IrqTrigger, INT_VRING};

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

/// Checks what every device checks first on activation: not active yet, and
/// the driver set up `expected` queues.
pub fn check_activation(
    already_active: bool,
    queues: &[ActiveQueue],
    expected: usize,
) -> Result<(), ActivateError> {
    if already_active {
        return Err(ActivateError::AlreadyActive);
    }
    if queues.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len(),
        });
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

    /// Stops watching it, for devices that are activated once for good.
    pub fn unregister(&self, ops: &mut EventOps, dev: &str) {
        if let Err(e) = ops.remove(Events::new(&self.0, EventSet::IN)) {
            warn!(error = ?e, "{dev}: unregistering the activation eventfd");
        }
    }

    /// Consumes a delivered activation event.
    pub fn consume(&self, dev: &str) {
        drain(&self.0, dev, "the activation eventfd");
    }
}

/// Watches every queue's notify eventfd.
pub fn register_notifiers(ops: &mut EventOps, queues: &[ActiveQueue], dev: &str) {
    for q in queues {
        if let Err(e) = ops.add(Events::new(&q.notify, EventSet::IN)) {
            error!(error = ?e, "{dev}: registering a queue eventfd");
        }
    }
}

/// If `fd` is one of `queues`' notify eventfds, consumes the notification
/// and returns the queue's index.
pub fn take_notification(queues: &[ActiveQueue], fd: RawFd, dev: &str) -> Option<usize> {
    let i = queues.iter().position(|q| q.notify.as_raw_fd() == fd)?;
    drain(&queues[i].notify, dev, "a queue eventfd");
    Some(i)
}

/// The one queue of an active [`SingleQueue`].
struct Active {
    mem: GuestMemory,
    irq: Arc<IrqTrigger>,
    queue: ActiveQueue,
    /// Whether the notify eventfd is in the event manager yet.
    registered: bool,
}

/// The request queue of a one-queue, resettable device, from activation to
/// reset, and its registration with the event manager.
pub struct SingleQueue {
    /// Log prefix naming the device.
    dev: &'static str,
    activate_evt: ActivateEvt,
    active: Option<Active>,
    /// Notify eventfds from before a reset, still in the event manager.
    stale: Vec<EventFd>,
}

impl SingleQueue {
    pub fn new(dev: &'static str) -> io::Result<Self> {
        Ok(Self {
            dev,
            activate_evt: ActivateEvt::new()?,
            active: None,
            stale: Vec::new(),
        })
    }

    /// `VirtioDevice::activate`: takes the one queue.
    pub fn activate(
        &mut self,
        mem: GuestMemory,
        irq: Arc<IrqTrigger>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let Ok([queue]) = <[ActiveQueue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.activate_evt.signal().map_err(ActivateError::Backend)?;
        self.active = Some(Active {
            mem,
            irq,
            queue,
            registered: false,
        });
        Ok(())
    }

    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// `VirtioDevice::reset`: drops the queue; the event loop forgets its
    /// notify eventfd.
    pub fn reset(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        if active.registered {
            self.stale.push(active.queue.notify);
            if let Err(e) = self.activate_evt.signal() {
                error!(error = %e, "{}: signalling the event loop after reset", self.dev);
            }
        }
    }

    /// `MutEventSubscriber::init`.
    pub fn init(&self, ops: &mut EventOps) {
        self.activate_evt.register(ops, self.dev);
    }

    /// `MutEventSubscriber::process`: keeps the registrations in line with
    /// the device. Returns whether the event was a queue notification, which
    /// the caller answers by processing the queue.
    pub fn handle_event(&mut self, fd: RawFd, ops: &mut EventOps) -> bool {
        if self.activate_evt.is(fd) {
            self.activate_evt.consume(self.dev);
            self.sync_registrations(ops);
            return false;
        }
        if let Some(active) = self.active.as_ref() {
            if take_notification(std::slice::from_ref(&active.queue), fd, self.dev).is_some() {
                return true;
            }
        }
        // Most likely a notify fd from before a reset: drop it now rather
        // than let a level-triggered fd spin the loop.
        debug!(fd, "{}: event on an fd that is not current", self.dev);
        self.sync_registrations(ops);
        false
    }

    /// Forgets the notify fds of a reset queue, watches the one of an active
    /// queue.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.stale.drain(..) {
            if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
                warn!(error = ?e, "{}: unregistering a stale queue eventfd", self.dev);
            }
        }
        if let Some(active) = self.active.as_mut().filter(|a| !a.registered) {
            match ops.add(Events::new(&active.queue.notify, EventSet::IN)) {
                Ok(()) => active.registered = true,
                Err(e) => error!(error = ?e, "{}: registering the queue eventfd", self.dev),
            }
        }
    }

    /// Hands every available chain to `handle`, which returns the bytes it
    /// wrote to the chain, puts it in the used ring and interrupts the guest
    /// if it asked for it.
    pub fn process(
        &mut self,
        mut handle: impl FnMut(DescriptorChain<&GuestMemory>, &GuestMemory) -> u32,
    ) {
        let dev = self.dev;
        let Some(active) = self.active.as_mut() else {
            debug!("{dev}: queue event before activation");
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queue.queue;
        let mut used_any = false;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                warn!(error = %e, "{dev}: disabling queue notifications");
                break;
            }
            let mut popped = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                let len = handle(chain, mem);
                if let Err(e) = queue.add_used(mem, head, len) {
                    warn!(error = %e, head, "{dev}: adding a used element");
                }
                used_any = true;
            }
            // Re-enabling reports chains added meanwhile; a round that found
            // nothing means the avail index is bogus, so don't spin on it.
            match queue.enable_notification(mem) {
                Ok(true) if popped > 0 => continue,
                Ok(true) => {
                    warn!("{dev}: avail ring index is invalid");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    warn!(error = %e, "{dev}: enabling queue notifications");
                    break;
                }
            }
        }
        if !used_any {
            return;
        }
        if let Err(e) = signal_used(mem, queue, &active.irq) {
            error!(error = %e, "{dev}: telling the guest about used buffers");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{active_queue, guest_memory, irq};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn activation_checks() {
        let mem = guest_memory(0x10_0000);
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let queues = [active_queue(&vq)];
        assert!(check_activation(false, &queues, 1).is_ok());
        assert!(matches!(
            check_activation(true, &queues, 1),
            Err(ActivateError::AlreadyActive)
        ));
        assert!(matches!(
            check_activation(false, &queues, 3),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 1
            })
        ));
    }

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
