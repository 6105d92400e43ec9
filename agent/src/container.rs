//! One container and its processes, and how a process is started: the
//! agent runs `husk-agent init` (see `init`) with the process's stdio,
//! places it in the container's cgroup, sends it its work and follows its
//! reports on the sync channel.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::cgroup::Cgroup;
use crate::reaper::Reaper;
use crate::stdio::Stdio;
use crate::sync::{Channel, FromInit, InitConfig, SyncError, ToInit, INIT_FD};

/// How long a set-up process may take to report its container's pid.
const SETUP_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("creating the process's stdio: {0}")]
    Stdio(#[source] io::Error),
    #[error("starting the set-up process: {0}")]
    Exec(#[source] io::Error),
    #[error("placing the set-up process in its cgroup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("talking to the set-up process: {0}")]
    Sync(#[from] SyncError),
    /// The set-up process's own report of what failed.
    #[error("{0}")]
    Setup(String),
    #[error("the set-up process ended without reporting")]
    Vanished,
}

/// A running or exited process of a container.
pub struct Process {
    pub pid: i32,
    pub stdio: Stdio,
}

/// A process whose set-up is done: for a container's init, the channel
/// on which Start is sent.
pub struct Spawned {
    pub process: Process,
    pub channel: Channel,
}

fn kill_and_reap(reaper: &Reaper, pid: i32) {
    let _ = crate::sys::kill(pid, rustix::process::Signal::KILL);
    reaper.wait(pid, Some(SETUP_EXIT_TIMEOUT));
    reaper.forget(pid);
}

/// The uid_map and gid_map text of a new user namespace.
pub struct IdMaps {
    pub uid: String,
    pub gid: String,
}

/// Starts a set-up process for `cfg` in `cgroup` and waits until it reports
/// Ready (the container process is set up and blocked, or about to exec).
pub fn spawn(
    reaper: &Reaper,
    cfg: InitConfig,
    terminal: bool,
    cgroup: &Cgroup,
    id_maps: Option<&IdMaps>,
) -> Result<Spawned, SpawnError> {
    // A terminal comes from the set-up process (made in the container's
    // devpts); until then the process's stdio is /dev/null.
    let (pipes, ends) = if terminal {
        (None, crate::stdio::null_ends().map_err(SpawnError::Stdio)?)
    } else {
        let (s, e) = Stdio::pipes().map_err(SpawnError::Stdio)?;
        (Some(s), e)
    };
    let (mut ch, child_end) = Channel::pair().map_err(SpawnError::Stdio)?;
    let child_raw = child_end.as_raw_fd();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("husk-agent")
        .arg("init")
        .env_clear()
        .stdin(ends.stdin)
        .stdout(ends.stdout)
        .stderr(ends.stderr);
    // libc, not rustix, in this closure: it runs between fork and exec in a
    // child of the multi-threaded agent, where only async-signal-safe calls
    // that do not allocate may run; fd 3 is no fd this process owns as an
    // OwnedFd, and signal masks are libc's.
    // SAFETY: the closure only calls dup2 and sigprocmask, both
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(child_raw, INIT_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            crate::reaper::unblock_signals()
        });
    }
    let child = cmd.spawn().map_err(SpawnError::Exec)?;
    // Close our copies of the child's ends now, so that readers see EOF
    // when the process side closes.
    drop(cmd);
    drop(child_end);
    // Fits: the kernel's pids are at most PID_MAX_LIMIT (2^22).
    #[allow(clippy::cast_possible_wrap)]
    let setup_pid = child.id() as i32;
    reaper.watch(setup_pid);
    let result = follow_setup(reaper, &mut ch, setup_pid, cfg, cgroup, id_maps);
    let pid = match result {
        Ok(pid) => pid,
        Err(e) => {
            kill_and_reap(reaper, setup_pid);
            return Err(e);
        }
    };
    reaper.wait(setup_pid, Some(SETUP_EXIT_TIMEOUT));
    reaper.forget(setup_pid);
    let mut stdio = pipes;
    let mut report = ch.recv_or_closed();
    if let (Ok(Some(FromInit::Console)), None) = (&report, &stdio) {
        let master = ch.recv_fd().map_err(SpawnError::Stdio);
        match master.and_then(|m| Stdio::terminal(m.into()).map_err(SpawnError::Stdio)) {
            Ok(s) => stdio = Some(s),
            Err(e) => {
                kill_and_reap(reaper, pid);
                return Err(e);
            }
        }
        report = ch.recv_or_closed();
    }
    match (report, stdio) {
        (Ok(Some(FromInit::Ready)), Some(stdio)) => Ok(Spawned {
            process: Process { pid, stdio },
            channel: ch,
        }),
        (other, _) => {
            kill_and_reap(reaper, pid);
            Err(match other {
                Ok(Some(FromInit::Error(e))) => SpawnError::Setup(e),
                Err(e) => SpawnError::Sync(e),
                _ => SpawnError::Vanished,
            })
        }
    }
}

