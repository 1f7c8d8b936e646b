//! The in-memory keyed GCRA limiter.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use smallvec::SmallVec;

use super::core::{Compiled, Core, Item, Refusal};
use super::{Admission, LimitRule, Limiter, Quota, Unit, nonzero};
use crate::clock::{Clock, default_clock};
use crate::types::{RequestMeta, Scope, ScopeKind, Tier};
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

    /// Requests per day on `scope`, with a burst of the whole day's amount.
    pub fn requests_per_day(self, scope: ScopeKind, n: u64) -> Self {
        match nonzero(n, "requests per day") {
            Ok(n) => self.requests(scope, Quota::per_day(n)),
            Err(e) => self.fail(e),
        }
    }

    /// Tokens per day on `scope`, with a burst of the whole day's amount.
    pub fn tokens_per_day(self, scope: ScopeKind, n: u64) -> Self {
        match nonzero(n, "tokens per day") {
            Ok(n) => self.tokens(scope, Quota::per_day(n)),
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

    /// The clock (default: [`TscClock`](crate::TscClock), or [`TokioClock`](crate::TokioClock) when built under paused tokio time; see [`clock`](crate::clock)).
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
        let core = Core::new(
            self.rules
                .iter()
                .map(|r| (Compiled::new(&r.quota), r.scope == ScopeKind::Global))
                .collect(),
            self.max_keys,
        );
        Ok(GcraLimiter {
            inner: Arc::new(Inner {
                rules: self.rules,
                core,
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
struct Inner {
    rules: Vec<LimitRule>,
    core: Core,
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
///     .requests_per_day(ScopeKind::User, 2_000)
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

    /// Keys currently tracked.
    pub fn tracked_keys(&self) -> usize {
        self.inner.core.len()
    }

    /// The rules.
    pub fn rules(&self) -> &[LimitRule] {
        &self.inner.rules
    }

    fn multiplier(&self, scope: ScopeKind, tier: Tier) -> u64 {
        if scope == ScopeKind::Global {
            return 1000;
        }
        match tier {
            Tier::Premium => self.inner.premium_permille,
            Tier::Free => self.inner.free_permille,
            Tier::Standard => 1000,
        }
    }

    /// The checks `meta` falls under, charging `tokens` to token rules.
    /// Written into the caller's buffer: returning the inline array by value costs a copy.
    #[inline]
    fn items<'m>(
        &self,
        meta: &'m RequestMeta,
        tokens: u64,
        only_tokens: bool,
        items: &mut SmallVec<[Item<'m>; 4]>,
    ) {
        for (quota, r) in self.inner.rules.iter().enumerate() {
            if only_tokens && r.unit != Unit::Tokens {
                continue;
            }
            let Some(key) = r.scope.key_of(meta) else {
                continue;
            };
            let units = match r.unit {
                Unit::Requests => 1,
                Unit::Tokens => tokens,
            };
            items.push(Item {
                quota,
                key,
                units,
                mult: self.multiplier(r.scope, meta.tier),
            });
        }
    }

    /// Synchronous check-and-consume: what [`Limiter::acquire`] does, without a future.
    pub fn check(&self, meta: &RequestMeta, tokens: u64) -> Result<()> {
        let mut items = SmallVec::new();
        self.items(meta, tokens, false, &mut items);
        let now = self.inner.clock.now().as_nanos();
        self.inner.core.check(now, &items).map_err(|refusal| {
            let rule = |index: usize| &self.inner.rules[items[index].quota];
            match refusal {
                Refusal::Wait { index, wait } => Error::RateLimited {
                    scope: rule(index).scope.scope_of(meta).unwrap_or(Scope::Global),
                    retry_after: wait,
                },
                Refusal::TooLarge { index, most } => Error::InvalidRequest(format!(
                    "request needs {} {} but the {} limit allows at most {most} at once; lower max_tokens or the prompt",
                    items[index].units,
                    unit_name(rule(index).unit),
                    rule(index).scope,
                )),
                Refusal::Full => Error::Overloaded { retry_after: Some(Duration::from_secs(1)) },
            }
        })
    }

    /// Synchronous reconciliation: what [`Limiter::reconcile`] does, without a future.
    pub fn reconcile_now(&self, meta: &RequestMeta, charged: u64, actual: u64) {
        if charged == actual {
            return;
        }
        let mut items = SmallVec::new();
        self.items(meta, charged.abs_diff(actual), true, &mut items);
        let now = self.inner.clock.now().as_nanos();
        self.inner.core.adjust(now, &items, actual > charged);
    }

    /// Waits until the request is admitted, or until waiting longer would exceed
    /// `max_wait`; each wait is the limiter's exact `retry_after` plus up to 10 % jitter,
    /// so that refused clients do not return in lockstep. At most 16 waits.
    pub async fn until_ready(
        &self,
        meta: &RequestMeta,
        tokens: u64,
        max_wait: Duration,
    ) -> Result<()> {
        wait_until_admitted(max_wait, || {
            let r = self.check(meta, tokens);
            async move { r }
        })
        .await
    }
}

/// Calls `attempt` until it succeeds, sleeping (on tokio time) through each
/// `RateLimited { retry_after }` plus up to 10 % jitter, as long as the total stays
/// within `max_wait` and at most 16 times. Any other error returns at once.
pub(crate) async fn wait_until_admitted<F, Fut>(max_wait: Duration, mut attempt: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    use rand::Rng;
    let mut waited = Duration::ZERO;
    for _ in 0..16 {
        match attempt().await {
            Err(Error::RateLimited { scope, retry_after }) => {
                let jitter_cap = u64::try_from((retry_after / 10).as_nanos()).unwrap_or(u64::MAX);
                let jitter = if jitter_cap == 0 {
                    0
                } else {
                    rand::rng().random_range(0..=jitter_cap)
                };
                let pause = retry_after.saturating_add(Duration::from_nanos(jitter));
                if waited.saturating_add(retry_after) > max_wait {
                    return Err(Error::RateLimited { scope, retry_after });
                }
                let pause = pause.min(max_wait.saturating_sub(waited).max(retry_after));
                tokio::time::sleep(pause).await;
                waited = waited.saturating_add(pause);
            }
            other => return other,
        }
    }
    attempt().await
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

    fn acquire_ready(&self, req: &Admission<'_>) -> Option<Result<()>> {
        Some(self.check(req.meta, req.tokens))
    }

    fn reconcile_ready(&self, meta: &RequestMeta, charged: u64, actual: u64) -> Option<Result<()>> {
        self.reconcile_now(meta, charged, actual);
        Some(Ok(()))
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
    fn ready_paths_admit_refuse_and_refund_as_the_futures_do() {
        use futures_util::FutureExt;
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let nz = |n| NonZeroU64::new(n).unwrap();
        let l = limiter(
            &clock,
            GcraLimiter::builder()
                .requests(
                    ScopeKind::User,
                    Quota::per_minute(nz(60)).allow_burst(nz(4)),
                )
                .tokens_per_minute(ScopeKind::User, 1_000),
        );
        let m = meta("ann");
        let asked = Admission::new(&m, 300);
        // the two paths draw on the same allowance
        l.acquire_ready(&asked).unwrap().unwrap();
        l.acquire(&asked).now_or_never().unwrap().unwrap();
        l.acquire_ready(&asked).unwrap().unwrap();
        let ready = l.acquire_ready(&asked).unwrap().unwrap_err();
        let awaited = l.acquire(&asked).now_or_never().unwrap().unwrap_err();
        assert_eq!(ready.to_string(), awaited.to_string());
        // a refund through either path makes room again
        l.reconcile_ready(&m, 300, 0).unwrap().unwrap();
        l.acquire_ready(&asked).unwrap().unwrap();
        l.reconcile(&m, 300, 0).now_or_never().unwrap().unwrap();
        assert!(l.acquire_ready(&Admission::new(&m, 300)).unwrap().is_err()); // requests: 4 of 4
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
        assert_eq!(l.tracked_keys(), 3, "a, b and global; nothing for c");
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
    fn a_clock_near_the_epoch_does_not_underflow() {
        // Regression: a burst tolerance longer than the time since the epoch.
        let clock = ManualClock::new(Timestamp::from_secs(1));
        let l = limiter(
            &clock,
            GcraLimiter::builder().requests_per_minute(ScopeKind::User, 60),
        );
        for _ in 0..60 {
            l.check(&meta("ann"), 0).unwrap();
        }
        assert!(matches!(
            l.check(&meta("ann"), 0),
            Err(Error::RateLimited { .. })
        ));
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
