//! The agent on the host, as an ordinary process on a Unix socket, running
//! busybox containers (see common/mod.rs). sandbox.rs has the sandbox-level
//! calls.

mod common;

use common::{ctx, TestAgent};

#[test]
fn runs_a_container_and_reads_its_stdout() {
    let Some(a) = TestAgent::start() else { return };
    let (out, err, status) = a.run(
        "hello",
        &["sh", "-c", "echo hello; echo oops >&2; hostname"],
    );
    assert_eq!(out, "hello\nhusk-test\n");
    assert_eq!(err, "oops\n");
    assert_eq!(status, 0);
}

use husk_protocols::agent as pb;
use husk_protocols::ttrpc::Code;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn exit_codes_are_runcs() {
    let Some(a) = TestAgent::start() else { return };
    assert_eq!(a.run("zero", &["true"]).2, 0);
    assert_eq!(a.run("three", &["sh", "-c", "exit 3"]).2, 3);
    // The init of a pid namespace only dies of signals from outside it.
    a.create("killed", &["sleep", "100"]);
    a.start_c("killed").unwrap();
    a.signal("killed", "", libc::SIGKILL, false).unwrap();
    assert_eq!(a.wait("killed", ""), 128 + libc::SIGKILL);
    a.remove("killed", false).unwrap();
    // A missing program fails start, as `runc create` fails.
    let (c, msg) = common::code(a.create_spec("nope", &common::spec(&["no-such-program"])));
    assert_eq!(c, Code::INVALID_ARGUMENT);
    assert!(msg.contains("executable file not found"), "{msg}");
}

#[test]
fn exec_joins_the_container_and_signals_reach_it() {
    let Some(a) = TestAgent::start() else { return };
    a.create("c", &["sleep", "100"]);
    a.start_c("c").unwrap();
    a.exec(
        "c",
        "e1",
        &["sh", "-c", "hostname; cat /proc/1/cmdline; echo; exit 5"],
        false,
    )
    .unwrap();
    a.close_stdin("c", "e1");
    assert_eq!(
        a.read_all("c", "e1", false),
        "husk-test\nsleep\u{0}100\u{0}\n"
    );
    assert_eq!(a.wait("c", "e1"), 5);
    // A second exec, killed by SIGTERM: 128 + 15.
    a.exec("c", "e2", &["sleep", "100"], false).unwrap();
    a.signal("c", "e2", libc::SIGTERM, false).unwrap();
    assert_eq!(a.wait("c", "e2"), 128 + libc::SIGTERM);
    // Duplicate exec id.
    let (c, _) = common::code(a.exec("c", "e1", &["true"], false));
    assert_eq!(c, Code::ALREADY_EXISTS);
    // Signal to all processes.
    a.exec("c", "e3", &["sleep", "100"], false).unwrap();
    a.signal("c", "", libc::SIGKILL, true).unwrap();
    assert_eq!(a.wait("c", ""), 137);
    assert_eq!(a.wait("c", "e3"), 137);
    // Running containers refuse an unforced remove; stopped ones go.
    a.remove("c", false).unwrap();
}

#[test]
fn stdin_reaches_the_process() {
    let Some(a) = TestAgent::start() else { return };
    a.create("cat", &["cat"]);
    a.start_c("cat").unwrap();
    a.write_stdin("cat", "", b"abc\n");
    a.write_stdin("cat", "", b"def\n");
    a.close_stdin("cat", "");
    assert_eq!(a.read_all("cat", "", false), "abc\ndef\n");
    assert_eq!(a.wait("cat", ""), 0);
    a.remove("cat", false).unwrap();
}

#[test]
fn terminal_session_with_resize() {
    let Some(a) = TestAgent::start() else { return };
    let mut s = common::spec(&["sh", "-c", "stty size; read x; echo got $x; tty"]);
    s["process"]["terminal"] = json!(true);
    a.create_spec("tty", &s).unwrap();
    let mut r = pb::TtyWinResizeRequest::new();
    r.container_id = "tty".into();
    r.row = 33;
    r.column = 101;
    a.client.tty_win_resize(ctx(), &r).unwrap();
    a.start_c("tty").unwrap();
    a.write_stdin("tty", "", b"hi\n");
    let out = a.read_all("tty", "", false);
    assert!(out.contains("33 101"), "{out:?}");
    assert!(out.contains("got hi"), "{out:?}");
    assert!(out.contains("/dev/"), "tty names a device: {out:?}");
    assert_eq!(a.wait("tty", ""), 0);
    // A terminal has no separate stderr.
    let mut r = pb::ReadStreamRequest::new();
    r.container_id = "tty".into();
    r.len = 10;
    assert!(a.client.read_stderr(ctx(), &r).is_err());
    a.remove("tty", false).unwrap();
}

