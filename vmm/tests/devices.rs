//! End-to-end tests of the VMM's virtio devices on the host's /dev/kvm,
//! driven by hand-made guests (tests/guests/*.S).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
mod common;

use common::*;

/// Runs a hand-made guest that ends by resetting the machine; returns what
/// it printed on COM1 and the VMM's stderr. `devices` holds the device
/// fields of the VM description.
fn run_resetting_guest(dir: &TempDir, guest: &str, devices: Value) -> (String, String) {
    let guest = build_guest(dir, guest);
    let serial = dir.path("serial.log");
    let mut config = json!({
        "vcpus": 1, "memory_mib": 64,
        "kernel": {"path": guest},
        "serial": {"output": "file", "path": serial},
    });
    for (k, v) in devices.as_object().unwrap() {
        config[k] = v.clone();
    }
    let child = spawn_vmm(dir, &config);
    let (status, stderr) = wait_exit_showing_console(child, Duration::from_secs(90), Some(&serial));
    let console = String::from_utf8(std::fs::read(&serial).unwrap()).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("guest requested a reset through the i8042"),
        "{stderr}"
    );
    (console, stderr)
}

/// What tests/guests/virtio_blk.inc prints while bringing up a virtio-blk
/// device of `sectors` sectors.
fn blk_bringup_lines(sectors: u64) -> String {
    format!(
        "magic ok\nversion 2\ndevice 2\nacknowledge\ndriver\nversion_1 offered\n\
         features_ok\ncapacity {sectors}\nqueue 0 ready\ndriver_ok\n"
    )
}

/// A disk image of `sectors` sectors where byte i of sector s is
/// (13 * i + 31 * s + 5) mod 256: no two sectors start alike.
fn patterned_disk(path: &Path, sectors: usize) -> Vec<u8> {
    let bytes: Vec<u8> = (0..sectors * 512)
        .map(|i| u8::try_from((13 * (i % 512) + 31 * (i / 512) + 5) % 256).unwrap())
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn virtio_blk_guest_handshakes_and_reads_sector_0() {
    let dir = TempDir::new("blkread");
    let disk = dir.path("disk.img");
    let bytes = patterned_disk(&disk, 8);
    let (console, _) = run_resetting_guest(
        &dir,
        "virtio_blk_read",
        json!({"block": [{"id": "disk0", "path": disk}]}),
    );
    let data: Vec<String> = bytes[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        console,
        format!(
            "{}read sector 0\nstatus 0\nused len 513\ndata {}\n",
            blk_bringup_lines(8),
            data.join(" ")
        )
    );
    // The pattern is not trivially 0..16.
    assert_eq!(&data[..3], ["05", "12", "1f"]);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        bytes,
        "a read changes nothing"
    );
}

/// The bytes tests/guests/virtio_blk_write.S writes to sector 1.
fn guest_write_pattern() -> Vec<u8> {
    (0..512)
        .map(|i: usize| u8::try_from((7 * i + 0x11) % 256).unwrap())
        .collect()
}

#[test]
fn virtio_blk_guest_writes_a_sector() {
    let dir = TempDir::new("blkwrite");
    let disk = dir.path("disk.img");
    let before = patterned_disk(&disk, 4);
    let (console, _) = run_resetting_guest(
        &dir,
        "virtio_blk_write",
        json!({"block": [{"id": "disk0", "path": disk}]}),
    );
    assert_eq!(
        console,
        format!(
            "{}write sector 1\nstatus 0\nused len 1\n",
            blk_bringup_lines(4)
        )
    );
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(&after[512..1024], guest_write_pattern().as_slice());
    assert_eq!(&after[..512], &before[..512], "sector 0 untouched");
    assert_eq!(&after[1024..], &before[1024..], "sectors 2.. untouched");
}

#[test]
fn virtio_blk_guest_write_to_read_only_disk_fails_with_ioerr() {
    let dir = TempDir::new("blkro");
    let disk = dir.path("disk.img");
    let before = patterned_disk(&disk, 4);
    let (console, stderr) = run_resetting_guest(
        &dir,
        "virtio_blk_write",
        json!({"block": [{"id": "disk0", "path": disk, "read_only": true}]}),
    );
    // VIRTIO_BLK_S_IOERR; only the status byte was written.
    assert_eq!(
        console,
        format!(
            "{}write sector 1\nstatus 1\nused len 1\n",
            blk_bringup_lines(4)
        )
    );
    assert_eq!(std::fs::read(&disk).unwrap(), before);
    assert!(stderr.contains("virtio-blk: request failed"), "{stderr}");
}

