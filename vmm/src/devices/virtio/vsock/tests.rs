//! Device tests: the test plays the guest driver through real virtqueues in
//! a real GuestMemoryMmap, and the host through real Unix sockets.

// Test code only: the casts build what a guest driver would write (flags,
// lengths, ring indices, byte patterns) from small constants and sizes the
// test chose, or reinterpret syscall results; a bad cast can only break the
// test itself, never the VMM.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::io::{Read, Write};
use std::os::unix::io::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventSet, SubscriberOps};
use proptest::prelude::*;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Address, Bytes, GuestAddress};

use super::connection::CONN_BUF_SIZE;
use super::packet::{Header, Op, HDR_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::devices::virtio::test_utils::{self, leaked_memory, GuestQueue, QSIZE};
use crate::devices::virtio::{GuestMemory, IrqTrigger, INT_VRING};

const GUEST_CID: u64 = 3;
const RX_BUF: u64 = 0x10_0000;
const RX_BUF_SIZE: u32 = 4096;
const TX_BUF: u64 = 0x30_0000;
const MEM_SIZE: usize = 0x100_0000;

fn unique_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("husk-vsock-{tag}-{}-{n}.sock", std::process::id()))
}

struct Guest {
    mem: &'static GuestMemory,
    rx: GuestQueue,
    tx: GuestQueue,
}

impl Guest {
    /// Lends `n` rx buffers of `size` bytes.
    fn give_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let idx = if self.rx.next_desc >= QSIZE {
                0
            } else {
                self.rx.next_desc
            };
            self.rx
                .add_chain(&[(RX_BUF + u64::from(idx) * u64::from(RX_BUF_SIZE), size, true)]);
        }
    }

    /// Sends one packet through the tx queue and lets the device process it.
    fn send(&mut self, dev: &mut Vsock, hdr: &Header, data: &[u8]) {
        let mut hdr = *hdr;
        hdr.len = data.len() as u32;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(TX_BUF))
            .unwrap();
        self.mem
            .write_slice(data, GuestAddress(TX_BUF + HDR_SIZE as u64))
            .unwrap();
        self.tx
            .add_chain(&[(TX_BUF, (HDR_SIZE + data.len()) as u32, false)]);
        dev.process_queues().unwrap();
        assert!(self.tx.pop_used().is_some(), "tx chain not returned");
    }

    /// The next packet the device put in an rx buffer.
    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let (id, len) = self.rx.pop_used()?;
        let addr = GuestAddress(RX_BUF + u64::from(id) * u64::from(RX_BUF_SIZE));
        let mut raw = [0u8; HDR_SIZE];
        self.mem.read_slice(&mut raw, addr).unwrap();
        let hdr = Header::from_bytes(&raw);
        assert_eq!(len as usize, HDR_SIZE + hdr.len as usize);
        let mut data = vec![0u8; hdr.len as usize];
        self.mem
            .read_slice(&mut data, addr.unchecked_add(HDR_SIZE as u64))
            .unwrap();
        Some((hdr, data))
    }
}

