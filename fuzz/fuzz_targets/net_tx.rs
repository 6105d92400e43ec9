//! virtio-net's tx path: every chain a guest (whose memory is the fuzz
//! input) makes available on queue 0 is gathered into a frame as
//! `Net::process_tx` does before writing it to the tap.
#![no_main]
use husk_fuzz::{guest_memory, queue};
use husk_vmm::devices::virtio::net::read_tx_frame;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

fuzz_target!(|data: &[u8]| {
    let mem = guest_memory(data);
    let mut q = queue(0);
    let mut frame = Vec::new();
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        if read_tx_frame(&mem, chain, &mut frame).is_ok() {
            assert!(frame.len() >= 12, "a frame holds its vnet header");
        }
        if q.add_used(&mem, head, 0).is_err() {
            break;
        }
    }
});
