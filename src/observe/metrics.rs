//! Metrics through the [`metrics`] facade.
//!
//! A pipeline emits these whether or not a recorder is installed; install one (for
//! example `metrics-exporter-prometheus`, see `examples/prometheus.rs`) to collect them.
//! Call [`describe`] once after installing it to attach units and help texts.
//!
//! | name | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `tokenwise_requests_total` | counter | `model`, `status`, `cache` | requests; `status` is `ok` or the error's [`reason`](crate::Error::reason); `cache` is `hit` or `miss`; `model` is the model that answered, the one a failure was routed to, or `none` |
//! | `tokenwise_request_duration_seconds` | histogram | `model`, `cache`, `result` | request latency (a stream: to its end); `result` is `ok` or `error` |
//! | `tokenwise_time_to_first_token_seconds` | histogram | `model`, `cache` | streams: request start to first event |
//! | `tokenwise_tokens_total` | counter | `model`, `type` | tokens billed; `type` is `input` or `output` |
//! | `tokenwise_cost_nanodollars_total` | counter | `model` | money spent, in nano-dollars (divide by 1e9 for dollars) |
//! | `tokenwise_cost_saved_nanodollars_total` | counter | `model` | money cache hits saved, in nano-dollars |
//! | `tokenwise_prompt_cache_tokens_total` | counter | `model`, `type` | prompt tokens the provider's own prompt cache handled; `type` is `read` (served from it) or `write` (written to it); both are part of the `input` tokens above |
//! | `tokenwise_prompt_cache_saved_nanodollars_total` | counter | `model` | money the provider's prompt cache saved: reads at the cached-input price instead of the input price, in nano-dollars |
//! | `tokenwise_prompt_cache_write_premium_nanodollars_total` | counter | `model` | money paid above the input price for prompt-cache writes, in nano-dollars; the net saving is the saved counter less this one |
//! | `tokenwise_attempts_total` | counter | `provider`, `model`, `status` | provider calls; `status` is `ok`, an error reason, or `cancelled` |
//! | `tokenwise_attempt_duration_seconds` | histogram | `provider`, `model` | provider call latency (a stream: to its first event) |
//! | `tokenwise_fallbacks_total` | counter | `model` | answers that came from a fallback target (`model` answered) |
//! | `tokenwise_escalations_total` | counter | `model` | answers a validator escalated (`model` answered) |
//! | `tokenwise_in_flight_requests` | gauge | — | requests inside the pipeline, open streams included |
//! | `tokenwise_limiter_refusals_total` | counter | `scope` | requests a rate limit refused, by scope kind (`user`, `org`, `ip`, `feature`, `global`) |
//! | `tokenwise_budget_refusals_total` | counter | `scope` | requests a spend cap refused, by scope kind |
//! | `tokenwise_budget_utilization_ratio` | gauge | `scope`, `window` | (spent + reserved) / cap, from [`record_budget_status`] |
//! | `tokenwise_budget_spent_usd` | gauge | `scope`, `window` | spent in the cap's window |
//! | `tokenwise_budget_reserved_usd` | gauge | `scope`, `window` | reserved by calls in flight |
//! | `tokenwise_budget_limit_usd` | gauge | `scope`, `window` | the cap |
//! | `tokenwise_breaker_state` | gauge | `provider`, `model` | 0 closed, 1 half-open, 2 open, after every call through a breaker ([`record_breaker_state`]) |
//! | `tokenwise_cache_guard_rejections_total` | counter | — | semantic-cache candidates the near-miss guard rejected |
//! | `tokenwise_degraded_requests_total` | counter | `mode` | requests served in a degrade mode (`cheaper_model`, `cache_only`) |
//! | `tokenwise_usage_records_dropped_total` | counter | `sink`, `reason` | usage records a sink could not keep |
//!
//! Cardinality is bounded: no label carries a user, organisation or request id; model,
//! provider, status and mode labels each keep at most [`MAX_LABEL_VALUES`] distinct
//! values (later ones are reported as `other`) of at most 64 bytes. The budget gauges
//! are labelled with the scopes *you* sample (see [`BudgetSampler`](crate::budget::BudgetSampler)), bounded the same
//! way.
//!
//! The circuit-breaker gauge is set after every call through a breaker (pipelines built
//! with circuit breakers); degrade modes come from the usage record's `degrade_mode`.
//! The guard-rejection counter is defined so that dashboards and alerts can be written
//! against it; it is emitted once the semantic cache's near-miss guard reports through
//! the [`UsageRecord`] field `guard_rejections`.

