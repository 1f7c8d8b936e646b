//! Observability: tracing spans, metrics, usage records and golden-query evaluation.
//!
//! Every request through a [`Pipeline`](crate::Pipeline), cache hits, refusals and
//! failures included, produces three things:
//!
//! - **A span.** The request runs inside a `tracing` span named `gen_ai.chat`, and each
//!   provider call inside it gets a child span named `gen_ai.attempt`. Both carry
//!   OpenTelemetry GenAI semantic-convention attributes (`gen_ai.operation.name`,
//!   `gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.response.model`,
//!   `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
//!   `gen_ai.response.finish_reasons`, `error.type`) plus tokenwise's own
//!   (`tokenwise.cache_hit`, `tokenwise.cost_usd`, `tokenwise.attempts`, `tokenwise.route`,
//!   ...). `otel.name`, `otel.kind` and `otel.status_code` are set for
//!   `tracing-opentelemetry`, so exported spans are named `chat {model}` as the
//!   conventions ask. The full list is in `docs/observability.md`.
//! - **Metrics** through the [`metrics`](::metrics) facade: requests by model, status and
//!   cache, latency and time-to-first-token histograms, tokens, cost and cost saved,
//!   requests in flight, refusals by scope. Install any `metrics` recorder (for example
//!   `metrics-exporter-prometheus`) and they appear; without one they cost next to
//!   nothing. Names and labels are in [`metrics`].
//! - **One [`UsageRecord`]** for the pipeline's built-in [`MemoryUsage`] report and for an
//!   optional [`UsageSink`] such as [`JsonlSink`].
//!
//! No span, metric label, log line or usage record carries prompt or answer text, and
//! none carries credentials: spans describe a request by its model, parameters, sizes and
//! outcome; errors are reported by their stable [`reason`](crate::Error::reason).
//!
//! [`eval`](crate::eval) runs a set of golden queries through a pipeline and scores the answers, for
//! a check in CI before a deployment.

mod jsonl;
mod layer;
mod memory;
pub mod metrics;
mod span;

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use jsonl::{JsonlSink, JsonlStats, read_jsonl};
pub use layer::{ObserveLayer, ObserveService};
pub use memory::{MemoryUsage, Totals, UsageReport};

pub(crate) use metrics::{InFlight, track_stream};
pub(crate) use span::{Attempt, finish, request_span};

use crate::Error;
use crate::budget::Degrade;
use crate::clock::Timestamp;
use crate::router::RoutePlan;
use crate::types::{Cost, Pricing, RequestMeta, ScopeKind, Served, Usage};

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// A provider answered.
    Provider,
    /// The cache answered.
    CacheHit,
    /// The request failed or was refused; the error's [`reason`](crate::Error::reason)
    /// (or `stream_dropped` for a stream its caller dropped before the end).
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

    /// Whether the request failed or was refused.
    pub fn is_error(&self) -> bool {
        matches!(self, Outcome::Error(_))
    }
}

