//! The network module's tests: the request checks, the message encoding,
//! and a real set-up in a network namespace of the test's own (root only).

use std::net::IpAddr;
use std::process::Command;

use husk_protocols::agent as pb;
use serde_json::Value;

use super::netlink;
use super::netlink::{self as testing, RouteSpec};
use super::plan::{self, Plan};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn iface(name: &str, mac: &str, mtu: u32, addrs: &[(&str, u32)]) -> pb::Interface {
    let mut i = pb::Interface::new();
    i.name = name.into();
    i.mac = mac.into();
    i.mtu = mtu;
    for (a, l) in addrs {
        let mut x = pb::IpAddress::new();
        x.address = (*a).into();
        x.prefix_len = *l;
        i.addresses.push(x);
    }
    i
}

fn route(dst: &str, gw: &str, dev: &str, src: &str, scope: u32) -> pb::Route {
    let mut r = pb::Route::new();
    r.destination = dst.into();
    r.gateway = gw.into();
    r.device = dev.into();
    r.source = src.into();
    r.scope = scope;
    r
}

fn neigh(addr: &str, mac: &str, dev: &str) -> pb::Neighbor {
    let mut n = pb::Neighbor::new();
    n.address = addr.into();
    n.mac = mac.into();
    n.device = dev.into();
    n
}

/// The pod network every test starts from: eth0 with an IPv4 /24 and an
/// IPv6 /64, a default route via the /24's gateway, an on-link route, a
/// neighbour.
fn good() -> pb::CreateSandboxRequest {
    let mut r = pb::CreateSandboxRequest::new();
    r.interfaces.push(iface(
        "eth0",
        "02:00:00:00:00:aa",
        1400,
        &[("10.88.0.5", 24), ("fd00::5", 64)],
    ));
    r.routes.push(route("default", "10.88.0.1", "eth0", "", 0));
    r.routes
        .push(route("10.99.0.0/16", "", "eth0", "10.88.0.5", 253));
    r.routes.push(route("", "fd00::1", "eth0", "", 0));
    r.neighbors
        .push(neigh("10.88.0.1", "02:00:00:00:00:01", "eth0"));
    r
}

#[test]
fn a_good_request_is_planned() {
    let p = plan::plan(&good()).unwrap();
    assert_eq!(p.interfaces.len(), 1);
    let i = &p.interfaces[0];
    assert_eq!(i.mac, [2, 0, 0, 0, 0, 0xaa]);
    assert_eq!(i.mtu, Some(1400));
    assert_eq!(
        i.addresses,
        vec![(ip("10.88.0.5"), 24), (ip("fd00::5"), 64)]
    );
    assert_eq!(p.routes[0].destination, (ip("0.0.0.0"), 0));
    assert_eq!(p.routes[0].gateway, Some(ip("10.88.0.1")));
    assert_eq!(p.routes[1].destination, (ip("10.99.0.0"), 16));
    assert_eq!(p.routes[1].scope, plan::SCOPE_LINK);
    assert_eq!(p.routes[1].source, Some(ip("10.88.0.5")));
    assert_eq!(p.routes[2].destination, (ip("::"), 0), "IPv6 default");
    assert_eq!(p.neighbors[0].device, 0);
    assert_eq!(
        plan::plan(&pb::CreateSandboxRequest::new()).unwrap(),
        Plan::default(),
        "no network: loopback only"
    );
}

