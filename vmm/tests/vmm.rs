//! End-to-end tests of the husk-vmm binary on the host's /dev/kvm: small
//! hand-made guests (assembled here with `cc`) and the real guest kernel.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const VMM: &str = env!("CARGO_BIN_EXE_husk-vmm");

/// A scratch directory removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-vmm-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Assembles and links tests/guests/NAME.S into a static ELF loaded at 1 MiB.
fn build_guest(dir: &TempDir, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
    let out = dir.path(name);
    let status = Command::new("cc")
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none"])
        .arg(format!("-Wl,-T,{}", src.join("guest.ld").display()))
        .arg("-o")
        .arg(&out)
        .arg(src.join(format!("{name}.S")))
        .status()
        .expect("run cc to assemble the test guest");
    assert!(status.success(), "cc failed to build guest {name}");
    out
}

/// Wraps tests/guests/NAME.S in a minimal bzImage: one setup sector after
/// the boot sector, with a boot protocol 2.15 header, then the payload,
/// whose 64-bit entry is 0x200 bytes in.
fn build_bzimage_guest(dir: &TempDir, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
    let obj = dir.path(&format!("{name}.o"));
    let flat = dir.path(&format!("{name}.bin"));
    let ok = Command::new("cc")
        .args(["-c", "-o"])
        .arg(&obj)
        .arg(src.join(format!("{name}.S")))
        .status()
        .unwrap()
        .success();
    assert!(ok, "cc failed to assemble {name}");
    let ok = Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&obj)
        .arg(&flat)
        .status()
        .unwrap()
        .success();
    assert!(ok, "objcopy failed on {name}");
    let code = std::fs::read(&flat).unwrap();

    let mut image = vec![0u8; 1024];
    image[0x1f1] = 1; // setup_sects
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x211] = 0x01; // loadflags: LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    image.extend_from_slice(&[0xf4; 0x200]); // 32-bit entry area: hlt
    image.extend_from_slice(&code);
    let out = dir.path(&format!("{name}.bzImage"));
    std::fs::write(&out, image).unwrap();
    out
}

fn spawn_vmm(dir: &TempDir, config: &Value) -> Child {
    spawn_vmm_with_args(dir, config, &[])
}

fn spawn_vmm_with_args(dir: &TempDir, config: &Value, args: &[&str]) -> Child {
    let path = dir.path("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut cmd = Command::new(VMM);
    cmd.arg("--config")
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // A test that fails ends its thread before it reaps the VMM: the VMM
    // must die with it, not outlive the test run.
    // SAFETY: prctl(2) is async-signal-safe and allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd.spawn().expect("spawn husk-vmm")
}

/// Waits for the VMM to exit; returns its status and stderr.
fn wait_exit(child: Child, timeout: Duration) -> (ExitStatus, String) {
    wait_exit_showing_console(child, timeout, None)
}

/// Like [`wait_exit`]; on a timeout the panic also shows the guest console
/// logged at `serial`.
fn wait_exit_showing_console(
    mut child: Child,
    timeout: Duration,
    serial: Option<&Path>,
) -> (ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status, err);
        }
        if start.elapsed() > timeout {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            let console = serial
                .map(|p| {
                    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
                })
                .unwrap_or_default();
            panic!(
                "husk-vmm still running after {timeout:?}; console:\n{console}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A control socket client.
struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Control {
    fn connect(path: &Path) -> Self {
        wait_for("the control socket", Duration::from_secs(10), || {
            path.exists()
        });
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self { stream, reader }
    }

    fn send_raw(&mut self, line: &str) -> Value {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        assert!(reply.ends_with('\n'), "reply is one line: {reply:?}");
        serde_json::from_str(&reply).unwrap()
    }

    fn send(&mut self, request: Value) -> Value {
        self.send_raw(&request.to_string())
    }

    /// A status request; checks the reply's counters and leaves them out.
    fn status(&mut self) -> Value {
        let mut reply = self.send(json!({"op": "status"}));
        let counters = reply
            .as_object_mut()
            .and_then(|o| o.remove("counters"))
            .unwrap_or_default();
        for part in ["guest_faults", "console", "log"] {
            assert!(counters[part].is_object(), "{part} in {counters}");
        }
        reply
    }
}

#[test]
fn guest_prints_on_serial_and_resets_through_i8042() {
    let dir = TempDir::new("reset");
    let guest = build_guest(&dir, "hello_reset");
    let serial = dir.path("serial.log");
    let child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 1, "memory_mib": 64,
            "kernel": {"path": guest, "cmdline": "unused"},
            "serial": {"output": "file", "path": serial},
        }),
    );
    let (status, stderr) = wait_exit(child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(
        std::fs::read(&serial).unwrap(),
        b"husk guest: hello over COM1\r\n"
    );
    assert!(
        stderr.contains("guest requested a reset through the i8042"),
        "{stderr}"
    );
}

