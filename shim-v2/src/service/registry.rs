//! The shim's record of its sandbox and containers: one VM, its containers
//! and their exec processes, looked up by id; exits reported once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::ExitSignal;

use super::error::{Result, ServiceError};
use crate::config::{self, Config};
use crate::events::{Event, Events};
use crate::options;
use crate::process::{Process, State, EXIT_VM_GONE};
use crate::sandbox::Sandbox;
use crate::sync::lock;

/// How long an exiting VM's processes may take to report their own exits
/// (with their output) before they are reported as killed.
const VM_EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

pub struct Container {
    pub bundle: PathBuf,
    pub init: Arc<Process>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub fn exec(&self, exec_id: &str) -> Option<Arc<Process>> {
        lock(&self.execs).get(exec_id).cloned()
    }
}

#[derive(Default)]
pub struct Shared {
    pub sandbox: Option<Arc<Sandbox>>,
    pub containers: HashMap<String, Arc<Container>>,
}

pub struct Inner {
    pub events: Events,
    pub exit: Arc<ExitSignal>,
    /// Serialises Create (it may boot a VM) without blocking the rest.
    pub creating: Mutex<()>,
    /// Set by Shutdown: a Create that boots a VM gives up.
    pub cancel: AtomicBool,
    pub state: Mutex<Shared>,
    config: Mutex<Option<Arc<Config>>>,
}

impl Inner {
    pub fn new(events: Events, exit: Arc<ExitSignal>) -> Inner {
        Inner {
            events,
            exit,
            creating: Mutex::new(()),
            cancel: AtomicBool::new(false),
            state: Mutex::new(Shared::default()),
            config: Mutex::new(None),
        }
    }

    pub fn sandbox(&self) -> Result<Arc<Sandbox>> {
        lock(&self.state)
            .sandbox
            .clone()
            .ok_or_else(|| ServiceError::Precondition("the sandbox's VM is not running".into()))
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.state)
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(format!("container {id:?}")))
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            let p = c.init.clone();
            return Ok((c, p));
        }
        let p = c
            .exec(exec_id)
            .ok_or_else(|| ServiceError::NotFound(format!("exec {exec_id:?} of {id:?}")))?;
        Ok((c, p))
    }

    /// The configuration, read by the first Create.
    pub fn config(&self, options: &MessageField<Any>) -> Result<Arc<Config>> {
        let mut g = lock(&self.config);
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let from_options = options.as_ref().and_then(options::config_path);
        let env = std::env::var(config::ENV_VAR).ok();
        let path = config::choose_path(from_options.as_deref(), env.as_deref());
        let c = Arc::new(config::load(&path)?);
        log::set_max_level(c.log_level);
        log::info!("configuration from {}", path.display());
        *g = Some(c.clone());
        Ok(c)
    }

    /// Every process of the sandbox.
    fn all_processes(&self) -> Vec<Arc<Process>> {
        let st = lock(&self.state);
        let mut out = Vec::new();
        for c in st.containers.values() {
            out.push(c.init.clone());
            out.extend(lock(&c.execs).values().cloned());
        }
        out
    }

    /// Records a process's exit and tells containerd, once.
    pub fn report_exit(&self, p: &Process, status: u32, at: SystemTime) {
        if p.set_exited(status, at) {
            self.events.send(Event::Exit {
                id: p.container_id.clone(),
                exec_id: p.exec_id.clone(),
                pid: p.pid,
                status,
                at,
            });
        }
    }

    /// The VMM ended: every process still running is reported exited.
    pub fn vm_ended(&self, sandbox_id: &str, status: &str, diagnostics: &str) {
        let expected = lock(&self.state).containers.is_empty();
        if expected {
            log::debug!("sandbox {sandbox_id}: the VMM exited ({status})");
            return;
        }
        log::warn!(
            "sandbox {sandbox_id}: the VMM exited ({status}) under running containers{diagnostics}"
        );
        let deadline = Instant::now() + VM_EXIT_GRACE;
        for p in self.all_processes() {
            let left = deadline.saturating_duration_since(Instant::now());
            if matches!(p.state(), State::Running | State::Paused) && p.wait_timeout(left).is_some()
            {
                continue;
            }
            self.report_exit(&p, EXIT_VM_GONE, SystemTime::now());
        }
    }
}
