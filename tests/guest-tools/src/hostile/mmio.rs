//! The virtio-mmio devices of the guest and raw access to their register
//! windows through /dev/mem: finding them (/proc/iomem), taking them away
//! from their Linux drivers (sysfs unbind), and the `mmio` phase that writes
//! garbage to every register offset at every access width.

use std::arch::asm;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use crate::rng::Rng;

/// Size of one virtio-mmio window (the VMM's MMIO_LEN).
pub const WINDOW: u64 = 0x1000;
/// "virt", little endian, at offset 0 of every virtio-mmio window.
const MAGIC: u64 = 0x7472_6976;

/// One virtio-mmio platform device.
#[derive(Debug, Clone)]
pub struct Device {
    /// Its platform device name (`virtio-mmio.N`).
    pub name: String,
    pub base: u64,
}

/// Guest physical layout the attack needs: the devices and where RAM ends.
#[derive(Debug)]
pub struct Layout {
    pub devices: Vec<Device>,
    /// One past the highest System RAM byte.
    pub ram_end: u64,
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Reads /proc/iomem (root sees the real addresses).
pub fn layout() -> io::Result<Layout> {
    let text = fs::read_to_string("/proc/iomem").map_err(|e| with_context(e, "/proc/iomem"))?;
    parse_iomem(&text)
}

fn parse_iomem(text: &str) -> io::Result<Layout> {
    let mut devices: Vec<Device> = Vec::new();
    let mut ram_end = 0;
    for line in text.lines() {
        let Some((range, name)) = line.trim().split_once(" : ") else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        if name == "System RAM" {
            ram_end = ram_end.max(end.saturating_add(1));
        } else if name.starts_with("virtio-mmio") && !devices.iter().any(|d| d.base == start) {
            devices.push(Device {
                name: name.to_string(),
                base: start,
            });
        }
    }
    if ram_end == 0 || start_of_zero_addresses(text) {
        return Err(io::Error::other(
            "/proc/iomem shows no RAM or only zero addresses (not root?)",
        ));
    }
    devices.sort_by_key(|d| d.base);
    Ok(Layout { devices, ram_end })
}

fn start_of_zero_addresses(text: &str) -> bool {
    text.lines()
        .all(|l| l.trim_start().starts_with("00000000-00000000"))
}

/// Unbinds the device's Linux driver, if it has one, so the kernel neither
/// races the tool on the registers nor trips over a device in a state it
/// did not set. Returns the driver's name.
pub fn unbind(dev: &Device) -> io::Result<Option<String>> {
    let driver = Path::new("/sys/bus/platform/devices")
        .join(&dev.name)
        .join("driver");
    let Ok(target) = fs::read_link(&driver) else {
        return Ok(None);
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    fs::write(driver.join("unbind"), &dev.name)
        .map_err(|e| with_context(e, &format!("unbinding {} from {name}", dev.name)))?;
    Ok(Some(name))
}

/// Binds the virtio-mmio driver to the device again: its probe resets the
/// device and starts over, which shows whether the VMM's device survived.
pub fn rebind(dev: &Device) -> io::Result<bool> {
    fs::write("/sys/bus/platform/drivers/virtio-mmio/bind", &dev.name)
        .map_err(|e| with_context(e, &format!("binding {}", dev.name)))?;
    Ok(Path::new("/sys/bus/platform/devices")
        .join(&dev.name)
        .join("driver")
        .exists())
}

/// A device's register window and the page after it (the next device's, or
/// nothing), mapped uncached from /dev/mem, so that accesses which run over
/// the window's end reach whatever lies behind it.
pub struct Window {
    ptr: *mut u8,
    len: usize,
}

impl Window {
    pub fn map(base: u64) -> io::Result<Self> {
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open("/dev/mem")
            .map_err(|e| with_context(e, "/dev/mem"))?;
        let len = usize::try_from(2 * WINDOW).map_err(io::Error::other)?;
        let offset = libc::off_t::try_from(base).map_err(io::Error::other)?;
        // SAFETY: a fresh shared mapping of /dev/mem at a page-aligned
        // offset; the result is checked, and the mapping is only ever used
        // through this Window, which unmaps it on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(with_context(
                io::Error::last_os_error(),
                &format!("mmap /dev/mem at {base:#x}"),
            ));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Whether the window answers like a virtio-mmio device.
    pub fn is_virtio(&self) -> bool {
        self.read(0, 4) == MAGIC
    }

    /// One access of `width` (1, 2, 4 or 8) bytes at `offset`; any
    /// alignment, as a single instruction (so one MMIO exit, or two where
    /// it crosses a page).
    pub fn write(&self, offset: u64, width: u64, value: u64) {
        let Some(addr) = self.addr(offset, width) else {
            return;
        };
        // SAFETY: addr..addr+width lies inside this live mapping (checked
        // by `addr`); it is device memory, so the write has no effect on
        // memory Rust knows about.
        unsafe { write_at(addr, width, value) }
    }

    pub fn read(&self, offset: u64, width: u64) -> u64 {
        let Some(addr) = self.addr(offset, width) else {
            return 0;
        };
        // SAFETY: as for `write`.
        unsafe { read_at(addr, width) }
    }

    pub fn r32(&self, offset: u64) -> u32 {
        u32::try_from(self.read(offset, 4)).unwrap_or(u32::MAX)
    }

    pub fn w32(&self, offset: u64, value: u32) {
        self.write(offset, 4, u64::from(value));
    }

    fn addr(&self, offset: u64, width: u64) -> Option<*mut u8> {
        let end = offset.checked_add(width)?;
        let off = usize::try_from(offset).ok()?;
        if usize::try_from(end).ok()? > self.len {
            return None;
        }
        // SAFETY: off + width <= len: the pointer stays inside the mapping.
        Some(unsafe { self.ptr.add(off) })
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `map`, used by
        // nothing else once the window is dropped.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// # Safety
/// `addr..addr+width` must lie in a live mapping the caller owns.
// The width picks how many low bytes of `value` are written: truncation is
// the point.
#[allow(clippy::cast_possible_truncation)]
unsafe fn write_at(addr: *mut u8, width: u64, value: u64) {
    // SAFETY: the caller guarantees addr is mapped for `width` bytes.
    unsafe {
        match width {
            1 => {
                asm!("mov byte ptr [{a}], {v}", a = in(reg) addr, v = in(reg_byte) value as u8, options(nostack, preserves_flags))
            }
            2 => {
                asm!("mov word ptr [{a}], {v:x}", a = in(reg) addr, v = in(reg) value as u16, options(nostack, preserves_flags))
            }
            4 => {
                asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) value as u32, options(nostack, preserves_flags))
            }
            _ => {
                asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) value, options(nostack, preserves_flags))
            }
        }
    }
}

