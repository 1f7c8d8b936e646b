//! The [`Pipeline`]: every request runs through one funnel, in this order.
//!
//! ```text
//! request
//!   │  observe   span + usage record around everything below (cache hits and refusals too)
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
//! answers) and its streamed twin `Pipeline::open_stream`. Planning happens before
//! admission because the worst-case cost and the token estimate depend on which models
//! may answer; the router is a pure function, so no request is charged for it. A
//! request refused at any stage consumes nothing of the stages after it, and a token
//! charge made by admission is refunded when a later stage refuses.

mod batch;
mod builder;
mod dispatch;
mod flight;
mod service;
mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

pub use batch::{
    BatchHandle, BatchJournal, BatchOptions, BatchOutcome, BatchProgress, JournalBatch,
    JournalItem, WarmOptions, WarmReport,
};
pub use builder::PipelineBuilder;

use crate::budget::{Budget, CapStatus, Degrade, Reservation};
use crate::cache::{
    Cache, CacheQuery, CacheScope, GuardRejection, Invalidation, SharedStream, SingleFlight,
    is_cacheable,
};
use crate::clock::Clock;
use crate::context::{ContextBudget, CountCache, TokenCounter};
use crate::limiter::{Admission, Limiter, TargetLimits, wait_until_admitted};
use crate::observe::{self, MemoryUsage, Outcome, UsageRecord, UsageReport, UsageSink};
use crate::provider::Provider;
use crate::resilience::{
    BreakerState, Breakers, Concurrency, Hedge, Latencies, RetryBudget, RetryPolicy, Slot,
};
use crate::router::{Deployments, RoutePlan, Router, Validator};
use crate::types::{
    CacheMode, Catalog, ChatRequest, ChatResponse, ChatStream, Cost, ModelSpec, RequestMeta,
    Served, TokenizerKind, Usage,
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
    context: Option<ContextBudget>,
    counts: CountCache,
    deployments: HashMap<String, Deployments>,
    wait_for_limits: Option<Duration>,
    target_limits: Option<TargetLimits>,
    /// Degrade thresholds in per cent, ascending.
    degrade: Vec<(u8, Degrade)>,
    max_cost: Option<Cost>,
    batch: batch::BatchSetup,
}

/// What the plan stage learns about a request, computed once.
#[derive(Debug)]
struct Plan {
    route: RoutePlan,
    /// Prompt tokens per tokenizer kind of the candidate models.
    prompt_tokens: Vec<(TokenizerKind, u64)>,
    /// The token charge for admission: prompt plus output allowance on the primary.
    token_estimate: u64,
    /// The most the request may cost on any candidate (plus escalation, if validated).
    worst_case: Cost,
    /// The prompt's cost on the primary target: what a call abandoned mid-flight is
    /// charged, since the provider received the prompt.
    prompt_cost: Cost,
    cache: Option<CacheQuery>,
    /// False under `CacheMode::Refresh`: the answer is written, never read.
    cache_read: bool,
    /// A semantic match a cache guard refused, reported on the answer.
    guard_rejected: Option<GuardRejection>,
}

impl Plan {
    fn prompt_tokens(&self, kind: TokenizerKind) -> u64 {
        count_for(&self.prompt_tokens, kind)
    }
}

/// The count for tokenizer `kind` in per-tokenizer `counts` (0 if absent).
fn count_for(counts: &[(TokenizerKind, u64)], kind: TokenizerKind) -> u64 {
    counts
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(0, |(_, n)| *n)
}

/// What admission granted: the slot and the token charge to reconcile.
#[derive(Debug)]
struct Admitted {
    _slot: Option<Slot>,
    charged: u64,
}

/// A budget reservation that settles itself if the request is abandoned (its future
/// dropped) before the funnel settles it: the prompt's cost is committed.
struct Held {
    inner: Arc<Inner>,
    reservation: Option<Reservation>,
    on_drop: Cost,
}

impl Held {
    fn new(inner: &Arc<Inner>, reservation: Option<Reservation>, on_drop: Cost) -> Self {
        Held {
            inner: Arc::clone(inner),
            reservation,
            on_drop,
        }
    }

