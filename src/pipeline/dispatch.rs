//! The dispatch stage: targets in order, each behind its circuit breaker and quota,
//! called with deadlines, retried within the retry budget, optionally hedged.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::Instrument;

use super::{Answer, Inner, Opened, Plan};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::observe;
use crate::provider::{Provider, ProviderCall};
use crate::resilience::{Admit, Breakers, Hedge};
use crate::router::Verdict;
use crate::router::balance::Picked;
use crate::types::{ChatRequest, ChatResponse, Cost, ModelSpec, Served, Usage};
use crate::{Error, Result};

/// Marks errors that mean "this target's breaker is open" (no call was made).
const BREAKER_OPEN: &str = "circuit open";

fn breaker_open(model: &ModelSpec, wait: Duration) -> Error {
    ProviderError::new(
        ProviderErrorKind::Overloaded,
        "tokenwise",
        format!("{BREAKER_OPEN} for {}", model.name),
    )
    .with_retry_after(wait)
    .into()
}

fn is_breaker_open(e: &Error) -> bool {
    e.as_provider()
        .is_some_and(|p| p.provider == "tokenwise" && p.message.starts_with(BREAKER_OPEN))
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

/// Whether `e` says the target is unhealthy (as opposed to the request being wrong).
fn is_target_failure(e: &Error) -> bool {
    match e {
        Error::Provider(p) => p.kind.is_target_failure(),
        Error::StreamInterrupted { .. } => true,
        _ => false,
    }
}

/// Whether `e` says the target is overloaded (for the adaptive concurrency limit).
fn is_overload(e: &Error) -> bool {
    e.as_provider().is_some_and(|p| {
        matches!(
            p.kind,
            ProviderErrorKind::RateLimited
                | ProviderErrorKind::Overloaded
                | ProviderErrorKind::Timeout
                | ProviderErrorKind::Server
        )
    })
}

/// The provider chosen for one call, with its deployment's in-flight slot.
pub(super) enum Chosen<'a> {
    Direct(&'a Arc<dyn Provider>),
    Deployment(Picked<'a>),
}

impl Chosen<'_> {
    fn provider(&self) -> &Arc<dyn Provider> {
        match self {
            Chosen::Direct(p) => p,
            Chosen::Deployment(p) => p.provider(),
        }
    }

    fn record(&self, latency: Duration, ok: bool) {
        if let Chosen::Deployment(p) = self {
            p.record(latency, ok);
        }
    }
}

/// An attempt that may call its target (see `Inner::begin_attempt`); the breaker's
/// admission is `guard.admit`.
struct Begun<'a> {
    chosen: Chosen<'a>,
    charged: u64,
    guard: ProbeGuard<'a>,
}

/// Gives a half-open probe back if its call is abandoned before it has an outcome.
struct ProbeGuard<'a> {
    breakers: Option<&'a Breakers>,
    target: &'a str,
    admit: Admit,
}

impl ProbeGuard<'_> {
    fn disarm(mut self) {
        self.breakers = None;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.breakers {
            b.cancel(self.target, self.admit);
        }
    }
}

impl Inner {
    /// The provider for one call to `model`: one of its deployments (balanced), else the
    /// provider registered for its provider name, else the default provider.
    pub(super) fn choose(&self, model: &ModelSpec) -> Result<Chosen<'_>> {
        if let Some(picked) = self.deployments.get(&model.name).and_then(|d| d.pick()) {
            return Ok(Chosen::Deployment(picked));
        }
        self.providers
            .get(&model.provider)
            .or(self.default_provider.as_ref())
            .map(Chosen::Direct)
            .ok_or_else(|| {
                Error::Config(format!(
                    "no provider registered for `{}` (model {})",
                    model.provider, model.name
                ))
            })
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

    /// Whether a failure on one target may not repeat on the next.
    fn next_target_may_succeed(e: &Error) -> bool {
        match e {
            Error::Provider(p) => !matches!(
                p.kind,
                ProviderErrorKind::BadRequest | ProviderErrorKind::ContentFilter
            ),
            Error::ContextTooLong { .. } | Error::Config(_) | Error::StreamInterrupted { .. } => {
                true
            }
            _ => false,
        }
    }

    /// The time left for one attempt: the attempt deadline, cut to the request's.
    fn attempt_limit(&self, first_token: bool, deadline: Option<Instant>) -> Option<Duration> {
        let per_attempt = if first_token {
            self.first_token_timeout.or(self.attempt_timeout)
        } else {
            self.attempt_timeout
        };
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match (per_attempt, left) {
            (Some(a), Some(l)) => Some(a.min(l)),
            (a, l) => a.or(l),
        }
    }