use std::pin::Pin;
use std::sync::{LazyLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use ::metrics::{
    Counter, Gauge, Histogram, Key, Label, Level, Metadata, Unit, counter, describe_counter,
    describe_gauge, describe_histogram, gauge,
};
use futures_core::Stream;

use super::{Outcome, UsageRecord};
use crate::Result;
use crate::budget::CapStatus;
use crate::resilience::BreakerState;
use crate::types::{ChatStream, StreamEvent};

/// `tokenwise_requests_total`: requests by `model`, `status` and `cache`.
pub const REQUESTS: &str = "tokenwise_requests_total";
/// `tokenwise_request_duration_seconds`: request latency by `model`, `cache`, `result`.
pub const REQUEST_DURATION: &str = "tokenwise_request_duration_seconds";
/// `tokenwise_time_to_first_token_seconds`: streams' time to first event by `model`, `cache`.
pub const TIME_TO_FIRST_TOKEN: &str = "tokenwise_time_to_first_token_seconds";
/// `tokenwise_tokens_total`: tokens billed by `model` and `type` (`input`, `output`).
pub const TOKENS: &str = "tokenwise_tokens_total";
/// `tokenwise_cost_nanodollars_total`: spend by `model`, in nano-dollars.
pub const COST: &str = "tokenwise_cost_nanodollars_total";
/// `tokenwise_cost_saved_nanodollars_total`: what cache hits saved by `model`, in nano-dollars.
pub const COST_SAVED: &str = "tokenwise_cost_saved_nanodollars_total";
/// `tokenwise_prompt_cache_tokens_total`: prompt tokens the provider's prompt cache
/// handled, by `model` and `type` (`read`, `write`).
pub const PROMPT_CACHE_TOKENS: &str = "tokenwise_prompt_cache_tokens_total";
/// `tokenwise_prompt_cache_saved_nanodollars_total`: what prompt-cache reads saved by
/// `model`, in nano-dollars.
pub const PROMPT_CACHE_SAVED: &str = "tokenwise_prompt_cache_saved_nanodollars_total";
/// `tokenwise_prompt_cache_write_premium_nanodollars_total`: what prompt-cache writes
/// cost above the input price, by `model`, in nano-dollars.
pub const PROMPT_CACHE_WRITE_PREMIUM: &str =
    "tokenwise_prompt_cache_write_premium_nanodollars_total";
/// `tokenwise_attempts_total`: provider calls by `provider`, `model`, `status`.
pub const ATTEMPTS: &str = "tokenwise_attempts_total";
/// `tokenwise_attempt_duration_seconds`: provider call latency by `provider`, `model`.
pub const ATTEMPT_DURATION: &str = "tokenwise_attempt_duration_seconds";
/// `tokenwise_fallbacks_total`: answers from a fallback target, by the `model` that answered.
pub const FALLBACKS: &str = "tokenwise_fallbacks_total";
/// `tokenwise_escalations_total`: escalated answers, by the `model` that answered.
pub const ESCALATIONS: &str = "tokenwise_escalations_total";
/// `tokenwise_in_flight_requests`: requests inside the pipeline now.
pub const IN_FLIGHT: &str = "tokenwise_in_flight_requests";
/// `tokenwise_limiter_refusals_total`: rate-limit refusals by `scope` kind.
pub const LIMITER_REFUSALS: &str = "tokenwise_limiter_refusals_total";
/// `tokenwise_budget_refusals_total`: spend-cap refusals by `scope` kind.
pub const BUDGET_REFUSALS: &str = "tokenwise_budget_refusals_total";
/// `tokenwise_budget_utilization_ratio`: (spent + reserved) / cap by `scope`, `window`.
pub const BUDGET_UTILIZATION: &str = "tokenwise_budget_utilization_ratio";
/// `tokenwise_budget_spent_usd`: spent in the window by `scope`, `window`.
pub const BUDGET_SPENT: &str = "tokenwise_budget_spent_usd";
/// `tokenwise_budget_reserved_usd`: reserved by calls in flight by `scope`, `window`.
pub const BUDGET_RESERVED: &str = "tokenwise_budget_reserved_usd";
/// `tokenwise_budget_limit_usd`: the cap by `scope`, `window`.
pub const BUDGET_LIMIT: &str = "tokenwise_budget_limit_usd";
/// `tokenwise_breaker_state`: 0 closed, 1 half-open, 2 open, by `provider`, `model`.
pub const BREAKER_STATE: &str = "tokenwise_breaker_state";
/// `tokenwise_cache_guard_rejections_total`: near-miss semantic candidates rejected.
pub const CACHE_GUARD_REJECTIONS: &str = "tokenwise_cache_guard_rejections_total";
/// `tokenwise_degraded_requests_total`: requests served in a degrade `mode`.
pub const DEGRADED: &str = "tokenwise_degraded_requests_total";
/// `tokenwise_usage_records_dropped_total`: usage records lost by `sink` and `reason`.
pub const USAGE_RECORDS_DROPPED: &str = "tokenwise_usage_records_dropped_total";

/// `tokenwise_stream_recoveries_total`: streams cut after their first token that the
/// pipeline set out to recover, by `provider` and `model` of the cut attempt.
pub const STREAM_RECOVERIES: &str = "tokenwise_stream_recoveries_total";

/// `tokenwise_stream_malformed_events_total`: stream events that could not be read and
/// were skipped, by `provider` (see [`crate::provider::MAX_MALFORMED_EVENTS`]).
pub const STREAM_MALFORMED_EVENTS: &str = crate::provider::STREAM_MALFORMED_EVENTS;

/// Every metric name above.
pub const ALL: &[&str] = &[
    REQUESTS,
    REQUEST_DURATION,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    COST,
    COST_SAVED,
    PROMPT_CACHE_TOKENS,
    PROMPT_CACHE_SAVED,
    PROMPT_CACHE_WRITE_PREMIUM,
    ATTEMPTS,
    ATTEMPT_DURATION,
    FALLBACKS,
    ESCALATIONS,
    IN_FLIGHT,
    LIMITER_REFUSALS,
    BUDGET_REFUSALS,
    BUDGET_UTILIZATION,
    BUDGET_SPENT,
    BUDGET_RESERVED,
    BUDGET_LIMIT,
    BREAKER_STATE,
    CACHE_GUARD_REJECTIONS,
    DEGRADED,
    USAGE_RECORDS_DROPPED,
    STREAM_RECOVERIES,
    STREAM_MALFORMED_EVENTS,
];

/// Bucket bounds (seconds) for the latency histograms: the ones the OpenTelemetry GenAI
/// conventions recommend for `gen_ai.client.operation.duration`. Pass them to your
/// exporter (the Prometheus exporter renders histograms as summaries without buckets).
pub const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

/// The most distinct values one label keeps apart; later values are reported as `other`.
pub const MAX_LABEL_VALUES: usize = 200;
const MAX_LABEL_LEN: usize = 64;
const OTHER: &str = "other";

/// A bounded set of label values, interned: each distinct value is stored once for the
/// life of the process (at most [`MAX_LABEL_VALUES`] of at most 64 bytes per label), so
/// labelling a metric allocates nothing once its values have been seen.
struct Labels(LazyLock<RwLock<hashbrown::HashSet<&'static str>>>);

impl Labels {
    const fn new() -> Self {
        Labels(LazyLock::new(|| RwLock::new(hashbrown::HashSet::new())))
    }

    fn get(&self, value: &str) -> &'static str {
        let value = truncate(value);
        {
            let seen = self.0.read().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = seen.get(value) {
                return v;
            }
            if seen.len() >= MAX_LABEL_VALUES {
                return OTHER;
            }
        }
        let mut seen = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = seen.get(value) {
            return v;
        }
        if seen.len() >= MAX_LABEL_VALUES {
            return OTHER;
        }
        // Bounded above: at most MAX_LABEL_VALUES strings of at most MAX_LABEL_LEN bytes.
        let v: &'static str = Box::leak(value.to_owned().into_boxed_str());
        seen.insert(v);
        v
    }
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_LABEL_LEN {
        return s;
    }
    let mut end = MAX_LABEL_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

static MODELS: Labels = Labels::new();
static PROVIDERS: Labels = Labels::new();
static STATUSES: Labels = Labels::new();
static MODES: Labels = Labels::new();
static SCOPES: Labels = Labels::new();

/// The `model` label of `model` (`none` without one), interned.
pub(crate) fn model_label(model: Option<&str>) -> &'static str {
    MODELS.get(model.unwrap_or("none"))
}

/// The `provider` label of `provider`, interned.
pub(crate) fn provider_label(provider: &str) -> &'static str {
    PROVIDERS.get(provider)
}

