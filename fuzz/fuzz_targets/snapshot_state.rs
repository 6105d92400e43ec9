//! A snapshot's state file, as a restore reads it: the framing (magic,
//! version, length, CRC-64) and the JSON behind it. Nothing panics; a
//! frame that checks out gives back exactly its payload. The data is also
//! framed correctly, so that the fuzzer reaches the decoder and the
//! consistency checks past the checksum.
#![no_main]
use std::path::Path;

use husk_vmm::snapshot::format::{frame, unframe};
use husk_vmm::snapshot::SnapshotState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/fuzz/state");
    if let Ok(payload) = unframe(path, data) {
        let _ = SnapshotState::decode(path, payload);
    }
    let framed = frame(data);
    let payload = unframe(path, &framed).expect("a frame made here checks out");
    assert_eq!(payload, data, "the payload comes back unchanged");
    let _ = SnapshotState::decode(path, payload);
});
