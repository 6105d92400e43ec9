//! The SIGSYS handler: a thread that makes a system call outside its
//! allow-list gets SIGSYS (the filters' action is SECCOMP_RET_TRAP); the
//! handler writes one line naming the thread kind and the call to stderr
//! (the VMM's log) and ends the process with [`BAD_SYSCALL_EXIT_CODE`].
//!
//! The handler runs under the faulting thread's filter, so it only uses
//! write(2) and exit_group(2), which every list allows, and formats the
//! line into a stack buffer: async-signal-safe, no allocation, no lock.

use std::cell::Cell;

use vmm_sys_util::signal::register_signal_handler;

/// The exit status of a VMM stopped by a forbidden system call: 128 +
/// SIGSYS, what a shell shows for a process killed by SIGSYS.
pub const BAD_SYSCALL_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// `si_code` of a SIGSYS raised by seccomp (SYS_SECCOMP in the kernel).
const SYS_SECCOMP: i32 = 1;

thread_local! {
    /// The calling thread's kind ("main", "vcpu"), set when its filter is
    /// installed. Const-initialized and without destructor: safe to read
    /// in a signal handler.
    static THREAD_KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// Records the calling thread's kind for the handler's message.
pub fn set_thread_kind(kind: &'static str) {
    THREAD_KIND.with(|k| k.set(kind));
}

/// The head of `siginfo_t` for SIGSYS on 64-bit Linux (the `_sigsys`
/// member of its union, which the libc crate does not expose).
#[repr(C)]
struct SigsysInfo {
    _signo: i32,
    _errno: i32,
    code: i32,
    _pad: i32,
    _call_addr: *mut libc::c_void,
    syscall: i32,
    _arch: u32,
}

/// A line buffer that never allocates.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Self {
            buf: [0; 160],
            len: 0,
        }
    }

    /// Appends what fits.
    fn push(&mut self, s: &[u8]) -> &mut Self {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
        self
    }

    fn push_num(&mut self, n: i32) -> &mut Self {
        let mut digits = [0u8; 11];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            // v % 10 < 10: fits a u8.
            #[allow(clippy::cast_possible_truncation)]
            let d = (v % 10) as u8;
            digits[i] = b'0' + d;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..])
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The report for a forbidden call `nr` made by a thread of `kind`; `code`
/// is the signal's si_code (anything but SYS_SECCOMP is a SIGSYS someone
/// sent).
fn report(kind: &str, code: i32, nr: i32) -> Line {
    let mut line = Line::new();
    line.push(b"husk-vmm: seccomp: ");
    if code != SYS_SECCOMP {
        line.push(b"SIGSYS received (si_code ")
            .push_num(code)
            .push(b", not from a filter) on the ")
            .push(kind.as_bytes())
            .push(b" thread");
    } else {
        let name = usize::try_from(nr)
            .ok()
            .and_then(syscalls::Sysno::new)
            .map_or("unknown", |s| s.name());
        line.push(b"the ")
            .push(kind.as_bytes())
            .push(b" thread made a forbidden system call: ")
            .push(name.as_bytes())
            .push(b" (")
            .push_num(nr)
            .push(b")");
    }
    line.push(b"; exiting\n");
    line
}

extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler;
    // for SIGSYS its layout starts as SigsysInfo, which is no larger than
    // siginfo_t (128 bytes).
    let (code, nr) = unsafe {
        let info = &*info.cast::<SigsysInfo>();
        (info.code, info.syscall)
    };
    let line = report(THREAD_KIND.with(Cell::get), code, nr);
    let bytes = line.as_bytes();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is
    // valid for its length. A short write only shortens the message.
    unsafe {
        libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(BAD_SYSCALL_EXIT_CODE);
    }
}

/// Installs the handler (process-wide; before any filter, so a violation
/// is always reported).
pub fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(libc::SIGSYS, handle_sigsys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_the_call_and_the_thread() {
        let line = report("vcpu", SYS_SECCOMP, 101);
        assert_eq!(
            std::str::from_utf8(line.as_bytes()).unwrap(),
            "husk-vmm: seccomp: the vcpu thread made a forbidden system call: ptrace (101); exiting\n"
        );
        let line = report("main", SYS_SECCOMP, 99_999);
        assert!(std::str::from_utf8(line.as_bytes())
            .unwrap()
            .contains("forbidden system call: unknown (99999)"));
        let line = report("main", 0, 0);
        assert!(std::str::from_utf8(line.as_bytes())
            .unwrap()
            .contains("SIGSYS received (si_code 0, not from a filter) on the main thread"));
    }

    #[test]
    fn numbers_format_at_the_edges() {
        for n in [0, 7, 10, i32::MAX, i32::MIN, -1] {
            let mut line = Line::new();
            line.push_num(n);
            assert_eq!(std::str::from_utf8(line.as_bytes()).unwrap(), n.to_string());
        }
    }

    #[test]
    fn a_long_line_is_cut_not_overflowed() {
        let mut line = Line::new();
        for _ in 0..100 {
            line.push(b"abc");
        }
        assert_eq!(line.as_bytes().len(), 160);
    }
}
