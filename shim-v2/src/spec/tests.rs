use super::*;

fn cri(kind: &str, sandbox: &str) -> Value {
    json!({"annotations": {CONTAINER_TYPE: kind, SANDBOX_ID: sandbox}})
}

#[test]
fn roles_from_cri_annotations() {
    assert_eq!(Role::of("c1", &json!({})), Role::Standalone);
    assert_eq!(Role::of("p1", &cri("sandbox", "p1")), Role::PodSandbox);
    let r = Role::of("c1", &cri("container", "p1"));
    assert_eq!(
        r,
        Role::PodContainer {
            sandbox_id: "p1".into()
        }
    );
    assert_eq!(r.sandbox_id("c1"), "p1");
    assert_eq!(Role::PodSandbox.sandbox_id("p1"), "p1");
    assert_eq!(Role::of("c1", &cri("container", "")), Role::Standalone);
    assert_eq!(Role::of("c1", &cri("container", "c1")), Role::Standalone);
    assert_eq!(
        Role::of("c1", &json!({"annotations": {SANDBOX_ID: "p1"}})),
        Role::Standalone
    );
    assert_eq!(Role::of("c1", &json!({"annotations": 3})), Role::Standalone);
}

#[test]
fn ids_are_checked() {
    check_id("container", "abc-1.2_3").unwrap();
    check_id("container", &"a".repeat(76)).unwrap();
    for bad in ["", "..", "-a", "a/b", "a b", &"a".repeat(77)] {
        assert!(check_id("container", bad).is_err(), "{bad:?}");
    }
}

fn base_spec() -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "terminal": false},
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "h",
        "hooks": {"prestart": [{"path": "/usr/bin/nvidia-hook"}]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/c/hosts",
             "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/etc/resolv.conf", "source": "/var/lib/c/resolv.conf",
             "options": ["rbind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/c/shm",
             "options": ["rbind"]},
            {"destination": "/var/empty", "type": "bind", "source": "/var/lib/k/empty",
             "options": ["rbind", "ro"]},
            {"destination": "/var/secret", "type": "bind", "source": "/var/lib/k/secret",
             "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts2", "type": "bind", "source": "/var/lib/c/hosts"}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "mount"}
            ]
        },
        "x-unknown": {"kept": true}
    })
}

