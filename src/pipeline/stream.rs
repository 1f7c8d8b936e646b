//! Streams through the pipeline: cached answers replayed as chunks, and provider
//! streams metered so that what they use is settled however they end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_core::Stream;
use futures_util::stream;

use std::sync::atomic::{AtomicU32, Ordering};

use super::Inner;
use super::admit::Admitted;
use super::budget::Held;
use super::dispatch::{Call, Dispatched, Mode, Reply};
use super::plan::Plan;
use crate::cache::CacheQuery;
use crate::observe;
use crate::observe::{Outcome, UsageRecord};
use crate::router::balance::Picked;
use crate::types::{
    ChatRequest, ChatResponse, ChatStream, Cost, FinishReason, Message, ModelSpec, RequestMeta,
    Served, StreamEnd, StreamEvent, TokenizerKind, ToolCall, Truncation, Usage,
};
use crate::{Error, Result};

/// Words per replayed chunk.
const REPLAY_WORDS: usize = 4;

/// A cached answer as a stream: text in chunks of a few words, tool calls, usage, done.
pub(super) fn replay(hit: &ChatResponse) -> ChatStream {
    let mut events: Vec<Result<StreamEvent>> = Vec::new();
    let mut chunk = String::new();
    let mut words = 0;
    for piece in hit.content.split_inclusive(' ') {
        chunk.push_str(piece);
        words += 1;
        if words == REPLAY_WORDS {
            events.push(Ok(StreamEvent::text(std::mem::take(&mut chunk))));
            words = 0;
        }
    }
    if !chunk.is_empty() {
        events.push(Ok(StreamEvent::text(chunk)));
    }
    for (i, call) in hit.tool_calls.iter().enumerate() {
        let mut d = crate::types::ToolCallDelta::new(
            u32::try_from(i).unwrap_or(u32::MAX),
            call.arguments.clone(),
        );
        d.id = Some(call.id.clone());
        d.name = Some(call.name.clone());
        events.push(Ok(StreamEvent::ToolCallDelta(d)));
    }
    events.push(Ok(StreamEvent::Usage(hit.usage)));
    events.push(Ok(StreamEvent::Done(StreamEnd::of_response(hit))));
    Box::pin(stream::iter(events))
}

/// Everything needed to settle a stream, owned, so it can be done from a destructor.
pub(super) struct Settle {
    pub(super) inner: Arc<Inner>,
    /// The budget reservation (committed to what the stream used when it ends).
    pub(super) held: Held,
    /// The admission: its token charge is reconciled and its concurrency slot held
    /// until the stream ends.
    pub(super) admitted: Admitted<'static>,
    pub(super) cache: Option<CacheQuery>,
    pub(super) model: Arc<ModelSpec>,
    pub(super) provider: String,
    pub(super) prompt_tokens: u64,
    pub(super) fallbacks: u32,
    pub(super) attempts: u32,
    /// The breaker's admission of this stream, judged when it ends: a failure after the
    /// first event counts against the target (a probe was already judged by its first
    /// event, so only its later failure is recorded).
    pub(super) owed: Option<crate::resilience::Admit>,
    /// The deployment serving the stream: its in-flight count is held until the end.
    pub(super) deployment: Option<Picked>,
    /// The token charge on the model's own quota, reconciled at the end.
    pub(super) target_charged: u64,
    /// The kill switch: end the stream at this many output tokens...
    pub(super) max_tokens: Option<u64>,
    /// ...or at this cost.
    pub(super) max_cost: Option<Cost>,
    /// The longest wait between two events.
    pub(super) idle_timeout: Option<std::time::Duration>,
    pub(super) record: UsageRecord,
    pub(super) span: tracing::Span,
    /// A semantic match a cache guard refused, reported on the final event.
    pub(super) guard_rejected: Option<crate::cache::GuardRejection>,
    /// Leads the single-flight of identical streams: they read this one.
    pub(super) leader: Option<crate::cache::Leader<Arc<crate::cache::SharedStream>>>,
    /// What earlier calls used: a validated first tier that escalated to this stream,
    /// and attempts cut mid-answer that a recovery replaced.
    pub(super) prior: Option<(Usage, Cost)>,
    /// Whether a validator escalated to this stream.
    pub(super) escalated: bool,
    /// How a stream cut after its first token is recovered, if it may be.
    pub(super) recovery: Option<Recovery>,
}

