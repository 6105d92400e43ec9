//! `husk-agent init`: the set-up process of a container or exec, what
//! `runc init` is to runc. The agent starts it with the channel on fd 3 and
//! the process's stdio on 0-2; being a fresh single-threaded process, it can
//! enter namespaces and fork freely (the agent, multi-threaded, cannot).
//!
//! It enters the namespaces, forks (so the child lands in the new pid
//! namespace), reports the child's pid and exits; the child sets up the
//! container, reports Ready, waits for Start (containers only) and execs.

mod caps;
pub mod mountinfo;
mod process;
pub mod rootfs;

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Gid, Uid};
use rustix::thread::UnshareFlags;

use crate::sync::{Channel, FromInit, InitConfig, NsAction, ToInit, Work};
use crate::sys::{self, ctx};

/// Entry point; never returns.
pub fn main() -> ! {
    // SAFETY: the agent placed our end of the channel on fd 3.
    let mut ch = unsafe { Channel::from_init_fd() };
    // The channel must not leak into the program.
    let _ = rustix::io::fcntl_setfd(ch.as_fd(), rustix::io::FdFlags::CLOEXEC);
    let err = run(&mut ch);
    let _ = ch.send(&FromInit::Error(err));
    std::process::exit(1)
}

/// Becomes root of the user namespace just entered (its maps are written).
fn become_ns_root() -> io::Result<()> {
    // Per thread, which is the process: the set-up process has one thread.
    let root = (|| {
        rustix::thread::set_thread_res_gid(Gid::ROOT, Gid::ROOT, Gid::ROOT)?;
        rustix::thread::set_thread_res_uid(Uid::ROOT, Uid::ROOT, Uid::ROOT)
    })();
    ctx(
        root.map_err(io::Error::from),
        "becoming root of the user namespace",
    )
}

fn enter_namespaces(ch: &mut Channel, actions: &[NsAction]) -> io::Result<()> {
    // Join before creating: the user namespace first (it owns the others),
    // the mount namespace last, since the paths of the others are read
    // through the current /proc.
    let mut joins: Vec<(&NsAction, OwnedFd)> = Vec::new();
    for a in actions {
        if let Some(p) = &a.path {
            let f = ctx(fs::File::open(p), format_args!("namespace {}", p.display()))?;
            joins.push((a, OwnedFd::from(f)));
        }
    }
    joins.sort_by_key(|(a, _)| match a.flag {
        libc::CLONE_NEWUSER => 0,
        libc::CLONE_NEWNS => 2,
        _ => 1,
    });
    for (a, fd) in &joins {
        ctx(
            sys::setns(fd.as_fd(), a.flag),
            format_args!("setns {:?}", a.path),
        )?;
        if a.flag == libc::CLONE_NEWUSER {
            become_ns_root()?;
        }
    }
    let mut new = actions
        .iter()
        .filter(|a| a.path.is_none())
        .fold(0, |f, a| f | a.flag);
    if new & libc::CLONE_NEWUSER != 0 {
        // Alone first, so that the namespaces created next belong to it;
        // the agent writes its maps (a process cannot map itself to root).
        ctx(sys::unshare(UnshareFlags::NEWUSER), "unshare user")?;
        send(ch, FromInit::NeedIdMaps)?;
        match ch.recv::<ToInit>() {
            Ok(ToInit::IdMapsWritten) => {}
            _ => return Err(io::Error::other("the agent did not write the id maps")),
        }
        become_ns_root()?;
        new &= !libc::CLONE_NEWUSER;
    }
    if new != 0 {
        ctx(sys::unshare(sys::unshare_flags(new)), "unshare")?;
    }
    Ok(())
}

fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    ctx(fs::write(&path, value), format_args!("sysctl {key}"))
}

