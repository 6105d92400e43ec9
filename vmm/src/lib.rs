//! husk-vmm: a KVM micro-VM monitor on the rust-vmm crates.
//!
//! Configuration flows one way: a VM description (`husk_vm_config`, the
//! crate the shim shares) is validated, the [`builder`] turns it into guest
//! memory, vCPUs and devices, and the running VM ([`vmm`]) serves them until the guest resets or the control
//! socket ([`control`]) asks it to stop. The [`loader`] places the kernel,
//! initrd and command line; [`arch`] and [`vstate`] hold the x86-64 and KVM
//! specifics. [`seccomp`] confines each thread to the system calls it needs
//! while the guest runs; [`logger`] bounds what the guest can make the VMM write.

pub mod arch;
pub mod builder;
pub mod control;
pub mod devices;
pub mod loader;
pub mod logger;
pub mod rate_limiter;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod vmm;
pub mod vstate;
