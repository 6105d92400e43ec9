//! The sandbox's host cgroup: where its VMM runs, with memory, CPU and task
//! limits from the VM's size.
//!
//! The folder is the sandbox spec's `linux.cgroupsPath` (what runc would
//! have put the pause container in: with CRI and the cgroupfs driver
//! `/kubepods/<qos>/pod<uid>/<sandbox id>`; the systemd driver's
//! `slice:prefix:name` is expanded to the folders systemd would use and made
//! directly, not through systemd), or `/husk/<sandbox id>` when the spec has
//! none. The shim creates what does not exist, sets the limits, and the
//! VMM joins it before its first instruction (the child writes "0" to
//! `cgroup.procs`, opened before fork). On cgroup v2 that is one folder; on
//! a v1 (or hybrid) host one in each of the memory, cpu and pids
//! hierarchies. What the shim created is recorded in the state folder and
//! removed when the sandbox ends (deepest first; a parent another sandbox
//! still uses stays).
//!
//! Limits: memory = guest memory + a fixed overhead + 1/32 of the guest
//! memory (the VMM's own heap, KVM's page tables and maps); CPU = as many
//! CPUs as the VM has vCPUs; tasks = vCPUs + a margin for the VMM's other
//! threads.

use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sizing::VmSize;

/// Where cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The VMM's memory beyond the guest's.
pub const MEMORY_OVERHEAD: u64 = 64 << 20;
/// The CFS period the CPU quota is given in (µs).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Tasks beyond one per vCPU: the VMM's main and device threads.
pub const TASK_MARGIN: u64 = 32;
/// virtiofsd's memory (its heap, inode table and request buffers; guest
/// memory it maps is the VMM's, counted once).
pub const VIRTIOFSD_MEMORY: u64 = 64 << 20;
/// virtiofsd's tasks besides its thread pool: its two processes, the
/// vhost-user threads and a queue thread each.
pub const VIRTIOFSD_TASKS: u64 = 16;
/// The v1 hierarchies the VMM joins (memory and cpu are required).
const V1_HIERARCHIES: [(&str, bool); 3] = [("memory", true), ("cpu", true), ("pids", false)];
/// The v2 controllers enabled down to the sandbox's folder.
const V2_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// How long removing a folder waits for its last task to go.
const REMOVE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroupsPath {path:?}: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup v2 at {root} and no cgroup v1 {controller} hierarchy")]
    NoHierarchy { root: PathBuf, controller: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The limits a VM's cgroup gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub tasks: u64,
}

impl CgroupLimits {
    pub fn of(size: VmSize) -> CgroupLimits {
        let guest = size.memory_mib << 20;
        CgroupLimits {
            memory_bytes: guest + MEMORY_OVERHEAD + guest / 32,
            cpu_quota_us: u64::from(size.vcpus) * CPU_PERIOD_US,
            cpu_period_us: CPU_PERIOD_US,
            tasks: u64::from(size.vcpus) + TASK_MARGIN,
        }
    }

    /// Room for the sandbox's virtiofsd too, with a pool of `threads`.
    pub fn with_virtiofsd(mut self, threads: u32) -> CgroupLimits {
        self.memory_bytes += VIRTIOFSD_MEMORY;
        self.tasks += VIRTIOFSD_TASKS + u64::from(threads);
        self
    }
}

/// The cgroup folder of a sandbox, relative to a hierarchy's root, from
/// the spec's cgroupsPath (None or empty: husk's own).
pub fn relative_path(cgroups_path: Option<&str>, sandbox_id: &str) -> Result<PathBuf, CgroupError> {
    let raw = cgroups_path.unwrap_or("").trim();
    let bad = |reason| CgroupError::BadPath {
        path: raw.to_string(),
        reason,
    };
    let path = if raw.is_empty() {
        Path::new("husk").join(sandbox_id)
    } else if raw.contains(':') {
        systemd_path(raw).ok_or_else(|| bad("not a systemd slice:prefix:name"))?
    } else {
        PathBuf::from(raw)
    };
    let mut rel = PathBuf::new();
    // Split by hand: Path::components drops inner `.`s silently.
    for c in path.to_string_lossy().split('/').filter(|c| !c.is_empty()) {
        if c == "." || c == ".." {
            return Err(bad("must not hold . or .. components"));
        }
        rel.push(c);
    }
    if rel.as_os_str().is_empty() {
        return Err(bad("names the root cgroup"));
    }
    Ok(rel)
}

