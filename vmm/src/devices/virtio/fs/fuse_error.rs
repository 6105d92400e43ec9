//! The VMM's own answer to virtio-fs requests once the backend is gone:
//! every request fails with EIO, so the guest's file system calls return
//! errors instead of waiting forever for a backend that will never answer.
//!
//! A request is a descriptor chain: the FUSE request (an in header of 40
//! bytes, then its arguments) in device-readable buffers, then room for
//! the answer in device-writable ones. The answer is a bare FUSE out
//! header (16 bytes: len, error, unique). The chain comes from the guest:
//! it is read and written only through vm-memory's checked accessors, the
//! walk is bounded by the queue (virtio-queue refuses loops and overlong
//! chains), and at most 40 + 16 bytes are copied per chain.

use crate::guest_debug;
use husk_vm_config::control::GuestFaultKind;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::GuestMemory;

/// `struct fuse_in_header`: len, opcode, unique, nodeid, uid, gid, pid,
/// total_extlen + padding.
pub const IN_HEADER_LEN: usize = 40;
/// Offset of `unique` in the in header.
const UNIQUE_OFFSET: usize = 8;
/// `struct fuse_out_header`: len, error, unique.
pub const OUT_HEADER_LEN: usize = 16;

/// The out header answering request `unique` with `-errno`.
pub fn out_header(unique: u64, errno: i32) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    // OUT_HEADER_LEN is 16: fits u32.
    #[allow(clippy::cast_possible_truncation)]
    h[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    h[4..8].copy_from_slice(&(-errno).to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// Answers the request in `chain` with `-errno`; returns the bytes written
/// to the chain (the used length): [`OUT_HEADER_LEN`], or 0 for a chain with
/// no room for an answer (FORGET requests expect none) or one whose buffers
/// lie outside guest memory.
pub fn answer(chain: impl Iterator<Item = Descriptor>, mem: &GuestMemory, errno: i32) -> u32 {
    let mut header = [0u8; IN_HEADER_LEN];
    let mut header_len = 0usize;
    // Where the answer goes: the first writable bytes, possibly spread over
    // several descriptors.
    let mut out: Vec<(GuestAddress, usize)> = Vec::new();
    let mut out_room = 0usize;
    for desc in chain {
        let len = desc.len() as usize;
        if desc.is_write_only() {
            if out_room < OUT_HEADER_LEN && len > 0 {
                let take = len.min(OUT_HEADER_LEN - out_room);
                out.push((desc.addr(), take));
                out_room += take;
            }
        } else if out.is_empty() && header_len < IN_HEADER_LEN {
            let take = len.min(IN_HEADER_LEN - header_len);
            if mem
                .read_slice(&mut header[header_len..header_len + take], desc.addr())
                .is_err()
            {
                guest_debug!(
                    GuestFaultKind::Request,
                    addr = desc.addr().0,
                    "virtio-fs: request header outside guest memory"
                );
                return 0;
            }
            header_len += take;
        }
        if header_len == IN_HEADER_LEN && out_room == OUT_HEADER_LEN {
            break;
        }
    }
    if out_room < OUT_HEADER_LEN {
        return 0;
    }
    let unique = if header_len >= UNIQUE_OFFSET + 8 {
        let mut u = [0u8; 8];
        u.copy_from_slice(&header[UNIQUE_OFFSET..UNIQUE_OFFSET + 8]);
        u64::from_le_bytes(u)
    } else {
        0
    };
    // Checked up front so an answer is never half written.
    if let Some((addr, _)) = out
        .iter()
        .find(|(addr, len)| !vm_memory::GuestMemoryBackend::check_range(mem, *addr, *len))
    {
        guest_debug!(
            GuestFaultKind::Request,
            addr = addr.0,
            "virtio-fs: answer buffer outside guest memory"
        );
        return 0;
    }
    let reply = out_header(unique, errno);
    let mut done = 0usize;
    for (addr, len) in out {
        if mem.write_slice(&reply[done..done + len], addr).is_err() {
            return 0;
        }
        done += len;
    }
    // OUT_HEADER_LEN is 16: fits u32.
    #[allow(clippy::cast_possible_truncation)]
    let n = OUT_HEADER_LEN as u32;
    n
}
