//! Device-level tests of virtio-blk: requests through a real virtqueue in
//! real guest memory, and property tests with arbitrary descriptor tables.

// Test code only: the casts build what a guest driver would write (flags,
// lengths, ring indices, byte patterns) from small constants and sizes the
// test chose, or reinterpret syscall results; a bad cast can only break the
// test itself, never the VMM.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use super::*;
use crate::devices::virtio::test_utils::{
    self, activate, activate_kickable, chain, managed, used_elem as used,
};
use crate::devices::virtio::{ActiveQueue, GuestMemory, INT_VRING, VIRTIO_F_VERSION_1};
use std::os::unix::fs::FileExt;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use crate::rate_limiter::RateLimiter;
use husk_vm_config::{RateLimiterConfig, TokenBucketConfig};
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

const MEM_SIZE: usize = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const DATA2: u64 = 0x30_0000;
const STATUS: u64 = 0x40_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;
const DISK_SECTORS: u64 = 64;

fn guest_memory() -> GuestMemory {
    test_utils::guest_memory(MEM_SIZE)
}

/// A disk image whose sector `n` is filled with the byte `n`.
fn disk_image() -> TempFile {
    let f = TempFile::new().unwrap();
    let mut content = Vec::new();
    for s in 0..DISK_SECTORS {
        content.extend(std::iter::repeat_n(s as u8, SECTOR_SIZE as usize));
    }
    f.as_file().write_all_at(&content, 0).unwrap();
    f
}

fn block(image: &TempFile, read_only: bool, serial: Option<&str>) -> Block {
    Block::new(BlockConfig {
        path: image.as_path().to_path_buf(),
        read_only,
        serial: serial.map(str::to_string),
    })
    .unwrap()
}

/// Writes `descs` as one chain starting at descriptor `at` and makes it available.
fn push_chain(vq: &MockSplitQueue<GuestMemory>, at: u16, descs: &[(u64, u32, u16)]) {
    vq.add_desc_chains(&chain(at, descs), at).unwrap();
}

fn write_header(mem: &GuestMemory, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn status_byte(mem: &GuestMemory) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// Runs one request through a fresh queue and returns (used len, status byte).
fn run_one(dev: &mut Block, mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> (u32, u8) {
    let vq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
    if dev.is_activated() {
        assert!(dev.reset());
    }
    activate(dev, mem, &vq);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    push_chain(&vq, 0, descs);
    dev.process_queue(0);
    assert_eq!(vq.used().idx().load(), 1);
    let (id, len) = used(&vq, 0);
    assert_eq!(id, 0);
    (len, status_byte(mem))
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn writes_then_reads_back_through_the_queue_and_the_file() {
    let mem = guest_memory();
    let image = disk_image();
    let mut dev = block(&image, false, None);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let irq = activate(&mut dev, &mem, &vq);

    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 3);
    push_chain(&vq, 0, &[(HDR, 16, R), (DATA, 1024, R), (STATUS, 1, W)]);
    dev.process_queue(0);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 1));
    assert_eq!(status_byte(&mem), OK);
    assert_eq!(irq.status() & INT_VRING, INT_VRING);
    let mut on_disk = vec![0u8; 1024];
    image
        .as_file()
        .read_exact_at(&mut on_disk, 3 * 512)
        .unwrap();
    assert_eq!(on_disk, pattern);

    // Read sectors 2..6 back into two buffers of two sectors each.
    write_header(&mem, VIRTIO_BLK_T_IN, 2);
    push_chain(
        &vq,
        3,
        &[
            (HDR, 16, R),
            (DATA2, 1024, W),
            (DATA2 + 0x1000, 1024, W),
            (STATUS, 1, W),
        ],
    );
    dev.process_queue(0);
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(used(&vq, 1), (3, 2049));
    assert_eq!(status_byte(&mem), OK);
    let mut first = vec![0u8; 1024];
    mem.read_slice(&mut first, GuestAddress(DATA2)).unwrap();
    assert_eq!(&first[..512], &[2u8; 512][..]);
    assert_eq!(&first[512..], &pattern[..512]);
    let mut second = vec![0u8; 1024];
    mem.read_slice(&mut second, GuestAddress(DATA2 + 0x1000))
        .unwrap();
    assert_eq!(&second[..512], &pattern[512..]);
    assert_eq!(&second[512..], &[5u8; 512][..]);
}

