//! The task service's error, and the ttrpc status code containerd gets for
//! each kind.

use containerd_shim::protos::ttrpc::{self, Code};

use crate::agent::AgentError;
use crate::config::ConfigError;
use crate::rootfs::RootfsError;
use crate::sandbox::SandboxError;
use crate::sizing::SizingError;
use crate::spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0} is not supported by husk")]
    Unsupported(&'static str),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("container root file system: {0}")]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Sizing(#[from] SizingError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("container stdio: {0}")]
    Io(#[from] crate::io::IoError),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, ServiceError>;

impl ServiceError {
    pub fn code(&self) -> Code {
        match self {
            ServiceError::NotFound(_) => Code::NOT_FOUND,
            ServiceError::Exists(_) => Code::ALREADY_EXISTS,
            ServiceError::Invalid(_) | ServiceError::Spec(_) => Code::INVALID_ARGUMENT,
            ServiceError::Precondition(_) | ServiceError::Config(_) => Code::FAILED_PRECONDITION,
            ServiceError::Unsupported(_) => Code::UNIMPLEMENTED,
            ServiceError::Sizing(SizingError::DoesNotFit { .. }) => Code::RESOURCE_EXHAUSTED,
            ServiceError::Sizing(_) => Code::INVALID_ARGUMENT,
            ServiceError::Agent(e) => match e.code() {
                Some(
                    c @ (Code::NOT_FOUND
                    | Code::ALREADY_EXISTS
                    | Code::INVALID_ARGUMENT
                    | Code::FAILED_PRECONDITION),
                ) => c,
                Some(_) => Code::INTERNAL,
                None => Code::UNAVAILABLE,
            },
            ServiceError::Rootfs(_)
            | ServiceError::Sandbox(_)
            | ServiceError::Io(_)
            | ServiceError::Internal(_) => Code::INTERNAL,
        }
    }
}

impl From<ServiceError> for ttrpc::Error {
    fn from(e: ServiceError) -> ttrpc::Error {
        // containerd asks about processes that are gone as a matter of
        // course: not worth a warning.
        if e.code() == Code::NOT_FOUND {
            log::debug!("{e}");
        } else {
            log::warn!("{e}");
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes() {
        assert_eq!(ServiceError::NotFound("x".into()).code(), Code::NOT_FOUND);
        assert_eq!(
            ServiceError::Unsupported("checkpoint").code(),
            Code::UNIMPLEMENTED
        );
        let e: ttrpc::Error = ServiceError::Exists("container \"a\"".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::ALREADY_EXISTS);
                assert_eq!(s.message(), "container \"a\" already exists");
            }
            other => panic!("{other:?}"),
        }
    }
}
