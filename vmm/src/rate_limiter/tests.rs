//! The limiter: both buckets or neither, the timer it arms and what
//! unblocks it. The bucket's arithmetic is tested in `bucket`.

use std::num::NonZeroU64;
use std::os::fd::AsRawFd;

use husk_vm_config::TokenBucketConfig;

use super::*;

fn bucket(size: u64, refill_time_ms: u64) -> Option<TokenBucketConfig> {
    Some(TokenBucketConfig {
        size: NonZeroU64::new(size).unwrap(),
        one_time_burst: 0,
        refill_time_ms: NonZeroU64::new(refill_time_ms).unwrap(),
    })
}

fn limiter(bandwidth: Option<TokenBucketConfig>, ops: Option<TokenBucketConfig>) -> RateLimiter {
    RateLimiter::new(Some(&RateLimiterConfig { bandwidth, ops })).unwrap()
}

/// Waits up to `ms` for the limiter's timer to be readable.
fn timer_fires_within(l: &RateLimiter, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: l.timer.as_ref().unwrap().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    assert!(n >= 0, "poll: {}", io::Error::last_os_error());
    n == 1
}

#[test]
fn unlimited_lets_everything_through_without_a_timer() {
    let mut l = RateLimiter::new(None).unwrap();
    for _ in 0..1000 {
        assert!(l.consume(u64::MAX, u64::MAX));
    }
    assert!(!l.is_blocked());
    assert!(l.timer.is_none());
    assert!(!l.is_timer(0));
}

#[test]
fn an_operation_takes_from_both_buckets_or_neither() {
    let mut l = limiter(bucket(1000, 1000), bucket(2, 1000));
    let t0 = Instant::now();
    assert!(l.consume_at(100, 1, t0));
    assert!(l.consume_at(100, 1, t0));
    assert_eq!(l.bandwidth().unwrap().budget(), 800);
    // The ops bucket is empty: refused, and the bytes stay.
    assert!(!l.consume_at(100, 1, t0));
    assert!(l.is_blocked());
    assert_eq!(l.bandwidth().unwrap().budget(), 800);
    assert_eq!(l.ops().unwrap().budget(), 0);
    // Blocked, it refuses whatever the buckets hold until its timer fires.
    assert!(!l.consume_at(0, 0, t0 + Duration::from_secs(60)));
}

#[test]
fn a_refusal_arms_the_timer_for_when_the_tokens_are_there() {
    let start = Instant::now();
    // One operation per 50 ms.
    let mut l = limiter(None, bucket(1, 50));
    assert!(l.consume(0, 1));
    assert!(!l.consume(0, 1));
    assert!(l.is_blocked());
    // A readiness before the timer expires (there is none, but) changes
    // nothing.
    l.on_timer();
    assert!(l.is_blocked());
    assert!(timer_fires_within(&l, 5000), "the timer never fired");
    // The token accrues 50 ms after the bucket was made, not before.
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(50), "{waited:?}");
    l.on_timer();
    assert!(!l.is_blocked());
    assert!(l.consume(0, 1));
    // The timer is one-shot: read, it stays quiet.
    assert!(!timer_fires_within(&l, 0));
}

#[test]
fn the_timer_is_registered_and_recognized() {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use std::sync::{Arc, Mutex};

    struct Dev(RateLimiter, usize);
    impl MutEventSubscriber for Dev {
        fn init(&mut self, ops: &mut EventOps) {
            self.0.register(ops, "test");
        }
        fn process(&mut self, events: Events, _ops: &mut EventOps) {
            assert!(self.0.is_timer(events.fd()));
            self.0.on_timer();
            self.1 += 1;
        }
    }
    let mut l = limiter(bucket(10, 20), None);
    assert!(l.consume(10, 1));
    assert!(!l.consume(10, 1));
    let dev = Arc::new(Mutex::new(Dev(l, 0)));
    let mut em = EventManager::<Arc<Mutex<Dev>>>::new().unwrap();
    em.add_subscriber(dev.clone());
    assert_eq!(em.run_with_timeout(5000).unwrap(), 1);
    let d = dev.lock().unwrap();
    assert_eq!(d.1, 1);
    assert!(!d.0.is_blocked());
}