/// Attaches units and help texts to every metric, on the recorder installed now.
/// Call it once, after installing your recorder.
pub fn describe() {
    describe_counter!(
        REQUESTS,
        Unit::Count,
        "Requests through the pipeline, by model, status (ok or error reason) and cache (hit or miss)."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Request latency (streams: until their end), by model, cache and result."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Streams: time from the request to its first event, by model and cache."
    );
    describe_counter!(
        TOKENS,
        Unit::Count,
        "Tokens billed, by model and type (input or output)."
    );
    describe_counter!(COST, Unit::Count, "Money spent, in nano-dollars, by model.");
    describe_counter!(
        COST_SAVED,
        Unit::Count,
        "Money cache hits saved, in nano-dollars, by model."
    );
    describe_counter!(
        PROMPT_CACHE_TOKENS,
        Unit::Count,
        "Prompt tokens the provider's prompt cache served (read) or stored (write), by model and type."
    );
    describe_counter!(
        PROMPT_CACHE_SAVED,
        Unit::Count,
        "Money the provider's prompt cache saved (reads at the cached-input price), in nano-dollars, by model."
    );
    describe_counter!(
        PROMPT_CACHE_WRITE_PREMIUM,
        Unit::Count,
        "Money paid above the input price for prompt-cache writes, in nano-dollars, by model."
    );
    describe_counter!(
        ATTEMPTS,
        Unit::Count,
        "Provider calls, by provider, model and status."
    );
    describe_histogram!(
        ATTEMPT_DURATION,
        Unit::Seconds,
        "Provider call latency (streams: to the first event), by provider and model."
    );
    describe_counter!(
        FALLBACKS,
        Unit::Count,
        "Answers that came from a fallback target, by the model that answered."
    );
    describe_counter!(
        ESCALATIONS,
        Unit::Count,
        "Answers a validator escalated, by the model that answered."
    );
    describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Requests inside the pipeline, open streams included."
    );
    describe_counter!(
        LIMITER_REFUSALS,
        Unit::Count,
        "Requests refused by a rate limit, by scope kind."
    );
    describe_counter!(
        BUDGET_REFUSALS,
        Unit::Count,
        "Requests refused by a spend cap, by scope kind."
    );
    describe_gauge!(
        BUDGET_UTILIZATION,
        Unit::Count,
        "Spend cap use: (spent + reserved) / cap, by scope and window."
    );
    describe_gauge!(
        BUDGET_SPENT,
        Unit::Count,
        "Dollars spent in the cap's current window, by scope and window."
    );
    describe_gauge!(
        BUDGET_RESERVED,
        Unit::Count,
        "Dollars reserved by calls in flight, by scope and window."
    );
    describe_gauge!(
        BUDGET_LIMIT,
        Unit::Count,
        "The spend cap in dollars, by scope and window."
    );
    describe_gauge!(
        BREAKER_STATE,
        Unit::Count,
        "Circuit breaker state per target: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(
        CACHE_GUARD_REJECTIONS,
        Unit::Count,
        "Semantic-cache candidates rejected by the near-miss guard."
    );
    describe_counter!(
        DEGRADED,
        Unit::Count,
        "Requests served in a degrade mode, by mode."
    );
    describe_counter!(
        STREAM_MALFORMED_EVENTS,
        Unit::Count,
        "Stream events that could not be read and were skipped, by provider."
    );
    describe_counter!(
        STREAM_RECOVERIES,
        Unit::Count,
        "Streams cut after their first token that were continued or restarted."
    );
    describe_counter!(
        USAGE_RECORDS_DROPPED,
        Unit::Count,
        "Usage records a sink could not keep, by sink and reason."
    );
}

