//! Tails of the VMM's log and the guest console, made printable, for error
//! messages. Both files are written by the guest's side: only a bounded
//! tail is ever read.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::state_dir::{CONSOLE_LOG, VMM_LOG};

/// Lines of the guest console kept for an error.
const CONSOLE_TAIL_LINES: usize = 25;
/// Lines of the VMM's log kept for an error.
const VMM_TAIL_LINES: usize = 5;
/// Bytes read from the end of a log for its tail.
const TAIL_BYTES: u64 = 8192;

/// The last `lines` lines of a log file, printable, or "" if unreadable.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.take(TAIL_BYTES).read_to_end(&mut buf);
    let text: String = String::from_utf8_lossy(&buf)
        .chars()
        .map(|c| {
            if c == '\n' || (!c.is_control() && c != '\u{fffd}') {
                c
            } else if c == '\r' || c == '\t' {
                ' '
            } else {
                '?'
            }
        })
        .collect();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The console's tail (or how to get one) and the VMM log's tail, as a
/// suffix for an error message.
pub fn diagnostics(dir: &Path, debug_console: bool) -> String {
    let mut out = String::new();
    let vmm = tail(&dir.join(VMM_LOG), VMM_TAIL_LINES);
    if !vmm.is_empty() {
        out.push_str("\nVMM log (last lines):\n");
        out.push_str(&vmm);
    }
    if debug_console {
        let console = tail(&dir.join(CONSOLE_LOG), CONSOLE_TAIL_LINES);
        out.push_str("\nguest console (last lines):\n");
        out.push_str(if console.is_empty() {
            "(empty)"
        } else {
            &console
        });
    } else {
        out.push_str(
            "\n(set debug_console = true in the husk configuration to see the guest console)",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_are_short_and_printable() {
        let dir = std::env::temp_dir().join(format!("husk-tail-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join(CONSOLE_LOG);
        let mut text = Vec::new();
        for i in 0..100 {
            text.extend_from_slice(format!("line {i}\r\n").as_bytes());
        }
        text.extend_from_slice(b"bad \x1b[0m \xff end\n");
        fs::write(&f, &text).unwrap();
        let t = tail(&f, 3);
        assert_eq!(t, "line 98 \nline 99 \nbad ?[0m ? end");
        assert_eq!(tail(&dir.join("missing"), 3), "");
        let d = diagnostics(&dir, true);
        assert!(d.contains("guest console (last lines):\nline 76"), "{d}");
        assert!(diagnostics(&dir, false).contains("debug_console = true"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