#[test]
fn bzimage_guest_reads_command_line_from_zero_page() {
    let dir = TempDir::new("bzimage");
    let guest = build_bzimage_guest(&dir, "cmdline_reset");
    let serial = dir.path("serial.log");
    let cmdline = "console=ttyS0 husk.bz=1 quiet";
    let child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 1, "memory_mib": 64,
            "kernel": {"path": guest, "cmdline": cmdline},
            "serial": {"output": "file", "path": serial},
        }),
    );
    let (status, stderr) = wait_exit(child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(
        std::fs::read(&serial).unwrap(),
        format!("{cmdline}\n").as_bytes()
    );
}

#[test]
fn control_socket_pauses_resumes_and_shuts_down() {
    let dir = TempDir::new("control");
    let guest = build_guest(&dir, "hello_spin");
    let serial = dir.path("serial.log");
    let sock = dir.path("ctl.sock");
    let child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 2, "memory_mib": 64,
            "kernel": {"path": guest, "cmdline": ""},
            "serial": {"output": "file", "path": serial},
            "control_socket": sock,
        }),
    );
    let mut ctl = Control::connect(&sock);
    wait_for("the guest's line", Duration::from_secs(30), || {
        std::fs::read(&serial).is_ok_and(|b| b == b"husk guest: spinning\r\n")
    });

    assert_eq!(ctl.status(), json!({"ok": true, "state": "running"}));
    assert_eq!(
        ctl.send(json!({"op": "pause"})),
        json!({"ok": true, "state": "paused"})
    );
    assert_eq!(ctl.status(), json!({"ok": true, "state": "paused"}));
    assert_eq!(
        ctl.send(json!({"op": "pause"})),
        json!({"ok": true, "state": "paused"})
    );
    assert_eq!(
        ctl.send(json!({"op": "resume"})),
        json!({"ok": true, "state": "running"})
    );

    // Bad requests get an error and change nothing.
    for bad in [
        r#"{"op":"explode"}"#,
        "not json",
        r#"{"op":"shutdown","timeout_ms":"soon"}"#,
    ] {
        let r = ctl.send_raw(bad);
        assert_eq!(r["ok"], json!(false), "{bad}: {r}");
        assert!(
            r["error"].as_str().unwrap().starts_with("bad request"),
            "{r}"
        );
    }
    // A second client is served too.
    let mut other = Control::connect(&sock);
    assert_eq!(other.status(), json!({"ok": true, "state": "running"}));

    // The guest ignores Ctrl-Alt-Del (it has no keyboard driver), so the
    // shutdown is forced after the timeout; that still exits 0.
    let asked = Instant::now();
    assert_eq!(
        ctl.send(json!({"op": "shutdown", "timeout_ms": 300})),
        json!({"ok": true})
    );
    let (status, stderr) = wait_exit(child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(asked.elapsed() >= Duration::from_millis(300));
    assert!(
        stderr.contains("did not shut down within 300 ms"),
        "{stderr}"
    );
    assert!(!sock.exists(), "control socket removed on exit");
}

