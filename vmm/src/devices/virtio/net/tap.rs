//! A Linux tap interface opened for virtio-net: layer-2 frames, no packet
//! info prefix, each frame preceded by a 12-byte `virtio_net_hdr_v1`, and a
//! nonblocking fd for the event loop.
//!
//! The interface is not persistent: it disappears when the [`Tap`] drops.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

/// Length of `virtio_net_hdr_v1` (with num_buffers), what the tap prepends.
pub const VNET_HDR_LEN: usize = 12;

const IFNAMSIZ: usize = 16;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap name {0:?} (1-15 bytes, no '/', whitespace or NUL)")]
    InvalidName(String),
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    #[error("creating tap {name}: {source}")]
    SetIff {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting the vnet header size on tap {name}: {source}")]
    VnetHdrSize {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting offloads on tap {name}: {source}")]
    Offload {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags member of
/// the union, padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) tap interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty()
            || bytes.len() >= IFNAMSIZ
            || bytes
                .iter()
                .any(|b| *b == b'/' || *b == 0 || b.is_ascii_whitespace())
        {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;

        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` has its
        // layout and size and lives across the call.
        if unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) } < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        // The kernel takes the header size as an int; 12 fits.
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `hdr_len` is.
        if unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) } < 0 {
            return Err(TapError::VnetHdrSize {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        // No offloads: the device offers none to the guest, so frames in
        // both directions carry complete checksums and no GSO.
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { ioctl_with_val(&file, TUNSETOFFLOAD(), 0) } < 0 {
            return Err(TapError::Offload {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (vnet header included); WouldBlock when none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (vnet header included).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "a/b", "has space", "sixteen-chars-xx", "nul\0"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::InvalidName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ifreq_has_the_kernel_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