    fn take(&mut self) -> Option<Reservation> {
        self.reservation.take()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            let inner = Arc::clone(&self.inner);
            let cost = self.on_drop;
            run_detached(Box::pin(async move { inner.commit(Some(r), cost).await }));
        }
    }
}

/// The usage record of a whole call: recorded by `chat` when the funnel returns, or by
/// this guard's destructor when the caller drops the call first, as a `cancelled`
/// error with what the call was charged (the prompt, once it was sent).
struct Recording<'a> {
    inner: &'a Inner,
    rec: Option<UsageRecord>,
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.outcome = Outcome::Error("cancelled".into());
            self.inner
                .record(rec, &tracing::Span::current(), Some("cancelled"));
        }
    }
}

impl UsageRecord {
    /// From dispatch on, a dropped call has sent its prompt: that is what it used.
    fn abandoned_at_dispatch(&mut self, plan: &Plan) {
        if let Some(primary) = plan.route.targets.first() {
            self.usage = Usage::new(plan.prompt_tokens(primary.tokenizer), 0).estimated();
        }
        self.cost = plan.prompt_cost;
    }
}

/// Runs settlement work from a destructor: in-memory backends finish in one poll, here
/// and now; the rest continues on the tokio runtime.
pub(crate) fn run_detached(
    mut fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) {
    use futures_util::FutureExt;
    if fut.as_mut().now_or_never().is_none() {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(fut);
            }
            Err(_) => tracing::error!("settlement abandoned: no tokio runtime to finish it on"),
        }
    }
}

/// A stream that produced its first event.
struct Opened {
    /// How the target's breaker admitted the stream: its verdict comes at the end.
    breaker: crate::resilience::Admit,
    target_charged: u64,
    first: crate::types::StreamEvent,
    upstream: ChatStream,
    model: Arc<ModelSpec>,
    provider: String,
    fallbacks: u32,
}

/// A successful dispatch.
#[derive(Debug)]
struct Answer {
    response: ChatResponse,
    /// Usage and cost of every attempt that produced an answer (escalation included).
    usage: Usage,
    cost: Cost,
}

