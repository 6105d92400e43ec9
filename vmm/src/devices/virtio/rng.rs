//! virtio-rng (entropy device): fills the guest's buffers from getrandom(2).
//!
//! One queue; every device-writable descriptor of a chain is filled, up to
//! [`MAX_BYTES_PER_REQUEST`] per chain so a guest cannot make the device
//! thread copy gigabytes for one notification.

use crate::{guest_debug, guest_warn};
use husk_vm_config::control::GuestFaultKind;
use std::io;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryBackend};

use super::{DeviceEvent, DeviceState, GuestMemory, VirtioDevice, TYPE_RNG};

pub const QUEUE_SIZE: u16 = 256;
/// Entropy handed out per descriptor chain, at most.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Errors from creating the device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("creating the activation eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// Fills `buf` from the kernel's CSPRNG.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, exclusively
        // borrowed byte buffer the kernel writes at most `rest.len()` bytes to.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        // Negative means an error; otherwise n <= rest.len().
        let Ok(n) = usize::try_from(n) else {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        };
        done += n;
    }
    Ok(())
}

/// Fills the chain's writable descriptors; returns the bytes written.
pub fn handle_chain(chain: impl Iterator<Item = Descriptor>, mem: &GuestMemory) -> u32 {
    let mut budget = MAX_BYTES_PER_REQUEST;
    let mut written = 0u32;
    let mut buf = Vec::new();
    for desc in chain {
        if budget == 0 {
            break;
        }
        if !desc.is_write_only() {
            guest_debug!(
                GuestFaultKind::Request,
                "virtio-rng: skipping a device-readable descriptor"
            );
            continue;
        }
        let n = budget.min(desc.len() as usize);
        // Checked up front so a bad buffer is never half written.
        if !mem.check_range(desc.addr(), n) {
            guest_warn!(
                GuestFaultKind::Request,
                addr = desc.addr().0,
                len = n,
                "virtio-rng: buffer outside guest memory"
            );
            break;
        }
        buf.resize(n, 0);
        if let Err(e) = getrandom(&mut buf) {
            error!(error = %e, "virtio-rng: getrandom failed");
            break;
        }
        if let Err(e) = mem.write_slice(&buf, desc.addr()) {
            guest_warn!(GuestFaultKind::Request, error = %e, addr = desc.addr().0, len = n, "virtio-rng: writing guest memory");
            break;
        }
        budget -= n;
        // n <= MAX_BYTES_PER_REQUEST, so the sum stays far below u32::MAX.
        #[allow(clippy::cast_possible_truncation)]
        let n = n as u32;
        written += n;
    }
    written
}

/// A virtio-rng device: one queue, no features of its own, no config space.
pub struct Rng {
    state: DeviceState,
}

impl Rng {
    pub fn new() -> Result<Rng, RngError> {
        let state = DeviceState::new("virtio-rng", TYPE_RNG, &[QUEUE_SIZE], 0)
            .map_err(RngError::EventFd)?;
        Ok(Rng { state })
    }

    /// Answers every available request on queue `index`.
    pub fn process_queue(&mut self, index: usize) {
        self.state
            .process_queue(index, |chain, mem| handle_chain(chain, mem));
    }
}

impl VirtioDevice for Rng {
    fn state(&self) -> &DeviceState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }

    /// Requests are answered within one event loop turn: nothing in flight.
    fn snapshot_support(&self) -> Result<(), String> {
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.state.reset();
        true
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if let DeviceEvent::Queue(index) = self.state.handle_event(events.fd(), ops) {
            self.process_queue(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{
        self, activate, activate_kickable, managed, used_elem, F_NEXT, F_WRITE,
    };
    use crate::devices::virtio::ActivateError;
    use crate::devices::virtio::INT_VRING;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const MEM_SIZE: usize = 0x40_0000;
    const BUF: u64 = 0x10_0000;
    const W: u16 = F_WRITE;
    const NEXT: u16 = F_NEXT;

    fn setup() -> (GuestMemory, Rng) {
        (test_utils::guest_memory(MEM_SIZE), Rng::new().unwrap())
    }

    fn used_len(vq: &MockSplitQueue<GuestMemory>, i: usize) -> u32 {
        used_elem(vq, i).1
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let (mem, mut rng) = setup();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
        let irq = activate(&mut rng, &mem, &vq);
        // A readable descriptor (left alone) then two writable ones.
        mem.write_slice(&[0xee; 16], GuestAddress(BUF)).unwrap();
        let descs = [
            RawDescriptor::from(Descriptor::new(BUF, 16, NEXT, 1)),
            RawDescriptor::from(Descriptor::new(BUF + 0x1000, 64, W | NEXT, 2)),
            RawDescriptor::from(Descriptor::new(BUF + 0x2000, 64, W, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        rng.process_queue(0);

        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used_len(&vq, 0), 128);
        let mut ro = [0u8; 16];
        mem.read_slice(&mut ro, GuestAddress(BUF)).unwrap();
        assert_eq!(ro, [0xee; 16]);
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        mem.read_slice(&mut a, GuestAddress(BUF + 0x1000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(BUF + 0x2000)).unwrap();
        assert!(a.iter().any(|&x| x != 0));
        assert!(b.iter().any(|&x| x != 0));
        assert_ne!(a, b);
        assert_eq!(irq.status() & INT_VRING, INT_VRING);
    }

    #[test]
    fn caps_bytes_per_request_and_survives_bad_buffers() {
        let (mem, mut rng) = setup();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
        activate(&mut rng, &mem, &vq);
        let descs = [
            // Two chains: one asking for 1 MiB, one pointing outside memory.
            RawDescriptor::from(Descriptor::new(BUF, 0x10_0000, W, 0)),
            RawDescriptor::from(Descriptor::new(MEM_SIZE as u64 - 8, 64, W, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        rng.process_queue(0);
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(
            used_len(&vq, 0),
            u32::try_from(MAX_BYTES_PER_REQUEST).unwrap()
        );
        assert_eq!(used_len(&vq, 1), 0);
        // Nothing written past the cap.
        let mut after = [0xffu8; 64];
        mem.read_slice(&mut after, GuestAddress(BUF + MAX_BYTES_PER_REQUEST as u64))
            .unwrap();
        assert_eq!(after, [0u8; 64]);
    }

    #[test]
    fn one_queue_no_config() {
        let (mem, mut rng) = setup();
        assert_eq!(rng.device_type(), TYPE_RNG);
        assert_eq!(rng.queue_max_sizes(), &[QUEUE_SIZE]);
        let mut cfg = [0xffu8; 4];
        rng.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 4]);
        let irq = test_utils::irq();
        assert!(matches!(
            rng.activate(mem, irq, vec![]),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        ));
    }

    #[test]
    fn event_manager_drives_the_queue() {
        let (mem, rng) = setup();
        let (rng, mut em) = managed(rng);
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
        let (irq, kick) = activate_kickable(&mut *rng.lock().unwrap(), &mem, &vq);
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);

        let descs = [RawDescriptor::from(Descriptor::new(BUF, 32, W, 0))];
        vq.add_desc_chains(&descs, 0).unwrap();
        kick.write(1).unwrap();
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used_len(&vq, 0), 32);
        assert_eq!(irq.irq_evt().read().unwrap(), 1);
    }
}
