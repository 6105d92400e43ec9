//! Boot page tables: an identity map of the first 1 GiB with 2 MiB pages,
//! enough for a 64-bit kernel to run until it builds its own.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{PDE_START, PDPTE_START, PML4_START};
use crate::devices::virtio::GuestMemory;

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes the tables; returns the CR3 value (the PML4 address).
pub fn setup_identity_map(mem: &GuestMemory) -> Result<u64, GuestMemoryError> {
    mem.write_obj(PDPTE_START | PRESENT_WRITABLE, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | PRESENT_WRITABLE, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PAGE_SIZE_2M | PRESENT_WRITABLE,
            GuestAddress(PDE_START + i * 8),
        )?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables as the MMU would for a virtual address.
    fn translate(mem: &GuestMemory, cr3: u64, va: u64) -> u64 {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + ((va >> 39) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pml4e & 1, 1);
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pdpte & 1, 1);
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pde & 0x81, 0x81, "present 2 MiB page");
        (pde & !0x1f_ffff & !0xfff) | (va & 0x1f_ffff)
    }

    #[test]
    fn identity_maps_first_gib() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let cr3 = setup_identity_map(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        for va in [0, 0x1000, 0x10_0000, 0x20_1234, 0x3fff_ffff] {
            assert_eq!(translate(&mem, cr3, va), va);
        }
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde, 0x3fe0_0083);
    }
}