#[test]
fn each_bad_field_is_named() {
    type Edit = fn(&mut pb::CreateSandboxRequest);
    let cases: &[(Edit, &str)] = &[
        (
            |r| r.interfaces[0].name = String::new(),
            "interfaces[0].name",
        ),
        (
            |r| r.interfaces[0].name = "a-very-long-name".into(),
            "interfaces[0].name",
        ),
        (
            |r| r.interfaces[0].name = "a/b".into(),
            "interfaces[0].name",
        ),
        (
            |r| r.interfaces[0].name = "a b".into(),
            "interfaces[0].name",
        ),
        (
            |r| r.interfaces[0].name = "a\0".into(),
            "interfaces[0].name",
        ),
        (|r| r.interfaces[0].name = "..".into(), "interfaces[0].name"),
        (|r| r.interfaces[0].name = "lo".into(), "loopback"),
        (
            |r| r.interfaces[0].mac = "02:00:00:00:00".into(),
            "interfaces[0].mac",
        ),
        (
            |r| r.interfaces[0].mac = "02:00:00:00:00:aa:bb".into(),
            "interfaces[0].mac",
        ),
        (
            |r| r.interfaces[0].mac = "02:00:00:00:00:+a".into(),
            "interfaces[0].mac",
        ),
        (
            |r| r.interfaces[0].mac = "02-00-00-00-00-aa".into(),
            "interfaces[0].mac",
        ),
        (
            |r| r.interfaces[0].mac = "03:00:00:00:00:aa".into(),
            "interfaces[0].mac \"03:00:00:00:00:aa\" is not a NIC's address",
        ),
        (
            |r| r.interfaces[0].mac = "00:00:00:00:00:00".into(),
            "interfaces[0].mac",
        ),
        (
            |r| r.interfaces[0].device_mac = "02:00:00:00:00".into(),
            "interfaces[0].device_mac",
        ),
        (
            |r| r.interfaces[0].device_mac = "ff:ff:ff:ff:ff:ff".into(),
            "interfaces[0].device_mac",
        ),
        (
            |r| {
                let mut i = r.interfaces[0].clone();
                i.name = "eth1".into();
                i.mac = "02:00:00:00:00:bb".into();
                i.device_mac = "02:00:00:00:00:AA".into();
                r.interfaces.push(i)
            },
            "interfaces[1]: NIC 02:00:00:00:00:aa is given twice",
        ),
        (|r| r.interfaces[0].mtu = 67, "interfaces[0].mtu"),
        (|r| r.interfaces[0].mtu = 65536, "interfaces[0].mtu"),
        (
            |r| r.interfaces[0].addresses[0].address = "10.88.0".into(),
            "interfaces[0].addresses[0].address",
        ),
        (
            |r| r.interfaces[0].addresses[0].prefix_len = 33,
            "interfaces[0].addresses[0].prefix_len",
        ),
        (
            |r| r.interfaces[0].addresses[1].prefix_len = 129,
            "interfaces[0].addresses[1].prefix_len",
        ),
        (
            |r| r.interfaces[0].addresses[1] = r.interfaces[0].addresses[0].clone(),
            "given twice",
        ),
        (
            |r| r.interfaces[0].addresses[0].address = "0.0.0.0".into(),
            "cannot be an interface's",
        ),
        (
            |r| {
                let i = r.interfaces[0].clone();
                r.interfaces.push(i)
            },
            "interfaces[1].name \"eth0\" is given twice",
        ),
        (
            |r| {
                let mut i = r.interfaces[0].clone();
                i.name = "eth1".into();
                r.interfaces.push(i)
            },
            "interfaces[1].mac",
        ),
        (
            |r| r.routes[0].destination = "10.0.0.0/33".into(),
            "routes[0].destination",
        ),
        (
            |r| r.routes[0].destination = "10.0.0.1/24".into(),
            "beyond its prefix",
        ),
        (
            |r| r.routes[0].destination = "10.0.0.0/".into(),
            "routes[0].destination",
        ),
        (
            |r| r.routes[0].destination = "fd00::/64".into(),
            "routes[0].gateway",
        ),
        (
            |r| r.routes[0].gateway = "10.88.0.256".into(),
            "routes[0].gateway",
        ),
        (
            |r| r.routes[0].gateway = "0.0.0.0".into(),
            "routes[0].gateway",
        ),
        (
            |r| r.routes[0].device = "eth1".into(),
            "routes[0].device \"eth1\" is not one of",
        ),
        (|r| r.routes[0].device = "lo".into(), "routes[0].device"),
        (|r| r.routes[0].device = String::new(), "routes[0].device"),
        (
            |r| r.routes[0].source = "fd00::5".into(),
            "routes[0].source",
        ),
        (|r| r.routes[0].scope = 200, "routes[0].scope"),
        (
            |r| r.routes[0].scope = 253,
            "routes[0]: a route with a gateway",
        ),
        (
            |r| r.neighbors[0].address = "x".into(),
            "neighbors[0].address",
        ),
        (|r| r.neighbors[0].mac = "".into(), "neighbors[0].mac"),
        (
            |r| r.neighbors[0].device = "eth9".into(),
            "neighbors[0].device",
        ),
        (
            |r| {
                let i = r.interfaces[0].clone();
                r.interfaces = vec![i; 17]
            },
            "over 16 interfaces",
        ),
        (
            |r| {
                let a = r.interfaces[0].addresses[0].clone();
                r.interfaces[0].addresses = vec![a; 33]
            },
            "over 32 addresses",
        ),
        (
            |r| {
                let x = r.routes[0].clone();
                r.routes = vec![x; 257]
            },
            "over 256 routes",
        ),
        (
            |r| {
                let x = r.neighbors[0].clone();
                r.neighbors = vec![x; 257]
            },
            "over 256 neighbors",
        ),
    ];
    for (i, (edit, want)) in cases.iter().enumerate() {
        let mut r = good();
        edit(&mut r);
        let err = plan::plan(&r).expect_err(&format!("case {i} ({want}) passed"));
        assert!(
            err.contains(want),
            "case {i}: {err:?} does not name {want:?}"
        );
    }
}

