//! A [`VmSpec`] validated into a [`VmConfig`], whose fields the VMM can
//! trust. Every error names the field it is about, e.g.
//! `vcpus: must be between 1 and 64, got 0` or `kernel.path: /x: No such file`.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::limits::*;
use crate::spec::{
    BalloonSpec, BlockSpec, KernelSpec, NetSpec, SerialKind, SerialSpec, VmSpec, VsockSpec,
};

/// An error in the VM description.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    File(PathBuf),
    None,
}

/// A validated VM description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub hugepages: bool,
    pub kernel: KernelConfig,
    pub serial: SerialOutput,
    pub block: Vec<BlockConfig>,
    pub vsock: Option<VsockConfig>,
    pub net: Vec<NetConfig>,
    pub rng: bool,
    pub balloon: Option<BalloonConfig>,
    pub control_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    pub path: PathBuf,
    pub cmdline: String,
    pub initrd: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub id: String,
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    pub free_page_reporting: bool,
}

impl VmConfig {
    /// Reads and validates the VM description at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates a VM description.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str::<VmSpec>(text)?.validate()
    }

    /// How many virtio-mmio devices the description asks for.
    pub fn virtio_device_count(&self) -> usize {
        self.block.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + usize::from(self.balloon.is_some())
    }
}

impl VmSpec {
    /// Checks every field, naming the first bad one.
    pub fn validate(self) -> Result<VmConfig, ConfigError> {
        let vcpus = u8::try_from(self.vcpus)
            .ok()
            .filter(|n| (1..=MAX_VCPUS).contains(&u32::from(*n)))
            .ok_or_else(|| {
                invalid(
                    "vcpus",
                    format!("must be between 1 and {MAX_VCPUS}, got {}", self.vcpus),
                )
            })?;
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, got {}",
                    self.memory_mib
                ),
            ));
        }
        if self.hugepages && !self.memory_mib.is_multiple_of(2) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "must be a multiple of 2 with hugepages (2 MiB pages), got {}",
                    self.memory_mib
                ),
            ));
        }

        let kernel = self.kernel.validate()?;
        let serial = validate_serial(self.serial)?;

        let mut ids = HashSet::new();
        let mut unique_id = |field: String, id: &str| -> Result<(), ConfigError> {
            validate_id(&field, id)?;
            if !ids.insert(id.to_owned()) {
                return Err(invalid(field, format!("duplicate device id {id:?}")));
            }
            Ok(())
        };

        let mut block = Vec::with_capacity(self.block.len());
        for (i, b) in self.block.into_iter().enumerate() {
            unique_id(format!("block[{i}].id"), &b.id)?;
            block.push(b.validate(i)?);
        }
        let mut net = Vec::with_capacity(self.net.len());
        for (i, n) in self.net.into_iter().enumerate() {
            unique_id(format!("net[{i}].id"), &n.id)?;
            net.push(n.validate(i)?);
        }
        let vsock = self.vsock.map(VsockSpec::validate).transpose()?;
        let balloon = self
            .balloon
            .map(|b| b.validate(self.hugepages))
            .transpose()?;
        let control_socket = self
            .control_socket
            .map(|p| socket_path("control_socket", p))
            .transpose()?;

        let config = VmConfig {
            vcpus,
            memory_mib: self.memory_mib,
            hugepages: self.hugepages,
            kernel,
            serial,
            block,
            vsock,
            net,
            rng: self.rng,
            balloon,
            control_socket,
        };
        let devices = config.virtio_device_count();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "block",
                format!(
                    "{devices} virtio devices (block + net + vsock + rng + balloon), at most {MAX_VIRTIO_DEVICES}"
                ),
            ));
        }
        Ok(config)
    }
}

impl KernelSpec {
    fn validate(self) -> Result<KernelConfig, ConfigError> {
        let path = existing_file("kernel.path", self.path)?;
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(invalid(
                "kernel.cmdline",
                format!("{} bytes, at most {MAX_CMDLINE_LEN}", self.cmdline.len()),
            ));
        }
        if let Some(c) = self
            .cmdline
            .chars()
            .find(|c| !c.is_ascii() || c.is_ascii_control())
        {
            return Err(invalid(
                "kernel.cmdline",
                format!("must be printable ASCII, found {c:?}"),
            ));
        }
        let initrd = self
            .initrd
            .map(|p| existing_file("kernel.initrd", p))
            .transpose()?;
        Ok(KernelConfig {
            path,
            cmdline: self.cmdline,
            initrd,
        })
    }
}

