//! The virtio-mmio transport, version 2 (virtio 1.x, "modern" only).
//!
//! [`MmioTransport`] owns the register file the guest driver programs: feature
//! negotiation (by the rules in [`super::device`]), the device status state
//! machine and the raw queue layout. It turns the layout into validated
//! [`Queue`]s only at DRIVER_OK, then hands them to the device; after that the
//! data path never goes through here (queue notifications arrive as KVM
//! ioeventfds the device polls).

use crate::{guest_debug, guest_warn};
use husk_vm_config::control::GuestFaultKind;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{check_features, features_page, set_features_page};
use super::{ActivateError, ActiveQueue, GuestMemory, IrqTrigger, VirtioDevice, INT_CONFIG};

/// "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
const MMIO_VERSION: u32 = 2;
/// Like Firecracker, we do not claim a PCI vendor id.
const VENDOR_ID: u32 = 0;
/// Device-specific config space starts here; everything below is 32-bit registers.
const CONFIG_SPACE: u64 = reg::VIRTIO_MMIO_CONFIG as u64;
/// Size of the MMIO window the builder should reserve per device.
pub const MMIO_LEN: u64 = 0x1000;

/// Errors from creating or activating the transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("creating the notify eventfd of queue {index}: {source}")]
    NotifyEventFd {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("queue {index}: the device's maximum size {max} is not a valid queue size")]
    QueueMaxSize { index: usize, max: u16 },
    #[error("queue {index}: {what} is invalid: {source:?}")]
    QueueConfig {
        index: usize,
        what: &'static str,
        source: virtio_queue::Error,
    },
    #[error("queue {index}: rings are not inside guest memory")]
    QueueLayout { index: usize },
    #[error("queue {index} is ready but queue {index_before} is not")]
    QueueGap { index: usize, index_before: usize },
    #[error("duplicating the notify eventfd of queue {index}: {source}")]
    NotifyClone {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("device activation: {0}")]
    Activate(#[from] ActivateError),
}

/// What the driver wrote for one queue; validated only at DRIVER_OK.
#[derive(Debug, Clone, Copy, Default)]
struct QueueConfig {
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Arc<Mutex<dyn VirtioDevice>>,
    irq: Arc<IrqTrigger>,
    // Fixed per device; cached so register reads don't wait on the device
    // lock while its event thread does I/O.
    device_type: u32,
    avail_features: u64,
    max_sizes: Vec<u16>,
    queues: Vec<QueueConfig>,
    notify: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
}

/// The register at `offset` (below [`CONFIG_SPACE`]). An offset past
/// 32 bits maps to `u32::MAX`, which names no register, rather than
/// wrapping onto one.
fn register(offset: u64) -> u32 {
    u32::try_from(offset).unwrap_or(u32::MAX)
}