/// The most metric keys (a name with its label values) kept built; past it, a key is
/// built for each use.
const MAX_KEYS: usize = 4_096;

/// A metric name and up to three label pairs, by the address and length of each
/// `'static` string (unused pairs are zero): what a key is looked up by, hashed as
/// integers. Label values are interned (see [`Labels`]) and names are constants, so one
/// key has one identity; were the same text ever at two addresses, it would only be
/// built twice.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct KeyId([usize; 14]);

impl KeyId {
    /// `None` past three labels.
    fn of(name: &'static str, labels: &[(&'static str, &'static str)]) -> Option<Self> {
        if labels.len() > 3 {
            return None;
        }
        let mut id = [0usize; 14];
        let words = std::iter::once(name)
            .chain(labels.iter().flat_map(|(k, v)| [*k, *v]))
            .flat_map(|s| [s.as_ptr() as usize, s.len()]);
        for (slot, w) in id.iter_mut().zip(words) {
            *slot = w;
        }
        Some(KeyId(id))
    }
}

/// Metric keys built once per name and label values: recording a metric through them
/// allocates nothing and hashes no label set again. The recorder is asked for the
/// handle every time, as the `metrics` macros do, so a recorder installed at any time
/// (or a thread's local one) receives what follows. Bounded by [`MAX_KEYS`] keys, each
/// from interned label values.
static KEYS: LazyLock<RwLock<hashbrown::HashMap<KeyId, &'static Key>>> =
    LazyLock::new(|| RwLock::new(hashbrown::HashMap::new()));

