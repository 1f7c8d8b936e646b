//! The dispatch stage: one attempt loop for whole answers and streams.
//!
//! Targets are tried in order (hedged if configured). Each attempt picks a deployment
//! whose breaker admits it, charges the target's own quota, calls the provider within
//! its deadline and feeds the outcome to the breaker, the balancer's latency and the
//! adaptive concurrency limit. A whole answer is judged when it arrives; a stream when
//! it ends (a half-open probe by its first event). A failed attempt is retried on the
//! same target within the retry policy and budget, except a timeout when a next target
//! exists: a silent route is left at once.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use smallvec::SmallVec;
use tokio::time::Instant;
use tracing::Instrument;

use super::{Inner, Plan};
use crate::clock::Timestamp;
use crate::error::{ProviderError, ProviderErrorKind};
use crate::observe;
use crate::provider::{Provider, ProviderCall};
use crate::resilience::{Admit, BreakerState, Breakers, Hedge};
use crate::router::balance::Picked;
use crate::types::{ChatRequest, ChatResponse, ChatStream, Cost, ModelSpec, StreamEvent};
use crate::{Error, Result};

/// The first-token limit of a stream attempt that has a fallback, when none is set:
/// a slow or silent target is left for the next one well before the stream's own
/// deadlines.
pub(crate) const FAILOVER_FIRST_TOKEN: Duration = Duration::from_secs(10);

/// Whether an attempt asks for a whole answer or a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Whole,
    Stream,
}

/// What one request's dispatch needs to know, shared by its attempts.
pub(super) struct Call<'a> {
    pub(super) req: &'a ChatRequest,
    pub(super) plan: &'a Plan,
    pub(super) mode: Mode,
    pub(super) deadline: Option<Instant>,
    /// Provider calls made so far, hedged ones included.
    pub(super) attempts: &'a AtomicU32,
}

/// What a provider gave an attempt.
pub(super) enum Reply {
    Whole(ChatResponse),
    /// A stream's first event and the rest of it.
    Stream {
        first: StreamEvent,
        rest: ChatStream,
    },
}

/// An attempt that answered.
pub(super) struct Answered {
    pub(super) reply: Reply,
    pub(super) model: Arc<ModelSpec>,
    pub(super) provider: String,
    /// The charge on the target's own quota still to reconcile (streams; a whole
    /// answer's is settled by the attempt).
    pub(super) target_charged: u64,
    /// How the breaker admitted a stream: its verdict is owed when the stream ends.
    pub(super) owed: Option<Admit>,
    /// The deployment that serves a stream: its in-flight count is held until the end.
    pub(super) deployment: Option<Picked>,
    /// When the first event (or the whole answer) arrived.
    pub(super) at: Timestamp,
}

/// A successful dispatch over one tier of targets.
pub(super) struct Dispatched {
    pub(super) answered: Answered,
    /// The position of the answering target in its tier.
    pub(super) fallbacks: u32,
    /// What hedged calls that lost the race cost (their prompts).
    pub(super) extra_cost: Cost,
}

/// Why a target gave no answer.
pub(super) enum Failure {
    /// Every deployment's breaker is open: no call was made. Half-opens after this.
    Open(Duration),
    /// The target failed (or the request cannot be sent to it).
    Failed(Error),
}

/// The breaker-open failure as the caller sees it when another target failed too.
fn breaker_open(model: &ModelSpec, wait: Duration) -> Error {
    ProviderError::new(
        ProviderErrorKind::Overloaded,
        "tokenwise",
        format!("circuit open for {}", model.name),
    )
    .with_retry_after(wait)
    .into()
}

/// Runs `fut` within `limit` (if any); past it, a provider timeout saying `what`.
async fn within<T>(
    limit: Option<Duration>,
    provider: &str,
    what: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match limit {
        Some(d) => tokio::time::timeout(d, fut).await.unwrap_or_else(|_| {
            Err(ProviderError::new(
                ProviderErrorKind::Timeout,
                provider,
                format!("{what} within {d:?}"),
            )
            .into())
        }),
        None => fut.await,
    }
}

/// The provider chosen for one call.
enum Chosen<'a> {
    Direct(&'a Arc<dyn Provider>),
    Deployment(Picked),
}

impl Chosen<'_> {
    fn provider(&self) -> &Arc<dyn Provider> {
        match self {
            Chosen::Direct(p) => p,
            Chosen::Deployment(p) => p.provider(),
        }
    }
}

