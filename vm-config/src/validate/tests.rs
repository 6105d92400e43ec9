//! VmSpec::validate: what it accepts and how it names what it refuses.

use super::*;
use serde_json::{json, Value};

/// A temp dir with a "kernel", "initrd" and "disk" file.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-config-{name}-{}", std::process::id()));
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
            "serial": {"output": "file", "path": self.p("serial.log"), "max_bytes": 1048576, "bytes_per_sec": 4096},
            "block": [{"id": "rootfs", "path": self.p("disk"), "read_only": true, "serial": "disk0",
                       "rate_limiter": {"bandwidth": {"size": 1_048_576, "one_time_burst": 4_194_304, "refill_time_ms": 100},
                                        "ops": {"size": 100, "refill_time_ms": 1000}}}],
            "vsock": {"guest_cid": 3, "uds_path": self.p("vsock.sock")},
            "net": [{"id": "eth0", "tap": "tap0", "mac": "02:00:00:00:00:01",
                     "rx_rate_limiter": {"bandwidth": {"size": 125_000, "refill_time_ms": 10}},
                     "tx_rate_limiter": {"ops": {"size": 1000, "refill_time_ms": 1000}}}],
            "rng": true,
            "balloon": {"free_page_reporting": true},
            "control_socket": self.p("ctl.sock"),
            "log": {"max_bytes": 65536, "burst": 3, "interval_ms": 500}
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
    assert_eq!(
        c.console_limits,
        ConsoleLimits {
            max_bytes: 1 << 20,
            bytes_per_sec: 4096
        }
    );
    assert_eq!(
        c.log,
        LogLimits {
            max_bytes: 65536,
            burst: 3,
            interval_ms: 500
        }
    );
    assert_eq!(c.block[0].serial.as_deref(), Some("disk0"));
    assert!(c.block[0].read_only);
    assert_eq!(c.vsock.as_ref().unwrap().guest_cid, 3);
    assert_eq!(c.net[0].mac, Some([2, 0, 0, 0, 0, 1]));
    let bucket = |size, one_time_burst, refill_time_ms| TokenBucketConfig {
        size: NonZeroU64::new(size).unwrap(),
        one_time_burst,
        refill_time_ms: NonZeroU64::new(refill_time_ms).unwrap(),
    };
    assert_eq!(
        c.block[0].rate_limiter,
        Some(RateLimiterConfig {
            bandwidth: Some(bucket(1 << 20, 4 << 20, 100)),
            ops: Some(bucket(100, 0, 1000)),
        })
    );
    assert_eq!(
        c.net[0].rx_rate_limiter,
        Some(RateLimiterConfig {
            bandwidth: Some(bucket(125_000, 0, 10)),
            ops: None,
        })
    );
    assert_eq!(
        c.net[0].tx_rate_limiter,
        Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(1000, 0, 1000)),
        })
    );
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
    assert_eq!(
        c.console_limits,
        ConsoleLimits {
            max_bytes: DEFAULT_CONSOLE_MAX_BYTES,
            bytes_per_sec: DEFAULT_CONSOLE_BYTES_PER_SEC
        }
    );
    assert_eq!(
        c.log,
        LogLimits {
            max_bytes: DEFAULT_LOG_MAX_BYTES,
            burst: DEFAULT_LOG_BURST,
            interval_ms: DEFAULT_LOG_INTERVAL_MS
        }
    );
    // An empty log section is the defaults too.
    let c = VmConfig::from_json(
        &json!({"vcpus": 1, "memory_mib": 128, "kernel": {"path": fx.p("kernel")}, "log": {}})
            .to_string(),
    )
    .unwrap();
    assert_eq!(c.log, LogLimits::default());
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
        (
            Box::new(|v| v["block"][0]["rate_limiter"]["bandwidth"]["refill_time_ms"] = json!(0)),
            "block[0].rate_limiter.bandwidth.refill_time_ms: must be between 1 and 3600000, got 0",
        ),
        (
            Box::new(|v| v["block"][0]["rate_limiter"]["ops"]["refill_time_ms"] = json!(3_600_001)),
            "block[0].rate_limiter.ops.refill_time_ms: must be between 1 and 3600000, got 3600001",
        ),
        (
            Box::new(|v| v["block"][0]["rate_limiter"]["bandwidth"]["size"] = json!(0)),
            "block[0].rate_limiter.bandwidth.size: must be between 1 and 1099511627776, got 0",
        ),
        (
            Box::new(|v| v["net"][0]["rx_rate_limiter"]["bandwidth"]["size"] = json!(1u64 << 41)),
            "net[0].rx_rate_limiter.bandwidth.size: must be between 1 and 1099511627776, got 2199023255552",
        ),
        (
            Box::new(|v| v["net"][0]["tx_rate_limiter"]["ops"]["one_time_burst"] = json!(u64::MAX)),
            "net[0].tx_rate_limiter.ops.one_time_burst: must be between 0 and 1099511627776",
        ),
        (
            Box::new(|v| v["net"][0]["tx_rate_limiter"]["ops"]["size"] = json!(-5)),
            "invalid config JSON",
        ),
        (
            Box::new(|v| v["net"][0]["tx_rate_limiter"]["ops"] = json!({"size": 10})),
            "missing field `refill_time_ms`",
        ),
        (
            Box::new(|v| v["block"][0]["rate_limiter"]["bytes"] = json!({})),
            "unknown field `bytes`",
        ),
        (
            Box::new(|v| v["net"][0]["rate_limiter"] = json!({})),
            "unknown field `rate_limiter`",
        ),
        (
            Box::new(|v| v["serial"]["max_bytes"] = json!(0)),
            "serial.max_bytes: must be between 4096 and 1073741824, got 0",
        ),
        (
            Box::new(|v| v["serial"]["max_bytes"] = json!(1u64 << 31)),
            "serial.max_bytes: must be between",
        ),
        (
            Box::new(|v| v["serial"]["bytes_per_sec"] = json!(10)),
            "serial.bytes_per_sec: must be between 1024 and 1073741824, got 10",
        ),
        (
            Box::new(|v| v["serial"]["max_bytes"] = json!(-1)),
            "invalid config JSON",
        ),
        (
            Box::new(|v| v["log"]["max_bytes"] = json!(1000)),
            "log.max_bytes: must be between 65536 and 1073741824, got 1000",
        ),
        (
            Box::new(|v| v["log"]["burst"] = json!(0)),
            "log.burst: must be between 1 and 10000, got 0",
        ),
        (
            Box::new(|v| v["log"]["burst"] = json!(1u64 << 33)),
            "invalid config JSON",
        ),
        (
            Box::new(|v| v["log"]["interval_ms"] = json!(0)),
            "log.interval_ms: must be between 10 and 3600000, got 0",
        ),
        (
            Box::new(|v| v["log"]["rate"] = json!(1)),
            "unknown field `rate`",
        ),
        (
            Box::new(|v| v["serial"]["max_byte"] = json!(1)),
            "unknown field `max_byte`",
        ),
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
fn an_empty_rate_limiter_limits_nothing() {
    let fx = Fixture::new("rl-empty");
    let mut v = fx.full();
    v["block"][0]["rate_limiter"] = json!({});
    v["net"][0]["rx_rate_limiter"] = json!({});
    v["net"][0]
        .as_object_mut()
        .unwrap()
        .remove("tx_rate_limiter");
    let c = VmConfig::from_json(&v.to_string()).unwrap();
    assert_eq!(c.block[0].rate_limiter, None);
    assert_eq!(c.net[0].rx_rate_limiter, None);
    assert_eq!(c.net[0].tx_rate_limiter, None);
}

