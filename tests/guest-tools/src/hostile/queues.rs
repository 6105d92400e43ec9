//! The `queues` phase: drives a device's virtio init sequence by hand and
//! submits descriptor chains no driver would: loops, overlaps, addresses
//! outside guest RAM, huge lengths, indirect tables of garbage; and rings
//! laid outside RAM. The rings and buffers live in locked pages of this
//! process, whose guest physical addresses come from /proc/self/pagemap
//! ([`crate::arena`]).
//!
//! Only this process's own pages or addresses outside RAM are ever handed
//! to a device: a device writing where it was told must not corrupt the
//! guest kernel the tool runs on.

use std::io;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use crate::arena::{Arena, PAGE};
use crate::mmio::Window;
use crate::rng::Rng;

/// Every queue is set up with (at most) this many descriptors.
const QSIZE: u16 = 16;
/// Queues a device may have that the tool sets up.
const MAX_QUEUES: u32 = 8;
/// Buffer pages per device.
const BUFS: usize = 4;

// virtio-mmio registers (virtio 1.2, 4.2.2).
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_AVAIL: u64 = 0x090;
const QUEUE_USED: u64 = 0x0a0;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Ring offsets inside a queue's page.
const AVAIL_OFF: u64 = 0x400;
const USED_OFF: u64 = 0x800;

/// A descriptor as the device reads it.
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// The pages one device uses: a ring page per queue, buffers, a page of
/// random bytes (for indirect tables of garbage).
struct Pages {
    rings: Vec<usize>,
    bufs: [usize; BUFS],
    garbage: usize,
}

/// Pages the arena needs per device.
pub const PAGES_PER_DEVICE: usize = MAX_QUEUES as usize + BUFS + 1;

/// What the `queues` phase did to all devices.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub devices: u32,
    pub activated: u32,
    pub refused: u32,
    pub chains: u64,
    pub notifies: u64,
    pub used: u64,
    pub outside_rings_refused: u32,
}

/// Where the bad addresses point: one past RAM, the MMIO hole, the top of
/// the address space.
struct Outside {
    ram_end: u64,
}

impl Outside {
    fn addrs(&self) -> [u64; 5] {
        [
            self.ram_end,
            self.ram_end - 8,
            0xd000_0000,
            u64::MAX - 7,
            1 << 63,
        ]
    }
}

/// Device status helpers over a window.
fn set_status(w: &Window, s: u32) {
    w.w32(STATUS, s);
}

fn features(w: &Window) -> u64 {
    w.w32(DEVICE_FEATURES_SEL, 0);
    let lo = w.r32(DEVICE_FEATURES);
    w.w32(DEVICE_FEATURES_SEL, 1);
    let hi = w.r32(DEVICE_FEATURES);
    u64::from(hi) << 32 | u64::from(lo)
}

fn split(v: u64) -> (u32, u32) {
    let b = v.to_le_bytes();
    (
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    )
}

fn set_addr(w: &Window, reg: u64, addr: u64) {
    let (lo, hi) = split(addr);
    w.w32(reg, lo);
    w.w32(reg + 4, hi);
}

/// Queue layout addresses: (desc, avail, used).
type RingAddrs = (u64, u64, u64);

