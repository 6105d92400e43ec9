//! The allow-lists: which system calls, with which arguments, each kind of
//! husk-vmm thread may make once its filter is installed, that is while
//! the guest runs. Everything before (opening files, KVM set-up, mapping
//! guest memory, spawning the vCPU threads) happens unfiltered.
//!
//! The lists are for x86-64 Linux with glibc. Where glibc or Rust's std
//! pick between two equivalent calls (epoll_wait or epoll_pwait, unlink or
//! unlinkat) both are allowed, so another glibc on the host does not kill
//! the VMM. Arguments are checked where that narrows what a hijacked VMM
//! could do: ioctl request numbers, no executable or shared mappings,
//! socket families, futex operations, signals only to this process.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use syscalls::Sysno;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

// kvm-ioctls keeps its request numbers private.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
// What a snapshot reads: the VM-wide state on the main thread...
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
// ...and each vCPU's on its own thread.
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);

/// Syscall number -> rules; no rule means the call is allowed with any
/// arguments, otherwise one matching rule (all its conditions) allows it.
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// `futex` operations without the PRIVATE and CLOCK_REALTIME modifier bits.
const FUTEX_CMD_MASK: u64 =
    (!(libc::FUTEX_PRIVATE_FLAG | libc::FUTEX_CLOCK_REALTIME)).cast_unsigned() as u64;
/// mmap flags that may be added to MAP_PRIVATE | MAP_ANONYMOUS: glibc's
/// malloc reserves arenas with MAP_NORESERVE and may shrink them with
/// MAP_FIXED; thread stacks carry MAP_STACK.
const MMAP_FREE_FLAGS: u64 = (libc::MAP_NORESERVE | libc::MAP_FIXED | libc::MAP_STACK) as u64;

/// One condition on a 32-bit argument (ioctl requests, flags and the like
/// are ints to the kernel, so the upper half of the register is ignored
/// there too).
fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
}

fn eq(index: u8, value: u64) -> Result<SeccompCondition, BackendError> {
    arg(index, SeccompCmpOp::Eq, value)
}

/// Widens a libc int constant (flags, signal and request numbers) to the
/// u64 seccompiler compares with; the comparison is on 32 bits, so a
/// negative value keeps its bit pattern.
fn c(v: libc::c_int) -> u64 {
    u64::from(v.cast_unsigned())
}

/// An allow-list under construction.
#[derive(Default)]
struct List(Rules);

impl List {
    /// Allows `calls` whatever their arguments.
    fn any(&mut self, calls: &[Sysno]) -> &mut Self {
        for call in calls {
            self.0.insert(i64::from(call.id()), Vec::new());
        }
        self
    }

    /// Allows `call` when all of `conditions` hold (adds one rule; a call
    /// with several rules is allowed when any of them matches).
    fn when(
        &mut self,
        call: Sysno,
        conditions: Vec<Result<SeccompCondition, BackendError>>,
    ) -> Result<&mut Self, BackendError> {
        let rule = SeccompRule::new(conditions.into_iter().collect::<Result<_, _>>()?)?;
        match self.0.get_mut(&i64::from(call.id())) {
            // Already allowed with any arguments: a rule would narrow it.
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                self.0.insert(i64::from(call.id()), vec![rule]);
            }
        }
        Ok(self)
    }

    /// Allows `call` when argument `index` is one of `values`.
    fn one_of(
        &mut self,
        call: Sysno,
        index: u8,
        values: &[u64],
    ) -> Result<&mut Self, BackendError> {
        for v in values {
            self.when(call, vec![eq(index, *v)])?;
        }
        Ok(self)
    }
}

