//! virtio-blk requests: parsing a descriptor chain and executing it on the disk.
//!
//! [`Request::parse`] is the only code that interprets guest descriptors; it
//! checks the layout, the header and that every buffer lies inside guest
//! memory. [`Disk::execute`] then only deals with well-formed requests.
//!
//! Layout: like Linux and Firecracker we expect the header (16 bytes) in the
//! first descriptor, the status byte in the last one and the data buffers in
//! between.

use crate::guest_warn;
use husk_vm_config::control::GuestFaultKind;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::QUEUE_SIZE;
use crate::devices::virtio::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: usize = 16;
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Bounce buffer size between guest memory and the file: bounds host memory
/// per request whatever lengths the guest claims.
const CHUNK: usize = 64 * 1024;

// The virtio status codes (0, 1, 2) are written as the one status byte
// (OK is 0, so the other two bound them all).
const _: () = assert!(VIRTIO_BLK_S_IOERR <= 0xff && VIRTIO_BLK_S_UNSUPP <= 0xff);
#[allow(clippy::cast_possible_truncation)] // fits: checked above
pub(crate) const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
#[allow(clippy::cast_possible_truncation)] // fits: checked above
pub(crate) const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
#[allow(clippy::cast_possible_truncation)] // fits: checked above
pub(crate) const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Why one request failed. The guest only sees the status byte; this is for the log.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is longer than {max} descriptors")]
    ChainTooLong { max: usize },
    #[error("descriptor chain is empty or ends in a NEXT flag (loop, bad next index or unreadable descriptor)")]
    BrokenChain,
    #[error("last descriptor is not a writable status byte")]
    NoStatus,
    #[error("status byte at {addr:#x} is outside guest memory")]
    StatusOutsideMemory { addr: u64 },
    #[error("header descriptor is device-writable")]
    HeaderWriteOnly,
    #[error("header descriptor holds {len} bytes, a header needs {HEADER_LEN}")]
    HeaderTooShort { len: u32 },
    #[error("reading the request header: {0}")]
    Header(#[source] GuestMemoryError),
    #[error("data descriptor {index} has the wrong direction for a {kind:?} request")]
    WrongDirection { index: usize, kind: RequestType },
    #[error("data buffer {addr:#x}+{len:#x} is outside guest memory")]
    DataOutsideMemory { addr: u64, len: u32 },
    #[error("data length {len} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength { len: u64 },
    #[error("sectors {sector}..+{count} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("disk I/O at byte {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("guest memory access at {addr:#x}: {source}")]
    Memory {
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// A request the device could not parse, and where (if anywhere) its status
/// byte can be written.
#[derive(Debug)]
pub struct ParseError {
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            t => RequestType::Unsupported(t),
        }
    }

    /// Whether data buffers must be device-writable (Some(true)),
    /// device-readable (Some(false)), or are not touched (None).
    fn data_writable(self) -> Option<bool> {
        match self {
            RequestType::In | RequestType::GetId => Some(true),
            RequestType::Out => Some(false),
            RequestType::Flush | RequestType::Unsupported(_) => None,
        }
    }
}

/// One guest buffer, checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataBuffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A well-formed request: every buffer is inside guest memory and has the
/// direction its type needs.
#[derive(Debug)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    pub data: Vec<DataBuffer>,
    pub status: GuestAddress,
}

