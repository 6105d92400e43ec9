//! containerd's task API (shim v2) over husk sandboxes: the ttrpc layer
//! (every call of the `Task` service) and the calls too small for a module
//! of their own. Create is [`create`], the registry of containers
//! [`registry`], the threads watching the guest [`watch`] (whose events
//! [`coalesce`] bounds), Stats [`stats`].
//!
//! One shim process serves one sandbox: a container alone in its VM, or a
//! Kubernetes pod (its sandbox container first, then the pod's containers,
//! which join its VM). The VM goes when its last container is deleted.

mod coalesce;
mod create;
mod error;
mod registry;
mod stats;
mod watch;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};

use error::{Result, ServiceError};
use registry::{Container, Inner};

use crate::events::{timestamp, Event, Events};
use crate::io::{Pumps, StdioPaths};
use crate::marker;
use crate::process::{Exit, Process, State, EXIT_VM_GONE};
use crate::spec;
use crate::sync::lock;

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(events: Events, exit: Arc<ExitSignal>) -> Service {
        Service {
            inner: Arc::new(Inner::new(events, exit)),
        }
    }

    fn do_create(&self, req: &api::CreateTaskRequest) -> Result<u32> {
        self.inner.create(req)
    }

    fn do_start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let inner = &self.inner;
        let (_c, p) = inner.process(id, exec_id)?;
        let sb = inner.sandbox()?;
        let _starting = lock(&p.starting);
        if p.state() != State::Created {
            return Err(ServiceError::Precondition(format!(
                "process {id}/{exec_id} is {:?}, not created",
                p.state()
            )));
        }
        if exec_id.is_empty() {
            sb.agent.start_container(id)?;
            p.transition(State::Created, State::Running);
            inner.events.send(Event::Start {
                id: id.to_string(),
                pid: p.pid,
            });
        } else {
            let spec = lock(&p.spec).take().unwrap_or_default();
            if let Err(e) = sb.agent.exec_process(id, exec_id, spec) {
                // It will never run: a Wait on it must return (and the
                // shim's ttrpc server, which waits for its calls at exit).
                inner.report_exit(&p, EXIT_VM_GONE, SystemTime::now());
                return Err(e.into());
            }
            match Pumps::start(&sb.agent, id, exec_id, &p.stdio) {
                Ok(pumps) => p.set_pumps(pumps),
                Err(e) => {
                    let _ = sb.agent.signal(id, exec_id, libc::SIGKILL as u32, false);
                    watch::spawn_waiter(inner.clone(), sb, p.clone());
                    return Err(e.into());
                }
            }
            p.transition(State::Created, State::Running);
            watch::spawn_waiter(inner.clone(), sb, p.clone());
            inner.events.send(Event::ExecStarted {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
                pid: p.pid,
            });
        }
        Ok(p.pid)
    }

    fn do_exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        let inner = &self.inner;
        let c = inner.container(&req.id)?;
        spec::check_id("exec", &req.exec_id)?;
        if !matches!(c.init.state(), State::Running | State::Paused) {
            return Err(ServiceError::Precondition(format!(
                "container {} is not running",
                req.id
            )));
        }
        let any = req
            .spec
            .as_ref()
            .ok_or_else(|| ServiceError::Invalid("exec without a process spec".into()))?;
        let mut process: serde_json::Value = serde_json::from_slice(&any.value)
            .map_err(|e| ServiceError::Invalid(format!("exec process spec: {e}")))?;
        if let Some(o) = process.as_object_mut() {
            o.insert("terminal".into(), serde_json::Value::Bool(req.terminal));
        }
        let json =
            serde_json::to_vec(&process).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let p = Arc::new(Process::new(
            &req.id,
            &req.exec_id,
            c.init.pid,
            StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        ));
        *lock(&p.spec) = Some(json);
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(ServiceError::Exists(format!("exec {:?}", req.exec_id)));
            }
            execs.insert(req.exec_id.clone(), p);
        }
        inner.events.send(Event::ExecAdded {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
        });
        Ok(())
    }

    fn do_kill(&self, req: &api::KillRequest) -> Result<()> {
        let inner = &self.inner;
        let (_c, p) = inner.process(&req.id, &req.exec_id)?;
        let finished = || ServiceError::NotFound("process already finished".into());
        if p.exit().is_some() {
            return Err(finished());
        }
        let sb = inner.sandbox()?;
        if sb.is_dead() {
            return Err(finished());
        }
        match sb.agent.signal(&req.id, &req.exec_id, req.signal, req.all) {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(Code::FAILED_PRECONDITION) => Err(finished()),
            Err(e) => Err(e.into()),
        }
    }

    fn do_delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse> {
        let inner = &self.inner;
        let (c, p) = inner.process(&req.id, &req.exec_id)?;
        if matches!(p.state(), State::Running | State::Paused) {
            return Err(ServiceError::Precondition(format!(
                "process {}/{} is running; kill it first",
                req.id, req.exec_id
            )));
        }
        let sb = lock(&inner.state).sandbox.clone();
        let response = |e: Exit| api::DeleteResponse {
            pid: p.pid,
            exit_status: e.status,
            exited_at: Some(timestamp(e.at)).into(),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            p.stop_io();
            lock(&c.execs).remove(&req.exec_id);
            // A deleted exec that never ran: its waiters return.
            p.set_exited(0, SystemTime::now());
            let exit = p.exit().unwrap_or(Exit {
                status: 0,
                at: SystemTime::now(),
            });
            return Ok(response(exit));
        }
        if let Some(sb) = sb.as_ref() {
            sb.release(&req.id);
        }
        if let Some(sb) = sb.as_ref().filter(|sb| !sb.is_dead()) {
            if let Err(e) = sb.agent.remove_container(&req.id) {
                if !e.is_not_found() {
                    log::warn!("container {}: {e}", req.id);
                }
            }
        }
        // Its shared folder, then the snapshot a shared rootfs kept
        // mounted (nothing there with a block rootfs).
        if let Some(sb) = sb.as_ref() {
            sb.unshare_container(&req.id);
        }
        if let Err(e) = crate::rootfs::unmount(&crate::rootfs::bundle_rootfs(&c.bundle)) {
            log::warn!("container {}: {e}", req.id);
        }
        // A created container's init dies with RemoveContainer; its waiter
        // reports that.
        let exit = p.wait_timeout(Duration::from_secs(5)).unwrap_or_else(|| {
            inner.report_exit(&p, EXIT_VM_GONE, SystemTime::now());
            p.exit().unwrap_or(Exit {
                status: EXIT_VM_GONE,
                at: SystemTime::now(),
            })
        });
        p.stop_io();
        for e in lock(&c.execs).drain().map(|(_, e)| e) {
            e.stop_io();
        }
        marker::remove(&c.bundle);
        let last = {
            let mut st = lock(&inner.state);
            st.containers.remove(&req.id);
            if st.containers.is_empty() {
                st.sandbox.take()
            } else {
                None
            }
        };
        inner.events.send(Event::Delete {
            id: req.id.clone(),
            pid: p.pid,
            status: exit.status,
            at: exit.at,
        });
        if let Some(sb) = last {
            sb.destroy();
        }
        log::info!("container {} deleted", req.id);
        Ok(response(exit))
    }

    fn do_pause(&self, id: &str, pause: bool) -> Result<()> {
        let inner = &self.inner;
        let (_c, p) = inner.process(id, "")?;
        let (from, to) = if pause {
            (State::Running, State::Paused)
        } else {
            (State::Paused, State::Running)
        };
        if p.state() != from {
            return Err(ServiceError::Precondition(format!(
                "container {id} is {:?}",
                p.state()
            )));
        }
        inner.sandbox()?.agent.pause(id, pause)?;
        p.transition(from, to);
        inner.events.send(if pause {
            Event::Paused { id: id.into() }
        } else {
            Event::Resumed { id: id.into() }
        });
        Ok(())
    }

    fn do_stats(&self, id: &str) -> Result<Any> {
        self.inner.container(id)?;
        stats::to_metrics(&self.inner.sandbox()?.agent.stats(id)?)
    }

    fn teardown(&self) {
        let sb = lock(&self.inner.state).sandbox.take();
        if let Some(sb) = sb {
            sb.destroy();
        }
    }
}

