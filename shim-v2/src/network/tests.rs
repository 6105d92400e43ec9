//! PodNetwork on the host's real kernel: a network namespace with a veth
//! as CNI's bridge plugin leaves it, set up and torn down with the real
//! `ip` and `tc`. Needs root (CI runs as root); says so and does nothing
//! otherwise.

use std::path::PathBuf;
use std::process::Command;

use super::*;

fn ip(args: &[&str]) -> String {
    let out = Command::new(netns::find_tool("ip"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named netns with `eth0` (MAC, MTU 1400, 10.99.<n>.5/24, a default
/// route and a permanent neighbour); deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new(n: u8) -> TestNetns {
        let name = format!("husk-nettest-{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let host = format!("hv{}-{n}", std::process::id() % 100_000);
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        let addr = format!("10.99.{n}.5/24");
        let gw = format!("10.99.{n}.1");
        for args in [
            vec![
                "link",
                "set",
                "eth0",
                "address",
                "02:42:0a:63:00:05",
                "mtu",
                "1400",
                "up",
            ],
            vec!["addr", "add", &addr, "dev", "eth0"],
            vec!["route", "add", "default", "via", &gw],
            vec![
                "neigh",
                "add",
                &gw,
                "lladdr",
                "02:42:0a:63:00:01",
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        ] {
            let mut a = vec!["-n", &name];
            a.extend(args);
            ip(&a);
        }
        TestNetns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", &self.name];
        a.extend(args);
        ip(&a)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new(netns::find_tool("ip"))
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("not root: the pod network test needs a network namespace; not run");
    false
}

#[test]
fn setup_joins_a_tap_and_teardown_removes_it() {
    if !root() {
        return;
    }
    let ns = TestNetns::new(1);
    let owner = crate::sandbox::jail::JailUser {
        uid: 65500,
        gid: 65501,
    };
    let mut net = PodNetwork::setup(&ns.path(), Some(owner)).unwrap();
    let g = &net.guest;
    assert_eq!(g.interfaces.len(), 1);
    let i = &g.interfaces[0];
    assert_eq!(
        (i.name.as_str(), i.mac.as_str(), i.mtu),
        ("eth0", "02:42:0a:63:00:05", 1400)
    );
    assert_eq!(i.addresses[0].address, "10.99.1.5");
    assert_eq!(i.addresses[0].prefix_len, 24);
    assert!(g
        .routes
        .iter()
        .any(|r| r.destination == "default" && r.gateway == "10.99.1.1"));
    assert_eq!(g.neighbors[0].mac, "02:42:0a:63:00:01");
    let nics = net.nics();
    assert_eq!(nics[0].tap, "husk_tap0");
    assert_eq!(nics[0].mac.as_deref(), Some("02:42:0a:63:00:05"));

    let link = ns.ip(&["-d", "link", "show", "husk_tap0"]);
    assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
    // The jailed VMM's user may attach to it.
    assert!(
        link.contains("user 65500") && link.contains("group 65501"),
        "{link}"
    );
    let tc = |dev: &str| {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &ns.name, "tc", "filter", "show", "dev", dev, "ingress",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        tc("eth0").contains("Redirect to device husk_tap0"),
        "{}",
        tc("eth0")
    );
    assert!(
        tc("husk_tap0").contains("Redirect to device eth0"),
        "{}",
        tc("husk_tap0")
    );

    net.teardown();
    assert!(!ns.ip(&["link", "show"]).contains("husk_tap0"));
    assert!(!tc("eth0").contains("mirred"), "{}", tc("eth0"));
}

#[test]
fn a_netns_with_no_interface_is_refused_and_left_as_it_was() {
    if !root() {
        return;
    }
    let name = format!("husk-nettest-{}-empty", std::process::id());
    ip(&["netns", "add", &name]);
    let ns = TestNetns { name };
    let e = PodNetwork::setup(&ns.path(), None).err().unwrap();
    assert!(matches!(e, NetworkError::NoInterfaces), "{e}");
    assert_eq!(ns.ip(&["-o", "link", "show"]).lines().count(), 1, "only lo");
}
