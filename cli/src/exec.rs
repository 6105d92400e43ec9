//! `husk exec SANDBOX [CMD...]`: a debug console in a sandbox's guest,
//! outside any container, through the agent (its ExecGuest call).
//!
//! This module owns the session: the policy check (the configuration's
//! `debug_console`; the agent checks it again, from what the shim told it
//! at CreateSandbox, so a caller that skips this command is refused too),
//! the connection (the VMM's hybrid vsock socket in the sandbox's state
//! folder, the agent's port from `husk_protocols::guest`), the local
//! terminal (raw mode while the session runs, restored on every way out),
//! the pumps between the local stdio and the agent's stream calls, the
//! forwarding of window changes and of termination signals, and the exit
//! status (the remote process's; 128 + N when a signal N killed it, as the
//! agent reports it).
//!
//! The guest is untrusted: each read asks the agent for at most
//! [`READ_CHUNK`] bytes and an answer longer than that ends the session;
//! nothing is buffered beyond one chunk, which goes straight to the local
//! stdout or stderr. Error text from the guest is cut and stripped of
//! control characters.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use husk_protocols::agent as pb;
use husk_protocols::agent_ttrpc::AgentServiceClient;
use husk_protocols::guest::AGENT_PORT;
use husk_protocols::ttrpc::{self, context};
use husk_runtime_config::state::{RUN_DIR, VSOCK};
use husk_vm_config::vsock::{self, VsockError};
use rustix::termios::{self, OptionalActions, Termios};