/// The name of the breaker that guards `model` on `deployment` (the model's own
/// without deployments).
pub(super) fn breaker_key<'a>(model: &'a ModelSpec, deployment: Option<&'a Picked>) -> &'a str {
    deployment.map_or(model.name.as_str(), Picked::breaker_key)
}

/// An attempt that may call its target. A half-open probe is given back if the
/// attempt is dropped before it has an outcome.
struct Begun<'a> {
    chosen: Option<Chosen<'a>>,
    admit: Admit,
    charged: u64,
    breakers: Option<&'a Breakers>,
    model: &'a ModelSpec,
}

impl Begun<'_> {
    fn key(&self) -> &str {
        match &self.chosen {
            Some(Chosen::Deployment(p)) => p.breaker_key(),
            _ => &self.model.name,
        }
    }
}

impl Drop for Begun<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.breakers {
            b.cancel(self.key(), self.admit);
        }
    }
}

impl Inner {
    /// The provider and breaker admission for one call to `model`: one of its
    /// deployments whose breaker admits it (balanced), else the provider registered
    /// for its provider name, else the default provider.
    fn choose(&self, model: &ModelSpec) -> std::result::Result<(Chosen<'_>, Admit), Failure> {
        if let Some(d) = self.deployments.get(&model.name) {
            let mut skip: SmallVec<[usize; 8]> = SmallVec::new();
            let mut soonest: Option<Duration> = None;
            while let Some(p) = d.pick(&skip) {
                match self.breaker_admit(p.breaker_key()) {
                    Ok(admit) => return Ok((Chosen::Deployment(p), admit)),
                    Err(wait) => {
                        skip.push(p.index());
                        soonest = Some(soonest.map_or(wait, |s| s.min(wait)));
                    }
                }
            }
            return Err(Failure::Open(soonest.unwrap_or_default()));
        }
        let provider = self
            .providers
            .get(&model.provider)
            .or(self.default_provider.as_ref())
            .ok_or_else(|| {
                Failure::Failed(Error::Config(format!(
                    "no provider registered for `{}` (model {})",
                    model.provider, model.name
                )))
            })?;
        let admit = self.breaker_admit(&model.name).map_err(Failure::Open)?;
        Ok((Chosen::Direct(provider), admit))
    }

    fn breaker_admit(&self, key: &str) -> std::result::Result<Admit, Duration> {
        match &self.breakers {
            None => Ok(Admit::Call),
            Some(b) => b.admit(key),
        }
    }

