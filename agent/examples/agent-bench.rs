//! Benchmark: create + start + wait (+ remove) of a container running
//! `true` through husk-agent, against `runc run` of the same bundle, one
//! after the other in one run; then the agent's resident memory when idle.
//!
//!   agent-bench AGENT_BINARY BUNDLE_DIR [ITERATIONS]
//!
//! Run by tests/agent/bench.sh, which builds the static release agent and
//! the busybox bundle.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocols::agent as pb;
use husk_protocols::agent_ttrpc::AgentServiceClient;
use husk_protocols::ttrpc::{context, Client};

fn ctx() -> context::Context {
    context::with_timeout(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `<cgroup2 mount>/<name>`, the agent's base group.
fn cgroup2_base(name: &str) -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2"))
            .then(|| {
                pre.split_whitespace()
                    .nth(4)
                    .map(|m| Path::new(m).join(name))
            })
            .flatten()
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        anyhow::bail!("usage: agent-bench AGENT_BINARY BUNDLE_DIR [ITERATIONS]");
    }
    let (agent_bin, bundle) = (&args[1], Path::new(&args[2]));
    let n: u32 = args.get(3).map_or(Ok(20), |s| s.parse())?;
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    spec["process"]["args"] = serde_json::json!(["true"]);
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    let spec_json = serde_json::to_vec(&spec)?;
    let rootfs = bundle.join("rootfs").canonicalize()?;

    let sock = std::env::temp_dir().join(format!("husk-agent-bench-{}.sock", std::process::id()));
    let mut agent = Command::new(agent_bin)
        .args(["--listen", &format!("unix://{}", sock.display())])
        .args(["--cgroup-parent", "husk-bench"])
        .stdout(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    let client = loop {
        if let Ok(c) = Client::connect(&format!("unix://{}", sock.display())) {
            break AgentServiceClient::new(c);
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "agent did not listen"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(Duration::from_millis(200));
    let idle_rss = rss_kib(agent.id());

    let one_agent = |i: u32| -> anyhow::Result<Duration> {
        let id = format!("bench-{i}");
        let t = Instant::now();
        let mut c = pb::CreateContainerRequest::new();
        c.container_id = id.clone();
        c.oci_spec_json = spec_json.clone();
        c.set_rootfs_path(rootfs.to_string_lossy().into_owned());
        client.create_container(ctx(), &c)?;
        let mut s = pb::ContainerRequest::new();
        s.container_id = id.clone();
        client.start_container(ctx(), &s)?;
        let mut w = pb::ProcessRequest::new();
        w.container_id = id.clone();
        let st = client.wait_process(ctx(), &w)?.status;
        anyhow::ensure!(st == 0, "agent: true exited {st}");
        let mut r = pb::RemoveContainerRequest::new();
        r.container_id = id;
        client.remove_container(ctx(), &r)?;
        Ok(t.elapsed())
    };
    let one_runc = |i: u32| -> anyhow::Result<Duration> {
        let t = Instant::now();
        let st = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(format!("husk-bench-runc-{}-{i}", std::process::id()))
            .stdin(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "runc run: {st}");
        Ok(t.elapsed())
    };
    // Warm both up (page cache, first cgroup creation), then alternate so
    // that neither gets a quieter machine.
    one_agent(u32::MAX)?;
    one_runc(u32::MAX)?;
    let (mut ta, mut tr) = (Vec::new(), Vec::new());
    for i in 0..n {
        ta.push(one_agent(i)?);
        tr.push(one_runc(i)?);
    }
    let busy_rss = rss_kib(agent.id());
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    // v holds one time per iteration, and n is a u32.
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / u32::try_from(v.len()).unwrap();
    let (ma, mr) = (med(&mut ta), med(&mut tr));
    println!("iterations:             {n}");
    println!(
        "husk-agent create+start+wait+remove of `true`: median {:.2} ms, mean {:.2} ms",
        ma.as_secs_f64() * 1e3,
        mean(&ta).as_secs_f64() * 1e3
    );
    println!(
        "runc run of the same bundle:                 median {:.2} ms, mean {:.2} ms",
        mr.as_secs_f64() * 1e3,
        mean(&tr).as_secs_f64() * 1e3
    );
    println!(
        "ratio runc/agent (median): {:.2}x (agent {})",
        mr.as_secs_f64() / ma.as_secs_f64(),
        if ma < mr { "faster" } else { "slower" }
    );
    println!(
        "agent idle RSS: {idle_rss} KiB ({:.2} MiB); after the runs: {busy_rss} KiB",
        idle_rss as f64 / 1024.0
    );
    let _ = client.destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new());
    let _ = agent.wait();
    let _ = std::fs::remove_file(&sock);
    if let Some(base) = cgroup2_base("husk-bench") {
        let _ = std::fs::remove_dir(base);
    }
    Ok(())
}
