//! virtio-blk on a raw image file: the device, its config space and its one
//! request queue.
//!
//! Requests are parsed and executed in [`request`], so the part that faces a
//! hostile guest can be tested on its own; features, config space, the queue
//! loop, interrupts and event-manager plumbing are [`DeviceState`]'s; this
//! module opens the disk, lays out its features and config space, and
//! holds requests back while its [`RateLimiter`] says so (each request costs
//! one operation, and its data length in bytes for reads and writes).

mod request;

use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::warn;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};

use request::{complete, Disk, ID_LEN, SECTOR_SIZE};
pub use request::{DataBuffer, ParseError, Request, RequestError, RequestType};

use super::{DeviceEvent, DeviceState, VirtioDevice, TYPE_BLOCK};
use crate::rate_limiter::RateLimiter;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Header and status take one descriptor each; the rest may carry data.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// What the builder knows about a disk.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Reported to the guest by GET_ID; at most 20 bytes.
    pub serial: Option<String>,
}

/// Errors from creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the size of disk image {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk serial {serial:?} is longer than {ID_LEN} bytes")]
    SerialTooLong { serial: String },
    #[error("creating the activation eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// A virtio-blk device.
pub struct Block {
    disk: Disk,
    state: DeviceState,
    limiter: RateLimiter,
}

impl Block {
    pub fn new(cfg: BlockConfig) -> Result<Block, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(|source| BlockError::Open {
                path: cfg.path.clone(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| BlockError::Size {
                path: cfg.path.clone(),
                source,
            })?
            .len();
        if !len.is_multiple_of(SECTOR_SIZE) {
            warn!(path = %cfg.path.display(), len, "virtio-blk: image size is not a multiple of 512; the tail is not exposed");
        }
        let capacity = len / SECTOR_SIZE;
        let mut id = [0u8; ID_LEN];
        if let Some(serial) = &cfg.serial {
            if serial.len() > ID_LEN {
                return Err(BlockError::SerialTooLong {
                    serial: serial.clone(),
                });
            }
            id[..serial.len()].copy_from_slice(serial.as_bytes());
        }
        let mut avail_features = (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if cfg.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        // virtio_blk_config: le64 capacity, le32 size_max, le32 seg_max.
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        let state = DeviceState::new("virtio-blk", TYPE_BLOCK, &[QUEUE_SIZE], avail_features)
            .map_err(BlockError::EventFd)?
            .with_config(config.to_vec());
        Ok(Block {
            disk: Disk::new(file, capacity, cfg.read_only, id),
            state,
            limiter: RateLimiter::unlimited(),
        })
    }

    /// Limits the guest's requests (unlimited without). Set before the
    /// device joins the event loop, which then watches the limiter's timer.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = limiter;
        self
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// Processes the available requests on queue `index`, as many as the
    /// rate limiter lets through, and interrupts the guest if it asked for
    /// it. A request the limiter holds back stays first in the queue until
    /// its timer fires.
    pub fn process_queue(&mut self, index: usize) {
        if self.limiter.is_blocked() {
            return;
        }
        let disk = &self.disk;
        let limiter = &mut self.limiter;
        self.state.process_queue_until(index, |chain, mem| {
            // Malformed requests cost an operation too: parsing them is
            // the device's work all the same.
            let parsed = Request::parse(chain, mem);
            let bytes = parsed.as_ref().map_or(0, Request::transfer_len);
            limiter
                .consume(bytes, 1)
                .then(|| complete(disk, parsed, mem))
        });
    }
}

impl VirtioDevice for Block {
    fn state(&self) -> &DeviceState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }

    /// Requests complete within one event loop turn (synchronous I/O); a
    /// request the rate limiter holds back stays in the avail ring, which
    /// the restored device reads again. The rate limiter starts full.
    fn snapshot_support(&self) -> Result<(), String> {
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.state.reset();
        true
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.init(ops);
        self.limiter.register(ops, self.state.name());
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        match self.state.handle_event(fd, ops) {
            DeviceEvent::Queue(index) => self.process_queue(index),
            DeviceEvent::Other if self.limiter.is_timer(fd) => {
                self.limiter.on_timer();
                if self.state.is_activated() {
                    self.process_queue(0);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
