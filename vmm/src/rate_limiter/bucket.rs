//! One token bucket: the arithmetic of a rate limit, with the clock passed
//! in so that it is tested without sleeping.
//!
//! The bucket holds up to `size` tokens and starts full; it refills at
//! `size` tokens per `refill_time`, continuously and exactly: what has
//! accrued towards the next token carries over, so no time is lost to
//! rounding however often it is asked. A one-time burst of extra tokens is
//! spent before the bucket and never comes back.
//!
//! An operation larger than the bucket could never find that many tokens.
//! It goes ahead once the bucket is full and leaves it in debt (a negative
//! budget), which refills first: the next operation waits as long as the
//! excess takes to refill, so the rate holds and nothing waits forever.
//!
//! The devices' rate limiters wait for tokens ([`TokenBucket::wait_time`]
//! then [`TokenBucket::take`]); the logger's limits on what the guest makes
//! the VMM write take what there is and drop the rest
//! ([`TokenBucket::take_up_to`]), from buckets built at compile time
//! ([`TokenBucket::with_rate`]) whose clock starts at their first use.

use std::time::{Duration, Instant};

use husk_vm_config::TokenBucketConfig;

const NANOS_PER_MILLI: u128 = 1_000_000;

/// A token bucket. See the module docs.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    /// Time to refill from empty to full, in nanoseconds (at least 1 ms).
    refill_ns: u128,
    /// Tokens there now; below zero after an operation larger than the
    /// bucket. Never above `size`.
    budget: i128,
    /// What has accrued towards the next token since `last_refill`, in
    /// units of 1/`refill_ns` token (so below `refill_ns`).
    carry: u128,
    /// Extra tokens left from the start; spent first, never refilled.
    one_time_burst: u64,
    /// When the bucket was last refilled; None until its first use.
    last_refill: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket as `config` describes, its clock starting at `now`.
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Self {
        Self {
            size: config.size.get(),
            refill_ns: u128::from(config.refill_time_ms.get()) * NANOS_PER_MILLI,
            budget: i128::from(config.size.get()),
            carry: 0,
            one_time_burst: config.one_time_burst,
            last_refill: Some(now),
        }
    }

    /// A full bucket of `size` tokens that refills in `refill_time` (at
    /// least 1 ns), with no one-time burst; its clock starts at its first
    /// use. A zero size never gives a token.
    pub const fn with_rate(size: u64, refill_time: Duration) -> Self {
        let refill_ns = refill_time.as_nanos();
        Self {
            size,
            refill_ns: if refill_ns == 0 { 1 } else { refill_ns },
            budget: size as i128,
            carry: 0,
            one_time_burst: 0,
            last_refill: None,
        }
    }

    /// Adds the tokens accrued up to `now`.
    fn refill(&mut self, now: Instant) {
        let Some(last) = self.last_refill else {
            self.last_refill = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(last).as_nanos();
        self.last_refill = Some(last.max(now));
        // Tokens accrue at size per refill_ns: elapsed * size units of
        // 1/refill_ns token. Saturating only past centuries of elapsed time,
        // which fill the bucket either way.
        let units = elapsed
            .saturating_mul(u128::from(self.size))
            .saturating_add(self.carry);
        let tokens = units / self.refill_ns;
        self.carry = units % self.refill_ns;
        // size - budget: at most size plus a debt below 2^64.
        let room = u128::try_from(i128::from(self.size) - self.budget).unwrap_or(0);
        if tokens >= room {
            // Full: nothing accrues beyond that.
            self.budget = i128::from(self.size);
            self.carry = 0;
        } else {
            // tokens < room, which fits an i128.
            self.budget += i128::try_from(tokens).unwrap_or(0);
        }
    }

    /// How long from `now` until `tokens` can be taken: zero when they can
    /// be now. An amount larger than the bucket needs a full bucket.
    pub fn wait_time(&mut self, tokens: u64, now: Instant) -> Duration {
        let tokens = tokens.saturating_sub(self.one_time_burst);
        if tokens == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        let need = i128::from(tokens.min(self.size));
        if self.budget >= need {
            return Duration::ZERO;
        }
        // need > budget, and need - budget is below 2^65.
        let missing = u128::try_from(need - self.budget).unwrap_or(u128::MAX);
        // The units still to accrue, at size units per nanosecond; carry is
        // below one token's worth, so at least one unit is missing.
        let ns = missing
            .saturating_mul(self.refill_ns)
            .saturating_sub(self.carry)
            .div_ceil(u128::from(self.size));
        u64::try_from(ns).map_or(Duration::MAX, Duration::from_nanos)
    }

    /// Takes `tokens`, from the one-time burst first. Call it once
    /// [`wait_time`](Self::wait_time) has said zero for them; more leaves
    /// the bucket in debt.
    pub fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    /// Takes up to `n` tokens, as many as there are (never into debt), and
    /// returns how many it took.
    pub fn take_up_to(&mut self, n: u64, now: Instant) -> u64 {
        self.refill(now);
        let there = u64::try_from(self.budget.max(0)).unwrap_or(u64::MAX);
        let got = n.min(there.saturating_add(self.one_time_burst));
        self.take(got);
        got
    }

    /// The tokens there, as of the last refill (negative: in debt).
    pub fn budget(&self) -> i128 {
        self.budget
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU64;

    fn bucket(size: u64, one_time_burst: u64, refill_time_ms: u64, now: Instant) -> TokenBucket {
        TokenBucket::new(
            &TokenBucketConfig {
                size: NonZeroU64::new(size).unwrap(),
                one_time_burst,
                refill_time_ms: NonZeroU64::new(refill_time_ms).unwrap(),
            },
            now,
        )
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn starts_full_and_refills_at_its_rate() {
        let t0 = Instant::now();
        // 1000 tokens per second: one per millisecond.
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.wait_time(1000, t0), Duration::ZERO);
        b.take(1000);
        assert_eq!(b.budget(), 0);
        // 100 tokens take 100 ms to come back, to the nanosecond.
        assert_eq!(b.wait_time(100, t0), ms(100));
        assert_eq!(b.wait_time(100, t0 + ms(40)), ms(60));
        assert_eq!(b.budget(), 40);
        assert_eq!(b.wait_time(100, t0 + ms(100)), Duration::ZERO);
        b.take(100);
        assert_eq!(b.budget(), 0);
        // Never more than the size, however long it waits.
        assert_eq!(
            b.wait_time(1, t0 + Duration::from_secs(3600)),
            Duration::ZERO
        );
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn fractions_of_a_token_carry_over() {
        let t0 = Instant::now();
        // 3 tokens per 10 ms: one every 3.33 ms.
        let mut b = bucket(3, 0, 10, t0);
        b.take(3);
        let mut now = t0;
        let mut got = 0;
        // Refill in 1 ms steps for one second: each step alone accrues less
        // than a token, yet the total is the rate's 300.
        for _ in 0..1000 {
            now += ms(1);
            if b.wait_time(1, now).is_zero() {
                b.take(1);
                got += 1;
            }
        }
        assert_eq!(got, 300);
    }

    #[test]
    fn a_wait_is_exactly_long_enough() {
        let t0 = Instant::now();
        // Rates whose token times are not whole nanoseconds.
        for (size, refill_ms, n) in [(7, 3, 5), (1_000_000, 7, 999_999), (3, 1000, 2)] {
            let mut b = bucket(size, 0, refill_ms, t0);
            b.take(size);
            let start = t0 + Duration::from_nanos(12_345);
            let wait = b.wait_time(n, start);
            assert!(!wait.is_zero());
            assert_eq!(
                b.wait_time(n, start + wait),
                Duration::ZERO,
                "{size}/{refill_ms}"
            );
            let mut c = bucket(size, 0, refill_ms, t0);
            c.take(size);
            c.wait_time(n, start);
            let early = start + wait - Duration::from_nanos(1);
            assert!(!c.wait_time(n, early).is_zero(), "{size}/{refill_ms} early");
        }
    }

    #[test]
    fn one_time_burst_goes_first_and_does_not_come_back() {
        let t0 = Instant::now();
        let mut b = bucket(100, 250, 1000, t0);
        // 300 > size, but the burst covers 250 and the bucket the rest.
        assert_eq!(b.wait_time(300, t0), Duration::ZERO);
        b.take(300);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 50));
        assert_eq!(b.wait_time(1, t0 + Duration::from_secs(10)), Duration::ZERO);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
    }

    #[test]
    fn larger_than_the_bucket_passes_when_full_and_pays_later() {
        let t0 = Instant::now();
        // 1024 bytes per 100 ms; a request of 4096.
        let mut b = bucket(1024, 0, 100, t0);
        b.take(100);
        // Not full: it waits for the 100 tokens it needs to be full.
        assert_eq!(b.wait_time(4096, t0), Duration::from_nanos(9_765_625));
        let t1 = t0 + ms(10);
        assert_eq!(b.wait_time(4096, t1), Duration::ZERO);
        b.take(4096);
        assert_eq!(b.budget(), 1024 - 4096);
        // The next byte waits for the 3072 of debt and itself: 300 ms and
        // one byte's time.
        let wait = b.wait_time(1, t1);
        assert_eq!(wait, ms(300) + Duration::from_nanos(97_657));
        assert_eq!(b.wait_time(1, t1 + wait), Duration::ZERO);
        // Over any long run the rate holds: 20 requests of 4096 in a row
        // take 19 * 400 ms after the first.
        let mut b = bucket(1024, 0, 100, t0);
        let mut now = t0;
        for _ in 0..20 {
            now += b.wait_time(4096, now);
            assert_eq!(b.wait_time(4096, now), Duration::ZERO);
            b.take(4096);
        }
        let took = now - t0;
        assert!(
            took >= ms(19 * 400 - 1) && took <= ms(19 * 400 + 1),
            "{took:?}"
        );
    }

    #[test]
    fn take_up_to_gives_what_is_there_and_starts_its_clock_at_first_use() {
        // 3 tokens, one per second: a burst of 3, then the rate.
        let mut b = TokenBucket::with_rate(3, Duration::from_secs(3));
        let t0 = Instant::now() + Duration::from_secs(100);
        assert_eq!(b.take_up_to(2, t0), 2);
        assert_eq!(b.take_up_to(2, t0), 1);
        assert_eq!(b.take_up_to(1, t0 + ms(999)), 0);
        assert_eq!(b.take_up_to(1, t0 + ms(1000)), 1);
        assert_eq!(b.take_up_to(1, t0 + ms(1500)), 0);
        // The half second left over counts towards the next token.
        assert_eq!(b.take_up_to(1, t0 + ms(2000)), 1);
        // A long pause refills to the size, not beyond.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.take_up_to(10, later), 3);
        assert_eq!(b.take_up_to(10, later), 0);
        assert_eq!(b.budget(), 0);
        // Bytes per second in many small steps add up to the rate.
        let mut b = TokenBucket::with_rate(1000, Duration::from_secs(1));
        assert_eq!(b.take_up_to(1000, t0), 1000);
        let total: u64 = (1..=1000).map(|i| b.take_up_to(10, t0 + ms(i))).sum();
        assert_eq!(total, 1000);
        // Time going backwards gives nothing and breaks nothing.
        assert_eq!(b.take_up_to(5, t0), 0);
    }

    #[test]
    fn degenerate_rates() {
        let t0 = Instant::now();
        let mut empty = TokenBucket::with_rate(0, Duration::from_secs(1));
        assert_eq!(empty.take_up_to(1, t0), 0);
        assert_eq!(empty.take_up_to(1, t0 + Duration::from_secs(10)), 0);
        let mut huge = TokenBucket::with_rate(u64::MAX, Duration::ZERO);
        assert_eq!(huge.take_up_to(u64::MAX, t0), u64::MAX);
        assert_eq!(
            huge.take_up_to(u64::MAX, t0 + Duration::from_secs(1_000_000)),
            u64::MAX
        );
    }

    #[test]
    fn extreme_numbers_do_not_overflow() {
        let t0 = Instant::now();
        let max = husk_vm_config::limits::MAX_BUCKET_SIZE;
        let mut b = bucket(max, max, 1, t0);
        b.take(u64::MAX);
        assert!(b.budget() < 0);
        assert!(b.wait_time(u64::MAX, t0) > Duration::from_secs(1));
        let mut b = bucket(1, 0, husk_vm_config::limits::MAX_REFILL_TIME_MS, t0);
        b.take(u64::MAX);
        assert!(b.wait_time(1, t0) > Duration::from_secs(3600 * 1_000_000));
        // A clock far ahead fills the bucket, no more.
        let mut b = bucket(1000, 0, 1000, t0);
        b.take(1000);
        assert_eq!(
            b.wait_time(1, t0 + Duration::from_secs(1 << 40)),
            Duration::ZERO
        );
        assert_eq!(b.budget(), 1000);
        // A clock that goes back (it cannot, but) accrues nothing.
        b.take(1000);
        assert_eq!(b.wait_time(1000, t0), ms(1000));
    }
}