/// systemd's `parent.slice:prefix:name` as folders: every dash of the slice
/// is a level (`a-b.slice` is in `a.slice`), the unit is
/// `prefix-name.scope`.
fn systemd_path(raw: &str) -> Option<PathBuf> {
    let mut parts = raw.split(':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || name.is_empty() || name.contains('/') || prefix.contains('/') {
        return None;
    }
    let mut path = PathBuf::new();
    if !slice.is_empty() && slice != "-.slice" {
        let stem = slice.strip_suffix(".slice")?;
        if stem.is_empty() || stem.contains('/') || stem.split('-').any(str::is_empty) {
            return None;
        }
        let words: Vec<&str> = stem.split('-').collect();
        for n in 1..=words.len() {
            path.push(format!("{}.slice", words[..n].join("-")));
        }
    }
    path.push(if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    });
    Some(path)
}

/// The cgroup file systems of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified cgroup v2 at this folder.
    V2(PathBuf),
    /// cgroup v1: (controller, its hierarchy's root) for each one husk uses
    /// that is mounted.
    V1(Vec<(&'static str, PathBuf)>),
}

impl Hierarchy {
    /// What `root` holds: cgroup v2 if its `cgroup.controllers` exists,
    /// else the v1 hierarchies under it.
    pub fn detect(root: &Path) -> Result<Hierarchy, CgroupError> {
        if root.join("cgroup.controllers").exists() {
            return Ok(Hierarchy::V2(root.to_path_buf()));
        }
        let mut found = Vec::new();
        for (controller, required) in V1_HIERARCHIES {
            let dir = root.join(controller);
            if dir.join("cgroup.procs").exists() {
                found.push((controller, dir));
            } else if required {
                return Err(CgroupError::NoHierarchy {
                    root: root.to_path_buf(),
                    controller: controller.into(),
                });
            }
        }
        Ok(Hierarchy::V1(found))
    }
}

/// A sandbox's cgroup, made by [`SandboxCgroup::create`].
#[derive(Debug)]
pub struct SandboxCgroup {
    /// The sandbox's folder in each hierarchy.
    pub leaves: Vec<PathBuf>,
    /// The folders made for it, parents first.
    pub created: Vec<PathBuf>,
}

impl SandboxCgroup {
    /// Makes folder `rel` in every hierarchy with `limits`. On failure,
    /// removes what it made.
    pub fn create(
        hierarchy: &Hierarchy,
        rel: &Path,
        limits: CgroupLimits,
    ) -> Result<SandboxCgroup, CgroupError> {
        let mut cg = SandboxCgroup {
            leaves: Vec::new(),
            created: Vec::new(),
        };
        let made = cg.make(hierarchy, rel, limits);
        if made.is_err() {
            cg.remove();
        }
        made.map(|()| cg)
    }

    fn make(
        &mut self,
        hierarchy: &Hierarchy,
        rel: &Path,
        limits: CgroupLimits,
    ) -> Result<(), CgroupError> {
        match hierarchy {
            Hierarchy::V2(root) => {
                let leaf = self.mkdirs(root, rel, true)?;
                let cpu = format!("{} {}", limits.cpu_quota_us, limits.cpu_period_us);
                write(&leaf, "memory.max", &limits.memory_bytes.to_string())?;
                // No swap beyond the limit: guest memory in swap is still
                // the guest's.
                write_if_present(&leaf, "memory.swap.max", "0")?;
                write(&leaf, "cpu.max", &cpu)?;
                write(&leaf, "pids.max", &limits.tasks.to_string())?;
                self.leaves.push(leaf);
            }
            Hierarchy::V1(roots) => {
                for (controller, root) in roots {
                    let leaf = self.mkdirs(root, rel, false)?;
                    match *controller {
                        "memory" => {
                            write(
                                &leaf,
                                "memory.limit_in_bytes",
                                &limits.memory_bytes.to_string(),
                            )?;
                        }
                        "cpu" => {
                            write(
                                &leaf,
                                "cpu.cfs_period_us",
                                &limits.cpu_period_us.to_string(),
                            )?;
                            write(&leaf, "cpu.cfs_quota_us", &limits.cpu_quota_us.to_string())?;
                        }
                        "pids" => write(&leaf, "pids.max", &limits.tasks.to_string())?,
                        _ => {}
                    }
                    self.leaves.push(leaf);
                }
            }
        }
        Ok(())
    }

    /// Makes `root/rel` level by level, recording what it made; on v2,
    /// enables husk's controllers in each parent.
    fn mkdirs(&mut self, root: &Path, rel: &Path, v2: bool) -> Result<PathBuf, CgroupError> {
        let mut dir = root.to_path_buf();
        for c in rel.components() {
            if v2 {
                enable_controllers(&dir)?;
            }
            dir.push(c);
            match fs::create_dir(&dir) {
                Ok(()) => self.created.push(dir.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&dir)(e)),
            }
        }
        Ok(dir)
    }

    /// The `cgroup.procs` of every leaf, opened for the VMM's child.
    pub fn procs(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.leaves
            .iter()
            .map(|leaf| {
                let p = leaf.join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .map_err(io_err(&p))
            })
            .collect()
    }

    /// What to write to the state folder: the made folders, one a line.
    pub fn record(&self) -> String {
        self.created
            .iter()
            .map(|p| format!("{}\n", p.display()))
            .collect()
    }

    /// Removes the folders it made, deepest first.
    pub fn remove(&mut self) {
        remove_dirs(&std::mem::take(&mut self.created));
    }
}

