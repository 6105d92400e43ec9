//! The sandbox's virtiofsd: the vhost-user backend of its virtio-fs
//! device, serving the shared folder (`crate::shared`) to the guest.
//!
//! One per sandbox, started before the VMM and ended after it:
//! - the shim binds the vhost-user socket itself (`run/virtiofsd.sock`,
//!   in the jail's sockets folder, owned by the jail's user, mode 0600),
//!   and hands virtiofsd the listening fd (`--fd=3`): the socket is there
//!   before the VMM starts, and only the VMM's uid can connect;
//! - virtiofsd sandboxes itself (`--sandbox=namespace`: new mount, PID and
//!   network namespaces, pivot_root into the shared folder; `--seccomp=kill`),
//!   runs without CAP_MKNOD (`--modcaps=-mknod`: the guest makes no device
//!   node on the host) and with at most [`RLIMIT_NOFILE`] open files (set
//!   by the shim before exec);
//! - the shim starts it as PID 1 of a PID namespace of its own, in the
//!   sandbox's host cgroup, with the parent-death signal: killing it kills
//!   its sandboxed child too, and a dying shim takes it along;
//! - its stderr goes through a pipe the shim copies into `virtiofsd.log`,
//!   at most [`MAX_LOG`] bytes (a guest may make it log).

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::jail::{self, JailUser};
use super::vmm::VmmProcess;
use crate::config::VirtiofsdConfig;

