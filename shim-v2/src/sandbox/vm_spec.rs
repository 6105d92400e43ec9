//! The VM description the shim gives husk-vmm: the typed [`VmSpec`] of the
//! shared `husk-vm-config` crate, built from the husk configuration and
//! the sandbox's state folder.

use std::path::{Path, PathBuf};

use husk_protocols::guest::{
    slot_disk_serial, AGENT_PORT, AGENT_PORT_PARAM, ROOT_DISK_SERIAL, SHARED_FS_TAG,
};
use husk_vm_config::limits::{
    DEFAULT_CONSOLE_BYTES_PER_SEC, DEFAULT_CONSOLE_MAX_BYTES, DEFAULT_LOG_BURST,
    DEFAULT_LOG_INTERVAL_MS, DEFAULT_LOG_MAX_BYTES,
};
use husk_vm_config::{
    BalloonSpec, BlockSpec, FsSpec, KernelSpec, LogSpec, NetSpec, SerialSpec, VmSpec, VsockSpec,
};

use super::jail;
use super::state_dir::{
    slot_file, CONSOLE_LOG, CONTROL_SOCKET, ROOT_IMAGE, RUN_DIR, VM_SPEC, VSOCK,
};
use super::virtiofsd;
use crate::config::Config;
use crate::sizing::VmSize;

/// The guest's vsock context id (any value from 3 will do: one VM per
/// socket).
const GUEST_CID: u64 = husk_vm_config::limits::MIN_GUEST_CID as u64;

/// The kernel command line: the shim's parameters, then the configured
/// extra ones.
pub fn kernel_cmdline(cfg: &Config) -> String {
    let mut c = format!("console=ttyS0 reboot=k panic=-1 {AGENT_PORT_PARAM}={AGENT_PORT}");
    if !cfg.debug_console {
        c.push_str(" quiet");
    }
    if !cfg.kernel_params.is_empty() {
        c.push(' ');
        c.push_str(&cfg.kernel_params);
    }
    c
}

/// Where the VMM finds what vm.json names: the host's paths, or the
/// jail's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The folder of the disks and the console log.
    pub files: PathBuf,
    /// The folder of the VMM's sockets.
    pub run: PathBuf,
}

impl VmPaths {
    /// A VMM outside a jail: the configured kernel and initrd, the state
    /// folder `dir`.
    pub fn host(cfg: &Config, dir: &Path) -> VmPaths {
        VmPaths {
            kernel: cfg.kernel_path.clone(),
            initrd: cfg.initrd_path.clone(),
            files: dir.to_path_buf(),
            run: dir.join(RUN_DIR),
        }
    }

    /// A jailed VMM: everything at the jail's root, sockets in its `/run`.
    pub fn jailed() -> VmPaths {
        VmPaths {
            kernel: jail::KERNEL.into(),
            initrd: jail::INITRD.into(),
            files: "/".into(),
            run: jail::RUN.into(),
        }
    }
}

/// What a jailed VMM of the sandbox in state folder `dir`, with `slots`
/// pod disk slots, is shown: every path of [`VmPaths::jailed`]'s vm.json.
pub fn jail_binds(cfg: &Config, dir: &Path, slots: usize) -> Vec<jail::Bind> {
    use jail::Bind;
    let mut binds = vec![
        Bind::file(&cfg.vmm_path, jail::VMM).exec(),
        Bind::file(dir.join(VM_SPEC), jail::SPEC),
        Bind::file(&cfg.kernel_path, jail::KERNEL),
        Bind::file(&cfg.initrd_path, jail::INITRD),
    ];
    if cfg.root_disk_at_boot() {
        binds.push(Bind::file(dir.join(ROOT_IMAGE), ROOT_IMAGE));
    }
    binds.extend((1..=slots).map(|n| Bind::file(dir.join(slot_file(n)), &slot_file(n))));
    if cfg.debug_console {
        binds.push(Bind::file(dir.join(CONSOLE_LOG), CONSOLE_LOG).writable());
    }
    binds.push(Bind::file(dir.join(RUN_DIR), jail::RUN).dir().writable());
    binds
}

