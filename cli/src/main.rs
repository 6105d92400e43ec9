//! `husk`: the node operator's command for husk, the VM-isolated container
//! runtime. It reads what the shim leaves on the node (the runtime
//! configuration, each sandbox's state folder) and never changes it; `husk
//! exec` talks to a guest's agent, where the configuration allows it.

mod check;
mod containerd;
mod exec;
mod http;
mod kvm;
mod logs;
mod metrics;
mod procfs;
mod sandboxes;
mod settings;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

const AFTER_HELP: &str = "\
The configuration is the file the shim reads: --config, else the environment
variable HUSK_CONFIG, else the ConfigPath containerd's configuration gives the
io.containerd.husk.v2 runtime, else /etc/husk/configuration.toml.
Sandboxes are the folders under its state_dir (default /run/husk).

Exit status: 0 on success; 1 on an error, or when `husk check` finds a FAIL;
`husk exec` exits with the guest process's status.";

const EXEC_HELP: &str = "\
The command runs in the guest itself, not in a container: in the guest's own
namespaces (its root is the agent's tmpfs, with busybox's applets in /bin and
/sbin; containers' root file systems are under /run/husk), as root with
every capability, in the working directory /, with the environment PATH,
HOME=/ and, with a terminal, the local TERM. At most 4 run in a guest at
once.

Only where the configuration says debug_console = true: husk exec refuses
otherwise, naming the key, and so does the guest's agent, which the shim
tells at the sandbox's start (a sandbox started before the change refuses
too).

Terminal: with -t, or when stdin and stdout are both terminals, the command
gets a terminal in the guest; the local one is put in raw mode (every key,
^C and ^D included, goes to the guest) and restored when the session ends,
also on an error or a signal; its window size goes along and follows
SIGWINCH. Without a terminal, stdout and stderr stay apart and the end of
stdin closes the command's stdin. SIGINT, SIGTERM, SIGHUP and SIGQUIT sent
to husk exec are passed on to the command; a second one, or one the guest
does not take, ends husk exec at once (its terminal restored, exit 128+N).

Exit status: the command's exit code; 128+N when signal N killed it; 1 when
husk exec itself fails (refused, no such sandbox, the agent unreachable).

Examples:
  husk exec 3f2a                  an interactive shell (/bin/sh) in the guest
  husk exec 3f2a uname -r         the guest kernel's release
  husk exec 3f2a -- ps -o pid,args
  husk exec 3f2a cat /proc/meminfo > guest-meminfo.txt";

