//! The in-memory keyed GCRA limiter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::{Admission, LimitRule, Limiter, Quota, Unit, nonzero};
use crate::clock::{Clock, default_clock, duration_nanos};
use crate::types::{RequestMeta, ScopeKind, Tier};
use crate::{Error, Result};

/// Builds a [`GcraLimiter`].
#[derive(Debug, Clone)]
#[must_use]
pub struct GcraLimiterBuilder {
    rules: Vec<LimitRule>,
    max_keys: usize,
    premium_permille: u64,
    free_permille: u64,
    clock: Option<Arc<dyn Clock>>,
    error: Option<String>,
}

impl GcraLimiterBuilder {
    /// Limits requests on `scope` (each user, each org, ...) to `quota`.
    pub fn requests(mut self, scope: ScopeKind, quota: Quota) -> Self {
        self.rules.push(LimitRule {
            scope,
            unit: Unit::Requests,
            quota,
        });
        self
    }

    /// Limits tokens (prompt plus output) on `scope` to `quota`.
    pub fn tokens(mut self, scope: ScopeKind, quota: Quota) -> Self {
        self.rules.push(LimitRule {
            scope,
            unit: Unit::Tokens,
            quota,
        });
        self
    }

    /// Adds a rule.
    pub fn rule(mut self, rule: LimitRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Requests per minute on `scope`, with a burst of the whole minute's amount.
    pub fn requests_per_minute(self, scope: ScopeKind, n: u64) -> Self {
        match nonzero(n, "requests per minute") {
            Ok(n) => self.requests(scope, Quota::per_minute(n)),
            Err(e) => self.fail(e),
        }
    }

    /// Tokens per minute on `scope`, with a burst of the whole minute's amount.
    pub fn tokens_per_minute(self, scope: ScopeKind, n: u64) -> Self {
        match nonzero(n, "tokens per minute") {
            Ok(n) => self.tokens(scope, Quota::per_minute(n)),
            Err(e) => self.fail(e),
        }
    }

    fn fail(mut self, e: Error) -> Self {
        if self.error.is_none() {
            self.error = Some(e.to_string());
        }
        self
    }

    /// How much more premium-tier requests get on every scope but global (default 2.0).
    pub fn premium_multiplier(self, m: f64) -> Self {
        match permille(m) {
            Some(p) => Self {
                premium_permille: p,
                ..self
            },
            None => self.fail(Error::Config(format!(
                "premium multiplier must be positive and finite, got {m}"
            ))),
        }
    }

    /// How much free-tier requests get on every scope but global (default 1.0).
    pub fn free_multiplier(self, m: f64) -> Self {
        match permille(m) {
            Some(p) => Self {
                free_permille: p,
                ..self
            },
            None => self.fail(Error::Config(format!(
                "free multiplier must be positive and finite, got {m}"
            ))),
        }
    }

    /// The most keys tracked at once (default 100,000). Keys whose allowance has fully
    /// refilled are evicted first; when every tracked key is still active, requests for
    /// new keys are refused with [`Error::Overloaded`] rather than let memory grow.
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// The clock (default: [`TokioClock`](crate::TokioClock)).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the limiter.
    pub fn build(self) -> Result<GcraLimiter> {
        if let Some(e) = self.error {
            return Err(Error::Config(format!("limiter: {e}")));
        }
        if self.max_keys == 0 {
            return Err(Error::Config("limiter: max_keys must be at least 1".into()));
        }
        let rules = self
            .rules
            .iter()
            .map(|r| CompiledRule {
                rule: *r,
                period_ns: u128::from(duration_nanos(r.quota.period)),
                amount: u128::from(r.quota.amount.get()),
                tau_ns: u128::from(duration_nanos(r.quota.period))
                    * u128::from(r.quota.burst.get())
                    / u128::from(r.quota.amount.get()),
            })
            .collect::<Vec<_>>();
        Ok(GcraLimiter {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    tats: rules.iter().map(|_| HashMap::new()).collect(),
                    len: 0,
                    next_sweep: 0,
                }),
                rules,
                max_keys: self.max_keys,
                premium_permille: self.premium_permille,
                free_permille: self.free_permille,
                clock: self.clock.unwrap_or_else(default_clock),
            }),
        })
    }
}

