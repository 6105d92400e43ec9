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

mod rate_limit;

mod fuzz;
