//! The request span, the attempt spans, and what is recorded on them.

use std::sync::Arc;
use std::time::Duration;

use tracing::field::Empty;

use super::{Outcome, UsageRecord, metrics};
use crate::Error;
use crate::clock::{Clock, Timestamp};
use crate::types::{ChatRequest, ChatResponse, ModelSpec};

/// The request span (`gen_ai.chat`), with every field declared so it can be recorded
/// later. Fields never hold prompt or answer text.
pub(crate) fn request_span(req: &ChatRequest, stream: bool) -> tracing::Span {
    let model = req.model.as_deref().unwrap_or("auto");
    let p = &req.params;
    let span = tracing::info_span!(
        "gen_ai.chat",
        "otel.name" = Empty,
        "otel.status_code" = Empty,
        "gen_ai.operation.name" = "chat",
        "gen_ai.request.model" = model,
        "gen_ai.request.max_tokens" = p.max_tokens,
        "gen_ai.request.temperature" = p.temperature.map(f64::from),
        "gen_ai.request.top_p" = p.top_p.map(f64::from),
        "gen_ai.request.seed" = p.seed,
        "gen_ai.provider.name" = Empty,
        "gen_ai.response.model" = Empty,
        "gen_ai.usage.input_tokens" = Empty,
        "gen_ai.usage.output_tokens" = Empty,
        "gen_ai.usage.cache_read.input_tokens" = Empty,
        "gen_ai.response.finish_reasons" = Empty,
        "error.type" = Empty,
        "tokenwise.user" = req.meta.user.as_deref(),
        "tokenwise.org" = req.meta.org.as_deref(),
        "tokenwise.feature" = req.meta.feature.as_deref(),
        "tokenwise.messages" = req.messages.len(),
        "tokenwise.documents" = req.documents.len(),
        "tokenwise.stream" = stream,
        "tokenwise.route" = Empty,
        "tokenwise.cache_hit" = Empty,
        "tokenwise.cache_similarity" = Empty,
        "tokenwise.guard_rejections" = Empty,
        "tokenwise.cost_usd" = Empty,
        "tokenwise.saved_usd" = Empty,
        "tokenwise.attempts" = Empty,
        "tokenwise.fallbacks" = Empty,
        "tokenwise.escalated" = Empty,
        "tokenwise.degrade_mode" = Empty,
        "tokenwise.refusal_reason" = Empty,
        "tokenwise.refusal_scope" = Empty,
        "tokenwise.latency_ms" = Empty,
        "tokenwise.ttft_ms" = Empty,
        "tokenwise.outcome" = Empty,
    );
    // The name is formatted only when a subscriber takes the span.
    if !span.is_disabled() {
        span.record("otel.name", format!("chat {model}").as_str());
    }
    span
}

