//! Reaps every child of the agent (its own processes and, as PID 1 or as a
//! child subreaper, every orphan) and hands exit statuses to whoever waits
//! for them.
//!
//! SIGCHLD is blocked in every thread and read from a signalfd by one thread,
//! which then collects every exited child with `waitpid(-1, WNOHANG)`. A
//! status for a pid nobody watches yet is kept (bounded) because a container
//! process can exit before the agent has learnt its pid from the set-up
//! process that forked it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rustix::process::WaitOptions;

/// Statuses of unwatched pids kept at most (orphans nobody asks about).
const UNCLAIMED_MAX: usize = 1024;

/// How a process ended, as runc reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal number for a killed process.
    pub status: i32,
    pub at: SystemTime,
}

impl Exit {
    fn from_wait_status(ws: libc::c_int) -> Self {
        let status = if libc::WIFSIGNALED(ws) {
            128 + libc::WTERMSIG(ws)
        } else {
            libc::WEXITSTATUS(ws)
        };
        Exit {
            status,
            at: SystemTime::now(),
        }
    }
}

#[derive(Default)]
struct State {
    /// Watched pids, with their exit once it happened.
    watched: HashMap<i32, Option<Exit>>,
    unclaimed: HashMap<i32, Exit>,
    unclaimed_order: VecDeque<i32>,
}

/// The exit registry shared by the reaping thread and the request handlers.
#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
    exited: Condvar,
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A handler panicking while holding the lock must not take every
        // later request down with it: the state stays consistent per call.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking `pid`; picks up its exit if it already happened.
    pub fn watch(&self, pid: i32) {
        let mut st = self.lock();
        let exit = st.unclaimed.remove(&pid);
        if exit.is_some() {
            st.unclaimed_order.retain(|p| *p != pid);
        }
        st.watched.insert(pid, exit);
    }

    /// Stops tracking `pid` (after its exit was consumed).
    pub fn forget(&self, pid: i32) {
        self.lock().watched.remove(&pid);
    }

    /// The exit of a watched pid, if it has happened.
    pub fn try_exit(&self, pid: i32) -> Option<Exit> {
        self.lock().watched.get(&pid).copied().flatten()
    }

    /// Blocks until watched `pid` exits (or `timeout` passes: `None`).
    pub fn wait(&self, pid: i32, timeout: Option<Duration>) -> Option<Exit> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut st = self.lock();
        loop {
            match st.watched.get(&pid) {
                Some(Some(exit)) => return Some(*exit),
                Some(None) => {}
                None => return None,
            }
            st = match deadline {
                None => self.exited.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.exited
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn record(&self, pid: i32, exit: Exit) {
        let mut st = self.lock();
        if let Some(slot) = st.watched.get_mut(&pid) {
            *slot = Some(exit);
            drop(st);
            self.exited.notify_all();
            return;
        }
        if st.unclaimed.len() >= UNCLAIMED_MAX {
            if let Some(old) = st.unclaimed_order.pop_front() {
                st.unclaimed.remove(&old);
            }
        }
        st.unclaimed.insert(pid, exit);
        st.unclaimed_order.push_back(pid);
    }

    /// Collects every child that has exited.
    fn reap_all(&self) {
        // __WALL: clone children too, whatever signal they report with.
        let opts = WaitOptions::NOHANG | WaitOptions::from_bits_retain(libc::__WALL as u32);
        loop {
            // wait(), not waitpid(None): rustix's None is pid 0, our group only.
            let Ok(Some((pid, ws))) = rustix::process::wait(opts) else {
                return;
            };
            if ws.exited() || ws.signaled() {
                self.record(
                    pid.as_raw_nonzero().get(),
                    Exit::from_wait_status(ws.as_raw()),
                );
            }
        }
    }
}

/// Blocks SIGCHLD in the calling thread; call before any other thread
/// starts so that every thread inherits the mask and only the signalfd sees
/// the signal. Children must unblock it (see `unblock_signals`).
pub fn block_sigchld() -> io::Result<()> {
    let set = sigchld_set();
    // SAFETY: `set` is an initialised sigset; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Clears the signal mask; for a freshly forked child, async-signal-safe.
pub fn unblock_signals() -> io::Result<()> {
    // SAFETY: an empty set is initialised by sigemptyset before use; both are
    // plain libc calls on a stack value.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; SIGCHLD is valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

/// Starts the reaping thread. SIGCHLD must already be blocked.
pub fn start() -> io::Result<Arc<Reaper>> {
    let set = sigchld_set();
    // signalfd stays with libc: rustix has none (signals are libc's).
    // SAFETY: `set` is initialised; -1 asks for a new signalfd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not PID 1 (host tests): orphans of our containers come back to us.
    // (The argument is the flag: pid 1 is just a non-zero value.)
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::Pid::INIT));
    let reaper = Arc::new(Reaper::default());
    let r = reaper.clone();
    std::thread::Builder::new()
        .name("reaper".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            loop {
                r.reap_all();
                match rustix::io::read(&fd, &mut info) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        crate::log!("reaper: signalfd: {}", io::Error::from(e));
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(reaper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_before_watch_is_kept() {
        let r = Reaper::default();
        let e = Exit {
            status: 3,
            at: SystemTime::now(),
        };
        r.record(42, e);
        r.watch(42);
        assert_eq!(r.try_exit(42), Some(e));
        assert_eq!(r.wait(42, Some(Duration::from_millis(1))), Some(e));
        r.forget(42);
        assert_eq!(r.try_exit(42), None);
    }

    #[test]
    fn unclaimed_is_bounded() {
        let r = Reaper::default();
        for pid in 0..(i32::try_from(UNCLAIMED_MAX).unwrap() + 10) {
            r.record(
                pid,
                Exit {
                    status: 0,
                    at: SystemTime::now(),
                },
            );
        }
        assert_eq!(r.lock().unclaimed.len(), UNCLAIMED_MAX);
        r.watch(0);
        assert_eq!(r.try_exit(0), None, "the oldest was dropped");
    }

    #[test]
    fn wait_times_out_for_a_live_pid() {
        let r = Reaper::default();
        r.watch(7);
        assert_eq!(r.wait(7, Some(Duration::from_millis(10))), None);
    }

    #[test]
    fn statuses_as_runc_reports_them() {
        // Exit code 3: status word 3 << 8. Killed by SIGKILL: 9.
        assert_eq!(Exit::from_wait_status(3 << 8).status, 3);
        assert_eq!(Exit::from_wait_status(9).status, 137);
    }
}
