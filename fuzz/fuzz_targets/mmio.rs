//! The virtio-mmio transport's register state machine, in front of a real
//! virtio-blk device: the input is a sequence of guest operations (register
//! and config-space reads and writes of any width at any offset, writes to
//! guest memory, and the device running its queue as a QueueNotify would
//! make it), so the fuzzer can drive the status, feature and queue set-up
//! sequences (and resets) and then requests through the queue it set up.
#![no_main]
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use husk_fuzz::{guest_memory, irq, Input};
use husk_vmm::devices::bus::BusDevice;
use husk_vmm::devices::virtio::block::{Block, BlockConfig};
use husk_vmm::devices::virtio::mmio::MmioTransport;
use husk_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

fn image() -> PathBuf {
    static IMAGE: OnceLock<TempFile> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let f = TempFile::new().expect("a temporary disk image");
            f.as_file().set_len(64 * 512).expect("sizing the image");
            f
        })
        .as_path()
        .to_path_buf()
}

/// Access widths a guest can use (the transport must refuse all but 4 on
/// registers).
const WIDTHS: [usize; 4] = [1, 2, 4, 8];

fuzz_target!(|data: &[u8]| {
    let dev = Arc::new(Mutex::new(
        Block::new(BlockConfig {
            path: image(),
            read_only: false,
            serial: None,
        })
        .expect("opening the image"),
    ));
    let mem = guest_memory(&[]);
    let mut t = MmioTransport::new(mem.clone(), dev.clone(), irq()).expect("a transport");
    let mut input = Input::new(data);
    while let Some(op) = input.u8() {
        match op % 4 {
            0 => {
                let (Some(offset), Some(w)) = (input.u16(), input.u8()) else {
                    return;
                };
                let mut buf = [0u8; 8];
                t.read(
                    u64::from(offset % 0x200),
                    &mut buf[..WIDTHS[usize::from(w % 4)]],
                );
            }
            1 => {
                let (Some(offset), Some(w)) = (input.u16(), input.u8()) else {
                    return;
                };
                let Some(value) = input.take(WIDTHS[usize::from(w % 4)]) else {
                    return;
                };
                t.write(u64::from(offset % 0x200), value);
            }
            2 => {
                let (Some(addr), Some(len)) = (input.u16(), input.u8()) else {
                    return;
                };
                let Some(bytes) = input.take(usize::from(len)) else {
                    return;
                };
                // A write past the end of memory is the guest's own fault.
                let _ = mem.write_slice(bytes, GuestAddress(u64::from(addr)));
            }
            _ => {
                let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                if d.is_activated() {
                    d.process_queue(0);
                }
            }
        }
    }
});
