//! What every virtio device shares: the [`VirtioDevice`] trait the transport
//! drives, and [`DeviceState`], the part of a device that is the same for all
//! of them.
//!
//! [`DeviceState`] owns a device's identity (type, queue sizes), its side of
//! feature negotiation (offered and accepted features), its config space, and
//! its queues from activation to reset together with their registration with
//! the event manager. A device embeds one, lends it out through
//! [`VirtioDevice::state`] and gets the rest of the trait from the defaults,
//! so its own file keeps only what it does with its queues and back end.
//!
//! The feature rules a transport applies at FEATURES_OK ([`check_features`])
//! and the 32-bit feature pages it exposes ([`features_page`],
//! [`set_features_page`]) live here too, next to the state they guard.
//!
//! Activation and reset run on a vCPU thread, which has no `EventOps`: the
//! state signals its [`ActivateEvt`] there and (un)registers the queue notify
//! eventfds when the event loop delivers that event
//! ([`DeviceState::handle_event`]).

use crate::{guest_debug, guest_warn};
use husk_vm_config::control::GuestFaultKind;
use std::io;
use std::ops::Range;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use tracing::{error, warn};
use virtio_queue::{DescriptorChain, Queue};
use vmm_sys_util::eventfd::EventFd;

use super::queue_events::{process_chains, take_notification, ActivateEvt};
use super::{GuestMemory, IrqTrigger, VIRTIO_F_VERSION_1};

/// Errors from activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device back end: {0}")]
    Backend(#[source] io::Error),
    #[error("device is already active")]
    AlreadyActive,
}

/// Why a transport refuses the features a driver accepted (FEATURES_OK).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FeaturesError {
    #[error("driver accepted features {unoffered:#x} the device did not offer")]
    NotOffered { unoffered: u64 },
    #[error("driver did not accept VIRTIO_F_VERSION_1")]
    NoVersion1,
}

/// The rules for the features a driver accepts: only offered ones, and
/// VIRTIO_F_VERSION_1 among them (husk serves no legacy drivers).
pub fn check_features(offered: u64, acked: u64) -> Result<(), FeaturesError> {
    let unoffered = acked & !offered;
    if unoffered != 0 {
        return Err(FeaturesError::NotOffered { unoffered });
    }
    if acked & VIRTIO_F_VERSION_1 == 0 {
        return Err(FeaturesError::NoVersion1);
    }
    Ok(())
}

/// The low 32 bits of `v`: the mask makes the truncation explicit.
#[allow(clippy::cast_possible_truncation)]
fn low_half(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

/// 32-bit page `page` of `features`, as the (Device|Driver)Features
/// registers show it; pages past the 64 feature bits read as zero.
pub fn features_page(features: u64, page: u32) -> u32 {
    match page {
        0 => low_half(features),
        1 => low_half(features >> 32),
        _ => 0,
    }
}

/// Sets 32-bit page `page` of `features`; returns false (and changes
/// nothing) for a page past the 64 feature bits.
pub fn set_features_page(features: &mut u64, page: u32, value: u32) -> bool {
    let (mask, shift) = match page {
        0 => (0xffff_ffff, 0),
        1 => (0xffff_ffff << 32, 32),
        _ => return false,
    };
    *features = (*features & !mask) | (u64::from(value) << shift);
    true
}

/// Serves a read of config space `config` at `offset`; bytes past its end
/// read as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| config.get(usize::try_from(o).ok()?))
            .copied()
            .unwrap_or(0);
    }
}

/// One activated queue: the queue state the driver programmed and the
/// eventfd KVM signals when the guest writes its index to QueueNotify.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// What a device holds between activation and reset.
pub struct ActiveState {
    pub mem: GuestMemory,
    pub irq: Arc<IrqTrigger>,
    /// In queue order; as many as the activation accepted.
    pub queues: Vec<ActiveQueue>,
    /// Whether the event loop has caught up with this activation.
    registered: bool,
    /// Whether the event loop watches the notify eventfds (from when it
    /// caught up, unless the queues are served outside the VMM).
    watched: bool,
}

