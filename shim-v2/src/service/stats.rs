//! A container's statistics from the agent, as the cgroup v1 `Metrics`
//! containerd's task API expects.

use containerd_shim::protos::cgroups::metrics;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use husk_protocols::agent as pb;

use super::error::{Result, ServiceError};

/// The `Any` a Stats reply carries.
pub fn to_metrics(s: &pb::StatsContainerResponse) -> Result<Any> {
    let mut m = metrics::Metrics::new();
    if let Some(cpu) = s.cpu.as_ref() {
        let mut usage = metrics::CPUUsage::new();
        usage.total = cpu.usage_usec.saturating_mul(1000);
        usage.user = cpu.user_usec.saturating_mul(1000);
        usage.kernel = cpu.system_usec.saturating_mul(1000);
        let mut throttle = metrics::Throttle::new();
        throttle.throttled_periods = cpu.nr_throttled;
        throttle.throttled_time = cpu.throttled_usec.saturating_mul(1000);
        let mut c = metrics::CPUStat::new();
        c.usage = Some(usage).into();
        c.throttling = Some(throttle).into();
        m.cpu = Some(c).into();
    }
    if let Some(mem) = s.memory.as_ref() {
        let mut usage = metrics::MemoryEntry::new();
        usage.usage = mem.usage_bytes;
        // The agent says 0 for "no limit"; cgroup v1 says max.
        usage.limit = if mem.limit_bytes == 0 {
            u64::MAX
        } else {
            mem.limit_bytes
        };
        usage.max = mem.max_usage_bytes;
        let mut swap = metrics::MemoryEntry::new();
        swap.usage = mem.swap_usage_bytes;
        let mut mm = metrics::MemoryStat::new();
        mm.usage = Some(usage).into();
        mm.swap = Some(swap).into();
        m.memory = Some(mm).into();
        let mut oom = metrics::MemoryOomControl::new();
        oom.oom_kill = mem.oom_kills;
        m.memory_oom_control = Some(oom).into();
    }
    if let Some(pids) = s.pids.as_ref() {
        let mut p = metrics::PidsStat::new();
        p.current = pids.current;
        p.limit = pids.limit;
        m.pids = Some(p).into();
    }
    if let Some(io) = s.io.as_ref() {
        let entry = |op: &str, value: u64| {
            let mut e = metrics::BlkIOEntry::new();
            e.op = op.into();
            e.value = value;
            e
        };
        let mut b = metrics::BlkIOStat::new();
        b.io_service_bytes_recursive =
            vec![entry("Read", io.read_bytes), entry("Write", io.write_bytes)];
        b.io_serviced_recursive = vec![entry("Read", io.read_ios), entry("Write", io.write_ios)];
        m.blkio = Some(b).into();
    }
    let mut any = Any::new();
    any.type_url = "io.containerd.cgroups.v1.Metrics".into();
    any.value = m
        .write_to_bytes()
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_stats_become_cgroup_metrics() {
        let mut s = pb::StatsContainerResponse::new();
        let mut cpu = pb::CpuStats::new();
        cpu.usage_usec = 7;
        s.cpu = Some(cpu).into();
        let mut mem = pb::MemoryStats::new();
        mem.usage_bytes = 4096;
        s.memory = Some(mem).into();
        let any = to_metrics(&s).unwrap();
        let m = metrics::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage.total, 7000);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.usage.limit, u64::MAX);
        assert!(m.pids.is_none() && m.blkio.is_none());
    }
}
