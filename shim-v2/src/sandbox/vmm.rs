//! The husk-vmm process of a sandbox: spawning it, recording how it ended,
//! killing it. The same supervision ([`VmmProcess::supervise`]) runs the
//! sandbox's virtiofsd.
//!
//! The VMM is started and waited for by one thread of its own: it gets
//! PR_SET_PDEATHSIG(SIGKILL), which fires when the *thread* that forked it
//! ends, so that thread lives exactly as long as the VMM. A shim that dies
//! takes its VMs with it (containerd then runs `shim delete`, which removes
//! the state folders). Signals go through a pidfd, so a recycled pid is
//! never signalled.
//!
//! Confined (the default), the thread first unshares its children's PID
//! namespace, so the VMM is PID 1 of its own, and the child joins the
//! sandbox's cgroup, the pod's network namespace and its jail
//! ([`super::jail`]) before exec, in that order: the cgroup first, so
//! everything the child does is counted, the jail last, as it drops the
//! privileges the others need.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal};

use super::jail::{self, Jail};
use super::state_dir::{VMM_LOG, VMM_PID};
use crate::sync::lock;

/// How long a SIGKILLed VMM may take to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("starting {vmm}: {source}")]
pub struct SpawnError {
    pub vmm: PathBuf,
    #[source]
    pub source: io::Error,
}

/// What runs when the VMM exits, with its exit status.
type ExitCallback = Box<dyn FnOnce(String) + Send>;

/// How the VMM process ended, shared with its waiting thread.
#[derive(Default)]
struct Exit {
    status: Mutex<Option<String>>,
    cv: Condvar,
    on_exit: Mutex<Option<ExitCallback>>,
}

/// What confines a VMM: the cgroup(s) it joins (their `cgroup.procs`,
/// opened before fork) and its jail.
#[derive(Default)]
pub struct Confinement {
    pub cgroup_procs: Vec<OwnedFd>,
    pub jail: Option<Jail>,
}

/// A running (or ended) husk-vmm child.
pub struct VmmProcess {
    pub pid: u32,
    pidfd: Option<OwnedFd>,
    exit: Arc<Exit>,
}

impl VmmProcess {
    /// Starts `vmm --config <spec> --log-level <level>` with stderr to
    /// `log`, inside network namespace `netns` if given (the pod's, where
    /// its taps are), confined by `confine`; `name` names its thread. With
    /// a jail, `vmm` and `spec` are paths inside it. With `restore`, the VM
    /// is restored from a snapshot's open files (state, memory), which the
    /// VMM inherits (`--restore-fds`): its jail's user could not open them.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        vmm: &Path,
        spec: &Path,
        log_level: log::LevelFilter,
        log: fs::File,
        name: &str,
        netns: Option<Arc<OwnedFd>>,
        confine: Confinement,
        restore: Option<(OwnedFd, OwnedFd)>,
    ) -> Result<VmmProcess, SpawnError> {
        let err = |source| SpawnError {
            vmm: vmm.to_path_buf(),
            source,
        };
        let mut cmd = Command::new(vmm);
        cmd.arg("--config")
            .arg(spec)
            .arg("--log-level")
            .arg(log_level.to_string().to_lowercase())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let Confinement { cgroup_procs, jail } = confine;
        if !cgroup_procs.is_empty() {
            // SAFETY: the closure runs between fork and exec; it only calls
            // write(2) on fds it owns, and allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &cgroup_procs {
                        // "0": the writing process.
                        rustix::io::write(fd, b"0")?;
                    }
                    Ok(())
                });
            }
        }
        if let Some(fd) = netns {
            crate::network::NetNs::enter_on_spawn(fd, &mut cmd);
        }
        let jailed = jail.is_some();
        if let Some(jail) = jail {
            // SAFETY: the closure runs between fork and exec; Jail's enter
            // and drop_privileges only make system calls on C strings
            // prepared before fork, and allocate nothing.
            unsafe {
                cmd.pre_exec(move || {
                    jail.enter()?;
                    jail.drop_privileges()
                });
            }
        }
        if let Some((state, memory)) = restore {
            let (s, m) = (state.as_raw_fd(), memory.as_raw_fd());
            cmd.arg("--restore-fds").arg(format!("{s},{m}"));
            // SAFETY: the closure runs between fork and exec, after the
            // jail's (which marks every fd close-on-exec); fcntl(2) on two
            // fds the closure owns is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in [&state, &memory] {
                        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                    }
                    Ok(())
                });
            }
        }
        VmmProcess::supervise(cmd, name, jailed).map_err(err)
    }

    /// Starts `cmd` (whose pre_exec hooks are set) on a thread of its own,
    /// named `name`, that waits for it; with `new_pid_namespace`, as PID 1
    /// of a PID namespace of its own (when it dies, the kernel kills
    /// everything else in the namespace). Also for the sandbox's virtiofsd.
    pub fn supervise(
        mut cmd: Command,
        name: &str,
        new_pid_namespace: bool,
    ) -> io::Result<VmmProcess> {
        // SAFETY: the closure runs between fork and exec and only calls
        // prctl(2), which is async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                    .map_err(io::Error::from)
            });
        }
        let exit = Arc::new(Exit::default());
        let (tx, rx) = mpsc::sync_channel(1);
        let state = exit.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // This thread forks once and creates no thread.
                let pidns = if new_pid_namespace {
                    jail::new_pid_namespace()
                } else {
                    Ok(())
                };
                let mut child = match pidns.and_then(|()| cmd.spawn()) {
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
                *lock(&state.status) = Some(status.clone());
                state.cv.notify_all();
                if let Some(cb) = lock(&state.on_exit).take() {
                    cb(status);
                }
            })?;
        let (pid, pidfd) = rx
            .recv()
            .map_err(|_| io::Error::other("the process's thread ended"))??;
        Ok(VmmProcess { pid, pidfd, exit })
    }

    /// How the VMM ended, if it has.
    pub fn exit_status(&self) -> Option<String> {
        lock(&self.exit.status).clone()
    }

    pub fn is_dead(&self) -> bool {
        lock(&self.exit.status).is_some()
    }

    /// Registers what to do when the VMM exits (at once if it has).
    pub fn on_exit(&self, f: impl FnOnce(String) + Send + 'static) {
        let recorded = lock(&self.exit.status);
        if let Some(status) = recorded.clone() {
            drop(recorded);
            f(status);
            return;
        }
        // Registered under the status lock: the waiting thread cannot
        // record the exit in between and miss the callback.
        *lock(&self.exit.on_exit) = Some(Box::new(f));
    }

    /// Waits up to `t` for the VMM to have exited.
    pub fn wait(&self, t: Duration) -> bool {
        let g = lock(&self.exit.status);
        let (g, _) = self
            .exit
            .cv
            .wait_timeout_while(g, t, |e| e.is_none())
            .unwrap_or_else(|e| e.into_inner());
        g.is_some()
    }

    /// SIGKILLs the VMM and waits for it.
    pub fn kill(&self) {
        if self.is_dead() {
            return;
        }
        self.signal(Signal::KILL);
        if !self.wait(KILL_WAIT) {
            log::error!("the VMM (pid {}) did not die after SIGKILL", self.pid);
        }
    }

    /// SIGTERMs the VMM: it stops the vCPUs and exits with status 0 (the
    /// guest gets no say). Does not wait.
    pub fn terminate(&self) {
        if !self.is_dead() {
            self.signal(Signal::TERM);
        }
    }

    fn signal(&self, signal: Signal) {
        let sent = match &self.pidfd {
            Some(fd) => rustix::process::pidfd_send_signal(fd, signal),
            // Without pidfds: our own child, not reaped until its thread
            // records the exit (checked by the callers), so the pid is
            // still ours.
            None => match i32::try_from(self.pid).ok().and_then(Pid::from_raw) {
                Some(pid) => rustix::process::kill_process(pid, signal),
                None => return,
            },
        };
        if let Err(e) = sent {
            log::debug!("signalling the VMM (pid {}): {e}", self.pid);
        }
    }
}

