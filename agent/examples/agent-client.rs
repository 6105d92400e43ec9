//! A minimal client of the agent for end-to-end checks: connects over vsock
//! (or a Unix socket), copies a static busybox into the guest, runs
//! `busybox uname -r` in a container there, checks that it prints the
//! guest's kernel release, and ends the sandbox.
//!
//!   agent-client vsock://CID:PORT|unix:///path BUSYBOX
//!
//! Used by tests/scenarios/agent-vsock.sh in the L1 test machine.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use husk_protocols::agent as pb;
use husk_protocols::agent_ttrpc::AgentServiceClient;
use husk_protocols::ttrpc::{context, Client};

/// CopyFile chunks (ttrpc messages are at most 4 MiB).
const CHUNK: usize = 1 << 20;

fn ctx() -> context::Context {
    context::with_timeout(0)
}

/// The length of a sockaddr_vm, as connect(2) takes it.
// Fits: the struct is 16 bytes.
#[allow(clippy::cast_possible_truncation)]
const VSOCK_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn vsock_connect(cid: u32, port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket returned a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_vm is valid; fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = rustix::net::AddressFamily::VSOCK.as_raw();
    addr.svm_cid = cid;
    addr.svm_port = port;
    use std::os::fd::AsRawFd;
    // SAFETY: `addr` is a sockaddr_vm of the length given.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            VSOCK_ADDR_LEN,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn connect(addr: &str) -> anyhow::Result<AgentServiceClient> {
    let start = Instant::now();
    loop {
        let r: anyhow::Result<Client> = if let Some(v) = addr.strip_prefix("vsock://") {
            let (cid, port) = v.split_once(':').context("vsock://CID:PORT")?;
            vsock_connect(cid.parse()?, port.parse()?)
                .map_err(anyhow::Error::from)
                .and_then(|fd| Client::new(fd.into_raw_fd()).map_err(anyhow::Error::from))
        } else {
            Client::connect(addr).map_err(anyhow::Error::from)
        };
        match r {
            Ok(c) => return Ok(AgentServiceClient::new(c)),
            Err(e) if start.elapsed() > Duration::from_secs(600) => {
                return Err(e.context(format!("connecting to {addr}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        bail!("usage: agent-client vsock://CID:PORT|unix:///path BUSYBOX");
    }
    let client = connect(&args[1])?;
    let details = client.get_guest_details(ctx(), &pb::Empty::new())?;
    println!(
        "agent {} on kernel {} (pid1: {})",
        details.agent_version, details.kernel_release, details.pid1
    );
    let busybox = std::fs::read(&args[2]).with_context(|| args[2].clone())?;
    // The agent writes host files only under HOST_FILES_DIR.
    let rootfs = format!("{}/e2e-rootfs", husk_protocols::guest::HOST_FILES_DIR);
    let rootfs = rootfs.as_str();
    for (i, chunk) in busybox.chunks(CHUNK).enumerate() {
        let mut r = pb::CopyFileRequest::new();
        r.path = format!("{rootfs}/bin/busybox");
        r.file_size = i64::try_from(busybox.len())?;
        r.file_mode = 0o755;
        r.offset = i64::try_from(i * CHUNK)?;
        r.data = chunk.to_vec();
        client.copy_file(ctx(), &r)?;
    }
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "args": ["/bin/busybox", "uname", "-r"],
            "cwd": "/",
            "env": ["PATH=/bin"],
            "user": {"uid": 0, "gid": 0}
        },
        "root": {"path": rootfs},
        "hostname": "e2e",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]
        }
    });
    let mut c = pb::CreateContainerRequest::new();
    c.container_id = "e2e".into();
    c.oci_spec_json = serde_json::to_vec(&spec)?;
    c.set_rootfs_path(rootfs.into());
    client.create_container(ctx(), &c)?;
    let mut p = pb::ProcessRequest::new();
    p.container_id = "e2e".into();
    client.close_stdin(ctx(), &p)?;
    let mut s = pb::ContainerRequest::new();
    s.container_id = "e2e".into();
    client.start_container(ctx(), &s)?;
    let mut out = Vec::new();
    loop {
        let mut r = pb::ReadStreamRequest::new();
        r.container_id = "e2e".into();
        r.len = 4096;
        let d = client.read_stdout(ctx(), &r)?.data;
        if d.is_empty() {
            break;
        }
        out.extend(d);
    }
    let status = client.wait_process(ctx(), &p)?.status;
    let mut rm = pb::RemoveContainerRequest::new();
    rm.container_id = "e2e".into();
    client.remove_container(ctx(), &rm)?;
    let got = String::from_utf8_lossy(&out).trim().to_string();
    println!("container: `uname -r` printed {got:?}, exit status {status}");
    let _ = client.destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new());
    if status != 0 || got != details.kernel_release {
        bail!("expected {:?} and status 0", details.kernel_release);
    }
    println!("PASS: the container runs on the guest kernel");
    Ok(())
}
