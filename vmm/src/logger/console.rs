//! The guest console's output (the UART's transmit side), bounded: at most
//! `max_bytes` in all, at most `bytes_per_sec` (a bucket of one second's
//! worth). What does not fit is dropped at once and counted, so the guest's
//! UART never waits: its byte is "sent" either way. Reaching the cap writes
//! one last line saying so, within the cap.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use husk_vm_config::control::ConsoleCount;
use husk_vm_config::ConsoleLimits;

use crate::rate_limiter::TokenBucket;

/// What the console wrote and dropped.
#[derive(Default)]
pub struct ConsoleCounters {
    written: AtomicU64,
    dropped_rate: AtomicU64,
    dropped_cap: AtomicU64,
}

/// This process's (one VM's) console counters.
pub static COUNTERS: ConsoleCounters = ConsoleCounters::new();

impl ConsoleCounters {
    pub const fn new() -> Self {
        Self {
            written: AtomicU64::new(0),
            dropped_rate: AtomicU64::new(0),
            dropped_cap: AtomicU64::new(0),
        }
    }

    pub fn count(&self) -> ConsoleCount {
        ConsoleCount {
            written_bytes: self.written.load(Ordering::Relaxed),
            dropped_rate_bytes: self.dropped_rate.load(Ordering::Relaxed),
            dropped_cap_bytes: self.dropped_cap.load(Ordering::Relaxed),
        }
    }
}

/// A console output `W` within [`ConsoleLimits`].
pub struct BoundedConsole<W> {
    inner: W,
    max_bytes: u64,
    bucket: TokenBucket,
    written: u64,
    capped: bool,
    counters: &'static ConsoleCounters,
}

impl<W: Write> BoundedConsole<W> {
    pub fn new(inner: W, limits: ConsoleLimits, counters: &'static ConsoleCounters) -> Self {
        Self {
            inner,
            max_bytes: limits.max_bytes,
            bucket: TokenBucket::with_rate(limits.bytes_per_sec, Duration::from_secs(1)),
            written: 0,
            capped: false,
            counters,
        }
    }

    fn note(&self) -> String {
        format!(
            "\n[husk-vmm: console output capped at {} bytes; the rest is dropped]\n",
            self.max_bytes
        )
    }

    /// Writes what the limits let through of `buf`, at `now`.
    pub fn write_at(&mut self, buf: &[u8], now: Instant) -> io::Result<()> {
        let len = buf.len() as u64;
        if self.capped {
            self.counters.dropped_cap.fetch_add(len, Ordering::Relaxed);
            return Ok(());
        }
        let note = self.note();
        let room = self
            .max_bytes
            .saturating_sub(note.len() as u64)
            .saturating_sub(self.written);
        let fits = len.min(room);
        let granted = self.bucket.take_up_to(fits, now);
        // Both are at most buf.len().
        let take = usize::try_from(granted).unwrap_or(buf.len());
        self.counters
            .dropped_rate
            .fetch_add(fits - granted, Ordering::Relaxed);
        let mut result = Ok(());
        if take > 0 {
            self.written += granted;
            self.counters.written.fetch_add(granted, Ordering::Relaxed);
            result = self.inner.write_all(&buf[..take]);
        }
        if fits < len {
            self.counters
                .dropped_cap
                .fetch_add(len - fits, Ordering::Relaxed);
            self.capped = true;
            self.written += note.len() as u64;
            self.counters
                .written
                .fetch_add(note.len() as u64, Ordering::Relaxed);
            result = result.and(self.inner.write_all(note.as_bytes()));
        }
        result
    }
}

impl<W: Write> Write for BoundedConsole<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_at(buf, Instant::now())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> &'static ConsoleCounters {
        Box::leak(Box::new(ConsoleCounters::new()))
    }

    #[test]
    fn rate_limited_bytes_are_dropped_and_counted() {
        let c = counters();
        let limits = ConsoleLimits {
            max_bytes: 1 << 20,
            bytes_per_sec: 1000,
        };
        let mut con = BoundedConsole::new(Vec::new(), limits, c);
        let t0 = Instant::now();
        // 3000 bytes at once: one second's worth goes through.
        for _ in 0..3000 {
            con.write_at(b"a", t0).unwrap();
        }
        assert_eq!(con.inner.len(), 1000);
        // Half a second later, 500 more.
        for _ in 0..1000 {
            con.write_at(b"b", t0 + Duration::from_millis(500)).unwrap();
        }
        assert_eq!(con.inner.len(), 1500);
        assert_eq!(
            c.count(),
            ConsoleCount {
                written_bytes: 1500,
                dropped_rate_bytes: 2500,
                dropped_cap_bytes: 0
            }
        );
    }

    #[test]
    fn stops_at_the_cap_with_a_note_within_it() {
        let c = counters();
        let limits = ConsoleLimits {
            max_bytes: 4096,
            bytes_per_sec: 1 << 30,
        };
        let mut con = BoundedConsole::new(Vec::new(), limits, c);
        let t0 = Instant::now();
        for i in 0..10_000u64 {
            con.write_at(b"0123456789", t0 + Duration::from_millis(i))
                .unwrap();
        }
        let out = String::from_utf8(con.inner.clone()).unwrap();
        assert_eq!(out.len(), 4096);
        assert!(out
            .ends_with("\n[husk-vmm: console output capped at 4096 bytes; the rest is dropped]\n"));
        assert_eq!(out.matches("capped").count(), 1);
        let n = c.count();
        assert_eq!(n.written_bytes, 4096);
        assert_eq!(n.dropped_rate_bytes, 0);
        // Every byte offered was written or dropped at the cap.
        let note = out.len() - out.find("\n[husk-vmm").unwrap();
        assert_eq!(n.written_bytes - note as u64 + n.dropped_cap_bytes, 100_000);
    }

    #[test]
    fn write_never_fails_on_dropped_bytes() {
        let limits = ConsoleLimits {
            max_bytes: 4096,
            bytes_per_sec: 1024,
        };
        let mut con = BoundedConsole::new(io::sink(), limits, counters());
        for _ in 0..100_000 {
            assert_eq!(con.write(b"x").unwrap(), 1);
        }
    }
}