/// # Safety
/// `addr..addr+width` must lie in a live mapping the caller owns.
unsafe fn read_at(addr: *mut u8, width: u64) -> u64 {
    // SAFETY: the caller guarantees addr is mapped for `width` bytes.
    unsafe {
        match width {
            1 => {
                let v: u8;
                asm!("mov {v}, byte ptr [{a}]", a = in(reg) addr, v = out(reg_byte) v, options(nostack, preserves_flags));
                u64::from(v)
            }
            2 => {
                let v: u16;
                asm!("mov {v:x}, word ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags));
                u64::from(v)
            }
            4 => {
                let v: u32;
                asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags));
                u64::from(v)
            }
            _ => {
                let v: u64;
                asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags));
                v
            }
        }
    }
}

/// What the `mmio` phase did.
#[derive(Debug, Default)]
pub struct GarbageStats {
    pub writes: u64,
    pub reads: u64,
    pub rounds: u64,
}

/// The queue address registers (virtio 1.2, 4.2.2): QueueDesc, QueueDriver
/// and QueueDevice, each a low and a high half.
const QUEUE_ADDRESS_REGS: [u64; 6] = [0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4];
/// Bit 31 set in a low half keeps an address at or above 2 GiB whatever
/// the high half holds.
const LOW_ADDRESS_FLOOR: u64 = 0x8000_0000;

