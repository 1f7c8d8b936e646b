//! Observability: per-request usage records and the request span.
//!
//! Every request through a pipeline, cache hits and refusals included, produces one
//! [`UsageRecord`] for the configured [`UsageSink`] and runs inside a `tracing` span
//! named `gen_ai.chat` carrying OpenTelemetry GenAI attributes
//! (`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`,
//! `gen_ai.response.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
//! `gen_ai.response.finish_reasons`) and tokenwise's own (`tokenwise.cache_hit`,
//! `tokenwise.cost_usd`, `tokenwise.saved_usd`, `tokenwise.attempts`,
//! `tokenwise.outcome`, `tokenwise.stream`).

mod layer;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use layer::{Observe, ObserveLayer};

use crate::clock::Timestamp;
use crate::types::{Cost, Usage};

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// A provider answered.
    Provider,
    /// The cache answered.
    CacheHit,
    /// The request failed or was refused; the error's [`reason`](crate::Error::reason).
    Error(String),
}

impl Outcome {
    /// A stable lowercase label.
    pub fn label(&self) -> &str {
        match self {
            Outcome::Provider => "provider",
            Outcome::CacheHit => "cache_hit",
            Outcome::Error(r) => r,
        }
    }
}

/// One record per request, for cost attribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UsageRecord {
    /// When the request started.
    pub started_at: Timestamp,
    /// How long it took (for a stream: until its end or drop).
    pub latency: Duration,
    /// The user.
    pub user: Option<String>,
    /// The organisation.
    pub org: Option<String>,
    /// The feature.
    pub feature: Option<String>,
    /// The model that answered (or was asked), if any.
    pub model: Option<String>,
    /// The provider that answered, if any.
    pub provider: Option<String>,
    /// Tokens billed (zero for a cache hit).
    pub usage: Usage,
    /// What it cost.
    pub cost: Cost,
    /// What a cache hit saved.
    pub saved: Cost,
    /// Provider calls made.
    pub attempts: u32,
    /// Whether it was streamed.
    pub stream: bool,
    /// How it ended.
    pub outcome: Outcome,
}

impl UsageRecord {
    pub(crate) fn new(
        started_at: Timestamp,
        meta: &crate::types::RequestMeta,
        stream: bool,
    ) -> Self {
        UsageRecord {
            started_at,
            latency: Duration::ZERO,
            user: meta.user.clone(),
            org: meta.org.clone(),
            feature: meta.feature.clone(),
            model: None,
            provider: None,
            usage: Usage::default(),
            cost: Cost::ZERO,
            saved: Cost::ZERO,
            attempts: 0,
            stream,
            outcome: Outcome::Provider,
        }
    }
}

/// Receives one [`UsageRecord`] per request.
///
/// `record` is called on the request's path (and from a dropped stream's destructor),
/// so it must not block: sinks that write to I/O should hand records to a bounded
/// channel and drop (and count) what does not fit.
///
/// # Implementing
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use tokenwise::observe::{UsageRecord, UsageSink};
///
/// /// Counts nano-dollars spent.
/// #[derive(Debug, Default)]
/// struct Spend(AtomicU64);
///
/// impl UsageSink for Spend {
///     fn record(&self, r: &UsageRecord) {
///         self.0.fetch_add(r.cost.as_nanos(), Ordering::Relaxed);
///     }
/// }
/// ```
pub trait UsageSink: Send + Sync + fmt::Debug {
    /// Takes one record.
    fn record(&self, record: &UsageRecord);
}

/// Running totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Totals {
    /// Requests recorded.
    pub requests: u64,
    /// Answered by the cache.
    pub cache_hits: u64,
    /// Failed or refused.
    pub errors: u64,
    /// Input tokens billed.
    pub input_tokens: u64,
    /// Output tokens billed.
    pub output_tokens: u64,
    /// Spent.
    pub cost: Cost,
    /// Saved by cache hits.
    pub saved: Cost,
}

impl Totals {
    fn add(&mut self, r: &UsageRecord) {
        self.requests += 1;
        match r.outcome {
            Outcome::CacheHit => self.cache_hits += 1,
            Outcome::Error(_) => self.errors += 1,
            Outcome::Provider => {}
        }
        self.input_tokens += r.usage.input_tokens;
        self.output_tokens += r.usage.output_tokens;
        self.cost += r.cost;
        self.saved += r.saved;
    }
}

/// A report from [`MemoryUsage`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UsageReport {
    /// Everything.
    pub totals: Totals,
    /// By model (`-` when no model was reached).
    pub by_model: HashMap<String, Totals>,
    /// By user (`-` for anonymous requests).
    pub by_user: HashMap<String, Totals>,
    /// By refusal or error reason.
    pub errors_by_reason: HashMap<String, u64>,
}

#[derive(Debug, Default)]
struct MemoryState {
    report: UsageReport,
    recent: VecDeque<UsageRecord>,
}

