//! Device tests: the config space, the EIO answers of a device whose
//! backend is gone (the test plays the guest driver on real virtqueues),
//! and the whole device against a real virtiofsd (installed by
//! scripts/setup.sh): negotiation, a FUSE_INIT the backend answers through
//! the queues, then the backend killed and the next request failed by the
//! VMM with EIO.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress};

use super::fuse_error::{answer, out_header, IN_HEADER_LEN, OUT_HEADER_LEN};
use super::*;
use crate::devices::virtio::test_utils::{managed, GuestQueue, Manager};
use crate::devices::virtio::{GuestMemory, IrqTrigger, VIRTIO_F_VERSION_1};
use crate::vstate::memory::{self, Backing};

const VIRTIOFSD: &str = "/usr/local/bin/virtiofsd";
const REQ: u64 = 0x10_0000;
const REPLY: u64 = 0x11_0000;
const FUSE_INIT: u32 = 26;
const FUSE_GETATTR: u32 = 3;

#[test]
fn config_space_is_tag_then_request_queue_count() {
    let c = config_space("husk-share", 3).unwrap();
    assert_eq!(c.len(), 40);
    assert_eq!(&c[..10], b"husk-share");
    assert!(c[10..36].iter().all(|&b| b == 0));
    assert_eq!(&c[36..], &3u32.to_le_bytes());
    // A 36-byte tag fills the field with no NUL.
    let tag = "t".repeat(36);
    assert_eq!(&config_space(&tag, 1).unwrap()[..36], tag.as_bytes());
    assert!(matches!(config_space("", 1), Err(FsError::Tag(_))));
    assert!(matches!(
        config_space(&"t".repeat(37), 1),
        Err(FsError::Tag(_))
    ));
}

/// A FUSE request: the in header (len, opcode, unique, nodeid...) and `arg`.
fn request(opcode: u32, unique: u64, arg: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; IN_HEADER_LEN];
    let len = u32::try_from(IN_HEADER_LEN + arg.len()).unwrap();
    r[0..4].copy_from_slice(&len.to_le_bytes());
    r[4..8].copy_from_slice(&opcode.to_le_bytes());
    r[8..16].copy_from_slice(&unique.to_le_bytes());
    r[16..24].copy_from_slice(&1u64.to_le_bytes());
    r.extend_from_slice(arg);
    r
}

/// The out header at `addr`: (len, error, unique).
fn read_out_header(mem: &GuestMemory, addr: u64) -> (u32, i32, u64) {
    let len: u32 = mem.read_obj(GuestAddress(addr)).unwrap();
    let error: i32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
    let unique: u64 = mem.read_obj(GuestAddress(addr + 8)).unwrap();
    (len, error, unique)
}

