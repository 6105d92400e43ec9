//! A container's device filter. Cgroup v2 has no devices.allow file: as
//! runc does, the agent attaches a BPF_PROG_TYPE_CGROUP_DEVICE program to
//! the container's cgroup, assembled here by hand (as `seccomp` assembles
//! its classic BPF), loaded and attached with bpf(2).
//!
//! The rules are the spec's `linux.resources.devices` followed by runc's
//! default allow list (mknod of any node; null, zero, full, random,
//! urandom, tty, console, ptmx, pts), on a default deny. The last rule that
//! matches an access decides it, as in runc: the program tries the rules
//! from the last one back, and the first match returns.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("linux.resources.devices[{index}]: {message}")]
    Invalid { index: usize, message: String },
    #[error("{what} the device filter of {path}: {source}")]
    Bpf {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

// The kernel's bpf_cgroup_dev_ctx: access_type = access << 16 | type, then
// major and minor (u32 each).
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: i32 = 1;
const ACC_READ: i32 = 2;
const ACC_WRITE: i32 = 4;
const ACC_ALL: i32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// One rule: None is a wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub kind: Option<i32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: i32,
}

const fn allow(kind: i32, major: Option<u32>, minor: Option<u32>, access: i32) -> Rule {
    Rule {
        allow: true,
        kind: Some(kind),
        major,
        minor,
        access,
    }
}

/// runc's default allow list (libcontainer/specconv AllowedDevices).
pub const DEFAULT_ALLOWED: [Rule; 11] = [
    allow(DEV_CHAR, None, None, ACC_MKNOD),
    allow(DEV_BLOCK, None, None, ACC_MKNOD),
    allow(DEV_CHAR, Some(1), Some(3), ACC_ALL), // null
    allow(DEV_CHAR, Some(1), Some(5), ACC_ALL), // zero
    allow(DEV_CHAR, Some(1), Some(7), ACC_ALL), // full
    allow(DEV_CHAR, Some(1), Some(8), ACC_ALL), // random
    allow(DEV_CHAR, Some(1), Some(9), ACC_ALL), // urandom
    allow(DEV_CHAR, Some(5), Some(0), ACC_ALL), // tty
    allow(DEV_CHAR, Some(5), Some(1), ACC_ALL), // console
    allow(DEV_CHAR, Some(5), Some(2), ACC_ALL), // ptmx
    allow(DEV_CHAR, Some(136), None, ACC_ALL),  // pts/*
];

fn number(index: usize, what: &str, n: Option<i64>) -> Result<Option<u32>, DeviceError> {
    match n {
        None | Some(-1) => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| DeviceError::Invalid {
                index,
                message: format!("{what} {n} is out of range"),
            }),
    }
}

/// The spec's rules (checked) followed by the defaults. A FIFO rule means
/// nothing to the device cgroup and is left out.
pub fn rules(spec: &[LinuxDeviceCgroup]) -> Result<Vec<Rule>, DeviceError> {
    let mut out = Vec::with_capacity(spec.len() + DEFAULT_ALLOWED.len());
    for (index, d) in spec.iter().enumerate() {
        let kind = match d.typ().unwrap_or_default() {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some(DEV_BLOCK),
            LinuxDeviceType::C | LinuxDeviceType::U => Some(DEV_CHAR),
            LinuxDeviceType::P => continue,
        };
        let text = d.access().as_deref().unwrap_or("");
        let mut access = 0;
        for c in text.chars() {
            access |= match c {
                'r' => ACC_READ,
                'w' => ACC_WRITE,
                'm' => ACC_MKNOD,
                _ => {
                    return Err(DeviceError::Invalid {
                        index,
                        message: format!("access {text:?} is not made of r, w and m"),
                    })
                }
            };
        }
        out.push(Rule {
            allow: d.allow(),
            kind,
            major: number(index, "major", d.major())?,
            minor: number(index, "minor", d.minor())?,
            // runc: no access letters is all of them.
            access: if access == 0 { ACC_ALL } else { access },
        });
    }
    out.extend_from_slice(&DEFAULT_ALLOWED);
    Ok(out)
}

/// One eBPF instruction (struct bpf_insn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

// eBPF opcodes (linux/bpf.h, bpf_common.h): class | op | source.
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU32_AND_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const ALU32_RSH_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const ALU32_MOV_X: u8 = 0xbc; // BPF_ALU | BPF_MOV | BPF_X
const ALU64_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JMP32_JNE_K: u8 = 0x56; // BPF_JMP32 | BPF_JNE | BPF_K
const JMP32_JNE_X: u8 = 0x5e; // BPF_JMP32 | BPF_JNE | BPF_X
const JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

