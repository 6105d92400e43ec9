//! What CNI set up in a pod's network namespace, read with `ip -json` and
//! turned into the guest's network: each Ethernet interface (name, MAC,
//! MTU, global addresses), the routes CNI added (the kernel's own prefix
//! routes are left out: the guest kernel adds its own), and the permanent
//! neighbour entries. The netns is the host's, but what is in it came from
//! CNI plugins and the pod's configuration, so every field is checked and
//! the counts are bounded.

use std::collections::BTreeSet;

use husk_protocols::agent::{Interface, IpAddress, Neighbor, Route};
use serde::Deserialize;

use super::{NetworkError, TAP_PREFIX};

/// At most this many interfaces per pod (each is a virtio-net device).
pub use husk_runtime_config::config::MAX_INTERFACES;
/// Bounds on what is copied into the guest.
const MAX_ADDRESSES: usize = 32;
const MAX_ROUTES: usize = 256;
const MAX_NEIGHBORS: usize = 256;

/// `ip -json addr show`: one link.
#[derive(Debug, Deserialize)]
pub struct Link {
    pub ifname: String,
    pub mtu: u32,
    #[serde(default)]
    pub link_type: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
pub struct AddrInfo {
    #[serde(default)]
    pub local: String,
    #[serde(default)]
    pub prefixlen: u32,
    #[serde(default)]
    pub scope: String,
}

/// `ip -json route show` (either family): one route of the main table.
#[derive(Debug, Deserialize)]
pub struct IpRoute {
    pub dst: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dev: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub prefsrc: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// `ip -json neigh show nud permanent`: one entry.
#[derive(Debug, Deserialize)]
pub struct IpNeigh {
    pub dst: String,
    pub dev: String,
    #[serde(default)]
    pub lladdr: Option<String>,
}

/// The network the guest is given.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GuestNetwork {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbors: Vec<Neighbor>,
}

/// Parses one `ip -json` answer.
pub fn parse<T: for<'de> Deserialize<'de>>(what: &str, json: &str) -> Result<Vec<T>, NetworkError> {
    // `ip -json` prints nothing at all for an empty list.
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(json).map_err(|e| NetworkError::Parse {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

/// The guest network from what `ip` reported.
pub fn plan(
    links: &[Link],
    routes: &[IpRoute],
    neighbors: &[IpNeigh],
) -> Result<GuestNetwork, NetworkError> {
    let bad = |what: String| NetworkError::Invalid(what);
    let mut net = GuestNetwork::default();
    for l in links
        .iter()
        .filter(|l| l.link_type == "ether" && !l.ifname.starts_with(TAP_PREFIX))
    {
        if net.interfaces.len() == MAX_INTERFACES {
            return Err(NetworkError::TooManyInterfaces(MAX_INTERFACES));
        }
        if !valid_ifname(&l.ifname) {
            return Err(bad(format!("interface name {:?}", l.ifname)));
        }
        if !valid_mac(&l.address) {
            return Err(bad(format!("{}: MAC {:?}", l.ifname, l.address)));
        }
        if !(68..=65535).contains(&l.mtu) {
            return Err(bad(format!("{}: MTU {}", l.ifname, l.mtu)));
        }
        let mut addresses = Vec::new();
        for a in l.addr_info.iter().filter(|a| a.scope == "global") {
            let ip: std::net::IpAddr = a
                .local
                .parse()
                .map_err(|_| bad(format!("{}: address {:?}", l.ifname, a.local)))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if a.prefixlen > max {
                return Err(bad(format!("{}: prefix /{}", l.ifname, a.prefixlen)));
            }
            if addresses.len() == MAX_ADDRESSES {
                return Err(bad(format!(
                    "{}: more than {MAX_ADDRESSES} addresses",
                    l.ifname
                )));
            }
            addresses.push(IpAddress {
                address: ip.to_string(),
                prefix_len: a.prefixlen,
                ..Default::default()
            });
        }
        net.interfaces.push(Interface {
            name: l.ifname.clone(),
            mac: l.address.to_ascii_lowercase(),
            mtu: l.mtu,
            addresses,
            ..Default::default()
        });
    }
    if net.interfaces.is_empty() {
        return Err(NetworkError::NoInterfaces);
    }
    let devices: BTreeSet<&str> = net.interfaces.iter().map(|i| i.name.as_str()).collect();
    for r in routes {
        let Some(dev) = r.dev.as_deref().filter(|d| devices.contains(d)) else {
            continue;
        };
        // The kernel's prefix and link-local routes come back by
        // themselves when the guest gets the addresses.
        if r.protocol.as_deref() == Some("kernel")
            || r.kind.as_deref().is_some_and(|k| k != "unicast")
        {
            continue;
        }
        if net.routes.len() == MAX_ROUTES {
            return Err(bad(format!("more than {MAX_ROUTES} routes")));
        }
        if r.dst != "default" && !valid_cidr(&r.dst) {
            return Err(bad(format!("route destination {:?}", r.dst)));
        }
        let ip_or_empty = |what: &str, v: &Option<String>| match v.as_deref() {
            None | Some("") => Ok(String::new()),
            Some(s) => s
                .parse::<std::net::IpAddr>()
                .map(|ip| ip.to_string())
                .map_err(|_| bad(format!("route to {}: {what} {s:?}", r.dst))),
        };
        net.routes.push(Route {
            destination: r.dst.clone(),
            gateway: ip_or_empty("gateway", &r.gateway)?,
            device: dev.to_string(),
            source: ip_or_empty("source", &r.prefsrc)?,
            scope: match r.scope.as_deref() {
                Some("link") => 253,
                Some("host") => 254,
                _ => 0,
            },
            ..Default::default()
        });
    }
    for n in neighbors
        .iter()
        .filter(|n| devices.contains(n.dev.as_str()))
    {
        let Some(mac) = n.lladdr.as_deref() else {
            continue;
        };
        if net.neighbors.len() == MAX_NEIGHBORS {
            return Err(bad(format!("more than {MAX_NEIGHBORS} neighbours")));
        }
        let ip: std::net::IpAddr = n
            .dst
            .parse()
            .map_err(|_| bad(format!("neighbour {:?}", n.dst)))?;
        if !valid_mac(mac) {
            return Err(bad(format!("neighbour {}: MAC {mac:?}", n.dst)));
        }
        net.neighbors.push(Neighbor {
            address: ip.to_string(),
            mac: mac.to_ascii_lowercase(),
            device: n.dev.clone(),
            ..Default::default()
        });
    }
    Ok(net)
}

/// 1-15 bytes, no '/', whitespace, ':' or NUL (what the kernel and the
/// guest accept).
pub fn valid_ifname(s: &str) -> bool {
    (1..16).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Six hex pairs separated by ':'.
pub fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn valid_cidr(s: &str) -> bool {
    let (ip, len) = s.split_once('/').unwrap_or((s, ""));
    match ip.parse::<std::net::IpAddr>() {
        Ok(ip) => {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            len.is_empty() || len.parse::<u32>().is_ok_and(|n| n <= max)
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // What `ip -json` printed for a CNI bridge pod (iproute2 6.1).
    const ADDR: &str = r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"],"mtu":65536,"link_type":"loopback","address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},{"ifindex":2,"link_index":7,"ifname":"eth0","flags":["BROADCAST","UP"],"mtu":1500,"link_type":"ether","address":"A6:88:72:21:bb:03","addr_info":[{"family":"inet","local":"10.88.0.5","prefixlen":16,"scope":"global"},{"family":"inet6","local":"fd00::5","prefixlen":64,"scope":"global"},{"family":"inet6","local":"fe80::a488:72ff:fe21:bb03","prefixlen":64,"scope":"link"}]},{"ifindex":3,"ifname":"husk_tap0","mtu":1500,"link_type":"ether","address":"02:00:00:00:00:09","addr_info":[]}]"#;
    const ROUTES: &str = r#"[{"dst":"default","gateway":"10.88.0.1","dev":"eth0"},{"dst":"10.88.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.0.5"},{"dst":"fd00::/64","dev":"eth0","protocol":"kernel","metric":256},{"dst":"default","gateway":"fd00::1","dev":"eth0","metric":1024},{"dst":"192.168.5.0/24","dev":"eth0","scope":"link"}]"#;
    const NEIGH: &str =
        r#"[{"dst":"10.88.0.1","dev":"eth0","lladdr":"02:00:00:00:00:01","state":["PERMANENT"]}]"#;

    fn planned(addr: &str, routes: &str, neigh: &str) -> Result<GuestNetwork, NetworkError> {
        plan(
            &parse("addr", addr)?,
            &parse("route", routes)?,
            &parse("neigh", neigh)?,
        )
    }

    #[test]
    fn a_cni_bridge_pod() {
        let n = planned(ADDR, ROUTES, NEIGH).unwrap();
        assert_eq!(n.interfaces.len(), 1, "lo and husk's own tap are skipped");
        let i = &n.interfaces[0];
        assert_eq!(
            (i.name.as_str(), i.mac.as_str(), i.mtu),
            ("eth0", "a6:88:72:21:bb:03", 1500)
        );
        let a: Vec<_> = i
            .addresses
            .iter()
            .map(|a| format!("{}/{}", a.address, a.prefix_len))
            .collect();
        assert_eq!(a, ["10.88.0.5/16", "fd00::5/64"], "link-local left out");
        let r: Vec<_> = n
            .routes
            .iter()
            .map(|r| format!("{} {} {} {}", r.destination, r.gateway, r.device, r.scope))
            .collect();
        assert_eq!(
            r,
            [
                "default 10.88.0.1 eth0 0",
                "default fd00::1 eth0 0",
                "192.168.5.0/24  eth0 253"
            ],
            "the kernel's prefix routes left out"
        );
        assert_eq!(n.neighbors.len(), 1);
        assert_eq!(n.neighbors[0].mac, "02:00:00:00:00:01");
    }

    #[test]
    fn no_interface_is_an_error() {
        let lo_only =
            r#"[{"ifname":"lo","mtu":65536,"link_type":"loopback","address":"00:00:00:00:00:00"}]"#;
        assert!(matches!(
            planned(lo_only, "", ""),
            Err(NetworkError::NoInterfaces)
        ));
        assert!(matches!(
            planned("", "", ""),
            Err(NetworkError::NoInterfaces)
        ));
    }

    #[test]
    fn bad_input_is_named() {
        let cases = [
            (
                ADDR.replace("A6:88:72:21:bb:03", "zz"),
                ROUTES.to_string(),
                "MAC",
            ),
            (
                ADDR.replace("10.88.0.5", "10.88.0.500"),
                ROUTES.to_string(),
                "address",
            ),
            (
                ADDR.replace("\"mtu\":1500", "\"mtu\":20"),
                ROUTES.to_string(),
                "MTU",
            ),
            (
                ADDR.to_string(),
                ROUTES.replace("10.88.0.1", "nope"),
                "gateway",
            ),
            (
                ADDR.to_string(),
                ROUTES.replace("192.168.5.0/24", "192.168.5.0/40"),
                "destination",
            ),
            ("{".to_string(), ROUTES.to_string(), "parsing"),
        ];
        for (addr, routes, want) in cases {
            let e = planned(&addr, &routes, NEIGH).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should name {want}");
        }
    }

    #[test]
    fn interfaces_are_bounded() {
        let one =
            r#"{"ifname":"ethN","mtu":1500,"link_type":"ether","address":"02:00:00:00:00:0N"}"#;
        let many: Vec<String> = (0..=MAX_INTERFACES)
            .map(|n| one.replace('N', &n.to_string()))
            .collect();
        let e = planned(&format!("[{}]", many.join(",")), "", "").unwrap_err();
        assert!(matches!(e, NetworkError::TooManyInterfaces(_)), "{e}");
    }

    #[test]
    fn names_and_macs() {
        assert!(valid_ifname("eth0") && !valid_ifname("") && !valid_ifname("a/b"));
        assert!(!valid_ifname("sixteen-chars-xx") && !valid_ifname("a b"));
        assert!(
            valid_mac("02:aB:00:00:00:01")
                && !valid_mac("02:00:00:00:00")
                && !valid_mac("0g:00:00:00:00:00")
        );
    }
}