#[test]
fn pause_stops_cpu_and_resume_restarts_it() {
    let Some(a) = TestAgent::start() else { return };
    a.create("busy", &["sh", "-c", "while :; do :; done"]);
    a.start_c("busy").unwrap();
    let usage = |a: &TestAgent| a.stats("busy").cpu.usage_usec;
    let start = Instant::now();
    while usage(&a) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "cpu usage is counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut r = pb::ContainerRequest::new();
    r.container_id = "busy".into();
    a.client.pause_container(ctx(), &r).unwrap();
    let frozen = std::fs::read_to_string(a.cgroup_base().join("busy/cgroup.events")).unwrap();
    assert!(frozen.contains("frozen 1"), "{frozen}");
    let p1 = usage(&a);
    std::thread::sleep(Duration::from_millis(300));
    let p2 = usage(&a);
    assert!(p2 - p1 < 20_000, "frozen, yet used {}us", p2 - p1);
    a.client.resume_container(ctx(), &r).unwrap();
    let start = Instant::now();
    while usage(&a) < p2 + 50_000 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "runs again after resume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (c, _) = common::code(a.remove("busy", false));
    assert_eq!(c, Code::FAILED_PRECONDITION);
    a.remove("busy", true).unwrap();
}

#[test]
fn mem_info_is_the_guests() {
    let Some(a) = TestAgent::start() else { return };
    let m = a.client.get_mem_info(ctx(), &pb::Empty::new()).unwrap();
    assert!(m.total_bytes > 0, "MemTotal read");
    assert!(
        m.available_bytes > 0 && m.available_bytes <= m.total_bytes,
        "{} of {}",
        m.available_bytes,
        m.total_bytes
    );
}

#[test]
fn stats_and_process_list_are_plausible() {
    let Some(a) = TestAgent::start() else { return };
    a.create(
        "st",
        &[
            "sh",
            "-c",
            "sleep 100 & i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; wait",
        ],
    );
    a.start_c("st").unwrap();
    // Until sh has forked sleep and counted for a while (slow machines).
    let start = Instant::now();
    while a.pids("st").len() < 2 || a.stats("st").cpu.usage_usec <= 1000 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            a.stats("st").cpu
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = a.pids("st");
    assert_eq!(pids.len(), 2, "sh and sleep: {pids:?}");
    let s = a.stats("st");
    assert!(s.cpu.usage_usec > 1000, "{:?}", s.cpu);
    assert!(s.cpu.usage_usec >= s.cpu.user_usec);
    if common::has_controller("pids") {
        assert_eq!(s.pids.current, 2);
    }
    if common::has_controller("memory") {
        assert!(s.memory.usage_bytes > 100_000, "{:?}", s.memory);
    }
    a.remove("st", true).unwrap();
}

/// Asserts that the agent has no child process, no container cgroup and
/// no mount of the bundle's rootfs left.
fn assert_clean(a: &TestAgent) {
    let start = Instant::now();
    while !common::children_of(a.pid()).is_empty() && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        common::children_of(a.pid()),
        Vec::<i32>::new(),
        "processes left"
    );
    let groups: Vec<_> = std::fs::read_dir(a.cgroup_base())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .collect();
    assert!(groups.is_empty(), "cgroups left: {groups:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&common::rootfs()), "mounts left");
}

#[test]
fn nothing_is_left_after_remove() {
    let Some(a) = TestAgent::start() else { return };
    a.run("one", &["sh", "-c", "sleep 100 & sleep 100 & exit 0"]);
    a.create("created", &["true"]);
    a.remove("created", false).unwrap();
    a.create("running", &["sleep", "100"]);
    a.start_c("running").unwrap();
    a.exec("running", "x", &["sleep", "100"], false).unwrap();
    a.remove("running", true).unwrap();
    assert_clean(&a);
    // The ids are free again.
    assert_eq!(a.run("one", &["true"]).2, 0);
}

