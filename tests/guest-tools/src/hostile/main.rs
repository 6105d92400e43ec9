//! `husk-hostile`: a hostile guest for the VMM, run as root in the test
//! initramfs (`husk.test=hostile`, tests/scenarios/vmm-hostile.sh). It
//! attacks the VMM through everything a guest kernel can touch, in phases,
//! each bounded in time, printing `HUSK_TEST hostile <phase> ...` lines:
//!
//! - vsock:  connects to the host (CID 2) until refused, holding them open,
//!   and sends up to vsock_fill bytes on each (the host does not read)
//! - mmio:   unbinds every virtio-mmio device's driver and writes garbage
//!   to every register offset at every width, through /dev/mem
//! - queues: initializes each device by hand and submits descriptor chains
//!   that loop, overlap, point outside RAM or are huge; rings outside RAM
//! - rebind: gives the devices back to their drivers (a reset and a fresh
//!   probe: shows the VMM's devices survived) and reads the hwrng
//! - serial: writes up to serial_bytes of garbage to COM1 (/dev/port, or
//!   /dev/ttyS0 without it)
//!
//! Usage: `husk-hostile [key=value]...` with keys phases (comma list, in
//! the order above), mmio_secs, queue_secs (per device), vsock_port,
//! vsock_max, vsock_secs, vsock_fill, serial_secs, serial_bytes, seed,
//! start_delay (seconds to wait after the start line, for the host's
//! baseline).

mod arena;
mod mmio;
mod queues;
mod rng;
mod serial;
mod vsock;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use rng::Rng;

/// The virtio device id of vsock.
const VIRTIO_ID_VSOCK: u32 = 19;

struct Options {
    phases: Vec<String>,
    mmio_secs: u64,
    queue_secs: u64,
    vsock_port: u32,
    vsock_max: usize,
    vsock_secs: u64,
    vsock_fill: u64,
    start_delay: u64,
    serial_secs: u64,
    serial_bytes: u64,
    seed: u64,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut kv = HashMap::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("{a:?}: expected key=value"))?;
        kv.insert(k.to_string(), v.to_string());
    }
    let num = |k: &str, default: u64| -> Result<u64, String> {
        kv.get(k).map_or(Ok(default), |v| {
            v.parse().map_err(|e| format!("{k}={v}: {e}"))
        })
    };
    let seed_default = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() ^ u64::from(d.subsec_nanos()));
    let known = [
        "phases",
        "mmio_secs",
        "queue_secs",
        "vsock_port",
        "vsock_max",
        "vsock_secs",
        "vsock_fill",
        "start_delay",
        "serial_secs",
        "serial_bytes",
        "seed",
    ];
    if let Some(k) = kv.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown option {k:?}"));
    }
    Ok(Options {
        phases: kv
            .get("phases")
            .map_or("vsock,mmio,queues,rebind,serial", String::as_str)
            .split(',')
            .map(str::to_string)
            .collect(),
        mmio_secs: num("mmio_secs", 10)?,
        queue_secs: num("queue_secs", 5)?,
        vsock_port: u32::try_from(num("vsock_port", 7000)?).map_err(|e| e.to_string())?,
        vsock_max: usize::try_from(num("vsock_max", 1024)?).map_err(|e| e.to_string())?,
        vsock_secs: num("vsock_secs", 60)?,
        vsock_fill: num("vsock_fill", 256 << 10)?,
        start_delay: num("start_delay", 0)?,
        serial_secs: num("serial_secs", 20)?,
        serial_bytes: num("serial_bytes", 100 << 20)?,
        seed: num("seed", seed_default)?,
    })
}

/// Reads 16 bytes of /dev/hwrng, giving up after `limit` (a broken device
/// would block the read for ever; the reader thread dies with the process).
fn hwrng(limit: Duration) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut b = [0u8; 16];
        let r = std::fs::File::open("/dev/hwrng").and_then(|mut f| f.read_exact(&mut b));
        let _ = tx.send(r.map(|()| b.iter().map(|x| format!("{x:02x}")).collect::<String>()));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(hex)) => format!("ok:{hex}"),
        Ok(Err(e)) => format!("error:{}", e.to_string().replace(' ', "_")),
        Err(_) => "timeout".to_string(),
    }
}

/// The tool unbinds drivers and scribbles on devices: it runs only in a
/// guest booted for it.
fn booted_for_it() -> bool {
    std::fs::read_to_string("/proc/cmdline").is_ok_and(|c| {
        c.split_whitespace().any(|w| {
            w.strip_prefix("husk.test=")
                .is_some_and(|t| t.split(',').any(|t| t == "hostile"))
        })
    })
}

/// Lets the VMM's console rate limit refill after the kernel's own messages
/// (driver unbinds, unhandled interrupts), so a result line gets through.
fn settle() {
    std::thread::sleep(Duration::from_millis(1500));
}