fn run(ch: &mut Channel) -> String {
    let cfg = match ch.recv::<ToInit>() {
        Ok(ToInit::Config(c)) => c,
        Ok(_) => return "expected a config".into(),
        Err(e) => return e.to_string(),
    };
    if let Err(e) = enter_namespaces(ch, &cfg.namespaces) {
        return e.to_string();
    }
    // The child waits for this pipe to close, so that its messages follow
    // our Pid message on the shared channel.
    let (rd, wr) = match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) {
        Ok(p) => p,
        Err(e) => return format!("pipe: {}", io::Error::from(e)),
    };
    // fork stays with libc: rustix's is unsafe too.
    // SAFETY: the set-up process is single-threaded, so the child may do
    // anything after fork, allocate included.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return format!("fork: {}", io::Error::last_os_error());
    }
    if pid > 0 {
        let _ = ch.send(&FromInit::Pid(pid));
        std::process::exit(0);
    }
    drop(wr);
    let mut buf = [0u8; 1];
    // Returns 0 at EOF; an error (none is expected) ends the wait too.
    while matches!(rustix::io::read(&rd, &mut buf), Ok(n) if n > 0) {}
    drop(rd);
    match container_process(ch, *cfg) {
        Ok(()) => std::process::exit(0),
        Err(e) => e.to_string(),
    }
}

fn container_process(ch: &mut Channel, cfg: InitConfig) -> io::Result<()> {
    let last_cap = cfg.cap_last_cap;
    match cfg.work {
        Work::Container { spec, rootfs } => {
            let p = spec
                .process()
                .as_ref()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no process"))?;
            if let Some(score) = p.oom_score_adj() {
                ctx(
                    fs::write("/proc/self/oom_score_adj", score.to_string()),
                    "oom_score_adj",
                )?;
            }
            rootfs::setup(&spec, &rootfs)?;
            let new_uts = cfg
                .namespaces
                .iter()
                .any(|a| a.flag == libc::CLONE_NEWUTS && a.path.is_none());
            if let (Some(h), true) = (spec.hostname(), new_uts) {
                ctx(sys::sethostname(h), "sethostname")?;
            }
            let sysctls = spec.linux().as_ref().and_then(|l| l.sysctl().clone());
            for (k, v) in sysctls.iter().flatten() {
                write_sysctl(k, v)?;
            }
            rootfs::finish(&spec)?;
            if p.terminal() == Some(true) {
                make_terminal(ch)?;
            }
            let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
            let prepared = process::prepare(p, seccomp.as_ref())?;
            send(ch, FromInit::Ready)?;
            match ch.recv::<ToInit>() {
                Ok(ToInit::Start) => {}
                // The agent removed the container before starting it.
                _ => std::process::exit(0),
            }
            Err(process::finish(p, &prepared, last_cap))
        }
        Work::Exec {
            process: p,
            seccomp,
        } => {
            if p.terminal() == Some(true) {
                make_terminal(ch)?;
            }
            let prepared = process::prepare(&p, seccomp.as_deref())?;
            send(ch, FromInit::Ready)?;
            Err(process::finish(&p, &prepared, last_cap))
        }
    }
}

/// Gives the process a terminal of the container's devpts as stdio and
/// hands its master to the agent.
fn make_terminal(ch: &mut Channel) -> io::Result<()> {
    let (master, slave) = ctx(
        crate::stdio::open_pty(Path::new("/dev/ptmx")),
        "opening the container's terminal",
    )?;
    // Onto the standard fds, replacing what the agent gave.
    let dup = (|| {
        rustix::stdio::dup2_stdin(&slave)?;
        rustix::stdio::dup2_stdout(&slave)?;
        rustix::stdio::dup2_stderr(&slave)
    })();
    ctx(dup.map_err(io::Error::from), "dup2 terminal")?;
    send(ch, FromInit::Console)?;
    ch.send_fd(master.as_fd())
}

fn send(ch: &mut Channel, m: FromInit) -> io::Result<()> {
    ch.send(&m).map_err(io::Error::other)
}