fn validate_serial(serial: Option<SerialSpec>) -> Result<SerialOutput, ConfigError> {
    let Some(serial) = serial else {
        return Ok(SerialOutput::Stdout);
    };
    match (serial.output, serial.path) {
        (SerialKind::File, Some(p)) => Ok(SerialOutput::File(new_file_path("serial.path", p)?)),
        (SerialKind::File, None) => Err(invalid("serial.path", "required with output \"file\"")),
        (_, Some(_)) => Err(invalid("serial.path", "only allowed with output \"file\"")),
        (SerialKind::Stdout, None) => Ok(SerialOutput::Stdout),
        (SerialKind::None, None) => Ok(SerialOutput::None),
    }
}

impl BlockSpec {
    fn validate(self, i: usize) -> Result<BlockConfig, ConfigError> {
        let path = existing_file(format!("block[{i}].path"), self.path)?;
        if let Some(s) = &self.serial {
            if s.len() > MAX_BLOCK_SERIAL_LEN {
                return Err(invalid(
                    format!("block[{i}].serial"),
                    format!("{} bytes, at most {MAX_BLOCK_SERIAL_LEN}", s.len()),
                ));
            }
            if !s.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    format!("block[{i}].serial"),
                    "must be printable ASCII without spaces",
                ));
            }
        }
        Ok(BlockConfig {
            id: self.id,
            path,
            read_only: self.read_only,
            serial: self.serial,
        })
    }
}

impl VsockSpec {
    fn validate(self) -> Result<VsockConfig, ConfigError> {
        // 0-2 are the hypervisor, local and host CIDs; u32::MAX is VMADDR_CID_ANY.
        let guest_cid = u32::try_from(self.guest_cid)
            .ok()
            .filter(|cid| (MIN_GUEST_CID..u32::MAX).contains(cid))
            .ok_or_else(|| {
                invalid(
                    "vsock.guest_cid",
                    format!(
                        "must be between {MIN_GUEST_CID} and {}, got {}",
                        u32::MAX - 1,
                        self.guest_cid
                    ),
                )
            })?;
        let uds_path = socket_path("vsock.uds_path", self.uds_path)?;
        Ok(VsockConfig {
            guest_cid,
            uds_path,
        })
    }
}

impl BalloonSpec {
    fn validate(self, hugepages: bool) -> Result<BalloonConfig, ConfigError> {
        // Huge pages are reserved for the VM up front and reported 4 KiB
        // ranges could not be dropped from them: reporting would gain
        // nothing, so it is refused rather than silently useless.
        if self.free_page_reporting && hugepages {
            return Err(invalid(
                "balloon.free_page_reporting",
                "cannot give huge pages back to the host (hugepages is true)",
            ));
        }
        Ok(BalloonConfig {
            free_page_reporting: self.free_page_reporting,
        })
    }
}

impl NetSpec {
    fn validate(self, i: usize) -> Result<NetConfig, ConfigError> {
        let tap_ok = !self.tap.is_empty()
            && self.tap.len() <= MAX_TAP_NAME_LEN
            && !self.tap.contains(['/', ' ', '\0', ':']);
        if !tap_ok {
            return Err(invalid(
                format!("net[{i}].tap"),
                format!(
                    "{:?} is not an interface name (1 to {MAX_TAP_NAME_LEN} bytes, no '/', ':' or spaces)",
                    self.tap
                ),
            ));
        }
        let mac = self
            .mac
            .as_deref()
            .map(|m| parse_mac(m).map_err(|r| invalid(format!("net[{i}].mac"), r)))
            .transpose()?;
        Ok(NetConfig {
            id: self.id,
            tap: self.tap,
            mac,
        })
    }
}

fn validate_id(field: &str, id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{id:?} must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_-]"),
        ))
    }
}

/// A file the VMM reads: it must exist and not be a directory.
fn existing_file(field: impl Into<String>, path: PathBuf) -> Result<PathBuf, ConfigError> {
    let field = field.into();
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => Err(invalid(
            field,
            format!("{}: is a directory", path.display()),
        )),
        Ok(_) => Ok(path),
        Err(e) => Err(invalid(
            field,
            format!("{}: {}", path.display(), io_reason(&e)),
        )),
    }
}

/// A file the VMM creates: its parent directory must exist.
fn new_file_path(field: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(invalid(
            field,
            format!("{}: parent directory does not exist", path.display()),
        ));
    }
    Ok(path)
}

/// A socket the VMM binds: a new file whose path fits sun_path.
fn socket_path(field: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH_LEN {
        return Err(invalid(
            field,
            format!(
                "{}: {len} bytes, a socket path has at most {MAX_SOCKET_PATH_LEN}",
                path.display()
            ),
        ));
    }
    new_file_path(field, path)
}

/// "No such file" rather than "No such file or directory (os error 2)".
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "No such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => "Permission denied".to_owned(),
        _ => e.to_string(),
    }
}

/// Parses a unicast MAC address `xx:xx:xx:xx:xx:xx`.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC address like 02:00:00:00:00:01");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s:?} is a multicast address"));
    }
    Ok(mac)
}

