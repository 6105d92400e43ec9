//! The channel between the agent and a container set-up process
//! (`husk-agent init`): length-prefixed JSON messages over a Unix stream
//! socket pair, which the set-up process finds as fd 3.
//!
//! The agent sends one `InitConfig`; the set-up process answers with the pid
//! of the container process it forked, then `Ready` (or `Error`). For a
//! container (not an exec) the process then waits for `Start`; a failing
//! exec is reported as `Error`, a successful one closes the socket (CLOEXEC).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use oci_spec::runtime::{LinuxSeccomp, Process, Spec};
use serde::{Deserialize, Serialize};

/// The fd the set-up process finds its end of the channel on.
pub const INIT_FD: i32 = 3;

/// Largest message accepted (the agent caps requests at ttrpc's 4 MiB).
const MESSAGE_MAX: u32 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("sync channel I/O: {0}")]
    Io(#[from] io::Error),
    #[error("sync message of {0} bytes is over the limit")]
    TooLong(u32),
    #[error("sync message is not valid: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("set-up process closed the channel")]
    Closed,
}

/// A Linux namespace to enter: a new one, or an existing one by path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NsAction {
    /// The CLONE_NEW* flag of its type.
    pub flag: i32,
    /// `None`: create a new one.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Work {
    /// A container's init: set up its root filesystem, then wait for Start.
    Container { spec: Box<Spec>, rootfs: PathBuf },
    /// Another process in a running container, under the container's
    /// seccomp profile (as runc applies it to exec'd processes).
    Exec {
        process: Box<Process>,
        seccomp: Option<Box<LinuxSeccomp>>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    pub namespaces: Vec<NsAction>,
    pub work: Work,
    /// /proc/sys/kernel/cap_last_cap of the agent's kernel.
    pub cap_last_cap: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToInit {
    Config(Box<InitConfig>),
    /// The uid and gid maps of the new user namespace are written.
    IdMapsWritten,
    Start,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum FromInit {
    /// In a new user namespace: write its uid and gid maps.
    NeedIdMaps,
    /// The container process, in the agent's pid namespace.
    Pid(i32),
    /// The master of the process's terminal follows (as SCM_RIGHTS).
    Console,
    Ready,
    Error(String),
}

/// One end of the channel.
pub struct Channel {
    sock: UnixStream,
}

impl Channel {
    /// A connected pair (both CLOEXEC): the agent's end and the child's.
    pub fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Channel { sock: a }, OwnedFd::from(b)))
    }

    /// Takes fd `INIT_FD` in the set-up process.
    ///
    /// # Safety
    /// The caller must own fd `INIT_FD` (the agent put the channel there).
    pub unsafe fn from_init_fd() -> Channel {
        // SAFETY: the caller guarantees ownership of the fd.
        let sock = unsafe { UnixStream::from_raw_fd(INIT_FD) };
        Channel { sock }
    }

    pub fn raw_fd(&self) -> i32 {
        self.sock.as_raw_fd()
    }

    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), SyncError> {
        let body = serde_json::to_vec(msg)?;
        let len = u32::try_from(body.len()).map_err(|_| SyncError::TooLong(u32::MAX))?;
        if len > MESSAGE_MAX {
            return Err(SyncError::TooLong(len));
        }
        self.sock.write_all(&len.to_le_bytes())?;
        self.sock.write_all(&body)?;
        Ok(())
    }

    pub fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, SyncError> {
        let mut len = [0u8; 4];
        match self.sock.read_exact(&mut len) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(SyncError::Closed),
            r => r?,
        }
        let len = u32::from_le_bytes(len);
        if len > MESSAGE_MAX {
            return Err(SyncError::TooLong(len));
        }
        let mut body = vec![0u8; len as usize];
        self.sock.read_exact(&mut body)?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// Sends `fd` along with one byte (SCM_RIGHTS).
    pub fn send_fd(&mut self, fd: i32) -> io::Result<()> {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
        let mut cbuf = vec![0u8; space];
        // SAFETY: an all-zero msghdr is valid; the pointers set below refer
        // to `iov` and `cbuf`, which outlive the sendmsg call, and the
        // control header written through CMSG_FIRSTHDR lies inside `cbuf`.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
            if libc::sendmsg(self.sock.as_raw_fd(), &msg, 0) != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Receives an fd sent with `send_fd`.
    pub fn recv_fd(&mut self) -> io::Result<OwnedFd> {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
        let mut cbuf = vec![0u8; space];
        // SAFETY: as in send_fd; the kernel fills `cbuf` up to
        // msg_controllen, and the header is checked before its data is read.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            if libc::recvmsg(self.sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) != 1 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "no fd received",
                ));
            }
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null()
                || (*cmsg).cmsg_level != libc::SOL_SOCKET
                || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "no fd received"));
            }
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
            Ok(OwnedFd::from_raw_fd(fd))
        }
    }

    /// Whether the peer closed its end without sending anything more.
    pub fn recv_or_closed(&mut self) -> Result<Option<FromInit>, SyncError> {
        match self.recv() {
            Ok(m) => Ok(Some(m)),
            Err(SyncError::Closed) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let (mut a, b) = Channel::pair().unwrap();
        let mut b = Channel {
            sock: UnixStream::from(b),
        };
        b.send(&FromInit::Pid(42)).unwrap();
        b.send(&FromInit::Error("boom".into())).unwrap();
        assert_eq!(a.recv::<FromInit>().unwrap(), FromInit::Pid(42));
        assert_eq!(
            a.recv::<FromInit>().unwrap(),
            FromInit::Error("boom".into())
        );
        drop(b);
        assert!(a.recv_or_closed().unwrap().is_none());
    }

    #[test]
    fn oversized_length_is_refused() {
        let (mut a, b) = Channel::pair().unwrap();
        let mut b = UnixStream::from(b);
        b.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(a.recv::<FromInit>(), Err(SyncError::TooLong(_))));
    }
}