    /// The request as sent to `model`: fitted into its window by the context budget, or,
    /// without one, checked to fit.
    pub(super) fn fit<'r>(
        &self,
        req: &'r ChatRequest,
        plan: &Plan,
        model: &ModelSpec,
    ) -> Result<Cow<'r, ChatRequest>> {
        if let Some(budget) = &self.context {
            let fitted = budget.fit(req, model, &*self.counter, &self.counts)?;
            if fitted.dropped_messages > 0 || fitted.trimmed_documents > 0 {
                tracing::debug!(model = %model.name, dropped = fitted.dropped_messages,
                    trimmed_documents = fitted.trimmed_documents, "context fitted");
            }
            return Ok(fitted.request);
        }
        let prompt = plan.prompt_tokens(model.tokenizer);
        let out = req.params.max_tokens.map_or(1, u64::from);
        if prompt + out > model.context_window {
            return Err(Error::ContextTooLong {
                model: model.name.clone(),
                tokens: prompt + out,
                limit: model.context_window,
            });
        }
        Ok(Cow::Borrowed(req))
    }

    /// Charges `model`'s own quota (if any) for one call; returns the token charge.
    fn target_admit(&self, req: &ChatRequest, plan: &Plan, model: &ModelSpec) -> Result<u64> {
        let Some(limits) = &self.target_limits else {
            return Ok(0);
        };
        let tokens =
            plan.prompt_tokens(model.tokenizer) + model.output_allowance(req.params.max_tokens);
        limits.check(&model.name, tokens)?;
        Ok(tokens)
    }

    /// Reconciles `model`'s token charge to what the call used.
    pub(crate) fn target_settle(&self, model: &ModelSpec, charged: u64, used: u64) {
        if let Some(limits) = &self.target_limits {
            limits.reconcile(&model.name, charged, used);
        }
    }

    /// The time left for one attempt: the attempt's own limit (for a stream, its
    /// first-token limit), cut to the request's deadline.
    fn attempt_limit(
        &self,
        mode: Mode,
        has_next: bool,
        deadline: Option<Instant>,
    ) -> Option<Duration> {
        let per_attempt = match mode {
            Mode::Whole => self.attempt_timeout,
            Mode::Stream => self
                .first_token_timeout
                .or_else(|| {
                    has_next.then(|| {
                        self.attempt_timeout
                            .map_or(FAILOVER_FIRST_TOKEN, |a| a.min(FAILOVER_FIRST_TOKEN))
                    })
                })
                .or(self.attempt_timeout),
        };
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match (per_attempt, left) {
            (Some(a), Some(l)) => Some(a.min(l)),
            (a, l) => a.or(l),
        }
    }

    /// Feeds one call's outcome to the breaker named `key` (when `judge` says how it
    /// was admitted), the latency tracker and the adaptive limit.
    fn observe_call(
        &self,
        model: &ModelSpec,
        key: &str,
        judge: Option<Admit>,
        error: Option<&Error>,
        latency: Duration,
    ) {
        if let Some(admit) = judge {
            self.breaker_verdict(
                model,
                key,
                admit,
                error.is_some_and(Error::is_target_failure),
            );
        }
        if error.is_none() {
            self.latencies.record(&model.name, latency);
        }
        if let Some(c) = &self.concurrency {
            c.feedback(error.is_some_and(Error::is_overload), latency);
        }
    }

    /// Tells the breaker `key` of `model` how a call it admitted went.
    fn breaker_verdict(&self, model: &ModelSpec, key: &str, admit: Admit, failed: bool) {
        self.with_breakers(model, key, |b| b.record(key, admit, failed));
    }

    /// Records how a stream ended (see [`Breakers::record_stream_end`]).
    pub(super) fn breaker_stream_end(
        &self,
        model: &ModelSpec,
        key: &str,
        admit: Admit,
        failed: bool,
    ) {
        self.with_breakers(model, key, |b| b.record_stream_end(key, admit, failed));
    }

    /// Records on the breakers, and sets the state gauge when the state is new.
    fn with_breakers(
        &self,
        model: &ModelSpec,
        key: &str,
        record: impl FnOnce(&Breakers) -> Option<BreakerState>,
    ) {
        if let Some(state) = self.breakers.as_ref().and_then(record) {
            observe::metrics::record_breaker_state(&model.provider, key, state);
        }
    }

    /// Waits before retry number `retry` after `e`, if the policy, the budget and the
    /// deadline allow one more call to `model`. A timeout is not retried when a next
    /// target exists: the next target is tried instead.
    async fn retry_wait(
        &self,
        model: &ModelSpec,
        e: &Error,
        retry: u32,
        has_next: bool,
        deadline: Option<Instant>,
    ) -> bool {
        if !e.is_retryable() || retry + 1 >= self.retry.max_attempts {
            return false;
        }
        if has_next && e.is_timeout() {
            tracing::debug!(model = %model.name, "timed out; failing over instead of retrying");
            return false;
        }
        let Some(wait) = self.retry.wait_for(e, retry) else {
            return false;
        };
        if deadline.is_some_and(|d| Instant::now().checked_add(wait).is_none_or(|t| t >= d)) {
            return false;
        }
        if !self.retry_budget.withdraw(&model.name) {
            tracing::debug!(model = %model.name, "retry budget exhausted");
            return false;
        }
        tokio::time::sleep(wait).await;
        true
    }

    /// Opens attempt number `retry` on `model`: the target's own quota, a deployment
    /// and its breaker, and on the first attempt a deposit into the retry budget.
    fn begin_attempt<'a>(
        &'a self,
        req: &ChatRequest,
        plan: &Plan,
        model: &'a ModelSpec,
        retry: u32,
    ) -> std::result::Result<Begun<'a>, Failure> {
        let charged = self
            .target_admit(req, plan, model)
            .map_err(Failure::Failed)?;
        let (chosen, admit) = match self.choose(model) {
            Ok(c) => c,
            Err(f) => {
                self.target_settle(model, charged, 0);
                return Err(f);
            }
        };
        if retry == 0 {
            self.retry_budget.deposit(&model.name);
        }
        Ok(Begun {
            chosen: Some(chosen),
            admit,
            charged,
            breakers: self.breakers.as_ref(),
            model,
        })
    }

    /// The attempt loop: one target, retried within the policy, whole or streamed.
    async fn try_target(
        &self,
        call: &Call<'_>,
        model: &Arc<ModelSpec>,
        has_next: bool,
    ) -> std::result::Result<Answered, Failure> {
        let fitted = self
            .fit(call.req, call.plan, model)
            .map_err(Failure::Failed)?;
        let req = fitted.as_ref();
        let prompt_tokens = call.plan.prompt_tokens(model.tokenizer);
        let mut retry = 0;
        loop {
            let mut begun = self.begin_attempt(req, call.plan, model, retry)?;
            let (admit, charged) = (begun.admit, begun.charged);
            let Some(chosen) = begun.chosen.as_ref() else {
                return Err(Failure::Failed(Error::Config("no provider chosen".into())));
            };
            let provider = chosen.provider();
            let n = call.attempts.fetch_add(1, Ordering::Relaxed) + 1;
            let attempt = observe::Attempt::start(&self.clock, provider.name(), model, n, retry);
            let t0 = Instant::now();
            let limit = self.attempt_limit(call.mode, has_next, call.deadline);
            let pcall = ProviderCall::new(req, model).with_prompt_tokens(prompt_tokens);
            let result = match call.mode {
                Mode::Whole => {
                    let fut = provider.chat(pcall).instrument(attempt.span());
                    within(limit, provider.name(), "no answer", fut)
                        .await
                        .map(Reply::Whole)
                }
                Mode::Stream => {
                    let open = async {
                        let mut s = provider.stream(pcall).await?;
                        match s.next().await {
                            Some(Ok(first)) => Ok(Reply::Stream { first, rest: s }),
                            Some(Err(e)) => Err(e),
                            None => Err(Error::StreamInterrupted {
                                chunks: 0,
                                reason: "the stream ended before its first event".into(),
                            }),
                        }
                    }
                    .instrument(attempt.span());
                    within(limit, provider.name(), "no first token", open).await
                }
            };
            let latency = t0.elapsed();
            let provider_name = provider.name().to_owned();
            // A whole answer and a failure are judged now; a stream that opened when
            // it ends, except a half-open probe, whose first event decides.
            let judge_now = call.mode == Mode::Whole || result.is_err() || admit == Admit::Probe;
            let key = begun.key();
            self.observe_call(
                model,
                key,
                judge_now.then_some(admit),
                result.as_ref().err(),
                latency,
            );
            if let Some(Chosen::Deployment(p)) = &begun.chosen {
                p.record(latency, result.is_ok());
            }
            begun.breakers = None; // judged, or owed to the stream's end
            let at = self.clock.now();
            match result {
                Ok(Reply::Whole(mut r)) => {
                    self.target_settle(model, charged, r.usage.total());
                    attempt.finish(false, Ok(Some(&r)));
                    r.cost = model.cost(&r.usage);
                    return Ok(Answered {
                        reply: Reply::Whole(r),
                        model: Arc::clone(model),
                        provider: provider_name,
                        target_charged: 0,
                        owed: None,
                        deployment: None,
                        at,
                    });
                }
                Ok(reply @ Reply::Stream { .. }) => {
                    attempt.finish(true, Ok(None));
                    let deployment = match begun.chosen.take() {
                        Some(Chosen::Deployment(p)) => Some(p),
                        _ => None,
                    };
                    return Ok(Answered {
                        reply,
                        model: Arc::clone(model),
                        provider: provider_name,
                        target_charged: charged,
                        owed: Some(admit),
                        deployment,
                        at,
                    });
                }
                Err(e) => {
                    self.target_settle(model, charged, 0);
                    attempt.finish(call.mode == Mode::Stream, Err(&e));
                    drop(begun);
                    if !self
                        .retry_wait(model, &e, retry, has_next, call.deadline)
                        .await
                    {
                        return Err(Failure::Failed(e));
                    }
                    retry += 1;
                }
            }
        }
    }

    /// Races `first` against `second` once `first` has been slow for the hedge delay
    /// (for a stream: slow to its first event). Returns the winner, whether `second`
    /// won, and the cost of a loser cancelled in flight (its prompt, which the
    /// provider received).
    async fn hedged(
        &self,
        call: &Call<'_>,
        (first, second): (&Arc<ModelSpec>, &Arc<ModelSpec>),
        second_has_next: bool,
        hedge: Hedge,
    ) -> std::result::Result<(Answered, bool, Cost), Failure> {
        let delay = self.latencies.delay(hedge, &first.name);
        let a = self.try_target(call, first, true);
        tokio::pin!(a);
        tokio::select! {
            r = &mut a => {
                return match r {
                    Ok(r) => Ok((r, false, Cost::ZERO)),
                    // failed before the hedge was due: plain fallback
                    Err(_) => self.try_target(call, second, second_has_next).await.map(|r| (r, true, Cost::ZERO)),
                };
            }
            () = tokio::time::sleep(delay) => {}
        }
        tracing::debug!(first = %first.name, second = %second.name, "hedging");
        let b = self.try_target(call, second, second_has_next);
        tokio::pin!(b);
        let prompt_cost = |m: &ModelSpec| {
            m.pricing
                .input
                .cost_of(call.plan.prompt_tokens(m.tokenizer))
        };
        let (mut a_err, mut b_err): (Option<Failure>, Option<Failure>) = (None, None);
        loop {
            tokio::select! {
                r = &mut a, if a_err.is_none() => match r {
                    Ok(r) => {
                        let loser = if b_err.is_none() { prompt_cost(second) } else { Cost::ZERO };
                        return Ok((r, false, loser));
                    }
                    Err(e) => a_err = Some(e),
                },
                r = &mut b, if b_err.is_none() => match r {
                    Ok(r) => {
                        let loser = if a_err.is_none() { prompt_cost(first) } else { Cost::ZERO };
                        return Ok((r, true, loser));
                    }
                    Err(e) => b_err = Some(e),
                },
            }
            if let (Some(_), Some(_)) = (&a_err, &b_err) {
                return Err(b_err.unwrap_or(Failure::Open(Duration::ZERO)));
            }
        }
    }

    /// Tries the targets of one tier in order (hedging if configured), whole or
    /// streamed: the one attempt loop of the pipeline.
    pub(super) async fn try_targets(
        &self,
        call: &Call<'_>,
        tier: &[Arc<ModelSpec>],
    ) -> Result<Dispatched> {
        let before = call.attempts.load(Ordering::Relaxed);
        let mut last: Option<Error> = None;
        let mut soonest_open: Option<Duration> = None;
        let mut all_open = true;
        let mut i = 0;
        while i < tier.len() {
            let has_next = i + 1 < tier.len();
            let outcome = match self.hedge.filter(|_| has_next) {
                Some(h) => {
                    // boxed: two attempts side by side inside it made every whole
                    // answer's future a third larger (8.3 KB, now 6.2 KB), hedged or not
                    let r = Box::pin(self.hedged(
                        call,
                        (&tier[i], &tier[i + 1]),
                        i + 2 < tier.len(),
                        h,
                    ))
                    .await;
                    let at = i;
                    i += 1; // both were tried
                    r.map(|(a, second, extra)| (a, at + usize::from(second), extra))
                }
                None => self
                    .try_target(call, &tier[i], has_next)
                    .await
                    .map(|a| (a, i, Cost::ZERO)),
            };
            let model = &tier[i.min(tier.len() - 1)];
            match outcome {
                Ok((answered, at, extra_cost)) => {
                    return Ok(Dispatched {
                        answered,
                        fallbacks: u32::try_from(at).unwrap_or(u32::MAX),
                        extra_cost,
                    });
                }
                Err(Failure::Open(wait)) => {
                    tracing::debug!(model = %model.name, "circuit open; next target");
                    soonest_open = Some(soonest_open.map_or(wait, |s| s.min(wait)));
                    last = Some(breaker_open(model, wait));
                }
                Err(Failure::Failed(e)) => {
                    tracing::debug!(model = %model.name, error = %e, "target failed");
                    all_open = false;
                    let go_on = e.may_succeed_elsewhere();
                    last = Some(e);
                    if !go_on {
                        break;
                    }
                }
            }
            i += 1;
        }
        let calls = call.attempts.load(Ordering::Relaxed) - before;
        if calls == 0 && all_open && soonest_open.is_some() {
            return Err(Error::Unavailable {
                retry_after: soonest_open,
            });
        }
        let last = last.unwrap_or_else(|| Error::InvalidRequest("no target to try".into()));
        Err(if calls > 1 {
            Error::AllTargetsFailed {
                attempts: calls,
                last: Box::new(last),
            }
        } else {
            last
        })
    }
}