/// Resets the device and runs the init sequence with the given ring
/// addresses per queue; returns how many queues it set up, or None when
/// the device refused (FEATURES_OK or DRIVER_OK not taken).
fn init(w: &Window, rings: &[RingAddrs]) -> Option<u32> {
    set_status(w, 0);
    if w.r32(STATUS) != 0 {
        return None;
    }
    set_status(w, S_ACK);
    set_status(w, S_ACK | S_DRIVER);
    // Accept everything offered: the device said it can do it.
    let (lo, hi) = split(features(w));
    w.w32(DRIVER_FEATURES_SEL, 0);
    w.w32(DRIVER_FEATURES, lo);
    w.w32(DRIVER_FEATURES_SEL, 1);
    w.w32(DRIVER_FEATURES, hi);
    set_status(w, S_ACK | S_DRIVER | S_FEATURES_OK);
    if w.r32(STATUS) & S_FEATURES_OK == 0 {
        return None;
    }
    let mut n = 0;
    for (q, &(desc, avail, used)) in (0..MAX_QUEUES).zip(rings) {
        w.w32(QUEUE_SEL, q);
        let max = w.r32(QUEUE_NUM_MAX);
        if max == 0 {
            break;
        }
        w.w32(QUEUE_NUM, u32::from(QSIZE).min(max));
        set_addr(w, QUEUE_DESC, desc);
        set_addr(w, QUEUE_AVAIL, avail);
        set_addr(w, QUEUE_USED, used);
        w.w32(QUEUE_READY, 1);
        n += 1;
    }
    set_status(w, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    let s = w.r32(STATUS);
    (s & S_DRIVER_OK != 0 && s & S_NEEDS_RESET == 0).then_some(n)
}

/// One queue as the tool drives it.
struct Queue<'a> {
    arena: &'a Arena,
    page: usize,
    index: u32,
    size: u16,
    avail_idx: u16,
}

impl Queue<'_> {
    fn write_desc(&self, i: u16, d: Desc) {
        self.arena
            .put(self.page, u64::from(i % self.size) * 16, &d.bytes());
    }

    /// Puts `heads` in the avail ring and moves its index by `idx_step`
    /// (normally heads.len(); more to lie about how many there are).
    fn offer(&mut self, heads: &[u16], idx_step: u16) {
        for (k, h) in heads.iter().enumerate() {
            let slot = self.avail_idx.wrapping_add(u16::try_from(k).unwrap_or(0)) % self.size;
            self.arena.put(
                self.page,
                AVAIL_OFF + 4 + u64::from(slot) * 2,
                &h.to_le_bytes(),
            );
        }
        self.avail_idx = self.avail_idx.wrapping_add(idx_step);
        fence(Ordering::SeqCst);
        self.arena
            .put(self.page, AVAIL_OFF + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
    }

    fn used_idx(&self) -> u16 {
        self.arena.get_u16(self.page, USED_OFF + 2)
    }
}

