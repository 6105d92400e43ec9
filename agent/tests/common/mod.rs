//! The host-test harness: a husk-agent as an ordinary process on a Unix
//! socket (each test its own, with its own cgroup parent), a ttrpc client,
//! and the busybox bundle of tests/agent/make-bundle.sh.
//!
//! The tests need root (namespaces, mounts, cgroups) and a static busybox;
//! without them each test says so and passes without checking anything.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use husk_protocols::agent as pb;
use husk_protocols::agent_ttrpc::AgentServiceClient;
use husk_protocols::ttrpc::{self, context};
use serde_json::{json, Value};

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The bundle, made once per test binary. None when the host cannot run
/// containers (not root, no static busybox).
/// Where the tests keep sockets and the bundle: cargo's scratch folder, unless
/// it lies under /tmp, /run or /dev, which the PID 1 test's agent covers with
/// its own mounts (a checkout under /tmp would hide them from the test).
pub fn scratch() -> PathBuf {
    let t = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if ["/tmp", "/run", "/dev"].iter().any(|p| t.starts_with(p)) {
        let dir = Path::new("/var/tmp/husk-agent-tests");
        std::fs::create_dir_all(dir).unwrap();
        dir.to_path_buf()
    } else {
        t.to_path_buf()
    }
}

pub fn bundle() -> Option<&'static Path> {
    static B: OnceLock<Option<PathBuf>> = OnceLock::new();
    B.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // A skipped test would pass without testing anything.
            panic!("the agent's host tests need root");
        }
        // Not under /tmp: the PID 1 test's agent mounts a tmpfs there.
        // One name, remade by each run (cargo runs test binaries one at a
        // time), so that runs leave no copies behind.
        let dir = scratch().join("husk-agent-bundle");
        let ok = Command::new(repo().join("tests/agent/make-bundle.sh"))
            .arg(&dir)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            panic!("no test bundle: tests/agent/make-bundle.sh failed (busybox-static installed?)");
        }
        Some(dir)
    })
    .as_deref()
}

/// The bundle's config.json with `args` as the process.
pub fn spec(args: &[&str]) -> Value {
    let b = bundle().expect("bundle");
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    v["process"]["args"] = json!(args);
    v
}

pub fn rootfs() -> String {
    bundle()
        .unwrap()
        .join("rootfs")
        .to_string_lossy()
        .into_owned()
}

/// A call context without a deadline.
pub fn ctx() -> context::Context {
    context::with_timeout(0)
}

pub struct TestAgent {
    pub child: Child,
    pub sock: PathBuf,
    pub cgroup_parent: String,
    pub client: AgentServiceClient,
}

/// Where cgroup2 is mounted on this host.
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next() == Some("cgroup2"))
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .expect("cgroup2 mounted")
}

/// Whether containers on this host get cgroup v2 controller `c`.
pub fn has_controller(c: &str) -> bool {
    std::fs::read_to_string(cgroup2_mount().join("cgroup.subtree_control"))
        .unwrap_or_default()
        .split_whitespace()
        .any(|x| x == c)
}

/// CopyFile's folder of the agent listening on `sock` (`start` passes it).
pub fn host_files(sock: &Path) -> PathBuf {
    sock.with_extension("host-files")
}

impl TestAgent {
    /// None (after saying why) where the host cannot run the tests.
    pub fn start() -> Option<TestAgent> {
        Self::start_with(|agent, sock, cgroup_parent| {
            let mut c = Command::new(agent);
            c.arg("--listen")
                .arg(format!("unix://{}", sock.display()))
                .arg("--cgroup-parent")
                .arg(cgroup_parent)
                .arg("--host-files")
                .arg(host_files(sock))
                .stdout(Stdio::null());
            c
        })
    }

