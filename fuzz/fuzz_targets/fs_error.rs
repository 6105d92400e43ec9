//! virtio-fs requests once the backend is gone: a guest whose memory
//! (descriptor table, rings, FUSE requests and answer buffers) is the fuzz
//! input has its queue served by the VMM's EIO path, from where the used
//! ring's index says (as the device resumes after the backend died).
//! Covers the chain walk, reading the in header and writing the out header
//! across split buffers, and the used-ring writes.
#![no_main]
use std::sync::atomic::Ordering;

use husk_fuzz::{active_queues, guest_memory};
use husk_vmm::devices::virtio::fs::fuse_error::answer;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

fuzz_target!(|data: &[u8]| {
    let mem = guest_memory(data);
    let Some(mut q) = active_queues(1).pop() else {
        return;
    };
    let queue = &mut q.queue;
    if let Ok(used) = queue.used_idx(&mem, Ordering::Acquire) {
        queue.set_next_avail(used.0);
        queue.set_next_used(used.0);
    }
    // The avail index bounds the walk (at most 2^16 chains); cap it lower
    // so one input stays fast.
    for _ in 0..256 {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let len = answer(chain, &mem, libc::EIO);
        assert!(len == 0 || len == 16);
        let _ = queue.add_used(&mem, head, len);
    }
});
