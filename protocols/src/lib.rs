//! What `husk-agent` and `containerd-shim-husk-v2` agree on: the messages
//! and the ttrpc service of `protos/agent.proto` (see there for what each
//! call does), compiled by build.rs, the constants of the guest's layout
//! ([`guest`]) and the meaning of mount options ([`mount`]), and how guest text is made safe
//! to print ([`text`]). Also the one
//! message containerd sends the shim that its crates lack
//! ([`runtimeoptions`]).

/// The messages (`husk.agent.v1`).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unused_results,
    unused_mut,
    non_camel_case_types,
    non_upper_case_globals,
    unsafe_code
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// The ttrpc client (`AgentServiceClient`) and server side
/// (`AgentService` trait, `create_agent_service`).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unused_imports,
    unused_results,
    non_camel_case_types
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// The runtime options containerd's CRI plugin sends the shim
/// (`runtimeoptions.v1.Options`).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unused_results,
    unused_mut,
    non_upper_case_globals
)]
pub mod runtimeoptions {
    include!(concat!(env!("OUT_DIR"), "/runtimeoptions.rs"));
}

pub mod guest;
pub mod mount;
pub mod text;

pub use protobuf;
pub use ttrpc;
