//! The shim's client of husk-agent (protocols/protos/agent.proto): one ttrpc
//! connection over the VMM's hybrid vsock, a timeout on every call that
//! does not wait for the guest by design, and errors that keep the agent's
//! status code.
//!
//! The guest is untrusted: its error messages are cut to a bounded length
//! and stripped of control characters before they reach a log or an error,
//! and nothing it returns is used as more than a value.
//!
//! Every call is measured where it happens ([`AgentCalls`]): its duration
//! and whether it failed, per method, for the sandbox's metrics file.
//! Calls that wait on the guest's processes by design (WaitProcess,
//! WriteStdin, ReadStdout/ReadStderr, GetOOMEvent) last as long as those
//! processes do, not as long as the agent takes: only their errors count.

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::AgentCalls;
use crate::network::GuestNetwork;
use husk_protocols::agent as pb;
use husk_protocols::agent_ttrpc::AgentServiceClient;
use husk_protocols::ttrpc::{self, context, Code};

/// Longest text taken from the guest into an error or a log line.
const MAX_GUEST_TEXT: usize = 512;
/// Bytes asked for by each ReadStdout/ReadStderr.
pub const READ_CHUNK: u32 = 64 * 1024;
/// CopyFile chunk (ttrpc messages are at most 4 MiB).
pub const COPY_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with an error status.
    #[error("agent {call}: {message}")]
    Rpc {
        call: &'static str,
        code: Code,
        message: String,
    },
    /// The request did not get an answer: timeout, connection lost.
    #[error("agent {call}: {message}")]
    Transport { call: &'static str, message: String },
    /// The host's getrandom(2) failed: no entropy for the guest, and a
    /// guest restored from a template must not start without it.
    #[error("the guest's entropy from getrandom: {0}")]
    Entropy(#[source] std::io::Error),
}

impl AgentError {
    pub fn code(&self) -> Option<Code> {
        match self {
            AgentError::Rpc { code, .. } => Some(*code),
            AgentError::Transport { .. } | AgentError::Entropy(_) => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NOT_FOUND)
    }
}

/// Text from the guest made safe to log: at most [`MAX_GUEST_TEXT`] bytes,
/// control characters replaced.
pub fn sanitize(text: &str) -> String {
    husk_protocols::text::sanitize(text, MAX_GUEST_TEXT)
}

fn map_err(call: &'static str) -> impl FnOnce(ttrpc::Error) -> AgentError {
    move |e| match e {
        ttrpc::Error::RpcStatus(s) => AgentError::Rpc {
            call,
            code: s.code(),
            message: sanitize(s.message()),
        },
        other => AgentError::Transport {
            call,
            message: sanitize(&other.to_string()),
        },
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// A connection to the agent. Cloning shares the connection.
/// Which namespaces of the pod's first container a container joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodJoin {
    /// Its own (not a pod container).
    Nothing,
    /// Network, IPC and UTS, as every Kubernetes pod shares.
    Shared,
    /// Those and the PID namespace (shareProcessNamespace).
    WithPid,
}

/// Where a container's root file system is for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRootfs {
    /// An erofs image on the disk of this virtio-blk serial.
    Disk(String),
    /// The container's folder in the shared folder.
    Shared,
}

#[derive(Clone)]
pub struct Agent {
    client: AgentServiceClient,
    timeout: Duration,
    calls: Arc<AgentCalls>,
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Agent {
    /// Takes over a connected stream; `timeout` bounds every call that is
    /// not a wait by design.
    pub fn new(stream: UnixStream, timeout: Duration) -> Result<Agent> {
        let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(map_err("connect"))?;
        Ok(Agent {
            client: AgentServiceClient::new(client),
            timeout,
            calls: Arc::default(),
        })
    }

    /// The durations and errors of this connection's calls.
    pub fn calls(&self) -> &AgentCalls {
        &self.calls
    }

    /// Makes call `name`, recording its duration and outcome.
    fn timed<T>(&self, name: &'static str, f: impl FnOnce() -> ttrpc::Result<T>) -> Result<T> {
        let start = Instant::now();
        let r = f();
        let took = start.elapsed();
        log::debug!(
            "agent {name}: {} ms{}",
            took.as_millis(),
            if r.is_ok() { "" } else { ", failed" }
        );
        self.calls.record(name, took, r.is_ok());
        r.map_err(map_err(name))
    }

    /// Makes call `name`, which waits on the guest by design: only a
    /// failure is recorded.
    fn waited<T>(&self, name: &'static str, f: impl FnOnce() -> ttrpc::Result<T>) -> Result<T> {
        let r = f();
        if r.is_err() {
            self.calls.failed(name);
        }
        r.map_err(map_err(name))
    }

    fn ctx(&self) -> context::Context {
        context::with_timeout(nanos(self.timeout))
    }

    /// No timeout: for calls that wait on the guest's processes.
    fn wait_ctx() -> context::Context {
        context::with_timeout(0)
    }

    /// The health check, with its own timeout (used while the VM boots).
    pub fn check(&self, timeout: Duration) -> Result<bool> {
        let r = self.timed("Check", || {
            self.client.check(
                context::with_timeout(nanos(timeout)),
                &pb::CheckRequest::new(),
            )
        })?;
        Ok(r.status.value() == pb::health_check_response::ServingStatus::SERVING as i32)
    }

    /// (kernel release, agent version), sanitized.
    pub fn guest_details(&self) -> Result<(String, String)> {
        let r = self.timed("GetGuestDetails", || {
            self.client.get_guest_details(self.ctx(), &pb::Empty::new())
        })?;
        Ok((sanitize(&r.kernel_release), sanitize(&r.agent_version)))
    }

    /// Sets the sandbox up in the guest: fresh entropy from the host's
    /// getrandom (so that VMs restored from one snapshot do not share
    /// their random numbers), hostname, clock, given one the pod network,
    /// with `shared_fs` the shared folder's mount, and with
    /// `debug_console` the agent's leave for `husk exec` (ExecGuest).
    /// The interfaces' `device_mac` stays empty: the NICs have the pod's
    /// MACs.
    pub fn create_sandbox(
        &self,
        sandbox_id: &str,
        hostname: &str,
        network: Option<&GuestNetwork>,
        shared_fs: bool,
        debug_console: bool,
    ) -> Result<()> {
        let mut r = pb::CreateSandboxRequest::new();
        r.debug_console = debug_console;
        if shared_fs {
            let mut fs = pb::SharedFs::new();
            fs.tag = husk_protocols::guest::SHARED_FS_TAG.into();
            r.shared_fs = Some(fs).into();
        }
        r.sandbox_id = sandbox_id.into();
        r.hostname = hostname.into();
        if let Some(n) = network {
            r.interfaces = n.interfaces.clone();
            r.routes = n.routes.clone();
            r.neighbors = n.neighbors.clone();
        }
        let mut entropy = vec![0u8; husk_protocols::guest::ENTROPY_SENT];
        let n = rustix::rand::getrandom(&mut entropy[..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| AgentError::Entropy(e.into()))?;
        if n != entropy.len() {
            return Err(AgentError::Entropy(std::io::Error::other(format!(
                "{n} of {} bytes",
                entropy.len()
            ))));
        }
        r.entropy = entropy;
        r.clock_unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, nanos);
        self.timed("CreateSandbox", || {
            self.client.create_sandbox(self.ctx(), &r)
        })?;
        Ok(())
    }

    /// Ends the guest's containers and syncs its file systems; the guest
    /// then powers the VM off (the VMM exits), unless the host stops it
    /// first.
    pub fn destroy_sandbox(&self, timeout: Duration) -> Result<()> {
        self.timed("DestroySandbox", || {
            self.client.destroy_sandbox(
                context::with_timeout(nanos(timeout)),
                &pb::DestroySandboxRequest::new(),
            )
        })?;
        Ok(())
    }

    /// Creates a container on `rootfs`; `join` says which of the pod's
    /// namespaces it joins.
    pub fn create_container(
        &self,
        id: &str,
        spec_json: Vec<u8>,
        join: PodJoin,
        rootfs: &GuestRootfs,
    ) -> Result<()> {
        let mut r = pb::CreateContainerRequest::new();
        r.container_id = id.into();
        r.oci_spec_json = spec_json;
        r.join_sandbox_namespaces = join != PodJoin::Nothing;
        r.join_sandbox_pid_namespace = join == PodJoin::WithPid;
        match rootfs {
            GuestRootfs::Disk(serial) => {
                let mut s = pb::Storage::new();
                s.serial = serial.clone();
                s.fstype = "erofs".into();
                r.set_rootfs_storage(s);
            }
            GuestRootfs::Shared => r.set_rootfs_shared(pb::SharedRootfs::new()),
        }
        self.timed("CreateContainer", || {
            self.client.create_container(self.ctx(), &r)
        })?;
        Ok(())
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let mut r = pb::ContainerRequest::new();
        r.container_id = id.into();
        self.timed("StartContainer", || {
            self.client.start_container(self.ctx(), &r)
        })?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let mut r = pb::RemoveContainerRequest::new();
        r.container_id = id.into();
        r.force = true;
        self.timed("RemoveContainer", || {
            self.client.remove_container(self.ctx(), &r)
        })?;
        Ok(())
    }

    pub fn exec_process(&self, id: &str, exec_id: &str, process_json: Vec<u8>) -> Result<()> {
        let mut r = pb::ExecProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.process_json = process_json;
        self.timed("ExecProcess", || self.client.exec_process(self.ctx(), &r))?;
        Ok(())
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let mut r = pb::SignalProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.signal = signal;
        r.all = all;
        self.timed("SignalProcess", || {
            self.client.signal_process(self.ctx(), &r)
        })?;
        Ok(())
    }

    fn process_request(id: &str, exec_id: &str) -> pb::ProcessRequest {
        let mut r = pb::ProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r
    }

    /// Waits (without limit) for a process to exit; its raw status.
    pub fn wait_process(&self, id: &str, exec_id: &str) -> Result<i32> {
        let r = self.waited("WaitProcess", || {
            self.client
                .wait_process(Self::wait_ctx(), &Self::process_request(id, exec_id))
        })?;
        Ok(r.status)
    }

    /// Writes to stdin; how many bytes the agent took (never more than
    /// given, whatever the guest says).
    pub fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        let mut r = pb::WriteStreamRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.data = data.to_vec();
        let resp = self.waited("WriteStdin", || {
            self.client.write_stdin(Self::wait_ctx(), &r)
        })?;
        Ok((resp.len as usize).min(data.len()))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.timed("CloseStdin", || {
            self.client
                .close_stdin(self.ctx(), &Self::process_request(id, exec_id))
        })?;
        Ok(())
    }

    /// Reads some output (blocking); empty at the end of the stream. At
    /// most [`READ_CHUNK`] bytes are kept, whatever the guest sends.
    pub fn read(&self, id: &str, exec_id: &str, stderr: bool) -> Result<Vec<u8>> {
        let mut r = pb::ReadStreamRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.len = READ_CHUNK;
        let mut data = if stderr {
            self.waited("ReadStderr", || {
                self.client.read_stderr(Self::wait_ctx(), &r)
            })?
            .data
        } else {
            self.waited("ReadStdout", || {
                self.client.read_stdout(Self::wait_ctx(), &r)
            })?
            .data
        };
        data.truncate(READ_CHUNK as usize);
        Ok(data)
    }

    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let mut r = pb::TtyWinResizeRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.row = rows;
        r.column = cols;
        self.timed("TtyWinResize", || {
            self.client.tty_win_resize(self.ctx(), &r)
        })?;
        Ok(())
    }

    fn container_request(id: &str) -> pb::ContainerRequest {
        let mut r = pb::ContainerRequest::new();
        r.container_id = id.into();
        r
    }

    /// Guest pids of the container's processes (positive values only, at
    /// most 65536 of them).
    pub fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let r = self.timed("ListProcesses", || {
            self.client
                .list_processes(self.ctx(), &Self::container_request(id))
        })?;
        Ok(r.pids
            .iter()
            .filter_map(|&p| u32::try_from(p).ok().filter(|&p| p > 0))
            .take(65536)
            .collect())
    }

    pub fn stats(&self, id: &str) -> Result<pb::StatsContainerResponse> {
        self.timed("StatsContainer", || {
            self.client
                .stats_container(self.ctx(), &Self::container_request(id))
        })
    }

    pub fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let r = Self::container_request(id);
        if pause {
            self.timed("PauseContainer", || {
                self.client.pause_container(self.ctx(), &r)
            })?;
        } else {
            self.timed("ResumeContainer", || {
                self.client.resume_container(self.ctx(), &r)
            })?;
        }
        Ok(())
    }

    pub fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let mut r = pb::UpdateContainerRequest::new();
        r.container_id = id.into();
        r.resources_json = resources_json;
        self.timed("UpdateContainer", || {
            self.client.update_container(self.ctx(), &r)
        })?;
        Ok(())
    }

    /// Writes a whole file into the guest, in chunks.
    pub fn copy_file(&self, path: &str, data: &[u8], mode: u32, uid: u32, gid: u32) -> Result<()> {
        let size = i64::try_from(data.len()).unwrap_or(i64::MAX);
        let mut offset = 0usize;
        loop {
            let end = (offset + COPY_CHUNK).min(data.len());
            let mut r = pb::CopyFileRequest::new();
            r.path = path.into();
            r.file_size = size;
            r.file_mode = mode & 0o7777;
            r.uid = uid;
            r.gid = gid;
            r.offset = i64::try_from(offset).unwrap_or(i64::MAX);
            r.data = data[offset..end].to_vec();
            self.timed("CopyFile", || self.client.copy_file(self.ctx(), &r))?;
            offset = end;
            if offset >= data.len() {
                return Ok(());
            }
        }
    }

    /// Blocks until a container of the guest records an OOM kill.
    pub fn oom_event(&self) -> Result<String> {
        let r = self.waited("GetOOMEvent", || {
            self.client
                .get_oom_event(Self::wait_ctx(), &pb::Empty::new())
        })?;
        Ok(r.container_id)
    }

    /// The guest's (MemTotal, MemAvailable) in bytes, as the guest says:
    /// the caller bounds them.
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        let r = self.timed("GetMemInfo", || {
            self.client.get_mem_info(self.ctx(), &pb::Empty::new())
        })?;
        Ok((r.total_bytes, r.available_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_is_bounded_and_clean() {
        assert_eq!(sanitize("a\nb\x1b[31mc"), "a b [31mc");
        let long = "x".repeat(10_000);
        let s = sanitize(&long);
        assert!(s.len() <= MAX_GUEST_TEXT + 3);
        assert!(s.ends_with("..."));
        // Multi-byte characters are not cut in half.
        let s = sanitize(&"é".repeat(1000));
        assert!(s.is_char_boundary(s.len()));
    }

    #[test]
    fn errors_keep_the_code() {
        let e = map_err("X")(ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::NOT_FOUND,
            "container \"a\" not found",
        )));
        assert!(e.is_not_found());
        assert_eq!(e.to_string(), "agent X: container \"a\" not found");
        let e = map_err("Y")(ttrpc::Error::Socket("broken pipe".into()));
        assert_eq!(e.code(), None);
    }
}
