//! The virtio-vsock packet format (virtio 1.2, 5.10.6): the 44-byte
//! little-endian header, parsing a guest tx chain into a packet and writing
//! a packet into a guest rx chain.
//!
//! Everything the guest controls is validated here, so the connection logic
//! only ever sees well-formed stream packets from the guest's own CID.

use virtio_queue::DescriptorChain;

use crate::devices::virtio::chain::{ChainError, Direction, SgList};
use crate::devices::virtio::GuestMemory;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// Largest payload the device accepts or produces in one packet (the Linux
/// driver's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// The host's well-known CID.
pub const HOST_CID: u64 = 2;
/// The only socket type husk supports.
pub const TYPE_STREAM: u16 = 1;

/// VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// VIRTIO_VSOCK_SHUTDOWN_F_SEND: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A host-to-guest stream header for `op` (credit fields left for the
    /// connection to fill in).
    pub fn host_to_guest(guest_cid: u64, host_port: u32, guest_port: u32, op: Op) -> Self {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            type_: TYPE_STREAM,
            op: op as u16,
            ..Default::default()
        }
    }

    /// The RST answering this (guest-sent) header.
    pub fn reset_reply(&self) -> Self {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Default::default()
        }
    }
}

/// Why a guest tx packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("bad descriptor chain: {0}")]
    Chain(#[from] ChainError),
    #[error("chain holds {0} bytes, shorter than the {HDR_SIZE}-byte header")]
    ShortHeader(usize),
    #[error("header len {len} exceeds the {avail} data bytes in the chain")]
    LenTooBig { len: u32, avail: usize },
    #[error("src_cid {got} is not the guest's cid {expected}")]
    WrongSrcCid { got: u64, expected: u64 },
    /// Well-formed but not something husk handles: the caller answers RST.
    #[error("unsupported packet (type {}, op {})", .0.type_, .0.op)]
    Unsupported(Header),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A validated packet from the guest.
#[derive(Debug)]
pub struct TxPacket {
    pub hdr: Header,
    pub op: Op,
    pub data: Vec<u8>,
}

/// Parses one tx chain: device-readable descriptors holding the header and
/// `hdr.len` bytes of payload.
pub fn parse_tx<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    guest_cid: u64,
) -> Result<TxPacket, PacketError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let sg = SgList::from_chain(
        mem,
        chain,
        Direction::DeviceReadable,
        HDR_SIZE + MAX_PKT_DATA,
    )?;
    if sg.len() < HDR_SIZE {
        return Err(PacketError::ShortHeader(sg.len()));
    }
    let mut raw = [0u8; HDR_SIZE];
    sg.read_at(mem, 0, &mut raw)?;
    let hdr = Header::from_bytes(&raw);

    if hdr.src_cid != guest_cid {
        return Err(PacketError::WrongSrcCid {
            got: hdr.src_cid,
            expected: guest_cid,
        });
    }
    let avail = sg.len() - HDR_SIZE;
    if hdr.len as usize > avail {
        return Err(PacketError::LenTooBig {
            len: hdr.len,
            avail,
        });
    }
    let op = match Op::from_u16(hdr.op) {
        Some(op) if hdr.type_ == TYPE_STREAM => op,
        _ => return Err(PacketError::Unsupported(hdr)),
    };
    // Only RW carries data; a stray len on control packets is ignored.
    let data = if op == Op::Rw && hdr.len > 0 {
        let mut data = vec![0u8; hdr.len as usize];
        sg.read_at(mem, HDR_SIZE, &mut data)?;
        data
    } else {
        Vec::new()
    };
    Ok(TxPacket { hdr, op, data })
}

/// A guest rx buffer the device fills with one packet.
#[derive(Debug)]
pub struct RxBuffer {
    sg: SgList,
}

impl RxBuffer {
    /// Validates an rx chain: device-writable, room for at least a header.
    pub fn new<M>(mem: &GuestMemory, chain: DescriptorChain<M>) -> Result<Self, PacketError>
    where
        M: std::ops::Deref<Target = GuestMemory>,
    {
        // Guests may lend big buffers; the device never writes more than
        // one maximal packet, so larger chains are fine but capped.
        let sg = SgList::from_chain(mem, chain, Direction::DeviceWritable, usize::MAX)?;
        if sg.len() < HDR_SIZE {
            return Err(PacketError::ShortHeader(sg.len()));
        }
        Ok(Self { sg })
    }

    pub fn head_index(&self) -> u16 {
        self.sg.head_index()
    }

    /// Payload bytes one packet may carry in this buffer.
    pub fn data_capacity(&self) -> usize {
        (self.sg.len() - HDR_SIZE).min(MAX_PKT_DATA)
    }

