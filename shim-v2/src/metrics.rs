//! What the shim measures of its sandbox, and its publication as the state
//! folder's metrics file (`husk_runtime_config::metrics`, read by `husk
//! metrics`):
//!
//! - agent request durations and errors per method ([`AgentCalls`], fed by
//!   the agent client on every call);
//! - OOM kills per container ([`OomCounts`]). The agent's GetOOMEvent says
//!   "this container's oom_kill counter rose", once per rise it sees, so
//!   kills close together are one event, and the shim paces and coalesces
//!   what it takes (`service::watch`). Events are therefore only a lower
//!   bound and a trigger: each one makes the publisher read the container's
//!   cgroup counter (StatsContainer's `memory.oom_kills`, memory.events'
//!   oom_kill: exact), and the count is the larger of the two, never
//!   going down. A container whose cgroup is already gone keeps the
//!   events' count.
//! - the guest's memory use (GetMemInfo: MemTotal, MemAvailable), sampled
//!   every [`GUEST_MEMORY_EVERY`] (the first [`FIRST_GUEST_MEMORY_AFTER`]
//!   after the sandbox starts) and clamped to the VM's memory. The
//!   virtio-balloon has no statistics queue (free page reporting only), so
//!   the guest's own kernel is the only source; it is untrusted and only
//!   ever a value in the file.
//!
//! The [`Publisher`] ticks once a second on its own thread and rewrites
//! the file when something changed or [`REFRESH_MS`] passed, so the file
//! is at most a second behind and never older than the staleness limit
//! while the shim lives. Everything here is bounded by what the shim
//! already keeps: method names are the client's constants, containers are
//! the shim's, the file lists at most [`MAX_CONTAINERS`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_runtime_config::metrics::{
    now_unix_ms, GuestMemory, MetricsError, RequestStats, SandboxMetrics, MAX_CONTAINERS,
    REFRESH_MS,
};

use crate::sandbox::Sandbox;
use crate::sync::lock;

/// How often the publisher looks at what changed.
pub const TICK: Duration = Duration::from_secs(1);
/// How often the guest's memory is sampled.
pub const GUEST_MEMORY_EVERY: Duration = Duration::from_secs(10);
/// The first sample waits this long after the publisher's first tick: a
/// sandbox's first container is being created and started then, and on a
/// one-vCPU guest a GetMemInfo at that moment delays its StartContainer
/// (by 50-300 ms in the test machine).
pub const FIRST_GUEST_MEMORY_AFTER: Duration = Duration::from_secs(2);