/// A guest-to-host header from guest port `src` to host port `dst`.
fn ghdr(src: u32, dst: u32, op: Op, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        len: 0,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn setup(tag: &str) -> (Vsock, Guest, PathBuf, Arc<IrqTrigger>) {
    let (dev, guest, _ev, path, irq) = setup_with_events(tag);
    (dev, guest, path, irq)
}

/// [`setup`], with the event queue too.
fn setup_with_events(tag: &str) -> (Vsock, Guest, GuestQueue, PathBuf, Arc<IrqTrigger>) {
    let mem = leaked_memory(MEM_SIZE);
    let rx = GuestQueue::new(mem, 0);
    let tx = GuestQueue::new(mem, 0x4000);
    let ev = GuestQueue::new(mem, 0x8000);
    let path = unique_path(tag);
    let mut dev = Vsock::new(GUEST_CID, path.clone()).unwrap();
    let irq = test_utils::irq();
    dev.activate(
        mem.clone(),
        irq.clone(),
        vec![rx.active(), tx.active(), ev.active()],
    )
    .unwrap();
    (dev, Guest { mem, rx, tx }, ev, path, irq)
}

/// Polls the host fds the device wants and feeds it the ready ones, a few
/// rounds, like the event loop would.
fn pump(dev: &mut Vsock) {
    pump_with(dev, 20);
}

fn pump_with(dev: &mut Vsock, timeout_ms: i32) {
    for _ in 0..4 {
        let mut fds: Vec<libc::pollfd> = dev
            .host_interests()
            .iter()
            .map(|(fd, ev)| libc::pollfd {
                fd: *fd,
                events: ev.bits() as i16,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of fds.len() pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        assert!(n >= 0);
        let ready: Vec<(RawFd, EventSet)> = fds
            .iter()
            .filter(|p| p.revents != 0)
            .map(|p| {
                (
                    p.fd,
                    EventSet::from_bits_truncate(u32::from(p.revents as u16)),
                )
            })
            .collect();
        for (fd, ev) in ready {
            dev.process_host_event(fd, ev).unwrap();
        }
        dev.process_queues().unwrap();
        dev.drop_finished_streams();
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Host connects with CONNECT 52; returns the host stream and the host port
/// the device picked, with the guest having answered RESPONSE.
fn host_connect(
    dev: &mut Vsock,
    guest: &mut Guest,
    path: &PathBuf,
    buf_alloc: u32,
) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    pump(dev);
    let (req, data) = guest.recv().expect("no REQUEST for the guest");
    assert_eq!(req.op, Op::Request as u16);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 52);
    assert!(req.src_port >= 1024);
    assert_eq!(req.type_, TYPE_STREAM);
    assert!(data.is_empty());
    let port = req.src_port;
    guest.send(dev, &ghdr(52, port, Op::Response, buf_alloc, 0), &[]);
    pump(dev);
    assert_eq!(read_line(&mut host), format!("OK {port}"));
    (host, port)
}

#[test]
fn config_space_is_the_guest_cid() {
    let (dev, ..) = setup("cfg");
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), GUEST_CID);
    let mut b = [0xffu8; 4];
    dev.read_config(6, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes().len(), 3);
}

#[test]
fn socket_file_removed_on_drop() {
    let path = unique_path("drop");
    let dev = Vsock::new(GUEST_CID, path.clone()).unwrap();
    assert!(path.exists());
    drop(dev);
    assert!(!path.exists());
    assert!(matches!(Vsock::new(2, path), Err(VsockError::BadCid(2))));
}

#[test]
fn host_initiated_connection_relays_both_ways() {
    let (mut dev, mut guest, path, irq) = setup("hostconn");
    guest.give_rx(16, RX_BUF_SIZE);
    let (mut host, port) = host_connect(&mut dev, &mut guest, &path, 64 * 1024);
    assert_ne!(irq.status() & INT_VRING, 0);

    host.write_all(b"hello guest").unwrap();
    pump(&mut dev);
    let (h, data) = guest.recv().expect("no data for the guest");
    assert_eq!(h.op, Op::Rw as u16);
    assert_eq!((h.src_port, h.dst_port), (port, 52));
    assert_eq!(data, b"hello guest");

    guest.send(
        &mut dev,
        &ghdr(52, port, Op::Rw, 64 * 1024, 11),
        b"hello host",
    );
    assert_eq!(read_exact_timeout(&mut host, 10), b"hello host");

    // Guest RST closes the host stream.
    guest.send(&mut dev, &ghdr(52, port, Op::Rst, 0, 0), &[]);
    pump(&mut dev);
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
}

#[test]
fn host_close_sends_shutdown_then_guest_rst_cleans_up() {
    let (mut dev, mut guest, path, _) = setup("hostclose");
    guest.give_rx(16, RX_BUF_SIZE);
    let (host, port) = host_connect(&mut dev, &mut guest, &path, 64 * 1024);
    drop(host);
    pump(&mut dev);
    let (h, _) = guest.recv().expect("no SHUTDOWN");
    assert_eq!(h.op, Op::Shutdown as u16);
    assert_eq!(h.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    guest.send(&mut dev, &ghdr(52, port, Op::Rst, 0, 0), &[]);
    pump(&mut dev);
    // Only the listener is left to poll.
    assert_eq!(dev.host_interests().len(), 1);
}

#[test]
fn guest_shutdown_passes_eof_to_host() {
    let (mut dev, mut guest, path, _) = setup("gshut");
    guest.give_rx(16, RX_BUF_SIZE);
    let (mut host, port) = host_connect(&mut dev, &mut guest, &path, 64 * 1024);
    guest.send(&mut dev, &ghdr(52, port, Op::Rw, 64 * 1024, 0), b"last");
    let mut shut = ghdr(52, port, Op::Shutdown, 64 * 1024, 0);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    guest.send(&mut dev, &shut, &[]);
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last");
    let (h, _) = guest.recv().expect("no RST after full shutdown");
    assert_eq!(h.op, Op::Rst as u16);
}

#[test]
fn malformed_connect_lines_close_the_stream() {
    let (mut dev, mut guest, path, _) = setup("badconnect");
    guest.give_rx(4, RX_BUF_SIZE);
    for line in [&b"CONNECT abc\n"[..], b"HELLO 52\n", &[b'C'; 100]] {
        let mut host = UnixStream::connect(&path).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        host.write_all(line).unwrap();
        pump(&mut dev);
        let mut b = [0u8; 1];
        // Closed with unread bytes, the stream may report a reset instead.
        match host.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("stream not closed for {line:?}: {other:?}"),
        }
    }
    assert!(guest.recv().is_none());
    assert_eq!(dev.host_interests().len(), 1);
}

#[test]
fn connection_count_is_bounded() {
    let (mut dev, _guest, path, _) = setup("bound");
    // Host streams that never finish CONNECT still hold a slot.
    let held: Vec<UnixStream> = (0..muxer::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    pump(&mut dev);
    assert_eq!(dev.host_interests().len(), 1 + muxer::MAX_CONNECTIONS);
    let mut extra = UnixStream::connect(&path).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    pump(&mut dev);
    let mut b = [0u8; 1];
    assert_eq!(
        extra.read(&mut b).unwrap(),
        0,
        "connection over the bound kept"
    );
    assert_eq!(dev.host_interests().len(), 1 + muxer::MAX_CONNECTIONS);
    drop(held);
}

#[test]
fn guest_initiated_connection_and_rst_when_absent() {
    let (mut dev, mut guest, path, _) = setup("guestconn");
    guest.give_rx(16, RX_BUF_SIZE);
    let mut lpath = path.clone().into_os_string();
    lpath.push("_1234");
    let listener = UnixListener::bind(&lpath).unwrap();

    guest.send(&mut dev, &ghdr(5000, 1234, Op::Request, 64 * 1024, 0), &[]);
    let (h, _) = guest.recv().expect("no RESPONSE");
    assert_eq!(h.op, Op::Response as u16);
    assert_eq!((h.src_port, h.dst_port), (1234, 5000));
    let (mut host, _) = listener.accept().unwrap();

    guest.send(&mut dev, &ghdr(5000, 1234, Op::Rw, 64 * 1024, 0), b"ping");
    assert_eq!(read_exact_timeout(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    pump(&mut dev);
    let (h, data) = guest.recv().expect("no reply data");
    assert_eq!(h.op, Op::Rw as u16);
    assert_eq!(data, b"pong");

    // Nobody listens on port 4321.
    guest.send(&mut dev, &ghdr(5001, 4321, Op::Request, 64 * 1024, 0), &[]);
    let (h, _) = guest.recv().expect("no RST");
    assert_eq!(h.op, Op::Rst as u16);
    assert_eq!((h.src_port, h.dst_port), (4321, 5001));

    // Data for a connection that does not exist gets RST too.
    guest.send(&mut dev, &ghdr(5002, 1234, Op::Rw, 64 * 1024, 0), b"x");
    let (h, _) = guest.recv().expect("no RST");
    assert_eq!(h.op, Op::Rst as u16);
    drop(listener);
    std::fs::remove_file(&lpath).unwrap();
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let (mut dev, mut guest, path, _) = setup("credit");
    guest.give_rx(32, RX_BUF_SIZE);
    let (mut host, port) = host_connect(&mut dev, &mut guest, &path, 100);
    let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    host.write_all(&payload).unwrap();
    pump(&mut dev);

    let mut got = Vec::new();
    let mut credit_requests = 0;
    while let Some((h, data)) = guest.recv() {
        match h.op {
            op if op == Op::Rw as u16 => got.extend(data),
            op if op == Op::CreditRequest as u16 => credit_requests += 1,
            op => panic!("unexpected op {op}"),
        }
    }
    assert_eq!(got.len(), 100, "device exceeded the guest's credit");
    assert!(credit_requests >= 1);

    // The guest consumed everything: the rest flows, still capped.
    guest.send(&mut dev, &ghdr(52, port, Op::CreditUpdate, 100, 100), &[]);
    pump(&mut dev);
    guest.send(&mut dev, &ghdr(52, port, Op::CreditUpdate, 100, 200), &[]);
    pump(&mut dev);
    guest.send(&mut dev, &ghdr(52, port, Op::CreditUpdate, 100, 300), &[]);
    pump(&mut dev);
    while let Some((h, data)) = guest.recv() {
        if h.op == Op::Rw as u16 {
            got.extend(data);
        }
    }
    assert_eq!(got, payload);
}

#[test]
fn guest_exceeding_device_credit_is_reset() {
    let (mut dev, mut guest, path, _) = setup("overrun");
    guest.give_rx(32, RX_BUF_SIZE);
    let (_host, port) = host_connect(&mut dev, &mut guest, &path, 64 * 1024);
    // The host never reads: once its socket buffer is full, guest data
    // piles up in the device until the advertised buf_alloc is exceeded.
    let chunk = vec![0x5au8; 60 * 1024];
    let max_chunks = 2 * (CONN_BUF_SIZE as usize + 4 * 1024 * 1024) / chunk.len();
    let mut reset = false;
    for _ in 0..max_chunks {
        guest.send(&mut dev, &ghdr(52, port, Op::Rw, 64 * 1024, 0), &chunk);
        while let Some((h, _)) = guest.recv() {
            assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
            if h.op == Op::Rst as u16 {
                reset = true;
            }
        }
        if reset {
            break;
        }
    }
    assert!(reset, "device buffered beyond its credit");
}

#[test]
fn credit_request_gets_credit_update() {
    let (mut dev, mut guest, path, _) = setup("creditreq");
    guest.give_rx(16, RX_BUF_SIZE);
    let (mut host, port) = host_connect(&mut dev, &mut guest, &path, 64 * 1024);
    guest.send(&mut dev, &ghdr(52, port, Op::Rw, 64 * 1024, 0), b"12345");
    assert_eq!(read_exact_timeout(&mut host, 5), b"12345");
    guest.send(
        &mut dev,
        &ghdr(52, port, Op::CreditRequest, 64 * 1024, 0),
        &[],
    );
    let (h, _) = guest.recv().expect("no CREDIT_UPDATE");
    assert_eq!(h.op, Op::CreditUpdate as u16);
    assert_eq!(h.fwd_cnt, 5);
    assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
}

#[test]
fn bad_tx_chains_are_returned_and_answered() {
    let (mut dev, mut guest, _path, _) = setup("badtx");
    guest.give_rx(8, RX_BUF_SIZE);
    // Header in a device-writable descriptor: dropped silently.
    guest.tx.add_chain(&[(TX_BUF, 44, true)]);
    // Header shorter than 44 bytes.
    guest.tx.add_chain(&[(TX_BUF, 20, false)]);
    // Outside guest memory.
    guest.tx.add_chain(&[(MEM_SIZE as u64 - 8, 44, false)]);
    dev.process_queues().unwrap();
    for _ in 0..3 {
        assert_eq!(guest.tx.pop_used().map(|(_, len)| len), Some(0));
    }
    assert!(guest.recv().is_none());

    // Wrong source cid: dropped, no answer.
    let mut h = ghdr(1, 2, Op::Request, 0, 0);
    h.src_cid = 42;
    guest.send(&mut dev, &h, &[]);
    assert!(guest.recv().is_none());
    // Unknown op and non-stream type: RST.
    let mut h = ghdr(1, 2, Op::Request, 0, 0);
    h.op = 77;
    guest.send(&mut dev, &h, &[]);
    assert_eq!(guest.recv().unwrap().0.op, Op::Rst as u16);
    let mut h = ghdr(1, 2, Op::Request, 0, 0);
    h.type_ = 2;
    guest.send(&mut dev, &h, &[]);
    assert_eq!(guest.recv().unwrap().0.op, Op::Rst as u16);
}

type Manager = EventManager<Arc<Mutex<Vsock>>>;

/// The device under an event manager, activated and registered.
fn setup_managed(tag: &str) -> (Arc<Mutex<Vsock>>, Manager, Guest, PathBuf) {
    let (dev, guest, path, _) = setup(tag);
    let dev = Arc::new(Mutex::new(dev));
    let mut em = Manager::new().unwrap();
    em.add_subscriber(dev.clone());
    // activate() already ran in setup: its eventfd is pending.
    em.run_with_timeout(100).unwrap();
    (dev, em, guest, path)
}

fn run(em: &mut Manager, rounds: usize) {
    for _ in 0..rounds {
        em.run_with_timeout(50).unwrap();
    }
}

/// The guest publishes `hdr` on the tx queue and kicks it (QueueNotify).
fn guest_send_kick(dev: &Arc<Mutex<Vsock>>, guest: &mut Guest, hdr: &Header) {
    guest
        .mem
        .write_slice(&hdr.to_bytes(), GuestAddress(TX_BUF))
        .unwrap();
    guest.tx.add_chain(&[(TX_BUF, HDR_SIZE as u32, false)]);
    let d = dev.lock().unwrap();
    d.state.active().unwrap().queues[TXQ]
        .notify
        .write(1)
        .unwrap();
}

/// CONNECT 52 from the host, answered by the guest, all through the event
/// manager.
fn managed_host_connect(
    dev: &Arc<Mutex<Vsock>>,
    em: &mut Manager,
    guest: &mut Guest,
    path: &PathBuf,
) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    run(em, 5);
    let (req, _) = guest.recv().expect("no REQUEST");
    assert_eq!(req.op, Op::Request as u16);
    let port = req.src_port;
    guest_send_kick(dev, guest, &ghdr(52, port, Op::Response, 4096, 0));
    run(em, 3);
    assert_eq!(read_line(&mut host), format!("OK {port}"));
    (host, port)
}

#[test]
fn packets_queued_before_the_event_loop_caught_up_are_served() {
    // The driver may queue packets between DRIVER_OK and the event loop
    // handling the activation, without a kick the loop could see.
    let (dev, mut guest, _path, _) = setup("early");
    guest.give_rx(4, RX_BUF_SIZE);
    let hdr = ghdr(5000, 4321, Op::Request, 4096, 0);
    guest
        .mem
        .write_slice(&hdr.to_bytes(), GuestAddress(TX_BUF))
        .unwrap();
    guest.tx.add_chain(&[(TX_BUF, HDR_SIZE as u32, false)]);
    let dev = Arc::new(Mutex::new(dev));
    let mut em = Manager::new().unwrap();
    em.add_subscriber(dev.clone());
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert!(guest.tx.pop_used().is_some(), "tx chain not returned");
    let (h, _) = guest.recv().expect("no RST");
    assert_eq!(h.op, Op::Rst as u16);
}

#[test]
fn event_manager_drives_a_host_connection() {
    let (dev, mut em, mut guest, path) = setup_managed("evmgr");
    guest.give_rx(8, RX_BUF_SIZE);
    let (mut host, _) = managed_host_connect(&dev, &mut em, &mut guest, &path);
    host.write_all(b"via epoll").unwrap();
    run(&mut em, 3);
    let (h, data) = guest.recv().expect("no data");
    assert_eq!(h.op, Op::Rw as u16);
    assert_eq!(data, b"via epoll");
}

#[test]
fn unanswered_host_close_is_reset_after_the_timeout() {
    let (dev, mut em, mut guest, path) = setup_managed("timeout");
    guest.give_rx(16, RX_BUF_SIZE);
    let (host, _) = managed_host_connect(&dev, &mut em, &mut guest, &path);
    drop(host);
    // The event loop sees the EOF and sends SHUTDOWN; the guest stays mute.
    run(&mut em, 3);
    let (h, _) = guest.recv().expect("no SHUTDOWN");
    assert_eq!(h.op, Op::Shutdown as u16);
    // Only the timer can wake the device now.
    let start = std::time::Instant::now();
    while start.elapsed() < connection::SHUTDOWN_TIMEOUT + Duration::from_secs(1) {
        em.run_with_timeout(200).unwrap();
        if let Some((h, _)) = guest.recv() {
            assert_eq!(h.op, Op::Rst as u16);
            assert!(start.elapsed() >= connection::SHUTDOWN_TIMEOUT - Duration::from_millis(300));
            assert_eq!(dev.lock().unwrap().host_interests().len(), 1);
            return;
        }
    }
    panic!("no RST after the shutdown timeout");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever descriptors the guest publishes on the tx queue, the device
    /// neither panics nor leaves chains unreturned.
    #[test]
    fn arbitrary_tx_chains_never_panic(
        descs in proptest::collection::vec(
            (prop_oneof![
                (0x30_0000u64..0x30_1000),
                (MEM_SIZE as u64 - 64..MEM_SIZE as u64 + 64),
                any::<u64>(),
            ], prop_oneof![0u32..128, any::<u32>()], any::<u16>(), 0u16..QSIZE + 2),
            1..12,
        ),
        heads in proptest::collection::vec(0u16..QSIZE + 4, 1..6),
        hdr_bytes in proptest::collection::vec(any::<u8>(), HDR_SIZE),
        cid_ok in any::<bool>(),
    ) {
        let (mut dev, mut guest, _path, _) = setup("prop");
        guest.give_rx(4, RX_BUF_SIZE);
        let mut hdr = [0u8; HDR_SIZE];
        hdr.copy_from_slice(&hdr_bytes);
        if cid_ok {
            hdr[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
        }
        guest.mem.write_slice(&hdr, GuestAddress(TX_BUF)).unwrap();
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            guest.tx.mock.desc_table().store(i as u16, d).unwrap();
        }
        let avail = guest.tx.mock.avail_addr();
        for (i, head) in heads.iter().enumerate() {
            guest.mem.write_obj(*head, avail.unchecked_add(4 + 2 * i as u64)).unwrap();
        }
        guest.mem.write_obj(heads.len() as u16, avail.unchecked_add(2)).unwrap();
        let _ = dev.process_queues();
        let mut returned = 0;
        while guest.tx.pop_used().is_some() {
            returned += 1;
        }
        // Heads beyond the queue size make virtio-queue stop iterating; all
        // valid ones must come back.
        let valid_prefix = heads.iter().take_while(|h| **h < QSIZE).count();
        prop_assert!(returned >= valid_prefix);
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// The host writes this many bytes.
    HostWrite(usize),
    /// The guest announces a new buf_alloc, having consumed everything
    /// received so far (or nothing more).
    Credit { buf_alloc: u32, consume: bool },
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Host-to-guest data never exceeds the credit the guest announced last.
    #[test]
    fn host_to_guest_never_exceeds_credit(
        init_alloc in 0u32..8192,
        steps in proptest::collection::vec(
            prop_oneof![
                (1usize..6000).prop_map(Step::HostWrite),
                (0u32..8192, any::<bool>())
                    .prop_map(|(buf_alloc, consume)| Step::Credit { buf_alloc, consume }),
            ],
            1..12,
        ),
    ) {
        let (mut dev, mut guest, path, _) = setup("propcredit");
        guest.give_rx(QSIZE as usize, RX_BUF_SIZE);
        let (mut host, port) = host_connect(&mut dev, &mut guest, &path, init_alloc);
        let (mut alloc, mut fwd, mut received) = (init_alloc, 0u32, 0u32);
        let mut sent = 0u32;
        for step in steps {
            match step {
                Step::HostWrite(n) => {
                    host.write_all(&vec![0x42; n]).unwrap();
                    sent += n as u32;
                }
                Step::Credit { buf_alloc, consume } => {
                    alloc = buf_alloc;
                    if consume {
                        fwd = received;
                    }
                    guest.send(&mut dev, &ghdr(52, port, Op::CreditUpdate, alloc, fwd), &[]);
                }
            }
            pump_with(&mut dev, 0);
            let mut used = 0;
            while let Some((h, data)) = guest.recv() {
                used += 1;
                prop_assert!(h.op == Op::Rw as u16 || h.op == Op::CreditRequest as u16);
                received += data.len() as u32;
                prop_assert!(received - fwd <= alloc, "{} in flight > {}", received - fwd, alloc);
            }
            guest.give_rx(used, RX_BUF_SIZE);
        }
        // Liveness: with room for everything, all host bytes arrive.
        fwd = received;
        guest.send(&mut dev, &ghdr(52, port, Op::CreditUpdate, 1 << 20, fwd), &[]);
        pump_with(&mut dev, 0);
        while let Some((h, data)) = guest.recv() {
            prop_assert_eq!(h.op, Op::Rw as u16);
            received += data.len() as u32;
        }
        prop_assert_eq!(received, sent);
    }
}

#[test]
fn a_restored_device_sends_the_guest_a_transport_reset() {
    let (mut dev, guest, mut ev, path, irq) = setup_with_events("reset");
    let mem = guest.mem;
    // No event buffer yet: an error, nothing used.
    assert!(matches!(
        dev.send_transport_reset(),
        Err(VsockError::NoEventBuffer)
    ));
    // The driver's event buffer, filled with garbage the device overwrites.
    const EV_BUF: u64 = 0x50_0000;
    mem.write_obj(0xffff_ffff_u32, GuestAddress(EV_BUF))
        .unwrap();
    ev.add_chain(&[(EV_BUF, 8, true)]);
    dev.restored();
    let (_, len) = ev.pop_used().expect("the event buffer is used");
    assert_eq!(len, 4);
    // VIRTIO_VSOCK_EVENT_TRANSPORT_RESET is id 0.
    assert_eq!(mem.read_obj::<u32>(GuestAddress(EV_BUF)).unwrap(), 0);
    assert_ne!(irq.status() & INT_VRING, 0, "the guest is interrupted");
    drop(dev);
    assert!(!path.exists());
}

/// A restored device under an event manager, the driver having filled the
/// event queue with two buffers; the transport reset uses the first.
fn setup_restored(tag: &str) -> (Arc<Mutex<Vsock>>, Manager, Guest, GuestQueue, PathBuf) {
    const EV_BUF: u64 = 0x50_0000;
    let (mut dev, mut guest, mut ev, path, _) = setup_with_events(tag);
    ev.add_chain(&[(EV_BUF, 8, true)]);
    ev.add_chain(&[(EV_BUF + 8, 8, true)]);
    dev.restored();
    assert!(ev.pop_used().is_some(), "the reset used an event buffer");
    guest.give_rx(8, RX_BUF_SIZE);
    let dev = Arc::new(Mutex::new(dev));
    let mut em = Manager::new().unwrap();
    em.add_subscriber(dev.clone());
    em.run_with_timeout(100).unwrap();
    (dev, em, guest, ev, path)
}

#[test]
fn a_restored_device_holds_host_connections_until_the_guest_took_the_reset() {
    let (dev, mut em, mut guest, mut ev, path) = setup_restored("hold");
    // A host connection now would reach the guest before its driver reset
    // the old VMM's connections, and the reset would end it too.
    let mut host = UnixStream::connect(&path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    run(&mut em, 4);
    assert!(
        guest.recv().is_none(),
        "a REQUEST before the guest took the reset"
    );
    // A kick of the event queue without a buffer given back changes nothing.
    let kick = |d: &Arc<Mutex<Vsock>>| {
        d.lock().unwrap().state.active().unwrap().queues[EVQ]
            .notify
            .write(1)
            .unwrap();
    };
    kick(&dev);
    run(&mut em, 2);
    assert!(guest.recv().is_none(), "released by a kick alone");
    // The driver gives the event's buffer back once it has reset its
    // sockets, and kicks.
    ev.add_chain(&[(0x50_0000, 8, true)]);
    kick(&dev);
    run(&mut em, 4);
    let (req, _) = guest.recv().expect("no REQUEST once the reset was taken");
    assert_eq!(req.op, Op::Request as u16);
    assert_eq!(req.dst_port, 52);
    guest_send_kick(
        &dev,
        &mut guest,
        &ghdr(52, req.src_port, Op::Response, 4096, 0),
    );
    run(&mut em, 3);
    assert_eq!(read_line(&mut host), format!("OK {}", req.src_port));
}

#[test]
fn a_guest_that_never_takes_the_reset_delays_host_connections_by_a_second_at_most() {
    let (_dev, mut em, mut guest, _ev, path) = setup_restored("holdlimit");
    let start = std::time::Instant::now();
    let mut host = UnixStream::connect(&path).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    // Only the timer wakes the device.
    while start.elapsed() < RESET_TAKEN_WAIT + Duration::from_secs(1) {
        em.run_with_timeout(100).unwrap();
        if let Some((req, _)) = guest.recv() {
            assert_eq!(req.op, Op::Request as u16);
            assert!(start.elapsed() >= RESET_TAKEN_WAIT - Duration::from_millis(100));
            return;
        }
    }
    panic!("host connections still held after {RESET_TAKEN_WAIT:?}");
}