/// The program for `rules`: r2 = type, r3 = access, r4 = major, r5 =
/// minor; each rule (last first) a block of tests that jump past it on a
/// mismatch, then its verdict; at the end, deny. A rule that matches
/// everything ends the program (the verifier refuses unreachable code).
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 0, 0),
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for r in rules.iter().rev() {
        // Tests with a placeholder jump (fixed below to the block's end).
        let mut block: Vec<Insn> = Vec::new();
        if let Some(k) = r.kind {
            block.push(insn(JMP32_JNE_K, 2, 0, 0, k));
        }
        if r.access != ACC_ALL {
            // Every access asked for must be in the rule's.
            block.push(insn(ALU32_MOV_X, 1, 3, 0, 0));
            block.push(insn(ALU32_AND_K, 1, 0, 0, r.access));
            block.push(insn(JMP32_JNE_X, 1, 3, 0, 0));
        }
        // The immediates are compared as u32 in 32-bit jumps.
        #[allow(clippy::cast_possible_wrap)]
        if let Some(m) = r.major {
            block.push(insn(JMP32_JNE_K, 4, 0, 0, m as i32));
        }
        #[allow(clippy::cast_possible_wrap)]
        if let Some(m) = r.minor {
            block.push(insn(JMP32_JNE_K, 5, 0, 0, m as i32));
        }
        block.push(insn(ALU64_MOV_K, 0, 0, 0, i32::from(r.allow)));
        block.push(insn(JMP_EXIT, 0, 0, 0, 0));
        let len = block.len();
        for (i, ins) in block.iter_mut().enumerate() {
            if matches!(ins.code, JMP32_JNE_K | JMP32_JNE_X) {
                // Fits: a block is at most 8 instructions.
                #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
                {
                    ins.off = (len - i - 1) as i16;
                }
            }
        }
        p.extend(block);
        if len == 2 {
            // A rule matching everything: what follows is unreachable,
            // which the verifier refuses.
            return p;
        }
    }
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    p
}

