//! What a snapshot keeps of a virtio-mmio device: the transport's register
//! file (status, feature selections, the queue layout the driver wrote,
//! InterruptStatus), the device's accepted features and config space, and
//! each active queue's next avail and used indexes. Restoring activates the
//! device again from that state, as DRIVER_OK did, without the guest
//! seeing a reset.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
use virtio_queue::QueueT;

use super::{lock, MmioError, MmioTransport, QueueConfig};
use crate::devices::virtio::device::check_features;

/// Errors capturing or restoring a virtio-mmio device.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{device}: cannot be snapshotted: {reason}")]
    Unsupported {
        device: &'static str,
        reason: String,
    },
    #[error("device type {saved} in the snapshot, {found} in the config")]
    DeviceType { saved: u32, found: u32 },
    #[error("{device}: the snapshot has {saved} queues, the device {found}")]
    QueueCount {
        device: &'static str,
        saved: usize,
        found: usize,
    },
    #[error("{device}: config space differs from the snapshot's (a disk of another size?)")]
    Config { device: &'static str },
    #[error("{device}: saved features {features:#x}: {reason}")]
    Features {
        device: &'static str,
        features: u64,
        reason: String,
    },
    #[error("{device}: the snapshot says active but the device saved no queues")]
    NoQueues { device: &'static str },
    #[error("{device}: cannot activate the restored queues: {source}")]
    Activate {
        device: &'static str,
        #[source]
        source: MmioError,
    },
}

/// One queue: what the driver wrote, and where the device was in its rings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// A virtio-mmio device's transport and generic device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    /// Always 0: husk never changes a config space under the driver.
    pub config_generation: u32,
    pub acked_features: u64,
    pub config: Vec<u8>,
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
}

impl MmioTransport {
    /// Whether the device behind this transport can be snapshotted.
    pub fn snapshot_support(&self) -> Result<(), PersistError> {
        let device = self.device();
        device
            .snapshot_support()
            .map_err(|reason| PersistError::Unsupported {
                device: device.state().name(),
                reason,
            })
    }

    /// The device's state; refused for a device that cannot be captured.
    /// The caller has paused the vCPUs and runs on the event loop's
    /// thread, so neither the driver nor the device moves meanwhile.
    pub fn snapshot(&self) -> Result<TransportSnapshot, PersistError> {
        let device = self.device();
        let name = device.state().name();
        device
            .snapshot_support()
            .map_err(|reason| PersistError::Unsupported {
                device: name,
                reason,
            })?;
        let mut queues: Vec<QueueSnapshot> = self
            .queues
            .iter()
            .map(|q| QueueSnapshot {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
                next_avail: 0,
                next_used: 0,
            })
            .collect();
        if let Some(active) = device.state().active() {
            for (saved, q) in queues.iter_mut().zip(&active.queues) {
                saved.next_avail = q.queue.next_avail();
                saved.next_used = q.queue.next_used();
            }
        }
        Ok(TransportSnapshot {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.irq.status(),
            config_generation: 0,
            acked_features: device.acked_features(),
            config: device.state().config().to_vec(),
            activated: device.is_activated(),
            queues,
        })
    }

    /// Puts a saved state into this freshly built transport and its device,
    /// and activates the device again if it was active.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), PersistError> {
        let name = lock(&self.device).state().name();
        if s.device_type != self.device_type {
            return Err(PersistError::DeviceType {
                saved: s.device_type,
                found: self.device_type,
            });
        }
        if s.queues.len() != self.queues.len() {
            return Err(PersistError::QueueCount {
                device: name,
                saved: s.queues.len(),
                found: self.queues.len(),
            });
        }
        if lock(&self.device).state().config() != s.config.as_slice() {
            return Err(PersistError::Config { device: name });
        }
        if s.acked_features != 0 {
            check_features(self.avail_features, s.acked_features).map_err(|e| {
                PersistError::Features {
                    device: name,
                    features: s.acked_features,
                    reason: e.to_string(),
                }
            })?;
        }
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        for (cfg, q) in self.queues.iter_mut().zip(&s.queues) {
            *cfg = QueueConfig {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
            };
        }
        lock(&self.device).set_acked_features(s.acked_features);
        if s.activated {
            if s.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
                return Err(PersistError::NoQueues { device: name });
            }
            let next: Vec<(u16, u16)> = s
                .queues
                .iter()
                .map(|q| (q.next_avail, q.next_used))
                .collect();
            // The same validation as at DRIVER_OK: rings inside guest
            // memory, sizes within the device's.
            self.activate_at(&next)
                .map_err(|source| PersistError::Activate {
                    device: name,
                    source,
                })?;
        }
        self.irq.restore_status(s.interrupt_status);
        if s.activated {
            lock(&self.device).restored();
            // A kick the old VMM had not served yet is lost with its
            // eventfd: have the device look at every queue once. A queue
            // with nothing new costs one empty pass.
            for (evt, q) in self.notify.iter().zip(&self.queues) {
                if q.ready {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!(device = name, error = %e, "cannot kick a restored queue");
                    }
                }
            }
        }
        if s.interrupt_status != 0 {
            // An interrupt the driver had not acknowledged: raise it again
            // rather than rely on the restored IOAPIC holding it (a spurious
            // one only makes the driver read the status).
            if let Err(e) = self.irq.trigger(s.interrupt_status) {
                tracing::warn!(device = name, error = %e, "cannot raise a restored interrupt");
            }
        }
        Ok(())
    }
}
