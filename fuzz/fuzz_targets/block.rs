//! virtio-blk requests: a guest whose memory (descriptor table, available
//! ring, request headers and buffers) is the fuzz input kicks queue 0 of a
//! block device backed by a 64-sector file. Covers the descriptor chain
//! walk, `Request::parse`, the disk I/O and the status/used-ring writes.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use husk_fuzz::{active_queues, guest_memory, irq};
use husk_vmm::devices::virtio::block::{Block, BlockConfig};
use husk_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::tempfile::TempFile;

/// The disk image, made once per fuzzing process.
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

fuzz_target!(|data: &[u8]| {
    let mut dev = Block::new(BlockConfig {
        path: image(),
        read_only: data.first().is_some_and(|b| b & 0x80 != 0),
        serial: Some("fuzz".into()),
    })
    .expect("opening the image");
    let mem = guest_memory(data);
    dev.activate(mem, irq(), active_queues(1))
        .expect("activating on one queue");
    dev.process_queue(0);
});
