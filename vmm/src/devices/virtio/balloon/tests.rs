//! Device tests: the test plays the guest driver through real virtqueues in
//! a real GuestMemoryMmap (private anonymous memory, as husk's RAM is), and
//! checks what the host mapping holds after a report.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::test_utils::{self, leaked_memory, managed, GuestQueue};
use crate::devices::virtio::{ActivateError, IrqTrigger, INT_VRING, VIRTIO_F_VERSION_1};

const MEM_SIZE: usize = 0x80_0000;
/// A 2 MiB block, as the Linux driver reports them.
const FREE: u64 = 0x20_0000;
const FREE_LEN: u32 = 0x20_0000;
const REPORTING: u64 = 1 << VIRTIO_BALLOON_F_REPORTING;

struct Guest {
    mem: &'static GuestMemory,
    inflate: GuestQueue,
    deflate: GuestQueue,
    reporting: GuestQueue,
    irq: Arc<IrqTrigger>,
}

/// A balloon with reporting, negotiated and activated on three queues.
fn setup() -> (Guest, Balloon) {
    let mem = leaked_memory(MEM_SIZE);
    let mut dev = Balloon::new(true).unwrap();
    dev.set_acked_features(VIRTIO_F_VERSION_1 | REPORTING);
    let guest = Guest {
        mem,
        inflate: GuestQueue::new(mem, 0),
        deflate: GuestQueue::new(mem, 0x4000),
        reporting: GuestQueue::new(mem, 0x8000),
        irq: test_utils::irq(),
    };
    dev.activate(
        mem.clone(),
        guest.irq.clone(),
        vec![
            guest.inflate.active(),
            guest.deflate.active(),
            guest.reporting.active(),
        ],
    )
    .unwrap();
    (guest, dev)
}

/// Fills `len` bytes at `addr` with `byte`.
fn fill(mem: &GuestMemory, addr: u64, len: u32, byte: u8) {
    mem.write_slice(&vec![byte; len as usize], GuestAddress(addr))
        .unwrap();
}

/// Whether all `len` bytes at `addr` are `byte`.
fn all(mem: &GuestMemory, addr: u64, len: u32, byte: u8) -> bool {
    let mut buf = vec![!byte; len as usize];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf.iter().all(|&b| b == byte)
}

#[test]
fn reported_range_reads_back_zero_and_the_rest_is_kept() {
    let (mut g, mut dev) = setup();
    fill(g.mem, FREE - 0x1000, FREE_LEN + 0x2000, 0xa5);
    let head = g.reporting.add_chain(&[(FREE, FREE_LEN, true)]);
    dev.process_queue(REPORTING_QUEUE);

    assert_eq!(g.reporting.pop_used(), Some((head, 0)));
    assert_eq!(g.irq.status() & INT_VRING, INT_VRING);
    // MADV_DONTNEED on private anonymous memory: zero pages on next touch.
    assert!(all(g.mem, FREE, FREE_LEN, 0));
    // The pages either side are the guest's still.
    assert!(all(g.mem, FREE - 0x1000, 0x1000, 0xa5));
    assert!(all(g.mem, FREE + u64::from(FREE_LEN), 0x1000, 0xa5));
    let s = dev.stats();
    assert_eq!((s.reported_bytes, s.reported_ranges), (0x20_0000, 1));
    assert_eq!(s.refused_ranges, 0);
}

#[test]
fn one_report_of_several_ranges() {
    let (mut g, mut dev) = setup();
    fill(g.mem, FREE, 3 * 0x1000, 0x5a);
    let head = g
        .reporting
        .add_chain(&[(FREE, 0x1000, true), (FREE + 0x2000, 0x1000, true)]);
    dev.process_queue(REPORTING_QUEUE);
    assert_eq!(g.reporting.pop_used(), Some((head, 0)));
    assert!(all(g.mem, FREE, 0x1000, 0));
    assert!(all(g.mem, FREE + 0x1000, 0x1000, 0x5a));
    assert!(all(g.mem, FREE + 0x2000, 0x1000, 0));
    assert_eq!(dev.stats().reported_ranges, 2);
}