/// What a stream needs to recover from a cut after its first token: the request, its
/// plan, the targets of its tier, the recoveries left and the request's deadline.
pub(super) struct Recovery {
    pub(super) req: ChatRequest,
    pub(super) plan: Arc<Plan>,
    pub(super) tier: Vec<Arc<ModelSpec>>,
    pub(super) left: u32,
    pub(super) deadline: Option<tokio::time::Instant>,
}

/// A recovery under way: the new attempt, the calls it made, and whether it continues
/// the delivered text (prefill) rather than restarting the answer.
type Recovering = Pin<Box<dyn Future<Output = (Result<Dispatched>, u32, bool)> + Send>>;

impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settle")
            .field("model", &self.model.name)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// What a stream delivered before it ended, however it ended.
#[derive(Debug, Default)]
struct Delivered {
    text: String,
    tool_calls: Vec<ToolCall>,
    chunks: u64,
    usage: Option<Usage>,
    /// Output tokens of `text[..counted_to]` (cut at a whitespace boundary).
    counted: u64,
    counted_to: usize,
    /// Output tokens of tool-call arguments, delta by delta.
    tool_tokens: u64,
    /// Where the current attempt's own text starts in `text` (after a continuation,
    /// the text before it came from the attempt that was cut).
    attempt_from: usize,
}

/// Text past the counted prefix longer than this is folded into it at its last
/// whitespace, so each delta is counted against a short tail only.
const COUNT_TAIL: usize = 256;

impl Delivered {
    /// Output tokens of the text delivered so far, counted over the accumulated text
    /// (not delta by delta, which overcounts every token split across two deltas).
    fn text_tokens(
        &mut self,
        counter: &dyn crate::context::TokenCounter,
        kind: TokenizerKind,
    ) -> u64 {
        let tail = &self.text[self.counted_to..];
        if tail.len() > COUNT_TAIL {
            if let Some(cut) = tail
                .char_indices()
                .rev()
                .find(|(i, c)| *i > 0 && c.is_whitespace())
                .map(|(i, _)| i)
            {
                self.counted += counter.count_text(&tail[..cut], kind);
                self.counted_to += cut;
            }
        }
        self.counted + counter.count_text(&self.text[self.counted_to..], kind)
    }
}

impl Delivered {
    fn push(&mut self, ev: &StreamEvent) {
        match ev {
            StreamEvent::TextDelta { text } => {
                self.text.push_str(text);
                self.chunks += 1;
            }
            StreamEvent::ToolCallDelta(d) => {
                let i = d.index as usize;
                if i < 128 {
                    while self.tool_calls.len() <= i {
                        self.tool_calls.push(ToolCall {
                            id: String::new(),
                            name: String::new(),
                            arguments: String::new(),
                        });
                    }
                    let c = &mut self.tool_calls[i];
                    if let Some(id) = &d.id {
                        c.id.clone_from(id);
                    }
                    if let Some(n) = &d.name {
                        c.name.push_str(n);
                    }
                    c.arguments.push_str(&d.arguments);
                }
                self.chunks += 1;
            }
            StreamEvent::Usage(u) => self.usage = Some(*u),
            _ => {}
        }
    }
}

/// How the stream ended.
#[derive(Debug)]
enum Ending {
    Done(StreamEnd),
    Failed(String),
    Dropped,
}

