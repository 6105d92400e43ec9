//! Bounds on the events the guest sends the shim, which the shim would
//! otherwise pass on to containerd one for one: [`Coalescer`] lets at most
//! one event per key (container) through per interval and counts the rest;
//! [`Pacer`] caps how many events per second the shim takes from the guest
//! at all, so a hostile agent answering at once cannot spin a shim thread.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What to do with one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on; `suppressed` of its key were dropped since the last one.
    Send {
        suppressed: u64,
    },
    Drop,
}

struct Entry {
    last_sent: Instant,
    suppressed: u64,
}

/// Keys kept before quiet ones are forgotten (the keys are the sandbox's
/// containers, so this is seldom reached).
const MAX_KEYS: usize = 1024;

/// At most one event per key per interval.
pub struct Coalescer {
    interval: Duration,
    keys: HashMap<String, Entry>,
    suppressed_total: u64,
}

impl Coalescer {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            keys: HashMap::new(),
            suppressed_total: 0,
        }
    }

    /// Whether an event for `key` at `now` goes through. The events of a
    /// key dropped meanwhile are reported with its next one that does.
    pub fn admit(&mut self, key: &str, now: Instant) -> Verdict {
        if let Some(e) = self.keys.get_mut(key) {
            if now.saturating_duration_since(e.last_sent) < self.interval {
                e.suppressed += 1;
                self.suppressed_total += 1;
                return Verdict::Drop;
            }
            e.last_sent = now;
            return Verdict::Send {
                suppressed: std::mem::take(&mut e.suppressed),
            };
        }
        if self.keys.len() >= MAX_KEYS {
            let interval = self.interval;
            self.keys.retain(|_, e| {
                e.suppressed > 0 || now.saturating_duration_since(e.last_sent) < interval
            });
        }
        self.keys.insert(
            key.to_string(),
            Entry {
                last_sent: now,
                suppressed: 0,
            },
        );
        Verdict::Send { suppressed: 0 }
    }

    /// Every event dropped so far.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total
    }
}

/// At most `per_sec` events a second (a bucket of one second's worth).
pub struct Pacer {
    per_sec: u32,
    window_start: Option<Instant>,
    taken: u32,
}

impl Pacer {
    pub fn new(per_sec: u32) -> Self {
        Self {
            per_sec,
            window_start: None,
            taken: 0,
        }
    }

    /// Records one event at `now`; how long to wait before taking the next.
    pub fn took(&mut self, now: Instant) -> Duration {
        let second = Duration::from_secs(1);
        let start = match self.window_start {
            Some(s) if now.saturating_duration_since(s) < second => s,
            _ => {
                self.window_start = Some(now);
                self.taken = 0;
                now
            }
        };
        self.taken += 1;
        if self.taken >= self.per_sec {
            (start + second).saturating_duration_since(now)
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_key_per_interval() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut c = Coalescer::new(Duration::from_secs(1));
        assert_eq!(c.admit("a", t0), Verdict::Send { suppressed: 0 });
        // A flood for "a" is dropped; "b" is not held back by it.
        for i in 1..1000 {
            assert_eq!(c.admit("a", t0 + ms(i)), Verdict::Drop);
        }
        assert_eq!(c.admit("b", t0 + ms(10)), Verdict::Send { suppressed: 0 });
        // A second on, one more for "a", saying how many were dropped.
        assert_eq!(
            c.admit("a", t0 + ms(1000)),
            Verdict::Send { suppressed: 999 }
        );
        assert_eq!(c.admit("a", t0 + ms(1001)), Verdict::Drop);
        assert_eq!(c.suppressed_total(), 1000);
        // A long quiet key goes through at once.
        assert_eq!(
            c.admit("b", t0 + ms(60_000)),
            Verdict::Send { suppressed: 0 }
        );
    }

    #[test]
    fn many_keys_stay_bounded() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Duration::from_secs(1));
        for i in 0..10 * MAX_KEYS {
            let now = t0 + Duration::from_secs(2 * i as u64);
            assert_eq!(
                c.admit(&format!("c{i}"), now),
                Verdict::Send { suppressed: 0 }
            );
        }
        assert!(c.keys.len() <= MAX_KEYS);
    }

    #[test]
    fn pacer_caps_events_per_second() {
        let t0 = Instant::now();
        let mut p = Pacer::new(3);
        assert_eq!(p.took(t0), Duration::ZERO);
        assert_eq!(p.took(t0), Duration::ZERO);
        // The third of this second: wait for the next.
        assert_eq!(
            p.took(t0 + Duration::from_millis(250)),
            Duration::from_millis(750)
        );
        assert_eq!(p.took(t0 + Duration::from_secs(1)), Duration::ZERO);
        // A flood is held to 3 a second: 300 events take 100 seconds of waits.
        let mut now = t0 + Duration::from_secs(2);
        let start = now;
        for _ in 0..300 {
            now += p.took(now);
        }
        assert!(now - start >= Duration::from_secs(99), "{:?}", now - start);
    }
}
