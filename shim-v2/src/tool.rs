//! Host tools the shim runs over a container's image (mkfs.erofs walks the
//! whole untrusted tree), bounded: a time limit after which the tool is
//! killed, a largest file it may write (RLIMIT_FSIZE), an address-space
//! ceiling, no core dump, death with the shim, and, when the jail has a
//! user, that user instead of root, keeping only CAP_DAC_READ_SEARCH (to
//! read every file of the image, whoever owns it) under no_new_privs. Its
//! output is kept up to a bound, the rest drained and dropped.

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Resource, Rlimit, Signal};
use rustix::thread::{CapabilitySet, CapabilitySets};

use crate::sandbox::jail::JailUser;

/// Most output kept of a tool, for its error message.
const MAX_OUTPUT: u64 = 64 << 10;
/// How often a running tool is checked on.
const POLL: Duration = Duration::from_millis(20);

/// What a tool may use.
#[derive(Debug, Clone, Copy)]
pub struct ToolLimits {
    pub timeout: Duration,
    /// Largest file it may write, in bytes.
    pub max_file_bytes: u64,
    /// Its address space, in bytes.
    pub max_address_space: u64,
    /// Run as this user, with CAP_DAC_READ_SEARCH only; None: as root.
    pub user: Option<JailUser>,
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("running {tool}: {source}")]
    Spawn {
        tool: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for {tool}: {source}")]
    Wait {
        tool: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{tool} ran longer than its {secs} s limit and was killed")]
    TimedOut { tool: PathBuf, secs: u64 },
}

/// A finished tool: its exit status, and its stderr then stdout (each cut
/// at [`MAX_OUTPUT`]).
#[derive(Debug)]
pub struct ToolOutput {
    pub status: ExitStatus,
    pub output: Vec<u8>,
}

/// Runs `cmd` within `limits`; its status and output, or an error if it
/// could not start or outran its time (it is then killed and reaped).
pub fn run(mut cmd: Command, limits: &ToolLimits) -> Result<ToolOutput, ToolError> {
    let tool = PathBuf::from(cmd.get_program());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let limits_in_child = *limits;
    // SAFETY: the closure runs between fork and exec and makes only
    // system calls (prctl, setrlimit, set*id, capset), which are
    // async-signal-safe, on values copied in before the fork; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || confine(&limits_in_child));
    }
    let mut child = cmd.spawn().map_err(|source| ToolError::Spawn {
        tool: tool.clone(),
        source,
    })?;
    let stderr = child.stderr.take().map(drain);
    let stdout = child.stdout.take().map(drain);
    let status = wait_until(&mut child, Instant::now() + limits.timeout);
    let mut output = Vec::new();
    for reader in [stderr, stdout].into_iter().flatten() {
        // The pipes close when the tool is gone: the readers end.
        output.extend(reader.join().unwrap_or_default());
    }
    match status {
        Ok(Some(status)) => Ok(ToolOutput { status, output }),
        Ok(None) => Err(ToolError::TimedOut {
            tool,
            secs: limits.timeout.as_secs(),
        }),
        Err(source) => Err(ToolError::Wait { tool, source }),
    }
}

/// The child's exit status, or None after killing and reaping it at
/// `deadline`.
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            // It may have exited just now: kill's error does not matter,
            // the wait reaps it either way.
            let _ = child.kill();
            child.wait()?;
            return Ok(None);
        }
        thread::sleep(POLL);
    }
}

/// Reads a pipe to its end on a thread, keeping the first [`MAX_OUTPUT`]
/// bytes (a tool blocked on a full pipe would otherwise never finish).
fn drain<R: Read + Send + 'static>(mut pipe: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut kept = Vec::new();
        let _ = (&mut pipe).take(MAX_OUTPUT).read_to_end(&mut kept);
        let _ = io::copy(&mut pipe, &mut io::sink());
        kept
    })
}

/// In the child: the limits, then (with a user) the switch to it.
fn confine(limits: &ToolLimits) -> io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    for (resource, value) in [
        (Resource::Fsize, limits.max_file_bytes),
        (Resource::As, limits.max_address_space),
        (Resource::Core, 0),
    ] {
        rustix::process::setrlimit(
            resource,
            Rlimit {
                current: Some(value),
                maximum: Some(value),
            },
        )?;
    }
    if let Some(user) = limits.user {
        become_reader(user)?;
    }
    rustix::thread::set_no_new_privs(true)?;
    Ok(())
}

/// Becomes `user` keeping CAP_DAC_READ_SEARCH alone, in every set it
/// needs to survive exec (permitted, inheritable, ambient) and nothing
/// else in the bounding set.
fn become_reader(user: crate::sandbox::jail::JailUser) -> io::Result<()> {
    let keep = CapabilitySet::DAC_READ_SEARCH;
    crate::sandbox::jail::drop_bounding_set_except(keep)?;
    let (uid, gid) = crate::sandbox::jail::ids(user);
    // Keep the permitted set across the uid change; effective is cleared.
    rustix::thread::set_keep_capabilities(true)?;
    rustix::thread::set_thread_groups(&[])?;
    rustix::thread::set_thread_res_gid(gid, gid, gid)?;
    rustix::thread::set_thread_res_uid(uid, uid, uid)?;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: keep,
        },
    )?;
    rustix::thread::set_keep_capabilities(false)?;
    // The uid change cleared the parent-death signal: set it again.
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    rustix::thread::configure_capability_in_ambient_set(keep, true)?;
    Ok(())
}

impl ToolLimits {
    /// The bounds mkfs.erofs runs within over a container's root: the
    /// configured time and image size, 4 GiB of address space, and the
    /// jail's user (reading the whole image through CAP_DAC_READ_SEARCH
    /// alone).
    pub fn for_rootfs(cfg: &crate::config::Config) -> Self {
        Self {
            timeout: cfg.rootfs_build_timeout,
            max_file_bytes: cfg.rootfs_image_max_mib << 20,
            max_address_space: 4 << 30,
            user: cfg.jail,
        }
    }
}

#[cfg(test)]
mod tests;
