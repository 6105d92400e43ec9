//! The host side of husk's "hybrid vsock" (Firecracker's convention): one
//! Unix listener at `uds_path` for host-initiated connections, and Unix
//! sockets at `<uds_path>_<port>` for guest-initiated ones.
//!
//! The muxer routes validated guest packets to their [`Connection`], picks
//! the next packet for the guest, and tells the device which host fds it
//! wants polled. It never closes a registered fd itself: finished streams
//! wait in a graveyard until the device has unregistered them, so an fd
//! number is never reused while the event manager still knows it.

use crate::{guest_debug, guest_warn};
use husk_vm_config::control::GuestFaultKind;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use event_manager::EventSet;

use super::connection::Connection;
use super::packet::{Header, Op, TxPacket, HOST_CID};

/// Connections (including host streams still sending CONNECT) at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Standalone RSTs waiting for rx buffers; more are dropped.
const MAX_PENDING_RST: usize = 256;
/// `CONNECT 4294967295\n` is 19 bytes; anything longer is malformed.
const MAX_CONNECT_LINE: usize = 32;
/// First port the device hands out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("binding the vsock Unix listener at {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuring the vsock Unix listener: {0}")]
    Listener(#[source] std::io::Error),
}

/// (host port, guest port): identifies a connection for the guest's cid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

/// A host stream that connected to the listener and has not finished its
/// `CONNECT <port>\n` line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    pending_host: HashMap<RawFd, PendingHost>,
    conns: BTreeMap<ConnKey, Connection>,
    fd_to_key: HashMap<RawFd, ConnKey>,
    rst_queue: VecDeque<Header>,
    graveyard: Vec<UnixStream>,
    next_local_port: u32,
    /// Round-robin position for fairness between connections.
    last_served: Option<ConnKey>,
    /// While set, host connections wait in the listener's backlog (not
    /// accepted, so not forwarded) until this deadline or until released.
    held_until: Option<Instant>,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, MuxerError> {
        let listener = UnixListener::bind(&uds_path).map_err(|source| MuxerError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(MuxerError::Listener)?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            pending_host: HashMap::new(),
            conns: BTreeMap::new(),
            fd_to_key: HashMap::new(),
            rst_queue: VecDeque::new(),
            graveyard: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            last_served: None,
            held_until: None,
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Leaves new host connections in the listener's backlog until
    /// [`Muxer::release_host`] or `until`, whichever comes first: a restored
    /// guest must first reset the connections of the VMM it was saved from,
    /// or the reset would end the new ones too.
    pub fn hold_host(&mut self, until: Instant) {
        self.held_until = Some(until);
    }

    /// Accepts host connections again; whether they were held.
    pub fn release_host(&mut self) -> bool {
        self.held_until.take().is_some()
    }

    /// Every fd the muxer wants polled, with the events it wants.
    pub fn interests(&self) -> Vec<(RawFd, EventSet)> {
        let mut v = Vec::new();
        if self.held_until.is_none() {
            v.push((self.listener.as_raw_fd(), EventSet::IN));
        }
        v.extend(self.pending_host.keys().map(|fd| (*fd, EventSet::IN)));
        v.extend(
            self.conns
                .values()
                .map(|c| (c.fd(), c.interest()))
                .filter(|(_, ev)| !ev.is_empty()),
        );
        v
    }

    /// Streams that are finished; drop them after unregistering their fds.
    pub fn take_graveyard(&mut self) -> Vec<UnixStream> {
        std::mem::take(&mut self.graveyard)
    }

    fn connection_count(&self) -> usize {
        self.conns.len() + self.pending_host.len()
    }

    /// A host fd reported `ev`.
    pub fn handle_event(&mut self, fd: RawFd, ev: EventSet) {
        if fd == self.listener.as_raw_fd() {
            // While held, the listener is unregistered at the next sync;
            // an event already reported waits in the backlog.
            if self.held_until.is_none() {
                self.accept_host();
            }
        } else if self.pending_host.contains_key(&fd) {
            self.read_connect_line(fd);
        } else if let Some(key) = self.fd_to_key.get(&fd).copied() {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.notify(ev);
            }
            self.reap(key);
        } else {
            tracing::debug!(fd, "vsock: event for an unknown fd");
        }
    }

    fn accept_host(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.connection_count() >= MAX_CONNECTIONS {
                        self.sweep_expired(Instant::now());
                    }
                    if self.connection_count() >= MAX_CONNECTIONS {
                        tracing::warn!("vsock: too many connections, refusing a host connection");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!(error = %e, "vsock: cannot make host stream nonblocking");
                        continue;
                    }
                    self.pending_host.insert(
                        stream.as_raw_fd(),
                        PendingHost {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    return;
                }
            }
        }
    }

    /// Reads the CONNECT line a byte at a time, so no payload the host
    /// sends early is consumed here.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(pending) = self.pending_host.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match pending.stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT"),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&pending.line),
                Ok(_) if pending.line.len() >= MAX_CONNECT_LINE => {
                    break Err("CONNECT line too long")
                }
                Ok(_) => pending.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        let Some(pending) = self.pending_host.remove(&fd) else {
            return;
        };
        match port {
            Ok(peer_port) => {
                let local_port = self.alloc_local_port();
                let key = ConnKey {
                    local_port,
                    peer_port,
                };
                let conn =
                    Connection::new_local(pending.stream, self.guest_cid, local_port, peer_port);
                self.fd_to_key.insert(conn.fd(), key);
                self.conns.insert(key, conn);
            }
            Err(why) => {
                tracing::warn!(why, "vsock: dropping host connection");
                self.graveyard.push(pending.stream);
            }
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    /// Answers a guest packet that will not reach any connection with RST.
    pub fn reset_reply(&mut self, hdr: &Header) {
        // Never answer an RST, nor speak for a cid other than the host's.
        if hdr.op == Op::Rst as u16 || hdr.dst_cid != HOST_CID {
            return;
        }
        if self.rst_queue.len() >= MAX_PENDING_RST {
            guest_warn!(
                GuestFaultKind::Request,
                "vsock: rx backlog full, dropping an RST"
            );
            return;
        }
        self.rst_queue.push_back(hdr.reset_reply());
    }

    /// Routes a validated packet from the guest.
    pub fn send_pkt(&mut self, pkt: &TxPacket) {
        let hdr = &pkt.hdr;
        if hdr.dst_cid != HOST_CID {
            guest_warn!(
                GuestFaultKind::Request,
                dst_cid = hdr.dst_cid,
                "vsock: packet not for the host, dropped"
            );
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.send_pkt(hdr, pkt.op, &pkt.data);
                self.reap(key);
            }
            None if pkt.op == Op::Request => self.connect_to_host(hdr, key),
            None => self.reset_reply(hdr),
        }
    }

    fn connect_to_host(&mut self, hdr: &Header, key: ConnKey) {
        if self.connection_count() >= MAX_CONNECTIONS {
            self.sweep_expired(Instant::now());
        }
        if self.connection_count() >= MAX_CONNECTIONS {
            guest_warn!(
                GuestFaultKind::Request,
                "vsock: too many connections, refusing a guest connection"
            );
            return self.reset_reply(hdr);
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                guest_debug!(GuestFaultKind::Request, path = ?path, error = %e, "vsock: guest connect failed");
                return self.reset_reply(hdr);
            }
        };
        let conn = Connection::new_peer(stream, self.guest_cid, hdr);
        self.fd_to_key.insert(conn.fd(), key);
        self.conns.insert(key, conn);
    }

    /// Moves the connection to the graveyard when it is done.
    fn reap(&mut self, key: ConnKey) {
        if self.conns.get(&key).is_some_and(Connection::is_finished) {
            if let Some(conn) = self.conns.remove(&key) {
                self.fd_to_key.remove(&conn.fd());
                self.graveyard.push(conn.into_stream());
            }
        }
    }

    /// Resets connections whose host side closed and whose guest never
    /// acknowledged with RST in time; ends a hold that ran out.
    pub fn sweep_expired(&mut self, now: Instant) {
        if self.held_until.is_some_and(|t| now >= t) {
            tracing::warn!("vsock: the guest did not take the transport reset in time; accepting host connections");
            self.held_until = None;
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.expiry().is_some_and(|e| now >= e))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get_mut(&key) {
                guest_debug!(
                    GuestFaultKind::Request,
                    port = key.local_port,
                    "vsock: shutdown timed out, resetting"
                );
                conn.kill();
            }
        }
    }

    /// The earliest time `sweep_expired` has work to do.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(Connection::expiry)
            .chain(self.held_until)
            .min()
    }

    pub fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || self.conns.values().any(Connection::has_pending_rx)
    }

    /// The next packet for the guest, payload at most `max_data` bytes.
    pub fn recv_pkt(&mut self, max_data: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(rst) = self.rst_queue.pop_front() {
            return Some((rst, Vec::new()));
        }
        // Start after the connection served last, so one busy stream cannot
        // starve the others.
        let keys: Vec<ConnKey> = match self.last_served {
            Some(last) => self
                .conns
                .range((Bound::Excluded(last), Bound::Unbounded))
                .chain(self.conns.range(..=last))
                .filter(|(_, c)| c.has_pending_rx())
                .map(|(k, _)| *k)
                .collect(),
            None => self
                .conns
                .iter()
                .filter(|(_, c)| c.has_pending_rx())
                .map(|(k, _)| *k)
                .collect(),
        };
        for key in keys {
            let pkt = self.conns.get_mut(&key).and_then(|c| c.recv_pkt(max_data));
            self.reap(key);
            if pkt.is_some() {
                self.last_served = Some(key);
                return pkt;
            }
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            tracing::warn!(path = ?self.uds_path, error = %e, "vsock: cannot remove the Unix socket");
        }
    }
}

