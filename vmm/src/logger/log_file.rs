//! The VMM's log writer: stderr (a file the shim keeps in host memory), up
//! to a size cap. Lines past the cap are dropped and counted; the first one
//! dropped is replaced by a final line saying the log is capped. The last
//! [`RESERVE`] bytes under the cap are kept for the lines the VMM writes as
//! it ends ([`LogSink::closing`]), so that why it stopped is always logged.

use std::io::{self, Write};
use std::sync::Mutex;

use husk_vm_config::control::LogCount;
use husk_vm_config::limits::DEFAULT_LOG_MAX_BYTES;
use tracing_subscriber::fmt::MakeWriter;

/// Bytes under the cap kept for the capped line and the closing lines.
pub const RESERVE: u64 = 4096;

struct State {
    cap: u64,
    written: u64,
    dropped_lines: u64,
    capped: bool,
    closing: bool,
}

/// The log's size cap and what it wrote and dropped.
pub struct LogSink {
    state: Mutex<State>,
}

/// This process's log.
pub static LOG: LogSink = LogSink::new(DEFAULT_LOG_MAX_BYTES);

impl LogSink {
    pub const fn new(cap: u64) -> Self {
        Self {
            state: Mutex::new(State {
                cap,
                written: 0,
                dropped_lines: 0,
                capped: false,
                closing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_cap(&self, cap: u64) {
        self.lock().cap = cap;
    }

    /// From now on lines may use the reserve: the VMM is ending.
    pub fn closing(&self) {
        self.lock().closing = true;
    }

    /// Writes one log line (tracing writes each event whole) to `out`, or
    /// drops it if it does not fit. Write errors are returned but the line
    /// counts as written: a log that cannot be written is not retried.
    pub fn write_line(&self, out: &mut dyn Write, line: &[u8]) -> io::Result<()> {
        let mut s = self.lock();
        let len = line.len() as u64;
        let limit = if s.closing {
            s.cap
        } else {
            s.cap.saturating_sub(RESERVE)
        };
        if (s.closing || !s.capped) && s.written.saturating_add(len) <= limit {
            s.written += len;
            return out.write_all(line);
        }
        s.dropped_lines += 1;
        if s.capped {
            return Ok(());
        }
        s.capped = true;
        let note = format!(
            "husk-vmm: log capped at {} bytes; later lines are dropped (the control socket's status counts them)\n",
            s.cap
        );
        s.written += note.len() as u64;
        out.write_all(note.as_bytes())
    }

    pub fn count(&self) -> LogCount {
        let s = self.lock();
        LogCount {
            written_bytes: s.written,
            dropped_lines: s.dropped_lines,
            capped: s.capped,
        }
    }
}

/// One line's writer for tracing: to stderr through [`LOG`].
pub struct LogLine;

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        LOG.write_line(&mut io::stderr().lock(), buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// The tracing writer of [`LOG`].
#[derive(Clone, Copy, Default)]
pub struct CappedStderr;

impl<'a> MakeWriter<'a> for CappedStderr {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> Vec<u8> {
        let mut l = vec![b'x'; n - 1];
        l.push(b'\n');
        l
    }

    #[test]
    fn stops_at_the_cap_with_one_final_line() {
        let cap = RESERVE + 1000;
        let log = LogSink::new(cap);
        let mut out = Vec::new();
        for _ in 0..100 {
            log.write_line(&mut out, &line(100)).unwrap();
        }
        // 10 lines fit under cap - RESERVE; then the note; the rest dropped.
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(text.matches(&"x".repeat(99)).count(), 10);
        assert_eq!(text.matches("log capped at").count(), 1);
        assert!(text.ends_with("the control socket's status counts them)\n"));
        assert!(out.len() as u64 <= cap);
        let c = log.count();
        assert!(c.capped);
        assert_eq!(c.dropped_lines, 90);
        assert_eq!(c.written_bytes, out.len() as u64);

        // The closing lines still fit, up to the cap itself.
        log.closing();
        log.write_line(&mut out, b"VM stopped: Reset\n").unwrap();
        assert!(out.ends_with(b"VM stopped: Reset\n"));
        for _ in 0..100 {
            log.write_line(&mut out, &line(100)).unwrap();
        }
        assert!(out.len() as u64 <= cap, "{} > {cap}", out.len());
        assert_eq!(
            String::from_utf8(out)
                .unwrap()
                .matches("log capped")
                .count(),
            1
        );
    }

    #[test]
    fn one_huge_line_is_dropped_not_cut() {
        let log = LogSink::new(RESERVE + 100);
        let mut out = Vec::new();
        log.write_line(&mut out, &line(1000)).unwrap();
        assert!(out.starts_with(b"husk-vmm: log capped at 4196 bytes"));
        assert_eq!(log.count().dropped_lines, 1);
    }

    #[test]
    fn a_cap_below_the_reserve_writes_only_the_note() {
        let log = LogSink::new(10);
        let mut out = Vec::new();
        log.write_line(&mut out, b"a\n").unwrap();
        log.write_line(&mut out, b"b\n").unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("husk-vmm: log capped"));
        assert_eq!(log.count().dropped_lines, 2);
    }
}
