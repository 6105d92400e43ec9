//! The agent's ttrpc server: accepts the shim's connections and runs its
//! calls through the generated `AgentService` handlers.
//!
//! The ttrpc crate's sync `Server` is not used: it accepts any peer, starts
//! seven threads per connection (three fixed, four handlers from a race in
//! its thread pool) with no bound on connections or busy handlers, and a
//! request whose payload does not decode gets no answer at all (the handler
//! error ends the connection's handler threads while its reader stays
//! blocked). This one owns those bounds:
//! - a vsock peer must be the host (CID 2); any other is closed at once and
//!   counted, with a log line at most every [`REFUSAL_LOG_INTERVAL`];
//! - at most [`MAX_CONNECTIONS`] connections; one more is closed at once;
//! - one reader thread per connection, and one thread per call in flight,
//!   at most [`MAX_IN_FLIGHT`] in all (the shim's waits, reads and OOM
//!   watch each hold one); a call beyond gets RESOURCE_EXHAUSTED. The bound
//!   is the agent's, not a connection's: a call outlives its connection
//!   until its handler returns (a wait, until its process ends);
//! - every request gets an answer: a payload or method that does not decode
//!   gets INVALID_ARGUMENT or UNIMPLEMENTED; a frame that cannot be read
//!   (over 4 MiB, cut short) closes the connection.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_protocols::ttrpc::proto::{
    Codec, MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX, MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE,
};
use husk_protocols::ttrpc::{
    self, get_status, Code, MessageHeader, MethodHandler, Request, Response, TtrpcContext,
};

/// Connections served at once. The shim holds one; a few more cover a
/// reconnect while the old one drains.
pub const MAX_CONNECTIONS: usize = 4;
/// Calls in flight on all connections (each a thread while it runs).
pub const MAX_IN_FLIGHT: usize = 1024;
/// Shortest time between two log lines about refused connections.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// The host's vsock CID (VMADDR_CID_HOST).
const HOST_CID: u32 = 2;

/// The generated service's handlers, by "/service/method".
pub type Methods = HashMap<String, Box<dyn MethodHandler + Send + Sync>>;

/// Who may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// A vsock listener: only the host (CID 2).
    HostOnly,
    /// A Unix socket (host tests): whoever its file's permissions let in.
    Any,
}

/// Why a connection was closed unserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NotHost(Option<u32>),
    TooMany,
}

/// Counts refusals and logs them at a bounded rate.
struct Refusals {
    total: u64,
    unlogged: u64,
    last_log: Option<Instant>,
}

impl Refusals {
    fn record(&mut self, why: Refusal) {
        self.total += 1;
        self.unlogged += 1;
        if self
            .last_log
            .is_some_and(|t| t.elapsed() < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        let what = match why {
            Refusal::NotHost(Some(cid)) => format!("a peer of CID {cid}, not the host"),
            Refusal::NotHost(None) => "a peer that is not a vsock address".into(),
            Refusal::TooMany => format!("a connection beyond {MAX_CONNECTIONS}"),
        };
        log!(
            "refused {what} ({} refused since the last line, {} in all)",
            self.unlogged,
            self.total
        );
        self.unlogged = 0;
        self.last_log = Some(Instant::now());
    }
}

/// Starts the accept loop on `listener` (a listening socket) in a thread.
pub fn start(listener: OwnedFd, peers: Peers, methods: Methods) -> io::Result<()> {
    let methods = Arc::new(methods);
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(&listener, peers, &methods))?;
    Ok(())
}

/// The CID of a vsock peer address, if it is one.
fn vsock_cid(addr: &rustix::net::SocketAddrAny) -> Option<u32> {
    if addr.address_family() != rustix::net::AddressFamily::VSOCK
        || (addr.addr_len() as usize) < std::mem::size_of::<libc::sockaddr_vm>()
    {
        return None;
    }
    // SAFETY: the storage holds at least a whole sockaddr_vm (checked
    // above) of family AF_VSOCK; read_unaligned needs no alignment.
    let vm = unsafe { std::ptr::read_unaligned(addr.as_ptr().cast::<libc::sockaddr_vm>()) };
    Some(vm.svm_cid)
}

/// Whether a peer may be served.
fn admit(peers: Peers, addr: Option<&rustix::net::SocketAddrAny>) -> Result<(), Refusal> {
    match peers {
        Peers::Any => Ok(()),
        Peers::HostOnly => match addr.and_then(vsock_cid) {
            Some(HOST_CID) => Ok(()),
            other => Err(Refusal::NotHost(other)),
        },
    }
}

