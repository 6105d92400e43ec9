//! A process's standard streams: containerd's FIFOs (or `file://` paths)
//! joined to the agent's streams by one thread per stream.
//!
//! - stdout and stderr: ReadStdout/ReadStderr (blocking) → the FIFO, until
//!   the agent says end of stream. A terminal process has stdout only.
//!   When nobody reads the FIFO any more (EPIPE), output is still drained
//!   from the guest and dropped, so the container never blocks on it.
//! - stdin: the FIFO → WriteStdin; at the FIFO's end (containerd closed
//!   it), on CloseIO, or when the process ends, CloseStdin. No stdin in the
//!   request: the process's stdin is closed at once.
//!
//! The exit of a process is reported only after its output is copied
//! ([`Pumps::wait_outputs`]): all of it, unless the streams stay open and
//! idle (a background child holding them) for [`DRAIN_IDLE`] after the exit.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::pipe::PipeFlags;

use crate::agent::Agent;

/// How long output may stay idle after a process exited before its exit
/// is reported anyway (the copying goes on).
pub const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// Poll interval of threads that watch a cancel flag.
const POLL_MS: i64 = 200;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("stdio URI {0:?} is not supported (FIFOs and file:// only)")]
    Scheme(String),
    #[error("starting a stdio thread: {0}")]
    Thread(#[source] io::Error),
    #[error("creating a pipe: {0}")]
    Pipe(#[source] io::Error),
}

/// The stdio a process was created with (containerd's paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Where an output stream goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    Discard,
    Fifo(PathBuf),
    File(PathBuf),
}

/// Reads containerd's stdio string: empty, `file:///path`, or a path.
pub fn parse_target(s: &str) -> Result<Target, IoError> {
    if s.is_empty() {
        return Ok(Target::Discard);
    }
    if let Some(p) = s.strip_prefix("file://") {
        return if p.starts_with('/') {
            Ok(Target::File(p.into()))
        } else {
            Err(IoError::Scheme(s.into()))
        };
    }
    if s.contains("://") {
        return Err(IoError::Scheme(s.into()));
    }
    Ok(Target::Fifo(s.into()))
}

fn open_err(path: &Path) -> impl FnOnce(io::Error) -> IoError {
    let path = path.to_path_buf();
    move |source| IoError::Open { path, source }
}

/// Opens an output target non-blocking. A FIFO is opened for writing; if
/// nobody reads it yet, also for reading (so that the open succeeds and the
/// output waits in the FIFO, as runc's shim does).
fn open_output(t: &Target) -> Result<Option<File>, IoError> {
    let flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    match t {
        Target::Discard => Ok(None),
        Target::File(p) => OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(p)
            .map(Some)
            .map_err(open_err(p)),
        Target::Fifo(p) => {
            let is_fifo = std::fs::metadata(p)
                .map_err(open_err(p))?
                .file_type()
                .is_fifo();
            if !is_fifo {
                return open_output(&Target::File(p.clone()));
            }
            match OpenOptions::new().write(true).custom_flags(flags).open(p) {
                Ok(f) => Ok(Some(f)),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(flags)
                    .open(p)
                    .map(Some)
                    .map_err(open_err(p)),
                Err(e) => Err(open_err(p)(e)),
            }
        }
    }
}

/// poll(2) on one fd for `events`, at most `ms` milliseconds; true if ready.
fn poll1(fd: &impl AsFd, events: PollFlags, ms: i64) -> bool {
    let timeout = Timespec {
        tv_sec: ms / 1000,
        tv_nsec: (ms % 1000) * 1_000_000,
    };
    let mut p = [PollFd::new(fd, events)];
    rustix::event::poll(&mut p, Some(&timeout)).is_ok_and(|n| n > 0)
}

/// Writes all of `data` to a non-blocking sink, waiting while it is full
/// unless `cancel` is set. Err on a broken sink.
fn write_sink(sink: &mut File, mut data: &[u8], cancel: &AtomicBool) -> io::Result<()> {
    while !data.is_empty() {
        match sink.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if cancel.load(Ordering::SeqCst) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                poll1(sink, PollFlags::OUT, POLL_MS);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Progress of the output threads of one process.
#[derive(Default)]
struct Outputs {
    state: Mutex<(usize, Option<Instant>)>,
    cv: Condvar,
}

impl Outputs {
    fn progress(&self) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.1 = Some(Instant::now());
    }

    fn done(&self) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = g.0.saturating_sub(1);
        self.cv.notify_all();
    }
}

