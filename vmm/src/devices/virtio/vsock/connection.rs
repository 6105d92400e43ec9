//! One vsock stream connection between a guest socket and a host Unix
//! stream: its state machine and its credit-based flow control.
//!
//! Guest -> host: payload the host stream cannot take at once waits in
//! `tx_buf`, which never outgrows the `buf_alloc` the device advertises
//! (a guest exceeding its credit gets RST). `fwd_cnt` counts bytes actually
//! written to the host, and credit updates tell the guest about them.
//!
//! Host -> guest: the host stream is read only into an rx buffer the guest
//! lent, and never for more than the guest's credit
//! (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`), so host data sits in the
//! kernel's socket buffer, not in the VMM.

use crate::guest_warn;
use husk_vm_config::control::GuestFaultKind;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::EventSet;

use super::packet::{Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Guest-to-host bytes buffered per connection; advertised as buf_alloc.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// `tx_buf` capacity kept once it is empty: more is handed back, so that
/// connections which once buffered a burst (up to CONN_BUF_SIZE each, times
/// the connection cap) do not keep that memory for their whole life.
const TX_BUF_KEEP: usize = 4096;
/// How long a connection the host closed waits for the guest's RST.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated; REQUEST sent or pending, waiting for RESPONSE.
    LocalInit,
    Established,
    /// The host side closed; SHUTDOWN sent, waiting for the guest's RST.
    LocalClosed,
    /// Done; the connection goes once its pending RST (if any) is sent.
    Killed,
}

/// Control packets waiting for an rx buffer, in send priority order.
#[derive(Clone, Copy, Debug, Default)]
struct PendingRx {
    rst: bool,
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
    /// The host stream is readable (or at EOF): data to forward.
    rw: bool,
}

pub struct Connection {
    stream: UnixStream,
    state: State,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    pending: PendingRx,

    /// Bytes written to the host before any guest data (the `OK` line).
    prefix: Vec<u8>,
    /// Guest data the host stream has not taken yet.
    tx_buf: Vec<u8>,
    /// Guest payload bytes received, and forwarded to the host.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// fwd_cnt as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,

    /// The guest's receive window.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// Host stream write side already shut down.
    host_write_shut: bool,
    expiry: Option<Instant>,
}