/// One record per request, for cost attribution.
///
/// Serialized (for [`JsonlSink`]) with durations in nanoseconds (`latency_ns`,
/// `ttft_ns`), money in nano-dollars (`cost`, `saved`) and times in nanoseconds since
/// the Unix epoch (`started_at`). Fields added later deserialize to their defaults, so
/// old files stay readable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UsageRecord {
    /// When the request started.
    pub started_at: Timestamp,
    /// How long it took (for a stream: until its end or drop).
    #[serde(rename = "latency_ns", with = "duration_ns")]
    pub latency: Duration,
    /// For a stream: how long until its first event reached the pipeline (a cached
    /// answer's replay starts at once). `None` for whole answers and failed streams.
    #[serde(
        rename = "ttft_ns",
        default,
        with = "opt_duration_ns",
        skip_serializing_if = "Option::is_none"
    )]
    pub time_to_first_token: Option<Duration>,
    /// The user.
    pub user: Option<String>,
    /// The organisation.
    pub org: Option<String>,
    /// The feature.
    pub feature: Option<String>,
    /// The model that answered; for a failure, the model it was routed to, if any.
    pub model: Option<String>,
    /// The provider that answered, if any.
    pub provider: Option<String>,
    /// The models the router chose, in the order they would be tried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<String>,
    /// Tokens billed (zero for a cache hit).
    pub usage: Usage,
    /// What it cost.
    pub cost: Cost,
    /// What a cache hit saved.
    pub saved: Cost,
    /// What the provider's prompt cache saved on the billed calls: the prompt tokens it
    /// served at the cached-input price instead of the input price (see
    /// [`price_prompt_cache`](Self::price_prompt_cache)).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prompt_cache_saved: Cost,
    /// What writing to the provider's prompt cache cost above the input price (Anthropic
    /// bills writes at 1.25× or 2× input). The net saving is `prompt_cache_saved` less
    /// this.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prompt_cache_write_premium: Cost,
    /// Provider calls made.
    pub attempts: u32,
    /// Targets given up on before the one that answered.
    #[serde(default)]
    pub fallbacks: u32,
    /// Whether a validator escalated the request to a stronger model.
    #[serde(default)]
    pub escalated: bool,
    /// For a cache hit: 1.0 for an exact match, the similarity for a semantic one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
    /// Semantic-cache candidates that the near-miss guard rejected (numbers, negation,
    /// named entities). Zero until the semantic cache's guard reports it.
    #[serde(default)]
    pub guard_rejections: u32,
    /// The degrade mode a spend cap put the request in (`cheaper_model`, `cache_only`),
    /// if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degrade_mode: Option<String>,
    /// For a refusal by a rate limit or a spend cap: the kind of scope that refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal_scope: Option<ScopeKind>,
    /// Why generation stopped, if it finished (`stop`, `length`, `tool_calls`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Whether it was streamed.
    pub stream: bool,
    /// How it ended.
    pub outcome: Outcome,
}

impl UsageRecord {
    /// A record for a request that starts at `started_at`, attributed to `meta`'s user,
    /// organisation and feature. The pipeline fills in the rest as the request runs; a
    /// custom tower stack or a test can do the same.
    pub fn new(started_at: Timestamp, meta: &RequestMeta, stream: bool) -> Self {
        UsageRecord {
            started_at,
            latency: Duration::ZERO,
            time_to_first_token: None,
            user: meta.user.clone(),
            org: meta.org.clone(),
            feature: meta.feature.clone(),
            model: None,
            provider: None,
            route: Vec::new(),
            usage: Usage::default(),
            cost: Cost::ZERO,
            saved: Cost::ZERO,
            prompt_cache_saved: Cost::ZERO,
            prompt_cache_write_premium: Cost::ZERO,
            attempts: 0,
            fallbacks: 0,
            escalated: false,
            similarity: None,
            guard_rejections: 0,
            degrade_mode: None,
            refusal_scope: None,
            finish_reason: None,
            stream,
            outcome: Outcome::Provider,
        }
    }

    /// Prices the provider prompt cache's part of `usage` at `pricing` (the answering
    /// model's): sets [`prompt_cache_saved`](Self::prompt_cache_saved) and
    /// [`prompt_cache_write_premium`](Self::prompt_cache_write_premium). The pipeline
    /// calls it when it writes the record. An escalated request's usage covers both
    /// tiers and is priced at the model that answered.
    pub fn price_prompt_cache(&mut self, pricing: &Pricing) {
        let u = &self.usage;
        let cached = u.cached_input_tokens.min(u.input_tokens);
        let writes = u.cache_write_tokens.min(u.input_tokens - cached);
        let writes_1h = u.cache_write_1h_tokens.min(writes);
        self.prompt_cache_saved = pricing
            .input
            .cost_of(cached)
            .saturating_sub(pricing.cached_input.cost_of(cached));
        let plain = pricing.input.cost_of(writes);
        self.prompt_cache_write_premium = (pricing.cache_write_price().cost_of(writes - writes_1h)
            + pricing.cache_write_1h_price().cost_of(writes_1h))
        .saturating_sub(plain);
    }

