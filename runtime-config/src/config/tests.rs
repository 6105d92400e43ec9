use super::*;

fn p(text: &str) -> Result<Config, ConfigError> {
    parse(text, Path::new("/etc/husk/configuration.toml"))
}

fn err(text: &str) -> String {
    p(text).unwrap_err().to_string()
}

#[test]
fn defaults_fill_an_empty_file() {
    let c = p("").unwrap();
    assert_eq!(c.vmm_path, Path::new("/usr/local/bin/husk-vmm"));
    assert_eq!(c.vcpus, 1);
    assert_eq!(c.memory_mib, 256);
    assert_eq!((c.max_vcpus, c.max_memory_mib), (8, 16384));
    // A base above the default caps raises them.
    let c = p("vcpus = 12\nmemory_mib = 20000").unwrap();
    assert_eq!((c.max_vcpus, c.max_memory_mib), (12, 20000));
    assert_eq!(c.boot_timeout, Duration::from_secs(60));
    assert_eq!(c.request_timeout, Duration::from_secs(30));
    assert_eq!(c.log_level, log::LevelFilter::Info);
    assert!(!c.debug_console);
    assert_eq!(c.state_dir, Path::new("/run/husk"));
    assert_eq!(c.pod_disk_slots, 4);
    assert!(c.free_page_reporting);
    assert_eq!(c.slot_bytes(), 2 << 30);
    assert_eq!(c.disk_rate_limiter, None);
    assert_eq!(c.net_rx_rate_limiter, None);
    assert_eq!(c.net_tx_rate_limiter, None);
    assert_eq!(c.shared_fs, SharedFs::Virtiofs);
    assert_eq!(c.rootfs, RootfsMode::Virtiofs);
    assert!(c.uses_virtio_fs());
    assert_eq!(
        c.virtiofsd,
        VirtiofsdConfig {
            path: "/usr/local/bin/virtiofsd".into(),
            cache: VirtiofsdCache::Auto,
            thread_pool_size: 0,
            xattr: false,
        }
    );
}