#[test]
fn graceful_shutdown_sends_ctrl_alt_del() {
    let dir = TempDir::new("graceful");
    let guest = build_guest(&dir, "ctrl_alt_del");
    let serial = dir.path("serial.log");
    let sock = dir.path("ctl.sock");
    let child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 1, "memory_mib": 64,
            "kernel": {"path": guest},
            "serial": {"output": "file", "path": serial},
            "control_socket": sock,
        }),
    );
    let mut ctl = Control::connect(&sock);
    wait_for(
        "the guest to poll the i8042",
        Duration::from_secs(30),
        || std::fs::read(&serial).is_ok_and(|b| b.ends_with(b"ctrl-alt-del\r\n")),
    );
    assert_eq!(
        ctl.send(json!({"op": "shutdown", "timeout_ms": 30000})),
        json!({"ok": true})
    );
    let (status, stderr) = wait_exit(child, Duration::from_secs(25));
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(
        std::fs::read(&serial).unwrap(),
        b"waiting for ctrl-alt-del\r\ngot ctrl-alt-del\r\n"
    );
    assert!(stderr.contains("guest requested a reset"), "{stderr}");
    assert!(!stderr.contains("did not shut down"), "{stderr}");
    assert!(!sock.exists());
}

#[test]
fn bad_config_fails_naming_the_field() {
    let dir = TempDir::new("badcfg");
    let child = spawn_vmm(
        &dir,
        &json!({"vcpus": 0, "memory_mib": 64, "kernel": {"path": "/nonexistent"}}),
    );
    let (status, stderr) = wait_exit(child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("vcpus: must be between 1 and 64, got 0"),
        "{stderr}"
    );
}

#[test]
fn bad_kernel_fails_with_a_clear_error() {
    let dir = TempDir::new("badkernel");
    let junk = dir.path("junk");
    std::fs::write(&junk, vec![0u8; 8192]).unwrap();
    let sock = dir.path("ctl.sock");
    let child = spawn_vmm(
        &dir,
        &json!({"vcpus": 1, "memory_mib": 64, "kernel": {"path": junk}, "control_socket": sock}),
    );
    let (status, stderr) = wait_exit(child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("cannot load kernel") && stderr.contains("junk"),
        "{stderr}"
    );
    assert!(!sock.exists());
}

/// Boots the real guest kernel far enough to see its banner and the exact
/// command line the VMM passed.
///
/// This host's /dev/kvm is a software hypervisor that runs guest code in
/// KVM's instruction emulator: Linux prints its early boot messages and
/// then stops on an emulation failure (KVM_EXIT_INTERNAL_ERROR, e.g. on
/// xrstor or cmpxchg16b), so the test cannot wait for init; full boots run
/// in the nested test machine (tests/run.sh). Here the VMM either exits
/// with that error or is killed once the lines are seen.
#[test]
fn real_kernel_prints_banner_and_command_line() {
    // scripts/test.sh builds the kernel and exports its folder; a missing
    // kernel fails the test rather than skipping it.
    let kernel_dir = PathBuf::from(std::env::var_os("HUSK_GUEST_KERNEL").expect(
        "HUSK_GUEST_KERNEL is not set: run scripts/build.sh and \
         `source target/husk-artifacts.env` (scripts/test.sh does both)",
    ));
    assert!(
        kernel_dir.is_dir(),
        "guest kernel directory {} does not exist: run scripts/build.sh",
        kernel_dir.display()
    );
    let vmlinux = kernel_dir.join("vmlinux");
    let dir = TempDir::new("kernel");
    let serial = dir.path("serial.log");
    let sock = dir.path("ctl.sock");
    let cmdline = "console=ttyS0 reboot=k panic=-1 husk.test=banner";
    let mut child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 2, "memory_mib": 256,
            "kernel": {"path": vmlinux, "cmdline": cmdline},
            "serial": {"output": "file", "path": serial},
            "control_socket": sock,
        }),
    );
    // Ask while the kernel is still early in its boot.
    let mut ctl = Control::connect(&sock);
    assert_eq!(ctl.status(), json!({"ok": true, "state": "running"}));

    let want_cmdline = format!("Command line: {cmdline}");
    let start = Instant::now();
    let console = loop {
        let text =
            String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
        let has_cmdline = text
            .lines()
            .any(|l| l.trim_end_matches('\r') == want_cmdline);
        // The MP table must show the guest both vCPUs.
        if text.contains("Linux version ") && has_cmdline && text.contains("Processors: 2") {
            break text;
        }
        if start.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no banner, command line and MP table on the console within 60 s.\nconsole:\n{text}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(console.contains("found SMP MP-table"), "{console}");
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    let dir = TempDir::new("sigterm");
    let guest = build_guest(&dir, "hello_spin");
    let sock = dir.path("ctl.sock");
    let child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 1, "memory_mib": 64,
            "kernel": {"path": guest},
            "serial": {"output": "none"},
            "control_socket": sock,
        }),
    );
    let mut ctl = Control::connect(&sock);
    assert_eq!(ctl.status(), json!({"ok": true, "state": "running"}));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: signals our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (status, stderr) = wait_exit(child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("termination signal received"), "{stderr}");
    assert!(!sock.exists(), "control socket removed on SIGTERM");
}