/// The threads copying one process's streams.
pub struct Pumps {
    outputs: Arc<Outputs>,
    cancel: Arc<AtomicBool>,
    stdin: Mutex<Option<StdinPump>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct StdinPump {
    /// Writing a byte (or closing it) wakes the thread to finish.
    wake: File,
}

impl Pumps {
    /// Opens the targets and starts the threads for process `exec_id` of
    /// container `id`.
    pub fn start(
        agent: &Agent,
        id: &str,
        exec_id: &str,
        paths: &StdioPaths,
    ) -> Result<Pumps, IoError> {
        let stdout = open_output(&parse_target(&paths.stdout)?)?;
        let stderr = if paths.terminal {
            None
        } else {
            Some(open_output(&parse_target(&paths.stderr)?)?)
        };
        let stdin = match parse_target(&paths.stdin)? {
            Target::Discard => None,
            Target::Fifo(p) | Target::File(p) => Some(
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(&p)
                    .map_err(open_err(&p))?,
            ),
        };
        let pumps = Pumps {
            outputs: Arc::new(Outputs::default()),
            cancel: Arc::new(AtomicBool::new(false)),
            stdin: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
        };
        let mut threads = Vec::new();
        let streams = [(false, Some(stdout)), (true, stderr)];
        for (is_err, sink) in streams {
            let Some(sink) = sink else { continue };
            pumps
                .outputs
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .0 += 1;
            let (agent, id, exec_id) = (agent.clone(), id.to_string(), exec_id.to_string());
            let outputs = pumps.outputs.clone();
            let cancel = pumps.cancel.clone();
            let name = if is_err { "stderr" } else { "stdout" };
            let t = std::thread::Builder::new()
                .name(format!("{name}-{id}"))
                .spawn(move || {
                    copy_output(&agent, &id, &exec_id, is_err, sink, &outputs, &cancel);
                    outputs.done();
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    pumps.outputs.done();
                    pumps.cancel.store(true, Ordering::SeqCst);
                    return Err(IoError::Thread(e));
                }
            }
        }
        match stdin {
            None => {
                if let Err(e) = agent.close_stdin(id, exec_id) {
                    log::warn!("{id}/{exec_id}: closing stdin: {e}");
                }
            }
            Some(fifo) => {
                let (wake_r, wake_w) = pipe().map_err(IoError::Pipe)?;
                let (agent, id, exec_id) = (agent.clone(), id.to_string(), exec_id.to_string());
                let t = std::thread::Builder::new()
                    .name(format!("stdin-{id}"))
                    .spawn(move || copy_stdin(&agent, &id, &exec_id, fifo, wake_r))
                    .map_err(IoError::Thread)?;
                threads.push(t);
                *pumps.stdin.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(StdinPump { wake: wake_w });
            }
        }
        *pumps.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        Ok(pumps)
    }

    /// Waits until the output threads are done, or have made no progress
    /// for `idle`.
    pub fn wait_outputs(&self, idle: Duration) {
        let o = &self.outputs;
        let mut g = o.state.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        loop {
            if g.0 == 0 {
                return;
            }
            let last = g.1.unwrap_or(start).max(start);
            let elapsed = last.elapsed();
            if elapsed >= idle {
                log::warn!(
                    "output still open {idle:?} after the process exited; reporting the exit"
                );
                return;
            }
            g =
                o.cv.wait_timeout(g, idle - elapsed)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
        }
    }

    /// Ends stdin: what the FIFO still holds is copied, then CloseStdin.
    pub fn close_stdin(&self) {
        if let Some(mut p) = self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = p.wake.write_all(b"x");
        }
    }

