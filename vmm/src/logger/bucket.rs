//! A token bucket: `capacity` tokens, refilled at `rate` tokens per
//! `period`. Time is passed in, so that tests drive it.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: u64,
    rate: u64,
    period: Duration,
    tokens: u64,
    /// When the tokens were last brought up to date; None until first use
    /// (a new bucket is full).
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket. A zero rate or period never refills; a zero
    /// capacity never gives anything.
    pub const fn new(capacity: u64, rate: u64, period: Duration) -> Self {
        Self {
            capacity,
            rate,
            period,
            tokens: capacity,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let Some(last) = self.last else {
            self.last = Some(now);
            return;
        };
        let period_ns = self.period.as_nanos();
        if self.rate == 0 || period_ns == 0 {
            return;
        }
        let elapsed = now.saturating_duration_since(last).as_nanos();
        let add = elapsed * u128::from(self.rate) / period_ns;
        if add == 0 {
            return;
        }
        let room = u128::from(self.capacity - self.tokens);
        if add >= room {
            // Full: nothing carries over.
            self.tokens = self.capacity;
            self.last = Some(now);
        } else {
            // `add` < room <= u64::MAX.
            self.tokens += u64::try_from(add).unwrap_or(u64::MAX);
            // Advance by the time those tokens took, keeping the
            // remainder towards the next one.
            let used_ns = add * period_ns / u128::from(self.rate);
            let used = Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
            self.last = Some(last + used);
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.take_up_to(1, now) == 1
    }

    /// Takes up to `n` tokens; returns how many it took.
    pub fn take_up_to(&mut self, n: u64, now: Instant) -> u64 {
        self.refill(now);
        let got = n.min(self.tokens);
        self.tokens -= got;
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, 1, Duration::from_secs(1));
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_millis(999)));
        assert!(b.take(t0 + Duration::from_millis(1000)));
        assert!(!b.take(t0 + Duration::from_millis(1500)));
        // The half second left over counts towards the next token.
        assert!(b.take(t0 + Duration::from_millis(2000)));
        // A long pause refills to the capacity, not beyond.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.take_up_to(10, later), 3);
        assert_eq!(b.take_up_to(10, later), 0);
    }

    #[test]
    fn bytes_per_second() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 1000, Duration::from_secs(1));
        assert_eq!(b.take_up_to(600, t0), 600);
        assert_eq!(b.take_up_to(600, t0), 400);
        assert_eq!(b.take_up_to(600, t0 + Duration::from_millis(100)), 100);
        // Many small steps add up: 1000 steps of 1 ms give 1000 bytes.
        let mut total = 0;
        for i in 1..=1000 {
            total += b.take_up_to(10, t0 + Duration::from_millis(100 + i));
        }
        assert_eq!(total, 1000);
        // Time going backwards gives nothing and breaks nothing.
        assert_eq!(b.take_up_to(5, t0), 0);
    }

    #[test]
    fn degenerate_buckets() {
        let t0 = Instant::now();
        let mut empty = TokenBucket::new(0, 1, Duration::from_secs(1));
        assert!(!empty.take(t0));
        assert!(!empty.take(t0 + Duration::from_secs(10)));
        let mut no_refill = TokenBucket::new(1, 0, Duration::from_secs(1));
        assert!(no_refill.take(t0));
        assert!(!no_refill.take(t0 + Duration::from_secs(10)));
        let mut huge = TokenBucket::new(u64::MAX, u64::MAX, Duration::from_nanos(1));
        assert_eq!(huge.take_up_to(u64::MAX, t0), u64::MAX);
        assert_eq!(
            huge.take_up_to(u64::MAX, t0 + Duration::from_secs(1_000_000)),
            u64::MAX
        );
    }
}
