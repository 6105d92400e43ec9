//! Boot register state: general registers, segment/control registers and
//! the FPU, for the 64-bit Linux boot protocol and for the PVH 32-bit entry.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::gdt::{kvm_segment_from_gdt, CODE_INDEX, DATA_INDEX, GDT_64, GDT_PVH, TSS_INDEX};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PVH_INFO_START, ZERO_PAGE_START,
};
use super::paging::setup_identity_map;
use super::BootProtocol;
use crate::devices::virtio::GuestMemory;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// RFLAGS bit 1 is reserved and always set; IF and VM clear.
const RFLAGS_RESERVED: u64 = 0x2;

/// The general registers at the kernel entry point.
pub fn boot_regs(entry: u64, protocol: BootProtocol) -> kvm_regs {
    match protocol {
        BootProtocol::Linux64 => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            // The 64-bit boot protocol passes the zero page in RSI.
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootProtocol::Pvh => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            // The PVH ABI passes hvm_start_info in EBX.
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// Writes the boot GDT (and an empty IDT) to guest memory, plus the page
/// tables for a 64-bit boot, and sets the segment and control registers in
/// `sregs` (which should come from KVM_GET_SREGS).
pub fn setup_sregs(
    mem: &GuestMemory,
    protocol: BootProtocol,
    sregs: &mut kvm_sregs,
) -> Result<(), GuestMemoryError> {
    let gdt = match protocol {
        BootProtocol::Linux64 => GDT_64,
        BootProtocol::Pvh => GDT_PVH,
    };
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    sregs.gdt.base = BOOT_GDT_START;
    // The GDT is four 8-byte entries: its limit is 31.
    #[allow(clippy::cast_possible_truncation)]
    let gdt_limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.gdt.limit = gdt_limit;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = kvm_segment_from_gdt(gdt[CODE_INDEX as usize], CODE_INDEX);
    let data = kvm_segment_from_gdt(gdt[DATA_INDEX as usize], DATA_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from_gdt(gdt[TSS_INDEX as usize], TSS_INDEX);

    match protocol {
        BootProtocol::Linux64 => {
            sregs.cr3 = setup_identity_map(mem)?;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            // Protected mode without paging, as the PVH ABI prescribes.
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// The FPU state at boot: the x87 default control word and SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn linux64_regs_and_sregs() {
        let r = boot_regs(0x100_0000, BootProtocol::Linux64);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 2)
        );
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, BootProtocol::Linux64, &mut s).unwrap();
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(s.cr4 & 0x20, 0x20);
        assert_eq!(s.efer & 0x500, 0x500);
        assert_eq!(
            (s.cs.selector, s.cs.l, s.ds.selector, s.tr.selector),
            (8, 1, 16, 24)
        );
        assert_eq!(s.gdt.limit, 31);
        let code: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, GDT_64[1]);
    }

    #[test]
    fn pvh_regs_and_sregs() {
        let r = boot_regs(0x100_0100, BootProtocol::Pvh);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0100, PVH_INFO_START, 2));
        let m = mem();
        let mut s = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        setup_sregs(&m, BootProtocol::Pvh, &mut s).unwrap();
        assert_eq!((s.cr0, s.cr4, s.efer), (X86_CR0_PE | X86_CR0_ET, 0, 0));
        assert_eq!((s.cs.db, s.cs.l, s.cs.limit), (1, 0, 0xffff_ffff));
        assert_eq!((s.tr.limit, s.tr.type_), (0x67, 0xb));
        let tss: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 24)).unwrap();
        assert_eq!(tss, GDT_PVH[3]);
    }

    #[test]
    fn fpu_defaults() {
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }
}