#[test]
fn out_header_is_len_negative_errno_unique() {
    let h = out_header(0x1122_3344_5566_7788, libc::EIO);
    assert_eq!(&h[0..4], &16u32.to_le_bytes());
    assert_eq!(&h[4..8], &(-libc::EIO).to_le_bytes());
    assert_eq!(&h[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
}

#[test]
fn error_answers_copy_unique_across_split_buffers_and_refuse_bad_ones() {
    let mem = memory::create(4, false, Backing::Private).unwrap();
    let mem: &'static GuestMemory = Box::leak(Box::new(mem));
    let mut q = GuestQueue::new(mem, 0);
    let req = request(FUSE_GETATTR, 0xabcd, &[0u8; 16]);
    mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    // The in header split over two readable descriptors (12 + rest), the
    // answer over two writable ones (10 + 6).
    let split = q.add_chain(&[
        (REQ, 12, false),
        (REQ + 12, 44, false),
        (REPLY, 10, true),
        (REPLY + 0x100, 6, true),
    ]);
    // No writable room (a FORGET): no answer, used length 0.
    let forget = q.add_chain(&[(REQ, 56, false)]);
    // Writable room outside guest memory: nothing written.
    let outside = q.add_chain(&[(REQ, 56, false), (0x40_0000 - 8, 16, true)]);
    // Too little room for a header.
    let short = q.add_chain(&[(REQ, 56, false), (REPLY + 0x200, 8, true)]);
    mem.write_slice(&[0xee; 8], GuestAddress(REPLY + 0x200))
        .unwrap();

    let mut queue = q.active().queue;
    let mut lens = Vec::new();
    while let Some(chain) = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, mem) {
        lens.push((chain.head_index(), answer(chain, mem, libc::EIO)));
    }
    assert_eq!(
        lens,
        vec![(split, 16), (forget, 0), (outside, 0), (short, 0)]
    );
    let mut first = [0u8; 10];
    let mut second = [0u8; 6];
    mem.read_slice(&mut first, GuestAddress(REPLY)).unwrap();
    mem.read_slice(&mut second, GuestAddress(REPLY + 0x100))
        .unwrap();
    let whole: Vec<u8> = first.iter().chain(&second).copied().collect();
    assert_eq!(whole, out_header(0xabcd, libc::EIO));
    let mut untouched = [0u8; 8];
    mem.read_slice(&mut untouched, GuestAddress(REPLY + 0x200))
        .unwrap();
    assert_eq!(untouched, [0xee; 8]);
    // A chain of one descriptor shorter than the header still gets an
    // answer (unique 0): the guest's request fails, never hangs.
    let tiny = q.add_chain(&[(REQ, 4, false), (REPLY + 0x300, 16, true)]);
    let chain = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, mem).unwrap();
    assert_eq!(chain.head_index(), tiny);
    assert_eq!(answer(chain, mem, libc::EIO), 16);
    assert_eq!(read_out_header(mem, REPLY + 0x300), (16, -libc::EIO, 0));
    assert_eq!(OUT_HEADER_LEN, 16);
}

/// A scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-fs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("share")).unwrap();
    dir
}

/// virtiofsd serving `dir`/share on `dir`/vfsd.sock, killed on drop.
struct Virtiofsd {
    child: Child,
    socket: PathBuf,
}

impl Virtiofsd {
    fn start(dir: &Path) -> Self {
        assert!(
            Path::new(VIRTIOFSD).exists(),
            "{VIRTIOFSD} is missing: scripts/setup.sh installs it"
        );
        let socket = dir.join("vfsd.sock");
        let child = Command::new(VIRTIOFSD)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(dir.join("share"))
            .args([
                "--sandbox",
                "none",
                "--cache",
                "never",
                "--log-level",
                "error",
            ])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "virtiofsd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn fs_config(socket: &Path) -> FsConfig {
    FsConfig {
        tag: "husk-test".into(),
        socket: socket.to_path_buf(),
        num_request_queues: 1,
        queue_size: 64,
    }
}

/// Runs the event loop until `done` or 10 s.
fn run_until(em: &mut Manager, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        em.run_with_timeout(50).unwrap();
    }
}