    /// Writes `hdr` (with `len` set to the payload size) and `data`; returns
    /// the byte count for the used ring. `data` must fit `data_capacity`.
    pub fn write(&self, mem: &GuestMemory, hdr: &Header, data: &[u8]) -> Result<u32, PacketError> {
        let data = &data[..data.len().min(self.data_capacity())];
        let mut hdr = *hdr;
        // Cannot truncate: data_capacity() caps data at MAX_PKT_DATA (64 KiB).
        #[allow(clippy::cast_possible_truncation)]
        let (data_len, used_len) = (data.len() as u32, (HDR_SIZE + data.len()) as u32);
        hdr.len = data_len;
        self.sg.write_at(mem, 0, &hdr.to_bytes())?;
        self.sg.write_at(mem, HDR_SIZE, data)?;
        Ok(used_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_CID: u64 = 3;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { F_WRITE } else { 0 };
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn rw_hdr(len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = rw_hdr(5);
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[20..24], &52u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn parses_header_and_data_split_across_descriptors() {
        let m = mem();
        let bytes = rw_hdr(6).to_bytes();
        // Header split 20/24, data in a third descriptor.
        m.write_slice(&bytes[..20], GuestAddress(0x1000)).unwrap();
        m.write_slice(&bytes[20..], GuestAddress(0x2000)).unwrap();
        m.write_slice(b"abcdef", GuestAddress(0x3000)).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[
                desc(0x1000, 20, false),
                desc(0x2000, 24, false),
                desc(0x3000, 6, false),
            ])
            .unwrap();
        let pkt = parse_tx(&m, chain, GUEST_CID).unwrap();
        assert_eq!(pkt.op, Op::Rw);
        assert_eq!(pkt.hdr, rw_hdr(6));
        assert_eq!(pkt.data, b"abcdef");
    }

    fn parse_one(
        m: &GuestMemory,
        hdr: &Header,
        descs: &[RawDescriptor],
    ) -> Result<TxPacket, PacketError> {
        m.write_slice(&hdr.to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let q = MockSplitQueue::new(m, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        parse_tx(m, chain, GUEST_CID)
    }

    #[test]
    fn rejects_malformed_packets() {
        let m = mem();
        let h = rw_hdr(0);
        assert!(matches!(
            parse_one(&m, &h, &[desc(0x1000, 43, false)]),
            Err(PacketError::ShortHeader(43))
        ));
        assert!(matches!(
            parse_one(&m, &rw_hdr(100), &[desc(0x1000, 44 + 99, false)]),
            Err(PacketError::LenTooBig {
                len: 100,
                avail: 99
            })
        ));
        assert!(matches!(
            parse_one(&m, &h, &[desc(0x1000, 44, true)]),
            Err(PacketError::Chain(ChainError::WrongDirection { .. }))
        ));
        let mut bad = h;
        bad.src_cid = 7;
        assert!(matches!(
            parse_one(&m, &bad, &[desc(0x1000, 44, false)]),
            Err(PacketError::WrongSrcCid { got: 7, .. })
        ));
        let mut bad = h;
        bad.op = 99;
        assert!(matches!(
            parse_one(&m, &bad, &[desc(0x1000, 44, false)]),
            Err(PacketError::Unsupported(_))
        ));
        let mut bad = h;
        bad.type_ = 2;
        assert!(matches!(
            parse_one(&m, &bad, &[desc(0x1000, 44, false)]),
            Err(PacketError::Unsupported(_))
        ));
        assert!(matches!(
            parse_one(
                &m,
                &h,
                &[desc(0x1000, 44, false), desc(0x20_0000, 4, false)]
            ),
            Err(PacketError::Chain(ChainError::OutOfMemory { .. }))
        ));
    }

    #[test]
    fn rx_buffer_writes_header_and_data() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(0x1000, 30, true), desc(0x2000, 30, true)])
            .unwrap();
        let rx = RxBuffer::new(&m, chain).unwrap();
        assert_eq!(rx.data_capacity(), 16);
        let h = Header::host_to_guest(GUEST_CID, 1024, 52, Op::Rw);
        // Oversized data is cut to the capacity.
        let n = rx.write(&m, &h, &[0xaa; 20]).unwrap();
        assert_eq!(n, 60);
        let mut raw = [0u8; HDR_SIZE];
        m.read_slice(&mut raw[..30], GuestAddress(0x1000)).unwrap();
        m.read_slice(&mut raw[30..], GuestAddress(0x2000)).unwrap();
        let back = Header::from_bytes(&raw);
        assert_eq!(back.len, 16);
        assert_eq!(back.dst_port, 52);
        let mut data = [0u8; 16];
        m.read_slice(&mut data, GuestAddress(0x200e)).unwrap();
        assert_eq!(data, [0xaa; 16]);

        let chain = q.build_desc_chain(&[desc(0x1000, 40, true)]).unwrap();
        assert!(matches!(
            RxBuffer::new(&m, chain),
            Err(PacketError::ShortHeader(40))
        ));
    }
}
