//! The [`Pipeline`]: every request runs through one funnel, in this order.
//!
//! ```text
//! request
//!   │  observe   span + usage record around everything below (cache hits and refusals too)
//!   │  prepare   only with a token counter or summarizer that prepares: exact counts from
//!   │            a counting endpoint, summaries of the turns the fit will drop
//!   │  plan      validate the request; the router names the candidate models (pure, no I/O)
//!   │  admit     bounded concurrency (shed at once), then rate limits on every scope at once
//!   │  cache     exact match; a hit returns here, spending no budget and no token quota
//!   │  budget    reserve the worst-case cost over the candidates on every cap at once
//!   │  dispatch  per target in order: provider resolved → context fits → call with deadline;
//!   │            on a failure that another target may not share, the next target
//!   │  validate  a validator may reject the answer → the escalation tier is asked
//!   ▼
//! settle: commit the actual cost, reconcile token quotas, store a complete answer, record usage
//! ```
//!
//! The order is the contract and lives in one function, `Pipeline::funnel` (whole
//! answers) and its streamed twin `Pipeline::open_stream`, which call the same stages:
//! one file each (`prepare`, `plan`, `admit`, `cache`, `budget`, `dispatch`, `settle`), and one
//! attempt loop (`dispatch`) for whole answers and streams alike. Planning happens before
//! admission because the worst-case cost and the token estimate depend on which models
//! may answer; the router is a pure function, so no request is charged for it. The
//! prepare stage, when there is one, runs before admission: a summary is asked through
//! the pipeline itself, admitted on its own, and never waits for a slot its request
//! holds. A
//! request refused at any stage consumes nothing of the stages after it, and a token
//! charge made by admission is refunded when a later stage refuses.

/// What a backend's `*_ready` method answers at once, else what its future gives: the
/// in-memory backends answer without a boxed future (see [`Limiter::acquire_ready`]).
macro_rules! ready_or {
    ($ready:expr, $fut:expr) => {
        match $ready {
            Some(done) => done,
            None => $fut.await,
        }
    };
}

mod admit;
mod batch;
mod budget;
mod builder;
mod cache;
mod dispatch;
mod flight;
mod plan;
mod prepare;
mod service;
mod settle;
mod stream;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

pub use batch::{
    BatchHandle, BatchJournal, BatchOptions, BatchOutcome, BatchProgress, JournalBatch,
    JournalItem, WarmOptions, WarmReport,
};
pub use builder::PipelineBuilder;

use self::dispatch::{Opened, Reply};
use self::plan::Plan;
use self::settle::Recording;
pub(crate) use self::settle::run_detached;
use crate::budget::{Budget, CapStatus, Degrade};
use crate::cache::{Cache, CacheScope, Invalidation, SharedStream, SingleFlight, is_cacheable};
use crate::clock::Clock;
use crate::context::{ContextBudget, CountCache, TokenCounter};
use crate::limiter::{Limiter, TargetLimits};
use crate::observe::{self, MemoryUsage, UsageRecord, UsageReport, UsageSink};
use crate::provider::Provider;
use crate::resilience::{
    BreakerState, Breakers, Concurrency, Hedge, Latencies, RetryBudget, RetryPolicy,
};
use crate::router::{Deployments, Router, Validator};
use crate::types::{
    Anonymous, Catalog, ChatRequest, ChatResponse, ChatStream, Cost, RequestMeta, ScopeKind, Usage,
};
use crate::{Error, Result};

