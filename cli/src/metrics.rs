//! `husk metrics`: the sandboxes' figures in Prometheus's text exposition
//! format (version 0.0.4). Every per-sandbox series carries the labels
//! `sandbox_id`, `pod` and `namespace` (the pod's; empty outside
//! Kubernetes). [`METRICS`] is the documented list.
//!
//! The VMM's figures come from procfs and its control socket; what only
//! the shim sees (the guest's memory use, agent request latencies, OOM
//! kills) from the shim's metrics file (`husk_runtime_config::metrics`),
//! left out when that file is missing, corrupt or stale
//! (`husk_sandbox_metrics_file_ok` says which).

use std::fmt::Write;

use husk_vm_config::control::GuestFaultKind;

use crate::sandboxes::Sandbox;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric: (name, type, help). The per-sandbox ones start with
/// `husk_sandbox_`.
pub const METRICS: &[(&str, &str, &str)] = &[
    ("husk_sandboxes", "gauge", "Sandbox state folders on this host."),
    ("husk_sandboxes_running", "gauge", "Sandboxes whose VMM process runs."),
    ("husk_sandbox_vmm_up", "gauge", "1 if the sandbox's VMM runs and answered its control socket, else 0."),
    ("husk_sandbox_vmm_resident_memory_bytes", "gauge", "Resident memory of the VMM process: guest memory touched plus the VMM's own."),
    ("husk_sandbox_vmm_cpu_seconds_total", "counter", "CPU time (user and system) of the VMM process, its vCPUs included."),
    ("husk_sandbox_vcpus", "gauge", "vCPUs of the VM."),
    ("husk_sandbox_guest_memory_bytes", "gauge", "Memory the VM was given (what its guest may use at most)."),
    ("husk_sandbox_start_time_seconds", "gauge", "When the VMM started, in Unix time."),
    ("husk_sandbox_boot_seconds", "gauge", "Time from the start of the sandbox to an answering agent."),
    ("husk_sandbox_containers", "gauge", "Containers in the sandbox (its own included)."),
    ("husk_sandbox_guest_faults_total", "counter", "Faults the guest caused in the VMM, by kind (mmio, unmapped, queue, request, device, console)."),
    ("husk_sandbox_guest_fault_logs_suppressed_total", "counter", "Log lines about guest faults the VMM's rate limit suppressed, by kind."),
    ("husk_sandbox_console_bytes_total", "counter", "Bytes of guest console output written to console.log."),
    ("husk_sandbox_console_dropped_bytes_total", "counter", "Bytes of guest console output dropped, by reason (rate: the rate limit, cap: console.log's size cap)."),
    ("husk_sandbox_vmm_log_bytes_total", "counter", "Bytes the VMM wrote to vmm.log."),
    ("husk_sandbox_vmm_log_dropped_lines_total", "counter", "vmm.log lines dropped after its size cap."),
    ("husk_sandbox_metrics_file_ok", "gauge", "1 if the shim's metrics file (metrics.json) was read and is fresh; else 0, and the guest memory, agent request and OOM series of the sandbox are left out."),
    ("husk_sandbox_guest_memory_used_bytes", "gauge", "Memory the guest uses (MemTotal less MemAvailable), as the guest reports it, bounded by the VM's memory."),
    ("husk_sandbox_guest_memory_available_bytes", "gauge", "Memory the guest can still have (MemAvailable), as the guest reports it, bounded by the VM's memory."),
    ("husk_sandbox_agent_request_duration_seconds", "histogram", "Time the shim's requests to the agent took, by method (the waits on guest processes not included)."),
    ("husk_sandbox_agent_request_errors_total", "counter", "The shim's requests to the agent that failed (error status or no answer), by method."),
    ("husk_sandbox_container_oom_kills_total", "counter", "Processes the guest's OOM killer killed in the container (its cgroup's oom_kill, at least the OOM events the agent reported)."),
];