#[test]
fn large_reads_cross_bounce_buffer_chunks() {
    let mem = guest_memory();
    let image = disk_image();
    let mut dev = block(&image, false, None);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    let len = (DISK_SECTORS * SECTOR_SIZE) as u32;
    let (used_len, status) = run_one(
        &mut dev,
        &mem,
        &[(HDR, 16, R), (DATA, len, W), (STATUS, 1, W)],
    );
    assert_eq!((used_len, status), (len + 1, OK));
    let mut back = vec![0u8; len as usize];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    for (s, sector) in back.chunks(512).enumerate() {
        assert!(sector.iter().all(|&b| b == s as u8), "sector {s}");
    }
}

#[test]
fn flush_and_get_id() {
    let mem = guest_memory();
    let image = disk_image();
    let mut dev = block(&image, false, Some("husk-disk-1"));
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        run_one(&mut dev, &mem, &[(HDR, 16, R), (STATUS, 1, W)]),
        (1, OK)
    );

    write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
    let got = run_one(
        &mut dev,
        &mem,
        &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)],
    );
    assert_eq!(got, (21, OK));
    let mut id = [0u8; 21];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"husk-disk-1");
    assert_eq!(&id[11..20], &[0u8; 9]);
    assert_eq!(id[20], 0xaa);

    // No serial: twenty zero bytes.
    let mut dev = block(&image, false, None);
    mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
    let got = run_one(
        &mut dev,
        &mem,
        &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)],
    );
    assert_eq!(got, (21, OK));
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..20], &[0u8; 20]);

    assert!(matches!(
        Block::new(BlockConfig {
            path: image.as_path().to_path_buf(),
            read_only: false,
            serial: Some("x".repeat(21)),
        }),
        Err(BlockError::SerialTooLong { .. })
    ));
}

#[test]
fn read_only_disk_rejects_writes() {
    let mem = guest_memory();
    let image = disk_image();
    let mut dev = block(&image, true, None);
    assert_ne!(dev.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 1);
    let got = run_one(
        &mut dev,
        &mem,
        &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
    );
    assert_eq!(got, (1, IOERR));
    let mut on_disk = [0u8; 512];
    image.as_file().read_exact_at(&mut on_disk, 512).unwrap();
    assert_eq!(on_disk, [1u8; 512]);
    // Reads still work.
    write_header(&mem, VIRTIO_BLK_T_IN, 1);
    let got = run_one(
        &mut dev,
        &mem,
        &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
    );
    assert_eq!(got, (513, OK));
}

