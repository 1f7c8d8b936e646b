//! Time, injectable.
//!
//! Every time-dependent decision in tokenwise (rate-limit refill, cache TTL, budget
//! windows, simulated latency) reads a [`Clock`]. Three are provided:
//!
//! - [`TscClock`] reads the CPU's time-stamp counter (through `quanta`): a few
//!   nanoseconds a read, with no system call.
//! - [`TokioClock`] follows tokio's clock, so tests that pause tokio time
//!   (`#[tokio::test(start_paused = true)]`) and advance it control every component at once.
//! - [`ManualClock`] is advanced by hand.
//!
//! A component given no clock picks one when it is built, never per read: [`TokioClock`]
//! when it is built inside a tokio runtime whose time is paused, [`TscClock`] otherwise.
//! So paused-time tests keep controlling time, and production pays for the fast clock
//! only. A component built outside a paused runtime and then used under paused time
//! should be given a [`TokioClock`] explicitly.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: nanoseconds since the Unix epoch (UTC).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// From nanoseconds since the Unix epoch.
    pub const fn from_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    /// From whole seconds since the Unix epoch.
    pub const fn from_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Whole seconds since the Unix epoch.
    pub const fn as_secs(self) -> u64 {
        self.0 / 1_000_000_000
    }

    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_nanos(d)))
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// A duration in nanoseconds as `u64`, saturating (584 years).
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A source of the current time.
///
/// # Implementing
///
/// ```
/// use tokenwise::{Clock, Timestamp};
///
/// /// A clock that always reads noon on 2026-01-01.
/// #[derive(Debug)]
/// struct Frozen;
///
/// impl Clock for Frozen {
///     fn now(&self) -> Timestamp {
///         Timestamp::from_secs(1_767_268_800)
///     }
/// }
/// let clock: std::sync::Arc<dyn Clock> = std::sync::Arc::new(Frozen);
/// assert_eq!(clock.now().as_secs(), 1_767_268_800);
/// ```
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time. Must never go backwards.
    fn now(&self) -> Timestamp;
}

/// The default clock: wall time at creation, then advancing with tokio's clock.
///
/// Under `tokio::time::pause()` it stands still and moves only when tokio time is
/// advanced, so paused-time tests drive limits, TTLs and budgets deterministically.
/// Outside a tokio runtime it follows `std::time::Instant`, which is what tokio's clock
/// does when not paused.
#[derive(Debug, Clone)]
pub struct TokioClock {
    wall_at_start: u64,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading the current wall time.
    pub fn new() -> Self {
        Self::starting_at(Timestamp(wall_now()))
    }

    /// A clock that reads `start` now and advances with tokio time.
    pub fn starting_at(start: Timestamp) -> Self {
        TokioClock {
            wall_at_start: start.0,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        Timestamp(
            self.wall_at_start
                .saturating_add(duration_nanos(self.start.elapsed())),
        )
    }
}

/// A fast clock: wall time at creation, then advancing with the CPU's time-stamp counter.
///
/// Reads go through `quanta`, which calibrates the counter against the operating
/// system's monotonic clock once per process (the first `TscClock` built pays a few
/// milliseconds) and falls back to that monotonic clock on CPUs without an invariant,
/// synchronised counter. A read costs a few nanoseconds, against tens for a
/// `clock_gettime`. It does not follow tokio's paused time; use [`TokioClock`] for that.
#[derive(Debug, Clone)]
pub struct TscClock {
    wall_at_start: u64,
    start_raw: u64,
    clock: quanta::Clock,
}

impl TscClock {
    /// A clock reading the current wall time.
    pub fn new() -> Self {
        Self::starting_at(Timestamp(wall_now()))
    }

    /// A clock that reads `start` now and advances in real time.
    pub fn starting_at(start: Timestamp) -> Self {
        let clock = quanta::Clock::new();
        let start_raw = clock.raw();
        TscClock {
            wall_at_start: start.0,
            start_raw,
            clock,
        }
    }
}

impl Default for TscClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TscClock {
    #[inline]
    fn now(&self) -> Timestamp {
        let elapsed = self.clock.delta_as_nanos(self.start_raw, self.clock.raw());
        Timestamp(self.wall_at_start.saturating_add(elapsed))
    }
}

/// Nanoseconds since the Unix epoch by the system's wall clock (zero before the epoch).
fn wall_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(duration_nanos)
        .unwrap_or(0)
}

