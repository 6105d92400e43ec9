//! One sandbox = one micro-VM: its state folder, the VM description
//! (vm.json), the husk-vmm process, the connection to the agent, and the
//! teardown that removes all of it.
//!
//! State folder `<state_dir>/<sandbox id>/`: vm.json, vmm.log (the VMM's
//! log), console.log (with debug_console), vsock (hybrid vsock socket),
//! ctl.sock (the VMM's control socket), root.erofs (the first container's
//! image), slot1..slotK (pod disk slots), images being built. The folder
//! goes when the sandbox ends, or when its creation fails.
//!
//! The VMM is started and waited for by one thread of its own: it gets
//! PR_SET_PDEATHSIG(SIGKILL), which fires when the *thread* that forked it
//! ends, so that thread lives exactly as long as the VMM. A shim that dies
//! takes its VMs with it (containerd then runs `shim delete`, which
//! removes the state folders).

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::agent::Agent;
use crate::config::Config;
use crate::rootfs::{self, RootfsError, Slots};
use crate::vsock;

/// The agent's vsock port (husk.agent_port= on the kernel command line).
pub const AGENT_PORT: u32 = 1024;
/// The guest's vsock context id (any value from 3 will do: one VM per
/// socket).
const GUEST_CID: u32 = 3;
/// The first container's disk image in the state folder.
pub const ROOT_IMAGE: &str = "root.erofs";
/// Lines of the guest console kept for an error.
const CONSOLE_TAIL_LINES: usize = 25;
/// Bytes read from the end of a log for its tail.
const TAIL_BYTES: u64 = 8192;
/// How long a graceful end (DestroySandbox) may take before SIGKILL.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox state folder {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sandbox state folder {0} already exists (a sandbox of that id runs, or was not cleaned up)")]
    Exists(PathBuf),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting {vmm}: {source}")]
    Spawn {
        vmm: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the VM did not boot: {reason}{diagnostics}")]
    Boot { reason: String, diagnostics: String },
    #[error("setting up the sandbox in the VM: {source}{diagnostics}")]
    Agent {
        #[source]
        source: crate::agent::AgentError,
        diagnostics: String,
    },
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
}

/// The sandbox's state folder; removed on drop unless kept.
pub struct StateDir {
    pub path: PathBuf,
    keep: bool,
}

impl StateDir {
    /// Creates `<root>/<id>` (mode 0700); it must not exist.
    pub fn create(root: &Path, id: &str) -> Result<StateDir, SandboxError> {
        let path = root.join(id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(root)
            .map_err(|source| SandboxError::StateDir {
                path: root.to_path_buf(),
                source,
            })?;
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => Ok(StateDir { path, keep: false }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(SandboxError::Exists(path)),
            Err(source) => Err(SandboxError::StateDir { path, source }),
        }
    }

    fn keep(mut self) -> PathBuf {
        self.keep = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if !self.keep && !self.path.as_os_str().is_empty() {
            remove_state_dir(&self.path);
        }
    }
}

/// Removes a state folder and everything in it (nothing in it is mounted).
pub fn remove_state_dir(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path) {
        if e.kind() != io::ErrorKind::NotFound {
            log::warn!("removing {}: {e}", path.display());
        }
    }
}

/// The kernel command line: the shim's parameters, then the configured
/// extra ones.
pub fn kernel_cmdline(cfg: &Config) -> String {
    let mut c = format!("console=ttyS0 reboot=k panic=-1 husk.agent_port={AGENT_PORT}");
    if !cfg.debug_console {
        c.push_str(" quiet");
    }
    if !cfg.kernel_params.is_empty() {
        c.push(' ');
        c.push_str(&cfg.kernel_params);
    }
    c
}

