//! What the husk shim and the `husk` command share about a node: the
//! runtime configuration (`config`), the state folder each sandbox keeps
//! (`state`), the metrics file the shim publishes there (`metrics`), and
//! the ELF check a jailed VMM must pass (`elf`).

pub mod config;
pub mod elf;
pub mod metrics;
pub mod state;

pub use config::{Config, ConfigError, JailUser};
