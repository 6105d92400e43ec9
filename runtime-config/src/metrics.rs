//! The sandbox's metrics file, `metrics.json` in its state folder: what
//! the shim alone can see of its sandbox (the guest's memory use as the
//! guest reports it, how long the agent takes to answer each kind of
//! request, the containers' OOM kills), published for the `husk` command.
//!
//! Why a file and not a socket the command asks: the shim already keeps a
//! state folder the command reads; a file needs no new listener in the
//! shim (nothing more a local user can poke at), costs the shim nothing
//! when nobody scrapes, and a scrape never waits on a busy shim. The shim
//! writes it atomically (a temporary file renamed over it) at most once a
//! second and at least every [`REFRESH_MS`]; a file older than
//! [`STALE_AFTER_MS`] is stale (its shim stopped publishing) and the
//! command leaves its figures out.
//!
//! The file is the shim's, but some of its values come from the untrusted
//! guest: the shim clamps them before writing ([`GuestMemory::clamped`]),
//! bounds the containers listed ([`MAX_CONTAINERS`]), and [`read`] checks
//! the shape of whatever it finds.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The metrics file in a sandbox's state folder.
pub const METRICS_FILE: &str = "metrics.json";
/// Longest metrics file read back (a full one is about 40 KiB).
const MAX_FILE: u64 = 256 << 10;
/// Most containers whose OOM kills the file lists; the rest are counted in
/// [`SandboxMetrics::containers_left_out`].
pub const MAX_CONTAINERS: usize = 256;
/// Most request kinds (the agent API has fewer than 30).
pub const MAX_METHODS: usize = 64;
/// Longest name of a request kind or a container id.
const MAX_NAME: usize = 128;
/// The shim rewrites the file at least this often, changed or not.
pub const REFRESH_MS: u64 = 10_000;
/// A file not rewritten for this long is stale.
pub const STALE_AFTER_MS: u64 = 60_000;

/// Upper bounds (seconds) of the request-duration histogram's buckets; a
/// last one, +Inf, is implied. From 0.5 ms (a local call) to 10 s (past
/// the shim's request timeout, so a timed-out call lands in +Inf).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus-style histogram with the fixed bounds of
/// [`DURATION_BUCKETS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Observations per bucket, not cumulative: `counts[i]` are those in
    /// `(DURATION_BUCKETS[i-1], DURATION_BUCKETS[i]]`, the last those
    /// above every bound.
    pub counts: Vec<u64>,
    /// The sum of all observations, seconds.
    pub sum: f64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            counts: vec![0; DURATION_BUCKETS.len() + 1],
            sum: 0.0,
        }
    }
}

impl Histogram {
    /// Records one observation of `seconds`.
    pub fn observe(&mut self, seconds: f64) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        let i = DURATION_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(DURATION_BUCKETS.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c = c.saturating_add(1);
        }
        self.sum += seconds;
    }

    /// Every observation.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, &c| a.saturating_add(c))
    }

    /// The cumulative counts as Prometheus wants them: (upper bound,
    /// observations at or below it), +Inf last.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0u64;
        DURATION_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter())
            .map(|(bound, &c)| {
                total = total.saturating_add(c);
                (bound, total)
            })
            .collect()
    }

    fn valid(&self) -> bool {
        self.counts.len() == DURATION_BUCKETS.len() + 1 && self.sum.is_finite() && self.sum >= 0.0
    }
}

/// The agent requests of one kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestStats {
    /// How long each took, answered or failed.
    pub durations: Histogram,
    /// Those that failed: an error status or no answer.
    pub errors: u64,
}

/// The guest's memory, as its kernel reports it (/proc/meminfo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemory {
    /// MemTotal: RAM the guest kernel manages (the VM's memory less what
    /// the kernel keeps for itself).
    pub total_bytes: u64,
    /// MemAvailable.
    pub available_bytes: u64,
    /// When it was sampled (Unix time, milliseconds).
    pub sampled_unix_ms: u64,
}

impl GuestMemory {
    /// The guest's figures made consistent: the total at most the VM's
    /// memory (`vm_bytes`), what is available at most the total. The guest
    /// may say anything; this is all the host believes of it.
    pub fn clamped(total: u64, available: u64, vm_bytes: u64, sampled_unix_ms: u64) -> Self {
        let total_bytes = total.min(vm_bytes);
        GuestMemory {
            total_bytes,
            available_bytes: available.min(total_bytes),
            sampled_unix_ms,
        }
    }