#[test]
fn destinations_and_macs_parse() {
    let mut r = good();
    r.routes[1].destination = "10.99.0.7".into(); // a host route
    r.interfaces[0].mac = "02:00:00:00:00:AA".into();
    let p = plan::plan(&r).unwrap();
    assert_eq!(p.routes[1].destination, (ip("10.99.0.7"), 32));
    assert_eq!(plan::mac_string(&p.interfaces[0].mac), "02:00:00:00:00:aa");
    assert_eq!(
        p.interfaces[0].device_mac, p.interfaces[0].mac,
        "no device_mac: mac"
    );
    r.interfaces[0].device_mac = "52:54:00:12:34:56".into();
    let p = plan::plan(&r).unwrap();
    assert_eq!(
        p.interfaces[0].device_mac,
        [0x52, 0x54, 0, 0x12, 0x34, 0x56]
    );
    assert_eq!(p.interfaces[0].mac, [2, 0, 0, 0, 0, 0xaa]);
    // Two NICs trading their MACs: each MAC is still given once.
    let mut i = r.interfaces[0].clone();
    i.name = "eth1".into();
    i.mac = "52:54:00:12:34:56".into();
    i.device_mac = "02:00:00:00:00:aa".into();
    i.addresses.clear();
    r.interfaces.push(i);
    assert!(plan::plan(&r).is_ok());
}

/// The attributes of an encoded request, after its fixed header of
/// `fixed` bytes.
fn attrs_of(bytes: &[u8], fixed: usize) -> Vec<(u16, Vec<u8>)> {
    let (_, payload, rest) = testing::split_message(bytes).unwrap();
    assert!(rest.is_empty());
    testing::attrs(&payload[fixed..])
        .map(|(t, d)| (t, d.to_vec()))
        .collect()
}