/// The VM description for husk-vmm.
pub fn vm_json(cfg: &Config, dir: &Path, slots: usize) -> serde_json::Value {
    let mut block = vec![json!({
        "id": "root",
        "path": dir.join(ROOT_IMAGE),
        "read_only": true,
        "serial": rootfs::ROOT_SERIAL,
    })];
    for n in 1..=slots {
        block.push(json!({
            "id": format!("slot{n}"),
            "path": dir.join(format!("slot{n}")),
            "read_only": true,
            "serial": rootfs::slot_serial(n),
        }));
    }
    let serial = if cfg.debug_console {
        json!({"output": "file", "path": dir.join("console.log")})
    } else {
        json!({"output": "none"})
    };
    json!({
        "vcpus": cfg.vcpus,
        "memory_mib": cfg.memory_mib,
        "kernel": {
            "path": cfg.kernel_path,
            "cmdline": kernel_cmdline(cfg),
            "initrd": cfg.initrd_path,
        },
        "serial": serial,
        "block": block,
        "vsock": {"guest_cid": GUEST_CID, "uds_path": dir.join("vsock")},
        "rng": true,
        "control_socket": dir.join("ctl.sock"),
    })
}

/// The last `lines` lines of a log file, printable, or "" if unreadable.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.take(TAIL_BYTES).read_to_end(&mut buf);
    let text: String = String::from_utf8_lossy(&buf)
        .chars()
        .map(|c| {
            if c == '\n' || (!c.is_control() && c != '\u{fffd}') {
                c
            } else if c == '\r' || c == '\t' {
                ' '
            } else {
                '?'
            }
        })
        .collect();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What runs when the VMM exits, with its exit status.
type ExitCallback = Box<dyn FnOnce(String) + Send>;

/// How the VMM process ended.
struct VmmState {
    exit: Mutex<Option<String>>,
    cv: Condvar,
    on_exit: Mutex<Option<ExitCallback>>,
}

/// A running VM and its agent.
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub vmm_pid: u32,
    pub agent: Agent,
    pidfd: Option<std::os::fd::OwnedFd>,
    vmm: Arc<VmmState>,
    slots: Mutex<Slots>,
    debug_console: bool,
}

/// Opens a pidfd for `pid` (our unreaped child), if the kernel has them.
fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open(2) with a pid and no flags; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a new fd that we own.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