impl Connection {
    /// A host-initiated connection: queues the REQUEST to the guest.
    pub fn new_local(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, guest_cid, local_port, peer_port, State::LocalInit);
        c.pending.request = true;
        c
    }

    /// A guest-initiated connection already connected on the host: queues
    /// the RESPONSE.
    pub fn new_peer(stream: UnixStream, guest_cid: u64, request: &Header) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            request.dst_port,
            request.src_port,
            State::Established,
        );
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        c.pending.response = true;
        c
    }

    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: State,
    ) -> Self {
        Self {
            stream,
            state,
            guest_cid,
            local_port,
            peer_port,
            pending: PendingRx::default(),
            prefix: Vec::new(),
            tx_buf: Vec::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_shutdown: 0,
            host_write_shut: false,
            expiry: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Dead and nothing left to tell the guest.
    pub fn is_finished(&self) -> bool {
        self.state == State::Killed && !self.pending.rst
    }

    /// When a connection waiting for the guest's RST gives up on it.
    pub fn expiry(&self) -> Option<Instant> {
        self.expiry.filter(|_| self.state == State::LocalClosed)
    }

    /// Gives up on the connection, telling the guest with an RST.
    pub fn kill(&mut self) {
        if self.state != State::Killed {
            self.state = State::Killed;
            self.pending = PendingRx {
                rst: true,
                ..Default::default()
            };
        }
    }

    /// What the connection wants to hear about from its host stream.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.state == State::Killed {
            return ev;
        }
        if !self.prefix.is_empty() || !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        // Reading waits for guest credit and a free slot in `pending`; it
        // also stops once the guest will not receive any more.
        if self.state == State::Established
            && !self.pending.rw
            && self.peer_credit() > 0
            && self.peer_shutdown & SHUTDOWN_RCV == 0
        {
            ev |= EventSet::IN;
        }
        ev
    }

    /// The host stream reported `ev`.
    pub fn notify(&mut self, ev: EventSet) {
        if self.state == State::Killed {
            return;
        }
        // On a hang-up too: a write is what turns it into an error that
        // ends the connection, instead of epoll reporting it forever.
        if ev.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.flush_to_host();
        }
        if ev
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
            && self.state == State::Established
        {
            // The read (and EOF or error detection) happens when an rx
            // buffer is available, in `recv_pkt`.
            self.pending.rw = true;
        }
    }

    /// How many payload bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Handles a packet the guest sent on this connection.
    pub fn send_pkt(&mut self, hdr: &Header, op: Op, data: &[u8]) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (op, self.state) {
            (Op::Rst, _) => {
                self.state = State::Killed;
                self.pending = PendingRx::default();
            }
            (_, State::Killed) => {}
            (Op::Response, State::LocalInit) => {
                self.state = State::Established;
                self.prefix = format!("OK {}\n", self.local_port).into_bytes();
                self.flush_to_host();
            }
            (Op::Rw, State::Established | State::LocalClosed) => self.forward_to_host(data),
            (Op::CreditRequest, _) => self.pending.credit_update = true,
            (Op::CreditUpdate, _) => {}
            (Op::Shutdown, State::Established | State::LocalClosed) => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                // Passes the EOF on once buffered data is out, and ends the
                // connection when both directions are closed.
                self.flush_to_host();
            }
            (op, state) => {
                guest_warn!(
                    GuestFaultKind::Request,
                    ?op,
                    ?state,
                    port = self.local_port,
                    "vsock: unexpected packet, resetting"
                );
                self.kill();
            }
        }
    }

    fn forward_to_host(&mut self, data: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            guest_warn!(
                GuestFaultKind::Request,
                port = self.local_port,
                "vsock: guest sent data after SHUTDOWN_SEND"
            );
            self.kill();
            return;
        }
        let buffered = (self.rx_cnt - self.fwd_cnt).0 as usize;
        if buffered + data.len() > CONN_BUF_SIZE as usize {
            guest_warn!(
                GuestFaultKind::Request,
                port = self.local_port,
                "vsock: guest exceeded its credit, resetting"
            );
            self.kill();
            return;
        }
        // Cannot truncate: data.len() <= CONN_BUF_SIZE, checked just above.
        #[allow(clippy::cast_possible_truncation)]
        let len = data.len() as u32;
        self.rx_cnt += Wrapping(len);
        self.tx_buf.extend_from_slice(data);
        self.flush_to_host();
    }

    /// Writes as much buffered data to the host stream as it takes.
    fn flush_to_host(&mut self) {
        while !self.prefix.is_empty() {
            match self.stream.write(&self.prefix) {
                Ok(0) => return self.host_error(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.prefix.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.host_error(e),
            }
        }
        while !self.tx_buf.is_empty() {
            match self.stream.write(&self.tx_buf) {
                Ok(0) => return self.host_error(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    // Cannot truncate: tx_buf is at most CONN_BUF_SIZE.
                    #[allow(clippy::cast_possible_truncation)]
                    let n = n as u32;
                    self.fwd_cnt += Wrapping(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.host_error(e),
            }
        }
        if self.needs_credit_update() {
            self.pending.credit_update = true;
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > TX_BUF_KEEP {
            self.tx_buf = Vec::new();
        }
        if self.tx_buf.is_empty() {
            if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
                // The guest is done sending: pass the EOF on.
                self.host_write_shut = true;
                let _ = self.stream.shutdown(Shutdown::Write);
            }
            if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                self.kill();
            }
        }
    }

    /// Whether the guest's view of our free space has shrunk enough that it
    /// should hear about forwarded bytes before it stalls.
    fn needs_credit_update(&self) -> bool {
        let unreported = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_used = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        unreported > 0 && CONN_BUF_SIZE.saturating_sub(guest_view_used) < CONN_BUF_SIZE / 2
    }

    fn host_error(&mut self, e: std::io::Error) {
        guest_warn!(GuestFaultKind::Request, port = self.local_port, error = %e, "vsock: host stream failed, resetting");
        self.kill();
    }

    pub fn has_pending_rx(&self) -> bool {
        let p = &self.pending;
        p.rst || p.request || p.response || p.credit_update || p.credit_request || p.rw
    }

    /// The next packet for the guest, with at most `max_data` payload bytes;
    /// `None` when there is nothing to send after all.
    pub fn recv_pkt(&mut self, max_data: usize) -> Option<(Header, Vec<u8>)> {
        let p = &mut self.pending;
        let op = if std::mem::take(&mut p.rst) {
            Op::Rst
        } else if std::mem::take(&mut p.request) {
            Op::Request
        } else if std::mem::take(&mut p.response) {
            Op::Response
        } else if std::mem::take(&mut p.credit_update) {
            Op::CreditUpdate
        } else if std::mem::take(&mut p.credit_request) {
            Op::CreditRequest
        } else if std::mem::take(&mut p.rw) {
            return self.read_from_host(max_data);
        } else {
            return None;
        };
        Some((self.header(op, 0), Vec::new()))
    }

    fn read_from_host(&mut self, max_data: usize) -> Option<(Header, Vec<u8>)> {
        if self.state != State::Established || self.peer_shutdown & SHUTDOWN_RCV != 0 {
            return None;
        }
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            return Some((self.header(Op::CreditRequest, 0), Vec::new()));
        }
        if max_data == 0 {
            // A header-only rx buffer: a zero-length read would look like
            // EOF, so wait for a real buffer.
            self.pending.rw = true;
            return None;
        }
        let mut buf = vec![0u8; max_data.min(credit)];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    // The host closed: tell the guest, then wait (bounded)
                    // for its RST.
                    self.state = State::LocalClosed;
                    self.expiry = Some(Instant::now() + SHUTDOWN_TIMEOUT);
                    return Some((
                        self.header(Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND),
                        Vec::new(),
                    ));
                }
                Ok(n) => {
                    buf.truncate(n);
                    // Cannot truncate: n is at most MAX_PKT_DATA.
                    #[allow(clippy::cast_possible_truncation)]
                    let n32 = n as u32;
                    self.tx_cnt += Wrapping(n32);
                    if self.peer_credit() == 0 {
                        // Ask once, so a guest that only reports credit on
                        // request does not stall the stream.
                        self.pending.credit_request = true;
                    } else if n == max_data {
                        // A full buffer: more is likely waiting, so read
                        // again for the next rx buffer instead of waiting
                        // for another epoll round.
                        self.pending.rw = true;
                    }
                    return Some((self.header(Op::Rw, 0), buf));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) => {
                    self.host_error(e);
                    self.pending.rst = false;
                    return Some((self.header(Op::Rst, 0), Vec::new()));
                }
            }
        }
    }

    fn header(&mut self, op: Op, flags: u32) -> Header {
        let mut h = Header::host_to_guest(self.guest_cid, self.local_port, self.peer_port, op);
        h.flags = flags;
        h.buf_alloc = CONN_BUF_SIZE;
        h.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        h
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::TYPE_STREAM;
    use super::*;

    fn guest_hdr(op: Op) -> Header {
        Header {
            src_cid: 3,
            dst_cid: super::super::packet::HOST_CID,
            src_port: 1234,
            dst_port: 5000,
            type_: TYPE_STREAM,
            op: op as u16,
            buf_alloc: CONN_BUF_SIZE,
            ..Default::default()
        }
    }

    /// A burst the host could not take at once is buffered, then written
    /// out; the buffer's memory goes back once it is empty.
    #[test]
    fn tx_buffer_memory_is_released_once_flushed() {
        let (vmm_end, mut host_end) = UnixStream::pair().unwrap();
        vmm_end.set_nonblocking(true).unwrap();
        // As small a socket buffer as the kernel allows: most of the burst
        // has to wait in tx_buf.
        let fd = vmm_end.as_raw_fd();
        let small: libc::c_int = 4096;
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap();
        // SAFETY: setsockopt on an open socket with a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                std::ptr::from_ref(&small).cast(),
                len,
            )
        };
        assert_eq!(rc, 0);
        let mut c = Connection::new_peer(vmm_end, 3, &guest_hdr(Op::Request));
        let burst = vec![0x5a_u8; 200 * 1024];
        c.send_pkt(&guest_hdr(Op::Rw), Op::Rw, &burst);
        assert!(
            !c.tx_buf.is_empty(),
            "the host took the whole burst at once"
        );
        assert!(c.tx_buf.capacity() > TX_BUF_KEEP);

        host_end
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = vec![0u8; burst.len()];
        let mut n = 0;
        while n < burst.len() {
            n += host_end.read(&mut got[n..]).unwrap();
            c.notify(EventSet::OUT);
        }
        assert_eq!(got, burst);
        assert!(c.tx_buf.is_empty());
        assert!(
            c.tx_buf.capacity() <= TX_BUF_KEEP,
            "an empty tx_buf keeps {} bytes",
            c.tx_buf.capacity()
        );
    }
}
