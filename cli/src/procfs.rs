//! What /proc says about a process (a sandbox's VMM): whether it lives, its
//! resident memory, CPU time and age. Every file is read bounded and parsed
//! without trusting its layout.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unexpected contents")]
    Format { path: PathBuf },
}

/// A process's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStats {
    pub rss_bytes: u64,
    /// User plus system time.
    pub cpu: Duration,
    /// Time since the process started.
    pub age: Duration,
    /// When it started, Unix time in seconds.
    pub start_unix_secs: f64,
}

fn read_small(path: &Path) -> Result<String, ProcError> {
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_string(&mut s))
        .map_err(|source| ProcError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(s)
}

/// The clock ticks per second /proc's times count in.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf reads a constant of the C library; no memory is
    // touched.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        #[allow(clippy::cast_precision_loss)] // ticks are ~100
        let t = t as f64;
        t
    } else {
        100.0
    }
}

/// Parses `/proc/<pid>/stat`: (utime, stime, starttime) in ticks. The
/// command name in parentheses may hold anything, so fields are counted
/// from the last ')'.
pub fn parse_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15, starttime 22.
    let at = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some((at(14)?, at(15)?, at(22)?))
}

/// Parses `VmRSS:` of `/proc/<pid>/status`, in bytes.
pub fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Reads the figures of process `pid`.
pub fn stats(pid: i32) -> Result<ProcStats, ProcError> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let stat_path = dir.join("stat");
    let format = |path: &Path| ProcError::Format {
        path: path.to_path_buf(),
    };
    let (utime, stime, start) =
        parse_stat(&read_small(&stat_path)?).ok_or_else(|| format(&stat_path))?;
    let status_path = dir.join("status");
    // A zombie has no VmRSS: it holds no memory.
    let rss_bytes = parse_rss(&read_small(&status_path)?).unwrap_or(0);
    let uptime_path = Path::new("/proc/uptime");
    let uptime: f64 = read_small(uptime_path)?
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| format(uptime_path))?;
    let tps = ticks_per_sec();
    #[allow(clippy::cast_precision_loss)] // tick counts fit f64's 53 bits for centuries
    let (cpu, start_secs) = ((utime + stime) as f64 / tps, start as f64 / tps);
    let age = (uptime - start_secs).max(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    Ok(ProcStats {
        rss_bytes,
        cpu: Duration::from_secs_f64(cpu.max(0.0)),
        age: Duration::from_secs_f64(age),
        start_unix_secs: now - age,
    })
}

/// Whether process `pid` exists (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    read_small(Path::new(&format!("/proc/{pid}/stat")))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace()
                .next()
                .map(|st| st != "Z" && st != "X")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 555 1000 10";
        assert_eq!(parse_stat(stat), Some((7, 3, 555)));
        assert_eq!(parse_stat("42 (x) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn rss_is_read_in_bytes() {
        assert_eq!(parse_rss("Name: x\nVmRSS:\t  1234 kB\n"), Some(1234 * 1024));
        assert_eq!(parse_rss("Name: x\n"), None);
        assert_eq!(parse_rss("VmRSS: lots kB\n"), None);
    }

    #[test]
    fn this_process_has_figures() {
        let me = i32::try_from(std::process::id()).unwrap();
        let s = stats(me).unwrap();
        assert!(s.rss_bytes > 0);
        assert!(alive(me));
        assert!(!alive(i32::MAX));
        assert!(stats(i32::MAX).is_err());
    }
}
