//! Building a [`Pipeline`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Inner, Pipeline};
use crate::budget::{Budget, BudgetWindow, Degrade, MemoryBudget};
use crate::cache::{Cache, CacheScope, ExactCache};
use crate::clock::{Clock, default_clock};
use crate::context::{ContextBudget, CountCache, TiktokenCounter, TokenCounter};
use crate::limiter::{GcraLimiter, LimitRule, Limiter, Quota, TargetLimits, Unit};
use crate::observe::{MemoryUsage, UsageSink};
use crate::provider::Provider;
use crate::resilience::{
    BreakerConfig, Breakers, Concurrency, ConcurrencyConfig, Hedge, Latencies, RetryBudget,
    RetryPolicy,
};
use crate::router::{CatalogRouter, Deployments, Router, Validator};
use crate::types::{Anonymous, Catalog, Cost, ScopeKind};
use crate::{Error, Result};

#[derive(Debug)]
enum CacheChoice {
    Default { capacity: usize, ttl: Duration },
    Custom(Arc<dyn Cache>),
    Off,
}

/// Builds a [`Pipeline`]. Every setter takes `self` and returns it; [`build`](Self::build)
/// reports the first invalid setting.
///
/// Defaults: the built-in model catalogue, a [`CatalogRouter`] (with the default model
/// and fallbacks set here), an in-memory [`ExactCache`] (10,000 entries, one hour, per-org
/// scope), no rate limits, no spend caps, exact tiktoken counting, and the default clock (see [`clock`](crate::clock)). Rate
/// limits and caps set here configure the in-memory [`GcraLimiter`] and
/// [`MemoryBudget`]; [`limiter`](Self::limiter) and [`budget`](Self::budget) replace them.
///
/// ```
/// # fn main() -> tokenwise::Result<()> {
/// use std::time::Duration;
/// use tokenwise::provider::SimulatedProvider;
/// use tokenwise::budget::BudgetWindow;
/// use tokenwise::{Cost, Pipeline, ScopeKind};
///
/// let pipeline = Pipeline::builder()
///     .provider(SimulatedProvider::new())
///     .default_model("gpt-4o-mini")
///     .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
///     .rate_limit(ScopeKind::User, 60)
///     .token_limit(ScopeKind::Org, 200_000)
///     .spend_cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
///     .max_in_flight(256)
///     .attempt_timeout(Duration::from_secs(30))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use]
pub struct PipelineBuilder {
    catalog: Option<Catalog>,
    router: Option<Arc<dyn Router>>,
    default_model: Option<String>,
    fallbacks: Vec<(String, Vec<String>)>,
    escalations: Vec<(String, Vec<String>)>,
    providers: HashMap<String, Arc<dyn Provider>>,
    default_provider: Option<Arc<dyn Provider>>,
    cache: CacheChoice,
    cache_scope: CacheScope,
    limiter: Option<Arc<dyn Limiter>>,
    limits: Vec<LimitRule>,
    wait_for_limits: Option<Duration>,
    target_limits: Option<TargetLimits>,
    degrade: Vec<(u8, Degrade)>,
    max_cost: Option<Cost>,
    error: Option<Error>,
    budget: Option<Arc<dyn Budget>>,
    caps: Vec<(ScopeKind, Cost, BudgetWindow)>,
    counter: Option<Arc<dyn TokenCounter>>,
    validator: Option<Arc<dyn Validator>>,
    sink: Option<Arc<dyn UsageSink>>,
    clock: Option<Arc<dyn Clock>>,
    concurrency: Option<ConcurrencyConfig>,
    attempt_timeout: Option<Duration>,
    first_token_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    retry: RetryPolicy,
    breaker: Option<BreakerConfig>,
    hedge: Option<Hedge>,
    serve_stale: Option<Duration>,
    context: Option<ContextBudget>,
    deployments: HashMap<String, Deployments>,
    anonymous: Anonymous,
    require_identity: Vec<ScopeKind>,
    stream_recoveries: u32,
    batch: super::batch::BatchSetup,
}

