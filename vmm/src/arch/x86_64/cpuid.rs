//! The CPUID a vCPU presents: KVM's supported set, with each vCPU's APIC id,
//! the package topology (every vCPU a core of one package, no SMT; leaves
//! 1, 4, 0xb and 0x1f, plus 0x80000008, 0x8000001d and 0x8000001e on AMD),
//! the hypervisor bit and the KVM signature leaf.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 EBX: initial APIC id (31:24), logical processor count (23:16),
/// CLFLUSH line size in 8-byte units (15:8).
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
const LEAF1_EBX_CPU_COUNT_SHIFT: u32 = 16;
const LEAF1_EBX_CLFLUSH_SHIFT: u32 = 8;
const LEAF1_EBX_CLFLUSH_LINE: u32 = 8; // 64 bytes
/// Leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX bit 24: the local APIC's TSC deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX bit 28: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 4 EAX: cores per package - 1 (31:26), logical processors sharing
/// the cache - 1 (25:14), cache level (7:5).
const LEAF4_EAX_CORES_SHIFT: u32 = 26;
const LEAF4_EAX_SHARING_SHIFT: u32 = 14;
const LEAF4_EAX_KEEP_MASK: u32 = (1 << 14) - 1;
/// Leaf 0xb ECX level types.
const LEAFB_LEVEL_SMT: u32 = 1;
const LEAFB_LEVEL_CORE: u32 = 2;
/// The KVM signature leaf: "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// "AuthenticAMD" in leaf 0 EBX, EDX, ECX.
const AMD_SIGNATURE: [u32; 3] = [0x6874_7541, 0x6974_6e65, 0x444d_4163];
/// AMD leaf 0x80000008 ECX: core count - 1 (7:0), APIC id core bits (15:12).
const AMD_SIZE_LEAF: u32 = 0x8000_0008;
const AMD_CACHE_LEAF: u32 = 0x8000_001d;
const AMD_TOPOLOGY_LEAF: u32 = 0x8000_001e;

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .any(|e| e.function == 0 && [e.ebx, e.edx, e.ecx] == AMD_SIGNATURE)
}

/// Leaf 4 / 0x8000001d EAX with the cache's sharing set to `count` vCPUs
/// for L3 and one for L1/L2, and (leaf 4 only) the core count.
fn cache_eax(eax: u32, count: u32, with_cores: bool) -> u32 {
    let level = (eax >> 5) & 0x7;
    let sharing = if level >= 3 { count - 1 } else { 0 };
    let cores = if with_cores {
        (count - 1) << LEAF4_EAX_CORES_SHIFT
    } else {
        eax & !(u32::MAX >> 6)
    };
    (eax & LEAF4_EAX_KEEP_MASK) | cores | (sharing << LEAF4_EAX_SHARING_SHIFT)
}

