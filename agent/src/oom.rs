//! OOM events: one thread watches the memory.events file of every
//! container's cgroup with inotify (the kernel signals a modification when
//! a counter changes) and queues a container id for each new oom_kill.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Events kept at most while nobody asks for them.
const QUEUE_MAX: usize = 1024;

struct Watch {
    id: String,
    events: PathBuf,
    seen: u64,
}

#[derive(Default)]
struct State {
    watches: HashMap<i32, Watch>,
    queue: VecDeque<String>,
}

pub struct OomWatcher {
    fd: OwnedFd,
    state: Mutex<State>,
    ready: Condvar,
}

fn oom_kills(events: &Path) -> u64 {
    fs::read_to_string(events)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

impl OomWatcher {
    pub fn start() -> io::Result<Arc<OomWatcher>> {
        // SAFETY: inotify_init1 with flags only.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let w = Arc::new(OomWatcher {
            // SAFETY: inotify_init1 returned a new fd we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            state: Mutex::default(),
            ready: Condvar::new(),
        });
        let w2 = w.clone();
        std::thread::Builder::new()
            .name("oom".into())
            .stack_size(64 * 1024)
            .spawn(move || w2.run())?;
        Ok(w)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `cgroup`'s memory.events for container `id`; a no-op where
    /// the memory controller is not enabled.
    pub fn watch(&self, id: &str, cgroup: &Path) {
        let events = cgroup.join("memory.events");
        let Ok(c) = crate::sys::cstr(&events) else {
            return;
        };
        if !events.exists() {
            return;
        }
        // SAFETY: a valid C string path and our inotify fd.
        let wd =
            unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) };
        if wd < 0 {
            crate::log!(
                "watching {}: {}",
                events.display(),
                io::Error::last_os_error()
            );
            return;
        }
        let seen = oom_kills(&events);
        self.lock().watches.insert(
            wd,
            Watch {
                id: id.to_string(),
                events,
                seen,
            },
        );
    }

    /// Stops watching container `id` (its cgroup is going away), after
    /// queueing any kill not seen yet.
    pub fn unwatch(&self, id: &str) {
        let mut st = self.lock();
        let wds: Vec<i32> = st
            .watches
            .iter()
            .filter(|(_, w)| w.id == id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            Self::check(&mut st, wd);
            st.watches.remove(&wd);
            // SAFETY: removing a watch descriptor we added.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
        }
        drop(st);
        self.ready.notify_all();
    }

    fn check(st: &mut State, wd: i32) {
        let Some(w) = st.watches.get_mut(&wd) else {
            return;
        };
        let now = oom_kills(&w.events);
        if now > w.seen {
            w.seen = now;
            let id = w.id.clone();
            if st.queue.len() >= QUEUE_MAX {
                st.queue.pop_front();
            }
            st.queue.push_back(id);
        }
    }

    /// Blocks until an OOM kill is queued; returns its container id.
    pub fn next(&self) -> String {
        let mut st = self.lock();
        loop {
            if let Some(id) = st.queue.pop_front() {
                return id;
            }
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn run(&self) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading inotify events into a live buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
            let mut off = 0usize;
            let mut st = self.lock();
            let head = std::mem::size_of::<libc::inotify_event>();
            while off + head <= n as usize {
                // SAFETY: the kernel wrote whole events; read_unaligned
                // copes with the byte buffer's alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
                Self::check(&mut st, ev.wd);
                off += head + ev.len as usize;
            }
            drop(st);
            self.ready.notify_all();
        }
    }
}
