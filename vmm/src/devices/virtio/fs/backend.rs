//! The VMM's side of the vhost-user protocol for one virtio-fs device: the
//! connection to the backend (virtiofsd), feature negotiation, and handing
//! it guest memory and the queues on activation (and taking them back on a
//! reset).
//!
//! Every message waits for the backend's answer (REPLY_ACK) with a
//! timeout, so a backend that hangs cannot stall the VMM's event loop: a
//! late answer is an error, and the device then treats the backend as gone.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::virtio::{ActiveQueue, GuestMemory, VIRTIO_F_VERSION_1};

/// How long the backend has to answer one message.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The virtio features the device may pass on to the guest when the
/// backend offers them: the ring layouts the VMM's own error path
/// (virtio-queue) serves too, should the backend go away.
pub const GUEST_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// The protocol features husk uses: several queues, and an answer to every
/// message (so a failure is seen at the message that caused it).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
}

/// Errors talking to the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to the vhost-user backend socket {path} (is virtiofsd listening there?): {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user backend {path}: {step}: {source}")]
    Protocol {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user backend {path} lacks required features {missing:#x}")]
    MissingFeatures { path: PathBuf, missing: u64 },
    #[error("vhost-user backend {path} lacks protocol features {missing:?}")]
    MissingProtocolFeatures {
        path: PathBuf,
        missing: VhostUserProtocolFeatures,
    },
    #[error("vhost-user backend {path} serves {max} queues, the device has {want}")]
    TooFewQueues {
        path: PathBuf,
        max: u64,
        want: usize,
    },
    #[error("creating the call eventfd of queue {index}: {source}")]
    CallEventFd {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("guest memory cannot be shared with the backend (not a memfd mapping): {0}")]
    Memory(#[source] vhost::Error),
    #[error("queue {index}: ring at {addr:#x} is outside guest memory")]
    RingAddress { index: usize, addr: u64 },
}

/// A connected, negotiated vhost-user backend.
pub struct Backend {
    path: PathBuf,
    frontend: Frontend,
    /// The virtio features the backend offers.
    features: u64,
    /// One eventfd per queue the backend signals when it used buffers.
    calls: Vec<EventFd>,
    /// Whether the backend has the rings of an activation.
    running: bool,
}

impl Backend {
    /// Connects to the backend listening on `path` and negotiates what does
    /// not depend on the guest: ownership, protocol features, the number of
    /// queues (`num_queues`).
    pub fn connect(path: &Path, num_queues: usize) -> Result<Self, BackendError> {
        let connect_err = |source| BackendError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(connect_err)?;
        let frontend = Frontend::from_stream(stream, num_queues as u64);
        let calls = (0..num_queues)
            .map(|index| {
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| BackendError::CallEventFd { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut backend = Self {
            path: path.to_path_buf(),
            frontend,
            features: 0,
            calls,
            running: false,
        };
        backend.negotiate(num_queues)?;
        Ok(backend)
    }

    fn protocol(&self, step: &'static str) -> impl FnOnce(vhost::Error) -> BackendError + '_ {
        move |source| BackendError::Protocol {
            path: self.path.clone(),
            step,
            source,
        }
    }

    fn negotiate(&mut self, num_queues: usize) -> Result<(), BackendError> {
        self.frontend
            .set_owner()
            .map_err(self.protocol("SET_OWNER"))?;
        let features = self
            .frontend
            .get_features()
            .map_err(self.protocol("GET_FEATURES"))?;
        let required = VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & required != required {
            return Err(BackendError::MissingFeatures {
                path: self.path.clone(),
                missing: required & !features,
            });
        }
        self.features = features;
        // GET_PROTOCOL_FEATURES needs PROTOCOL_FEATURES acked first.
        self.frontend
            .set_features(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .map_err(self.protocol("SET_FEATURES"))?;
        let offered = self
            .frontend
            .get_protocol_features()
            .map_err(self.protocol("GET_PROTOCOL_FEATURES"))?;
        let wanted = wanted_protocol_features();
        if !offered.contains(wanted) {
            return Err(BackendError::MissingProtocolFeatures {
                path: self.path.clone(),
                missing: wanted - offered,
            });
        }
        self.frontend
            .set_protocol_features(wanted)
            .map_err(self.protocol("SET_PROTOCOL_FEATURES"))?;
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let max = self
            .frontend
            .get_queue_num()
            .map_err(self.protocol("GET_QUEUE_NUM"))?;
        if max < num_queues as u64 {
            return Err(BackendError::TooFewQueues {
                path: self.path.clone(),
                max,
                want: num_queues,
            });
        }
        Ok(())
    }

    /// The backend's socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The features the device offers the guest: what the backend serves,
    /// of [`GUEST_FEATURES`].
    pub fn guest_features(&self) -> u64 {
        self.features & GUEST_FEATURES
    }

    /// The eventfds the backend signals used buffers on, in queue order.
    pub fn calls(&self) -> &[EventFd] {
        &self.calls
    }

    /// Whether the backend has the rings of an activation.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Hands the backend guest memory and the queues the driver set up, with
    /// the features the driver accepted; the backend then serves the queues
    /// by itself: kicks reach it through each queue's notify eventfd (a KVM
    /// ioeventfd), and it signals [`Self::calls`].
    pub fn start(
        &mut self,
        mem: &GuestMemory,
        acked_features: u64,
        queues: &[ActiveQueue],
    ) -> Result<(), BackendError> {
        let features =
            (acked_features & self.features) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features)
            .map_err(self.protocol("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(BackendError::Memory)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.protocol("SET_MEM_TABLE"))?;
        for (index, q) in queues.iter().enumerate() {
            let queue = &q.queue;
            let host = |addr: u64| {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| BackendError::RingAddress { index, addr })
            };
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(queue.desc_table())?,
                used_ring_addr: host(queue.used_ring())?,
                avail_ring_addr: host(queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, queue.size())
                .map_err(self.protocol("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(self.protocol("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(self.protocol("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, &self.calls[index])
                .map_err(self.protocol("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &q.notify)
                .map_err(self.protocol("SET_VRING_KICK"))?;
            self.running = true;
            self.frontend
                .set_vring_enable(index, true)
                .map_err(self.protocol("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Takes the rings of `num_queues` queues back (a driver reset): the
    /// backend stops touching them before the guest reuses their memory.
    pub fn stop(&mut self, num_queues: usize) -> Result<(), BackendError> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        for index in 0..num_queues {
            self.frontend
                .set_vring_enable(index, false)
                .map_err(self.protocol("SET_VRING_ENABLE"))?;
            // GET_VRING_BASE is what stops a ring in vhost-user.
            self.frontend
                .get_vring_base(index)
                .map_err(self.protocol("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

impl AsRawFd for Backend {
    /// The socket: it hangs up when the backend dies.
    fn as_raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }
}
