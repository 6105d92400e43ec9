//! virtio-vsock (device type 19) with a Unix-socket host side.
//!
//! The device owns the three queues (rx, tx, event), moves packets between
//! them and the [`muxer::Muxer`], and is driven by the event manager: queue
//! notifications, the host listener and each connection's stream are
//! registered as they appear. Packet format lives in [`packet`], per
//! connection state and flow control in [`connection`].

pub mod connection;
pub mod muxer;
pub mod packet;

use crate::{guest_error, guest_warn};
use husk_vm_config::control::GuestFaultKind;
use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::timerfd::TimerFd;

use self::muxer::{Muxer, MuxerError};
use self::packet::{PacketError, RxBuffer};
use super::queue_events::{signal_used, SignalError};
use super::{DeviceEvent, DeviceState, VirtioDevice, TYPE_VSOCK};

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// The only event of the event queue (virtio 1.2, 5.10.6.4).
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Most a restored device holds host connections back waiting for the
/// guest to take its transport reset (a guest that never does only delays
/// its own connections).
const RESET_TAKEN_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest cid {0} is reserved (must be >= 3)")]
    BadCid(u64),
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    #[error("creating the activation eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("creating the connection timer: {0}")]
    Timer(#[source] vmm_sys_util::errno::Error),
    #[error("device is not activated")]
    NotActivated,
    #[error("the driver left no usable buffer in the event queue")]
    NoEventBuffer,
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error(transparent)]
    Signal(#[from] SignalError),
}

pub struct Vsock {
    state: DeviceState,
    guest_cid: u64,
    muxer: Muxer,
    /// fds currently registered with the event manager, and for what.
    registered: HashMap<RawFd, EventSet>,
    /// Wakes the device when a closing connection's wait for the guest's
    /// RST runs out, and the deadline it is armed for.
    kill_timer: TimerFd,
    kill_deadline: Option<Instant>,
    /// After a transport reset: the event queue's available index then.
    /// The driver gives the event's buffer back only once it has reset
    /// its sockets, so a new index says the reset was taken.
    reset_sent_at_avail: Option<u16>,
}

