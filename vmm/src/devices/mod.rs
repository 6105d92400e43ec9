//! Emulated devices: the buses, legacy PC devices and virtio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;
