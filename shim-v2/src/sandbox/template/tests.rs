use super::*;
use crate::sandbox::vm_spec::{self, VmPaths};
use crate::sizing::{self, Limits};
use std::os::unix::fs::PermissionsExt;

const MIB: u64 = 1 << 20;

/// A folder of its own under the temp dir, removed first.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("husk-tmpl-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// A configuration whose VMM, kernel and initrd are files in `d`.
fn cfg(d: &Path, extra: &str) -> Config {
    for f in ["vmm", "bzImage", "initrd"] {
        fs::write(d.join(f), f).unwrap();
    }
    let text = format!(
        "vmm_path = \"{0}/vmm\"\nkernel_path = \"{0}/bzImage\"\ninitrd_path = \"{0}/initrd\"\ntemplate = true\n{extra}",
        d.display()
    );
    crate::config::parse(&text, Path::new("/c.toml")).unwrap()
}

fn key_of(c: &Config, paths: &VmPaths, nics: Vec<husk_vm_config::NetSpec>) -> String {
    let size = sizing::size(c, Limits::default());
    let spec = vm_spec::vm_spec(c, size, paths, 2, nics);
    key(c, &Inputs::of(c).unwrap(), &spec)
}

fn nic(tap: &str, mac: &str) -> husk_vm_config::NetSpec {
    husk_vm_config::NetSpec {
        id: "net0".into(),
        tap: tap.into(),
        mac: Some(mac.into()),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    }
}

#[test]
fn the_key_follows_the_shape_and_files_not_the_sandbox() {
    let d = scratch("key");
    let c = cfg(&d, "");
    let jailed = VmPaths::jailed();
    let k = key_of(&c, &jailed, vec![]);
    assert_eq!(k.len(), 24);
    assert_eq!(k, key_of(&c, &jailed, vec![]), "stable");
    // Per-sandbox paths, taps and MACs are left out...
    let host = VmPaths::host(&c, Path::new("/run/husk/some-sandbox"));
    assert_eq!(k, key_of(&c, &host, vec![]));
    let a = key_of(&c, &jailed, vec![nic("tap-a", "02:00:00:00:00:01")]);
    let b = key_of(&c, &jailed, vec![nic("tap-b", "02:00:00:00:00:02")]);
    assert_eq!(a, b);
    // ... but a NIC more is another shape.
    assert_ne!(k, a);
    // So are another memory size, command line or kernel file.
    assert_ne!(k, key_of(&cfg(&d, "memory_mib = 512"), &jailed, vec![]));
    assert_ne!(
        k,
        key_of(&cfg(&d, "kernel_params = \"x=1\""), &jailed, vec![])
    );
    assert_ne!(k, key_of(&cfg(&d, "debug_console = true"), &jailed, vec![]));
    let c = cfg(&d, "");
    std::thread::sleep(std::time::Duration::from_millis(10));
    fs::write(d.join("bzImage"), "another kernel").unwrap();
    assert_ne!(k, key_of(&c, &jailed, vec![]), "a rebuilt kernel");
    let _ = fs::remove_dir_all(&d);
}