    /// Whether the cache answered.
    pub fn is_cache_hit(&self) -> bool {
        self.outcome == Outcome::CacheHit
    }

    /// Notes how an answer was served: fallbacks and escalation for a provider answer,
    /// similarity and savings for a cache hit.
    pub(crate) fn set_served(&mut self, served: &Served) {
        match served {
            Served::Provider {
                fallbacks,
                escalated,
                ..
            } => {
                self.fallbacks = *fallbacks;
                self.escalated = *escalated;
            }
            Served::Cache {
                similarity,
                saved_cost,
                ..
            } => {
                self.outcome = Outcome::CacheHit;
                self.similarity = Some(*similarity);
                self.saved = *saved_cost;
            }
        }
    }

    /// Notes a failure or refusal: its reason, and the scope that refused, if any.
    pub(crate) fn set_error(&mut self, e: &Error) {
        self.outcome = Outcome::Error(e.reason().to_owned());
        self.refusal_scope = match e {
            Error::RateLimited { scope, .. } | Error::BudgetExceeded { scope, .. } => {
                Some(scope.kind())
            }
            _ => None,
        };
    }

    /// Notes the degrade mode a spend cap put the request in, if it changed how the
    /// request is served (a cheaper model, or the cache only).
    pub(crate) fn set_degrade(&mut self, mode: Option<&Degrade>) {
        if let Some(m @ (Degrade::CheaperModel(_) | Degrade::CacheOnly)) = mode {
            self.degrade_mode = Some(m.as_str().to_owned());
        }
    }

    /// Notes the router's choice.
    pub(crate) fn set_route(&mut self, route: &RoutePlan) {
        self.route = route.targets.iter().map(|m| m.name.clone()).collect();
    }
}

fn is_zero(c: &Cost) -> bool {
    c.is_zero()
}

/// Receives one [`UsageRecord`] per request.
///
/// `record` is called on the request's path (and from a dropped stream's destructor),
/// so it must not block: sinks that write to I/O should hand records to a bounded
/// channel and drop (and count) what does not fit, as [`JsonlSink`] does.
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

pub(crate) mod duration_ns {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(crate::clock::duration_nanos(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_nanos)
    }
}

mod opt_duration_ns {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&crate::clock::duration_nanos(*d)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|n| n.map(Duration::from_nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_json() {
        let meta = RequestMeta {
            user: Some("ann".into()),
            org: Some("acme".into()),
            ..Default::default()
        };
        let mut r = UsageRecord::new(Timestamp::from_secs(1_800_000_000), &meta, true);
        r.latency = Duration::from_nanos(1_234_567);
        r.time_to_first_token = Some(Duration::from_millis(120));
        r.cost = Cost::from_nanos(42);
        r.set_error(&Error::RateLimited {
            scope: crate::types::Scope::User("ann".into()),
            retry_after: Duration::from_secs(1),
        });
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"latency_ns\":1234567"), "{line}");
        assert!(line.contains("\"refusal_scope\":\"user\""), "{line}");
        let back: UsageRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        // a record written before the optional fields existed still reads
        let old = r#"{"started_at":1,"latency_ns":2,"user":null,"org":null,"feature":null,
            "model":"m","provider":"p","usage":{"input_tokens":1,"output_tokens":2},
            "cost":3,"saved":0,"attempts":1,"stream":false,"outcome":"provider"}"#;
        let old: UsageRecord = serde_json::from_str(old).unwrap();
        assert_eq!(old.fallbacks, 0);
        assert_eq!(old.time_to_first_token, None);
    }
}
