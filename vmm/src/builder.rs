//! Turns a validated [`VmConfig`] into a running VM: guest memory, the KVM
//! VM, legacy devices, virtio devices, the kernel, and the vCPU threads.

use std::sync::{Arc, Mutex};

use event_manager::{MutEventSubscriber, SubscriberOps};
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::{self, BootInfo};
use crate::arch::x86_64::layout::{
    I8042_IRQ, I8042_PORT, I8042_PORT_LEN, IRQ_MAX, SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN,
    VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::{cpuid, mptable, BootProtocol};
use crate::control::{ControlError, ControlServer};
use crate::devices::bus::{Bus, BusError, SharedBusDevice};
use crate::devices::legacy::i8042::I8042Device;
use crate::devices::legacy::serial::{self, SerialDevice, SerialFlusher, SerialStdin};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::{Block, BlockConfig};
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::persist::PersistError as TransportPersistError;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{GuestMemory, IrqTrigger, VirtioDevice};
use crate::loader::{self, LoaderError};
use crate::rate_limiter::RateLimiter;
use crate::seccomp::Filters;
use crate::snapshot::{SnapshotError, SnapshotSource, SnapshotState, VmShape};
use crate::vmm::{EventManager, Subscriber, VmResources, Vmm};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::persist::{self, PersistError};
use crate::vstate::vcpu::{self, ExitSignal, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use husk_vm_config::{SerialOutput, VmConfig};

/// Most CPUID entries asked of KVM_GET_SUPPORTED_CPUID.
const KVM_MAX_CPUID_ENTRIES: usize = 256;
/// Offset of the virtio-mmio QueueNotify register.
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// Errors building the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot place {what} on its bus: {source}")]
    Bus {
        what: &'static str,
        #[source]
        source: BusError,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot open serial output {target}: {source}")]
    SerialOutput {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read KVM's supported CPUID: {0}")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error("no virtio-mmio slot left: IRQs {VIRTIO_IRQ_START}..={IRQ_MAX} are all used")]
    NoMmioSlot,
    #[error("cannot announce virtio-mmio device at {base:#x} on the command line: {source}")]
    VirtioCmdline {
        base: u64,
        #[source]
        source: linux_loader::cmdline::Error,
    },
    #[error("cannot set up {what}: {source}")]
    Device {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("event loop: {0}")]
    EventManager(#[from] event_manager::Error),
    #[error("cannot restore: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore: {0}")]
    Persist(#[from] PersistError),
    #[error("cannot restore {device}: {source}")]
    DeviceRestore {
        device: String,
        #[source]
        source: TransportPersistError,
    },
    #[error("cannot restore the serial port: {0}")]
    SerialRestore(String),
    #[error("cannot restore: {0}")]
    RestoreRefused(String),
}

/// A virtio-mmio transport as the bus and the snapshot code share it.
pub type SharedTransport = Arc<Mutex<MmioTransport>>;

/// A VM ready to run: the VMM and its event loop.
pub struct BuiltVm {
    pub vmm: Arc<Mutex<Vmm>>,
    pub event_manager: EventManager,
}

/// Hands out virtio-mmio windows (4 KiB from 0xd000_0000) and IRQs (from 5).
#[derive(Debug)]
pub struct MmioSlots {
    next: u32,
}

impl MmioSlots {
    pub fn new() -> Self {
        Self { next: 0 }
    }

    /// The next (base address, IRQ) pair.
    pub fn allocate(&mut self) -> Result<(u64, u32), BuildError> {
        let irq = VIRTIO_IRQ_START + self.next;
        if irq > IRQ_MAX {
            return Err(BuildError::NoMmioSlot);
        }
        let base = VIRTIO_MMIO_START + u64::from(self.next) * VIRTIO_MMIO_SIZE;
        self.next += 1;
        Ok((base, irq))
    }
}

impl Default for MmioSlots {
    fn default() -> Self {
        Self::new()
    }
}

/// What attaching virtio devices needs: the VM (irqfd/ioeventfd), guest
/// memory, the MMIO bus, the kernel command line, the event loop (device
/// back ends subscribe to it) and the slot allocator.
pub struct VirtioContext<'a> {
    pub vm: &'a Vm,
    pub mem: &'a GuestMemory,
    pub mmio_bus: &'a mut Bus,
    pub cmdline: &'a mut Cmdline,
    pub event_manager: &'a mut EventManager,
    pub slots: &'a mut MmioSlots,
}

impl VirtioContext<'_> {
    /// Places one virtio-mmio transport: allocates its window and IRQ, puts
    /// it on the MMIO bus, registers each queue's notify eventfd as an
    /// ioeventfd on QueueNotify (datamatch = queue index) and `irq_evt` as
    /// the irqfd of its IRQ, and announces it on the command line.
    /// Returns (base address, IRQ).
    pub fn add_mmio_device(
        &mut self,
        transport: SharedBusDevice,
        queue_notify: &[EventFd],
        irq_evt: &EventFd,
    ) -> Result<(u64, u32), BuildError> {
        let (base, irq) = self.slots.allocate()?;
        self.mmio_bus
            .insert(transport, base, VIRTIO_MMIO_SIZE)
            .map_err(|source| BuildError::Bus {
                what: "virtio-mmio device",
                source,
            })?;
        for (index, evt) in (0u32..).zip(queue_notify) {
            self.vm
                .register_mmio_ioevent(evt, base + VIRTIO_MMIO_QUEUE_NOTIFY, index)?;
        }
        self.vm.register_irqfd(irq_evt, irq)?;
        self.cmdline
            .add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(base), irq, None)
            .map_err(|source| BuildError::VirtioCmdline { base, source })?;
        Ok((base, irq))
    }
}

/// The virtio devices attached: their transports in attach order, and the
/// balloon, whose counters the status reports.
pub struct Attached {
    pub transports: Vec<SharedTransport>,
    pub balloon: Option<Arc<Mutex<Balloon>>>,
}

/// Attaches the config's virtio devices (block, net, fs, vsock, rng, balloon), each behind
/// its own virtio-mmio transport placed with [`VirtioContext::add_mmio_device`].
pub fn attach_virtio_devices(
    config: &VmConfig,
    ctx: &mut VirtioContext<'_>,
) -> Result<Attached, BuildError> {
    let mut attached = Vec::new();
    // Block devices first, in config order, so the guest names them
    // vda, vdb, ... as the description lists them.
    for b in &config.block {
        let what = || format!("block[{}]", b.id);
        let limiter =
            RateLimiter::new(b.rate_limiter.as_ref()).map_err(|e| device_error(what(), e))?;
        let block = Block::new(BlockConfig {
            path: b.path.clone(),
            read_only: b.read_only,
            serial: b.serial.clone(),
        })
        .map_err(|e| device_error(what(), e))?
        .with_rate_limiter(limiter);
        attached.push(attach(ctx, block, "virtio-blk")?);
    }
    for n in &config.net {
        let what = || format!("net[{}]", n.id);
        let rx =
            RateLimiter::new(n.rx_rate_limiter.as_ref()).map_err(|e| device_error(what(), e))?;
        let tx =
            RateLimiter::new(n.tx_rate_limiter.as_ref()).map_err(|e| device_error(what(), e))?;
        let net = Net::new(&n.tap, n.mac)
            .map_err(|e| device_error(what(), e))?
            .with_rate_limiters(rx, tx);
        attached.push(attach(ctx, net, "virtio-net")?);
    }
    for f in &config.fs {
        let fs = Fs::new(f).map_err(|e| device_error(format!("fs[{}]", f.tag), e))?;
        attached.push(attach(ctx, fs, "virtio-fs")?);
    }
    if let Some(v) = &config.vsock {
        let vsock = Vsock::new(u64::from(v.guest_cid), v.uds_path.clone())
            .map_err(|e| device_error("vsock".to_string(), e))?;
        attached.push(attach(ctx, vsock, "virtio-vsock")?);
    }
    if config.rng {
        let rng = Rng::new().map_err(|e| device_error("rng".to_string(), e))?;
        attached.push(attach(ctx, rng, "virtio-rng")?);
    }
    let mut balloon = None;
    if let Some(b) = &config.balloon {
        let device = Balloon::new(b.free_page_reporting)
            .map_err(|e| device_error("balloon".to_string(), e))?;
        let device = Arc::new(Mutex::new(device));
        attached.push(attach_shared(ctx, device.clone(), "virtio-balloon")?);
        balloon = Some(device);
    }
    Ok(Attached {
        transports: attached,
        balloon,
    })
}

fn device_error(what: String, e: impl std::error::Error + Send + Sync + 'static) -> BuildError {
    BuildError::Device {
        what,
        source: Box::new(e),
    }
}

/// Puts `device` behind a virtio-mmio transport on the bus and subscribes
/// it to the event loop: the transport and the event loop share one device.
fn attach<D>(
    ctx: &mut VirtioContext<'_>,
    device: D,
    kind: &'static str,
) -> Result<SharedTransport, BuildError>
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    attach_shared(ctx, Arc::new(Mutex::new(device)), kind)
}

/// [`attach`] of a device the caller keeps a handle to.
fn attach_shared<D>(
    ctx: &mut VirtioContext<'_>,
    device: Arc<Mutex<D>>,
    kind: &'static str,
) -> Result<SharedTransport, BuildError>
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    let irq = Arc::new(IrqTrigger::new(eventfd()?));
    let transport = MmioTransport::new(ctx.mem.clone(), device.clone(), irq.clone())
        .map_err(|e| device_error(kind.to_string(), e))?;
    let notify = transport
        .queue_notify_events()
        .iter()
        .map(EventFd::try_clone)
        .collect::<Result<Vec<_>, _>>()
        .map_err(BuildError::EventFd)?;
    let transport = Arc::new(Mutex::new(transport));
    let (base, irq_line) = ctx.add_mmio_device(transport.clone(), &notify, irq.irq_evt())?;
    ctx.event_manager.add_subscriber(device);
    tracing::info!(
        device = kind,
        base = format_args!("{base:#x}"),
        irq = irq_line,
        "virtio device attached"
    );
    Ok(transport)
}

