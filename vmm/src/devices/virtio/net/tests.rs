//! Device tests against a real tap: the test plays the guest through real
//! virtqueues and watches the tap's other side with an AF_PACKET socket.

// Test code only: the casts build what a guest driver would write (flags,
// lengths, ring indices, byte patterns) from small constants and sizes the
// test chose, or reinterpret syscall results; a bad cast can only break the
// test itself, never the VMM.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::test_utils::{self, leaked_memory, GuestQueue};
use crate::devices::virtio::VIRTIO_F_VERSION_1;
use husk_vm_config::{RateLimiterConfig, TokenBucketConfig};
use std::num::NonZeroU64;

const RX_BUF: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x1_0000;
const TX_BUF: u64 = 0x80_0000;
const MEM_SIZE: usize = 0x100_0000;
/// IEEE local experimental ethertype: nothing else on the link uses it.
const ETH_P_TEST: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn unique_tap() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "hsk{}t{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn setup() -> (Net, &'static GuestMemory, GuestQueue, GuestQueue) {
    setup_limited(RateLimiter::unlimited(), RateLimiter::unlimited())
}

fn setup_limited(
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
) -> (Net, &'static GuestMemory, GuestQueue, GuestQueue) {
    let mem = leaked_memory(MEM_SIZE);
    let rx = GuestQueue::new(mem, 0);
    let tx = GuestQueue::new(mem, 0x4000);
    let mut net = Net::new(&unique_tap(), Some(GUEST_MAC))
        .unwrap()
        .with_rate_limiters(rx_limiter, tx_limiter);
    let irq = test_utils::irq();
    net.activate(mem.clone(), irq, vec![rx.active(), tx.active()])
        .unwrap();
    (net, mem, rx, tx)
}

/// `struct ifreq` with the flags member, for SIOCSIFFLAGS.
#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Brings the tap up (IPv6 off so the kernel sends no chatter) and opens a
/// packet socket on it for the test ethertype.
fn link_side(tap: &str) -> OwnedFd {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    // SAFETY: plain socket(2) call; the result is checked.
    let ctl = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(ctl >= 0);
    // SAFETY: ctl is a fresh fd we own.
    let ctl = unsafe { OwnedFd::from_raw_fd(ctl) };
    let mut req = IfReqFlags {
        name: [0; 16],
        flags: (libc::IFF_UP | libc::IFF_RUNNING) as i16,
        _pad: [0; 22],
    };
    req.name[..tap.len()].copy_from_slice(tap.as_bytes());
    // SAFETY: SIOCSIFFLAGS reads a struct ifreq, which req lays out.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) };
    assert_eq!(r, 0, "SIOCSIFFLAGS: {}", std::io::Error::last_os_error());

    let proto = ETH_P_TEST.to_be();
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(tap).unwrap();
    // SAFETY: cname is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert_ne!(ifindex, 0);
    // SAFETY: sockaddr_ll is plain data; zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the size passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sll).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

fn test_frame(payload_len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&ETH_P_TEST.to_be_bytes());
    f.extend((0..payload_len).map(|i| (i * 7) as u8));
    f
}

fn link_recv(fd: &OwnedFd) -> Vec<u8> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
    assert_eq!(n, 1, "nothing arrived on the link");
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(n > 0);
    buf.truncate(n as usize);
    buf
}

fn link_send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: frame is readable for its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        n as usize,
        frame.len(),
        "send: {}",
        std::io::Error::last_os_error()
    );
}