#[test]
fn network_namespace_kinds() {
    let spec = base_spec();
    assert_eq!(
        network_namespace(&spec),
        Some(Some(PathBuf::from("/var/run/netns/cni-1")))
    );
    let mut new = spec.clone();
    new["linux"]["namespaces"][1] = json!({"type": "network"});
    assert_eq!(network_namespace(&new), Some(None));
    let mut host = spec;
    host["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .remove(1);
    assert_eq!(network_namespace(&host), None);
    assert_eq!(network_namespace(&json!({})), None);
}

fn fake_inspect(p: &Path) -> HostKind {
    match p.to_str().unwrap() {
        "/var/lib/c/hosts" | "/var/lib/c/resolv.conf" => HostKind::File { size: 100 },
        "/var/lib/k/empty" => HostKind::EmptyDir,
        "/var/lib/k/secret" => HostKind::Dir {
            files: vec![("token".into(), 10), ("ca/ca.crt".into(), 20)],
            total: 30,
        },
        "/var/lib/big" => HostKind::File { size: 1 << 30 },
        _ => HostKind::Other("a socket".into()),
    }
}

#[test]
fn spec_is_rewritten_for_the_guest() {
    let g = for_guest(&base_spec(), true, fake_inspect).unwrap();
    assert!(!g.joins_pid_namespace);
    let mut shared = base_spec();
    shared["linux"]["namespaces"][0]["path"] = json!("/proc/42/ns/pid");
    assert!(
        for_guest(&shared, true, fake_inspect)
            .unwrap()
            .joins_pid_namespace
    );
    let v: Value = serde_json::from_slice(&g.json).unwrap();
    assert_eq!(v["root"]["path"], "rootfs");
    assert_eq!(v["root"]["readonly"], true);
    assert_eq!(v["process"]["terminal"], true);
    assert!(v.get("hooks").is_none());
    assert_eq!(v["x-unknown"]["kept"], true);
    let nss = v["linux"]["namespaces"].as_array().unwrap();
    for ns in nss {
        assert!(ns.get("path").is_none(), "{ns}");
    }
    let types: Vec<_> = nss.iter().map(|ns| ns["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["pid", "ipc", "mount"],
        "the pod's netns is the VM's own"
    );
    let m = v["mounts"].as_array().unwrap();
    assert_eq!(m[0]["source"], "proc");
    let hosts = m[1]["source"].as_str().unwrap();
    assert!(hosts.starts_with("/run/husk/host/") && hosts.ends_with("-hosts"));
    assert_eq!(m[1]["options"], json!(["rbind", "rprivate", "rw"]));
    assert!(m[2]["source"].as_str().unwrap().ends_with("-resolv.conf"));
    assert_eq!(m[3]["source"], POD_SHM_DIR, "the pod's one /dev/shm");
    assert_eq!(m[3]["destination"], "/dev/shm");
    assert_eq!(m[4]["type"], "tmpfs");
    assert!(m[4]["options"].as_array().unwrap().contains(&json!("ro")));
    assert!(m[5]["source"].as_str().unwrap().ends_with("-secret"));
    // The same host file twice: one copy, one guest path.
    assert_eq!(m[6]["source"], m[1]["source"]);
    assert_eq!(g.copies.len(), 3);
    let secret = g
        .copies
        .iter()
        .find(|c| c.host == Path::new("/var/lib/k/secret"))
        .unwrap();
    assert_eq!(secret.files.as_ref().unwrap().len(), 2);
}

fn fake_kind(p: &Path) -> SourceKind {
    match p.to_str().unwrap() {
        "/var/lib/c/hosts" | "/var/lib/c/resolv.conf" => SourceKind::File,
        "/var/lib/k/empty" | "/var/lib/k/secret" => SourceKind::Dir,
        _ => SourceKind::Refused("a socket".into()),
    }
}

/// Shared volumes: every bind but /dev/shm becomes the container's
/// numbered volume in the share, empty folders included (an emptyDir is
/// shared, not a tmpfs), each bind its own (the same source twice too),
/// read-only as the options say.
#[test]
fn shared_volumes_are_numbered_in_the_share() {
    let g = for_guest_shared(&base_spec(), false, "c1", fake_kind).unwrap();
    assert!(g.copies.is_empty());
    let v: Value = serde_json::from_slice(&g.json).unwrap();
    let m = v["mounts"].as_array().unwrap();
    assert_eq!(m[0]["source"], "proc");
    assert_eq!(m[1]["source"], "/run/husk/shared/c1/volumes/0");
    assert_eq!(m[1]["options"], json!(["rbind", "rprivate", "rw"]));
    assert_eq!(m[2]["source"], "/run/husk/shared/c1/volumes/1");
    assert_eq!(m[3]["source"], POD_SHM_DIR);
    assert_eq!(m[4]["source"], "/run/husk/shared/c1/volumes/2");
    assert_eq!(m[4]["type"], "bind", "an empty folder is shared too");
    assert_eq!(m[5]["source"], "/run/husk/shared/c1/volumes/3");
    assert_eq!(m[6]["source"], "/run/husk/shared/c1/volumes/4");
    let vol = |index: usize, host: &str, dir: bool, read_only: bool| SharedVolume {
        index,
        host: host.into(),
        dir,
        read_only,
    };
    assert_eq!(
        g.volumes,
        vec![
            vol(0, "/var/lib/c/hosts", false, false),
            vol(1, "/var/lib/c/resolv.conf", false, true),
            vol(2, "/var/lib/k/empty", true, true),
            vol(3, "/var/lib/k/secret", true, true),
            vol(4, "/var/lib/c/hosts", false, false),
        ]
    );
    // The last of ro and rw wins.
    let mut s = base_spec();
    s["mounts"] = json!([{"destination": "/d", "type": "bind", "source": "/var/lib/k/secret",
                           "options": ["ro", "rw"]},
                          {"destination": "/e", "source": "/var/lib/k/secret",
                           "options": ["rbind", "rw", "ro"]}]);
    let g = for_guest_shared(&s, false, "c1", fake_kind).unwrap();
    assert!(!g.volumes[0].read_only);
    assert!(g.volumes[1].read_only);
}

#[test]
fn unsharable_sources_name_the_mount() {
    let mut s = base_spec();
    s["mounts"] = json!([{"destination": "/var/run/docker.sock", "type": "bind",
                           "source": "/var/run/docker.sock"}]);
    let e = for_guest_shared(&s, false, "c1", fake_kind)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/var/run/docker.sock") && e.contains("a socket") && e.contains("shares"),
        "{e}"
    );
    s["mounts"] = json!([{"destination": "/rel", "type": "bind", "source": "rel"}]);
    assert!(for_guest_shared(&s, false, "c1", fake_kind).is_err());
}

/// What the host really has: folders and files are shared; sockets,
/// devices, FIFOs and procfs/sysfs files are refused, naming what they
/// are.
#[test]
fn source_kinds_of_real_paths() {
    let dir = std::env::temp_dir().join(format!("husk-kind-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("f"), b"x").unwrap();
    std::os::unix::fs::symlink("f", dir.join("link")).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    assert_eq!(source_kind(&dir), SourceKind::Dir);
    assert_eq!(source_kind(&dir.join("f")), SourceKind::File);
    assert_eq!(source_kind(&dir.join("link")), SourceKind::File);
    let refused = |p: &Path| match source_kind(p) {
        SourceKind::Refused(r) => r,
        other => panic!("{}: {other:?}", p.display()),
    };
    assert_eq!(refused(&dir.join("sock")), "a socket");
    assert_eq!(refused(Path::new("/dev/null")), "a device");
    assert!(refused(Path::new("/proc/cpuinfo")).contains("procfs"));
    assert!(refused(Path::new("/proc")).contains("procfs"));
    assert!(refused(Path::new("/sys/kernel")).contains("sysfs"));
    assert!(refused(&dir.join("missing")).contains("No such file"));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unsupported_binds_name_the_mount() {
    let mut s = base_spec();
    s["mounts"] = json!([{"destination": "/var/run/docker.sock", "type": "bind",
                           "source": "/var/run/docker.sock"}]);
    let e = for_guest(&s, false, fake_inspect).unwrap_err().to_string();
    assert!(
        e.contains("/var/run/docker.sock") && e.contains("a socket"),
        "{e}"
    );
    s["mounts"] = json!([{"destination": "/big", "type": "bind", "source": "/var/lib/big"}]);
    let e = for_guest(&s, false, fake_inspect).unwrap_err().to_string();
    assert!(e.contains("more than 16 MiB"), "{e}");
    s["mounts"] = json!([{"destination": "/rel", "type": "bind", "source": "rel"}]);
    assert!(for_guest(&s, false, fake_inspect).is_err());
}

#[test]
fn inspects_real_trees() {
    let dir = std::env::temp_dir().join(format!("husk-spec-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("vol/..2024/sub")).unwrap();
    fs::write(dir.join("vol/..2024/token"), b"abc").unwrap();
    fs::write(dir.join("vol/..2024/sub/x"), b"de").unwrap();
    std::os::unix::fs::symlink("..2024", dir.join("vol/..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", dir.join("vol/token")).unwrap();
    fs::create_dir_all(dir.join("empty")).unwrap();
    fs::write(dir.join("f"), b"12345").unwrap();
    assert_eq!(inspect_host(&dir.join("f")), HostKind::File { size: 5 });
    assert_eq!(inspect_host(&dir.join("empty")), HostKind::EmptyDir);
    match inspect_host(&dir.join("vol")) {
        HostKind::Dir { mut files, total } => {
            files.sort();
            assert_eq!(
                files,
                vec![
                    ("..2024/sub/x".into(), 2),
                    ("..2024/token".into(), 3),
                    ("token".into(), 3)
                ]
            );
            assert_eq!(total, 8);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        inspect_host(&dir.join("missing")),
        HostKind::Other(_)
    ));
    assert!(matches!(
        inspect_host(Path::new("/dev/null")),
        HostKind::Other(_)
    ));
    fs::remove_dir_all(&dir).unwrap();
}
