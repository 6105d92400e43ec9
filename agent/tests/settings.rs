//! What a container's OCI spec settings do to its process (user, umask,
//! rlimits, capabilities, sysctls, masked paths, user namespaces), with the
//! agent on the host as an ordinary process (see common/mod.rs), and the
//! same spec under runc where runc is installed.

mod common;

use common::TestAgent;
use serde_json::json;

/// A spec exercising the process settings, and the output they give.
fn settings_spec() -> serde_json::Value {
    let mut s = common::spec(&[
        "sh",
        "-c",
        "id -u; id -G; umask; ulimit -n; pwd; echo $FOO; \
         grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; \
         cat /proc/self/oom_score_adj; cat /proc/sys/net/ipv4/ip_forward; \
         touch /rootfile 2>/dev/null || echo ro-root; \
         echo 1 > /proc/sys/kernel/domainname 2>/dev/null || echo ro-procsys; \
         wc -c < /etc/group",
    ]);
    s["process"]["user"] =
        json!({"uid": 65534, "gid": 65534, "additionalGids": [10, 20], "umask": 63});
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 123}]);
    s["process"]["oomScoreAdj"] = json!(500);
    s["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
    s["linux"]["maskedPaths"] = json!(["/etc/group", "/proc/kcore"]);
    s
}

/// The process settings of config.json, as runc applies them.
#[test]
fn spec_settings_reach_the_process() {
    let Some(a) = TestAgent::start() else { return };
    let s = settings_spec();
    let (out, err, status) = {
        a.create_spec("settings", &s).unwrap();
        a.close_stdin("settings", "");
        a.start_c("settings").unwrap();
        let out = a.read_all("settings", "", false);
        let err = a.read_all("settings", "", true);
        (out, err, a.wait("settings", ""))
    };
    let want = "65534\n65534 10 20\n0077\n123\n/tmp\nbar\n\
                CapEff:\t0000000000000000\nCapBnd:\t0000000020000420\nNoNewPrivs:\t1\n\
                500\n1\nro-root\nro-procsys\n0\n";
    assert_eq!(out, want, "stderr: {err}");
    assert_eq!(status, 0);
    a.remove("settings", false).unwrap();
}

/// Pod containers join the first container's network, IPC and UTS
/// namespaces; pid and mount namespaces stay their own.
/// The same config.json through runc (where installed) gives the same
/// output as through the agent.
#[test]
fn settings_match_runc() {
    let Some(a) = TestAgent::start() else { return };
    let runc_ok = std::process::Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runc_ok {
        eprintln!("SKIP: runc is not installed");
        return;
    }
    let s = settings_spec();
    let (agent_out, _, _) = {
        a.create_spec("cmp", &s).unwrap();
        a.close_stdin("cmp", "");
        a.start_c("cmp").unwrap();
        let out = a.read_all("cmp", "", false);
        let st = a.wait("cmp", "");
        a.remove("cmp", false).unwrap();
        (out, (), st)
    };
    let dir = common::scratch().join(format!("husk-runc-bundle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rs = s.clone();
    rs["root"]["path"] = json!(common::rootfs());
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&rs).unwrap()).unwrap();
    let out = std::process::Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&dir)
        .arg(format!("husk-cmp-{}", std::process::id()))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "runc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(agent_out, String::from_utf8_lossy(&out.stdout));
}

/// A user namespace mapping the container's root to an unprivileged host
/// range; execs join it.
#[test]
fn user_namespace_maps_root() {
    let Some(a) = TestAgent::start() else { return };
    let mut s = common::spec(&[
        "sh",
        "-c",
        "id -u; tr -s ' ' < /proc/self/uid_map; tr -s ' ' < /proc/self/gid_map; read x || exit 0",
    ]);
    let ns = s["linux"]["namespaces"].as_array_mut().unwrap();
    ns.push(json!({"type": "user"}));
    s["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    s["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    a.create_spec("userns", &s).unwrap();
    a.start_c("userns").unwrap();
    a.exec(
        "userns",
        "e",
        &["sh", "-c", "id -u; tr -s ' ' < /proc/self/uid_map"],
        false,
    )
    .unwrap();
    a.close_stdin("userns", "e");
    assert_eq!(a.read_all("userns", "e", false), "0\n 0 100000 65536\n");
    assert_eq!(a.wait("userns", "e"), 0);
    // The host sees the container's root as the mapped uid.
    let pid = a.pids("userns")[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("\nUid:\t100000\t"), "{status}");
    a.close_stdin("userns", "");
    let out = a.read_all("userns", "", false);
    let err = a.read_all("userns", "", true);
    assert_eq!(
        out, "0\n 0 100000 65536\n 0 100000 65536\n",
        "stderr: {err}"
    );
    assert_eq!(a.wait("userns", ""), 0);
    a.remove("userns", false).unwrap();
}

/// `rootfsPropagation: rshared` with an rshared volume, as containerd asks
/// for a Bidirectional mount: the root turns shared after pivot_root (which
/// refuses a new root whose parent mount is shared) and the volume's
/// writes reach the host.
#[test]
fn rshared_root_and_volume() {
    let Some(a) = TestAgent::start() else { return };
    let vol = common::scratch().join(format!("husk-rshared-vol-{}", std::process::id()));
    std::fs::create_dir_all(&vol).unwrap();
    let mut s = common::spec(&[
        "sh",
        "-c",
        "echo hi > /vol/out; grep -E '^[0-9]+ [0-9]+ [^ ]+ [^ ]+ / ' /proc/self/mountinfo",
    ]);
    s["linux"]["rootfsPropagation"] = json!("rshared");
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/vol", "type": "bind", "source": vol,
                     "options": ["rbind", "rshared", "rw"]}));
    a.create_spec("rshared", &s).unwrap();
    a.close_stdin("rshared", "");
    a.start_c("rshared").unwrap();
    let out = a.read_all("rshared", "", false);
    let err = a.read_all("rshared", "", true);
    assert_eq!(a.wait("rshared", ""), 0, "stderr: {err}");
    a.remove("rshared", false).unwrap();
    let written = std::fs::read_to_string(vol.join("out"));
    std::fs::remove_dir_all(&vol).unwrap();
    assert_eq!(written.unwrap(), "hi\n");
    assert!(out.contains(" shared:"), "the root is not shared: {out}");
}