/// Bytes asked for by each read of the remote output.
pub const READ_CHUNK: u32 = 32 * 1024;
/// How long the connection and each call but the waits may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the output may keep coming after the process exited (a
/// background child holding it open does not hold the session).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest text taken from the guest into an error.
const MAX_GUEST_TEXT: usize = 256;
/// What runs when no command is given.
pub const DEFAULT_COMMAND: &str = "/bin/sh";

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(
        "the debug console is off: set debug_console = true in {config} (it applies to \
         sandboxes started after the change)"
    )]
    Disabled { config: String },
    #[error("sandbox {0}: its VMM is not running")]
    NotRunning(String),
    #[error("sandbox {id}: reaching the agent: {source}")]
    Connect {
        id: String,
        #[source]
        source: VsockError,
    },
    #[error("agent {call}: {message}")]
    Agent { call: &'static str, message: String },
    #[error("the agent answered {got} bytes to a read of {asked}")]
    Oversized { got: usize, asked: u32 },
    #[error("the local terminal: {0}")]
    Terminal(#[source] io::Error),
    #[error("catching signals: {0}")]
    Signals(#[source] io::Error),
}

/// Text from the guest made safe to print.
fn sanitize(text: &str) -> String {
    husk_protocols::text::sanitize(text, MAX_GUEST_TEXT)
}

fn agent_err(call: &'static str) -> impl FnOnce(ttrpc::Error) -> ExecError {
    move |e| ExecError::Agent {
        call,
        message: sanitize(&match e {
            ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
            other => other.to_string(),
        }),
    }
}

/// The process's exit status as this command's: the agent's status (the
/// exit code, or 128 + the signal) when it fits a byte, 255 otherwise.
pub fn exit_code(status: i32) -> i32 {
    if (0..=255).contains(&status) {
        status
    } else {
        255
    }
}

/// Whether the session gets a terminal: as asked, else when both the
/// local stdin and stdout are terminals (as `ssh` and `ctr run -t` decide).
pub fn wants_terminal(asked: Option<bool>, stdin_tty: bool, stdout_tty: bool) -> bool {
    asked.unwrap_or(stdin_tty && stdout_tty)
}

/// The command the guest runs: the one given, else [`DEFAULT_COMMAND`].
pub fn command(args: &[String]) -> Vec<String> {
    if args.is_empty() {
        vec![DEFAULT_COMMAND.to_string()]
    } else {
        args.to_vec()
    }
}

/// An exec id unique on this host for this session (the agent's id rules:
/// letters, digits, '-').
fn exec_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("husk-exec-{}-{nanos}", std::process::id())
}

/// The local terminal's settings from before raw mode; puts them back once,
/// whichever way the session ends (drop, an error, a signal), through its
/// own copy of the terminal's fd.
#[derive(Clone)]
pub struct TerminalGuard {
    saved: Arc<Mutex<Option<(OwnedFd, Termios)>>>,
}

impl TerminalGuard {
    /// Puts the terminal `fd` into raw mode.
    pub fn raw(fd: BorrowedFd<'_>) -> io::Result<TerminalGuard> {
        let saved = termios::tcgetattr(fd)?;
        let mut raw = saved.clone();
        raw.make_raw();
        let own = fd.try_clone_to_owned()?;
        // Now, not Flush: what was typed ahead (a paste, a script) still goes.
        termios::tcsetattr(fd, OptionalActions::Now, &raw)?;
        Ok(TerminalGuard {
            saved: Arc::new(Mutex::new(Some((own, saved)))),
        })
    }

    /// Restores the saved settings; later calls do nothing.
    pub fn restore(&self) {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((fd, t)) = saved {
            let _ = termios::tcsetattr(&fd, OptionalActions::Drain, &t);
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        self.restore();
    }
}

/// What to run and how.
pub struct Request<'a> {
    pub sandbox_id: &'a str,
    pub args: Vec<String>,
    /// `Some` when --tty or --no-tty was given.
    pub tty: Option<bool>,
}

/// A session's connection and its process.
#[derive(Clone)]
struct Session {
    client: AgentServiceClient,
    exec_id: String,
}

fn ctx() -> context::Context {
    context::with_timeout(i64::try_from(CALL_TIMEOUT.as_nanos()).unwrap_or(i64::MAX))
}

impl Session {
    fn connect(dir: &Path, id: &str) -> Result<Session, ExecError> {
        let uds = dir.join(RUN_DIR).join(VSOCK);
        let (stream, _) = vsock::connect(&uds, AGENT_PORT, CALL_TIMEOUT).map_err(|source| {
            ExecError::Connect {
                id: id.to_string(),
                source,
            }
        })?;
        let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(agent_err("connect"))?;
        Ok(Session {
            client: AgentServiceClient::new(client),
            exec_id: exec_id(),
        })
    }

    /// Sends `sig` to the remote process; false if the agent did not
    /// take it (unreachable, or the process is gone).
    fn signal(&self, sig: i32) -> bool {
        let mut r = pb::SignalProcessRequest::new();
        r.exec_id.clone_from(&self.exec_id);
        r.signal = u32::try_from(sig).unwrap_or(0);
        self.client.signal_process(ctx(), &r).is_ok()
    }

    fn resize(&self) {
        let Ok(ws) = termios::tcgetwinsize(io::stdout()) else {
            return;
        };
        let mut r = pb::TtyWinResizeRequest::new();
        r.exec_id.clone_from(&self.exec_id);
        r.row = ws.ws_row.into();
        r.column = ws.ws_col.into();
        let _ = self.client.tty_win_resize(ctx(), &r);
    }

    /// Copies the remote stream to `out` until its end.
    fn pump_out(&self, stderr: bool, out: &mut dyn Write) -> Result<(), ExecError> {
        let mut r = pb::ReadStreamRequest::new();
        r.exec_id.clone_from(&self.exec_id);
        r.len = READ_CHUNK;
        loop {
            // No timeout: the output comes when the process writes it.
            let wait = context::with_timeout(0);
            let data = if stderr {
                self.client
                    .read_stderr(wait, &r)
                    .map_err(agent_err("ReadStderr"))?
            } else {
                self.client
                    .read_stdout(wait, &r)
                    .map_err(agent_err("ReadStdout"))?
            }
            .data;
            if data.len() > READ_CHUNK as usize {
                return Err(ExecError::Oversized {
                    got: data.len(),
                    asked: READ_CHUNK,
                });
            }
            if data.is_empty() {
                return Ok(());
            }
            // A local stdout that went away (EPIPE): stop copying; the
            // process keeps running until it ends by itself.
            if out.write_all(&data).and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
        }
    }

    /// Copies the local stdin to the remote process until its end, then
    /// closes the remote stdin.
    fn pump_in(&self, input: &mut dyn Read) {
        let mut buf = vec![0u8; READ_CHUNK as usize];
        let mut w = pb::WriteStreamRequest::new();
        w.exec_id.clone_from(&self.exec_id);
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = &buf[..n];
            while !chunk.is_empty() {
                w.data = chunk.to_vec();
                match self.client.write_stdin(ctx(), &w) {
                    Ok(r) if r.len > 0 => {
                        let done = (r.len as usize).min(chunk.len());
                        chunk = &chunk[done..];
                    }
                    // The process closed its stdin or ended.
                    _ => return,
                }
            }
        }
        let mut r = pb::ProcessRequest::new();
        r.exec_id.clone_from(&self.exec_id);
        let _ = self.client.close_stdin(ctx(), &r);
    }
}

