//! virtio-balloon, for free page reporting only: the guest tells the host
//! which of its memory is free, and the host gives those pages back, so a
//! VM costs the host what its guest uses now rather than its high-water
//! mark.
//!
//! The host never asks the guest to inflate (`num_pages` stays 0), so the
//! inflate and deflate queues only see what a guest sends on its own; their
//! buffers are returned untouched and nothing is discarded for them (a
//! guest that inflates without being asked keeps using its pages as far as
//! the host is concerned). With VIRTIO_BALLOON_F_REPORTING the Linux driver
//! sets up the reporting queue as queue 2: absent optional queues (stats,
//! free page hints) take no index with virtio-mmio. Each of its
//! descriptors is one free range, checked and discarded by [`discard`].
//!
//! Features, config space, the queue loop, interrupts and the event-manager
//! plumbing are [`DeviceState`]'s; this module lays out the config space,
//! routes each queue and keeps the counters.

pub mod discard;

use crate::{guest_info, guest_warn};
use husk_vm_config::control::{FreePageCount, GuestFaultKind};
use std::io;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_queue::DescriptorChain;

pub use discard::{discard, DiscardError, PAGE_SIZE};

use super::{DeviceEvent, DeviceState, GuestMemory, VirtioDevice, TYPE_BALLOON};

/// Free page reporting (virtio 1.2, 5.5.3): feature bit 5.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Each queue's size. The Linux driver refuses a reporting queue smaller
/// than its 32-entry report (PAGE_REPORTING_CAPACITY).
pub const QUEUE_SIZE: u16 = 256;
pub const INFLATE_QUEUE: usize = 0;
pub const DEFLATE_QUEUE: usize = 1;
pub const REPORTING_QUEUE: usize = 2;
/// `struct virtio_balloon_config`: num_pages, actual,
/// free_page_hint_cmd_id, poison_val; all le32.
pub const CONFIG_LEN: usize = 16;
/// `actual`, the pages the driver says it holds: the one field it writes
/// (poison_val only with F_PAGE_POISON, which husk does not offer).
const CONFIG_ACTUAL: std::ops::Range<usize> = 4..8;
/// Refused ranges logged one by one before the log turns to powers of two.
const LOG_FIRST_ERRORS: u64 = 8;

/// Errors from creating the device.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("creating the activation eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// What the device has done since it was created.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonStats {
    /// Bytes of reported free memory given back to the host.
    pub reported_bytes: u64,
    /// Reported ranges given back.
    pub reported_ranges: u64,
    /// Reported ranges refused or failed (see [`DiscardError`]).
    pub refused_ranges: u64,
    /// Chains the guest put on the inflate or deflate queue (returned
    /// untouched).
    pub inflate_deflate_chains: u64,
}

/// A virtio-balloon device that never asks for memory and takes back what
/// the guest reports free.
pub struct Balloon {
    state: DeviceState,
    stats: BalloonStats,
}

impl Balloon {
    /// A balloon offering free page reporting if `free_page_reporting`.
    pub fn new(free_page_reporting: bool) -> Result<Balloon, BalloonError> {
        let features = if free_page_reporting {
            1 << VIRTIO_BALLOON_F_REPORTING
        } else {
            0
        };
        let state = DeviceState::new("virtio-balloon", TYPE_BALLOON, &[QUEUE_SIZE; 3], features)
            .map_err(BalloonError::EventFd)?
            // num_pages 0: the host never asks the guest to inflate.
            .with_config(vec![0; CONFIG_LEN])
            .with_writable_config(CONFIG_ACTUAL)
            // Without F_REPORTING the driver sets up inflate and deflate only.
            .with_min_queues(2);
        Ok(Balloon {
            state,
            stats: BalloonStats::default(),
        })
    }

    pub fn stats(&self) -> BalloonStats {
        self.stats
    }

    /// The free page counters a status reply carries.
    pub fn free_page_count(&self) -> FreePageCount {
        FreePageCount {
            reported_bytes: self.stats.reported_bytes,
            reported_ranges: self.stats.reported_ranges,
            refused_ranges: self.stats.refused_ranges,
        }
    }

    /// Answers every available chain on queue `index`.
    pub fn process_queue(&mut self, index: usize) {
        let reporting =
            index == REPORTING_QUEUE && self.state.has_feature(VIRTIO_BALLOON_F_REPORTING);
        let stats = &mut self.stats;
        match index {
            INFLATE_QUEUE | DEFLATE_QUEUE => self.state.process_queue(index, |_, _| {
                stats.inflate_deflate_chains += 1;
                0
            }),
            _ if reporting => self
                .state
                .process_queue(index, |chain, mem| report_chain(chain, mem, stats)),
            _ => {
                // A queue 2 without F_REPORTING would be the stats queue,
                // which husk does not offer: hand the buffers back.
                guest_warn!(
                    GuestFaultKind::Queue,
                    index,
                    "virtio-balloon: chains on a queue it does not serve"
                );
                self.state.process_queue(index, |_, _| 0);
            }
        }
    }
}

/// Discards every free range of one report; the used length is 0 (the
/// device writes nothing into the buffers).
fn report_chain(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    stats: &mut BalloonStats,
) -> u32 {
    for desc in chain {
        let addr = desc.addr().0;
        let len = u64::from(desc.len());
        // The driver lends reported pages as device-writable buffers; a
        // readable one says the guest still wants its contents.
        if !desc.is_write_only() {
            refuse(stats, &"a device-readable descriptor", addr, len);
            continue;
        }
        match discard(mem, addr, len) {
            Ok(()) => {
                stats.reported_bytes += len;
                stats.reported_ranges += 1;
            }
            Err(e) => refuse(stats, &e, addr, len),
        }
    }
    debug!(
        reported_mib = stats.reported_bytes >> 20,
        "virtio-balloon: free pages returned to the host"
    );
    0
}

/// Counts a refused range and logs it, the first few one by one and then
/// only at powers of two, so a guest sending garbage cannot flood the log.
fn refuse(stats: &mut BalloonStats, why: &dyn std::fmt::Display, addr: u64, len: u64) {
    stats.refused_ranges += 1;
    let n = stats.refused_ranges;
    if n <= LOG_FIRST_ERRORS || n.is_power_of_two() {
        warn!(
            addr = format_args!("{addr:#x}"),
            len,
            refused_so_far = n,
            "virtio-balloon: free page report refused: {why}"
        );
    }
}

impl VirtioDevice for Balloon {
    fn state(&self) -> &DeviceState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }

    /// Reports are handled within one event loop turn; the counters
    /// start again at zero in the restored VMM.
    fn snapshot_support(&self) -> Result<(), String> {
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.state.reset();
        // `actual` is the driver's; a new driver starts from an empty balloon.
        self.state.config_mut()[CONFIG_ACTUAL].fill(0);
        true
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.state.handle_event(events.fd(), ops) {
            DeviceEvent::Queue(index) => self.process_queue(index),
            DeviceEvent::Activated => guest_info!(
                GuestFaultKind::Device,
                free_page_reporting = self.state.has_feature(VIRTIO_BALLOON_F_REPORTING),
                "virtio-balloon: driver ready"
            ),
            DeviceEvent::Handled | DeviceEvent::Other => {}
        }
    }
}

#[cfg(test)]
mod tests;