/// What the `metrics` macros would attach to a metric emitted from this module.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl KeyId {
    /// A slot of [`RECENT`] for this key: a multiplicative hash of the name's and the
    /// label values' addresses.
    fn slot(&self) -> usize {
        let w = &self.0;
        let x = w[0] ^ w[4].rotate_left(17) ^ w[8].rotate_left(31) ^ w[12].rotate_left(47);
        (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) as usize >> (usize::BITS - RECENT_BITS)
    }
}

/// log2 of the slots in [`RECENT`] (sets of two).
const RECENT_BITS: u32 = 6;

thread_local! {
    /// The keys a thread used lately, in sets of two slots by [`KeyId::slot`]: found
    /// again without the shared map's lock or a hash of the whole identity. The keys
    /// are built once and never freed.
    static RECENT: std::cell::RefCell<[Option<(KeyId, &'static Key)>; 1 << RECENT_BITS]> =
        const { std::cell::RefCell::new([None; 1 << RECENT_BITS]) };
}

/// Runs `f` on the key of `name` with `labels`, built once.
fn with_key<T>(
    name: &'static str,
    labels: &[(&'static str, &'static str)],
    f: impl FnOnce(&Key) -> T,
) -> T {
    let build = || {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::from_static_parts(k, v))
            .collect();
        Key::from_parts(name, labels)
    };
    let Some(id) = KeyId::of(name, labels) else {
        return f(&build());
    };
    // the two slots of the key's set
    let set = id.slot() & !1;
    // (`f` runs outside the thread's borrow: a recorder may emit metrics of its own)
    let recent = RECENT
        .try_with(|r| {
            let r = r.try_borrow().ok()?;
            r.get(set..set + 2)?
                .iter()
                .flatten()
                .find(|(i, _)| *i == id)
                .map(|(_, k)| *k)
        })
        .ok()
        .flatten();
    if let Some(k) = recent {
        return f(k);
    }
    let Some(k) = shared_key(id, build) else {
        return f(&build());
    };
    let _ = RECENT.try_with(|r| {
        let Ok(mut r) = r.try_borrow_mut() else {
            return;
        };
        if let Some(pair) = r.get_mut(set..set + 2) {
            // an empty slot of the set, else the second: the first keeps the key that
            // came first, so two keys sharing a set both stay once both are in
            let at = usize::from(pair[0].is_some());
            pair[at] = Some((id, k));
        }
    });
    f(k)
}

/// The key of `id` from the shared map, built and added if it is new; `None` once the
/// map holds [`MAX_KEYS`] keys.
fn shared_key(id: KeyId, build: impl FnOnce() -> Key) -> Option<&'static Key> {
    if let Some(k) = KEYS.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
        return Some(k);
    }
    let mut keys = KEYS.write().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = keys.get(&id) {
        return Some(k);
    }
    if keys.len() >= MAX_KEYS {
        return None;
    }
    // Bounded above: at most MAX_KEYS keys.
    let k: &'static Key = Box::leak(Box::new(build()));
    keys.insert(id, k);
    Some(k)
}

