//! Tests of the virtio-mmio transport: register reads and writes, the
//! driver's status sequence and feature negotiation, notifications.

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::{DeviceState, INT_VRING, VIRTIO_F_VERSION_1};
use vm_memory::GuestMemoryMmap;

const MEM_SIZE: usize = 0x10_0000;
const FEATURE_A: u64 = 1 << 3;

struct Dummy {
    state: DeviceState,
    resets: usize,
}

impl Dummy {
    fn new() -> Self {
        let state = DeviceState::new("dummy", 42, &[16, 8], FEATURE_A)
            .unwrap()
            .with_config((1..=8).collect());
        Self { state, resets: 0 }
    }

    fn acked(&self) -> u64 {
        self.state.acked_features()
    }

    fn queues(&self) -> &[ActiveQueue] {
        self.state.active().map_or(&[], |a| &a.queues)
    }
}

impl VirtioDevice for Dummy {
    fn state(&self) -> &DeviceState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }
    fn reset(&mut self) -> bool {
        self.state.reset();
        self.resets += 1;
        true
    }
    fn snapshot_support(&self) -> Result<(), String> {
        Ok(())
    }
}

struct Fixture {
    t: MmioTransport,
    dev: Arc<Mutex<Dummy>>,
    irq: Arc<IrqTrigger>,
}

fn fixture() -> Fixture {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let dev = Arc::new(Mutex::new(Dummy::new()));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let t = MmioTransport::new(mem, dev.clone(), irq.clone()).unwrap();
    Fixture { t, dev, irq }
}

fn r32(t: &mut MmioTransport, offset: u32) -> u32 {
    let mut b = [0xffu8; 4];
    t.read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, offset: u32, v: u32) {
    t.write(u64::from(offset), &v.to_le_bytes());
}

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

/// The low 32 bits of `v`, as the driver writes the LOW registers.
fn lo(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap()
}

