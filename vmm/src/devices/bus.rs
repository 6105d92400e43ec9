//! The MMIO and port-I/O buses: which device answers a guest access.
//!
//! A vCPU exit names an address; the bus finds the device whose range holds
//! it and hands it the offset into that range. Ranges never overlap.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reached by guest loads and stores (MMIO) or `in`/`out` (PIO).
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` into the device's range.
    /// Unimplemented registers read as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from placing a device on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

/// A shared handle to a device on a bus.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    len: u64,
    device: SharedBusDevice,
}

/// An address space of devices (one for MMIO, one for port I/O).
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        // The nearest range at or below `end - 1` is the only one that can overlap.
        if let Some((&other, r)) = self.ranges.range(..end).next_back() {
            if other + r.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedBusDevice)> {
        let (&base, r) = self.ranges.range(..=addr).next_back()?;
        (addr - base < r.len).then_some((addr - base, &r.device))
    }

    /// Dispatches a read; returns false when no device holds `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                // A poisoned lock means a device thread panicked; the device
                // state is still memory-safe to use, so keep serving.
                let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                d.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device holds `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                d.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            // Tests read small offsets: the low byte tells them apart.
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(a.clone(), 0x1000, 0x100).unwrap();
        let mut buf = [0u8; 2];
        assert!(bus.read(0x1010, &mut buf));
        assert_eq!(buf, [0x10, 0x10]);
        assert!(bus.write(0x10ff, &[7]));
        assert_eq!(a.lock().unwrap().0, vec![7]);
        assert!(!bus.read(0x1100, &mut buf));
        assert!(!bus.read(0xfff, &mut buf));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Echo(vec![]))) as SharedBusDevice;
        bus.insert(d(), 0x1000, 0x100).unwrap();
        assert!(matches!(
            bus.insert(d(), 0x10ff, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0xf00, 0x101),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(d(), 0x1100, 0x100).unwrap();
        bus.insert(d(), 0xf00, 0x100).unwrap();
    }
}
