//! Seccomp: compiles an OCI `linux.seccomp` profile into a classic BPF
//! filter for x86_64 and installs it, without libseccomp (the agent is a
//! static binary with no C dependencies).
//!
//! The program checks the architecture (anything but x86_64, including x32
//! calls, kills the process), then tries the profile's rules in order: a
//! rule matches when the call number is one of its names and every argument
//! condition holds (64-bit comparisons on two 32-bit words); the first
//! match returns its action, no match the default action. Names this table
//! does not know are skipped, as runc skips names libseccomp does not know.

use std::io;

use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

use crate::syscalls_x86_64::SYSCALLS;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The kernel's BPF_MAXINSNS.
const MAX_INSNS: usize = 4096;

// seccomp_data offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

/// A classic BPF opcode from libc's `u32` parts; evaluated at compile time
/// only, where a value over 16 bits fails the build.
#[allow(clippy::cast_possible_truncation)] // fits: asserted just above
const fn opcode(code: u32) -> u16 {
    assert!(code <= 0xffff, "a BPF opcode is 16 bits");
    code as u16
}

// Classic BPF opcodes.
const LD_W_ABS: u16 = opcode(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS);
const JEQ_K: u16 = opcode(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K);
const JGT_K: u16 = opcode(libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K);
const JGE_K: u16 = opcode(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K);
const AND_K: u16 = opcode(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K);
const RET_K: u16 = opcode(libc::BPF_RET | libc::BPF_K);

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompError {
    #[error("seccomp action {0:?} is not supported")]
    Action(LinuxSeccompAction),
    #[error("seccomp listenerPath (user notification) is not supported")]
    Listener,
    #[error("seccomp argument index {0} is over 5")]
    ArgIndex(usize),
    #[error("seccomp filter has {0} instructions, over the kernel's {MAX_INSNS}")]
    TooLong(usize),
    #[error("a seccomp rule has too many argument conditions ({0})")]
    RuleTooLong(usize),
    #[error("seccomp errnoRet {0} is over 65535")]
    Errno(u32),
}

/// One classic BPF instruction (struct sock_filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// A compiled filter and the flags to install it with.
#[derive(Debug)]
pub struct Filter {
    pub program: Vec<Insn>,
    flags: libc::c_ulong,
}

fn ret_value(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, SeccompError> {
    // The return value's data field is 16 bits: a larger errnoRet is
    // refused rather than cut to another errno.
    let data = || match errno {
        None => Ok(libc::EPERM.unsigned_abs()),
        Some(e) => u16::try_from(e)
            .map(u32::from)
            .map_err(|_| SeccompError::Errno(e)),
    };
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | data()?,
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | data()?,
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        a @ LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::Action(a)),
    })
}

/// A 64-bit argument value as the two 32-bit words BPF compares:
/// (high, low).
fn words(v: u64) -> (u32, u32) {
    #[allow(clippy::cast_possible_truncation)] // fits: masked to 32 bits
    let low = (v & 0xffff_ffff) as u32;
    #[allow(clippy::cast_possible_truncation)] // fits: shifted down 32 bits
    let high = (v >> 32) as u32;
    (high, low)
}

fn number(name: &str) -> Option<u32> {
    SYSCALLS
        .binary_search_by(|(n, _)| n.cmp(&name))
        .ok()
        .map(|i| SYSCALLS[i].1)
}

/// A jump target inside one rule block: relative, or "this rule fails".
#[derive(Clone, Copy)]
enum J {
    Next(u8),
    Fail,
}

struct Block {
    insns: Vec<(u16, J, J, u32)>,
}

impl Block {
    fn op(&mut self, code: u16, k: u32) {
        self.insns.push((code, J::Next(0), J::Next(0), k));
    }
    fn jump(&mut self, code: u16, k: u32, jt: J, jf: J) {
        self.insns.push((code, jt, jf, k));
    }

