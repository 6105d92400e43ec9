//! The filters against the kernel: each case runs in a forked child (a
//! filter cannot be removed), installs a thread kind's filter, does what
//! that thread does while the guest runs, and then makes a call the list
//! forbids. The child must die through the SIGSYS handler naming exactly
//! that call: an allowed call that the list missed would be named instead.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::*;
use crate::devices::virtio::balloon::discard;
use crate::vstate::{memory, vcpu};

/// How a forked child ended: its exit code, or the signal that killed it.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exit(i32),
    Signal(i32),
}

/// Runs `body` in a forked child with stderr captured; the child exits
/// with what `body` returns (101 if it panics).
fn in_child(body: impl FnOnce() -> i32 + std::panic::UnwindSafe) -> (End, String) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-int array it is given.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the child only runs `body` (which takes no lock another test
    // thread could hold across the fork: glibc resets malloc's) and exits
    // with _exit, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: fds[1] is the pipe's write end; it becomes stderr.
        unsafe { libc::dup2(fds[1], libc::STDERR_FILENO) };
        let code = std::panic::catch_unwind(body).unwrap_or(101);
        // SAFETY: ends the child without running the parent's atexit state.
        unsafe { libc::_exit(code) };
    }
    // SAFETY: the parent's copy of the write end is ours to close; the
    // read end is owned by the File from here on.
    let mut out = unsafe {
        libc::close(fds[1]);
        File::from_raw_fd(fds[0])
    };
    let mut stderr = String::new();
    out.read_to_string(&mut stderr).unwrap();
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let end = if libc::WIFEXITED(status) {
        End::Exit(libc::WEXITSTATUS(status))
    } else {
        End::Signal(libc::WTERMSIG(status))
    };
    (end, stderr)
}

fn filters() -> Filters {
    Filters::new(vcpu::kick_signal()).expect("compile the filters")
}

/// What the handler prints for `call` (number `nr`) on a `kind` thread.
fn report(kind: &str, call: &str, nr: i64) -> String {
    format!("husk-vmm: seccomp: the {kind} thread made a forbidden system call: {call} ({nr}); exiting\n")
}

fn assert_killed_by(result: (End, String), kind: &str, call: &str, nr: i64) {
    let (end, stderr) = result;
    assert_eq!(end, End::Exit(BAD_SYSCALL_EXIT_CODE), "stderr: {stderr}");
    assert_eq!(stderr, report(kind, call, nr));
}

/// A raw call the filters judge; the kernel's answer does not matter.
fn syscall6(nr: i64, args: [u64; 6]) -> i64 {
    // SAFETY: every call made through here is refused by the filter, or
    // on bad fds / null pointers, which the kernel rejects without touching
    // our memory.
    unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) }
}

#[test]
fn filters_compile_for_the_host() {
    let f = filters();
    // Arch check, the calls, the default action: far more than a stub.
    assert!(f.main.len() > 50, "main: {} instructions", f.main.len());
    assert!(f.vcpu.len() > 30, "vcpu: {} instructions", f.vcpu.len());
    // A classic BPF program holds at most 4096 instructions.
    assert!(f.main.len() <= 4096 && f.vcpu.len() <= 4096);
}