/// The guest connects to host port 5000 over virtio-vsock: the VMM must
/// connect to `<uds_path>_5000`, answer the guest with OP_RESPONSE, and
/// carry data both ways.
#[test]
fn virtio_vsock_guest_connects_to_a_host_port() {
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    let dir = TempDir::new("vsock");
    let uds = dir.path("v.sock");
    let listener = UnixListener::bind(dir.path("v.sock_5000")).unwrap();
    listener.set_nonblocking(true).unwrap();
    // The host side of the guest's connection: accept, send a line, read
    // the guest's answer (until EOF, which the VMM's exit brings).
    let host = std::thread::spawn(move || {
        let start = Instant::now();
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() > Duration::from_secs(60) {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream.write_all(b"ping\n").unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        Some(answer)
    });

    let (console, _) = run_resetting_guest(
        &dir,
        "virtio_vsock",
        json!({"vsock": {"guest_cid": 3, "uds_path": uds}}),
    );
    let answer = host.join().unwrap();
    assert_eq!(
        console,
        "magic ok\nversion 2\ndevice 19\nacknowledge\ndriver\nversion_1 offered\n\
         features_ok\nguest_cid 3\nqueue 0 ready\nqueue 1 ready\nqueue 2 ready\n\
         driver_ok\nrx buffers posted\nrequest sent\nvsock connected\n\
         received: ping\nsent pong\n"
    );
    let answer = answer.expect("the VMM never connected to <uds_path>_5000");
    assert_eq!(answer, b"pong\n");
    assert!(!uds.exists(), "the VMM removes its vsock socket on exit");
}

/// A driver that gets the handshake wrong is refused (FEATURES_OK without
/// VIRTIO_F_VERSION_1 does not stick; DRIVER_OK without queues sets
/// DEVICE_NEEDS_RESET and raises a config interrupt), and the device still
/// works after a reset; a second driver load over the active device (reset
/// and a new handshake on the same rings) works too.
#[test]
fn virtio_blk_guest_recovers_from_bad_handshakes_and_reloads() {
    let dir = TempDir::new("blkreinit");
    let disk = dir.path("disk.img");
    let bytes = patterned_disk(&disk, 8);
    let (console, stderr) = run_resetting_guest(
        &dir,
        "virtio_blk_reinit",
        json!({"block": [{"id": "disk0", "path": disk}]}),
    );
    let hex16 = |sector: usize| {
        let start = sector * 512;
        let b: Vec<String> = bytes[start..start + 16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        b.join(" ")
    };
    let bringup = blk_bringup_lines(8);
    assert_eq!(
        console,
        format!(
            "without VERSION_1\nstatus 3\n\
             without queues\nstatus 0\nstatus 11\nstatus 75\ninterrupt status 2\n\
             first driver\n{bringup}read sector 0\nstatus 0\nused len 513\ndata {}\n\
             second driver\n{bringup}read sector 2\nstatus 0\nused len 513\ndata {}\n",
            hex16(0),
            hex16(2)
        )
    );
    assert_ne!(hex16(0), hex16(2));
    assert!(
        stderr.contains("driver did not accept VIRTIO_F_VERSION_1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("activation failed, device needs reset"),
        "{stderr}"
    );
}

/// The guest finds the devices where the command line says: block devices
/// first, then vsock, then rng, one 4 KiB window each from 0xd000_0000
/// with IRQs from 5; past the last one, MMIO reads as all ones.
#[test]
fn virtio_devices_sit_where_the_command_line_says() {
    let dir = TempDir::new("probe");
    let disk0 = dir.path("disk0.img");
    let disk1 = dir.path("disk1.img");
    patterned_disk(&disk0, 1);
    patterned_disk(&disk1, 1);
    let guest = build_guest(&dir, "virtio_probe");
    let serial = dir.path("serial.log");
    let child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 1, "memory_mib": 64,
            "kernel": {"path": guest, "cmdline": "husk.probe=1"},
            "serial": {"output": "file", "path": serial},
            "block": [{"id": "disk0", "path": disk0}, {"id": "disk1", "path": disk1, "read_only": true}],
            "vsock": {"guest_cid": 7, "uds_path": dir.path("v.sock")},
            "rng": true,
        }),
    );
    let (status, stderr) = wait_exit_showing_console(child, Duration::from_secs(60), Some(&serial));
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(
        String::from_utf8(std::fs::read(&serial).unwrap()).unwrap(),
        "cmdline: husk.probe=1 \
         virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
         virtio_mmio.device=4K@0xd0002000:7 virtio_mmio.device=4K@0xd0003000:8\n\
         window 0: device 2\nwindow 1: device 2\nwindow 2: device 19\nwindow 3: device 4\n\
         window 4: magic ffffffff\n"
    );
}