/// Durations and errors of the agent calls, per method.
#[derive(Default)]
pub struct AgentCalls(Mutex<BTreeMap<&'static str, RequestStats>>);

impl AgentCalls {
    /// A call of `method` that took `took`, failed or not.
    pub fn record(&self, method: &'static str, took: Duration, ok: bool) {
        let mut calls = lock(&self.0);
        let r = calls.entry(method).or_default();
        r.durations.observe(took.as_secs_f64());
        if !ok {
            r.errors = r.errors.saturating_add(1);
        }
    }

    /// A failed call of `method` whose duration means nothing (a wait).
    pub fn failed(&self, method: &'static str) {
        let mut calls = lock(&self.0);
        let r = calls.entry(method).or_default();
        r.errors = r.errors.saturating_add(1);
    }

    pub fn snapshot(&self) -> BTreeMap<String, RequestStats> {
        lock(&self.0)
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect()
    }
}

#[derive(Default, Clone, Copy)]
struct OomCount {
    /// OOM events heard from the agent.
    heard: u64,
    /// The cgroup's oom_kill counter, when last read.
    cgroup: u64,
}

#[derive(Default)]
struct OomState {
    counts: HashMap<String, OomCount>,
    /// Containers whose cgroup counter is to be read.
    pending: HashSet<String>,
}

/// OOM kills per container.
#[derive(Default)]
pub struct OomCounts(Mutex<OomState>);

impl OomCounts {
    /// The agent reported an OOM kill in container `id` (one the shim
    /// knows: the caller checks, which bounds the map).
    pub fn heard(&self, id: &str) {
        let mut st = lock(&self.0);
        let c = st.counts.entry(id.to_string()).or_default();
        c.heard = c.heard.saturating_add(1);
        st.pending.insert(id.to_string());
    }

    /// The cgroup of container `id` counts `n` kills.
    fn set_cgroup(&self, id: &str, n: u64) {
        let mut st = lock(&self.0);
        let c = st.counts.entry(id.to_string()).or_default();
        c.cgroup = c.cgroup.max(n);
    }

    /// The containers to read the cgroup counter of, at most `max`.
    fn take_pending(&self, max: usize) -> Vec<String> {
        let mut st = lock(&self.0);
        let ids: Vec<String> = st.pending.iter().take(max).cloned().collect();
        for id in &ids {
            st.pending.remove(id);
        }
        ids
    }

    /// The count of every container in `known` (the shim's containers,
    /// zero for those without a kill), at most [`MAX_CONTAINERS`] in id
    /// order, and how many were left out; forgets containers no longer
    /// known.
    fn snapshot(&self, known: &[String]) -> (BTreeMap<String, u64>, u64) {
        let mut st = lock(&self.0);
        let keep: HashSet<&String> = known.iter().collect();
        st.counts.retain(|id, _| keep.contains(id));
        st.pending.retain(|id| keep.contains(id));
        let mut ids: Vec<&String> = known.iter().collect();
        ids.sort();
        ids.dedup();
        let left_out = ids.len().saturating_sub(MAX_CONTAINERS) as u64;
        let counts = ids
            .into_iter()
            .take(MAX_CONTAINERS)
            .map(|id| {
                let c = st.counts.get(id).copied().unwrap_or_default();
                (id.clone(), c.heard.max(c.cgroup))
            })
            .collect();
        (counts, left_out)
    }
}

/// The sandbox's metrics file, closed before its state folder goes so that
/// no write races the folder's removal.
pub struct MetricsFile {
    dir: PathBuf,
    open: Mutex<bool>,
}

impl MetricsFile {
    pub fn new(dir: PathBuf) -> MetricsFile {
        MetricsFile {
            dir,
            open: Mutex::new(true),
        }
    }

    fn write(&self, m: &SandboxMetrics) -> Result<(), MetricsError> {
        let open = lock(&self.open);
        if !*open {
            return Ok(());
        }
        m.write(&self.dir)
    }

    /// No write from now on (one in progress is waited for).
    pub fn close(&self) {
        *lock(&self.open) = false;
    }
}

/// What the shim keeps for its sandbox's metrics.
pub struct SandboxStats {
    pub oom: OomCounts,
    pub file: MetricsFile,
    /// The VM's memory: the bound of the guest's figures.
    pub vm_memory_bytes: u64,
}

impl SandboxStats {
    pub fn new(dir: PathBuf, vm_memory_bytes: u64) -> SandboxStats {
        SandboxStats {
            oom: OomCounts::default(),
            file: MetricsFile::new(dir),
            vm_memory_bytes,
        }
    }
}

/// The publishing loop's state.
#[derive(Default)]
pub struct Publisher {
    guest_memory: Option<GuestMemory>,
    /// The first tick, and when the guest's memory was last sampled.
    started: Option<Instant>,
    memory_sampled: Option<Instant>,
    last: Option<(SandboxMetrics, Instant)>,
    /// A failure is logged once, not every second.
    warned: bool,
}

impl Publisher {
    /// One tick: reads what is due from the guest (the cgroup counters of
    /// containers with new OOM events, the memory every
    /// [`GUEST_MEMORY_EVERY`]), then rewrites the file if something changed
    /// or [`REFRESH_MS`] passed. `known` are the shim's containers.
    pub fn tick(&mut self, sb: &Sandbox, known: &[String], now: Instant) {
        let stats = &sb.stats;
        for id in stats.oom.take_pending(MAX_CONTAINERS) {
            if !known.contains(&id) {
                continue;
            }
            match sb.agent.stats(&id) {
                Ok(s) => {
                    if let Some(m) = s.memory.as_ref() {
                        stats.oom.set_cgroup(&id, m.oom_kills);
                    }
                }
                Err(e) => log::debug!("container {id}: OOM count: {e}"),
            }
        }
        let started = *self.started.get_or_insert(now);
        let due = match self.memory_sampled {
            Some(t) => now.duration_since(t) >= GUEST_MEMORY_EVERY,
            None => now.duration_since(started) >= FIRST_GUEST_MEMORY_AFTER,
        };
        if due {
            self.memory_sampled = Some(now);
            match sb.agent.mem_info() {
                Ok((total, available)) => {
                    self.guest_memory = Some(GuestMemory::clamped(
                        total,
                        available,
                        stats.vm_memory_bytes,
                        now_unix_ms(),
                    ));
                }
                Err(e) => log::debug!("guest memory: {e}"),
            }
        }
        let (container_oom_kills, containers_left_out) = stats.oom.snapshot(known);
        let mut m = SandboxMetrics {
            written_unix_ms: 0,
            vm_memory_bytes: stats.vm_memory_bytes,
            guest_memory: self.guest_memory,
            agent_requests: sb.agent.calls().snapshot(),
            container_oom_kills,
            containers_left_out,
        };
        let fresh = self.last.as_ref().is_some_and(|(last, at)| {
            *last == m && now.duration_since(*at) < Duration::from_millis(REFRESH_MS)
        });
        if fresh {
            return;
        }
        let unchanged = m.clone();
        m.written_unix_ms = now_unix_ms();
        match stats.file.write(&m) {
            Ok(()) => {
                self.last = Some((unchanged, now));
                self.warned = false;
            }
            Err(e) if !self.warned => {
                self.warned = true;
                log::warn!("sandbox {}: {e}", sb.id);
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_recorded_per_method() {
        let c = AgentCalls::default();
        c.record("CreateContainer", Duration::from_millis(3), true);
        c.record("CreateContainer", Duration::from_millis(30), false);
        c.failed("WaitProcess");
        let s = c.snapshot();
        assert_eq!(s["CreateContainer"].durations.count(), 2);
        assert_eq!(s["CreateContainer"].errors, 1);
        assert!((s["CreateContainer"].durations.sum - 0.033).abs() < 1e-9);
        assert_eq!(s["WaitProcess"].durations.count(), 0);
        assert_eq!(s["WaitProcess"].errors, 1);
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn oom_counts_take_the_larger_and_forget_removed_containers() {
        let o = OomCounts::default();
        // One event for a burst of three kills: the cgroup says 3.
        o.heard("a");
        assert_eq!(o.take_pending(10), ids(&["a"]));
        assert!(o.take_pending(10).is_empty());
        o.set_cgroup("a", 3);
        // Two events for a container whose cgroup could not be read.
        o.heard("b");
        o.heard("b");
        // A counter never goes down, whatever the guest says later.
        o.set_cgroup("a", 1);
        let (counts, left) = o.snapshot(&ids(&["a", "b", "c"]));
        assert_eq!(
            counts,
            BTreeMap::from([("a".into(), 3), ("b".into(), 2), ("c".into(), 0)])
        );
        assert_eq!(left, 0);
        // "a" deleted: gone from the file and from memory.
        let (counts, _) = o.snapshot(&ids(&["b"]));
        assert_eq!(counts.len(), 1);
        assert!(!lock(&o.0).counts.contains_key("a"));
    }

    #[test]
    fn the_file_lists_at_most_max_containers() {
        let o = OomCounts::default();
        let known: Vec<String> = (0..MAX_CONTAINERS + 10)
            .map(|i| format!("c{i:04}"))
            .collect();
        o.heard("c0000");
        let (counts, left) = o.snapshot(&known);
        assert_eq!(counts.len(), MAX_CONTAINERS);
        assert_eq!(left, 10);
        assert_eq!(counts["c0000"], 1);
    }

    #[test]
    fn a_closed_file_is_not_written() {
        let dir = std::env::temp_dir().join(format!("husk-shim-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = MetricsFile::new(dir.clone());
        let m = SandboxMetrics {
            written_unix_ms: now_unix_ms(),
            ..SandboxMetrics::default()
        };
        f.write(&m).unwrap();
        assert_eq!(SandboxMetrics::read(&dir, now_unix_ms()).unwrap(), m);
        std::fs::remove_dir_all(&dir).unwrap();
        f.close();
        f.write(&m).unwrap();
        assert!(!dir.exists());
    }
}