/// Connects to a Unix stream socket without ever blocking the event loop:
/// a listener with a full backlog fails with EAGAIN instead of stalling
/// the VMM (Unix-domain connects never return EINPROGRESS).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from(ErrorKind::InvalidInput));
    }
    // AF_UNIX is 1: it fits sa_family_t.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let family = libc::AF_UNIX as libc::sa_family_t;
    addr.sun_family = family;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // sockaddr_un is 110 bytes: its size fits socklen_t.
    #[allow(clippy::cast_possible_truncation)]
    let addr_len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un and the length passed is its size.
    let r = unsafe {
        libc::connect(
            fd,
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            addr_len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// Parses `CONNECT <port>` (without the newline): the first line a host
/// client sends on the listener (public for the fuzz targets).
pub fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8")?;
    let port = line
        .strip_prefix("CONNECT ")
        .ok_or("expected CONNECT <port>")?;
    port.trim_end_matches('\r')
        .parse::<u32>()
        .map_err(|_| "bad port in CONNECT line")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Ok(u32::MAX));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"CONNECT -1").is_err());
        assert!(parse_connect(b"CONNECT 4294967296").is_err());
        assert!(parse_connect(b"connect 52").is_err());
        assert!(parse_connect(b"CONNECT 5 2").is_err());
        assert!(parse_connect(&[0xff, 0xfe]).is_err());
    }
}