impl Sandbox {
    /// Boots the VM of sandbox `id` in `dir` (which holds root.erofs), with
    /// `slots` pod disk slots, and sets the sandbox up in the guest. On
    /// failure the VMM is killed and the folder removed.
    pub fn boot(
        id: &str,
        dir: StateDir,
        cfg: &Config,
        slots: usize,
        hostname: &str,
        cancel: &AtomicBool,
    ) -> Result<Sandbox, SandboxError> {
        for n in 1..=slots {
            rootfs::create_sparse(&dir.path.join(format!("slot{n}")), cfg.slot_bytes())?;
        }
        let vm_path = dir.path.join("vm.json");
        let text = serde_json::to_vec_pretty(&vm_json(cfg, &dir.path, slots)).unwrap_or_default();
        fs::write(&vm_path, text).map_err(|source| SandboxError::Write {
            path: vm_path.clone(),
            source,
        })?;
        let log_path = dir.path.join("vmm.log");
        let log = fs::File::create(&log_path).map_err(|source| SandboxError::Write {
            path: log_path.clone(),
            source,
        })?;
        let mut cmd = Command::new(&cfg.vmm_path);
        cmd.arg("--config")
            .arg(&vm_path)
            .arg("--log-level")
            .arg(cfg.log_level.to_string().to_lowercase())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: the closure only calls prctl(2), async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let vmm = Arc::new(VmmState {
            exit: Mutex::new(None),
            cv: Condvar::new(),
            on_exit: Mutex::new(None),
        });
        let (tx, rx) = mpsc::sync_channel(1);
        let state = vmm.clone();
        let vmm_path = cfg.vmm_path.clone();
        std::thread::Builder::new()
            .name(format!("vmm-{}", &id[..id.len().min(8)]))
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let pid = child.id();
                let _ = tx.send(Ok((pid, pidfd_open(pid))));
                let status = match child.wait() {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("unknown ({e})"),
                };
                *state.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(status.clone());
                state.cv.notify_all();
                let cb = state
                    .on_exit
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(cb) = cb {
                    cb(status);
                }
            })
            .map_err(|source| SandboxError::Spawn {
                vmm: vmm_path.clone(),
                source,
            })?;
        let (vmm_pid, pidfd) = rx
            .recv()
            .map_err(|_| SandboxError::Spawn {
                vmm: vmm_path.clone(),
                source: io::Error::other("the VMM thread ended"),
            })?
            .map_err(|source| SandboxError::Spawn {
                vmm: vmm_path.clone(),
                source,
            })?;
        log::info!("sandbox {id}: VMM pid {vmm_pid} started");
        // For `shim delete`, should this shim die during the boot.
        let _ = fs::write(dir.path.join("vmm.pid"), vmm_pid.to_string());
        let mut sandbox = Sandbox {
            id: id.to_string(),
            dir: dir.path.clone(),
            vmm_pid,
            agent: match Self::connect(&dir.path, cfg, &vmm, cancel) {
                Ok(a) => a,
                Err(reason) => {
                    let s = PartialVm {
                        pid: vmm_pid,
                        pidfd: pidfd.as_ref(),
                        vmm: &vmm,
                    };
                    s.kill();
                    let diagnostics = diagnostics(&dir.path, cfg.debug_console);
                    return Err(SandboxError::Boot {
                        reason,
                        diagnostics,
                    });
                }
            },
            pidfd,
            vmm,
            slots: Mutex::new(Slots::new(slots, cfg.slot_bytes())),
            debug_console: cfg.debug_console,
        };
        let setup = sandbox
            .agent
            .guest_details()
            .and_then(|(release, version)| {
                log::info!("sandbox {id}: guest kernel {release}, agent {version}");
                sandbox.agent.create_sandbox(id, hostname)
            });
        if let Err(source) = setup {
            sandbox.kill();
            return Err(SandboxError::Agent {
                source,
                diagnostics: diagnostics(&dir.path, cfg.debug_console),
            });
        }
        sandbox.dir = dir.keep();
        Ok(sandbox)
    }

    /// Waits for the agent to answer, until the boot timeout (or until
    /// `cancel` is set: the shim is told to shut down).
    fn connect(
        dir: &Path,
        cfg: &Config,
        vmm: &VmmState,
        cancel: &AtomicBool,
    ) -> Result<Agent, String> {
        let start = Instant::now();
        let uds = dir.join("vsock");
        let mut last = String::from("the VMM's vsock socket never appeared");
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err("cancelled: the shim is shutting down".into());
            }
            if let Some(status) = vmm.exit.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                return Err(format!("the VMM exited ({status}) while the guest booted"));
            }
            let left = cfg.boot_timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(format!(
                    "the agent did not answer within boot_timeout_secs ({}s); last: {last}",
                    cfg.boot_timeout.as_secs()
                ));
            }
            if uds.exists() {
                match vsock::connect(&uds, AGENT_PORT, left.min(Duration::from_secs(2))) {
                    Ok((stream, _)) => match Agent::new(stream, cfg.request_timeout) {
                        Ok(agent) => match agent.check(left.min(Duration::from_secs(5))) {
                            Ok(true) => return Ok(agent),
                            Ok(false) => last = "the agent is not serving yet".into(),
                            Err(e) => last = e.to_string(),
                        },
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e.to_string(),
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Registers what to do when the VMM exits (at once if it has).
    pub fn on_exit(&self, f: impl FnOnce(String) + Send + 'static) {
        let exit = self.vmm.exit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = exit.clone() {
            drop(exit);
            f(status);
            return;
        }
        *self.vmm.on_exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    pub fn is_dead(&self) -> bool {
        self.vmm
            .exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The guest console's last lines (with debug_console), for errors.
    pub fn diagnostics(&self) -> String {
        diagnostics(&self.dir, self.debug_console)
    }

    /// Writes a pod container's image into the next free slot; the slot's
    /// serial.
    pub fn attach_image(&self, image: &Path) -> Result<String, SandboxError> {
        let size = fs::metadata(image)
            .map_err(|source| RootfsError::Io {
                what: "reading",
                path: image.to_path_buf(),
                source,
            })?
            .len();
        let n = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(size)?;
        rootfs::write_into_slot(image, &self.dir.join(format!("slot{n}")))?;
        Ok(rootfs::slot_serial(n))
    }

    fn partial(&self) -> PartialVm<'_> {
        PartialVm {
            pid: self.vmm_pid,
            pidfd: self.pidfd.as_ref(),
            vmm: &self.vmm,
        }
    }

    /// SIGKILLs the VMM and waits for it.
    pub fn kill(&self) {
        self.partial().kill();
    }

    /// Ends the VM: DestroySandbox (the guest powers off), SIGKILL if it
    /// does not, then removes the state folder.
    pub fn destroy(&self) {
        if !self.is_dead() {
            if let Err(e) = self.agent.destroy_sandbox(Duration::from_secs(5)) {
                log::warn!("sandbox {}: {e}", self.id);
            }
            if !self.partial().wait(DESTROY_TIMEOUT) {
                log::warn!(
                    "sandbox {}: the VM did not power off in {DESTROY_TIMEOUT:?}; killing it",
                    self.id
                );
                self.kill();
            }
        }
        remove_state_dir(&self.dir);
        log::info!("sandbox {}: ended", self.id);
    }
}

/// What killing a VMM needs (also before the Sandbox is complete).
struct PartialVm<'a> {
    pid: u32,
    pidfd: Option<&'a std::os::fd::OwnedFd>,
    vmm: &'a VmmState,
}

impl PartialVm<'_> {
    /// Waits up to `t` for the VMM to have exited.
    fn wait(&self, t: Duration) -> bool {
        let g = self.vmm.exit.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .vmm
            .cv
            .wait_timeout_while(g, t, |e| e.is_none())
            .unwrap_or_else(|e| e.into_inner());
        g.is_some()
    }

    fn kill(&self) {
        let exited = self
            .vmm
            .exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if exited {
            return;
        }
        use std::os::fd::AsRawFd;
        match self.pidfd {
            // SAFETY: pidfd_send_signal(2) on our pidfd, no siginfo.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            },
            // SAFETY: kill(2) of our own child, which is not reaped until
            // the VMM thread records its exit (checked above).
            None => unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            },
        }
        if !self.wait(Duration::from_secs(10)) {
            log::error!("the VMM (pid {}) did not die after SIGKILL", self.pid);
        }
    }
}