    fn breaker_admit(&self, model: &ModelSpec) -> Result<Admit> {
        match &self.breakers {
            None => Ok(Admit::Call),
            Some(b) => b
                .admit(&model.name)
                .map_err(|wait| breaker_open(model, wait)),
        }
    }

    /// Feeds one call's outcome to the breaker, the latency tracker and the adaptive limit.
    fn observe_call(
        &self,
        model: &ModelSpec,
        admit: Option<Admit>,
        error: Option<&Error>,
        latency: Duration,
    ) {
        if let Some(admit) = admit {
            self.breaker_verdict(model, admit, error.is_some_and(is_target_failure));
        }
        if error.is_none() {
            self.latencies.record(&model.name, latency);
        }
        if let Some(c) = &self.concurrency {
            c.feedback(error.is_some_and(is_overload), latency);
        }
    }

    /// Tells `model`'s breaker how a call it admitted went.
    pub(super) fn breaker_verdict(&self, model: &ModelSpec, admit: Admit, failed: bool) {
        self.with_breakers(model, |b| b.record(&model.name, admit, failed));
    }

    /// Records how a stream of `model` ended (see [`Breakers::record_stream_end`]).
    pub(super) fn breaker_stream_end(&self, model: &ModelSpec, admit: Admit, failed: bool) {
        self.with_breakers(model, |b| b.record_stream_end(&model.name, admit, failed));
    }

    fn with_breakers(&self, model: &ModelSpec, record: impl FnOnce(&Breakers)) {
        if let Some(b) = &self.breakers {
            record(b);
            observe::metrics::record_breaker_state(
                &model.provider,
                &model.name,
                b.state(&model.name),
            );
        }
    }

    /// Waits before retry number `retry` after `e`, if the policy, the budget and the
    /// deadline allow one more call to `model`.
    async fn retry_wait(
        &self,
        model: &ModelSpec,
        e: &Error,
        retry: u32,
        deadline: Option<Instant>,
    ) -> bool {
        if !e.is_retryable() || retry + 1 >= self.retry.max_attempts || is_breaker_open(e) {
            return false;
        }
        let Some(wait) = self.retry.wait_for(e, retry) else {
            return false;
        };
        if deadline.is_some_and(|d| Instant::now() + wait >= d) {
            return false;
        }
        if !self.retry_budget.withdraw(&model.name) {
            tracing::debug!(model = %model.name, "retry budget exhausted");
            return false;
        }
        tokio::time::sleep(wait).await;
        true
    }