/// A pidfd for `pid` (our unreaped child), if the kernel has them.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok()
}

/// Kills the VMM recorded in a state folder, if it still runs and really
/// is that folder's VMM: its stderr is the folder's vmm.log (its command
/// line cannot tell: a jailed VMM's names the jail's /vm.json).
pub fn kill_recorded(dir: &Path) {
    let Ok(pid) = std::fs::read_to_string(dir.join(VMM_PID)) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let Some(pid) = Pid::from_raw(pid).filter(|p| !p.is_init()) else {
        return;
    };
    let stderr = std::fs::read_link(format!("/proc/{}/fd/2", pid.as_raw_nonzero()));
    if stderr.is_ok_and(|p| p == dir.join(VMM_LOG)) {
        log::warn!(
            "killing leftover VMM pid {} of {}",
            pid.as_raw_nonzero(),
            dir.display()
        );
        // The pid was just checked to run this folder's VM.
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `shim delete`'s kill: only the process whose stderr is the folder's
    /// vmm.log (a jailed VMM's command line names no host path).
    #[test]
    fn kill_recorded_kills_only_the_folders_vmm() {
        let root = std::env::temp_dir().join(format!("husk-killrec-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (a, b) = (root.join("a"), root.join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        let fake = root.join("fake-vmm");
        fs::write(&fake, "#!/bin/sh\nexec sleep 1000\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        let spawn = |dir: &Path| {
            let log = fs::File::create(dir.join(VMM_LOG)).unwrap();
            let vmm = VmmProcess::spawn(
                &fake,
                Path::new("/vm.json"),
                log::LevelFilter::Info,
                log,
                "vmm-killrec",
                None,
                Confinement::default(),
                None,
            )
            .unwrap();
            fs::write(dir.join(VMM_PID), vmm.pid.to_string()).unwrap();
            vmm
        };
        let vmm_a = spawn(&a);
        let vmm_b = spawn(&b);
        // b's pid recorded in a's folder: not a's VMM, not killed.
        fs::write(a.join(VMM_PID), vmm_b.pid.to_string()).unwrap();
        kill_recorded(&a);
        assert!(!vmm_b.wait(Duration::from_millis(300)));
        kill_recorded(&b);
        assert!(vmm_b.wait(Duration::from_secs(5)));
        assert_eq!(vmm_b.exit_status().as_deref(), Some("signal: 9 (SIGKILL)"));
        // Garbage and missing records are ignored.
        fs::write(a.join(VMM_PID), "1").unwrap();
        kill_recorded(&a);
        fs::write(a.join(VMM_PID), "x").unwrap();
        kill_recorded(&a);
        kill_recorded(&root.join("none"));
        assert!(!vmm_a.is_dead());
        vmm_a.kill();
        fs::remove_dir_all(&root).unwrap();
    }
}
