//! The shim's client of the VMM's control socket: `husk_vm_config`'s,
//! shared with the `husk` command.

pub use husk_vm_config::control_client::*;
