//! The control socket's server: accepts clients, reads their request lines
//! and writes the replies (the protocol is `husk_vm_config::control`). A bad
//! request only earns an error reply.
//! The socket file is removed when the server is dropped.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events};
use husk_vm_config::control::{parse_request, reply_line, Request, Response, MAX_LINE};

/// Most clients connected at once.
const MAX_CONNECTIONS: usize = 16;

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control_socket {path}: already exists (another VMM, or a stale socket to remove)")]
    Exists { path: PathBuf },
    #[error("cannot bind control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The listening socket and its clients.
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<RawFd, Connection>,
}

impl ControlServer {
    /// Binds the socket at `path`; an existing file there is an error.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        if path.symlink_metadata().is_ok() {
            return Err(ControlError::Exists {
                path: path.to_owned(),
            });
        }
        let bind_err = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            path: path.to_owned(),
            listener,
            conns: HashMap::new(),
        })
    }

    /// Registers the listening socket with the event loop.
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("cannot watch control socket {}: {e}", self.path.display());
        }
    }

    /// Whether `fd` is the listener or one of the connections.
    pub fn owns(&self, fd: RawFd) -> bool {
        fd == self.listener.as_raw_fd() || self.conns.contains_key(&fd)
    }

    /// Handles readiness of one of our fds; `handler` answers each request.
    pub fn process(
        &mut self,
        events: Events,
        ops: &mut EventOps,
        handler: &mut dyn FnMut(Request) -> Response,
    ) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        let keep = match self.conns.get_mut(&fd) {
            Some(conn) => serve(conn, events.event_set(), handler),
            None => return,
        };
        if !keep {
            if let Some(conn) = self.conns.remove(&fd) {
                let _ = ops.remove(Events::new(&conn.stream, EventSet::IN));
            }
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        tracing::warn!("control socket: too many clients, refusing one");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("control socket: {e}");
                        continue;
                    }
                    if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                        tracing::warn!("control socket: cannot watch a client: {e}");
                        continue;
                    }
                    self.conns.insert(
                        stream.as_raw_fd(),
                        Connection {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    return;
                }
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("cannot remove control socket {}: {e}", self.path.display());
        }
    }
}

/// Reads what the client sent and answers every complete line; false when
/// the connection should be closed.
fn serve(
    conn: &mut Connection,
    set: EventSet,
    handler: &mut dyn FnMut(Request) -> Response,
) -> bool {
    let mut open = !set.intersects(EventSet::ERROR);
    let mut chunk = [0u8; 1024];
    loop {
        match conn.stream.read(&mut chunk) {
            Ok(0) => {
                open = false;
                break;
            }
            Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                open = false;
                break;
            }
        }
        if conn.buf.len() > MAX_LINE && !conn.buf.contains(&b'\n') {
            break;
        }
    }
    while let Some(pos) = conn.buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = conn.buf.drain(..=pos).collect();
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let response = match parse_request(line) {
            Ok(req) => handler(req),
            Err(e) => Response::error(e),
        };
        if !send(&mut conn.stream, &response) {
            return false;
        }
    }
    if conn.buf.len() > MAX_LINE {
        send(
            &mut conn.stream,
            &Response::error(format!("request longer than {MAX_LINE} bytes")),
        );
        return false;
    }
    open
}

fn send(stream: &mut UnixStream, response: &Response) -> bool {
    let line = reply_line(response);
    // Replies are small; a client that does not read them gets dropped
    // rather than blocking the VMM.
    match stream.write_all(&line) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("control socket: cannot reply: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_file_removed_on_drop_and_not_reused() {
        let path = std::env::temp_dir().join(format!("husk-ctl-{}.sock", std::process::id()));
        let server = ControlServer::bind(&path).unwrap();
        assert!(path.exists());
        assert!(matches!(
            ControlServer::bind(&path),
            Err(ControlError::Exists { .. })
        ));
        drop(server);
        assert!(!path.exists());
    }
}
