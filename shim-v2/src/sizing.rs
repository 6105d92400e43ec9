//! How big a sandbox's VM is, and what of it a container may reserve.
//!
//! A VM gets the configured base (`vcpus`, `memory_mib`: the guest kernel
//! and the agent) plus what its workload asks for, capped by `max_vcpus`
//! and `max_memory_mib`. A Kubernetes pod asks through the sandbox spec's
//! annotations, which containerd's CRI plugin fills with the pod's totals
//! (containerd PR 6155); a container outside Kubernetes asks through its own
//! spec's limits. Guest memory is only host memory once the guest touches
//! it.
//!
//! A container with a memory limit reserves that much of the VM; one whose
//! limit does not fit what is left is refused at create, rather than
//! OOM-killed later. When the pod asked for memory, what is left is the
//! pod's share (the VM less the base); when it asked for nothing, the whole
//! VM is shared.

use std::collections::HashMap;

use serde_json::Value;

use crate::config::Config;

/// The pod's memory limit in bytes (sandbox spec annotation).
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The pod's CFS quota in microseconds per period.
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The pod's CFS period in microseconds.
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizingError {
    #[error("annotation {key}: {value:?} is not a number of the right range")]
    BadAnnotation { key: &'static str, value: String },
    #[error("{field}: {value} is not a number of the right range")]
    BadLimit { field: &'static str, value: String },
    #[error(
        "container {id}: its memory limit of {asked_mib} MiB does not fit the {left_mib} MiB \
         its VM has left (the VM has {vm_mib} MiB; raise the pod's limits, or max_memory_mib)"
    )]
    DoesNotFit {
        id: String,
        asked_mib: u64,
        left_mib: u64,
        vm_mib: u64,
    },
}

/// What a workload asks for: its memory and CPU limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CFS quota and period (µs); no CPU limit unless both are positive.
    pub cpu_quota: u64,
    pub cpu_period: u64,
}

impl Limits {
    /// A pod's totals, from its sandbox spec's annotations (absent or 0:
    /// nothing asked).
    pub fn of_pod(spec: &Value) -> Result<Limits, SizingError> {
        let ann = |key: &'static str| -> Result<u64, SizingError> {
            let Some(v) = spec.pointer("/annotations").and_then(|a| a.get(key)) else {
                return Ok(0);
            };
            let text = v.as_str().unwrap_or_default();
            // CRI writes -1 for "no quota".
            if text == "-1" && key == SANDBOX_CPU_QUOTA {
                return Ok(0);
            }
            text.parse::<u64>().map_err(|_| SizingError::BadAnnotation {
                key,
                // The text itself; anything but a string as JSON.
                value: v.as_str().map_or_else(|| v.to_string(), str::to_string),
            })
        };
        Ok(Limits {
            memory_bytes: ann(SANDBOX_MEMORY)?,
            cpu_quota: ann(SANDBOX_CPU_QUOTA)?,
            cpu_period: ann(SANDBOX_CPU_PERIOD)?,
        })
    }

    /// A container's own limits, from its spec's `linux.resources`.
    pub fn of_container(spec: &Value) -> Result<Limits, SizingError> {
        let num = |field: &'static str, pointer: &str| -> Result<u64, SizingError> {
            match spec.pointer(pointer) {
                None | Some(Value::Null) => Ok(0),
                // OCI says -1 (or 0) for "no limit".
                Some(v) if v.as_i64() == Some(-1) => Ok(0),
                Some(v) => v.as_u64().ok_or_else(|| SizingError::BadLimit {
                    field,
                    value: v.to_string(),
                }),
            }
        };
        Ok(Limits {
            memory_bytes: num(
                "linux.resources.memory.limit",
                "/linux/resources/memory/limit",
            )?,
            cpu_quota: num("linux.resources.cpu.quota", "/linux/resources/cpu/quota")?,
            cpu_period: num("linux.resources.cpu.period", "/linux/resources/cpu/period")?,
        })
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_bytes.div_ceil(MIB)
    }

    /// Whole vCPUs the CPU limit amounts to, rounded up.
    pub fn vcpus(&self) -> u64 {
        if self.cpu_quota == 0 || self.cpu_period == 0 {
            return 0;
        }
        self.cpu_quota.div_ceil(self.cpu_period)
    }
}

/// A VM's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// What containers' memory limits may reserve of it.
    pub reservable_mib: u64,
}

/// The VM for a workload asking `r`.
pub fn size(cfg: &Config, r: Limits) -> VmSize {
    let extra_vcpus = u32::try_from(r.vcpus()).unwrap_or(u32::MAX);
    let vcpus = cfg.vcpus.saturating_add(extra_vcpus).min(cfg.max_vcpus);
    let memory_mib = cfg
        .memory_mib
        .saturating_add(r.memory_mib())
        .min(cfg.max_memory_mib);
    let reservable_mib = if r.memory_mib() == 0 {
        memory_mib
    } else {
        memory_mib - cfg.memory_mib
    };
    VmSize {
        vcpus,
        memory_mib,
        reservable_mib,
    }
}

/// The memory the containers of a VM have reserved.
#[derive(Debug)]
pub struct Reservations {
    size: VmSize,
    by_container: HashMap<String, u64>,
}

impl Reservations {
    pub fn new(size: VmSize) -> Reservations {
        Reservations {
            size,
            by_container: HashMap::new(),
        }
    }

