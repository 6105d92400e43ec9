//! A small rtnetlink client: the NETLINK_ROUTE socket, the few requests the
//! pod network needs (link set-up, addresses, routes, neighbours, the link
//! list) encoded by hand, and the kernel's answers. Hand-written because
//! these five message types are all the agent needs, and a netlink crate
//! family would be a larger share of a static guest binary than the rest of
//! the network code. Layouts: linux/netlink.h, linux/rtnetlink.h,
//! linux/if_link.h, linux/if_addr.h, linux/neighbour.h.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use rustix::net::{self, netlink::SocketAddrNetlink, AddressFamily, RecvFlags, SendFlags};

use super::plan::Mac;

// Message types.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_NEWNEIGH: u16 = 28;

// Header flags.
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
/// In an error answer: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

// Attributes.
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IFF_UP: u32 = 0x1;
/// No duplicate address detection: the address is usable at once (a
/// tentative address cannot be a route's source, nor be bound), and the
/// pod's address was already checked on the host.
const IFA_F_NODAD: u8 = 0x2;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const NUD_PERMANENT: u16 = 0x80;

// Socket options (SOL_NETLINK): errors carry the kernel's reason, and do
// not echo the request back.
const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;
const NETLINK_EXT_ACK: i32 = 11;

const HDR_LEN: usize = 16;
/// Room for the largest answer the kernel sends at once (a dump part).
const RECV_BUF: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("{}{}", io::Error::from_raw_os_error(*errno), reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Kernel { errno: i32, reason: Option<String> },
    #[error("malformed netlink answer")]
    Malformed,
}

impl NlError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// One request: the message type, its header flags, and the fixed header
/// and attributes that follow the netlink header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    kind: u16,
    flags: u16,
    body: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16, header: &[u8]) -> Message {
        Message {
            kind,
            flags: flags | NLM_F_REQUEST,
            body: header.to_vec(),
        }
    }

    /// Appends an attribute, padded to 4 bytes.
    fn attr(mut self, ty: u16, data: &[u8]) -> Message {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.body.extend_from_slice(&len.to_ne_bytes());
        self.body.extend_from_slice(&ty.to_ne_bytes());
        self.body.extend_from_slice(data);
        pad(&mut self.body);
        self
    }

    /// The bytes on the wire, with sequence number `seq`.
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        let len = u32::try_from(HDR_LEN + self.body.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(HDR_LEN + self.body.len());
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&self.kind.to_ne_bytes());
        out.extend_from_slice(&self.flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        out.extend_from_slice(&self.body);
        out
    }
}

fn pad(v: &mut Vec<u8>) {
    v.resize(align(v.len()), 0);
}

fn family(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// struct ifinfomsg.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut h = vec![AF_UNSPEC, 0, 0, 0];
    h.extend_from_slice(&index.to_ne_bytes());
    h.extend_from_slice(&flags.to_ne_bytes());
    h.extend_from_slice(&change.to_ne_bytes());
    h
}

/// Changes link `index`: its name, MTU, and whether it is up (`ip link
/// set`); what is None is left alone.
pub fn set_link(index: u32, name: Option<&str>, mtu: Option<u32>, up: Option<bool>) -> Message {
    let (flags, change) = match up {
        Some(true) => (IFF_UP, IFF_UP),
        Some(false) => (0, IFF_UP),
        None => (0, 0),
    };
    let mut m = Message::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(index, flags, change));
    if let Some(name) = name {
        let mut z = name.as_bytes().to_vec();
        z.push(0);
        m = m.attr(IFLA_IFNAME, &z);
    }
    if let Some(mtu) = mtu {
        m = m.attr(IFLA_MTU, &mtu.to_ne_bytes());
    }
    m
}

/// Sets link `index`'s Ethernet address (`ip link set ... address`).
pub fn set_address(index: u32, mac: &Mac) -> Message {
    Message::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(index, 0, 0)).attr(IFLA_ADDRESS, mac)
}

/// Adds `addr`/`len` to link `index` (`ip addr add`, with the broadcast
/// address `brd +` gives for IPv4, as CNI plugins set it).
pub fn add_address(index: u32, addr: IpAddr, len: u8) -> Message {
    let flags = if addr.is_ipv6() { IFA_F_NODAD } else { 0 };
    let mut h = vec![family(addr), len, flags, 0];
    h.extend_from_slice(&index.to_ne_bytes());
    let a = octets(addr);
    let mut m = Message::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &h)
        .attr(IFA_LOCAL, &a)
        .attr(IFA_ADDRESS, &a);
    if let IpAddr::V4(v4) = addr {
        if len < 31 {
            let host = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            m = m.attr(IFA_BROADCAST, &(u32::from(v4) | host).to_be_bytes());
        }
    }
    m
}

/// What a route request needs; the plan's route with the device resolved.
pub struct RouteSpec {
    pub destination: (IpAddr, u8),
    pub gateway: Option<IpAddr>,
    pub index: u32,
    pub source: Option<IpAddr>,
    pub scope: u8,
}

/// Adds a unicast route to the main table (`ip route add`).
pub fn add_route(r: &RouteSpec) -> Message {
    let (dst, dst_len) = r.destination;
    let mut h = vec![
        family(dst),
        dst_len,
        0, // src_len
        0, // tos
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        r.scope,
        RTN_UNICAST,
    ];
    h.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    let mut m = Message::new(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &h)
        .attr(RTA_TABLE, &u32::from(RT_TABLE_MAIN).to_ne_bytes());
    if dst_len > 0 {
        m = m.attr(RTA_DST, &octets(dst));
    }
    if let Some(g) = r.gateway {
        m = m.attr(RTA_GATEWAY, &octets(g));
    }
    m = m.attr(RTA_OIF, &r.index.to_ne_bytes());
    if let Some(s) = r.source {
        m = m.attr(RTA_PREFSRC, &octets(s));
    }
    m
}

