//! The debug console (ExecGuest) on the host, the agent an ordinary
//! process (see common/mod.rs): refused until CreateSandbox enables it,
//! then processes in the agent's own namespaces with pipes or a terminal,
//! their exit statuses, and the bound on how many run at once.

mod common;

use common::{ctx, TestAgent};
use husk_protocols::agent as pb;
use husk_protocols::ttrpc::Code;

fn exec(a: &TestAgent, id: &str, args: &[&str], terminal: bool) -> (Code, String) {
    let mut r = pb::ExecGuestRequest::new();
    r.exec_id = id.into();
    r.args = args.iter().map(|s| (*s).to_string()).collect();
    r.env = vec!["TERM=dumb".into()];
    r.terminal = terminal;
    r.rows = 27;
    r.columns = 91;
    match a.client.exec_guest(ctx(), &r) {
        Ok(_) => (Code::OK, String::new()),
        Err(e) => common::code(Err(e)),
    }
}

fn sandbox(a: &TestAgent, debug_console: bool) {
    let mut r = pb::CreateSandboxRequest::new();
    r.hostname = "pod".into();
    r.debug_console = debug_console;
    a.client.create_sandbox(ctx(), &r).unwrap();
}

#[test]
fn refused_unless_create_sandbox_enabled_it() {
    let Some(a) = TestAgent::start() else { return };
    let (c, msg) = exec(&a, "x", &["true"], false);
    assert_eq!(c, Code::PERMISSION_DENIED, "before CreateSandbox: {msg}");
    sandbox(&a, false);
    let (c, msg) = exec(&a, "x", &["true"], false);
    assert_eq!(c, Code::PERMISSION_DENIED);
    assert!(msg.contains("debug_console"), "{msg}");
    // No process record either.
    let mut r = pb::ProcessRequest::new();
    r.exec_id = "x".into();
    let e = a.client.wait_process(ctx(), &r).unwrap_err();
    assert!(e.to_string().contains("NOT_FOUND"), "{e}");
}

#[test]
fn runs_in_the_guest_with_pipes_and_a_terminal() {
    let Some(a) = TestAgent::start() else { return };
    sandbox(&a, true);
    // Pipes: stdout, stderr and the exit code apart.
    let (c, msg) = exec(
        &a,
        "u",
        &["sh", "-c", "uname -r; echo err >&2; exit 3"],
        false,
    );
    assert_eq!(c, Code::OK, "{msg}");
    assert_eq!(
        a.read_all("", "u", false).trim(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );
    assert_eq!(a.read_all("", "u", true), "err\n");
    assert_eq!(a.wait("", "u"), 3);
    // Waited: the record stays (the output after the exit can still be
    // read; the status waited again) and the id stays taken.
    assert_eq!(a.wait("", "u"), 3);
    assert_eq!(a.read_all("", "u", false), "");
    assert_eq!(exec(&a, "u", &["true"], false).0, Code::ALREADY_EXISTS);

    // A terminal, with the window the request gave, then a resize; the
    // env reaches it with PATH defaulted; it runs as root in "/".
    let (c, msg) = exec(
        &a,
        "t",
        &[
            "sh",
            "-c",
            "stty size; read x; stty size; echo $x $TERM $PATH $(id -u) $PWD; exit 5",
        ],
        true,
    );
    assert_eq!(c, Code::OK, "{msg}");
    let mut w = pb::TtyWinResizeRequest::new();
    w.exec_id = "t".into();
    w.row = 40;
    w.column = 120;
    // Let the first stty run before the resize.
    std::thread::sleep(std::time::Duration::from_millis(300));
    a.client.tty_win_resize(ctx(), &w).unwrap();
    a.write_stdin("", "t", b"hello\n");
    let out = a.read_all("", "t", false);
    assert!(out.contains("27 91"), "{out:?}");
    assert!(out.contains("40 120"), "{out:?}");
    assert!(
        out.contains("hello dumb /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin 0 /"),
        "{out:?}"
    );
    assert_eq!(a.wait("", "t"), 5);
}

#[test]
fn bounded_and_validated() {
    let Some(a) = TestAgent::start() else { return };
    sandbox(&a, true);
    for (id, args) in [("bad/id", &["true"][..]), ("", &["true"]), ("ok", &[])] {
        let (c, msg) = exec(&a, id, args, false);
        assert_eq!(c, Code::INVALID_ARGUMENT, "{id:?} {args:?}: {msg}");
    }
    let (c, msg) = exec(&a, "nope", &["/no/such/program"], false);
    assert_eq!(c, Code::INVALID_ARGUMENT, "{msg}");
    for i in 0..4 {
        let (c, msg) = exec(&a, &format!("s{i}"), &["sleep", "100"], false);
        assert_eq!(c, Code::OK, "{msg}");
    }
    let (c, _) = exec(&a, "s0", &["true"], false);
    assert_eq!(c, Code::ALREADY_EXISTS);
    let (c, msg) = exec(&a, "s4", &["true"], false);
    assert_eq!(c, Code::RESOURCE_EXHAUSTED, "{msg}");
    // A killed one (128 + SIGKILL) leaves its slot to a new one...
    a.signal("", "s0", libc::SIGKILL, false).unwrap();
    assert_eq!(a.wait("", "s0"), 128 + libc::SIGKILL);
    let (c, msg) = exec(&a, "s4", &["sleep", "100"], false);
    assert_eq!(c, Code::OK, "{msg}");
    let mut r = pb::ProcessRequest::new();
    r.exec_id = "s0".into();
    assert!(a.client.wait_process(ctx(), &r).is_err(), "s0 was dropped");
    // ... waited or not.
    a.signal("", "s1", libc::SIGKILL, false).unwrap();
    let start = std::time::Instant::now();
    loop {
        let (c, msg) = exec(&a, "s5", &["true"], false);
        if c == Code::OK {
            break;
        }
        assert_eq!(c, Code::RESOURCE_EXHAUSTED, "{msg}");
        assert!(start.elapsed().as_secs() < 5, "the slot was not freed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // DestroySandbox kills them all.
    let debug = a.cgroup_base().join("_debug");
    assert!(!std::fs::read_to_string(debug.join("cgroup.procs"))
        .unwrap()
        .trim()
        .is_empty());
    a.client
        .destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new())
        .unwrap();
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(debug.join("cgroup.procs"))
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(start.elapsed().as_secs() < 5, "debug processes survived");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