    /// Reserves container `id`'s memory limit, or says why it does not fit.
    pub fn reserve(&mut self, id: &str, r: Limits) -> Result<(), SizingError> {
        let asked_mib = r.memory_mib();
        if asked_mib == 0 {
            return Ok(());
        }
        let used: u64 = self.by_container.values().sum();
        let left_mib = self.size.reservable_mib.saturating_sub(used);
        if asked_mib > left_mib {
            return Err(SizingError::DoesNotFit {
                id: id.to_string(),
                asked_mib,
                left_mib,
                vm_mib: self.size.memory_mib,
            });
        }
        self.by_container.insert(id.to_string(), asked_mib);
        Ok(())
    }

    pub fn release(&mut self, id: &str) {
        self.by_container.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn cfg() -> Config {
        crate::config::parse(
            "vcpus = 1\nmemory_mib = 256\nmax_vcpus = 4\nmax_memory_mib = 2048",
            Path::new("/c.toml"),
        )
        .unwrap()
    }

    fn pod(mem: &str, quota: &str, period: &str) -> Value {
        json!({"annotations": {
            SANDBOX_MEMORY: mem, SANDBOX_CPU_QUOTA: quota, SANDBOX_CPU_PERIOD: period
        }})
    }

    #[test]
    fn a_pod_gets_the_base_plus_its_totals_capped() {
        let r = Limits::of_pod(&pod("1073741824", "150000", "100000")).unwrap();
        assert_eq!((r.memory_mib(), r.vcpus()), (1024, 2));
        assert_eq!(
            size(&cfg(), r),
            VmSize {
                vcpus: 3,
                memory_mib: 1280,
                reservable_mib: 1024
            }
        );
        // Capped: 8 GiB and 16 CPUs asked, 2 GiB and 4 vCPUs given.
        let r = Limits::of_pod(&pod("8589934592", "1600000", "100000")).unwrap();
        let s = size(&cfg(), r);
        assert_eq!((s.vcpus, s.memory_mib, s.reservable_mib), (4, 2048, 1792));
        // Nothing asked (no annotations, or "no quota"): the base, all shared.
        let s = size(&cfg(), Limits::of_pod(&json!({})).unwrap());
        assert_eq!((s.vcpus, s.memory_mib, s.reservable_mib), (1, 256, 256));
        let r = Limits::of_pod(&pod("0", "-1", "100000")).unwrap();
        assert_eq!(
            r,
            Limits {
                cpu_period: 100000,
                ..Limits::default()
            }
        );
    }

    #[test]
    fn garbage_annotations_and_limits_are_named() {
        for (p, key) in [
            (pod("lots", "1", "1"), SANDBOX_MEMORY),
            (pod("1", "-5", "1"), SANDBOX_CPU_QUOTA),
            (pod("1", "1", "1e5"), SANDBOX_CPU_PERIOD),
            (json!({"annotations": {SANDBOX_MEMORY: 12}}), SANDBOX_MEMORY),
        ] {
            let e = Limits::of_pod(&p).unwrap_err();
            assert!(
                matches!(e, SizingError::BadAnnotation { key: k, .. } if k == key),
                "{e}"
            );
            assert!(e.to_string().contains(key), "{e}");
        }
        let e = Limits::of_pod(&pod("lots", "1", "1")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("annotation {SANDBOX_MEMORY}: \"lots\" is not a number of the right range")
        );
        let e = Limits::of_container(&json!({"linux": {"resources": {"memory": {"limit": -7}}}}))
            .unwrap_err();
        assert!(
            e.to_string().contains("linux.resources.memory.limit: -7"),
            "{e}"
        );
        let e = Limits::of_container(&json!({"linux": {"resources": {"cpu": {"quota": "x"}}}}))
            .unwrap_err();
        assert!(e.to_string().contains("linux.resources.cpu.quota"), "{e}");
    }

    #[test]
    fn a_container_is_sized_by_its_own_limits() {
        let spec = json!({"linux": {"resources": {
            "memory": {"limit": 536870912},
            "cpu": {"quota": 200000, "period": 100000}
        }}});
        let r = Limits::of_container(&spec).unwrap();
        let s = size(&cfg(), r);
        assert_eq!((s.vcpus, s.memory_mib, s.reservable_mib), (3, 768, 512));
        let mut res = Reservations::new(s);
        res.reserve("c1", r).unwrap();
        let none =
            Limits::of_container(&json!({"linux": {"resources": {"memory": {"limit": -1}}}}))
                .unwrap();
        assert_eq!(none, Limits::default());
    }

    #[test]
    fn containers_reserve_what_is_left_and_give_it_back() {
        let s = size(
            &cfg(),
            Limits::of_pod(&pod("1073741824", "0", "0")).unwrap(),
        );
        let mut res = Reservations::new(s);
        let mib = |m: u64| Limits {
            memory_bytes: m * MIB,
            ..Limits::default()
        };
        res.reserve("a", mib(600)).unwrap();
        res.reserve("unlimited", Limits::default()).unwrap();
        let e = res.reserve("b", mib(500)).unwrap_err();
        assert_eq!(
            e,
            SizingError::DoesNotFit {
                id: "b".into(),
                asked_mib: 500,
                left_mib: 424,
                vm_mib: 1280
            }
        );
        assert!(
            e.to_string().contains("500 MiB does not fit the 424 MiB"),
            "{e}"
        );
        res.release("a");
        res.reserve("b", mib(500)).unwrap();
    }
}