#[test]
fn bad_ranges_are_refused_untouched_and_the_device_keeps_working() {
    let (mut g, mut dev) = setup();
    fill(g.mem, 0x10_0000, 0x70_0000, 0xc3);
    let end = MEM_SIZE as u64;
    let bad: [(u64, u32, bool); 7] = [
        (end, 0x1000, true),              // past the end of RAM
        (end - 0x1000, 0x2000, true),     // straddles the end
        (u64::MAX - 0xfff, 0x1000, true), // wraps
        (!0xfff_u64, 0x2000, true),       // wraps, aligned
        (FREE + 0x800, 0x1000, true),     // unaligned address
        (FREE, 0x1800, true),             // unaligned length
        (FREE, FREE_LEN, false),          // device-readable
    ];
    for d in bad {
        let head = g.reporting.add_chain(&[d]);
        dev.process_queue(REPORTING_QUEUE);
        assert_eq!(g.reporting.pop_used(), Some((head, 0)), "{d:x?}");
    }
    assert!(all(g.mem, 0x10_0000, 0x70_0000, 0xc3));
    assert_eq!(dev.stats().refused_ranges, 7);
    assert_eq!(dev.stats().reported_bytes, 0);

    // A good range after all that (and one in the same chain as a bad one).
    let head = g
        .reporting
        .add_chain(&[(end, 0x1000, true), (FREE, FREE_LEN, true)]);
    dev.process_queue(REPORTING_QUEUE);
    assert_eq!(g.reporting.pop_used(), Some((head, 0)));
    assert!(all(g.mem, FREE, FREE_LEN, 0));
    assert_eq!(dev.stats().refused_ranges, 8);
    assert_eq!(dev.stats().reported_ranges, 1);
}

#[test]
fn discard_checks_ranges_against_each_region() {
    // Two regions with a hole between them, like RAM around the MMIO gap.
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x20_0000), 0x10_0000),
    ])
    .unwrap();
    fill(&mem, 0x20_0000, 0x10_0000, 0x77);
    assert!(matches!(
        discard(&mem, 0xf_f000, 0x2000),
        Err(DiscardError::OutsideRam { .. })
    ));
    assert!(matches!(
        discard(&mem, 0x10_0000, 0x1000),
        Err(DiscardError::OutsideRam { .. })
    ));
    assert!(matches!(
        discard(&mem, !0xfff_u64, 0x1000),
        Err(DiscardError::Overflow { .. })
    ));
    assert!(matches!(
        discard(&mem, 0x20_0001, 0x1000),
        Err(DiscardError::Unaligned { .. })
    ));
    assert!(all(&mem, 0x20_0000, 0x10_0000, 0x77));
    discard(&mem, 0x20_0000, 0).unwrap();
    assert!(all(&mem, 0x20_0000, 0x10_0000, 0x77));
    discard(&mem, 0x2f_f000, 0x1000).unwrap();
    assert!(all(&mem, 0x2f_f000, 0x1000, 0));
    assert!(all(&mem, 0x20_0000, 0xf_f000, 0x77));
}

#[test]
fn inflate_and_deflate_chains_are_returned_untouched() {
    let (mut g, mut dev) = setup();
    // Page frame numbers, as the driver sends them.
    g.mem.write_obj(0x200u32, GuestAddress(FREE)).unwrap();
    fill(g.mem, 0x30_0000, 0x1000, 0xee);
    let head = g.inflate.add_chain(&[(FREE, 4, false)]);
    dev.process_queue(INFLATE_QUEUE);
    assert_eq!(g.inflate.pop_used(), Some((head, 0)));
    let head = g.deflate.add_chain(&[(FREE, 4, false)]);
    dev.process_queue(DEFLATE_QUEUE);
    assert_eq!(g.deflate.pop_used(), Some((head, 0)));
    // Nothing discarded: the page the PFN names keeps its contents.
    assert!(all(g.mem, 0x30_0000, 0x1000, 0xee));
    assert_eq!(dev.stats().inflate_deflate_chains, 2);
    assert_eq!(dev.stats().reported_bytes, 0);
}

#[test]
fn queue_2_discards_nothing_without_the_feature() {
    let mem = leaked_memory(MEM_SIZE);
    let mut dev = Balloon::new(true).unwrap();
    dev.set_acked_features(VIRTIO_F_VERSION_1);
    let mut queues = [0, 0x4000, 0x8000].map(|at| GuestQueue::new(mem, at));
    dev.activate(
        mem.clone(),
        test_utils::irq(),
        queues.iter().map(GuestQueue::active).collect(),
    )
    .unwrap();
    fill(mem, FREE, FREE_LEN, 0x11);
    let head = queues[2].add_chain(&[(FREE, FREE_LEN, true)]);
    dev.process_queue(REPORTING_QUEUE);
    assert_eq!(queues[2].pop_used(), Some((head, 0)));
    assert!(all(mem, FREE, FREE_LEN, 0x11));
    assert_eq!(dev.stats().reported_bytes, 0);
}

