//! What the husk-vmm end-to-end tests share: scratch folders, the
//! hand-made guests (assembled with `cc`), spawning and waiting for the VMM,
//! and a control-socket client.
// Each test file uses its own part of this.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
pub const VMM: &str = env!("CARGO_BIN_EXE_husk-vmm");

/// A scratch directory removed at the end of the test.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-vmm-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Assembles and links tests/guests/NAME.S into a static ELF loaded at 1 MiB.
pub fn build_guest(dir: &TempDir, name: &str) -> PathBuf {
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
pub fn build_bzimage_guest(dir: &TempDir, name: &str) -> PathBuf {
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

pub fn spawn_vmm(dir: &TempDir, config: &Value) -> Child {
    spawn_vmm_with_args(dir, config, &[])
}

pub fn spawn_vmm_with_args(dir: &TempDir, config: &Value, args: &[&str]) -> Child {
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
pub fn wait_exit(child: Child, timeout: Duration) -> (ExitStatus, String) {
    wait_exit_showing_console(child, timeout, None)
}

/// Like [`wait_exit`]; on a timeout the panic also shows the guest console
/// logged at `serial`.
pub fn wait_exit_showing_console(
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

pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
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
pub struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Control {
    pub fn connect(path: &Path) -> Self {
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

    pub fn send_raw(&mut self, line: &str) -> Value {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        assert!(reply.ends_with('\n'), "reply is one line: {reply:?}");
        serde_json::from_str(&reply).unwrap()
    }

    pub fn send(&mut self, request: Value) -> Value {
        self.send_raw(&request.to_string())
    }

    /// A status request; checks the reply's counters and leaves them out.
    pub fn status(&mut self) -> Value {
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
