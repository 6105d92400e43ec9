//! The pod's network in the guest, from CreateSandbox: loopback up, each
//! interface (the virtio-net NIC with its device MAC) renamed, given the
//! pod's MAC, sized, addressed and up, then routes, then permanent
//! neighbours, over rtnetlink. The guest's root network namespace is the
//! pod's: every container joins it.
//!
//! `plan` checks the request first, so a bad one changes nothing; a
//! failure of the kernel after that leaves what was done so far (the
//! sandbox is then unusable and the shim tears the VM down).

mod netlink;
mod plan;
#[cfg(test)]
mod tests;

use std::collections::HashSet;

pub use plan::{plan, Plan};

use netlink::{Link, Netlink, NlError, RouteSpec};
use plan::mac_string;

const EEXIST: i32 = libc::EEXIST;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The VM has no NIC with an interface's device MAC: the host's VM
    /// config (or the template the VM was restored from) and the request
    /// disagree.
    #[error("interface {name}: the guest has no NIC with MAC {mac}")]
    NoNic { name: String, mac: String },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: NlError,
    },
}

fn failed(what: impl std::fmt::Display) -> impl FnOnce(NlError) -> NetError {
    let what = what.to_string();
    move |source| NetError::Netlink { what, source }
}

/// Whether the agent may change the network namespace it is in: as PID 1
/// (the guest), or on a host in a network namespace other than that of
/// the process that started it (`unshare --net husk-agent ...`: one made
/// for it). Otherwise it is the host's (or a container's the tests run
/// in), which the agent must leave alone. Not init's namespace: PID 1 of
/// the host may be out of reach (/proc/1/ns is ptrace-guarded).
pub fn owns_netns(pid1: bool) -> bool {
    if pid1 {
        return true;
    }
    let Some(parent) = rustix::process::getppid() else {
        return false;
    };
    let ns = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let parent = format!("/proc/{}/ns/net", parent.as_raw_nonzero());
    match (ns("/proc/self/ns/net"), ns(&parent)) {
        (Ok(own), Ok(starter)) => own != starter,
        // Without a way to tell, assume it is the host's.
        _ => false,
    }
}

/// Sets up the calling thread's network namespace as `p` says.
pub fn configure(p: &Plan) -> Result<(), NetError> {
    let mut nl = Netlink::open().map_err(|e| failed("opening a netlink socket")(e.into()))?;
    let links = nl.links().map_err(failed("listing links"))?;
    // Loopback: nothing else in the guest brings it up, and pods expect it.
    let lo = links.iter().find(|l| l.name == "lo").map(|l| l.index);
    if let Some(lo) = lo {
        nl.request(&netlink::set_link(lo, None, None, Some(true)))
            .map_err(failed("setting lo up"))?;
    }
    let indexes = interfaces(&mut nl, &links, p)?;
    // On-link routes first: a route via a gateway needs one to reach it.
    let (on_link, via): (Vec<_>, Vec<_>) = p.routes.iter().partition(|r| r.gateway.is_none());
    for r in on_link.into_iter().chain(via) {
        let spec = RouteSpec {
            destination: r.destination,
            gateway: r.gateway,
            index: indexes[r.device],
            source: r.source,
            scope: r.scope,
        };
        let what = || {
            let (d, len) = r.destination;
            let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
            format!("route {d}/{len}{via} dev {}", p.interfaces[r.device].name)
        };
        // The kernel adds the prefix routes of addresses itself; the host
        // may send them too.
        ignore_exists(nl.request(&netlink::add_route(&spec))).map_err(failed(what()))?;
    }
    for n in &p.neighbors {
        nl.request(&netlink::add_neighbor(indexes[n.device], n.address, &n.mac))
            .map_err(failed(format!(
                "neighbour {} lladdr {} dev {}",
                n.address,
                mac_string(&n.mac),
                p.interfaces[n.device].name
            )))?;
    }
    Ok(())
}

/// Configures each interface of `p` on the link with its device MAC;
/// returns the links' indexes, in the order of `p.interfaces`.
fn interfaces(nl: &mut Netlink, links: &[Link], p: &Plan) -> Result<Vec<u32>, NetError> {
    let mut found = Vec::new();
    for itf in &p.interfaces {
        let link = links
            .iter()
            .find(|l| l.mac == Some(itf.device_mac))
            .ok_or_else(|| NetError::NoNic {
                name: itf.name.clone(),
                mac: mac_string(&itf.device_mac),
            })?;
        found.push(link);
    }
    // A link is renamed only while down. When a wanted name is another
    // link's (NICs whose names are swapped), the renamed links first get
    // names of their own, "hsk<index>", so that no rename collides.
    let renamed: Vec<_> = (0..found.len())
        .filter(|&i| found[i].name != p.interfaces[i].name)
        .collect();
    let taken: HashSet<&str> = links.iter().map(|l| l.name.as_str()).collect();
    let collide = renamed
        .iter()
        .any(|&i| taken.contains(p.interfaces[i].name.as_str()));
    for (i, link) in found.iter().enumerate() {
        let name = &p.interfaces[i].name;
        nl.request(&netlink::set_link(link.index, None, None, Some(false)))
            .map_err(failed(format!(
                "interface {name}: setting {} down",
                link.name
            )))?;
        if collide && renamed.contains(&i) {
            let tmp = format!("hsk{}", link.index);
            nl.request(&netlink::set_link(link.index, Some(&tmp), None, None))
                .map_err(failed(format!(
                    "interface {name}: renaming {} to {tmp}",
                    link.name
                )))?;
        }
    }
    for (i, link) in found.iter().enumerate() {
        let itf = &p.interfaces[i];
        let name = &itf.name;
        let rename = renamed.contains(&i).then_some(name.as_str());
        nl.request(&netlink::set_link(link.index, rename, itf.mtu, None))
            .map_err(failed(format!(
                "interface {name}: renaming {} / setting its MTU",
                link.name
            )))?;
        // While the link is down: not every driver changes it live.
        if itf.mac != itf.device_mac {
            nl.request(&netlink::set_address(link.index, &itf.mac))
                .map_err(failed(format!(
                    "interface {name}: setting its MAC {} to {}",
                    mac_string(&itf.device_mac),
                    mac_string(&itf.mac)
                )))?;
        }
        for &(a, len) in &itf.addresses {
            ignore_exists(nl.request(&netlink::add_address(link.index, a, len)))
                .map_err(failed(format!("interface {name}: adding {a}/{len}")))?;
        }
        nl.request(&netlink::set_link(link.index, None, None, Some(true)))
            .map_err(failed(format!("interface {name}: setting it up")))?;
    }
    Ok(found.iter().map(|l| l.index).collect())
}

/// EEXIST is success: what was asked for is there.
fn ignore_exists(r: Result<(), NlError>) -> Result<(), NlError> {
    match r {
        Err(e) if e.errno() == Some(EEXIST) => Ok(()),
        r => r,
    }
}