#[test]
fn link_request_is_encoded() {
    let b = netlink::set_link(7, Some("eth0"), Some(1400), Some(true)).encode(42);
    let mut want = Vec::new();
    want.extend_from_slice(&52u32.to_ne_bytes()); // 16 + 16 + 12 + 8
    want.extend_from_slice(&16u16.to_ne_bytes()); // RTM_NEWLINK
    want.extend_from_slice(&5u16.to_ne_bytes()); // REQUEST | ACK
    want.extend_from_slice(&42u32.to_ne_bytes());
    want.extend_from_slice(&0u32.to_ne_bytes());
    want.extend_from_slice(&[0, 0, 0, 0]); // family, pad, type
    want.extend_from_slice(&7u32.to_ne_bytes());
    want.extend_from_slice(&1u32.to_ne_bytes()); // IFF_UP
    want.extend_from_slice(&1u32.to_ne_bytes()); // change: IFF_UP
    want.extend_from_slice(&9u16.to_ne_bytes());
    want.extend_from_slice(&3u16.to_ne_bytes()); // IFLA_IFNAME
    want.extend_from_slice(b"eth0\0\0\0\0");
    want.extend_from_slice(&8u16.to_ne_bytes());
    want.extend_from_slice(&4u16.to_ne_bytes()); // IFLA_MTU
    want.extend_from_slice(&1400u32.to_ne_bytes());
    assert_eq!(b, want);
    // The address alone: no flags changed, IFLA_ADDRESS.
    let b = netlink::set_address(7, &[2, 0, 0, 0, 0, 0xcc]).encode(1);
    assert_eq!(
        &b[20..32],
        &[7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
        "index, no flags"
    );
    assert_eq!(attrs_of(&b, 16), vec![(1, vec![2, 0, 0, 0, 0, 0xcc])]);
    // Down only: IFF_UP changed to 0, no attributes.
    let b = netlink::set_link(7, None, None, Some(false)).encode(1);
    assert_eq!(b.len(), 32);
    assert_eq!(&b[24..28], &0u32.to_ne_bytes(), "flags");
    assert_eq!(&b[28..32], &1u32.to_ne_bytes(), "change: IFF_UP");
}

#[test]
fn address_route_and_neighbour_requests_are_encoded() {
    let b = netlink::add_address(3, ip("10.88.0.5"), 24).encode(1);
    assert_eq!(
        &b[16..20],
        &[2, 24, 0, 0],
        "AF_INET, /24, no flags, scope 0"
    );
    assert_eq!(
        attrs_of(&b, 8),
        vec![
            (2, vec![10, 88, 0, 5]),   // IFA_LOCAL
            (1, vec![10, 88, 0, 5]),   // IFA_ADDRESS
            (4, vec![10, 88, 0, 255]), // IFA_BROADCAST
        ]
    );
    let b = netlink::add_address(3, ip("fd00::5"), 64).encode(1);
    assert_eq!(&b[16..20], &[10, 64, 2, 0], "AF_INET6, /64, IFA_F_NODAD");
    assert_eq!(attrs_of(&b, 8).len(), 2, "no broadcast for IPv6");

    let b = netlink::add_route(&RouteSpec {
        destination: (ip("0.0.0.0"), 0),
        gateway: Some(ip("10.88.0.1")),
        index: 3,
        source: None,
        scope: 0,
    })
    .encode(1);
    // family, dst_len, src_len, tos, table main, proto boot, scope, unicast
    assert_eq!(&b[16..24], &[2, 0, 0, 0, 254, 3, 0, 1]);
    assert_eq!(
        attrs_of(&b, 12),
        vec![
            (15, 254u32.to_ne_bytes().to_vec()), // RTA_TABLE
            (5, vec![10, 88, 0, 1]),             // RTA_GATEWAY; no RTA_DST
            (4, 3u32.to_ne_bytes().to_vec()),    // RTA_OIF
        ]
    );
    let b = netlink::add_route(&RouteSpec {
        destination: (ip("10.99.0.0"), 16),
        gateway: None,
        index: 3,
        source: Some(ip("10.88.0.5")),
        scope: 253,
    })
    .encode(1);
    assert_eq!(&b[16..24], &[2, 16, 0, 0, 254, 3, 253, 1]);
    let a = attrs_of(&b, 12);
    assert!(a.contains(&(1, vec![10, 99, 0, 0])), "RTA_DST");
    assert!(a.contains(&(7, vec![10, 88, 0, 5])), "RTA_PREFSRC");

    let b = netlink::add_neighbor(3, ip("10.88.0.1"), &[2, 0, 0, 0, 0, 1]).encode(1);
    let flags = u16::from_ne_bytes([b[6], b[7]]);
    assert_eq!(
        flags,
        0x1 | 0x4 | 0x400 | 0x100,
        "REQUEST|ACK|CREATE|REPLACE"
    );
    assert_eq!(u16::from_ne_bytes([b[24], b[25]]), 0x80, "NUD_PERMANENT");
    assert_eq!(
        attrs_of(&b, 12),
        vec![(1, vec![10, 88, 0, 1]), (2, vec![2, 0, 0, 0, 0, 1])]
    );
}

#[test]
fn answers_are_parsed_without_trusting_lengths() {
    // An RTM_NEWLINK answer: ifinfomsg, IFLA_IFNAME, IFLA_ADDRESS.
    let mut m = vec![0u8, 0, 1, 0];
    m.extend_from_slice(&5u32.to_ne_bytes());
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(&8u16.to_ne_bytes());
    m.extend_from_slice(&3u16.to_ne_bytes());
    m.extend_from_slice(b"v0\0\0");
    m.extend_from_slice(&10u16.to_ne_bytes());
    m.extend_from_slice(&1u16.to_ne_bytes());
    m.extend_from_slice(&[2, 0, 0, 0, 0, 0xaa, 0, 0]);
    let l = testing::parse_link(&m).unwrap();
    assert_eq!((l.index, l.name.as_str()), (5, "v0"));
    assert_eq!(l.mac, Some([2, 0, 0, 0, 0, 0xaa]));
    // Cut anywhere: no panic, and never a link without its name.
    for n in 0..m.len() {
        let _ = testing::parse_link(&m[..n]);
    }
    // A message whose length claims more than was received.
    let mut bad = 100u32.to_ne_bytes().to_vec();
    bad.extend_from_slice(&[0; 12]);
    assert!(testing::split_message(&bad).is_none());
    let mut short = 8u32.to_ne_bytes().to_vec();
    short.extend_from_slice(&[0; 12]);
    assert!(
        testing::split_message(&short).is_none(),
        "shorter than a header"
    );
}

#[test]
fn kernel_errors_carry_errno_and_reason() {
    assert!(
        testing::error_answer(0, &0i32.to_ne_bytes()).is_ok(),
        "the ack"
    );
    // error, the request's header (NETLINK_CAP_ACK), NLMSGERR_ATTR_MSG.
    let mut p = (-libc::ENETUNREACH).to_ne_bytes().to_vec();
    p.extend_from_slice(&[0; 16]);
    p.extend_from_slice(&12u16.to_ne_bytes());
    p.extend_from_slice(&1u16.to_ne_bytes());
    p.extend_from_slice(b"Nexthop\0");
    let e = testing::error_answer(0x200, &p).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENETUNREACH));
    assert!(e.to_string().ends_with("(Nexthop)"), "{e}");
    assert!(testing::error_answer(0, &[1, 2]).is_err(), "truncated");
}

