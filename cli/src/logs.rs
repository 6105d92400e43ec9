//! `husk logs`: a sandbox's VMM log (vmm.log) and guest console
//! (console.log, written with `debug_console = true`), both capped by the
//! VMM at 4 MiB; `tail` keeps the last lines of each.

use std::io::{Read, Write};
use std::path::Path;

use husk_runtime_config::state::{CONSOLE_LOG, VMM_LOG};

/// Most read of a log (the VMM caps each at 4 MiB; a bit more is slack).
const MAX_LOG: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("writing the log: {0}")]
    Write(#[source] std::io::Error),
}

/// Which logs to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Which {
    pub vmm: bool,
    pub console: bool,
}

/// The last `n` lines of `text` (all with None).
pub fn tail(text: &[u8], n: Option<usize>) -> &[u8] {
    let Some(n) = n else { return text };
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, &b) in body.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    if n == 0 {
        &text[text.len()..]
    } else {
        text
    }
}

/// Writes the chosen logs of the state folder `dir` to `out`, each under a
/// header line; a missing log says so.
pub fn show(
    dir: &Path,
    which: Which,
    lines: Option<usize>,
    out: &mut dyn Write,
) -> Result<(), LogsError> {
    let mut files = Vec::new();
    if which.vmm {
        files.push((VMM_LOG, "the VMM's log"));
    }
    if which.console {
        files.push((
            CONSOLE_LOG,
            "the guest console (debug_console = true writes it)",
        ));
    }
    for (name, what) in files {
        let path = dir.join(name);
        writeln!(out, "==> {} <==", path.display()).map_err(LogsError::Write)?;
        let mut text = Vec::new();
        match std::fs::File::open(&path).and_then(|f| f.take(MAX_LOG).read_to_end(&mut text)) {
            Ok(_) => {
                out.write_all(tail(&text, lines))
                    .map_err(LogsError::Write)?;
                if !text.is_empty() && !text.ends_with(b"\n") {
                    writeln!(out).map_err(LogsError::Write)?;
                }
            }
            Err(e) => writeln!(out, "({what}: {e})").map_err(LogsError::Write)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_keep_the_last_lines() {
        assert_eq!(tail(b"a\nb\nc\n", Some(2)), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", Some(1)), b"c");
        assert_eq!(tail(b"a\nb\n", Some(5)), b"a\nb\n");
        assert_eq!(tail(b"a\nb\n", Some(0)), b"");
        assert_eq!(tail(b"a\n", None), b"a\n");
    }

    #[test]
    fn both_logs_are_shown_and_a_missing_one_is_named() {
        let dir = std::env::temp_dir().join(format!("husk-cli-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(VMM_LOG), "vmm line\n").unwrap();
        let mut out = Vec::new();
        show(
            &dir,
            Which {
                vmm: true,
                console: true,
            },
            None,
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("vmm.log <==\nvmm line\n"), "{text}");
        assert!(
            text.contains("console.log <==\n(the guest console"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
