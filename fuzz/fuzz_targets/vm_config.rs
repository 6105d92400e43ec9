//! vm.json as the VMM reads it: parse into a VmSpec, then validate.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = husk_vm_config::VmConfig::from_json(text) {
        // What the builder asks of every validated description.
        let _ = config.virtio_device_count();
    }
});