/// (thread name, the `Seccomp:` field) of each thread of process `pid`.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        modes.push((field("Name:"), field("Seccomp:")));
    }
    modes.sort();
    modes
}

/// Every thread of a running VMM (main, vcpu0, vcpu1) is in seccomp
/// filter mode (2) and keeps serving the guest and the control socket;
/// `--no-seccomp` leaves them unfiltered (0) and says so in the log.
#[test]
fn every_thread_runs_under_a_seccomp_filter() {
    for (args, mode) in [(&[][..], "2"), (&["--no-seccomp"][..], "0")] {
        let dir = TempDir::new(&format!("seccomp{mode}"));
        let guest = build_guest(&dir, "hello_spin");
        let serial = dir.path("serial.log");
        let sock = dir.path("ctl.sock");
        let child = spawn_vmm_with_args(
            &dir,
            &json!({
                "vcpus": 2, "memory_mib": 64,
                "kernel": {"path": guest, "cmdline": ""},
                "serial": {"output": "file", "path": serial},
                "control_socket": sock,
            }),
            args,
        );
        let mut ctl = Control::connect(&sock);
        wait_for("the guest's line", Duration::from_secs(30), || {
            std::fs::read(&serial).is_ok_and(|b| b == b"husk guest: spinning\r\n")
        });
        assert_eq!(ctl.status(), json!({"ok": true, "state": "running"}));
        // The VMM's own threads, and on newer host kernels KVM's NX huge
        // page recovery worker, which lives in the VM's process (it runs
        // no user code; it inherits the mode of the vCPU thread that
        // started it).
        let ours = |seen: &[(String, String)]| {
            let names: Vec<&str> = seen
                .iter()
                .map(|(n, _)| n.as_str())
                .filter(|n| !n.starts_with("kvm-"))
                .collect();
            names == ["husk-vmm", "vcpu0", "vcpu1"] && seen.iter().all(|(_, m)| m == mode)
        };
        // vCPU threads install their filter as they start: give them time.
        let start = Instant::now();
        let mut seen = seccomp_modes(child.id());
        while !ours(&seen) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
            seen = seccomp_modes(child.id());
        }
        assert!(ours(&seen), "threads and their seccomp mode: {seen:?}");
        assert_eq!(
            ctl.send(json!({"op": "pause"})),
            json!({"ok": true, "state": "paused"})
        );
        assert_eq!(
            ctl.send(json!({"op": "shutdown", "timeout_ms": 100})),
            json!({"ok": true})
        );
        let (status, stderr) = wait_exit(child, Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
        assert_eq!(
            stderr.contains("WITHOUT seccomp filters"),
            mode == "0",
            "{stderr}"
        );
        assert!(!sock.exists(), "control socket removed on exit");
    }
}