/// Scenario `k` of descriptor chains on `q`: writes descriptors, offers
/// heads. Returns how many chains it offered.
fn scenario(k: u64, q: &mut Queue, p: &Pages, out: &Outside, rng: &mut Rng) -> u64 {
    let a = q.arena;
    let buf = |i: usize| a.phys(p.bufs[i]);
    let garbage = a.phys(p.garbage);
    let d = |addr, len, flags, next| Desc {
        addr,
        len,
        flags,
        next,
    };
    let n = q.size;
    match k % 12 {
        // A plain two-descriptor chain (so the device has work it can do).
        0 => {
            q.write_desc(0, d(buf(0), 64, F_NEXT, 1));
            q.write_desc(1, d(buf(1), 4096, F_WRITE, 0));
            q.offer(&[0], 1);
            1
        }
        // A loop: 0 -> 1 -> 0, and a descriptor that is its own next.
        1 => {
            q.write_desc(0, d(buf(0), 64, F_NEXT, 1));
            q.write_desc(1, d(buf(1), 64, F_NEXT | F_WRITE, 0));
            q.write_desc(2, d(buf(2), 64, F_NEXT | F_WRITE, 2));
            q.offer(&[0, 2], 2);
            2
        }
        // Next out of range.
        2 => {
            q.write_desc(0, d(buf(0), 64, F_NEXT, n + 3));
            q.write_desc(1, d(buf(0), 64, F_NEXT, u16::MAX));
            q.offer(&[0, 1], 2);
            2
        }
        // Overlaps: the same head offered three times, a chain whose tail
        // is another chain's head, two chains on the same buffer.
        3 => {
            q.write_desc(0, d(buf(0), 64, F_NEXT, 1));
            q.write_desc(1, d(buf(1), 4096, F_WRITE, 0));
            q.write_desc(2, d(buf(1), 4096, F_WRITE, 0));
            q.offer(&[0, 0, 1, 0, 2], 5);
            5
        }
        // Addresses outside RAM, wrapping past 2^64, in the MMIO hole.
        4 => {
            let addrs = out.addrs();
            for (i, addr) in addrs.iter().enumerate() {
                let i = u16::try_from(i).unwrap_or(0);
                q.write_desc(2 * i, d(*addr, 4096, F_NEXT, 2 * i + 1));
                q.write_desc(2 * i + 1, d(*addr, 64, F_WRITE, 0));
            }
            q.offer(&[0, 2, 4, 6, 8], 5);
            5
        }
        // Huge lengths: read from a valid address, written outside RAM.
        // A device may fill a prefix of a writable buffer (virtio-rng fills
        // up to 64 KiB of one), so a huge writable length from this tool's
        // page would overwrite guest pages it does not own: the guest would
        // wreck its own kernel, which tests nothing of the VMM.
        5 => {
            let o = out.addrs();
            q.write_desc(0, d(buf(0), u32::MAX, F_NEXT, 1));
            q.write_desc(1, d(o[0], 0x8000_0000, F_WRITE, 0));
            q.write_desc(2, d(o[3], u32::MAX, F_WRITE, 0));
            q.offer(&[0, 2], 2);
            2
        }
        // Zero lengths, a chain as long as the queue, every flag.
        6 => {
            for i in 0..n {
                q.write_desc(
                    i,
                    d(buf(usize::from(i) % BUFS), 0, F_NEXT | F_WRITE, (i + 1) % n),
                );
            }
            q.write_desc(n - 1, d(buf(0), 0, !F_INDIRECT, 0));
            q.offer(&[0, n / 2], 2);
            2
        }
        // Indirect tables: of random garbage, of odd length, of length 0,
        // huge, outside RAM, nested, and one that loops inside itself.
        7 => {
            a.fill(p.garbage, Some(rng));
            let table = [
                d(buf(0), 64, F_NEXT, 1),
                d(buf(1), 64, F_INDIRECT, 0),
                d(buf(2), 64, F_NEXT | F_WRITE, 0),
            ];
            for (i, t) in table.iter().enumerate() {
                a.put(p.bufs[3], (i as u64) * 16, &t.bytes());
            }
            q.write_desc(0, d(garbage, 4096, F_INDIRECT, 0));
            q.write_desc(1, d(garbage, 15, F_INDIRECT, 0));
            q.write_desc(2, d(garbage, 0, F_INDIRECT, 0));
            q.write_desc(3, d(garbage, !15, F_INDIRECT, 0));
            q.write_desc(4, d(out.ram_end, 4096, F_INDIRECT, 0));
            q.write_desc(5, d(buf(3), 48, F_INDIRECT | F_NEXT, 6));
            q.write_desc(6, d(buf(3), 48, F_INDIRECT, 0));
            q.offer(&[0, 1, 2, 3, 4, 5], 6);
            6
        }
        // Head indexes out of range.
        8 => {
            q.offer(&[n, u16::MAX, n + 1], 3);
            3
        }
        // Random descriptors (addresses kept to this tool's pages or
        // outside RAM) and random heads.
        9 => {
            for i in 0..n {
                let addr = match rng.below(3) {
                    0 => buf(usize::try_from(rng.below(BUFS as u64)).unwrap_or(0)),
                    1 => out.addrs()[usize::try_from(rng.below(5)).unwrap_or(0)],
                    _ => garbage,
                };
                let [f0, f1, n0, n1, ..] = rng.next_u64().to_le_bytes();
                // Within the page on this tool's pages: past it lies memory
                // the guest's kernel owns (see scenario 5).
                let max = if addr < out.ram_end { PAGE } else { 8191 };
                let len = u32::try_from(rng.below(max + 1)).unwrap_or(0);
                let flags = u16::from_le_bytes([f0, f1]);
                // The random page only ever as an indirect table, never as a
                // plain buffer: a balloon would read it as page numbers and
                // hand back guest pages the kernel still uses.
                let flags = if addr == garbage {
                    flags | F_INDIRECT
                } else {
                    flags & !F_INDIRECT
                };
                q.write_desc(i, d(addr, len, flags, u16::from_le_bytes([n0, n1])));
            }
            let heads: Vec<u16> = (0..4)
                .map(|_| u16::try_from(rng.below(u64::from(n) + 2)).unwrap_or(0))
                .collect();
            q.offer(&heads, 4);
            4
        }
        // The avail index runs far ahead of what the ring holds.
        10 => {
            q.write_desc(0, d(buf(0), 64, 0, 0));
            q.offer(&[0], 0x8000);
            1
        }
        // The ring's flags and used_event garbage.
        _ => {
            let [f0, f1, e0, e1, ..] = rng.next_u64().to_le_bytes();
            a.put(q.page, AVAIL_OFF, &[f0, f1]);
            a.put(q.page, AVAIL_OFF + 4 + u64::from(n) * 2, &[e0, e1]);
            q.write_desc(0, d(buf(0), 64, F_NEXT, 1));
            q.write_desc(1, d(buf(1), 64, F_WRITE, 0));
            q.offer(&[0], 1);
            1
        }
    }
}

