//! A minimal client of a shim's task API, for end-to-end checks of calls
//! `ctr` (containerd 1.6) has no command for:
//!
//!   shim-client unix:///run/containerd/s/HASH update ID MEMORY_LIMIT_BYTES
//!
//! sends UpdateTaskRequest with an OCI LinuxResources (JSON, as containerd
//! sends it) that sets memory.limit.

use anyhow::{bail, Context};
use containerd_shim::protos::api::UpdateTaskRequest;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::shim::shim_ttrpc::TaskClient;
use containerd_shim::protos::ttrpc::{context, Client};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 || args[2] != "update" {
        bail!("usage: shim-client ADDRESS update ID MEMORY_LIMIT_BYTES");
    }
    let limit: i64 = args[4].parse().context("MEMORY_LIMIT_BYTES")?;
    let client = TaskClient::new(Client::connect(&args[1]).context("connecting")?);
    let mut any = Any::new();
    any.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into();
    any.value = serde_json::to_vec(&serde_json::json!({ "memory": { "limit": limit } }))?;
    let req = UpdateTaskRequest {
        id: args[3].clone(),
        resources: Some(any).into(),
        ..Default::default()
    };
    client
        .update(context::with_timeout(30_000_000_000), &req)
        .context("Update")?;
    println!("updated");
    Ok(())
}