/// Runs a hand-made guest that ends by resetting the machine; returns what
/// it printed on COM1 and the VMM's stderr. `devices` holds the device
/// fields of the VM description.
fn run_resetting_guest(dir: &TempDir, guest: &str, devices: Value) -> (String, String) {
    let guest = build_guest(dir, guest);
    let serial = dir.path("serial.log");
    let mut config = json!({
        "vcpus": 1, "memory_mib": 64,
        "kernel": {"path": guest},
        "serial": {"output": "file", "path": serial},
    });
    for (k, v) in devices.as_object().unwrap() {
        config[k] = v.clone();
    }
    let child = spawn_vmm(dir, &config);
    let (status, stderr) = wait_exit_showing_console(child, Duration::from_secs(90), Some(&serial));
    let console = String::from_utf8(std::fs::read(&serial).unwrap()).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("guest requested a reset through the i8042"),
        "{stderr}"
    );
    (console, stderr)
}

/// What tests/guests/virtio_blk.inc prints while bringing up a virtio-blk
/// device of `sectors` sectors.
fn blk_bringup_lines(sectors: u64) -> String {
    format!(
        "magic ok\nversion 2\ndevice 2\nacknowledge\ndriver\nversion_1 offered\n\
         features_ok\ncapacity {sectors}\nqueue 0 ready\ndriver_ok\n"
    )
}

/// A disk image of `sectors` sectors where byte i of sector s is
/// (13 * i + 31 * s + 5) mod 256: no two sectors start alike.
fn patterned_disk(path: &Path, sectors: usize) -> Vec<u8> {
    let bytes: Vec<u8> = (0..sectors * 512)
        .map(|i| u8::try_from((13 * (i % 512) + 31 * (i / 512) + 5) % 256).unwrap())
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn virtio_blk_guest_handshakes_and_reads_sector_0() {
    let dir = TempDir::new("blkread");
    let disk = dir.path("disk.img");
    let bytes = patterned_disk(&disk, 8);
    let (console, _) = run_resetting_guest(
        &dir,
        "virtio_blk_read",
        json!({"block": [{"id": "disk0", "path": disk}]}),
    );
    let data: Vec<String> = bytes[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        console,
        format!(
            "{}read sector 0\nstatus 0\nused len 513\ndata {}\n",
            blk_bringup_lines(8),
            data.join(" ")
        )
    );
    // The pattern is not trivially 0..16.
    assert_eq!(&data[..3], ["05", "12", "1f"]);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        bytes,
        "a read changes nothing"
    );
}

/// The bytes tests/guests/virtio_blk_write.S writes to sector 1.
fn guest_write_pattern() -> Vec<u8> {
    (0..512)
        .map(|i: usize| u8::try_from((7 * i + 0x11) % 256).unwrap())
        .collect()
}

#[test]
fn virtio_blk_guest_writes_a_sector() {
    let dir = TempDir::new("blkwrite");
    let disk = dir.path("disk.img");
    let before = patterned_disk(&disk, 4);
    let (console, _) = run_resetting_guest(
        &dir,
        "virtio_blk_write",
        json!({"block": [{"id": "disk0", "path": disk}]}),
    );
    assert_eq!(
        console,
        format!(
            "{}write sector 1\nstatus 0\nused len 1\n",
            blk_bringup_lines(4)
        )
    );
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(&after[512..1024], guest_write_pattern().as_slice());
    assert_eq!(&after[..512], &before[..512], "sector 0 untouched");
    assert_eq!(&after[1024..], &before[1024..], "sectors 2.. untouched");
}

