//! The last steps before the container's program runs, in runc's order:
//! session and terminal, rlimits, umask, bounding set, user and groups,
//! capabilities, no_new_privs, working directory, then execve.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxSeccomp, PosixRlimit, Process};
use rustix::fs::{Gid, Mode};
use rustix::process::{Resource, Rlimit};

use crate::seccomp::Filter;

use super::caps;
use crate::sys::{self, ctx};

/// Default PATH when the process's environment has none (runc's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything execve needs, resolved while the set-up can still report.
pub struct Prepared {
    exe: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    seccomp: Option<Filter>,
}

fn env_value<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .find_map(|e| e.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Finds `name` as execvp would, in the container's PATH.
pub fn look_path(name: &str, env: &[String]) -> io::Result<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if is_exec(&p) {
            Ok(p)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("exec: {name:?}: no such executable file"),
            ))
        };
    }
    let path = env_value(env, "PATH").unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|d| Path::new(if d.is_empty() { "." } else { d }).join(name))
        .find(|p| is_exec(p))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("exec: {name:?}: executable file not found in $PATH"),
            )
        })
}

/// The home directory of `uid` from the container's /etc/passwd, or "/".
fn home_of(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 6 && f[2].parse() == Ok(uid)).then(|| f[5].to_string())
            })
        })
        .unwrap_or_else(|| "/".to_string())
}

pub fn prepare(p: &Process, seccomp: Option<&LinuxSeccomp>) -> io::Result<Prepared> {
    let seccomp = seccomp
        .map(crate::seccomp::compile)
        .transpose()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let args = p.args().clone().unwrap_or_default();
    let first = args
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "process.args is empty"))?;
    let mut env = p.env().clone().unwrap_or_default();
    if env_value(&env, "HOME").is_none() {
        env.push(format!("HOME={}", home_of(p.user().uid())));
    }
    let exe = look_path(first, &env)?;
    Ok(Prepared {
        exe: sys::cstr(&exe)?,
        argv: args.iter().map(sys::cstr).collect::<io::Result<_>>()?,
        envp: env.iter().map(sys::cstr).collect::<io::Result<_>>()?,
        seccomp,
    })
}

fn rlimit_resource(l: &PosixRlimit) -> Option<Resource> {
    let name = serde_json::to_string(&l.typ()).ok()?;
    Some(match name.trim_matches('"') {
        "RLIMIT_CPU" => Resource::Cpu,
        "RLIMIT_FSIZE" => Resource::Fsize,
        "RLIMIT_DATA" => Resource::Data,
        "RLIMIT_STACK" => Resource::Stack,
        "RLIMIT_CORE" => Resource::Core,
        "RLIMIT_RSS" => Resource::Rss,
        "RLIMIT_NPROC" => Resource::Nproc,
        "RLIMIT_NOFILE" => Resource::Nofile,
        "RLIMIT_MEMLOCK" => Resource::Memlock,
        "RLIMIT_AS" => Resource::As,
        "RLIMIT_LOCKS" => Resource::Locks,
        "RLIMIT_SIGPENDING" => Resource::Sigpending,
        "RLIMIT_MSGQUEUE" => Resource::Msgqueue,
        "RLIMIT_NICE" => Resource::Nice,
        "RLIMIT_RTPRIO" => Resource::Rtprio,
        "RLIMIT_RTTIME" => Resource::Rttime,
        _ => return None,
    })
}

/// A limit as rustix takes it: RLIM_INFINITY (all ones) is `None`.
fn rlim(v: u64) -> Option<u64> {
    (v != u64::MAX).then_some(v)
}

fn set_rlimits(p: &Process) -> io::Result<()> {
    for l in p.rlimits().iter().flatten() {
        let res = rlimit_resource(l).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("rlimit {:?}", l.typ()))
        })?;
        let lim = Rlimit {
            current: rlim(l.soft()),
            maximum: rlim(l.hard()),
        };
        ctx(
            rustix::process::setrlimit(res, lim).map_err(io::Error::from),
            format_args!("setrlimit {:?}", l.typ()),
        )?;
    }
    Ok(())
}

