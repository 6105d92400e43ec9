//! The `serial` phase: writes garbage to the serial port (the guest's
//! console UART) as fast as the guest can, up to a byte count or a time
//! bound. Every byte is one trapped port write for the VMM.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::rng::Rng;

pub struct SerialStats {
    pub bytes: u64,
    pub elapsed: Duration,
}

pub fn flood(
    path: &str,
    max_bytes: u64,
    deadline: Instant,
    rng: &mut Rng,
) -> io::Result<SerialStats> {
    let mut tty = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    let start = Instant::now();
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
    })
}