/// The kernel's encoding of a program (8 bytes per instruction).
fn encode(p: &[Insn]) -> Vec<u64> {
    p.iter()
        .map(|i| {
            let mut b = [0u8; 8];
            b[0] = i.code;
            b[1] = (i.src << 4) | (i.dst & 0xf);
            b[2..4].copy_from_slice(&i.off.to_le_bytes());
            b[4..8].copy_from_slice(&i.imm.to_le_bytes());
            u64::from_ne_bytes(b)
        })
        .collect()
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// union bpf_attr for BPF_PROG_LOAD, up to expected_attach_type.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// union bpf_attr for BPF_PROG_ATTACH.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// bpf(2) with an attribute struct of its exact size.
///
/// # Safety
/// `attr` must be the struct the kernel expects for `cmd`, and every
/// pointer in it valid for the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: per the function's contract; the size is the struct's.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Loads the program for `rules` and attaches it to the cgroup at `dir`.
/// The attachment lives as long as the cgroup.
pub fn attach(dir: &Path, rules: &[Rule]) -> Result<(), DeviceError> {
    let err = |what: &'static str| {
        let path = dir.display().to_string();
        move |source| DeviceError::Bpf { what, path, source }
    };
    let code = encode(&program(rules));
    let license = b"Apache-2.0\0";
    let mut name = [0u8; 16];
    // The kernel takes letters, digits, `_` and `.` in a name.
    name[..10].copy_from_slice(b"husk_devcg");
    let load = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(code.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
            .map_err(err("loading"))?,
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_DEVICE,
    };
    // SAFETY: a ProgLoad for BPF_PROG_LOAD; `code` and `license` outlive
    // the call.
    let fd = match unsafe { bpf(BPF_PROG_LOAD, &load) } {
        Ok(fd) => fd,
        Err(e) => {
            // Once more with the verifier's log, for the error.
            let mut log = vec![0u8; 16 << 10];
            let with_log = ProgLoad {
                log_level: 1,
                log_size: u32::try_from(log.len()).unwrap_or(0),
                log_buf: log.as_mut_ptr() as u64,
                ..load
            };
            // SAFETY: as above; `log` is writable for log_size bytes and
            // outlives the call.
            let _ = unsafe { bpf(BPF_PROG_LOAD, &with_log) }.map(|fd| {
                // SAFETY: a new fd nobody owns: closed at once.
                drop(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap_or(-1)) });
            });
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(4).collect();
            let msg = format!("{e}; verifier: {}", tail.join(" | "));
            return Err(err("loading")(io::Error::new(e.kind(), msg)));
        }
    };
    let fd = i32::try_from(fd)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
        .map_err(err("loading"))?;
    // SAFETY: bpf(2) returned a new fd that nothing else owns.
    let prog = unsafe { OwnedFd::from_raw_fd(fd) };
    let cg = std::fs::File::open(dir).map_err(err("opening the cgroup for"))?;
    let to_u32 = |fd: i32| u32::try_from(fd).unwrap_or(u32::MAX);
    let at = ProgAttach {
        target_fd: to_u32(cg.as_raw_fd()),
        attach_bpf_fd: to_u32(prog.as_raw_fd()),
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    // SAFETY: a ProgAttach for BPF_PROG_ATTACH with two open fds.
    unsafe { bpf(BPF_PROG_ATTACH, &at) }.map_err(err("attaching"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The program, run by a small interpreter of the instructions it
    /// uses: the verdict for (type, access, major, minor).
    // Register arithmetic is the machine's: truncating and wrapping casts.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_possible_wrap
    )]
    fn run(p: &[Insn], kind: i32, access: i32, major: u32, minor: u32) -> i32 {
        let ctx = [((access << 16) | kind) as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (d, s) = (i.dst as usize, i.src as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(s, 1);
                    r[d] = u64::from(ctx[(i.off / 4) as usize]);
                }
                ALU32_AND_K => r[d] = u64::from((r[d] as u32) & (i.imm as u32)),
                ALU32_RSH_K => r[d] = u64::from((r[d] as u32) >> i.imm),
                ALU32_MOV_X => r[d] = u64::from(r[s] as u32),
                ALU64_MOV_K => r[d] = i.imm as u64,
                JMP32_JNE_K => {
                    if r[d] as u32 != i.imm as u32 {
                        pc += i.off as usize;
                    }
                }
                JMP32_JNE_X => {
                    if r[d] as u32 != r[s] as u32 {
                        pc += i.off as usize;
                    }
                }
                JMP_EXIT => return r[0] as i32,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    fn spec(json: &str) -> Vec<LinuxDeviceCgroup> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn default_deny_and_runcs_allow_list() {
        let p = program(&rules(&spec(r#"[{"allow": false, "access": "rwm"}]"#)).unwrap());
        let rw = ACC_READ | ACC_WRITE;
        assert_eq!(run(&p, DEV_CHAR, rw, 1, 3), 1, "null");
        assert_eq!(run(&p, DEV_CHAR, rw, 136, 7), 1, "pts/7");
        assert_eq!(run(&p, DEV_CHAR, ACC_MKNOD, 10, 200), 1, "mknod");
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 1), 0, "mem");
        assert_eq!(run(&p, DEV_BLOCK, ACC_READ, 8, 0), 0, "sda");
        assert_eq!(run(&p, DEV_CHAR, ACC_READ | ACC_MKNOD, 240, 0), 0);
        // No rules from the spec at all: still a default deny.
        let p = program(&rules(&[]).unwrap());
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 1), 0);
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 9), 1);
    }

    #[test]
    fn the_last_matching_rule_decides() {
        let p = program(
            &rules(&spec(
                r#"[{"allow": false, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 240, "access": "r"},
                    {"allow": false, "type": "c", "major": 240, "minor": 1}]"#,
            ))
            .unwrap(),
        );
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 240, 0), 1);
        assert_eq!(
            run(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 240, 0),
            0,
            "w not in r"
        );
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 240, 1), 0, "denied after");
        assert_eq!(run(&p, DEV_BLOCK, ACC_READ, 240, 0), 0, "type");
        // A deny of the defaults does not win: they come last (runc).
        let p = program(&rules(&spec(r#"[{"allow": false, "type": "c", "major": 1}]"#)).unwrap());
        assert_eq!(run(&p, DEV_CHAR, ACC_READ, 1, 3), 1);
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(rules(&spec(r#"[{"allow": true, "access": "rx"}]"#)).is_err());
        assert!(rules(&spec(r#"[{"allow": true, "major": -2}]"#)).is_err());
        assert!(rules(&spec(r#"[{"allow": true, "minor": 4294967296}]"#)).is_err());
        let r = rules(&spec(r#"[{"allow": true, "type": "p"}]"#)).unwrap();
        assert_eq!(r.len(), DEFAULT_ALLOWED.len());
    }
}
