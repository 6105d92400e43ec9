//! Containers' cgroup v2 groups: creation under the agent's base group,
//! OCI resources written as runc's cgroup v2 driver writes them, freezing,
//! killing, statistics and removal.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_protocols::agent::{CpuStats, IoStats, MemoryStats, PidsStats, StatsContainerResponse};
use oci_spec::runtime::LinuxResources;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system is mounted")]
    NoCgroup2,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("resource {0} needs the cgroup controller {1}, which this kernel does not offer here")]
    Unavailable(&'static str, &'static str),
    #[error("invalid resource: {0}")]
    Invalid(String),
    #[error("{0} did not freeze within {1:?}")]
    FreezeTimeout(PathBuf, Duration),
}

type Result<T> = std::result::Result<T, CgroupError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the agent's containers' groups live.
pub struct CgroupRoot {
    base: PathBuf,
    controllers: HashSet<String>,
}

/// The cgroup2 mount point, from /proc/self/mountinfo: the last one, as a
/// later mount (PID 1's own on a fresh /sys) hides earlier ones.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2"))
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

impl CgroupRoot {
    /// Uses `<cgroup2 mount>/<name>`, enabling for the containers below
    /// every controller the kernel offers. `own_root`: the agent owns the
    /// whole hierarchy (PID 1) and enables controllers at its root too; on
    /// a host it takes what the root already delegates.
    pub fn open(name: &str, own_root: bool) -> Result<CgroupRoot> {
        let mount = cgroup2_mount().ok_or(CgroupError::NoCgroup2)?;
        // A root that is not the hierarchy's real root (it has a
        // cgroup.type: PID 1 of a cgroup namespace) may hold no process
        // once it delegates controllers: the agent moves into a leaf of its
        // own, as systemd does with init.scope.
        if own_root && mount.join("cgroup.type").exists() {
            let leaf = mount.join("agent");
            fs::create_dir_all(&leaf).map_err(io_err(&leaf))?;
            let procs = leaf.join("cgroup.procs");
            fs::write(&procs, "0").map_err(io_err(&procs))?;
        }
        let base = mount.join(name);
        fs::create_dir_all(&base).map_err(io_err(&base))?;
        let offered = if own_root {
            "cgroup.controllers"
        } else {
            "cgroup.subtree_control"
        };
        let available = fs::read_to_string(mount.join(offered)).unwrap_or_default();
        let mut controllers = HashSet::new();
        for c in available.split_whitespace() {
            // A controller that cannot be enabled (e.g. bound to a v1
            // hierarchy) is simply not offered below.
            let on = format!("+{c}");
            let at_root = !own_root || fs::write(mount.join("cgroup.subtree_control"), &on).is_ok();
            if at_root && fs::write(base.join("cgroup.subtree_control"), &on).is_ok() {
                controllers.insert(c.to_string());
            }
        }
        Ok(CgroupRoot { base, controllers })
    }

    pub fn has(&self, controller: &str) -> bool {
        self.controllers.contains(controller)
    }

    /// Creates the group of container `id` (already validated).
    pub fn create(&self, id: &str) -> Result<Cgroup> {
        let path = self.base.join(id);
        fs::create_dir(&path).map_err(io_err(&path))?;
        Ok(Cgroup { path })
    }

    /// The group `name` (already validated), made if missing.
    pub fn open_or_create(&self, name: &str) -> Result<Cgroup> {
        let path = self.base.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        Ok(Cgroup { path })
    }
}

/// One container's group.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

/// One file write of a resource update.
#[derive(Debug, PartialEq, Eq)]
pub struct Write {
    pub file: String,
    pub value: String,
    controller: &'static str,
    resource: &'static str,
}

fn w(controller: &'static str, resource: &'static str, file: &str, value: String) -> Write {
    Write {
        file: file.into(),
        value,
        controller,
        resource,
    }
}

fn max_or(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// runc's conversion of cpu.shares (2..262144) to cpu.weight (1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.saturating_sub(2) * 9999) / 262142
}

/// runc's conversion of blkio weight (10..1000) to io.weight (1..10000).
pub fn blkio_to_io_weight(w: u16) -> u64 {
    if w == 0 {
        return 0;
    }
    1 + (u64::from(w).saturating_sub(10) * 9999) / 990
}