impl Vsock {
    /// A vsock device for guest `guest_cid`, listening for host connections
    /// at `uds_path` (removed again when the device is dropped).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        // 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::BadCid(guest_cid));
        }
        // `struct virtio_vsock_config`: le64 guest_cid, read-only.
        let state = DeviceState::new("vsock", TYPE_VSOCK, &QUEUE_SIZES, 0)
            .map_err(VsockError::EventFd)?
            .with_config(guest_cid.to_le_bytes().to_vec());
        Ok(Self {
            state,
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            registered: HashMap::new(),
            kill_timer: TimerFd::new().map_err(VsockError::Timer)?,
            kill_deadline: None,
            reset_sent_at_avail: None,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Drains the tx queue: every chain is parsed and handed to the muxer,
    /// malformed ones are logged and returned to the guest unused. Returns
    /// whether any chain was consumed.
    pub fn process_tx(&mut self) -> Result<bool, VsockError> {
        let active = self.state.active_mut().ok_or(VsockError::NotActivated)?;
        let mem = &active.mem;
        let queue = &mut active.queues[TXQ].queue;
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match packet::parse_tx(mem, chain, self.guest_cid) {
                Ok(pkt) => self.muxer.send_pkt(&pkt),
                Err(PacketError::Unsupported(hdr)) => {
                    guest_warn!(
                        GuestFaultKind::Request,
                        op = hdr.op,
                        type_ = hdr.type_,
                        "vsock: unsupported packet, resetting"
                    );
                    self.muxer.reset_reply(&hdr);
                }
                Err(e) => {
                    guest_warn!(GuestFaultKind::Request, error = %e, "vsock: dropping malformed tx packet")
                }
            }
            queue.add_used(mem, head, 0)?;
            used = true;
        }
        if used {
            signal_used(mem, queue, &active.irq)?;
        }
        Ok(used)
    }

    /// Fills rx buffers with whatever the muxer has for the guest. Returns
    /// whether any buffer was used.
    pub fn process_rx(&mut self) -> Result<bool, VsockError> {
        let active = self.state.active_mut().ok_or(VsockError::NotActivated)?;
        let mem = &active.mem;
        let queue = &mut active.queues[RXQ].queue;
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let buf = match RxBuffer::new(mem, chain) {
                Ok(buf) => buf,
                Err(e) => {
                    guest_warn!(GuestFaultKind::Queue, error = %e, "vsock: unusable rx buffer");
                    queue.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let Some((hdr, data)) = self.muxer.recv_pkt(buf.data_capacity()) else {
                // Nothing to send after all (e.g. the stream had no data):
                // give the buffer back for later.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                break;
            };
            let len = match buf.write(mem, &hdr, &data) {
                Ok(len) => len,
                Err(e) => {
                    guest_warn!(GuestFaultKind::Request, error = %e, "vsock: writing rx packet failed, packet lost");
                    0
                }
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
        if used {
            signal_used(mem, queue, &active.irq)?;
        }
        Ok(used)
    }

    /// Handles readiness `ev` on a host fd (listener or stream) the muxer
    /// asked for, then moves packets both ways.
    pub fn process_host_event(&mut self, fd: RawFd, ev: EventSet) -> Result<(), VsockError> {
        self.muxer.handle_event(fd, ev);
        self.process_queues()
    }

    /// One round of both queues; rx again after tx because guest packets
    /// (REQUEST, CREDIT_REQUEST...) often need an answer.
    pub fn process_queues(&mut self) -> Result<(), VsockError> {
        self.muxer.sweep_expired(Instant::now());
        self.process_rx()?;
        self.process_tx()?;
        self.process_rx()?;
        Ok(())
    }

    /// The fds the muxer wants polled and their events (for callers driving
    /// the device without an event manager, e.g. tests).
    pub fn host_interests(&self) -> Vec<(RawFd, EventSet)> {
        self.muxer.interests()
    }

    /// Drops finished host streams without an event manager to update.
    pub fn drop_finished_streams(&mut self) {
        self.muxer.take_graveyard();
    }

    /// Puts a VIRTIO_VSOCK_EVENT_TRANSPORT_RESET event in the event queue
    /// (virtio 1.2, 5.10.6.4) and interrupts the guest.
    pub fn send_transport_reset(&mut self) -> Result<(), VsockError> {
        let active = self.state.active_mut().ok_or(VsockError::NotActivated)?;
        let mem = &active.mem;
        let queue = &mut active.queues[EVQ].queue;
        let chain = queue
            .pop_descriptor_chain(mem)
            .ok_or(VsockError::NoEventBuffer)?;
        let head = chain.head_index();
        // struct virtio_vsock_event { le32 id; }
        let desc = chain
            .clone()
            .writable()
            .find(|d| d.len() >= 4)
            .ok_or(VsockError::NoEventBuffer)?;
        let written = match mem.write_obj(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le(), desc.addr()) {
            Ok(()) => 4,
            Err(e) => {
                guest_warn!(GuestFaultKind::Queue, error = %e, "vsock: event buffer outside guest memory");
                0
            }
        };
        queue.add_used(mem, head, written)?;
        let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
        signal_used(mem, queue, &active.irq)?;
        self.reset_sent_at_avail = Some(avail);
        tracing::info!("vsock: transport reset sent to the guest");
        Ok(())
    }

    /// Whether the guest has taken the transport reset: it gave the
    /// event's buffer back (the event queue's available index moved).
    fn reset_taken(&self) -> bool {
        let (Some(at), Some(active)) = (self.reset_sent_at_avail, self.state.active()) else {
            return false;
        };
        active.queues[EVQ]
            .queue
            .avail_idx(&active.mem, Ordering::Acquire)
            .is_ok_and(|now| now.0 != at)
    }

    /// Ends the hold on host connections once the guest took the reset
    /// (the hold may have run out first).
    fn check_reset_taken(&mut self) {
        if self.reset_taken() {
            self.reset_sent_at_avail = None;
            if self.muxer.release_host() {
                tracing::info!(
                    "vsock: the guest took the transport reset; accepting host connections"
                );
            }
        }
    }

    /// The event loop caught up with the activation: the queues are
    /// watched, the connection timer and the host side are next.
    fn handle_activate(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.kill_timer, EventSet::IN)) {
            tracing::error!(error = ?e, "vsock: registering the connection timer");
        }
        self.sync_registrations(ops);
    }

    /// Arms the timer for the earliest closing connection, so it is reset
    /// on time even when nothing else happens.
    fn arm_kill_timer(&mut self) {
        let Some(deadline) = self.muxer.next_expiry() else {
            return;
        };
        if self.kill_deadline.is_some_and(|d| d <= deadline) {
            return;
        }
        // A zero duration would disarm the timer.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.kill_timer.reset(wait, None) {
            Ok(()) => self.kill_deadline = Some(deadline),
            Err(e) => tracing::error!(error = %e, "vsock: arming the connection timer"),
        }
    }

    /// Brings the event manager's view of host fds in line with what the
    /// muxer wants, then closes streams that are no longer registered.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        let wanted: HashMap<RawFd, EventSet> = self.muxer.interests().into_iter().collect();
        self.registered.retain(|fd, ev| {
            if wanted.contains_key(fd) {
                return true;
            }
            if let Err(e) = ops.remove(Events::with_data_raw(*fd, 0, *ev)) {
                tracing::warn!(fd, error = ?e, "vsock: unregistering a host fd");
            }
            false
        });
        for (fd, ev) in wanted {
            let result = match self.registered.get(&fd) {
                Some(old) if *old == ev => continue,
                Some(_) => ops.modify(Events::with_data_raw(fd, 0, ev)),
                None => ops.add(Events::with_data_raw(fd, 0, ev)),
            };
            match result {
                Ok(()) => {
                    self.registered.insert(fd, ev);
                }
                Err(e) => tracing::error!(fd, error = ?e, "vsock: registering a host fd"),
            }
        }
        self.muxer.take_graveyard();
    }
}

