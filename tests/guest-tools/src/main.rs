//! `husk-vsock-probe`: the guest side of the VMM's vsock tests.
//!
//!   husk-vsock-probe listen PORT        accept one connection, read a line,
//!                                       answer `pong:<line>` and exit
//!   husk-vsock-probe connect CID PORT MSG
//!                                       connect, send MSG and a newline, print
//!                                       the one-line answer
//!
//! AF_VSOCK is not in std, so the sockets are made with libc and wrapped in
//! `std::fs::File` for reading and writing.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::mem::size_of;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

/// AF_VSOCK (40) as the address family field; it fits sa_family_t.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
const AF_VSOCK_FAMILY: libc::sa_family_t = libc::AF_VSOCK as libc::sa_family_t;

/// The size of sockaddr_vm (16 bytes); it fits socklen_t.
#[allow(clippy::cast_possible_truncation)]
const SOCKADDR_VM_LEN: libc::socklen_t = size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = AF_VSOCK_FAMILY;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn check(rc: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(rc)
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = check(
        unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )?;
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn listen(port: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm of SOCKADDR_VM_LEN bytes for the call.
    let rc = unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), SOCKADDR_VM_LEN) };
    check(rc, "bind")?;
    // SAFETY: a bound stream socket.
    check(unsafe { libc::listen(sock.as_raw_fd(), 1) }, "listen")?;
    println!("listening on vsock port {port}");
    // SAFETY: null address arguments are allowed by accept(2).
    let conn = check(
        unsafe { libc::accept(sock.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) },
        "accept",
    )?;
    // SAFETY: conn is a fresh descriptor that nothing else owns.
    let conn = File::from(unsafe { OwnedFd::from_raw_fd(conn) });
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let line = line.trim_end();
    (&conn).write_all(format!("pong:{line}\n").as_bytes())?;
    println!("answered {line:?}");
    Ok(())
}

fn connect(cid: u32, port: u32, msg: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = socket()?;
    let addr = vsock_addr(cid, port);
    // SAFETY: addr is a valid sockaddr_vm of SOCKADDR_VM_LEN bytes for the call.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), SOCKADDR_VM_LEN) };
    check(rc, "connect")?;
    let conn = File::from(sock);
    (&conn).write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    println!("reply: {}", line.trim_end());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |s: &String| s.parse::<u32>().map_err(|e| format!("{s:?}: {e}"));
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["listen", _] => num(&args[1]).and_then(|p| listen(p).map_err(|e| e.to_string())),
        ["connect", _, _, msg] => num(&args[1]).and_then(|cid| {
            num(&args[2]).and_then(|port| connect(cid, port, msg).map_err(|e| e.to_string()))
        }),
        _ => Err("usage: husk-vsock-probe listen PORT | connect CID PORT MSG".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("husk-vsock-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