/// Each bad request fails with INVALID_ARGUMENT (or the code named) and
/// leaves nothing behind.
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let Some(a) = TestAgent::start() else { return };
    let create_raw = |id: &str, json: &[u8], rootfs: &str| {
        let mut r = pb::CreateContainerRequest::new();
        r.container_id = id.into();
        r.oci_spec_json = json.to_vec();
        r.set_rootfs_path(rootfs.into());
        a.client.create_container(ctx(), &r)
    };
    let rootfs = common::rootfs();
    let good = common::spec(&["true"]);
    let invalid = |r, what: &str| {
        let (c, msg) = common::code(r);
        assert_eq!(c, Code::INVALID_ARGUMENT, "{what}: {msg}");
        msg
    };
    invalid(create_raw("c", b"{not json", &rootfs), "not json");
    invalid(create_raw("c", b"{}", &rootfs), "empty spec");
    let mut s = good.clone();
    s["ociVersion"] = json!("0.9");
    invalid(a.create_spec("c", &s), "old version");
    invalid(
        create_raw(
            "c",
            &serde_json::to_vec(&good).unwrap(),
            "/nonexistent/rootfs",
        ),
        "missing rootfs",
    );
    invalid(
        create_raw("c", &serde_json::to_vec(&good).unwrap(), "relative"),
        "relative rootfs",
    );
    let mut no_rootfs = pb::CreateContainerRequest::new();
    no_rootfs.container_id = "c".into();
    no_rootfs.oci_spec_json = serde_json::to_vec(&good).unwrap();
    let msg = invalid(a.client.create_container(ctx(), &no_rootfs), "no rootfs");
    assert!(msg.contains("no rootfs"), "{msg}");
    // A shared rootfs whose folder the share lacks (no share mounted here):
    // refused with the path, nothing created.
    let mut shared = no_rootfs.clone();
    shared.container_id = "no-such-shared-c".into();
    shared.set_rootfs_shared(pb::SharedRootfs::new());
    let (code, msg) = common::code(a.client.create_container(ctx(), &shared));
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(
        msg.contains("/run/husk/shared/no-such-shared-c/rootfs") && msg.contains("shared folder"),
        "{msg}"
    );
    for id in ["", "-x", "a/b", "../c", &"x".repeat(200)] {
        invalid(a.create_spec(id, &good), "malformed id");
    }
    let mut s = good.clone();
    s["mounts"] = json!([{"destination": "/../../etc", "type": "tmpfs", "source": "tmpfs"}]);
    let msg = invalid(a.create_spec("c", &s), "dotdot");
    assert!(msg.contains(".."), "{msg}");
    let mut s = good.clone();
    s["mounts"] = json!([{"destination": "/x", "type": "nfs", "source": "h:/x"}]);
    invalid(a.create_spec("c", &s), "unsupported mount type");
    let mut s = good.clone();
    s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "user"}]);
    let msg = invalid(a.create_spec("c", &s), "user namespace without mappings");
    assert!(msg.contains("uidMappings"), "{msg}");
    let mut s = good.clone();
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_NOTIFY"});
    invalid(a.create_spec("c", &s), "seccomp notify");
    let mut s = good.clone();
    s["process"]["args"] = json!([]);
    invalid(a.create_spec("c", &s), "no args");
    let mut s = good.clone();
    s["linux"]["resources"] = json!({"memory": {"limit": 100, "swap": 50}});
    invalid(a.create_spec("c", &s), "swap below limit");
    let mut s = good.clone();
    s["linux"]["sysctl"] = json!({"../../etc/passwd": "x"});
    invalid(a.create_spec("c", &s), "sysctl key");

    // A symlink in the rootfs that climbs out of it.
    let evil = std::env::temp_dir().join(format!("husk-evil-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&evil);
    std::fs::create_dir_all(evil.join("bin")).unwrap();
    std::os::unix::fs::symlink("../../../../../../tmp", evil.join("escape")).unwrap();
    let mut s = good.clone();
    s["mounts"] = json!([{"destination": "/escape/x", "type": "tmpfs", "source": "tmpfs"}]);
    let msg = invalid(
        create_raw(
            "c",
            &serde_json::to_vec(&s).unwrap(),
            evil.to_str().unwrap(),
        ),
        "symlink escape",
    );
    assert!(msg.contains("outside the container's root"), "{msg}");
    std::fs::remove_dir_all(&evil).unwrap();

    // An oversized request: ttrpc refuses it, the agent keeps serving.
    let mut s = good.clone();
    s["annotations"] = json!({"big": "x".repeat(5 << 20)});
    assert!(a.create_spec("c", &s).is_err());
    let mut r = pb::CheckRequest::new();
    r.service = "agent".into();
    let h = a.client.check(ctx(), &r).unwrap();
    assert_eq!(
        h.status,
        pb::health_check_response::ServingStatus::SERVING.into()
    );
    assert_clean(&a);

    // Duplicate ids; unknown containers; wrong states.
    a.create("dup", &["sleep", "100"]);
    let (c, _) = common::code(a.create_spec("dup", &good));
    assert_eq!(c, Code::ALREADY_EXISTS);
    let (c, _) = common::code(a.start_c("nope"));
    assert_eq!(c, Code::NOT_FOUND);
    let (c, _) = common::code(a.exec("dup", "e", &["true"], false));
    assert_eq!(
        c,
        Code::FAILED_PRECONDITION,
        "exec into a created container"
    );
    a.start_c("dup").unwrap();
    let (c, _) = common::code(a.start_c("dup"));
    assert_eq!(c, Code::FAILED_PRECONDITION, "second start");
    let (c, _) = common::code(a.signal("dup", "", 1000, false));
    assert_eq!(c, Code::INVALID_ARGUMENT, "bad signal");
    let mut r = pb::ExecProcessRequest::new();
    r.container_id = "dup".into();
    r.exec_id = "e".into();
    r.process_json = b"[1,2]".to_vec();
    let (c, _) = common::code(a.client.exec_process(ctx(), &r));
    assert_eq!(c, Code::INVALID_ARGUMENT, "bad process json");
    let mut r = pb::UpdateContainerRequest::new();
    r.container_id = "dup".into();
    r.resources_json = br#"{"unified":{"../x":"1"}}"#.to_vec();
    let (c, _) = common::code(a.client.update_container(ctx(), &r));
    assert_eq!(c, Code::INVALID_ARGUMENT, "bad unified key");
    a.remove("dup", true).unwrap();
    assert_clean(&a);
}

#[test]
fn memory_limit_kills_and_reports_oom() {
    let Some(a) = TestAgent::start() else { return };
    let mut s = common::spec(&["tail", "/dev/zero"]);
    s["linux"]["resources"] = json!({"memory": {"limit": 16 << 20, "swap": 16 << 20}});
    if !common::has_controller("memory") {
        let (c, msg) = common::code(a.create_spec("oom", &s));
        assert_eq!(c, Code::INVALID_ARGUMENT);
        assert!(msg.contains("controller memory"), "{msg}");
        eprintln!("SKIP: no cgroup v2 memory controller on this host (checked the clear error)");
        return;
    }
    a.create_spec("oom", &s).unwrap();
    a.close_stdin("oom", "");
    a.start_c("oom").unwrap();
    assert_eq!(a.wait("oom", ""), 137);
    let ev = a.client.get_oom_event(ctx(), &pb::Empty::new()).unwrap();
    assert_eq!(ev.container_id, "oom");
    assert!(a.stats("oom").memory.oom_kills >= 1);
    a.remove("oom", false).unwrap();
}

#[test]
fn pids_limit_stops_forks() {
    let Some(a) = TestAgent::start() else { return };
    let mut s = common::spec(&[
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 10 & done; wait",
    ]);
    s["linux"]["resources"] = json!({"pids": {"limit": 4}});
    if !common::has_controller("pids") {
        let (c, msg) = common::code(a.create_spec("pids", &s));
        assert_eq!(c, Code::INVALID_ARGUMENT);
        assert!(msg.contains("controller pids"), "{msg}");
        eprintln!("SKIP: no cgroup v2 pids controller on this host (checked the clear error)");
        return;
    }
    a.create_spec("pids", &s).unwrap();
    a.close_stdin("pids", "");
    a.start_c("pids").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.pids("pids").len() <= 4);
    assert_eq!(a.stats("pids").pids.limit, 4);
    a.remove("pids", true).unwrap();
}