/// Runs the session; returns this command's exit status.
pub fn run(req: Request<'_>, sandbox_dir: &Path) -> Result<i32, ExecError> {
    let stdin_tty = termios::isatty(io::stdin());
    let terminal = wants_terminal(req.tty, stdin_tty, termios::isatty(io::stdout()));
    let session = Session::connect(sandbox_dir, req.sandbox_id)?;

    let mut r = pb::ExecGuestRequest::new();
    r.exec_id.clone_from(&session.exec_id);
    r.args = command(&req.args);
    r.terminal = terminal;
    if terminal {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        r.env.push(format!("TERM={term}"));
        if let Ok(ws) = termios::tcgetwinsize(io::stdout()) {
            r.rows = ws.ws_row.into();
            r.columns = ws.ws_col.into();
        }
    }
    // Signals are caught before the process exists, so none is lost
    // between its start and the forwarding thread's.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGWINCH,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGQUIT,
    ])
    .map_err(ExecError::Signals)?;
    session
        .client
        .exec_guest(ctx(), &r)
        .map_err(agent_err("ExecGuest"))?;

    // Raw mode only when the local stdin is the terminal (with --tty and a
    // pipe for stdin there is nothing to set).
    let guard = if terminal && stdin_tty {
        match TerminalGuard::raw(io::stdin().as_fd()) {
            Ok(g) => Some(g),
            Err(e) => {
                let _ = session.signal(libc::SIGKILL);
                return Err(ExecError::Terminal(e));
            }
        }
    } else {
        None
    };

    {
        let (s, guard) = (session.clone(), guard.clone());
        std::thread::spawn(move || {
            let mut forwarded = 0;
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGWINCH {
                    if terminal {
                        s.resize();
                    }
                    continue;
                }
                // The remote process decides, and its end ends the session;
                // a second one, or one the agent did not take (a guest that
                // stopped answering), ends it here.
                forwarded += 1;
                if forwarded > 1 || !s.signal(sig) {
                    if let Some(g) = &guard {
                        g.restore();
                    }
                    eprintln!(
                        "husk exec: ended by signal {sig}; the guest's process may still run"
                    );
                    std::process::exit(128 + sig);
                }
            }
        });
    }
    {
        let s = session.clone();
        std::thread::spawn(move || s.pump_in(&mut io::stdin().lock()));
    }
    let (done_tx, done_rx) = mpsc::channel::<Result<(), ExecError>>();
    let streams: &[bool] = if terminal { &[false] } else { &[false, true] };
    for &stderr in streams {
        let (s, tx) = (session.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let res = if stderr {
                s.pump_out(true, &mut io::stderr().lock())
            } else {
                s.pump_out(false, &mut io::stdout().lock())
            };
            let _ = tx.send(res);
        });
    }
    drop(done_tx);

    let mut w = pb::ProcessRequest::new();
    w.exec_id.clone_from(&session.exec_id);
    let waited = session
        .client
        .wait_process(context::with_timeout(0), &w)
        .map_err(agent_err("WaitProcess"));
    // The output written before the exit is read to its end.
    let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
    let mut pump_err = None;
    for _ in streams {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(Err(e)) => pump_err = Some(e),
            Ok(Ok(())) => {}
            Err(_) => break,
        }
    }
    if let Some(g) = &guard {
        g.restore();
    }
    let status = waited?.status;
    if let Some(e) = pump_err {
        return Err(e);
    }
    Ok(exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3), 3);
        // Killed by SIGKILL: the agent reports 128 + 9.
        assert_eq!(exit_code(137), 137);
        assert_eq!(exit_code(255), 255);
        // Nothing a shell could show: a lying or broken guest.
        assert_eq!(exit_code(-1), 255);
        assert_eq!(exit_code(70_000), 255);
    }

    #[test]
    fn terminal_choice_and_default_command() {
        assert!(wants_terminal(None, true, true));
        assert!(!wants_terminal(None, true, false));
        assert!(!wants_terminal(None, false, true));
        assert!(wants_terminal(Some(true), false, false));
        assert!(!wants_terminal(Some(false), true, true));
        assert_eq!(command(&[]), vec!["/bin/sh".to_string()]);
        let given = vec!["uname".to_string(), "-r".to_string()];
        assert_eq!(command(&given), given);
    }

    #[test]
    fn exec_ids_are_valid_agent_ids() {
        let id = exec_id();
        assert!(id.len() <= 128);
        assert!(id.starts_with("husk-exec-"));
        assert!(id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
    }

    #[test]
    fn guest_text_is_cut_and_cleaned() {
        assert_eq!(sanitize("a\x1b[2Jb\n"), "a [2Jb ");
        let long = "x".repeat(1000);
        assert!(sanitize(&long).len() <= MAX_GUEST_TEXT + 3);
    }

    fn canonical(fd: &impl AsFd) -> bool {
        termios::tcgetattr(fd)
            .expect("tcgetattr")
            .local_modes
            .contains(termios::LocalModes::ICANON)
    }

    /// A pseudo-terminal stands in for the local one: raw mode goes on, and
    /// the settings come back once, from whichever path comes first (a
    /// clone, as the signal path holds, or the drop).
    #[test]
    fn terminal_settings_are_restored() {
        use rustix::pty::OpenptFlags;
        let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("a pty");
        rustix::pty::grantpt(&master).expect("grantpt");
        rustix::pty::unlockpt(&master).expect("unlockpt");
        let name = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().expect("a path"))
            .expect("the slave");
        assert!(canonical(&slave));

        let g = TerminalGuard::raw(slave.as_fd()).expect("raw");
        assert!(!canonical(&slave));
        let g2 = g.clone();
        g2.restore();
        assert!(canonical(&slave));
        // Raw again by hand: a second restore must not touch it.
        let mut raw = termios::tcgetattr(&slave).expect("tcgetattr");
        raw.make_raw();
        termios::tcsetattr(&slave, OptionalActions::Now, &raw).expect("raw");
        g.restore();
        drop(g2);
        drop(g);
        assert!(!canonical(&slave));

        // Dropped without a restore (an error's way out): restored.
        termios::tcsetattr(&slave, OptionalActions::Now, &raw).expect("raw");
        let mut cooked = raw.clone();
        cooked.local_modes |= termios::LocalModes::ICANON;
        termios::tcsetattr(&slave, OptionalActions::Now, &cooked).expect("cooked");
        {
            let _g = TerminalGuard::raw(slave.as_fd()).expect("raw");
            assert!(!canonical(&slave));
        }
        assert!(canonical(&slave));
    }
}