/// Runs `ip args` and returns its JSON output.
fn ip_json(args: &[&str]) -> Value {
    let out = Command::new("ip").arg("-j").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {:?}", out);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sh(cmd: &str) {
    let ok = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(ok.success(), "{cmd}");
}

/// The set-up for real, in a network namespace of this test's thread:
/// two veth NICs whose names are the other's wanted one (as when the
/// guest's kernel names NICs in another order).
#[test]
fn configures_a_network_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED configures_a_network_namespace: needs root (network namespaces)");
        return;
    }
    std::thread::spawn(|| {
        crate::sys::unshare(rustix::thread::UnshareFlags::NEWNET).unwrap();
        // The veth peers are up so that the NICs have a carrier.
        sh(
            "ip link add eth1 address 02:00:00:00:00:aa type veth peer name p0 && \
            ip link add eth0 address 02:00:00:00:00:bb type veth peer name p1 && \
            ip link set p0 up && ip link set p1 up",
        );
        let mut req = good();
        req.interfaces
            .push(iface("eth1", "02:00:00:00:00:bb", 0, &[("10.77.0.2", 30)]));
        let p = plan::plan(&req).unwrap();
        super::configure(&p).unwrap();
        check();
        // Again: what is there already is no error.
        super::configure(&p).unwrap();
        check();

        let mut missing = req.clone();
        missing.interfaces[1].mac = "02:00:00:00:00:cc".into();
        let err = super::configure(&plan::plan(&missing).unwrap()).unwrap_err();
        assert!(
            matches!(err, super::NetError::NoNic { ref name, .. } if name == "eth1"),
            "{err}"
        );
        let mut unreachable = req.clone();
        unreachable
            .routes
            .push(route("10.50.0.0/16", "192.168.9.1", "eth0", "", 0));
        let err = super::configure(&plan::plan(&unreachable).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("route 10.50.0.0/16 via 192.168.9.1 dev eth0"),
            "{err}"
        );
    })
    .join()
    .unwrap();
}