#[test]
fn seccomp_filters_the_container_and_its_execs() {
    let Some(a) = TestAgent::start() else { return };
    let profile = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            // personality(PER_LINUX) is refused, personality(PER_LINUX32) not.
            {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22,
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}
        ]
    });
    for nnp in [true, false] {
        let id = format!("sc-{nnp}");
        let mut s = common::spec(&[
            "sh",
            "-c",
            "mkdir /tmp/x; echo mkdir=$?; linux64 true; echo l64=$?; linux32 true; echo l32=$?; read x || exit 0",
        ]);
        s["linux"]["seccomp"] = profile.clone();
        s["process"]["noNewPrivileges"] = json!(nnp);
        a.create_spec(&id, &s).unwrap();
        a.start_c(&id).unwrap();
        a.exec(
            &id,
            "e",
            &["sh", "-c", "mkdir /tmp/y; echo exec-mkdir=$?"],
            false,
        )
        .unwrap();
        a.close_stdin(&id, "e");
        assert_eq!(a.read_all(&id, "e", false), "exec-mkdir=1\n");
        assert_eq!(a.wait(&id, "e"), 0);
        // The init's `read` ends, and with it the container.
        a.close_stdin(&id, "");
        assert_eq!(
            a.read_all(&id, "", false),
            "mkdir=1\nl64=1\nl32=0\n",
            "nnp={nnp}"
        );
        let err = a.read_all(&id, "", true);
        assert!(err.contains("Operation not permitted"), "{err}");
        assert!(err.contains("Invalid argument"), "{err}");
        assert_eq!(a.wait(&id, ""), 0);
        a.remove(&id, false).unwrap();
    }
}

