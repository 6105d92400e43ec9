//! The host's entropy into the guest kernel's pool, from CreateSandbox.
//!
//! A VM restored from a template (the shim's `template = true`) starts with
//! the template's input pool and CRNG state, the same in every clone: two
//! clones would read the same /dev/urandom bytes until the kernel reseeded
//! on its own. So every sandbox, booted or restored, gets bytes from the
//! host's getrandom before any container runs: mixed into the input pool
//! and credited (RNDADDENTROPY), then a CRNG reseed forced from it
//! (RNDRESEEDCRNG), as a VM generation id change would.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// Fewest and most bytes a CreateSandbox may carry (empty: none, from an
/// older shim).
pub const MIN_BYTES: usize = 32;
pub const MAX_BYTES: usize = 512;

/// _IOW('R', 0x03, int[2]): add bytes to the input pool and credit them.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// _IO('R', 0x07): reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Checks a CreateSandbox's entropy: empty, or MIN_BYTES..=MAX_BYTES.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() || (MIN_BYTES..=MAX_BYTES).contains(&bytes.len()) {
        Ok(())
    } else {
        Err(format!(
            "entropy: {} bytes, expected {MIN_BYTES} to {MAX_BYTES}",
            bytes.len()
        ))
    }
}

/// `struct rand_pool_info` with `bytes` as its buffer, each credited with
/// 8 bits (the host's getrandom is a CSPRNG).
fn pool_info(bytes: &[u8]) -> Vec<u8> {
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&len.saturating_mul(8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    info
}

/// Adds `bytes` (checked) to the pool, credited, and reseeds the CRNG.
pub fn add(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    check(bytes).map_err(io::Error::other)?;
    let urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    let fd = urandom.as_raw_fd();
    let info = pool_info(bytes);
    // SAFETY: `info` is a rand_pool_info whose buf_size matches the bytes
    // that follow its header; the kernel only reads it, within the call.
    if unsafe { libc::ioctl(fd, RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(fd, RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert!(check(&[]).is_ok());
        assert!(check(&[0; 32]).is_ok());
        assert!(check(&[0; 512]).is_ok());
        assert!(check(&[0; 31]).unwrap_err().contains("31 bytes"));
        assert!(check(&[0; 513]).is_err());
        assert!(add(&[0; 8]).is_err(), "refused before any ioctl");
    }

    #[test]
    fn the_pool_info_header_counts_bits_and_bytes() {
        let info = pool_info(&[7u8; 64]);
        assert_eq!(&info[..4], &512i32.to_ne_bytes());
        assert_eq!(&info[4..8], &64i32.to_ne_bytes());
        assert_eq!(&info[8..], &[7u8; 64]);
    }

    /// The real ioctls, as root (the tests run as root here): adding
    /// entropy and reseeding harm no host.
    #[test]
    fn the_kernel_takes_the_bytes_as_root() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let mut b = [0u8; 64];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b)
            .unwrap();
        add(&b).unwrap();
    }
}
