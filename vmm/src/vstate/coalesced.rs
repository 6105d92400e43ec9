//! Coalesced port writes (KVM_CAP_COALESCED_PIO): KVM queues the guest's
//! writes to a registered port in a ring page, one per VM, instead of
//! exiting to the VMM for each; the VMM replays the ring on the bus,
//! oldest first. A vCPU replays it before it handles an exit's write (so
//! devices see the guest's writes in its order) and after every other
//! exit; the event loop replays it every [`REPLAY_EVERY`], so a write
//! waits at most that long when the guest makes no exit at all (reads do
//! not wait for the replay: a port is only coalesced while a write to it
//! changes nothing a read could see).
//!
//! Used for the serial's data register while a byte written there is only
//! output (no THR interrupt, no loopback: see the serial device). The 8250
//! driver reads the line status before every console byte, so this halves
//! a console's exits to the VMM; each byte still exits to the host kernel,
//! which is far cheaper than the round trip through the VMM.

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::bus::Bus;

/// How often the event loop replays writes no exit has replayed.
pub const REPLAY_EVERY: Duration = Duration::from_millis(100);
/// x86-64 pages: the ring is one.
const PAGE_SIZE: usize = 4096;
/// Entries in the ring (the kernel's KVM_COALESCED_MMIO_MAX): 170.
#[allow(clippy::cast_possible_truncation)] // (4096 - 8) / 24 fits
const RING_MAX: u32 = ((PAGE_SIZE - std::mem::size_of::<kvm_coalesced_mmio_ring>())
    / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;

/// The VM's coalesced-write ring, mapped from a vCPU fd.
pub struct Ring {
    base: NonNull<kvm_coalesced_mmio_ring>,
}

// SAFETY: the mapping is process memory shared with the kernel, not with
// a thread; every access goes through `CoalescedPort`'s mutex (one
// consumer at a time) with atomic loads and stores of the indexes.
unsafe impl Send for Ring {}

impl Ring {
    /// Maps the ring page of `vcpu`'s VM.
    pub fn map(vcpu: BorrowedFd<'_>) -> std::io::Result<Self> {
        let offset = u64::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * PAGE_SIZE as u64;
        // SAFETY: a new shared mapping of one page of the vCPU fd (KVM
        // offers the ring there when it has KVM_CAP_COALESCED_MMIO/PIO);
        // it overlaps nothing, and `Drop` unmaps it.
        let addr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                vcpu,
                offset,
            )
        }?;
        let base = NonNull::new(addr.cast::<kvm_coalesced_mmio_ring>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self { base })
    }

    fn index(&self, which: usize) -> &AtomicU32 {
        // SAFETY: `first` and `last` are the page's first two aligned u32s,
        // alive as long as the mapping (`self`); the kernel writes `last`,
        // we write `first`, both as whole words.
        unsafe { &*self.base.as_ptr().cast::<AtomicU32>().add(which) }
    }

    /// The oldest queued write, taken off the ring.
    fn pop(&self) -> Option<kvm_coalesced_mmio> {
        let (first, last) = (self.index(0), self.index(1));
        let at = first.load(Ordering::Relaxed);
        // Acquire: the entry the kernel wrote before it moved `last`.
        let end = last.load(Ordering::Acquire);
        if at == end || at >= RING_MAX || end >= RING_MAX {
            return None;
        }
        // SAFETY: `at` < RING_MAX, so the entry lies inside the page; the
        // kernel finished it before publishing `last` past it.
        let entry = unsafe {
            let entries = self
                .base
                .as_ptr()
                .cast::<u8>()
                .add(8)
                .cast::<kvm_coalesced_mmio>();
            entries.add(at as usize).read_volatile()
        };
        // Release: we are done reading the entry the kernel may now reuse.
        first.store((at + 1) % RING_MAX, Ordering::Release);
        Some(entry)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the page `map` mapped, unmapped once; no reference into
        // it outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), PAGE_SIZE) };
    }
}

/// One VM's coalesced port: its registration and the ring to replay.
pub struct CoalescedPort {
    vm: Arc<VmFd>,
    port: u16,
    registered: Mutex<bool>,
    /// Also the lock that keeps two threads from replaying at once.
    ring: Mutex<Option<Ring>>,
}

impl CoalescedPort {
    /// `port`'s writes may be coalesced in `vm`; `None` where KVM cannot.
    pub fn new(vm: Arc<VmFd>, kvm: &Kvm, port: u16) -> Option<Arc<Self>> {
        kvm.check_extension(Cap::CoalescedPio).then(|| {
            Arc::new(Self {
                vm,
                port,
                registered: Mutex::new(false),
                ring: Mutex::new(None),
            })
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Gives the port its ring; without one, `set` never coalesces.
    pub fn attach(&self, ring: Ring) {
        *self.ring.lock().unwrap_or_else(|e| e.into_inner()) = Some(ring);
    }

    /// Coalesces the port's writes (`on`) or lets each exit. A failure
    /// leaves every write exiting, which is only slower.
    pub fn set(&self, on: bool) {
        let has_ring = self
            .ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let mut registered = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        let on = on && has_ring;
        if *registered == on {
            return;
        }
        let addr = IoEventAddress::Pio(u64::from(self.port));
        let done = if on {
            self.vm.register_coalesced_mmio(addr, 1)
        } else {
            self.vm.unregister_coalesced_mmio(addr, 1)
        };
        match done {
            Ok(()) => *registered = on,
            Err(e) if on => tracing::warn!(port = self.port, "cannot coalesce port writes: {e}"),
            // Still registered: writes keep going to the ring and are
            // still replayed, only their order against other exits is
            // no longer kept.
            Err(e) => tracing::error!(port = self.port, "cannot stop coalescing port writes: {e}"),
        }
    }

    /// Replays the queued writes on `pio` (or `mmio`, for an MMIO zone),
    /// oldest first; how many.
    pub fn replay(&self, pio: &Bus, mmio: &Bus) -> usize {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ring) = ring.as_ref() else {
            return 0;
        };
        let mut n = 0;
        while let Some(entry) = ring.pop() {
            // KVM writes at most 8 bytes; never trust a length blindly.
            let len = usize::try_from(entry.len).map_or(0, |l| l.min(entry.data.len()));
            let data = &entry.data[..len];
            // SAFETY: both members of the union are plain u32s; any bit
            // pattern is a valid value of either.
            let is_pio = unsafe { entry.__bindgen_anon_1.pio } != 0;
            if is_pio {
                pio.write(entry.phys_addr, data);
            } else {
                mmio.write(entry.phys_addr, data);
            }
            n += 1;
        }
        n
    }
}

/// Replays the ring from the event loop every [`REPLAY_EVERY`]: a guest
/// that queues writes and then makes no exit still has them handled.
pub struct ReplayTimer {
    port: Arc<CoalescedPort>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    timer: TimerFd,
}

impl ReplayTimer {
    pub fn new(port: Arc<CoalescedPort>, pio: Arc<Bus>, mmio: Arc<Bus>) -> std::io::Result<Self> {
        let mut timer = TimerFd::new().map_err(std::io::Error::from)?;
        timer
            .reset(REPLAY_EVERY, Some(REPLAY_EVERY))
            .map_err(std::io::Error::from)?;
        Ok(Self {
            port,
            pio,
            mmio,
            timer,
        })
    }
}

impl MutEventSubscriber for ReplayTimer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            tracing::warn!("coalesced writes wait for the guest's exits: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Readable, so this does not block.
        let _ = self.timer.wait();
        self.port.replay(&self.pio, &self.mmio);
    }
}
