//! What the fuzz targets share: guest memory filled from the fuzz input,
//! with virtqueues at fixed addresses in it, so that the descriptor tables,
//! available rings and buffers a device reads are all the fuzzer's.
//!
//! A target's input is the guest's memory from address 0: queue `i`'s
//! descriptor table is at `i * QUEUE_STRIDE`, its available ring 0x100
//! further and its used ring 0x200 further; buffers may point anywhere in
//! the [`MEM_SIZE`] bytes (the seeds keep them from [`DATA`] on).

use std::sync::Arc;

use husk_vmm::devices::virtio::{ActiveQueue, GuestMemory, IrqTrigger};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory size: small, so that addresses the fuzzer makes up land.
pub const MEM_SIZE: usize = 0x1_0000;
/// Queue size every target's queues get.
pub const QSIZE: u16 = 16;
/// Distance between two queues' descriptor tables.
pub const QUEUE_STRIDE: u64 = 0x400;
/// Where the seeds put buffers: after the queues of a 3-queue device.
pub const DATA: u64 = 0x1000;

/// Guest memory holding `data` from address 0 (the rest zero).
pub fn guest_memory(data: &[u8]) -> GuestMemory {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("64 KiB of anonymous memory");
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("the input fits guest memory");
    mem
}

/// Queue `index` at its fixed place, ready as a driver leaves it at
/// DRIVER_OK.
pub fn queue(index: u64) -> Queue {
    let base = index * QUEUE_STRIDE;
    let mut q = Queue::new(QSIZE).expect("QSIZE is a power of two");
    let lo = |a: u64| Some(u32::try_from(a).expect("queues sit below 4 GiB"));
    q.set_desc_table_address(lo(base), Some(0));
    q.set_avail_ring_address(lo(base + 0x100), Some(0));
    q.set_used_ring_address(lo(base + 0x200), Some(0));
    q.set_size(QSIZE);
    q.set_ready(true);
    q
}

/// `n` queues as the transport hands them to a device on activation.
pub fn active_queues(n: u64) -> Vec<ActiveQueue> {
    (0..n)
        .map(|i| ActiveQueue {
            queue: queue(i),
            notify: EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
        })
        .collect()
}

/// An interrupt line on a fresh eventfd.
pub fn irq() -> Arc<IrqTrigger> {
    Arc::new(IrqTrigger::new(
        EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
    ))
}

/// A small reader over the fuzz input for targets that decode operations.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes, or None when fewer are left.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}