fn permille(m: f64) -> Option<u64> {
    if m.is_finite() && m > 0.0 && m < 1e6 {
        Some(((m * 1000.0).round() as u64).max(1))
    } else {
        None
    }
}

#[derive(Debug)]
struct CompiledRule {
    rule: LimitRule,
    period_ns: u128,
    amount: u128,
    /// Burst tolerance: how far ahead of now the theoretical arrival time may run.
    tau_ns: u128,
}

#[derive(Debug)]
struct State {
    /// Per rule: key → theoretical arrival time (ns since epoch). A key whose TAT is not
    /// after now is fully refilled and equivalent to an absent key.
    tats: Vec<HashMap<Box<str>, u64>>,
    len: usize,
    next_sweep: u64,
}

#[derive(Debug)]
struct Inner {
    rules: Vec<CompiledRule>,
    state: Mutex<State>,
    max_keys: usize,
    premium_permille: u64,
    free_permille: u64,
    clock: Arc<dyn Clock>,
}

/// A keyed GCRA (generic cell rate algorithm) limiter, in memory.
///
/// Each rule holds one theoretical arrival time per key, so a check is a few hash
/// lookups under one lock; all rules a request falls under are decided together and
/// consumed only if all admit it. Refusals carry the exact time until the request
/// would be admitted. Fully refilled keys carry no information and are evicted when
/// the key bound is reached, so memory stays bounded.
///
/// Tier multipliers scale the rate and burst of every scope but global.
///
/// ```
/// use tokenwise::limiter::GcraLimiter;
/// use tokenwise::{RequestMeta, ScopeKind};
/// let limiter = GcraLimiter::builder()
///     .requests_per_minute(ScopeKind::User, 60)
///     .tokens_per_minute(ScopeKind::Org, 100_000)
///     .requests_per_minute(ScopeKind::Global, 10_000)
///     .build()
///     .unwrap();
/// let mut meta = RequestMeta::default();
/// meta.user = Some("ann".into());
/// assert!(limiter.check(&meta, 500).is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct GcraLimiter {
    inner: Arc<Inner>,
}