impl Settle {
    /// Commits what the stream used, reconciles tokens, stores a complete answer and
    /// records usage. Returns the final event for a completed stream.
    async fn finish(mut self, delivered: Delivered, ending: Ending) -> Option<StreamEnd> {
        let inner = Arc::clone(&self.inner);
        let usage = delivered.usage.unwrap_or_else(|| {
            // No usage from the provider: count what was delivered.
            let own = delivered.text.get(delivered.attempt_from..).unwrap_or("");
            let out = inner.counter.count_text(own, self.model.tokenizer)
                + delivered
                    .tool_calls
                    .iter()
                    .map(|c| inner.counter.count_text(&c.arguments, self.model.tokenizer))
                    .sum::<u64>();
            Usage::new(self.prompt_tokens, out).estimated()
        });
        let cost = self.model.cost(&usage);
        if let Some(admit) = self.owed.take() {
            // Cut upstream (an error, silence past the idle timeout, no final event) is
            // the target's failure; an answer that ended, or a client that left, is not.
            let failed = matches!(ending, Ending::Failed(_));
            let key = super::dispatch::breaker_key(&self.model, self.deployment.as_ref());
            inner.breaker_stream_end(&self.model, key, admit, failed);
        }
        drop(self.deployment.take());
        let (total_usage, total_cost) = match self.prior {
            Some((u, c)) => (u + usage, c + cost),
            None => (usage, cost),
        };
        inner
            .settle_use(&mut self.held, &mut self.admitted, &total_usage, total_cost)
            .await;
        inner.target_settle(&self.model, self.target_charged, usage.total());
        let started_at = self.record.started_at;
        let mut rec = std::mem::replace(
            &mut self.record,
            UsageRecord::new(started_at, &RequestMeta::default(), true),
        );
        rec.model = Some(self.model.name.clone());
        rec.provider = Some(self.provider.clone());
        rec.set_used(total_usage, total_cost);
        rec.set_attempts(self.attempts);
        let served = Served::Provider {
            attempts: self.attempts,
            fallbacks: self.fallbacks,
            escalated: self.escalated,
        };
        rec.set_served(&served);
        match ending {
            Ending::Done(mut end) => {
                if let (Some(q), true) = (&self.cache, end.finish_reason.is_complete()) {
                    let mut resp = ChatResponse::new(
                        delivered.text,
                        &self.model.name,
                        &self.provider,
                        usage,
                        end.finish_reason.clone(),
                    )
                    .with_tool_calls(delivered.tool_calls);
                    resp.cost = cost;
                    resp.served = served.clone();
                    inner.cache_put(q, &resp).await;
                }
                // Everything the stream was billed: an escalated first tier and
                // attempts cut and recovered included.
                end.usage = total_usage;
                end.cost = total_cost;
                end.served = served;
                end.guard_rejected = self.guard_rejected.take();
                rec.outcome = Outcome::Provider;
                inner.record(rec, &self.span, Some(end.finish_reason.as_str()));
                Some(end)
            }
            Ending::Failed(reason) => {
                rec.outcome = Outcome::Error(reason);
                inner.record(rec, &self.span, None);
                None
            }
            Ending::Dropped => {
                rec.outcome = Outcome::Error("stream_dropped".into());
                inner.record(
                    rec,
                    &self.span,
                    Some(&FinishReason::Other("dropped".into()).to_string()),
                );
                None
            }
        }
    }
}

type Finishing = Pin<Box<dyn Future<Output = Option<StreamEnd>> + Send>>;

/// A provider stream with its settlement attached.
struct Metered {
    upstream: ChatStream,
    first: Option<StreamEvent>,
    delivered: Delivered,
    settle: Option<Settle>,
    /// Settlement in progress, and the error to yield once it is done (if any).
    finishing: Option<(Finishing, Option<Error>)>,
    done: bool,
    /// Fires when the upstream is silent for the idle timeout.
    idle: Option<(std::time::Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// A recovery under way, and the interruption to report if it fails.
    recovering: Option<(Recovering, Error)>,
    /// During a restart: how much of the delivered text the new attempt has repeated,
    /// and how much it must repeat before its text is released.
    restart: Option<(usize, usize)>,
}

pub(super) fn metered(mut settle: Settle, first: StreamEvent, upstream: ChatStream) -> ChatStream {
    let leader = settle.leader.take();
    let idle = settle
        .idle_timeout
        .map(|d| (d, Box::pin(tokio::time::sleep_until(super::after(d)))));
    let metered: ChatStream = Box::pin(Metered {
        idle,
        upstream,
        first: Some(first),
        delivered: Delivered::default(),
        settle: Some(settle),
        finishing: None,
        done: false,
        recovering: None,
        restart: None,
    });
    super::flight::share(leader, metered)
}

impl Metered {
    /// Counts the output so far and reports the limit it crosses, if any.
    ///
    /// The count runs over the accumulated text, so a token split across two deltas
    /// counts once. Since the provider itself stops at `max_tokens` (it is sent with
    /// the request), the token switch is a safety net for providers that ignore it.
    /// With an exact tokenizer the count of the accumulated text is the provider's
    /// count; with one tokenwise only approximates (Claude's), the switch leaves a
    /// margin of a fifth for the approximation's error, so a stream is never cut
    /// before `max_tokens`.
    fn over_limit(&mut self, ev: &StreamEvent) -> Option<Truncation> {
        let settle = self.settle.as_ref()?;
        if settle.max_tokens.is_none() && settle.max_cost.is_none() {
            return None;
        }
        let kind = settle.model.tokenizer;
        let counter = &*settle.inner.counter;
        match ev {
            StreamEvent::TextDelta { .. } => {}
            StreamEvent::ToolCallDelta(d) => {
                self.delivered.tool_tokens += counter.count_text(&d.arguments, kind);
            }
            _ => return None,
        }
        let out = self.delivered.text_tokens(counter, kind) + self.delivered.tool_tokens;
        if let Some(max) = settle.max_tokens {
            let margin = match kind {
                TokenizerKind::ClaudeApprox => max / 5 + 8,
                _ => 0,
            };
            if out > max.saturating_add(margin) {
                return Some(Truncation::OutputTokens { max_tokens: max });
            }
        }
        let prior = settle.prior.map_or(Cost::ZERO, |(_, c)| c);
        let cost = prior + settle.model.cost(&Usage::new(settle.prompt_tokens, out));
        settle
            .max_cost
            .filter(|m| cost > *m)
            .map(|max_cost| Truncation::Cost { max_cost })
    }

