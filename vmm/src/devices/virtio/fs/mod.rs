//! virtio-fs (device type 26) served by a vhost-user backend (virtiofsd).
//!
//! The VMM owns the device's face to the guest: the virtio-mmio transport,
//! feature negotiation and the config space (the tag the guest mounts by
//! and the number of request queues). The requests themselves go straight
//! to the backend: on DRIVER_OK the event loop hands it guest memory (a
//! shared memfd) and the queues ([`backend`]); the guest's queue notify
//! writes are KVM ioeventfds the backend reads, and the backend's "used
//! buffers" eventfds come back to the event loop, which raises the
//! device's interrupt with its status bit set, as virtio-mmio requires.
//!
//! The backend must be listening when the VMM starts: the VMM connects
//! while it builds the VM and fails, naming the socket, if it cannot. If
//! the backend dies later (its socket hangs up, or it stops answering),
//! the VMM logs it once, keeps running, and answers every request from
//! then on itself with EIO ([`fuse_error`]), starting where the used ring
//! stands, so the guest sees I/O errors rather than a hang. That resumes
//! correctly when the backend completed requests in order (virtiofsd does
//! with its default thread pool size of 0); requests it had finished out of
//! order could be answered twice.
//!
//! A jailed VMM (shim-v2's `sandbox/jail.rs`) connects from inside its
//! jail, as the jail's user: the socket must lie in the jail's writable
//! `/run` (`<state folder>/run` on the host) and be connectable by that
//! user (connect(2) needs write permission on the socket file; virtiofsd
//! makes it root's, mode 0700, so the shim chowns it, or binds it itself
//! and hands virtiofsd the listening fd with `--fd`). The VMM connects once,
//! while it builds the VM; virtiofsd serves that one connection and exits
//! when the VMM closes it.

pub mod backend;
pub mod fuse_error;
#[cfg(test)]
mod tests;

use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{error, info, warn};
use virtio_queue::QueueT;

use crate::guest_warn;
use husk_vm_config::control::GuestFaultKind;
use husk_vm_config::FsConfig;

use super::{DeviceEvent, DeviceState, VirtioDevice, INT_VRING};
use backend::{Backend, BackendError};

/// Virtio device type of a file system device (virtio 1.2, 5.11).
pub const TYPE_FS: u32 = 26;
/// Bytes of the config space's tag.
pub const TAG_LEN: usize = 36;
/// The config space: tag[36], num_request_queues (le32).
pub const CONFIG_LEN: usize = TAG_LEN + 4;
/// The error every request gets once the backend is gone.
pub const BACKEND_GONE_ERRNO: i32 = libc::EIO;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("creating the activation eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("tag {0:?} is empty or longer than {TAG_LEN} bytes")]
    Tag(String),
}

/// The config space for `tag` and `num_request_queues`.
pub fn config_space(tag: &str, num_request_queues: u16) -> Result<Vec<u8>, FsError> {
    if tag.is_empty() || tag.len() > TAG_LEN {
        return Err(FsError::Tag(tag.to_string()));
    }
    let mut config = vec![0u8; CONFIG_LEN];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[TAG_LEN..].copy_from_slice(&u32::from(num_request_queues).to_le_bytes());
    Ok(config)
}

/// Counters for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// Activations the backend took.
    pub backend_starts: u64,
    /// Interrupts raised for the backend's used buffers.
    pub backend_calls: u64,
    /// Requests the VMM answered with EIO after the backend went away.
    pub error_answers: u64,
}

/// A virtio-fs device. See the module docs.
pub struct Fs {
    state: DeviceState,
    tag: String,
    socket: PathBuf,
    /// None once the backend is gone: the VMM answers requests itself.
    backend: Option<Backend>,
    stats: FsStats,
}

impl Fs {
    /// Connects to the backend at `config.socket` and sets the device up
    /// with one high-priority queue and `config.num_request_queues` request
    /// queues of `config.queue_size`.
    pub fn new(config: &FsConfig) -> Result<Fs, FsError> {
        let num_queues = 1 + usize::from(config.num_request_queues);
        let backend = Backend::connect(&config.socket, num_queues)?;
        let config_space = config_space(&config.tag, config.num_request_queues)?;
        let sizes = vec![config.queue_size; num_queues];
        // VIRTIO_F_VERSION_1 is added by the state, and required of the backend.
        let state = DeviceState::new("virtio-fs", TYPE_FS, &sizes, backend.guest_features())
            .map_err(FsError::EventFd)?
            .with_config(config_space)
            .with_external_queues();
        info!(
            tag = %config.tag,
            socket = %config.socket.display(),
            queues = num_queues,
            "virtio-fs: connected to the vhost-user backend"
        );
        Ok(Fs {
            state,
            tag: config.tag.clone(),
            socket: config.socket.clone(),
            backend: Some(backend),
            stats: FsStats::default(),
        })
    }

    pub fn stats(&self) -> FsStats {
        self.stats
    }

    /// Whether the backend is still serving the device.
    pub fn backend_alive(&self) -> bool {
        self.backend.is_some()
    }

    /// Event loop caught up with an activation: hand the queues to the
    /// backend, or answer them here if it is gone.
    fn start_backend(&mut self, ops: &mut EventOps) {
        self.stop_backend(ops);
        let acked = self.state.acked_features();
        let result = match (self.backend.as_mut(), self.state.active()) {
            (Some(backend), Some(active)) => backend.start(&active.mem, acked, &active.queues),
            _ => return self.fail_over(ops),
        };
        match result {
            Ok(()) => self.stats.backend_starts += 1,
            Err(e) => self.backend_gone(ops, &e.to_string()),
        }
    }