fn state_response(c: &Container, p: &Process) -> api::StateResponse {
    let exit = p.exit();
    api::StateResponse {
        id: if p.exec_id.is_empty() {
            p.container_id.clone()
        } else {
            p.exec_id.clone()
        },
        bundle: c.bundle.display().to_string(),
        pid: p.pid,
        status: p.state().to_proto().into(),
        stdin: p.stdio.stdin.clone(),
        stdout: p.stdio.stdout.clone(),
        stderr: p.stdio.stderr.clone(),
        terminal: p.stdio.terminal,
        exit_status: exit.map_or(0, |e| e.status),
        exited_at: exit.map(|e| timestamp(e.at)).into(),
        exec_id: p.exec_id.clone(),
        ..Default::default()
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.do_create(&req)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.do_start(&req.id, &req.exec_id)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (c, p) = self.inner.process(&req.id, &req.exec_id)?;
        Ok(state_response(&c, &p))
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.do_delete(&req)?)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        self.inner.container(&req.id)?;
        let sb = self.inner.sandbox()?;
        let pids = sb.agent.pids(&req.id).map_err(ServiceError::from)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.do_pause(&req.id, true)?;
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.do_pause(&req.id, false)?;
        Ok(api::Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(ServiceError::Unsupported("checkpoint").into())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.do_kill(&req)?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        self.do_exec(&req)?;
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.inner.process(&req.id, &req.exec_id)?;
        let sb = self.inner.sandbox()?;
        sb.agent
            .resize(&req.id, &req.exec_id, req.height, req.width)
            .map_err(ServiceError::from)?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let (_c, p) = self.inner.process(&req.id, &req.exec_id)?;
        if req.stdin {
            p.close_stdin();
        }
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        self.inner.container(&req.id)?;
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| ServiceError::Invalid("update without resources".into()))?;
        let sb = self.inner.sandbox()?;
        sb.agent
            .update(&req.id, any.value.clone())
            .map_err(ServiceError::from)?;
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (_c, p) = self.inner.process(&req.id, &req.exec_id)?;
        let e = p.wait();
        Ok(api::WaitResponse {
            exit_status: e.status,
            exited_at: Some(timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let any = self.do_stats(&req.id)?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = lock(&self.inner.state)
            .sandbox
            .as_ref()
            .map_or(0, |s| s.vmm_pid());
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: format!("husk {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let busy = !lock(&self.inner.state).containers.is_empty();
        if busy && !req.now {
            return Ok(api::Empty::new());
        }
        // A Create still booting a VM (containerd gave up on it) stops and
        // cleans up before the shim exits.
        self.inner.cancel.store(true, Ordering::SeqCst);
        let creating = lock(&self.inner.creating);
        let busy = !lock(&self.inner.state).containers.is_empty();
        if busy && !req.now {
            self.inner.cancel.store(false, Ordering::SeqCst);
            return Ok(api::Empty::new());
        }
        drop(creating);
        self.teardown();
        log::info!("shim shutting down");
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}
