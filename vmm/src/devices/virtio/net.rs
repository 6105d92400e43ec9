//! virtio-net (device type 1) backed by a tap interface.
//!
//! Two queues, rx and tx, no offloads and no mergeable rx buffers: each
//! frame travels with its 12-byte `virtio_net_hdr_v1`, which the tap
//! (IFF_VNET_HDR) reads and writes as is. The device is driven by the event
//! manager like vsock: the tap fd and the queue notifications. The tap
//! wrapper lives in [`tap`].
//!
//! Each direction has a [`RateLimiter`] (unlimited unless configured); a
//! frame costs one operation and its length in bytes (the Ethernet frame,
//! without the vnet header). A tx frame the limiter holds back stays first
//! in the tx queue; an rx frame stays the pending frame, and the tap is not
//! read meanwhile, so the host kernel queues (and in the end drops) what
//! comes next. Each resumes when its limiter's timer fires.

pub mod tap;

use crate::{guest_debug, guest_error, guest_warn};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use husk_vm_config::control::GuestFaultKind;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::QueueT;

use self::tap::{Tap, TapError, VNET_HDR_LEN};
use super::chain::{ChainError, Direction, SgList};
use super::queue_events::{signal_used, SignalError};
use super::{DeviceEvent, DeviceState, GuestMemory, VirtioDevice, TYPE_NET};
use crate::rate_limiter::RateLimiter;

const RXQ: usize = 0;
const TXQ: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256; 2];
/// Largest frame: 64 KiB of IP packet plus an Ethernet header with a VLAN
/// tag, after the vnet header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_535 + 18;
/// Frames moved per event before yielding to the event loop.
const MAX_FRAMES_PER_EVENT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("creating the activation eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("device is not activated")]
    NotActivated,
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error(transparent)]
    Signal(#[from] SignalError),
}

pub struct Net {
    state: DeviceState,
    tap: Tap,
    /// A frame read from the tap that waits for an rx buffer; the tap is
    /// not polled meanwhile, so the kernel queues the rest.
    pending_frame: Option<Vec<u8>>,
    /// Whether the tap fd is currently polled for IN.
    tap_polled: bool,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
}

impl Net {
    /// A virtio-net device on tap `tap_name` (created if missing), offering
    /// `mac` to the guest when given.
    pub fn new(tap_name: &str, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        let mut features = 1 << VIRTIO_NET_F_STATUS;
        if mac.is_some() {
            features |= 1 << VIRTIO_NET_F_MAC;
        }
        // `struct virtio_net_config` up to `status`: mac[6], status (le16).
        // The mac is writable only for legacy drivers, which husk does not
        // serve, so it is all read-only.
        let mut config = vec![0u8; 8];
        config[..6].copy_from_slice(&mac.unwrap_or_default());
        // Cannot truncate: the link-up bit is 1.
        #[allow(clippy::cast_possible_truncation)]
        let link_up = VIRTIO_NET_S_LINK_UP as u16;
        config[6..8].copy_from_slice(&link_up.to_le_bytes());
        let state = DeviceState::new("net", TYPE_NET, &QUEUE_SIZES, features)
            .map_err(NetError::EventFd)?
            .with_config(config);
        Ok(Self {
            state,
            tap: Tap::open(tap_name)?,
            pending_frame: None,
            tap_polled: false,
            rx_limiter: RateLimiter::unlimited(),
            tx_limiter: RateLimiter::unlimited(),
        })
    }