/// Garbage the phase may write at `offset`: anything, except that a queue's
/// address never lands in RAM. A device activated by garbage does exactly
/// what it was told, and a ring laid over this process's pages or the
/// kernel's would have the VMM (rightly) write used elements or random
/// bytes into them and crash the guest the tool runs on. Guest-chosen
/// addresses inside RAM are the `queues` phase's, in pages it owns.
fn tame(offset: u64, value: u64) -> u64 {
    // The VMM takes only aligned 32-bit register writes; an 8-byte write
    // over a low half is refused whole, so only the low 32 bits matter.
    if QUEUE_ADDRESS_REGS.contains(&offset) && offset.is_multiple_of(8) {
        value | LOW_ADDRESS_FLOOR
    } else {
        value
    }
}

/// Writes garbage to every offset of every window at widths 1, 2, 4 and 8
/// (aligned), then to random offsets at random widths (unaligned, running
/// over the window's end), reading each back, round after round until
/// `deadline`; at least one round. Queue addresses stay outside RAM
/// (`tame`), which must end below 2 GiB.
pub fn garbage(
    windows: &[Window],
    rng: &mut Rng,
    ram_end: u64,
    deadline: Instant,
) -> Result<GarbageStats, String> {
    if ram_end > LOW_ADDRESS_FLOOR {
        return Err(format!(
            "RAM ends at {ram_end:#x}: the mmio phase keeps queues outside RAM only below 2 GiB"
        ));
    }
    let mut stats = GarbageStats::default();
    loop {
        for w in windows {
            for width in [1, 2, 4, 8] {
                for offset in (0..WINDOW).step_by(usize::try_from(width).unwrap_or(1)) {
                    w.write(offset, width, tame(offset, rng.garbage()));
                    w.read(offset, width);
                    stats.writes += 1;
                    stats.reads += 1;
                }
            }
            for _ in 0..1024 {
                let width = [1, 2, 4, 8][usize::from(rng.next_u64().to_le_bytes()[0] & 3)];
                let offset = rng.below(WINDOW + 8);
                w.write(offset, width, tame(offset, rng.garbage()));
                w.read(offset, width);
                stats.writes += 1;
                stats.reads += 1;
            }
        }
        stats.rounds += 1;
        if Instant::now() >= deadline {
            return Ok(stats);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_never_lays_a_queue_in_ram() {
        let mut rng = Rng::new(7);
        for _ in 0..10_000 {
            let (low, high) = (tame(0x080, rng.garbage()), tame(0x084, rng.garbage()));
            let addr = (high << 32) | (low & 0xffff_ffff);
            assert!(addr >= LOW_ADDRESS_FLOOR, "{addr:#x}");
            for reg in [0x090, 0x0a0] {
                assert!(tame(reg, rng.garbage()) & 0xffff_ffff >= LOW_ADDRESS_FLOOR);
            }
        }
        // Other registers get the garbage as it is.
        assert_eq!(tame(0x070, 4), 4);
        assert_eq!(tame(0x044, 0), 0);
    }

    #[test]
    fn finds_the_devices_and_the_end_of_ram() {
        let iomem = "00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000f0000-000fffff : Reserved
00100000-07ffffff : System RAM
  01000000-01a00000 : Kernel code
d0000000-d0000fff : virtio-mmio.0
  d0000000-d0000fff : virtio-mmio.0
d0001000-d0001fff : virtio-mmio.1
fec00000-fec003ff : IOAPIC 0
";
        let l = parse_iomem(iomem).unwrap();
        assert_eq!(l.ram_end, 0x800_0000);
        let found: Vec<(&str, u64)> = l
            .devices
            .iter()
            .map(|d| (d.name.as_str(), d.base))
            .collect();
        assert_eq!(
            found,
            [
                ("virtio-mmio.0", 0xd000_0000),
                ("virtio-mmio.1", 0xd000_1000)
            ]
        );
    }

    #[test]
    fn refuses_the_zeroed_view_of_a_non_root_reader() {
        let iomem = "00000000-00000000 : System RAM
00000000-00000000 : virtio-mmio.0
";
        assert!(parse_iomem(iomem).is_err());
    }
}