#[test]
fn virtio_blk_guest_write_to_read_only_disk_fails_with_ioerr() {
    let dir = TempDir::new("blkro");
    let disk = dir.path("disk.img");
    let before = patterned_disk(&disk, 4);
    let (console, stderr) = run_resetting_guest(
        &dir,
        "virtio_blk_write",
        json!({"block": [{"id": "disk0", "path": disk, "read_only": true}]}),
    );
    // VIRTIO_BLK_S_IOERR; only the status byte was written.
    assert_eq!(
        console,
        format!(
            "{}write sector 1\nstatus 1\nused len 1\n",
            blk_bringup_lines(4)
        )
    );
    assert_eq!(std::fs::read(&disk).unwrap(), before);
    assert!(stderr.contains("virtio-blk: request failed"), "{stderr}");
}

/// The guest connects to host port 5000 over virtio-vsock: the VMM must
/// connect to `<uds_path>_5000`, answer the guest with OP_RESPONSE, and
/// carry data both ways.
#[test]
fn virtio_vsock_guest_connects_to_a_host_port() {
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    let dir = TempDir::new("vsock");
    let uds = dir.path("v.sock");
    let listener = UnixListener::bind(dir.path("v.sock_5000")).unwrap();
    listener.set_nonblocking(true).unwrap();
    // The host side of the guest's connection: accept, send a line, read
    // the guest's answer (until EOF, which the VMM's exit brings).
    let host = std::thread::spawn(move || {
        let start = Instant::now();
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() > Duration::from_secs(60) {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream.write_all(b"ping\n").unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        Some(answer)
    });

    let (console, _) = run_resetting_guest(
        &dir,
        "virtio_vsock",
        json!({"vsock": {"guest_cid": 3, "uds_path": uds}}),
    );
    let answer = host.join().unwrap();
    assert_eq!(
        console,
        "magic ok\nversion 2\ndevice 19\nacknowledge\ndriver\nversion_1 offered\n\
         features_ok\nguest_cid 3\nqueue 0 ready\nqueue 1 ready\nqueue 2 ready\n\
         driver_ok\nrx buffers posted\nrequest sent\nvsock connected\n\
         received: ping\nsent pong\n"
    );
    let answer = answer.expect("the VMM never connected to <uds_path>_5000");
    assert_eq!(answer, b"pong\n");
    assert!(!uds.exists(), "the VMM removes its vsock socket on exit");
}

/// A driver that gets the handshake wrong is refused (FEATURES_OK without
/// VIRTIO_F_VERSION_1 does not stick; DRIVER_OK without queues sets
/// DEVICE_NEEDS_RESET and raises a config interrupt), and the device still
/// works after a reset; a second driver load over the active device (reset
/// and a new handshake on the same rings) works too.
#[test]
fn virtio_blk_guest_recovers_from_bad_handshakes_and_reloads() {
    let dir = TempDir::new("blkreinit");
    let disk = dir.path("disk.img");
    let bytes = patterned_disk(&disk, 8);
    let (console, stderr) = run_resetting_guest(
        &dir,
        "virtio_blk_reinit",
        json!({"block": [{"id": "disk0", "path": disk}]}),
    );
    let hex16 = |sector: usize| {
        let start = sector * 512;
        let b: Vec<String> = bytes[start..start + 16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        b.join(" ")
    };
    let bringup = blk_bringup_lines(8);
    assert_eq!(
        console,
        format!(
            "without VERSION_1\nstatus 3\n\
             without queues\nstatus 0\nstatus 11\nstatus 75\ninterrupt status 2\n\
             first driver\n{bringup}read sector 0\nstatus 0\nused len 513\ndata {}\n\
             second driver\n{bringup}read sector 2\nstatus 0\nused len 513\ndata {}\n",
            hex16(0),
            hex16(2)
        )
    );
    assert_ne!(hex16(0), hex16(2));
    assert!(
        stderr.contains("driver did not accept VIRTIO_F_VERSION_1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("activation failed, device needs reset"),
        "{stderr}"
    );
}

/// The guest finds the devices where the command line says: block devices
/// first, then vsock, then rng, one 4 KiB window each from 0xd000_0000
/// with IRQs from 5; past the last one, MMIO reads as all ones.
#[test]
fn virtio_devices_sit_where_the_command_line_says() {
    let dir = TempDir::new("probe");
    let disk0 = dir.path("disk0.img");
    let disk1 = dir.path("disk1.img");
    patterned_disk(&disk0, 1);
    patterned_disk(&disk1, 1);
    let guest = build_guest(&dir, "virtio_probe");
    let serial = dir.path("serial.log");
    let child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 1, "memory_mib": 64,
            "kernel": {"path": guest, "cmdline": "husk.probe=1"},
            "serial": {"output": "file", "path": serial},
            "block": [{"id": "disk0", "path": disk0}, {"id": "disk1", "path": disk1, "read_only": true}],
            "vsock": {"guest_cid": 7, "uds_path": dir.path("v.sock")},
            "rng": true,
        }),
    );
    let (status, stderr) = wait_exit_showing_console(child, Duration::from_secs(60), Some(&serial));
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(
        String::from_utf8(std::fs::read(&serial).unwrap()).unwrap(),
        "cmdline: husk.probe=1 \
         virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
         virtio_mmio.device=4K@0xd0002000:7 virtio_mmio.device=4K@0xd0003000:8\n\
         window 0: device 2\nwindow 1: device 2\nwindow 2: device 19\nwindow 3: device 4\n\
         window 4: magic ffffffff\n"
    );
}

