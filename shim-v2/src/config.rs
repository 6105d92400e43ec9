//! The husk runtime configuration: `husk_runtime_config::config`, shared
//! with the `husk` command (configs/configuration.toml documents every key).

pub use husk_runtime_config::config::*;
