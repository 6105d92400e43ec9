//! virtio-vsock: a guest whose memory is the fuzz input kicks the tx queue
//! (queue 1) of a vsock device; its packets go through `parse_tx` to the
//! muxer (a guest connect to host port 1024 reaches a listening host
//! socket and gets a connection, other ports are refused with RST, stray
//! packets are answered with RST), then the rx queue (queue 0) takes the
//! device's replies. The input's first line is also tried as the hybrid
//! vsock handshake (`CONNECT <port>`) a host client sends.
#![no_main]
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use husk_fuzz::{active_queues, guest_memory, irq};
use husk_vmm::devices::virtio::vsock::muxer::parse_connect;
use husk_vmm::devices::virtio::vsock::packet::Header;
use husk_vmm::devices::virtio::vsock::Vsock;
use husk_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::tempdir::TempDir;

const GUEST_CID: u64 = 3;

/// A fresh listener path per iteration under one directory per process.
fn uds_path() -> PathBuf {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = DIR.get_or_init(|| TempDir::new().expect("a temporary directory"));
    dir.as_path()
        .join(format!("v{}", N.fetch_add(1, Ordering::Relaxed)))
}

fuzz_target!(|data: &[u8]| {
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    if let Ok(port) = parse_connect(line) {
        assert_eq!(
            parse_connect(format!("CONNECT {port}").as_bytes()),
            Ok(port)
        );
    }
    if let Some(raw) = data.get(..44).and_then(|b| <&[u8; 44]>::try_from(b).ok()) {
        let hdr = Header::from_bytes(raw);
        assert_eq!(
            Header::from_bytes(&hdr.to_bytes()).to_bytes(),
            hdr.to_bytes()
        );
    }

    let path = uds_path();
    // The host service a guest connects to: `<uds_path>_<port>`. Nothing
    // accepts; the kernel's backlog completes the connect.
    let service = PathBuf::from(format!("{}_1024", path.display()));
    let listener = UnixListener::bind(&service).expect("a host service socket");
    let mut dev = Vsock::new(GUEST_CID, path).expect("a vsock device");
    dev.activate(guest_memory(data), irq(), active_queues(3))
        .expect("activating on three queues");
    let _ = dev.process_tx();
    let _ = dev.process_rx();
    drop(dev);
    drop(listener);
    let _ = std::fs::remove_file(&service);
});