/// Offers the TSC deadline timer (leaf 1 ECX bit 24). KVM's supported
/// CPUID never has it, since it depends on the in-kernel local APIC; KVM
/// says it can with `KVM_CAP_TSC_DEADLINE_TIMER`, and then the VMM sets
/// it. Without it Linux calibrates the APIC timer against the PIT at boot
/// and programs it through one-shot counts.
pub fn offer_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// Adjusts KVM's supported CPUID entries for vCPU `cpu_index` of `cpu_count`.
pub fn adjust(entries: &mut [kvm_cpuid_entry2], cpu_index: u8, cpu_count: u8) {
    let apic_id = u32::from(cpu_index);
    let count = u32::from(cpu_count);
    // Bits of the x2APIC id that number the cores of the package.
    let core_bits = u32::BITS - (count - 1).leading_zeros();
    let amd = is_amd(entries);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (apic_id << LEAF1_EBX_APIC_ID_SHIFT)
                    | (count << LEAF1_EBX_CPU_COUNT_SHIFT)
                    | (LEAF1_EBX_CLFLUSH_LINE << LEAF1_EBX_CLFLUSH_SHIFT);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            // L1 and L2 are per core; L3 is shared by the package.
            4 => e.eax = cache_eax(e.eax, count, true),
            AMD_CACHE_LEAF if amd => e.eax = cache_eax(e.eax, count, false),
            AMD_SIZE_LEAF if amd => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            AMD_TOPOLOGY_LEAF if amd => {
                // Extended APIC id; core id = APIC id, one thread per core;
                // node 0 of a one-node package.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            // Extended topology; 0x1f (V2) has the same layout for these levels.
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    // SMT level: one thread per core.
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEAFB_LEVEL_SMT << 8) | e.index;
                    }
                    // Core level: all vCPUs.
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEAFB_LEVEL_CORE << 8) | e.index;
                    }
                    // No further levels.
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            KVM_SIGNATURE_LEAF => {
                e.eax = KVM_FEATURES_LEAF;
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_deadline_is_offered_in_leaf_1_only() {
        let mut e = [entry(1, 0), entry(7, 0)];
        offer_tsc_deadline(&mut e);
        assert_eq!(e[0].ecx, LEAF1_ECX_TSC_DEADLINE);
        assert_eq!(e[1].ecx, 0);
    }

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    fn find(e: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *e.iter()
            .find(|x| x.function == function && x.index == index)
            .unwrap()
    }

    fn adjusted(cpu: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
        let mut l3 = entry(4, 3);
        l3.eax = (3 << 5) | 0x3; // level 3, unified cache
        let mut l1 = entry(4, 0);
        l1.eax = (1 << 5) | 0x1;
        let mut e = vec![
            entry(1, 0),
            l1,
            l3,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(KVM_SIGNATURE_LEAF, 0),
        ];
        adjust(&mut e, cpu, count);
        e
    }

    #[test]
    fn leaf1_apic_id_count_and_hypervisor_bit() {
        let e = adjusted(3, 4);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!((l1.ebx >> 8) & 0xff, 8);
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_ne!(l1.edx & (1 << 28), 0);
        let single = find(&adjusted(0, 1), 1, 0);
        assert_eq!(single.edx & (1 << 28), 0);
        assert_eq!(single.ebx >> 16, 1);
    }

    #[test]
    fn leaf4_topology() {
        let e = adjusted(1, 4);
        let l1 = find(&e, 4, 0);
        assert_eq!(l1.eax >> 26, 3);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!(l1.eax & 0x3fff, (1 << 5) | 1);
        let l3 = find(&e, 4, 3);
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn leaf_b_levels() {
        let e = adjusted(5, 6);
        let smt = find(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        let core = find(&e, 0xb, 1);
        // 6 vCPUs need 3 bits of APIC id.
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let end = find(&e, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 5));
        assert_eq!(find(&adjusted(0, 1), 0xb, 1).eax, 0);
        assert_eq!(find(&adjusted(0, 2), 0xb, 1).eax, 1);
        assert_eq!(find(&adjusted(0, 64), 0xb, 1).eax, 6);
    }

    #[test]
    fn leaf_1f_matches_leaf_b() {
        let mut e = vec![entry(0x1f, 0), entry(0x1f, 1), entry(0xb, 1)];
        adjust(&mut e, 2, 4);
        let (b, v2) = (find(&e, 0xb, 1), find(&e, 0x1f, 1));
        assert_eq!(
            (v2.eax, v2.ebx, v2.ecx, v2.edx),
            (b.eax, b.ebx, b.ecx, b.edx)
        );
        assert_eq!((v2.eax, v2.ebx, v2.edx), (2, 4, 2));
        assert_eq!(find(&e, 0x1f, 0).ebx, 1);
    }

    #[test]
    fn amd_topology_leaves() {
        let mut leaf0 = entry(0, 0);
        [leaf0.ebx, leaf0.edx, leaf0.ecx] = AMD_SIGNATURE;
        let mut l3 = entry(AMD_CACHE_LEAF, 3);
        l3.eax = (3 << 5) | 3;
        let mut size = entry(AMD_SIZE_LEAF, 0);
        size.ecx = 0x0000_f0ff;
        let mut e = vec![leaf0, l3, size, entry(AMD_TOPOLOGY_LEAF, 0)];
        adjust(&mut e, 3, 4);
        assert_eq!(find(&e, AMD_SIZE_LEAF, 0).ecx, (2 << 12) | 3);
        let l3 = find(&e, AMD_CACHE_LEAF, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax & 0x3fff, (3 << 5) | 3);
        let topo = find(&e, AMD_TOPOLOGY_LEAF, 0);
        assert_eq!((topo.eax, topo.ebx, topo.ecx), (3, 3, 0));

        // The same leaves are left alone on other vendors.
        let mut intel = vec![entry(AMD_SIZE_LEAF, 0)];
        adjust(&mut intel, 1, 2);
        assert_eq!(intel[0].ecx, 0);
    }

    #[test]
    fn kvm_signature() {
        let s = find(&adjusted(0, 1), KVM_SIGNATURE_LEAF, 0);
        let mut sig = Vec::new();
        for r in [s.ebx, s.ecx, s.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert_eq!(s.eax, 0x4000_0001);
    }
}
