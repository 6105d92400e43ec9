//! What a snapshot keeps of KVM's side of the VM, and how it is read from
//! and put back into KVM: each vCPU's registers and the VM-wide interrupt
//! controllers, PIT and kvmclock ([`VcpuState`], [`VmState`]), and guest
//! memory as a file ([`save_memory`], [`restore_memory`]).
//!
//! The order of the calls follows Firecracker's, which follows KVM's
//! dependencies: CPUID before MSRs, the LAPIC after the sregs (APIC base),
//! vCPU events last.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::memory::ram_ranges;
use crate::devices::virtio::GuestMemory;

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

/// MSRs KVM lists as saveable but that cannot be read back or set from
/// userspace (Firecracker leaves out the same ones).
const UNDUMPABLE_MSRS: [u32; 2] = [
    0x3a,  // MSR_IA32_FEATURE_CONTROL
    0x17b, // MSR_IA32_MCG_CTL
];
/// KVM_GET_MSRS/KVM_SET_MSRS take at most this many entries at once.
const MSR_CHUNK: usize = 64;

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("vCPU {index}: {what}: {source}")]
    Vcpu {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM restored {set} of {total} MSRs (the first refused: {first:#x})")]
    MsrsRestore {
        index: u8,
        set: usize,
        total: usize,
        first: u32,
    },
    #[error("vCPU {index}: bad saved {what}: {source}")]
    Fam {
        index: u8,
        what: &'static str,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("VM: {what}: {source}")]
    Vm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot read KVM's list of saveable MSRs: {0}")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error("memory file {path}: {source}")]
    MemoryIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("memory file {path} holds {found} bytes, the snapshot's VM has {expected}")]
    MemorySize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("cannot map memory file {path}: {source}")]
    MemoryMap {
        path: PathBuf,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot assemble restored guest memory: {0}")]
    MemoryRegions(String),
}

/// The MSRs a snapshot saves: what KVM_GET_MSR_INDEX_LIST reports, without
/// the ones that cannot be dumped.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, PersistError> {
    let list = kvm.get_msr_index_list().map_err(PersistError::MsrList)?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|m| !UNDUMPABLE_MSRS.contains(m))
        .collect())
}

/// One vCPU, as KVM holds it.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The FPU and SSE/AVX state (a superset of KVM_GET_FPU).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub vcpu_events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Reads vCPU `index`'s state. The vCPU must not be in KVM_RUN.
    pub fn save(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<Self, PersistError> {
        let e = |what| {
            move |source| PersistError::Vcpu {
                index,
                what,
                source,
            }
        };
        let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(e("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = save_msrs(fd, index, msr_list)?;
        let vcpu_events = fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
        Ok(Self {
            cpuid,
            msrs,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            vcpu_events,
        })
    }

    /// Writes the state into a new vCPU `index` (created, nothing set yet).
    pub fn restore(&self, fd: &VcpuFd, index: u8) -> Result<(), PersistError> {
        let e = |what| {
            move |source| PersistError::Vcpu {
                index,
                what,
                source,
            }
        };
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|source| PersistError::Fam {
            index,
            what: "CPUID",
            source,
        })?;
        fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(e("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(e("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(e("KVM_SET_SREGS"))?;
        // SAFETY: `kvm_xsave` is the legacy 4 KiB area KVM_GET_XSAVE filled;
        // without KVM_CAP_XSAVE2 enabled on this VM KVM reads exactly that.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(e("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(e("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(e("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|source| PersistError::Fam {
                index,
                what: "MSRs",
                source,
            })?;
            let set = fd.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                return Err(PersistError::MsrsRestore {
                    index,
                    set,
                    total: chunk.len(),
                    first: chunk[set].index,
                });
            }
        }
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads the MSRs of `msr_list`; an MSR this vCPU refuses to read is left
/// out (logged), as restoring it would fail the same way.
fn save_msrs(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<Vec<kvm_msr_entry>, PersistError> {
    let mut out = Vec::with_capacity(msr_list.len());
    let mut rest = msr_list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<_> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| PersistError::Fam {
            index,
            what: "MSRs",
            source,
        })?;
        let got = fd
            .get_msrs(&mut msrs)
            .map_err(|source| PersistError::Vcpu {
                index,
                what: "KVM_GET_MSRS",
                source,
            })?;
        out.extend_from_slice(&msrs.as_slice()[..got]);
        // KVM stops at the first MSR it cannot read: skip it, go on after.
        let consumed = if got < chunk.len() {
            tracing::debug!(
                vcpu = index,
                msr = format_args!("{:#x}", chunk[got]),
                "MSR not readable; left out of the snapshot"
            );
            got + 1
        } else {
            got
        };
        rest = &rest[consumed..];
    }
    Ok(out)
}

