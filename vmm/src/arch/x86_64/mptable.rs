//! The Intel MultiProcessor table (MP spec 1.4), written by hand, so a guest
//! without ACPI finds every vCPU, the IOAPIC and the ISA interrupt routing.
//!
//! The floating pointer sits at the start of the EBDA, where Linux scans for
//! it; the configuration table follows it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{APIC_START, IOAPIC_START, IRQ_MAX, MPTABLE_LIMIT, MPTABLE_START};
use crate::devices::virtio::GuestMemory;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV: u8 = 4;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 signature and the FPU + APIC feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conforms to the bus" (edge, active high on ISA).
const INT_FLAGS_DEFAULT: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ALL_LAPICS: u8 = 0xff;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("MP table for {cpus} vCPUs is {size} bytes, {room} fit")]
    TooLarge { cpus: u8, size: usize, room: u64 },
    #[error("a VM needs at least one vCPU")]
    NoCpus,
    #[error("MP table base {0:#x} is not a 32-bit address")]
    BaseTooHigh(u64),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[from] GuestMemoryError),
}

/// The IOAPIC's id: the first one after the vCPUs' local APICs.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

// The MP table holds 32-bit physical addresses; the APICs sit below 4 GiB.
const _: () = assert!(IOAPIC_START >> 32 == 0 && APIC_START >> 32 == 0);
/// [`IOAPIC_START`] as the table's 32-bit address (checked above).
#[allow(clippy::cast_possible_truncation)]
const IOAPIC_ADDR: u32 = IOAPIC_START as u32;
/// [`APIC_START`] as the table's 32-bit address (checked above).
#[allow(clippy::cast_possible_truncation)]
const APIC_ADDR: u32 = APIC_START as u32;
// IOAPIC pin numbers are bytes in the table.
const _: () = assert!(IRQ_MAX <= 0xff);
/// [`IRQ_MAX`] as a table byte (checked above).
#[allow(clippy::cast_possible_truncation)]
const IRQ_MAX_U8: u8 = IRQ_MAX as u8;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `num_cpus`
/// vCPUs, as placed at guest address `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    let ioapic = ioapic_id(num_cpus);
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu); // local APIC id
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    // ISA IRQ n arrives on IOAPIC pin n; KVM's default GSI routing matches.
    for irq in 0..=IRQ_MAX_U8 {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&INT_FLAGS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic, irq]);
    }
    for (kind, dest, lint) in [(INT_TYPE_EXTINT, 0, 0), (INT_TYPE_NMI, ALL_LAPICS, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&INT_FLAGS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, dest, lint]);
    }
    let entry_count = u16::from(num_cpus) + 1 + 1 + (u16::from(IRQ_MAX_U8) + 1) + 2;

    let table_len = HEADER_LEN + entries.len();
    // At most 255 vCPUs of 20 bytes each: always far below 64 KiB.
    let table_len_u16 = u16::try_from(table_len).map_err(|_| MptableError::TooLarge {
        cpus: num_cpus,
        size: table_len,
        room: u16::MAX.into(),
    })?;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len_u16.to_le_bytes());
    header.push(SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"HUSK    ");
    header.extend_from_slice(b"HUSK-VMM    ");
    header.extend_from_slice(&[0; 4]); // OEM table pointer
    header.extend_from_slice(&[0; 2]); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);

    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    let table_addr = base
        .checked_add(FLOATING_POINTER_LEN as u64)
        .and_then(|a| u32::try_from(a).ok())
        .ok_or(MptableError::BaseTooHigh(base))?;
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte paragraphs
    fp.push(SPEC_REV);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemory, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    let room = MPTABLE_LIMIT - MPTABLE_START;
    if bytes.len() as u64 > room {
        return Err(MptableError::TooLarge {
            cpus: num_cpus,
            size: bytes.len(),
            room,
        });
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    #[test]
    fn floating_pointer_and_checksums() {
        let t = build(2, MPTABLE_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(u64::from(u32_at(&t, 4)), MPTABLE_START + 16);
        assert_eq!((t[8], t[9], t[11]), (1, 4, 0));
        assert_eq!(sum(&t[..16]), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        assert_eq!(u16_at(table, 4) as usize, table.len());
        assert_eq!(sum(table), 0);
        assert_eq!(u32_at(table, 36), 0xfee0_0000);
        // 2 CPUs, bus, IOAPIC, 24 IRQ routes, 2 local interrupts.
        assert_eq!(u16_at(table, 34), 30);
        assert_eq!(table.len(), 44 + 2 * 20 + 8 + 8 + 24 * 8 + 2 * 8);
    }

    #[test]
    fn entries_describe_cpus_ioapic_and_routes() {
        let t = build(3, MPTABLE_START).unwrap();
        let e = &t[16 + 44..];
        for cpu in 0..3u8 {
            let at = usize::from(cpu) * 20;
            let p = &e[at..at + 20];
            assert_eq!((p[0], p[1], p[2]), (0, cpu, 0x14));
            assert_eq!(p[3], if cpu == 0 { 3 } else { 1 });
        }
        let rest = &e[60..];
        assert_eq!(&rest[0..8], b"\x01\x00ISA   ");
        assert_eq!(&rest[8..12], &[2, 3, 0x11, 1]);
        assert_eq!(u32_at(rest, 12), 0xfec0_0000);
        let irq4 = &rest[16 + 4 * 8..16 + 5 * 8];
        assert_eq!(irq4, &[3, 0, 0, 0, 0, 4, 3, 4]);
        let lint = &rest[16 + 24 * 8..];
        assert_eq!(lint, &[4, 3, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0, 0xff, 1]);
    }

    #[test]
    fn written_to_guest_memory_for_max_cpus() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        setup_mptable(&mem, 64).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
        let len = build(64, MPTABLE_START).unwrap().len();
        let mut bytes = vec![0u8; len];
        mem.read_slice(&mut bytes, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(sum(&bytes[16..]), 0);
        assert!(matches!(build(0, 0), Err(MptableError::NoCpus)));
    }
}