impl fmt::Display for SerialOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOutput::Stdout => write!(f, "stdout"),
            SerialOutput::File(p) => write!(f, "file {}", p.display()),
            SerialOutput::None => write!(f, "none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A temp dir with a "kernel", "initrd" and "disk" file.
    struct Fixture {
        dir: PathBuf,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("husk-config-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for f in ["kernel", "initrd", "disk"] {
                std::fs::write(dir.join(f), b"x").unwrap();
            }
            Self { dir }
        }
        fn p(&self, f: &str) -> String {
            self.dir.join(f).to_str().unwrap().to_owned()
        }
        fn full(&self) -> Value {
            json!({
                "vcpus": 2, "memory_mib": 256, "hugepages": false,
                "kernel": {"path": self.p("kernel"), "cmdline": "console=ttyS0 reboot=k", "initrd": self.p("initrd")},
                "serial": {"output": "file", "path": self.p("serial.log")},
                "block": [{"id": "rootfs", "path": self.p("disk"), "read_only": true, "serial": "disk0"}],
                "vsock": {"guest_cid": 3, "uds_path": self.p("vsock.sock")},
                "net": [{"id": "eth0", "tap": "tap0", "mac": "02:00:00:00:00:01"}],
                "rng": true,
                "balloon": {"free_page_reporting": true},
                "control_socket": self.p("ctl.sock")
            })
        }
        /// The error message after applying `edit` to the full config.
        fn err(&self, edit: impl FnOnce(&mut Value)) -> String {
            let mut v = self.full();
            edit(&mut v);
            VmConfig::from_json(&v.to_string()).unwrap_err().to_string()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn parses_full_config() {
        let fx = Fixture::new("full");
        let c = VmConfig::from_json(&fx.full().to_string()).unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.kernel.cmdline, "console=ttyS0 reboot=k");
        assert_eq!(c.kernel.initrd, Some(PathBuf::from(fx.p("initrd"))));
        assert_eq!(c.serial, SerialOutput::File(fx.p("serial.log").into()));
        assert_eq!(c.block[0].serial.as_deref(), Some("disk0"));
        assert!(c.block[0].read_only);
        assert_eq!(c.vsock.as_ref().unwrap().guest_cid, 3);
        assert_eq!(c.net[0].mac, Some([2, 0, 0, 0, 0, 1]));
        assert!(c.rng);
        assert_eq!(
            c.balloon,
            Some(BalloonConfig {
                free_page_reporting: true
            })
        );
        assert_eq!(c.virtio_device_count(), 5);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let fx = Fixture::new("min");
        let c = VmConfig::from_json(
            &json!({"vcpus": 1, "memory_mib": 128, "kernel": {"path": fx.p("kernel")}}).to_string(),
        )
        .unwrap();
        assert_eq!(c.serial, SerialOutput::Stdout);
        assert!(c.block.is_empty() && c.net.is_empty() && c.vsock.is_none());
        assert!(!c.rng && !c.hugepages && c.control_socket.is_none());
        assert_eq!(c.balloon, None);
        assert_eq!(c.kernel.cmdline, "");
    }

    #[test]
    fn rejects_each_bad_field() {
        let fx = Fixture::new("bad");
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["vcpus"] = json!(0)),
                "vcpus: must be between 1 and 64, got 0",
            ),
            (
                Box::new(|v| v["vcpus"] = json!(65)),
                "vcpus: must be between 1 and 64, got 65",
            ),
            (
                Box::new(|v| v["memory_mib"] = json!(8)),
                "memory_mib: must be between 32",
            ),
            (
                Box::new(|v| {
                    v["hugepages"] = json!(true);
                    v["memory_mib"] = json!(129)
                }),
                "memory_mib: must be a multiple of 2",
            ),
            (
                Box::new(|v| v["kernel"]["path"] = json!("/x")),
                "kernel.path: /x: No such file",
            ),
            (
                Box::new(|v| v["kernel"]["path"] = json!("/")),
                "kernel.path: /: is a directory",
            ),
            (
                Box::new(|v| v["kernel"]["initrd"] = json!("/nope")),
                "kernel.initrd: /nope: No such file",
            ),
            (
                Box::new(|v| v["kernel"]["cmdline"] = json!("a".repeat(2000))),
                "kernel.cmdline: 2000 bytes",
            ),
            (
                Box::new(|v| v["kernel"]["cmdline"] = json!("a\nb")),
                "kernel.cmdline: must be printable ASCII",
            ),
            (
                Box::new(|v| v["serial"] = json!({"output": "file"})),
                "serial.path: required",
            ),
            (
                Box::new(|v| v["serial"] = json!({"output": "stdout", "path": "/tmp/x"})),
                "serial.path: only allowed",
            ),
            (
                Box::new(|v| v["serial"] = json!({"output": "file", "path": "/no/such/dir/log"})),
                "serial.path: /no/such/dir/log: parent directory does not exist",
            ),
            (
                Box::new(|v| v["block"][0]["path"] = json!("/x")),
                "block[0].path: /x: No such file",
            ),
            (
                Box::new(|v| v["block"][0]["id"] = json!("")),
                "block[0].id: \"\" must be",
            ),
            (
                Box::new(|v| v["block"][0]["id"] = json!("a b")),
                "block[0].id: \"a b\" must be",
            ),
            (
                Box::new(|v| v["block"][0]["serial"] = json!("x".repeat(21))),
                "block[0].serial: 21 bytes, at most 20",
            ),
            (
                Box::new(|v| v["net"][0]["id"] = json!("rootfs")),
                "net[0].id: duplicate device id \"rootfs\"",
            ),
            (
                Box::new(|v| v["net"][0]["mac"] = json!("02:00:00:00:00")),
                "net[0].mac: \"02:00:00:00:00\" is not a MAC",
            ),
            (
                Box::new(|v| v["net"][0]["mac"] = json!("02:00:00:00:00:zz")),
                "net[0].mac:",
            ),
            (
                Box::new(|v| v["net"][0]["mac"] = json!("01:00:00:00:00:01")),
                "net[0].mac: \"01:00:00:00:00:01\" is a multicast",
            ),
            (
                Box::new(|v| v["net"][0]["tap"] = json!("a-very-long-tap-name")),
                "net[0].tap:",
            ),
            (Box::new(|v| v["net"][0]["tap"] = json!("")), "net[0].tap:"),
            (
                Box::new(|v| v["vsock"]["guest_cid"] = json!(2)),
                "vsock.guest_cid: must be between 3 and 4294967294, got 2",
            ),
            (
                Box::new(|v| v["vsock"]["guest_cid"] = json!(1u64 << 32)),
                "vsock.guest_cid:",
            ),
            (
                Box::new(|v| v["vsock"]["uds_path"] = json!("/no/dir/v.sock")),
                "vsock.uds_path:",
            ),
            (
                Box::new(|v| v["control_socket"] = json!("/no/dir/c.sock")),
                "control_socket:",
            ),
            (
                Box::new(|v| v["control_socket"] = json!(format!("/tmp/{}", "c".repeat(103)))),
                "control_socket: /tmp/ccc",
            ),
            (
                Box::new(|v| v["vsock"]["uds_path"] = json!(format!("/tmp/{}", "v".repeat(103)))),
                "108 bytes, a socket path has at most 107",
            ),
            (
                Box::new(|v| v["control_soket"] = json!("/tmp/c")),
                "unknown field `control_soket`",
            ),
            (
                Box::new(|v| v["kernel"]["cmd_line"] = json!("x")),
                "unknown field `cmd_line`",
            ),
            (
                Box::new(|v| v["serial"]["output"] = json!("tty")),
                "unknown variant `tty`",
            ),
            (
                Box::new(|v| v["balloon"]["free_page_report"] = json!(true)),
                "unknown field `free_page_report`",
            ),
            (
                Box::new(|v| {
                    v["hugepages"] = json!(true);
                }),
                "balloon.free_page_reporting: cannot give huge pages back",
            ),
            (Box::new(|v| v["vcpus"] = json!(-1)), "invalid config JSON"),
        ];
        for (edit, want) in cases {
            let got = fx.err(edit);
            assert!(got.contains(want), "expected {want:?} in {got:?}");
        }
    }

    #[test]
    fn too_many_virtio_devices() {
        let fx = Fixture::new("many");
        let got = fx.err(|v| {
            let blocks: Vec<Value> = (0..18)
                .map(|i| json!({"id": format!("d{i}"), "path": fx.p("disk")}))
                .collect();
            v["block"] = json!(blocks);
        });
        assert!(got.contains("22 virtio devices"), "{got}");
    }

    #[test]
    fn empty_balloon_section_is_a_balloon_without_reporting() {
        let fx = Fixture::new("balloon");
        let mut v = fx.full();
        v["balloon"] = json!({});
        v["hugepages"] = json!(true);
        let c = VmConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(
            c.balloon,
            Some(BalloonConfig {
                free_page_reporting: false
            })
        );
        // And it is left out again when serialized.
        let spec: VmSpec = serde_json::from_value(v).unwrap();
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back["balloon"], json!({}));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:aB:00:ff:10:01"),
            Ok([2, 0xab, 0, 0xff, 0x10, 1])
        );
        assert!(parse_mac("02:00:00:00:00:01:02").is_err());
        assert!(parse_mac("2:00:00:00:00:01").is_err());
        assert!(parse_mac("").is_err());
    }
}
