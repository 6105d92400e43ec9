//! Whether /dev/kvm can run a Linux guest. An openable /dev/kvm that
//! creates VMs is not enough: KVM's x86 core also runs on software
//! "hypervisors" such as PVM (`kvm_pvm`, pagetable-based virtualization for
//! hosts that are themselves VMs without nested hardware virtualization),
//! which execute a guest that is not PVM-aware in KVM's instruction
//! emulator, where a stock Linux kernel dies on the first instruction the
//! emulator lacks (`lock cmpxchg16b`, `xrstor`). What tells them apart is
//! the vendor module that backs /dev/kvm, and whether the CPU shows the
//! hardware extension it drives (`vmx` for kvm_intel, `svm` for kvm_amd).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

/// KVM's ioctls used here (linux/kvm.h: _IO(KVMIO = 0xAE, n)).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
/// The only KVM API version there has ever been.
const KVM_API_VERSION: libc::c_int = 12;

/// Which kernel module backs /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// kvm_intel: Intel VT-x.
    Intel,
    /// kvm_amd: AMD-V (SVM).
    Amd,
    /// kvm_pvm: a software hypervisor.
    Pvm,
    /// No vendor module the check knows is loaded.
    Unknown,
}

impl Backend {
    pub fn module(self) -> &'static str {
        match self {
            Self::Intel => "kvm_intel",
            Self::Amd => "kvm_amd",
            Self::Pvm => "kvm_pvm",
            Self::Unknown => "none known",
        }
    }

    /// The /proc/cpuinfo flag of the hardware extension the module drives.
    pub fn cpu_flag(self) -> Option<&'static str> {
        match self {
            Self::Intel => Some("vmx"),
            Self::Amd => Some("svm"),
            Self::Pvm | Self::Unknown => None,
        }
    }
}

/// The vendor module behind /dev/kvm, from `sys_module` (/sys/module) and
/// the CPU's flags. A kernel with KVM built in lists both kvm_intel and
/// kvm_amd there, and only the one whose extension the CPU has runs; PVM
/// can be loaded beside a hardware module, which then wins.
pub fn backend(sys_module: &Path, flags: &[String]) -> Backend {
    let has = |m: &str| sys_module.join(m).exists();
    let hardware = [Backend::Intel, Backend::Amd];
    if let Some(b) = hardware
        .iter()
        .find(|b| has(b.module()) && b.cpu_flag().is_some_and(|f| flags.iter().any(|x| x == f)))
    {
        return *b;
    }
    if has(Backend::Pvm.module()) {
        return Backend::Pvm;
    }
    hardware
        .into_iter()
        .find(|b| has(b.module()))
        .unwrap_or(Backend::Unknown)
}

/// The flags of the first CPU in /proc/cpuinfo's text.
pub fn cpu_flags(cpuinfo: &str) -> Vec<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM_GET_API_VERSION: {0}")]
    ApiVersion(std::io::Error),
    #[error("KVM API version {0}, not 12")]
    WrongApi(libc::c_int),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(std::io::Error),
}

/// Opens `path` (/dev/kvm), checks the API version and creates (and drops)
/// a VM: what the VMM does first.
pub fn probe_device(path: &Path) -> Result<(), KvmError> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| KvmError::Open {
            path: path.display().to_string(),
            source,
        })?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and touches no memory
    // of ours; the fd is open for the call's duration.
    let v = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if v < 0 {
        return Err(KvmError::ApiVersion(std::io::Error::last_os_error()));
    }
    if v != KVM_API_VERSION {
        return Err(KvmError::WrongApi(v));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0: default) by value
    // and returns a new fd, which is closed right after.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return Err(KvmError::CreateVm(std::io::Error::last_os_error()));
    }
    // SAFETY: `vm` is the fd KVM_CREATE_VM just returned, owned by nobody
    // else.
    unsafe { libc::close(vm) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_are_told_by_module_and_cpu_flag() {
        let dir = std::env::temp_dir().join(format!("husk-cli-kvm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let flags = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(backend(&dir, &[]), Backend::Unknown);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(backend(&dir, &flags(&["hypervisor"])), Backend::Pvm);
        // KVM built in: both vendor modules listed, the CPU's flag decides.
        std::fs::create_dir_all(dir.join("kvm_intel")).unwrap();
        std::fs::create_dir_all(dir.join("kvm_amd")).unwrap();
        assert_eq!(backend(&dir, &flags(&["svm"])), Backend::Amd);
        assert_eq!(backend(&dir, &flags(&["vmx"])), Backend::Intel);
        assert_eq!(backend(&dir, &[]), Backend::Pvm);
        std::fs::remove_dir_all(dir.join("kvm_pvm")).unwrap();
        // A vendor module without its extension: named, to say what lacks.
        assert_eq!(backend(&dir, &[]), Backend::Intel);
        assert_eq!(Backend::Amd.cpu_flag(), Some("svm"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cpu_flags_are_the_first_cpus() {
        let text = "processor : 0\nflags\t\t: fpu vme svm hypervisor\n\nprocessor : 1\nflags : x\n";
        assert_eq!(cpu_flags(text), ["fpu", "vme", "svm", "hypervisor"]);
        assert!(cpu_flags("").is_empty());
    }

    #[test]
    fn a_device_that_is_not_kvm_is_refused() {
        assert!(matches!(
            probe_device(Path::new("/nonexistent/kvm")),
            Err(KvmError::Open { .. })
        ));
        // /dev/null opens but answers no KVM ioctl.
        assert!(matches!(
            probe_device(Path::new("/dev/null")),
            Err(KvmError::ApiVersion(_))
        ));
    }
}