    /// Limits the frames the guest receives (`rx`) and sends (`tx`).
    /// Set before the device joins the event loop, which then watches the
    /// limiters' timers.
    pub fn with_rate_limiters(mut self, rx: RateLimiter, tx: RateLimiter) -> Self {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Sends the frames the guest queued on tx to the tap, as many as the
    /// tx rate limiter lets through. Returns whether any chain was consumed.
    pub fn process_tx(&mut self) -> Result<bool, NetError> {
        let active = self.state.active_mut().ok_or(NetError::NotActivated)?;
        if self.tx_limiter.is_blocked() {
            return Ok(false);
        }
        let mem = &active.mem;
        let queue = &mut active.queues[TXQ].queue;
        let mut used = false;
        let mut frame = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let read = read_tx_frame(mem, chain, &mut frame);
            // A malformed chain costs an operation, no bytes.
            let bytes = read
                .as_ref()
                .map_or(0, |()| frame.len().saturating_sub(VNET_HDR_LEN));
            if !self.tx_limiter.consume(bytes as u64, 1) {
                // First in the queue again for when the timer fires.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                break;
            }
            match read {
                Ok(()) => match self.tap.write_frame(&frame) {
                    Ok(_) => {}
                    // Like a full NIC queue: the frame is lost, TCP resends.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        guest_debug!(GuestFaultKind::Request, "net: tap full, tx frame dropped");
                    }
                    Err(e) => {
                        guest_warn!(GuestFaultKind::Request, error = %e, "net: tap write failed, frame dropped")
                    }
                },
                Err(e) => {
                    guest_warn!(GuestFaultKind::Request, error = %e, "net: dropping malformed tx chain")
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

    /// Moves frames from the tap into rx buffers until either runs out or
    /// the rx rate limiter says to wait. Returns whether any buffer was
    /// used.
    pub fn process_rx(&mut self) -> Result<bool, NetError> {
        let active = self.state.active_mut().ok_or(NetError::NotActivated)?;
        if self.rx_limiter.is_blocked() {
            return Ok(false);
        }
        let mem = &active.mem;
        let queue = &mut active.queues[RXQ].queue;
        let mut used = false;
        for _ in 0..MAX_FRAMES_PER_EVENT {
            let frame = match self.pending_frame.take() {
                Some(f) => f,
                None => match read_tap_frame(&self.tap) {
                    Some(f) => f,
                    None => break,
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.pending_frame = Some(frame);
                break;
            };
            let head = chain.head_index();
            let sg = match SgList::from_chain(mem, chain, Direction::DeviceWritable, usize::MAX) {
                Ok(sg) => sg,
                Err(e) => {
                    guest_warn!(GuestFaultKind::Queue, error = %e, "net: unusable rx buffer");
                    queue.add_used(mem, head, 0)?;
                    used = true;
                    self.pending_frame = Some(frame);
                    continue;
                }
            };
            if frame.len() > sg.len() {
                // Without mergeable buffers a frame must fit one chain.
                guest_warn!(
                    GuestFaultKind::Request,
                    frame = frame.len(),
                    buffer = sg.len(),
                    "net: rx frame larger than the guest buffer, dropped"
                );
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                continue;
            }
            let bytes = frame.len().saturating_sub(VNET_HDR_LEN);
            if !self.rx_limiter.consume(bytes as u64, 1) {
                // The buffer back for later, the frame kept for it.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                self.pending_frame = Some(frame);
                break;
            }
            let len = match sg.write_at(mem, 0, &frame) {
                Ok(n) => n,
                Err(e) => {
                    guest_warn!(GuestFaultKind::Request, error = %e, "net: writing an rx frame failed, dropped");
                    0
                }
            };
            // Cannot truncate: len is at most the frame's, at most MAX_FRAME.
            #[allow(clippy::cast_possible_truncation)]
            let len = len as u32;
            queue.add_used(mem, head, len)?;
            used = true;
        }
        if used {
            signal_used(mem, queue, &active.irq)?;
        }
        Ok(used)
    }

    /// Both directions once (what any event triggers).
    pub fn process_queues(&mut self) -> Result<(), NetError> {
        self.process_tx()?;
        self.process_rx()?;
        Ok(())
    }

    /// The event loop caught up with the activation: the queues are
    /// watched, the tap is next.
    fn handle_activate(&mut self, ops: &mut EventOps) {
        match ops.add(Events::new(&self.tap, EventSet::IN)) {
            Ok(()) => self.tap_polled = true,
            Err(e) => tracing::error!(error = ?e, "net: registering the tap"),
        }
    }

    /// Polls the tap only while no frame waits for an rx buffer.
    fn update_tap_interest(&mut self, ops: &mut EventOps) {
        let want = self.pending_frame.is_none();
        if want == self.tap_polled {
            return;
        }
        let ev = if want {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        match ops.modify(Events::new(&self.tap, ev)) {
            Ok(()) => self.tap_polled = want,
            Err(e) => tracing::error!(error = ?e, "net: changing tap interest"),
        }
    }
}

/// Gathers a tx chain (vnet header + frame, all device-readable) into
/// `frame` (public for the fuzz targets).
pub fn read_tx_frame<M>(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<M>,
    frame: &mut Vec<u8>,
) -> Result<(), TxError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let sg = SgList::from_chain(mem, chain, Direction::DeviceReadable, MAX_FRAME)?;
    if sg.len() < VNET_HDR_LEN {
        return Err(TxError::Short(sg.len()));
    }
    frame.resize(sg.len(), 0);
    sg.read_at(mem, 0, frame)?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("bad descriptor chain: {0}")]
    Chain(#[from] ChainError),
    #[error("chain of {0} bytes is shorter than the vnet header")]
    Short(usize),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// One frame from the tap, or None when none waits (or the read failed).
fn read_tap_frame(tap: &Tap) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_FRAME];
    match tap.read_frame(&mut buf) {
        Ok(n) if n >= VNET_HDR_LEN => {
            buf.truncate(n);
            // num_buffers: one chain per frame without VIRTIO_NET_F_MRG_RXBUF.
            buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            Some(buf)
        }
        Ok(n) => {
            tracing::warn!(n, "net: short read from the tap");
            None
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => {
            tracing::warn!(error = %e, "net: tap read failed");
            None
        }
    }
}

impl VirtioDevice for Net {
    fn state(&self) -> &DeviceState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }

    /// Frames move within one event loop turn. A frame read from the tap
    /// and waiting for an rx buffer is not kept: a restored VM has lost
    /// one packet, as a network may. The restored VMM opens its own tap.
    fn snapshot_support(&self) -> Result<(), String> {
        Ok(())
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.init(ops);
        self.rx_limiter.register(ops, "net rx");
        self.tx_limiter.register(ops, "net tx");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        match self.state.handle_event(fd, ops) {
            DeviceEvent::Activated => return self.handle_activate(ops),
            DeviceEvent::Handled => return,
            // Unblocked: the processing below resumes that direction.
            DeviceEvent::Other if self.rx_limiter.is_timer(fd) => self.rx_limiter.on_timer(),
            DeviceEvent::Other if self.tx_limiter.is_timer(fd) => self.tx_limiter.on_timer(),
            // The tap's readiness needs no bookkeeping: process_rx reads it.
            DeviceEvent::Queue(_) | DeviceEvent::Other => {}
        }
        if !self.state.is_activated() {
            // A timer that fired after a reset: nothing to resume.
            if !self.rx_limiter.is_timer(fd) && !self.tx_limiter.is_timer(fd) {
                tracing::warn!(fd, "net: event before activation");
            }
            return;
        }
        if let Err(e) = self.process_queues() {
            guest_error!(GuestFaultKind::Queue, error = %e, "net: processing queues");
        }
        self.update_tap_interest(ops);
    }
}

#[cfg(test)]
mod tests;
