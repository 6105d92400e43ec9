//! Rate limiters for the devices' request paths, as Firecracker's: a
//! [`RateLimiter`] owns an optional bandwidth (bytes) [`TokenBucket`], an
//! optional operations bucket, and the timerfd that tells the event loop
//! when a refused operation can go ahead.
//!
//! A device asks [`RateLimiter::consume`] before each operation. When the
//! buckets refuse, the limiter arms its timer for the moment they will have
//! enough and reports itself blocked: the device leaves the operation where
//! it was (in the queue, or as its pending frame), stops processing, and
//! resumes when the event loop delivers the timer
//! ([`RateLimiter::on_timer`]). Nothing spins and nothing sleeps in the
//! event loop; guest kicks meanwhile only drain their eventfds.
//!
//! Syscalls: `timerfd_create` when a limited device is built,
//! `timerfd_settime` when a limiter blocks, `read` of the timer when it
//! fires, and `clock_gettime` (CLOCK_MONOTONIC, normally answered by the
//! vDSO) per operation of a limited device.

pub mod bucket;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use husk_vm_config::RateLimiterConfig;
use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use tracing::{debug, error};

pub use bucket::TokenBucket;

/// The shortest timer armed: below it the timer's own cost dominates.
const MIN_WAIT: Duration = Duration::from_micros(100);
/// The longest timer armed: a longer wait (a huge debt at a tiny rate)
/// re-arms when it fires.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Errors from setting up a rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("creating the rate limiter's timerfd: {0}")]
    Timer(#[source] io::Error),
}

/// A device path's rate limits. See the module docs.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Only a limiter with a bucket has a timer.
    timer: Option<OwnedFd>,
    /// Refused an operation; the timer is armed.
    blocked: bool,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::unlimited()
    }
}

impl RateLimiter {
    /// A limiter that lets everything through, with no timer.
    pub fn unlimited() -> Self {
        Self {
            bandwidth: None,
            ops: None,
            timer: None,
            blocked: false,
        }
    }

    /// The limiter `config` describes; unlimited when None.
    pub fn new(config: Option<&RateLimiterConfig>) -> Result<Self, RateLimiterError> {
        let Some(config) = config else {
            return Ok(Self::unlimited());
        };
        let now = Instant::now();
        let timer = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .map_err(|e| RateLimiterError::Timer(e.into()))?;
        Ok(Self {
            bandwidth: config.bandwidth.as_ref().map(|b| TokenBucket::new(b, now)),
            ops: config.ops.as_ref().map(|b| TokenBucket::new(b, now)),
            timer: Some(timer),
            blocked: false,
        })
    }

    /// Whether an operation of `bytes` bytes and `ops` operations may go
    /// ahead now; if so, its tokens are taken. If not, the limiter blocks
    /// until its timer fires: the caller keeps the operation for then.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> bool {
        if self.bandwidth.is_none() && self.ops.is_none() {
            // Unlimited: not even a clock read per request.
            return true;
        }
        self.consume_at(bytes, ops, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, ops: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let wait = |b: &mut Option<TokenBucket>, n| {
            b.as_mut().map_or(Duration::ZERO, |b| b.wait_time(n, now))
        };
        // Both buckets or neither: an operation the ops bucket refuses
        // takes no bytes.
        let wait = wait(&mut self.bandwidth, bytes).max(wait(&mut self.ops, ops));
        if wait.is_zero() {
            if let Some(b) = &mut self.bandwidth {
                b.take(bytes);
            }
            if let Some(b) = &mut self.ops {
                b.take(ops);
            }
            return true;
        }
        match self.arm(wait) {
            Ok(()) => {
                self.blocked = true;
                false
            }
            Err(e) => {
                // Without a timer nothing would resume the device: let the
                // operation through rather than stall the guest's queue.
                error!(error = %e, "rate limiter: arming the timer failed, not limiting");
                true
            }
        }
    }

    fn arm(&self, wait: Duration) -> io::Result<()> {
        let Some(timer) = &self.timer else {
            // A limiter without a timer has no bucket and never waits.
            return Err(io::Error::other("no timer"));
        };
        let wait = wait.clamp(MIN_WAIT, MAX_WAIT);
        let value = Timespec {
            // At most MAX_WAIT: it fits.
            tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        timerfd_settime(timer, TimerfdTimerFlags::empty(), &spec)
            .map(drop)
            .map_err(io::Error::from)
    }

    /// Whether the limiter refused an operation and waits for its timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Whether `fd` is this limiter's timer.
    pub fn is_timer(&self, fd: RawFd) -> bool {
        self.timer.as_ref().is_some_and(|t| t.as_raw_fd() == fd)
    }

    /// Watches the timer (from `MutEventSubscriber::init`); an unlimited
    /// limiter has none.
    pub fn register(&self, ops: &mut EventOps, dev: &str) {
        if let Some(timer) = &self.timer {
            if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                error!(error = ?e, "{dev}: registering the rate limiter's timer");
            }
        }
    }

    /// The event loop delivered the timer: the limiter lets operations
    /// through again (the buckets decide).
    pub fn on_timer(&mut self) {
        let Some(timer) = &self.timer else {
            return;
        };
        let mut expirations = [0u8; 8];
        match rustix::io::read(timer.as_fd(), &mut expirations) {
            Ok(_) => self.blocked = false,
            // Nothing expired: a stale readiness; the timer is still armed.
            Err(rustix::io::Errno::AGAIN) => debug!("rate limiter: timer not expired yet"),
            Err(e) => {
                // Unblock anyway: a timer that cannot be read would stall
                // the device for good.
                error!(error = %e, "rate limiter: reading the timer");
                self.blocked = false;
            }
        }
    }

    /// The bandwidth bucket, if any.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The operations bucket, if any.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }
}

#[cfg(test)]
mod tests;