/// An LLM client that makes every call cheaper, faster, bounded and observable.
///
/// Build one with [`Pipeline::builder`], then call [`chat`](Self::chat) or
/// [`stream`](Self::stream). A pipeline is cheap to clone (an `Arc` inside); clones
/// share caches, limits, budgets and usage. It also implements
/// `tower::Service<ChatRequest>`, so tower's own layers (timeouts, buffers, load
/// shedding) can wrap it.
#[derive(Debug, Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    catalog: Catalog,
    router: Arc<dyn Router>,
    providers: HashMap<String, Arc<dyn Provider>>,
    default_provider: Option<Arc<dyn Provider>>,
    cache: Option<Arc<dyn Cache>>,
    cache_scope: CacheScope,
    /// Whether the cache reads a query's context (see `Cache::reads_context`): when it
    /// does not, queries carry the exact key alone.
    cache_context: bool,
    /// Concurrent identical misses share one call (whole answers, streams).
    flights: SingleFlight<ChatResponse>,
    stream_flights: SingleFlight<Arc<SharedStream>>,
    limiter: Option<Arc<dyn Limiter>>,
    budget: Option<Arc<dyn Budget>>,
    counter: Arc<dyn TokenCounter>,
    validator: Option<Arc<dyn Validator>>,
    usage: Arc<MemoryUsage>,
    sink: Option<Arc<dyn UsageSink>>,
    clock: Arc<dyn Clock>,
    concurrency: Option<Concurrency>,
    attempt_timeout: Option<Duration>,
    first_token_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    retry: RetryPolicy,
    retry_budget: RetryBudget,
    breakers: Option<Breakers>,
    hedge: Option<Hedge>,
    latencies: Latencies,
    serve_stale: Option<Duration>,
    /// The capability tiers of a routed request's cache: those this pipeline has stored
    /// an answer under (see `cache.rs`).
    cache_tiers: cache::StoredTiers,
    context: Option<ContextBudget>,
    counts: CountCache,
    deployments: HashMap<String, Deployments>,
    wait_for_limits: Option<Duration>,
    target_limits: Option<TargetLimits>,
    /// Degrade thresholds in per cent, ascending.
    degrade: Vec<(u8, Degrade)>,
    max_cost: Option<Cost>,
    /// What happens to a request without an identity for a scope in `identity_scopes`.
    anonymous: Anonymous,
    /// The scope kinds (global aside) the pipeline's own limits and caps use.
    identity_scopes: Vec<ScopeKind>,
    /// How many times one stream cut after its first token may be recovered.
    stream_recoveries: u32,
    batch: batch::BatchSetup,
}

/// The instant `d` from now, saturated far in the future (a timeout of
/// `Duration::MAX` means "never", not a panic).
pub(crate) fn after(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365 * 30))
}

