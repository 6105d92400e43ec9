//! Local APIC set-up: LINT0 delivers the PIC's interrupts (ExtINT) and
//! LINT1 delivers NMIs, as firmware would leave them.

use kvm_bindings::kvm_lapic_state;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    // The register page is `c_char` (i8 here): reinterpret each byte's bits.
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i].to_ne_bytes()[0]);
    u32::from_le_bytes(bytes)
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = std::ffi::c_char::from_ne_bytes([b]);
    }
}

/// Replaces the delivery mode (bits 10:8) of an LVT entry.
fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 as ExtINT and LINT1 as NMI in `lapic` (from KVM_GET_LAPIC).
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes() {
        let mut l = kvm_lapic_state::default();
        // Masked (bit 16) with a stale fixed mode: the mask bit must survive.
        set_reg(&mut l, APIC_LVT0, 0x1_0000);
        set_reg(&mut l, APIC_LVT1, 0x1_0300);
        set_lint(&mut l);
        assert_eq!(get_reg(&l, APIC_LVT0), 0x1_0700);
        assert_eq!(get_reg(&l, APIC_LVT1), 0x1_0400);
        assert_eq!(l.regs[APIC_LVT0 + 1].to_ne_bytes(), [0x07]);
    }
}
