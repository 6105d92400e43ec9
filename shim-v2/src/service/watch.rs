//! The threads that watch the guest for the shim: one waiter per started
//! process (its exit, then its output), the VMM's end, and the guest's OOM
//! kills; and the publisher of the sandbox's metrics file
//! (`crate::metrics`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::coalesce::{Coalescer, Pacer, Verdict};
use super::registry::Inner;
use crate::events::Event;
use crate::io::DRAIN_IDLE;
use crate::metrics::{Publisher, TICK};
use crate::process::{exit_status, Process, EXIT_VM_GONE};
use crate::sandbox::Sandbox;
use crate::sync::lock;

/// How long a waiter retries a broken agent connection while the VMM runs.
const WAIT_RETRY_LIMIT: Duration = Duration::from_secs(30);
/// At most one TaskOOM per container per interval; the rest are counted.
const OOM_INTERVAL: Duration = Duration::from_secs(1);
/// Most OOM events a second the shim takes from the guest at all.
const OOM_EVENTS_PER_SEC: u32 = 50;

/// Waits for a started process's exit in the guest, then for its output,
/// then reports it.
pub fn spawn_waiter(inner: Arc<Inner>, sb: Arc<Sandbox>, p: Arc<Process>) {
    let name = format!(
        "wait-{}",
        p.container_id.get(..8).unwrap_or(&p.container_id)
    );
    let inner2 = inner.clone();
    let p2 = p.clone();
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let (inner, p) = (inner2, p2);
        let status = wait_in_guest(&sb, &p);
        let at = SystemTime::now();
        if let Some(pumps) = p.pumps() {
            pumps.wait_outputs(DRAIN_IDLE);
        }
        let _started = lock(&p.starting);
        inner.report_exit(&p, status, at);
    });
    if let Err(e) = spawned {
        log::error!("starting a waiter thread: {e}");
        inner.report_exit(&p, EXIT_VM_GONE, SystemTime::now());
    }
}

/// The process's exit status, or EXIT_VM_GONE once the guest cannot say.
fn wait_in_guest(sb: &Sandbox, p: &Process) -> u32 {
    let mut failing_since: Option<Instant> = None;
    loop {
        match sb.agent.wait_process(&p.container_id, &p.exec_id) {
            Ok(s) => return exit_status(s),
            Err(e) => {
                if sb.is_dead() {
                    return EXIT_VM_GONE;
                }
                if e.code().is_some() {
                    log::warn!("waiting for {}/{}: {e}", p.container_id, p.exec_id);
                    return EXIT_VM_GONE;
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > WAIT_RETRY_LIMIT {
                    log::error!(
                        "waiting for {}/{}: {e}; giving up",
                        p.container_id,
                        p.exec_id
                    );
                    return EXIT_VM_GONE;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Watches a newly booted sandbox: its VMM's end and its OOM kills.
pub fn watch_sandbox(inner: &Arc<Inner>, sb: &Arc<Sandbox>) {
    let weak = Arc::downgrade(inner);
    let sb_id = sb.id.clone();
    let sb_weak = Arc::downgrade(sb);
    sb.on_exit(move |status| {
        let diag = sb_weak
            .upgrade()
            .map(|s| s.diagnostics())
            .unwrap_or_default();
        if let Some(inner) = weak.upgrade() {
            inner.vm_ended(&sb_id, &status, &diag);
        }
    });
    spawn_oom_watcher(inner.clone(), sb.clone());
    spawn_publisher(inner, sb.clone());
}

/// Publishes the sandbox's metrics file every [`TICK`] until the VM or the
/// shim ends.
fn spawn_publisher(inner: &Arc<Inner>, sb: Arc<Sandbox>) {
    let weak = Arc::downgrade(inner);
    let mut publisher = Publisher::default();
    let spawned = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || loop {
            if sb.is_dead() {
                return;
            }
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let known: Vec<String> = lock(&inner.state).containers.keys().cloned().collect();
            drop(inner);
            publisher.tick(&sb, &known, Instant::now());
            std::thread::sleep(TICK);
        });
    if let Err(e) = spawned {
        log::warn!("starting the metrics publisher: {e}");
    }
}

/// Reports the guest's OOM kills as TaskOOM: at most one per container per
/// [`OOM_INTERVAL`], and no more than [`OOM_EVENTS_PER_SEC`] taken from
/// the guest, so that a flood from the agent floods neither containerd nor
/// the shim.
fn spawn_oom_watcher(inner: Arc<Inner>, sb: Arc<Sandbox>) {
    let mut coalescer = Coalescer::new(OOM_INTERVAL);
    let mut pacer = Pacer::new(OOM_EVENTS_PER_SEC);
    let spawned = std::thread::Builder::new()
        .name("oom".into())
        .spawn(move || loop {
            if sb.is_dead() {
                return;
            }
            match sb.agent.oom_event() {
                Ok(id) => {
                    let known = lock(&inner.state).containers.contains_key(&id);
                    if known {
                        // Counted before the coalescing: every event.
                        sb.stats.oom.heard(&id);
                        match coalescer.admit(&id, Instant::now()) {
                            Verdict::Send { suppressed } => {
                                log::info!(
                                    "container {id}: OOM kill in the guest ({suppressed} more since the last reported, {} in all not reported)",
                                    coalescer.suppressed_total()
                                );
                                inner.events.send(Event::Oom { id });
                            }
                            Verdict::Drop => {}
                        }
                    }
                    let wait = pacer.took(Instant::now());
                    if !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                }
                Err(e) => {
                    if sb.is_dead() {
                        return;
                    }
                    log::debug!("OOM events: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("starting the OOM watcher: {e}");
    }
}
