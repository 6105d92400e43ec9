//! The VMM's control socket protocol: a Unix stream socket taking one JSON
//! request per line and answering one JSON reply per line.
//!
//! `{"op":"status"}`, `{"op":"pause"}`, `{"op":"resume"}`,
//! `{"op":"shutdown","timeout_ms":N}`,
//! `{"op":"snapshot","path":"/dir","resume":false}` (pause, write the VM's
//! state and memory into the new folder `path`, then stay paused unless
//! `resume`). Replies are `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`; a bad request only earns an error reply.
//! A status reply also carries the [`VmCounters`]: what the guest made the
//! VMM log, drop or suppress.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest request line; a client sending more is disconnected.
pub const MAX_LINE: usize = 4096;
/// Graceful shutdown wait when the request does not say.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 5000;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    // Braces, not unit variants: serde only applies deny_unknown_fields to
    // struct variants of an internally tagged enum.
    Status {},
    Pause {},
    Resume {},
    /// Ctrl-Alt-Del to the guest, then a forced stop after `timeout_ms`.
    Shutdown {
        #[serde(default = "default_timeout")]
        timeout_ms: u64,
    },
    /// Pauses the VM and writes its snapshot into `path`, a folder the VMM
    /// creates (mode 0700; it must not exist). The VM stays paused unless
    /// `resume` is true.
    Snapshot {
        path: std::path::PathBuf,
        #[serde(default)]
        resume: bool,
    },
}

/// What a snapshot wrote and how long it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Size of the state file.
    pub state_bytes: u64,
    /// Bytes of guest memory written (pages that are all zero are holes).
    pub memory_bytes_written: u64,
    /// Guest memory size (the memory file's length).
    pub memory_bytes: u64,
    /// From the request to the files being on disk, pause included.
    pub duration_ms: u64,
}

fn default_timeout() -> u64 {
    DEFAULT_SHUTDOWN_TIMEOUT_MS
}

/// Whether the guest's vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
}

/// What the guest did wrong, as the VMM counts and rate-limits its log
/// lines about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestFaultKind {
    /// A bad access to a virtio-mmio device's registers.
    Mmio,
    /// An access to a guest-physical address no device or memory backs.
    Unmapped,
    /// A bad virtqueue: ring indexes, descriptor chains.
    Queue,
    /// A malformed or failed device request (block, net, vsock, rng,
    /// balloon).
    Request,
    /// A device state change gone wrong, or one the guest can repeat at will
    /// (activation, reset).
    Device,
    /// The serial console failing to write.
    Console,
}

impl GuestFaultKind {
    pub const ALL: [GuestFaultKind; 6] = [
        Self::Mmio,
        Self::Unmapped,
        Self::Queue,
        Self::Request,
        Self::Device,
        Self::Console,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mmio => "mmio",
            Self::Unmapped => "unmapped",
            Self::Queue => "queue",
            Self::Request => "request",
            Self::Device => "device",
            Self::Console => "console",
        }
    }
}

/// One kind of guest fault: how many happened, and how many of their log
/// lines the rate limit suppressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCount {
    pub events: u64,
    pub suppressed: u64,
}

/// The guest console's output: bytes written, and bytes dropped by the
/// rate limit and by the size cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleCount {
    pub written_bytes: u64,
    pub dropped_rate_bytes: u64,
    pub dropped_cap_bytes: u64,
}

/// The VMM's log: bytes written, lines dropped after its cap, and whether
/// the cap was reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCount {
    pub written_bytes: u64,
    pub dropped_lines: u64,
    pub capped: bool,
}

/// Free page reporting (virtio-balloon): the guest's free memory the VMM
/// gave back to the host, and the reported ranges it refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreePageCount {
    pub reported_bytes: u64,
    pub reported_ranges: u64,
    pub refused_ranges: u64,
}

/// The counters a status reply carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCounters {
    pub guest_faults: BTreeMap<GuestFaultKind, FaultCount>,
    pub console: ConsoleCount,
    pub log: LogCount,
    /// Zero without a balloon, or one without free page reporting.
    #[serde(default)]
    pub free_pages: FreePageCount,
}

/// A control reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<VmCounters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok() -> Self {
        Self {
            ok: true,
            state: None,
            counters: None,
            snapshot: None,
            error: None,
        }
    }

    pub fn state(state: VmState) -> Self {
        Self {
            state: Some(state),
            ..Self::ok()
        }
    }

    /// A status reply: the state and the counters.
    pub fn status(state: VmState, counters: VmCounters) -> Self {
        Self {
            state: Some(state),
            counters: Some(counters),
            ..Self::ok()
        }
    }

    /// A snapshot reply: the state the VM is left in and what was written.
    pub fn snapshot(state: VmState, info: SnapshotInfo) -> Self {
        Self {
            state: Some(state),
            snapshot: Some(info),
            ..Self::ok()
        }
    }

    pub fn error(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            state: None,
            counters: None,
            snapshot: None,
            error: Some(error.into()),
        }
    }
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