/// PID 1 mode on the host: the agent as PID 1 of new pid, mount, network,
/// UTS, IPC and cgroup namespaces (unshare(1)), inside a cgroup of the
/// test's own. It mounts its file systems, serves, runs a container, leaves
/// no zombie, and ends "the VM" on DestroySandbox: reboot(2) in a pid
/// namespace kills its init with SIGHUP.
#[test]
fn pid1_mode_in_its_own_namespaces() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    if common::bundle().is_none() {
        return;
    }
    let cg = common::cgroup2_mount().join(format!("husk-pid1-test-{}", std::process::id()));
    std::fs::create_dir_all(&cg).unwrap();
    let procs = cg.join("cgroup.procs");
    let Some(mut a) = TestAgent::start_with(|agent, sock, _| {
        let mut c = std::process::Command::new("unshare");
        c.args([
            "--pid", "--fork", "--mount", "--net", "--uts", "--ipc", "--cgroup",
        ])
        .arg(agent)
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .stdout(std::process::Stdio::piped());
        let procs = procs.clone();
        // SAFETY: only a write(2) of our pid to a cgroup file, via std's
        // File, between fork and exec of a test process (no other threads'
        // locks are needed: the path is owned by the closure).
        unsafe {
            c.pre_exec(move || std::fs::write(&procs, std::process::id().to_string()));
        }
        c
    }) else {
        return;
    };
    let d = a
        .client
        .get_guest_details(ctx(), &pb::Empty::new())
        .unwrap();
    assert!(d.pid1, "the agent is PID 1 of its namespace");
    let (out, err, status) = a.run("p1", &["sh", "-c", "echo hi"]);
    assert_eq!(out, "hi\n", "stderr: {err}");
    assert_eq!(status, 0);
    let agent_pid = common::children_of(a.pid())[0];
    assert_eq!(
        common::children_of(agent_pid),
        Vec::<i32>::new(),
        "no zombie left"
    );
    a.client
        .destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new())
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = a.try_exit() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "agent still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        status.signal() == Some(libc::SIGHUP) || status.code() == Some(128 + libc::SIGHUP),
        "ended by reboot(2): {status:?}"
    );
    let mut marker = String::new();
    std::io::Read::read_to_string(&mut a.child.stdout.take().unwrap(), &mut marker).unwrap();
    assert!(
        marker.starts_with("HUSK_GUEST_READY release="),
        "{marker:?}"
    );
    drop(a);
    // The agent's base group, named as the agent saw it.
    std::fs::remove_dir(cg.join("husk")).unwrap();
    let _ = std::fs::remove_dir(cg.join("agent"));
    std::fs::remove_dir(&cg).unwrap();
}