fn run(o: &Options) -> Result<(), String> {
    if !booted_for_it() {
        return Err("refusing to run: the kernel command line has no husk.test=hostile".into());
    }
    let has = |p: &str| o.phases.iter().any(|x| x == p);
    let mut rng = Rng::new(o.seed);
    let layout = mmio::layout().map_err(|e| e.to_string())?;
    println!(
        "HUSK_TEST hostile start seed={} devices={} ram_end={:#x} phases={}",
        o.seed,
        layout.devices.len(),
        layout.ram_end,
        o.phases.join(",")
    );
    // Time for the host to take its baseline.
    std::thread::sleep(Duration::from_secs(o.start_delay));

    // Held until the tool exits, through every later phase.
    let mut _held = Vec::new();
    if has("vsock") {
        let start = Instant::now();
        let f = vsock::flood(
            o.vsock_port,
            o.vsock_max,
            8,
            start + Duration::from_secs(o.vsock_secs),
        );
        let sent = vsock::fill(
            &f.held,
            o.vsock_fill,
            start + Duration::from_secs(o.vsock_secs),
        );
        println!(
            "HUSK_TEST hostile vsock connected={} failed={} first_error={} sent={sent} secs={:.1}",
            f.held.len(),
            f.failed,
            f.first_error
                .map_or("none".to_string(), |e| e.to_string().replace(' ', "_")),
            start.elapsed().as_secs_f64()
        );
        _held = f.held;
    }

    let touch = has("mmio") || has("queues") || has("rebind");
    let mut windows = Vec::new();
    if touch {
        for d in &layout.devices {
            // husk's vsock device cannot be reset: unbound, it would go on
            // writing into the rings its driver freed (pages this tool may
            // then hold). Its registers get garbage from part 1's guest.
            let w = mmio::Window::map(d.base).map_err(|e| e.to_string())?;
            if w.is_virtio() && w.r32(8) == VIRTIO_ID_VSOCK {
                println!("HUSK_TEST hostile device {} base={:#x} id={VIRTIO_ID_VSOCK} kept bound (no reset)", d.name, d.base);
                continue;
            }
            let driver = mmio::unbind(d).map_err(|e| e.to_string())?;
            if !w.is_virtio() {
                return Err(format!(
                    "{} at {:#x} does not answer as virtio-mmio",
                    d.name, d.base
                ));
            }
            settle();
            println!(
                "HUSK_TEST hostile device {} base={:#x} id={} unbound={}",
                d.name,
                d.base,
                w.r32(8),
                driver.unwrap_or_else(|| "none".to_string())
            );
            windows.push(w);
        }
    }

    if has("mmio") {
        let start = Instant::now();
        let s = mmio::garbage(
            &windows,
            &mut rng,
            layout.ram_end,
            start + Duration::from_secs(o.mmio_secs),
        )?;
        settle();
        println!(
            "HUSK_TEST hostile mmio devices={} writes={} reads={} rounds={} secs={:.1}",
            windows.len(),
            s.writes,
            s.reads,
            s.rounds,
            start.elapsed().as_secs_f64()
        );
    }

    if has("queues") {
        let start = Instant::now();
        let s = queues::run(
            &windows,
            layout.ram_end,
            &mut rng,
            Duration::from_secs(o.queue_secs),
        )
        .map_err(|e| format!("queues: {e}"))?;
        settle();
        println!(
            "HUSK_TEST hostile queues devices={} activated={} refused={} outside_rings_refused={} chains={} notifies={} used={} secs={:.1}",
            s.devices,
            s.activated,
            s.refused,
            s.outside_rings_refused,
            s.chains,
            s.notifies,
            s.used,
            start.elapsed().as_secs_f64()
        );
    }

    if has("rebind") {
        let mut bound = Vec::new();
        for (d, w) in layout.devices.iter().zip(&windows) {
            // Only a device that takes a reset gets its driver back: the
            // driver's probe assumes one.
            w.w32(0x70, 0);
            let state = if w.r32(0x70) != 0 {
                "no-reset".to_string()
            } else {
                match mmio::rebind(d) {
                    Ok(true) => "bound".to_string(),
                    Ok(false) => "unbound".to_string(),
                    Err(e) => format!("error:{}", e.to_string().replace(' ', "_")),
                }
            };
            bound.push(format!("{}={state}", d.name));
        }
        drop(windows);
        settle();
        println!(
            "HUSK_TEST hostile rebind {} hwrng={}",
            bound.join(" "),
            hwrng(Duration::from_secs(10))
        );
    }

    if has("serial") {
        let deadline = Instant::now() + Duration::from_secs(o.serial_secs);
        let s = serial::flood("/dev/ttyS0", o.serial_bytes, deadline, &mut rng)
            .map_err(|e| format!("serial: {e}"))?;
        // Let the VMM's console rate limit refill before the result line.
        std::thread::sleep(Duration::from_secs(2));
        let secs = s.elapsed.as_secs_f64();
        println!(
            "\nHUSK_TEST hostile serial bytes={} via={} secs={secs:.1} rate={:.0}",
            s.bytes,
            s.via,
            s.bytes as f64 / secs.max(0.001)
        );
    }
    println!("HUSK_TEST hostile done");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = options(&args).and_then(|o| run(&o));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("HUSK_TEST hostile FAILED {e}");
            ExitCode::FAILURE
        }
    }
}
