//! The KVM VM: its in-kernel interrupt controllers and PIT, guest memory
//! slots, and the irqfd/ioeventfd registrations devices use.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::devices::virtio::GuestMemory;

/// Errors from setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0}, expected 12")]
    ApiVersion(i32),
    #[error("KVM lacks capability {0:?}")]
    MissingCap(Cap),
    #[error("cannot create the KVM VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("{what}: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory needs {needed} slots, KVM offers {max}")]
    TooManySlots { needed: usize, max: usize },
    #[error("cannot register guest memory slot {slot} at {base:#x}: {source}")]
    MemorySlot {
        slot: u32,
        base: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register irqfd for GSI {gsi}: {source}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register ioeventfd at {addr:#x}: {source}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Capabilities husk cannot run without.
const REQUIRED_CAPS: [Cap; 8] = [
    Cap::Irqchip,
    // Kicking vCPUs out of KVM_RUN (pause, stop) relies on it.
    Cap::ImmediateExit,
    Cap::ExtCpuid,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
];

/// A KVM VM with its interrupt controllers and memory set up.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with an in-kernel PIC, IOAPIC and PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        if let Some(cap) = REQUIRED_CAPS.into_iter().find(|c| !kvm.check_extension(*c)) {
            return Err(VmError::MissingCap(cap));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let setup = |what| move |source| VmError::Setup { what, source };
        // Both live in the MMIO gap, where no RAM or device will ever be.
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(setup("cannot set the identity map address"))?;
        // A constant below 4 GiB: it fits usize.
        #[allow(clippy::cast_possible_truncation)]
        let tss_address = KVM_TSS_START as usize;
        fd.set_tss_address(tss_address)
            .map_err(setup("cannot set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(setup("cannot create the in-kernel irqchip"))?;
        // The speaker port (0x61) is only used by the guest to calibrate
        // timers; a dummy keeps it from exiting to us.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(setup("cannot create the in-kernel PIT"))?;
        Ok(Self { kvm, fd })
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        let max = self.kvm.get_nr_memslots();
        if mem.num_regions() > max {
            return Err(VmError::TooManySlots {
                needed: mem.num_regions(),
                max,
            });
        }
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let base = region.start_addr().0;
            let host =
                mem.get_host_address(region.start_addr())
                    .map_err(|_| VmError::MemorySlot {
                        slot,
                        base,
                        source: kvm_ioctls::Error::new(libc::EFAULT),
                    })?;
            let region_desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: base,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range [host, host + len) is a live mapping owned
            // by `mem`; the builder keeps `mem` alive for as long as the VM runs
            // (the Vmm owns both, and the VM fd is dropped first).
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(|source| VmError::MemorySlot { slot, base, source })?;
        }
        Ok(())
    }

    /// Routes `evt` to interrupt line `gsi`: a write to it injects the IRQ.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Signals `evt` (without exiting to the VMM) when the guest writes
    /// `datamatch` to the MMIO address `addr` (a 4-byte write, as the
    /// virtio-mmio QueueNotify register takes).
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }

    /// The KVM system handle (for supported CPUID and MSR lists).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