/// The VM of a sandbox whose files are where `paths` says, of `size`, with
/// `slots` pod disk slots and the pod network's NICs `net`; every disk and
/// NIC gets the configured rate limits. The first container's disk is
/// there with `rootfs = "block"`; the virtio-fs device (virtiofsd's socket
/// in the sockets folder) when the configuration shares anything.
pub fn vm_spec(
    cfg: &Config,
    size: VmSize,
    paths: &VmPaths,
    slots: usize,
    net: Vec<NetSpec>,
) -> VmSpec {
    let dir = &paths.files;
    let mut block = Vec::new();
    if cfg.root_disk_at_boot() {
        block.push(BlockSpec {
            id: "root".into(),
            path: dir.join(ROOT_IMAGE),
            read_only: true,
            serial: Some(ROOT_DISK_SERIAL.into()),
            rate_limiter: cfg.disk_rate_limiter.clone(),
        });
    }
    let fs = if cfg.uses_virtio_fs() {
        vec![FsSpec {
            tag: SHARED_FS_TAG.into(),
            socket: paths.run.join(virtiofsd::SOCKET),
            num_request_queues: None,
            queue_size: None,
        }]
    } else {
        Vec::new()
    };
    block.extend((1..=slots).map(|n| BlockSpec {
        id: slot_file(n),
        path: dir.join(slot_file(n)),
        read_only: true,
        serial: Some(slot_disk_serial(n)),
        rate_limiter: cfg.disk_rate_limiter.clone(),
    }));
    let net = net
        .into_iter()
        .map(|n| NetSpec {
            rx_rate_limiter: cfg.net_rx_rate_limiter.clone(),
            tx_rate_limiter: cfg.net_tx_rate_limiter.clone(),
            ..n
        })
        .collect();
    // The console log and the VMM's log are files in the state folder, in
    // host memory, written at the guest's will: both are capped.
    let serial = if cfg.debug_console {
        SerialSpec {
            max_bytes: Some(DEFAULT_CONSOLE_MAX_BYTES),
            bytes_per_sec: Some(DEFAULT_CONSOLE_BYTES_PER_SEC),
            ..SerialSpec::file(dir.join(CONSOLE_LOG))
        }
    } else {
        SerialSpec::none()
    };
    VmSpec {
        vcpus: size.vcpus,
        memory_mib: size.memory_mib,
        hugepages: false,
        kernel: KernelSpec {
            path: paths.kernel.clone(),
            cmdline: kernel_cmdline(cfg),
            initrd: Some(paths.initrd.clone()),
        },
        serial: Some(serial),
        block,
        vsock: Some(VsockSpec {
            guest_cid: GUEST_CID,
            uds_path: paths.run.join(VSOCK),
        }),
        net,
        fs,
        rng: true,
        balloon: cfg.free_page_reporting.then_some(BalloonSpec {
            free_page_reporting: true,
        }),
        control_socket: Some(paths.run.join(CONTROL_SOCKET)),
        log: Some(LogSpec {
            max_bytes: Some(DEFAULT_LOG_MAX_BYTES),
            burst: Some(DEFAULT_LOG_BURST),
            interval_ms: Some(DEFAULT_LOG_INTERVAL_MS),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_vm_config::SerialKind;
    use std::path::PathBuf;

    pub(crate) fn cfg(extra: &str) -> Config {
        crate::config::parse(
            &format!("kernel_path = \"/k/bzImage\"\ninitrd_path = \"/k/initrd\"\n{extra}"),
            Path::new("/c.toml"),
        )
        .unwrap()
    }

    fn base(c: &Config) -> VmSize {
        crate::sizing::size(c, crate::sizing::Limits::default())
    }

    #[test]
    fn a_templated_block_vm_has_no_root_disk_only_slots() {
        let c = cfg("rootfs = \"block\"\nshared_fs = \"none\"\ntemplate = true");
        assert!(!c.root_disk_at_boot() && c.first_image_in_slot());
        let dir = Path::new("/run/husk/t1");
        let v = vm_spec(&c, base(&c), &VmPaths::host(&c, dir), 1, Vec::new());
        let serials: Vec<_> = v.block.iter().map(|b| b.serial.as_deref()).collect();
        assert_eq!(serials, [Some("husk-slot1")]);
        assert!(jail_binds(&c, dir, 1)
            .iter()
            .all(|b| b.target != ROOT_IMAGE));
        assert!(cfg("rootfs = \"block\"").root_disk_at_boot());
        assert!(!cfg("template = true").first_image_in_slot());
    }

    #[test]
    fn vm_description() {
        let c = cfg(
            "vcpus = 2\nmemory_mib = 512\nkernel_params = \"loglevel=8\"\nrootfs = \"block\"\nshared_fs = \"none\"",
        );
        let v = vm_spec(
            &c,
            base(&c),
            &VmPaths::host(&c, Path::new("/run/husk/p1")),
            2,
            Vec::new(),
        );
        assert_eq!((v.vcpus, v.memory_mib), (2, 512));
        assert_eq!(v.kernel.path, PathBuf::from("/k/bzImage"));
        assert_eq!(v.kernel.initrd, Some(PathBuf::from("/k/initrd")));
        assert_eq!(
            v.kernel.cmdline,
            "console=ttyS0 reboot=k panic=-1 husk.agent_port=1024 quiet loglevel=8"
        );
        assert_eq!(v.serial, Some(SerialSpec::none()));
        assert_eq!(v.block.len(), 3);
        assert_eq!(v.block[0].path, PathBuf::from("/run/husk/p1/root.erofs"));
        assert_eq!(v.block[0].serial.as_deref(), Some("husk-root"));
        assert!(v.block[0].read_only);
        assert_eq!(v.block[2].id, "slot2");
        assert_eq!(v.block[2].serial.as_deref(), Some("husk-slot2"));
        assert_eq!(v.block[2].path, PathBuf::from("/run/husk/p1/slot2"));
        let vsock = v.vsock.as_ref().unwrap();
        assert_eq!(vsock.uds_path, PathBuf::from("/run/husk/p1/run/vsock"));
        assert_eq!(vsock.guest_cid, 3);
        assert_eq!(v.control_socket, Some("/run/husk/p1/run/ctl.sock".into()));
        assert!(v.fs.is_empty(), "nothing shared, no virtio-fs");
        assert!(v.rng);
        assert_eq!(
            v.balloon,
            Some(BalloonSpec {
                free_page_reporting: true
            })
        );

        let c = cfg("debug_console = true\nrootfs = \"block\"");
        let v = vm_spec(
            &c,
            base(&c),
            &VmPaths::host(&c, Path::new("/run/husk/p1")),
            0,
            Vec::new(),
        );
        let serial = v.serial.as_ref().unwrap();
        assert_eq!(serial.output, SerialKind::File);
        assert_eq!(serial.path, Some("/run/husk/p1/console.log".into()));
        assert_eq!(serial.max_bytes, Some(4 << 20));
        assert_eq!(serial.bytes_per_sec, Some(256 << 10));
        let log = v.log.as_ref().unwrap();
        assert_eq!(
            (log.max_bytes, log.burst, log.interval_ms),
            (Some(4 << 20), Some(10), Some(1000))
        );
        assert_eq!(
            v.kernel.cmdline,
            "console=ttyS0 reboot=k panic=-1 husk.agent_port=1024"
        );
        assert_eq!(v.block.len(), 1);

        let c = cfg("free_page_reporting = false");
        let v = vm_spec(
            &c,
            base(&c),
            &VmPaths::host(&c, Path::new("/run/husk/p1")),
            0,
            Vec::new(),
        );
        assert_eq!(v.balloon, None);
    }

    /// The defaults share the rootfs and volumes: no disk, one virtio-fs
    /// device on virtiofsd's socket in the sockets folder; with volumes
    /// only shared, the first container's disk is back.
    #[test]
    fn virtio_fs_replaces_the_root_disk() {
        let c = cfg("");
        let v = vm_spec(
            &c,
            base(&c),
            &VmPaths::host(&c, Path::new("/run/husk/p1")),
            0,
            Vec::new(),
        );
        assert!(v.block.is_empty());
        assert_eq!(
            v.fs,
            vec![FsSpec {
                tag: "husk-shared".into(),
                socket: "/run/husk/p1/run/virtiofsd.sock".into(),
                num_request_queues: None,
                queue_size: None,
            }]
        );
        let v = vm_spec(&c, base(&c), &VmPaths::jailed(), 0, Vec::new());
        assert_eq!(v.fs[0].socket, PathBuf::from("/run/virtiofsd.sock"));
        assert!(jail_binds(&c, Path::new("/p"), 0)
            .iter()
            .all(|b| b.target != ROOT_IMAGE));
        let c = cfg("rootfs = \"block\"");
        let v = vm_spec(&c, base(&c), &VmPaths::jailed(), 0, Vec::new());
        assert_eq!(v.block.len(), 1);
        assert_eq!(v.fs.len(), 1);
    }

    #[test]
    fn every_disk_and_nic_gets_the_configured_limits() {
        let nic = NetSpec {
            id: "net0".into(),
            tap: "tap0".into(),
            mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        let c = cfg("rootfs = \"block\"");
        let v = vm_spec(
            &c,
            base(&c),
            &VmPaths::host(&c, Path::new("/p")),
            2,
            vec![nic.clone()],
        );
        assert!(v.block.iter().all(|b| b.rate_limiter.is_none()));
        assert_eq!(v.net, vec![nic.clone()]);

        let c = cfg(
            "disk_bandwidth_bytes_per_sec = 1000\nnet_rx_bytes_per_sec = 2000\nrootfs = \"block\"",
        );
        let v = vm_spec(
            &c,
            base(&c),
            &VmPaths::host(&c, Path::new("/p")),
            2,
            vec![nic],
        );
        assert_eq!(v.block.len(), 3);
        for b in &v.block {
            let limiter = b.rate_limiter.as_ref().unwrap();
            assert_eq!(limiter.bandwidth.as_ref().unwrap().size, 1000);
            assert_eq!(limiter.ops, None);
        }
        let rx = v.net[0].rx_rate_limiter.as_ref().unwrap();
        assert_eq!(rx.bandwidth.as_ref().unwrap().size, 2000);
        assert_eq!(v.net[0].tx_rate_limiter, None);
        assert_eq!(v.net[0].tap, "tap0");
    }

    /// Every path a jailed VMM's vm.json names is in its jail: a bind
    /// target at the root, or in the writable /run.
    #[test]
    fn the_jail_shows_every_path_of_the_jailed_description() {
        let c = cfg("debug_console = true\nrootfs = \"block\"");
        let dir = Path::new("/run/husk/p1");
        let v = vm_spec(&c, base(&c), &VmPaths::jailed(), 3, Vec::new());
        let binds = jail_binds(&c, dir, 3);
        let shown = |p: &Path| {
            binds.iter().any(|b| Path::new("/").join(&b.target) == p)
                || (p.parent() == Some(Path::new(jail::RUN))
                    && binds
                        .iter()
                        .any(|b| b.target == "run" && b.writable && b.dir))
        };
        let mut paths = vec![v.kernel.path.clone(), v.kernel.initrd.clone().unwrap()];
        paths.extend(v.block.iter().map(|b| b.path.clone()));
        paths.push(v.serial.as_ref().unwrap().path.clone().unwrap());
        paths.push(v.vsock.as_ref().unwrap().uds_path.clone());
        paths.push(v.control_socket.clone().unwrap());
        paths.push(v.fs[0].socket.clone());
        assert_eq!(paths.len(), 10);
        for p in &paths {
            assert!(p.is_absolute() && !p.starts_with(dir), "{}", p.display());
            assert!(shown(p), "{} is not in the jail", p.display());
        }
        assert_eq!(v.block[3].path, PathBuf::from("/slot3"));
        assert_eq!(
            v.vsock.as_ref().unwrap().uds_path,
            PathBuf::from("/run/vsock")
        );
        // Only the console log and /run are writable; only the VMM runs.
        for b in &binds {
            assert_eq!(
                b.writable,
                b.target == "run" || b.target == "console.log",
                "{b:?}"
            );
            assert_eq!(b.exec, b.target == "husk-vmm", "{b:?}");
        }
        let sources: Vec<_> = binds.iter().map(|b| b.source.clone()).collect();
        assert!(sources.contains(&dir.join("slot3")));
        assert!(sources.contains(&dir.join("vm.json")));
        assert!(sources.contains(&c.vmm_path));
        // Without the console there is no console log to show.
        let c = cfg("");
        assert!(jail_binds(&c, dir, 0)
            .iter()
            .all(|b| b.target != "console.log"));
    }

    /// What the shim writes, the VMM accepts: the largest configuration
    /// the shim allows passes the VMM's validation, with the balloon and
    /// without.
    #[test]
    fn the_vmm_accepts_what_the_shim_builds() {
        the_vmm_accepts_the_largest(true);
        the_vmm_accepts_the_largest(false);
    }

    fn the_vmm_accepts_the_largest(free_page_reporting: bool) {
        let dir = std::env::temp_dir().join(format!(
            "husk-vmspec-{}-{free_page_reporting}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["bzImage", "initrd"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let slots = crate::config::max_pod_disk_slots(free_page_reporting, true) as usize;
        for n in 1..=slots {
            std::fs::write(dir.join(slot_file(n)), b"").unwrap();
        }
        std::fs::write(dir.join(ROOT_IMAGE), b"").unwrap();
        let params = "x".repeat(crate::config::MAX_KERNEL_PARAMS);
        let mut c = cfg(&format!(
            "vcpus = {}\nmemory_mib = {}\nkernel_params = \"{params}\"\ndebug_console = true\nfree_page_reporting = {free_page_reporting}\nrootfs = \"block\"\n\
             disk_bandwidth_bytes_per_sec = {max}\ndisk_ops_per_sec = {max}\nnet_rx_bytes_per_sec = {max}\nnet_tx_bytes_per_sec = {max}",
            husk_vm_config::limits::MAX_VCPUS,
            husk_vm_config::limits::MAX_MEMORY_MIB,
            max = husk_vm_config::limits::MAX_BUCKET_SIZE,
        ));
        // The most a pod can get: everything up to the caps.
        let size = crate::sizing::size(
            &c,
            crate::sizing::Limits {
                memory_bytes: u64::MAX,
                cpu_quota: u64::MAX,
                cpu_period: 1,
            },
        );
        assert_eq!(size.vcpus, husk_vm_config::limits::MAX_VCPUS);
        c.kernel_path = dir.join("bzImage");
        c.initrd_path = dir.join("initrd");
        // As many NICs as a pod network may have.
        let nics = (0..crate::network::discover::MAX_INTERFACES)
            .map(|n| NetSpec {
                id: format!("net{n}"),
                tap: crate::network::tap::tap_name(n),
                mac: Some(format!("02:00:00:00:00:0{n}")),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect();
        let paths = VmPaths::host(&c, &dir);
        std::fs::create_dir_all(&paths.run).unwrap();
        let json = serde_json::to_string(&vm_spec(&c, size, &paths, slots, nics)).unwrap();
        let vm = husk_vm_config::VmConfig::from_json(&json).unwrap();
        assert_eq!(vm.block.len(), slots + 1);
        assert_eq!(vm.fs.len(), 1);
        assert_eq!(vm.balloon.is_some(), free_page_reporting);
        assert_eq!(vm.console_limits, husk_vm_config::ConsoleLimits::default());
        assert_eq!(vm.log, husk_vm_config::LogLimits::default());
        assert_eq!(
            vm.virtio_device_count(),
            husk_vm_config::limits::MAX_VIRTIO_DEVICES
        );
        assert!(vm.block.iter().all(|b| b.rate_limiter.is_some()));
        assert!(vm
            .net
            .iter()
            .all(|n| n.rx_rate_limiter.is_some() && n.tx_rate_limiter.is_some()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
