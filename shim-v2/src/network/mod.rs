//! A pod's network on the host side. containerd (CRI) creates the pod's
//! network namespace and runs CNI in it before the sandbox reaches the
//! shim; the sandbox spec names it. In it the shim reads what CNI set up
//! ([`discover`]), puts a tap beside each interface and joins the two with
//! tc redirects ([`tap`]); the VMM then starts inside the namespace
//! ([`netns`]) with a virtio-net NIC on each tap, and the agent gives the
//! guest the interfaces' MACs, addresses and routes. The guest's network
//! namespace is the pod's: every container of the pod shares it.

pub mod discover;
pub mod netns;
pub mod tap;

use std::path::{Path, PathBuf};

use husk_vm_config::NetSpec;

use crate::sandbox::jail::JailUser;

pub use discover::GuestNetwork;
pub use netns::NetNs;

/// husk's taps are named `husk_tap<N>`; interfaces with this prefix are
/// never taken for CNI's.
pub const TAP_PREFIX: &str = "husk_tap";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod network namespace {path}: {reason}")]
    Netns { path: PathBuf, reason: String },
    #[error("{command}: {reason}")]
    Command { command: String, reason: String },
    #[error("parsing `ip -json` {what}: {reason}")]
    Parse { what: String, reason: String },
    #[error("the pod's network namespace has no Ethernet interface: CNI set up none")]
    NoInterfaces,
    #[error("the pod's network namespace has more than {0} interfaces")]
    TooManyInterfaces(usize),
    #[error("the pod's network: invalid {0}")]
    Invalid(String),
}

/// A pod network set up for a VM: undone by [`PodNetwork::teardown`].
pub struct PodNetwork {
    pub netns: NetNs,
    pub guest: GuestNetwork,
    /// (veth, tap) pairs joined.
    joined: Vec<(String, String)>,
}

impl PodNetwork {
    /// Reads the namespace at `path` and joins a tap to each interface;
    /// the taps are `owner`'s, when given (a jailed VMM's user attaches to
    /// them without CAP_NET_ADMIN).
    pub fn setup(path: &Path, owner: Option<JailUser>) -> Result<PodNetwork, NetworkError> {
        let netns = NetNs::open(path)?;
        let links = discover::parse("addr", &netns.run("ip", &["-json", "addr", "show"])?)?;
        let mut routes: Vec<discover::IpRoute> = Vec::new();
        for family in ["-4", "-6"] {
            let out = netns.run("ip", &["-json", family, "route", "show", "table", "main"])?;
            routes.extend(discover::parse("route", &out)?);
        }
        let neigh = netns.run("ip", &["-json", "neigh", "show", "nud", "permanent"])?;
        let guest = discover::plan(&links, &routes, &discover::parse("neigh", &neigh)?)?;
        let mut net = PodNetwork {
            netns,
            guest,
            joined: Vec::new(),
        };
        for (n, i) in net.guest.interfaces.iter().enumerate() {
            let tap = tap::tap_name(n);
            if let Err(e) = tap::connect(&net.netns, &i.name, &tap, i.mtu, owner) {
                net.teardown();
                return Err(e);
            }
            net.joined.push((i.name.clone(), tap));
        }
        log::info!(
            "pod network {}: {}",
            path.display(),
            net.joined
                .iter()
                .map(|(v, t)| format!("{v} <-> {t}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(net)
    }

    /// The guest's network as CreateSandbox gives it. With `device_macs`
    /// (the MACs a template's guest probed its NICs with, in order), each
    /// interface is found by that MAC and given the pod's.
    pub fn guest_for(&self, device_macs: Option<&[Option<String>]>) -> GuestNetwork {
        let mut guest = self.guest.clone();
        for (i, mac) in guest
            .interfaces
            .iter_mut()
            .zip(device_macs.unwrap_or_default())
        {
            if let Some(mac) = mac {
                i.device_mac = mac.clone();
            }
        }
        guest
    }

    /// The VM's NICs: one per tap, with the interface's MAC.
    pub fn nics(&self) -> Vec<NetSpec> {
        self.guest
            .interfaces
            .iter()
            .zip(&self.joined)
            .enumerate()
            .map(|(n, (i, (_, tap)))| NetSpec {
                id: format!("net{n}"),
                tap: tap.clone(),
                mac: Some(i.mac.clone()),
                // The VM's description sets the configured limits.
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect()
    }

    /// Removes the taps and redirects. Runs once the VMM has exited.
    pub fn teardown(&mut self) {
        for (veth, tap) in self.joined.drain(..) {
            tap::disconnect(&self.netns, &veth, &tap);
        }
    }
}

#[cfg(test)]
mod tests;
