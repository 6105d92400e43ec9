//! OOM events: one thread watches the memory.events file of every
//! container's cgroup with inotify (the kernel signals a modification when
//! a counter changes) and queues a container id for each new oom_kill.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rustix::fs::inotify;

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
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC)?;
        let w = Arc::new(OomWatcher {
            fd,
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
        if !events.exists() {
            return;
        }
        let wd = match inotify::add_watch(&self.fd, &events, inotify::WatchFlags::MODIFY) {
            Ok(wd) => wd,
            Err(e) => {
                crate::log!("watching {}: {}", events.display(), io::Error::from(e));
                return;
            }
        };
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
            let _ = inotify::remove_watch(&self.fd, wd);
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
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut events = inotify::Reader::new(&self.fd, &mut buf);
        loop {
            let wd = match events.next() {
                Ok(ev) => ev.wd(),
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            let mut st = self.lock();
            Self::check(&mut st, wd);
            // The rest of the events of the same read, under the same lock
            // (the reader reads again only once its buffer is empty).
            while !events.is_buffer_empty() {
                match events.next() {
                    Ok(ev) => Self::check(&mut st, ev.wd()),
                    Err(_) => break,
                }
            }
            drop(st);
            self.ready.notify_all();
        }
    }
}
