//! What the kernel reads at entry: the e820 memory map, and either the
//! Linux zero page (`boot_params`, 64-bit boot protocol) or the PVH
//! `hvm_start_info` with its module list and memory map.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
};

use super::layout::{
    EBDA_START, HIMEM_START, MEMMAP_MAX_ENTRIES, MEMMAP_START, MODLIST_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use crate::devices::virtio::GuestMemory;

pub const E820_RAM: u32 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// "Undefined" boot loader id (0xff): husk has none assigned.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Default kernel alignment for images without a setup header (16 MiB).
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// The zero page's e820 table size.
const E820_MAX_ENTRIES: usize = 128;

/// Errors writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("guest RAM does not reach the kernel load address {HIMEM_START:#x}")]
    NoHighMemory,
    #[error("e820 map has {0} entries, the boot structure holds {1}")]
    TooManyE820Entries(usize, usize),
    #[error("{what} address {addr:#x} does not fit the 32-bit boot field")]
    AddressTooHigh { what: &'static str, addr: u64 },
    #[error("{what} size {size:#x} does not fit the 32-bit boot field")]
    SizeTooLarge { what: &'static str, size: u64 },
    #[error("cannot write boot information to guest memory: {0}")]
    Write(#[from] GuestMemoryError),
}

/// A usable-RAM range of the e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map of `mem`: RAM below the EBDA, and every RAM range from
/// 1 MiB up (the legacy BIOS hole in between is left out).
pub fn e820_map(mem: &GuestMemory) -> Result<Vec<E820Entry>, BootError> {
    let mut map = Vec::new();
    let ram = |addr, size| E820Entry {
        addr,
        size,
        kind: E820_RAM,
    };
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        if start < EBDA_START {
            map.push(ram(start, EBDA_START.min(end) - start));
        }
        let high_start = start.max(HIMEM_START);
        if end > high_start {
            map.push(ram(high_start, end - high_start));
        }
    }
    if !map
        .iter()
        .any(|e| e.addr <= HIMEM_START && e.addr + e.size > HIMEM_START)
    {
        return Err(BootError::NoHighMemory);
    }
    Ok(map)
}

fn u32_addr(what: &'static str, addr: u64) -> Result<u32, BootError> {
    u32::try_from(addr).map_err(|_| BootError::AddressTooHigh { what, addr })
}

fn u32_size(what: &'static str, size: u64) -> Result<u32, BootError> {
    u32::try_from(size).map_err(|_| BootError::SizeTooLarge { what, size })
}

/// Where the command line and initrd are in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub cmdline_addr: u64,
    /// Command line length including its NUL.
    pub cmdline_size: usize,
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
}

/// Builds the zero page for the 64-bit boot protocol. `header` is the
/// bzImage setup header, if the kernel has one.
pub fn zero_page(
    map: &[E820Entry],
    info: &BootInfo,
    header: Option<setup_header>,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    match header {
        Some(h) => params.hdr = h,
        None => params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT,
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = u32_addr("command line", info.cmdline_addr)?;
    params.hdr.cmdline_size = u32_size("command line", info.cmdline_size as u64)?;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = u32_addr("initrd", addr)?;
        params.hdr.ramdisk_size = u32_size("initrd", size)?;
    }
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(map.len(), E820_MAX_ENTRIES));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = u8::try_from(map.len())
        .map_err(|_| BootError::TooManyE820Entries(map.len(), E820_MAX_ENTRIES))?;
    Ok(params)
}

/// Writes the zero page for the 64-bit boot protocol at [`ZERO_PAGE_START`].
pub fn write_zero_page(
    mem: &GuestMemory,
    info: &BootInfo,
    header: Option<setup_header>,
) -> Result<(), BootError> {
    let params = zero_page(&e820_map(mem)?, info, header)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// Writes `hvm_start_info`, its module list (the initrd) and its memory
/// map for the PVH entry.
pub fn write_pvh_info(mem: &GuestMemory, info: &BootInfo) -> Result<(), BootError> {
    let map = e820_map(mem)?;
    if map.len() > MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(map.len(), MEMMAP_MAX_ENTRIES));
    }
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: info.cmdline_addr,
        memmap_paddr: MEMMAP_START,
        memmap_entries: u32::try_from(map.len())
            .map_err(|_| BootError::TooManyE820Entries(map.len(), MEMMAP_MAX_ENTRIES))?,
        ..Default::default()
    };
    if let Some((paddr, size)) = info.initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(MODLIST_START))?;
        start.nr_modules = 1;
        start.modlist_paddr = MODLIST_START;
    }
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(MEMMAP_START + i as u64 * entry_size))?;
    }
    mem.write_obj(start, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::ram_ranges;

    fn mem(mib: u64) -> GuestMemory {
        let ranges: Vec<_> = ram_ranges(mib << 20)
            .into_iter()
            .map(|(a, s)| (a, usize::try_from(s).unwrap()))
            .collect();
        GuestMemory::from_ranges(&ranges).unwrap()
    }

    const INFO: BootInfo = BootInfo {
        cmdline_addr: 0x20000,
        cmdline_size: 14,
        initrd: Some((0x7f0_0000, 0x1234)),
    };

    #[test]
    fn e820_for_small_memory() {
        let map = e820_map(&mem(128)).unwrap();
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: 1
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (128 << 20) - 0x10_0000,
                    kind: 1
                },
            ]
        );
    }

    #[test]
    fn e820_around_the_gap() {
        // 8 GiB address space but MAP_NORESERVE-free test: build regions directly.
        let m = GuestMemory::from_ranges(&[
            (GuestAddress(0), 0xc000_0000),
            (GuestAddress(0x1_0000_0000), 0x10_0000),
        ])
        .unwrap();
        let map = e820_map(&m).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[1],
            E820Entry {
                addr: 0x10_0000,
                size: 0xc000_0000 - 0x10_0000,
                kind: 1
            }
        );
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x1_0000_0000,
                size: 0x10_0000,
                kind: 1
            }
        );
        let tiny = GuestMemory::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(e820_map(&tiny), Err(BootError::NoHighMemory)));
    }

    #[test]
    fn zero_page_fields() {
        let m = mem(64);
        write_zero_page(&m, &INFO, None).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 14);
        assert_eq!({ p.hdr.ramdisk_image }, 0x7f0_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.hdr.kernel_alignment }, 0x100_0000);
        assert_eq!(p.e820_entries, 2);
        assert_eq!({ p.e820_table[1].addr }, 0x10_0000);
        assert_eq!({ p.e820_table[1].r#type }, 1);
    }

    #[test]
    fn zero_page_keeps_bzimage_header() {
        let hdr = setup_header {
            version: 0x20f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let p = zero_page(&e820_map(&mem(64)).unwrap(), &INFO, Some(hdr)).unwrap();
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
    }

    #[test]
    fn pvh_start_info_memmap_and_module() {
        let m = mem(64);
        write_pvh_info(&m, &INFO).unwrap();
        let s: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(s.magic, 0x336e_c578);
        assert_eq!((s.version, s.nr_modules, s.memmap_entries), (1, 1, 2));
        assert_eq!(
            (s.cmdline_paddr, s.modlist_paddr, s.memmap_paddr),
            (0x20000, MODLIST_START, MEMMAP_START)
        );
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x7f0_0000, 0x1234));
        let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(MEMMAP_START + 24)).unwrap();
        assert_eq!(
            (e.addr, e.size, e.type_),
            (0x10_0000, (64 << 20) - 0x10_0000, 1)
        );
    }
}