#[test]
fn rate_limiters_round_trip_and_zero_burst_is_left_out() {
    let fx = Fixture::new("rl-json");
    let spec: VmSpec = serde_json::from_value(fx.full()).unwrap();
    let back = serde_json::to_value(&spec).unwrap();
    assert_eq!(
        back["block"][0]["rate_limiter"]["ops"],
        json!({"size": 100, "refill_time_ms": 1000})
    );
    assert_eq!(back["block"][0], fx.full()["block"][0]);
    assert_eq!(back["net"][0], fx.full()["net"][0]);
    let plain: VmSpec = serde_json::from_value(
        json!({"vcpus": 1, "memory_mib": 128, "kernel": {"path": "/k"},
               "block": [{"id": "d", "path": "/d"}], "net": [{"id": "n", "tap": "t"}]}),
    )
    .unwrap();
    let plain = serde_json::to_value(&plain).unwrap();
    assert_eq!(plain["block"][0], json!({"id": "d", "path": "/d"}));
    assert_eq!(plain["net"][0], json!({"id": "n", "tap": "t"}));
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

#[test]
fn fs_devices_get_defaults_and_bad_fields_are_named() {
    let fx = Fixture::new("fs");
    let mut v = fx.full();
    v["fs"] = json!([{"tag": "husk-share", "socket": fx.p("fs.sock")},
                     {"tag": "two", "socket": fx.p("fs2.sock"), "num_request_queues": 2, "queue_size": 256}]);
    let c = VmConfig::from_json(&v.to_string()).unwrap();
    assert_eq!(c.fs.len(), 2);
    assert_eq!(c.fs[0].tag, "husk-share");
    assert_eq!((c.fs[0].num_request_queues, c.fs[0].queue_size), (1, 1024));
    assert_eq!((c.fs[1].num_request_queues, c.fs[1].queue_size), (2, 256));
    assert_eq!(c.virtio_device_count(), 1 + 1 + 2 + 1 + 1 + 1);

    let with_fs = |fs: Value| {
        fx.err(|v| {
            v["fs"] = json!([fs]);
        })
    };
    let sock = fx.p("fs.sock");
    for (fs, want) in [
        (
            json!({"tag": "", "socket": sock}),
            "fs[0].tag: must be 1 to 36 bytes, got 0",
        ),
        (
            json!({"tag": "x".repeat(37), "socket": sock}),
            "fs[0].tag: must be 1 to 36 bytes, got 37",
        ),
        (
            json!({"tag": "a b", "socket": sock}),
            "fs[0].tag: must be printable ASCII",
        ),
        (
            json!({"tag": "t", "socket": sock, "num_request_queues": 0}),
            "fs[0].num_request_queues: must be between 1 and 16, got 0",
        ),
        (
            json!({"tag": "t", "socket": sock, "queue_size": 100}),
            "fs[0].queue_size: must be a power of two, got 100",
        ),
        (
            json!({"tag": "t", "socket": sock, "queue_size": 2048}),
            "fs[0].queue_size: must be between 1 and 1024, got 2048",
        ),
        (
            json!({"tag": "t", "socket": "/no/such/dir/fs.sock"}),
            "fs[0].socket: /no/such/dir/fs.sock",
        ),
        (
            json!({"tag": "t", "socket": sock, "cache": "always"}),
            "unknown field `cache`",
        ),
    ] {
        let e = with_fs(fs.clone());
        assert!(e.contains(want), "{fs}: got {e:?}, want {want:?}");
    }
    let e = fx.err(|v| {
        v["fs"] = json!([{"tag": "t", "socket": fx.p("a.sock")}, {"tag": "t", "socket": fx.p("b.sock")}]);
    });
    assert!(e.contains("fs[1].tag: duplicate tag \"t\""), "{e}");
}
