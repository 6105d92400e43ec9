//! The ttrpc face of the agent: each call of `AgentService` forwards to
//! `Agent` and maps its errors onto ttrpc status codes.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use husk_protocols::agent as pb;
use husk_protocols::agent_ttrpc::AgentService;
use husk_protocols::ttrpc::{self, Code, TtrpcContext};

use crate::agent::Agent;
use crate::container::SpawnError;
use crate::entropy::EntropyError;
use crate::error::AgentError;
use crate::network::NetError;

/// What main should do once a call asks the agent to end.
pub enum Shutdown {
    /// DestroySandbox: power the VM off (PID 1) or exit (host tests).
    Destroy,
}

pub struct Service {
    pub agent: Arc<Agent>,
    pub shutdown: std::sync::Mutex<Sender<Shutdown>>,
}

fn status(e: AgentError) -> ttrpc::Error {
    let code = match &e {
        AgentError::Invalid(_) => Code::INVALID_ARGUMENT,
        AgentError::NotFound(_) => Code::NOT_FOUND,
        AgentError::Exists(_) => Code::ALREADY_EXISTS,
        AgentError::State(_) => Code::FAILED_PRECONDITION,
        AgentError::Denied(_) => Code::PERMISSION_DENIED,
        AgentError::Exhausted(_) => Code::RESOURCE_EXHAUSTED,
        // The set-up process refuses what the spec asks and the kernel
        // cannot do (a missing exec, a bad mount): the caller's input.
        AgentError::Spawn(SpawnError::Setup(_)) => Code::INVALID_ARGUMENT,
        // The host's VM has no NIC for an interface of the request.
        AgentError::Network(NetError::NoNic { .. }) => Code::FAILED_PRECONDITION,
        AgentError::Entropy(EntropyError::Size(_)) => Code::INVALID_ARGUMENT,
        AgentError::Spawn(_)
        | AgentError::Cgroup(_)
        | AgentError::Network(_)
        | AgentError::Entropy(_)
        | AgentError::Io { .. } => Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

type R<T> = ttrpc::Result<T>;

fn done(r: Result<(), AgentError>) -> R<pb::Empty> {
    r.map(|()| pb::Empty::new()).map_err(status)
}

impl AgentService for Service {
    fn create_sandbox(&self, _: &TtrpcContext, req: pb::CreateSandboxRequest) -> R<pb::Empty> {
        done(self.agent.create_sandbox(&req))
    }

    fn destroy_sandbox(&self, _: &TtrpcContext, _: pb::DestroySandboxRequest) -> R<pb::Empty> {
        self.agent.destroy_all();
        // Before the answer, which lets the host stop the VM.
        if self.agent.pid1 {
            rustix::fs::sync();
        }
        let tx = self.shutdown.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.send(Shutdown::Destroy);
        Ok(pb::Empty::new())
    }

    fn create_container(&self, _: &TtrpcContext, req: pb::CreateContainerRequest) -> R<pb::Empty> {
        done(self.agent.create_container(&req))
    }

    fn start_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        done(self.agent.start_container(&req.container_id))
    }

    fn remove_container(&self, _: &TtrpcContext, req: pb::RemoveContainerRequest) -> R<pb::Empty> {
        done(self.agent.remove_container(&req.container_id, req.force))
    }

    fn exec_process(&self, _: &TtrpcContext, req: pb::ExecProcessRequest) -> R<pb::Empty> {
        done(self.agent.exec_process(&req))
    }

    fn exec_guest(&self, _: &TtrpcContext, req: pb::ExecGuestRequest) -> R<pb::Empty> {
        done(self.agent.exec_guest(&req))
    }

    fn signal_process(&self, _: &TtrpcContext, req: pb::SignalProcessRequest) -> R<pb::Empty> {
        done(self.agent.signal(&req))
    }

    fn wait_process(
        &self,
        _: &TtrpcContext,
        req: pb::ProcessRequest,
    ) -> R<pb::WaitProcessResponse> {
        let exit = self
            .agent
            .wait(&req.container_id, &req.exec_id)
            .map_err(status)?;
        let mut r = pb::WaitProcessResponse::new();
        r.status = exit.status;
        r.exited_at_unix_nanos = exit
            .at
            .duration_since(UNIX_EPOCH)
            // Saturates in 2262, where i64 nanoseconds end.
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        Ok(r)
    }

    fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: pb::WriteStreamRequest,
    ) -> R<pb::WriteStreamResponse> {
        let n = self.agent.write_stdin(&req).map_err(status)?;
        let mut r = pb::WriteStreamResponse::new();
        // n is at most the request's data, which ttrpc caps at 4 MiB.
        r.len = u32::try_from(n).map_err(|_| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::INTERNAL,
                format!("wrote {n} bytes, over a u32"),
            ))
        })?;
        Ok(r)
    }

    fn close_stdin(&self, _: &TtrpcContext, req: pb::ProcessRequest) -> R<pb::Empty> {
        done(self.agent.close_stdin(&req.container_id, &req.exec_id))
    }

    fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> R<pb::ReadStreamResponse> {
        let mut r = pb::ReadStreamResponse::new();
        r.data = self.agent.read(&req, false).map_err(status)?;
        Ok(r)
    }

    fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> R<pb::ReadStreamResponse> {
        let mut r = pb::ReadStreamResponse::new();
        r.data = self.agent.read(&req, true).map_err(status)?;
        Ok(r)
    }

    fn tty_win_resize(&self, _: &TtrpcContext, req: pb::TtyWinResizeRequest) -> R<pb::Empty> {
        done(self.agent.resize(&req))
    }

    fn list_processes(
        &self,
        _: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> R<pb::ListProcessesResponse> {
        let mut r = pb::ListProcessesResponse::new();
        r.pids = self.agent.pids(&req.container_id).map_err(status)?;
        Ok(r)
    }

    fn stats_container(
        &self,
        _: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> R<pb::StatsContainerResponse> {
        self.agent.stats(&req.container_id).map_err(status)
    }

    fn pause_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        done(self.agent.pause(&req.container_id, true))
    }

    fn resume_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        done(self.agent.pause(&req.container_id, false))
    }

    fn update_container(&self, _: &TtrpcContext, req: pb::UpdateContainerRequest) -> R<pb::Empty> {
        done(self.agent.update(&req))
    }

    fn check(&self, _: &TtrpcContext, _: pb::CheckRequest) -> R<pb::HealthCheckResponse> {
        let mut r = pb::HealthCheckResponse::new();
        r.status = pb::health_check_response::ServingStatus::SERVING.into();
        Ok(r)
    }

    fn get_guest_details(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::GuestDetailsResponse> {
        let mut r = pb::GuestDetailsResponse::new();
        r.kernel_release = crate::sys::read_trimmed("/proc/sys/kernel/osrelease");
        r.agent_version = env!("CARGO_PKG_VERSION").to_string();
        r.pid1 = self.agent.pid1;
        Ok(r)
    }

    fn copy_file(&self, _: &TtrpcContext, req: pb::CopyFileRequest) -> R<pb::Empty> {
        done(self.agent.copy_file(&req))
    }

    fn get_oom_event(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::OOMEvent> {
        let mut r = pb::OOMEvent::new();
        r.container_id = self.agent.oom.next();
        Ok(r)
    }

    fn get_mem_info(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::MemInfoResponse> {
        let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::INTERNAL,
                format!("reading /proc/meminfo: {e}"),
            ))
        })?;
        let (total, available) = crate::sys::meminfo(&text);
        let mut r = pb::MemInfoResponse::new();
        r.total_bytes = total;
        r.available_bytes = available;
        Ok(r)
    }
}
