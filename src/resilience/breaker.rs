//! Circuit breakers, one per target.

use hashbrown::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, duration_nanos};
use crate::{Error, Result};

/// Buckets of the failure-rate window.
const BUCKETS: usize = 10;
/// Most targets tracked; a catalogue rarely has more than a few dozen.
const MAX_TARGETS: usize = 1_024;

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls fail fast until the open interval ends.
    Open,
    /// A limited number of probe calls test whether the target recovered.
    HalfOpen,
}

impl BreakerState {
    /// A stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// As a number for a gauge: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// When a breaker opens and how it recovers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Opens after this many target failures in a row (default 5).
    pub consecutive_failures: u32,
    /// Opens when the failure share over `window` reaches this (default 0.5)...
    pub failure_rate: f64,
    /// ...with at least this many calls in the window (default 20).
    pub min_calls: u32,
    /// The rolling window of the failure rate (default 30 s).
    pub window: Duration,
    /// How long it stays open before probing (default 30 s).
    pub open_for: Duration,
    /// Probe calls let through while half-open; all must succeed to close (default 1).
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_calls: 20,
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
        }
    }
}

impl BreakerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.consecutive_failures == 0 || self.half_open_probes == 0 || self.min_calls == 0 {
            return Err(Error::Config("breaker: counts must be at least 1".into()));
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err(Error::Config(
                "breaker: failure_rate must be in (0, 1]".into(),
            ));
        }
        if self.window < Duration::from_millis(BUCKETS as u64) || self.open_for.is_zero() {
            return Err(Error::Config(
                "breaker: window and open_for must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    start: u64,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    consecutive: u32,
    buckets: [Bucket; BUCKETS],
    open_until: u64,
    probes_out: u32,
    probes_ok: u32,
    /// The state last reported by [`Breakers::record`], if any.
    reported: Option<BreakerState>,
}

impl Breaker {
    fn new() -> Self {
        Breaker {
            state: BreakerState::Closed,
            consecutive: 0,
            buckets: [Bucket::default(); BUCKETS],
            open_until: 0,
            probes_out: 0,
            probes_ok: 0,
            reported: None,
        }
    }

    /// The state at `now`: an open breaker whose time is up is half-open.
    fn state_at(&mut self, now: u64) -> BreakerState {
        if self.state == BreakerState::Open && now >= self.open_until {
            self.state = BreakerState::HalfOpen;
            self.probes_out = 0;
            self.probes_ok = 0;
        }
        self.state
    }
}

/// What a breaker allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// A normal call.
    Call,
    /// A half-open probe: its outcome decides the breaker.
    Probe,
}

/// The circuit breakers of a pipeline, one per target (model), created on first use.
///
/// Target failures (429, 5xx, timeouts, connection errors, invalid responses) count;
/// client errors (bad request, auth, context length, content filter) never do.
#[derive(Debug, Clone)]
pub struct Breakers {
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    map: Arc<Mutex<HashMap<String, Breaker>>>,
}

impl Breakers {
    /// Breakers with `config` on `clock`.
    pub fn new(config: BreakerConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        config.validate()?;
        Ok(Breakers {
            config,
            clock,
            map: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Breaker>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of `target`'s breaker (closed if it has none yet).
    pub fn state(&self, target: &str) -> BreakerState {
        let now = self.clock.now().as_nanos();
        let mut map = self.lock();
        match map.get_mut(target) {
            Some(b) => b.state_at(now),
            None => BreakerState::Closed,
        }
    }

    /// Every tracked target's state.
    pub fn states(&self) -> Vec<(String, BreakerState)> {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        let mut out: Vec<(String, BreakerState)> = names
            .into_iter()
            .map(|n| {
                let s = self.state(&n);
                (n, s)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Asks to call `target`. Open: refused with the time until it half-opens.
    /// Half-open: a limited number of probes pass.
    pub(crate) fn admit(&self, target: &str) -> std::result::Result<Admit, Duration> {
        let now = self.clock.now().as_nanos();
        let mut map = self.lock();
        if !map.contains_key(target) {
            if map.len() >= MAX_TARGETS {
                // Unbounded target names would grow the map: untracked targets pass.
                return Ok(Admit::Call);
            }
            map.insert(target.to_owned(), Breaker::new());
        }
        let Some(b) = map.get_mut(target) else {
            return Ok(Admit::Call);
        };
        if b.state == BreakerState::Open {
            if now < b.open_until {
                return Err(Duration::from_nanos(b.open_until - now));
            }
            b.state = BreakerState::HalfOpen;
            b.probes_out = 0;
            b.probes_ok = 0;
        }
        match b.state {
            BreakerState::Closed => Ok(Admit::Call),
            BreakerState::HalfOpen if b.probes_out < self.config.half_open_probes => {
                b.probes_out += 1;
                Ok(Admit::Probe)
            }
            // Probes are out: wait for their verdict, briefly.
            _ => Err(self.config.open_for / 10),
        }
    }

    /// Records a call's outcome: `failed` for target failures only. Returns the
    /// breaker's state when it is not the one last returned (its first call's state, then
    /// each change): what a state gauge needs, without a report on every call.
    pub(crate) fn record(&self, target: &str, admit: Admit, failed: bool) -> Option<BreakerState> {
        let now = self.clock.now().as_nanos();
        let cfg = self.config;
        let mut map = self.lock();
        let b = map.get_mut(target)?;
        Self::judge(b, target, cfg, now, admit, failed);
        let state = b.state_at(now);
        (b.reported != Some(state)).then(|| {
            b.reported = Some(state);
            state
        })
    }

    fn judge(
        b: &mut Breaker,
        target: &str,
        cfg: BreakerConfig,
        now: u64,
        admit: Admit,
        failed: bool,
    ) {
        let bucket_ns = (duration_nanos(cfg.window) / BUCKETS as u64).max(1);
        let start = now / bucket_ns * bucket_ns;
        let slot = &mut b.buckets[((now / bucket_ns) % BUCKETS as u64) as usize];
        if slot.start != start {
            *slot = Bucket {
                start,
                calls: 0,
                failures: 0,
            };
        }
        slot.calls += 1;
        slot.failures += u32::from(failed);
        let open = |b: &mut Breaker| {
            b.state = BreakerState::Open;
            b.open_until = now.saturating_add(duration_nanos(cfg.open_for));
            b.consecutive = 0;
            b.buckets = [Bucket::default(); BUCKETS];
            tracing::warn!(target = %target, "circuit breaker opened");
        };
        match (b.state, admit) {
            (BreakerState::HalfOpen, Admit::Probe) => {
                if failed {
                    open(b);
                } else {
                    b.probes_ok += 1;
                    if b.probes_ok >= cfg.half_open_probes {
                        b.state = BreakerState::Closed;
                        b.consecutive = 0;
                        tracing::info!(target = %target, "circuit breaker closed");
                    }
                }
            }
            (BreakerState::Closed, _) => {
                b.consecutive = if failed { b.consecutive + 1 } else { 0 };
                let horizon = now.saturating_sub(duration_nanos(cfg.window));
                let (calls, failures) = b
                    .buckets
                    .iter()
                    .filter(|k| k.start >= horizon && k.calls > 0)
                    .fold((0u32, 0u32), |(c, f), k| (c + k.calls, f + k.failures));
                let rate_trips = calls >= cfg.min_calls
                    && f64::from(failures) >= cfg.failure_rate * f64::from(calls);
                if b.consecutive >= cfg.consecutive_failures || (failed && rate_trips) {
                    open(b);
                }
            }
            _ => {}
        }
    }

    /// Records how a stream ended, once its first event was recorded with
    /// [`record`](Self::record) for a probe (a normal call's stream is judged only
    /// here). Cut upstream (`failed`), a stream is a failure of its target whatever
    /// admitted it; a probe's clean end adds nothing, its first event was its verdict.
    pub(crate) fn record_stream_end(
        &self,
        target: &str,
        admit: Admit,
        failed: bool,
    ) -> Option<BreakerState> {
        match admit {
            Admit::Call => self.record(target, Admit::Call, failed),
            Admit::Probe if failed => self.record(target, Admit::Call, true),
            Admit::Probe => None,
        }
    }

    /// Gives back a probe whose call was abandoned before it had an outcome, so the
    /// breaker does not wait forever for its verdict.
    pub(crate) fn cancel(&self, target: &str, admit: Admit) {
        if admit != Admit::Probe {
            return;
        }
        let mut map = self.lock();
        if let Some(b) = map.get_mut(target) {
            if b.state == BreakerState::HalfOpen {
                b.probes_out = b.probes_out.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::clock::Timestamp;

    fn breakers(clock: &ManualClock, cfg: BreakerConfig) -> Breakers {
        Breakers::new(cfg, Arc::new(clock.clone())).unwrap()
    }

    #[test]
    fn a_state_is_reported_at_the_first_call_and_then_on_each_change() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let b = breakers(&clock, BreakerConfig::default());
        let a = b.admit("m").unwrap();
        assert_eq!(b.record("m", a, false), Some(BreakerState::Closed));
        let a = b.admit("m").unwrap();
        assert_eq!(
            b.record("m", a, false),
            None,
            "unchanged: not reported again"
        );
        let mut reports = Vec::new();
        while let Ok(a) = b.admit("m") {
            reports.extend(b.record("m", a, true));
        }
        assert_eq!(reports, [BreakerState::Open]);
        assert_eq!(b.record("unknown", Admit::Call, true), None);
    }

    #[test]
    fn opens_on_consecutive_failures_and_probes_half_open() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let b = breakers(&clock, BreakerConfig::default());
        for _ in 0..4 {
            let a = b.admit("m").unwrap();
            b.record("m", a, true);
        }
        assert_eq!(b.state("m"), BreakerState::Closed);
        let a = b.admit("m").unwrap();
        b.record("m", a, true);
        assert_eq!(b.state("m"), BreakerState::Open);
        assert_eq!(b.admit("m"), Err(Duration::from_secs(30)));
        clock.advance(Duration::from_secs(30));
        // one probe only
        assert_eq!(b.admit("m"), Ok(Admit::Probe));
        assert!(b.admit("m").is_err());
        b.record("m", Admit::Probe, true);
        assert_eq!(b.state("m"), BreakerState::Open, "a failed probe reopens");
        clock.advance(Duration::from_secs(30));
        assert_eq!(b.admit("m"), Ok(Admit::Probe));
        b.record("m", Admit::Probe, false);
        assert_eq!(b.state("m"), BreakerState::Closed);
        assert_eq!(b.admit("m"), Ok(Admit::Call));
    }

    #[test]
    fn opens_on_failure_rate_but_not_on_client_errors() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let cfg = BreakerConfig {
            consecutive_failures: 100,
            min_calls: 10,
            ..BreakerConfig::default()
        };
        let b = breakers(&clock, cfg);
        // alternate failure and success: never 100 in a row, but a 50 % rate; it trips on
        // the first failure once the window holds 10 calls
        for i in 0..11 {
            let a = b.admit("m").unwrap();
            b.record("m", a, i % 2 == 0);
            clock.advance(Duration::from_millis(100));
        }
        assert_eq!(b.state("m"), BreakerState::Open);
        // client errors are recorded as successes for the target's health
        let c = breakers(&clock, BreakerConfig::default());
        for _ in 0..50 {
            let a = c.admit("x").unwrap();
            c.record("x", a, false);
        }
        assert_eq!(c.state("x"), BreakerState::Closed);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let cfg = BreakerConfig {
            consecutive_failures: 100,
            min_calls: 4,
            ..BreakerConfig::default()
        };
        let b = breakers(&clock, cfg);
        for _ in 0..3 {
            let a = b.admit("m").unwrap();
            b.record("m", a, true);
        }
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            let a = b.admit("m").unwrap();
            b.record("m", a, false);
        }
        let a = b.admit("m").unwrap();
        b.record("m", a, true);
        assert_eq!(
            b.state("m"),
            BreakerState::Closed,
            "1 failure in 4 recent calls"
        );
    }
}