    /// Takes the rings back from the backend after a reset.
    fn stop_backend(&mut self, ops: &mut EventOps) {
        let num_queues = self.state.queue_max_sizes().len();
        let Some(backend) = self.backend.as_mut().filter(|b| b.is_running()) else {
            return;
        };
        if let Err(e) = backend.stop(num_queues) {
            self.backend_gone(ops, &e.to_string());
        }
    }

    /// The backend died or misbehaved: forget it, say so once, and serve
    /// the queues here from now on.
    fn backend_gone(&mut self, ops: &mut EventOps, why: &str) {
        let Some(backend) = self.backend.take() else {
            return;
        };
        error!(
            tag = %self.tag,
            socket = %self.socket.display(),
            "virtio-fs: the vhost-user backend is gone ({why}); the guest's requests now fail with EIO"
        );
        for fd in std::iter::once(backend.as_raw_fd())
            .chain(backend.calls().iter().map(AsRawFd::as_raw_fd))
        {
            if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                warn!(error = ?e, "virtio-fs: unregistering a backend fd");
            }
        }
        drop(backend);
        self.fail_over(ops);
    }

    /// Serves the active queues with errors from where the used rings stand.
    fn fail_over(&mut self, ops: &mut EventOps) {
        let Some(active) = self.state.active_mut() else {
            return;
        };
        for (index, q) in active.queues.iter_mut().enumerate() {
            match q.queue.used_idx(&active.mem, Ordering::Acquire) {
                Ok(used) => {
                    q.queue.set_next_avail(used.0);
                    q.queue.set_next_used(used.0);
                }
                Err(e) => guest_warn!(
                    GuestFaultKind::Queue,
                    index,
                    error = %e,
                    "virtio-fs: reading the used index"
                ),
            }
        }
        self.state.watch_queues(ops);
        for index in 0..self.state.queue_max_sizes().len() {
            self.answer_with_errors(index);
        }
    }

    /// Fails every available request of queue `index` with EIO.
    pub fn answer_with_errors(&mut self, index: usize) {
        let mut answered = 0u64;
        self.state.process_queue(index, |chain, mem| {
            answered += 1;
            fuse_error::answer(chain, mem, BACKEND_GONE_ERRNO)
        });
        self.stats.error_answers += answered;
    }

    /// The backend signalled used buffers on the call eventfd `fd`.
    fn backend_call(&mut self, fd: i32) -> bool {
        let Some(backend) = self.backend.as_ref() else {
            return false;
        };
        let Some(call) = backend.calls().iter().find(|c| c.as_raw_fd() == fd) else {
            return false;
        };
        if call.read().is_err() {
            return true;
        }
        if let Some(active) = self.state.active() {
            self.stats.backend_calls += 1;
            if let Err(e) = active.irq.trigger(INT_VRING) {
                error!(error = %e, "virtio-fs: raising the queue interrupt");
            }
        }
        true
    }
}

impl VirtioDevice for Fs {
    fn state(&self) -> &DeviceState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }

    /// Only a device the guest has not used yet: not activated, or active
    /// with every queue's avail and used index still 0 in guest memory
    /// (the vCPUs are paused, so the guest cannot add a request behind our
    /// back). Such a device has no FUSE session in virtiofsd, only ring
    /// setup, which a restore redoes against its own fresh virtiofsd when
    /// the restored device activates ([`Self::start_backend`]). A device
    /// the guest has used has its session, open files and the rings'
    /// progress in virtiofsd, which a snapshot cannot capture (Firecracker
    /// refuses vhost-user devices for the same reason).
    fn snapshot_support(&self) -> Result<(), String> {
        let Some(active) = self.state.active() else {
            return Ok(());
        };
        let used = |index: usize, q: &super::device::ActiveQueue| {
            let avail = q.queue.avail_idx(&active.mem, Ordering::Acquire);
            let used = q.queue.used_idx(&active.mem, Ordering::Acquire);
            match (avail, used) {
                (Ok(a), Ok(u)) => a.0 != 0 || u.0 != 0,
                // An unreadable ring cannot be shown idle.
                _ => {
                    warn!(queue = index, "virtio-fs: cannot read a queue's indices");
                    true
                }
            }
        };
        if active.queues.iter().enumerate().any(|(i, q)| used(i, q)) {
            return Err(
                "the guest has used the virtio-fs device: its FUSE session lives in \
                 virtiofsd, which a snapshot cannot capture"
                    .into(),
            );
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.state.reset();
        true
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.init(ops);
        if let Some(backend) = &self.backend {
            // Only a hang-up: the answers to our messages are read where
            // they are asked for.
            let hup = EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR;
            if let Err(e) = ops.add(Events::new(backend, hup)) {
                error!(error = ?e, "virtio-fs: watching the backend socket");
            }
            for call in backend.calls() {
                if let Err(e) = ops.add(Events::new(call, EventSet::IN)) {
                    error!(error = ?e, "virtio-fs: watching a call eventfd");
                }
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        match self.state.handle_event(fd, ops) {
            DeviceEvent::Activated => self.start_backend(ops),
            DeviceEvent::Handled => {
                if !self.state.is_activated() {
                    self.stop_backend(ops);
                }
            }
            DeviceEvent::Queue(index) => self.answer_with_errors(index),
            DeviceEvent::Other => {
                if self.backend_call(fd) {
                    return;
                }
                if self.backend.as_ref().is_some_and(|b| b.as_raw_fd() == fd) {
                    self.backend_gone(ops, "its socket hung up");
                }
            }
        }
    }
}