impl Request {
    /// Parses a descriptor chain. `chain` is the chain's descriptors in order
    /// (a [`virtio_queue::DescriptorChain`] is such an iterator: it stops after
    /// queue-size descriptors, at a next index outside the table and at an
    /// unreadable descriptor, leaving a NEXT flag on the last one it yields).
    pub fn parse(
        chain: impl Iterator<Item = Descriptor>,
        mem: &GuestMemory,
    ) -> Result<Request, ParseError> {
        let max = usize::from(QUEUE_SIZE);
        let descs: Vec<Descriptor> = chain.take(max + 1).collect();
        let no_status = |error| ParseError {
            status: None,
            error,
        };
        if descs.len() > max {
            return Err(no_status(RequestError::ChainTooLong { max }));
        }
        let (status_desc, rest) = descs
            .split_last()
            .ok_or(no_status(RequestError::BrokenChain))?;
        if status_desc.has_next() {
            return Err(no_status(RequestError::BrokenChain));
        }
        if !status_desc.is_write_only() || status_desc.len() == 0 {
            return Err(no_status(RequestError::NoStatus));
        }
        let status = status_desc.addr();
        if !mem.check_range(status, 1) {
            return Err(no_status(RequestError::StatusOutsideMemory {
                addr: status.0,
            }));
        }
        let fail = |error| ParseError {
            status: Some(status),
            error,
        };

        let (header, data) = rest
            .split_first()
            .ok_or(fail(RequestError::HeaderTooShort { len: 0 }))?;
        if header.is_write_only() {
            return Err(fail(RequestError::HeaderWriteOnly));
        }
        if (header.len() as usize) < HEADER_LEN {
            return Err(fail(RequestError::HeaderTooShort { len: header.len() }));
        }
        let mut raw = [0u8; HEADER_LEN];
        mem.read_slice(&mut raw, header.addr())
            .map_err(|e| fail(RequestError::Header(e)))?;
        // virtio_blk_outhdr: le32 type, le32 reserved, le64 sector.
        let kind = RequestType::from_raw(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&raw[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        let mut buffers = Vec::with_capacity(data.len());
        if let Some(writable) = kind.data_writable() {
            for (index, d) in data.iter().enumerate() {
                if d.is_write_only() != writable {
                    return Err(fail(RequestError::WrongDirection { index, kind }));
                }
                if !mem.check_range(d.addr(), d.len() as usize) {
                    return Err(fail(RequestError::DataOutsideMemory {
                        addr: d.addr().0,
                        len: d.len(),
                    }));
                }
                buffers.push(DataBuffer {
                    addr: d.addr(),
                    len: d.len(),
                });
            }
        }
        Ok(Request {
            kind,
            sector,
            data: buffers,
            status,
        })
    }

    fn data_len(&self) -> u64 {
        self.data.iter().map(|b| u64::from(b.len)).sum()
    }

    /// The bytes the request moves between disk and guest memory: what a
    /// rate limiter's bandwidth bucket charges. Its data for reads and
    /// writes; nothing for flushes, GET_ID and the rest.
    pub fn transfer_len(&self) -> u64 {
        match self.kind {
            RequestType::In | RequestType::Out => self.data_len(),
            _ => 0,
        }
    }
}

/// The backing file and what the guest may do with it.
#[derive(Debug)]
pub struct Disk {
    file: File,
    /// In 512-byte sectors; a trailing partial sector is not exposed.
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
}

impl Disk {
    /// `capacity` is in sectors; `id` is what GET_ID returns.
    pub fn new(file: File, capacity: u64, read_only: bool, id: [u8; ID_LEN]) -> Self {
        Self {
            file,
            capacity,
            read_only,
            id,
        }
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Executes `req`; returns how many bytes were written into guest buffers
    /// (not counting the status byte).
    pub fn execute(&self, req: &Request, mem: &GuestMemory) -> Result<u32, RequestError> {
        match req.kind {
            RequestType::In => {
                let offset = self.check_range(req)?;
                self.transfer(req, offset, |buf, off, addr| {
                    self.file
                        .read_exact_at(buf, off)
                        .map_err(|source| RequestError::Io {
                            offset: off,
                            source,
                        })?;
                    mem.write_slice(buf, addr)
                        .map_err(|source| RequestError::Memory {
                            addr: addr.0,
                            source,
                        })
                })?;
                // At most the sum of the (u32-bounded) chain's buffer lengths.
                Ok(u32::try_from(req.data_len()).unwrap_or(u32::MAX))
            }
            RequestType::Out => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let offset = self.check_range(req)?;
                self.transfer(req, offset, |buf, off, addr| {
                    mem.read_slice(buf, addr)
                        .map_err(|source| RequestError::Memory {
                            addr: addr.0,
                            source,
                        })?;
                    self.file
                        .write_all_at(buf, off)
                        .map_err(|source| RequestError::Io {
                            offset: off,
                            source,
                        })
                })?;
                Ok(0)
            }
            RequestType::Flush => {
                self.file
                    .sync_data()
                    .map_err(|source| RequestError::Io { offset: 0, source })?;
                Ok(0)
            }
            RequestType::GetId => {
                let mut id: &[u8] = &self.id;
                let mut written = 0u32;
                for b in &req.data {
                    let n = id.len().min(b.len as usize);
                    mem.write_slice(&id[..n], b.addr)
                        .map_err(|source| RequestError::Memory {
                            addr: b.addr.0,
                            source,
                        })?;
                    id = &id[n..];
                    // n <= ID_LEN (20) bytes: it fits a u32.
                    #[allow(clippy::cast_possible_truncation)]
                    let n = n as u32;
                    written += n;
                }
                Ok(written)
            }
            RequestType::Unsupported(t) => Err(RequestError::Unsupported(t)),
        }
    }

    /// Checks that the request's data covers whole sectors inside the disk;
    /// returns the byte offset of its first sector.
    fn check_range(&self, req: &Request) -> Result<u64, RequestError> {
        let len = req.data_len();
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::UnalignedLength { len });
        }
        let count = len / SECTOR_SIZE;
        let out_of_range = RequestError::OutOfRange {
            sector: req.sector,
            count,
            capacity: self.capacity,
        };
        match req.sector.checked_add(count) {
            Some(end) if end <= self.capacity => Ok(req.sector * SECTOR_SIZE),
            _ => Err(out_of_range),
        }
    }

