//! Anonymous pages of this process locked in RAM, with their guest
//! physical addresses (from /proc/self/pagemap): where the `queues` phase
//! lays its rings and buffers, so that a device writes only pages the tool
//! owns.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::rng::Rng;

pub const PAGE: u64 = 4096;

/// Anonymous pages locked in RAM, with their guest physical addresses.
pub struct Arena {
    ptr: *mut u8,
    len: usize,
    phys: Vec<u64>,
}

impl Arena {
    pub fn new(pages: usize) -> io::Result<Self> {
        let page = usize::try_from(PAGE).map_err(io::Error::other)?;
        let len = pages * page;
        // SAFETY: a fresh private anonymous mapping; the result is checked
        // and the mapping is owned by the Arena, which unmaps it on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut arena = Self {
            ptr: ptr.cast(),
            len,
            phys: Vec::with_capacity(pages),
        };
        // SAFETY: ptr/len is the mapping just made.
        if unsafe { libc::mlock(ptr, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        arena.bytes_mut().fill(0xff);
        let pagemap = File::open("/proc/self/pagemap")?;
        for i in 0..pages {
            let vaddr = ptr as u64 + (i as u64) * PAGE;
            let mut entry = [0u8; 8];
            pagemap.read_exact_at(&mut entry, vaddr / PAGE * 8)?;
            let entry = u64::from_le_bytes(entry);
            let pfn = entry & ((1 << 55) - 1);
            if entry >> 63 == 0 || pfn == 0 {
                return Err(io::Error::other(
                    "no page frame numbers in /proc/self/pagemap (not root?)",
                ));
            }
            arena.phys.push(pfn * PAGE);
        }
        Ok(arena)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is len bytes, readable and writable, and only
        // reachable through this Arena. Devices may write it concurrently,
        // which is why rings are read back with volatile reads.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn phys(&self, page: usize) -> u64 {
        self.phys[page]
    }

    fn at(&self, page: usize, offset: u64) -> *mut u8 {
        let off = usize::try_from(page as u64 * PAGE + offset).unwrap_or(usize::MAX);
        assert!(off < self.len, "arena offset out of range");
        // SAFETY: off < len: inside the mapping.
        unsafe { self.ptr.add(off) }
    }

    pub fn put(&self, page: usize, offset: u64, bytes: &[u8]) {
        let p = self.at(page, offset);
        assert!(offset + bytes.len() as u64 <= PAGE, "write past a page");
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: p + i stays inside the page (checked above); volatile
            // because a device reads it from another thread of the host.
            unsafe { p.add(i).write_volatile(*b) };
        }
    }

    /// Reads `out.len()` bytes at `offset` of `page`.
    pub fn get(&self, page: usize, offset: u64, out: &mut [u8]) {
        let p = self.at(page, offset);
        assert!(offset + out.len() as u64 <= PAGE, "read past a page");
        for (i, v) in out.iter_mut().enumerate() {
            // SAFETY: p + i stays inside the page (checked above); volatile
            // because a device writes it from another thread of the host.
            *v = unsafe { p.add(i).read_volatile() };
        }
    }

    pub fn get_u16(&self, page: usize, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        self.get(page, offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn fill(&self, page: usize, rng: Option<&mut Rng>) {
        let mut buf = [0xffu8; 4096];
        if let Some(rng) = rng {
            rng.fill(&mut buf);
        }
        self.put(page, 0, &buf);
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root reads page frame numbers from /proc/self/pagemap; each locked
    /// page gets its own.
    #[test]
    fn the_arena_knows_its_physical_pages() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(Arena::new(2).is_err(), "a non-root reader gets no PFNs");
            return;
        }
        let a = Arena::new(4).unwrap();
        let mut phys: Vec<u64> = (0..4).map(|i| a.phys(i)).collect();
        assert!(phys.iter().all(|p| *p != 0 && p % PAGE == 0));
        phys.sort_unstable();
        phys.dedup();
        assert_eq!(phys.len(), 4);
        a.put(1, 2, &[0x34, 0x12]);
        assert_eq!(a.get_u16(1, 2), 0x1234);
    }
}
