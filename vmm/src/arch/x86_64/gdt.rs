//! The boot GDT: descriptor encoding and the matching KVM segment registers.

use kvm_bindings::kvm_segment;

/// Encodes a segment descriptor from its access/flags word (access byte in
/// bits 7:0, flags nibble in bits 15:12), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The `width`-bit field of `entry` at `shift`; callers ask for at most
/// 4 bits.
// The mask keeps `width` (<= 8) bits, so the value fits a u8.
#[allow(clippy::cast_possible_truncation)]
fn bits(entry: u64, shift: u32, width: u32) -> u8 {
    debug_assert!(width <= 8);
    ((entry >> shift) & ((1 << width) - 1)) as u8
}

/// The KVM segment register that loading `entry` (at GDT index `index`) gives.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff);
    // The descriptor's limit is 20 bits (masked here), so it fits a u32.
    #[allow(clippy::cast_possible_truncation)]
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let g = bits(entry, 55, 1);
    let present = bits(entry, 47, 1);
    kvm_segment {
        base,
        // With G set the limit counts 4 KiB pages.
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: bits(entry, 40, 4),
        present,
        dpl: bits(entry, 45, 2),
        db: bits(entry, 54, 1),
        s: bits(entry, 44, 1),
        l: bits(entry, 53, 1),
        g,
        avl: bits(entry, 52, 1),
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// GDT indices of the boot segments.
pub const CODE_INDEX: u8 = 1;
pub const DATA_INDEX: u8 = 2;
pub const TSS_INDEX: u8 = 3;

/// GDT for the 64-bit boot protocol: long-mode code, flat data, a TSS.
pub const GDT_64: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT for the PVH entry: flat 32-bit code and data, a TSS of limit 0x67
/// (as the PVH ABI requires).
pub const GDT_PVH: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_descriptors() {
        assert_eq!(GDT_64[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_64[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT_PVH[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(
            gdt_entry(0x808b, 0x1234_5678, 0xabcde),
            0x128a_8b34_5678_bcde
        );
    }

    #[test]
    fn segments_round_trip() {
        let code = kvm_segment_from_gdt(GDT_64[1], CODE_INDEX);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.present),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = kvm_segment_from_gdt(GDT_PVH[2], DATA_INDEX);
        assert_eq!(
            (data.selector, data.type_, data.db, data.s, data.g),
            (16, 3, 1, 1, 1)
        );
        let tss = kvm_segment_from_gdt(GDT_PVH[3], TSS_INDEX);
        assert_eq!((tss.limit, tss.g, tss.type_, tss.s), (0x67, 0, 0xb, 0));
        let b = kvm_segment_from_gdt(gdt_entry(0x808b, 0x1234_5678, 0xabcde), 0);
        assert_eq!(b.base, 0x1234_5678);
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
