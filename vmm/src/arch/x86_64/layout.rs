//! Guest physical addresses the VMM and the guest agree on.
//!
//! Low memory (below 1 MiB) holds the boot structures; the kernel loads at
//! 1 MiB; RAM runs up to the MMIO gap at 3 GiB and continues above 4 GiB.

/// GDT and IDT for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, then its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const MODLIST_START: u64 = 0x6040;
pub const MEMMAP_START: u64 = 0x7000;
/// Most memory map entries the PVH memmap area holds (its page, 24 bytes each).
pub const MEMMAP_MAX_ENTRIES: usize = 0x1000 / 24;
/// The Linux zero page (`boot_params`) for the 64-bit boot protocol. It
/// shares the page with the PVH memmap: a boot uses one protocol or the other.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU (64-bit boot protocol).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the first 1 GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line, NUL included (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The extended BIOS data area; RAM below it is usable, the MP table lives in it.
pub const EBDA_START: u64 = 0x9fc00;
pub const MPTABLE_START: u64 = EBDA_START;
/// End of the area the MP table may use (the legacy BIOS hole ends at 1 MiB).
pub const MPTABLE_LIMIT: u64 = HIMEM_START;
/// Where the kernel loads, and the start of "high" memory.
pub const HIMEM_START: u64 = 0x10_0000;

/// The MMIO gap below 4 GiB: no RAM here, devices only.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// Virtio-mmio devices, 4 KiB each from here upward.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IRQ (GSI) for virtio-mmio devices; the IOAPIC has pins up to 23.
pub const VIRTIO_IRQ_START: u32 = 5;
pub const IRQ_MAX: u32 = 23;
/// KVM's TSS (three pages) and identity-map page (one page), in the gap.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// The IOAPIC and local APIC register pages.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// Legacy PIO devices and their IRQs.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
pub const I8042_IRQ: u32 = 1;
