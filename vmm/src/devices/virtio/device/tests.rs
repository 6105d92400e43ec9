//! Tests of the shared device state: feature rules, config space,
//! activation and reset, and its registration with the event loop.

use super::*;
use crate::devices::virtio::test_utils::{active_queue, guest_memory, irq};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use std::sync::Mutex;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

const FEATURE_A: u64 = 1 << 3;

fn state() -> DeviceState {
    DeviceState::new("test", 42, &[16, 8], FEATURE_A)
        .unwrap()
        .with_config((1..=8).collect())
}

fn queues(vq: &MockSplitQueue<GuestMemory>, n: usize) -> Vec<ActiveQueue> {
    (0..n).map(|_| active_queue(vq)).collect()
}

#[test]
fn offers_version_1_and_masks_what_it_did_not_offer() {
    let mut s = state();
    assert_eq!(s.avail_features(), VIRTIO_F_VERSION_1 | FEATURE_A);
    s.set_acked_features(VIRTIO_F_VERSION_1 | FEATURE_A | (1 << 7) | (1 << 63));
    assert_eq!(s.acked_features(), VIRTIO_F_VERSION_1 | FEATURE_A);
    assert!(s.has_feature(3));
    assert!(!s.has_feature(7));
    assert!(!s.has_feature(64));
    assert!(!s.has_feature(u32::MAX));
}

#[test]
fn feature_checks_refuse_unoffered_and_legacy() {
    let offered = VIRTIO_F_VERSION_1 | FEATURE_A;
    assert_eq!(check_features(offered, VIRTIO_F_VERSION_1), Ok(()));
    assert_eq!(check_features(offered, offered), Ok(()));
    assert_eq!(
        check_features(offered, FEATURE_A),
        Err(FeaturesError::NoVersion1)
    );
    assert_eq!(
        check_features(offered, offered | (1 << 7)),
        Err(FeaturesError::NotOffered { unoffered: 1 << 7 })
    );
    // Unoffered bits are reported before a missing VERSION_1.
    assert_eq!(
        check_features(offered, 1 << 40),
        Err(FeaturesError::NotOffered { unoffered: 1 << 40 })
    );
}

#[test]
fn feature_pages() {
    let f = 0x1234_5678_9abc_def0;
    assert_eq!(features_page(f, 0), 0x9abc_def0);
    assert_eq!(features_page(f, 1), 0x1234_5678);
    assert_eq!(features_page(f, 2), 0);
    assert_eq!(features_page(f, u32::MAX), 0);

    let mut g = 0;
    assert!(set_features_page(&mut g, 1, 0x1234_5678));
    assert!(set_features_page(&mut g, 0, 0x9abc_def0));
    assert_eq!(g, f);
    assert!(set_features_page(&mut g, 0, 1));
    assert_eq!(g, 0x1234_5678_0000_0001);
    assert!(!set_features_page(&mut g, 2, 0xffff_ffff));
    assert_eq!(g, 0x1234_5678_0000_0001);
}

#[test]
fn config_reads_out_of_range_are_zero() {
    let s = state();
    let mut b = [0xffu8; 4];
    s.read_config(6, &mut b);
    assert_eq!(b, [7, 8, 0, 0]);
    s.read_config(8, &mut b);
    assert_eq!(b, [0; 4]);
    s.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    s.read_config(u64::MAX - 1, &mut b);
    assert_eq!(b, [0; 4]);
    let empty = DeviceState::new("empty", 4, &[8], 0).unwrap();
    let mut b = [0xffu8; 2];
    empty.read_config(0, &mut b);
    assert_eq!(b, [0; 2]);
}

#[test]
fn config_writes_only_inside_the_writable_range() {
    let mut s = state();
    s.write_config(0, &[0xaa]);
    assert_eq!(s.config()[0], 1);

    let mut s = state().with_writable_config(4..8);
    s.write_config(4, &[0xaa, 0xbb]);
    s.write_config(7, &[0xcc]);
    assert_eq!(s.config(), &[1, 2, 3, 4, 0xaa, 0xbb, 7, 0xcc]);
    // Straddling the range, past it, past the config, overflowing,
    // empty: all ignored whole.
    s.write_config(3, &[0; 2]);
    s.write_config(7, &[0; 2]);
    s.write_config(8, &[0]);
    s.write_config(u64::MAX, &[0; 4]);
    s.write_config(5, &[]);
    assert_eq!(s.config(), &[1, 2, 3, 4, 0xaa, 0xbb, 7, 0xcc]);

    // A writable range past the config's end writes nothing.
    let mut s = state().with_writable_config(6..16);
    s.write_config(8, &[0; 4]);
    s.write_config(6, &[9, 9]);
    assert_eq!(s.config(), &[1, 2, 3, 4, 5, 6, 9, 9]);
}

