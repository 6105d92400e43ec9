//! Returning a guest-reported free range to the host: the part of the
//! balloon that faces a hostile guest.
//!
//! A free page report is a guest-physical range (addr, len). [`discard`]
//! checks it (page-aligned, no overflow, inside one RAM region) and then
//! drops the host pages behind it: `MADV_DONTNEED` on husk's private
//! anonymous RAM (the next guest touch faults in a zero page),
//! `MADV_REMOVE` (a hole punched in the file) on a shared file mapping,
//! where DONTNEED would only drop the mapping and keep the file's pages,
//! and fresh anonymous pages mapped over the range on a restored VM's
//! private mapping of its snapshot file.

use std::io;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::devices::virtio::GuestMemory;

/// The granule of a report: the host's (and the guest's) 4 KiB page. The
/// Linux driver reports whole 2 MiB blocks, far coarser.
pub const PAGE_SIZE: u64 = 4096;

/// Why a reported range was refused (nothing was discarded) or failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("range {addr:#x}+{len:#x} is not 4 KiB-aligned")]
    Unaligned { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} wraps the address space")]
    Overflow { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} is not inside one guest RAM region")]
    OutsideRam { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x}: madvise: {source}")]
    Madvise {
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

/// Checks the guest-reported range `addr..addr + len` and gives its host
/// pages back; the guest reads zeros there afterwards. An empty range is
/// a no-op.
pub fn discard(mem: &GuestMemory, addr: u64, len: u64) -> Result<(), DiscardError> {
    if !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(DiscardError::Unaligned { addr, len });
    }
    let end = addr
        .checked_add(len)
        .ok_or(DiscardError::Overflow { addr, len })?;
    if len == 0 {
        return Ok(());
    }
    let outside = || DiscardError::OutsideRam { addr, len };
    let region = mem.find_region(GuestAddress(addr)).ok_or_else(outside)?;
    let offset = addr - region.start_addr().0;
    // Within one region: a report never spans two (there is a hole between
    // husk's RAM regions), and one host pointer must cover the range.
    if end - region.start_addr().0 > region.len() {
        return Err(outside());
    }
    let count = usize::try_from(len).map_err(|_| outside())?;
    let slice = region
        .get_slice(MemoryRegionAddress(offset), count)
        .map_err(|_| outside())?;
    let guard = slice.ptr_guard_mut();
    let shared = region.flags() & libc::MAP_SHARED != 0;
    if region.file_offset().is_some() && !shared {
        // A private file mapping (a VM restored from a snapshot's memory
        // file): DONTNEED would bring back the file's old bytes and MADV_REMOVE
        // is refused; fresh anonymous pages in place read zeros and drop
        // the private copies (as Firecracker does).
        // SAFETY: the range is `count` bytes inside this region's live
        // mapping (get_slice checked the bounds); MAP_FIXED replaces only
        // those pages, with the same protection, and nothing in Rust holds
        // references into guest memory (only volatile copies).
        let p = unsafe {
            libc::mmap(
                guard.as_ptr().cast(),
                count,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DiscardError::Madvise {
                addr,
                len,
                source: io::Error::last_os_error(),
            });
        }
        return Ok(());
    }
    let advice = if shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: `guard` points at `count` bytes of this region's live mapping
    // (get_slice checked the bounds, and `mem` keeps the mapping alive for
    // the call). madvise only changes what backs those pages: the guest
    // reported them free, and Rust holds no references into guest memory,
    // which is only ever accessed through volatile copies.
    let rc = unsafe { libc::madvise(guard.as_ptr().cast(), count, advice) };
    if rc != 0 {
        return Err(DiscardError::Madvise {
            addr,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}
