//! The channel between the agent and a container set-up process
//! (`husk-agent init`): length-prefixed JSON messages over a Unix stream
//! socket pair, which the set-up process finds as fd 3.
//!
//! The agent sends one `InitConfig`; the set-up process answers with the pid
//! of the container process it forked, then `Ready` (or `Error`). For a
//! container (not an exec) the process then waits for `Start`; a failing
//! exec is reported as `Error`, a successful one closes the socket (CLOEXEC).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use oci_spec::runtime::{LinuxSeccomp, Process, Spec};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
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

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
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
    pub fn send_fd(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        let fds = [fd];
        if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("control message buffer too small"));
        }
        let sent = rustix::net::sendmsg(
            &self.sock,
            &[IoSlice::new(&[0])],
            &mut cmsg,
            SendFlags::empty(),
        )?;
        if sent != 1 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "fd not sent"));
        }
        Ok(())
    }

    /// Receives an fd sent with `send_fd`.
    pub fn recv_fd(&mut self) -> io::Result<OwnedFd> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let got = rustix::net::recvmsg(
            &self.sock,
            &mut [IoSliceMut::new(&mut byte)],
            &mut cmsg,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        if got.bytes != 1 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no fd received",
            ));
        }
        // Any further fds (a misbehaving peer) are closed as the drain drops.
        let fd = cmsg.drain().find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        });
        fd.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no fd received"))
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