/// The counter `name` with `labels`, from the recorder in place now.
fn counter_of(name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
    with_key(name, labels, |k| {
        ::metrics::with_recorder(|r| r.register_counter(k, &METADATA))
    })
}

/// The histogram `name` with `labels`, from the recorder in place now.
fn histogram_of(name: &'static str, labels: &[(&'static str, &'static str)]) -> Histogram {
    with_key(name, labels, |k| {
        ::metrics::with_recorder(|r| r.register_histogram(k, &METADATA))
    })
}

/// The gauge `name` with `labels`, from the recorder in place now.
fn gauge_of(name: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
    with_key(name, labels, |k| {
        ::metrics::with_recorder(|r| r.register_gauge(k, &METADATA))
    })
}

/// Emits the metrics of one finished request.
pub(crate) fn record_request(r: &UsageRecord) {
    let model = model_label(r.model.as_deref());
    let cache = if r.is_cache_hit() { "hit" } else { "miss" };
    let (status, result) = match &r.outcome {
        Outcome::Error(reason) => (STATUSES.get(reason), "error"),
        _ => ("ok", "ok"),
    };
    counter_of(
        REQUESTS,
        &[("model", model), ("status", status), ("cache", cache)],
    )
    .increment(1);
    histogram_of(
        REQUEST_DURATION,
        &[("model", model), ("cache", cache), ("result", result)],
    )
    .record(r.latency.as_secs_f64());
    if let Some(t) = r.time_to_first_token {
        histogram_of(TIME_TO_FIRST_TOKEN, &[("model", model), ("cache", cache)])
            .record(t.as_secs_f64());
    }
    if r.usage.input_tokens > 0 {
        counter_of(TOKENS, &[("model", model), ("type", "input")]).increment(r.usage.input_tokens);
    }
    if r.usage.output_tokens > 0 {
        counter_of(TOKENS, &[("model", model), ("type", "output")])
            .increment(r.usage.output_tokens);
    }
    if !r.cost.is_zero() {
        counter_of(COST, &[("model", model)]).increment(r.cost.as_nanos());
    }
    if !r.saved.is_zero() {
        counter_of(COST_SAVED, &[("model", model)]).increment(r.saved.as_nanos());
    }
    let cached = r.usage.cached_input_tokens.min(r.usage.input_tokens);
    if cached > 0 {
        counter_of(PROMPT_CACHE_TOKENS, &[("model", model), ("type", "read")]).increment(cached);
    }
    let written = r
        .usage
        .cache_write_tokens
        .min(r.usage.input_tokens - cached);
    if written > 0 {
        counter_of(PROMPT_CACHE_TOKENS, &[("model", model), ("type", "write")]).increment(written);
    }
    if !r.prompt_cache_saved.is_zero() {
        counter_of(PROMPT_CACHE_SAVED, &[("model", model)])
            .increment(r.prompt_cache_saved.as_nanos());
    }
    if !r.prompt_cache_write_premium.is_zero() {
        counter_of(PROMPT_CACHE_WRITE_PREMIUM, &[("model", model)])
            .increment(r.prompt_cache_write_premium.as_nanos());
    }
    if r.fallbacks > 0 {
        counter_of(FALLBACKS, &[("model", model)]).increment(1);
    }
    if r.escalated {
        counter_of(ESCALATIONS, &[("model", model)]).increment(1);
    }
    if let (Outcome::Error(reason), Some(scope)) = (&r.outcome, r.refusal_scope) {
        match reason.as_str() {
            "rate_limited" => {
                counter_of(LIMITER_REFUSALS, &[("scope", scope.as_str())]).increment(1)
            }
            "budget_exceeded" => {
                counter_of(BUDGET_REFUSALS, &[("scope", scope.as_str())]).increment(1)
            }
            _ => {}
        }
    }
    if r.guard_rejections > 0 {
        counter!(CACHE_GUARD_REJECTIONS).increment(u64::from(r.guard_rejections));
    }
    if let Some(mode) = &r.degrade_mode {
        counter_of(DEGRADED, &[("mode", MODES.get(mode))]).increment(1);
    }
}