fn accept_loop(listener: &OwnedFd, peers: Peers, methods: &Arc<Methods>) {
    let live = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut refusals = Refusals {
        total: 0,
        unlogged: 0,
        last_log: None,
    };
    loop {
        let (conn, addr) =
            match rustix::net::acceptfrom_with(listener, rustix::net::SocketFlags::CLOEXEC) {
                Ok(c) => c,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
                Err(e) => {
                    // Out of fds or memory: wait rather than spin.
                    log!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
        if let Err(why) = admit(peers, addr.as_ref()) {
            drop(conn);
            refusals.record(why);
            continue;
        }
        // Only this thread adds, so the check and the add cannot race.
        if live.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            drop(conn);
            refusals.record(Refusal::TooMany);
            continue;
        }
        live.fetch_add(1, Ordering::SeqCst);
        let live2 = live.clone();
        let methods = methods.clone();
        let in_flight = in_flight.clone();
        let spawned = std::thread::Builder::new()
            .name("ttrpc-conn".into())
            .spawn(move || {
                serve_connection(conn, &methods, in_flight);
                live2.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            live.fetch_sub(1, Ordering::SeqCst);
            log!("starting a connection thread: {e}");
        }
    }
}

/// One connection: its socket for writing (answers are written whole
/// under the lock) and its calls in flight.
struct Conn {
    writer: Mutex<std::fs::File>,
    /// The agent's calls in flight (shared by all connections).
    in_flight: Arc<AtomicUsize>,
    fd: i32,
}

impl Conn {
    fn reply(&self, stream_id: u32, res: &Response) {
        let buf = match res.encode() {
            Ok(b) if b.len() <= MESSAGE_LENGTH_MAX => b,
            Ok(b) => {
                let s = get_status(
                    Code::RESOURCE_EXHAUSTED,
                    format!("the answer is {} bytes, over 4 MiB", b.len()),
                );
                match status_response(s).encode() {
                    Ok(b) => b,
                    Err(_) => return,
                }
            }
            Err(e) => {
                log!("encoding an answer: {e}");
                return;
            }
        };
        // Fits: at most MESSAGE_LENGTH_MAX (4 MiB).
        #[allow(clippy::cast_possible_truncation)]
        let mh = MessageHeader {
            length: buf.len() as u32,
            stream_id,
            type_: MESSAGE_TYPE_RESPONSE,
            flags: 0,
        };
        self.write(mh, &buf);
    }

    fn write(&self, mh: MessageHeader, buf: &[u8]) {
        let head: Vec<u8> = mh.into();
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // A failed write means the peer is gone; the reader sees it too.
        let _ = w.write_all(&head).and_then(|()| w.write_all(buf));
    }

    fn error(&self, stream_id: u32, code: Code, msg: String) {
        self.reply(stream_id, &status_response(get_status(code, msg)));
    }
}

fn status_response(s: ttrpc::Status) -> Response {
    let mut r = Response::new();
    r.set_status(s);
    r
}

/// A frame read from the connection.
enum Frame {
    Whole(MessageHeader, Vec<u8>),
    /// Its header says more than 4 MiB: the payload is not read.
    Oversize(MessageHeader),
    /// The peer closed the stream between frames.
    End,
}

fn read_frame(r: &mut impl Read) -> io::Result<Frame> {
    let mut head = [0u8; MESSAGE_HEADER_LENGTH];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(Frame::End),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mh = MessageHeader::from(&head[..]);
    let len = mh.length as usize;
    if len > MESSAGE_LENGTH_MAX {
        return Ok(Frame::Oversize(mh));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(Frame::Whole(mh, buf))
}

fn serve_connection(sock: OwnedFd, methods: &Arc<Methods>, in_flight: Arc<AtomicUsize>) {
    let fd = sock.as_raw_fd();
    let mut reader = match sock.as_fd().try_clone_to_owned() {
        Ok(r) => std::fs::File::from(r),
        Err(e) => {
            log!("connection: {e}");
            return;
        }
    };
    let conn = Arc::new(Conn {
        writer: Mutex::new(std::fs::File::from(sock)),
        in_flight,
        fd,
    });
    // Dropped when the connection ends: handlers that watch for
    // cancellation see the channel close.
    let (cancel_tx, cancel_rx) = crossbeam_channel::unbounded::<()>();
    loop {
        let (mh, buf) = match read_frame(&mut reader) {
            Ok(Frame::Whole(mh, buf)) => (mh, buf),
            Ok(Frame::End) => break,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Ok(Frame::Oversize(mh)) => {
                // Not worth reading through: answer, then close.
                conn.error(
                    mh.stream_id,
                    Code::RESOURCE_EXHAUSTED,
                    format!("a message of {} bytes, over 4 MiB", mh.length),
                );
                break;
            }
            Err(e) => {
                // A frame cut short: the framing is lost.
                log!("connection closed: {e}");
                break;
            }
        };
        if mh.type_ != MESSAGE_TYPE_REQUEST {
            conn.error(
                mh.stream_id,
                Code::INVALID_ARGUMENT,
                format!("message type {} is not a request", mh.type_),
            );
            continue;
        }
        let req = match Request::decode(&buf) {
            Ok(r) => r,
            Err(e) => {
                conn.error(
                    mh.stream_id,
                    Code::INVALID_ARGUMENT,
                    format!("the request does not decode: {e}"),
                );
                continue;
            }
        };
        let path = format!("/{}/{}", req.service, req.method);
        if !methods.contains_key(&path) {
            conn.error(
                mh.stream_id,
                Code::UNIMPLEMENTED,
                format!("{path} does not exist"),
            );
            continue;
        }
        if conn.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            conn.in_flight.fetch_sub(1, Ordering::SeqCst);
            conn.error(
                mh.stream_id,
                Code::RESOURCE_EXHAUSTED,
                format!("over {MAX_IN_FLIGHT} calls in flight"),
            );
            continue;
        }
        let (conn2, methods2, cancel_rx2) = (conn.clone(), methods.clone(), cancel_rx.clone());
        let stream_id = mh.stream_id;
        let spawned = std::thread::Builder::new()
            .name("ttrpc-call".into())
            .spawn(move || {
                call(&conn2, &methods2, &path, mh, req, cancel_rx2);
                conn2.in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            conn.in_flight.fetch_sub(1, Ordering::SeqCst);
            conn.error(
                stream_id,
                Code::RESOURCE_EXHAUSTED,
                format!("no thread for the call: {e}"),
            );
        }
    }
    drop(cancel_tx);
}

/// Runs one call and writes its answer (or the error the handler hit).
fn call(
    conn: &Conn,
    methods: &Methods,
    path: &str,
    mh: MessageHeader,
    req: Request,
    cancel_rx: crossbeam_channel::Receiver<()>,
) {
    let Some(method) = methods.get(path) else {
        return;
    };
    let stream_id = mh.stream_id;
    let (res_tx, res_rx) = std::sync::mpsc::channel();
    let ctx = TtrpcContext {
        fd: conn.fd,
        cancel_rx,
        mh,
        res_tx,
        metadata: ttrpc::context::from_pb(&req.metadata),
        timeout_nano: req.timeout_nano,
    };
    match method.handler(ctx, req) {
        Ok(()) => {
            // The generated handler sent its answer (status and payload).
            while let Ok((mh, buf)) = res_rx.try_recv() {
                conn.write(mh, &buf);
            }
        }
        // The generated handler fails only before it answers: the payload
        // did not decode as the method's request (or the answer did not
        // encode).
        Err(ttrpc::Error::RpcStatus(s)) => conn.reply(stream_id, &status_response(s)),
        Err(e) => conn.error(
            stream_id,
            Code::INVALID_ARGUMENT,
            format!("{path}: the request payload does not decode: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_cid_is_admitted() {
        assert_eq!(admit(Peers::Any, None), Ok(()));
        assert_eq!(admit(Peers::HostOnly, None), Err(Refusal::NotHost(None)));
        let unix = rustix::net::SocketAddrAny::from(
            rustix::net::SocketAddrUnix::new("/x").expect("a unix address"),
        );
        assert_eq!(
            admit(Peers::HostOnly, Some(&unix)),
            Err(Refusal::NotHost(None))
        );
        for (cid, want) in [
            (2, Ok(())),
            (1, Err(Refusal::NotHost(Some(1)))),
            (3, Err(Refusal::NotHost(Some(3)))),
            (libc::VMADDR_CID_ANY, Err(Refusal::NotHost(Some(u32::MAX)))),
        ] {
            assert_eq!(admit(Peers::HostOnly, Some(&vsock(cid))), want, "{cid}");
        }
    }

    fn vsock(cid: u32) -> rustix::net::SocketAddrAny {
        // SAFETY: all-zero bytes are a valid sockaddr_vm.
        let mut vm: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        vm.svm_family = rustix::net::AddressFamily::VSOCK.as_raw();
        vm.svm_cid = cid;
        vm.svm_port = 1024;
        // Fits: 16 bytes.
        #[allow(clippy::cast_possible_truncation)]
        let len = std::mem::size_of::<libc::sockaddr_vm>() as rustix::net::addr::SocketAddrLen;
        // SAFETY: `vm` is a whole sockaddr_vm of `len` bytes, alive for the call.
        unsafe { rustix::net::SocketAddrAny::read((&raw const vm).cast(), len) }
    }

    /// A frame over 4 MiB is not read through; one cut short is an error.
    #[test]
    fn frames() {
        let mh = MessageHeader::new_request(3, 5);
        let mut bytes: Vec<u8> = mh.into();
        bytes.extend_from_slice(b"hello");
        match read_frame(&mut &bytes[..]).expect("a frame") {
            Frame::Whole(h, b) => assert_eq!((h.stream_id, b.as_slice()), (3, &b"hello"[..])),
            _ => panic!("not a whole frame"),
        }
        assert!(matches!(read_frame(&mut &b""[..]), Ok(Frame::End)));
        assert!(read_frame(&mut &bytes[..4]).is_err());
        assert!(read_frame(&mut &bytes[..12]).is_err());
        let big: Vec<u8> = MessageHeader::new_request(5, 5 << 20).into();
        assert!(matches!(read_frame(&mut &big[..]), Ok(Frame::Oversize(h)) if h.stream_id == 5));
    }
}
