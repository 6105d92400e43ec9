//! The host's entropy for the guest kernel (CreateSandbox's `entropy`):
//! mixed into the kernel's input pool and credited (RNDADDENTROPY), then
//! the CRNG reseeded from that pool (RNDRESEEDCRNG). VMs restored from one
//! snapshot start with the same pool and CRNG state, so without this they
//! would hand their containers the same "random" numbers; after it, each
//! VM's numbers depend on bytes only it got. Layouts and numbers:
//! include/uapi/linux/random.h.

use std::io;
use std::os::fd::OwnedFd;

use husk_protocols::guest::{ENTROPY_MAX, ENTROPY_MIN};
use rustix::fs::{Mode, OFlags};
use rustix::ioctl::{self, opcode, NoArg, Opcode, Setter};

/// Where the ioctls go (/dev/random takes them as well; both are the
/// same driver).
const DEVICE: &str = "/dev/urandom";

/// _IOW('R', 0x03, int[2]): the size is that of rand_pool_info's header.
const RNDADDENTROPY: Opcode = opcode::write::<[libc::c_int; 2]>(b'R', 0x03);
/// _IO('R', 0x07).
const RNDRESEEDCRNG: Opcode = opcode::none(b'R', 0x07);

#[derive(Debug, thiserror::Error)]
pub enum EntropyError {
    #[error("entropy: {0} bytes, not {ENTROPY_MIN} to {ENTROPY_MAX} (or none)")]
    Size(usize),
    #[error("entropy: {what} {DEVICE}: {source}")]
    Kernel {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn kernel(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> EntropyError {
    move |e| EntropyError::Kernel {
        what,
        source: e.into(),
    }
}

/// Checks the size of `bytes`: none, or [`ENTROPY_MIN`] to
/// [`ENTROPY_MAX`].
pub fn check(bytes: &[u8]) -> Result<(), EntropyError> {
    match bytes.len() {
        0 | ENTROPY_MIN..=ENTROPY_MAX => Ok(()),
        n => Err(EntropyError::Size(n)),
    }
}

/// struct rand_pool_info, with room for the most the agent takes.
#[repr(C)]
struct RandPoolInfo {
    /// Bits to credit.
    entropy_count: libc::c_int,
    /// Bytes of `buf` to mix in.
    buf_size: libc::c_int,
    buf: [u8; ENTROPY_MAX],
}

/// Mixes `bytes` into the kernel's input pool, credits all their bits
/// (they come from the host's getrandom, which is fully seeded), then
/// reseeds the CRNG, so that every later read of /dev/urandom, getrandom
/// or the kernel's own users (stack canaries of new processes, ASLR, TCP
/// sequence numbers) draws from a key that includes them. Nothing is done
/// for no bytes. Needs CAP_SYS_ADMIN.
pub fn add(bytes: &[u8]) -> Result<(), EntropyError> {
    check(bytes)?;
    if bytes.is_empty() {
        return Ok(());
    }
    let mut info = RandPoolInfo {
        entropy_count: 0,
        buf_size: 0,
        buf: [0; ENTROPY_MAX],
    };
    info.buf[..bytes.len()].copy_from_slice(bytes);
    // At most ENTROPY_MAX (512) bytes, 4096 bits: both fit a c_int.
    info.buf_size =
        libc::c_int::try_from(bytes.len()).map_err(|_| EntropyError::Size(bytes.len()))?;
    info.entropy_count = info.buf_size.saturating_mul(8);
    let fd: OwnedFd = rustix::fs::open(DEVICE, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(kernel("opening"))?;
    // SAFETY: RNDADDENTROPY reads a struct rand_pool_info: two ints, then
    // `buf_size` bytes. RandPoolInfo is that layout (repr(C), the buffer
    // at offset 8), and buf_size is at most the buffer's length, so the
    // kernel reads only memory of `info`, which the Setter owns for the
    // call; it writes nothing back.
    let add = unsafe { Setter::<RNDADDENTROPY, RandPoolInfo>::new(info) };
    // SAFETY: the opcode and argument agree (above); the fd is open.
    unsafe { ioctl::ioctl(&fd, add) }.map_err(kernel("RNDADDENTROPY on"))?;
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no user memory.
    let reseed = unsafe { NoArg::<RNDRESEEDCRNG>::new() };
    // SAFETY: as above; the fd is open.
    unsafe { ioctl::ioctl(&fd, reseed) }.map_err(kernel("RNDRESEEDCRNG on"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_are_those_of_linux_random_h() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf), 8);
    }

    #[test]
    fn sizes_are_checked() {
        for ok in [0, ENTROPY_MIN, 64, ENTROPY_MAX] {
            assert!(check(&vec![7; ok]).is_ok(), "{ok}");
        }
        for bad in [1, ENTROPY_MIN - 1, ENTROPY_MAX + 1, 4096] {
            let e = add(&vec![7; bad]).unwrap_err();
            assert!(matches!(e, EntropyError::Size(n) if n == bad), "{e}");
        }
        assert!(add(&[]).is_ok(), "none: nothing to add");
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// The kernel takes the request: the layout and the opcode are right
    /// (a wrong size or opcode is EINVAL/ENOTTY/EFAULT). Adds 64 bytes of
    /// entropy to the host's pool and reseeds its CRNG: harmless.
    #[test]
    fn the_kernel_takes_it() {
        if !is_root() {
            eprintln!("SKIPPED the_kernel_takes_it: needs root (CAP_SYS_ADMIN)");
            return;
        }
        let mut bytes = [0u8; 64];
        std::io::Read::read_exact(&mut std::fs::File::open(DEVICE).unwrap(), &mut bytes).unwrap();
        add(&bytes).unwrap();
        add(&[0x5a; ENTROPY_MAX]).unwrap();
    }

    /// Without CAP_SYS_ADMIN the kernel refuses, and the error says which
    /// call on which device. Capabilities are per thread: this drops it in
    /// a thread of its own only.
    #[test]
    fn a_refusal_names_the_call() {
        if !is_root() {
            eprintln!("SKIPPED a_refusal_names_the_call: needs root");
            return;
        }
        std::thread::spawn(|| {
            use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
            let mut caps = capabilities(None).unwrap();
            caps.effective.remove(CapabilitySet::SYS_ADMIN);
            set_capabilities(None, caps).unwrap();
            let e = add(&[1; 32]).unwrap_err();
            let EntropyError::Kernel { what, ref source } = e else {
                panic!("{e}");
            };
            assert_eq!(what, "RNDADDENTROPY on");
            assert_eq!(source.raw_os_error(), Some(libc::EPERM), "{e}");
            assert!(e.to_string().contains("/dev/urandom"), "{e}");
        })
        .join()
        .unwrap();
    }
}
