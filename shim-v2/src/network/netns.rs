//! A pod's network namespace on the host, held open by fd, and the
//! commands (`ip`, `tc`, the VMM) run inside it. Entering happens in the
//! child between fork and exec, so no shim thread ever changes namespace.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use super::NetworkError;

/// statfs(2) f_type of nsfs, where /proc/PID/ns/* and bind-mounted
/// namespace files live.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Where `ip` and `tc` are looked for when they are not on PATH (a
/// containerd started without /usr/sbin on its PATH).
const SBIN: [&str; 2] = ["/usr/sbin", "/sbin"];

/// An open network namespace.
#[derive(Clone)]
pub struct NetNs {
    fd: Arc<OwnedFd>,
}

impl NetNs {
    /// Opens the namespace file at `path`. Refused: a path that does not
    /// exist, a file that is not a network namespace, and the shim's own
    /// namespace (the host's: redirecting its interfaces into a VM would
    /// cut the node off).
    pub fn open(path: &Path) -> Result<NetNs, NetworkError> {
        let bad = |reason: String| NetworkError::Netns {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| bad(e.to_string()))?;
        let fs = rustix::fs::fstatfs(&file).map_err(|e| bad(e.to_string()))?;
        if fs.f_type != NSFS_MAGIC {
            return Err(bad("not a namespace file".into()));
        }
        let ino = file.metadata().map_err(|e| bad(e.to_string()))?.ino();
        let fd = OwnedFd::from(file);
        let own = std::fs::metadata("/proc/self/ns/net").map_err(|e| bad(e.to_string()))?;
        if ino == own.ino() {
            return Err(bad("the shim's own (the host's) network namespace".into()));
        }
        // setns checks the type; try it in a child, so a file of another
        // namespace type is refused here rather than in the first command.
        let ns = NetNs { fd: Arc::new(fd) };
        ns.run("true", &[])
            .map_err(|e| bad(format!("cannot enter it: {e}")))?;
        Ok(ns)
    }

    /// The namespace's fd, for a child that should run inside it.
    pub fn fd(&self) -> Arc<OwnedFd> {
        self.fd.clone()
    }

    /// Makes `cmd`'s child enter the namespace before it runs.
    pub fn enter_on_spawn(fd: Arc<OwnedFd>, cmd: &mut Command) {
        // SAFETY: the closure runs between fork and exec; it only calls
        // setns(2), which is async-signal-safe, on an fd the Arc keeps open,
        // and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                move_into_link_name_space(fd.as_fd(), Some(LinkNameSpaceType::Network))
                    .map_err(io::Error::from)
            });
        }
    }

    /// Runs `program args` in the namespace; its stdout, or an error with
    /// its stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, NetworkError> {
        let mut cmd = Command::new(find_tool(program));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        NetNs::enter_on_spawn(self.fd.clone(), &mut cmd);
        let line = || format!("{program} {}", args.join(" "));
        let out = cmd.output().map_err(|e| NetworkError::Command {
            command: line(),
            reason: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(NetworkError::Command {
                command: line(),
                reason: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// `name` on PATH, else in /usr/sbin or /sbin, else `name` (the spawn
/// error then names it).
pub(super) fn find_tool(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_netns() {
        let e = NetNs::open(Path::new("/nonexistent/netns")).err().unwrap();
        assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
        let e = NetNs::open(Path::new("/etc/hostname")).err().unwrap();
        assert!(e.to_string().contains("not a namespace file"), "{e}");
    }

    #[test]
    fn refuses_the_hosts_own() {
        let e = NetNs::open(Path::new("/proc/self/ns/net")).err().unwrap();
        assert!(e.to_string().contains("own"), "{e}");
    }

    #[test]
    fn finds_ip() {
        assert!(find_tool("ip").is_absolute());
    }
}
