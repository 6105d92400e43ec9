//! The `serial` phase: writes garbage to the serial port (the guest's
//! console UART) as fast as the guest can, up to a byte count or a time
//! bound. Every byte is one trapped port write for the VMM.
//!
//! Straight to the transmit register through /dev/port when the kernel has
//! it: the 8250 driver's tty path paces output by the UART's interrupts,
//! which in the nested test machine manages about 400 bytes a second.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::rng::Rng;

pub struct SerialStats {
    pub bytes: u64,
    pub elapsed: Duration,
    /// Where the bytes went: "port" (/dev/port) or "tty".
    pub via: &'static str,
}

/// COM1's transmit holding register.
const COM1_THR: u64 = 0x3f8;

/// One byte per pwrite at the THR (a longer write would walk on to the
/// next ports). None when there is no /dev/port.
fn flood_port(max_bytes: u64, deadline: Instant, rng: &mut Rng) -> Option<io::Result<u64>> {
    use std::os::unix::fs::FileExt;
    let port = OpenOptions::new().write(true).open("/dev/port").ok()?;
    let mut chunk = [0u8; 512];
    let mut bytes = 0u64;
    while bytes < max_bytes && Instant::now() < deadline {
        rng.fill(&mut chunk);
        for b in chunk
            .iter()
            .take(usize::try_from(max_bytes - bytes).unwrap_or(usize::MAX))
        {
            if let Err(e) = port.write_at(std::slice::from_ref(b), COM1_THR) {
                return Some(Err(e));
            }
            bytes += 1;
        }
    }
    Some(Ok(bytes))
}

pub fn flood(
    path: &str,
    max_bytes: u64,
    deadline: Instant,
    rng: &mut Rng,
) -> io::Result<SerialStats> {
    let start = Instant::now();
    if let Some(r) = flood_port(max_bytes, deadline, rng) {
        return Ok(SerialStats {
            bytes: r?,
            elapsed: start.elapsed(),
            via: "port",
        });
    }
    let mut tty = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    let mut chunk = [0u8; 512];
    let mut bytes = 0u64;
    while bytes < max_bytes && Instant::now() < deadline {
        rng.fill(&mut chunk);
        let len = usize::try_from((max_bytes - bytes).min(chunk.len() as u64)).unwrap_or(0);
        bytes += tty.write(&chunk[..len])? as u64;
    }
    // Wait for the UART to send what the tty still holds.
    // SAFETY: tcdrain on an open tty fd; a failure is harmless here.
    unsafe { libc::tcdrain(tty.as_raw_fd()) };
    Ok(SerialStats {
        bytes,
        elapsed: start.elapsed(),
        via: "tty",
    })
}
