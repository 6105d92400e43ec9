//! Counts of a vCPU's exits to the VMM by kind and address (`--exit-stats`),
//! for finding where a guest's boot spends its exits: each exit to user
//! space costs microseconds, far more in a nested VM. Off by default; when
//! off a vCPU keeps no counters at all.
//!
//! The guest picks the addresses, so the table is bounded: after
//! [`MAX_KEYS`] distinct (kind, address) pairs, further ones are counted
//! per kind only.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

/// Distinct (kind, address) pairs a vCPU counts separately.
pub const MAX_KEYS: usize = 128;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns exit counting on for vCPUs started from now on.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether vCPUs started now count their exits.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What a vCPU exit was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKind {
    PioIn,
    PioOut,
    MmioRead,
    MmioWrite,
    /// KVM_RUN interrupted (a kick or a signal).
    Interrupted,
    /// Anything else (HLT, shutdown, system events, errors).
    Other,
}

impl ExitKind {
    fn name(self) -> &'static str {
        match self {
            ExitKind::PioIn => "pio_in",
            ExitKind::PioOut => "pio_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }

    fn has_address(self) -> bool {
        !matches!(self, ExitKind::Interrupted | ExitKind::Other)
    }
}

/// One vCPU's exit counters.
#[derive(Debug, Default)]
pub struct ExitStats {
    by_address: HashMap<(ExitKind, u64), u64>,
    /// Exits whose address did not fit in the table, per kind.
    overflow: HashMap<ExitKind, u64>,
    total: u64,
}

impl ExitStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one exit of `kind` at `addr` (ignored for kinds without one).
    pub fn record(&mut self, kind: ExitKind, addr: u64) {
        self.total += 1;
        let key = (kind, if kind.has_address() { addr } else { 0 });
        if let Some(n) = self.by_address.get_mut(&key) {
            *n += 1;
        } else if self.by_address.len() < MAX_KEYS {
            self.by_address.insert(key, 1);
        } else {
            *self.overflow.entry(kind).or_default() += 1;
        }
    }

    /// All exits counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The counts, most frequent first: `(kind, address or None, count)`;
    /// an address of `None` for a kind with addresses is its overflow.
    pub fn sorted(&self) -> Vec<(ExitKind, Option<u64>, u64)> {
        let mut v: Vec<_> = self
            .by_address
            .iter()
            .map(|(&(k, a), &n)| (k, k.has_address().then_some(a), n))
            .chain(self.overflow.iter().map(|(&k, &n)| (k, None, n)))
            .collect();
        v.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        v
    }

    /// One line: `kind address=count` pairs, most frequent first, e.g.
    /// `pio_out 0x3f8=1200 pio_in 0x3fd=1199 interrupted=2`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (kind, addr, n) in self.sorted() {
            if !s.is_empty() {
                s.push(' ');
            }
            // Writing to a String cannot fail.
            let _ = match (kind.has_address(), addr) {
                (true, Some(a)) => write!(s, "{} {a:#x}={n}", kind.name()),
                (true, None) => write!(s, "{} other={n}", kind.name()),
                (false, _) => write!(s, "{}={n}", kind.name()),
            };
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_and_address_most_frequent_first() {
        let mut s = ExitStats::new();
        for _ in 0..3 {
            s.record(ExitKind::PioOut, 0x3f8);
        }
        s.record(ExitKind::PioIn, 0x3fd);
        s.record(ExitKind::PioIn, 0x3fd);
        s.record(ExitKind::MmioWrite, 0xd000_0050);
        s.record(ExitKind::Interrupted, 0x1234);
        assert_eq!(s.total(), 7);
        assert_eq!(
            s.summary(),
            "pio_out 0x3f8=3 pio_in 0x3fd=2 mmio_write 0xd0000050=1 interrupted=1"
        );
    }

    #[test]
    fn table_is_bounded_and_the_rest_is_counted_per_kind() {
        let mut s = ExitStats::new();
        for a in 0..(MAX_KEYS as u64 + 10) {
            s.record(ExitKind::MmioRead, a * 8);
        }
        // An address already in the table still counts as itself.
        s.record(ExitKind::MmioRead, 0);
        assert_eq!(s.by_address.len(), MAX_KEYS);
        assert_eq!(s.total(), MAX_KEYS as u64 + 11);
        let sorted = s.sorted();
        assert_eq!(sorted[0], (ExitKind::MmioRead, None, 10));
        assert_eq!(sorted[1], (ExitKind::MmioRead, Some(0), 2));
        assert!(s
            .summary()
            .starts_with("mmio_read other=10 mmio_read 0x0=2 "));
    }
}
