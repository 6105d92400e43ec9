//! The host end of husk-vmm's hybrid vsock (Firecracker's convention):
//! connect to the VMM's Unix socket, send `CONNECT <port>\n`, and read
//! `OK <host port>\n`; from then on the stream is the guest connection.
//!
//! When nothing in the guest listens on the port (yet), the VMM closes the
//! stream without an answer; while the guest's vsock driver is not up, the
//! answer never comes. Both are "not yet": the caller retries.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Longest answer line read: `OK 4294967295\n` is 14 bytes.
const MAX_LINE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("connecting to the VMM's vsock socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("vsock handshake: {0}")]
    Io(#[from] io::Error),
    /// The VMM closed the stream: nothing listens on the port yet.
    #[error("vsock handshake: the guest refused port {0}")]
    Refused(u32),
    #[error("vsock handshake: unexpected answer {0:?}")]
    Malformed(String),
    /// No answer in time: the guest's vsock driver is not up yet.
    #[error("vsock handshake: no answer from the guest in {0:?}")]
    Timeout(Duration),
}

/// Parses the VMM's answer line (without the newline): `OK <port>`.
pub fn parse_ok(line: &[u8]) -> Result<u32, VsockError> {
    let malformed = || VsockError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let port = text.strip_prefix("OK ").ok_or_else(malformed)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    port.parse().map_err(|_| malformed())
}

/// Reads one `\n`-terminated line a byte at a time (nothing after the line
/// is consumed: it belongs to the guest's stream).
fn read_line(stream: &mut UnixStream, port: u32, timeout: Duration) -> Result<Vec<u8>, VsockError> {
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => return Err(VsockError::Refused(port)),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() >= MAX_LINE => {
                return Err(VsockError::Malformed(
                    String::from_utf8_lossy(&line).into_owned(),
                ))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // ECONNRESET: the VMM dropped the stream, as a refusal.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(VsockError::Refused(port))
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return Err(VsockError::Timeout(timeout))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Connects to guest `port` through the VMM's socket at `uds`, waiting at
/// most `timeout` for the answer. Returns the stream (blocking, no
/// timeouts) and the host port the VMM gave the connection.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<(UnixStream, u32), VsockError> {
    let mut stream = UnixStream::connect(uds).map_err(|source| VsockError::Connect {
        path: uds.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let line = read_line(&mut stream, port, timeout)?;
    let host_port = parse_ok(&line)?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok((stream, host_port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    #[test]
    fn parses_answers() {
        assert_eq!(parse_ok(b"OK 1025").unwrap(), 1025);
        assert_eq!(parse_ok(b"OK 4294967295").unwrap(), u32::MAX);
        for bad in [
            &b"OK"[..],
            b"OK ",
            b"OK 4294967296",
            b"OK -1",
            b"OK 12 ",
            b"NO 1",
            b"ok 1",
            b"\xff",
        ] {
            assert!(
                matches!(parse_ok(bad), Err(VsockError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    fn temp_sock(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("husk-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A fake VMM: answers each connection with `answer` after reading the
    /// CONNECT line, then echoes what follows.
    fn fake_vmm(path: &Path, answer: &'static [u8]) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let mut w = s;
            w.write_all(answer).unwrap();
            if answer.starts_with(b"OK") {
                let mut rest = [0u8; 5];
                r.read_exact(&mut rest).unwrap();
                w.write_all(&rest).unwrap();
            }
            line
        })
    }

    #[test]
    fn handshake_then_payload() {
        let path = temp_sock("ok");
        let vmm = fake_vmm(&path, b"OK 1030\n");
        let (mut s, port) = connect(&path, 1024, Duration::from_secs(5)).unwrap();
        assert_eq!(port, 1030);
        s.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");
        assert_eq!(vmm.join().unwrap(), "CONNECT 1024\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn refusal_and_garbage() {
        let path = temp_sock("refused");
        let vmm = fake_vmm(&path, b"");
        assert!(matches!(
            connect(&path, 1024, Duration::from_secs(5)),
            Err(VsockError::Refused(1024))
        ));
        vmm.join().unwrap();
        let _ = std::fs::remove_file(&path);

        let path = temp_sock("garbage");
        let vmm = fake_vmm(&path, b"HELLO THERE\n");
        assert!(matches!(
            connect(&path, 1024, Duration::from_secs(5)),
            Err(VsockError::Malformed(_))
        ));
        vmm.join().unwrap();
        let _ = std::fs::remove_file(&path);

        let path = temp_sock("long");
        let vmm = fake_vmm(&path, &[b'O'; 64]);
        assert!(matches!(
            connect(&path, 1024, Duration::from_secs(5)),
            Err(VsockError::Malformed(_))
        ));
        vmm.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn silent_vmm_times_out() {
        let path = temp_sock("silent");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            drop(s);
        });
        let e = connect(&path, 1024, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, VsockError::Timeout(_)), "{e}");
        t.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn no_socket() {
        let e = connect(&temp_sock("none"), 1024, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, VsockError::Connect { .. }), "{e}");
    }
}