/// Sends the config, writes the id maps if asked, and learns the container
/// process's pid (now watched).
fn follow_setup(
    reaper: &Reaper,
    ch: &mut Channel,
    setup_pid: i32,
    cfg: InitConfig,
    cgroup: &Cgroup,
    id_maps: Option<&IdMaps>,
) -> Result<i32, SpawnError> {
    cgroup.add(setup_pid)?;
    ch.send(&ToInit::Config(Box::new(cfg)))?;
    loop {
        match ch.recv_or_closed()? {
            Some(FromInit::NeedIdMaps) => {
                let maps = id_maps.ok_or(SpawnError::Setup("unexpected id map request".into()))?;
                let proc_dir = Path::new("/proc").join(setup_pid.to_string());
                for (file, text) in [("uid_map", &maps.uid), ("gid_map", &maps.gid)] {
                    std::fs::write(proc_dir.join(file), text)
                        .map_err(|e| SpawnError::Setup(format!("writing {file}: {e}")))?;
                }
                ch.send(&ToInit::IdMapsWritten)?;
            }
            Some(FromInit::Pid(pid)) => {
                reaper.watch(pid);
                return Ok(pid);
            }
            Some(FromInit::Error(e)) => return Err(SpawnError::Setup(e)),
            _ => return Err(SpawnError::Vanished),
        }
    }
}

/// After Ready: lets a created container run (`start`), then waits for the
/// exec to happen (the channel closes) or fail (an Error report).
pub fn run(channel: &mut Channel, start: bool) -> Result<(), SpawnError> {
    if start {
        channel.send(&ToInit::Start)?;
    }
    match channel.recv_or_closed()? {
        None => Ok(()),
        Some(FromInit::Error(e)) => Err(SpawnError::Setup(e)),
        Some(other) => Err(SpawnError::Setup(format!("unexpected report {other:?}"))),
    }
}

/// A container: its init process, exec'd processes and cgroup.
pub struct Container {
    pub init: Process,
    /// The channel to the created init, until it is started.
    pending_start: Mutex<Option<Channel>>,
    execs: Mutex<HashMap<String, std::sync::Arc<Process>>>,
    pub cgroup: Cgroup,
    /// (CLONE_NEW* flag, /proc/<pid>/ns name) of the namespaces it has.
    pub namespaces: Vec<(i32, &'static str)>,
    /// The spec's seccomp profile, applied to exec'd processes too.
    pub seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    paused: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Container {
    pub fn new(
        spawned: Spawned,
        cgroup: Cgroup,
        namespaces: Vec<(i32, &'static str)>,
        seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    ) -> Container {
        Container {
            init: spawned.process,
            pending_start: Mutex::new(Some(spawned.channel)),
            execs: Mutex::default(),
            cgroup,
            namespaces,
            seccomp,
            paused: AtomicBool::new(false),
        }
    }

    fn execs(&self) -> MutexGuard<'_, HashMap<String, std::sync::Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self, reaper: &Reaper) -> Status {
        if reaper.try_exit(self.init.pid).is_some() {
            Status::Stopped
        } else if self
            .pending_start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            Status::Created
        } else if self.paused.load(Ordering::SeqCst) {
            Status::Paused
        } else {
            Status::Running
        }
    }

    /// The start channel, taken once.
    pub fn take_start(&self) -> Option<Channel> {
        self.pending_start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub fn set_paused(&self, p: bool) {
        self.paused.store(p, Ordering::SeqCst);
    }

    pub fn exec(&self, exec_id: &str) -> Option<std::sync::Arc<Process>> {
        self.execs().get(exec_id).cloned()
    }

    /// Registers an exec; false if the id is taken.
    pub fn add_exec(&self, exec_id: &str, p: Process) -> bool {
        let mut e = self.execs();
        if e.contains_key(exec_id) {
            return false;
        }
        e.insert(exec_id.to_string(), std::sync::Arc::new(p));
        true
    }

    pub fn exec_pids(&self) -> Vec<i32> {
        self.execs().values().map(|p| p.pid).collect()
    }

    /// Paths of the init's namespaces, for an exec to join.
    pub fn ns_paths(&self) -> Vec<(i32, std::path::PathBuf)> {
        self.namespaces
            .iter()
            .map(|(flag, name)| {
                (
                    *flag,
                    Path::new("/proc")
                        .join(self.init.pid.to_string())
                        .join("ns")
                        .join(name),
                )
            })
            .collect()
    }
}
