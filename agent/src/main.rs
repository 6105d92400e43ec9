//! `husk-agent`: PID 1 of every husk micro-VM, serving the agent API
//! (protocols/protos/agent.proto) over ttrpc.
//!
//! As PID 1 it mounts the guest's file systems, listens on vsock (port from
//! `husk.agent_port=` on the kernel command line, default 1024) and prints
//! the marker line the boot tests wait for once it serves. On a host (tests)
//! it runs as `husk-agent --listen unix:///path` (which, as PID 1 of a pid
//! namespace, tests PID 1 mode on a host). A guest without a vsock device
//! cannot be served: the agent prints the marker and ends the VM.
//! `husk-agent init` is the container set-up process the agent starts
//! itself (see `init`).

mod agent;
mod cgroup;
mod container;
mod debug;
mod devices;
mod entropy;
mod error;
mod hostfiles;
mod init;
#[macro_use]
mod log;
mod network;
mod oom;
mod paths;
mod pid1;
mod reaper;
mod sandbox;
mod seccomp;
mod server;
mod service;
mod stdio;
mod storage;
mod sync;
mod sys;
mod syscalls_x86_64;
mod validate;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use husk_protocols::agent_ttrpc::create_agent_service;

/// The line every boot test waits for on the guest console.
const MARKER: &str = "HUSK_GUEST_READY";

const USAGE: &str =
    "usage: husk-agent [--listen unix:///path] [--log-listen unix:///path] [--cgroup-parent NAME] [--host-files DIR]";

struct Args {
    listen: Option<String>,
    log_listen: Option<String>,
    cgroup_parent: String,
    /// CopyFile's folder (host tests); the guest's is HOST_FILES_DIR.
    host_files: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        listen: None,
        log_listen: None,
        cgroup_parent: "husk".into(),
        host_files: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => args.listen = Some(it.next().context(USAGE)?),
            "--log-listen" => args.log_listen = Some(it.next().context(USAGE)?),
            "--cgroup-parent" => args.cgroup_parent = it.next().context(USAGE)?,
            "--host-files" => args.host_files = Some(it.next().context(USAGE)?),
            _ => bail!("unknown argument {a:?}\n{USAGE}"),
        }
    }
    if validate::id("cgroup parent", &args.cgroup_parent).is_err() {
        bail!("--cgroup-parent must be a plain name");
    }
    Ok(args)
}

fn serve(pid1: bool) -> anyhow::Result<()> {
    let args = parse_args()?;
    reaper::block_sigchld().context("blocking SIGCHLD")?;
    if pid1 {
        pid1::mount_all();
    } else {
        // A host's hostname is not ours to change: CreateSandbox sets ours
        // in a UTS namespace of the agent's own (before any thread starts,
        // so that every thread is in it).
        sys::unshare(rustix::thread::UnshareFlags::NEWUTS).context("unshare UTS")?;
    }
    // The log socket is bound before the API socket so that whoever sees
    // the API socket can also connect to the log.
    if let Some(l) = args.log_listen.as_deref() {
        let path = l
            .strip_prefix("unix://")
            .context("--log-listen takes unix:///path")?;
        log::serve(log::unix_listener(path).context("log socket")?)?;
    } else if pid1 && pid1::has_vsock_device() {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if let Some(port) = pid1::log_port_from_cmdline(&cmdline).map_err(anyhow::Error::msg)? {
            let fd = pid1::vsock_listener(port).with_context(|| format!("log port {port}"))?;
            log::serve(fd)?;
        }
    }
    let (listener, peers) = if let Some(listen) = args.listen.as_deref() {
        let path = listen
            .strip_prefix("unix://")
            .context("--listen takes unix:///path")?;
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path).context("binding the socket")?;
        (OwnedFd::from(l), server::Peers::Any)
    } else if pid1 {
        if !pid1::has_vsock_device() {
            // Nobody can ever reach the agent: say the guest is up (the
            // boot tests of VMs without vsock wait for this) and end it.
            print_marker();
            log!("no virtio vsock device; ending the VM");
            pid1::end_vm();
        }
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let port = pid1::port_from_cmdline(&cmdline).map_err(anyhow::Error::msg)?;
        let fd = pid1::vsock_listener(port).with_context(|| format!("vsock port {port}"))?;
        (fd, server::Peers::HostOnly)
    } else {
        bail!("{USAGE}");
    };
    let reaper = reaper::start().context("starting the reaper")?;
    let oom = oom::OomWatcher::start().context("starting the OOM watcher")?;
    let cgroups = cgroup::CgroupRoot::open(&args.cgroup_parent, pid1).context("cgroup v2")?;
    let host_files = hostfiles::HostFiles::new(
        args.host_files
            .as_deref()
            .unwrap_or(husk_protocols::guest::HOST_FILES_DIR),
    );
    let agent = Arc::new(agent::Agent::new(reaper, oom, cgroups, pid1, host_files));
    let (tx, rx) = mpsc::channel();
    let service = service::Service {
        agent: agent.clone(),
        shutdown: Mutex::new(tx),
    };
    server::start(listener, peers, create_agent_service(Arc::new(service)))
        .context("starting the ttrpc server")?;

    print_marker();

    // Runs until DestroySandbox (or forever, should every sender vanish).
    let _ = rx.recv();
    // Let the answer to DestroySandbox reach the shim first.
    std::thread::sleep(Duration::from_millis(50));
    if pid1 {
        pid1::end_vm();
    }
    Ok(())
}

/// The line the boot tests wait for, with the kernel release and uptime.
fn print_marker() {
    let release = sys::read_trimmed("/proc/sys/kernel/osrelease");
    let uptime = sys::read_trimmed("/proc/uptime");
    let uptime = uptime.split_whitespace().next().unwrap_or("?");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{MARKER} release={release} uptime={uptime}");
    let _ = out.flush();
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("init") {
        init::main();
    }
    let pid1 = std::process::id() == 1;
    if pid1 {
        if let Err(e) = pid1::leave_initramfs() {
            // Containers will fail to pivot_root; the agent still serves.
            log!("leaving the initramfs: {e}");
        }
    }
    if let Err(e) = serve(pid1) {
        log!("{e:#}");
        if pid1 {
            // PID 1 must not exit: that panics the kernel. End the VM.
            pid1::end_vm();
        }
        std::process::exit(1);
    }
}