impl GcraLimiter {
    /// A builder with no rules, 100,000 keys, premium ×2.
    pub fn builder() -> GcraLimiterBuilder {
        GcraLimiterBuilder {
            rules: Vec::new(),
            max_keys: 100_000,
            premium_permille: 2000,
            free_permille: 1000,
            clock: None,
            error: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Updates are applied only after every rule was checked, so a panic cannot leave
        // a half-applied request behind: a poisoned state is still consistent.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys currently tracked.
    pub fn tracked_keys(&self) -> usize {
        self.lock().len
    }

    fn multiplier(&self, scope: ScopeKind, tier: Tier) -> u128 {
        if scope == ScopeKind::Global {
            return 1000;
        }
        u128::from(match tier {
            Tier::Premium => self.inner.premium_permille,
            Tier::Free => self.inner.free_permille,
            Tier::Standard => 1000,
        })
    }

    /// Synchronous check-and-consume: what [`Limiter::acquire`] does, without a future.
    pub fn check(&self, meta: &RequestMeta, tokens: u64) -> Result<()> {
        let now = self.inner.clock.now().as_nanos();
        let mut state = self.lock();
        // (rule index, key, new TAT) for every rule that applies.
        let mut updates: Vec<(usize, &str, u64)> = Vec::with_capacity(self.inner.rules.len());
        let mut refusal: Option<(u128, usize)> = None;
        for (i, r) in self.inner.rules.iter().enumerate() {
            let Some(key) = r.rule.scope.key_of(meta) else {
                continue;
            };
            let n = match r.rule.unit {
                Unit::Requests => 1,
                Unit::Tokens => u128::from(tokens),
            };
            if n == 0 {
                continue;
            }
            let mult = self.multiplier(r.rule.scope, meta.tier);
            // Time one request consumes: n units at amount*mult per period.
            let inc = (n * r.period_ns * 1000).div_ceil(r.amount * mult);
            if inc > r.tau_ns {
                let most = r.rule.quota.burst().get() as u128 * mult / 1000;
                return Err(Error::InvalidRequest(format!(
                    "request needs {n} {} but the {} limit allows at most {most} at once; lower max_tokens or the prompt",
                    unit_name(r.rule.unit),
                    r.rule.scope,
                )));
            }
            let now128 = u128::from(now);
            let tat = state.tats[i]
                .get(key)
                .copied()
                .map_or(now128, |t| u128::from(t).max(now128));
            let new_tat = tat + inc;
            let allow_at = new_tat - r.tau_ns;
            if allow_at > now128 {
                let wait = allow_at - now128;
                if refusal.is_none_or(|(w, _)| wait > w) {
                    refusal = Some((wait, i));
                }
                continue;
            }
            updates.push((i, key, u64::try_from(new_tat).unwrap_or(u64::MAX)));
        }
        if let Some((wait, i)) = refusal {
            let scope = self.inner.rules[i]
                .rule
                .scope
                .scope_of(meta)
                .unwrap_or(crate::types::Scope::Global);
            return Err(Error::RateLimited {
                scope,
                retry_after: Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX)),
            });
        }
        let new_keys = updates
            .iter()
            .filter(|(i, k, _)| !state.tats[*i].contains_key(*k))
            .count();
        if state.len + new_keys > self.inner.max_keys {
            self.sweep(&mut state, now);
            if state.len + new_keys > self.inner.max_keys {
                return Err(Error::Overloaded {
                    retry_after: Some(Duration::from_secs(1)),
                });
            }
        }
        for (i, key, tat) in updates {
            match state.tats[i].get_mut(key) {
                Some(t) => *t = tat,
                None => {
                    state.tats[i].insert(key.into(), tat);
                    state.len += 1;
                }
            }
        }
        Ok(())
    }

    /// Removes fully refilled keys; at most once a second of clock time.
    fn sweep(&self, state: &mut State, now: u64) {
        if now < state.next_sweep {
            return;
        }
        state.next_sweep = now.saturating_add(1_000_000_000);
        let mut len = 0;
        for map in &mut state.tats {
            map.retain(|_, tat| *tat > now);
            len += map.len();
        }
        state.len = len;
    }

    /// Synchronous reconciliation: what [`Limiter::reconcile`] does, without a future.
    pub fn reconcile_now(&self, meta: &RequestMeta, charged: u64, actual: u64) {
        if charged == actual {
            return;
        }
        let now = self.inner.clock.now().as_nanos();
        let mut state = self.lock();
        for (i, r) in self.inner.rules.iter().enumerate() {
            if r.rule.unit != Unit::Tokens {
                continue;
            }
            let Some(key) = r.rule.scope.key_of(meta) else {
                continue;
            };
            let mult = self.multiplier(r.rule.scope, meta.tier);
            let delta = u128::from(charged.abs_diff(actual));
            let shift = (delta * r.period_ns * 1000).div_ceil(r.amount * mult);
            let shift = u64::try_from(shift).unwrap_or(u64::MAX);
            if actual > charged {
                // More was used than charged: the debt counts even if it overshoots.
                match state.tats[i].get_mut(key) {
                    Some(t) => *t = (*t).max(now).saturating_add(shift),
                    None => {
                        state.tats[i].insert(key.into(), now.saturating_add(shift));
                        state.len += 1;
                    }
                }
            } else if let Some(t) = state.tats[i].get_mut(key) {
                *t = t.saturating_sub(shift).max(now);
            }
        }
    }
}

fn unit_name(u: Unit) -> &'static str {
    match u {
        Unit::Requests => "requests",
        Unit::Tokens => "tokens",
    }
}

