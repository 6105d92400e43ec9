//! The last steps before the container's program runs, in runc's order:
//! session and terminal, rlimits, umask, bounding set, user and groups,
//! capabilities, no_new_privs, working directory, then execve.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxSeccomp, PosixRlimit, Process};

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

fn rlimit_resource(l: &PosixRlimit) -> Option<libc::__rlimit_resource_t> {
    let name = serde_json::to_string(&l.typ()).ok()?;
    Some(match name.trim_matches('"') {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

fn set_rlimits(p: &Process) -> io::Result<()> {
    for l in p.rlimits().iter().flatten() {
        let res = rlimit_resource(l).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("rlimit {:?}", l.typ()))
        })?;
        let lim = libc::rlimit {
            rlim_cur: l.soft(),
            rlim_max: l.hard(),
        };
        // SAFETY: `lim` is a valid rlimit for the call.
        if unsafe { libc::setrlimit(res, &lim) } < 0 {
            return ctx(
                Err(io::Error::last_os_error()),
                format_args!("setrlimit {:?}", l.typ()),
            );
        }
    }
    Ok(())
}

fn set_user(p: &Process) -> io::Result<()> {
    let user = p.user();
    let groups: Vec<libc::gid_t> = user.additional_gids().clone().unwrap_or_default();
    // SAFETY: pointer and length describe `groups`.
    if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } < 0 {
        return ctx(Err(io::Error::last_os_error()), "setgroups");
    }
    let (uid, gid) = (user.uid(), user.gid());
    // SAFETY: integer arguments only.
    if unsafe { libc::setresgid(gid, gid, gid) } < 0 {
        return ctx(Err(io::Error::last_os_error()), "setresgid");
    }
    // Keep the permitted set over the uid change; capset then trims it.
    sys::prctl(libc::PR_SET_KEEPCAPS, 1)?;
    // SAFETY: integer arguments only.
    if unsafe { libc::setresuid(uid, uid, uid) } < 0 {
        return ctx(Err(io::Error::last_os_error()), "setresuid");
    }
    sys::prctl(libc::PR_SET_KEEPCAPS, 0)
}

/// Runs the program; returns only with the error that stopped it.
pub fn finish(p: &Process, prepared: &Prepared, cap_last_cap: u32) -> io::Error {
    match finish_inner(p, prepared, cap_last_cap) {
        Ok(()) => io::Error::other("execve returned"),
        Err(e) => e,
    }
}

fn finish_inner(p: &Process, prepared: &Prepared, cap_last_cap: u32) -> io::Result<()> {
    // SAFETY: setsid takes no arguments. The set-up process is never a
    // group leader (it was forked), so this cannot fail with EPERM.
    if unsafe { libc::setsid() } < 0 {
        return ctx(Err(io::Error::last_os_error()), "setsid");
    }
    if p.terminal() == Some(true) {
        // SAFETY: fd 0 is the terminal the agent gave us.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return ctx(Err(io::Error::last_os_error()), "TIOCSCTTY");
        }
    }
    set_rlimits(p)?;
    if let Some(mask) = p.user().umask() {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(mask as libc::mode_t) };
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
        ctx(sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")?;
        // As late as possible: only execve follows.
        if let Some(f) = &prepared.seccomp {
            ctx(f.install(), "seccomp")?;
        }
    }
    let argv = sys::ptr_array(&prepared.argv);
    let envp = sys::ptr_array(&prepared.envp);
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
