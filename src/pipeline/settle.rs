//! Settling: what a request used is committed to the budget and reconciled with the
//! token limits, a complete answer is stored, and one usage record is written, built
//! from how the request ended. Whole answers settle here when the funnel returns;
//! streams when they end (see `stream.rs`), through the same functions.

use super::Inner;
use super::admit::Admitted;
use super::budget::Held;
use crate::observe::{self, Outcome, UsageRecord};
use crate::types::{ChatResponse, Cost, RequestMeta, Usage};

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

/// The usage record of a whole call: written by `chat` when the funnel returns, or by
/// this guard's destructor when the caller drops the call first, as a `cancelled`
/// error with what the call was charged (the prompt, once it was sent).
pub(super) struct Recording<'a> {
    pub(super) inner: &'a Inner,
    /// The record, not yet attributed (see [`UsageRecord::unattributed`]): it stays
    /// where `chat` keeps it, which writes it in place when the funnel returns.
    pub(super) rec: &'a mut Option<UsageRecord>,
    /// The request's identity, which a record written here is attributed to.
    pub(super) meta: &'a RequestMeta,
    /// Whether the call is still under way (a drop now is the caller's).
    pub(super) armed: bool,
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(mut rec) = self.rec.take() {
            rec.user.clone_from(&self.meta.user);
            rec.org.clone_from(&self.meta.org);
            rec.feature.clone_from(&self.meta.feature);
            rec.outcome = Outcome::Error("cancelled".into());
            self.inner
                .record(rec, &tracing::Span::current(), Some("cancelled"));
        }
    }
}

impl UsageRecord {
    /// A record attributed to no one yet: the pipeline attributes it when it is
    /// written (see [`attribute_from`](Self::attribute_from)).
    pub(super) fn unattributed(started_at: crate::clock::Timestamp, stream: bool) -> Self {
        UsageRecord::new(started_at, &RequestMeta::default(), stream)
    }

    /// Attributes the record to `meta`'s user, organisation and feature, moving them
    /// out of `meta` (the request is finished with them).
    pub(super) fn attribute_from(&mut self, meta: &mut RequestMeta) {
        self.user = meta.user.take();
        self.org = meta.org.take();
        self.feature = meta.feature.take();
    }

    /// Notes an answer: who gave it and how it was served (what it used and cost is
    /// set by the funnel, which knows every call behind it).
    pub(super) fn set_answer(&mut self, r: &ChatResponse) {
        self.model = Some(r.model.clone());
        self.provider = Some(r.provider.clone());
        self.outcome = if r.served.is_cache_hit() {
            Outcome::CacheHit
        } else {
            Outcome::Provider
        };
        self.set_served(&r.served);
        self.guard_rejections = self
            .guard_rejections
            .max(u32::from(r.guard_rejected.is_some()));
    }

    /// Notes how a whole answer ended.
    pub(super) fn set_finished(&mut self, r: &ChatResponse) {
        self.finish_reason = Some(r.finish_reason.as_str().to_owned());
    }

    /// Notes whether a cache guard refused a semantic match (the cache stage's result).
    pub(super) fn set_guard_rejected(&mut self, rejected: bool) {
        self.guard_rejections = u32::from(rejected);
    }

    /// Notes how many attempts dispatch made.
    pub(super) fn set_attempts(&mut self, attempts: u32) {
        self.attempts = attempts;
    }

    /// Notes what the answer (every call behind it) used and cost.
    pub(super) fn set_used(&mut self, usage: Usage, cost: Cost) {
        (self.usage, self.cost) = (usage, cost);
    }

    /// Notes when the first token arrived.
    pub(super) fn set_first_token(&mut self, at: crate::clock::Timestamp) {
        self.time_to_first_token = Some(at.saturating_since(self.started_at));
    }

    /// From dispatch on, a dropped call has sent its prompt: that is what it used.
    pub(super) fn used_if_abandoned(&mut self, prompt_tokens: u64, prompt_cost: Cost) {
        self.usage = Usage::new(prompt_tokens, 0).estimated();
        self.cost = prompt_cost;
    }
}

impl Inner {
    /// Commits `cost` on the reservation and reconciles the token charge to `usage`.
    pub(super) async fn settle_use(
        &self,
        held: &mut Held,
        admitted: &mut Admitted<'_>,
        usage: &Usage,
        cost: Cost,
    ) {
        held.commit(cost).await;
        admitted.settle(usage.total()).await;
    }

    /// Writes the usage record: its latency, the span, the sink and the in-memory report.
    pub(super) fn record(&self, mut rec: UsageRecord, span: &tracing::Span, finish: Option<&str>) {
        self.complete(&mut rec, span, finish);
        self.usage.record_owned(rec);
    }

    /// [`record`](Self::record) for a record its caller keeps (in place, not moved
    /// about: the in-memory report copies what it keeps).
    pub(super) fn record_in_place(
        &self,
        rec: &mut UsageRecord,
        span: &tracing::Span,
        finish: Option<&str>,
    ) {
        self.complete(rec, span, finish);
        crate::observe::UsageSink::record(&*self.usage, rec);
    }

    /// Completes a record (latency, prompt-cache savings, span, metrics) and gives it
    /// to the caller's sink, if any.
    fn complete(&self, rec: &mut UsageRecord, span: &tracing::Span, finish: Option<&str>) {
        rec.latency = self.clock.now().saturating_since(rec.started_at);
        // what the provider's prompt cache saved (nothing, with no tokens through it)
        let cached = rec.usage.cached_input_tokens > 0 || rec.usage.cache_write_tokens > 0;
        if let Some(m) = rec
            .model
            .as_deref()
            .filter(|_| cached)
            .and_then(|m| self.catalog.get(m))
        {
            rec.price_prompt_cache(&m.pricing);
        }
        observe::finish(span, rec, finish);
        if let Some(s) = &self.sink {
            s.record(rec);
        }
    }

    /// Records an answer served to a stream from the cache, a stale entry or a
    /// validated first tier.
    pub(super) fn record_answer(
        &self,
        mut rec: UsageRecord,
        r: &ChatResponse,
        span: &tracing::Span,
    ) {
        rec.set_answer(r);
        self.record(rec, span, Some(r.finish_reason.as_str()));
    }
}
