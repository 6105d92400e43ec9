//! The agent's sandbox-level calls on the host, as an ordinary process on a
//! Unix socket (see common/mod.rs): CreateSandbox (hostname, sysctls, the
//! pod network in the agent's own network namespace), guest details,
//! CopyFile and DestroySandbox. host.rs has the containers.

mod common;

use common::{ctx, TestAgent};
use husk_protocols::agent as pb;
use husk_protocols::ttrpc::Code;
use std::time::{Duration, Instant};

#[test]
fn sandbox_guest_details_and_copy_file() {
    let Some(a) = TestAgent::start() else { return };
    let d = a
        .client
        .get_guest_details(ctx(), &pb::Empty::new())
        .unwrap();
    assert_eq!(
        d.kernel_release,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );
    assert_eq!(d.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(!d.pid1);

    let mut r = pb::CreateSandboxRequest::new();
    r.hostname = "bad host!".into();
    assert!(a.client.create_sandbox(ctx(), &r).is_err());
    r.hostname = "pod-1".into();
    // Entropy: 32 to 512 bytes or none; another size changes nothing.
    for bad in [1, 31, 513] {
        r.entropy = vec![7; bad];
        let (c, msg) = common::code(a.client.create_sandbox(ctx(), &r));
        assert_eq!(c, Code::INVALID_ARGUMENT, "{bad}: {msg}");
        assert!(msg.contains(&format!("entropy: {bad} bytes")), "{msg}");
    }
    r.entropy = vec![7; husk_protocols::guest::ENTROPY_SENT];
    let mut itf = pb::Interface::new();
    itf.name = "eth0".into();
    itf.mac = "02:00:00:00:00".into();
    r.interfaces.push(itf);
    let (c, msg) = common::code(a.client.create_sandbox(ctx(), &r));
    assert_eq!(c, Code::INVALID_ARGUMENT);
    assert!(msg.contains("interfaces[0].mac"), "{msg}");
    // In the host's network namespace the network is checked, not set up:
    // no NIC has this MAC, and that is no error.
    r.interfaces[0].mac = "02:00:00:00:00:99".into();
    a.client.create_sandbox(ctx(), &r).unwrap();
    let (c, _) = common::code(a.client.create_sandbox(ctx(), &r));
    assert_eq!(c, Code::ALREADY_EXISTS);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_ne!(host.trim(), "pod-1", "the host's hostname is left alone");

    // CopyFile writes under HOST_FILES_DIR, which is the harness's
    // host-files folder for an agent on the host.
    let dir = common::host_files(&a.sock);
    let path = dir.join("sub/file");
    let mut r = pb::CopyFileRequest::new();
    r.path = format!("{}/sub/file", husk_protocols::guest::HOST_FILES_DIR);
    r.file_size = 10;
    r.file_mode = 0o640;
    r.data = b"hello".to_vec();
    a.client.copy_file(ctx(), &r).unwrap();
    r.offset = 5;
    r.data = b"world".to_vec();
    a.client.copy_file(ctx(), &r).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"helloworld");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    r.offset = 8;
    assert!(a.client.copy_file(ctx(), &r).is_err(), "beyond file_size");
    r.offset = 0;
    r.path = "/tmp/../etc/x".into();
    assert!(a.client.copy_file(ctx(), &r).is_err(), "dotdot");
    // Outside the folder: refused, not written.
    let stray = std::env::temp_dir().join(format!("husk-copy-{}", std::process::id()));
    r.path = stray.to_string_lossy().into_owned();
    let (c, msg) = common::code(a.client.copy_file(ctx(), &r));
    assert_eq!(c, Code::INVALID_ARGUMENT, "{msg}");
    assert!(!stray.exists());
    // A symlink planted in the folder leads nowhere outside it.
    std::os::unix::fs::symlink(&stray, dir.join("planted")).unwrap();
    r.path = format!("{}/planted", husk_protocols::guest::HOST_FILES_DIR);
    let _ = a.client.copy_file(ctx(), &r);
    assert!(!stray.exists(), "a planted symlink led the write out");
}

