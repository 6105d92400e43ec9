//! A container process as containerd sees it (the init, empty exec id, or
//! an exec): its status, its exit, and the waiting for it.
//!
//! Pids: containerd's task pid must be a host pid; the processes run in the
//! guest, whose pids mean nothing on the host. Every process of a sandbox
//! reports the pid of the sandbox's VMM (as Kata reports its hypervisor's);
//! `Pids` lists the guest pids.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::protos::api::Status;

use crate::io::{Pumps, StdioPaths};

/// The exit status reported for processes of a VM that ended under them.
pub const EXIT_VM_GONE: u32 = 255;

/// Maps the agent's exit status (the exit code, or 128 + the signal) to
/// containerd's; anything outside 0..=255 (the guest is untrusted) is
/// [`EXIT_VM_GONE`].
pub fn exit_status(agent_status: i32) -> u32 {
    u32::try_from(agent_status)
        .ok()
        .filter(|s| *s <= 255)
        .unwrap_or(EXIT_VM_GONE)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
    Stopped,
}

impl State {
    pub fn to_proto(self) -> Status {
        match self {
            State::Created => Status::CREATED,
            State::Running => Status::RUNNING,
            State::Paused => Status::PAUSED,
            State::Stopped => Status::STOPPED,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

struct Inner {
    state: State,
    exit: Option<Exit>,
}

pub struct Process {
    pub container_id: String,
    pub exec_id: String,
    pub pid: u32,
    pub stdio: StdioPaths,
    /// An exec's OCI process (JSON), until it starts.
    pub spec: Mutex<Option<Vec<u8>>>,
    inner: Mutex<Inner>,
    cv: Condvar,
    /// Held while the process is being started, so that its exit is not
    /// reported before its start.
    pub starting: Mutex<()>,
    pumps: Mutex<Option<Arc<Pumps>>>,
    /// CloseIO(stdin) came before the stdio threads existed (an exec not
    /// started yet): stdin is closed as soon as they start.
    stdin_close_requested: std::sync::atomic::AtomicBool,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, pid: u32, stdio: StdioPaths) -> Process {
        Process {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            pid,
            stdio,
            spec: Mutex::new(None),
            inner: Mutex::new(Inner {
                state: State::Created,
                exit: None,
            }),
            cv: Condvar::new(),
            starting: Mutex::new(()),
            pumps: Mutex::new(None),
            stdin_close_requested: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    pub fn exit(&self) -> Option<Exit> {
        self.lock().exit
    }

    /// Created → Running, or Running ↔ Paused; false if the process is not
    /// in `from` (e.g. it exited meanwhile).
    pub fn transition(&self, from: State, to: State) -> bool {
        let mut g = self.lock();
        if g.state != from {
            return false;
        }
        g.state = to;
        true
    }

    /// Records the exit; false if it was recorded already (the first one
    /// counts).
    pub fn set_exited(&self, status: u32, at: SystemTime) -> bool {
        let mut g = self.lock();
        if g.exit.is_some() {
            return false;
        }
        g.state = State::Stopped;
        g.exit = Some(Exit { status, at });
        self.cv.notify_all();
        true
    }

    /// Waits for the exit.
    pub fn wait(&self) -> Exit {
        let mut g = self.lock();
        loop {
            if let Some(e) = g.exit {
                return e;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits up to `t` for the exit.
    pub fn wait_timeout(&self, t: Duration) -> Option<Exit> {
        let g = self.lock();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, t, |g| g.exit.is_none())
            .unwrap_or_else(|e| e.into_inner());
        g.exit
    }

    pub fn set_pumps(&self, p: Pumps) {
        let mut g = self.pumps.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .stdin_close_requested
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            p.close_stdin();
        }
        *g = Some(Arc::new(p));
    }

    /// CloseIO(stdin): now, or as soon as the stdio threads start.
    pub fn close_stdin(&self) {
        let g = self.pumps.lock().unwrap_or_else(|e| e.into_inner());
        self.stdin_close_requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(p) = g.as_ref() {
            p.close_stdin();
        }
    }

    pub fn pumps(&self) -> Option<Arc<Pumps>> {
        self.pumps.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the stdio threads (the process is being deleted).
    pub fn stop_io(&self) {
        if let Some(p) = self.pumps.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(0), 0);
        assert_eq!(exit_status(3), 3);
        assert_eq!(exit_status(137), 137);
        assert_eq!(exit_status(255), 255);
        assert_eq!(exit_status(256), EXIT_VM_GONE);
        assert_eq!(exit_status(-1), EXIT_VM_GONE);
        assert_eq!(exit_status(i32::MIN), EXIT_VM_GONE);
    }

    #[test]
    fn lifecycle_and_first_exit_wins() {
        let p = std::sync::Arc::new(Process::new("c", "", 7, StdioPaths::default()));
        assert_eq!(p.state(), State::Created);
        assert!(!p.transition(State::Running, State::Paused));
        assert!(p.transition(State::Created, State::Running));
        assert!(p.wait_timeout(Duration::from_millis(10)).is_none());
        let q = p.clone();
        let waiter = std::thread::spawn(move || q.wait());
        let at = SystemTime::now();
        assert!(p.set_exited(3, at));
        assert!(!p.set_exited(255, SystemTime::now()));
        assert_eq!(waiter.join().unwrap(), Exit { status: 3, at });
        assert_eq!(p.state(), State::Stopped);
        assert!(!p.transition(State::Running, State::Paused));
        assert_eq!(State::Stopped.to_proto(), Status::STOPPED);
    }
}