/// Runs the phase on one device (its window, its pages) until `deadline`.
fn attack(
    w: &Window,
    arena: &Arena,
    p: &Pages,
    out: &Outside,
    rng: &mut Rng,
    deadline: Instant,
    stats: &mut QueueStats,
) {
    let normal: Vec<RingAddrs> = p
        .rings
        .iter()
        .map(|&r| {
            let base = arena.phys(r);
            (base, base + AVAIL_OFF, base + USED_OFF)
        })
        .collect();
    // A device that cannot be reset (vsock) still runs on its driver's
    // rings: never give it this tool's pages, which are freed at exit.
    set_status(w, 0);
    if w.r32(STATUS) != 0 {
        stats.refused += 1;
        return;
    }
    let mut round = 0u64;
    while Instant::now() < deadline {
        // Rings outside RAM, or all three rings on one address: the device
        // must refuse the former; the latter is legal, if odd.
        let o = out.addrs();
        let outside: Vec<RingAddrs> = normal.iter().map(|_| (o[3], o[0], o[2])).collect();
        if init(w, &outside).is_none() {
            stats.outside_rings_refused += 1;
        }
        let same: Vec<RingAddrs> = normal.iter().map(|r| (r.0, r.0, r.0)).collect();
        let layout = if round % 4 == 3 { &same } else { &normal };
        for r in &p.rings {
            arena.put(*r, 0, &[0u8; 0x1000]);
        }
        for b in p.bufs {
            arena.fill(b, None);
        }
        let Some(nq) = init(w, layout) else {
            stats.refused += 1;
            return;
        };
        stats.activated += 1;
        let mut queues: Vec<Queue> = (0..nq)
            .map(|i| {
                w.w32(QUEUE_SEL, i);
                let size = u16::try_from(w.r32(QUEUE_NUM_MAX).min(u32::from(QSIZE))).unwrap_or(1);
                Queue {
                    arena,
                    page: p.rings[i as usize],
                    index: i,
                    size,
                    avail_idx: 0,
                }
            })
            .collect();
        for k in 0..12 {
            for q in &mut queues {
                stats.chains += scenario(round * 12 + k, q, p, out, rng);
                for _ in 0..8 {
                    w.w32(QUEUE_NOTIFY, q.index);
                    stats.notifies += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
            let isr = w.r32(INTERRUPT_STATUS);
            w.w32(INTERRUPT_ACK, isr);
        }
        stats.used += queues.iter().map(|q| u64::from(q.used_idx())).sum::<u64>();
        round += 1;
    }
}

/// The phase: every device in turn, `per_device` each.
pub fn run(
    windows: &[Window],
    ram_end: u64,
    rng: &mut Rng,
    per_device: Duration,
) -> io::Result<QueueStats> {
    let mut stats = QueueStats::default();
    if windows.is_empty() {
        return Ok(stats);
    }
    let arena = Arena::new(windows.len() * PAGES_PER_DEVICE)?;
    let out = Outside { ram_end };
    for (i, w) in windows.iter().enumerate() {
        let first = i * PAGES_PER_DEVICE;
        let pages = Pages {
            rings: (first..first + MAX_QUEUES as usize).collect(),
            bufs: std::array::from_fn(|b| first + MAX_QUEUES as usize + b),
            garbage: first + PAGES_PER_DEVICE - 1,
        };
        stats.devices += 1;
        let id = w.r32(DEVICE_ID);
        let before = (stats.chains, stats.used);
        attack(
            w,
            &arena,
            &pages,
            &out,
            rng,
            Instant::now() + per_device,
            &mut stats,
        );
        crate::settle();
        println!(
            "HUSK_TEST hostile queues-device id={id} chains={} used={}",
            stats.chains - before.0,
            stats.used - before.1
        );
        // Leave the device reset, not running on pages about to be freed.
        set_status(w, 0);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_laid_out_as_virtio_says() {
        let d = Desc {
            addr: 0x1122_3344_5566_7788,
            len: 0x99aa_bbcc,
            flags: F_NEXT | F_WRITE,
            next: 7,
        };
        let b = d.bytes();
        assert_eq!(b[..8], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[8..12], 0x99aa_bbccu32.to_le_bytes());
        assert_eq!(b[12..14], 3u16.to_le_bytes());
        assert_eq!(b[14..], 7u16.to_le_bytes());
    }

    /// No scenario hands a device a writable buffer in RAM beyond one of
    /// this tool's pages: a device may fill it, and past the page lies the
    /// guest kernel's memory.
    #[test]
    fn writable_buffers_in_ram_stay_on_the_tools_pages() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let arena = Arena::new(PAGES_PER_DEVICE).unwrap();
        let pages = Pages {
            rings: (0..MAX_QUEUES as usize).collect(),
            bufs: std::array::from_fn(|b| MAX_QUEUES as usize + b),
            garbage: PAGES_PER_DEVICE - 1,
        };
        let own: Vec<u64> = (0..PAGES_PER_DEVICE).map(|i| arena.phys(i)).collect();
        // RAM ends well past every page of the arena.
        let out = Outside {
            ram_end: own.iter().max().unwrap() + (64 << 20),
        };
        let mut rng = Rng::new(7);
        let mut q = Queue {
            arena: &arena,
            page: pages.rings[0],
            index: 0,
            size: QSIZE,
            avail_idx: 0,
        };
        let mut writable = 0;
        for k in 0..1200 {
            arena.put(q.page, 0, &[0u8; 16 * QSIZE as usize]);
            scenario(k, &mut q, &pages, &out, &mut rng);
            for i in 0..u64::from(QSIZE) {
                let mut b = [0u8; 16];
                arena.get(q.page, i * 16, &mut b);
                let addr = u64::from_le_bytes(b[..8].try_into().unwrap());
                let len = u64::from(u32::from_le_bytes(b[8..12].try_into().unwrap()));
                let flags = u16::from_le_bytes([b[12], b[13]]);
                // The outside addresses are meant (ram_end - 8 straddles
                // RAM's end: a device must refuse the whole range).
                if flags & F_WRITE == 0 || flags & F_INDIRECT != 0 || out.addrs().contains(&addr) {
                    continue;
                }
                writable += 1;
                assert!(
                    own.contains(&(addr & !(PAGE - 1))) && addr % PAGE + len <= PAGE,
                    "scenario {}: writable {len} bytes at {addr:#x}, past the tool's pages",
                    k % 12
                );
            }
        }
        assert!(writable > 100, "only {writable} writable buffers checked");
    }
}