fn negotiate(t: &mut MmioTransport, features: u64) {
    w32(t, reg::VIRTIO_MMIO_STATUS, ACK);
    w32(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV);
    w32(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w32(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, lo(features));
    w32(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w32(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    w32(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
}

/// Lays out queue `index` with `size` entries at `base`.
fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    w32(t, reg::VIRTIO_MMIO_QUEUE_SEL, index);
    w32(t, reg::VIRTIO_MMIO_QUEUE_NUM, size);
    let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
    w32(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, lo(desc));
    w32(t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
    w32(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, lo(avail));
    w32(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
    w32(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, lo(used));
    w32(t, reg::VIRTIO_MMIO_QUEUE_USED_HIGH, (used >> 32) as u32);
    w32(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
}

#[test]
fn full_handshake_activates_device_with_queues() {
    let Fixture { mut t, dev, irq } = fixture();
    let t = &mut t;
    assert_eq!(r32(t, reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_STATUS), 0);

    w32(t, reg::VIRTIO_MMIO_STATUS, ACK);
    w32(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV);
    w32(t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_DEVICE_FEATURES), lo(FEATURE_A));
    w32(t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 1);
    w32(t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);

    negotiate(t, VIRTIO_F_VERSION_1 | FEATURE_A);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_STATUS), ACK | DRV | FOK);
    assert_eq!(dev.lock().unwrap().acked(), VIRTIO_F_VERSION_1 | FEATURE_A);

    w32(t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
    w32(t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
    w32(t, reg::VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    setup_queue(t, 0, 16, 0x1_0000);
    setup_queue(t, 1, 4, 0x2_0000);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_QUEUE_READY), 1);

    // Notifies before DRIVER_OK go nowhere.
    w32(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert!(t.queue_notify_events()[0].read().is_err());

    w32(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
    {
        let d = dev.lock().unwrap();
        let q = d.queues();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].queue.size(), 16);
        assert_eq!(q[0].queue.desc_table(), 0x1_0000);
        assert_eq!(q[0].queue.avail_ring(), 0x1_1000);
        assert_eq!(q[0].queue.used_ring(), 0x1_2000);
        assert_eq!(q[1].queue.size(), 4);
        assert!(q[1].queue.ready());
    }

    // A notify that reaches the transport lands on the queue's eventfd,
    // which the device holds a duplicate of.
    w32(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(dev.lock().unwrap().queues()[1].notify.read().unwrap(), 1);

    irq.trigger(INT_VRING).unwrap();
    assert_eq!(r32(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
    w32(t, reg::VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    // Reset: the device is reset and the register file is back to zero.
    w32(t, reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_STATUS), 0);
    assert_eq!(dev.lock().unwrap().resets, 1);
    w32(t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn features_ok_requires_version_1_and_offered_subset() {
    let Fixture { mut t, dev, .. } = fixture();
    negotiate(&mut t, FEATURE_A);
    assert_eq!(t.status(), ACK | DRV);
    // Still negotiable: the driver may retry with a valid set.
    negotiate_retry(&mut t, VIRTIO_F_VERSION_1 | FEATURE_A | (1 << 7));
    assert_eq!(t.status(), ACK | DRV);
    assert_eq!(dev.lock().unwrap().acked(), 0);
    negotiate_retry(&mut t, VIRTIO_F_VERSION_1);
    assert_eq!(t.status(), ACK | DRV | FOK);
    assert_eq!(dev.lock().unwrap().acked(), VIRTIO_F_VERSION_1);
    // Features are frozen after FEATURES_OK.
    w32(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w32(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES, lo(FEATURE_A));
    assert_eq!(t.driver_features, VIRTIO_F_VERSION_1);
}

fn negotiate_retry(t: &mut MmioTransport, features: u64) {
    w32(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w32(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, lo(features));
    w32(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w32(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    w32(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
}

#[test]
fn status_bits_must_come_in_order() {
    let Fixture { mut t, .. } = fixture();
    w32(&mut t, reg::VIRTIO_MMIO_STATUS, DRV);
    assert_eq!(t.status(), 0);
    w32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK);
    w32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    assert_eq!(t.status(), ACK);
    w32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV);
    // Clearing a bit without a reset is refused.
    w32(&mut t, reg::VIRTIO_MMIO_STATUS, DRV);
    assert_eq!(t.status(), ACK | DRV);
    w32(
        &mut t,
        reg::VIRTIO_MMIO_STATUS,
        ACK | DRV | VIRTIO_CONFIG_S_FAILED,
    );
    assert_eq!(t.status(), ACK | DRV | VIRTIO_CONFIG_S_FAILED);
}

/// Negotiates, lays out both queues with `q0`'s size and base for queue 0,
/// sets DRIVER_OK and returns the status.
fn activate_with(q0_size: u32, q0_base: u64, desc_low_override: Option<u32>) -> Fixture {
    let mut f = fixture();
    negotiate(&mut f.t, VIRTIO_F_VERSION_1);
    setup_queue(&mut f.t, 0, q0_size, q0_base);
    if let Some(low) = desc_low_override {
        w32(&mut f.t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        w32(&mut f.t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, low);
    }
    setup_queue(&mut f.t, 1, 8, 0x2_0000);
    w32(&mut f.t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    f
}

fn assert_needs_reset(f: &Fixture) {
    assert_eq!(f.t.status(), ACK | DRV | FOK | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(f.irq.status() & INT_CONFIG, INT_CONFIG);
    assert!(!f.dev.lock().unwrap().is_activated());
}

#[test]
fn invalid_queues_fail_activation_with_needs_reset() {
    // Not a power of two.
    assert_needs_reset(&activate_with(12, 0x1_0000, None));
    // Larger than the maximum.
    assert_needs_reset(&activate_with(32, 0x1_0000, None));
    // Zero.
    assert_needs_reset(&activate_with(0, 0x1_0000, None));
    // Rings outside guest memory.
    assert_needs_reset(&activate_with(16, MEM_SIZE as u64 - 0x1000, None));
    assert_needs_reset(&activate_with(16, 1 << 40, None));
    // Misaligned descriptor table.
    assert_needs_reset(&activate_with(16, 0x1_0000, Some(0x1_0008)));

    // The driver recovers with a reset and a valid layout.
    let mut f = activate_with(12, 0x1_0000, None);
    w32(&mut f.t, reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(f.t.status(), 0);
    negotiate(&mut f.t, VIRTIO_F_VERSION_1);
    setup_queue(&mut f.t, 0, 16, 0x1_0000);
    setup_queue(&mut f.t, 1, 8, 0x2_0000);
    w32(&mut f.t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    assert_eq!(f.t.status(), ACK | DRV | FOK | DOK);
    assert!(f.dev.lock().unwrap().is_activated());
}

#[test]
fn ready_queues_must_be_a_prefix_and_match_the_device() {
    let mut f = fixture();
    negotiate(&mut f.t, VIRTIO_F_VERSION_1);
    setup_queue(&mut f.t, 1, 8, 0x2_0000);
    w32(&mut f.t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    assert_needs_reset(&f);

    // Only queue 0 ready: the device wants two and refuses.
    let mut f = fixture();
    negotiate(&mut f.t, VIRTIO_F_VERSION_1);
    setup_queue(&mut f.t, 0, 8, 0x1_0000);
    w32(&mut f.t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    assert_needs_reset(&f);
}

#[test]
fn queue_registers_are_ignored_outside_their_window() {
    let Fixture { mut t, .. } = fixture();
    let t = &mut t;
    w32(t, reg::VIRTIO_MMIO_STATUS, ACK);
    w32(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV);
    // Before FEATURES_OK.
    w32(t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    w32(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    // Out-of-range queue selector.
    negotiate_retry(t, VIRTIO_F_VERSION_1);
    w32(t, reg::VIRTIO_MMIO_QUEUE_SEL, 7);
    w32(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r32(t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn config_space_any_width_registers_only_32_bit() {
    let Fixture { mut t, .. } = fixture();
    let mut b1 = [0u8; 1];
    t.read(0x100 + 2, &mut b1);
    assert_eq!(b1, [3]);
    let mut b2 = [0u8; 2];
    t.read(0x100 + 6, &mut b2);
    assert_eq!(b2, [7, 8]);
    let mut b8 = [0u8; 8];
    t.read(0x100, &mut b8);
    assert_eq!(b8, [1, 2, 3, 4, 5, 6, 7, 8]);
    t.read(0x100 + 4, &mut b8);
    assert_eq!(b8, [5, 6, 7, 8, 0, 0, 0, 0]);

    // Registers: a 2-byte or misaligned read yields zeros, a 1-byte
    // status write is ignored.
    let mut b2 = [0xffu8; 2];
    t.read(u64::from(reg::VIRTIO_MMIO_MAGIC_VALUE), &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b4 = [0xffu8; 4];
    t.read(1, &mut b4);
    assert_eq!(b4, [0; 4]);
    t.write(u64::from(reg::VIRTIO_MMIO_STATUS), &[1]);
    assert_eq!(t.status(), 0);
    assert_eq!(r32(&mut t, reg::VIRTIO_MMIO_CONFIG_GENERATION), 0);
}

/// A device that keeps the trait's default: no snapshots.
struct NoSnapshot(DeviceState);

impl VirtioDevice for NoSnapshot {
    fn state(&self) -> &DeviceState {
        &self.0
    }
    fn state_mut(&mut self) -> &mut DeviceState {
        &mut self.0
    }
}

#[test]
fn snapshot_round_trips_registers_queues_and_ring_indexes() {
    let Fixture { mut t, dev, irq } = fixture();
    negotiate(&mut t, VIRTIO_F_VERSION_1 | FEATURE_A);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    setup_queue(&mut t, 1, 8, 0x2_0000);
    w32(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    w32(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    {
        // The device got as far as avail 5 / used 3 in queue 0.
        let mut d = dev.lock().unwrap();
        let q = &mut d.state.active_mut().unwrap().queues[0].queue;
        q.set_next_avail(5);
        q.set_next_used(3);
    }
    irq.trigger(INT_VRING).unwrap();
    let saved = t.snapshot().unwrap();
    assert!(saved.activated);
    assert_eq!(saved.status, ACK | DRV | FOK | DOK);
    assert_eq!(saved.acked_features, VIRTIO_F_VERSION_1 | FEATURE_A);
    assert_eq!(saved.queue_sel, 1);
    assert_eq!(saved.interrupt_status, INT_VRING);
    assert_eq!(
        (
            saved.queues[0].size,
            saved.queues[0].desc,
            saved.queues[0].next_avail,
            saved.queues[0].next_used
        ),
        (16, 0x1_0000, 5, 3)
    );
    // Through JSON, as the state file carries it.
    let json = serde_json::to_vec(&saved).unwrap();
    let back: persist::TransportSnapshot = serde_json::from_slice(&json).unwrap();

    let Fixture {
        t: mut t2,
        dev: dev2,
        irq: irq2,
    } = fixture();
    t2.restore(&back).unwrap();
    assert_eq!(
        t2.snapshot().unwrap(),
        saved,
        "save -> restore -> save is the same"
    );
    assert_eq!(r32(&mut t2, reg::VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
    assert_eq!(r32(&mut t2, reg::VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
    assert_eq!(irq2.status(), INT_VRING);
    let d2 = dev2.lock().unwrap();
    assert_eq!(d2.acked(), VIRTIO_F_VERSION_1 | FEATURE_A);
    let qs = d2.queues();
    assert_eq!(qs.len(), 2);
    assert_eq!((qs[0].queue.next_avail(), qs[0].queue.next_used()), (5, 3));
    assert_eq!(qs[1].queue.size(), 8);
    assert_eq!(d2.resets, 0, "the guest sees no reset");
    // Every ready queue is kicked once, and the pending interrupt raised.
    for (i, q) in qs.iter().enumerate() {
        assert_eq!(q.notify.read().unwrap(), 1, "queue {i} kicked");
    }
    assert_eq!(irq2.irq_evt().read().unwrap(), 1, "interrupt raised again");
}

#[test]
fn restore_refuses_another_device_or_config() {
    let Fixture { mut t, .. } = fixture();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    let saved = t.snapshot().unwrap();
    let Fixture { t: mut t2, .. } = fixture();
    let mut other = saved.clone();
    other.device_type = 2;
    let e = t2.restore(&other).unwrap_err().to_string();
    assert!(e.contains("device type 2 in the snapshot, 42"), "{e}");
    let mut other = saved.clone();
    other.config[0] ^= 1;
    let e = t2.restore(&other).unwrap_err().to_string();
    assert!(e.contains("config space differs"), "{e}");
    let mut other = saved.clone();
    other.acked_features |= 1 << 40;
    let e = t2.restore(&other).unwrap_err().to_string();
    assert!(e.contains("did not offer"), "{e}");
    // Rings outside guest memory fail as they would at DRIVER_OK.
    let Fixture { t: mut t3, .. } = fixture();
    negotiate(&mut t3, VIRTIO_F_VERSION_1);
    setup_queue(&mut t3, 0, 16, 0x1_0000);
    setup_queue(&mut t3, 1, 8, 0x2_0000);
    w32(&mut t3, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    let mut bad = t3.snapshot().unwrap();
    bad.queues[0].desc = 1 << 40;
    let Fixture { t: mut t4, .. } = fixture();
    let e = t4.restore(&bad).unwrap_err().to_string();
    assert!(e.contains("cannot activate the restored queues"), "{e}");
}

#[test]
fn devices_without_snapshot_support_are_refused_by_name() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let dev = Arc::new(Mutex::new(NoSnapshot(
        DeviceState::new("virtio-thing", 42, &[16], 0).unwrap(),
    )));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let t = MmioTransport::new(mem, dev, irq).unwrap();
    let e = t.snapshot().unwrap_err().to_string();
    assert!(e.starts_with("virtio-thing: cannot be snapshotted"), "{e}");
    assert!(t.snapshot_support().is_err());
}