/// Why this VM can never be snapshotted, whatever its devices say.
fn snapshot_refusal(config: &VmConfig, msrs_known: bool) -> Option<String> {
    if config.hugepages {
        return Some(
            "guest memory is on huge pages, which a restore cannot map copy-on-write".into(),
        );
    }
    if !msrs_known {
        return Some("KVM did not list the vCPUs' saveable MSRs".into());
    }
    None
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)
}

/// Builds and starts the VM `config` describes. With `seccomp`, each vCPU
/// thread installs its filter before it enters the guest; the caller
/// installs the main thread's once this returns.
///
/// With `restore`, a snapshot's open files ([`SnapshotSource`]): the VM
/// takes the snapshot's memory, vCPU, interrupt controller, clock and
/// device state instead of booting the kernel; `config` gives the host side
/// (disks, sockets, console) and must have the snapshot's shape. Memory is
/// the snapshot file mapped copy-on-write, except with a virtio-fs device:
/// virtiofsd maps guest RAM by fd, so the file's data is copied into a
/// fresh shared memfd (the clones then share no pages).
pub fn build_vm(
    config: &VmConfig,
    seccomp: Option<&Arc<Filters>>,
    restore: Option<&SnapshotSource>,
) -> Result<BuiltVm, BuildError> {
    let shape = VmShape::of(config);
    let started = std::time::Instant::now();
    let snapshot = match restore {
        Some(source) => {
            let state = SnapshotState::read_source(source)?;
            state.shape.check(&shape)?;
            if config.hugepages {
                return Err(BuildError::RestoreRefused(
                    "a restored VM's memory is its snapshot file mapped copy-on-write, \
                     not huge pages: set hugepages to false"
                        .into(),
                ));
            }
            Some(state)
        }
        None => None,
    };
    let mem = match restore {
        Some(source) if config.fs.is_empty() => {
            persist::restore_memory(&source.memory, &source.memory_name, config.memory_mib)?
        }
        Some(source) => {
            persist::restore_memory_shared(&source.memory, &source.memory_name, config.memory_mib)?
        }
        None => {
            // A vhost-user backend (virtiofsd) maps guest RAM itself: it
            // must be a shared memfd then; otherwise it stays private.
            let backing = if config.fs.is_empty() {
                memory::Backing::Private
            } else {
                memory::Backing::SharedMemfd
            };
            memory::create(config.memory_mib, config.hugepages, backing)?
        }
    };
    // How long a restore spent on the snapshot's files (the state read and
    // checked, the memory mapped or copied), for its log line.
    let files_ms = started.elapsed().as_millis();
    let vm = Vm::new()?;
    vm.register_memory(&mem)?;
    let mut event_manager = EventManager::new()?;

    // Legacy devices on the port I/O bus.
    let mut pio_bus = Bus::new();
    let out = serial::open_output(&config.serial, config.console_limits).map_err(|source| {
        BuildError::SerialOutput {
            target: config.serial.to_string(),
            source,
        }
    })?;
    let serial = match &snapshot {
        Some(state) => SerialDevice::from_snapshot(eventfd()?, out, &state.serial)
            .map_err(BuildError::SerialRestore)?,
        None => SerialDevice::new(eventfd()?, out),
    };
    vm.register_irqfd(serial.irq_evt(), SERIAL_IRQ)?;
    let mut serial = serial;
    let flush_wake = eventfd()?;
    serial.set_flush_wake(flush_wake.try_clone().map_err(BuildError::EventFd)?);
    let serial = Arc::new(Mutex::new(serial));
    event_manager
        .add_subscriber(
            Arc::new(Mutex::new(SerialFlusher::new(serial.clone(), flush_wake))) as Subscriber,
        );
    if config.serial == SerialOutput::Stdout {
        if let Some(stdin) = SerialStdin::for_terminal(serial.clone()) {
            event_manager.add_subscriber(Arc::new(Mutex::new(stdin)) as Subscriber);
        }
    }
    pio_bus
        .insert(serial.clone(), u64::from(SERIAL_PORT), SERIAL_PORT_LEN)
        .map_err(|source| BuildError::Bus {
            what: "serial port",
            source,
        })?;
    let reset_evt = eventfd()?;
    let i8042 = I8042Device::new(
        reset_evt.try_clone().map_err(BuildError::EventFd)?,
        eventfd()?,
    );
    vm.register_irqfd(i8042.kbd_irq(), I8042_IRQ)?;
    let i8042 = Arc::new(Mutex::new(i8042));
    pio_bus
        .insert(i8042.clone(), u64::from(I8042_PORT), I8042_PORT_LEN)
        .map_err(|source| BuildError::Bus {
            what: "i8042",
            source,
        })?;

    // Virtio devices on the MMIO bus; they extend the command line.
    let mut mmio_bus = Bus::new();
    let mut cmdline = loader::new_cmdline(&config.kernel.cmdline)?;
    let mut slots = MmioSlots::new();
    let Attached {
        transports,
        balloon,
    } = attach_virtio_devices(
        config,
        &mut VirtioContext {
            vm: &vm,
            mem: &mem,
            mmio_bus: &mut mmio_bus,
            cmdline: &mut cmdline,
            event_manager: &mut event_manager,
            slots: &mut slots,
        },
    )?;

    let msrs_to_save = match persist::msrs_to_save(vm.kvm()) {
        Ok(list) => Some(Arc::new(list)),
        Err(e) => {
            tracing::warn!("snapshots of this VM are not possible: {e}");
            None
        }
    };
    let vcpus = match snapshot {
        Some(state) => restore_state(&vm, state, &transports, files_ms)?,
        None => boot_kernel(config, &vm, &mem, &cmdline)?,
    };
    let vcpus: Vec<Vcpu> = vcpus
        .into_iter()
        .map(|v| v.with_msrs_to_save(msrs_to_save.clone().unwrap_or_default()))
        .collect();

    // The control socket binds last, so a failed build leaves no socket file.
    let control = config
        .control_socket
        .as_deref()
        .map(ControlServer::bind)
        .transpose()?;

    vcpu::install_kick_handler()?;
    let exit = Arc::new(ExitSignal::new().map_err(BuildError::EventFd)?);
    let pio_bus = Arc::new(pio_bus);
    let mmio_bus = Arc::new(mmio_bus);
    let mut handles = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        match v.start(
            pio_bus.clone(),
            mmio_bus.clone(),
            exit.clone(),
            seccomp.cloned(),
        ) {
            Ok(h) => handles.push(h),
            Err(e) => {
                vcpu::stop_all(&mut handles);
                return Err(e.into());
            }
        }
    }
    tracing::info!(
        vcpus = config.vcpus,
        memory_mib = config.memory_mib,
        "VM started"
    );

    let vmm = Arc::new(Mutex::new(Vmm::new(
        handles,
        exit,
        reset_evt,
        i8042,
        control,
        VmResources {
            vm,
            mem,
            pio_bus,
            mmio_bus,
            serial,
            transports: shape.devices.into_iter().zip(transports).collect(),
            balloon,
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            kernel_bytes: shape.kernel_bytes,
            snapshot_refusal: snapshot_refusal(config, msrs_to_save.is_some()),
        },
    )));
    event_manager.add_subscriber(vmm.clone() as Subscriber);
    Ok(BuiltVm { vmm, event_manager })
}

