//! Checks the pod network of a CreateSandboxRequest and turns it into a
//! typed plan: every string parsed, every name resolved to an interface of
//! the request, before anything is changed. A request that fails here
//! leaves the guest's network as it was.

use std::collections::HashSet;
use std::net::IpAddr;

use husk_protocols::agent as pb;

/// Bounds on what one request may ask for: far above any pod's needs,
/// low enough that a bad request cannot keep the agent busy.
pub const MAX_INTERFACES: usize = 16;
pub const MAX_ADDRESSES: usize = 32;
pub const MAX_ROUTES: usize = 256;
pub const MAX_NEIGHBORS: usize = 256;

/// IFNAMSIZ less the NUL.
const IFNAME_MAX: usize = 15;

/// The RT_SCOPE values a route may have.
pub const SCOPE_UNIVERSE: u8 = 0;
pub const SCOPE_LINK: u8 = 253;
pub const SCOPE_HOST: u8 = 254;

pub type Mac = [u8; 6];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// The address it gets.
    pub mac: Mac,
    /// The address the guest's NIC has now, by which it is found: `mac`
    /// unless the request said otherwise (a VM restored from a template,
    /// whose NIC still has the template's).
    pub device_mac: Mac,
    /// None: the driver's default.
    pub mtu: Option<u32>,
    pub addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destination and its prefix length; 0.0.0.0/0 or ::/0 for a
    /// default route.
    pub destination: (IpAddr, u8),
    pub gateway: Option<IpAddr>,
    /// Index into `Plan::interfaces`.
    pub device: usize,
    pub source: Option<IpAddr>,
    pub scope: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbor {
    pub address: IpAddr,
    pub mac: Mac,
    /// Index into `Plan::interfaces`.
    pub device: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbors: Vec<Neighbor>,
}

/// The request's network as a plan, or what is wrong with it, naming the
/// field (e.g. `routes[2].gateway`).
pub fn plan(req: &pb::CreateSandboxRequest) -> Result<Plan, String> {
    if req.interfaces.len() > MAX_INTERFACES {
        return Err(format!("over {MAX_INTERFACES} interfaces"));
    }
    if req.routes.len() > MAX_ROUTES {
        return Err(format!("over {MAX_ROUTES} routes"));
    }
    if req.neighbors.len() > MAX_NEIGHBORS {
        return Err(format!("over {MAX_NEIGHBORS} neighbors"));
    }
    let mut p = Plan::default();
    for (i, itf) in req.interfaces.iter().enumerate() {
        let f = format!("interfaces[{i}]");
        let parsed = interface(&f, itf)?;
        if p.interfaces.iter().any(|o| o.name == parsed.name) {
            return Err(format!("{f}.name {:?} is given twice", parsed.name));
        }
        if p.interfaces.iter().any(|o| o.mac == parsed.mac) {
            return Err(format!("{f}.mac {} is given twice", itf.mac));
        }
        if p.interfaces
            .iter()
            .any(|o| o.device_mac == parsed.device_mac)
        {
            return Err(format!(
                "{f}: NIC {} is given twice (device_mac, or mac without one)",
                mac_string(&parsed.device_mac)
            ));
        }
        p.interfaces.push(parsed);
    }
    let device = |f: &str, name: &str| {
        p.interfaces
            .iter()
            .position(|i| i.name == name)
            .ok_or_else(|| format!("{f}.device {name:?} is not one of the interfaces"))
    };
    let mut routes = Vec::new();
    for (i, r) in req.routes.iter().enumerate() {
        let f = format!("routes[{i}]");
        routes.push(route(&f, r, device(&f, &r.device)?)?);
    }
    let mut neighbors = Vec::new();
    for (i, n) in req.neighbors.iter().enumerate() {
        let f = format!("neighbors[{i}]");
        neighbors.push(Neighbor {
            address: ip(&format!("{f}.address"), &n.address)?,
            mac: mac(&format!("{f}.mac"), &n.mac)?,
            device: device(&f, &n.device)?,
        });
    }
    p.routes = routes;
    p.neighbors = neighbors;
    Ok(p)
}

fn interface(f: &str, itf: &pb::Interface) -> Result<Interface, String> {
    ifname(&format!("{f}.name"), &itf.name)?;
    let mtu = match itf.mtu {
        0 => None,
        m @ 68..=65535 => Some(m),
        m => return Err(format!("{f}.mtu {m} is outside 68-65535 (or 0)")),
    };
    if itf.addresses.len() > MAX_ADDRESSES {
        return Err(format!("{f} has over {MAX_ADDRESSES} addresses"));
    }
    let mut addresses = Vec::new();
    let mut seen = HashSet::new();
    for (j, a) in itf.addresses.iter().enumerate() {
        let fa = format!("{f}.addresses[{j}]");
        let addr = ip(&format!("{fa}.address"), &a.address)?;
        let len = prefix_len(&format!("{fa}.prefix_len"), addr, a.prefix_len)?;
        if addr.is_unspecified() || addr.is_multicast() {
            return Err(format!("{fa}.address {addr} cannot be an interface's"));
        }
        if !seen.insert(addr) {
            return Err(format!("{fa}.address {addr} is given twice"));
        }
        addresses.push((addr, len));
    }
    let own = nic_mac(&format!("{f}.mac"), &itf.mac)?;
    let device_mac = match itf.device_mac.as_str() {
        "" => own,
        d => nic_mac(&format!("{f}.device_mac"), d)?,
    };
    Ok(Interface {
        name: itf.name.clone(),
        mac: own,
        device_mac,
        mtu,
        addresses,
    })
}

