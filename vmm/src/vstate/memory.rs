//! Guest RAM: anonymous mappings (optionally 2 MiB huge pages) laid out
//! around the MMIO gap below 4 GiB.

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestRegionMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::devices::virtio::GuestMemory;

const MIB: u64 = 1 << 20;

/// Errors from allocating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size_mib} MiB of guest RAM at {base:#x}{}: {source}", if *.hugepages { " with huge pages (are enough 2 MiB pages reserved in /proc/sys/vm/nr_hugepages?)" } else { "" })]
    Mmap {
        base: u64,
        size_mib: u64,
        hugepages: bool,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM region at {0:#x} wraps the address space")]
    Region(u64),
    #[error("{size_mib} MiB of guest RAM do not fit the host address space")]
    TooLarge { size_mib: u64 },
    #[error("cannot assemble guest memory: {0}")]
    Collection(#[from] vm_memory::GuestRegionCollectionError),
}

/// The guest RAM ranges (base, size) for `size` bytes of RAM: from 0 up to
/// the MMIO gap, and the rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

/// Allocates `mem_mib` MiB of guest RAM.
pub fn create(mem_mib: u64, hugepages: bool) -> Result<GuestMemory, MemoryError> {
    let flags = if hugepages {
        // Reserved up front (no MAP_NORESERVE): a shortage of huge pages
        // fails here rather than as SIGBUS when the guest touches memory.
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB
    } else {
        // Only pages the guest touches cost host memory.
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
    };
    let regions = ram_ranges(mem_mib * MIB)
        .into_iter()
        .map(|(base, size)| {
            let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge {
                size_mib: size / MIB,
            })?;
            let mapping = MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_hugetlbfs(hugepages)
                .build()
                .map_err(|source| MemoryError::Mmap {
                    base: base.0,
                    size_mib: size / MIB,
                    hugepages,
                    source,
                })?;
            GuestRegionMmap::new(mapping, base).ok_or(MemoryError::Region(base.0))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GuestMemory::from_regions(regions)?)
}

/// The end (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(mem: &GuestMemory) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .find(|r| r.start_addr().0 == 0)
        .map_or(0, |r| r.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_memory_is_one_low_region() {
        assert_eq!(ram_ranges(128 * MIB), vec![(GuestAddress(0), 128 * MIB)]);
        assert_eq!(ram_ranges(3072 * MIB), vec![(GuestAddress(0), 3072 * MIB)]);
    }

    #[test]
    fn large_memory_skips_the_gap() {
        assert_eq!(
            ram_ranges(4096 * MIB),
            vec![
                (GuestAddress(0), 0xc000_0000),
                (GuestAddress(0x1_0000_0000), 1024 * MIB)
            ]
        );
    }

    #[test]
    fn created_memory_has_no_ram_in_the_gap() {
        // MAP_NORESERVE: 4 GiB of address space, only touched pages cost RAM.
        let mem = create(4097, false).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(low_ram_end(&mem), MMIO_GAP_START);
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 0xc000_0000), (0x1_0000_0000, 1025 * MIB)]);
        assert!(mem.address_in_range(GuestAddress(MMIO_GAP_START - 1)));
        assert!(!mem.address_in_range(GuestAddress(MMIO_GAP_START)));
        assert!(!mem.address_in_range(GuestAddress(MMIO_GAP_END - 1)));
        mem.write_obj(0xabu8, GuestAddress(MMIO_GAP_END)).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(MMIO_GAP_END)).unwrap(),
            0xab
        );
        assert!(mem.write_obj(0u8, GuestAddress(MMIO_GAP_START)).is_err());
    }

    #[test]
    fn hugepages_fail_cleanly_without_reserved_pages() {
        let reserved = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap_or_default();
        if reserved.trim() != "0" {
            // Huge pages are reserved here: the mapping must work.
            let mem = create(2, true).unwrap();
            mem.write_obj(1u8, GuestAddress(0)).unwrap();
            return;
        }
        let err = create(64, true).unwrap_err().to_string();
        assert!(err.contains("with huge pages"), "{err}");
        assert!(err.contains("nr_hugepages"), "{err}");
    }
}