#[async_trait]
impl Limiter for GcraLimiter {
    async fn acquire(&self, req: &Admission<'_>) -> Result<()> {
        self.check(req.meta, req.tokens)
    }

    async fn reconcile(&self, meta: &RequestMeta, charged: u64, actual: u64) -> Result<()> {
        self.reconcile_now(meta, charged, actual);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Timestamp};
    use crate::types::Scope;
    use std::num::NonZeroU64;

    fn meta(user: &str) -> RequestMeta {
        RequestMeta {
            user: Some(user.into()),
            org: Some("acme".into()),
            ..Default::default()
        }
    }

    fn limiter(clock: &ManualClock, b: GcraLimiterBuilder) -> GcraLimiter {
        b.clock(Arc::new(clock.clone())).build().unwrap()
    }

    #[test]
    fn refill_with_exact_retry_after() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let nz = |n| NonZeroU64::new(n).unwrap();
        let l = limiter(
            &clock,
            GcraLimiter::builder().requests(
                ScopeKind::User,
                Quota::per_minute(nz(60)).allow_burst(nz(3)),
            ),
        );
        let m = meta("ann");
        for _ in 0..3 {
            l.check(&m, 0).unwrap();
        }
        match l.check(&m, 0) {
            Err(Error::RateLimited { scope, retry_after }) => {
                assert_eq!(scope, Scope::User("ann".into()));
                assert_eq!(retry_after, Duration::from_secs(1));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        clock.advance(Duration::from_millis(400));
        match l.check(&m, 0) {
            Err(Error::RateLimited { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_millis(600))
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        clock.advance(Duration::from_millis(600));
        l.check(&m, 0).unwrap();
        // another user is unaffected
        l.check(&meta("bob"), 0).unwrap();
    }

    #[test]
    fn all_or_nothing_across_scopes() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let l = limiter(
            &clock,
            GcraLimiter::builder()
                .requests_per_minute(ScopeKind::User, 100)
                .requests_per_minute(ScopeKind::Global, 2),
        );
        l.check(&meta("a"), 0).unwrap();
        l.check(&meta("b"), 0).unwrap();
        for _ in 0..5 {
            let e = l.check(&meta("c"), 0).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::RateLimited {
                        scope: Scope::Global,
                        ..
                    }
                ),
                "{e}"
            );
        }
        // "c" was refused by global five times: none of it counted against c's user limit.
        let state = l.lock();
        assert!(!state.tats[0].contains_key("c"));
    }

    #[test]
    fn tokens_reconcile_and_premium_multiplier() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let l = limiter(
            &clock,
            GcraLimiter::builder().tokens_per_minute(ScopeKind::User, 1_000),
        );
        let m = meta("ann");
        l.check(&m, 800).unwrap();
        assert!(l.check(&m, 300).is_err());
        // the call used only 100 of the 800 charged
        l.reconcile_now(&m, 800, 100);
        l.check(&m, 300).unwrap();
        assert!(matches!(l.check(&m, 5_000), Err(Error::InvalidRequest(_))));

        let mut p = meta("pat");
        p.tier = Tier::Premium;
        l.check(&p, 1_500).unwrap();
        l.check(&p, 500).unwrap();
        assert!(l.check(&p, 100).is_err());
    }

    #[test]
    fn idle_keys_are_evicted_and_the_bound_holds() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let l = limiter(
            &clock,
            GcraLimiter::builder()
                .requests_per_minute(ScopeKind::User, 60)
                .max_keys(3),
        );
        for u in ["a", "b", "c"] {
            l.check(&meta(u), 0).unwrap();
        }
        assert!(matches!(
            l.check(&meta("d"), 0),
            Err(Error::Overloaded { .. })
        ));
        assert_eq!(l.tracked_keys(), 3);
        clock.advance(Duration::from_secs(2));
        l.check(&meta("d"), 0).unwrap();
        assert_eq!(l.tracked_keys(), 1);
    }
}
