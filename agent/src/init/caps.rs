//! Capability sets of the container process: the bounding set (dropped by
//! prctl), the effective, permitted and inheritable sets (capset) and the
//! ambient set, as runc applies them.

use std::io;

use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};
use rustix::thread::{CapabilitySet, CapabilitySets};

/// Kernel capability numbers by OCI name (linux/capability.h).
const CAPS: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_LINUX_IMMUTABLE", 9),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_BROADCAST", 11),
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_IPC_LOCK", 14),
    ("CAP_IPC_OWNER", 15),
    ("CAP_SYS_MODULE", 16),
    ("CAP_SYS_RAWIO", 17),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_SYS_PACCT", 20),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_SYS_BOOT", 22),
    ("CAP_SYS_NICE", 23),
    ("CAP_SYS_RESOURCE", 24),
    ("CAP_SYS_TIME", 25),
    ("CAP_SYS_TTY_CONFIG", 26),
    ("CAP_MKNOD", 27),
    ("CAP_LEASE", 28),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_AUDIT_CONTROL", 30),
    ("CAP_SETFCAP", 31),
    ("CAP_MAC_OVERRIDE", 32),
    ("CAP_MAC_ADMIN", 33),
    ("CAP_SYSLOG", 34),
    ("CAP_WAKE_ALARM", 35),
    ("CAP_BLOCK_SUSPEND", 36),
    ("CAP_AUDIT_READ", 37),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
    ("CAP_CHECKPOINT_RESTORE", 40),
];

fn number(cap: &Capability) -> Option<u32> {
    let name = serde_json::to_string(cap).ok()?;
    let name = name.trim_matches('"');
    CAPS.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// A set as the two 32-bit words capset takes; capabilities the kernel
/// does not know (over `last_cap`) are skipped, as runc does.
fn mask(set: Option<&Capabilities>, last_cap: u32) -> u64 {
    set.into_iter()
        .flatten()
        .filter_map(number)
        .filter(|n| *n <= last_cap)
        .fold(0u64, |m, n| m | (1 << n))
}

/// Drops from the bounding set every capability not in it. Needs
/// CAP_SETPCAP, so runs before the user switch.
pub fn drop_bounding(caps: &LinuxCapabilities, last_cap: u32) -> io::Result<()> {
    let last_cap = last_cap.min(63);
    let keep = mask(caps.bounding().as_ref(), last_cap);
    for n in 0..=last_cap {
        if keep & (1 << n) == 0 {
            rustix::thread::remove_capability_from_bounding_set(one(n))?;
        }
    }
    Ok(())
}

/// Capability `n` as a one-capability set (capabilities this crate's
/// rustix does not name yet are still bits of the set).
fn one(n: u32) -> CapabilitySet {
    CapabilitySet::from_bits_retain(1 << n)
}

/// Sets effective, permitted and inheritable, then raises the ambient ones.
pub fn apply(caps: &LinuxCapabilities, last_cap: u32) -> io::Result<()> {
    // A set has 64 bits.
    let last_cap = last_cap.min(63);
    let eff = mask(caps.effective().as_ref(), last_cap);
    let perm = mask(caps.permitted().as_ref(), last_cap);
    let inh = mask(caps.inheritable().as_ref(), last_cap);
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::from_bits_retain(eff),
            permitted: CapabilitySet::from_bits_retain(perm),
            inheritable: CapabilitySet::from_bits_retain(inh),
        },
    )?;
    // The kernel raises an ambient capability only if it is permitted and
    // inheritable; runc ignores the failure for the others (its default
    // spec lists ambient capabilities without inheritable ones), so husk
    // skips them.
    let ambient = mask(caps.ambient().as_ref(), last_cap) & perm & inh;
    for n in 0..=last_cap {
        if ambient & (1 << n) != 0 {
            rustix::thread::configure_capability_in_ambient_set(one(n), true)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_kernel_numbers() {
        assert_eq!(number(&Capability::Chown), Some(0));
        assert_eq!(number(&Capability::SysAdmin), Some(21));
        assert_eq!(number(&Capability::CheckpointRestore), Some(40));
        let set: Capabilities = [Capability::Kill, Capability::NetBindService].into();
        assert_eq!(mask(Some(&set), 40), (1 << 5) | (1 << 10));
        let set: Capabilities = [Capability::CheckpointRestore].into();
        assert_eq!(mask(Some(&set), 39), 0, "unknown to this kernel");
    }
}