/// Sets the low or high half of a 64-bit register pair.
fn set_half(reg: &mut u64, value: u32, high: bool) {
    *reg = if high {
        (*reg & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (*reg & !0xffff_ffff) | u64::from(value)
    };
}

impl MmioTransport {
    /// Wraps `device`; creates one notify eventfd per device queue.
    pub fn new(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irq: Arc<IrqTrigger>,
    ) -> Result<Self, MmioError> {
        let (device_type, avail_features, max_sizes) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.avail_features(),
                d.queue_max_sizes().to_vec(),
            )
        };
        for (index, &max) in max_sizes.iter().enumerate() {
            if Queue::new(max).is_err() {
                return Err(MmioError::QueueMaxSize { index, max });
            }
        }
        let notify = (0..max_sizes.len())
            .map(|index| {
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| MmioError::NotifyEventFd { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            mem,
            device,
            irq,
            device_type,
            avail_features,
            queues: vec![QueueConfig::default(); max_sizes.len()],
            max_sizes,
            notify,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
        })
    }

    /// One eventfd per queue, in queue order. The builder registers each as a
    /// KVM ioeventfd at base + 0x50 with datamatch = its queue index.
    pub fn queue_notify_events(&self) -> &[EventFd] {
        &self.notify
    }

    /// The device status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.status
    }

    fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        lock(&self.device)
    }

    /// Whether every bit of `set` is set and none of `clear`.
    fn status_is(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        let sel = self.queue_sel as usize;
        let q = self.queues.get_mut(sel);
        if q.is_none() {
            guest_warn!(
                GuestFaultKind::Mmio,
                queue = sel,
                "virtio-mmio: access to a queue the device does not have"
            );
        }
        q
    }

    fn read_register(&self, offset: u64) -> u32 {
        match register(offset) {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device_type,
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => {
                features_page(self.avail_features, self.device_features_sel)
            }
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .max_sizes
                .get(self.queue_sel as usize)
                .copied()
                .map_or(0, u32::from),
            reg::VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.irq.status(),
            reg::VIRTIO_MMIO_STATUS => self.status,
            // Config space never changes under the driver's feet.
            reg::VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                guest_warn!(
                    GuestFaultKind::Mmio,
                    offset,
                    "virtio-mmio: read of an unknown register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        // Features are negotiated between DRIVER and FEATURES_OK, queues are
        // laid out between FEATURES_OK and DRIVER_OK (virtio 1.2, 3.1.1).
        let features_open = self.status_is(
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED,
        );
        let queues_open = self.status_is(
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED,
        );
        let bad_state = || {
            guest_warn!(
                GuestFaultKind::Mmio,
                offset,
                value = v,
                "virtio-mmio: register write ignored in this device status"
            )
        };
        let register = register(offset);
        match register {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES if features_open => {
                let sel = self.driver_features_sel;
                if !set_features_page(&mut self.driver_features, sel, v) {
                    guest_warn!(
                        GuestFaultKind::Mmio,
                        sel,
                        "virtio-mmio: driver features write to a page past 1"
                    );
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            reg::VIRTIO_MMIO_QUEUE_NUM if queues_open => {
                if let Some(q) = self.selected_queue() {
                    // Validated at DRIVER_OK; sizes past u16 become 0, which fails there.
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_READY if queues_open => {
                if let Some(q) = self.selected_queue() {
                    q.ready = v == 1;
                }
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH if queues_open => {
                let high = register == reg::VIRTIO_MMIO_QUEUE_DESC_HIGH;
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.desc, v, high);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH if queues_open => {
                let high = register == reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH;
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.driver, v, high);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW | reg::VIRTIO_MMIO_QUEUE_USED_HIGH if queues_open => {
                let high = register == reg::VIRTIO_MMIO_QUEUE_USED_HIGH;
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.device, v, high);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.irq.ack(v),
            reg::VIRTIO_MMIO_STATUS => self.set_status(v),
            reg::VIRTIO_MMIO_DRIVER_FEATURES
            | reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_READY
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => bad_state(),
            _ => guest_warn!(
                GuestFaultKind::Mmio,
                offset,
                value = v,
                "virtio-mmio: write to an unknown or read-only register"
            ),
        }
    }

    /// A QueueNotify that KVM did not catch as an ioeventfd (e.g. before the
    /// builder registered it): forward it to the same eventfd.
    fn notify(&self, index: u32) {
        if !self.status_is(VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET) {
            guest_warn!(
                GuestFaultKind::Mmio,
                index,
                "virtio-mmio: queue notify before DRIVER_OK ignored"
            );
            return;
        }
        match self.notify.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    guest_warn!(GuestFaultKind::Device, index, error = %e, "virtio-mmio: signalling the queue notify eventfd");
                }
            }
            None => guest_warn!(
                GuestFaultKind::Mmio,
                index,
                "virtio-mmio: notify for a queue the device does not have"
            ),
        }
    }

    /// The status state machine of virtio 1.2, 3.1.1: each write adds exactly
    /// the next bit (or FAILED); 0 resets.
    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            guest_warn!(
                GuestFaultKind::Mmio,
                old,
                new = v,
                "virtio-mmio: driver tried to clear status bits without a reset"
            );
            return;
        }
        let added = v & !old;
        // NEEDS_RESET is ours to set; the driver echoing it back is harmless.
        let added = added & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let base = old & !VIRTIO_CONFIG_S_NEEDS_RESET;
        const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
        const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
        match (base, added) {
            (_, 0) => {}
            (_, VIRTIO_CONFIG_S_FAILED) => self.status |= VIRTIO_CONFIG_S_FAILED,
            (0, ACK) => self.status = ACK,
            (ACK, DRIVER) => self.status |= DRIVER,
            (b, FEATURES_OK) if b == ACK | DRIVER => self.features_ok(),
            (b, VIRTIO_CONFIG_S_DRIVER_OK) if b == ACK | DRIVER | FEATURES_OK => self.driver_ok(),
            _ => guest_warn!(
                GuestFaultKind::Mmio,
                old,
                new = v,
                "virtio-mmio: invalid device status transition ignored"
            ),
        }
    }

    fn features_ok(&mut self) {
        let offered = self.avail_features;
        let acked = self.driver_features;
        match check_features(offered, acked) {
            Ok(()) => {
                self.device().set_acked_features(acked);
                self.status |= VIRTIO_CONFIG_S_FEATURES_OK;
            }
            // Refusing leaves FEATURES_OK clear, which the driver reads back.
            Err(e) => guest_warn!(
                GuestFaultKind::Mmio,
                offered,
                acked,
                "virtio-mmio: features refused: {e}"
            ),
        }
    }

    fn driver_ok(&mut self) {
        match self.activate() {
            Ok(()) => self.status |= VIRTIO_CONFIG_S_DRIVER_OK,
            Err(e) => {
                guest_warn!(GuestFaultKind::Device, error = %e, "virtio-mmio: activation failed, device needs reset");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                if let Err(e) = self.irq.trigger(INT_CONFIG) {
                    guest_warn!(GuestFaultKind::Device, error = %e, "virtio-mmio: raising the config interrupt");
                }
            }
        }
    }

    /// Builds one validated [`Queue`] per ready queue (the ready ones must be
    /// a prefix: devices index their queues by position) and activates the
    /// device with them.
    fn activate(&mut self) -> Result<(), MmioError> {
        self.activate_at(&[])
    }

    /// [`activate`](Self::activate), with queue `i` resuming at the ring
    /// indexes `next[i]` (next avail, next used) a snapshot saved.
    fn activate_at(&mut self, next: &[(u16, u16)]) -> Result<(), MmioError> {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let ready = self.queues.iter().take_while(|q| q.ready).count();
        if let Some(index) = self.queues.iter().skip(ready).position(|q| q.ready) {
            return Err(MmioError::QueueGap {
                index: ready + index,
                index_before: ready,
            });
        }
        let mut active = Vec::with_capacity(ready);
        for (index, cfg) in self.queues.iter().take(ready).enumerate() {
            let max = self.max_sizes[index];
            let mut queue = Queue::new(max).map_err(|_| MmioError::QueueMaxSize { index, max })?;
            let config_err = |what| {
                move |source| MmioError::QueueConfig {
                    index,
                    what,
                    source,
                }
            };
            queue.try_set_size(cfg.size).map_err(config_err("size"))?;
            queue
                .try_set_desc_table_address(GuestAddress(cfg.desc))
                .map_err(config_err("descriptor table address"))?;
            queue
                .try_set_avail_ring_address(GuestAddress(cfg.driver))
                .map_err(config_err("driver area address"))?;
            queue
                .try_set_used_ring_address(GuestAddress(cfg.device))
                .map_err(config_err("device area address"))?;
            queue.set_event_idx(event_idx);
            if let Some(&(avail, used)) = next.get(index) {
                queue.set_next_avail(avail);
                queue.set_next_used(used);
            }
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return Err(MmioError::QueueLayout { index });
            }
            let notify = self.notify[index]
                .try_clone()
                .map_err(|source| MmioError::NotifyClone { index, source })?;
            active.push(ActiveQueue { queue, notify });
        }
        let mem = self.mem.clone();
        let irq = self.irq.clone();
        self.device().activate(mem, irq, active)?;
        Ok(())
    }

    fn reset(&mut self) {
        guest_debug!(GuestFaultKind::Device, "virtio-mmio: driver reset");
        let was_active = self.device().is_activated();
        if was_active && !self.device().reset() {
            guest_warn!(
                GuestFaultKind::Device,
                "virtio-mmio: device cannot be reset"
            );
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            return;
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues.fill(QueueConfig::default());
        // Clear stale interrupt status so a reset device starts quiet.
        self.irq.ack(u32::MAX);
    }
}

/// Locks a device; a poisoned lock (a panicked device thread) still holds a
/// memory-safe device, so keep serving rather than take the VMM down.
fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl crate::devices::bus::BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE {
            self.device().read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            guest_warn!(
                GuestFaultKind::Mmio,
                offset,
                len = data.len(),
                "virtio-mmio: register read of the wrong width"
            );
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status_is(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FAILED) {
                self.device().write_config(offset - CONFIG_SPACE, data);
            } else {
                guest_warn!(
                    GuestFaultKind::Mmio,
                    offset,
                    "virtio-mmio: config write before DRIVER ignored"
                );
            }
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            guest_warn!(
                GuestFaultKind::Mmio,
                offset,
                len = data.len(),
                "virtio-mmio: register write of the wrong width"
            );
        }
    }
}

pub mod persist;
#[cfg(test)]
mod tests;