/// A label value escaped as the text format wants.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The text exposition of `sandboxes` (read with their control status).
pub fn render(sandboxes: &[Sandbox]) -> String {
    // (family, suffix, labels, value): a histogram's samples are its
    // family's name with _bucket, _sum and _count.
    let mut samples: Vec<(&str, &str, String, f64)> = Vec::new();
    #[allow(clippy::cast_precision_loss)] // counts and bytes below 2^53
    let f = |v: u64| v as f64;
    samples.push((
        "husk_sandboxes",
        "",
        String::new(),
        f(sandboxes.len() as u64),
    ));
    samples.push((
        "husk_sandboxes_running",
        "",
        String::new(),
        f(sandboxes.iter().filter(|s| s.running).count() as u64),
    ));
    for s in sandboxes {
        let base = format!(
            "sandbox_id=\"{}\",pod=\"{}\",namespace=\"{}\"",
            escape(&s.id),
            escape(s.pod.as_deref().unwrap_or("")),
            escape(s.pod_namespace.as_deref().unwrap_or(""))
        );
        let up = s.running && s.status.is_some();
        samples.push(("husk_sandbox_vmm_up", "", base.clone(), f(u64::from(up))));
        let mut push_with =
            |name: &'static str, suffix: &'static str, extra: &str, v: Option<f64>| {
                if let Some(v) = v {
                    let labels = if extra.is_empty() {
                        base.clone()
                    } else {
                        format!("{base},{extra}")
                    };
                    samples.push((name, suffix, labels, v));
                }
            };
        let mut push =
            |name: &'static str, extra: &str, v: Option<f64>| push_with(name, "", extra, v);
        push(
            "husk_sandbox_vmm_resident_memory_bytes",
            "",
            s.rss_bytes.map(f),
        );
        push("husk_sandbox_vmm_cpu_seconds_total", "", s.cpu_seconds);
        push("husk_sandbox_vcpus", "", s.vcpus.map(|v| f(v.into())));
        push(
            "husk_sandbox_guest_memory_bytes",
            "",
            s.memory_mib.map(|m| f(m << 20)),
        );
        push("husk_sandbox_start_time_seconds", "", s.started_unix_secs);
        push("husk_sandbox_boot_seconds", "", s.boot_seconds);
        push(
            "husk_sandbox_containers",
            "",
            Some(f(s.containers.len() as u64)),
        );
        if let Some(c) = s.status.as_ref().and_then(|st| st.counters.as_ref()) {
            for kind in GuestFaultKind::ALL {
                let n = c.guest_faults.get(&kind).copied().unwrap_or_default();
                let k = format!("kind=\"{}\"", kind.as_str());
                push("husk_sandbox_guest_faults_total", &k, Some(f(n.events)));
                push(
                    "husk_sandbox_guest_fault_logs_suppressed_total",
                    &k,
                    Some(f(n.suppressed)),
                );
            }
            push(
                "husk_sandbox_console_bytes_total",
                "",
                Some(f(c.console.written_bytes)),
            );
            push(
                "husk_sandbox_console_dropped_bytes_total",
                "reason=\"rate\"",
                Some(f(c.console.dropped_rate_bytes)),
            );
            push(
                "husk_sandbox_console_dropped_bytes_total",
                "reason=\"cap\"",
                Some(f(c.console.dropped_cap_bytes)),
            );
            push(
                "husk_sandbox_vmm_log_bytes_total",
                "",
                Some(f(c.log.written_bytes)),
            );
            push(
                "husk_sandbox_vmm_log_dropped_lines_total",
                "",
                Some(f(c.log.dropped_lines)),
            );
        }
        if s.running {
            push(
                "husk_sandbox_metrics_file_ok",
                "",
                Some(f(u64::from(s.metrics.is_some()))),
            );
        }
        let Some(m) = s.metrics.as_ref() else {
            continue;
        };
        if let Some(g) = m.guest_memory {
            push(
                "husk_sandbox_guest_memory_used_bytes",
                "",
                Some(f(g.used_bytes())),
            );
            push(
                "husk_sandbox_guest_memory_available_bytes",
                "",
                Some(f(g.available_bytes)),
            );
        }
        for (method, r) in &m.agent_requests {
            let method = format!("method=\"{}\"", escape(method));
            const HIST: &str = "husk_sandbox_agent_request_duration_seconds";
            for (bound, n) in r.durations.cumulative() {
                let le = if bound.is_infinite() {
                    "+Inf".to_string()
                } else {
                    bound.to_string()
                };
                push_with(
                    HIST,
                    "_bucket",
                    &format!("{method},le=\"{le}\""),
                    Some(f(n)),
                );
            }
            push_with(HIST, "_sum", &method, Some(r.durations.sum));
            push_with(HIST, "_count", &method, Some(f(r.durations.count())));
            push_with(
                "husk_sandbox_agent_request_errors_total",
                "",
                &method,
                Some(f(r.errors)),
            );
        }
        for (id, n) in &m.container_oom_kills {
            push_with(
                "husk_sandbox_container_oom_kills_total",
                "",
                &format!("container_id=\"{}\"", escape(id)),
                Some(f(*n)),
            );
        }
    }
    let mut out = String::new();
    for (name, kind, help) in METRICS {
        let mine: Vec<_> = samples.iter().filter(|(n, ..)| n == name).collect();
        if mine.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (_, suffix, labels, v) in mine {
            if labels.is_empty() {
                let _ = writeln!(out, "{name}{suffix} {v}");
            } else {
                let _ = writeln!(out, "{name}{suffix}{{{labels}}} {v}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandboxes::VmmStatus;
    use husk_runtime_config::metrics::{GuestMemory, RequestStats, SandboxMetrics};
    use husk_vm_config::control::{FaultCount, VmCounters, VmState};

    fn shim_metrics() -> SandboxMetrics {
        let mut m = SandboxMetrics {
            written_unix_ms: 1,
            vm_memory_bytes: 256 << 20,
            guest_memory: Some(GuestMemory::clamped(240 << 20, 200 << 20, 256 << 20, 1)),
            ..SandboxMetrics::default()
        };
        let mut r = RequestStats::default();
        r.durations.observe(0.002);
        r.durations.observe(0.3);
        r.errors = 1;
        m.agent_requests.insert("CreateContainer".into(), r);
        m.container_oom_kills.insert("c1".into(), 3);
        m
    }

    fn sandbox(id: &str, pod: Option<&str>) -> Sandbox {
        let mut counters = VmCounters::default();
        counters.guest_faults.insert(
            GuestFaultKind::Mmio,
            FaultCount {
                events: 5,
                suppressed: 2,
            },
        );
        counters.console.written_bytes = 100;
        Sandbox {
            id: id.into(),
            dir: "/x".into(),
            namespace: Some("k8s.io".into()),
            pod: pod.map(String::from),
            pod_namespace: pod.map(|_| "default".into()),
            vmm_pid: Some(10),
            running: true,
            vcpus: Some(2),
            memory_mib: Some(256),
            rss_bytes: Some(1 << 20),
            cpu_seconds: Some(1.5),
            uptime_seconds: Some(3.0),
            started_unix_secs: Some(1.7e9),
            boot_seconds: Some(0.5),
            containers: vec![id.into()],
            status: Some(VmmStatus {
                state: Some(VmState::Running),
                counters: Some(counters),
            }),
            metrics: Some(shim_metrics()),
        }
    }

    #[test]
    fn every_metric_appears_for_a_running_sandbox_with_its_labels() {
        let text = render(&[sandbox("a", Some("we\"b")), sandbox("b", None)]);
        for (name, kind, _) in METRICS {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name}\n{text}"
            );
        }
        assert!(text.contains("husk_sandbox_vmm_resident_memory_bytes{sandbox_id=\"a\",pod=\"we\\\"b\",namespace=\"default\"} 1048576\n"), "{text}");
        assert!(text.contains("husk_sandbox_guest_faults_total{sandbox_id=\"b\",pod=\"\",namespace=\"\",kind=\"mmio\"} 5\n"), "{text}");
        assert!(text.contains("husk_sandbox_guest_memory_bytes{sandbox_id=\"b\",pod=\"\",namespace=\"\"} 268435456\n"), "{text}");
        assert!(text.contains("husk_sandboxes 2\n"), "{text}");
        // Names follow the conventions: counters end in _total, units are
        // base units.
        for (name, kind, _) in METRICS {
            assert!(name.starts_with("husk_"));
            assert_eq!(*kind == "counter", name.ends_with("_total"), "{name}");
        }
    }

    #[test]
    fn the_shims_figures_come_out_histograms_cumulative() {
        let text = render(&[sandbox("a", None)]);
        let l = "sandbox_id=\"a\",pod=\"\",namespace=\"\"";
        for line in [
            format!("husk_sandbox_metrics_file_ok{{{l}}} 1"),
            format!("husk_sandbox_guest_memory_used_bytes{{{l}}} 41943040"),
            format!("husk_sandbox_guest_memory_available_bytes{{{l}}} 209715200"),
            format!("husk_sandbox_agent_request_duration_seconds_bucket{{{l},method=\"CreateContainer\",le=\"0.001\"}} 0"),
            format!("husk_sandbox_agent_request_duration_seconds_bucket{{{l},method=\"CreateContainer\",le=\"0.0025\"}} 1"),
            format!("husk_sandbox_agent_request_duration_seconds_bucket{{{l},method=\"CreateContainer\",le=\"0.25\"}} 1"),
            format!("husk_sandbox_agent_request_duration_seconds_bucket{{{l},method=\"CreateContainer\",le=\"0.5\"}} 2"),
            format!("husk_sandbox_agent_request_duration_seconds_bucket{{{l},method=\"CreateContainer\",le=\"+Inf\"}} 2"),
            format!("husk_sandbox_agent_request_duration_seconds_sum{{{l},method=\"CreateContainer\"}} 0.302"),
            format!("husk_sandbox_agent_request_duration_seconds_count{{{l},method=\"CreateContainer\"}} 2"),
            format!("husk_sandbox_agent_request_errors_total{{{l},method=\"CreateContainer\"}} 1"),
            format!("husk_sandbox_container_oom_kills_total{{{l},container_id=\"c1\"}} 3"),
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line}\n{text}");
        }
        assert!(text.contains("# TYPE husk_sandbox_agent_request_duration_seconds histogram\n"));
        // A histogram's samples sit together: its +Inf bucket, _sum and
        // _count follow each other.
        let inf = text.find("le=\"+Inf\"").unwrap();
        let sum = text.find("duration_seconds_sum").unwrap();
        let count = text.find("duration_seconds_count").unwrap();
        assert!(inf < sum && sum < count);
    }

    #[test]
    fn without_the_shims_file_the_rest_still_comes_out() {
        let mut s = sandbox("a", None);
        s.metrics = None;
        let text = render(&[s]);
        assert!(
            text.contains(
                "husk_sandbox_metrics_file_ok{sandbox_id=\"a\",pod=\"\",namespace=\"\"} 0\n"
            ),
            "{text}"
        );
        assert!(text.contains("husk_sandbox_vmm_resident_memory_bytes{"));
        for gone in [
            "husk_sandbox_guest_memory_used_bytes",
            "husk_sandbox_agent_request",
            "husk_sandbox_container_oom_kills_total",
        ] {
            assert!(!text.contains(gone), "{gone}\n{text}");
        }
    }

    #[test]
    fn a_dead_vmm_is_down_and_has_no_figures() {
        let mut s = sandbox("a", None);
        s.running = false;
        s.status = None;
        s.rss_bytes = None;
        s.metrics = None;
        let text = render(&[s]);
        assert!(
            text.contains("husk_sandbox_vmm_up{sandbox_id=\"a\",pod=\"\",namespace=\"\"} 0\n"),
            "{text}"
        );
        assert!(
            !text.contains("husk_sandbox_vmm_resident_memory_bytes"),
            "{text}"
        );
        assert!(text.contains("husk_sandboxes_running 0\n"), "{text}");
    }
}
