//! The agent's path checks: `resolve_in_root` walks a path inside a
//! container rootfs holding symlinks (relative, absolute, climbing, looping)
//! and must answer a host path under the root, or an error. The input is
//! the path (as a mount destination or copy_file path from a request).
#![no_main]
#![allow(dead_code)]

#[path = "../../agent/src/paths.rs"]
mod paths;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn rootfs() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("husk-fuzz-paths-{}", std::process::id()));
        let _ = std::fs::create_dir_all(root.join("a/b/c"));
        let _ = std::fs::create_dir_all(root.join("etc"));
        let _ = std::fs::write(root.join("etc/file"), "");
        for (link, target) in [
            ("abs", "/etc"),
            ("rel", "a/b"),
            ("a/b/up", "../.."),
            ("a/b/c/out", "../../../../.."),
            ("loop", "loop"),
            ("ping", "pong"),
            ("pong", "ping"),
            ("dangling", "/nowhere/x"),
            ("filelink", "/etc/file"),
            ("dotdot", ".."),
        ] {
            let _ = symlink(target, root.join(link));
        }
        root
    })
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new(std::ffi::OsStr::from_bytes(data));
    let root = rootfs();
    if paths::check_clean_absolute(path).is_err() {
        assert!(paths::resolve_in_root(root, path).is_err());
        return;
    }
    if let Ok(host) = paths::resolve_in_root(root, path) {
        assert!(
            host.starts_with(root),
            "{path:?} resolved to {host:?}, outside the root"
        );
        assert!(
            !host
                .components()
                .any(|c| c == std::path::Component::ParentDir),
            "{path:?} resolved to {host:?}, with a `..`"
        );
    }
});