    /// Appends the check of one argument condition: falls through when it
    /// holds, jumps to the rule's end when not.
    fn arg(&mut self, a: &LinuxSeccompArg) -> Result<(), SeccompError> {
        let index = u32::try_from(a.index())
            .ok()
            .filter(|&i| i <= 5)
            .ok_or(SeccompError::ArgIndex(a.index()))?;
        let lo_off = OFF_ARGS + 8 * index;
        let hi_off = lo_off + 4;
        let ((vhi, vlo), (v2hi, v2lo)) = (words(a.value()), words(a.value_two().unwrap_or(0)));
        use LinuxSeccompOperator::*;
        match a.op() {
            ScmpCmpEq => {
                self.op(LD_W_ABS, hi_off);
                self.jump(JEQ_K, vhi, J::Next(0), J::Fail);
                self.op(LD_W_ABS, lo_off);
                self.jump(JEQ_K, vlo, J::Next(0), J::Fail);
            }
            ScmpCmpNe => {
                self.op(LD_W_ABS, hi_off);
                self.jump(JEQ_K, vhi, J::Next(0), J::Next(2));
                self.op(LD_W_ABS, lo_off);
                self.jump(JEQ_K, vlo, J::Fail, J::Next(0));
            }
            ScmpCmpMaskedEq => {
                // OCI: value is the mask, valueTwo the expected bits.
                self.op(LD_W_ABS, hi_off);
                self.op(AND_K, vhi);
                self.jump(JEQ_K, v2hi, J::Next(0), J::Fail);
                self.op(LD_W_ABS, lo_off);
                self.op(AND_K, vlo);
                self.jump(JEQ_K, v2lo, J::Next(0), J::Fail);
            }
            op @ (ScmpCmpGt | ScmpCmpGe | ScmpCmpLt | ScmpCmpLe) => {
                let greater = matches!(op, ScmpCmpGt | ScmpCmpGe);
                self.op(LD_W_ABS, hi_off);
                if greater {
                    // hi > vhi: holds; hi < vhi: fails; equal: low word.
                    self.jump(JGT_K, vhi, J::Next(3), J::Next(0));
                } else {
                    // hi < vhi: holds; hi > vhi: fails; equal: low word.
                    self.jump(JGE_K, vhi, J::Next(0), J::Next(3));
                }
                self.jump(JEQ_K, vhi, J::Next(0), J::Fail);
                self.op(LD_W_ABS, lo_off);
                match op {
                    ScmpCmpGt => self.jump(JGT_K, vlo, J::Next(0), J::Fail),
                    ScmpCmpGe => self.jump(JGE_K, vlo, J::Next(0), J::Fail),
                    ScmpCmpLt => self.jump(JGE_K, vlo, J::Fail, J::Next(0)),
                    _ => self.jump(JGT_K, vlo, J::Fail, J::Next(0)),
                }
            }
        }
        Ok(())
    }

    /// Turns symbolic jumps into offsets; classic BPF's conditional jumps
    /// reach 255 instructions at most.
    fn resolve(self, args: usize) -> Result<Vec<Insn>, SeccompError> {
        let len = u8::try_from(self.insns.len()).map_err(|_| SeccompError::RuleTooLong(args))?;
        Ok((0..len)
            .zip(self.insns)
            .map(|(i, (code, jt, jf, k))| {
                let to = |j: J| match j {
                    J::Next(n) => n,
                    J::Fail => len - i - 1,
                };
                Insn {
                    code,
                    jt: to(jt),
                    jf: to(jf),
                    k,
                }
            })
            .collect())
    }
}

/// Compiles `profile` for x86_64.
pub fn compile(profile: &LinuxSeccomp) -> Result<Filter, SeccompError> {
    if profile.listener_path().is_some() {
        return Err(SeccompError::Listener);
    }
    let default = ret_value(profile.default_action(), profile.default_errno_ret())?;
    let mut prog = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        Insn {
            code: JEQ_K,
            jt: 1,
            jf: 0,
            k: AUDIT_ARCH_X86_64,
        },
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
        Insn {
            code: JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        stmt(RET_K, RET_KILL_PROCESS),
    ];
    for rule in profile.syscalls().iter().flatten() {
        let action = ret_value(rule.action(), rule.errno_ret())?;
        if action == default {
            continue; // the default says the same
        }
        for nr in rule.names().iter().filter_map(|n| number(n)) {
            let mut b = Block { insns: Vec::new() };
            b.op(LD_W_ABS, OFF_NR);
            b.jump(JEQ_K, nr, J::Next(0), J::Fail);
            for a in rule.args().iter().flatten() {
                b.arg(a)?;
            }
            b.op(RET_K, action);
            // Fail jumps land just past the block, on the next rule.
            prog.extend(b.resolve(rule.args().as_ref().map_or(0, Vec::len))?);
        }
    }
    prog.push(stmt(RET_K, default));
    if prog.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(prog.len()));
    }
    let mut flags = 0;
    for f in profile.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            // Only meaningful with user notification, which is refused above.
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => 0,
        };
    }
    Ok(Filter {
        program: prog,
        flags,
    })
}