    /// Starts the agent with the command `make` builds from the agent's
    /// path, the socket path and the cgroup parent.
    pub fn start_with(make: impl FnOnce(&str, &Path, &str) -> Command) -> Option<TestAgent> {
        bundle()?;
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let sock = scratch().join(format!("husk-agent-{tag}.sock"));
        let cgroup_parent = format!("husk-test-{tag}");
        let child = make(env!("CARGO_BIN_EXE_husk-agent"), &sock, &cgroup_parent)
            .spawn()
            .unwrap();
        let start = Instant::now();
        let client = loop {
            if let Ok(c) = ttrpc::Client::connect(&format!("unix://{}", sock.display())) {
                break c;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "agent did not listen"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        Some(TestAgent {
            child,
            sock,
            cgroup_parent,
            client: AgentServiceClient::new(client),
        })
    }

    pub fn cgroup_base(&self) -> PathBuf {
        cgroup2_mount().join(&self.cgroup_parent)
    }

    /// The agent's exit status, once it has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid fits i32")
    }

    pub fn create_spec(&self, id: &str, spec: &Value) -> ttrpc::Result<pb::Empty> {
        let mut r = pb::CreateContainerRequest::new();
        r.container_id = id.into();
        r.oci_spec_json = serde_json::to_vec(spec).unwrap();
        r.set_rootfs_path(rootfs());
        self.client.create_container(ctx(), &r)
    }

    pub fn create(&self, id: &str, args: &[&str]) {
        self.create_spec(id, &spec(args)).unwrap();
    }

    pub fn start_c(&self, id: &str) -> ttrpc::Result<pb::Empty> {
        let mut r = pb::ContainerRequest::new();
        r.container_id = id.into();
        self.client.start_container(ctx(), &r)
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> i32 {
        let mut r = pb::ProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        self.client.wait_process(ctx(), &r).unwrap().status
    }

    pub fn read_all(&self, id: &str, exec_id: &str, stderr: bool) -> String {
        let mut out = Vec::new();
        loop {
            let mut r = pb::ReadStreamRequest::new();
            r.container_id = id.into();
            r.exec_id = exec_id.into();
            r.len = 4096;
            let d = if stderr {
                self.client.read_stderr(ctx(), &r)
            } else {
                self.client.read_stdout(ctx(), &r)
            }
            .unwrap()
            .data;
            if d.is_empty() {
                break;
            }
            out.extend(d);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) {
        let mut r = pb::ProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        self.client.close_stdin(ctx(), &r).unwrap();
    }

    pub fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) {
        let mut r = pb::WriteStreamRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.data = data.to_vec();
        let n = self.client.write_stdin(ctx(), &r).unwrap().len;
        assert_eq!(n as usize, data.len());
    }

    pub fn remove(&self, id: &str, force: bool) -> ttrpc::Result<pb::Empty> {
        let mut r = pb::RemoveContainerRequest::new();
        r.container_id = id.into();
        r.force = force;
        self.client.remove_container(ctx(), &r)
    }

    pub fn signal(&self, id: &str, exec_id: &str, sig: i32, all: bool) -> ttrpc::Result<pb::Empty> {
        let mut r = pb::SignalProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.signal = u32::try_from(sig).expect("a signal number is positive");
        r.all = all;
        self.client.signal_process(ctx(), &r)
    }

    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[&str],
        terminal: bool,
    ) -> ttrpc::Result<pb::Empty> {
        let mut p = spec(args)["process"].clone();
        p["terminal"] = json!(terminal);
        let mut r = pb::ExecProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.process_json = serde_json::to_vec(&p).unwrap();
        self.client.exec_process(ctx(), &r)
    }

    pub fn stats(&self, id: &str) -> pb::StatsContainerResponse {
        let mut r = pb::ContainerRequest::new();
        r.container_id = id.into();
        self.client.stats_container(ctx(), &r).unwrap()
    }

    pub fn pids(&self, id: &str) -> Vec<i32> {
        let mut r = pb::ContainerRequest::new();
        r.container_id = id.into();
        self.client.list_processes(ctx(), &r).unwrap().pids
    }

    /// Create, start, read stdout and stderr, wait, remove.
    pub fn run(&self, id: &str, args: &[&str]) -> (String, String, i32) {
        self.create(id, args);
        self.close_stdin(id, "");
        self.start_c(id).unwrap();
        let out = self.read_all(id, "", false);
        let err = self.read_all(id, "", true);
        let status = self.wait(id, "");
        self.remove(id, false).unwrap();
        (out, err, status)
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        // An agent under unshare(1) is PID 1 of its namespace: only a
        // SIGKILL from here ends it.
        for pid in children_of(self.pid()) {
            // SAFETY: kill(2) with integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
        let _ = std::fs::remove_dir_all(host_files(&self.sock));
        // Containers a failed test left behind.
        let base = self.cgroup_base();
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                let start = Instant::now();
                while std::fs::remove_dir(e.path()).is_err()
                    && start.elapsed() < Duration::from_secs(2)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let _ = std::fs::remove_dir(base);
    }
}

/// The status code of a failed call.
pub fn code(r: ttrpc::Result<pb::Empty>) -> (ttrpc::Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    }
}

/// Pids whose parent is `ppid`.
pub fn children_of(ppid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(") ")?.1.to_string();
                    after.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(ppid)
        })
        .collect()
}
