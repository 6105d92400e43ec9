//! `husk-vmm`: the KVM micro-VM monitor.
//!
//! `husk-vmm --config vm.json [--log-format text|json] [--log-level info]`
//! runs the VM the config describes until the guest resets or powers off
//! (exit 0), a control-socket shutdown completes (exit 0), or something
//! fails (exit 1, with the reason logged). A thread that makes a system
//! call outside its seccomp filter ends the VMM with exit status 159
//! (`seccomp::BAD_SYSCALL_EXIT_CODE`), the call named in the log.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use husk_vm_config::VmConfig;
use husk_vmm::builder::build_vm;
use husk_vmm::seccomp::{Filters, ThreadKind};
use husk_vmm::snapshot::{self, SnapshotSource};
use husk_vmm::vstate::vcpu::{self, ExitReason};
use husk_vmm::{logger, signals, vmm};

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Parser)]
#[command(name = "husk-vmm", version, about = "husk's KVM micro-VM monitor")]
struct Args {
    /// The VM description (JSON).
    #[arg(long)]
    config: PathBuf,
    /// Start from the snapshot in this folder (written by the control
    /// socket's `snapshot`) instead of booting: the config gives the host
    /// side (disks, sockets, console) and must have the snapshot's shape.
    #[arg(long, value_name = "DIR", conflicts_with = "restore_fds")]
    restore: Option<PathBuf>,
    /// Like --restore, from inherited open files: "STATE_FD,MEMORY_FD",
    /// the snapshot's state and memory files opened (read-only) by the
    /// caller, for a VMM that may not open them itself.
    #[arg(long, value_name = "STATE_FD,MEMORY_FD")]
    restore_fds: Option<String>,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log level or tracing filter (e.g. "info", "husk_vmm=debug").
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Run without seccomp filters: for debugging a missing system call
    /// only, never in production.
    #[arg(long)]
    no_seccomp: bool,
    /// Count the vCPUs' exits by kind and port or address, and log the
    /// counts when each vCPU stops (for boot profiling).
    #[arg(long)]
    exit_stats: bool,
}

fn init_logging(args: &Args) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("bad --log-level {:?}", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logger::log_file::CappedStderr)
        .with_thread_names(true);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn run(args: &Args) -> anyhow::Result<ExitReason> {
    let config = VmConfig::from_file(&args.config)?;
    logger::configure(&config);
    signals::install_termination_handler()?;
    if args.exit_stats {
        husk_vmm::vstate::exit_stats::enable();
    }
    let filters = if args.no_seccomp {
        tracing::warn!(
            "--no-seccomp: the VMM runs WITHOUT seccomp filters; a guest that \
             compromises it can make any system call. For debugging only."
        );
        None
    } else {
        Some(Arc::new(Filters::new(vcpu::kick_signal())?))
    };
    let source = match (&args.restore, &args.restore_fds) {
        (Some(dir), _) => Some(SnapshotSource::folder(dir)?),
        (None, Some(fds)) => {
            let (state, memory) = snapshot::parse_fds(fds)?;
            Some(SnapshotSource::fds(state, memory)?)
        }
        (None, None) => None,
    };
    let mut built =
        build_vm(&config, filters.as_ref(), source.as_ref()).context("cannot start the VM")?;
    // After the vCPU threads are spawned (they have their own filter) and
    // before the event loop first serves the guest.
    if let Some(filters) = &filters {
        filters.install(ThreadKind::Main)?;
    }
    let reason = vmm::run(&built.vmm, &mut built.event_manager)?;
    // Dropping the VMM removes the control socket.
    drop(built);
    Ok(reason)
}

/// The error and its causes on one line. The VMM's errors already name
/// their source in their message, so causes already shown are skipped.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut prev = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if prev.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
        prev = msg;
    }
    out
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = init_logging(&args) {
        eprintln!("husk-vmm: {e:#}");
        return ExitCode::from(2);
    }
    let result = run(&args);
    // Why the VMM stopped is logged even past the log's cap.
    logger::log_file::LOG.closing();
    match result {
        Ok(ExitReason::Error(e)) => {
            tracing::error!("VM stopped on an error: {e}");
            ExitCode::from(1)
        }
        Ok(reason) => {
            tracing::info!("VM stopped: {reason:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}