/// An agent in a network namespace of its own (not PID 1) sets up the
/// pod's network there: a veth NIC found by its device MAC, given the
/// pod's MAC, renamed, addressed and routed.
#[test]
fn sandbox_network_in_the_agents_own_namespace() {
    let Some(a) = TestAgent::start_with(|agent, sock, cgroup_parent| {
        let mut c = std::process::Command::new("unshare");
        c.arg("--net")
            .arg(agent)
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--cgroup-parent")
            .arg(cgroup_parent)
            .stdout(std::process::Stdio::null());
        c
    }) else {
        return;
    };
    let netns = format!("--net=/proc/{}/ns/net", a.pid());
    let in_ns = |cmd: &str| {
        let out = std::process::Command::new("nsenter")
            .args([netns.as_str(), "sh", "-c", cmd])
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    in_ns("ip link add v0 address 02:00:00:00:00:ab type veth peer name p0 && ip link set p0 up");

    let mut r = pb::CreateSandboxRequest::new();
    let mut itf = pb::Interface::new();
    itf.name = "eth0".into();
    itf.mac = "02:00:00:00:00:ab".into();
    itf.mtu = 1400;
    let mut addr = pb::IpAddress::new();
    addr.address = "10.88.0.5".into();
    addr.prefix_len = 24;
    itf.addresses.push(addr);
    r.interfaces.push(itf);
    let mut route = pb::Route::new();
    route.gateway = "10.88.0.1".into();
    route.device = "eth0".into();
    r.routes.push(route);
    let mut missing = r.clone();
    missing.interfaces[0].mac = "02:00:00:00:00:ac".into();
    let (c, msg) = common::code(a.client.create_sandbox(ctx(), &missing));
    assert_eq!(c, Code::FAILED_PRECONDITION);
    assert!(msg.contains("no NIC with MAC 02:00:00:00:00:ac"), "{msg}");
    // As in a VM restored from a template: the NIC has the template's MAC
    // (device_mac) and gets the pod's (mac).
    r.interfaces[0].mac = "0a:58:0a:58:00:05".into();
    r.interfaces[0].device_mac = "02:00:00:00:00:ac".into();
    let (c, msg) = common::code(a.client.create_sandbox(ctx(), &r));
    assert_eq!(c, Code::FAILED_PRECONDITION);
    assert!(msg.contains("no NIC with MAC 02:00:00:00:00:ac"), "{msg}");
    r.interfaces[0].device_mac = "02:00:00:00:00".into();
    let (c, msg) = common::code(a.client.create_sandbox(ctx(), &r));
    assert_eq!(c, Code::INVALID_ARGUMENT);
    assert!(msg.contains("interfaces[0].device_mac"), "{msg}");
    r.interfaces[0].device_mac = "02:00:00:00:00:ab".into();

    a.client.create_sandbox(ctx(), &r).unwrap();
    let link: serde_json::Value = serde_json::from_str(&in_ns("ip -j addr show eth0")).unwrap();
    assert_eq!(link[0]["address"], "0a:58:0a:58:00:05", "the pod's MAC");
    assert_eq!(link[0]["mtu"], 1400);
    assert_eq!(link[0]["addr_info"][0]["local"], "10.88.0.5");
    let routes = in_ns("ip route show default");
    assert!(
        routes.contains("default via 10.88.0.1 dev eth0"),
        "{routes}"
    );
    let lo = in_ns("ip -o link show lo");
    assert!(lo.contains("UP"), "{lo}");
}

#[test]
fn destroy_sandbox_kills_containers_and_ends_the_agent() {
    let Some(mut a) = TestAgent::start() else {
        return;
    };
    a.create("c", &["sleep", "100"]);
    a.start_c("c").unwrap();
    a.client
        .destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new())
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = a.try_exit() {
            assert!(status.success());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "agent still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!a.cgroup_base().join("c").exists());
}
