//! Log lines the guest causes, counted and rate-limited per kind: the first
//! `burst` lines of a kind, then one per interval. The counters are what
//! the control socket's status reports.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_vm_config::control::{FaultCount, GuestFaultKind};
use husk_vm_config::limits::{DEFAULT_LOG_BURST, DEFAULT_LOG_INTERVAL_MS};

use crate::rate_limiter::TokenBucket;

const KINDS: usize = GuestFaultKind::ALL.len();

struct KindState {
    bucket: TokenBucket,
    /// Lines suppressed since the last one logged.
    pending: u64,
}

impl KindState {
    const fn new(burst: u32, interval: Duration) -> Self {
        Self {
            // `burst` tokens that refill at one per interval.
            bucket: TokenBucket::with_rate(burst as u64, interval.saturating_mul(burst)),
            pending: 0,
        }
    }
}

/// The limiter and counters of every kind.
pub struct GuestFaults {
    state: [Mutex<KindState>; KINDS],
    events: [AtomicU64; KINDS],
    suppressed: [AtomicU64; KINDS],
}

/// This process's (one VM's) limiter and counters.
pub static FAULTS: GuestFaults = GuestFaults::new(
    DEFAULT_LOG_BURST,
    Duration::from_millis(DEFAULT_LOG_INTERVAL_MS),
);

impl GuestFaults {
    pub const fn new(burst: u32, interval: Duration) -> Self {
        const fn s(burst: u32, interval: Duration) -> Mutex<KindState> {
            Mutex::new(KindState::new(burst, interval))
        }
        let (b, i) = (burst, interval);
        Self {
            // One per kind (the array's length is checked against KINDS).
            state: [s(b, i), s(b, i), s(b, i), s(b, i), s(b, i), s(b, i)],
            events: [const { AtomicU64::new(0) }; KINDS],
            suppressed: [const { AtomicU64::new(0) }; KINDS],
        }
    }

    /// Sets every kind's limit: `burst` lines, then one per `interval_ms`.
    pub fn configure(&self, burst: u32, interval_ms: u64) {
        for s in &self.state {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            *s = KindState::new(burst, Duration::from_millis(interval_ms));
        }
    }

    /// Counts one fault of `kind` that will not be logged.
    pub fn count(&self, kind: GuestFaultKind) {
        self.events[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one fault of `kind`: Some(lines suppressed since the last
    /// one logged) if this one may be logged, None if it is suppressed.
    pub fn admit(&self, kind: GuestFaultKind) -> Option<u64> {
        self.admit_at(kind, Instant::now())
    }

    pub fn admit_at(&self, kind: GuestFaultKind, now: Instant) -> Option<u64> {
        let i = kind as usize;
        self.events[i].fetch_add(1, Ordering::Relaxed);
        let mut s = self.state[i].lock().unwrap_or_else(|e| e.into_inner());
        if s.bucket.take_up_to(1, now) == 1 {
            Some(std::mem::take(&mut s.pending))
        } else {
            s.pending += 1;
            self.suppressed[i].fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// The counts of the kinds that happened at least once.
    pub fn counts(&self) -> BTreeMap<GuestFaultKind, FaultCount> {
        GuestFaultKind::ALL
            .iter()
            .map(|&k| {
                let i = k as usize;
                let c = FaultCount {
                    events: self.events[i].load(Ordering::Relaxed),
                    suppressed: self.suppressed[i].load(Ordering::Relaxed),
                };
                (k, c)
            })
            .filter(|(_, c)| c.events > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_one_per_interval_with_the_suppressed_count() {
        let f = GuestFaults::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let mmio = GuestFaultKind::Mmio;
        let got: Vec<_> = (0..10).map(|_| f.admit_at(mmio, t0)).collect();
        assert_eq!(&got[..3], [Some(0); 3]);
        assert!(got[3..].iter().all(Option::is_none));
        // One interval later: one line, saying 7 were suppressed.
        assert_eq!(f.admit_at(mmio, t0 + Duration::from_secs(1)), Some(7));
        assert_eq!(f.admit_at(mmio, t0 + Duration::from_secs(1)), None);
        assert_eq!(f.admit_at(mmio, t0 + Duration::from_secs(2)), Some(1));
        // Kinds are limited separately.
        assert_eq!(f.admit_at(GuestFaultKind::Queue, t0), Some(0));
        let counts = f.counts();
        assert_eq!(
            counts.get(&mmio),
            Some(&FaultCount {
                events: 13,
                suppressed: 8
            })
        );
        assert_eq!(
            counts.get(&GuestFaultKind::Queue),
            Some(&FaultCount {
                events: 1,
                suppressed: 0
            })
        );
        // Kinds that never happened are left out.
        assert_eq!(counts.len(), 2);
    }

    #[test]
    fn a_flood_logs_a_bounded_number_of_lines() {
        let f = GuestFaults::new(10, Duration::from_secs(1));
        let t0 = Instant::now();
        // A million faults over 10 seconds.
        let mut logged = 0;
        for i in 0..1_000_000u64 {
            let now = t0 + Duration::from_micros(i * 10);
            if f.admit_at(GuestFaultKind::Request, now).is_some() {
                logged += 1;
            }
        }
        assert_eq!(logged, 10 + 9);
        let c = f.counts()[&GuestFaultKind::Request];
        assert_eq!((c.events, c.suppressed), (1_000_000, 1_000_000 - 19));
    }

    #[test]
    fn configure_replaces_the_limits() {
        let f = GuestFaults::new(1, Duration::from_secs(3600));
        let t0 = Instant::now();
        f.configure(2, 10);
        assert_eq!(f.admit_at(GuestFaultKind::Device, t0), Some(0));
        assert_eq!(f.admit_at(GuestFaultKind::Device, t0), Some(0));
        assert_eq!(f.admit_at(GuestFaultKind::Device, t0), None);
        assert_eq!(
            f.admit_at(GuestFaultKind::Device, t0 + Duration::from_millis(10)),
            Some(1)
        );
    }
}
