//! The debug console: processes in the guest itself, outside any container,
//! that an operator on the host starts with `husk exec` (ExecGuest).
//!
//! This module owns the gate, the table of those processes and what they
//! run as. The gate is closed until CreateSandbox opens it with
//! `debug_console` (the host's configuration decides; a caller that skips
//! the shim cannot open it after the shim's CreateSandbox, which comes
//! first and happens once). The table holds at most [`MAX_PROCESSES`]
//! processes; one that has exited stays (its output may still be read to
//! the end after its WaitProcess returned, and its status waited again)
//! until a new one needs the room. They run as
//! root with every capability the agent has, in its namespaces, in a cgroup
//! of their own ([`CGROUP`]) below the agent's containers' root, which
//! DestroySandbox kills.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use husk_protocols::agent::ExecGuestRequest;
use oci_spec::runtime::Process as OciProcess;

use crate::container::Process;
use crate::error::{AgentError, Result};
use crate::reaper::Reaper;

/// Debug processes alive at once.
pub const MAX_PROCESSES: usize = 4;
/// Most arguments, and most environment entries, of one.
pub const MAX_ARGS: usize = 1024;
/// Their cgroup's name: not a valid container id (those start with a
/// letter or digit), so never a container's.
pub const CGROUP: &str = "_debug";
/// The PATH a debug process gets when the request gives none (runc's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The gate and the table.
#[derive(Default)]
pub struct DebugConsole {
    enabled: AtomicBool,
    processes: Mutex<HashMap<String, Arc<Process>>>,
    /// Serialises ExecGuest, so that a slot is checked and taken at once
    /// without holding the table through a process's set-up.
    pub starting: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DebugConsole {
    /// Opens the gate (CreateSandbox with debug_console).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// PERMISSION_DENIED unless the gate is open.
    pub fn check_enabled(&self) -> Result<()> {
        if self.enabled.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(AgentError::Denied(
            "the debug console is off in this sandbox (set debug_console = true in the \
             host's husk configuration; it applies to sandboxes created after)"
                .into(),
        ))
    }

    /// Checks that `exec_id` is free and a slot is left; when the table
    /// is full, drops the processes that have exited first (their exits
    /// unclaimed by a WaitProcess are forgotten). An exited process stays
    /// until then, so that its output can be read to the end after its
    /// WaitProcess returned.
    pub fn make_room(&self, reaper: &Reaper, exec_id: &str) -> Result<()> {
        let mut t = lock(&self.processes);
        if t.contains_key(exec_id) {
            return Err(AgentError::Exists(format!("guest exec {exec_id:?}")));
        }
        if t.len() >= MAX_PROCESSES {
            t.retain(|_, p| {
                let alive = reaper.try_exit(p.pid).is_none();
                if !alive {
                    reaper.forget(p.pid);
                }
                alive
            });
        }
        if t.len() >= MAX_PROCESSES {
            return Err(AgentError::Exhausted(format!(
                "{MAX_PROCESSES} debug processes already run in the guest"
            )));
        }
        Ok(())
    }

    /// Adds a started process (its slot was checked under `starting`).
    pub fn insert(&self, exec_id: &str, p: Process) {
        lock(&self.processes).insert(exec_id.to_string(), Arc::new(p));
    }

    pub fn get(&self, exec_id: &str) -> Result<Arc<Process>> {
        lock(&self.processes)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("guest exec {exec_id:?}")))
    }

    pub fn len(&self) -> usize {
        lock(&self.processes).len()
    }
}

/// The OCI process a request runs as, once its input is checked: its
/// args and env, root, cwd "/", PATH and HOME defaulted.
pub fn process(req: &ExecGuestRequest) -> std::result::Result<OciProcess, String> {
    if req.args.is_empty() || req.args.len() > MAX_ARGS {
        return Err(format!("args: 1 to {MAX_ARGS} are needed"));
    }
    if req.env.len() > MAX_ARGS {
        return Err(format!("env: at most {MAX_ARGS} entries"));
    }
    if let Some(i) = req.args.iter().position(|a| a.contains('\0')) {
        return Err(format!("args[{i}] holds a NUL byte"));
    }
    if req.args[0].is_empty() {
        return Err("args[0] is empty".into());
    }
    for (i, e) in req.env.iter().enumerate() {
        let key = e.split_once('=').map(|(k, _)| k);
        if e.contains('\0') || key.is_none_or(str::is_empty) {
            return Err(format!("env[{i}] is not KEY=VALUE"));
        }
    }
    if req.rows > u32::from(u16::MAX) || req.columns > u32::from(u16::MAX) {
        return Err("rows and columns are at most 65535".into());
    }
    let mut env = req.env.clone();
    let has = |env: &[String], k: &str| env.iter().any(|e| e.starts_with(&format!("{k}=")));
    if !has(&env, "PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&env, "HOME") {
        env.push("HOME=/".into());
    }
    let v = serde_json::json!({
        "args": req.args,
        "env": env,
        "cwd": "/",
        "terminal": req.terminal,
        "user": {"uid": 0, "gid": 0},
    });
    serde_json::from_value(v).map_err(|e| format!("process: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(args: &[&str]) -> ExecGuestRequest {
        let mut r = ExecGuestRequest::new();
        r.exec_id = "x".into();
        r.args = args.iter().map(|s| (*s).to_string()).collect();
        r
    }

    #[test]
    fn the_gate_is_closed_until_enabled() {
        let d = DebugConsole::default();
        let e = d.check_enabled().unwrap_err();
        assert!(matches!(e, AgentError::Denied(_)));
        assert!(e.to_string().contains("debug_console = true"), "{e}");
        d.enable();
        d.check_enabled().unwrap();
    }

    #[test]
    fn process_defaults_and_checks() {
        let mut r = req(&["uname", "-r"]);
        r.env = vec!["TERM=xterm".into()];
        r.terminal = true;
        let p = process(&r).unwrap();
        assert_eq!(
            p.args().as_deref(),
            Some(&["uname".into(), "-r".into()][..])
        );
        let env = p.env().clone().unwrap();
        assert!(env.contains(&"TERM=xterm".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin")));
        assert!(env.contains(&"HOME=/".to_string()));
        assert_eq!(p.terminal(), Some(true));
        assert_eq!(p.user().uid(), 0);
        assert_eq!(p.cwd().to_str(), Some("/"));
        assert!(p.capabilities().is_none(), "keeps the agent's capabilities");

        r.env = vec!["PATH=/bin".into()];
        let env = process(&r).unwrap().env().clone().unwrap();
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);

        for (bad, why) in [
            (req(&[]), "args"),
            (req(&[""]), "args[0]"),
            (req(&["sh", "a\0b"]), "args[1]"),
        ] {
            let e = process(&bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let mut r = req(&["sh"]);
        for env in ["NOEQUALS", "=x", "A=\0"] {
            r.env = vec![env.into()];
            assert!(process(&r).unwrap_err().contains("env[0]"), "{env}");
        }
        r.env.clear();
        r.rows = 70_000;
        assert!(process(&r).is_err());
        let many: Vec<&str> = vec!["x"; MAX_ARGS + 1];
        assert!(process(&req(&many)).is_err());
    }
}
