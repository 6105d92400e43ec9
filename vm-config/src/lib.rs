//! What husk's VMM is told, shared by `husk-vmm` and the shim so that the
//! seam between the two processes is a type, not a string.
//!
//! - [`spec`]: the VM description (`vm.json`) as written: the shim builds a
//!   [`VmSpec`] and serializes it, the VMM parses it.
//! - [`VmConfig`]: a [`VmSpec`] validated; the only form the VMM builds from.
//! - [`limits`]: the bounds both sides check against (vCPUs, memory, device
//!   counts, name lengths).
//! - [`control`]: the control socket's requests and replies;
//!   [`control_client`] sends one and reads the reply.
//! - [`vsock`]: the host end of the VMM's hybrid vsock socket (`CONNECT
//!   <port>`), how the shim and `husk exec` reach the guest's agent.

pub mod control;
pub mod control_client;
pub mod limits;
pub mod spec;
mod validate;
pub mod vsock;

pub use spec::{
    BalloonSpec, BlockSpec, FsSpec, KernelSpec, LogSpec, NetSpec, RateLimiterSpec, SerialKind,
    SerialSpec, TokenBucketSpec, VmSpec, VsockSpec,
};
pub use validate::{
    BalloonConfig, BlockConfig, ConfigError, ConsoleLimits, FsConfig, KernelConfig, LogLimits,
    NetConfig, RateLimiterConfig, SerialOutput, TokenBucketConfig, VmConfig, VsockConfig,
};