/// Emits the metrics of one provider call, labelled with interned labels (see
/// [`provider_label`], [`model_label`]).
pub(crate) fn record_attempt(
    provider: &'static str,
    model: &'static str,
    status: &str,
    took: Duration,
) {
    counter_of(
        ATTEMPTS,
        &[
            ("provider", provider),
            ("model", model),
            // the common case needs no interning
            (
                "status",
                if status == "ok" {
                    "ok"
                } else {
                    STATUSES.get(status)
                },
            ),
        ],
    )
    .increment(1);
    histogram_of(
        ATTEMPT_DURATION,
        &[("provider", provider), ("model", model)],
    )
    .record(took.as_secs_f64());
}

/// Counts a stream recovery.
pub(crate) fn record_stream_recovery(provider: &str, model: &str) {
    counter_of(
        STREAM_RECOVERIES,
        &[
            ("provider", PROVIDERS.get(provider)),
            ("model", MODELS.get(model)),
        ],
    )
    .increment(1);
}

/// Counts usage records a sink could not keep.
pub(crate) fn record_dropped(sink: &'static str, reason: &'static str, n: u64) {
    counter_of(USAGE_RECORDS_DROPPED, &[("sink", sink), ("reason", reason)]).increment(n);
}

/// A request in flight: counted in `tokenwise_in_flight_requests` until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(());

impl InFlight {
    pub(crate) fn start() -> Self {
        gauge!(IN_FLIGHT).increment(1.0);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(IN_FLIGHT).decrement(1.0);
    }
}

/// A stream that counts as in flight until it ends (done, failed or dropped).
struct Tracked {
    inner: ChatStream,
    in_flight: Option<InFlight>,
}

impl Stream for Tracked {
    type Item = Result<StreamEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let next = this.inner.as_mut().poll_next(cx);
        if let Poll::Ready(None | Some(Err(_)) | Some(Ok(StreamEvent::Done(_)))) = &next {
            this.in_flight = None;
        }
        next
    }
}

/// Keeps `in_flight` counted for as long as `stream` runs.
pub(crate) fn track_stream(stream: ChatStream, in_flight: InFlight) -> ChatStream {
    Box::pin(Tracked {
        inner: stream,
        in_flight: Some(in_flight),
    })
}

/// Sets `tokenwise_breaker_state{provider, model}` (0 closed, 1 half-open, 2 open). A
/// pipeline with circuit breakers calls this after every call through a breaker; a
/// breaker of your own can call it too.
pub fn record_breaker_state(provider: &str, model: &str, state: BreakerState) {
    gauge_of(
        BREAKER_STATE,
        &[
            ("provider", PROVIDERS.get(provider)),
            ("model", MODELS.get(model)),
        ],
    )
    .set(state.as_gauge());
}