impl VirtioDevice for Vsock {
    fn state(&self) -> &DeviceState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }

    /// Host connections are sockets of this process: they cannot move to
    /// the restored one. The device itself (queues, cid) can.
    fn snapshot_support(&self) -> Result<(), String> {
        Ok(())
    }

    /// The restored process has no host connections: tell the guest with
    /// a TRANSPORT_RESET event, so its driver resets every connected
    /// socket (listening ones stay).
    fn restored(&mut self) {
        match self.send_transport_reset() {
            Ok(()) => self.muxer.hold_host(Instant::now() + RESET_TAKEN_WAIT),
            Err(e) => tracing::warn!(error = %e, "vsock: cannot send the transport reset event"),
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        // Queues only exist after activation; until then only watch for it.
        self.state.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let ev = events.event_set();
        match self.state.handle_event(fd, ops) {
            // Then a first round: the driver may have queued rx buffers
            // and packets already.
            DeviceEvent::Activated => self.handle_activate(ops),
            DeviceEvent::Handled => return,
            // The event queue's kick (the driver giving event buffers back)
            // matters only to the check below.
            DeviceEvent::Queue(_) => {}
            DeviceEvent::Other if fd == self.kill_timer.as_raw_fd() => {
                // Readable, so this does not block; process_queues sweeps.
                if let Err(e) = self.kill_timer.wait() {
                    tracing::warn!(error = %e, "vsock: reading the connection timer");
                }
                self.kill_deadline = None;
            }
            DeviceEvent::Other if self.state.is_activated() => self.muxer.handle_event(fd, ev),
            DeviceEvent::Other => {
                tracing::warn!(fd, "vsock: event before activation");
                return;
            }
        }
        // After a transport reset: whether the guest took it, kick or not.
        self.check_reset_taken();
        if let Err(e) = self.process_queues() {
            guest_error!(GuestFaultKind::Queue, error = %e, "vsock: processing queues");
        }
        self.sync_registrations(ops);
        self.arm_kill_timer();
    }
}

#[cfg(test)]
mod tests;