impl Pipeline {
    /// A builder; see [`PipelineBuilder`].
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder::default()
    }

    /// Asks for a whole answer.
    pub async fn chat(&self, req: ChatRequest) -> Result<ChatResponse> {
        if self.defers(&req) {
            return self.chat_deferred(req).await; // may wait for a provider batch
        }
        let span = observe::request_span(&req, false);
        let inner = &self.inner;
        async move {
            let _in_flight = observe::InFlight::start();
            // Written even if the caller drops this future half way (see `Recording`).
            let mut recording = Recording {
                inner,
                rec: Some(UsageRecord::new(inner.clock.now(), &req.meta, false)),
            };
            let result = match recording.rec.as_mut() {
                Some(rec) => self.funnel(&req, rec).await,
                None => Err(Error::InvalidRequest("no usage record".into())),
            };
            let Some(mut rec) = recording.rec.take() else {
                return result;
            };
            match &result {
                Ok(r) => {
                    rec.model = Some(r.model.clone());
                    rec.provider = Some(r.provider.clone());
                    rec.outcome = if r.served.is_cache_hit() {
                        Outcome::CacheHit
                    } else {
                        Outcome::Provider
                    };
                    rec.set_served(&r.served);
                }
                Err(e) => rec.set_error(e),
            }
            let finish = result.as_ref().ok().map(|r| r.finish_reason.to_string());
            inner.record(rec, &tracing::Span::current(), finish.as_deref());
            result
        }
        .instrument(span)
        .await
    }

    /// The funnel for whole answers. The order of these lines is the contract.
    async fn funnel(&self, req: &ChatRequest, rec: &mut UsageRecord) -> Result<ChatResponse> {
        let inner = &self.inner;
        let mut plan = inner.plan(req)?; // plan: validate, route, estimate
        rec.set_route(&plan.route);
        inner.check_max_cost(req, &plan)?; // a whole answer cannot be cut: refuse up front
        let admitted = inner.admit(&req.meta, &plan).await?; // admit: slot + rate limits
        let hit = inner.cache_get(&mut plan).await;
        rec.guard_rejections = u32::from(
            plan.guard_rejected.is_some()
                || hit.as_ref().is_some_and(|h| h.guard_rejected.is_some()),
        );
        if let Some(hit) = hit {
            inner.refund(&req.meta, &admitted, 0).await; // cache: a hit spends no token quota
            rec.saved = saved_cost(&hit);
            return Ok(hit);
        }
        let (shared, leader) = inner.join_flight(&plan).await; // an identical miss in flight answers
        if let Some(hit) = shared {
            inner.refund(&req.meta, &admitted, 0).await;
            rec.saved = saved_cost(&hit);
            return Ok(hit);
        }
        let mut held = inner.spend(req, &mut plan, &admitted, rec).await?; // budget: reserve, degrade
        let deadline = inner.deadline();
        rec.abandoned_at_dispatch(&plan); // what a call dropped from here on is charged
        let answered = inner.dispatch(req, &plan, rec, deadline).await; // dispatch + validate
        let (cost, used) = answered
            .as_ref()
            .map_or((Cost::ZERO, Usage::default()), |a| (a.cost, a.usage));
        (rec.cost, rec.usage) = (cost, used);
        inner.commit(held.take(), cost).await; // settle: actual cost,
        inner.refund(&req.meta, &admitted, used.total()).await; // actual tokens,
        let mut answer = match answered {
            Ok(a) => a,
            Err(e) => return inner.stale_or(&plan, e, rec).await, // every target down: stale cache
        };
        if let Some(q) = &plan.cache {
            inner.cache_put(q, &answer.response).await; // and the answer, if complete
        }
        if let Some(l) = leader.filter(|_| is_cacheable(&answer.response)) {
            l.publish(answer.response.clone()); // to the identical requests that waited
        }
        answer.response.guard_rejected = plan.guard_rejected.take();
        Ok(answer.response)
    }

    /// Asks for a streamed answer.
    ///
    /// Refusals and failures before the first token come back as `Err` (after trying
    /// every target); after it, a failure is an `Err` item in the stream, never a clean
    /// end. A cache hit is replayed as a stream of chunks. When the stream ends, is cut,
    /// or is dropped half way, what it used is committed to the budget and the limits.
    pub async fn stream(&self, req: ChatRequest) -> Result<ChatStream> {
        let span = observe::request_span(&req, true);
        let inner = Arc::clone(&self.inner);
        let span2 = span.clone();
        async move {
            let in_flight = observe::InFlight::start();
            let mut rec = UsageRecord::new(inner.clock.now(), &req.meta, true);
            match self.open_stream(req, &mut rec, span2).await {
                Ok(s) => Ok(observe::track_stream(s, in_flight)),
                Err((e, rec)) => {
                    let mut rec = *rec;
                    rec.set_error(&e);
                    inner.record(rec, &tracing::Span::current(), None);
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The funnel for streams: the same stages in the same order as `funnel`.
    async fn open_stream(
        &self,
        req: ChatRequest,
        rec: &mut UsageRecord,
        span: tracing::Span,
    ) -> std::result::Result<ChatStream, (Error, Box<UsageRecord>)> {
        let inner = &self.inner;
        let fail = |e: Error, rec: &UsageRecord| (e, Box::new(rec.clone()));
        let mut plan = inner.plan(&req).map_err(|e| fail(e, rec))?; // plan
        rec.set_route(&plan.route);
        let admitted = inner
            .admit(&req.meta, &plan)
            .await
            .map_err(|e| fail(e, rec))?; // admit
        let hit = inner.cache_get(&mut plan).await;
        rec.guard_rejections = u32::from(
            plan.guard_rejected.is_some()
                || hit.as_ref().is_some_and(|h| h.guard_rejected.is_some()),
        );
        if let Some(hit) = hit {
            inner.refund(&req.meta, &admitted, 0).await; // cache: replay as chunks
            let mut rec = rec.clone();
            rec.saved = saved_cost(&hit);
            rec.outcome = Outcome::CacheHit;
            rec.set_served(&hit.served);
            rec.model = Some(hit.model.clone());
            rec.provider = Some(hit.provider.clone());
            inner.record(rec, &span, Some(&hit.finish_reason.to_string()));
            return Ok(stream::replay(&hit));
        }
        let (shared, leader) = inner.join_stream_flight(&plan, rec, &span).await; // one upstream for identical misses
        if let Some(s) = shared {
            inner.refund(&req.meta, &admitted, 0).await;
            return Ok(s);
        }
        let mut held = inner
            .spend(&req, &mut plan, &admitted, rec)
            .await
            .map_err(|e| fail(e, rec))?; // budget: reserve, degrade
        let deadline = inner.deadline();
        match inner.dispatch_stream(&req, &plan, rec, deadline).await {
            // dispatch: the first event came; settle happens as the stream ends
            Ok(Opened {
                breaker,
                target_charged,
                first,
                upstream,
                model,
                provider,
                fallbacks,
            }) => Ok(stream::metered(
                stream::Settle {
                    breaker: Some(breaker),
                    fallbacks,
                    inner: Arc::clone(inner),
                    max_cost: req.meta.max_cost.or(inner.max_cost),
                    meta: req.meta,
                    prompt_tokens: plan.prompt_tokens(model.tokenizer),
                    cache: plan.cache,
                    model,
                    provider,
                    target_charged,
                    max_tokens: req.params.max_tokens.map(u64::from),
                    charged: admitted.charged,
                    slot: admitted._slot,
                    idle_timeout: inner.idle_timeout,
                    reservation: held.take(),
                    record: rec.clone(),
                    span,
                    guard_rejected: plan.guard_rejected.take(),
                    leader,
                },
                first,
                upstream,
            )),
            Err(e) => {
                inner.commit(held.take(), Cost::ZERO).await;
                inner.refund(&req.meta, &admitted, 0).await;
                match inner.stale_or(&plan, e, rec).await {
                    Ok(hit) => {
                        let mut rec = rec.clone();
                        rec.saved = saved_cost(&hit);
                        rec.outcome = Outcome::CacheHit;
                        rec.set_served(&hit.served);
                        rec.model = Some(hit.model.clone());
                        rec.provider = Some(hit.provider.clone());
                        inner.record(rec, &span, Some(&hit.finish_reason.to_string()));
                        Ok(stream::replay(&hit))
                    }
                    Err(e) => Err(fail(e, rec)),
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
    /// never called).
    pub fn breaker_state(&self, model: &str) -> BreakerState {
        self.inner
            .breakers
            .as_ref()
            .map_or(BreakerState::Closed, |b| b.state(model))
    }

    /// Every called model's circuit breaker state.
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

/// The refusal of a degrade mode: the cap's standing, as a spend-cap error.
fn over_threshold(st: &CapStatus, now: crate::clock::Timestamp) -> Error {
    Error::BudgetExceeded {
        scope: st.scope.clone(),
        limit: st.limit,
        spent: st.spent.saturating_add(st.reserved),
        retry_after: st.window.until_reset(now),
    }
}

fn saved_cost(hit: &ChatResponse) -> Cost {
    match hit.served {
        Served::Cache { saved_cost, .. } => saved_cost,
        _ => Cost::ZERO,
    }
}

impl Inner {
    fn plan(&self, req: &ChatRequest) -> Result<Plan> {
        req.validate()?;
        let route = self.router.route(req, &self.catalog)?;
        let Some(primary) = route.targets.first() else {
            return Err(Error::InvalidRequest(
                "the router returned no target".into(),
            ));
        };
        let mut prompt_tokens: Vec<(TokenizerKind, u64)> = Vec::with_capacity(2);
        let escalation: &[Arc<ModelSpec>] = if self.validator.is_some() {
            &route.escalation
        } else {
            &[]
        };
        let mut worst = Cost::ZERO;
        // With hedging two targets may run at once: reserve for both.
        let mut second = Cost::ZERO;
        let mut worst_escalation = Cost::ZERO;
        for (i, m) in route.targets.iter().chain(escalation).enumerate() {
            let n = match prompt_tokens.iter().find(|(k, _)| *k == m.tokenizer) {
                Some((_, n)) => *n,
                None => {
                    let n = self.counts.count_request(&*self.counter, req, m.tokenizer);
                    prompt_tokens.push((m.tokenizer, n));
                    n
                }
            };
            let c = m.worst_case_cost(n, req.params.max_tokens);
            if i < route.targets.len() {
                if c > worst {
                    second = worst;
                    worst = c;
                } else {
                    second = second.max(c);
                }
            } else {
                worst_escalation = worst_escalation.max(c);
            }
        }
        let primary_prompt = count_for(&prompt_tokens, primary.tokenizer);
        let token_estimate = primary_prompt + primary.output_allowance(req.params.max_tokens);
        let prompt_cost = primary.pricing.input.cost_of(primary_prompt);
        let cache = match &self.cache {
            Some(_) => CacheQuery::for_request(req, self.cache_scope),
            None => None,
        };
        Ok(Plan {
            route,
            prompt_tokens,
            token_estimate,
            worst_case: worst
                + worst_escalation
                + if self.hedge.is_some() {
                    second
                } else {
                    Cost::ZERO
                },
            prompt_cost,
            cache,
            cache_read: req.meta.cache.mode == CacheMode::Use,
            guard_rejected: None,
        })
    }

    async fn admit(&self, meta: &RequestMeta, plan: &Plan) -> Result<Admitted> {
        let slot = match &self.concurrency {
            Some(c) => Some(c.acquire(meta).await?),
            None => None,
        };
        self.refuse_gate(meta).await?;
        let charged = match &self.limiter {
            Some(l) => {
                let admission = Admission::new(meta, plan.token_estimate);
                match self.wait_for_limits {
                    Some(max_wait) => {
                        wait_until_admitted(max_wait, || l.acquire(&admission)).await?
                    }
                    None => l.acquire(&admission).await?,
                }
                plan.token_estimate
            }
            None => 0,
        };
        Ok(Admitted {
            _slot: slot,
            charged,
        })
    }

    /// Reconciles the admission's token charge to `actual`.
    async fn refund(&self, meta: &RequestMeta, admitted: &Admitted, actual: u64) {
        if let Some(l) = &self.limiter {
            if admitted.charged != actual {
                if let Err(e) = l.reconcile(meta, admitted.charged, actual).await {
                    tracing::warn!(error = %e, "token reconciliation failed");
                }
            }
        }
    }

    async fn cache_get(&self, plan: &mut Plan) -> Option<ChatResponse> {
        let (cache, q) = (self.cache.as_ref()?, plan.cache.as_ref()?);
        if !plan.cache_read {
            return None; // `refresh`: skip the read, still write
        }
        let found = cache.lookup(q).await.map(|l| {
            plan.guard_rejected = l.rejected;
            l.answer
        });
        match found {
            Ok(Some(hit)) => {
                let mut r = hit.response;
                let saved_cost = r.cost;
                r.served = Served::Cache {
                    similarity: hit.similarity,
                    saved_tokens: r.usage.total(),
                    saved_cost,
                };
                r.cost = Cost::ZERO;
                r.guard_rejected = plan.guard_rejected.take();
                Some(r)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cache read failed; treated as a miss");
                None
            }
        }
    }

    async fn cache_put(&self, q: &CacheQuery, response: &ChatResponse) {
        let Some(cache) = &self.cache else { return };
        if !is_cacheable(response) {
            return;
        }
        if let Err(e) = cache.put(q, response).await {
            tracing::warn!(error = %e, "cache write failed");
        }
    }

    /// Refuses a whole request whose worst case exceeds its cost limit: unlike a stream,
    /// it cannot be cut when it reaches the limit.
    fn check_max_cost(&self, req: &ChatRequest, plan: &Plan) -> Result<()> {
        match req.meta.max_cost.or(self.max_cost) {
            Some(limit) if plan.worst_case > limit => Err(Error::InvalidRequest(format!(
                "the request may cost up to {} but its limit is {limit}; lower max_tokens or stream it",
                plan.worst_case
            ))),
            _ => Ok(()),
        }
    }

    /// The `Refuse` degrade mode: refuses before the cache once a cap of the request
    /// is used beyond its threshold.
    async fn refuse_gate(&self, meta: &RequestMeta) -> Result<()> {
        let Some(threshold) = self
            .degrade
            .iter()
            .find(|(_, m)| *m == Degrade::Refuse)
            .map(|(p, _)| u64::from(*p))
        else {
            return Ok(());
        };
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        let now = self.clock.now();
        for st in budget.status(meta).await? {
            if st.used_percent() >= threshold {
                tracing::info!(scope = %st.scope, used = st.used_percent(), "degrade: refuse");
                return Err(over_threshold(&st, now));
            }
        }
        Ok(())
    }

    /// The budget stage: reserves the worst case, then applies the degrade mode the
    /// tightest cap calls for. A refusal refunds the admission's token charge.
    async fn spend(
        self: &Arc<Self>,
        req: &ChatRequest,
        plan: &mut Plan,
        admitted: &Admitted,
        rec: &mut UsageRecord,
    ) -> Result<Held> {
        let reservation = match self.reserve(&req.meta, plan).await {
            Ok(r) => r,
            Err(e) => {
                self.refund(&req.meta, admitted, 0).await;
                return Err(e);
            }
        };
        let used = reservation.as_ref().map_or(0, Reservation::used_percent);
        let mode = self
            .degrade
            .iter()
            .rev()
            .find(|(p, _)| used >= u64::from(*p))
            .map(|(_, m)| m);
        rec.set_degrade(mode);
        let held = Held::new(self, reservation, plan.prompt_cost);
        match mode {
            None | Some(Degrade::Refuse) => Ok(held),
            Some(Degrade::CheaperModel(name)) => {
                tracing::info!(used, model = %name, "degrade: cheaper model");
                let model = self.catalog.resolve(name)?;
                plan.route = RoutePlan::new(vec![model]);
                Ok(held)
            }
            Some(Degrade::CacheOnly) => {
                let mut held = held;
                let r = held.take();
                let err = r
                    .as_ref()
                    .and_then(|r| r.tightest.as_ref())
                    .map(|st| over_threshold(st, self.clock.now()));
                self.commit(r, Cost::ZERO).await;
                self.refund(&req.meta, admitted, 0).await;
                tracing::info!(used, "degrade: cache only, and this was a miss");
                Err(err.unwrap_or(Error::Overloaded { retry_after: None }))
            }
        }
    }

    async fn reserve(&self, meta: &RequestMeta, plan: &Plan) -> Result<Option<Reservation>> {
        match &self.budget {
            Some(b) => b.reserve(meta, plan.worst_case).await.map(Some),
            None => Ok(None),
        }
    }

    /// The request's overall deadline, if one is set.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.request_timeout
            .map(|d| tokio::time::Instant::now() + d)
    }

    /// When every target failed with a retryable error: a stale cached answer if the
    /// policy allows one, else the error.
    async fn stale_or(&self, plan: &Plan, e: Error, rec: &mut UsageRecord) -> Result<ChatResponse> {
        let (Some(max_stale), Some(cache), Some(q)) = (self.serve_stale, &self.cache, &plan.cache)
        else {
            return Err(e);
        };
        if !e.is_retryable() {
            return Err(e);
        }
        match cache.get_stale(q, max_stale).await {
            Ok(Some(hit)) => {
                tracing::warn!(error = %e, "every target failed; serving a stale cached answer");
                let mut r = hit.response;
                let saved_cost = r.cost;
                r.served = Served::Cache {
                    similarity: hit.similarity,
                    saved_tokens: r.usage.total(),
                    saved_cost,
                };
                r.cost = Cost::ZERO;
                rec.saved = saved_cost;
                Ok(r)
            }
            _ => Err(e),
        }
    }

    async fn commit(&self, reservation: Option<Reservation>, cost: Cost) {
        if let (Some(b), Some(r)) = (&self.budget, reservation) {
            if let Err(e) = b.commit(r, cost).await {
                tracing::error!(error = %e, cost = %cost, "budget commit failed");
            }
        }
    }

    fn record(&self, mut rec: UsageRecord, span: &tracing::Span, finish: Option<&str>) {
        rec.latency = self.clock.now().saturating_since(rec.started_at);
        observe::finish(span, &mut rec, finish);
        if let Some(s) = &self.sink {
            s.record(&rec);
        }
        self.usage.record_owned(rec);
    }
}
