use super::*;
use crate::sandbox::cgroup::{self, CgroupLimits, Hierarchy, SandboxCgroup};
use crate::sandbox::vmm::{Confinement, VmmProcess};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const BUSYBOX: &str = "/bin/busybox";

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn bind_targets_must_be_plain_names() {
    for bad in ["", ".", "..", "a/b", "../etc"] {
        let b = Bind::file("/etc/hostname", bad);
        let e = Jail::new(JailUser { uid: 1, gid: 1 }, Path::new("/tmp/x"), &[b])
            .err()
            .unwrap();
        assert!(matches!(e, JailError::BadTarget(_)), "{bad:?}: {e}");
    }
    // A leading slash is the jail's root, not the host's.
    assert_eq!(Bind::file("/a", "/vm.json").target, "vm.json");
}

fn status_field(pid: u32, key: &str) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// A real jailed process (busybox's `yes`, which ignores the VMM's
/// arguments and keeps running) through VmmProcess: its uid, capabilities,
/// namespaces, root, fds, limits and cgroup, seen from the host; and
/// nothing left after it is killed.
#[test]
fn a_jailed_process_is_confined_and_leaves_nothing() {
    if !is_root() || !Path::new(BUSYBOX).exists() {
        eprintln!("skipped: needs root and a static {BUSYBOX}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("husk-jail-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let user = JailUser {
        uid: 65500,
        gid: 65501,
    };
    fs::write(dir.join("vm.json"), b"{}").unwrap();
    fs::write(dir.join("disk"), b"data").unwrap();
    give(user, &dir.join("disk")).unwrap();
    make_dir(&dir.join("run")).unwrap();
    give(user, &dir.join("run")).unwrap();
    let root = dir.join(ROOT_DIR);
    make_dir(&root).unwrap();
    let binds = [
        Bind::file(BUSYBOX, "yes").exec(),
        Bind::file(dir.join("vm.json"), SPEC),
        Bind::file(dir.join("disk"), "disk"),
        Bind::file(dir.join("run"), RUN).dir().writable(),
    ];
    let jail = Jail::new(user, &root, &binds).unwrap();

    let hierarchy = Hierarchy::detect(Path::new(cgroup::CGROUP_ROOT)).unwrap();
    let rel = PathBuf::from(format!("husk-test-{}/jail", std::process::id()));
    let limits = CgroupLimits {
        memory_bytes: 96 << 20,
        cpu_quota_us: 50_000,
        cpu_period_us: 100_000,
        tasks: 8,
    };
    let mut cg = SandboxCgroup::create(&hierarchy, &rel, limits).unwrap();

    // A template's files, root's and 0600: inherited, never opened by
    // the jail's user.
    let (state, memory) = (dir.join("state"), dir.join("memory"));
    for f in [&state, &memory] {
        fs::write(f, "snapshot").unwrap();
        fs::set_permissions(f, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let fds = (
        OwnedFd::from(fs::File::open(&state).unwrap()),
        OwnedFd::from(fs::File::open(&memory).unwrap()),
    );
    let (state_fd, memory_fd) = (fds.0.as_raw_fd(), fds.1.as_raw_fd());
    let log = fs::File::create(dir.join("vmm.log")).unwrap();
    let vmm = VmmProcess::spawn(
        Path::new("/yes"),
        Path::new(SPEC),
        log::LevelFilter::Info,
        log,
        "jail-test",
        None,
        Confinement {
            cgroup_procs: cg.procs().unwrap(),
            jail: Some(jail),
        },
        Some(fds),
    )
    .unwrap();
    let pid = vmm.pid;
    // Past exec: the process runs busybox.
    let start = std::time::Instant::now();
    while fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
        != format!(
            "/yes\0--config\0/vm.json\0--log-level\0info\0--restore-fds\0{state_fd},{memory_fd}\0"
        )
        .as_bytes()
    {
        assert!(start.elapsed() < Duration::from_secs(5), "never exec'd");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!vmm.is_dead(), "{:?}", vmm.exit_status());

    assert_eq!(status_field(pid, "Uid"), "65500\t65500\t65500\t65500");
    assert_eq!(status_field(pid, "Gid"), "65501\t65501\t65501\t65501");
    assert_eq!(status_field(pid, "Groups"), "");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, set), "0000000000000000", "{set}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Exactly stdio and the two snapshot files are open, read-only.
    let mut open: Vec<i32> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    open.sort_unstable();
    let mut want = vec![0, 1, 2, state_fd, memory_fd];
    want.sort_unstable();
    assert_eq!(open, want);
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/fd/{state_fd}")).unwrap(),
        state
    );
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/fd/{memory_fd}")).unwrap(),
        memory
    );
    // PID 1 of its own PID namespace, in its own mount namespace.
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));
    assert_ne!(ns(&pid.to_string(), "pid"), ns("self", "pid"));
    assert_ne!(ns(&pid.to_string(), "mnt"), ns("self", "mnt"));
    // Its root holds only what the jail shows.
    let mut listing: Vec<String> = fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    assert_eq!(listing, ["dev", "disk", "run", "vm.json", "yes"]);
    let mut devs: Vec<String> = fs::read_dir(format!("/proc/{pid}/root/dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    let want: Vec<&str> = ["kvm", "net", "urandom"]
        .into_iter()
        .filter(|d| match *d {
            "kvm" => Path::new("/dev/kvm").exists(),
            "net" => Path::new("/dev/net/tun").exists(),
            _ => true,
        })
        .collect();
    assert_eq!(devs, want);
    if Path::new("/dev/kvm").exists() {
        let kvm = fs::metadata(format!("/proc/{pid}/root/dev/kvm")).unwrap();
        assert_eq!(
            (kvm.uid(), kvm.gid(), kvm.mode() & 0o777),
            (65500, 65501, 0o600)
        );
        assert_eq!(kvm.rdev(), fs::metadata("/dev/kvm").unwrap().rdev());
    }
    assert_eq!(
        fs::read(format!("/proc/{pid}/root/disk")).unwrap(),
        b"data",
        "the disk is the host's file"
    );
    // Read-only root and binds; /run writable.
    let mounts = fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let opts = |target: &str| {
        mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(target))
            .map(|l| l.split(' ').nth(3).unwrap_or("").to_string())
            .unwrap_or_else(|| panic!("{target} is not mounted: {mounts}"))
    };
    assert!(opts("/").starts_with("ro,"), "{}", opts("/"));
    assert!(opts("/disk").starts_with("ro,"), "{}", opts("/disk"));
    assert!(opts("/vm.json").contains("noexec"), "{}", opts("/vm.json"));
    assert!(opts("/run").starts_with("rw,"), "{}", opts("/run"));
    assert_eq!(mounts.lines().count(), 5, "{mounts}");
    let limits_text = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits_text
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().rev().nth(1).unwrap_or("").to_string())
            .unwrap()
    };
    assert_eq!(limit("Max open files"), NOFILE.to_string());
    assert_eq!(limit("Max core file size"), "0");
    // In the cgroup, with its limits.
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!("/{}", rel.display());
    assert!(
        cgroups
            .lines()
            .any(|l| l.ends_with(&want) && (l.starts_with("0::") || l.contains(":memory:"))),
        "{cgroups}"
    );
    for leaf in &cg.leaves {
        let procs = fs::read_to_string(leaf.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), pid.to_string(), "{}", leaf.display());
    }

    vmm.kill();
    assert_eq!(vmm.exit_status().as_deref(), Some("signal: 9 (SIGKILL)"));
    // The jail's mounts went with its namespace; the cgroup goes on remove.
    let host_mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host_mounts.contains(&dir.display().to_string()),
        "{host_mounts}"
    );
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
    let leaves = cg.leaves.clone();
    cg.remove();
    for leaf in leaves {
        assert!(!leaf.exists(), "{}", leaf.display());
        assert!(!leaf.parent().unwrap().exists(), "{}", leaf.display());
    }
    fs::remove_dir_all(&dir).unwrap();
}