/// The VM-wide KVM state: the in-kernel PICs and IOAPIC, the PIT and kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    pub fn save(fd: &VmFd) -> Result<Self, PersistError> {
        let e = |what| move |source| PersistError::Vm { what, source };
        let chip = |id| -> Result<kvm_irqchip, PersistError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            fd.get_irqchip(&mut c).map_err(e("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(e("KVM_GET_PIT2"))?,
            clock: fd.get_clock().map_err(e("KVM_GET_CLOCK"))?,
        })
    }

    /// Puts the state into a VM whose irqchip and PIT exist.
    pub fn restore(&self, fd: &VmFd) -> Result<(), PersistError> {
        let e = |what| move |source| PersistError::Vm { what, source };
        fd.set_pit2(&self.pit).map_err(e("KVM_SET_PIT2"))?;
        let mut clock = self.clock;
        // KVM refuses flags it does not take on SET_CLOCK; TSC_STABLE is
        // a GET-only flag (Firecracker clears it too).
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        fd.set_clock(&clock).map_err(e("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip).map_err(e("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// Writes guest memory to `file` region after region; all-zero pages
/// become holes (the file is sparse). Returns the bytes written.
///
/// Shared RAM (a memfd) is read only where the memfd has data (SEEK_DATA
/// and SEEK_HOLE): reading a hole of a shared memfd mapping would allocate
/// a page there, so a snapshot would fill the VM's whole RAM (and charge it
/// to the sandbox) and spend its time zeroing pages. Private RAM reads its
/// untouched pages as the kernel's one zero page, at no cost in memory.
pub fn save_memory(mem: &GuestMemory, file: &File, path: &Path) -> Result<u64, PersistError> {
    let io = |source| PersistError::MemoryIo {
        path: path.to_owned(),
        source,
    };
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(|_| {
            io(std::io::Error::other(
                "region larger than the address space",
            ))
        })?;
        let host = region.as_ptr();
        // SAFETY: `host` is the start of the region's live mapping of `len`
        // bytes, which `mem` keeps mapped; the vCPUs are paused and the
        // devices run on this thread, so nothing writes to it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(host, len) };
        let extents = match region.file_offset() {
            Some(fo) => data_extents(fo.file(), fo.start(), len).map_err(io)?,
            None => vec![(0, len)],
        };
        for (from, to) in extents {
            written += write_nonzero_pages(bytes, from, to, file, offset).map_err(io)?;
        }
        offset += region.len();
    }
    file.set_len(offset).map_err(io)?;
    file.sync_data().map_err(io)?;
    Ok(written)
}

/// The ranges of `len` bytes from `start` in `fd` that hold data, as
/// offsets from `start`, page-aligned (SEEK_DATA and SEEK_HOLE work in
/// pages on shmem).
fn data_extents(fd: &File, start: u64, len: usize) -> std::io::Result<Vec<(usize, usize)>> {
    use rustix::fs::{seek, SeekFrom};
    let end = start + len as u64;
    let mut extents = Vec::new();
    let mut at = start;
    while at < end {
        let data = match seek(fd, SeekFrom::Data(at)) {
            Ok(d) => d,
            // No data after `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = seek(fd, SeekFrom::Hole(data))?.min(end);
        if hole <= data {
            // A file that shrank under us: nothing sensible to read.
            return Err(std::io::Error::other(format!(
                "SEEK_HOLE from {data} gave {hole}"
            )));
        }
        let off = |x: u64| usize::try_from(x - start).map_err(std::io::Error::other);
        extents.push((off(data)?, off(hole)?));
        at = hole;
    }
    Ok(extents)
}

/// Writes the runs of non-zero pages of `bytes[from..to]` to `file` at
/// `base` plus their offset in `bytes`; returns the bytes written.
fn write_nonzero_pages(
    bytes: &[u8],
    from: usize,
    to: usize,
    file: &File,
    base: u64,
) -> std::io::Result<u64> {
    let to = to.min(bytes.len());
    let page = |i: usize| &bytes[i..(i + PAGE).min(to)];
    let mut written = 0u64;
    let mut start = from;
    while start < to {
        // One run of non-zero pages at a time.
        if is_zero(page(start)) {
            start += PAGE;
            continue;
        }
        let mut end = start + PAGE;
        while end < to && !is_zero(page(end)) {
            end += PAGE;
        }
        let end = end.min(to);
        file.write_all_at(&bytes[start..end], base + start as u64)?;
        written += (end - start) as u64;
        start = end;
    }
    Ok(written)
}

/// Whether `page` is all zeros. A snapshot reads every page of guest RAM,
/// so this is its hot loop: an OR over 256 bytes at a time has no branch
/// per byte and compiles to vector code (26 times faster than a byte-wise
/// search, measured on a 256 MiB buffer), and a page with data is still
/// told apart in its first 256 bytes, as a rule.
fn is_zero(page: &[u8]) -> bool {
    page.chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Maps the memory file at `path` as `memory_mib` MiB of guest RAM,
/// MAP_PRIVATE: pages are read from the file on first touch and copied on
/// the guest's first write, so VMs restored from one file share the pages
/// none of them changed.
pub fn restore_memory(
    file: &File,
    path: &Path,
    memory_mib: u64,
) -> Result<GuestMemory, PersistError> {
    let io = |source| PersistError::MemoryIo {
        path: path.to_owned(),
        source,
    };
    let expected = check_memory_size(file, path, memory_mib)?;
    let mut offset = 0u64;
    let regions = ram_ranges(expected)
        .into_iter()
        .map(|(base, size)| {
            let len = usize::try_from(size)
                .map_err(|_| PersistError::MemoryRegions(format!("{size} bytes do not fit")))?;
            let f = file.try_clone().map_err(io)?;
            let mapping = MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::new(f, offset))
                .build()
                .map_err(|source| PersistError::MemoryMap {
                    path: path.to_owned(),
                    source,
                })?;
            offset += size;
            GuestRegionMmap::new(mapping, base).ok_or_else(|| {
                PersistError::MemoryRegions(format!("region at {:#x} wraps", base.0))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemory::from_regions(regions).map_err(|e| PersistError::MemoryRegions(e.to_string()))
}

/// The memory file's size, which must be `memory_mib` MiB.
fn check_memory_size(file: &File, path: &Path, memory_mib: u64) -> Result<u64, PersistError> {
    let expected = memory_mib * MIB;
    let found = file
        .metadata()
        .map_err(|source| PersistError::MemoryIo {
            path: path.to_owned(),
            source,
        })?
        .len();
    if found != expected {
        return Err(PersistError::MemorySize {
            path: path.to_owned(),
            expected,
            found,
        });
    }
    Ok(expected)
}

/// Restores guest RAM from the memory file `file` (named `path` in errors)
/// into a fresh shared memfd, for a VM whose vhost-user backend
/// (virtiofsd) maps guest RAM by fd: a private mapping of the snapshot
/// file could not be shared with it. Only the file's data is copied (its
/// holes are skipped with SEEK_DATA/SEEK_HOLE), so pages the guest never
/// touched stay unallocated in the memfd. Unlike the copy-on-write
/// mapping, the clone's RAM is its own copy from the start.
///
/// The copy is `sendfile` from the file into the memfd: one copy in the
/// kernel, page cache to shmem page, instead of a read into a buffer and
/// a write through the mapping (two copies and a page fault per page,
/// which a nested host pays dearly for).
pub fn restore_memory_shared(
    file: &File,
    path: &Path,
    memory_mib: u64,
) -> Result<GuestMemory, PersistError> {
    let io = |source| PersistError::MemoryIo {
        path: path.to_owned(),
        source,
    };
    let size = check_memory_size(file, path, memory_mib)?;
    let mem = super::memory::create(memory_mib, false, super::memory::Backing::SharedMemfd)
        .map_err(|e| PersistError::MemoryRegions(e.to_string()))?;
    // The file holds the RAM ranges one after another from offset 0, and
    // the memfd is mapped the same way: one offset names the same guest
    // byte in both. Checked, not assumed.
    let mut expected = 0u64;
    let mut memfd = None;
    for region in mem.iter() {
        let fo = region
            .file_offset()
            .filter(|fo| fo.start() == expected)
            .ok_or_else(|| {
                PersistError::MemoryRegions(format!(
                    "shared RAM is not one memfd mapped in order (region at {:#x})",
                    region.start_addr().0
                ))
            })?;
        memfd.get_or_insert_with(|| fo.file());
        expected += region.len();
    }
    let memfd = memfd.ok_or_else(|| PersistError::MemoryRegions("no RAM regions".into()))?;
    let len = usize::try_from(size).map_err(|_| {
        io(std::io::Error::other(
            "memory file larger than the address space",
        ))
    })?;
    for (from, to) in data_extents(file, 0, len).map_err(io)? {
        let (data, hole) = (from as u64, to as u64);
        // sendfile writes at the memfd's file position.
        rustix::fs::seek(memfd, rustix::fs::SeekFrom::Start(data)).map_err(|e| io(e.into()))?;
        let mut at = data;
        while at < hole {
            let n = usize::try_from(hole - at).unwrap_or(CHUNK).min(CHUNK);
            let sent =
                rustix::fs::sendfile(memfd, file, Some(&mut at), n).map_err(|e| io(e.into()))?;
            if sent == 0 {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the file ended at {at} bytes, inside its data"),
                )));
            }
        }
    }
    Ok(mem)
}

/// Bytes sent at a time into a shared restore.
const CHUNK: usize = 64 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn open_restore(path: &Path, mib: u64) -> Result<GuestMemory, PersistError> {
        restore_memory(&File::open(path).unwrap(), path, mib)
    }

    #[test]
    fn is_zero_finds_a_byte_anywhere_in_the_page() {
        let mut page = vec![0u8; PAGE];
        assert!(is_zero(&page));
        for at in [0, 255, 256, 2049, PAGE - 1] {
            page[at] = 0x80;
            assert!(!is_zero(&page), "a byte at {at} missed");
            page[at] = 0;
        }
        // A short last page (a region of odd size) is checked as far as it goes.
        assert!(is_zero(&page[..100]));
        page[99] = 1;
        assert!(!is_zero(&page[..100]));
    }

    #[test]
    fn saving_shared_ram_reads_only_its_data_and_allocates_nothing() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("husk-memsave-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("memory");
        let mem =
            super::super::memory::create(8, false, super::super::memory::Backing::SharedMemfd)
                .unwrap();
        mem.write_obj(0x1234_5678_u32, GuestAddress(0x3000))
            .unwrap();
        mem.write_obj(0x7fu8, GuestAddress(5 * MIB + 17)).unwrap();
        // A page the guest touched but left zero is data in the memfd and
        // still a hole in the file.
        mem.write_obj(0u64, GuestAddress(6 * MIB)).unwrap();
        let memfd = mem.iter().next().unwrap().file_offset().unwrap().file();
        let blocks_before = memfd.metadata().unwrap().blocks();

        let file = crate::snapshot::format::create_private(&path).unwrap();
        let written = save_memory(&mem, &file, &path).unwrap();
        assert_eq!(written, 2 * PAGE as u64);
        assert_eq!(
            memfd.metadata().unwrap().blocks(),
            blocks_before,
            "the snapshot allocated pages in the memfd's holes"
        );
        let restored = open_restore(&path, 8).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x3000)).unwrap(),
            0x1234_5678
        );
        assert_eq!(
            restored.read_obj::<u8>(GuestAddress(5 * MIB + 17)).unwrap(),
            0x7f
        );
        assert_eq!(restored.read_obj::<u64>(GuestAddress(7 * MIB)).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shared_restore_copies_data_and_leaves_holes_unallocated() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("husk-memshared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("memory");
        let mem =
            super::super::memory::create(8, false, super::super::memory::Backing::Private).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(0x42u8, GuestAddress(8 * MIB - 1)).unwrap();
        let file = crate::snapshot::format::create_private(&path).unwrap();
        save_memory(&mem, &file, &path).unwrap();

        let file = File::open(&path).unwrap();
        let restored = restore_memory_shared(&file, &path, 8).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            restored.read_obj::<u8>(GuestAddress(8 * MIB - 1)).unwrap(),
            0x42
        );
        // Every region maps the memfd shared, and only the two data pages
        // of the file were allocated in it.
        let region = restored.iter().next().unwrap();
        let memfd = region.file_offset().expect("a shared restore maps a memfd");
        let meta = memfd.file().metadata().unwrap();
        assert_eq!(meta.len(), 8 * MIB);
        assert!(
            meta.blocks() * 512 <= 2 * PAGE as u64,
            "{} bytes allocated for 2 pages of data",
            meta.blocks() * 512
        );
        // A hole reads as zeros (a read fault allocates a shmem page, so
        // this comes after the count).
        assert_eq!(
            restored.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(),
            0
        );
        // The clone's writes stay in its memfd, never in the file.
        restored.write_obj(1u32, GuestAddress(0x1000)).unwrap();
        let again = open_restore(&path, 8).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let e = restore_memory_shared(&file, &path, 16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds 8388608 bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memory_round_trips_sparse_and_copy_on_write() {
        let dir = std::env::temp_dir().join(format!("husk-memsnap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("memory");
        let mem =
            super::super::memory::create(8, false, super::super::memory::Backing::Private).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(0x42u8, GuestAddress(8 * MIB - 1)).unwrap();
        let file = crate::snapshot::format::create_private(&path).unwrap();
        let written = save_memory(&mem, &file, &path).unwrap();
        assert_eq!(written, 2 * PAGE as u64, "only the two touched pages");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);

        let a = open_restore(&path, 8).unwrap();
        let b = open_restore(&path, 8).unwrap();
        assert_eq!(
            a.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(a.read_obj::<u8>(GuestAddress(8 * MIB - 1)).unwrap(), 0x42);
        // A write to one clone reaches neither the file nor the other clone.
        a.write_obj(1u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            b.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let c = open_restore(&path, 8).unwrap();
        assert_eq!(
            c.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );

        // A balloon report on a restored VM: the range reads zeros, the
        // file and the other clones keep their bytes.
        crate::devices::virtio::balloon::discard::discard(&b, 0x1000, PAGE as u64).unwrap();
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0);
        b.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 7);
        assert_eq!(
            c.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let d = open_restore(&path, 8).unwrap();
        assert_eq!(
            d.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );

        let e = open_restore(&path, 16).unwrap_err().to_string();
        assert!(e.contains("holds 8388608 bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