    /// What the guest uses: its total less what is available.
    pub fn used_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.available_bytes)
    }
}

/// The content of `metrics.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxMetrics {
    /// When the shim wrote it (Unix time, milliseconds).
    pub written_unix_ms: u64,
    /// The VM's memory, bytes (the bound of [`GuestMemory`]).
    pub vm_memory_bytes: u64,
    /// The last sample of the guest's memory; none before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory: Option<GuestMemory>,
    /// Per request kind (the agent API's method name, e.g.
    /// "CreateContainer").
    #[serde(default)]
    pub agent_requests: BTreeMap<String, RequestStats>,
    /// OOM kills per container of the sandbox (at most
    /// [`MAX_CONTAINERS`]).
    #[serde(default)]
    pub container_oom_kills: BTreeMap<String, u64>,
    /// Containers left out of `container_oom_kills` by its cap.
    #[serde(default)]
    pub containers_left_out: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: stale, written {age_ms} ms ago")]
    Stale { path: PathBuf, age_ms: u64 },
}

/// Whether `name` may be a request kind or container id in the file.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl SandboxMetrics {
    /// What is wrong with it, if anything.
    fn check(&self) -> Result<(), String> {
        if self.agent_requests.len() > MAX_METHODS {
            return Err(format!("{} request kinds", self.agent_requests.len()));
        }
        if self.container_oom_kills.len() > MAX_CONTAINERS {
            return Err(format!("{} containers", self.container_oom_kills.len()));
        }
        for (name, r) in &self.agent_requests {
            if !valid_name(name) || !r.durations.valid() {
                return Err(format!(
                    "bad request kind {:?}",
                    name.get(..32).unwrap_or(name)
                ));
            }
        }
        if let Some(id) = self.container_oom_kills.keys().find(|id| !valid_name(id)) {
            return Err(format!("bad container id {:?}", id.get(..32).unwrap_or(id)));
        }
        if let Some(m) = self.guest_memory {
            if m.total_bytes > self.vm_memory_bytes || m.available_bytes > m.total_bytes {
                return Err("guest memory beyond the VM's".into());
            }
        }
        Ok(())
    }

    /// Writes the file into the state folder `dir`: a temporary file
    /// renamed over it, so a reader sees the old file or the new one.
    pub fn write(&self, dir: &Path) -> Result<(), MetricsError> {
        let path = dir.join(METRICS_FILE);
        let tmp = dir.join(format!(".{METRICS_FILE}.tmp"));
        let io = |source| MetricsError::Io {
            path: tmp.clone(),
            source,
        };
        let json = serde_json::to_vec(self).map_err(|source| MetricsError::Parse {
            path: path.clone(),
            source,
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&json).map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|source| MetricsError::Io {
            path: path.clone(),
            source,
        })
    }

    /// Reads the file of the state folder `dir` (at most 256 KiB), checks
    /// its shape, and refuses it if it is older than [`STALE_AFTER_MS`] at
    /// `now_unix_ms`.
    pub fn read(dir: &Path, now_unix_ms: u64) -> Result<SandboxMetrics, MetricsError> {
        let path = dir.join(METRICS_FILE);
        let text =
            crate::state::read_bounded(&path, MAX_FILE).map_err(|source| MetricsError::Io {
                path: path.clone(),
                source,
            })?;
        let m: SandboxMetrics =
            serde_json::from_slice(&text).map_err(|source| MetricsError::Parse {
                path: path.clone(),
                source,
            })?;
        m.check().map_err(|what| MetricsError::Invalid {
            path: path.clone(),
            what,
        })?;
        let age_ms = now_unix_ms.saturating_sub(m.written_unix_ms);
        if age_ms > STALE_AFTER_MS {
            return Err(MetricsError::Stale { path, age_ms });
        }
        Ok(m)
    }
}