/// The set-up process has one thread, so rustix's per-thread id calls
/// change the whole process's ids, as the exec'd program expects.
fn set_user(p: &Process) -> io::Result<()> {
    let user = p.user();
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw_unchecked(*g))
        .collect();
    ctx(
        rustix::thread::set_thread_groups(&groups).map_err(io::Error::from),
        "setgroups",
    )?;
    let (uid, gid) = (sys::uid(user.uid()), sys::gid(user.gid()));
    ctx(
        rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(io::Error::from),
        "setresgid",
    )?;
    // Keep the permitted set over the uid change; capset then trims it.
    rustix::thread::set_keep_capabilities(true)?;
    ctx(
        rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(io::Error::from),
        "setresuid",
    )?;
    Ok(rustix::thread::set_keep_capabilities(false)?)
}

/// Runs the program; returns only with the error that stopped it.
pub fn finish(p: &Process, prepared: &Prepared, cap_last_cap: u32) -> io::Error {
    match finish_inner(p, prepared, cap_last_cap) {
        Ok(()) => io::Error::other("execve returned"),
        Err(e) => e,
    }
}

/// Marks every fd from 3 up close-on-exec: the program starts with its
/// stdio only, whatever the agent or this process opened without CLOEXEC.
/// Closed only by a successful execve, so the channel still carries a
/// set-up error; done first, before a seccomp filter could refuse it.
fn close_inherited_fds() -> io::Result<()> {
    // The raw syscall: glibc's close_range wrapper is newer than some
    // targets' glibc, and musl has none.
    // SAFETY: close_range takes integers and touches only this process's
    // fd table.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn finish_inner(p: &Process, prepared: &Prepared, cap_last_cap: u32) -> io::Result<()> {
    ctx(close_inherited_fds(), "close_range")?;
    // The set-up process is never a group leader (it was forked), so this
    // cannot fail with EPERM.
    ctx(rustix::process::setsid().map_err(io::Error::from), "setsid")?;
    if p.terminal() == Some(true) {
        // fd 0 is the terminal make_terminal gave us.
        ctx(
            rustix::process::ioctl_tiocsctty(std::io::stdin()).map_err(io::Error::from),
            "TIOCSCTTY",
        )?;
    }
    set_rlimits(p)?;
    if let Some(mask) = p.user().umask() {
        rustix::process::umask(Mode::from_raw_mode(mask));
    }
    let nnp = p.no_new_privileges() == Some(true);
    // Without no_new_privs the filter needs CAP_SYS_ADMIN, so it goes in
    // before the capabilities are dropped (runc's order).
    if let (Some(f), false) = (&prepared.seccomp, nnp) {
        ctx(f.install(), "seccomp")?;
    }
    if let Some(c) = p.capabilities() {
        ctx(
            caps::drop_bounding(c, cap_last_cap),
            "dropping bounding caps",
        )?;
    }
    set_user(p)?;
    if let Some(c) = p.capabilities() {
        ctx(caps::apply(c, cap_last_cap), "capset")?;
    }
    ctx(
        std::env::set_current_dir(p.cwd()),
        format_args!("chdir to cwd {:?}", p.cwd()),
    )?;
    if nnp {
        ctx(
            rustix::thread::set_no_new_privs(true).map_err(io::Error::from),
            "no_new_privs",
        )?;
        // As late as possible: only execve follows.
        if let Some(f) = &prepared.seccomp {
            ctx(f.install(), "seccomp")?;
        }
    }
    let argv = sys::ptr_array(&prepared.argv);
    let envp = sys::ptr_array(&prepared.envp);
    // execve stays with libc: rustix's is unsafe too.
    // SAFETY: exe, argv and envp are NUL-terminated strings and
    // NULL-terminated arrays that outlive the call.
    unsafe { libc::execve(prepared.exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    ctx(
        Err(io::Error::last_os_error()),
        format_args!("exec {:?}", prepared.exe),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_lookup() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_string()];
        assert!(look_path("sh", &env).unwrap().ends_with("sh"));
        let e = look_path("no-such-program-husk", &env).unwrap_err();
        assert!(e.to_string().contains("not found in $PATH"), "{e}");
        assert!(look_path("/nonexistent/x", &env).is_err());
    }
}