#[test]
fn bad_requests_get_ioerr_or_unsupp() {
    let mem = guest_memory();
    let image = disk_image();
    let mut dev = block(&image, false, None);
    let last = DISK_SECTORS - 1;
    type Case<'a> = (&'a str, u32, u64, Vec<(u64, u32, u16)>, (u32, u8));
    let cases: Vec<Case> = vec![
        (
            "past the end",
            VIRTIO_BLK_T_IN,
            last,
            vec![(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)],
            (1, IOERR),
        ),
        (
            "sector overflow",
            VIRTIO_BLK_T_OUT,
            u64::MAX,
            vec![(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
            (1, IOERR),
        ),
        (
            "partial sector",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)],
            (1, IOERR),
        ),
        (
            "short header",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)],
            (1, IOERR),
        ),
        (
            "no header",
            VIRTIO_BLK_T_IN,
            0,
            vec![(STATUS, 1, W)],
            (1, IOERR),
        ),
        (
            "writable header",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)],
            (1, IOERR),
        ),
        (
            "read into read-only buffer",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
            (1, IOERR),
        ),
        (
            "write from writable buffer",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
            (1, IOERR),
        ),
        (
            "data past memory end",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (HDR, 16, R),
                (MEM_SIZE as u64 - 256, 512, W),
                (STATUS, 1, W),
            ],
            (1, IOERR),
        ),
        (
            "data far outside memory",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(HDR, 16, R), (u64::MAX - 100, 512, R), (STATUS, 1, W)],
            (1, IOERR),
        ),
        (
            "header outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(1 << 40, 16, R), (DATA, 512, W), (STATUS, 1, W)],
            (1, IOERR),
        ),
        (
            "unsupported type",
            0x42,
            0,
            vec![(HDR, 16, R), (STATUS, 1, W)],
            (1, UNSUPP),
        ),
    ];
    for (name, kind, sector, descs, want) in cases {
        write_header(&mem, kind, sector);
        assert_eq!(run_one(&mut dev, &mem, &descs), want, "{name}");
    }

    // No usable status byte: the chain comes back with length 0 and
    // nothing is written.
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    for (name, descs) in [
        (
            "status read-only",
            vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)],
        ),
        (
            "status empty",
            vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)],
        ),
        (
            "status outside memory",
            vec![(HDR, 16, R), (DATA, 512, W), (MEM_SIZE as u64, 1, W)],
        ),
    ] {
        assert_eq!(run_one(&mut dev, &mem, &descs), (0, 0xff), "{name}");
    }
}

#[test]
fn looping_and_dangling_chains_come_back_empty() {
    let mem = guest_memory();
    let image = disk_image();
    let mut dev = block(&image, false, None);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    for (name, table) in [
        (
            "loop",
            vec![(HDR, 16, R | next, 1), (STATUS, 1, W | next, 0)],
        ),
        ("self loop", vec![(STATUS, 1, W | next, 0)]),
        (
            "next out of table",
            vec![(HDR, 16, R | next, 1), (STATUS, 1, W | next, 999)],
        ),
    ] {
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
        if dev.is_activated() {
            dev.reset();
        }
        activate(&mut dev, &mem, &vq);
        let raw: Vec<RawDescriptor> = table
            .iter()
            .map(|&(a, l, f, n)| RawDescriptor::from(Descriptor::new(a, l, f, n)))
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        dev.process_queue(0);
        assert_eq!(vq.used().idx().load(), 1, "{name}");
        assert_eq!(used(&vq, 0), (0, 0), "{name}");
    }
}