/// Now, in Unix milliseconds (0 before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_inclusive_and_cumulative() {
        let mut h = Histogram::default();
        for s in [0.0001, 0.0005, 0.0006, 0.3, 11.0, f64::NAN, -1.0] {
            h.observe(s);
        }
        assert_eq!(h.count(), 7);
        // 0.0001, 0.0005, NaN and -1 (as 0) in the first bucket.
        assert_eq!(h.counts[0], 4);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[9], 1, "0.3 in (0.25, 0.5]");
        assert_eq!(h.counts[DURATION_BUCKETS.len()], 1, "11 s in +Inf");
        assert!((h.sum - 11.3012).abs() < 1e-9, "{}", h.sum);
        let c = h.cumulative();
        assert_eq!(c.len(), DURATION_BUCKETS.len() + 1);
        assert_eq!(c[0], (0.0005, 4));
        assert_eq!(c[1], (0.001, 5));
        assert_eq!(c[8], (0.25, 5));
        assert_eq!(c[9], (0.5, 6));
        assert_eq!(c.last(), Some(&(f64::INFINITY, 7)));
    }

    #[test]
    fn guest_figures_are_clamped_to_the_vm() {
        let vm = 256 << 20;
        let m = GuestMemory::clamped(u64::MAX, u64::MAX, vm, 1);
        assert_eq!(
            (m.total_bytes, m.available_bytes, m.used_bytes()),
            (vm, vm, 0)
        );
        let m = GuestMemory::clamped(200 << 20, 300 << 20, vm, 1);
        assert_eq!(m.available_bytes, 200 << 20);
        let m = GuestMemory::clamped(200 << 20, 50 << 20, vm, 1);
        assert_eq!(m.used_bytes(), 150 << 20);
    }

    fn sample() -> SandboxMetrics {
        let mut m = SandboxMetrics {
            written_unix_ms: 1_000_000,
            vm_memory_bytes: 256 << 20,
            guest_memory: Some(GuestMemory::clamped(
                240 << 20,
                200 << 20,
                256 << 20,
                999_000,
            )),
            ..SandboxMetrics::default()
        };
        let mut r = RequestStats::default();
        r.durations.observe(0.002);
        r.errors = 1;
        m.agent_requests.insert("CreateContainer".into(), r);
        m.container_oom_kills.insert("c1".into(), 3);
        m
    }

    #[test]
    fn a_full_file_fits_the_read_bound() {
        let mut m = sample();
        let mut r = RequestStats::default();
        r.durations.counts = vec![u64::MAX; DURATION_BUCKETS.len() + 1];
        r.durations.sum = f64::MAX;
        r.errors = u64::MAX;
        for i in 0..MAX_METHODS {
            m.agent_requests
                .insert(format!("{i:0>MAX_NAME$}"), r.clone());
        }
        m.agent_requests.pop_first();
        for i in 0..MAX_CONTAINERS {
            m.container_oom_kills
                .insert(format!("{i:0>MAX_NAME$}"), u64::MAX);
        }
        m.container_oom_kills.pop_first();
        assert!(m.check().is_ok());
        let len = serde_json::to_vec(&m).unwrap().len() as u64;
        assert!(len < MAX_FILE, "{len}");
    }

    #[test]
    fn the_file_round_trips_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("husk-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let m = sample();
        m.write(&dir).unwrap();
        assert!(!dir.join(format!(".{METRICS_FILE}.tmp")).exists());
        assert_eq!(SandboxMetrics::read(&dir, 1_000_500).unwrap(), m);
        // Stale.
        assert!(matches!(
            SandboxMetrics::read(&dir, 1_000_000 + STALE_AFTER_MS + 1),
            Err(MetricsError::Stale { .. })
        ));
        // Corrupt: cut short, wrong bucket count, values beyond the VM,
        // too many containers, bad names.
        let json = std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
        std::fs::write(dir.join(METRICS_FILE), &json[..json.len() / 2]).unwrap();
        assert!(matches!(
            SandboxMetrics::read(&dir, 1_000_000),
            Err(MetricsError::Parse { .. })
        ));
        let mut bad = sample();
        bad.agent_requests
            .get_mut("CreateContainer")
            .unwrap()
            .durations
            .counts
            .pop();
        let mut beyond = sample();
        beyond.guest_memory.as_mut().unwrap().total_bytes = 1 << 40;
        let mut many = sample();
        for i in 0..=MAX_CONTAINERS {
            many.container_oom_kills.insert(format!("c{i}"), 1);
        }
        let mut name = sample();
        name.container_oom_kills.insert("a\"b".into(), 1);
        for b in [bad, beyond, many, name] {
            b.write(&dir).unwrap();
            let e = SandboxMetrics::read(&dir, 1_000_000).unwrap_err();
            assert!(matches!(e, MetricsError::Invalid { .. }), "{e}");
            assert!(e.to_string().contains(METRICS_FILE), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            SandboxMetrics::read(&dir, 0),
            Err(MetricsError::Io { .. })
        ));
    }
}