/// The console's tail (or how to get one) and the VMM log's tail, as a
/// suffix for an error message.
fn diagnostics(dir: &Path, debug_console: bool) -> String {
    let mut out = String::new();
    let vmm = tail(&dir.join("vmm.log"), 5);
    if !vmm.is_empty() {
        out.push_str("\nVMM log (last lines):\n");
        out.push_str(&vmm);
    }
    if debug_console {
        let console = tail(&dir.join("console.log"), CONSOLE_TAIL_LINES);
        out.push_str("\nguest console (last lines):\n");
        out.push_str(if console.is_empty() {
            "(empty)"
        } else {
            &console
        });
    } else {
        out.push_str(
            "\n(set debug_console = true in the husk configuration to see the guest console)",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        crate::config::parse(
            &format!("kernel_path = \"/k/bzImage\"\ninitrd_path = \"/k/initrd\"\n{extra}"),
            Path::new("/c.toml"),
        )
        .unwrap()
    }

    #[test]
    fn vm_description() {
        let c = cfg("vcpus = 2\nmemory_mib = 512\nkernel_params = \"loglevel=8\"");
        let v = vm_json(&c, Path::new("/run/husk/p1"), 2);
        assert_eq!(v["vcpus"], 2);
        assert_eq!(v["memory_mib"], 512);
        assert_eq!(v["kernel"]["path"], "/k/bzImage");
        assert_eq!(v["kernel"]["initrd"], "/k/initrd");
        assert_eq!(
            v["kernel"]["cmdline"],
            "console=ttyS0 reboot=k panic=-1 husk.agent_port=1024 quiet loglevel=8"
        );
        assert_eq!(v["serial"]["output"], "none");
        let block = v["block"].as_array().unwrap();
        assert_eq!(block.len(), 3);
        assert_eq!(block[0]["path"], "/run/husk/p1/root.erofs");
        assert_eq!(block[0]["serial"], "husk-root");
        assert_eq!(block[0]["read_only"], true);
        assert_eq!(block[2]["id"], "slot2");
        assert_eq!(block[2]["serial"], "husk-slot2");
        assert_eq!(block[2]["path"], "/run/husk/p1/slot2");
        assert_eq!(v["vsock"]["uds_path"], "/run/husk/p1/vsock");
        assert_eq!(v["vsock"]["guest_cid"], 3);
        assert_eq!(v["control_socket"], "/run/husk/p1/ctl.sock");
        assert_eq!(v["rng"], true);

        let c = cfg("debug_console = true");
        let v = vm_json(&c, Path::new("/run/husk/p1"), 0);
        assert_eq!(v["serial"]["output"], "file");
        assert_eq!(v["serial"]["path"], "/run/husk/p1/console.log");
        assert_eq!(
            v["kernel"]["cmdline"],
            "console=ttyS0 reboot=k panic=-1 husk.agent_port=1024"
        );
        assert_eq!(v["block"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn tails_are_short_and_printable() {
        let dir = std::env::temp_dir().join(format!("husk-tail-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("console.log");
        let mut text = Vec::new();
        for i in 0..100 {
            text.extend_from_slice(format!("line {i}\r\n").as_bytes());
        }
        text.extend_from_slice(b"bad \x1b[0m \xff end\n");
        fs::write(&f, &text).unwrap();
        let t = tail(&f, 3);
        assert_eq!(t, "line 98 \nline 99 \nbad ?[0m ? end");
        assert_eq!(tail(&dir.join("missing"), 3), "");
        let d = diagnostics(&dir, true);
        assert!(d.contains("guest console (last lines):\nline 76"), "{d}");
        assert!(diagnostics(&dir, false).contains("debug_console = true"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_dirs_are_exclusive_and_removed() {
        let root = std::env::temp_dir().join(format!("husk-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let d = StateDir::create(&root, "sb1").unwrap();
        assert!(matches!(
            StateDir::create(&root, "sb1"),
            Err(SandboxError::Exists(_))
        ));
        fs::write(d.path.join("x"), b"1").unwrap();
        drop(d);
        assert!(!root.join("sb1").exists());
        let d = StateDir::create(&root, "sb2").unwrap();
        let kept = d.keep();
        assert!(kept.exists());
        remove_state_dir(&kept);
        assert!(!kept.exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_vmm_that_cannot_start_fails_cleanly() {
        let root = std::env::temp_dir().join(format!("husk-boot-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let mut c = cfg("boot_timeout_secs = 5");
        c.vmm_path = "/nonexistent/husk-vmm".into();
        let dir = StateDir::create(&root, "sb").unwrap();
        let e = Sandbox::boot("sb", dir, &c, 1, "h", &AtomicBool::new(false))
            .err()
            .unwrap();
        assert!(matches!(e, SandboxError::Spawn { .. }), "{e}");
        assert!(!root.join("sb").exists());

        // A "VMM" that exits at once: the boot fails with its log.
        let script = root.join("fake-vmm");
        fs::write(
            &script,
            "#!/bin/sh\necho 'bad config: kernel.path' >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        c.vmm_path = script;
        let dir = StateDir::create(&root, "sb").unwrap();
        let e = Sandbox::boot("sb", dir, &c, 0, "h", &AtomicBool::new(false))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("the VMM exited"), "{e}");
        assert!(e.contains("bad config: kernel.path"), "{e}");
        assert!(!root.join("sb").exists());

        // A "VMM" that never answers: the boot times out and it is killed.
        let script = root.join("silent-vmm");
        fs::write(&script, "#!/bin/sh\nexec sleep 1000\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        c.vmm_path = script;
        c.boot_timeout = Duration::from_secs(1);
        let dir = StateDir::create(&root, "sb").unwrap();
        let t = Instant::now();
        let e = Sandbox::boot("sb", dir, &c, 0, "h", &AtomicBool::new(false))
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
        let e = Sandbox::boot("sb", dir, &c, 0, "h", &AtomicBool::new(true))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cancelled"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(8));
        assert!(!root.join("sb").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
