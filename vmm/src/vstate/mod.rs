//! KVM state of a VM: guest memory, the VM file descriptor and its vCPUs.

pub mod exit_stats;
pub mod memory;
pub mod persist;
pub mod vcpu;
pub mod vm;