#[test]
fn features_follow_the_configuration() {
    let dev = Balloon::new(true).unwrap();
    assert_eq!(dev.device_type(), TYPE_BALLOON);
    assert_eq!(dev.device_type(), 5);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1 | REPORTING);
    let mut dev = Balloon::new(false).unwrap();
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    // An unoffered bit never sticks.
    dev.set_acked_features(VIRTIO_F_VERSION_1 | REPORTING);
    assert_eq!(dev.acked_features(), VIRTIO_F_VERSION_1);
}

#[test]
fn config_space_asks_for_nothing_and_keeps_actual() {
    let mut dev = Balloon::new(true).unwrap();
    let mut cfg = [0xffu8; CONFIG_LEN];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [0; CONFIG_LEN]);
    // The driver may write `actual`, nothing else.
    dev.write_config(4, &7u32.to_le_bytes());
    dev.write_config(0, &9u32.to_le_bytes());
    dev.write_config(12, &0xaau32.to_le_bytes());
    let mut word = [0u8; 4];
    dev.read_config(0, &mut word);
    assert_eq!(u32::from_le_bytes(word), 0, "num_pages");
    dev.read_config(4, &mut word);
    assert_eq!(u32::from_le_bytes(word), 7, "actual");
    dev.read_config(12, &mut word);
    assert_eq!(u32::from_le_bytes(word), 0, "poison_val");
    assert!(dev.reset());
    dev.read_config(4, &mut word);
    assert_eq!(u32::from_le_bytes(word), 0, "actual after reset");
}

#[test]
fn activates_on_two_or_three_queues() {
    let mem = leaked_memory(MEM_SIZE);
    let queues = [0, 0x4000, 0x8000].map(|at| GuestQueue::new(mem, at));
    let mut dev = Balloon::new(true).unwrap();
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    assert!(matches!(
        dev.activate(mem.clone(), test_utils::irq(), vec![queues[0].active()]),
        Err(ActivateError::QueueCount {
            expected: 2,
            got: 1
        })
    ));
    dev.activate(
        mem.clone(),
        test_utils::irq(),
        vec![queues[0].active(), queues[1].active()],
    )
    .unwrap();
    // No reporting queue: an event for it is logged and ignored.
    dev.process_queue(REPORTING_QUEUE);
    assert!(dev.reset());
    dev.activate(
        mem.clone(),
        test_utils::irq(),
        queues.iter().map(GuestQueue::active).collect(),
    )
    .unwrap();
}

#[test]
fn event_manager_drives_the_reporting_queue() {
    let mem = leaked_memory(MEM_SIZE);
    let (dev, mut em) = managed(Balloon::new(true).unwrap());
    let mut queues = [0, 0x4000, 0x8000].map(|at| GuestQueue::new(mem, at));
    let active: Vec<_> = queues.iter().map(GuestQueue::active).collect();
    let kick = active[REPORTING_QUEUE].notify.try_clone().unwrap();
    let irq = test_utils::irq();
    {
        let mut d = dev.lock().unwrap();
        d.set_acked_features(VIRTIO_F_VERSION_1 | REPORTING);
        d.activate(mem.clone(), irq.clone(), active).unwrap();
    }
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);

    fill(mem, FREE, FREE_LEN, 0x42);
    let head = queues[REPORTING_QUEUE].add_chain(&[(FREE, FREE_LEN, true)]);
    kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(queues[REPORTING_QUEUE].pop_used(), Some((head, 0)));
    assert!(all(mem, FREE, FREE_LEN, 0));
    assert_eq!(irq.irq_evt().read().unwrap(), 1);
}

/// Shared guest RAM (a memfd, when a vhost-user backend maps it too):
/// MADV_DONTNEED would only drop the VMM's mapping and keep the file's
/// pages; a report must punch them out of the memfd itself.
#[test]
fn discard_on_shared_memfd_ram_frees_the_files_pages() {
    use crate::vstate::memory::{self, Backing};
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mem = memory::create(8, false, Backing::SharedMemfd).unwrap();
    let file = mem
        .find_region(GuestAddress(0))
        .unwrap()
        .file_offset()
        .unwrap()
        .file()
        .try_clone()
        .unwrap();
    fill(&mem, FREE, 0x20_0000, 0x77);
    let blocks = || file.metadata().unwrap().blocks();
    // st_blocks counts 512-byte units: 2 MiB touched is 4096 of them.
    let before = blocks();
    assert!(before >= 4096, "{before}");
    discard(&mem, FREE, 0x20_0000).unwrap();
    assert_eq!(blocks(), before - 4096);
    assert!(all(&mem, FREE, 0x20_0000, 0));
}