/// husk: check a node, show the configuration, list the sandboxes, read
/// their logs and serve their metrics.
#[derive(Debug, Parser)]
#[command(name = "husk", version, after_help = AFTER_HELP)]
struct Cli {
    /// The husk configuration file to read.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// containerd's configuration (read for the husk runtime's ConfigPath,
    /// and by `husk check`).
    #[arg(long, global = true, value_name = "FILE", default_value = containerd::DEFAULT_CONFIG)]
    containerd_config: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Can this host run husk? One line per check: OK, WARN or FAIL, with
    /// the reason and the fix.
    ///
    /// Checks /dev/kvm (that it opens and creates VMs, and that it is
    /// hardware virtualization: a software /dev/kvm such as PVM's cannot
    /// run a Linux guest), /dev/net/tun, /dev/vhost-vsock (not needed), the
    /// cgroup layout and its controllers, containerd's version and whether
    /// its configuration names io.containerd.husk.v2, the shim on PATH, and
    /// the VMM, kernel, initramfs and mkfs.erofs the configuration names.
    /// Exits 1 if any check FAILs.
    #[command(
        after_help = "Example:\n  husk check\n  husk check --json | jq '.checks[] | select(.status == \"FAIL\")'"
    )]
    Check {
        /// Print the report as JSON: {"ok": bool, "checks": [{name, status, reason, fix}]}.
        #[arg(long)]
        json: bool,
    },
    /// The effective configuration: every key, its value and where it came
    /// from (the file's path, or "default").
    Env {
        /// Print JSON: {"config_file", "config_file_origin", "entries": [{key, value, origin}]}.
        #[arg(long)]
        json: bool,
    },
    /// The sandboxes on this host: id, pod and its namespace (from the CRI
    /// annotations), VMM pid, vCPUs, memory, the VMM's resident memory,
    /// uptime and containers.
    Ps {
        /// Print a JSON array of sandboxes.
        #[arg(long)]
        json: bool,
    },
    /// A sandbox's logs: the VMM's (vmm.log) and the guest console's
    /// (console.log, kept when the configuration sets debug_console = true).
    Logs {
        /// The sandbox id (or a prefix only one sandbox has).
        sandbox: String,
        /// Only the VMM's log.
        #[arg(long, conflicts_with = "console")]
        vmm: bool,
        /// Only the guest console.
        #[arg(long)]
        console: bool,
        /// Only the last N lines of each.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
    },
    /// A command in a sandbox's guest, outside any container (a debug
    /// console; needs debug_console = true).
    #[command(after_help = EXEC_HELP)]
    Exec {
        /// The sandbox id (or a prefix only one sandbox has).
        sandbox: String,
        /// Give the command a terminal (the default when stdin and stdout
        /// are terminals).
        #[arg(short = 't', long, conflicts_with = "no_tty")]
        tty: bool,
        /// Never give the command a terminal.
        #[arg(short = 'T', long)]
        no_tty: bool,
        /// The command and its arguments (default /bin/sh); a program
        /// without '/' is looked up in the guest's PATH.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Serve the sandboxes' metrics in Prometheus's text format on
    /// http://ADDR/metrics (one scrape at a time), or print them once.
    ///
    /// Per sandbox (labels sandbox_id, pod, namespace): husk_sandbox_vmm_up,
    /// _vmm_resident_memory_bytes, _vmm_cpu_seconds_total, _vcpus,
    /// _guest_memory_bytes, _start_time_seconds, _boot_seconds, _containers,
    /// _guest_faults_total{kind}, _guest_fault_logs_suppressed_total{kind},
    /// _console_bytes_total, _console_dropped_bytes_total{reason},
    /// _vmm_log_bytes_total, _vmm_log_dropped_lines_total; and from the
    /// shim's metrics file (metrics.json in the state folder, rewritten at
    /// least every 10 s): _guest_memory_used_bytes,
    /// _guest_memory_available_bytes, _agent_request_duration_seconds
    /// (histogram){method}, _agent_request_errors_total{method},
    /// _container_oom_kills_total{container_id}. A missing, corrupt or stale
    /// (over 60 s old) file leaves those out and sets
    /// husk_sandbox_metrics_file_ok to 0. Per host: husk_sandboxes,
    /// husk_sandboxes_running.
    Metrics {
        /// The address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
        listen: String,
        /// Print the metrics to stdout once and exit.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let containerd_path = containerd::read_config(&cli.containerd_config)
        .ok()
        .and_then(|c| c.husk_handlers.into_iter().find_map(|h| h.config_path))
        .map(|p| (p, cli.containerd_config.clone()));
    let env = std::env::var(husk_runtime_config::config::ENV_VAR).ok();
    let chosen = settings::choose(cli.config.as_deref(), env.as_deref(), containerd_path);
    let effective = settings::effective(chosen);
    match cli.command {
        Cmd::Check { json } => {
            let host = check::Host {
                containerd_config: cli.containerd_config.clone(),
                ..check::Host::default()
            };
            let checks = check::run(&host, effective.as_ref().map_err(|e| e.to_string()));
            let ok = !checks.iter().any(|c| c.status == check::Status::Fail);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"ok": ok, "checks": checks}))?
                );
            } else {
                for c in &checks {
                    println!("{:<5} {:<18} {}", c.status.to_string(), c.name, c.reason);
                    if let Some(fix) = &c.fix {
                        println!("{:<24} fix: {fix}", "");
                    }
                }
            }
            if !ok {
                std::process::exit(1);
            }
        }
        Cmd::Env { json } => {
            let e = effective?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "config_file": e.chosen.path,
                        "config_file_origin": e.chosen.origin.to_string(),
                        "config_file_exists": e.file_exists,
                        "entries": e.entries,
                    }))?
                );
            } else {
                println!(
                    "# configuration file: {} (from {}){}",
                    e.chosen.path.display(),
                    e.chosen.origin,
                    if e.file_exists {
                        ""
                    } else {
                        ", absent: all defaults"
                    }
                );
                for x in &e.entries {
                    println!("{} = {:<40} # {}", x.key, x.value, x.origin);
                }
            }
        }
        Cmd::Ps { json } => {
            let e = effective?;
            let all = sandboxes::list(&e.config.state_dir, false)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_ps(&all);
            }
        }
        Cmd::Logs {
            sandbox,
            vmm,
            console,
            tail,
        } => {
            let e = effective?;
            let sb = sandboxes::find(&e.config.state_dir, &sandbox, false)?;
            let which = logs::Which {
                vmm: vmm || !console,
                console: console || !vmm,
            };
            let stdout = std::io::stdout();
            logs::show(&sb.dir, which, tail, &mut stdout.lock())?;
        }
        Cmd::Exec {
            sandbox,
            tty,
            no_tty,
            command,
        } => {
            let e = effective?;
            if !e.config.debug_console {
                return Err(exec::ExecError::Disabled {
                    config: e.chosen.path.display().to_string(),
                }
                .into());
            }
            let sb = sandboxes::find(&e.config.state_dir, &sandbox, false)?;
            if !sb.running {
                return Err(exec::ExecError::NotRunning(sb.id).into());
            }
            let req = exec::Request {
                sandbox_id: &sb.id,
                args: command,
                tty: match (tty, no_tty) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
            };
            let code = exec::run(req, &sb.dir)?;
            std::process::exit(code);
        }
        Cmd::Metrics { listen, once } => {
            let e = effective?;
            let state_dir = e.config.state_dir.clone();
            let render = move || match sandboxes::list(&state_dir, true) {
                Ok(all) => metrics::render(&all),
                Err(err) => {
                    eprintln!("husk metrics: {err}");
                    metrics::render(&[])
                }
            };
            if once {
                std::io::stdout()
                    .write_all(render().as_bytes())
                    .context("writing the metrics")?;
            } else {
                let listener = http::bind(&listen)?;
                eprintln!("husk metrics: serving http://{listen}/metrics");
                http::serve(&listener, &render);
                bail!("the metrics server stopped");
            }
        }
    }
    Ok(())
}