/// virtiofsd (scripts/setup.sh installs it) serving `dir`/share on
/// `dir`/vfsd.sock, killed on drop.
struct Virtiofsd(std::process::Child);

impl Virtiofsd {
    fn start(dir: &TempDir) -> (Self, std::path::PathBuf) {
        let bin = "/usr/local/bin/virtiofsd";
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: scripts/setup.sh installs it"
        );
        let share = dir.path("share");
        std::fs::create_dir_all(&share).unwrap();
        let sock = dir.path("vfsd.sock");
        let child = std::process::Command::new(bin)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--shared-dir")
            .arg(&share)
            .args(["--sandbox", "none", "--log-level", "error"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for("virtiofsd's socket", Duration::from_secs(10), || {
            sock.exists()
        });
        (Self(child), sock)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A hand-made guest drives the virtio-fs device: virtiofsd answers its
/// FUSE_INIT through the queues (kick by ioeventfd, completion raised as
/// the device's interrupt); the test then kills virtiofsd, and the
/// guest's next request is answered by the VMM with EIO while the VM
/// keeps running to its reset.
#[test]
fn virtio_fs_guest_is_served_by_virtiofsd_then_gets_eio_when_it_dies() {
    let dir = TempDir::new("virtiofs");
    let (mut vfsd, sock) = Virtiofsd::start(&dir);
    let guest = build_guest(&dir, "virtio_fs");
    let serial = dir.path("serial.log");
    let config = json!({
        "vcpus": 1, "memory_mib": 64,
        "kernel": {"path": guest},
        "serial": {"output": "file", "path": serial},
        "fs": [{"tag": "husk-it", "socket": sock, "queue_size": 64}],
        "control_socket": dir.path("ctl.sock"),
    });
    let child = spawn_vmm(&dir, &config);
    let console =
        || String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
    wait_for("the FUSE_INIT answer", Duration::from_secs(60), || {
        console().contains("major ")
    });
    // A snapshot is refused, naming the device, before anything is paused
    // or written: virtiofsd holds the device's state.
    let mut ctl = Control::connect(&dir.path("ctl.sock"));
    let snap = dir.path("snap");
    let r = ctl.send(json!({"op": "snapshot", "path": snap}));
    assert_eq!(r["ok"], json!(false), "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("virtio-fs[husk-it]"), "{e}");
    assert!(e.contains("virtiofsd"), "{e}");
    assert!(!snap.exists(), "nothing written");
    assert_eq!(ctl.status()["state"], json!("running"));
    vfsd.kill();
    let (status, stderr) = wait_exit_showing_console(child, Duration::from_secs(90), Some(&serial));
    let console = console();
    assert_eq!(
        status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{stderr}"
    );
    assert_eq!(
        console,
        "magic ok\nversion 2\ndevice 26\nacknowledge\ndriver\nversion_1 offered\n\
         features_ok\ntag husk-it\nrequest queues 1\nqueue 0 ready\nqueue 1 ready\n\
         driver_ok\ninit error 00000000 unique 1 major 7\n\
         getattr error fffffffb unique 2 len 16\n",
        "stderr:\n{stderr}"
    );
    assert_eq!(
        stderr.matches("vhost-user backend is gone").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn virtio_fs_without_its_backend_fails_naming_the_socket() {
    let dir = TempDir::new("virtiofs-absent");
    let guest = build_guest(&dir, "hello_reset");
    let sock = dir.path("nobody.sock");
    let child = spawn_vmm(
        &dir,
        &json!({
            "vcpus": 1, "memory_mib": 64, "kernel": {"path": guest},
            "fs": [{"tag": "t", "socket": sock}],
        }),
    );
    let (status, stderr) = wait_exit(child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot connect to the vhost-user backend socket")
            && stderr.contains(&sock.display().to_string()),
        "{stderr}"
    );
}