/// Bytes tests/guests/hostile.S sends to COM1's transmit register: its
/// "hostile: ..." lines (start, 8 rounds, devices done, flood done) and
/// its 256 KiB flood.
const HOSTILE_CONSOLE_BYTES: u64 = 15 + 8 * 20 + 22 + 20 + 256 * 1024;

/// The VMM's own resident memory: its RSS outside guest RAM (the one
/// mapping of `guest_kib`), which the guest fills as it likes up to its size.
fn rss_kib(pid: u32, guest_kib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let kib = |l: &str, key: &str| -> Option<u64> {
        l.strip_prefix(key)?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    let (mut size, mut total) = (0, 0);
    for l in smaps.lines() {
        if let Some(v) = kib(l, "Size:") {
            size = v;
        } else if let Some(v) = kib(l, "Rss:") {
            if size != guest_kib {
                total += v;
            }
        }
    }
    total
}

/// Boots tests/guests/hostile.S with a disk, vsock, rng and balloon and
/// the log limits `log`; waits (answering status all along) until every
/// byte of its console flood is accounted for. Returns the last status,
/// the VMM's stderr, the console file's size, the VMM's own RSS (outside
/// guest RAM) when the guest started and when it was done, and how long it
/// took.
fn run_hostile(name: &str, log: Value) -> (Value, String, u64, u64, u64, Duration) {
    let dir = TempDir::new(name);
    let guest = build_guest(&dir, "hostile");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let serial = dir.path("serial.log");
    let sock = dir.path("ctl.sock");
    let child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 1, "memory_mib": 64,
            "kernel": {"path": guest},
            "serial": {"output": "file", "path": serial, "max_bytes": 8192, "bytes_per_sec": 1024},
            "block": [{"id": "disk0", "path": disk}],
            "vsock": {"guest_cid": 3, "uds_path": dir.path("v.sock")},
            "rng": true,
            "balloon": {"free_page_reporting": true},
            "control_socket": sock,
            "log": log,
        }),
    );
    let start = Instant::now();
    let mut ctl = Control::connect(&sock);
    wait_for("the guest's first line", Duration::from_secs(30), || {
        std::fs::read(&serial).is_ok_and(|b| b.starts_with(b"hostile: start\n"))
    });
    let rss_start = rss_kib(child.id(), 64 << 10);
    let mut status;
    loop {
        status = ctl.send(json!({"op": "status"}));
        assert_eq!(status["state"], "running", "{status}");
        let c = &status["counters"]["console"];
        let offered = ["written_bytes", "dropped_rate_bytes", "dropped_cap_bytes"]
            .iter()
            .map(|k| c[k].as_u64().unwrap())
            .sum::<u64>();
        // The cap's note is written on top of what the guest sent.
        let note = if c["dropped_cap_bytes"].as_u64() > Some(0) {
            "\n[husk-vmm: console output capped at 8192 bytes; the rest is dropped]\n".len() as u64
        } else {
            0
        };
        if offered - note == HOSTILE_CONSOLE_BYTES {
            break;
        }
        assert!(offered - note < HOSTILE_CONSOLE_BYTES, "{status}");
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the hostile guest did not finish: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = start.elapsed();
    let rss_end = rss_kib(child.id(), 64 << 10);
    assert_eq!(
        ctl.send(json!({"op": "shutdown", "timeout_ms": 100})),
        json!({"ok": true})
    );
    let (exit, stderr) = wait_exit(child, Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "{stderr}");
    let console_len = std::fs::metadata(&serial).unwrap().len();
    (status, stderr, console_len, rss_start, rss_end, took)
}