/// Writes a snapshot folder as a VMM would: state, memory of `mem` bytes.
fn made(run: &Path, mem: u64) -> PathBuf {
    let m = run.join(SNAPSHOT_DIR);
    fs::create_dir_all(&m).unwrap();
    fs::write(m.join(STATE_FILE), b"{state}").unwrap();
    let f = File::create(m.join(MEMORY_FILE)).unwrap();
    f.set_len(mem).unwrap();
    f.write_all_at(b"guest page", 4096).unwrap();
    // As the jail's user left them.
    for n in [STATE_FILE, MEMORY_FILE] {
        fs::set_permissions(m.join(n), fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(m.join(n), Some(4242), Some(4242)).unwrap();
    }
    m
}

fn meta(key: &str, c: &Config) -> Meta {
    Meta {
        key: key.into(),
        inputs: Inputs::of(c).unwrap(),
        macs: vec![Some("02:00:00:00:00:01".into())],
    }
}

use std::os::unix::fs::FileExt;

#[test]
fn a_made_snapshot_becomes_roots_template_and_opens() {
    let d = scratch("adopt");
    let c = cfg(&d, "");
    let t = Templates::new(&d.join("state"));
    let run = d.join("run");
    let m = made(&run, 8 * MIB);
    assert!(t.open("k1").unwrap().is_none(), "no template yet");
    t.adopt(&m, 8 * MIB, &meta("k1", &c)).unwrap();
    assert!(!m.exists(), "the VMM's folder is gone");
    let dir = d.join("state").join(TEMPLATES_DIR).join("k1");
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for n in [STATE_FILE, MEMORY_FILE, META_FILE] {
        let md = fs::metadata(dir.join(n)).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o777),
            (0, 0, 0o600),
            "{n}"
        );
    }
    let o = t.open("k1").unwrap().unwrap();
    assert_eq!(o.meta, meta("k1", &c));
    let mem = File::from(o.memory);
    let mut page = [0u8; 10];
    mem.read_exact_at(&mut page, 4096).unwrap();
    assert_eq!(&page, b"guest page");
    assert_eq!(mem.metadata().unwrap().len(), 8 * MIB);
    // Removed with the template.
    t.remove("k1");
    assert!(!dir.exists());
    assert!(t.open("k1").unwrap().is_none());
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn a_bad_snapshot_is_refused_and_removed() {
    let d = scratch("bad");
    let c = cfg(&d, "");
    let t = Templates::new(&d.join("state"));
    let run = d.join("run");
    // Memory of another size than the VM's.
    let m = made(&run, 4 * MIB);
    let e = t
        .adopt(&m, 8 * MIB, &meta("k", &c))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bytes, expected 8388608"), "{e}");
    assert!(!m.exists());
    // A file more.
    let m = made(&run, 8 * MIB);
    fs::write(m.join("extra"), "x").unwrap();
    let e = t
        .adopt(&m, 8 * MIB, &meta("k", &c))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not exactly"), "{e}");
    // A hard link the jail's user kept (to change the template later).
    let m = made(&run, 8 * MIB);
    fs::hard_link(m.join(STATE_FILE), run.join("kept")).unwrap();
    let e = t
        .adopt(&m, 8 * MIB, &meta("k", &c))
        .unwrap_err()
        .to_string();
    assert!(e.contains("one link"), "{e}");
    // A symlink instead of a file.
    let m = made(&run, 8 * MIB);
    fs::remove_file(m.join(STATE_FILE)).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", m.join(STATE_FILE)).unwrap();
    assert!(t.adopt(&m, 8 * MIB, &meta("k", &c)).is_err());
    // Nothing half-made stays.
    let left: Vec<_> = fs::read_dir(d.join("state").join(TEMPLATES_DIR))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn a_template_not_roots_0600_is_refused() {
    let d = scratch("mode");
    let c = cfg(&d, "");
    let t = Templates::new(&d.join("state"));
    t.adopt(&made(&d.join("run"), MIB), MIB, &meta("k", &c))
        .unwrap();
    let state = d
        .join("state")
        .join(TEMPLATES_DIR)
        .join("k")
        .join(STATE_FILE);
    fs::set_permissions(&state, fs::Permissions::from_mode(0o644)).unwrap();
    let e = t.open("k").unwrap_err().to_string();
    assert!(e.contains("mode 0600"), "{e}");
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn one_shim_makes_a_template_at_a_time() {
    let d = scratch("lock");
    let t = Templates::new(&d.join("state"));
    let held = t.lock("k").unwrap();
    assert!(held.is_some());
    assert!(t.lock("k").unwrap().is_none(), "held by the first");
    assert!(t.lock("other").unwrap().is_some(), "another key is free");
    drop(held);
    assert!(t.lock("k").unwrap().is_some(), "free again");
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn stale_and_least_recently_used_templates_go() {
    let d = scratch("evict");
    let c = cfg(&d, "");
    let t = Templates::new(&d.join("state"));
    let run = d.join("run");
    // One made from other files (an older kernel).
    let mut old = meta("old", &c);
    old.inputs.kernel.ino += 1;
    t.adopt(&made(&run, MIB), MIB, &old).unwrap();
    assert!(t.open("old").unwrap().is_some());
    for n in 0..MAX_TEMPLATES {
        t.adopt(&made(&run, MIB), MIB, &meta(&format!("k{n}"), &c))
            .unwrap();
    }
    assert!(t.open("old").unwrap().is_none(), "stale: removed");
    // k0 is the least recently used once k1.. were made after it; use k0
    // now, so k1 goes when one more is made.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(t.open("k0").unwrap().is_some());
    t.adopt(&made(&run, MIB), MIB, &meta("new", &c)).unwrap();
    let mut left: Vec<_> = fs::read_dir(d.join("state").join(TEMPLATES_DIR))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    left.sort();
    assert_eq!(left.len(), MAX_TEMPLATES, "{left:?}");
    assert!(left.contains(&"k0".to_string()) && left.contains(&"new".to_string()));
    assert!(!left.contains(&"k1".to_string()), "{left:?}");
    let _ = fs::remove_dir_all(&d);
}