/// Sets the budget gauges (`tokenwise_budget_utilization_ratio`, `_spent_usd`,
/// `_reserved_usd`, `_limit_usd`) for each cap, labelled with the cap's scope as
/// displayed (`global`, `org:acme`, ...) and its window. The scopes are the ones you
/// pass, so you decide the cardinality; past [`MAX_LABEL_VALUES`] distinct scopes the
/// rest are labelled `other`.
///
/// ```
/// use tokenwise::observe::metrics::record_budget_status;
/// # async fn f(pipeline: tokenwise::Pipeline) -> tokenwise::Result<()> {
/// let global = pipeline.budget_status(&tokenwise::RequestMeta::default()).await?;
/// record_budget_status(&global);
/// # Ok(()) }
/// ```
pub fn record_budget_status(caps: &[CapStatus]) {
    for cap in caps {
        let scope = SCOPES.get(&cap.scope.to_string());
        let window = cap.window.as_str();
        let used = cap.spent + cap.reserved;
        let ratio = if cap.limit.is_zero() {
            if used.is_zero() { 0.0 } else { 1.0 }
        } else {
            used.as_nanos() as f64 / cap.limit.as_nanos() as f64
        };
        gauge!(BUDGET_UTILIZATION, "scope" => scope, "window" => window).set(ratio);
        gauge!(BUDGET_SPENT, "scope" => scope, "window" => window).set(cap.spent.as_dollars_f64());
        gauge!(BUDGET_RESERVED, "scope" => scope, "window" => window)
            .set(cap.reserved.as_dollars_f64());
        gauge!(BUDGET_LIMIT, "scope" => scope, "window" => window).set(cap.limit.as_dollars_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_found_again_by_a_thread_are_each_their_own() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let provider = provider_label("p-recent");
        let models: Vec<&'static str> = (0..40)
            .map(|i| model_label(Some(&format!("m-recent-{i}"))))
            .collect();
        // more keys than a thread keeps: slots are shared and overwritten
        for round in 0..2 {
            let recorder = DebuggingRecorder::new();
            let snap = recorder.snapshotter();
            ::metrics::with_local_recorder(&recorder, || {
                for _ in 0..=round {
                    for m in &models {
                        record_attempt(provider, m, "ok", Duration::from_millis(1));
                    }
                }
            });
            let counts: Vec<(String, u64)> = snap
                .snapshot()
                .into_vec()
                .into_iter()
                .filter(|(k, ..)| k.key().name() == ATTEMPTS)
                .map(|(k, _, _, v)| {
                    let model = k
                        .key()
                        .labels()
                        .find(|l| l.key() == "model")
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default();
                    let n = match v {
                        DebugValue::Counter(n) => n,
                        _ => 0,
                    };
                    (model, n)
                })
                .collect();
            assert_eq!(counts.len(), models.len(), "round {round}");
            assert!(counts.iter().all(|(_, n)| *n == round + 1), "{counts:?}");
        }
    }

    #[test]
    fn keys_built_once_still_reach_the_recorder_in_place() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let (provider, model) = (provider_label("p-keys"), model_label(Some("m-keys")));
        // without a recorder: the key is built and kept
        record_attempt(provider, model, "ok", Duration::from_millis(1));
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            record_attempt(provider, model, "ok", Duration::from_millis(1));
            record_attempt(provider, model, "ok", Duration::from_millis(1));
        });
        let counted: u64 = snap
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == ATTEMPTS)
            .map(|(.., v)| match v {
                DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum();
        assert_eq!(counted, 2);
        assert!(
            KeyId::of(ATTEMPTS, &[("a", "b"); 4]).is_none(),
            "past three labels"
        );
    }

    #[test]
    fn labels_are_bounded_and_truncated() {
        let labels = Labels::new();
        for i in 0..MAX_LABEL_VALUES {
            assert_eq!(labels.get(&format!("m{i}")), format!("m{i}"));
        }
        assert_eq!(labels.get("one-too-many"), OTHER);
        assert_eq!(labels.get("m3"), "m3");
        let long = "é".repeat(100);
        assert!(truncate(&long).len() <= MAX_LABEL_LEN);
        assert!(long.starts_with(truncate(&long)));
    }
}