fn fault_count(status: &Value, kind: &str, what: &str) -> u64 {
    status["counters"]["guest_faults"][kind][what]
        .as_u64()
        .unwrap_or(0)
}

/// A hostile guest kernel (tests/guests/hostile.S: garbage to every
/// register, looping, overlapping and out-of-memory descriptor chains, bad
/// rings, a console flood) against the default log limits: the VMM keeps
/// answering, logs at most `burst` lines per kind plus one per second,
/// counts the rest, and keeps the console under its cap and rate.
#[test]
fn hostile_guest_is_bounded() {
    let (status, stderr, console_len, rss_start, rss_end, took) = run_hostile("hostile", json!({}));
    eprintln!(
        "hostile guest: {took:?}, RSS {rss_start} -> {rss_end} KiB, log {} bytes, console {console_len} bytes\n{status}",
        stderr.len()
    );
    for kind in ["mmio", "queue", "request", "unmapped", "device"] {
        assert!(fault_count(&status, kind, "events") > 0, "{kind}: {status}");
    }
    // The register faults come from the vCPU, thousands at once; the queue
    // faults from the device's thread, as many as it got to before the
    // guest reset it.
    assert!(
        fault_count(&status, "mmio", "suppressed") > 20_000,
        "{status}"
    );
    // Per kind: the burst of 10, then one a second (the run took `took`).
    let warnings = stderr.lines().filter(|l| l.contains(" WARN ")).count() as u64;
    let bound = 6 * (10 + took.as_secs() + 1);
    assert!(
        warnings <= bound,
        "{warnings} > {bound} warnings:\n{stderr}"
    );
    assert!(stderr.contains("suppressed="), "{stderr}");
    let c = &status["counters"]["console"];
    assert!(console_len <= 8192, "console {console_len} bytes");
    assert_eq!(c["written_bytes"].as_u64(), Some(console_len));
    assert!(c["dropped_rate_bytes"].as_u64() > Some(0), "{status}");
    assert!(
        rss_end < rss_start + rss_start / 20,
        "RSS grew from {rss_start} to {rss_end} KiB"
    );
}

/// The same guest with a generous rate limit and the smallest log cap: the
/// log stops at its cap with one line saying so, and still ends with why
/// the VMM stopped.
#[test]
fn hostile_guest_log_stops_at_its_cap() {
    let (status, stderr, ..) = run_hostile(
        "hostile-cap",
        json!({"max_bytes": 65536, "burst": 10000, "interval_ms": 10}),
    );
    eprintln!("log {} bytes: {status}", stderr.len());
    assert!(stderr.len() <= 65536, "log {} bytes", stderr.len());
    assert_eq!(stderr.matches("log capped at 65536 bytes").count(), 1);
    let log = &status["counters"]["log"];
    assert_eq!(log["capped"], true, "{status}");
    assert!(log["dropped_lines"].as_u64() > Some(0), "{status}");
    let after_cap = &stderr[stderr.find("log capped at").unwrap()..];
    assert!(after_cap.contains("VM stopped"), "{after_cap}");
}