#[test]
fn absent_socket_is_an_error_naming_it() {
    let dir = scratch("absent");
    let sock = dir.join("nobody.sock");
    let e = Fs::new(&fs_config(&sock)).err().unwrap().to_string();
    assert!(e.contains(&sock.display().to_string()), "{e}");
    assert!(e.contains("cannot connect"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn too_many_request_queues_for_virtiofsd_are_refused() {
    let dir = scratch("mq");
    let vfsd = Virtiofsd::start(&dir);
    let mut cfg = fs_config(&vfsd.socket);
    cfg.num_request_queues = 4;
    let e = Fs::new(&cfg).err().unwrap().to_string();
    assert!(e.contains("serves 2 queues, the device has 5"), "{e}");
    drop(vfsd);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn virtiofsd_serves_the_queues_and_a_dead_one_gets_eio_answers() {
    let dir = scratch("e2e");
    let mut vfsd = Virtiofsd::start(&dir);
    let fs = Fs::new(&fs_config(&vfsd.socket)).unwrap();
    // What virtiofsd offers, narrowed to what husk passes on.
    let ring = (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);
    assert_eq!(fs.avail_features(), VIRTIO_F_VERSION_1 | ring);
    assert_eq!(fs.queue_max_sizes(), &[64, 64]);
    let mut cfg = [0u8; 40];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..9], b"husk-test");
    assert_eq!(&cfg[36..], &1u32.to_le_bytes());

    let mem = memory::create(4, false, Backing::SharedMemfd).unwrap();
    let mem: &'static GuestMemory = Box::leak(Box::new(mem));
    let (fs, mut em) = managed(fs);
    let hiprio = GuestQueue::new(mem, 0);
    let mut requests = GuestQueue::new(mem, 0x4000);
    let irq = Arc::new(IrqTrigger::new(
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let queues = vec![hiprio.active(), requests.active()];
    let kick = queues[1].notify.try_clone().unwrap();
    {
        let mut dev = fs.lock().unwrap();
        dev.set_acked_features(VIRTIO_F_VERSION_1);
        dev.activate(mem.clone(), irq.clone(), queues).unwrap();
    }
    run_until(&mut em, || fs.lock().unwrap().stats().backend_starts == 1);
    // Active, but no request yet: virtiofsd holds only the rings, which a
    // restore sets up again, so a snapshot may be taken.
    assert_eq!(fs.lock().unwrap().snapshot_support(), Ok(()));

    // FUSE_INIT (7.31, the 16-byte fuse_init_in) answered by virtiofsd.
    let mut init_in = Vec::new();
    for v in [7u32, 31, 0x2_0000, 0] {
        init_in.extend_from_slice(&v.to_le_bytes());
    }
    let req = request(FUSE_INIT, 7, &init_in);
    mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    let len = u32::try_from(req.len()).unwrap();
    let head = requests.add_chain(&[(REQ, len, false), (REPLY, 256, true)]);
    kick.write(1).unwrap();
    let mut used = None;
    run_until(&mut em, || {
        used = used.or_else(|| requests.pop_used());
        used.is_some() && irq.status() & INT_VRING != 0
    });
    let (id, used_len) = used.unwrap();
    assert_eq!(id, head);
    let (out_len, error, unique) = read_out_header(mem, REPLY);
    assert_eq!((error, unique), (0, 7), "virtiofsd's FUSE_INIT answer");
    assert_eq!(used_len, out_len);
    assert!(fs.lock().unwrap().stats().backend_calls >= 1);
    let major: u32 = mem.read_obj(GuestAddress(REPLY + 16)).unwrap();
    assert_eq!(major, 7);
    // Now virtiofsd holds a FUSE session: a snapshot is refused.
    let e = fs.lock().unwrap().snapshot_support().unwrap_err();
    assert!(e.contains("the guest has used the virtio-fs device"), "{e}");
    assert!(e.contains("virtiofsd"), "{e}");

    // A driver reset takes the rings back (GET_VRING_BASE); a new
    // activation on fresh rings is served by the same backend.
    assert!(fs.lock().unwrap().reset());
    em.run_with_timeout(50).unwrap();
    let hiprio = GuestQueue::new(mem, 0x10000);
    let mut requests = GuestQueue::new(mem, 0x14000);
    let queues = vec![hiprio.active(), requests.active()];
    let kick = queues[1].notify.try_clone().unwrap();
    {
        let mut dev = fs.lock().unwrap();
        dev.set_acked_features(VIRTIO_F_VERSION_1);
        dev.activate(mem.clone(), irq.clone(), queues).unwrap();
    }
    run_until(&mut em, || fs.lock().unwrap().stats().backend_starts == 2);
    let req = request(FUSE_GETATTR, 9, &[0u8; 16]);
    mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    let head = requests.add_chain(&[(REQ, 56, false), (REPLY, 256, true)]);
    kick.write(1).unwrap();
    let mut used = None;
    run_until(&mut em, || {
        used = used.or_else(|| requests.pop_used());
        used.is_some()
    });
    assert_eq!(used.map(|u| u.0), Some(head));
    let (out_len, error, unique) = read_out_header(mem, REPLY);
    assert_eq!(
        (error, unique),
        (0, 9),
        "virtiofsd's GETATTR answer of the root"
    );
    assert!(out_len > 16, "an attr follows the header");

    // The backend dies: the VMM notices, and fails the next request itself.
    vfsd.kill();
    run_until(&mut em, || !fs.lock().unwrap().backend_alive());
    let req = request(FUSE_GETATTR, 8, &[0u8; 16]);
    mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    mem.write_slice(&[0u8; 16], GuestAddress(REPLY)).unwrap();
    irq.ack(u32::MAX);
    let head = requests.add_chain(&[(REQ, 56, false), (REPLY, 256, true)]);
    kick.write(1).unwrap();
    let mut used = None;
    run_until(&mut em, || {
        used = used.or_else(|| requests.pop_used());
        used.is_some()
    });
    assert_eq!(used, Some((head, 16)));
    assert_eq!(read_out_header(mem, REPLY), (16, -libc::EIO, 8));
    assert_eq!(irq.status() & INT_VRING, INT_VRING);
    assert_eq!(fs.lock().unwrap().stats().error_answers, 1);

    // A driver reset and a new activation on a dead backend: a request
    // queued before DRIVER_OK is failed as soon as the event loop runs.
    assert!(fs.lock().unwrap().reset());
    em.run_with_timeout(50).unwrap();
    let hiprio = GuestQueue::new(mem, 0x8000);
    let mut requests = GuestQueue::new(mem, 0xc000);
    let head = requests.add_chain(&[(REQ, 56, false), (REPLY, 256, true)]);
    {
        let mut dev = fs.lock().unwrap();
        dev.set_acked_features(VIRTIO_F_VERSION_1);
        let queues = vec![hiprio.active(), requests.active()];
        dev.activate(mem.clone(), irq.clone(), queues).unwrap();
    }
    let mut used = None;
    run_until(&mut em, || {
        used = used.or_else(|| requests.pop_used());
        used.is_some()
    });
    assert_eq!(used, Some((head, 16)));
    assert_eq!(fs.lock().unwrap().stats().error_answers, 2);
    assert_eq!(fs.lock().unwrap().stats().backend_starts, 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unused_device_can_be_snapshotted_and_a_used_one_is_refused() {
    let dir = scratch("snapshot");
    let vfsd = Virtiofsd::start(&dir);
    let fs = Fs::new(&fs_config(&vfsd.socket)).unwrap();
    // Never activated: nothing in virtiofsd but the connection.
    assert_eq!(fs.snapshot_support(), Ok(()));
    let mem = memory::create(4, false, Backing::SharedMemfd).unwrap();
    let mem: &'static GuestMemory = Box::leak(Box::new(mem));
    let hiprio = GuestQueue::new(mem, 0);
    let mut requests = GuestQueue::new(mem, 0x4000);
    let irq = Arc::new(IrqTrigger::new(
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let fs = Arc::new(std::sync::Mutex::new(fs));
    {
        let mut dev = fs.lock().unwrap();
        dev.set_acked_features(VIRTIO_F_VERSION_1);
        let queues = vec![hiprio.active(), requests.active()];
        dev.activate(mem.clone(), irq.clone(), queues).unwrap();
    }
    assert_eq!(fs.lock().unwrap().snapshot_support(), Ok(()));
    // The guest makes a request available (the event loop is not even
    // running): the avail index alone shows the device was used.
    requests.add_chain(&[(REQ, 56, false), (REPLY, 256, true)]);
    let e = fs.lock().unwrap().snapshot_support().unwrap_err();
    assert!(e.contains("FUSE session lives in virtiofsd"), "{e}");
    // And the transport refuses the snapshot naming the device.
    let t = crate::devices::virtio::mmio::MmioTransport::new(mem.clone(), fs, irq).unwrap();
    let e = t.snapshot().unwrap_err().to_string();
    assert!(e.starts_with("virtio-fs: cannot be snapshotted"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