/// A VM restored from a template: its NICs have the template's MACs
/// (device_mac), and get the pod's. Two NICs trade MACs, which shows the
/// NICs are found by what they had before any change; one keeps its own.
/// Each ends with its `mac`, read back from the kernel.
#[test]
fn a_nic_found_by_device_mac_gets_the_pods_mac() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED a_nic_found_by_device_mac_gets_the_pods_mac: needs root");
        return;
    }
    std::thread::spawn(|| {
        crate::sys::unshare(rustix::thread::UnshareFlags::NEWNET).unwrap();
        sh(
            "ip link add t0 address 52:54:00:00:00:01 type veth peer name p0 && \
            ip link add t1 address 52:54:00:00:00:02 type veth peer name p1 && \
            ip link add t2 address 52:54:00:00:00:03 type veth peer name p2 && \
            ip link set p0 up && ip link set p1 up && ip link set t0 up",
        );
        let index = |name: &str| ip_json(&["link", "show", name])[0]["ifindex"].clone();
        let (t0, t1, t2) = (index("t0"), index("t1"), index("t2"));
        let mut req = pb::CreateSandboxRequest::new();
        let mut a = iface("eth0", "0a:58:0a:58:00:05", 0, &[("10.88.0.5", 24)]);
        a.device_mac = "52:54:00:00:00:01".into();
        let mut b = iface("eth1", "52:54:00:00:00:01", 0, &[]);
        b.device_mac = "52:54:00:00:00:02".into();
        let mut c = iface("eth2", "52:54:00:00:00:03", 0, &[]);
        c.device_mac = "52:54:00:00:00:03".into(); // its own: nothing to change
        req.interfaces = vec![a, b, c];
        req.routes
            .push(route("default", "10.88.0.1", "eth0", "", 0));

        let mut missing = req.clone();
        missing.interfaces[1].device_mac = "52:54:00:00:00:09".into();
        let err = super::configure(&plan::plan(&missing).unwrap()).unwrap_err();
        assert!(
            matches!(err, super::NetError::NoNic { ref name, ref mac }
                if name == "eth1" && mac == "52:54:00:00:00:09"),
            "{err}"
        );

        super::configure(&plan::plan(&req).unwrap()).unwrap();
        let links = ip_json(&["link", "show"]);
        let link = |name: &str| {
            links
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["ifname"] == name)
                .unwrap_or_else(|| panic!("no {name} in {links}"))
                .clone()
        };
        let up = |l: &Value| l["flags"].as_array().unwrap().iter().any(|f| f == "UP");
        let eth0 = link("eth0");
        assert_eq!(eth0["ifindex"], t0, "eth0 is the NIC that had ..:01");
        assert_eq!(eth0["address"], "0a:58:0a:58:00:05");
        assert!(up(&eth0), "{eth0}");
        let eth1 = link("eth1");
        assert_eq!(eth1["ifindex"], t1, "eth1 is the NIC that had ..:02");
        assert_eq!(eth1["address"], "52:54:00:00:00:01");
        assert!(up(&eth1), "{eth1}");
        let eth2 = link("eth2");
        assert_eq!(eth2["ifindex"], t2);
        assert_eq!(eth2["address"], "52:54:00:00:00:03");
        let routes = ip_json(&["route", "show", "default"]);
        assert_eq!(routes[0]["dev"], "eth0", "{routes}");
        assert_eq!(routes[0]["gateway"], "10.88.0.1", "{routes}");

        // The NICs now have the pod's MACs: the template's are gone.
        let err = super::configure(&plan::plan(&req).unwrap()).unwrap_err();
        assert!(matches!(err, super::NetError::NoNic { .. }), "{err}");
    })
    .join()
    .unwrap();
}

fn check() {
    let links = ip_json(&["link", "show"]);
    let link = |name: &str| {
        links
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["ifname"] == name)
            .unwrap_or_else(|| panic!("no {name} in {links}"))
            .clone()
    };
    let lo = link("lo");
    assert!(
        lo["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{lo}"
    );
    let eth0 = link("eth0");
    assert_eq!(eth0["address"], "02:00:00:00:00:aa");
    assert_eq!(eth0["mtu"], 1400);
    assert!(eth0["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    let eth1 = link("eth1");
    assert_eq!(eth1["address"], "02:00:00:00:00:bb");
    assert_eq!(eth1["mtu"], 1500, "mtu 0 leaves the driver's");

    let addrs = ip_json(&["addr", "show", "dev", "eth0"]);
    let infos: Vec<(String, u64)> = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["local"].as_str().unwrap().to_string(),
                a["prefixlen"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(infos.contains(&("10.88.0.5".into(), 24)), "{infos:?}");
    assert!(infos.contains(&("fd00::5".into(), 64)), "{infos:?}");
    let v4 = &addrs[0]["addr_info"][0];
    assert_eq!(v4["broadcast"], "10.88.0.255");

    let routes = ip_json(&["route", "show"]);
    let has = |dst: &str, gw: Option<&str>| {
        routes.as_array().unwrap().iter().any(|r| {
            r["dst"] == dst
                && r["dev"] == "eth0"
                && gw.map_or(r["gateway"].is_null(), |g| r["gateway"] == g)
        })
    };
    assert!(has("default", Some("10.88.0.1")), "{routes}");
    assert!(has("10.99.0.0/16", None), "{routes}");
    assert!(
        has("10.88.0.0/24", None),
        "the kernel's prefix route: {routes}"
    );
    let routes6 = ip_json(&["-6", "route", "show"]);
    assert!(
        routes6
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "fd00::1"),
        "{routes6}"
    );

    let neigh = ip_json(&["neigh", "show", "dev", "eth0"]);
    assert!(
        neigh
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["dst"] == "10.88.0.1"
                && n["lladdr"] == "02:00:00:00:00:01"
                && n["state"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|x| x == "PERMANENT"))),
        "{neigh}"
    );
}
