//! A client of the VMM's control socket (the protocol is [`crate::control`]),
//! for the shim and the `husk` command: one request, one reply line,
//! bounded in time and size, since the VMM is the guest's neighbour and may
//! be stuck.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::control::{self, Request, Response, MAX_LINE};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VMM's control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the VMM refused {request:?}: {reason}")]
    Refused { request: Request, reason: String },
}

/// Sends `request` to the control socket at `path` and reads the reply,
/// each step within `timeout`.
pub fn request(path: &Path, request: Request, timeout: Duration) -> Result<Response, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream
        .write_all(&control::request_line(&request))
        .map_err(io_err)?;
    let mut line = Vec::new();
    BufReader::new(stream.take(MAX_LINE as u64))
        .read_until(b'\n', &mut line)
        .map_err(io_err)?;
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    control::parse_reply(line).map_err(|reason| ControlError::Refused { request, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-client stand-in for the VMM's server, answering with `reply`.
    fn serve_once(path: &Path, reply: &'static [u8]) -> std::thread::JoinHandle<Vec<u8>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            BufReader::new(&s).read_until(b'\n', &mut line).unwrap();
            (&s).write_all(reply).unwrap();
            line
        })
    }

    #[test]
    fn sends_one_typed_request_and_reads_the_reply() {
        let dir = std::env::temp_dir().join(format!("husk-ctlc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let server = serve_once(&path, b"{\"ok\":true,\"state\":\"running\"}\n");
        let r = request(&path, Request::Status {}, Duration::from_secs(5)).unwrap();
        assert_eq!(r.state, Some(control::VmState::Running));
        let sent = server.join().unwrap();
        assert_eq!(
            control::parse_request(sent.trim_ascii_end()),
            Ok(Request::Status {})
        );

        std::fs::remove_file(&path).unwrap();
        let server = serve_once(&path, b"{\"ok\":false,\"error\":\"not now\"}\n");
        let e = request(&path, Request::Pause {}, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("not now"), "{e}");
        server.join().unwrap();

        // A VMM that never answers: the request gives up in time.
        std::fs::remove_file(&path).unwrap();
        let _listener = UnixListener::bind(&path).unwrap();
        let t = std::time::Instant::now();
        let e = request(&path, Request::Status {}, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ControlError::Io { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
