//! I/O throttling per export, and throttle groups that share one budget between exports (of
//! one VM or of several), with QEMU's six limits and their semantics: leaky buckets for bytes
//! and requests per second, in total, for reads and for writes, each with an optional burst
//! rate (`max`) that may be kept up for `burst_length` seconds.
//!
//! A group is shared by every queue of every member export. When requests of several queues
//! wait, they take turns round-robin, one request a turn, as QEMU's throttle groups do; a queue
//! alone takes all the budget there is. Nothing lowers the rate below the configured one
//! after a burst: the achieved rate is the configured rate.

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One limit: `avg` units per second on average; bursts at up to `max` units per second for
/// up to `burst_length` seconds (0 for max: bursts of avg/10 units, as QEMU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    pub avg: u64,
    pub max: u64,
    pub burst_length: u64,
}

/// The six limits, in QEMU's order and under its names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub bps_total: Limit,
    pub bps_read: Limit,
    pub bps_write: Limit,
    pub iops_total: Limit,
    pub iops_read: Limit,
    pub iops_write: Limit,
}

use vmm_proto::throttle::NAMES;

/// Limits QEMU would refuse, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("{0}-max={1} needs {0} (the average rate) set too")]
    MaxWithoutAverage(&'static str, u64),
    #[error("{0}-max={1} is below {0}={2}; the burst rate must be at least the average")]
    MaxBelowAverage(&'static str, u64, u64),
    #[error("{0}-max-length={1} needs {0}-max (the burst rate)")]
    LengthWithoutMax(&'static str, u64),
    #[error("{0}-max-length={1}: at most 86400 seconds")]
    LengthTooLong(&'static str, u64),
    #[error("{0}: at most 2^50")]
    TooLarge(&'static str),
    #[error(
        "{0} cannot be set together with {0}-rd or {0}-wr (as in QEMU); use the total or the pair"
    )]
    TotalAndPair(&'static str),
}

impl Limits {
    pub fn all(&self) -> [Limit; 6] {
        [
            self.bps_total,
            self.bps_read,
            self.bps_write,
            self.iops_total,
            self.iops_read,
            self.iops_write,
        ]
    }

    pub fn from_array(a: [Limit; 6]) -> Limits {
        Limits {
            bps_total: a[0],
            bps_read: a[1],
            bps_write: a[2],
            iops_total: a[3],
            iops_read: a[4],
            iops_write: a[5],
        }
    }

    pub fn from_spec(spec: &vmm_proto::throttle::Spec) -> Limits {
        Limits::from_array(spec.limits.map(|l| Limit {
            avg: l[0],
            max: l[1],
            burst_length: l[2],
        }))
    }

    pub fn to_spec(self, group: &str) -> vmm_proto::throttle::Spec {
        vmm_proto::throttle::Spec {
            group: group.to_string(),
            limits: self.all().map(|l| [l.avg, l.max, l.burst_length]),
        }
    }

    pub fn is_off(&self) -> bool {
        self.all().iter().all(|l| l.avg == 0)
    }

    /// QEMU's rules, with errors that say what to change.
    pub fn validate(&self) -> Result<(), LimitError> {
        for (l, name) in self.all().iter().zip(NAMES) {
            if l.max > 0 && l.avg == 0 {
                return Err(LimitError::MaxWithoutAverage(name, l.max));
            }
            if l.max > 0 && l.max < l.avg {
                return Err(LimitError::MaxBelowAverage(name, l.max, l.avg));
            }
            if l.burst_length > 1 && l.max == 0 {
                return Err(LimitError::LengthWithoutMax(name, l.burst_length));
            }
            if l.burst_length > 86_400 {
                return Err(LimitError::LengthTooLong(name, l.burst_length));
            }
            if l.avg > 1 << 50 || l.max > 1 << 50 {
                return Err(LimitError::TooLarge(name));
            }
        }
        let both = |t: Limit, r: Limit, w: Limit, name: &'static str| {
            if t.avg > 0 && (r.avg > 0 || w.avg > 0) {
                Err(LimitError::TotalAndPair(name))
            } else {
                Ok(())
            }
        };
        both(self.bps_total, self.bps_read, self.bps_write, "bps")?;
        both(self.iops_total, self.iops_read, self.iops_write, "iops")
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    limit: Limit,
    level: f64,
    burst_level: f64,
}

impl Bucket {
    fn leak(&mut self, dt: f64) {
        self.level = (self.level - self.limit.avg as f64 * dt).max(0.0);
        self.burst_level = (self.burst_level - self.limit.max as f64 * dt).max(0.0);
    }

    /// Seconds to wait before the next request may go.
    fn wait(&self) -> f64 {
        let l = self.limit;
        if l.avg == 0 {
            return 0.0;
        }
        let (size, burst_size) = if l.max == 0 {
            // Short bursts are allowed even without a burst limit, or every other request
            // would wait.
            (l.avg as f64 / 10.0, 0.0)
        } else {
            (
                l.max as f64 * l.burst_length.max(1) as f64,
                l.max as f64 / 10.0,
            )
        };
        let extra = self.level - size;
        if extra > 0.0 {
            return extra / l.avg as f64;
        }
        if l.burst_length > 1 {
            let extra = self.burst_level - burst_size;
            if extra > 0.0 {
                return extra / l.max as f64;
            }
        }
        0.0
    }

    fn account(&mut self, units: f64) {
        if self.limit.avg > 0 {
            self.level += units;
            if self.limit.max > 0 {
                self.burst_level += units;
            }
        }
    }
}

/// A queue's wake-up: a timerfd its worker's epoll loop watches. Armed for the earliest of
/// what it is asked (throttled and delayed requests share it).
pub struct Timer(TimerFd, Mutex<Option<Instant>>);

impl Timer {
    pub fn new() -> std::io::Result<Timer> {
        let flags = TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC;
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, flags)?;
        Ok(Timer(fd, Mutex::new(None)))
    }

    /// Fires after `d` (at once for zero).
    pub fn arm(&self, d: Duration) {
        let d = d.max(Duration::from_nanos(1));
        let at = Instant::now() + d;
        let mut armed = self.1.lock().unwrap();
        if armed.is_some_and(|t| t <= at) {
            return;
        }
        *armed = Some(at);
        let when = Expiration::OneShot(TimeSpec::from_duration(d));
        if let Err(e) = self.0.set(when, TimerSetTimeFlags::empty()) {
            log::warn!(
                "cannot arm a queue's timer ({e}); throttled requests wait for the next one"
            );
        }
    }

    /// Clears a fired timer (its epoll readiness).
    pub fn clear(&self) {
        *self.1.lock().unwrap() = None;
        // Non-blocking: reads the expiry count if it fired, else EAGAIN.
        let _ = self.0.wait();
    }

    pub fn raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

struct State {
    limits: Limits,
    buckets: [Bucket; 6],
    last: Instant,
    /// Members with requests waiting, in turn order.
    turn: VecDeque<u64>,
    timers: HashMap<u64, Arc<Timer>>,
}

impl State {
    fn leak(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        for b in &mut self.buckets {
            b.leak(dt);
        }
    }

    fn relevant(write: bool) -> [usize; 4] {
        if write {
            [0, 2, 3, 5]
        } else {
            [0, 1, 3, 4]
        }
    }

    fn wait(&self, write: bool) -> f64 {
        Self::relevant(write)
            .iter()
            .map(|&i| self.buckets[i].wait())
            .fold(0.0, f64::max)
    }

    fn account(&mut self, write: bool, bytes: u64) {
        for i in Self::relevant(write) {
            let units = if i < 3 { bytes as f64 } else { 1.0 };
            self.buckets[i].account(units);
        }
    }

    fn wake_front(&self) {
        if let Some(t) = self.turn.front().and_then(|id| self.timers.get(id)) {
            t.arm(Duration::ZERO);
        }
    }
}

/// The named groups (an export's own budget is a group too, unnamed and not listed here).
static GROUPS: Mutex<std::collections::BTreeMap<String, std::sync::Weak<Group>>> =
    Mutex::new(std::collections::BTreeMap::new());

/// The group `name`, if some export is in it.
pub fn named(name: &str) -> Option<Arc<Group>> {
    let mut g = GROUPS.lock().unwrap();
    g.retain(|_, w| w.strong_count() > 0);
    g.get(name).and_then(std::sync::Weak::upgrade)
}

/// A new named group.
pub fn create(name: &str, limits: Limits) -> Arc<Group> {
    let group = Group::new(name, limits);
    GROUPS
        .lock()
        .unwrap()
        .insert(name.to_string(), Arc::downgrade(&group));
    group
}

/// A group: one budget, shared by every queue of its member exports.
pub struct Group {
    /// Empty for an export's own budget.
    pub name: String,
    state: Mutex<State>,
    next_id: AtomicU64,
}

pub enum Admit {
    Go,
    /// Wait: until the timer fires after this long (Some), or until the group wakes the
    /// member for its turn (None).
    Wait(Option<Duration>),
}

impl Group {
    pub fn new(name: &str, limits: Limits) -> Arc<Group> {
        let mut buckets = [Bucket::default(); 6];
        for (b, l) in buckets.iter_mut().zip(limits.all()) {
            b.limit = l;
        }
        Arc::new(Group {
            name: name.to_string(),
            state: Mutex::new(State {
                limits,
                buckets,
                last: Instant::now(),
                turn: VecDeque::new(),
                timers: HashMap::new(),
            }),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn limits(&self) -> Limits {
        self.state.lock().unwrap().limits
    }

    /// New limits take effect at once: the levels are kept (a burst already taken still
    /// counts), and the waiting queue recomputes its wait.
    pub fn set_limits(&self, limits: Limits) {
        let mut s = self.state.lock().unwrap();
        s.leak();
        s.limits = limits;
        for (b, l) in s.buckets.iter_mut().zip(limits.all()) {
            b.limit = l;
            if l.avg == 0 {
                b.level = 0.0;
                b.burst_level = 0.0;
            }
        }
        s.wake_front();
    }

    /// A queue joins; it is woken through `timer`.
    pub fn join(self: &Arc<Group>, timer: Arc<Timer>) -> Member {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.state.lock().unwrap().timers.insert(id, timer);
        Member {
            id,
            group: self.clone(),
        }
    }
}

/// A queue's place in a group.
pub struct Member {
    id: u64,
    pub group: Arc<Group>,
}

impl Member {
    /// Whether a request of `bytes` may go now; if so, it is counted.
    pub fn admit(&self, write: bool, bytes: u64) -> Admit {
        let mut s = self.group.state.lock().unwrap();
        s.leak();
        match s.turn.front() {
            Some(&front) if front != self.id => {
                if !s.turn.contains(&self.id) {
                    s.turn.push_back(self.id);
                }
                return Admit::Wait(None);
            }
            _ => {}
        }
        let wait = s.wait(write);
        if wait > 0.0 {
            if s.turn.is_empty() {
                s.turn.push_back(self.id);
            }
            return Admit::Wait(Some(Duration::from_secs_f64(wait)));
        }
        s.account(write, bytes);
        if s.turn.front() == Some(&self.id) {
            // The turn passes on; this queue, if it has more, waits for its next one.
            s.turn.pop_front();
            s.wake_front();
        }
        Admit::Go
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut s = self.group.state.lock().unwrap();
        s.timers.remove(&self.id);
        let was_front = s.turn.front() == Some(&self.id);
        s.turn.retain(|&id| id != self.id);
        if was_front {
            s.wake_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iops(avg: u64) -> Limits {
        Limits {
            iops_total: Limit {
                avg,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn qemu_rules_are_checked() {
        let msg = |l: Limits| l.validate().unwrap_err().to_string();
        assert!(iops(200).validate().is_ok());
        let mut l = iops(200);
        l.iops_read.avg = 10;
        assert!(msg(l).contains("iops cannot be set together"));
        let mut l = iops(200);
        l.iops_total.max = 100;
        assert!(msg(l).contains("below"));
        let mut l = iops(200);
        l.iops_total.burst_length = 5;
        assert!(msg(l).contains("needs iops-max"));
    }

    /// Simulated time: the bucket lets avg/10 through at once, then exactly avg a second.
    #[test]
    fn a_bucket_holds_the_average_rate() {
        let mut b = Bucket {
            limit: Limit {
                avg: 200,
                ..Default::default()
            },
            ..Default::default()
        };
        let (mut t, mut done) = (0.0f64, 0u64);
        while t < 10.0 {
            let w = b.wait();
            if w > 0.0 {
                b.leak(w);
                t += w;
            } else {
                b.account(1.0);
                done += 1;
            }
        }
        // 10 s at 200/s, plus the first burst of 20.
        assert!((2000..=2022).contains(&done), "{done}");
    }

    #[test]
    fn bursts_run_at_max_for_burst_length_then_at_avg() {
        let mut b = Bucket {
            limit: Limit {
                avg: 100,
                max: 1000,
                burst_length: 2,
            },
            ..Default::default()
        };
        let (mut t, mut done) = (0.0f64, 0u64);
        while t < 1.0 {
            let w = b.wait();
            if w > 0.0 {
                b.leak(w.min(0.001));
                t += w.min(0.001);
            } else {
                b.account(1.0);
                done += 1;
            }
        }
        // The first second runs near the burst rate (bounded by max), not at avg.
        assert!((900..=1150).contains(&done), "{done}");
    }

    #[test]
    fn waiting_members_take_turns() {
        let g = Group::new("g", iops(1));
        let a = g.join(Arc::new(Timer::new().unwrap()));
        let b = g.join(Arc::new(Timer::new().unwrap()));
        // The burst allowance (avg/10 = 0.1) is gone after one request.
        assert!(matches!(a.admit(false, 4096), Admit::Go));
        assert!(matches!(a.admit(false, 4096), Admit::Wait(Some(_))));
        // b comes second: it waits for its turn, not for the timer.
        assert!(matches!(b.admit(false, 4096), Admit::Wait(None)));
        {
            let mut s = g.state.lock().unwrap();
            s.buckets[3].level = 0.0;
        }
        // a's turn: it goes, and the turn passes to b, so a waits behind b.
        assert!(matches!(a.admit(false, 4096), Admit::Go));
        assert!(matches!(a.admit(false, 4096), Admit::Wait(None)));
        g.state.lock().unwrap().buckets[3].level = 0.0;
        assert!(matches!(b.admit(false, 4096), Admit::Go));
        drop(b);
        g.state.lock().unwrap().buckets[3].level = 0.0;
        assert!(matches!(a.admit(false, 4096), Admit::Go));
    }
}
