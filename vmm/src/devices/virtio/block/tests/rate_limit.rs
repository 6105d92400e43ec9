//! virtio-blk under a rate limiter: requests held in the queue while the
//! buckets are empty, resumed by the limiter's timer.

use super::*;
use crate::rate_limiter::RateLimiter;
use husk_vm_config::{RateLimiterConfig, TokenBucketConfig};
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

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