#[test]
fn pod_containers_share_the_sandbox_namespaces() {
    let Some(a) = TestAgent::start() else { return };
    a.create("pause", &["sleep", "100"]);
    a.start_c("pause").unwrap();
    let ns = "for n in net ipc uts pid mnt; do readlink /proc/self/ns/$n; done";
    a.exec("pause", "ns", &["sh", "-c", ns], false).unwrap();
    a.close_stdin("pause", "ns");
    let first: Vec<String> = a
        .read_all("pause", "ns", false)
        .lines()
        .map(String::from)
        .collect();
    let mut r = pb::CreateContainerRequest::new();
    r.container_id = "app".into();
    r.oci_spec_json = serde_json::to_vec(&common::spec(&["sh", "-c", ns])).unwrap();
    r.set_rootfs_path(common::rootfs());
    r.join_sandbox_namespaces = true;
    a.client.create_container(ctx(), &r).unwrap();
    a.close_stdin("app", "");
    a.start_c("app").unwrap();
    let second: Vec<String> = a
        .read_all("app", "", false)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(first.len(), 5, "{first:?}");
    assert_eq!(first[..3], second[..3], "net, ipc, uts shared");
    assert_ne!(first[3], second[3], "own pid namespace");
    assert_ne!(first[4], second[4], "own mount namespace");
    assert_eq!(a.wait("app", ""), 0);
    a.remove("app", false).unwrap();
    a.remove("pause", true).unwrap();
}

/// The log goes to whoever connects to the log socket.
#[test]
fn log_lines_reach_a_connected_listener() {
    let log_sock = common::scratch().join(format!("husk-agent-log-{}.sock", std::process::id()));
    let log_arg = format!("unix://{}", log_sock.display());
    let Some(a) = TestAgent::start_with(|agent, sock, cgroup_parent| {
        let mut c = std::process::Command::new(agent);
        c.arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .args(["--log-listen", &log_arg])
            .args(["--cgroup-parent", cgroup_parent])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    }) else {
        return;
    };
    let conn = std::os::unix::net::UnixStream::connect(&log_sock).unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(conn.try_clone().unwrap()));
    // The agent registers the connection in its own time: log something
    // until a line arrives.
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut i = 0;
    loop {
        a.run(&format!("probe{i}"), &["true"]);
        i += 1;
        if let Some(Ok(_)) = lines.next() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no log line");
    }
    conn.set_read_timeout(None).unwrap();
    a.run("logged", &["true"]);
    let got: Vec<String> = lines
        .map(|l| l.unwrap())
        .skip_while(|l| !l.contains("logged"))
        .take(3)
        .collect();
    assert_eq!(
        got,
        [
            "husk-agent: container logged created",
            "husk-agent: container logged started",
            "husk-agent: container logged removed"
        ]
    );
    let _ = std::fs::remove_file(&log_sock);
}

/// A container's program and an exec start with fds 0, 1 and 2 only, even
/// when the agent holds an fd without CLOEXEC (here one it inherited as
/// fd 7, which every child of the agent inherits in turn).
#[test]
fn programs_start_with_stdio_only() {
    let Some(a) = TestAgent::start_with(|agent, sock, cgroup_parent| {
        let mut c = std::process::Command::new(agent);
        c.arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--cgroup-parent")
            .arg(cgroup_parent)
            .stdout(std::process::Stdio::null());
        // SAFETY: dup2 is async-signal-safe and allocates nothing; fd 7
        // comes without CLOEXEC.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, || {
                if libc::dup2(2, 7) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }) else {
        return;
    };
    // The shell's own fds, listed by a child (no pipe of the shell's
    // open meanwhile; not the last command, so the shell does not exec it).
    let fds = "ls /proc/$$/fd; exit 0";
    let (out, err, status) = a.run("c", &["sh", "-c", fds]);
    assert_eq!((out.as_str(), status), ("0\n1\n2\n", 0), "{err}");
    a.create("d", &["sleep", "100"]);
    a.start_c("d").unwrap();
    a.exec("d", "e", &["sh", "-c", fds], false).unwrap();
    a.close_stdin("d", "e");
    assert_eq!(a.read_all("d", "e", false), "0\n1\n2\n");
    assert_eq!(a.wait("d", "e"), 0);
    a.signal("d", "", libc::SIGKILL, false).unwrap();
    a.wait("d", "");
    a.remove("d", false).unwrap();
}

