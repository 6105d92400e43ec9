//! The shim binary's lifecycle for containerd (containerd-shim's `Shim`):
//! `start` (launch or find the shim that serves the container's sandbox),
//! `delete` (clean up after a shim that is gone), and the task service.
//!
//! Grouping, as runc's shim v2 does it: a container whose CRI annotations
//! name a sandbox is served by that sandbox's shim. The shim's socket
//! address is derived from the sandbox id, so `start` for a pod's later
//! container finds the running pod shim's socket and returns its address.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::write_address;
use containerd_shim::{Config, DeleteResponse, Error, ExitSignal, Flags, StartOpts};

use crate::events::{timestamp, Events};
use crate::marker;
use crate::service::Service;
use crate::spec::{self, Role};

pub struct HuskShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
}

/// The sandbox (and so the shim) a bundle's container belongs to.
pub fn grouping(id: &str, bundle: &Path) -> Result<String, spec::SpecError> {
    let s = spec::read(bundle)?;
    let role = Role::of(id, &s);
    let g = role.sandbox_id(id).to_string();
    spec::check_id("sandbox", &g)?;
    Ok(g)
}

/// What `shim delete` does for a container whose shim is gone: unmount its
/// rootfs, and if it owned a sandbox, end that sandbox's VM and remove its
/// state folder.
pub fn cleanup_bundle(id: &str, bundle: &Path) {
    // Only where the shim mounts: never a path the spec names.
    if let Err(e) = crate::rootfs::unmount(&crate::rootfs::bundle_rootfs(bundle)) {
        log::warn!("{id}: {e}");
    }
    if let Some((dir, owner)) = marker::read(bundle) {
        if owner {
            crate::sandbox::vmm::kill_recorded(&dir);
            // Waits (a little) for the killed VMM to leave its cgroup.
            if let Ok(record) =
                std::fs::read_to_string(dir.join(crate::sandbox::state_dir::CGROUPS))
            {
                crate::sandbox::cgroup::remove_recorded(&record);
            }
            // The folder holds only files and sockets (the jail's mounts
            // were the VMM's own, gone with it).
            crate::sandbox::state_dir::remove(&dir);
        }
        marker::remove(bundle);
    }
}

impl containerd_shim::Shim for HuskShim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        HuskShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        let group =
            grouping(&opts.id, &bundle).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let (_pid, address) = containerd_shim::spawn(opts, &group, Vec::new())?;
        write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        cleanup_bundle(&self.id, &bundle);
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(timestamp(SystemTime::now())).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        let events = Events::start(publisher, self.namespace.clone());
        Service::new(events, self.exit.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marker::BUNDLE_MARKER;

    #[test]
    fn grouping_follows_the_sandbox_id() {
        let dir = std::env::temp_dir().join(format!("husk-shim-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"ociVersion":"1.0.2"}"#).unwrap();
        assert_eq!(grouping("c1", &dir).unwrap(), "c1");
        std::fs::write(
            dir.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.container-type":"container",
                "io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        )
        .unwrap();
        assert_eq!(grouping("c1", &dir).unwrap(), "pod1");
        std::fs::write(
            dir.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.container-type":"container",
                "io.kubernetes.cri.sandbox-id":"../etc"}}"#,
        )
        .unwrap();
        assert!(grouping("c1", &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cleanup_removes_an_owned_state_folder() {
        let root = std::env::temp_dir().join(format!("husk-cleanup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let bundle = root.join("bundle");
        let state = root.join("state/sb");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("vmm.pid"), "999999999").unwrap();
        std::fs::write(bundle.join("config.json"), "{}").unwrap();
        std::fs::write(
            bundle.join(BUNDLE_MARKER),
            format!("{}\nmember\n", state.display()),
        )
        .unwrap();
        cleanup_bundle("c", &bundle);
        assert!(state.exists(), "a member leaves the sandbox alone");
        assert!(!bundle.join(BUNDLE_MARKER).exists());
        std::fs::write(
            bundle.join(BUNDLE_MARKER),
            format!("{}\nowner\n", state.display()),
        )
        .unwrap();
        cleanup_bundle("c", &bundle);
        assert!(!state.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn is_mountpoint(p: &Path) -> bool {
        let me = std::fs::canonicalize(p).unwrap();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(me.to_str().unwrap()))
    }

    fn tmpfs(at: &Path) {
        rustix::mount::mount(
            "husk-test",
            at,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .unwrap();
    }

    /// Whatever the spec's root.path says (an absolute host path, a path
    /// climbing out with `../..`), shim delete unmounts `<bundle>/rootfs`
    /// only: mounts elsewhere stay.
    #[test]
    fn cleanup_unmounts_the_bundle_rootfs_only() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let top = std::env::temp_dir().join(format!("husk-rootpath-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let bundle = top.join("a/b/bundle");
        let outside_abs = top.join("host-mount");
        let outside_rel = top.join("a/rel-mount");
        for d in [&bundle.join("rootfs"), &outside_abs, &outside_rel] {
            std::fs::create_dir_all(d).unwrap();
        }
        // A private mount namespace of this thread's own would be cleaner,
        // but the test's mounts are few and undone below.
        tmpfs(&outside_abs);
        tmpfs(&outside_rel);
        for root_path in [
            outside_abs.to_str().unwrap(),
            "../../rel-mount",
            "../../../host-mount",
        ] {
            tmpfs(&bundle.join("rootfs"));
            std::fs::write(
                bundle.join("config.json"),
                serde_json::json!({"root": {"path": root_path}}).to_string(),
            )
            .unwrap();
            cleanup_bundle("c", &bundle);
            assert!(!is_mountpoint(&bundle.join("rootfs")), "{root_path}");
            assert!(
                is_mountpoint(&outside_abs),
                "{root_path}: unmounted the host's"
            );
            assert!(
                is_mountpoint(&outside_rel),
                "{root_path}: unmounted the host's"
            );
        }
        // A symlink at <bundle>/rootfs is not followed.
        std::fs::remove_dir(bundle.join("rootfs")).unwrap();
        std::os::unix::fs::symlink(&outside_abs, bundle.join("rootfs")).unwrap();
        cleanup_bundle("c", &bundle);
        assert!(is_mountpoint(&outside_abs), "followed a symlink");
        assert!(crate::rootfs::prepare_mountpoint(&bundle.join("rootfs")).is_err());
        for m in [&outside_abs, &outside_rel] {
            crate::rootfs::unmount(m).unwrap();
        }
        std::fs::remove_dir_all(&top).unwrap();
    }
}