    fn truncated_end(&self, t: Truncation) -> StreamEnd {
        let (model, provider) = self
            .settle
            .as_ref()
            .map(|s| (s.model.name.clone(), s.provider.clone()))
            .unwrap_or_default();
        let mut end = StreamEnd::new(FinishReason::Truncated, model, provider);
        end.truncated = Some(t);
        end
    }

    /// Starts recovering from `e`, a cut after the first token, if the stream may be
    /// recovered: text only, recoveries left, inside the request's deadline. The cut
    /// attempt is billed for what it produced and judged a failure of its target; the
    /// next attempt continues the delivered text on the same model when it accepts
    /// assistant prefill (and falls back to a restart if the prefill is refused), or
    /// restarts the answer, its repetition of the delivered text withheld. The later
    /// targets of the tier are tried first (the one that cut just failed), then the
    /// same one.
    fn try_recover(&mut self, e: Error) -> std::result::Result<(), Error> {
        let Some(settle) = self.settle.as_mut() else {
            return Err(e);
        };
        let now = tokio::time::Instant::now();
        let possible = match &settle.recovery {
            Some(r) => {
                r.left > 0
                    && self.delivered.tool_calls.is_empty()
                    && r.deadline.is_none_or(|d| now < d)
            }
            None => false,
        };
        let Some(rec) = settle.recovery.as_mut().filter(|_| possible) else {
            return Err(e);
        };
        rec.left -= 1;
        // What the cut attempt produced: after a continuation, the text since it
        // began; during a restart, the part of the delivered text it repeated.
        let produced = match self.restart {
            Some((matched, _)) => self.delivered.text.get(..matched),
            None => self.delivered.text.get(self.delivered.attempt_from..),
        }
        .unwrap_or("");
        let inner = Arc::clone(&settle.inner);
        let out = inner.counter.count_text(produced, settle.model.tokenizer);
        let usage = self
            .delivered
            .usage
            .take()
            .unwrap_or_else(|| Usage::new(settle.prompt_tokens, out).estimated());
        let cost = settle.model.cost(&usage);
        settle.prior = Some(match settle.prior {
            Some((u, c)) => (u + usage, c + cost),
            None => (usage, cost),
        });
        if let Some(admit) = settle.owed.take() {
            let key = super::dispatch::breaker_key(&settle.model, settle.deployment.as_ref());
            inner.breaker_stream_end(&settle.model, key, admit, true);
        }
        drop(settle.deployment.take());
        inner.target_settle(
            &settle.model,
            std::mem::take(&mut settle.target_charged),
            usage.total(),
        );
        let model = Arc::clone(&settle.model);
        let text = self.delivered.text.clone();
        // A continuation needs the delivered text as it was sent; a prefill may not end
        // with whitespace, and a restart still catching up has nothing to continue.
        let can_continue =
            self.restart.is_none() && !text.is_empty() && !text.ends_with(char::is_whitespace);
        // The targets after the one that cut come first (it just failed), then itself.
        let order: Vec<Arc<ModelSpec>> = match rec.tier.iter().position(|m| m.name == model.name) {
            Some(i) => rec.tier[i + 1..]
                .iter()
                .chain(std::iter::once(&rec.tier[i]))
                .cloned()
                .collect(),
            None => vec![Arc::clone(&model)],
        };
        tracing::info!(model = %model.name, delivered = text.len(), reason = %e,
            "stream cut after its first token; recovering");
        observe::metrics::record_stream_recovery(&model.provider, &model.name);
        let (req, plan, deadline) = (rec.req.clone(), Arc::clone(&rec.plan), rec.deadline);
        let fut: Recovering = Box::pin(async move {
            let attempts = AtomicU32::new(0);
            let mut last = None;
            for target in &order {
                let one = std::slice::from_ref(target);
                if can_continue && target.accepts_prefill() {
                    let mut cont = req.clone();
                    cont.messages.push(Message::assistant(text.clone()));
                    let call = Call {
                        req: &cont,
                        plan: &plan,
                        mode: Mode::Stream,
                        deadline,
                        attempts: &attempts,
                    };
                    match inner.try_targets(&call, one).await {
                        Ok(d) => return (Ok(d), attempts.load(Ordering::Relaxed), true),
                        Err(e) => {
                            tracing::debug!(model = %target.name, error = %e,
                                "continuation refused; restarting instead");
                        }
                    }
                }
                let call = Call {
                    req: &req,
                    plan: &plan,
                    mode: Mode::Stream,
                    deadline,
                    attempts: &attempts,
                };
                match inner.try_targets(&call, one).await {
                    Ok(d) => return (Ok(d), attempts.load(Ordering::Relaxed), false),
                    Err(e) => last = Some(e),
                }
            }
            let e = last.unwrap_or_else(|| Error::InvalidRequest("no target to recover on".into()));
            (Err(e), attempts.load(Ordering::Relaxed), false)
        });
        self.upstream = Box::pin(stream::empty());
        self.recovering = Some((fut, e));
        Ok(())
    }