#[test]
fn config_space_reports_capacity_and_seg_max() {
    let image = disk_image();
    let dev = block(&image, false, None);
    assert_eq!(dev.capacity(), DISK_SECTORS);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut seg = [0u8; 4];
    dev.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
    // Reads past the end of the config space are zero-filled.
    let mut past = [0xffu8; 8];
    dev.read_config(12, &mut past);
    assert_eq!(past, [SEG_MAX as u8, 0, 0, 0, 0, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 8]);
    let f = dev.avail_features();
    assert_eq!(f & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn event_manager_drives_the_queue() {
    let mem = guest_memory();
    let image = disk_image();
    let (dev, mut em) = managed(block(&image, false, None));

    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let (irq, kick) = activate_kickable(&mut *dev.lock().unwrap(), &mem, &vq);
    // The activation event registers the queue eventfd.
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);

    write_header(&mem, VIRTIO_BLK_T_IN, 7);
    push_chain(&vq, 0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(status_byte(&mem), OK);
    assert_eq!(irq.irq_evt().read().unwrap(), 1);

    // After a reset the old eventfd is dropped from the event manager and
    // a new activation works.
    assert!(dev.lock().unwrap().reset());
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(10).unwrap(), 0);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let (_, kick) = activate_kickable(&mut *dev.lock().unwrap(), &mem, &vq);
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    push_chain(&vq, 0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 1);
}

/// The whole stack a guest sees: the driver handshake through the mmio
/// registers, a QueueNotify that reaches the transport as an MMIO write, the
/// event manager running the device, the interrupt.
#[test]
fn guest_driver_through_mmio_transport() {
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::MmioTransport;
    use virtio_bindings::virtio_mmio as reg;

    let mem = guest_memory();
    let image = disk_image();
    let (dev, mut em) = managed(block(&image, false, Some("e2e")));
    let irq = test_utils::irq();
    let mut t = MmioTransport::new(mem.clone(), dev.clone(), irq.clone()).unwrap();
    let mut w = |offset: u32, v: u32| t.write(u64::from(offset), &v.to_le_bytes());

    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    w(reg::VIRTIO_MMIO_STATUS, 1);
    w(reg::VIRTIO_MMIO_STATUS, 1 | 2);
    w(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(reg::VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1
    w(reg::VIRTIO_MMIO_STATUS, 1 | 2 | 8);
    w(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    w(reg::VIRTIO_MMIO_QUEUE_NUM, 16);
    w(
        reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
        vq.desc_table_addr().0 as u32,
    );
    w(reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail_addr().0 as u32);
    w(reg::VIRTIO_MMIO_QUEUE_USED_LOW, vq.used_addr().0 as u32);
    w(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    w(reg::VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    assert_eq!(t.status(), 1 | 2 | 8 | 4);
    assert!(dev.lock().unwrap().is_activated());
    // The device picks up its queue eventfd.
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);

    write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    push_chain(&vq, 0, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    t.write(
        u64::from(reg::VIRTIO_MMIO_QUEUE_NOTIFY),
        &0u32.to_le_bytes(),
    );
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 21));
    assert_eq!(status_byte(&mem), OK);
    let mut id = [0u8; 3];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"e2e");
    let mut isr = [0u8; 4];
    t.read(u64::from(reg::VIRTIO_MMIO_INTERRUPT_STATUS), &mut isr);
    assert_eq!(u32::from_le_bytes(isr), INT_VRING);
    assert_eq!(irq.irq_evt().read().unwrap(), 1);

    // Capacity through the transport's config window.
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
}

/// A limiter of `bandwidth` (size, refill ms) and `ops` buckets.
fn limiter(bandwidth: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> RateLimiter {
    let bucket = |(size, refill_time_ms): (u64, u64)| TokenBucketConfig {
        size: NonZeroU64::new(size).unwrap(),
        one_time_burst: 0,
        refill_time_ms: NonZeroU64::new(refill_time_ms).unwrap(),
    };
    RateLimiter::new(Some(&RateLimiterConfig {
        bandwidth: bandwidth.map(bucket),
        ops: ops.map(bucket),
    }))
    .unwrap()
}

/// Runs the event loop until `vq` has `want` used elements (or 5 s pass);
/// returns how many events it handled meanwhile.
fn run_until_used(
    em: &mut test_utils::Manager,
    vq: &MockSplitQueue<GuestMemory>,
    want: u16,
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = 0;
    while vq.used().idx().load() < want {
        assert!(
            Instant::now() < deadline,
            "the queue never got {want} used elements"
        );
        events += em.run_with_timeout(100).unwrap();
    }
    events
}

#[test]
fn rate_limited_requests_wait_in_the_queue_and_resume_on_the_timer() {
    let mem = guest_memory();
    let image = disk_image();
    let start = Instant::now();
    // Two requests at once, then one per 50 ms.
    let dev = block(&image, false, None).with_rate_limiter(limiter(None, Some((2, 100))));
    let (dev, mut em) = managed(dev);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let (irq, kick) = activate_kickable(&mut *dev.lock().unwrap(), &mem, &vq);
    // The activation; the limiter's timer was registered at init.
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);

    write_header(&mem, VIRTIO_BLK_T_IN, 7);
    for i in 0..4 {
        push_chain(&vq, 3 * i, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    }
    kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    // Two served, the third put back first in the queue.
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!((used(&vq, 0), used(&vq, 1)), ((0, 513), (3, 513)));
    assert!(dev.lock().unwrap().limiter.is_blocked());
    assert_eq!(irq.irq_evt().read().unwrap(), 1);
    // A kick meanwhile serves nothing, and nothing spins.
    kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 2);

    // The timer brings the rest, one per token, in order.
    let events = run_until_used(&mut em, &vq, 4);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(100), "served after {took:?}");
    assert!(events <= 3, "{events} events for two timer expirations");
    assert_eq!((used(&vq, 2), used(&vq, 3)), ((6, 513), (9, 513)));
    assert_eq!(status_byte(&mem), OK);
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [7u8; 512]);
}

#[test]
fn a_request_larger_than_the_bucket_passes_and_the_next_waits_out_the_excess() {
    let mem = guest_memory();
    let image = disk_image();
    // 1 KiB per 20 ms; a read of 4 KiB, then one of 512 bytes.
    let dev = block(&image, false, None).with_rate_limiter(limiter(Some((1024, 20)), None));
    let (dev, mut em) = managed(dev);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let (_irq, kick) = activate_kickable(&mut *dev.lock().unwrap(), &mem, &vq);
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);

    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    push_chain(&vq, 0, &[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]);
    push_chain(&vq, 3, &[(HDR, 16, R), (DATA2, 512, W), (STATUS, 1, W)]);
    let start = Instant::now();
    kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 4097));

    run_until_used(&mut em, &vq, 2);
    // 3 KiB of excess and the 512 bytes: 70 ms at 1 KiB per 20 ms.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(70), "served after {took:?}");
    assert_eq!(used(&vq, 1), (3, 513));
    assert_eq!(status_byte(&mem), OK);
}

