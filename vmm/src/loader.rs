//! Puts the guest's kernel, initrd and command line into guest memory.
//!
//! ELF kernels (vmlinux) load at their physical addresses and are entered
//! through the PVH note when they have one, else at their 64-bit entry;
//! bzImages load at 1 MiB and are entered at their 64-bit entry. The initrd
//! goes page-aligned at the top of RAM below the MMIO gap.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::setup_header;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::x86_64::BootProtocol;
use crate::devices::virtio::GuestMemory;
use crate::vstate::memory::low_ram_end;

const PAGE_SIZE: u64 = 0x1000;
/// A bzImage's 64-bit entry point is 0x200 past its load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Errors loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("kernel {path} ends at {end:#x}, beyond the {ram:#x} bytes of RAM below the MMIO gap")]
    KernelTooLarge { path: PathBuf, end: u64, ram: u64 },
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest RAM between the kernel end {kernel_end:#x} and {ram_end:#x}"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    #[error("cannot read initrd {path} into guest memory: {source}")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line to guest memory: {0}")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: u64,
    pub protocol: BootProtocol,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage setup header, for the zero page.
    pub setup_header: Option<setup_header>,
}

fn open(what: &'static str, path: &Path) -> Result<File, LoaderError> {
    File::open(path).map_err(|source| LoaderError::Open {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Loads the kernel at `path` (ELF vmlinux or bzImage).
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let mut file = open("kernel", path)?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC;
    let himem = Some(GuestAddress(HIMEM_START));
    let kernel_err = |source| LoaderError::Kernel {
        path: path.to_owned(),
        source,
    };
    let loaded = if is_elf {
        let r = Elf::load(mem, None, &mut file, himem).map_err(kernel_err)?;
        let (entry, protocol) = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (addr.0, BootProtocol::Pvh),
            _ => (r.kernel_load.0, BootProtocol::Linux64),
        };
        LoadedKernel {
            entry,
            protocol,
            end: r.kernel_end,
            setup_header: None,
        }
    } else {
        let r = BzImage::load(mem, None, &mut file, himem).map_err(kernel_err)?;
        LoadedKernel {
            entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            protocol: BootProtocol::Linux64,
            end: r.kernel_end,
            setup_header: r.setup_header,
        }
    };
    let ram = low_ram_end(mem);
    if loaded.end > ram {
        return Err(LoaderError::KernelTooLarge {
            path: path.to_owned(),
            end: loaded.end,
            ram,
        });
    }
    Ok(loaded)
}

/// Where an initrd of `size` bytes goes: page-aligned at the top of RAM
/// below the gap (`ram_end`), above the kernel.
pub fn initrd_address(size: u64, kernel_end: u64, ram_end: u64) -> Option<u64> {
    let addr = ram_end.checked_sub(size)? & !(PAGE_SIZE - 1);
    let kernel_end_page = kernel_end.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end_page).then_some(addr)
}

/// Loads the initrd at `path`; returns its guest address and size.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), LoaderError> {
    let mut file = open("initrd", path)?;
    let size = file
        .metadata()
        .map_err(|source| LoaderError::Open {
            what: "initrd",
            path: path.to_owned(),
            source,
        })?
        .len();
    let ram_end = low_ram_end(mem);
    let too_large = || LoaderError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        kernel_end,
        ram_end,
    };
    let addr = initrd_address(size, kernel_end, ram_end).ok_or_else(too_large)?;
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| LoaderError::InitrdRead {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

/// The kernel command line from the config, with room for the devices the
/// VMM appends.
pub fn new_cmdline(cmdline: &str) -> Result<Cmdline, LoaderError> {
    Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)
}

/// Writes the command line at [`CMDLINE_START`]; returns its address and
/// size including the NUL.
pub fn write_cmdline(mem: &GuestMemory, cmdline: &Cmdline) -> Result<(u64, usize), LoaderError> {
    let size = cmdline
        .as_cstring()
        .map_err(LoaderError::Cmdline)?
        .as_bytes_with_nul()
        .len();
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(LoaderError::CmdlineWrite)?;
    Ok((CMDLINE_START, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: usize) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn cmdline_round_trip_and_virtio_devices() {
        let m = mem(0x10_0000);
        let mut c = new_cmdline("console=ttyS0 reboot=k").unwrap();
        c.add_virtio_mmio_device(0x1000, GuestAddress(0xd000_0000), 5, None)
            .unwrap();
        let (addr, size) = write_cmdline(&m, &c).unwrap();
        let want = b"console=ttyS0 reboot=k virtio_mmio.device=4K@0xd0000000:5\0";
        assert_eq!((addr, size), (CMDLINE_START, want.len()));
        let mut got = vec![0u8; want.len()];
        m.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert_eq!(&got, want);
    }

    #[test]
    fn cmdline_limits() {
        // The capacity counts the NUL.
        assert!(new_cmdline(&"x".repeat(CMDLINE_MAX_SIZE - 1)).is_ok());
        let err = new_cmdline(&"x".repeat(CMDLINE_MAX_SIZE))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("kernel command line:"), "{err}");
        assert!(new_cmdline("")
            .unwrap()
            .as_cstring()
            .unwrap()
            .as_bytes()
            .is_empty());
    }

    #[test]
    fn initrd_placement() {
        // Top of RAM, page aligned down.
        assert_eq!(
            initrd_address(0x1800, 0x20_0000, 0x800_0000),
            Some(0x7ffe000)
        );
        assert_eq!(
            initrd_address(0x1000, 0x20_0000, 0x800_0000),
            Some(0x7fff000)
        );
        // Touching the (page-rounded) kernel end is fine, overlapping is not.
        assert_eq!(
            initrd_address(0x1000, 0x7ffe001, 0x800_0000),
            Some(0x7fff000)
        );
        assert_eq!(initrd_address(0x1000, 0x7fff001, 0x800_0000), None);
        assert_eq!(initrd_address(0x900_0000, 0, 0x800_0000), None);
    }

    #[test]
    fn initrd_loaded_at_top_of_low_ram() {
        let dir = std::env::temp_dir().join(format!("husk-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("initrd");
        std::fs::write(&path, b"initrd-bytes").unwrap();
        let m = mem(0x40_0000);
        let (addr, size) = load_initrd(&m, &path, 0x20_0000).unwrap();
        assert_eq!((addr, size), (0x3f_f000, 12));
        let mut got = [0u8; 12];
        m.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert_eq!(&got, b"initrd-bytes");
        let err = load_initrd(&m, &path, 0x40_0000).unwrap_err().to_string();
        assert!(err.contains("does not fit in guest RAM"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernel_errors_name_the_file() {
        let m = mem(0x40_0000);
        let err = load_kernel(&m, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot open kernel /nonexistent/vmlinux"));
        let dir = std::env::temp_dir().join(format!("husk-kernel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0u8; 4096]).unwrap();
        let err = load_kernel(&m, &junk).unwrap_err().to_string();
        assert!(
            err.contains("cannot load kernel") && err.contains("junk"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
