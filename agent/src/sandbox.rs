//! The sandbox (pod) level set-up from CreateSandbox: hostname, the pod's
//! network (`network`), guest sysctls and the clock. As an ordinary process
//! (host tests) the agent has its own UTS namespace, so the hostname is set
//! there; the clock and sysctls belong to the host then and are only
//! validated, as is the network unless a test gave the agent a network
//! namespace of its own.

use std::fs;
use std::path::Path;

use husk_protocols::agent::CreateSandboxRequest;

use crate::error::{invalid, io_ctx, Result};
use crate::{network, validate};

/// Longest hostname the kernel takes (HOST_NAME_MAX).
const HOSTNAME_MAX: usize = 64;

pub fn setup(req: &CreateSandboxRequest, pid1: bool) -> Result<()> {
    if req.hostname.len() > HOSTNAME_MAX {
        return Err(invalid(format!("hostname is over {HOSTNAME_MAX} bytes")));
    }
    if req
        .hostname
        .bytes()
        .any(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
    {
        return Err(invalid(format!("hostname {:?} is malformed", req.hostname)));
    }
    for k in req.sysctls.keys() {
        validate::sysctl_key(k).map_err(invalid)?;
        let path = Path::new("/proc/sys").join(k.replace('.', "/"));
        if !path.exists() {
            return Err(invalid(format!("sysctl {k} does not exist in this kernel")));
        }
    }
    if req.clock_unix_nanos < 0 {
        return Err(invalid("clock_unix_nanos is negative"));
    }
    let net = network::plan(req).map_err(invalid)?;
    if !req.hostname.is_empty() {
        crate::sys::sethostname(&req.hostname).map_err(io_ctx("sethostname"))?;
    }
    // Before the sysctls, which may name the interfaces.
    if network::owns_netns(pid1) {
        network::configure(&net)?;
    } else {
        crate::log!("in the host's network namespace: leaving the network alone");
    }
    if !pid1 {
        crate::log!("not PID 1: leaving the host's clock and sysctls alone");
        return Ok(());
    }
    for (k, v) in &req.sysctls {
        let path = Path::new("/proc/sys").join(k.replace('.', "/"));
        fs::write(&path, v).map_err(io_ctx(format!("sysctl {k}")))?;
    }
    if req.clock_unix_nanos > 0 {
        let ts = rustix::time::Timespec {
            tv_sec: req.clock_unix_nanos / 1_000_000_000,
            tv_nsec: req.clock_unix_nanos % 1_000_000_000,
        };
        rustix::time::clock_settime(rustix::time::ClockId::Realtime, ts)
            .map_err(|e| io_ctx("clock_settime")(e.into()))?;
    }
    Ok(())
}
