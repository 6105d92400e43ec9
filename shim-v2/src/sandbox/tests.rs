use super::*;
use std::os::unix::fs::PermissionsExt;

fn cfg(extra: &str) -> Config {
    crate::config::parse(
        &format!("kernel_path = \"/k/bzImage\"\ninitrd_path = \"/k/initrd\"\njail = false\nsandbox_cgroup = false\nshared_fs = \"none\"\nrootfs = \"block\"\n{extra}"),
        Path::new("/c.toml"),
    )
    .unwrap()
}

fn base(c: &Config) -> VmSize {
    crate::sizing::size(c, Limits::default())
}

fn script(path: &Path, text: &str) -> PathBuf {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

#[test]
fn a_vmm_that_cannot_start_fails_cleanly() {
    let root = std::env::temp_dir().join(format!("husk-boot-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let mut c = cfg("boot_timeout_secs = 5");
    c.vmm_path = "/nonexistent/husk-vmm".into();
    let dir = StateDir::create(&root, "sb").unwrap();
    let e = Sandbox::boot(
        "sb",
        dir,
        &c,
        base(&c),
        1,
        "h",
        None,
        None,
        &AtomicBool::new(false),
    )
    .err()
    .unwrap();
    assert!(matches!(e, SandboxError::Spawn { .. }), "{e}");
    assert!(!root.join("sb").exists());

    // A "VMM" that exits at once: the boot fails with its log.
    c.vmm_path = script(
        &root.join("fake-vmm"),
        "#!/bin/sh\necho 'bad config: kernel.path' >&2\nexit 1\n",
    );
    let dir = StateDir::create(&root, "sb").unwrap();
    let e = Sandbox::boot(
        "sb",
        dir,
        &c,
        base(&c),
        0,
        "h",
        None,
        None,
        &AtomicBool::new(false),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("the VMM exited"), "{e}");
    assert!(e.contains("bad config: kernel.path"), "{e}");
    assert!(!root.join("sb").exists());

    // A "VMM" that never answers: the boot times out and it is killed.
    c.vmm_path = script(&root.join("silent-vmm"), "#!/bin/sh\nexec sleep 1000\n");
    c.boot_timeout = Duration::from_secs(1);
    let dir = StateDir::create(&root, "sb").unwrap();
    let t = Instant::now();
    let e = Sandbox::boot(
        "sb",
        dir,
        &c,
        base(&c),
        0,
        "h",
        None,
        None,
        &AtomicBool::new(false),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("did not answer within boot_timeout_secs"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(8));
    assert!(!root.join("sb").exists());

    // Shutdown during the boot: it stops at once, and cleans up.
    c.boot_timeout = Duration::from_secs(600);
    let dir = StateDir::create(&root, "sb").unwrap();
    let t = Instant::now();
    let e = Sandbox::boot(
        "sb",
        dir,
        &c,
        base(&c),
        0,
        "h",
        None,
        None,
        &AtomicBool::new(true),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("cancelled"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(8));
    assert!(!root.join("sb").exists());
    fs::remove_dir_all(&root).unwrap();
}

/// An agent that does not answer DestroySandbox: the VMM is asked to
/// shut down through its control socket (a stand-in VMM serves it and
/// exits on the request), not SIGKILLed; the state folder goes.
#[test]
fn a_silent_agent_ends_through_the_control_socket() {
    let Ok(python) = which("python3") else {
        eprintln!("skipped: no python3");
        return;
    };
    let root = std::env::temp_dir().join(format!("husk-ctl-end-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let dir = StateDir::create(&root, "sb").unwrap();
    let vmm_script = script(
        &root.join("ctl-vmm"),
        &format!(
            "#!{}\n{}",
            python.display(),
            r#"
import json, os, socket, sys
d = os.path.dirname(sys.argv[2])
s = socket.socket(socket.AF_UNIX)
s.bind(os.path.join(d, "run", "ctl.sock"))
s.listen(1)
c, _ = s.accept()
req = json.loads(c.makefile().readline())
open(os.path.join(d, "..", "request"), "w").write(json.dumps(req))
c.sendall(b'{"ok":true}\n')
sys.exit(0 if req.get("op") == "shutdown" else 3)
"#
        ),
    );
    let log = fs::File::create(dir.path.join(VMM_LOG)).unwrap();
    fs::create_dir(dir.path.join(RUN_DIR)).unwrap();
    let vmm = VmmProcess::spawn(
        &vmm_script,
        &dir.path.join(VM_SPEC),
        log::LevelFilter::Info,
        log,
        "vmm-test",
        None,
        Confinement::default(),
        None,
    )
    .unwrap();
    // The agent's end of the connection is held open and never read.
    let (ours, _silent_agent) = std::os::unix::net::UnixStream::pair().unwrap();
    let sandbox = Sandbox {
        id: "sb".into(),
        dir: dir.keep(),
        agent: Agent::new(ours, Duration::from_secs(1)).unwrap(),
        stats: SandboxStats::new(root.join("sb"), 0),
        vmm,
        slots: Mutex::new(Slots::new(0, 0)),
        memory: Mutex::new(Reservations::new(base(&cfg("")))),
        debug_console: false,
        network: Mutex::new(None),
        cgroup: Mutex::new(None),
        share: Mutex::new(None),
    };
    // Let the stand-in bind its socket before the agent times out.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    sandbox.destroy();
    assert!(t.elapsed() < DESTROY_TIMEOUT, "{:?}", t.elapsed());
    let request = fs::read_to_string(root.join("request")).unwrap();
    assert_eq!(
        husk_vm_config::control::parse_request(request.as_bytes()),
        Ok(Request::Shutdown {
            timeout_ms: CONTROL_SHUTDOWN_MS
        })
    );
    assert_eq!(sandbox.vmm.exit_status().as_deref(), Some("exit status: 0"));
    assert!(!root.join("sb").exists());
    fs::remove_dir_all(&root).unwrap();
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}