/// A MAC a NIC can have: neither multicast (nor broadcast) nor all zeros,
/// what the kernel's is_valid_ether_addr takes.
fn nic_mac(f: &str, s: &str) -> Result<Mac, String> {
    let m = mac(f, s)?;
    if m[0] & 1 != 0 || m == [0; 6] {
        return Err(format!(
            "{f} {s:?} is not a NIC's address (multicast or all zeros)"
        ));
    }
    Ok(m)
}

fn route(f: &str, r: &pb::Route, device: usize) -> Result<Route, String> {
    let gateway = match r.gateway.as_str() {
        "" => None,
        g => Some(ip(&format!("{f}.gateway"), g)?),
    };
    let source = match r.source.as_str() {
        "" => None,
        s => Some(ip(&format!("{f}.source"), s)?),
    };
    let destination = match r.destination.as_str() {
        "" | "default" => match gateway {
            Some(IpAddr::V6(_)) => (IpAddr::V6(0.into()), 0),
            _ => (IpAddr::V4(0.into()), 0),
        },
        d => cidr(&format!("{f}.destination"), d)?,
    };
    let family_of = |a: IpAddr| a.is_ipv4() == destination.0.is_ipv4();
    if let Some(g) = gateway {
        if !family_of(g) {
            return Err(format!(
                "{f}.gateway {g} is not of the destination's family"
            ));
        }
        if g.is_unspecified() || g.is_multicast() {
            return Err(format!("{f}.gateway {g} cannot be a next hop"));
        }
    }
    if let Some(s) = source {
        if !family_of(s) {
            return Err(format!("{f}.source {s} is not of the destination's family"));
        }
    }
    let scope = match r.scope {
        0 => SCOPE_UNIVERSE,
        253 => SCOPE_LINK,
        254 => SCOPE_HOST,
        s => return Err(format!("{f}.scope {s} is not 0, 253 or 254")),
    };
    // The kernel refuses a next hop on a link- or host-scope route.
    if gateway.is_some() && scope != SCOPE_UNIVERSE {
        return Err(format!("{f}: a route with a gateway must have scope 0"));
    }
    Ok(Route {
        destination,
        gateway,
        device,
        source,
        scope,
    })
}

/// 1-15 bytes, none of them '/', ':', whitespace or NUL, not "." or ".."
/// (what the kernel's dev_valid_name takes), and not "lo", which the agent
/// configures itself.
fn ifname(f: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if !ok {
        return Err(format!(
            "{f} {name:?} is not an interface name (1-15 bytes, no '/', ':', whitespace or NUL)"
        ));
    }
    if name == "lo" {
        return Err(format!(
            "{f} \"lo\" is the loopback, which the agent sets up"
        ));
    }
    Ok(())
}

fn ip(f: &str, s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("{f} {s:?} is not an IPv4 or IPv6 address"))
}

fn prefix_len(f: &str, addr: IpAddr, len: u32) -> Result<u8, String> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    u8::try_from(len)
        .ok()
        .filter(|l| u32::from(*l) <= max)
        .ok_or_else(|| format!("{f} {len} is over {max} for {addr}"))
}

/// "10.88.0.0/16", or a bare address for a host route. Bits beyond the
/// prefix must be zero: the kernel refuses such a route.
fn cidr(f: &str, s: &str) -> Result<(IpAddr, u8), String> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr = ip(f, a)?;
    let len = match len {
        None => {
            if addr.is_ipv4() {
                32
            } else {
                128
            }
        }
        Some(l) => {
            let l = l
                .parse::<u32>()
                .map_err(|_| format!("{f} {s:?} has no prefix length after '/'"))?;
            prefix_len(f, addr, l)?
        }
    };
    let host_bits = match addr {
        IpAddr::V4(a) => u32::from(a).checked_shl(u32::from(len)).unwrap_or(0) != 0,
        IpAddr::V6(a) => u128::from(a).checked_shl(u32::from(len)).unwrap_or(0) != 0,
    };
    if host_bits {
        return Err(format!("{f} {s:?} has bits set beyond its prefix length"));
    }
    Ok((addr, len))
}

/// "aa:bb:cc:dd:ee:ff" (either case).
pub fn mac(f: &str, s: &str) -> Result<Mac, String> {
    let bad = || format!("{f} {s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)");
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(out)
}

/// The MAC as the kernel and `ip` print it.
pub fn mac_string(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
