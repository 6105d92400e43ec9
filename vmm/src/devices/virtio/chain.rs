//! Validated scatter-gather view of one descriptor chain.
//!
//! The guest writes the descriptors, so before a device touches the buffers
//! this module checks every one of them: the direction the device expects,
//! the whole range inside guest memory, and a bound on the total length.
//! Copies then go through vm-memory's checked accessors, never raw pointers.
//!
//! Shared by the vsock and net devices.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, Permissions};

use crate::devices::virtio::GuestMemory;

/// Which way the device uses a chain's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The device reads them (the driver's requests, e.g. a tx queue).
    DeviceReadable,
    /// The device writes them (buffers the driver lends, e.g. an rx queue).
    DeviceWritable,
}

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {index} has the wrong direction (expected {expected:?})")]
    WrongDirection { index: usize, expected: Direction },
    #[error("descriptor {index} ({addr:#x}+{len}) is outside guest memory")]
    OutOfMemory { index: usize, addr: u64, len: u32 },
    #[error("chain is longer than {max} bytes")]
    TooLong { max: usize },
}

/// The buffers of one chain, all checked against guest memory.
#[derive(Debug)]
pub struct SgList {
    head_index: u16,
    segments: Vec<(GuestAddress, usize)>,
    len: usize,
}

impl SgList {
    /// Walks `chain`, requiring every descriptor to go `dir` and the sum of
    /// their lengths to stay within `max_len`.
    ///
    /// The chain iterator itself bounds the walk by the queue size (no
    /// loops) and stops at descriptors it cannot read.
    pub fn from_chain<M>(
        mem: &GuestMemory,
        chain: DescriptorChain<M>,
        dir: Direction,
        max_len: usize,
    ) -> Result<Self, ChainError>
    where
        M: Deref<Target = GuestMemory>,
    {
        let head_index = chain.head_index();
        let mut segments = Vec::new();
        let mut len: usize = 0;
        let access = match dir {
            Direction::DeviceReadable => Permissions::Read,
            Direction::DeviceWritable => Permissions::Write,
        };
        for (index, desc) in chain.enumerate() {
            let writable = desc.is_write_only();
            if writable != (dir == Direction::DeviceWritable) {
                return Err(ChainError::WrongDirection {
                    index,
                    expected: dir,
                });
            }
            let seg_len = desc.len() as usize;
            len = len
                .checked_add(seg_len)
                .filter(|l| *l <= max_len)
                .ok_or(ChainError::TooLong { max: max_len })?;
            if !vm_memory::GuestMemory::check_range(mem, desc.addr(), seg_len, access) {
                return Err(ChainError::OutOfMemory {
                    index,
                    addr: desc.addr().raw_value(),
                    len: desc.len(),
                });
            }
            if seg_len > 0 {
                segments.push((desc.addr(), seg_len));
            }
        }
        Ok(Self {
            head_index,
            segments,
            len,
        })
    }

    /// The head descriptor's index, to hand back through the used ring.
    pub fn head_index(&self) -> u16 {
        self.head_index
    }

    /// Total bytes in the chain.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the chain's bytes from `offset` on into `buf`; returns how
    /// many were copied (less than `buf.len()` at the end of the chain).
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut done = 0;
        self.for_each_range(offset, buf.len(), |addr, start, n| {
            mem.read_slice(&mut buf[start..start + n], addr)?;
            done += n;
            Ok(())
        })?;
        Ok(done)
    }

    /// Copies `data` into the chain from `offset` on; returns how many bytes
    /// fit.
    pub fn write_at(
        &self,
        mem: &GuestMemory,
        offset: usize,
        data: &[u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut done = 0;
        self.for_each_range(offset, data.len(), |addr, start, n| {
            mem.write_slice(&data[start..start + n], addr)?;
            done += n;
            Ok(())
        })?;
        Ok(done)
    }

    /// Calls `f(guest address, offset into the caller's buffer, length)` for
    /// each piece of the chain range `[offset, offset + count)`.
    fn for_each_range<F>(
        &self,
        offset: usize,
        count: usize,
        mut f: F,
    ) -> Result<(), vm_memory::GuestMemoryError>
    where
        F: FnMut(GuestAddress, usize, usize) -> Result<(), vm_memory::GuestMemoryError>,
    {
        let mut skip = offset;
        let mut copied = 0;
        for &(addr, seg_len) in &self.segments {
            if copied == count {
                break;
            }
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(count - copied);
            // Cannot overflow: check_range accepted addr..addr+seg_len.
            let at = addr.unchecked_add(skip as u64);
            f(at, copied, n)?;
            copied += n;
            skip = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { F_WRITE } else { 0 };
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn reads_across_segments() {
        let m = mem();
        m.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        m.write_slice(b"world", GuestAddress(0x2000)).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(0x1000, 5, false), desc(0x2000, 5, false)])
            .unwrap();
        let sg = SgList::from_chain(&m, chain, Direction::DeviceReadable, 100).unwrap();
        assert_eq!(sg.len(), 10);
        let mut buf = [0u8; 8];
        assert_eq!(sg.read_at(&m, 3, &mut buf).unwrap(), 7);
        assert_eq!(&buf[..7], b"loworld");
    }

    #[test]
    fn writes_across_segments() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(0x1000, 3, true), desc(0x2000, 10, true)])
            .unwrap();
        let sg = SgList::from_chain(&m, chain, Direction::DeviceWritable, 100).unwrap();
        assert_eq!(sg.write_at(&m, 1, b"abcdef").unwrap(), 6);
        let mut a = [0u8; 2];
        let mut b = [0u8; 4];
        m.read_slice(&mut a, GuestAddress(0x1001)).unwrap();
        m.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(&a, b"ab");
        assert_eq!(&b, b"cdef");
    }

    #[test]
    fn rejects_bad_chains() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(0x1000, 4, false), desc(0x2000, 4, true)])
            .unwrap();
        assert!(matches!(
            SgList::from_chain(&m, chain, Direction::DeviceReadable, 100),
            Err(ChainError::WrongDirection { index: 1, .. })
        ));
        let chain = q.build_desc_chain(&[desc(0xf_fff0, 0x20, false)]).unwrap();
        assert!(matches!(
            SgList::from_chain(&m, chain, Direction::DeviceReadable, 100),
            Err(ChainError::OutOfMemory { .. })
        ));
        let chain = q.build_desc_chain(&[desc(0x1000, 101, false)]).unwrap();
        assert_eq!(
            SgList::from_chain(&m, chain, Direction::DeviceReadable, 100).unwrap_err(),
            ChainError::TooLong { max: 100 }
        );
    }
}