#[test]
fn a_timer_after_a_reset_is_harmless() {
    let mem = guest_memory();
    let image = disk_image();
    let dev = block(&image, false, None).with_rate_limiter(limiter(None, Some((1, 30))));
    let (dev, mut em) = managed(dev);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let (_, kick) = activate_kickable(&mut *dev.lock().unwrap(), &mem, &vq);
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    push_chain(&vq, 0, &[(HDR, 16, R), (STATUS, 1, W)]);
    push_chain(&vq, 2, &[(HDR, 16, R), (STATUS, 1, W)]);
    kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 1);

    // The driver resets; the timer fires on a device with no queue.
    assert!(dev.lock().unwrap().reset());
    let deadline = Instant::now() + Duration::from_secs(5);
    while dev.lock().unwrap().limiter.is_blocked() {
        assert!(Instant::now() < deadline, "the timer never fired");
        em.run_with_timeout(100).unwrap();
    }
    assert_eq!(vq.used().idx().load(), 1);

    // The limit holds on the next activation: the one token there serves
    // one request, the next waits for the timer.
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let (_, kick) = activate_kickable(&mut *dev.lock().unwrap(), &mem, &vq);
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    push_chain(&vq, 0, &[(HDR, 16, R), (STATUS, 1, W)]);
    push_chain(&vq, 2, &[(HDR, 16, R), (STATUS, 1, W)]);
    kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 1);
    run_until_used(&mut em, &vq, 2);
}

mod fuzz {
    //! Arbitrary descriptor tables and avail rings against the parser
    //! and the whole queue loop.
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;

