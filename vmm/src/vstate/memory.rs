//! Guest RAM: laid out around the MMIO gap below 4 GiB, optionally on
//! 2 MiB huge pages. Private anonymous mappings unless a vhost-user backend
//! (virtiofsd) must map it too: then one memfd, mapped shared, whose fd the
//! VMM hands the backend.
//!
//! Without reserved huge pages, RAM is mapped at a 2 MiB-aligned host
//! address and marked for transparent huge pages (as QEMU does): where the
//! host's THP setting allows it (`madvise` or `always`; for the memfd,
//! `shmem_enabled`), KVM then maps the guest's RAM 2 MiB at a time, so a
//! guest touching its memory costs one nested page fault per 2 MiB, not 512.

use std::ffi::c_void;
use std::fs::File;
use std::ptr::null_mut;

use rustix::fs::MemfdFlags;
use rustix::mm::{Advice, MapFlags, ProtFlags};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::devices::virtio::GuestMemory;

const MIB: u64 = 1 << 20;

/// A transparent huge page, and the alignment guest RAM gets: KVM maps a
/// huge page only where the host address and the guest address agree
/// modulo 2 MiB.
const HUGE_PAGE: usize = 2 << 20;

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
    #[error("cannot create the shared guest RAM memfd{}: {source}", if *.hugepages { " with huge pages" } else { "" })]
    Memfd {
        hugepages: bool,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {size_mib} MiB of guest RAM at {base:#x}: {source}")]
    Map {
        base: u64,
        size_mib: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot size the shared guest RAM memfd to {size_mib} MiB{}: {source}", if *.hugepages { " (are enough 2 MiB pages reserved in /proc/sys/vm/nr_hugepages?)" } else { "" })]
    MemfdSize {
        size_mib: u64,
        hugepages: bool,
        #[source]
        source: std::io::Error,
    },
}

/// How guest RAM is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory: only the VMM maps it.
    Private,
    /// One memfd mapped MAP_SHARED, so a vhost-user backend can map the
    /// same pages from the fd (every region carries a file offset).
    SharedMemfd,
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

/// Allocates `mem_mib` MiB of guest RAM, backed as `backing` says.
pub fn create(mem_mib: u64, hugepages: bool, backing: Backing) -> Result<GuestMemory, MemoryError> {
    let ranges = ram_ranges(mem_mib * MIB);
    let memfd = match backing {
        Backing::Private => None,
        Backing::SharedMemfd => Some(memfd(mem_mib, hugepages)?),
    };
    let flags = match (hugepages, memfd.is_some()) {
        // Reserved up front (no MAP_NORESERVE): a shortage of huge pages
        // fails here rather than as SIGBUS when the guest touches memory.
        (true, false) => {
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB
        }
        // Only pages the guest touches cost host memory.
        (false, false) => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        // The memfd's own flags choose its page size; huge pages were
        // reserved when it was sized.
        (true, true) => libc::MAP_SHARED,
        (false, true) => libc::MAP_SHARED | libc::MAP_NORESERVE,
    };
    let mut file_offset = 0u64;
    let regions = ranges
        .into_iter()
        .map(|(base, size)| {
            let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge {
                size_mib: size / MIB,
            })?;
            let mut builder = MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_hugetlbfs(hugepages);
            let mut file = None;
            if let Some(memfd) = &memfd {
                let clone = memfd
                    .try_clone()
                    .map_err(|source| MemoryError::Memfd { hugepages, source })?;
                builder = builder.with_file_offset(FileOffset::new(clone, file_offset));
                file = Some((memfd, file_offset));
                file_offset += size;
            }
            if !hugepages {
                let addr =
                    map_huge_aligned(len, flags, file).map_err(|source| MemoryError::Map {
                        base: base.0,
                        size_mib: size / MIB,
                        source,
                    })?;
                // SAFETY: `map_huge_aligned` mapped `len` bytes at `addr`,
                // read-write, and never unmaps them.
                builder = unsafe { builder.with_raw_mmap_pointer(addr) };
            }
            let mapping = builder.build().map_err(|source| MemoryError::Mmap {
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

/// Maps `len` bytes of guest RAM read-write with `flags` (libc's, as
/// `create` chose them) at a 2 MiB-aligned address, of `file` from its
/// offset or anonymous, and asks for transparent huge pages there. It reserves `len` + 2 MiB of address
/// space, maps the RAM over its aligned part and gives the rest back.
///
/// The mapping is never unmapped (its region does not own it): guest RAM
/// lives as long as the husk-vmm process.
fn map_huge_aligned(
    len: usize,
    flags: libc::c_int,
    file: Option<(&File, u64)>,
) -> std::io::Result<*mut u8> {
    let reserve_len = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh inaccessible anonymous mapping at an address the
    // kernel chooses: it cannot overlap anything of ours.
    let reserve = unsafe {
        rustix::mm::mmap_anonymous(
            null_mut(),
            reserve_len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }?;
    let head = reserve.cast::<u8>().align_offset(HUGE_PAGE);
    // SAFETY: `head` < 2 MiB, so `head + len` stays inside the reservation.
    let addr = unsafe { reserve.cast::<u8>().add(head) }.cast::<c_void>();
    let prot = ProtFlags::READ | ProtFlags::WRITE;
    // rustix's mmap_anonymous adds MAP_ANONYMOUS itself.
    let flags = MapFlags::from_bits_retain((flags & !libc::MAP_ANONYMOUS).cast_unsigned())
        | MapFlags::FIXED;
    // SAFETY: MAP_FIXED replaces part of our own reservation, which nothing
    // else uses; the file (if any) stays open as the region's file offset.
    let mapped = unsafe {
        match file {
            Some((file, offset)) => rustix::mm::mmap(addr, len, prot, flags, file, offset),
            None => rustix::mm::mmap_anonymous(addr, len, prot, flags),
        }
    };
    let tail = reserve_len - head - len;
    // SAFETY: the head and tail are the reservation's unused ends, mapped
    // by us above and referenced by nothing.
    unsafe {
        if head > 0 {
            rustix::mm::munmap(reserve, head)?;
        }
        if tail > 0 {
            rustix::mm::munmap(addr.cast::<u8>().add(len).cast::<c_void>(), tail)?;
        }
    }
    if let Err(e) = mapped {
        // SAFETY: the RAM's part of the reservation, ours and unused.
        unsafe { rustix::mm::munmap(addr, len) }?;
        return Err(e.into());
    }
    // SAFETY: advice on the mapping just made; it changes no contents.
    // A kernel without transparent huge pages refuses it (EINVAL): then
    // the RAM stays on small pages, which is all it can have there.
    if let Err(e) = unsafe { rustix::mm::madvise(addr, len, Advice::LinuxHugepage) } {
        tracing::debug!(error = %e, "no transparent huge pages for guest RAM");
    }
    Ok(addr.cast())
}

/// A memfd of `mem_mib` MiB for shared guest RAM. Sizing it does not
/// allocate: shmem pages come on first touch, and with huge pages the
/// kernel reserves them from the pool here.
fn memfd(mem_mib: u64, hugepages: bool) -> Result<File, MemoryError> {
    let mut flags = MemfdFlags::CLOEXEC;
    if hugepages {
        flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
    }
    let fd = rustix::fs::memfd_create("husk-guest-ram", flags).map_err(|e| MemoryError::Memfd {
        hugepages,
        source: e.into(),
    })?;
    let file = File::from(fd);
    file.set_len(mem_mib * MIB)
        .map_err(|source| MemoryError::MemfdSize {
            size_mib: mem_mib,
            hugepages,
            source,
        })?;
    Ok(file)
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
        let mem = create(4097, false, Backing::Private).unwrap();
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
            let mem = create(2, true, Backing::Private).unwrap();
            mem.write_obj(1u8, GuestAddress(0)).unwrap();
            return;
        }
        let err = create(64, true, Backing::Private).unwrap_err().to_string();
        assert!(err.contains("with huge pages"), "{err}");
        assert!(err.contains("nr_hugepages"), "{err}");
    }

    #[test]
    fn shared_memory_is_one_memfd_every_region_maps() {
        use std::os::unix::fs::FileExt;
        let mem = create(4097, false, Backing::SharedMemfd).unwrap();
        let regions: Vec<_> = mem
            .iter()
            .map(|r| {
                let fo = r.file_offset().expect("shared RAM has a file offset");
                (r.start_addr().0, fo.start())
            })
            .collect();
        assert_eq!(regions, vec![(0, 0), (0x1_0000_0000, 0xc000_0000)]);
        // What the guest writes is in the file (what a backend maps), and
        // the other way round: the mapping is shared, not a private copy.
        mem.write_obj(0x5au8, GuestAddress(MMIO_GAP_END + 7))
            .unwrap();
        let high = mem.find_region(GuestAddress(MMIO_GAP_END)).unwrap();
        let file = high.file_offset().unwrap().file();
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, 0xc000_0000 + 7).unwrap();
        assert_eq!(byte, [0x5a]);
        file.write_all_at(&[0xa5], 0x1000).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0xa5);
        assert_eq!(file.metadata().unwrap().len(), 4097 * MIB);
    }

    #[test]
    fn shared_hugepage_memory_fails_cleanly_without_reserved_pages() {
        let reserved = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap_or_default();
        if reserved.trim() != "0" {
            let mem = create(2, true, Backing::SharedMemfd).unwrap();
            mem.write_obj(1u8, GuestAddress(0)).unwrap();
            return;
        }
        let err = create(64, true, Backing::SharedMemfd)
            .unwrap_err()
            .to_string();
        assert!(err.contains("huge pages"), "{err}");
    }

    /// The `AnonHugePages` (kB) of the mapping that holds `addr`, from
    /// /proc/self/smaps.
    fn anon_huge_kb(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(start), Ok(end)) = (
                        usize::from_str_radix(start, 16),
                        usize::from_str_radix(end, 16),
                    ) {
                        inside = (start..end).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                    return kb.trim().trim_end_matches(" kB").parse().unwrap();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn ram_is_aligned_for_huge_pages_and_gets_them_where_the_host_allows() {
        let mem = create(64, false, Backing::Private).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let host = region.as_ptr() as usize;
        assert_eq!(host % HUGE_PAGE, 0, "guest RAM at {host:#x}");
        // A write to a 2 MiB-aligned guest address, then the whole of the
        // page around it read back: it is RAM, zero but for the write.
        mem.write_obj(0x77u8, GuestAddress(4 << 20)).unwrap();
        let mut page = vec![0u8; HUGE_PAGE];
        mem.read_slice(&mut page, GuestAddress(4 << 20)).unwrap();
        assert_eq!(page[0], 0x77);
        assert!(page[1..].iter().all(|&b| b == 0));
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.contains("[madvise]") || thp.contains("[always]") {
            assert!(
                anon_huge_kb(host + (4 << 20)) >= 2048,
                "the write did not fault in a transparent huge page (THP: {})",
                thp.trim()
            );
        }
        let shared = create(6, false, Backing::SharedMemfd).unwrap();
        let host = shared.find_region(GuestAddress(0)).unwrap().as_ptr() as usize;
        assert_eq!(host % HUGE_PAGE, 0, "shared guest RAM at {host:#x}");
        shared.write_obj(1u8, GuestAddress(6 * MIB - 1)).unwrap();
    }
}