/// The file writes for `r`, in runc's order, without touching anything.
pub fn plan(r: &LinuxResources) -> Result<Vec<Write>> {
    let mut out = Vec::new();
    if let Some(m) = r.memory() {
        if let Some(limit) = m.limit() {
            out.push(w("memory", "memory.limit", "memory.max", max_or(limit)));
        }
        if let Some(swap) = m.swap() {
            // OCI's swap is memory + swap; cgroup v2's is swap alone.
            let v = match (swap, m.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l >= 0 => {
                    if s < l {
                        return Err(CgroupError::Invalid(format!(
                            "memory.swap ({s}) is below memory.limit ({l})"
                        )));
                    }
                    (s - l).to_string()
                }
                (s, _) => s.to_string(),
            };
            out.push(w("memory", "memory.swap", "memory.swap.max", v));
        }
        if let Some(res) = m.reservation() {
            out.push(w("memory", "memory.reservation", "memory.low", max_or(res)));
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(shares) = c.shares() {
            let wgt = shares_to_weight(shares);
            if wgt != 0 {
                out.push(w("cpu", "cpu.shares", "cpu.weight", wgt.to_string()));
            }
        }
        if c.quota().is_some() || c.period().is_some() {
            let quota = c
                .quota()
                .filter(|q| *q > 0)
                .map_or("max".into(), |q| q.to_string());
            let period = c.period().unwrap_or(100_000);
            out.push(w(
                "cpu",
                "cpu.quota",
                "cpu.max",
                format!("{quota} {period}"),
            ));
        }
        if let Some(cpus) = c.cpus() {
            out.push(w("cpuset", "cpu.cpus", "cpuset.cpus", cpus.clone()));
        }
        if let Some(mems) = c.mems() {
            out.push(w("cpuset", "cpu.mems", "cpuset.mems", mems.clone()));
        }
    }
    if let Some(p) = r.pids() {
        out.push(w(
            "pids",
            "pids.limit",
            "pids.max",
            max_or(if p.limit() <= 0 { -1 } else { p.limit() }),
        ));
    }
    if let Some(b) = r.block_io() {
        if let Some(wgt) = b.weight() {
            let v = blkio_to_io_weight(wgt);
            if v != 0 {
                out.push(w(
                    "io",
                    "blockIO.weight",
                    "io.weight",
                    format!("default {v}"),
                ));
            }
        }
    }
    for (k, v) in r.unified().iter().flatten() {
        if k.is_empty() || k.contains('/') || k.starts_with('.') || !k.contains('.') {
            return Err(CgroupError::Invalid(format!("unified key {k:?}")));
        }
        let controller = match k.split('.').next() {
            Some("memory") => "memory",
            Some("cpu") => "cpu",
            Some("cpuset") => "cpuset",
            Some("pids") => "pids",
            Some("io") => "io",
            Some("hugetlb") => "hugetlb",
            Some("cgroup") => "",
            _ => return Err(CgroupError::Invalid(format!("unified key {k:?}"))),
        };
        out.push(w(controller, "unified", k, v.clone()));
    }
    Ok(out)
}

fn read_kv(path: &Path) -> Vec<(String, u64)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn kv(list: &[(String, u64)], key: &str) -> u64 {
    list.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

fn read_u64(path: &Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl Cgroup {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that every controller `r` needs is there, before any write.
    pub fn check(root: &CgroupRoot, r: &LinuxResources) -> Result<Vec<Write>> {
        let writes = plan(r)?;
        for wr in &writes {
            if !wr.controller.is_empty() && !root.has(wr.controller) {
                return Err(CgroupError::Unavailable(wr.resource, wr.controller));
            }
        }
        Ok(writes)
    }

    pub fn apply(&self, writes: &[Write]) -> Result<()> {
        for wr in writes {
            let p = self.path.join(&wr.file);
            // A kernel without swap accounting has no memory.swap.max; a
            // swap equal to the limit (or unlimited) asks for nothing then,
            // and runc skips it too.
            if wr.file == "memory.swap.max" && !p.exists() && (wr.value == "0" || wr.value == "max")
            {
                continue;
            }
            fs::write(&p, &wr.value).map_err(io_err(&p))?;
        }
        Ok(())
    }

    pub fn add(&self, pid: i32) -> Result<()> {
        let p = self.path.join("cgroup.procs");
        fs::write(&p, pid.to_string()).map_err(io_err(&p))
    }

    pub fn pids(&self) -> Result<Vec<i32>> {
        let p = self.path.join("cgroup.procs");
        let text = fs::read_to_string(&p).map_err(io_err(&p))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Freezes or thaws, waiting until cgroup.events says it is done.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let p = self.path.join("cgroup.freeze");
        fs::write(&p, if frozen { "1" } else { "0" }).map_err(io_err(&p))?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let timeout = Duration::from_secs(5);
        let start = Instant::now();
        let events = self.path.join("cgroup.events");
        while start.elapsed() < timeout {
            let text = fs::read_to_string(&events).map_err(io_err(&events))?;
            if text.lines().any(|l| l == want) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(CgroupError::FreezeTimeout(self.path.clone(), timeout))
    }

    /// SIGKILLs every process in the group.
    pub fn kill_all(&self) -> Result<()> {
        let k = self.path.join("cgroup.kill");
        if k.exists() {
            return fs::write(&k, "1").map_err(io_err(&k));
        }
        for pid in self.pids()? {
            let _ = crate::sys::kill(pid, rustix::process::Signal::KILL);
        }
        Ok(())
    }

    /// Removes the group once its processes are gone (retrying briefly:
    /// killed processes leave the group when the reaper collects them).
    pub fn remove(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if start.elapsed() > Duration::from_secs(5) => {
                    return Err(io_err(&self.path)(e));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    pub fn stats(&self) -> StatsContainerResponse {
        let cpu = read_kv(&self.path.join("cpu.stat"));
        let mem_events = read_kv(&self.path.join("memory.events"));
        let mut io = IoStats::new();
        for line in fs::read_to_string(self.path.join("io.stat"))
            .unwrap_or_default()
            .lines()
        {
            for field in line.split_whitespace().skip(1) {
                let Some((k, v)) = field.split_once('=') else {
                    continue;
                };
                let v: u64 = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => io.read_bytes += v,
                    "wbytes" => io.write_bytes += v,
                    "rios" => io.read_ios += v,
                    "wios" => io.write_ios += v,
                    _ => {}
                }
            }
        }
        let mut r = StatsContainerResponse::new();
        let mut c = CpuStats::new();
        c.usage_usec = kv(&cpu, "usage_usec");
        c.user_usec = kv(&cpu, "user_usec");
        c.system_usec = kv(&cpu, "system_usec");
        c.nr_throttled = kv(&cpu, "nr_throttled");
        c.throttled_usec = kv(&cpu, "throttled_usec");
        let mut m = MemoryStats::new();
        m.usage_bytes = read_u64(&self.path.join("memory.current"));
        m.limit_bytes = read_u64(&self.path.join("memory.max"));
        m.max_usage_bytes = read_u64(&self.path.join("memory.peak"));
        m.swap_usage_bytes = read_u64(&self.path.join("memory.swap.current"));
        m.oom_kills = kv(&mem_events, "oom_kill");
        let mut p = PidsStats::new();
        p.current = read_u64(&self.path.join("pids.current"));
        p.limit = read_u64(&self.path.join("pids.max"));
        r.cpu = Some(c).into();
        r.memory = Some(m).into();
        r.pids = Some(p).into();
        r.io = Some(io).into();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn writes_as_runc_writes_them() {
        let r = resources(
            r#"{"memory":{"limit":67108864,"swap":134217728},
                "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0"},
                "pids":{"limit":32},
                "blockIO":{"weight":500}}"#,
        );
        let got: Vec<(String, String)> = plan(&r)
            .unwrap()
            .into_iter()
            .map(|w| (w.file, w.value))
            .collect();
        let want = [
            ("memory.max", "67108864"),
            ("memory.swap.max", "67108864"),
            ("cpu.weight", "39"),
            ("cpu.max", "50000 100000"),
            ("cpuset.cpus", "0"),
            ("pids.max", "32"),
            ("io.weight", "default 4950"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn unlimited_and_invalid_values() {
        let r = resources(r#"{"memory":{"limit":-1,"swap":-1},"pids":{"limit":0}}"#);
        let got: Vec<String> = plan(&r).unwrap().into_iter().map(|w| w.value).collect();
        assert_eq!(got, ["max", "max", "max"]);
        let r = resources(r#"{"memory":{"limit":100,"swap":50}}"#);
        assert!(matches!(plan(&r), Err(CgroupError::Invalid(_))));
        let r = resources(r#"{"unified":{"../../escape":"1"}}"#);
        assert!(matches!(plan(&r), Err(CgroupError::Invalid(_))));
    }
}