impl Default for PipelineBuilder {
    fn default() -> Self {
        PipelineBuilder {
            catalog: None,
            router: None,
            default_model: None,
            fallbacks: Vec::new(),
            escalations: Vec::new(),
            providers: HashMap::new(),
            default_provider: None,
            cache: CacheChoice::Default {
                capacity: 10_000,
                ttl: crate::cache::DEFAULT_TTL,
            },
            cache_scope: CacheScope::default(),
            limiter: None,
            limits: Vec::new(),
            wait_for_limits: None,
            target_limits: None,
            degrade: Vec::new(),
            max_cost: None,
            error: None,
            budget: None,
            caps: Vec::new(),
            counter: None,
            validator: None,
            sink: None,
            clock: None,
            concurrency: None,
            attempt_timeout: None,
            first_token_timeout: None,
            idle_timeout: None,
            request_timeout: None,
            retry: RetryPolicy::default(),
            breaker: Some(BreakerConfig::default()),
            hedge: None,
            serve_stale: None,
            context: None,
            deployments: HashMap::new(),
            anonymous: Anonymous::default(),
            require_identity: Vec::new(),
            stream_recoveries: 2,
            batch: super::batch::BatchSetup::default(),
        }
    }
}

impl PipelineBuilder {
    /// The provider for every model whose provider has no provider of its own
    /// (see [`provider_for`](Self::provider_for)).
    pub fn provider(mut self, provider: impl Provider + 'static) -> Self {
        self.default_provider = Some(Arc::new(provider));
        self
    }

    /// Like [`provider`](Self::provider), for a shared provider.
    pub fn provider_arc(mut self, provider: Arc<dyn Provider>) -> Self {
        self.default_provider = Some(provider);
        self
    }

    /// The provider for models whose catalogue entry names `name` as their provider.
    pub fn provider_for(mut self, name: impl Into<String>, provider: Arc<dyn Provider>) -> Self {
        self.providers.insert(name.into(), provider);
        self
    }

    /// The model catalogue (default: [`Catalog::builtin`]).
    pub fn catalog(mut self, catalog: Catalog) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// The model for requests that name none (for the default router).
    pub fn default_model(mut self, model: impl Into<String>) -> Self {
        self.default_model = Some(model.into());
        self
    }