/// Adds or replaces a permanent neighbour entry (`ip neigh replace ...
/// nud permanent`).
pub fn add_neighbor(index: u32, addr: IpAddr, mac: &Mac) -> Message {
    let mut h = vec![family(addr), 0, 0, 0];
    h.extend_from_slice(&index.to_ne_bytes());
    h.extend_from_slice(&NUD_PERMANENT.to_ne_bytes());
    h.extend_from_slice(&[0, 0]); // ndm_flags, ndm_type
    Message::new(RTM_NEWNEIGH, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, &h)
        .attr(NDA_DST, &octets(addr))
        .attr(NDA_LLADDR, mac)
}

/// A network interface as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// None for links without an Ethernet address (loopback has a zero
    /// one; tunnels have none).
    pub mac: Option<Mac>,
}

/// A NETLINK_ROUTE socket of the calling thread's network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        let fd = net::socket_with(
            AddressFamily::NETLINK,
            net::SocketType::RAW,
            net::SocketFlags::CLOEXEC,
            None, // NETLINK_ROUTE
        )?;
        net::bind(&fd, &SocketAddrNetlink::new(0, 0))?;
        for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a
            // live c_int on the stack; the fd is open (owned above). A kernel
            // without the option fails it harmlessly: errors then come
            // without a reason.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    opt,
                    std::ptr::from_ref(&one).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
                );
            }
        }
        Ok(Netlink {
            fd,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Sends `m` and waits for the kernel's acknowledgement.
    pub fn request(&mut self, m: &Message) -> Result<(), NlError> {
        self.exchange(m, |_, _| Ok(()))
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NlError> {
        let m = Message::new(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0, 0, 0));
        let mut links = Vec::new();
        self.exchange(&m, |kind, payload| {
            if kind == RTM_NEWLINK {
                links.push(parse_link(payload).ok_or(NlError::Malformed)?);
            }
            Ok(())
        })?;
        Ok(links)
    }

    /// Sends `m`, hands each answer of another type than error or done to
    /// `each` (type, payload after the netlink header), until the ack, the
    /// error or the end of a dump.
    fn exchange(
        &mut self,
        m: &Message,
        mut each: impl FnMut(u16, &[u8]) -> Result<(), NlError>,
    ) -> Result<(), NlError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = m.encode(seq);
        let sent =
            net::send(self.fd.as_fd(), &bytes, SendFlags::empty()).map_err(io::Error::from)?;
        if sent != bytes.len() {
            return Err(NlError::Malformed);
        }
        loop {
            let (n, full) = net::recv(self.fd.as_fd(), &mut self.buf[..], RecvFlags::TRUNC)
                .map_err(io::Error::from)?;
            if full > n {
                return Err(NlError::Malformed);
            }
            let mut rest = self.buf.get(..n).ok_or(NlError::Malformed)?;
            while !rest.is_empty() {
                let (hdr, payload, next) = split_message(rest).ok_or(NlError::Malformed)?;
                rest = next;
                if hdr.seq != seq {
                    continue; // an answer to an earlier request
                }
                match hdr.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => return error_answer(hdr.flags, payload),
                    kind => each(kind, payload)?,
                }
            }
        }
    }
}

pub(super) struct Header {
    kind: u16,
    flags: u16,
    seq: u32,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The first message of `b`: its header, its payload, and what follows it.
pub(super) fn split_message(b: &[u8]) -> Option<(Header, &[u8], &[u8])> {
    let len = usize::try_from(u32_at(b, 0)?).ok()?;
    if len < HDR_LEN {
        return None;
    }
    let hdr = Header {
        kind: u16_at(b, 4)?,
        flags: u16_at(b, 6)?,
        seq: u32_at(b, 8)?,
    };
    let payload = b.get(HDR_LEN..len)?;
    let next = b.get(align(len).min(b.len())..)?;
    Some((hdr, payload, next))
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `b`, as (type, data).
pub(super) fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let ty = u16_at(b, 2)? & 0x3fff; // without NLA_F_NESTED and byte-order flags
        let data = b.get(4..len)?;
        b = b.get(align(len).min(b.len())..)?;
        Some((ty, data))
    })
}

/// An NLMSG_ERROR payload: error 0 is the ack.
pub(super) fn error_answer(flags: u16, payload: &[u8]) -> Result<(), NlError> {
    let err = i32::from_ne_bytes(
        payload
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(NlError::Malformed)?,
    );
    if err == 0 {
        return Ok(());
    }
    let mut reason = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // With NETLINK_CAP_ACK only the request's header is echoed.
        let tlvs = payload.get(4 + HDR_LEN..).unwrap_or_default();
        reason = attrs(tlvs)
            .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
            .map(|(_, d)| {
                String::from_utf8_lossy(d)
                    .trim_end_matches('\0')
                    .to_string()
            });
    }
    Err(NlError::Kernel {
        errno: err.checked_neg().unwrap_or(i32::MAX),
        reason,
    })
}

/// An RTM_NEWLINK payload: struct ifinfomsg, then attributes.
pub(super) fn parse_link(payload: &[u8]) -> Option<Link> {
    let index = u32_at(payload, 4)?;
    let mut name = None;
    let mut mac = None;
    for (ty, data) in attrs(payload.get(16..)?) {
        match ty {
            IFLA_IFNAME => {
                let s = data.split(|b| *b == 0).next().unwrap_or_default();
                name = Some(String::from_utf8_lossy(s).into_owned());
            }
            IFLA_ADDRESS => mac = data.try_into().ok(),
            _ => {}
        }
    }
    Some(Link {
        index,
        name: name?,
        mac,
    })
}