/// An in-memory sink: totals by model and user, errors by reason, and the most recent
/// records. Bounded: at most `max_keys` distinct users and models are tracked apart
/// (the rest add up under `(other)`), and at most `recent` records are kept.
#[derive(Debug)]
pub struct MemoryUsage {
    state: Mutex<MemoryState>,
    max_keys: usize,
    recent: usize,
}

impl Default for MemoryUsage {
    fn default() -> Self {
        Self::new(10_000, 1_000)
    }
}

impl MemoryUsage {
    /// A sink tracking up to `max_keys` users and models apart and keeping the last
    /// `recent` records.
    pub fn new(max_keys: usize, recent: usize) -> Self {
        MemoryUsage {
            state: Mutex::new(MemoryState::default()),
            max_keys,
            recent,
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The report so far.
    pub fn report(&self) -> UsageReport {
        self.lock().report.clone()
    }

    /// The most recent records, oldest first.
    pub fn recent(&self) -> Vec<UsageRecord> {
        self.lock().recent.iter().cloned().collect()
    }
}

fn bucket<'a>(map: &'a mut HashMap<String, Totals>, key: &str, max: usize) -> &'a mut Totals {
    let key = if map.contains_key(key) || map.len() < max {
        key
    } else {
        "(other)"
    };
    map.entry(key.to_owned()).or_default()
}

impl UsageSink for MemoryUsage {
    fn record(&self, r: &UsageRecord) {
        let mut st = self.lock();
        let max = self.max_keys;
        st.report.totals.add(r);
        bucket(
            &mut st.report.by_model,
            r.model.as_deref().unwrap_or("-"),
            max,
        )
        .add(r);
        bucket(
            &mut st.report.by_user,
            r.user.as_deref().unwrap_or("-"),
            max,
        )
        .add(r);
        if let Outcome::Error(reason) = &r.outcome {
            *st.report
                .errors_by_reason
                .entry(reason.clone())
                .or_default() += 1;
        }
        if self.recent > 0 {
            if st.recent.len() == self.recent {
                st.recent.pop_front();
            }
            st.recent.push_back(r.clone());
        }
    }
}

/// The request span, with every field declared so it can be recorded later.
pub(crate) fn request_span(req: &crate::types::ChatRequest, stream: bool) -> tracing::Span {
    tracing::info_span!(
        "gen_ai.chat",
        "gen_ai.operation.name" = "chat",
        "gen_ai.request.model" = req.model.as_deref().unwrap_or("auto"),
        "gen_ai.provider.name" = tracing::field::Empty,
        "gen_ai.response.model" = tracing::field::Empty,
        "gen_ai.usage.input_tokens" = tracing::field::Empty,
        "gen_ai.usage.output_tokens" = tracing::field::Empty,
        "gen_ai.response.finish_reasons" = tracing::field::Empty,
        "tokenwise.user" = req.meta.user.as_deref(),
        "tokenwise.cache_hit" = tracing::field::Empty,
        "tokenwise.cost_usd" = tracing::field::Empty,
        "tokenwise.saved_usd" = tracing::field::Empty,
        "tokenwise.attempts" = tracing::field::Empty,
        "tokenwise.outcome" = tracing::field::Empty,
        "tokenwise.stream" = stream,
    )
}

/// Records a finished request on its span.
pub(crate) fn record_on_span(span: &tracing::Span, r: &UsageRecord, finish: Option<&str>) {
    if let Some(p) = &r.provider {
        span.record("gen_ai.provider.name", p.as_str());
    }
    if let Some(m) = &r.model {
        span.record("gen_ai.response.model", m.as_str());
    }
    span.record("gen_ai.usage.input_tokens", r.usage.input_tokens);
    span.record("gen_ai.usage.output_tokens", r.usage.output_tokens);
    if let Some(f) = finish {
        span.record("gen_ai.response.finish_reasons", f);
    }
    span.record("tokenwise.cache_hit", r.outcome == Outcome::CacheHit);
    span.record("tokenwise.cost_usd", r.cost.as_dollars_f64());
    span.record("tokenwise.saved_usd", r.saved.as_dollars_f64());
    span.record("tokenwise.attempts", r.attempts);
    span.record("tokenwise.outcome", r.outcome.label());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::RequestMeta;

    #[test]
    fn memory_usage_is_bounded() {
        let sink = MemoryUsage::new(2, 3);
        for i in 0..5 {
            let meta = RequestMeta {
                user: Some(format!("u{i}")),
                ..Default::default()
            };
            let mut r = UsageRecord::new(Timestamp::from_secs(0), &meta, false);
            r.cost = Cost::from_nanos(10);
            if i == 4 {
                r.outcome = Outcome::Error("rate_limited".into());
            }
            sink.record(&r);
        }
        let rep = sink.report();
        assert_eq!(rep.totals.requests, 5);
        assert_eq!(rep.totals.cost, Cost::from_nanos(50));
        assert_eq!(rep.by_user.len(), 3); // u0, u1, (other)
        assert_eq!(rep.by_user["(other)"].requests, 3);
        assert_eq!(rep.errors_by_reason["rate_limited"], 1);
        assert_eq!(sink.recent().len(), 3);
    }
}