fn print_ps(all: &[sandboxes::Sandbox]) {
    let dash = || "-".to_string();
    println!(
        "{:<14} {:<24} {:<8} {:>5} {:>9} {:>9} {:>9}  CONTAINERS",
        "SANDBOX", "POD", "PID", "VCPUS", "MEMORY", "RSS", "UPTIME"
    );
    for s in all {
        let pod = match (&s.pod_namespace, &s.pod) {
            (Some(ns), Some(p)) => format!("{ns}/{p}"),
            _ => dash(),
        };
        let pid = match (s.vmm_pid, s.running) {
            (Some(p), true) => p.to_string(),
            (Some(_), false) => "gone".into(),
            (None, _) => dash(),
        };
        println!(
            "{:<14} {:<24} {:<8} {:>5} {:>9} {:>9} {:>9}  {}",
            s.id.chars().take(13).collect::<String>(),
            pod,
            pid,
            s.vcpus.map_or_else(dash, |v| v.to_string()),
            s.memory_mib.map_or_else(dash, |m| format!("{m}MiB")),
            s.rss_bytes.map_or_else(dash, |r| format!("{}MiB", r >> 20)),
            s.uptime_seconds.map_or_else(dash, human_duration),
            s.containers
                .iter()
                .map(|c| c.chars().take(13).collect::<String>())
                .collect::<Vec<_>>()
                .join(",")
        );
    }
}

fn human_duration(secs: f64) -> String {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // an uptime, >= 0
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}