    /// Walks the request's buffers in bounce-buffer-sized pieces, calling
    /// `step(piece, file offset, guest address)` for each.
    fn transfer(
        &self,
        req: &Request,
        mut offset: u64,
        mut step: impl FnMut(&mut [u8], u64, GuestAddress) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        // The guest claims the lengths: never more than CHUNK of host memory.
        let bounce_len = usize::try_from(req.data_len()).map_or(CHUNK, |len| len.min(CHUNK));
        let mut bounce = vec![0u8; bounce_len];
        for b in &req.data {
            let mut done = 0usize;
            while done < b.len as usize {
                let n = (b.len as usize - done).min(CHUNK);
                // Parsing checked the whole buffer is inside guest memory.
                let addr =
                    b.addr
                        .checked_add(done as u64)
                        .ok_or(RequestError::DataOutsideMemory {
                            addr: b.addr.0,
                            len: b.len,
                        })?;
                step(&mut bounce[..n], offset, addr)?;
                done += n;
                offset += n as u64;
            }
        }
        Ok(())
    }
}

/// Executes a parsed request, or reports why it could not be parsed, and
/// writes its status byte; returns the used length to report for it.
pub fn complete(disk: &Disk, parsed: Result<Request, ParseError>, mem: &GuestMemory) -> u32 {
    let (status_addr, status, written) = match parsed {
        Err(ParseError {
            status: None,
            error,
        }) => {
            guest_warn!(GuestFaultKind::Request, %error, "virtio-blk: malformed request without a status byte");
            return 0;
        }
        Err(ParseError {
            status: Some(addr),
            error,
        }) => {
            guest_warn!(GuestFaultKind::Request, %error, "virtio-blk: malformed request");
            (addr, error.status(), 0)
        }
        Ok(req) => match disk.execute(&req, mem) {
            Ok(written) => (req.status, STATUS_OK, written),
            Err(error) => {
                guest_warn!(GuestFaultKind::Request, %error, kind = ?req.kind, sector = req.sector, "virtio-blk: request failed");
                (req.status, error.status(), 0)
            }
        },
    };
    match mem.write_obj(status, status_addr) {
        Ok(()) => written.saturating_add(1),
        Err(e) => {
            guest_warn!(GuestFaultKind::Request, error = %e, "virtio-blk: writing the status byte");
            0
        }
    }
}
