//! x86-64 guest set-up: the address layout, CPUID, MSRs, registers, page
//! tables, the MP table, the local APIC and the boot protocols.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// 64-bit entry with paging on and the zero page in RSI (bzImage, or an
    /// ELF kernel without a PVH note).
    Linux64,
    /// 32-bit protected-mode PVH entry with `hvm_start_info` in EBX.
    Pvh,
}