/// What every husk-vmm thread needs: the allocator, locks, signal
/// handling, logging, time, and the ways out.
fn common(list: &mut List) -> Result<(), BackendError> {
    list.any(&[
        // Log lines to stderr, eventfd signals, the serial console.
        Sysno::write,
        Sysno::close,
        // Heap growth of glibc's main arena; freeing large blocks.
        Sysno::brk,
        Sysno::munmap,
        // Time for logs and deadlines, when the vDSO cannot answer (a
        // clock source without vDSO support, as on some nested hosts).
        Sysno::clock_gettime,
        // std's HashMap seeds its keys once per thread.
        Sysno::getrandom,
        Sysno::sched_yield,
        // Signal handlers (vCPU kick, SIGTERM, SIGSYS) return through it.
        Sysno::rt_sigreturn,
        // The kernel resumes a timed wait through it after a stop and
        // continue (SIGSTOP, a debugger).
        Sysno::restart_syscall,
        // glibc blocks signals around pthread_kill and at thread exit.
        Sysno::rt_sigprocmask,
        // std removes its stack-overflow signal stack when a thread ends.
        Sysno::sigaltstack,
        // raise(SIGABRT) on a panic (the release profile aborts).
        Sysno::getpid,
        Sysno::gettid,
        Sysno::exit,
        Sysno::exit_group,
    ]);
    // Anonymous private memory for the allocator (arenas, large blocks),
    // never executable and never a shared or file mapping.
    let anon = c(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
    for prot in [libc::PROT_NONE, libc::PROT_READ | libc::PROT_WRITE] {
        list.when(
            Sysno::mmap,
            vec![
                eq(2, c(prot)),
                arg(
                    3,
                    SeccompCmpOp::MaskedEq(!MMAP_FREE_FLAGS & 0xffff_ffff),
                    anon,
                ),
            ],
        )?;
        // glibc grows a thread arena by making reserved pages read-write.
        list.when(Sysno::mprotect, vec![eq(2, c(prot))])?;
    }
    // realloc of a large block.
    list.one_of(Sysno::mremap, 3, &[c(libc::MREMAP_MAYMOVE)])?;
    // free() trims thread arenas, glibc drops a finished thread's stack.
    list.one_of(Sysno::madvise, 2, &[c(libc::MADV_DONTNEED)])?;
    // std's Mutex, Condvar and thread join: wait and wake only (no
    // requeue, no priority inheritance), private or shared, any clock.
    for op in [
        libc::FUTEX_WAIT,
        libc::FUTEX_WAKE,
        libc::FUTEX_WAIT_BITSET,
        libc::FUTEX_WAKE_BITSET,
    ] {
        list.when(
            Sysno::futex,
            vec![arg(1, SeccompCmpOp::MaskedEq(FUTEX_CMD_MASK), c(op))],
        )?;
    }
    // Debug builds of std check that an fd is open before closing it.
    list.one_of(Sysno::fcntl, 1, &[c(libc::F_GETFD)])?;
    // abort() restores SIGABRT's default action before raising it again.
    list.one_of(Sysno::rt_sigaction, 0, &[c(libc::SIGABRT)])?;
    Ok(())
}

/// tgkill to threads of this process only, with SIGABRT (abort) or, when
/// given, the vCPU kick signal.
fn tgkill(list: &mut List, pid: u32, kick_signal: Option<i32>) -> Result<(), BackendError> {
    let signals = [Some(libc::SIGABRT), kick_signal];
    for sig in signals.into_iter().flatten() {
        list.when(Sysno::tgkill, vec![eq(0, u64::from(pid)), eq(2, c(sig))])?;
    }
    Ok(())
}

/// The main thread once the VM is built: the event loop, the devices'
/// back ends, the control socket, pausing and stopping the vCPUs, and
/// the clean-up on exit. `kick_signal` is the real-time signal that
/// interrupts KVM_RUN, `pid` this process.
pub fn main_thread(pid: u32, kick_signal: i32) -> Result<Rules, BackendError> {
    let mut list = List::default();
    common(&mut list)?;
    list.any(&[
        // The event loop.
        Sysno::epoll_wait,
        Sysno::epoll_pwait,
        Sysno::epoll_ctl,
        // eventfds, the vsock timerfd, tap frames, the console's stdin.
        Sysno::read,
        // Unix stream reads (std's recv): control socket, vsock.
        Sysno::recvfrom,
        // virtio-blk: reads, writes, flush.
        Sysno::pread64,
        Sysno::pwrite64,
        Sysno::fdatasync,
        // vsock: connect to <uds_path>_<port> for the guest.
        Sysno::connect,
        // The control socket and the vsock socket are removed on exit.
        Sysno::unlink,
        Sysno::unlinkat,
    ]);
    // Unix stream writes (std's send: no SIGPIPE, no address).
    list.when(
        Sysno::sendto,
        vec![
            eq(3, c(libc::MSG_NOSIGNAL)),
            SeccompCondition::new(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0),
        ],
    )?;
    // Accepted control and vsock clients (std's accept) are made
    // nonblocking with FIONBIO.
    list.one_of(Sysno::accept4, 3, &[c(libc::SOCK_CLOEXEC)])?;
    list.one_of(
        Sysno::ioctl,
        1,
        &[
            libc::FIONBIO,
            KVM_GET_IRQCHIP(),
            KVM_GET_PIT2(),
            KVM_GET_CLOCK(),
        ],
    )?;
    // A snapshot: its folder (0700), its files (new, write-only, 0600),
    // the memory file's length.
    list.when(
        Sysno::openat,
        vec![
            eq(
                2,
                c(libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC),
            ),
            eq(3, 0o600),
        ],
    )?;
    list.one_of(Sysno::mkdirat, 2, &[0o700])?;
    list.any(&[Sysno::ftruncate]);
    // A snapshot of shared RAM reads only the memfd's data extents.
    list.one_of(Sysno::lseek, 2, &[c(libc::SEEK_DATA), c(libc::SEEK_HOLE)])?;
    // vsock: a guest connecting to a host port opens a Unix stream.
    list.when(
        Sysno::socket,
        vec![
            eq(0, c(libc::AF_UNIX)),
            eq(
                1,
                c(libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC),
            ),
            eq(2, 0),
        ],
    )?;
    // vsock: the guest's SHUTDOWN_SEND half-closes the host stream.
    list.one_of(Sysno::shutdown, 1, &[c(libc::SHUT_WR)])?;
    // vsock: the connection timer, relative time only.
    list.one_of(Sysno::timerfd_settime, 1, &[0])?;
    // virtio-fs: vhost-user messages to the backend (virtiofsd), the
    // memory table and ring eventfds passed as SCM_RIGHTS, and its
    // answers (vmm-sys-util's ScmSocket: sendmsg with MSG_NOSIGNAL,
    // recvmsg without flags). The socket was connected before the filter.
    list.one_of(Sysno::sendmsg, 2, &[c(libc::MSG_NOSIGNAL)])?;
    list.one_of(Sysno::recvmsg, 2, &[0])?;
    // virtio-balloon: free page reports give guest pages back.
    list.one_of(Sysno::madvise, 2, &[c(libc::MADV_REMOVE)])?;
    // Kicking vCPU threads out of KVM_RUN (pause, stop).
    tgkill(&mut list, pid, Some(kick_signal))?;
    Ok(list.0)
}

/// A vCPU thread from just before its first KVM_RUN: running the guest and
/// handling its port I/O and MMIO exits (the serial console, the i8042,
/// virtio-mmio registers, which activate and reset devices).
pub fn vcpu_thread(pid: u32) -> Result<Rules, BackendError> {
    let mut list = List::default();
    common(&mut list)?;
    // KVM_GET_REGS reads where a kicked or failed vCPU was.
    list.one_of(
        Sysno::ioctl,
        1,
        &[
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_LAPIC(),
            KVM_GET_CPUID2(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
        ],
    )?;
    // Activating a virtio device clones its queues' notify eventfds
    // (std's try_clone).
    list.one_of(Sysno::fcntl, 1, &[c(libc::F_DUPFD_CLOEXEC)])?;
    tgkill(&mut list, pid, None)?;
    Ok(list.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_request_numbers_are_the_kernels() {
        // From linux/kvm.h: _IO(0xAE, 0x80), _IOR(0xAE, 0x81, struct kvm_regs).
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        // From the kernel's headers (x86-64).
        assert_eq!(KVM_GET_IRQCHIP(), 0xc208_ae62);
        assert_eq!(KVM_GET_PIT2(), 0x8070_ae9f);
        assert_eq!(KVM_GET_CLOCK(), 0x8030_ae7c);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_LAPIC(), 0x8400_ae8e);
        assert_eq!(KVM_GET_CPUID2(), 0xc008_ae91);
        assert_eq!(KVM_GET_MP_STATE(), 0x8004_ae98);
        assert_eq!(KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(KVM_GET_DEBUGREGS(), 0x8080_aea1);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(KVM_GET_XCRS(), 0x8188_aea6);
    }

    #[test]
    fn futex_mask_keeps_the_command_bits() {
        let private_wait = c(libc::FUTEX_WAIT_BITSET | libc::FUTEX_PRIVATE_FLAG);
        assert_eq!(private_wait & FUTEX_CMD_MASK, c(libc::FUTEX_WAIT_BITSET));
        let requeue = c(libc::FUTEX_CMP_REQUEUE | libc::FUTEX_PRIVATE_FLAG);
        assert_eq!(requeue & FUTEX_CMD_MASK, c(libc::FUTEX_CMP_REQUEUE));
    }

    /// The calls the SIGSYS handler and a thread's end need are allowed
    /// unconditionally on every thread; the vCPU thread cannot open
    /// sockets and the main thread cannot run a vCPU.
    #[test]
    fn lists_hold_what_the_handler_needs_and_differ_where_they_should() {
        let main = main_thread(1, 34).unwrap();
        let vcpu = vcpu_thread(1).unwrap();
        let id = |s: Sysno| i64::from(s.id());
        for rules in [&main, &vcpu] {
            for call in [Sysno::write, Sysno::exit_group, Sysno::rt_sigreturn] {
                assert_eq!(rules.get(&id(call)).map(Vec::len), Some(0), "{call}");
            }
        }
        assert!(!vcpu.contains_key(&id(Sysno::socket)));
        assert!(!vcpu.contains_key(&id(Sysno::read)));
        assert_eq!(
            main[&id(Sysno::ioctl)].len(),
            4,
            "FIONBIO and the snapshot's three VM reads"
        );
        assert_eq!(main[&id(Sysno::openat)].len(), 1, "new 0600 files only");
        assert!(!vcpu.contains_key(&id(Sysno::openat)));
        assert!(!vcpu.contains_key(&id(Sysno::mkdirat)));
        for absent in [Sysno::execve, Sysno::ptrace, Sysno::clone3] {
            assert!(!main.contains_key(&id(absent)), "{absent}");
            assert!(!vcpu.contains_key(&id(absent)), "{absent}");
        }
    }
}
