//! virtio-blk on a raw image file: the device, its config space and its one
//! request queue.
//!
//! Requests are parsed and executed in [`request`], so the part that faces a
//! hostile guest can be tested on its own; the queue loop, interrupts and
//! event-manager plumbing are [`SingleQueue`]'s; this module owns the disk's
//! config space and features.

mod request;

use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::warn;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};

use request::{handle_chain, Disk, ID_LEN, SECTOR_SIZE};
pub use request::{DataBuffer, ParseError, Request, RequestError, RequestType};

use super::queue_events::SingleQueue;
use super::{
    read_config_space, ActivateError, ActiveQueue, GuestMemory, IrqTrigger, VirtioDevice,
    TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

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
    avail_features: u64,
    acked_features: u64,
    config: [u8; 16],
    queue: SingleQueue,
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
        let mut avail_features =
            VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if cfg.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        // virtio_blk_config: le64 capacity, le32 size_max, le32 seg_max.
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Block {
            disk: Disk::new(file, capacity, cfg.read_only, id),
            avail_features,
            acked_features: 0,
            config,
            queue: SingleQueue::new("virtio-blk").map_err(BlockError::EventFd)?,
        })
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// Processes every available request on queue `index` and interrupts the
    /// guest if it asked for it.
    pub fn process_queue(&mut self, index: usize) {
        if index != 0 {
            warn!(
                index,
                "virtio-blk: event for a queue the device does not have"
            );
            return;
        }
        let disk = &self.disk;
        self.queue
            .process(|chain, mem| handle_chain(disk, chain, mem));
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            offset,
            len = data.len(),
            "virtio-blk: config space is read-only"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        irq: Arc<IrqTrigger>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.queue.activate(mem, irq, queues)
    }

    fn is_activated(&self) -> bool {
        self.queue.is_activated()
    }

    fn reset(&mut self) -> bool {
        self.queue.reset();
        self.acked_features = 0;
        true
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.queue.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.queue.handle_event(events.fd(), ops) {
            self.process_queue(0);
        }
    }
}

#[cfg(test)]
mod tests;