/// The main thread's work while the guest runs: the event loop, eventfds,
/// a timerfd, control/vsock sockets, disk I/O, balloon discards, entropy,
/// kicking a vCPU thread, the allocator; then a socket that is not
/// AF_UNIX kills it.
#[test]
fn main_thread_serves_the_guest_and_dies_on_a_forbidden_call() {
    let dir = std::env::temp_dir().join(format!("husk-seccomp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let child_dir = dir.clone();
    let result = in_child(move || {
        let dir = child_dir;
        let f = filters();
        let sock = dir.join("ctl.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut client = UnixStream::connect(&sock).unwrap();
        let disk = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("disk"))
            .unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut timer = TimerFd::new().unwrap();
        let mem = memory::create(2, false, memory::Backing::Private).unwrap();
        let mut em = crate::vmm::EventManager::new().unwrap();
        vcpu::install_kick_handler().unwrap();
        crate::signals::install_termination_handler().unwrap();

        f.install(ThreadKind::Main).unwrap();

        em.run_with_timeout(0).unwrap();
        evt.write(1).unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        timer.reset(Duration::from_secs(60), None).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_nonblocking(true).unwrap();
        client.write_all(b"status\n").unwrap();
        let mut line = [0u8; 7];
        conn.read_exact(&mut line).unwrap();
        conn.write_all(b"ok\n").unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        {
            use std::os::unix::fs::FileExt;
            disk.write_all_at(&[7; 512], 4096).unwrap();
            let mut back = [0u8; 512];
            disk.read_exact_at(&mut back, 4096).unwrap();
            assert_eq!(back, [7; 512]);
            disk.sync_data().unwrap();
        }
        discard(&mem, 0, 4096).unwrap();
        let mut random = [0u8; 16];
        // SAFETY: fills the local buffer of the length passed.
        let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
        assert_eq!(n, 16);
        // The kick, as the VMM sends it to a vCPU thread (here: itself).
        assert_eq!(
            // SAFETY: signals this thread; the kick handler is installed.
            unsafe { libc::pthread_kill(libc::pthread_self(), vcpu::kick_signal()) },
            0
        );
        let big = vec![1u8; 8 << 20];
        assert_eq!(big.iter().map(|b| usize::from(*b)).sum::<usize>(), 8 << 20);
        drop(big);
        // What the VMM's exit removes: the control socket.
        drop((conn, client, listener));
        std::fs::remove_file(&sock).unwrap();
        drop(em);
        drop(mem);

        // SAFETY: a plain socket(2) call; the filter refuses AF_INET.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        0
    });
    std::fs::remove_dir_all(&dir).unwrap();
    assert_killed_by(result, "main", "socket", libc::SYS_socket);
}

/// The main thread's virtio-fs work with the filter on: handing a real
/// virtiofsd guest memory and the rings (sendmsg with fds, recvmsg), the
/// backend's call eventfds, a request it answers, a driver reset taking
/// the rings back; then a forbidden call kills it, named.
#[test]
fn main_thread_drives_a_vhost_user_backend() {
    use crate::devices::virtio::fs::Fs;
    use crate::devices::virtio::test_utils::{managed, GuestQueue};
    use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
    use std::process::Command;
    use vm_memory::{Bytes, GuestAddress};

    let dir = std::env::temp_dir().join(format!("husk-seccomp-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("share")).unwrap();
    let socket = dir.join("vfsd.sock");
    let mut vfsd = Command::new("/usr/local/bin/virtiofsd")
        .arg("--socket-path")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(dir.join("share"))
        .args(["--sandbox", "none", "--log-level", "error"])
        .spawn()
        .expect("/usr/local/bin/virtiofsd (scripts/setup.sh installs it)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "virtiofsd did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let child_socket = socket.clone();
    let result = in_child(move || {
        let f = filters();
        let mem = memory::create(4, false, memory::Backing::SharedMemfd).unwrap();
        let mem: &'static crate::devices::virtio::GuestMemory = Box::leak(Box::new(mem));
        let fs = Fs::new(&husk_vm_config::FsConfig {
            tag: "t".into(),
            socket: child_socket,
            num_request_queues: 1,
            queue_size: 64,
        })
        .unwrap();
        let (fs, mut em) = managed(fs);
        let hiprio = GuestQueue::new(mem, 0);
        let mut requests = GuestQueue::new(mem, 0x4000);
        let queues = vec![hiprio.active(), requests.active()];
        let kick = queues[1].notify.try_clone().unwrap();
        let irq = crate::devices::virtio::test_utils::irq();

        f.install(ThreadKind::Main).unwrap();

        {
            let mut dev = fs.lock().unwrap();
            dev.set_acked_features(VIRTIO_F_VERSION_1);
            dev.activate(mem.clone(), irq, queues).unwrap();
        }
        while fs.lock().unwrap().stats().backend_starts == 0 {
            em.run_with_timeout(100).unwrap();
        }
        // FUSE_INIT, answered by virtiofsd through the call eventfd.
        let mut req = vec![0u8; 56];
        req[0..4].copy_from_slice(&56u32.to_le_bytes());
        req[4..8].copy_from_slice(&26u32.to_le_bytes());
        req[40..44].copy_from_slice(&7u32.to_le_bytes());
        req[44..48].copy_from_slice(&31u32.to_le_bytes());
        mem.write_slice(&req, GuestAddress(0x10_0000)).unwrap();
        requests.add_chain(&[(0x10_0000, 56, false), (0x11_0000, 256, true)]);
        kick.write(1).unwrap();
        while requests.pop_used().is_none() {
            em.run_with_timeout(100).unwrap();
        }
        // A driver reset: the event loop takes the rings back.
        assert!(fs.lock().unwrap().reset());
        em.run_with_timeout(100).unwrap();
        assert!(fs.lock().unwrap().backend_alive());

        // SAFETY: a plain socket(2) call; the filter refuses AF_INET.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        0
    });
    let _ = vfsd.kill();
    let _ = vfsd.wait();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_killed_by(result, "main", "socket", libc::SYS_socket);
}

/// Calls the main list allows only with other arguments.
#[test]
fn main_thread_argument_filters_hold() {
    let int = |v: libc::c_int| u64::from(v.unsigned_abs());
    let rw = int(libc::PROT_READ | libc::PROT_WRITE);
    let rx = int(libc::PROT_READ | libc::PROT_EXEC);
    let private_anon = int(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
    let shared_anon = int(libc::MAP_SHARED | libc::MAP_ANONYMOUS);
    let cases: [(&str, i64, [u64; 6]); 7] = [
        // No executable memory, no shared mappings.
        (
            "mmap",
            libc::SYS_mmap,
            [0, 4096, rx, private_anon, u64::MAX, 0],
        ),
        (
            "mmap",
            libc::SYS_mmap,
            [0, 4096, rw, shared_anon, u64::MAX, 0],
        ),
        ("mprotect", libc::SYS_mprotect, [0, 4096, rx, 0, 0, 0]),
        // Unix stream sockets only.
        (
            "socket",
            libc::SYS_socket,
            [int(libc::AF_UNIX), int(libc::SOCK_DGRAM), 0, 0, 0, 0],
        ),
        // FIONBIO is its only ioctl.
        (
            "ioctl",
            libc::SYS_ioctl,
            [0, 0xae01 /* KVM_CREATE_VM */, 0, 0, 0, 0],
        ),
        (
            "futex",
            libc::SYS_futex,
            [0, int(libc::FUTEX_CMP_REQUEUE), 0, 0, 0, 0],
        ),
        // Signals only to this process (this pid is above any pid_max).
        (
            "tgkill",
            libc::SYS_tgkill,
            [0x7fff_fff0, 1, int(libc::SIGABRT), 0, 0, 0],
        ),
    ];
    for (name, nr, args) in cases {
        let result = in_child(move || {
            filters().install(ThreadKind::Main).unwrap();
            syscall6(nr, args);
            0
        });
        assert_killed_by(result, "main", name, nr);
    }
}

/// A vCPU thread's work (KVM_RUN and KVM_GET_REGS requests, eventfd
/// writes, cloning and closing queue eventfds at device activation, log
/// writes, locks shared with the main thread, the allocator) and its end
/// under the filter; then, in another child, what it must not do.
#[test]
fn vcpu_thread_runs_and_ends_under_its_filter() {
    let (end, stderr) = in_child(|| {
        use vmm_sys_util::signal::Killable;

        let f = Arc::new(filters());
        vcpu::install_kick_handler().unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // 0: starting, 1: filtered, 2: kicked, 3: done.
        let state = Arc::new((Mutex::new(0u8), Condvar::new()));
        let thread_state = state.clone();
        let thread = std::thread::spawn(move || {
            f.install(ThreadKind::Vcpu).unwrap();
            let (lock, cv) = &*thread_state;
            *lock.lock().unwrap() = 1;
            cv.notify_all();
            // Waits through the kick (its handler returns with rt_sigreturn).
            drop(cv.wait_while(lock.lock().unwrap(), |s| *s < 2).unwrap());
            // Allowed requests on a bad fd: the kernel, not the filter,
            // refuses them.
            for request in [filters::KVM_RUN(), filters::KVM_GET_REGS()] {
                // SAFETY: fd -1 is rejected (EBADF) before the argument is read.
                let r = unsafe { libc::ioctl(-1, libc::c_ulong::from(request), 0) };
                assert_eq!(r, -1);
            }
            evt.write(1).unwrap();
            let clone = evt.try_clone().unwrap();
            clone.write(1).unwrap();
            drop(clone);
            std::io::stderr()
                .write_all(b"vcpu: serial and log output\n")
                .unwrap();
            let v: Vec<u64> = (0..1 << 18).collect();
            assert_eq!(v.len(), 1 << 18);
            drop(cv.wait_timeout(lock.lock().unwrap(), Duration::from_millis(1)));
            *lock.lock().unwrap() = 3;
        });
        let (lock, cv) = &*state;
        drop(cv.wait_while(lock.lock().unwrap(), |s| *s < 1).unwrap());
        thread.kill(vcpu::kick_signal()).unwrap();
        *lock.lock().unwrap() = 2;
        cv.notify_all();
        match thread.join() {
            Ok(()) if *lock.lock().unwrap() == 3 => 0,
            _ => 1,
        }
    });
    assert_eq!(end, End::Exit(0), "stderr: {stderr}");
    assert_eq!(stderr, "vcpu: serial and log output\n");
}

#[test]
fn vcpu_thread_dies_on_a_forbidden_call() {
    let cases: [(&str, i64, [u64; 6]); 4] = [
        // The vCPU thread reads nothing and opens nothing.
        ("read", libc::SYS_read, [0, 0, 0, 0, 0, 0]),
        ("socket", libc::SYS_socket, [1 /* AF_UNIX */, 1, 0, 0, 0, 0]),
        // No KVM request but running and reading registers.
        (
            "ioctl",
            libc::SYS_ioctl,
            [0, 0xae01 /* KVM_CREATE_VM */, 0, 0, 0, 0],
        ),
        ("ioctl", libc::SYS_ioctl, [0, libc::FIONBIO, 0, 0, 0, 0]),
    ];
    for (name, nr, args) in cases {
        let result = in_child(move || {
            let f = filters();
            let t = std::thread::spawn(move || {
                f.install(ThreadKind::Vcpu).unwrap();
                syscall6(nr, args);
            });
            // Not reached: the handler ends the process.
            t.join().map_or(1, |()| 0)
        });
        assert_killed_by(result, "vcpu", name, nr);
    }
}