/// Runs rx processing until a used buffer shows up (the kernel hands the
/// frame to the tap asynchronously).
fn wait_rx(net: &mut Net, rx: &mut GuestQueue) -> Option<(u16, u32)> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        net.process_rx().unwrap();
        if let Some(u) = rx.pop_used() {
            return Some(u);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn frames_cross_the_tap_both_ways() {
    let (mut net, mem, mut rx, mut tx) = setup();
    let link = link_side(net.tap_name());

    // Guest -> link: vnet header and frame in separate descriptors.
    let frame = test_frame(100);
    mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(TX_BUF))
        .unwrap();
    mem.write_slice(&frame, GuestAddress(TX_BUF + 0x100))
        .unwrap();
    tx.add_chain(&[
        (TX_BUF, VNET_HDR_LEN as u32, false),
        (TX_BUF + 0x100, frame.len() as u32, false),
    ]);
    assert!(net.process_tx().unwrap());
    assert_eq!(tx.pop_used().map(|(_, len)| len), Some(0));
    assert_eq!(link_recv(&link), frame);

    // Link -> guest.
    for i in 0..4 {
        rx.add_chain(&[(RX_BUF + i * RX_SLOT, 2048, true)]);
    }
    let frame = test_frame(200);
    link_send(&link, &frame);
    let (id, len) = wait_rx(&mut net, &mut rx).expect("frame not delivered to the guest");
    assert_eq!(len as usize, VNET_HDR_LEN + frame.len());
    let base = GuestAddress(RX_BUF + u64::from(id) * RX_SLOT);
    let mut got = vec![0u8; len as usize];
    mem.read_slice(&mut got, base).unwrap();
    // num_buffers is 1, no checksum or GSO flags.
    assert_eq!(&got[..VNET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
}

#[test]
fn oversized_rx_frames_are_dropped() {
    let (mut net, mem, mut rx, _tx) = setup();
    let link = link_side(net.tap_name());
    // A buffer that holds the vnet header and 60 frame bytes.
    rx.add_chain(&[(RX_BUF, (VNET_HDR_LEN + 60) as u32, true)]);
    link_send(&link, &test_frame(500));
    std::thread::sleep(Duration::from_millis(50));
    net.process_rx().unwrap();
    assert!(rx.pop_used().is_none(), "oversized frame was delivered");

    // The buffer is still there for a frame that fits.
    let small = test_frame(46);
    link_send(&link, &small);
    let (id, len) = wait_rx(&mut net, &mut rx).expect("small frame not delivered");
    assert_eq!(id, 0);
    let mut got = vec![0u8; len as usize - VNET_HDR_LEN];
    mem.read_slice(&mut got, GuestAddress(RX_BUF + VNET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, small);
}

#[test]
fn malformed_tx_chains_are_returned() {
    let (mut net, _mem, _rx, mut tx) = setup();
    tx.add_chain(&[(TX_BUF, 64, true)]);
    tx.add_chain(&[(TX_BUF, 8, false)]);
    tx.add_chain(&[(MEM_SIZE as u64 - 16, 64, false)]);
    tx.add_chain(&[(TX_BUF, MAX_FRAME as u32 + 1, false)]);
    assert!(net.process_tx().unwrap());
    for _ in 0..4 {
        assert_eq!(tx.pop_used().map(|(_, len)| len), Some(0));
    }
}

#[test]
fn config_and_features() {
    let (net, ..) = setup();
    let mut cfg = [0u8; 8];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1);
    assert_ne!(net.avail_features() & (1 << VIRTIO_NET_F_MAC), 0);
    assert_ne!(net.avail_features() & VIRTIO_F_VERSION_1, 0);
    let name = net.tap_name().to_string();
    drop(net);
    // The tap is not persistent: it goes with the device.
    assert!(!std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
}

#[test]
fn event_manager_delivers_tap_frames() {
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;

    let (net, mem, mut rx, _tx) = setup();
    let link = link_side(net.tap_name());
    let net = Arc::new(Mutex::new(net));
    let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    em.add_subscriber(net.clone());
    // Handles the activation setup() already signalled.
    em.run_with_timeout(100).unwrap();

    // A frame with no rx buffer waits in the device.
    let frame = test_frame(64);
    link_send(&link, &frame);
    em.run_with_timeout(500).unwrap();
    assert!(rx.pop_used().is_none());

    // The guest lends a buffer and kicks the rx queue.
    rx.add_chain(&[(RX_BUF, 2048, true)]);
    net.lock().unwrap().state.active().unwrap().queues[RXQ]
        .notify
        .write(1)
        .unwrap();
    em.run_with_timeout(500).unwrap();
    let (_, len) = rx.pop_used().expect("frame not delivered");
    let mut got = vec![0u8; len as usize - VNET_HDR_LEN];
    mem.read_slice(&mut got, GuestAddress(RX_BUF + VNET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, frame);
}

/// A limiter of `size` frames per `refill_time_ms`.
fn frames_per(size: u64, refill_time_ms: u64) -> RateLimiter {
    let ops = TokenBucketConfig {
        size: NonZeroU64::new(size).unwrap(),
        one_time_burst: 0,
        refill_time_ms: NonZeroU64::new(refill_time_ms).unwrap(),
    };
    RateLimiter::new(Some(&RateLimiterConfig {
        bandwidth: None,
        ops: Some(ops),
    }))
    .unwrap()
}

/// `net` under a new event manager, its activation handled.
fn managed_net(
    net: Net,
) -> (
    Arc<std::sync::Mutex<Net>>,
    event_manager::EventManager<Arc<std::sync::Mutex<Net>>>,
) {
    use event_manager::SubscriberOps;
    let net = Arc::new(std::sync::Mutex::new(net));
    let mut em = event_manager::EventManager::<Arc<std::sync::Mutex<Net>>>::new().unwrap();
    em.add_subscriber(net.clone());
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    (net, em)
}

#[test]
fn tx_frames_over_the_limit_wait_in_the_queue_for_the_timer() {
    let start = Instant::now();
    // One frame per 50 ms.
    let (net, mem, _rx, mut tx) = setup_limited(RateLimiter::unlimited(), frames_per(1, 50));
    let link = link_side(net.tap_name());
    let (net, mut em) = managed_net(net);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| test_frame(60 + i)).collect();
    for (i, frame) in frames.iter().enumerate() {
        let at = TX_BUF + i as u64 * 0x1000;
        mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(at))
            .unwrap();
        mem.write_slice(frame, GuestAddress(at + VNET_HDR_LEN as u64))
            .unwrap();
        tx.add_chain(&[(at, (VNET_HDR_LEN + frame.len()) as u32, false)]);
    }
    {
        let mut n = net.lock().unwrap();
        assert!(n.process_tx().unwrap());
        // The limiter stopped it after one frame; another pass does nothing.
        assert!(n.tx_limiter.is_blocked());
        assert!(!n.process_tx().unwrap());
    }
    assert!(tx.pop_used().is_some());
    assert!(tx.pop_used().is_none());
    assert_eq!(link_recv(&link), frames[0]);

    // The timer sends the rest, one per expiration, in order.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut sent = 1;
    while sent < 3 {
        assert!(Instant::now() < deadline, "tx stalled after {sent} frames");
        em.run_with_timeout(100).unwrap();
        while tx.pop_used().is_some() {
            sent += 1;
        }
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(100), "sent after {took:?}");
    assert_eq!(link_recv(&link), frames[1]);
    assert_eq!(link_recv(&link), frames[2]);
}

#[test]
fn rx_frames_over_the_limit_wait_as_the_pending_frame() {
    let start = Instant::now();
    let (net, mem, mut rx, _tx) = setup_limited(frames_per(1, 50), RateLimiter::unlimited());
    let link = link_side(net.tap_name());
    let (net, mut em) = managed_net(net);
    for i in 0..4 {
        rx.add_chain(&[(RX_BUF + i * RX_SLOT, 2048, true)]);
    }
    let frames: Vec<Vec<u8>> = (0..3).map(|i| test_frame(100 + i)).collect();
    for f in &frames {
        link_send(&link, f);
    }
    // The first frame goes to the guest; the second waits in the device,
    // and the tap is not read meanwhile.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.is_empty() {
        assert!(Instant::now() < deadline, "no frame delivered");
        em.run_with_timeout(100).unwrap();
        got.extend(std::iter::from_fn(|| rx.pop_used()));
    }
    // (The packet socket's send puts a frame in the tap's queue before
    // it returns: all three were there for the first read.)
    assert_eq!(got.len(), 1);
    {
        let n = net.lock().unwrap();
        assert!(n.rx_limiter.is_blocked());
        assert!(n.pending_frame.is_some());
        assert!(!n.tap_polled);
    }
    while got.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "rx stalled after {} frames",
            got.len()
        );
        em.run_with_timeout(100).unwrap();
        got.extend(std::iter::from_fn(|| rx.pop_used()));
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(100),
        "delivered after {took:?}"
    );
    for ((id, len), frame) in got.iter().zip(&frames) {
        assert_eq!(*len as usize, VNET_HDR_LEN + frame.len());
        let mut buf = vec![0u8; frame.len()];
        let at = RX_BUF + u64::from(*id) * RX_SLOT + VNET_HDR_LEN as u64;
        mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
        assert_eq!(&buf, frame);
    }
    // Caught up: the tap is read again.
    assert!(net.lock().unwrap().tap_polled);
}
