//! Retries: exponential backoff with full jitter, Retry-After, and a retry budget.

use hashbrown::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;

use crate::clock::{Clock, duration_nanos};
use crate::{Error, Result};

/// How a pipeline retries one target before it falls back to the next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Calls per target, the first included (default 3; 1 disables retries).
    pub max_attempts: u32,
    /// The first backoff's ceiling (default 200 ms); each retry doubles it...
    pub base: Duration,
    /// ...up to this (default 10 s).
    pub cap: Duration,
    /// A provider's Retry-After is honoured up to this; a longer one is not waited for,
    /// and the next target is tried instead (default 20 s).
    pub max_retry_after: Duration,
    /// Retries may be at most this share of calls per target (default 0.2)...
    pub budget_ratio: f64,
    /// ...plus this many per second, so that low traffic can still retry (default 1).
    pub budget_floor_per_sec: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(20),
            budget_ratio: 0.2,
            budget_floor_per_sec: 1,
        }
    }
}

impl RetryPolicy {
    /// No retries: one call per target.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return Err(Error::Config(
                "retry: max_attempts must be between 1 and 10".into(),
            ));
        }
        if self.base.is_zero() || self.cap < self.base {
            return Err(Error::Config("retry: need 0 < base <= cap".into()));
        }
        if !(0.0..=1.0).contains(&self.budget_ratio) {
            return Err(Error::Config(
                "retry: budget_ratio must be in [0, 1]".into(),
            ));
        }
        Ok(())
    }

    /// The backoff before retry number `retry` (0 for the first retry): a uniformly
    /// random duration in `[0, min(cap, base × 2^retry)]` ("full jitter").
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << retry.min(20))
            .min(self.cap);
        let nanos = duration_nanos(ceiling);
        Duration::from_nanos(if nanos == 0 {
            0
        } else {
            rand::rng().random_range(0..=nanos)
        })
    }

    /// The wait before retrying after `error`: its Retry-After when it gave one
    /// (`None` if that is longer than `max_retry_after`), else the jittered backoff.
    pub fn wait_for(&self, error: &Error, retry: u32) -> Option<Duration> {
        match error.retry_after() {
            Some(ra) if ra > self.max_retry_after => None,
            Some(ra) => Some(ra.max(self.backoff(retry).min(ra / 10 + self.base))),
            None => Some(self.backoff(retry)),
        }
    }
}

/// Steps of the retry budget's window.
const STEPS: usize = 10;
/// The retry budget's window.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Default)]
struct Step {
    start: u64,
    calls: u32,
    retries: u32,
}

/// Per-target retry budgets: over the last ten seconds, retries may be at most
/// `ratio × calls + floor × 10`. An outage then costs at most a fixed share of extra
/// calls instead of multiplying traffic by the attempt count.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    floor: u32,
    clock: Arc<dyn Clock>,
    targets: Arc<Mutex<HashMap<String, [Step; STEPS]>>>,
}

impl RetryBudget {
    /// A budget allowing `ratio` of calls plus `floor_per_sec` retries a second.
    pub fn new(ratio: f64, floor_per_sec: u32, clock: Arc<dyn Clock>) -> Self {
        RetryBudget {
            ratio,
            floor: floor_per_sec,
            clock,
            targets: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, [Step; STEPS]>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step(steps: &mut [Step; STEPS], now: u64) -> &mut Step {
        let width = duration_nanos(WINDOW) / STEPS as u64;
        let start = now / width * width;
        let s = &mut steps[((now / width) % STEPS as u64) as usize];
        if s.start != start {
            *s = Step {
                start,
                calls: 0,
                retries: 0,
            };
        }
        s
    }

    /// Records a first call to `target`.
    pub fn deposit(&self, target: &str) {
        let now = self.clock.now().as_nanos();
        let mut map = self.lock();
        if !map.contains_key(target) {
            if map.len() >= 1_024 {
                return;
            }
            map.insert(target.to_owned(), [Step::default(); STEPS]);
        }
        // a known target's key is not allocated again
        let Some(steps) = map.get_mut(target) else {
            return;
        };
        Self::step(steps, now).calls += 1;
    }

    /// Takes one retry for `target` if the budget allows it.
    pub fn withdraw(&self, target: &str) -> bool {
        let now = self.clock.now().as_nanos();
        let horizon = now.saturating_sub(duration_nanos(WINDOW));
        let mut map = self.lock();
        let Some(steps) = map.get_mut(target) else {
            return false;
        };
        let (calls, retries) = steps
            .iter()
            .filter(|s| s.start >= horizon)
            .fold((0u32, 0u32), |(c, r), s| (c + s.calls, r + s.retries));
        let allowed = self.ratio * f64::from(calls) + f64::from(self.floor) * WINDOW.as_secs_f64();
        if f64::from(retries) + 1.0 > allowed {
            return false;
        }
        Self::step(steps, now).retries += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Timestamp};
    use crate::error::{ProviderError, ProviderErrorKind};

    #[test]
    fn full_jitter_stays_within_its_bounds() {
        let p = RetryPolicy::default();
        for retry in 0..8 {
            let ceiling = (p.base * (1 << retry)).min(p.cap);
            let samples: Vec<Duration> = (0..500).map(|_| p.backoff(retry)).collect();
            assert!(samples.iter().all(|d| *d <= ceiling));
            // jittered: not all the same, and some in the lower half
            assert!(samples.iter().any(|d| *d < ceiling / 2));
            assert!(samples.iter().any(|d| *d > ceiling / 2));
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_a_bound() {
        let p = RetryPolicy::default();
        let e: Error = ProviderError::new(ProviderErrorKind::RateLimited, "p", "slow")
            .with_retry_after(Duration::from_secs(3))
            .into();
        let w = p.wait_for(&e, 0).unwrap();
        assert!(
            w >= Duration::from_secs(3) && w <= Duration::from_millis(3_500),
            "{w:?}"
        );
        let long: Error = ProviderError::new(ProviderErrorKind::RateLimited, "p", "slow")
            .with_retry_after(Duration::from_secs(600))
            .into();
        assert_eq!(p.wait_for(&long, 0), None);
    }

    #[test]
    fn the_budget_runs_out() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let b = RetryBudget::new(0.1, 0, Arc::new(clock.clone()));
        for _ in 0..100 {
            b.deposit("m");
        }
        let granted = (0..50).filter(|_| b.withdraw("m")).count();
        assert_eq!(granted, 10);
        clock.advance(Duration::from_secs(11));
        assert!(!b.withdraw("m"), "old calls left the window");
        let floor = RetryBudget::new(0.0, 1, Arc::new(clock.clone()));
        floor.deposit("m");
        assert_eq!(
            (0..50).filter(|_| floor.withdraw("m")).count(),
            10,
            "1 a second over 10 s"
        );
    }
}