/// A reply as one JSON line, newline included.
pub fn reply_line(response: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(response)
        .unwrap_or_else(|_| br#"{"ok":false,"error":"internal error"}"#.to_vec());
    line.push(b'\n');
    line
}

/// A request as one JSON line, newline included.
pub fn request_line(request: &Request) -> Vec<u8> {
    // A Request is plain data: serializing it cannot fail.
    let mut line = serde_json::to_vec(request).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Parses one reply line; an `ok: false` reply becomes its error.
pub fn parse_reply(line: &[u8]) -> Result<Response, String> {
    let r: Response = serde_json::from_slice(line).map_err(|e| format!("bad reply: {e}"))?;
    if r.ok {
        Ok(r)
    } else {
        Err(r.error.unwrap_or_else(|| "failed, no reason given".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(parse_request(br#"{"op":"status"}"#), Ok(Request::Status {}));
        assert_eq!(parse_request(br#"{"op":"pause"}"#), Ok(Request::Pause {}));
        assert_eq!(parse_request(br#"{"op":"resume"}"#), Ok(Request::Resume {}));
        assert_eq!(
            parse_request(br#"{"op":"shutdown","timeout_ms":250}"#),
            Ok(Request::Shutdown { timeout_ms: 250 })
        );
        assert_eq!(
            parse_request(br#"{"op":"shutdown"}"#),
            Ok(Request::Shutdown {
                timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS
            })
        );
        assert_eq!(
            parse_request(br#"{"op":"snapshot","path":"/s"}"#),
            Ok(Request::Snapshot {
                path: "/s".into(),
                resume: false
            })
        );
        assert_eq!(
            parse_request(br#"{"op":"snapshot","path":"/s","resume":true}"#),
            Ok(Request::Snapshot {
                path: "/s".into(),
                resume: true
            })
        );
        assert!(parse_request(br#"{"op":"snapshot"}"#).is_err());
    }

    #[test]
    fn rejects_bad_requests() {
        for bad in [
            &br#"{"op":"reboot"}"#[..],
            br#"{"op":"shutdown","timeout_ms":-1}"#,
            br#"{"op":"shutdown","timeout":5}"#,
            br#"{"op":"status","extra":1}"#,
            br#"{}"#,
            b"not json",
            b"\xff\xfe",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.starts_with("bad request: "), "{e}");
        }
    }

    #[test]
    fn replies_are_one_json_line() {
        assert_eq!(
            reply_line(&Response::state(VmState::Paused)),
            b"{\"ok\":true,\"state\":\"paused\"}\n"
        );
        assert_eq!(reply_line(&Response::ok()), b"{\"ok\":true}\n");
        assert_eq!(
            reply_line(&Response::error("x \"y\"")),
            b"{\"ok\":false,\"error\":\"x \\\"y\\\"\"}\n"
        );
    }

    #[test]
    fn requests_and_replies_round_trip() {
        for req in [
            Request::Status {},
            Request::Pause {},
            Request::Shutdown { timeout_ms: 7 },
        ] {
            let line = request_line(&req);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(parse_request(&line[..line.len() - 1]), Ok(req));
        }
        let line = reply_line(&Response::state(VmState::Running));
        assert_eq!(
            parse_reply(&line[..line.len() - 1]),
            Ok(Response::state(VmState::Running))
        );
        assert_eq!(
            parse_reply(br#"{"ok":false,"error":"no"}"#),
            Err("no".to_string())
        );
        assert!(parse_reply(b"{").unwrap_err().starts_with("bad reply"));
    }

    #[test]
    fn status_replies_carry_counters_by_kind_name() {
        let mut counters = VmCounters::default();
        counters.guest_faults.insert(
            GuestFaultKind::Mmio,
            FaultCount {
                events: 5,
                suppressed: 3,
            },
        );
        counters.console.dropped_cap_bytes = 7;
        let line = reply_line(&Response::status(VmState::Running, counters.clone()));
        let text = std::str::from_utf8(&line).unwrap();
        assert!(
            text.contains(r#""guest_faults":{"mmio":{"events":5,"suppressed":3}}"#),
            "{text}"
        );
        assert!(text.contains(r#""dropped_cap_bytes":7"#), "{text}");
        let back = parse_reply(&line[..line.len() - 1]).unwrap();
        assert_eq!(back.counters, Some(counters));
        // A reply without counters (an older VMM) still parses.
        assert_eq!(
            parse_reply(br#"{"ok":true,"state":"running"}"#)
                .unwrap()
                .counters,
            None
        );
        let names: Vec<_> = GuestFaultKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            ["mmio", "unmapped", "queue", "request", "device", "console"]
        );
    }
}