#[test]
fn activation_checks_queue_count_and_refuses_a_second_time() {
    let mem = guest_memory(0x10_0000);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut s = state();
    for n in [0, 1, 3] {
        assert!(matches!(
            s.activate(mem.clone(), irq(), queues(&vq, n)),
            Err(ActivateError::QueueCount { expected: 2, got }) if got == n
        ));
        assert!(!s.is_activated());
    }
    s.activate(mem.clone(), irq(), queues(&vq, 2)).unwrap();
    assert!(s.is_activated());
    assert_eq!(s.active().unwrap().queues.len(), 2);
    assert!(matches!(
        s.activate(mem.clone(), irq(), queues(&vq, 2)),
        Err(ActivateError::AlreadyActive)
    ));
    // The first activation's queues are kept.
    assert_eq!(s.active().unwrap().queues.len(), 2);

    s.set_acked_features(VIRTIO_F_VERSION_1);
    s.reset();
    assert!(!s.is_activated());
    assert_eq!(s.acked_features(), 0);
    s.activate(mem.clone(), irq(), queues(&vq, 2)).unwrap();
    assert!(s.is_activated());
}

#[test]
fn optional_trailing_queues() {
    let mem = guest_memory(0x10_0000);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let s = state().with_min_queues(1);
    assert!(matches!(
        s.check_activation(&queues(&vq, 0)),
        Err(ActivateError::QueueCount {
            expected: 1,
            got: 0
        })
    ));
    assert!(s.check_activation(&queues(&vq, 1)).is_ok());
    assert!(s.check_activation(&queues(&vq, 2)).is_ok());
    assert!(matches!(
        s.check_activation(&queues(&vq, 3)),
        Err(ActivateError::QueueCount {
            expected: 2,
            got: 3
        })
    ));
    // A minimum above the queue count is capped.
    let s = state().with_min_queues(5);
    assert!(s.check_activation(&queues(&vq, 2)).is_ok());
}

/// A subscriber that records what the state made of each event.
struct Recorder {
    state: DeviceState,
    seen: Vec<DeviceEvent>,
}

impl MutEventSubscriber for Recorder {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.init(ops);
    }
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let e = self.state.handle_event(events.fd(), ops);
        self.seen.push(e);
    }
}

#[test]
fn event_loop_follows_activation_and_reset() {
    let mem = guest_memory(0x10_0000);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let rec = Arc::new(Mutex::new(Recorder {
        state: state(),
        seen: Vec::new(),
    }));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(rec.clone());
    let seen = |rec: &Arc<Mutex<Recorder>>| std::mem::take(&mut rec.lock().unwrap().seen);

    let qs = queues(&vq, 2);
    let kick: Vec<EventFd> = qs.iter().map(|q| q.notify.try_clone().unwrap()).collect();
    rec.lock()
        .unwrap()
        .state
        .activate(mem.clone(), irq(), qs)
        .unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(seen(&rec), [DeviceEvent::Activated]);

    kick[1].write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(seen(&rec), [DeviceEvent::Queue(1)]);
    assert!(kick[1].read().is_err(), "notification not consumed");

    // A kick just before a reset: its fd is dropped from the loop, and
    // nothing fires once the loop caught up.
    kick[0].write(1).unwrap();
    rec.lock().unwrap().state.reset();
    em.run_with_timeout(100).unwrap();
    let got = seen(&rec);
    assert!(!got.is_empty());
    assert!(got.iter().all(|e| *e == DeviceEvent::Handled), "{got:?}");
    assert!(rec.lock().unwrap().state.stale.is_empty());
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);

    // Reactivation registers the new queues.
    let qs = queues(&vq, 2);
    let kick: Vec<EventFd> = qs.iter().map(|q| q.notify.try_clone().unwrap()).collect();
    rec.lock()
        .unwrap()
        .state
        .activate(mem.clone(), irq(), qs)
        .unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(seen(&rec), [DeviceEvent::Activated]);
    kick[0].write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(seen(&rec), [DeviceEvent::Queue(0)]);
}

#[test]
fn process_queue_ignores_unknown_queues_and_inactive_devices() {
    let mem = guest_memory(0x10_0000);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut s = state();
    let mut calls = 0;
    s.process_queue(0, |_, _| {
        calls += 1;
        0
    });
    s.activate(mem.clone(), irq(), queues(&vq, 2)).unwrap();
    s.process_queue(7, |_, _| {
        calls += 1;
        0
    });
    // Both queues are empty.
    s.process_queue(1, |_, _| {
        calls += 1;
        0
    });
    assert_eq!(calls, 0);
}
