use super::*;

fn rel(p: Option<&str>) -> Result<PathBuf, CgroupError> {
    relative_path(p, "sb1")
}

#[test]
fn cgroup_paths_from_the_spec() {
    assert_eq!(rel(None).unwrap(), Path::new("husk/sb1"));
    assert_eq!(rel(Some("")).unwrap(), Path::new("husk/sb1"));
    // CRI with the cgroupfs driver, and ctr's default.
    assert_eq!(
        rel(Some("/kubepods/besteffort/pod1234/abcd")).unwrap(),
        Path::new("kubepods/besteffort/pod1234/abcd")
    );
    assert_eq!(rel(Some("/default/c1")).unwrap(), Path::new("default/c1"));
    assert_eq!(rel(Some("a//b/")).unwrap(), Path::new("a/b"));
    // The systemd driver's slice:prefix:name.
    assert_eq!(
        rel(Some("kubepods-burstable-pod12_34.slice:cri-containerd:abcd")).unwrap(),
        Path::new(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice/cri-containerd-abcd.scope"
        )
    );
    assert_eq!(rel(Some(":husk:x")).unwrap(), Path::new("husk-x.scope"));
}

#[test]
fn bad_cgroup_paths_are_refused() {
    for bad in [
        "/kubepods/../../etc",
        "..",
        "/a/./b",
        "/",
        "//",
        "a:b",
        "a.slice:p:",
        "a--b.slice:p:n",
        "noslice:p:n",
        "a.slice:p:n/../x",
        "a.slice:p:n:extra",
    ] {
        let e = rel(Some(bad)).err();
        assert!(
            matches!(e, Some(CgroupError::BadPath { .. })),
            "{bad:?}: {e:?}"
        );
    }
    let e = rel(Some("/a/../b")).unwrap_err().to_string();
    assert!(e.contains("\"/a/../b\"") && e.contains(".."), "{e}");
}

#[test]
fn limits_follow_the_vm_size() {
    let l = CgroupLimits::of(VmSize {
        vcpus: 2,
        memory_mib: 512,
        reservable_mib: 0,
    });
    assert_eq!(l.memory_bytes, (512 << 20) + (64 << 20) + (16 << 20));
    assert_eq!((l.cpu_quota_us, l.cpu_period_us), (200_000, 100_000));
    assert_eq!(l.tasks, 34);
    // With virtiofsd and a pool of 4 threads.
    let v = l.with_virtiofsd(4);
    assert_eq!(v.memory_bytes, l.memory_bytes + (64 << 20));
    assert_eq!(v.tasks, 34 + 16 + 4);
    assert_eq!(v.cpu_quota_us, l.cpu_quota_us);
}

#[test]
fn hierarchies_are_detected() {
    let root = std::env::temp_dir().join(format!("husk-cg-detect-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    // Nothing: no v2, no v1 memory.
    let e = Hierarchy::detect(&root).unwrap_err().to_string();
    assert!(e.contains("memory"), "{e}");
    for c in ["memory", "cpu"] {
        fs::create_dir_all(root.join(c)).unwrap();
        fs::write(root.join(c).join("cgroup.procs"), "").unwrap();
    }
    assert_eq!(
        Hierarchy::detect(&root).unwrap(),
        Hierarchy::V1(vec![
            ("memory", root.join("memory")),
            ("cpu", root.join("cpu"))
        ])
    );
    fs::write(root.join("cgroup.controllers"), "memory").unwrap();
    assert_eq!(
        Hierarchy::detect(&root).unwrap(),
        Hierarchy::V2(root.clone())
    );
    fs::remove_dir_all(&root).unwrap();
}

/// On this host's real cgroups (v2 or v1): the folders, the limits as the
/// kernel reads them back, and nothing left after remove; an existing
/// parent is not removed.
#[test]
fn a_real_cgroup_is_made_limited_and_removed() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let Ok(h) = Hierarchy::detect(Path::new(CGROUP_ROOT)) else {
        eprintln!("skipped: no usable cgroup hierarchy");
        return;
    };
    let top = format!("husk-test-{}-real", std::process::id());
    let limits = CgroupLimits::of(VmSize {
        vcpus: 1,
        memory_mib: 128,
        reservable_mib: 0,
    });
    let rel = Path::new(&top).join("pod").join("sb");
    let mut cg = SandboxCgroup::create(&h, &rel, limits).unwrap();
    let roots: Vec<PathBuf> = match &h {
        Hierarchy::V2(r) => vec![r.clone()],
        Hierarchy::V1(v) => v.iter().map(|(_, r)| r.clone()).collect(),
    };
    assert_eq!(cg.created.len(), 3 * roots.len());
    for leaf in &cg.leaves {
        let read = |f: &str| fs::read_to_string(leaf.join(f)).unwrap().trim().to_string();
        match &h {
            Hierarchy::V2(_) => {
                assert_eq!(read("memory.max"), limits.memory_bytes.to_string());
                assert_eq!(read("cpu.max"), "100000 100000");
                assert_eq!(read("pids.max"), "33");
            }
            Hierarchy::V1(_) if leaf.starts_with(Path::new(CGROUP_ROOT).join("memory")) => {
                assert_eq!(
                    read("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string()
                );
            }
            Hierarchy::V1(_) if leaf.starts_with(Path::new(CGROUP_ROOT).join("cpu")) => {
                assert_eq!(read("cpu.cfs_quota_us"), "100000");
            }
            Hierarchy::V1(_) => assert_eq!(read("pids.max"), "33"),
        }
    }
    let record = cg.record();
    assert_eq!(record.lines().count(), cg.created.len());
    // A second sandbox in the same (now existing) parent makes only its
    // leaf; removing it leaves the first one's folders.
    let mut other =
        SandboxCgroup::create(&h, &Path::new(&top).join("pod").join("sb2"), limits).unwrap();
    assert_eq!(other.created.len(), roots.len());
    other.remove();
    assert!(cg.leaves.iter().all(|l| l.exists()));
    // As `shim delete` does, from the record.
    remove_recorded(&record);
    for r in &roots {
        assert!(!r.join(&top).exists(), "{}", r.join(&top).display());
    }
    cg.remove();
    // A record naming anything outside the cgroup file systems is ignored.
    let outside = std::env::temp_dir().join(format!("husk-cg-outside-{}", std::process::id()));
    fs::create_dir_all(&outside).unwrap();
    remove_recorded(&format!(
        "{}\n/sys/fs/cgroup/../../tmp\n",
        outside.display()
    ));
    assert!(outside.exists());
    fs::remove_dir_all(&outside).unwrap();
}
