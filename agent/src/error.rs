//! The error of the agent's operations (`agent`, `sandbox`) and its
//! `Result`: what `service` maps to ttrpc status codes. A module of its own
//! so that the operations' modules import it, not each other.

use crate::cgroup::CgroupError;
use crate::container::SpawnError;
use crate::entropy::EntropyError;
use crate::network::NetError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    State(String),
    /// The sandbox was not set up to allow it (ExecGuest without
    /// debug_console).
    #[error("permission denied: {0}")]
    Denied(String),
    /// A bound is reached (ExecGuest's concurrent processes).
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    Spawn(#[from] SpawnError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("network: {0}")]
    Network(#[from] NetError),
    #[error("{0}")]
    Entropy(#[from] EntropyError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// Turns an I/O error into `AgentError::Io` saying what was being done.
pub fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let context = context.into();
    move |source| AgentError::Io { context, source }
}

pub fn invalid(e: impl std::fmt::Display) -> AgentError {
    AgentError::Invalid(e.to_string())
}