/// A whole answer and what every call behind it used (an escalated first answer and
/// hedged calls that lost included).
pub(super) struct Answer {
    pub(super) response: ChatResponse,
    pub(super) usage: crate::types::Usage,
    pub(super) cost: Cost,
}

/// How a stream's dispatch ended.
pub(super) enum Opened {
    /// A provider stream produced its first event.
    Live {
        dispatched: Dispatched,
        /// Calls made so far.
        attempts: u32,
        /// What a validated first tier used before escalating to this stream.
        prior: Option<(crate::types::Usage, Cost)>,
    },
    /// A validated whole answer, replayed as a stream.
    Whole(Answer),
}

impl Inner {
    /// Whether the validator sends `answer` to the escalation tier.
    async fn escalates(&self, req: &ChatRequest, answer: &ChatResponse) -> bool {
        let Some(v) = &self.validator else {
            return false;
        };
        match v.validate(req, answer).await {
            crate::router::Verdict::Escalate(reason) => {
                tracing::info!(reason = %reason, from = %answer.model, "escalating");
                true
            }
            _ => false,
        }
    }

    /// The first tier answered whole, and judged by the validator when the plan says
    /// so: returns the answer and whether it must escalate.
    async fn first_tier_whole(&self, call: &Call<'_>, plan: &Plan) -> Result<(Answer, u32, bool)> {
        let d = self.try_targets(call, &plan.route.targets).await?;
        let Reply::Whole(response) = d.answered.reply else {
            return Err(Error::Config("a whole call returned a stream".into()));
        };
        let escalate = plan.validated && self.escalates(call.req, &response).await;
        Ok((
            Answer {
                usage: response.usage,
                cost: response.cost + d.extra_cost,
                response,
            },
            d.fallbacks,
            escalate,
        ))
    }