/// What [`DeviceState::handle_event`] made of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The event loop caught up with an activation: the queues' notify
    /// eventfds are watched now, and the device may add its back end's fds.
    Activated,
    /// The guest notified queue `index`; the notification is consumed.
    Queue(usize),
    /// Bookkeeping the state did by itself (a reset caught up with, a stale
    /// notify eventfd dropped): nothing for the device to do.
    Handled,
    /// Not one of the state's eventfds: the device's own.
    Other,
}

/// The state every virtio device has, whatever it does. See the module docs.
pub struct DeviceState {
    /// Log prefix naming the device.
    name: &'static str,
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    /// Activation accepts this many queues up to all of them: trailing
    /// queues that hang on a feature (balloon's statistics queue) are
    /// optional.
    min_queues: usize,
    avail_features: u64,
    acked_features: u64,
    config: Vec<u8>,
    /// The bytes of `config` the driver may write; empty when read-only.
    config_writable: Range<usize>,
    activate_evt: ActivateEvt,
    active: Option<ActiveState>,
    /// Notify eventfds from before a reset, still in the event manager.
    stale: Vec<EventFd>,
    /// The queues are served by another process (a vhost-user backend that
    /// reads the notify eventfds itself): the event loop leaves them alone
    /// until the device asks ([`DeviceState::watch_queues`]).
    external_queues: bool,
}

impl DeviceState {
    /// A device of `device_type` named `name` in logs, with one queue per
    /// entry of `queue_max_sizes`, offering `avail_features` and
    /// VIRTIO_F_VERSION_1, with an empty, read-only config space.
    pub fn new(
        name: &'static str,
        device_type: u32,
        queue_max_sizes: &[u16],
        avail_features: u64,
    ) -> io::Result<Self> {
        Ok(Self {
            name,
            device_type,
            queue_max_sizes: queue_max_sizes.to_vec(),
            min_queues: queue_max_sizes.len(),
            avail_features: avail_features | VIRTIO_F_VERSION_1,
            acked_features: 0,
            config: Vec::new(),
            config_writable: 0..0,
            activate_evt: ActivateEvt::new()?,
            active: None,
            stale: Vec::new(),
            external_queues: false,
        })
    }

    /// Sets the config space the driver reads.
    pub fn with_config(mut self, config: Vec<u8>) -> Self {
        self.config = config;
        self
    }

    /// Lets the driver write `range` of the config space (other writes are
    /// still ignored).
    pub fn with_writable_config(mut self, range: Range<usize>) -> Self {
        self.config_writable = range;
        self
    }

    /// Leaves the queue notify eventfds to someone else (a vhost-user
    /// backend): activations still reach the event loop as
    /// [`DeviceEvent::Activated`], but the eventfds are watched only after
    /// [`DeviceState::watch_queues`].
    pub fn with_external_queues(mut self) -> Self {
        self.external_queues = true;
        self
    }

    /// Lets activation go ahead with only the first `min` queues.
    pub fn with_min_queues(mut self, min: usize) -> Self {
        self.min_queues = min.min(self.queue_max_sizes.len());
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver accepted feature bit `bit`.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.acked_features & (1 << bit) != 0
    }

    /// Records the features the driver accepted. The transport has already
    /// refused sets with unoffered bits; masking again keeps a device from
    /// ever acting on a feature it did not offer.
    pub fn set_acked_features(&mut self, features: u64) {
        let unoffered = features & !self.avail_features;
        if unoffered != 0 {
            guest_warn!(
                GuestFaultKind::Mmio,
                unoffered,
                "{}: ignoring features it did not offer",
                self.name
            );
        }
        self.acked_features = features & self.avail_features;
    }

    /// The config space as the driver sees it.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// The config space, for a device that updates it (it then tells the
    /// driver with an INT_CONFIG interrupt).
    pub fn config_mut(&mut self) -> &mut [u8] {
        &mut self.config
    }