    /// Takes over the attempt a recovery opened.
    fn recovered(&mut self, d: Dispatched, calls: u32, continued: bool) -> Result<()> {
        let answered = d.answered;
        let Reply::Stream { first, rest } = answered.reply else {
            return Err(Error::Config("a recovery returned a whole answer".into()));
        };
        if let Some(settle) = self.settle.as_mut() {
            if let Some(r) = &settle.recovery {
                settle.prompt_tokens = r.plan.prompt_tokens(answered.model.tokenizer);
            }
            if settle.model.name != answered.model.name {
                // The cache query is keyed for the model the stream opened on (its
                // tier, for a routed request): an answer finished by another model is
                // not stored under it.
                settle.cache = None;
            }
            settle.model = answered.model;
            settle.provider = answered.provider;
            settle.owed = answered.owed;
            settle.deployment = answered.deployment;
            settle.target_charged = answered.target_charged;
            settle.attempts += calls;
            settle.fallbacks = settle.fallbacks.max(d.fallbacks);
        }
        self.delivered.usage = None;
        if continued {
            self.delivered.attempt_from = self.delivered.text.len();
            self.restart = None;
        } else {
            self.delivered.attempt_from = 0;
            self.restart = Some((0, self.delivered.text.len()));
        }
        self.first = Some(first);
        self.upstream = rest;
        if let Some((d, sleep)) = &mut self.idle {
            sleep.as_mut().reset(super::after(*d));
        }
        Ok(())
    }

    /// During a restart, withholds the new attempt's repetition of the text already
    /// sent. `Ok(None)`: withheld; `Ok(Some(ev))`: what to release (the part of a
    /// delta past the delivered text); `Err`: the restart diverged from what was sent.
    fn withhold(&mut self, ev: StreamEvent) -> std::result::Result<Option<StreamEvent>, Error> {
        let Some((matched, upto)) = self.restart else {
            return Ok(Some(ev));
        };
        let diverged = || Error::StreamInterrupted {
            chunks: self.delivered.chunks,
            reason: "the restarted answer differs from the text already sent".into(),
        };
        let want = self.delivered.text.get(matched..upto).unwrap_or("");
        match ev {
            StreamEvent::TextDelta { text } => {
                if text.len() <= want.len() {
                    if !want.starts_with(text.as_str()) {
                        return Err(diverged());
                    }
                    let matched = matched + text.len();
                    self.restart = (matched < upto).then_some((matched, upto));
                    Ok(None)
                } else if let Some(rest) = text.strip_prefix(want) {
                    self.restart = None;
                    Ok(Some(StreamEvent::text(rest.to_owned())))
                } else {
                    Err(diverged())
                }
            }
            StreamEvent::Usage(u) => {
                self.delivered.usage = Some(u);
                Ok(None)
            }
            // An end, or a tool call, before the delivered text was repeated.
            _ => Err(diverged()),
        }
    }

    /// Ends the stream with `e`, or recovers from it.
    fn interrupted(&mut self, e: Error) {
        if let Err(e) = self.try_recover(e) {
            self.start_finish(Ending::Failed(e.reason().to_owned()), Some(e));
        }
    }

