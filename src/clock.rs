//! Time, injectable.
//!
//! Every time-dependent decision in tokenwise (rate-limit refill, cache TTL, budget
//! windows, simulated latency) reads a [`Clock`]. The default, [`TokioClock`], follows
//! tokio's clock, so tests that pause tokio time (`#[tokio::test(start_paused = true)]`)
//! and advance it control every component at once. [`ManualClock`] is advanced by hand.

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
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(duration_nanos)
            .unwrap_or(0);
        Self::starting_at(Timestamp(wall))
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

/// The default clock as a shared trait object.
pub(crate) fn default_clock() -> Arc<dyn Clock> {
    Arc::new(TokioClock::new())
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

    #[test]
    fn manual_clock_never_goes_back() {
        let c = ManualClock::new(Timestamp::from_secs(10));
        c.advance(Duration::from_secs(5));
        c.set(Timestamp::from_secs(1));
        assert_eq!(c.now(), Timestamp::from_secs(15));
    }
}