    /// Reads the config space; bytes out of range read zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    /// Writes the config space where the device allows it; a write that
    /// reaches outside the writable range is ignored whole.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(data.len())?))
            .filter(|r| {
                !r.is_empty()
                    && self.config_writable.start <= r.start
                    && r.end <= self.config_writable.end
            });
        match range.and_then(|r| self.config.get_mut(r)) {
            Some(dst) => dst.copy_from_slice(data),
            None => guest_warn!(
                GuestFaultKind::Mmio,
                offset,
                len = data.len(),
                "{}: write to read-only config space ignored",
                self.name
            ),
        }
    }

    /// What every device checks before it takes queues: not active yet, and
    /// a queue count it can serve.
    pub fn check_activation(&self, queues: &[ActiveQueue]) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let max = self.queue_max_sizes.len();
        if got < self.min_queues || got > max {
            let expected = if got < self.min_queues {
                self.min_queues
            } else {
                max
            };
            return Err(ActivateError::QueueCount { expected, got });
        }
        Ok(())
    }

    /// Takes the queues the driver set up; the event loop starts watching
    /// them when it next runs.
    pub fn activate(
        &mut self,
        mem: GuestMemory,
        irq: Arc<IrqTrigger>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.check_activation(&queues)?;
        self.activate_evt.signal().map_err(ActivateError::Backend)?;
        self.active = Some(ActiveState {
            mem,
            irq,
            queues,
            registered: false,
            watched: false,
        });
        Ok(())
    }

    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    pub fn active(&self) -> Option<&ActiveState> {
        self.active.as_ref()
    }

    pub fn active_mut(&mut self) -> Option<&mut ActiveState> {
        self.active.as_mut()
    }

    /// Back to before FEATURES_OK: drops the queues and the accepted
    /// features; the event loop forgets the notify eventfds when it next
    /// runs.
    pub fn reset(&mut self) {
        self.acked_features = 0;
        let Some(active) = self.active.take() else {
            return;
        };
        if active.registered {
            if active.watched {
                self.stale
                    .extend(active.queues.into_iter().map(|q| q.notify));
            }
            if let Err(e) = self.activate_evt.signal() {
                error!(error = %e, "{}: signalling the event loop after reset", self.name);
            }
        }
    }

    /// `MutEventSubscriber::init`: watches for activations and resets.
    pub fn init(&self, ops: &mut EventOps) {
        self.activate_evt.register(ops, self.name);
    }

    /// `MutEventSubscriber::process`: keeps the registrations in line with
    /// the device and says what is left for the device to do.
    pub fn handle_event(&mut self, fd: RawFd, ops: &mut EventOps) -> DeviceEvent {
        if self.activate_evt.is(fd) {
            self.activate_evt.consume(self.name);
            return self.sync_registrations(ops);
        }
        if let Some(active) = self.active.as_ref() {
            if let Some(index) = take_notification(&active.queues, fd, self.name) {
                return DeviceEvent::Queue(index);
            }
        }
        if self.stale.iter().any(|e| e.as_raw_fd() == fd) {
            // The guest kicked just before a reset: drop the fd now rather
            // than let a level-triggered fd spin the loop.
            guest_debug!(
                GuestFaultKind::Queue,
                fd,
                "{}: event on a queue eventfd from before a reset",
                self.name
            );
            self.sync_registrations(ops);
            return DeviceEvent::Handled;
        }
        DeviceEvent::Other
    }

    /// Forgets the notify eventfds of a reset, watches those of a new
    /// activation.
    fn sync_registrations(&mut self, ops: &mut EventOps) -> DeviceEvent {
        for evt in self.stale.drain(..) {
            if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
                warn!(error = ?e, "{}: unregistering a stale queue eventfd", self.name);
            }
        }
        let Some(active) = self.active.as_mut().filter(|a| !a.registered) else {
            return DeviceEvent::Handled;
        };
        active.registered = true;
        if !self.external_queues {
            self.watch_queues(ops);
        }
        DeviceEvent::Activated
    }

    /// Starts watching the active queues' notify eventfds (once the event
    /// loop has caught up with the activation); from then on their events
    /// come back as [`DeviceEvent::Queue`]. For a device with
    /// [external queues](Self::with_external_queues) that takes them over.
    pub fn watch_queues(&mut self, ops: &mut EventOps) {
        let name = self.name;
        let Some(active) = self.active.as_mut().filter(|a| a.registered && !a.watched) else {
            return;
        };
        for q in &active.queues {
            if let Err(e) = ops.add(Events::new(&q.notify, EventSet::IN)) {
                error!(error = ?e, "{name}: registering a queue eventfd");
            }
        }
        active.watched = true;
    }

    /// Hands every available chain of queue `index` to `handle`, which
    /// returns the bytes it wrote to the chain, puts it in the used ring and
    /// interrupts the guest if it asked for it.
    pub fn process_queue(
        &mut self,
        index: usize,
        mut handle: impl FnMut(DescriptorChain<&GuestMemory>, &GuestMemory) -> u32,
    ) {
        self.process_queue_until(index, |chain, mem| Some(handle(chain, mem)));
    }

    /// [`process_queue`](Self::process_queue) for a handler that may refuse
    /// a chain for now (None): the chain stays first in the queue and
    /// processing stops until the device calls again
    /// ([`process_chains`]).
    pub fn process_queue_until(
        &mut self,
        index: usize,
        handle: impl FnMut(DescriptorChain<&GuestMemory>, &GuestMemory) -> Option<u32>,
    ) {
        let name = self.name;
        let Some(active) = self.active.as_mut() else {
            guest_debug!(
                GuestFaultKind::Queue,
                index,
                "{name}: queue event before activation"
            );
            return;
        };
        let Some(q) = active.queues.get_mut(index) else {
            guest_warn!(
                GuestFaultKind::Queue,
                index,
                "{name}: event for a queue the device does not have"
            );
            return;
        };
        process_chains(name, &active.mem, &mut q.queue, &active.irq, handle);
    }
}