/// The vhost-user socket, in the sandbox's sockets folder (`run/`).
pub const SOCKET: &str = "virtiofsd.sock";
/// virtiofsd's log in the state folder.
pub const LOG: &str = "virtiofsd.log";
/// Most bytes of virtiofsd's stderr kept.
pub const MAX_LOG: u64 = 1 << 20;
/// Most files virtiofsd may hold open (each inode the guest has looked up
/// may hold one): a bound on what a guest makes the host keep open.
pub const RLIMIT_NOFILE: u64 = 65536;
/// The fd the listening socket has in virtiofsd.
const LISTEN_FD: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("virtiofsd socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("virtiofsd log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Jail(#[from] jail::JailError),
}

/// virtiofsd's command line (after the program) for serving `shared`.
pub fn args(cfg: &VirtiofsdConfig, shared: &Path, log_level: log::LevelFilter) -> Vec<OsString> {
    let mut shared_dir = OsString::from("--shared-dir=");
    shared_dir.push(shared);
    let level = match log_level {
        log::LevelFilter::Off | log::LevelFilter::Error => "error",
        log::LevelFilter::Warn | log::LevelFilter::Info => "warn",
        log::LevelFilter::Debug => "info",
        log::LevelFilter::Trace => "debug",
    };
    let mut a: Vec<OsString> = vec![
        format!("--fd={LISTEN_FD}").into(),
        shared_dir,
        format!("--cache={}", cfg.cache.as_str()).into(),
        format!("--thread-pool-size={}", cfg.thread_pool_size).into(),
        "--sandbox=namespace".into(),
        "--seccomp=kill".into(),
        "--announce-submounts".into(),
        "--modcaps=-mknod".into(),
        // The shim sets the limit (lowering needs no privilege):
        // virtiofsd's own --rlimit-nofile raises too, which needs
        // CAP_SYS_RESOURCE.
        "--rlimit-nofile=0".into(),
        format!("--log-level={level}").into(),
    ];
    if cfg.xattr {
        a.push("--xattr".into());
    }
    a
}

/// Binds the vhost-user socket at `path` for `user` (the jailed VMM's),
/// mode 0600; without a jail it stays root's.
pub fn listen(path: &Path, user: Option<JailUser>) -> Result<UnixListener, VirtiofsdError> {
    let err = |source| VirtiofsdError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let l = UnixListener::bind(path).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(err)?;
    if let Some(user) = user {
        jail::give(user, path)?;
    }
    Ok(l)
}

/// A running virtiofsd.
pub struct Virtiofsd {
    process: VmmProcess,
}

impl Virtiofsd {
    /// Starts virtiofsd serving `shared` on `listener`, in the cgroups
    /// whose `cgroup.procs` are `cgroup_procs`, logging to `log`.
    pub fn start(
        cfg: &VirtiofsdConfig,
        shared: &Path,
        listener: UnixListener,
        cgroup_procs: Vec<OwnedFd>,
        log: &Path,
        log_level: log::LevelFilter,
        name: &str,
    ) -> Result<Virtiofsd, VirtiofsdError> {
        let spawn_err = |source| VirtiofsdError::Spawn {
            path: cfg.path.clone(),
            source,
        };
        let log_file = fs::File::create(log).map_err(|source| VirtiofsdError::Log {
            path: log.to_path_buf(),
            source,
        })?;
        let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| spawn_err(e.into()))?;
        let mut cmd = Command::new(&cfg.path);
        cmd.args(args(cfg, shared, log_level))
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(writer));
        let listen_fd = listener.as_raw_fd();
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        let nofile = hard.map_or(RLIMIT_NOFILE, |h| h.min(RLIMIT_NOFILE));
        // SAFETY: the closure runs between fork and exec; it only calls
        // write(2) on fds it owns, setrlimit(2), dup2(2) and fcntl(2), all
        // async-signal-safe, and allocates nothing. dup2 to another number clears close-on-exec
        // on the copy, which virtiofsd inherits; `listener` lives until
        // after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &cgroup_procs {
                    rustix::io::write(fd, b"0")?;
                }
                rustix::process::setrlimit(
                    rustix::process::Resource::Nofile,
                    rustix::process::Rlimit {
                        current: Some(nofile),
                        maximum: Some(nofile),
                    },
                )?;
                if listen_fd == LISTEN_FD {
                    // dup2 onto itself keeps close-on-exec: clear it.
                    if libc::fcntl(LISTEN_FD, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(listen_fd, LISTEN_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let process = VmmProcess::supervise(cmd, name, true).map_err(spawn_err)?;
        // The child holds the listener and the pipe's write end now.
        drop(listener);
        copy_capped(reader, log_file, name);
        Ok(Virtiofsd { process })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    /// How it ended, if it has.
    #[cfg(test)]
    pub fn exit_status(&self) -> Option<String> {
        self.process.exit_status()
    }

    /// Registers what to do when it exits (at once if it has).
    pub fn on_exit(&self, f: impl FnOnce(String) + Send + 'static) {
        self.process.on_exit(f);
    }

    /// SIGKILLs it (its sandboxed child dies with its PID namespace) and
    /// reaps it.
    pub fn stop(&self) {
        self.process.kill();
    }
}

/// Copies what `reader` gives into `log`, at most [`MAX_LOG`] bytes, then
/// drains the rest, on a thread of its own that ends with the pipe.
fn copy_capped(reader: OwnedFd, mut log: fs::File, name: &str) {
    let mut pipe = fs::File::from(reader);
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-log"))
        .spawn(move || {
            let mut kept = 0u64;
            let mut buf = [0u8; 4096];
            loop {
                let n = match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let room = usize::try_from(MAX_LOG.saturating_sub(kept)).unwrap_or(0);
                let take = n.min(room);
                if take > 0 && log.write_all(&buf[..take]).is_ok() {
                    kept += take as u64;
                    if kept >= MAX_LOG {
                        let _ = log.write_all(b"\n[virtiofsd log cap reached]\n");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("virtiofsd log: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VirtiofsdCache;
    use std::time::Duration;

    fn cfg(path: &Path) -> VirtiofsdConfig {
        VirtiofsdConfig {
            path: path.to_path_buf(),
            cache: VirtiofsdCache::Auto,
            thread_pool_size: 0,
            xattr: false,
        }
    }

    #[test]
    fn the_command_line_sandboxes_and_bounds_virtiofsd() {
        let mut c = cfg(Path::new("/usr/local/bin/virtiofsd"));
        let a: Vec<String> = args(&c, Path::new("/run/husk/sb/shared"), log::LevelFilter::Info)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        for want in [
            "--fd=3",
            "--shared-dir=/run/husk/sb/shared",
            "--cache=auto",
            "--thread-pool-size=0",
            "--sandbox=namespace",
            "--seccomp=kill",
            "--modcaps=-mknod",
            "--rlimit-nofile=0",
            "--log-level=warn",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
        assert!(!a.iter().any(|x| x == "--xattr"));
        c.xattr = true;
        c.cache = VirtiofsdCache::Never;
        c.thread_pool_size = 4;
        let a: Vec<String> = args(&c, Path::new("/s"), log::LevelFilter::Trace)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        for want in [
            "--xattr",
            "--cache=never",
            "--thread-pool-size=4",
            "--log-level=debug",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
    }

    /// A stand-in virtiofsd (a shell script) gets the listening socket as
    /// fd 3, its stderr is capped in the log, and stop() kills and reaps
    /// it with everything it started in its PID namespace.
    #[test]
    fn a_started_virtiofsd_gets_the_socket_and_stops_with_its_children() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root (a PID namespace)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("husk-vfsd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("virtiofsd");
        // Proves fd 3 is a listening socket (accepts a connection), floods
        // stderr past the cap, and leaves a child behind that only dies
        // with its PID namespace.
        fs::write(
            &fake,
            "#!/bin/sh\n\
             ls -l /proc/self/fd/3 >&2\n\
             sleep 1000 &\n\
             echo $! > \"$(dirname \"$0\")/child\"\n\
             head -c 3000000 /dev/zero | tr '\\0' x >&2\n\
             exec sleep 1000\n",
        )
        .unwrap();
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        let sock = dir.join(SOCKET);
        let l = listen(&sock, None).unwrap();
        assert_eq!(
            fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let log = dir.join(LOG);
        let v = Virtiofsd::start(
            &cfg(&fake),
            &dir,
            l,
            Vec::new(),
            &log,
            log::LevelFilter::Info,
            "vfsd-test",
        )
        .unwrap();
        let t = std::time::Instant::now();
        while fs::metadata(&log).map_or(0, |m| m.len()) < MAX_LOG
            && t.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        let text = fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("socket:["),
            "fd 3 is not a socket: {}",
            &text[..200.min(text.len())]
        );
        assert!(text.len() as u64 <= MAX_LOG + 64, "{}", text.len());
        assert!(text.ends_with("[virtiofsd log cap reached]\n"));
        assert!(v.exit_status().is_none());
        // The child's pid, as the shim's namespace sees it: the script
        // wrote its own namespace's; find the sleeper among our
        // descendants instead.
        let children = fs::read_to_string(format!("/proc/{}/task/{}/children", v.pid(), v.pid()))
            .unwrap_or_default();
        let child: Vec<u32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        assert!(!child.is_empty(), "the stand-in has no child");
        v.stop();
        assert_eq!(v.exit_status().as_deref(), Some("signal: 9 (SIGKILL)"));
        std::thread::sleep(Duration::from_millis(200));
        for pid in child {
            let gone = fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.contains(") Z "));
            assert!(gone, "child {pid} outlived virtiofsd");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The real virtiofsd (scripts/setup.sh installs it; skipped without
    /// it or root): it starts on the shim's socket and waits for the VMM,
    /// its worker sandboxed in namespaces of its own with the open-file
    /// bound, and stop() ends both of its processes.
    #[test]
    fn the_real_virtiofsd_runs_sandboxed_and_stops() {
        let bin = Path::new("/usr/local/bin/virtiofsd");
        if !bin.exists() || !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root and {}", bin.display());
            return;
        }
        let dir = std::env::temp_dir().join(format!("husk-vfsd-real-{}", std::process::id()));
        let _ = crate::shared::mountinfo::unmount_under(&dir);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("state")).unwrap();
        fs::create_dir_all(dir.join("vol")).unwrap();
        fs::write(dir.join("vol/a"), b"host data").unwrap();
        let dir = fs::canonicalize(&dir).unwrap();
        let folder = crate::shared::SharedFolder::create(&dir.join("state")).unwrap();
        let sock = dir.join(SOCKET);
        let v = Virtiofsd::start(
            &cfg(bin),
            folder.shared(),
            listen(&sock, None).unwrap(),
            Vec::new(),
            &dir.join(LOG),
            log::LevelFilter::Info,
            "vfsd-real",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let log = fs::read_to_string(dir.join(LOG)).unwrap_or_default();
        assert!(v.exit_status().is_none(), "virtiofsd ended: {log}");
        // Its sandboxed worker: a child in other mount and PID namespaces.
        let kids = |pid: u32| -> Vec<u32> {
            fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        };
        let worker = *kids(v.pid()).first().expect("virtiofsd's worker");
        let ns = |pid: u32, n: &str| fs::read_link(format!("/proc/{pid}/ns/{n}")).unwrap();
        for n in ["mnt", "pid", "net"] {
            assert_ne!(ns(worker, n), ns(std::process::id(), n), "{n} namespace");
        }
        let limits = fs::read_to_string(format!("/proc/{worker}/limits")).unwrap();
        let nofile: Vec<u64> = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert!(nofile.iter().all(|&n| n <= RLIMIT_NOFILE), "{nofile:?}");
        // A container shared after virtiofsd started: in its view (its
        // root is the shared folder), read-only where asked.
        let volume = crate::spec::SharedVolume {
            index: 0,
            host: dir.join("vol"),
            dir: true,
            read_only: true,
        };
        folder.add_container("c1", None, &[volume]).unwrap();
        let seen = Path::new("/proc")
            .join(worker.to_string())
            .join("root/c1/volumes/0");
        assert_eq!(fs::read(seen.join("a")).unwrap(), b"host data");
        let e = fs::write(seen.join("b"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        folder.remove_container("c1").unwrap();
        assert!(!seen.exists(), "the unmount reached virtiofsd's view");
        // The socket takes the VMM's connection (a client that leaves
        // ends virtiofsd).
        std::os::unix::net::UnixStream::connect(&sock).unwrap();
        v.stop();
        folder.remove().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let gone =
            fs::read_to_string(format!("/proc/{worker}/stat")).map_or(true, |s| s.contains(") Z "));
        assert!(gone, "the worker outlived virtiofsd");
        fs::remove_dir_all(&dir).unwrap();
    }
}