/// Loads the kernel, initrd and boot tables and creates the vCPUs at the
/// kernel's entry.
fn boot_kernel(
    config: &VmConfig,
    vm: &Vm,
    mem: &GuestMemory,
    cmdline: &Cmdline,
) -> Result<Vec<Vcpu>, BuildError> {
    // The kernel and what it reads at entry.
    let kernel = loader::load_kernel(mem, &config.kernel.path)?;
    let initrd = match &config.kernel.initrd {
        Some(path) => Some(loader::load_initrd(mem, path, kernel.end)?),
        None => None,
    };
    let (cmdline_addr, cmdline_size) = loader::write_cmdline(mem, cmdline)?;
    let info = BootInfo {
        cmdline_addr,
        cmdline_size,
        initrd,
    };
    mptable::setup_mptable(mem, config.vcpus)?;
    match kernel.protocol {
        BootProtocol::Linux64 => boot::write_zero_page(mem, &info, kernel.setup_header)?,
        BootProtocol::Pvh => boot::write_pvh_info(mem, &info)?,
    }
    tracing::info!(
        entry = format_args!("{:#x}", kernel.entry),
        protocol = ?kernel.protocol,
        initrd = ?initrd.map(|(a, s)| format!("{s} bytes at {a:#x}")),
        "kernel {} loaded; command line: {}",
        config.kernel.path.display(),
        cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
    );

    // vCPUs.
    let mut supported = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::Cpuid)?;
    if vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        cpuid::offer_tsc_deadline(supported.as_mut_slice());
    }
    let vcpus = (0..config.vcpus)
        .map(|i| {
            Vcpu::new(
                vm,
                mem,
                i,
                config.vcpus,
                &supported,
                kernel.entry,
                kernel.protocol,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;

    Ok(vcpus)
}

/// Puts a snapshot's KVM and device state into the freshly built VM and
/// creates its vCPUs from their saved state.
fn restore_state(
    vm: &Vm,
    state: SnapshotState,
    transports: &[SharedTransport],
    files_ms: u128,
) -> Result<Vec<Vcpu>, BuildError> {
    state.vm.restore(vm.fd())?;
    let vcpus = (0u8..)
        .zip(&state.vcpus)
        .map(|(i, s)| Vcpu::restore(vm, i, s))
        .collect::<Result<Vec<_>, _>>()?;
    for (saved, transport) in state.devices.iter().zip(transports) {
        transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&saved.transport)
            .map_err(|source| BuildError::DeviceRestore {
                device: saved.id.to_string(),
                source,
            })?;
    }
    tracing::info!(
        vcpus = vcpus.len(),
        devices = state.devices.len(),
        files_ms,
        "VM state restored from the snapshot"
    );
    Ok(vcpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_slots_from_0xd0000000_and_irq_5() {
        let mut s = MmioSlots::new();
        assert_eq!(s.allocate().unwrap(), (0xd000_0000, 5));
        assert_eq!(s.allocate().unwrap(), (0xd000_1000, 6));
        for _ in 0..17 {
            s.allocate().unwrap();
        }
        assert!(matches!(s.allocate(), Err(BuildError::NoMmioSlot)));
    }

    struct Regs;
    impl crate::devices::bus::BusDevice for Regs {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            // Tests read small offsets: the low byte tells them apart.
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    /// Needs /dev/kvm: KVM must accept the ioeventfds and irqfd.
    #[test]
    fn add_mmio_device_wires_bus_kvm_and_cmdline() {
        let vm = Vm::new().unwrap();
        let mem = memory::create(32, false, memory::Backing::Private).unwrap();
        vm.register_memory(&mem).unwrap();
        let mut bus = Bus::new();
        let mut cmdline = loader::new_cmdline("console=ttyS0").unwrap();
        let mut em = EventManager::new().unwrap();
        let mut slots = MmioSlots::new();
        let mut ctx = VirtioContext {
            vm: &vm,
            mem: &mem,
            mmio_bus: &mut bus,
            cmdline: &mut cmdline,
            event_manager: &mut em,
            slots: &mut slots,
        };
        let queues = [eventfd().unwrap(), eventfd().unwrap()];
        let irq = eventfd().unwrap();
        let a = ctx
            .add_mmio_device(Arc::new(Mutex::new(Regs)), &queues, &irq)
            .unwrap();
        let (queue2, irq2) = (eventfd().unwrap(), eventfd().unwrap());
        let b = ctx
            .add_mmio_device(
                Arc::new(Mutex::new(Regs)),
                std::slice::from_ref(&queue2),
                &irq2,
            )
            .unwrap();
        // An eventfd already routed to a GSI is refused by KVM.
        assert!(matches!(
            ctx.add_mmio_device(Arc::new(Mutex::new(Regs)), &[], &irq),
            Err(BuildError::Vm(VmError::Irqfd { gsi: 7, .. }))
        ));
        assert_eq!((a, b), ((0xd000_0000, 5), (0xd000_1000, 6)));
        let mut data = [0u8; 4];
        assert!(bus.read(0xd000_1010, &mut data));
        assert_eq!(data, [0x10; 4]);
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
