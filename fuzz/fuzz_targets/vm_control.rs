//! The VMM's control socket: one JSON request per line from the shim, one
//! reply per line back. A request that parses must survive the round trip
//! through `request_line`; a reply line is parsed as the shim does.
#![no_main]
use husk_vm_config::control::{parse_reply, parse_request, request_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        if let Ok(request) = parse_request(line) {
            let again = request_line(&request);
            let again = again.strip_suffix(b"\n").unwrap_or(&again);
            assert_eq!(parse_request(again), Ok(request), "request round trip");
        }
        let _ = parse_reply(line);
    }
});
