//! The sandbox (pod) level set-up from CreateSandbox: the host's entropy
//! (`entropy`), hostname, the pod's network (`network`), guest sysctls and
//! the clock. As an ordinary process (host tests) the agent has its own UTS
//! namespace, so the hostname is set there; the kernel's entropy pool, the
//! clock and sysctls belong to the host then and are only validated, as is
//! the network unless a test gave the agent a network namespace of its own.

use std::fs;
use std::path::Path;

use husk_protocols::agent::CreateSandboxRequest;
use husk_protocols::guest::{POD_SHM_DIR, POD_SHM_OPTIONS, SHARED_DIR};
use rustix::mount::MountFlags;

use crate::error::{invalid, io_ctx, Result};
use crate::{entropy, network, validate};

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
    let net = network::plan(req).map_err(invalid)?;
    for k in req.sysctls.keys() {
        validate::sysctl_key(k).map_err(invalid)?;
        let path = Path::new("/proc/sys").join(k.replace('.', "/"));
        // An interface's keys appear once the network set-up named it.
        if !path.exists() && !names_an_interface(k, &net) {
            return Err(invalid(format!("sysctl {k} does not exist in this kernel")));
        }
    }
    if req.clock_unix_nanos < 0 {
        return Err(invalid("clock_unix_nanos is negative"));
    }
    entropy::check(&req.entropy)?;
    let shared_tag = req
        .shared_fs
        .as_ref()
        .map(|fs| shared_fs_tag(&fs.tag).map(|()| fs.tag.as_str()))
        .transpose()
        .map_err(invalid)?;
    // First: whatever the guest does next (a process's stack canary, a
    // TCP sequence number) draws on a CRNG the host's bytes reseeded.
    if pid1 {
        entropy::add(&req.entropy)?;
    }
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
        crate::log!("not PID 1: leaving the host's entropy pool, clock and sysctls alone");
        return Ok(());
    }
    pod_shm()?;
    if let Some(tag) = shared_tag {
        shared_fs(tag)?;
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

/// Mounts the pod's /dev/shm (see [`POD_SHM_DIR`]), once.
fn pod_shm() -> Result<()> {
    let dir = Path::new(POD_SHM_DIR);
    fs::create_dir_all(dir).map_err(io_ctx(format!("creating {POD_SHM_DIR}")))?;
    let mounted = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_ctx("reading mountinfo"))?
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(POD_SHM_DIR));
    if !mounted {
        let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        crate::sys::mount(Path::new("shm"), dir, "tmpfs", flags, POD_SHM_OPTIONS).map_err(
            io_ctx(format!("mounting the pod's /dev/shm at {POD_SHM_DIR}")),
        )?;
    }
    Ok(())
}

/// Checks a virtio-fs tag: 1 to 36 printable ASCII bytes, no space (the
/// device's config field; mount(2) takes it as the source).
pub fn shared_fs_tag(tag: &str) -> std::result::Result<(), String> {
    if tag.is_empty() || tag.len() > 36 || !tag.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "shared_fs tag {tag:?}: 1 to 36 printable ASCII bytes without spaces"
        ));
    }
    Ok(())
}

/// Mounts the sandbox's shared folder (virtio-fs `tag`) at [`SHARED_DIR`],
/// once. Neither nosuid nor nodev: containers' root file systems are in it,
/// and behave as on runc (the guest kernel enforces both for its own
/// devices and users; the host side is virtiofsd's, which makes no device
/// nodes).
fn shared_fs(tag: &str) -> Result<()> {
    let dir = Path::new(SHARED_DIR);
    fs::create_dir_all(dir).map_err(io_ctx(format!("creating {SHARED_DIR}")))?;
    let mounted = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_ctx("reading mountinfo"))?
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(SHARED_DIR));
    if !mounted {
        crate::sys::mount(Path::new(tag), dir, "virtiofs", MountFlags::empty(), "").map_err(
            io_ctx(format!(
                "mounting the shared folder (virtio-fs {tag:?}) at {SHARED_DIR}"
            )),
        )?;
    }
    Ok(())
}

/// Whether sysctl `key` is one of a planned interface's
/// (net.ipv4.conf.eth0.rp_filter, net.ipv6.neigh.eth0.*, ...).
fn names_an_interface(key: &str, net: &network::Plan) -> bool {
    const PER_INTERFACE: [&str; 4] = [
        "net.ipv4.conf.",
        "net.ipv6.conf.",
        "net.ipv4.neigh.",
        "net.ipv6.neigh.",
    ];
    PER_INTERFACE.iter().any(|p| {
        key.strip_prefix(p).is_some_and(|rest| {
            net.interfaces.iter().any(|i| {
                rest.strip_prefix(i.name.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_fs_tags_are_checked() {
        assert!(shared_fs_tag("husk-shared").is_ok());
        assert!(shared_fs_tag(&"t".repeat(36)).is_ok());
        for bad in ["", "a b", "a\nb", &"t".repeat(37), "é"] {
            assert!(shared_fs_tag(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_interfaces_sysctls_are_known_before_it_is_named() {
        let mut req = CreateSandboxRequest::new();
        let mut itf = husk_protocols::agent::Interface::new();
        itf.name = "eth0".into();
        itf.mac = "02:00:00:00:00:aa".into();
        req.interfaces.push(itf);
        let net = network::plan(&req).unwrap();
        assert!(names_an_interface("net.ipv4.conf.eth0.rp_filter", &net));
        assert!(names_an_interface(
            "net.ipv6.neigh.eth0.base_reachable_time_ms",
            &net
        ));
        assert!(!names_an_interface("net.ipv4.conf.eth01.rp_filter", &net));
        assert!(!names_an_interface("net.ipv4.conf.eth1.rp_filter", &net));
        assert!(!names_an_interface("net.core.somaxconn", &net));
    }
}
