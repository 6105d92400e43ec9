//! The agent's log: lines on stderr (the guest console) and, when the shim
//! asks for them by connecting to the log port (`husk.log_port=` on the
//! kernel command line, or `--log-listen unix:///path` on a host), on every
//! such connection too. A connection that fails a write is dropped.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

/// Connections that receive the log.
static SINKS: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());

/// Most connections kept at once (the oldest is dropped).
const SINKS_MAX: usize = 8;

/// Writes one line to the console and to every connected sink.
pub fn line(msg: std::fmt::Arguments<'_>) {
    let text = format!("husk-agent: {msg}\n");
    let _ = std::io::stderr().write_all(text.as_bytes());
    let mut sinks = SINKS.lock().unwrap_or_else(|e| e.into_inner());
    sinks.retain_mut(|s| s.write_all(text.as_bytes()).is_ok());
}

/// `log!("...", args)`: one line of the agent's log.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::log::line(format_args!($($arg)*)) };
}

/// Accepts log connections on `listener` (a listening socket) forever, in
/// a thread of its own.
pub fn serve(listener: OwnedFd) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("log".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            let f = match rustix::net::accept_with(&listener, rustix::net::SocketFlags::CLOEXEC) {
                Ok(fd) => std::fs::File::from(fd),
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            let mut sinks = SINKS.lock().unwrap_or_else(|e| e.into_inner());
            if sinks.len() >= SINKS_MAX {
                sinks.remove(0);
            }
            sinks.push(f);
        })?;
    Ok(())
}

/// A listening Unix socket at `path` (replacing a stale one).
pub fn unix_listener(path: &str) -> std::io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)?;
    Ok(OwnedFd::from(l))
}
