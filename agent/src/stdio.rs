//! A container process's standard streams: three pipes, or one terminal
//! (a pty whose master the agent keeps). The agent holds its ends; the
//! process's ends go to the set-up process as fds 0-2 and are then closed
//! here, so that readers see end-of-stream when the process side closes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

/// Largest read a request may ask for.
pub const READ_MAX: usize = 1 << 20;

/// The process's ends, handed to the set-up process.
pub struct ChildEnds {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// /dev/null three times, for a process whose terminal comes later.
pub fn null_ends() -> io::Result<ChildEnds> {
    let null = || -> io::Result<OwnedFd> {
        Ok(std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?
            .into())
    };
    Ok(ChildEnds {
        stdin: null()?,
        stdout: null()?,
        stderr: null()?,
    })
}

/// The agent's ends.
pub struct Stdio {
    /// None once closed.
    stdin: Mutex<Option<File>>,
    stdout: File,
    /// None for a terminal (one stream).
    stderr: Option<File>,
    terminal: bool,
}

fn pipe() -> io::Result<(File, File)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((File::from(r), File::from(w)))
}

/// Opens a new terminal pair through `ptmx` (the container's own, so that
/// the slave has a name inside the container); the slave is the matching
/// /dev/pts/N. Returns (master, slave).
pub fn open_pty(ptmx: &std::path::Path) -> io::Result<(File, File)> {
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(ptmx)?;
    // Unlock the slave and learn its name: /dev/pts/N from the master's
    // number (TIOCGPTN), opened in the current root, so the container's
    // devpts once the set-up has pivoted.
    rustix::pty::unlockpt(&master)?;
    let pts = std::path::PathBuf::from(std::ffi::OsString::from_vec(
        rustix::pty::ptsname(&master, Vec::new())?.into_bytes(),
    ));
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(pts)?;
    Ok((master, slave))
}

impl Stdio {
    /// A terminal's master, received from the set-up process.
    pub fn terminal(master: File) -> io::Result<Stdio> {
        Ok(Stdio {
            stdin: Mutex::new(Some(master.try_clone()?)),
            stdout: master,
            stderr: None,
            terminal: true,
        })
    }

    /// Three pipes.
    pub fn pipes() -> io::Result<(Stdio, ChildEnds)> {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let ends = ChildEnds {
            stdin: in_r.into(),
            stdout: out_w.into(),
            stderr: err_w.into(),
        };
        let stdio = Stdio {
            stdin: Mutex::new(Some(in_w)),
            stdout: out_r,
            stderr: Some(err_r),
            terminal: false,
        };
        Ok((stdio, ends))
    }

    pub fn write_stdin(&self, data: &[u8]) -> io::Result<usize> {
        let mut g = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut() {
            Some(f) => f.write(data),
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "stdin is closed")),
        }
    }

    pub fn close_stdin(&self) -> io::Result<()> {
        let mut g = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        if self.terminal {
            // The master stays open for output; EOF is the VEOF character.
            if let Some(f) = g.as_mut() {
                f.write_all(&[4])?;
            }
            return Ok(());
        }
        g.take();
        Ok(())
    }

    fn read(f: &File, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len.clamp(1, READ_MAX)];
        let n = loop {
            match (&*f).read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A pty master reads EIO once the last slave fd is closed:
                // that is its end of stream.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break 0,
                Err(e) => return Err(e),
            }
        };
        buf.truncate(n);
        Ok(buf)
    }

    pub fn read_stdout(&self, len: usize) -> io::Result<Vec<u8>> {
        Self::read(&self.stdout, len)
    }

    pub fn read_stderr(&self, len: usize) -> io::Result<Vec<u8>> {
        match &self.stderr {
            Some(f) => Self::read(f, len),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a terminal process has no separate stderr",
            )),
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        if !self.terminal {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the process has no terminal",
            ));
        }
        let ws = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        Ok(rustix::termios::tcsetwinsize(&self.stdout, ws)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_carry_bytes_and_eof() {
        let (s, ends) = Stdio::pipes().unwrap();
        let mut out = File::from(ends.stdout);
        out.write_all(b"hello").unwrap();
        drop(out);
        assert_eq!(s.read_stdout(100).unwrap(), b"hello");
        assert_eq!(s.read_stdout(100).unwrap(), b"");
        assert_eq!(s.write_stdin(b"in").unwrap(), 2);
        let mut buf = [0u8; 2];
        File::from(ends.stdin).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"in");
        s.close_stdin().unwrap();
        assert!(s.write_stdin(b"x").is_err());
        assert!(s.resize(24, 80).is_err());
    }

    #[test]
    fn terminal_resize_is_seen_by_the_slave() {
        let (master, slave) = open_pty(std::path::Path::new("/dev/ptmx")).unwrap();
        let s = Stdio::terminal(master).unwrap();
        s.resize(33, 101).unwrap();
        let ws = rustix::termios::tcgetwinsize(&slave).unwrap();
        assert_eq!((ws.ws_row, ws.ws_col), (33, 101));
        assert!(s.read_stderr(10).is_err());
    }
}