impl Filter {
    /// Installs the filter on the calling thread (needs no_new_privs or
    /// CAP_SYS_ADMIN).
    pub fn install(&self) -> io::Result<()> {
        // compile() keeps programs within MAX_INSNS; `program` is public.
        let len = u16::try_from(self.program.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                SeccompError::TooLong(self.program.len()),
            )
        })?;
        let prog = libc::sock_fprog {
            len,
            filter: self.program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `Insn` has sock_filter's layout (repr(C), same fields);
        // `prog` points at the program, which outlives the call, and the
        // kernel copies it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                self.flags,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic BPF interpreter for the opcodes `compile` emits.
    fn run(prog: &[Insn], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u32; 16];
        data[0] = nr;
        data[1] = arch;
        for (i, a) in args.iter().enumerate() {
            (data[5 + 2 * i], data[4 + 2 * i]) = words(*a);
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => acc = data[i.k as usize / 4],
                AND_K => acc &= i.k,
                RET_K => return i.k,
                JEQ_K | JGT_K | JGE_K => {
                    let t = match i.code {
                        JEQ_K => acc == i.k,
                        JGT_K => acc > i.k,
                        _ => acc >= i.k,
                    };
                    pc += usize::from(if t { i.jt } else { i.jf });
                }
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn names_allow_and_deny() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,
                "syscalls":[{"names":["read","write","no_such_call"],"action":"SCMP_ACT_ALLOW"},
                            {"names":["mkdir"],"action":"SCMP_ACT_KILL_PROCESS"}]}"#,
        );
        let f = compile(&p).unwrap();
        let a = AUDIT_ARCH_X86_64;
        assert_eq!(run(&f.program, 0, a, [0; 6]), RET_ALLOW);
        assert_eq!(run(&f.program, 1, a, [0; 6]), RET_ALLOW);
        assert_eq!(run(&f.program, 83, a, [0; 6]), RET_KILL_PROCESS);
        assert_eq!(run(&f.program, 2, a, [0; 6]), RET_ERRNO | 38);
        assert_eq!(
            run(&f.program, 0, 0x4000_0003, [0; 6]),
            RET_KILL_PROCESS,
            "i386"
        );
        assert_eq!(
            run(&f.program, X32_SYSCALL_BIT, a, [0; 6]),
            RET_KILL_PROCESS,
            "x32"
        );
    }

    #[test]
    fn argument_comparisons_on_64_bits() {
        let values: [u64; 9] = [
            0,
            1,
            0xffff_ffff,
            0x1_0000_0000,
            0x1_0000_0001,
            0x2_0000_0000,
            u64::MAX - 1,
            u64::MAX,
            0x8000_0000_0000_0000,
        ];
        let ops = [
            (
                "SCMP_CMP_EQ",
                (|x: u64, v: u64| x == v) as fn(u64, u64) -> bool,
            ),
            ("SCMP_CMP_NE", |x, v| x != v),
            ("SCMP_CMP_LT", |x, v| x < v),
            ("SCMP_CMP_LE", |x, v| x <= v),
            ("SCMP_CMP_GT", |x, v| x > v),
            ("SCMP_CMP_GE", |x, v| x >= v),
        ];
        for (op, want) in ops {
            for v in values {
                let p = profile(&format!(
                    r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["personality"],
                        "action":"SCMP_ACT_ERRNO","args":[{{"index":2,"value":{v},"op":"{op}"}}]}}]}}"#
                ));
                let f = compile(&p).unwrap();
                for x in values {
                    let mut args = [0u64; 6];
                    args[2] = x;
                    let got = run(&f.program, 135, AUDIT_ARCH_X86_64, args);
                    let expect = if want(x, v) { RET_ERRNO | 1 } else { RET_ALLOW };
                    assert_eq!(got, expect, "{x:#x} {op} {v:#x}");
                }
            }
        }
    }

    #[test]
    fn masked_eq_and_conjunction() {
        // clone denied when (flags & CLONE_NEWUSER) == CLONE_NEWUSER and
        // arg1 == 7: both must hold.
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["clone"],"action":"SCMP_ACT_ERRNO",
                "args":[{"index":0,"value":268435456,"valueTwo":268435456,"op":"SCMP_CMP_MASKED_EQ"},
                        {"index":1,"value":7,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        let f = compile(&p).unwrap();
        let run_clone =
            |a0: u64, a1: u64| run(&f.program, 56, AUDIT_ARCH_X86_64, [a0, a1, 0, 0, 0, 0]);
        assert_eq!(run_clone(0x1000_0011, 7), RET_ERRNO | 1);
        assert_eq!(run_clone(0x1000_0011, 8), RET_ALLOW);
        assert_eq!(run_clone(0x11, 7), RET_ALLOW);
    }

    #[test]
    fn unsupported_parts_are_refused() {
        let p = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
        assert!(matches!(compile(&p), Err(SeccompError::Action(_))));
        let p = profile(r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/x"}"#);
        assert_eq!(compile(&p).unwrap_err(), SeccompError::Listener);
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW",
                "args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        assert_eq!(compile(&p).unwrap_err(), SeccompError::ArgIndex(6));
        let many: Vec<String> = (0..60)
            .map(|_| r#"{"index":0,"value":1,"op":"SCMP_CMP_GT"}"#.to_string())
            .collect();
        let p = profile(&format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{{"names":["read"],"action":"SCMP_ACT_ALLOW","args":[{}]}}]}}"#,
            many.join(",")
        ));
        assert_eq!(compile(&p).unwrap_err(), SeccompError::RuleTooLong(60));
        // 65537 would have been cut to 1 (EPERM).
        let p = profile(r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":65537}"#);
        assert_eq!(compile(&p).unwrap_err(), SeccompError::Errno(65537));
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],
                "action":"SCMP_ACT_ERRNO","errnoRet":4294967295}]}"#,
        );
        assert_eq!(compile(&p).unwrap_err(), SeccompError::Errno(u32::MAX));
        // Unused by an action that returns no data: not refused.
        let p = profile(r#"{"defaultAction":"SCMP_ACT_ALLOW","defaultErrnoRet":65537}"#);
        assert!(compile(&p).is_ok());
    }

    #[test]
    fn table_is_sorted_for_binary_search() {
        assert!(SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(number("read"), Some(0));
        assert_eq!(number("execve"), Some(59));
        assert_eq!(number("no_such_call"), None);
    }
}