    const FUZZ_MEM: u64 = 0x20_0000;
    /// Headers live here; descriptors pointing at them parse further.
    const SLOTS: u64 = 0x10_0000;
    const TABLE_LEN: u16 = 16;

    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0..4u64).prop_map(|k| SLOTS + k * 0x100),
            (0x1000..0xf_0000u64).prop_map(|o| SLOTS + o),
            (0..0x1000u64).prop_map(|o| FUZZ_MEM - o),
            (0..0x1_0000u64).prop_map(|o| FUZZ_MEM + o),
            // Never the rings below SLOTS: a device write there would
            // change the chains under the oracle.
            SLOTS..=u64::MAX,
        ]
    }

    fn len() -> impl Strategy<Value = u32> {
        prop_oneof![
            0..32u32,
            (0..9u32).prop_map(|n| n * 512),
            0..0x4000u32,
            any::<u32>()
        ]
    }

    fn flags() -> impl Strategy<Value = u16> {
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        prop_oneof![
            4 => prop_oneof![Just(0), Just(next), Just(write), Just(next | write)],
            1 => Just(VRING_DESC_F_INDIRECT as u16),
            1 => any::<u16>(),
        ]
    }

    fn next() -> impl Strategy<Value = u16> {
        prop_oneof![4 => 0..TABLE_LEN, 1 => any::<u16>()]
    }

    fn descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        (addr(), len(), flags(), next())
    }

    fn header() -> impl Strategy<Value = (u32, u64)> {
        let kind = prop_oneof![
            Just(VIRTIO_BLK_T_IN),
            Just(VIRTIO_BLK_T_OUT),
            Just(VIRTIO_BLK_T_FLUSH),
            Just(VIRTIO_BLK_T_GET_ID),
            any::<u32>(),
        ];
        (kind, prop_oneof![0..20u64, any::<u64>()])
    }

    #[derive(Debug)]
    struct Case {
        table: Vec<(u64, u32, u16, u16)>,
        heads: Vec<u16>,
        avail_idx: Option<u16>,
        headers: Vec<(u32, u64)>,
    }

    /// A fully random table: mostly broken chains.
    fn random_case() -> impl Strategy<Value = Case> {
        (
            prop::collection::vec(descriptor(), 1..=TABLE_LEN as usize),
            prop::collection::vec(prop_oneof![4 => 0..TABLE_LEN, 1 => any::<u16>()], 0..8),
            prop::option::weighted(0.1, any::<u16>()),
            prop::collection::vec(header(), 4),
        )
            .prop_map(|(table, heads, avail_idx, headers)| Case {
                table,
                heads,
                avail_idx,
                headers,
            })
    }

    /// (addr, len, device-writable)
    type Buf = (u64, u32, bool);

    fn chain() -> impl Strategy<Value = Vec<Buf>> {
        let header = (
            prop_oneof![4 => (0..4u64).prop_map(|k| SLOTS + k * 0x100), 1 => addr()],
            prop_oneof![4 => Just(16u32), 1 => len()],
            prop::bool::weighted(0.1),
        );
        let data = (
            prop_oneof![4 => (0x1000..0xe_0000u64).prop_map(|o| SLOTS + o), 1 => addr()],
            prop_oneof![3 => (1..9u32).prop_map(|n| n * 512), 1 => len()],
            any::<bool>(),
        );
        let status = (
            prop_oneof![4 => (0..0x100u64).prop_map(|o| SLOTS + 0xf_0000 + o), 1 => addr()],
            prop_oneof![4 => Just(1u32), 1 => len()],
            prop::bool::weighted(0.9),
        );
        (header, prop::collection::vec(data, 0..4), status).prop_map(|(h, mut d, st)| {
            d.insert(0, h);
            d.push(st);
            d
        })
    }

    /// Well-formed-looking chains, then a few fields overwritten.
    fn structured_case() -> impl Strategy<Value = Case> {
        (
            prop::collection::vec(chain(), 1..4),
            prop::collection::vec((any::<prop::sample::Index>(), 0..4u8, any::<u64>()), 0..3),
            prop::collection::vec(header(), 4),
        )
            .prop_map(|(chains, mutations, headers)| {
                let mut table = Vec::new();
                let mut heads = Vec::new();
                for chain in chains {
                    heads.push(table.len() as u16);
                    let n = chain.len();
                    for (i, (addr, len, write)) in chain.into_iter().enumerate() {
                        let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                        if i + 1 < n {
                            flags |= VRING_DESC_F_NEXT as u16;
                        }
                        table.push((addr, len, flags, table.len() as u16 + 1));
                    }
                }
                for (index, field, value) in mutations {
                    let at = index.index(table.len());
                    let d = &mut table[at];
                    match field {
                        0 => d.2 = value as u16,
                        1 => d.3 = value as u16,
                        2 => d.0 = value.max(SLOTS),
                        _ => d.1 = value as u32,
                    }
                }
                Case {
                    table,
                    heads,
                    avail_idx: None,
                    headers,
                }
            })
    }

    fn case() -> impl Strategy<Value = Case> {
        prop_oneof![1 => random_case(), 3 => structured_case()]
    }

    // Ring layout (the mock's overlaps its avail and used rings at
    // large indices, so lay them out by hand).
    const DESC_TABLE: u64 = 0;
    const AVAIL_RING: u64 = 0x1000;
    const USED_RING: u64 = 0x2000;

    /// Lays the case out in fresh guest memory.
    fn setup(c: &Case) -> GuestMemory {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), FUZZ_MEM as usize)]).unwrap();
        for (i, &(a, l, f, n)) in c.table.iter().enumerate() {
            let d = RawDescriptor::from(Descriptor::new(a, l, f, n));
            mem.write_obj(d, GuestAddress(DESC_TABLE + 16 * i as u64))
                .unwrap();
        }
        for (i, &h) in c.heads.iter().enumerate() {
            mem.write_obj(h, GuestAddress(AVAIL_RING + 4 + 2 * i as u64))
                .unwrap();
        }
        let idx = c.avail_idx.unwrap_or(c.heads.len() as u16);
        mem.write_obj(idx, GuestAddress(AVAIL_RING + 2)).unwrap();
        for (k, &(kind, sector)) in c.headers.iter().enumerate() {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(SLOTS + k as u64 * 0x100))
                .unwrap();
        }
        mem
    }

    /// A queue over the case's rings, as the transport would build it.
    fn queue(mem: &GuestMemory) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(USED_RING))
            .unwrap();
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// The device-writable bytes of each chain the device will pop, in order.
    fn writable_sizes(mem: &GuestMemory) -> Vec<(u16, u64)> {
        let mut q = queue(mem);
        let mut out = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let w = chain
                .filter(|d| d.is_write_only())
                .map(|d| u64::from(d.len()))
                .sum();
            // A head outside the table cannot be returned: the device
            // logs it and adds no used element.
            if head < QUEUE_SIZE {
                out.push((head, w));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn parser_only_accepts_buffers_inside_memory(c in case()) {
            let mem = setup(&c);
            let mut q = queue(&mem);
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                match Request::parse(chain, &mem) {
                    Ok(req) => {
                        prop_assert!(mem.check_range(req.status, 1));
                        for b in &req.data {
                            prop_assert!(mem.check_range(b.addr, b.len as usize));
                        }
                    }
                    Err(ParseError { status: Some(s), .. }) => {
                        prop_assert!(mem.check_range(s, 1));
                    }
                    Err(ParseError { status: None, .. }) => {}
                }
            }
        }

        #[test]
        fn process_queue_never_overstates_used_length(c in case()) {
            let mem = setup(&c);
            let expected = writable_sizes(&mem);
            let image = disk_image();
            let mut dev = block(&image, false, Some("fuzz"));
            let irq = test_utils::irq();
            let aq = ActiveQueue { queue: queue(&mem), notify: EventFd::new(EFD_NONBLOCK).unwrap() };
            dev.activate(mem.clone(), irq, vec![aq]).unwrap();
            dev.process_queue(0);

            let used_ring = GuestAddress(USED_RING);
            let used_idx: u16 = mem.read_obj(used_ring.unchecked_add(2)).unwrap();
            prop_assert_eq!(usize::from(used_idx), expected.len());
            for (i, &(head, writable)) in expected.iter().enumerate() {
                let at = used_ring.unchecked_add(4 + 8 * i as u64);
                let id: u32 = mem.read_obj(at).unwrap();
                let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
                prop_assert_eq!(id, u32::from(head));
                prop_assert!(u64::from(len) <= writable, "chain {} len {} > writable {}", i, len, writable);
            }
        }
    }
}