/// A virtio device behind a transport. A device implements `state` and
/// `state_mut`; the defaults serve the rest from its [`DeviceState`], and a
/// device overrides only what it does differently.
pub trait VirtioDevice: Send {
    fn state(&self) -> &DeviceState;
    fn state_mut(&mut self) -> &mut DeviceState;

    /// The virtio device type (TYPE_*).
    fn device_type(&self) -> u32 {
        self.state().device_type()
    }
    /// The maximum size of each of the device's queues; its length is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.state().queue_max_sizes()
    }
    /// The feature bits the device offers (including VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64 {
        self.state().avail_features()
    }
    /// The features the driver accepted.
    fn acked_features(&self) -> u64 {
        self.state().acked_features()
    }
    /// Records the features the driver accepted (checked with
    /// [`check_features`] by the transport).
    fn set_acked_features(&mut self, features: u64) {
        self.state_mut().set_acked_features(features);
    }
    /// Reads the device-specific config space; out of range reads zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.state().read_config(offset, data);
    }
    /// Writes the device-specific config space; read-only fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.state_mut().write_config(offset, data);
    }
    /// Starts the device on DRIVER_OK with the queues the driver set up.
    fn activate(
        &mut self,
        mem: GuestMemory,
        irq: Arc<IrqTrigger>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.state_mut().activate(mem, irq, queues)
    }
    /// Whether `activate` has run (and no reset since).
    fn is_activated(&self) -> bool {
        self.state().is_activated()
    }
    /// Resets the device on a driver reset (status 0). Returns false when the
    /// device cannot be reset, in which case the transport marks it
    /// DEVICE_NEEDS_RESET. A device that can calls [`DeviceState::reset`]
    /// and drops whatever else it holds for the driver.
    fn reset(&mut self) -> bool {
        false
    }
    /// Whether a snapshot can capture the device; the error says why not.
    /// A device whose whole state is its [`DeviceState`] and the transport's
    /// (no requests in flight between event loop turns) says yes.
    fn snapshot_support(&self) -> Result<(), String> {
        Err("snapshots of this device are not supported yet".into())
    }
    /// Called once a restored device is active again, before the guest
    /// runs: what a device owes the guest after a move to a new process.
    fn restored(&mut self) {}
}

#[cfg(test)]
mod tests;