/// The container's cgroup gets a device filter (cgroup v2, BPF): runc's
/// defaults are open, any other device only if linux.resources.devices
/// allows it. Major 240 is unassigned: opening it when allowed fails with
/// ENXIO (no driver), when denied by the filter with EPERM.
#[test]
fn devices_are_filtered_by_the_cgroup() {
    let Some(a) = TestAgent::start() else { return };
    let run = |id: &str, rules: serde_json::Value| {
        let mut s = common::spec(&[
            "sh",
            "-c",
            "head -c 1 /dev/zero | wc -c; cat /dev/husk-test 2>&1; true",
        ]);
        s["linux"]["devices"] = serde_json::json!([
            {"path": "/dev/husk-test", "type": "c", "major": 240, "minor": 0, "fileMode": 438}
        ]);
        s["linux"]["resources"]["devices"] = rules;
        a.create_spec(id, &s).unwrap();
        a.close_stdin(id, "");
        a.start_c(id).unwrap();
        let out = a.read_all(id, "", false);
        assert_eq!(a.wait(id, ""), 0);
        a.remove(id, false).unwrap();
        out
    };
    let out = run(
        "deny",
        serde_json::json!([{"allow": false, "access": "rwm"}]),
    );
    assert!(out.starts_with("1\n"), "/dev/zero is a default: {out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let out = run(
        "allow",
        serde_json::json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 240, "minor": 0, "access": "r"}
        ]),
    );
    assert!(out.contains("No such device or address"), "{out}");
    let (c, _) = common::code(a.create_spec("bad", &{
        let mut s = common::spec(&["true"]);
        s["linux"]["resources"]["devices"] = serde_json::json!([{"allow": true, "access": "x"}]);
        s
    }));
    assert_eq!(c, Code::INVALID_ARGUMENT);
}

/// A container on a shared rootfs (`rootfs_shared`): the agent finds it at
/// guest::shared_rootfs(id), here a bind of the test bundle's rootfs at
/// /run/husk/shared/<id>/rootfs standing for the virtio-fs share, runs on
/// it, and leaves it mounted (the host owns it) after RemoveContainer.
#[test]
fn runs_a_container_on_a_shared_rootfs() {
    let Some(a) = TestAgent::start() else { return };
    let id = format!("shared-{}", std::process::id());
    let dir = std::path::PathBuf::from(husk_protocols::guest::SHARED_DIR).join(&id);
    let root = std::path::PathBuf::from(husk_protocols::guest::shared_rootfs(&id));
    std::fs::create_dir_all(&root).unwrap();
    rustix::mount::mount_bind(common::rootfs().as_str(), &root).unwrap();
    let mut r = pb::CreateContainerRequest::new();
    r.container_id = id.clone();
    r.oci_spec_json = serde_json::to_vec(&common::spec(&[
        "sh",
        "-c",
        "echo on-shared; ls /bin/busybox",
    ]))
    .unwrap();
    r.set_rootfs_shared(pb::SharedRootfs::new());
    let created = a.client.create_container(ctx(), &r);
    let result = created.map(|_| {
        a.close_stdin(&id, "");
        a.start_c(&id).unwrap();
        let out = a.read_all(&id, "", false);
        let status = a.wait(&id, "");
        a.remove(&id, false).unwrap();
        (out, status)
    });
    let still_mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == root.to_str());
    let _ = rustix::mount::unmount(&root, rustix::mount::UnmountFlags::DETACH);
    let _ = std::fs::remove_dir(&root);
    let _ = std::fs::remove_dir(&dir);
    // Only if empty: another test's may be there. The same for its parent
    // (/run/husk), which this test made on the host if nothing had.
    let shared = std::path::Path::new(husk_protocols::guest::SHARED_DIR);
    let _ = std::fs::remove_dir(shared);
    if let Some(parent) = shared.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    let (out, status) = result.unwrap();
    assert_eq!(out, "on-shared\n/bin/busybox\n");
    assert_eq!(status, 0);
    assert!(still_mounted, "the agent unmounted the host's rootfs");
}