    /// The dispatch and validate stages for a whole answer. Returns the answer (or the
    /// error) and the number of provider calls made.
    pub(super) async fn dispatch(
        &self,
        req: &ChatRequest,
        plan: &Plan,
        deadline: Option<Instant>,
    ) -> (Result<Answer>, u32) {
        let attempts = AtomicU32::new(0);
        let call = Call {
            req,
            plan,
            mode: Mode::Whole,
            deadline,
            attempts: &attempts,
        };
        let first = self.first_tier_whole(&call, plan).await;
        let result = match first {
            Err(e) => Err(e),
            Ok((mut answer, fallbacks, escalate)) => {
                let mut escalated = false;
                if escalate {
                    match self.try_targets(&call, &plan.route.escalation).await {
                        Ok(Dispatched {
                            answered:
                                Answered {
                                    reply: Reply::Whole(better),
                                    ..
                                },
                            extra_cost,
                            ..
                        }) => {
                            answer.usage = answer.usage + better.usage;
                            answer.cost += better.cost + extra_cost;
                            answer.response = better;
                            escalated = true;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "escalation failed; keeping the first answer");
                        }
                    }
                }
                answer.response.served = crate::types::Served::Provider {
                    attempts: attempts.load(Ordering::Relaxed),
                    fallbacks,
                    escalated,
                };
                Ok(answer)
            }
        };
        (result, attempts.load(Ordering::Relaxed))
    }

    /// The dispatch stage for a stream. Without validation, the first target that
    /// yields a first event streams live. With a validator and an escalation tier, the
    /// first tier answers whole and is judged before anything is released (a stream
    /// cannot take back text it sent): a good answer is replayed as a stream, a weak
    /// one is replaced by the escalation tier streaming live.
    pub(super) async fn dispatch_stream(
        &self,
        req: &ChatRequest,
        plan: &Plan,
        deadline: Option<Instant>,
    ) -> (Result<Opened>, u32) {
        let attempts = AtomicU32::new(0);
        let whole = Call {
            req,
            plan,
            mode: Mode::Whole,
            deadline,
            attempts: &attempts,
        };
        let streamed = Call {
            mode: Mode::Stream,
            ..whole
        };
        let count = || attempts.load(Ordering::Relaxed);
        if !plan.validated {
            let r = self.try_targets(&streamed, &plan.route.targets).await;
            let n = count();
            return (
                r.map(|dispatched| Opened::Live {
                    dispatched,
                    attempts: n,
                    prior: None,
                }),
                n,
            );
        }
        let (mut answer, fallbacks, escalate) = match self.first_tier_whole(&whole, plan).await {
            Ok(a) => a,
            Err(e) => return (Err(e), count()),
        };
        if escalate {
            match self.try_targets(&streamed, &plan.route.escalation).await {
                Ok(dispatched) => {
                    let n = count();
                    return (
                        Ok(Opened::Live {
                            dispatched,
                            attempts: n,
                            prior: Some((answer.usage, answer.cost)),
                        }),
                        n,
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "escalation failed; keeping the first answer");
                }
            }
        }
        answer.response.served = crate::types::Served::Provider {
            attempts: count(),
            fallbacks,
            escalated: false,
        };
        (Ok(Opened::Whole(answer)), count())
    }
}