    /// When `model` fails, try `fallbacks` in order (for the default router).
    pub fn fallbacks<I, S>(mut self, model: impl Into<String>, fallbacks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.fallbacks.push((
            model.into(),
            fallbacks.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// When the validator rejects `model`'s answer, ask `models` (for the default router).
    pub fn escalate<I, S>(mut self, model: impl Into<String>, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.escalations
            .push((model.into(), models.into_iter().map(Into::into).collect()));
        self
    }

    /// Replaces the default router.
    pub fn router(mut self, router: Arc<dyn Router>) -> Self {
        self.router = Some(router);
        self
    }

    /// Replaces the default cache.
    pub fn cache(mut self, cache: Arc<dyn Cache>) -> Self {
        self.cache = CacheChoice::Custom(cache);
        self
    }

    /// Sizes the default exact cache.
    pub fn exact_cache(mut self, max_entries: usize, ttl: Duration) -> Self {
        self.cache = CacheChoice::Default {
            capacity: max_entries,
            ttl,
        };
        self
    }

    /// Turns caching off.
    pub fn no_cache(mut self) -> Self {
        self.cache = CacheChoice::Off;
        self
    }

    /// How far cached answers may travel between tenants (default: per org).
    pub fn cache_scope(mut self, scope: CacheScope) -> Self {
        self.cache_scope = scope;
        self
    }

    /// Adds a provider batch API for the models of its provider name (see
    /// [`Pipeline::batch`](super::Pipeline::batch)); replaces one of the same name.
    pub fn batch_provider(mut self, p: impl crate::batch::BatchProvider + 'static) -> Self {
        self.batch.add(Arc::new(p));
        self
    }

    /// How the batch path runs (see [`BatchOptions`](super::BatchOptions)).
    pub fn batch_options(mut self, options: super::BatchOptions) -> Self {
        match options.check() {
            Ok(()) => {
                self.batch.set_options(options);
                self
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(mut self, e: Error) -> Self {
        self.error.get_or_insert(e);
        self
    }

    /// Requests per minute on `scope` (each user, each org, everything, ...).
    pub fn rate_limit(self, scope: ScopeKind, per_minute: u64) -> Self {
        match crate::limiter::nonzero(per_minute, "a per-minute limit") {
            Ok(n) => self.limit(LimitRule {
                scope,
                unit: Unit::Requests,
                quota: Quota::per_minute(n),
            }),
            Err(e) => self.fail(e),
        }
    }

    /// Tokens (prompt plus output allowance, reconciled to actual use) per minute on `scope`.
    pub fn token_limit(self, scope: ScopeKind, per_minute: u64) -> Self {
        match crate::limiter::nonzero(per_minute, "a per-minute limit") {
            Ok(n) => self.limit(LimitRule {
                scope,
                unit: Unit::Tokens,
                quota: Quota::per_minute(n),
            }),
            Err(e) => self.fail(e),
        }
    }

    /// Any quota for the in-memory limiter: per day, per hour, with a burst, ...
    pub fn limit(mut self, rule: LimitRule) -> Self {
        self.limits.push(rule);
        self
    }

    /// Instead of refusing a rate-limited request at once, waits for its `retry_after`
    /// (plus up to 10 % jitter) while the total wait stays within `max_wait`.
    pub fn wait_for_limits(mut self, max_wait: Duration) -> Self {
        self.wait_for_limits = Some(max_wait);
        self
    }

    /// Per-model request and token quotas checked before each provider call: a target
    /// over its quota is skipped like one that answered 429.
    pub fn target_limits(mut self, limits: TargetLimits) -> Self {
        self.target_limits = Some(limits);
        self
    }

    /// Once a request's tightest spend cap is used to `percent` % or more, `mode`
    /// applies. Several thresholds may be set; the highest one reached wins.
    pub fn degrade_at(mut self, percent: u8, mode: Degrade) -> Self {
        self.degrade.push((percent, mode));
        self
    }

    /// The most any request may cost unless it sets its own
    /// ([`ChatRequest::max_cost`](crate::ChatRequest::max_cost)).
    pub fn max_cost_per_request(mut self, cost: Cost) -> Self {
        self.max_cost = Some(cost);
        self
    }

    /// Replaces the in-memory limiter (and the limits set with `rate_limit` / `token_limit`).
    pub fn limiter(mut self, limiter: Arc<dyn Limiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Caps spend on `scope` at `limit` per `window`.
    pub fn spend_cap(mut self, scope: ScopeKind, limit: Cost, window: BudgetWindow) -> Self {
        self.caps.push((scope, limit, window));
        self
    }

    /// Replaces the in-memory budget (and the caps set with `spend_cap`).
    pub fn budget(mut self, budget: Arc<dyn Budget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Replaces the tiktoken counter.
    pub fn token_counter(mut self, counter: Arc<dyn TokenCounter>) -> Self {
        self.counter = Some(counter);
        self
    }

    /// Judges answers; a rejected answer is escalated along the route's escalation tier.
    pub fn validator(mut self, validator: Arc<dyn Validator>) -> Self {
        self.validator = Some(validator);
        self
    }

    /// Also sends every usage record to `sink` (the pipeline keeps its own report too).
    pub fn usage_sink(mut self, sink: Arc<dyn UsageSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// The clock for TTLs, limits and windows (default: [`TscClock`](crate::TscClock), or [`TokioClock`](crate::TokioClock) when built under paused tokio time; see [`clock`](crate::clock)).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The most requests in flight (streams until they end); more are refused at once
    /// with [`Error::Overloaded`]. Shorthand for a fixed [`concurrency`](Self::concurrency)
    /// limit with no queue.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.concurrency = Some(ConcurrencyConfig::fixed(n));
        self
    }

    /// Bounded, optionally adaptive concurrency with a priority queue and per-key caps.
    pub fn concurrency(mut self, cfg: ConcurrencyConfig) -> Self {
        self.concurrency = Some(cfg);
        self
    }

    /// The deadline of one provider call (default: none).
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = Some(d);
        self
    }

    /// The deadline to a stream's first event (default: the attempt timeout). A stream
    /// that misses it falls back like a failed call.
    pub fn first_token_timeout(mut self, d: Duration) -> Self {
        self.first_token_timeout = Some(d);
        self
    }

    /// The longest silence between two events of a stream; then the stream ends with an
    /// error (default: none).
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = Some(d);
        self
    }

    /// One deadline for all of a request's calls, retries and backoff (default: none).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = Some(d);
        self
    }

    /// How each target is retried (default: [`RetryPolicy::default`], 3 attempts within a
    /// retry budget of 20 % of calls plus 1 a second).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Circuit breaker settings (default: [`BreakerConfig::default`]).
    pub fn breaker(mut self, cfg: BreakerConfig) -> Self {
        self.breaker = Some(cfg);
        self
    }

    /// Turns circuit breakers off.
    pub fn no_breaker(mut self) -> Self {
        self.breaker = None;
        self
    }

    /// Races a slow first target against the next one (default: off).
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        self.hedge = Some(hedge);
        self
    }

    /// When every target fails, serves a cached answer that expired at most `d` ago
    /// (the default exact cache keeps expired entries that long).
    pub fn serve_stale_for(mut self, d: Duration) -> Self {
        self.serve_stale = Some(d);
        self
    }

    /// Fits every request into each target's context window at dispatch (see
    /// [`ContextBudget`]); without it, a request that does not fit a target is refused
    /// with [`Error::ContextTooLong`] for that target.
    pub fn context_budget(mut self, budget: ContextBudget) -> Self {
        self.context = Some(budget);
        self
    }

    /// Spreads the calls to `model` over several deployments (keys, regions, base URLs).
    pub fn deployments(mut self, model: impl Into<String>, deployments: Deployments) -> Self {
        self.deployments.insert(model.into(), deployments);
        self
    }

    /// What to do with a request that carries no identity for a scope the pipeline's
    /// limits or caps use (no `.user()` under a per-user limit, say). By default
    /// ([`Anonymous::SharedBucket`]) such requests share one bucket per scope kind
    /// ([`ANONYMOUS`](crate::types::ANONYMOUS)) and are limited and capped together;
    /// [`Anonymous::Refuse`] refuses them. Never a silent bypass.
    pub fn anonymous(mut self, policy: Anonymous) -> Self {
        self.anonymous = policy;
        self
    }

    /// How many times a stream cut after its first token (an error, a stall past the
    /// idle timeout, an end without a final event) is recovered: continued where it
    /// stopped on the same model when its catalogue entry accepts assistant prefill,
    /// else restarted on the same or a later target with the text already sent
    /// withheld. A restart whose text differs from what was sent ends with a typed
    /// error, never a spliced answer. Every attempt is billed for what it produced.
    /// Default 2; 0 turns recovery off (per request:
    /// [`ChatRequest::without_stream_recovery`](crate::ChatRequest::without_stream_recovery)).
    pub fn stream_recoveries(mut self, n: u32) -> Self {
        self.stream_recoveries = n.min(16);
        self
    }

    /// Under [`Anonymous::Refuse`], also require an identity of `kind` (for the scopes
    /// of a custom limiter or budget, which the builder cannot see).
    pub fn require_identity(mut self, kind: ScopeKind) -> Self {
        self.require_identity.push(kind);
        self
    }

    /// Builds the pipeline, or reports the first invalid setting.
    pub fn build(mut self) -> Result<Pipeline> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let clock = self.clock.unwrap_or_else(default_clock);
        let catalog = self.catalog.unwrap_or_else(Catalog::builtin);
        if self.default_provider.is_none()
            && self.providers.is_empty()
            && self.deployments.is_empty()
        {
            return Err(Error::Config(
                "a pipeline needs at least one provider".into(),
            ));
        }
        let router: Arc<dyn Router> = match self.router {
            Some(r) => {
                if self.default_model.is_some()
                    || !self.fallbacks.is_empty()
                    || !self.escalations.is_empty()
                {
                    return Err(Error::Config(
                        "default_model, fallbacks and escalate configure the default router; set them on your router instead".into(),
                    ));
                }
                r
            }
            None => {
                let mut b = CatalogRouter::builder();
                if let Some(m) = self.default_model {
                    b = b.default_model(m);
                }
                for (m, f) in self.fallbacks {
                    b = b.fallbacks(m, f);
                }
                for (m, e) in self.escalations {
                    b = b.escalate(m, e);
                }
                Arc::new(b.build(&catalog)?)
            }
        };
        let cache: Option<Arc<dyn Cache>> = match self.cache {
            CacheChoice::Off => None,
            CacheChoice::Custom(c) => Some(c),
            CacheChoice::Default { capacity, ttl } => Some(Arc::new(
                ExactCache::builder()
                    .max_entries(capacity)
                    .ttl(ttl)
                    .keep_stale_for(self.serve_stale.unwrap_or_default())
                    .clock(Arc::clone(&clock))
                    .build()?,
            )),
        };
        let identity_scopes = super::admit::identity_kinds(
            self.limits
                .iter()
                .map(|r| r.scope)
                .chain(self.caps.iter().map(|(k, _, _)| *k))
                .chain(self.require_identity.iter().copied()),
        );
        let limiter: Option<Arc<dyn Limiter>> = match (self.limiter, self.limits.is_empty()) {
            (Some(_), false) => {
                return Err(Error::Config("rate_limit/token_limit configure the in-memory limiter; set them on your limiter instead".into()));
            }
            (Some(l), true) => Some(l),
            (None, true) => None,
            (None, false) => {
                let mut b = GcraLimiter::builder().clock(Arc::clone(&clock));
                for rule in self.limits {
                    b = b.rule(rule);
                }
                Some(Arc::new(b.build()?))
            }
        };
        let budget: Option<Arc<dyn Budget>> = match (self.budget, self.caps.is_empty()) {
            (Some(_), false) => {
                return Err(Error::Config(
                    "spend_cap configures the in-memory budget; set caps on your budget instead"
                        .into(),
                ));
            }
            (Some(b), true) => Some(b),
            (None, true) => None,
            (None, false) => {
                let mut b = MemoryBudget::builder().clock(Arc::clone(&clock));
                for (scope, limit, window) in self.caps {
                    b = b.cap(scope, limit, window);
                }
                Some(Arc::new(b.build()?))
            }
        };
        let concurrency = self.concurrency.map(Concurrency::new).transpose()?;
        self.retry.validate()?;
        if let Some(h) = &self.hedge {
            h.validate()?;
        }
        let breakers = self
            .breaker
            .map(|cfg| Breakers::new(cfg, Arc::clone(&clock)))
            .transpose()?;
        let retry_budget = RetryBudget::new(
            self.retry.budget_ratio,
            self.retry.budget_floor_per_sec,
            Arc::clone(&clock),
        );
        for (pct, mode) in &self.degrade {
            if *pct == 0 {
                return Err(Error::Config(
                    "a degrade threshold must be at least 1 %".into(),
                ));
            }
            if let Degrade::CheaperModel(m) = mode {
                if catalog.get(m).is_none() {
                    return Err(Error::Config(format!(
                        "degrade model `{m}` is not in the catalogue"
                    )));
                }
            }
        }
        if !self.degrade.is_empty() && budget.is_none() {
            return Err(Error::Config(
                "degrade_at needs spend caps or a budget".into(),
            ));
        }
        self.degrade.sort_by_key(|(p, _)| *p);
        if let Some(c) = &self.context {
            c.validate()?;
        }
        for (model, d) in &mut self.deployments {
            d.validate()?;
            d.bind(model);
            if catalog.get(model).is_none() {
                return Err(Error::Config(format!(
                    "deployments for `{model}`, which the catalogue does not have"
                )));
            }
        }
        for (name, d) in [
            ("attempt_timeout", self.attempt_timeout),
            ("first_token_timeout", self.first_token_timeout),
            ("idle_timeout", self.idle_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        Ok(Pipeline {
            inner: Arc::new(Inner {
                catalog,
                router,
                providers: self.providers,
                default_provider: self.default_provider,
                cache_context: cache.as_ref().is_some_and(|c| c.reads_context()),
                cache,
                cache_scope: self.cache_scope,
                flights: crate::cache::SingleFlight::default(),
                stream_flights: crate::cache::SingleFlight::default(),
                limiter,
                budget,
                counter: self
                    .counter
                    .unwrap_or_else(|| Arc::new(TiktokenCounter::new())),
                validator: self.validator,
                usage: Arc::new(MemoryUsage::default()),
                sink: self.sink,
                clock,
                concurrency,
                attempt_timeout: self.attempt_timeout,
                first_token_timeout: self.first_token_timeout,
                idle_timeout: self.idle_timeout,
                request_timeout: self.request_timeout,
                retry: self.retry,
                retry_budget,
                breakers,
                hedge: self.hedge,
                latencies: Latencies::default(),
                serve_stale: self.serve_stale,
                cache_tiers: super::cache::StoredTiers::default(),
                context: self.context,
                counts: CountCache::default(),
                deployments: self.deployments,
                wait_for_limits: self.wait_for_limits,
                target_limits: self.target_limits,
                degrade: self.degrade,
                max_cost: self.max_cost,
                anonymous: self.anonymous,
                stream_recoveries: self.stream_recoveries,
                identity_scopes,
                batch: self.batch,
            }),
        })
    }
}