/// A clock advanced by hand; clones share one time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            nanos: Arc::new(AtomicU64::new(start.0)),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.nanos.fetch_add(duration_nanos(d), Ordering::SeqCst);
    }

    /// Sets the clock to `t`, if `t` is not earlier than now.
    pub fn set(&self, t: Timestamp) {
        self.nanos.fetch_max(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.nanos.load(Ordering::SeqCst))
    }
}

/// The default clock as a shared trait object, chosen once: [`TokioClock`] inside a
/// tokio runtime whose time is paused, [`TscClock`] otherwise.
pub(crate) fn default_clock() -> Arc<dyn Clock> {
    if tokio_time_is_paused() {
        Arc::new(TokioClock::new())
    } else {
        Arc::new(TscClock::new())
    }
}

/// Whether the calling thread is inside a tokio runtime whose clock is paused.
///
/// tokio offers no direct query, so this watches its clock: outside a paused runtime
/// `tokio::time::Instant::now()` is the system's monotonic clock, which moves; a paused
/// clock moves only when advanced, and neither `advance` nor auto-advance can run during
/// this synchronous call on the runtime's thread. The call waits for the system clock to
/// move by at least a microsecond (bounded), then compares.
fn tokio_time_is_paused() -> bool {
    if tokio::runtime::Handle::try_current().is_err() {
        return false;
    }
    let before = tokio::time::Instant::now();
    let started = std::time::Instant::now();
    // A microsecond of real time is a few hundred reads; the bound only guards against
    // a system clock that does not move at all.
    for _ in 0..1_000_000 {
        if started.elapsed() >= Duration::from_micros(1) {
            break;
        }
        std::hint::spin_loop();
    }
    tokio::time::Instant::now() == before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let c = TokioClock::starting_at(Timestamp::from_secs(100));
        assert_eq!(c.now(), Timestamp::from_secs(100));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(c.now().as_nanos(), 101_500_000_000);
    }

    #[tokio::test(start_paused = true)]
    async fn the_default_clock_follows_paused_time() {
        let c = default_clock();
        let t0 = c.now();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(c.now().saturating_since(t0), Duration::from_secs(90));
    }

    #[tokio::test]
    async fn the_default_clock_is_real_time_when_tokio_time_runs() {
        assert!(!tokio_time_is_paused());
        let c = default_clock();
        let t0 = c.now();
        let wait = std::time::Instant::now();
        while wait.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        let moved = c.now().saturating_since(t0);
        assert!(moved >= Duration::from_millis(1), "moved {moved:?}");
    }

    #[test]
    fn the_default_clock_outside_a_runtime_is_real_time() {
        assert!(!tokio_time_is_paused());
        let c = default_clock();
        let wall = wall_now();
        let read = c.now().as_nanos();
        // the same wall clock, read microseconds apart
        assert!(read.abs_diff(wall) < 1_000_000_000, "{read} vs {wall}");
    }

    #[test]
    fn tsc_clock_starts_where_asked_and_moves_forward() {
        let c = TscClock::starting_at(Timestamp::from_secs(1_000));
        let a = c.now();
        assert!(a >= Timestamp::from_secs(1_000));
        assert!(a < Timestamp::from_secs(1_001));
        let mut last = a;
        for _ in 0..10_000 {
            let t = c.now();
            assert!(t >= last);
            last = t;
        }
        let wait = std::time::Instant::now();
        while wait.elapsed() < Duration::from_millis(3) {
            std::hint::spin_loop();
        }
        let moved = c.now().saturating_since(a);
        assert!(moved >= Duration::from_millis(2), "moved {moved:?}");
        assert!(moved < Duration::from_secs(5), "moved {moved:?}");
    }

    #[test]
    fn manual_clock_never_goes_back() {
        let c = ManualClock::new(Timestamp::from_secs(10));
        c.advance(Duration::from_secs(5));
        c.set(Timestamp::from_secs(1));
        assert_eq!(c.now(), Timestamp::from_secs(15));
    }
}