#[test]
fn file_sharing_modes_are_read_and_checked() {
    let c = p("shared_fs = \"none\"\nrootfs = \"block\"").unwrap();
    assert_eq!((c.shared_fs, c.rootfs), (SharedFs::None, RootfsMode::Block));
    assert!(!c.uses_virtio_fs());
    let c = p("shared_fs = \"none\"").unwrap();
    assert!(c.uses_virtio_fs(), "the rootfs still uses the share");
    let c = p("rootfs = \"block\"").unwrap();
    assert!(c.uses_virtio_fs(), "volumes still use the share");
    let c = p(r#"
        virtiofsd = "/opt/virtiofsd"
        virtiofsd_cache = "never"
        virtiofsd_thread_pool_size = 4
        virtiofsd_xattr = true
    "#)
    .unwrap();
    assert_eq!(
        c.virtiofsd,
        VirtiofsdConfig {
            path: "/opt/virtiofsd".into(),
            cache: VirtiofsdCache::Never,
            thread_pool_size: 4,
            xattr: true,
        }
    );
    for (text, want) in [
        ("shared_fs = \"9p\"", "shared_fs: must be virtiofs or none"),
        ("rootfs = \"erofs\"", "rootfs: must be virtiofs or block"),
        (
            "virtiofsd_cache = \"loose\"",
            "virtiofsd_cache: must be auto",
        ),
        (
            "virtiofsd_thread_pool_size = 65",
            "virtiofsd_thread_pool_size: must be between 0 and 64",
        ),
        (
            "virtiofsd = \"virtiofsd\"",
            "virtiofsd: must be an absolute path",
        ),
        ("virtiofsd_xattr = 1", "virtiofsd_xattr"),
    ] {
        let e = err(text);
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn rate_limits_are_per_second_buckets() {
    let second = |size| {
        Some(TokenBucketSpec {
            size,
            one_time_burst: 0,
            refill_time_ms: 1000,
        })
    };
    let c = p("disk_bandwidth_bytes_per_sec = 10485760\ndisk_ops_per_sec = 500\nnet_tx_bytes_per_sec = 1250000")
        .unwrap();
    assert_eq!(
        c.disk_rate_limiter,
        Some(RateLimiterSpec {
            bandwidth: second(10 << 20),
            ops: second(500),
        })
    );
    assert_eq!(c.net_rx_rate_limiter, None);
    assert_eq!(
        c.net_tx_rate_limiter,
        Some(RateLimiterSpec {
            bandwidth: second(1_250_000),
            ops: None,
        })
    );
    let c = p("disk_ops_per_sec = 100\nnet_rx_bytes_per_sec = 0").unwrap();
    assert_eq!(
        c.disk_rate_limiter,
        Some(RateLimiterSpec {
            bandwidth: None,
            ops: second(100),
        })
    );
    assert_eq!(c.net_rx_rate_limiter, None);
}

#[test]
fn the_shipped_file_parses_to_the_defaults() {
    let text = include_str!("../../../configs/configuration.toml");
    let mut shipped = p(text).unwrap();
    let defaults = p("").unwrap();
    shipped.source = defaults.source.clone();
    assert_eq!(shipped, defaults);
}

#[test]
fn values_are_read() {
    let c = p(r#"
        vmm_path = "/opt/husk/husk-vmm"
        kernel_params = "loglevel=7"
        vcpus = 2
        memory_mib = 512
        boot_timeout_secs = 300
        rootfs_build_timeout_secs = 20
        rootfs_image_max_mib = 512
        log_level = "debug"
        debug_console = true
        state_dir = "/tmp/h"
        pod_disk_slots = 0
        free_page_reporting = false
    "#)
    .unwrap();
    assert_eq!(c.vmm_path, Path::new("/opt/husk/husk-vmm"));
    assert_eq!(c.kernel_params, "loglevel=7");
    assert_eq!((c.vcpus, c.memory_mib), (2, 512));
    assert_eq!(c.boot_timeout, Duration::from_secs(300));
    assert_eq!(c.rootfs_build_timeout, Duration::from_secs(20));
    assert_eq!(c.rootfs_image_max_mib, 512);
    assert_eq!(c.log_level, log::LevelFilter::Debug);
    assert!(c.debug_console);
    assert_eq!(c.pod_disk_slots, 0);
    assert!(!c.free_page_reporting);
}

#[test]
fn the_jail_is_on_by_default_and_its_ids_are_checked() {
    let c = p("").unwrap();
    assert_eq!(
        c.jail,
        Some(JailUser {
            uid: DEFAULT_JAIL_ID,
            gid: DEFAULT_JAIL_ID
        })
    );
    assert_eq!(p("jail = false").unwrap().jail, None);
    assert!(c.sandbox_cgroup);
    assert!(!p("sandbox_cgroup = false").unwrap().sandbox_cgroup);
    // Ids are ignored with the jail off.
    assert_eq!(p("jail = false\njail_uid = 0").unwrap().jail, None);
    assert_eq!(
        p("jail_uid = 1234\njail_gid = 4321").unwrap().jail,
        Some(JailUser {
            uid: 1234,
            gid: 4321
        })
    );
    let e = err("jail_uid = 1234");
    assert!(e.contains("jail_gid: must be set with jail_uid"), "{e}");
    let e = err("jail_gid = 1234");
    assert!(e.contains("jail_uid: must be set with jail_gid"), "{e}");
    let e = err("jail_uid = 0\njail_gid = 1");
    assert!(e.contains("jail_uid: jail_uid 0 is root's"), "{e}");
    let e = err("jail_uid = 1\njail_gid = 0");
    assert!(e.contains("jail_gid: jail_gid 0 is root's"), "{e}");
    let e = err("jail_uid = 4294967295\njail_gid = 1");
    assert!(e.contains("is -1"), "{e}");
    let e = err("jail_uid = -5\njail_gid = 1");
    assert!(e.contains("jail_uid"), "{e}");
}

#[test]
fn a_jailed_vmm_must_be_static() {
    let dir = std::env::temp_dir().join(format!("husk-cfg-static-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("vmm.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = |jail: bool| {
        format!(
            "vmm_path = {:?}\nkernel_path = {:?}\ninitrd_path = {:?}\nmkfs_erofs_path = {:?}\nvirtiofsd = {:?}\njail = {jail}",
            script, script, script, script, script
        )
    };
    let path = dir.join("c.toml");
    std::fs::write(&path, text(true)).unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert!(
        e.contains("vmm_path: jail:") && e.contains("not a statically linked"),
        "{e}"
    );
    std::fs::write(&path, text(false)).unwrap();
    assert!(load(&path).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_name_the_key() {
    let e = err("vcpus = 0");
    assert!(e.contains("vcpus: must be between 1 and 64, got 0"), "{e}");
    let e = err("memory_mib = 16");
    assert!(e.contains("memory_mib: must be between 64"), "{e}");
    let e = err("kernel_path = \"bzImage\"");
    assert!(e.contains("kernel_path: must be an absolute path"), "{e}");
    let e = err("log_level = \"loud\"");
    assert!(e.contains("log_level: must be error"), "{e}");
    // The virtio-fs device takes a slot, the balloon another.
    let e = err("pod_disk_slots = 11");
    assert!(
        e.contains("pod_disk_slots: must be between 0 and 10"),
        "{e}"
    );
    let e = err("pod_disk_slots = 12\nfree_page_reporting = false");
    assert!(
        e.contains("pod_disk_slots: must be between 0 and 11"),
        "{e}"
    );
    let e = err("pod_disk_slots = 13\nfree_page_reporting = false\nshared_fs = \"none\"\nrootfs = \"block\"");
    assert!(
        e.contains("pod_disk_slots: must be between 0 and 12"),
        "{e}"
    );
    let e = err("kernel_params = \"a\\nb\"");
    assert!(e.contains("kernel_params: must be printable"), "{e}");
    let e = err("state_dir = \"/a/very/long/state/directory/path/x\"");
    assert!(e.contains("state_dir: at most 29 bytes"), "{e}");
    let e = err("vcpus = 2\nmax_vcpus = 1");
    assert!(
        e.contains("max_vcpus: must be between 2 and 64, got 1"),
        "{e}"
    );
    let e = err("max_memory_mib = 100");
    assert!(e.contains("max_memory_mib: must be between 256 and"), "{e}");
    let e = err("rootfs_build_timeout_secs = 0");
    assert!(e.contains("rootfs_build_timeout_secs"), "{e}");
    let e = err("rootfs_image_max_mib = 1");
    assert!(e.contains("rootfs_image_max_mib"), "{e}");
    let e = err("boot_timeout_secs = 0");
    assert!(e.contains("boot_timeout_secs"), "{e}");
    let e = err("disk_bandwidth_bytes_per_sec = 2199023255552");
    assert!(
        e.contains(
            "disk_bandwidth_bytes_per_sec: must be between 0 and 1099511627776, got 2199023255552"
        ),
        "{e}"
    );
    let e = err("net_rx_bytes_per_sec = -1");
    assert!(e.contains("net_rx_bytes_per_sec"), "{e}");
}

#[test]
fn unknown_keys_and_wrong_types_are_refused() {
    let e = err("vcpu = 2");
    assert!(e.contains("vcpu"), "{e}");
    let e = err("vcpus = \"two\"");
    assert!(e.contains("vcpus"), "{e}");
    let e = err("debug_console = 1");
    assert!(e.contains("debug_console"), "{e}");
}

#[test]
fn missing_files_are_named() {
    let dir = std::env::temp_dir().join(format!("husk-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(&file, "vmm_path = \"/nonexistent/husk-vmm\"\n").unwrap();
    let e = load(&file).unwrap_err().to_string();
    assert!(e.contains("vmm_path: /nonexistent/husk-vmm"), "{e}");
    let e = load(&dir.join("missing.toml")).unwrap_err().to_string();
    assert!(e.contains("missing.toml"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn path_precedence() {
    assert_eq!(
        choose_path(Some("/a.toml"), Some("/b.toml")),
        Path::new("/a.toml")
    );
    assert_eq!(choose_path(Some(""), Some("/b.toml")), Path::new("/b.toml"));
    assert_eq!(choose_path(None, None), Path::new(DEFAULT_PATH));
}

#[test]
fn templates_are_off_by_default_and_put_a_block_rootfs_in_a_slot() {
    assert!(!p("").unwrap().template);
    assert!(p("template = true").unwrap().template);
    let block = p("template = true\nrootfs = \"block\"").unwrap();
    assert!(block.template && block.first_image_in_slot() && !block.root_disk_at_boot());
    assert!(p("template = 1").is_err());
}