/// Removes recorded cgroup folders (`record`'s text), deepest first; only
/// folders under [`CGROUP_ROOT`] are touched.
pub fn remove_recorded(record: &str) {
    let dirs: Vec<PathBuf> = record
        .lines()
        .map(PathBuf::from)
        .filter(|p| {
            p.starts_with(CGROUP_ROOT)
                && p.components()
                    .all(|c| !matches!(c, Component::ParentDir | Component::CurDir))
        })
        .collect();
    remove_dirs(&dirs);
}

/// rmdir of each folder of `dirs` (parents first), last to first. A leaf
/// whose tasks are still going is waited for; a parent still in use (by
/// another sandbox) stays.
fn remove_dirs(dirs: &[PathBuf]) {
    for (i, dir) in dirs.iter().enumerate().rev() {
        let start = Instant::now();
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                // EBUSY: tasks in it are still exiting.
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && i == dirs.len() - 1
                        && start.elapsed() < REMOVE_WAIT =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    if i == dirs.len() - 1 {
                        log::warn!("removing cgroup {}: {e}", dir.display());
                    } else {
                        log::debug!("cgroup {} stays: {e}", dir.display());
                    }
                    break;
                }
            }
        }
    }
}

/// Enables husk's v2 controllers for the children of `dir` (those it has).
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let read = |name: &str| {
        let p = dir.join(name);
        fs::read_to_string(&p).map_err(io_err(&p))
    };
    let available = read("cgroup.controllers")?;
    let enabled = read("cgroup.subtree_control")?;
    for c in V2_CONTROLLERS {
        let has = |list: &str| list.split_whitespace().any(|w| w == c);
        if has(&available) && !has(&enabled) {
            write(dir, "cgroup.subtree_control", &format!("+{c}"))?;
        }
    }
    Ok(())
}

fn write(dir: &Path, name: &str, value: &str) -> Result<(), CgroupError> {
    let p = dir.join(name);
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(io_err(&p))
}

fn write_if_present(dir: &Path, name: &str, value: &str) -> Result<(), CgroupError> {
    if dir.join(name).exists() {
        write(dir, name, value)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