/// Errors that are tokenwise refusing a request rather than something failing.
pub(crate) fn is_refusal(reason: &str) -> bool {
    matches!(reason, "rate_limited" | "budget_exceeded" | "overloaded")
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// Finishes a request: fills in what the record still lacks, then records it on the
/// request span and in the metrics. Called once per request, just before the record
/// goes to the usage sinks.
pub(crate) fn finish(span: &tracing::Span, rec: &mut UsageRecord, finish: Option<&str>) {
    if rec.finish_reason.is_none() {
        rec.finish_reason = finish.map(str::to_owned);
    }
    if rec.model.is_none() && rec.outcome.is_error() {
        // A failure is attributed to the model it was routed to.
        rec.model = rec.route.first().cloned();
    }
    if rec.stream && rec.is_cache_hit() && rec.time_to_first_token.is_none() {
        // A cached answer is replayed at once: its first chunk is ready when the
        // request returns.
        rec.time_to_first_token = Some(rec.latency);
    }
    record_on_span(span, rec);
    metrics::record_request(rec);
}

/// Records a finished request on its span (nothing when no subscriber takes it).
pub(crate) fn record_on_span(span: &tracing::Span, r: &UsageRecord) {
    if span.is_disabled() {
        return;
    }
    if let Some(p) = &r.provider {
        span.record("gen_ai.provider.name", p.as_str());
    }
    if let Some(m) = &r.model {
        span.record("gen_ai.response.model", m.as_str());
    }
    span.record("gen_ai.usage.input_tokens", r.usage.input_tokens);
    span.record("gen_ai.usage.output_tokens", r.usage.output_tokens);
    if r.usage.cached_input_tokens > 0 {
        span.record(
            "gen_ai.usage.cache_read.input_tokens",
            r.usage.cached_input_tokens,
        );
    }
    if let Some(f) = &r.finish_reason {
        span.record("gen_ai.response.finish_reasons", f.as_str());
    }
    if !r.route.is_empty() {
        span.record("tokenwise.route", r.route.join(",").as_str());
    }
    span.record("tokenwise.cache_hit", r.is_cache_hit());
    if let Some(s) = r.similarity {
        span.record("tokenwise.cache_similarity", f64::from(s));
    }
    if r.guard_rejections > 0 {
        span.record("tokenwise.guard_rejections", r.guard_rejections);
    }
    span.record("tokenwise.cost_usd", r.cost.as_dollars_f64());
    span.record("tokenwise.saved_usd", r.saved.as_dollars_f64());
    span.record("tokenwise.attempts", r.attempts);
    span.record("tokenwise.fallbacks", r.fallbacks);
    span.record("tokenwise.escalated", r.escalated);
    if let Some(mode) = &r.degrade_mode {
        span.record("tokenwise.degrade_mode", mode.as_str());
    }
    span.record("tokenwise.latency_ms", millis(r.latency));
    if let Some(t) = r.time_to_first_token {
        span.record("tokenwise.ttft_ms", millis(t));
    }
    if let Outcome::Error(reason) = &r.outcome {
        span.record("otel.status_code", "error");
        span.record("error.type", reason.as_str());
        if is_refusal(reason) {
            span.record("tokenwise.refusal_reason", reason.as_str());
        }
        if let Some(scope) = r.refusal_scope {
            span.record("tokenwise.refusal_scope", scope.as_str());
        }
    }
    span.record("tokenwise.outcome", r.outcome.label());
}

/// One provider call: its `gen_ai.attempt` span (a child of the request span) and its
/// metrics. Start it before the call, instrument the call with its span, and finish it
/// with the result. An attempt dropped unfinished (its request abandoned, or a hedged
/// call that lost the race) is recorded as `cancelled`.
#[derive(Debug)]
pub(crate) struct Attempt {
    span: tracing::Span,
    clock: Arc<dyn Clock>,
    started: Timestamp,
    /// The metric labels, interned (see [`metrics`]).
    provider: &'static str,
    model: &'static str,
    done: bool,
}

impl Attempt {
    /// Starts provider call number `number` of the request (1 for the first), retry
    /// number `retry` of this target (0 for its first call).
    pub(crate) fn start(
        clock: &Arc<dyn Clock>,
        provider: &str,
        model: &ModelSpec,
        number: u32,
        retry: u32,
    ) -> Self {
        let span = tracing::info_span!(
            "gen_ai.attempt",
            "otel.name" = Empty,
            "otel.kind" = "client",
            "otel.status_code" = Empty,
            "gen_ai.operation.name" = "chat",
            "gen_ai.provider.name" = provider,
            "gen_ai.request.model" = model.name.as_str(),
            "gen_ai.response.model" = Empty,
            "gen_ai.usage.input_tokens" = Empty,
            "gen_ai.usage.output_tokens" = Empty,
            "gen_ai.response.finish_reasons" = Empty,
            "error.type" = Empty,
            "tokenwise.attempt" = number,
            "tokenwise.retry" = retry,
            "tokenwise.stream" = Empty,
            "tokenwise.latency_ms" = Empty,
        );
        // The name is formatted only when a subscriber takes the span.
        if !span.is_disabled() {
            span.record("otel.name", format!("chat {}", model.name).as_str());
        }
        Attempt {
            span,
            clock: Arc::clone(clock),
            started: clock.now(),
            provider: metrics::provider_label(provider),
            model: metrics::model_label(Some(&model.name)),
            done: false,
        }
    }

    /// The attempt's span, to instrument the provider call with.
    pub(crate) fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// Records the call's outcome: a whole answer (`Ok(Some)`), a stream that
    /// produced its first event (`Ok(None)`), or a failure.
    pub(crate) fn finish(mut self, stream: bool, result: Result<Option<&ChatResponse>, &Error>) {
        self.span.record("tokenwise.stream", stream);
        let status = match result {
            Ok(Some(r)) => {
                self.span.record("gen_ai.response.model", r.model.as_str());
                self.span
                    .record("gen_ai.usage.input_tokens", r.usage.input_tokens);
                self.span
                    .record("gen_ai.usage.output_tokens", r.usage.output_tokens);
                self.span
                    .record("gen_ai.response.finish_reasons", r.finish_reason.as_str());
                "ok"
            }
            Ok(None) => "ok",
            Err(e) => e.reason(),
        };
        self.close(status);
    }

    fn close(&mut self, status: &str) {
        self.done = true;
        let took = self.clock.now().saturating_since(self.started);
        self.span.record("tokenwise.latency_ms", millis(took));
        if status != "ok" {
            self.span.record("otel.status_code", "error");
            self.span.record("error.type", status);
        }
        metrics::record_attempt(self.provider, self.model, status, took);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done {
            self.close("cancelled");
        }
    }
}
