//! Test harness shared by the virtio device tests: real guest memory, mock
//! virtqueues in it, descriptor chains written the way a driver writes them,
//! and activating a device on them.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActiveQueue, GuestMemory, IrqTrigger, VirtioDevice};

/// Size of a [`GuestQueue`].
pub const QSIZE: u16 = 64;

// The descriptor flags are 1, 2 and 4: they fit the u16 flags field.
const _: () = assert!(
    VRING_DESC_F_NEXT <= 0xffff && VRING_DESC_F_WRITE <= 0xffff && VRING_DESC_F_INDIRECT <= 0xffff
);
/// VRING_DESC_F_NEXT as the descriptor's u16 flags (checked above).
#[allow(clippy::cast_possible_truncation)]
pub const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// VRING_DESC_F_WRITE as the descriptor's u16 flags (checked above).
#[allow(clippy::cast_possible_truncation)]
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// VRING_DESC_F_INDIRECT as the descriptor's u16 flags (checked above).
#[allow(clippy::cast_possible_truncation)]
pub const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// `size` bytes of guest memory from address 0.
pub fn guest_memory(size: usize) -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// Guest memory that outlives the test, for [`GuestQueue`]s to borrow.
pub fn leaked_memory(size: usize) -> &'static GuestMemory {
    Box::leak(Box::new(guest_memory(size)))
}

/// An interrupt line on a fresh eventfd.
pub fn irq() -> Arc<IrqTrigger> {
    Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()))
}

/// The queue `vq` describes, with a fresh notify eventfd, as the transport
/// hands it to the device.
pub fn active_queue(vq: &MockSplitQueue<GuestMemory>) -> ActiveQueue {
    ActiveQueue {
        queue: vq.create_queue::<Queue>().unwrap(),
        notify: EventFd::new(EFD_NONBLOCK).unwrap(),
    }
}

/// Activates a one-queue device on `vq`; returns its interrupt line and
/// the eventfd a guest's QueueNotify writes.
pub fn activate_kickable(
    dev: &mut dyn VirtioDevice,
    mem: &GuestMemory,
    vq: &MockSplitQueue<GuestMemory>,
) -> (Arc<IrqTrigger>, EventFd) {
    let irq = irq();
    let queue = active_queue(vq);
    let kick = queue.notify.try_clone().unwrap();
    dev.activate(mem.clone(), irq.clone(), vec![queue]).unwrap();
    (irq, kick)
}

/// Activates a one-queue device on `vq`; returns its interrupt line.
pub fn activate(
    dev: &mut dyn VirtioDevice,
    mem: &GuestMemory,
    vq: &MockSplitQueue<GuestMemory>,
) -> Arc<IrqTrigger> {
    activate_kickable(dev, mem, vq).0
}

/// An event manager of any device.
pub type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// `dev` as a subscriber of a new event manager.
pub fn managed<D: MutEventSubscriber + Send + 'static>(dev: D) -> (Arc<Mutex<D>>, Manager) {
    let dev = Arc::new(Mutex::new(dev));
    let mut em = Manager::new().unwrap();
    em.add_subscriber(dev.clone());
    (dev, em)
}

/// `descs` (addr, len, flags) as one chain in table slots `at`, `at + 1`...:
/// each but the last gets VRING_DESC_F_NEXT pointing at the following slot.
pub fn chain(at: u16, descs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    let last = descs.len().saturating_sub(1);
    (0u16..)
        .zip(descs)
        .enumerate()
        .map(|(i, (slot, &(addr, len, flags)))| {
            let flags = if i < last { flags | F_NEXT } else { flags };
            RawDescriptor::from(Descriptor::new(addr, len, flags, at + slot + 1))
        })
        .collect()
}

/// Used ring element `i` of `vq`: (id, len).
pub fn used_elem(vq: &MockSplitQueue<GuestMemory>, i: usize) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

/// One queue of [`QSIZE`] seen from the driver side.
pub struct GuestQueue {
    pub mock: MockSplitQueue<'static, GuestMemory>,
    mem: &'static GuestMemory,
    /// The descriptor table slot the next chain starts at.
    pub next_desc: u16,
    last_used: u16,
}

impl GuestQueue {
    pub fn new(mem: &'static GuestMemory, at: u64) -> Self {
        Self {
            mock: MockSplitQueue::create(mem, GuestAddress(at), QSIZE),
            mem,
            next_desc: 0,
            last_used: 0,
        }
    }

    /// Publishes one chain of (addr, len, device-writable); returns its head
    /// index. Starts over at slot 0 when the table has no room left.
    pub fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let n = u16::try_from(descs.len()).expect("a chain longer than u16::MAX");
        if self.next_desc + n > QSIZE {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        let descs: Vec<(u64, u32, u16)> = descs
            .iter()
            .map(|&(addr, len, write)| {
                let flags = if write { F_WRITE } else { 0 };
                (addr, len, flags)
            })
            .collect();
        for (i, d) in (0u16..).zip(chain(first, &descs)) {
            self.mock.desc_table().store(first + i, d).unwrap();
        }
        // Publish the head; the mock's own helper does not wrap the ring.
        let avail = self.mock.avail_addr();
        let idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
        let slot = avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE));
        self.mem.write_obj(first, slot).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
        self.next_desc += n;
        first
    }

    /// The next used element (head id, len), if the device returned one.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let used = self.mock.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        if idx == self.last_used {
            return None;
        }
        let elem = used.unchecked_add(4 + u64::from(self.last_used % QSIZE) * 8);
        let id: u32 = self.mem.read_obj(elem).unwrap();
        let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        Some((u16::try_from(id).expect("used id past u16"), len))
    }

    /// This queue as the transport hands it to the device.
    pub fn active(&self) -> ActiveQueue {
        active_queue(&self.mock)
    }
}