impl Pipeline {
    /// A builder; see [`PipelineBuilder`].
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder::default()
    }

    /// Asks for a whole answer.
    pub async fn chat(&self, mut req: ChatRequest) -> Result<ChatResponse> {
        if self.defers(&req) {
            return self.chat_deferred(req).await; // may wait for a provider batch
        }
        let span = observe::request_span(&req, false);
        let inner = &self.inner;
        // borrowed by the instrumented block, not moved into it (a copy saved)
        let req = &mut req;
        async move {
            let _in_flight = observe::InFlight::start();
            // Written even if the caller drops this future half way (see `Recording`),
            // attributed to the request's user, organisation and feature when written:
            // moved from the request here, copied only by a dropped call.
            // The record stays in this future's state (written in place, never moved).
            let mut slot = Some(UsageRecord::unattributed(inner.clock.now(), false));
            let mut recording = Recording {
                inner,
                rec: &mut slot,
                meta: &req.meta,
                armed: true,
            };
            let result = match recording.rec.as_mut() {
                Some(rec) => self.funnel(req, rec).await,
                None => Err(Error::InvalidRequest("no usage record".into())),
            };
            recording.armed = false;
            drop(recording);
            let Some(rec) = slot.as_mut() else {
                return result;
            };
            rec.attribute_from(&mut req.meta);
            match &result {
                Ok(r) => {
                    rec.set_answer(r);
                    rec.set_finished(r);
                }
                Err(e) => rec.set_error(e),
            }
            inner.record_in_place(rec, &tracing::Span::current(), None);
            result
        }
        .instrument(span)
        .await
    }

    /// The funnel for whole answers. The order of these lines is the contract.
    async fn funnel(&self, req: &ChatRequest, rec: &mut UsageRecord) -> Result<ChatResponse> {
        let inner = &self.inner;
        if self.prepares() {
            self.prepare(req).await; // prepare: exact counts, summaries (only when configured)
        }
        let mut plan = inner.plan(req)?; // plan: validate, route, count, worst case
        rec.set_route(&plan.route);
        inner.check_max_cost(req, &plan)?; // a whole answer cannot be cut: refuse up front
        let mut admitted = inner.admit(&req.meta, &plan).await?; // admit: slot + rate limits
        if let Some(hit) = inner.cache_get(req, &mut plan).await {
            admitted.settle(0).await; // cache: a hit spends no budget and no token quota
            return Ok(hit);
        }
        rec.set_guard_rejected(plan.guard_rejected.is_some());
        let (shared, leader) = inner.join_flight(&plan).await; // an identical miss in flight answers
        if let Some(hit) = shared {
            admitted.settle(0).await;
            return Ok(hit);
        }
        let mut degraded = None;
        let spent = inner
            .spend(req, &mut plan, &mut admitted, &mut degraded)
            .await; // budget
        rec.set_degrade(degraded.as_ref());
        let mut held = spent?;
        rec.used_if_abandoned(plan.primary_prompt_tokens(), plan.prompt_cost); // dropped from here on:
        admitted.used_if_abandoned(plan.primary_prompt_tokens()); // the prompt was sent
        let (answered, attempts) = inner.dispatch(req, &plan, inner.deadline()).await; // dispatch + validate
        rec.set_attempts(attempts);
        let (usage, cost) = answered
            .as_ref()
            .map_or((Usage::default(), Cost::ZERO), |a| (a.usage, a.cost));
        rec.set_used(usage, cost);
        inner
            .settle_use(&mut held, &mut admitted, &usage, cost)
            .await; // settle: cost and tokens
        let mut answer = match answered {
            Ok(a) => a.response,
            Err(e) => return inner.stale(&plan, &e).await.ok_or(e), // every target down: stale
        };
        if let Some(q) = inner.stored_under(req, &plan, &answer.model) {
            inner.cache_put(&q, &answer).await; // a complete answer is stored
        }
        if let Some(l) = leader.filter(|_| is_cacheable(&answer)) {
            l.publish_with(|| answer.clone()); // for the identical requests that waited
        }
        // The caller is told everything the answer was billed (an escalated first answer
        // and hedged calls that lost included), as a stream's end is; the cache keeps
        // the answering call's own.
        (answer.usage, answer.cost) = (usage, cost);
        answer.guard_rejected = plan.guard_rejected.take();
        Ok(answer)
    }

    /// Asks for a streamed answer.
    ///
    /// Refusals and failures before the first token come back as `Err` (after trying
    /// every target); after it, a failure is an `Err` item in the stream, never a clean
    /// end. A cache hit is replayed as a stream of chunks. When the stream ends, is cut,
    /// or is dropped half way, what it used is committed to the budget and the limits.
    ///
    /// Validators and cascades apply to streams too: with a validator and an escalation
    /// tier, the first tier answers whole and is judged before any text is released; a
    /// good answer is replayed as a stream, a weak one is replaced by the escalation
    /// tier streaming live (both are billed).
    pub async fn stream(&self, req: ChatRequest) -> Result<ChatStream> {
        let span = observe::request_span(&req, true);
        let inner = Arc::clone(&self.inner);
        async move {
            let in_flight = observe::InFlight::start();
            let mut slot = Some(UsageRecord::new(inner.clock.now(), &req.meta, true));
            let span = tracing::Span::current();
            match self.open_stream(req, &mut slot, &span).await {
                Ok(s) => Ok(observe::track_stream(s, in_flight)),
                Err(e) => {
                    if let Some(mut rec) = slot {
                        rec.set_error(&e);
                        inner.record(rec, &span, None);
                    }
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The funnel for streams: the same stages in the same order as `funnel`. The
    /// usage record in `slot` is taken by whatever records it; one left there is
    /// recorded by the caller as the error.
    async fn open_stream(
        &self,
        req: ChatRequest,
        slot: &mut Option<UsageRecord>,
        span: &tracing::Span,
    ) -> Result<ChatStream> {
        let inner = &self.inner;
        let started = inner.clock.now();
        let rec = |slot: &mut Option<UsageRecord>| -> UsageRecord {
            slot.take()
                .unwrap_or_else(|| UsageRecord::new(started, &RequestMeta::default(), true))
        };
        if self.prepares() {
            self.prepare(&req).await; // prepare
        }
        let mut plan = inner.plan(&req)?; // plan
        if let Some(r) = slot.as_mut() {
            r.set_route(&plan.route);
        }
        let mut admitted = inner.admit(&req.meta, &plan).await?; // admit
        if let Some(hit) = inner.cache_get(&req, &mut plan).await {
            admitted.settle(0).await; // cache: a hit is replayed as chunks
            inner.record_answer(rec(slot), &hit, span);
            return Ok(stream::replay(&hit));
        }
        if let Some(r) = slot.as_mut() {
            r.set_guard_rejected(plan.guard_rejected.is_some());
        }
        let shared = match slot.as_ref() {
            Some(r) => inner.join_stream_flight(&plan, r, span).await,
            None => (None, None),
        };
        let (shared, leader) = shared; // one upstream for identical misses
        if let Some(s) = shared {
            admitted.settle(0).await;
            *slot = None; // the follower records itself when its stream ends
            return Ok(s);
        }
        let mut degraded = None;
        let spent = inner
            .spend(&req, &mut plan, &mut admitted, &mut degraded)
            .await; // budget
        if let Some(r) = slot.as_mut() {
            r.set_degrade(degraded.as_ref());
        }
        let mut held = spent?;
        admitted.used_if_abandoned(plan.primary_prompt_tokens());
        let deadline = inner.deadline();
        let (opened, attempts) = inner.dispatch_stream(&req, &plan, deadline).await; // dispatch
        if let Some(r) = slot.as_mut() {
            r.set_attempts(attempts);
        }
        match opened {
            Ok(Opened::Live {
                dispatched,
                attempts,
                prior,
            }) => {
                // settle happens as the stream ends, after the request is gone
                let admitted = admitted.into_owned();
                let answered = dispatched.answered;
                let Reply::Stream { first, rest } = answered.reply else {
                    return Err(Error::Config(
                        "a streamed call returned a whole answer".into(),
                    ));
                };
                let mut record = rec(slot);
                record.set_first_token(answered.at);
                let model = answered.model;
                let cache = inner
                    .stored_under(&req, &plan, &model.name)
                    .map(Cow::into_owned);
                plan.cache = None; // the stream stores its answer under `cache`
                let guard_rejected = plan.guard_rejected.take();
                let prompt_tokens = plan.prompt_tokens(model.tokenizer);
                let (max_tokens, max_cost) = (
                    req.params.max_tokens.map(u64::from),
                    req.meta.max_cost.or(inner.max_cost),
                );
                let escalated = prior.is_some();
                let recovery =
                    (inner.stream_recoveries > 0 && !req.meta.no_stream_recovery).then(|| {
                        stream::Recovery {
                            tier: if escalated {
                                plan.route.escalation.clone()
                            } else {
                                plan.route.targets.clone()
                            },
                            req,
                            plan: Arc::new(plan),
                            left: inner.stream_recoveries,
                            deadline,
                        }
                    });
                Ok(stream::metered(
                    stream::Settle {
                        inner: Arc::clone(inner),
                        held,
                        admitted,
                        cache,
                        prompt_tokens,
                        provider: answered.provider,
                        fallbacks: dispatched.fallbacks,
                        attempts,
                        owed: answered.owed,
                        deployment: answered.deployment,
                        target_charged: answered.target_charged,
                        max_tokens,
                        max_cost,
                        idle_timeout: inner.idle_timeout,
                        record,
                        span: span.clone(),
                        guard_rejected,
                        leader,
                        prior,
                        escalated,
                        recovery,
                        model,
                    },
                    first,
                    rest,
                ))
            }
            Ok(Opened::Whole(answer)) => {
                // a validated first tier: settled now, replayed as chunks
                inner
                    .settle_use(&mut held, &mut admitted, &answer.usage, answer.cost)
                    .await;
                let mut response = answer.response;
                if let Some(q) = inner.stored_under(&req, &plan, &response.model) {
                    inner.cache_put(&q, &response).await;
                }
                (response.usage, response.cost) = (answer.usage, answer.cost);
                response.guard_rejected = plan.guard_rejected.take();
                let mut record = rec(slot);
                (record.usage, record.cost) = (answer.usage, answer.cost);
                inner.record_answer(record, &response, span);
                Ok(flight::share(leader, stream::replay(&response)))
            }
            Err(e) => {
                inner
                    .settle_use(&mut held, &mut admitted, &Usage::default(), Cost::ZERO)
                    .await;
                match inner.stale(&plan, &e).await {
                    Some(hit) => {
                        inner.record_answer(rec(slot), &hit, span); // every target down: stale
                        Ok(stream::replay(&hit))
                    }
                    None => Err(e),
                }
            }
        }
    }

    /// Removes cache entries; returns how many (0 without a cache).
    pub async fn invalidate(&self, what: &Invalidation) -> Result<u64> {
        match &self.inner.cache {
            Some(c) => c.invalidate(what).await,
            None => Ok(0),
        }
    }

    /// Usage so far: totals by model and user, errors by reason.
    pub fn usage(&self) -> UsageReport {
        self.inner.usage.report()
    }

    /// The most recent usage records (up to 1,000), oldest first.
    pub fn recent_usage(&self) -> Vec<UsageRecord> {
        self.inner.usage.recent()
    }

    /// The standing of every spend cap that applies to `meta` (empty without a budget).
    pub async fn budget_status(&self, meta: &RequestMeta) -> Result<Vec<CapStatus>> {
        match &self.inner.budget {
            Some(b) => b.status(meta).await,
            None => Ok(Vec::new()),
        }
    }

    /// The model catalogue.
    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// The circuit breaker state of `model` (closed when breakers are off or it was
    /// never called). A model with deployments has one breaker per deployment (see
    /// [`deployment_breaker_states`](Self::deployment_breaker_states)); its own state
    /// is derived from them: closed while any deployment is closed, open when all are
    /// open, half-open otherwise.
    pub fn breaker_state(&self, model: &str) -> BreakerState {
        let Some(b) = self.inner.breakers.as_ref() else {
            return BreakerState::Closed;
        };
        let Some(d) = self.inner.deployments.get(model) else {
            return b.state(model);
        };
        let states: Vec<BreakerState> = d.breaker_keys().map(|k| b.state(k)).collect();
        if states.contains(&BreakerState::Closed) {
            BreakerState::Closed
        } else if states.iter().all(|s| *s == BreakerState::Open) {
            BreakerState::Open
        } else {
            BreakerState::HalfOpen
        }
    }

    /// The breaker state of each deployment of `model`, by breaker name
    /// (`model@provider`); empty when the model has no deployments.
    pub fn deployment_breaker_states(&self, model: &str) -> Vec<(String, BreakerState)> {
        match (
            self.inner.breakers.as_ref(),
            self.inner.deployments.get(model),
        ) {
            (Some(b), Some(d)) => d
                .breaker_keys()
                .map(|k| (k.to_owned(), b.state(k)))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Every called target's circuit breaker state (models, and `model@provider` for
    /// deployments).
    pub fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        self.inner
            .breakers
            .as_ref()
            .map(Breakers::states)
            .unwrap_or_default()
    }

    /// Requests in flight and waiting for a slot (zero without a concurrency limit).
    pub fn load(&self) -> (usize, usize) {
        self.inner
            .concurrency
            .as_ref()
            .map_or((0, 0), |c| (c.in_flight(), c.queued()))
    }
}

impl Inner {
    /// The request's overall deadline, if one is set.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.request_timeout.map(after)
    }
}