    /// Stops everything (the process is gone): output threads stop waiting
    /// on full FIFOs, stdin ends. Threads blocked on the agent end when the
    /// agent ends the streams (the container is removed, or the VM ends).
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.close_stdin();
        // Threads are not joined: one may be waiting on the guest.
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

impl Drop for Pumps {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pipe() -> io::Result<(File, File)> {
    let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
    Ok((File::from(r), File::from(w)))
}

fn copy_output(
    agent: &Agent,
    id: &str,
    exec_id: &str,
    stderr: bool,
    mut sink: Option<File>,
    outputs: &Outputs,
    cancel: &AtomicBool,
) {
    loop {
        let data = match agent.read(id, exec_id, stderr) {
            Ok(d) if d.is_empty() => return,
            Ok(d) => d,
            Err(e) => {
                if !e.is_not_found() {
                    log::debug!("{id}/{exec_id}: output ends: {e}");
                }
                return;
            }
        };
        outputs.progress();
        if let Some(f) = sink.as_mut() {
            if let Err(e) = write_sink(f, &data, cancel) {
                // The reader is gone: keep draining the guest, drop output.
                log::debug!("{id}/{exec_id}: output sink: {e}; dropping further output");
                sink = None;
            }
        }
        outputs.progress();
    }
}

fn copy_stdin(agent: &Agent, id: &str, exec_id: &str, mut fifo: File, mut wake: File) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut closing = false;
    'outer: loop {
        let mut fds = [
            PollFd::new(&fifo, PollFlags::IN),
            PollFd::new(&wake, PollFlags::IN),
        ];
        if !closing {
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
            let (fifo_ready, woken) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
            if woken {
                // Asked to finish: copy what is already there, then close.
                let _ = wake.read(&mut [0u8; 1]);
                closing = true;
            } else if !fifo_ready {
                continue;
            }
        }
        match fifo.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let mut data = &buf[..n];
                while !data.is_empty() {
                    match agent.write_stdin(id, exec_id, data) {
                        Ok(0) => std::thread::sleep(Duration::from_millis(10)),
                        Ok(w) => data = &data[w..],
                        Err(e) => {
                            log::debug!("{id}/{exec_id}: stdin: {e}");
                            break 'outer;
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if closing {
                    break;
                }
            }
            Err(e) => {
                log::debug!("{id}/{exec_id}: reading stdin: {e}");
                break;
            }
        }
    }
    if let Err(e) = agent.close_stdin(id, exec_id) {
        log::debug!("{id}/{exec_id}: closing stdin: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("").unwrap(), Target::Discard);
        assert_eq!(
            parse_target("/run/containerd/fifo/1/c-stdout").unwrap(),
            Target::Fifo("/run/containerd/fifo/1/c-stdout".into())
        );
        assert_eq!(
            parse_target("file:///var/log/c.log").unwrap(),
            Target::File("/var/log/c.log".into())
        );
        assert!(parse_target("binary:///usr/bin/logger?x=1").is_err());
        assert!(parse_target("file://relative").is_err());
    }

    fn mkfifo(p: &Path) {
        rustix::fs::mkfifoat(rustix::fs::CWD, p, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    }

    #[test]
    fn fifo_outputs_open_with_or_without_a_reader() {
        let dir = std::env::temp_dir().join(format!("husk-io-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("out");
        mkfifo(&fifo);
        // No reader: still opens (holding its own read end).
        let mut w = open_output(&Target::Fifo(fifo.clone())).unwrap().unwrap();
        let cancel = AtomicBool::new(false);
        write_sink(&mut w, b"early", &cancel).unwrap();
        let mut r = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"early");
        drop(w);
        // With a reader that then goes away: EPIPE, not a hang.
        let mut w = open_output(&Target::Fifo(fifo.clone())).unwrap().unwrap();
        drop(r);
        assert!(write_sink(&mut w, b"late", &cancel).is_err());
        // A full FIFO and a cancel: the write gives up.
        let r = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut w = open_output(&Target::Fifo(fifo.clone())).unwrap().unwrap();
        cancel.store(true, Ordering::SeqCst);
        let big = vec![0u8; 1 << 20];
        assert!(write_sink(&mut w, &big, &cancel).is_err());
        drop(r);
        // Plain files are appended to.
        let file = dir.join("log");
        let mut f = open_output(&Target::File(file.clone())).unwrap().unwrap();
        f.write_all(b"a").unwrap();
        let mut f = open_output(&Target::Fifo(file.clone())).unwrap().unwrap();
        f.write_all(b"b").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"ab");
        assert!(open_output(&Target::Discard).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn waiting_for_outputs_is_bounded() {
        let p = Pumps {
            outputs: Arc::new(Outputs::default()),
            cancel: Arc::new(AtomicBool::new(false)),
            stdin: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
        };
        p.wait_outputs(Duration::from_secs(10));
        p.outputs.state.lock().unwrap().0 = 1;
        let t = Instant::now();
        p.wait_outputs(Duration::from_millis(100));
        assert!(t.elapsed() >= Duration::from_millis(100));
        let o = p.outputs.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            o.progress();
            std::thread::sleep(Duration::from_millis(50));
            o.done();
        });
        let t = Instant::now();
        p.wait_outputs(Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5));
        h.join().unwrap();
    }
}
