//! The `vsock` phase: opens stream connections to the host (CID 2) on one
//! port until they are refused, and holds them open, to show the VMM's cap
//! on connections.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

const HOST_CID: u32 = 2;

/// AF_VSOCK (40) as the address family field; it fits sa_family_t.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
const AF_VSOCK_FAMILY: libc::sa_family_t = libc::AF_VSOCK as libc::sa_family_t;
/// The size of sockaddr_vm (16 bytes); it fits socklen_t.
#[allow(clippy::cast_possible_truncation)]
const SOCKADDR_VM_LEN: libc::socklen_t = size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn connect(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = AF_VSOCK_FAMILY;
    addr.svm_cid = HOST_CID;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm of SOCKADDR_VM_LEN bytes. The
    // kernel's connect timeout (2 s by default) bounds the call.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), SOCKADDR_VM_LEN) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Sends up to `per_conn` bytes on every held connection without blocking
/// (until the peer's credit runs out) or until `deadline`: the VMM buffers
/// what its host side does not read. Returns the bytes sent.
pub fn fill(held: &[OwnedFd], per_conn: u64, deadline: Instant) -> u64 {
    let chunk = [0x5au8; 16 * 1024];
    let mut total = 0;
    for fd in held {
        let mut sent = 0u64;
        while sent < per_conn && Instant::now() < deadline {
            let len = usize::try_from((per_conn - sent).min(chunk.len() as u64)).unwrap_or(0);
            // SAFETY: chunk is valid for len bytes; fd is an open socket.
            let n = unsafe {
                libc::send(
                    fd.as_raw_fd(),
                    chunk.as_ptr().cast(),
                    len,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            match u64::try_from(n) {
                Ok(n) if n > 0 => sent += n,
                _ => break,
            }
        }
        total += sent;
    }
    total
}

/// What the phase did; `held` stays open until the tool exits.
pub struct Flood {
    pub held: Vec<OwnedFd>,
    pub failed: u32,
    pub first_error: Option<io::Error>,
}

/// Connects until `max_failures` connects in a row failed, `max` are open,
/// or `deadline` passed.
pub fn flood(port: u32, max: usize, max_failures: u32, deadline: Instant) -> Flood {
    let mut f = Flood {
        held: Vec::new(),
        failed: 0,
        first_error: None,
    };
    let mut in_a_row = 0;
    while f.held.len() < max && in_a_row < max_failures && Instant::now() < deadline {
        match connect(port) {
            Ok(s) => {
                f.held.push(s);
                in_a_row = 0;
            }
            Err(e) => {
                f.failed += 1;
                in_a_row += 1;
                f.first_error.get_or_insert(e);
            }
        }
    }
    f
}