    /// Opens attempt number `retry` on `model`: the deployment, the target's own quota,
    /// the breaker (a probe is given back if the attempt is dropped), and on the first
    /// attempt a deposit into the retry budget. On refusal, the error and whether it
    /// was the breaker that refused.
    fn begin_attempt<'a>(
        &'a self,
        req: &ChatRequest,
        plan: &Plan,
        model: &'a ModelSpec,
        retry: u32,
    ) -> std::result::Result<Begun<'a>, (Error, bool)> {
        let chosen = self.choose(model).map_err(|e| (e, false))?;
        let charged = self
            .target_admit(req, plan, model)
            .map_err(|e| (e, false))?;
        let admit = match self.breaker_admit(model) {
            Ok(a) => a,
            Err(e) => {
                self.target_settle(model, charged, 0);
                return Err((e, true));
            }
        };
        if retry == 0 {
            self.retry_budget.deposit(&model.name);
        }
        Ok(Begun {
            chosen,
            charged,
            guard: ProbeGuard {
                breakers: self.breakers.as_ref(),
                target: &model.name,
                admit,
            },
        })
    }

    /// One target: breaker, quota, call with deadline, retries.
    async fn try_target(
        &self,
        req: &ChatRequest,
        plan: &Plan,
        model: &ModelSpec,
        attempts: &AtomicU32,
        deadline: Option<Instant>,
    ) -> Result<ChatResponse> {
        let fitted = self.fit(req, plan, model)?;
        let req = fitted.as_ref();
        let mut retry = 0;
        loop {
            let Begun {
                chosen,
                charged,
                guard,
            } = self
                .begin_attempt(req, plan, model, retry)
                .map_err(|(e, _)| e)?;
            let admit = guard.admit;
            let provider = chosen.provider();
            let n = attempts.fetch_add(1, Ordering::Relaxed) + 1;
            let attempt = observe::Attempt::start(&self.clock, provider.name(), model, n, retry);
            let t0 = Instant::now();
            let fut = provider
                .chat(ProviderCall::new(req, model))
                .instrument(attempt.span());
            let limit = self.attempt_limit(false, deadline);
            let result = within(limit, provider.name(), "no answer", fut).await;
            self.target_settle(
                model,
                charged,
                result.as_ref().map_or(0, |r| r.usage.total()),
            );
            self.observe_call(model, Some(admit), result.as_ref().err(), t0.elapsed());
            attempt.finish(&result);
            guard.disarm();
            match result {
                Ok(mut r) => {
                    r.cost = model.cost(&r.usage);
                    return Ok(r);
                }
                Err(e) => {
                    if !self.retry_wait(model, &e, retry, deadline).await {
                        return Err(e);
                    }
                    retry += 1;
                }
            }
        }
    }

    /// Races `first` against `second` once `first` has been slow for the hedge delay.
    /// Returns the winner, whether `second` won, and the cost of a loser cancelled in
    /// flight (its prompt, which the provider received).
    async fn hedged(
        &self,
        req: &ChatRequest,
        plan: &Plan,
        (first, second): (&ModelSpec, &ModelSpec),
        hedge: Hedge,
        attempts: &AtomicU32,
        deadline: Option<Instant>,
    ) -> Result<(ChatResponse, bool, Cost)> {
        let delay = self.latencies.delay(hedge, &first.name);
        let a = self.try_target(req, plan, first, attempts, deadline);
        tokio::pin!(a);
        tokio::select! {
            r = &mut a => {
                return match r {
                    Ok(r) => Ok((r, false, Cost::ZERO)),
                    // failed before the hedge was due: plain fallback
                    Err(_) => self.try_target(req, plan, second, attempts, deadline).await.map(|r| (r, true, Cost::ZERO)),
                };
            }
            () = tokio::time::sleep(delay) => {}
        }
        tracing::debug!(first = %first.name, second = %second.name, "hedging");
        let b = self.try_target(req, plan, second, attempts, deadline);
        tokio::pin!(b);
        let prompt_cost = |m: &ModelSpec| m.pricing.input.cost_of(plan.prompt_tokens(m.tokenizer));
        let (mut a_err, mut b_err): (Option<Error>, Option<Error>) = (None, None);
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
            if let (Some(_), Some(e)) = (&a_err, &mut b_err) {
                return Err(std::mem::replace(
                    e,
                    Error::Overloaded { retry_after: None },
                ));
            }
        }
    }

    /// Tries `targets` in order (hedging if configured); returns the answer, the index of
    /// the target that gave it, and the cost of hedged calls that lost.
    async fn try_targets(
        &self,
        req: &ChatRequest,
        plan: &Plan,
        targets: &[Arc<ModelSpec>],
        attempts: &AtomicU32,
        deadline: Option<Instant>,
    ) -> Result<(ChatResponse, u32, Cost)> {
        let before = attempts.load(Ordering::Relaxed);
        let mut last = None;
        let mut open_waits = Vec::new();
        let mut i = 0;
        while i < targets.len() {
            let hedge = self.hedge.filter(|_| i + 1 < targets.len());
            let outcome = match hedge {
                Some(h) => {
                    let r = self
                        .hedged(
                            req,
                            plan,
                            (&targets[i], &targets[i + 1]),
                            h,
                            attempts,
                            deadline,
                        )
                        .await;
                    let at = i;
                    i += 1; // both were tried
                    r.map(|(resp, second, extra)| (resp, at + usize::from(second), extra))
                }
                None => self
                    .try_target(req, plan, &targets[i], attempts, deadline)
                    .await
                    .map(|r| (r, i, Cost::ZERO)),
            };
            match outcome {
                Ok((r, at, extra)) => return Ok((r, u32::try_from(at).unwrap_or(u32::MAX), extra)),
                Err(e) => {
                    tracing::debug!(model = %targets[i.min(targets.len() - 1)].name, error = %e, "target failed");
                    if is_breaker_open(&e) {
                        open_waits.push(e.retry_after().unwrap_or_default());
                    }
                    let go_on = Self::next_target_may_succeed(&e);
                    last = Some(e);
                    if !go_on {
                        break;
                    }
                }
            }
            i += 1;
        }
        let calls = attempts.load(Ordering::Relaxed) - before;
        if calls == 0 && !open_waits.is_empty() && open_waits.len() == targets.len() {
            return Err(Error::Unavailable {
                retry_after: open_waits.into_iter().min(),
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

    /// The dispatch and validate stages for a whole answer.
    pub(super) async fn dispatch(
        &self,
        req: &ChatRequest,
        plan: &Plan,
        rec: &mut crate::observe::UsageRecord,
        deadline: Option<Instant>,
    ) -> Result<Answer> {
        let attempts = AtomicU32::new(0);
        let outcome = self
            .try_targets(req, plan, &plan.route.targets, &attempts, deadline)
            .await;
        rec.attempts = attempts.load(Ordering::Relaxed);
        let (first, fallbacks, hedge_cost) = outcome?;
        let mut answer = Answer {
            usage: first.usage,
            cost: first.cost + hedge_cost,
            response: first,
        };
        let mut escalated = false;
        if let (Some(v), false) = (&self.validator, plan.route.escalation.is_empty()) {
            if let Verdict::Escalate(reason) = v.validate(req, &answer.response).await {
                tracing::info!(reason = %reason, from = %answer.response.model, "escalating");
                let outcome = self
                    .try_targets(req, plan, &plan.route.escalation, &attempts, deadline)
                    .await;
                match outcome {
                    Ok((better, _, extra)) => {
                        answer.usage = add_usage(answer.usage, better.usage);
                        answer.cost += better.cost + extra;
                        answer.response = better;
                        escalated = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "escalation failed; keeping the first answer")
                    }
                }
            }
        }
        rec.attempts = attempts.load(Ordering::Relaxed);
        answer.response.served = Served::Provider {
            attempts: rec.attempts,
            fallbacks,
            escalated,
        };
        Ok(answer)
    }

    /// Opens a stream on the first target that yields a first event, retrying a target
    /// (within the policy and budget) while nothing has been streamed yet.
    pub(super) async fn dispatch_stream(
        &self,
        req: &ChatRequest,
        plan: &Plan,
        rec: &mut crate::observe::UsageRecord,
        deadline: Option<Instant>,
    ) -> Result<Opened> {
        let mut last = None;
        let mut calls = 0;
        let mut open_waits = 0;
        for (i, model) in plan.route.targets.iter().enumerate() {
            let fitted = match self.fit(req, plan, model) {
                Ok(f) => f,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let req = fitted.as_ref();
            let mut retry = 0;
            let failure = loop {
                let Begun {
                    chosen,
                    charged: target_charged,
                    guard,
                } = match self.begin_attempt(req, plan, model, retry) {
                    Ok(b) => b,
                    Err((e, by_breaker)) => {
                        open_waits += usize::from(by_breaker);
                        break e;
                    }
                };
                let admit = guard.admit;
                let provider = chosen.provider();
                calls += 1;
                rec.attempts += 1;
                let attempt = observe::Attempt::start(
                    &self.clock,
                    provider.name(),
                    model,
                    rec.attempts,
                    retry,
                );
                let t0 = Instant::now();
                let open = async {
                    let mut s = provider.stream(ProviderCall::new(req, model)).await?;
                    match s.next().await {
                        Some(Ok(first)) => Ok((first, s)),
                        Some(Err(e)) => Err(e),
                        None => Err(Error::StreamInterrupted {
                            chunks: 0,
                            reason: "the stream ended before its first event".into(),
                        }),
                    }
                }
                .instrument(attempt.span());
                let limit = self.attempt_limit(true, deadline);
                let opened = within(limit, provider.name(), "no first token", open).await;
                // A stream that opened is judged when it ends (a stream cut later is a
                // target failure), except a half-open probe: its first event decides, so
                // the breaker does not wait on a long answer.
                let verdict_now = opened.is_err() || admit == Admit::Probe;
                self.observe_call(
                    model,
                    verdict_now.then_some(admit),
                    opened.as_ref().err(),
                    t0.elapsed(),
                );
                chosen.record(t0.elapsed(), opened.is_ok());
                attempt.finish_stream(rec, &opened);
                guard.disarm();
                match opened {
                    Ok((first, upstream)) => {
                        return Ok(Opened {
                            breaker: admit,
                            target_charged,
                            first,
                            upstream,
                            model: Arc::clone(model),
                            provider: provider.name().to_owned(),
                            fallbacks: u32::try_from(i).unwrap_or(u32::MAX),
                        });
                    }
                    Err(e) => {
                        self.target_settle(model, target_charged, 0);
                        if !self.retry_wait(model, &e, retry, deadline).await {
                            break e;
                        }
                        retry += 1;
                    }
                }
            };
            let go_on = Self::next_target_may_succeed(&failure);
            last = Some(failure);
            if !go_on {
                break;
            }
        }
        if calls == 0 && open_waits > 0 && open_waits == plan.route.targets.len() {
            let names: Vec<&str> = plan.route.targets.iter().map(|m| m.name.as_str()).collect();
            let retry_after = self.breakers.as_ref().and_then(|b| b.soonest_retry(&names));
            return Err(Error::Unavailable { retry_after });
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

fn add_usage(a: Usage, b: Usage) -> Usage {
    Usage {
        input_tokens: a.input_tokens + b.input_tokens,
        output_tokens: a.output_tokens + b.output_tokens,
        cached_input_tokens: a.cached_input_tokens + b.cached_input_tokens,
        estimated: a.estimated || b.estimated,
    }
}