    fn start_finish(&mut self, ending: Ending, error: Option<Error>) {
        if let Some(settle) = self.settle.take() {
            let delivered = std::mem::take(&mut self.delivered);
            self.finishing = Some((Box::pin(settle.finish(delivered, ending)), error));
        } else if let Some(e) = error {
            self.finishing = Some((Box::pin(async { None }), Some(e)));
        }
    }
}

impl Stream for Metered {
    type Item = Result<StreamEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some((fut, _)) = &mut this.finishing {
                let end = ready!(fut.as_mut().poll(cx));
                let err = this.finishing.take().and_then(|(_, e)| e);
                this.done = true;
                return Poll::Ready(match (err, end) {
                    (Some(e), _) => Some(Err(e)),
                    (None, Some(end)) => Some(Ok(StreamEvent::Done(end))),
                    (None, None) => None,
                });
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Some((fut, _)) = &mut this.recovering {
                let (result, calls, continued) = ready!(fut.as_mut().poll(cx));
                let Some((_, cut)) = this.recovering.take() else {
                    continue;
                };
                match result.and_then(|d| this.recovered(d, calls, continued)) {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "stream recovery failed");
                        // The cut is what the caller is told, never the recovery's error.
                        this.start_finish(Ending::Failed(cut.reason().to_owned()), Some(cut));
                        continue;
                    }
                }
            }
            let next = match this.first.take() {
                Some(ev) => Some(Ok(ev)),
                None => match this.upstream.as_mut().poll_next(cx) {
                    Poll::Ready(next) => {
                        if let Some((d, sleep)) = &mut this.idle {
                            sleep.as_mut().reset(super::after(*d));
                        }
                        next
                    }
                    Poll::Pending => {
                        let timed_out = match &mut this.idle {
                            Some((_, sleep)) => sleep.as_mut().poll(cx).is_ready(),
                            None => false,
                        };
                        if !timed_out {
                            return Poll::Pending;
                        }
                        let d = this.idle.as_ref().map(|(d, _)| *d).unwrap_or_default();
                        this.upstream = Box::pin(stream::empty());
                        Some(Err(Error::StreamInterrupted {
                            chunks: this.delivered.chunks,
                            reason: format!("no event within the idle timeout of {d:?}"),
                        }))
                    }
                },
            };
            match next {
                Some(Ok(ev)) if this.restart.is_some() => match this.withhold(ev) {
                    Ok(None) => {}
                    Ok(Some(ev)) => this.first = Some(ev),
                    Err(e) => {
                        if let Some(r) = this.settle.as_mut().and_then(|s| s.recovery.as_mut()) {
                            r.left = 0; // a second restart would diverge the same way
                        }
                        this.upstream = Box::pin(stream::empty());
                        this.start_finish(Ending::Failed(e.reason().to_owned()), Some(e));
                    }
                },
                Some(Ok(StreamEvent::Done(end))) => {
                    this.start_finish(Ending::Done(end), None);
                }
                Some(Ok(ev)) => {
                    this.delivered.push(&ev);
                    if let Some(t) = this.over_limit(&ev) {
                        // The kill switch: stop reading, bill what was generated, say why.
                        this.upstream = Box::pin(stream::empty());
                        let end = this.truncated_end(t);
                        this.start_finish(Ending::Done(end), None);
                        continue;
                    }
                    return Poll::Ready(Some(Ok(ev)));
                }
                Some(Err(e)) => {
                    let e = match e {
                        e @ Error::StreamInterrupted { .. } => e,
                        other => Error::StreamInterrupted {
                            chunks: this.delivered.chunks,
                            reason: other.to_string(),
                        },
                    };
                    this.interrupted(e);
                }
                None => {
                    let e = Error::StreamInterrupted {
                        chunks: this.delivered.chunks,
                        reason: "the provider's stream ended without a final event".into(),
                    };
                    this.interrupted(e);
                }
            }
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // Dropped before its end: settle what was delivered.
        let fut: Finishing = match (self.settle.take(), self.finishing.take()) {
            (Some(settle), _) => {
                let delivered = std::mem::take(&mut self.delivered);
                Box::pin(settle.finish(delivered, Ending::Dropped))
            }
            // Dropped while its settlement was under way: let it complete.
            (None, Some((fut, _))) => fut,
            (None, None) => return,
        };
        super::settle::run_detached(Box::pin(async move {
            fut.await;
        }));
    }
}
