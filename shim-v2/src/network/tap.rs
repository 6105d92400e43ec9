//! The tap beside each CNI interface, and the tc redirect that joins the
//! two (Kata's tcfilter model): an ingress qdisc on each, and a u32
//! match-all filter whose mirred action sends every frame that arrives on
//! one out of the other. The veth keeps its MAC and addresses; the guest's
//! NIC takes the same MAC, so the bridge on the other end sees no change.

use super::netns::NetNs;
use super::NetworkError;
use crate::sandbox::jail::JailUser;

/// The tap's name for interface number `n` (n < MAX_INTERFACES).
pub fn tap_name(n: usize) -> String {
    format!("{}{n}", super::TAP_PREFIX)
}

/// Creates tap `tap` in `ns` with `mtu`, up, owned by `owner` if given
/// (TUNSETOWNER/TUNSETGROUP: its user may attach to it unprivileged), and
/// redirects between it and `veth` both ways. On failure, takes back what
/// it did.
pub fn connect(
    ns: &NetNs,
    veth: &str,
    tap: &str,
    mtu: u32,
    owner: Option<JailUser>,
) -> Result<(), NetworkError> {
    let mtu = mtu.to_string();
    let (uid, gid) = owner.map_or((String::new(), String::new()), |o| {
        (o.uid.to_string(), o.gid.to_string())
    });
    let mut add = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
    if owner.is_some() {
        add.extend(["user", &uid, "group", &gid]);
    }
    let steps: [&[&str]; 2] = [&add, &["link", "set", "dev", tap, "mtu", &mtu, "up"]];
    let result = steps
        .iter()
        .try_for_each(|args| ns.run("ip", args).map(drop))
        .and_then(|()| redirect(ns, veth, tap))
        .and_then(|()| redirect(ns, tap, veth));
    if result.is_err() {
        disconnect(ns, veth, tap);
    }
    result
}

/// Every frame arriving on `from` leaves through `to`.
fn redirect(ns: &NetNs, from: &str, to: &str) -> Result<(), NetworkError> {
    ns.run("tc", &["qdisc", "add", "dev", from, "ingress"])?;
    ns.run(
        "tc",
        &[
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
            "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ],
    )?;
    Ok(())
}

/// Removes the tap (and with it its qdisc) and the veth's ingress qdisc.
/// Best effort: what is gone already (the namespace went first) is fine.
pub fn disconnect(ns: &NetNs, veth: &str, tap: &str) {
    if let Err(e) = ns.run("ip", &["link", "del", "dev", tap]) {
        log::debug!("{e}");
    }
    if let Err(e) = ns.run("tc", &["qdisc", "del", "dev", veth, "ingress"]) {
        log::debug!("{e}");
    }
}
