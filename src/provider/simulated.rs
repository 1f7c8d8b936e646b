//! A deterministic, fault-injectable provider for tests, benchmarks and demos.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Provider, ProviderCall};
use crate::clock::{Clock, Timestamp, TokioClock};
use crate::context::{TiktokenCounter, TokenCounter};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::types::{ChatResponse, ChatStream, FinishReason, Role, StreamEnd, StreamEvent, Usage};
use crate::{Error, Result};

/// A window of virtual time, measured from the provider's creation, during which
/// calls fail with a 503 (for every model, or for one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    /// When it starts, after the provider was built.
    pub start: Duration,
    /// When it ends, after the provider was built.
    pub end: Duration,
    /// Only this model fails; `None` for all.
    pub model: Option<String>,
}

#[derive(Debug, Clone)]
struct Faults {
    server_error_rate: f64,
    rate_limit_rate: f64,
    rate_limit_retry_after: Duration,
    overloaded_rate: f64,
    timeout_rate: f64,
    timeout_after: Duration,
    outages: Vec<Outage>,
    cut_stream_after: Option<u64>,
}

#[derive(Debug, Clone)]
struct Config {
    name: String,
    time_to_first_token: Duration,
    per_token: Duration,
    min_words: u32,
    max_words: u32,
    seed: u64,
    faults: Faults,
}

/// Builds a [`SimulatedProvider`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SimulatedProviderBuilder {
    config: Config,
    clock: Option<Arc<dyn Clock>>,
    error: Option<String>,
}

fn check_rate(error: &mut Option<String>, what: &str, rate: f64) {
    if !(0.0..=1.0).contains(&rate) && error.is_none() {
        *error = Some(format!("{what} must be between 0 and 1, got {rate}"));
    }
}

impl SimulatedProviderBuilder {
    /// The provider's name (default `simulated`). Name it after the provider it stands
    /// in for (`openai`) to serve that provider's catalogue models.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Latency before the first token (default 200 ms).
    pub fn time_to_first_token(mut self, d: Duration) -> Self {
        self.config.time_to_first_token = d;
        self
    }

    /// Latency per output token after the first (default 10 ms).
    pub fn per_token(mut self, d: Duration) -> Self {
        self.config.per_token = d;
        self
    }

    /// Answer length in words (default 12 to 40), chosen per prompt.
    pub fn answer_words(mut self, min: u32, max: u32) -> Self {
        if (min == 0 || min > max) && self.error.is_none() {
            self.error = Some(format!(
                "answer_words needs 1 <= min <= max, got {min}..{max}"
            ));
        }
        self.config.min_words = min;
        self.config.max_words = max;
        self
    }

    /// Seeds the fault injection (default 0). Answers do not depend on it.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = seed;
        self
    }

    /// Fails this share of calls with a 500.
    pub fn server_error_rate(mut self, rate: f64) -> Self {
        check_rate(&mut self.error, "server_error_rate", rate);
        self.config.faults.server_error_rate = rate;
        self
    }

    /// Fails this share of calls with a 429 carrying `retry_after`.
    pub fn rate_limit_rate(mut self, rate: f64, retry_after: Duration) -> Self {
        check_rate(&mut self.error, "rate_limit_rate", rate);
        self.config.faults.rate_limit_rate = rate;
        self.config.faults.rate_limit_retry_after = retry_after;
        self
    }

    /// Fails this share of calls with a 529 (overloaded).
    pub fn overloaded_rate(mut self, rate: f64) -> Self {
        check_rate(&mut self.error, "overloaded_rate", rate);
        self.config.faults.overloaded_rate = rate;
        self
    }

    /// Makes this share of calls hang for `after`, then fail with a timeout.
    pub fn timeout_rate(mut self, rate: f64, after: Duration) -> Self {
        check_rate(&mut self.error, "timeout_rate", rate);
        self.config.faults.timeout_rate = rate;
        self.config.faults.timeout_after = after;
        self
    }

    /// Fails every call (or every call to `model`) with a 503 between `start` and `end`
    /// after the provider was built.
    pub fn outage(mut self, start: Duration, end: Duration, model: Option<&str>) -> Self {
        if start >= end && self.error.is_none() {
            self.error = Some(format!(
                "outage must end after it starts: {start:?}..{end:?}"
            ));
        }
        self.config.faults.outages.push(Outage {
            start,
            end,
            model: model.map(str::to_owned),
        });
        self
    }

    /// Breaks every stream after `chunks` text chunks, with no `Done`.
    pub fn cut_stream_after(mut self, chunks: u64) -> Self {
        self.config.faults.cut_stream_after = Some(chunks);
        self
    }

    /// The clock outages are measured on (default: [`TokioClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the provider, or reports the first invalid setting.
    pub fn build(self) -> Result<SimulatedProvider> {
        if let Some(e) = self.error {
            return Err(Error::Config(format!("simulated provider: {e}")));
        }
        Ok(self.finish())
    }

    fn finish(self) -> SimulatedProvider {
        let clock = self.clock.unwrap_or_else(|| Arc::new(TokioClock::new()));
        let started = clock.now();
        SimulatedProvider {
            inner: Arc::new(Inner {
                rng: Mutex::new(SmallRng::seed_from_u64(self.config.seed)),
                config: self.config,
                clock,
                started,
                calls: AtomicU64::new(0),
                counter: TiktokenCounter::new(),
            }),
        }
    }
}

#[derive(Debug)]
struct Inner {
    config: Config,
    clock: Arc<dyn Clock>,
    started: Timestamp,
    calls: AtomicU64,
    rng: Mutex<SmallRng>,
    counter: TiktokenCounter,
}

/// A provider that answers from the prompt, deterministically, with latency on tokio
/// time and injectable faults. Every test, benchmark and example of tokenwise runs on it.
///
/// - The answer depends only on the model and the conversation: the same request gets
///   the same answer, different requests different ones.
/// - Usage is counted with the model's tokenizer; `max_tokens` cuts the answer
///   (`finish_reason: length`).
/// - Latency: [`time_to_first_token`](SimulatedProviderBuilder::time_to_first_token)
///   plus [`per_token`](SimulatedProviderBuilder::per_token) for each further token, slept
///   on tokio time, so paused-time tests run instantly.
/// - Faults: error rates (500, 429 with Retry-After, 529, timeouts) drawn from a seeded
///   generator, outage windows, and streams cut after N chunks.
///
/// Cheap to clone; clones share counters and faults.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tokenwise::Result<()> {
/// use std::time::Duration;
/// use tokenwise::provider::{Provider, ProviderCall, SimulatedProvider};
/// use tokenwise::{Catalog, ChatRequest};
///
/// let sim = SimulatedProvider::builder().time_to_first_token(Duration::ZERO).per_token(Duration::ZERO).build()?;
/// let catalog = Catalog::builtin();
/// let req = ChatRequest::user_text("Why is the sky blue?");
/// let a = sim.chat(ProviderCall::new(&req, catalog.require("gpt-4o-mini")?)).await?;
/// let b = sim.chat(ProviderCall::new(&req, catalog.require("gpt-4o-mini")?)).await?;
/// assert_eq!(a.content, b.content);
/// assert_eq!(sim.calls(), 2);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SimulatedProvider {
    inner: Arc<Inner>,
}

impl SimulatedProvider {
    /// A builder with the defaults: 200 ms to first token, 10 ms a token, no faults.
    pub fn builder() -> SimulatedProviderBuilder {
        SimulatedProviderBuilder {
            config: Config {
                name: "simulated".to_owned(),
                time_to_first_token: Duration::from_millis(200),
                per_token: Duration::from_millis(10),
                min_words: 12,
                max_words: 40,
                seed: 0,
                faults: Faults {
                    server_error_rate: 0.0,
                    rate_limit_rate: 0.0,
                    rate_limit_retry_after: Duration::from_secs(1),
                    overloaded_rate: 0.0,
                    timeout_rate: 0.0,
                    timeout_after: Duration::from_secs(30),
                    outages: Vec::new(),
                    cut_stream_after: None,
                },
            },
            clock: None,
            error: None,
        }
    }

    /// A provider with the defaults.
    pub fn new() -> Self {
        // The defaults set no invalid value, so nothing needs checking.
        Self::builder().finish()
    }

    /// How many calls (whole or streamed) have been made, failed ones included.
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    /// The answer this provider gives `call`, and its usage, without latency or faults.
    pub fn answer(&self, call: ProviderCall<'_>) -> (String, Usage, FinishReason) {
        self.inner.answer(call)
    }
}

impl Default for SimulatedProvider {
    fn default() -> Self {
        Self::new()
    }
}

const WORDS: &[&str] = &[
    "the", "model", "answer", "is", "that", "cache", "tokens", "budget", "latency", "request",
    "because", "usually", "several", "careful", "reasons", "first", "second", "finally", "cost",
    "provider", "stream", "limit", "window", "retry", "simple", "in", "short", "and", "of", "a",
    "depends", "on", "context", "which", "means", "we", "can", "see", "clearly", "here",
];

/// What the provider decided to do with one call.
enum Fate {
    Answer,
    Fail(ProviderError),
    Hang(Duration),
}

impl Inner {
    fn seed_of(call: &ProviderCall<'_>) -> u64 {
        let mut h = blake3::Hasher::new();
        h.update(call.model.name.as_bytes());
        for m in &call.request.messages {
            h.update(&[m.role as u8]);
            h.update(&(m.content.len() as u64).to_le_bytes());
            h.update(m.content.as_bytes());
        }
        let bytes = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&bytes.as_bytes()[..8]);
        u64::from_le_bytes(first)
    }

    fn answer(&self, call: ProviderCall<'_>) -> (String, Usage, FinishReason) {
        let mut rng = SmallRng::seed_from_u64(Self::seed_of(&call));
        let cfg = &self.config;
        let n_words = rng.random_range(cfg.min_words..=cfg.max_words);
        let topic: Vec<&str> = call
            .request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.split_whitespace().take(6).collect())
            .unwrap_or_default();
        let mut text = String::new();
        if !topic.is_empty() {
            text.push_str("About \"");
            text.push_str(&topic.join(" "));
            text.push_str("\":");
        }
        for _ in 0..n_words {
            let w = WORDS[rng.random_range(0..WORDS.len())];
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(w);
        }
        text.push('.');
        let tokenizer = call.model.tokenizer;
        let input = self.counter.count_request(call.request, tokenizer);
        let mut output = self.counter.count_text(&text, tokenizer);
        let mut finish = FinishReason::Stop;
        let limit = call.model.output_allowance(call.request.params.max_tokens);
        if output > limit {
            // Cut at the last word that still fits.
            let mut cut = String::new();
            for w in text.split(' ') {
                let candidate = if cut.is_empty() {
                    w.to_owned()
                } else {
                    format!("{cut} {w}")
                };
                if self.counter.count_text(&candidate, tokenizer) > limit {
                    break;
                }
                cut = candidate;
            }
            text = cut;
            output = self.counter.count_text(&text, tokenizer);
            finish = FinishReason::Length;
        }
        (text, Usage::new(input, output), finish)
    }

    fn fate(&self, model: &str) -> Fate {
        let f = &self.config.faults;
        let since = self.clock.now().saturating_since(self.started);
        for o in &f.outages {
            let applies = o.model.as_deref().is_none_or(|m| m == model);
            if applies && since >= o.start && since < o.end {
                return Fate::Fail(
                    ProviderError::new(
                        ProviderErrorKind::Server,
                        &self.config.name,
                        "service unavailable (simulated outage)",
                    )
                    .with_status(503),
                );
            }
        }
        let draw: f64 = match self.rng.lock() {
            Ok(mut rng) => rng.random(),
            Err(poisoned) => poisoned.into_inner().random(),
        };
        let name = &self.config.name;
        let mut edge = f.rate_limit_rate;
        if draw < edge {
            return Fate::Fail(
                ProviderError::new(
                    ProviderErrorKind::RateLimited,
                    name,
                    "rate limit reached (simulated)",
                )
                .with_status(429)
                .with_retry_after(f.rate_limit_retry_after),
            );
        }
        edge += f.overloaded_rate;
        if draw < edge {
            return Fate::Fail(
                ProviderError::new(
                    ProviderErrorKind::Overloaded,
                    name,
                    "overloaded (simulated)",
                )
                .with_status(529),
            );
        }
        edge += f.server_error_rate;
        if draw < edge {
            return Fate::Fail(
                ProviderError::new(
                    ProviderErrorKind::Server,
                    name,
                    "internal server error (simulated)",
                )
                .with_status(500),
            );
        }
        edge += f.timeout_rate;
        if draw < edge {
            return Fate::Hang(f.timeout_after);
        }
        Fate::Answer
    }

    async fn start(&self, model: &str) -> Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match self.fate(model) {
            Fate::Answer => Ok(()),
            Fate::Fail(e) => {
                // Failures come back quickly, but not instantly.
                tokio::time::sleep(self.config.time_to_first_token / 4).await;
                Err(e.into())
            }
            Fate::Hang(d) => {
                tokio::time::sleep(d).await;
                Err(ProviderError::new(
                    ProviderErrorKind::Timeout,
                    &self.config.name,
                    "timed out (simulated)",
                )
                .into())
            }
        }
    }
}

#[async_trait]
impl Provider for SimulatedProvider {
    fn name(&self) -> &str {
        &self.inner.config.name
    }

    async fn chat(&self, call: ProviderCall<'_>) -> Result<ChatResponse> {
        let inner = &self.inner;
        inner.start(&call.model.name).await?;
        let (text, usage, finish) = inner.answer(call);
        let latency = inner.config.time_to_first_token
            + inner.config.per_token
                * u32::try_from(usage.output_tokens.saturating_sub(1)).unwrap_or(u32::MAX);
        tokio::time::sleep(latency).await;
        Ok(ChatResponse::new(
            text,
            &call.model.name,
            &inner.config.name,
            usage,
            finish,
        ))
    }

    async fn stream(&self, call: ProviderCall<'_>) -> Result<ChatStream> {
        let inner = Arc::clone(&self.inner);
        inner.start(&call.model.name).await?;
        let (text, usage, finish) = inner.answer(call);
        let tokenizer = call.model.tokenizer;
        let chunks: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
        let end = StreamEnd::new(finish, &call.model.name, &inner.config.name);
        struct State {
            inner: Arc<Inner>,
            chunks: std::vec::IntoIter<String>,
            sent: u64,
            usage: Usage,
            end: Option<StreamEnd>,
            usage_sent: bool,
            tokenizer: crate::types::TokenizerKind,
        }
        let state = State {
            inner,
            chunks: chunks.into_iter(),
            sent: 0,
            usage,
            end: Some(end),
            usage_sent: false,
            tokenizer,
        };
        let s = stream::unfold(state, |mut st| async move {
            if let Some(chunk) = st.chunks.next() {
                let cfg = &st.inner.config;
                if cfg.faults.cut_stream_after.is_some_and(|n| st.sent >= n) {
                    st.chunks = Vec::new().into_iter();
                    st.end = None;
                    st.usage_sent = true;
                    let err = ProviderError::new(
                        ProviderErrorKind::Connection,
                        &cfg.name,
                        "connection reset mid-stream (simulated)",
                    );
                    return Some((
                        Err(Error::StreamInterrupted {
                            chunks: st.sent,
                            reason: err.to_string(),
                        }),
                        st,
                    ));
                }
                let delay = if st.sent == 0 {
                    cfg.time_to_first_token
                } else {
                    let toks = st.inner.counter.count_text(&chunk, st.tokenizer).max(1);
                    cfg.per_token * u32::try_from(toks).unwrap_or(u32::MAX)
                };
                tokio::time::sleep(delay).await;
                st.sent += 1;
                return Some((Ok(StreamEvent::text(chunk)), st));
            }
            if !st.usage_sent {
                st.usage_sent = true;
                let u = st.usage;
                return Some((Ok(StreamEvent::Usage(u)), st));
            }
            let end = st.end.take()?;
            Some((Ok(StreamEvent::Done(end)), st))
        });
        Ok(Box::pin(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Catalog, ChatRequest};
    use futures_util::StreamExt;

    fn fast() -> SimulatedProviderBuilder {
        SimulatedProvider::builder()
            .time_to_first_token(Duration::from_millis(100))
            .per_token(Duration::from_millis(10))
    }

    #[test]
    fn defaults_are_valid() {
        assert!(SimulatedProvider::builder().build().is_ok());
        assert!(
            SimulatedProvider::builder()
                .server_error_rate(1.5)
                .build()
                .is_err()
        );
        assert!(
            SimulatedProvider::builder()
                .answer_words(5, 1)
                .build()
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deterministic_answers_and_latency_on_tokio_time() {
        let sim = fast().build().unwrap();
        let cat = Catalog::builtin();
        let m = cat.require("gpt-4o-mini").unwrap();
        let req = ChatRequest::user_text("What is a token bucket?");
        let t0 = tokio::time::Instant::now();
        let a = sim.chat(ProviderCall::new(&req, m)).await.unwrap();
        let took = t0.elapsed();
        let expect = Duration::from_millis(100 + 10 * (a.usage.output_tokens - 1));
        assert_eq!(took, expect);
        let b = sim.chat(ProviderCall::new(&req, m)).await.unwrap();
        assert_eq!(a.content, b.content);
        let other = ChatRequest::user_text("What is a leaky bucket?");
        let c = sim.chat(ProviderCall::new(&other, m)).await.unwrap();
        assert_ne!(a.content, c.content);
        assert_eq!(
            a.usage.input_tokens,
            TiktokenCounter.count_request(&req, m.tokenizer)
        );
        assert_eq!(
            a.usage.output_tokens,
            TiktokenCounter.count_text(&a.content, m.tokenizer)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_tokens_truncates_with_length() {
        let sim = fast().answer_words(30, 30).build().unwrap();
        let cat = Catalog::builtin();
        let req = ChatRequest::user_text("Tell me everything").max_tokens(5);
        let r = sim
            .chat(ProviderCall::new(&req, cat.require("gpt-4o-mini").unwrap()))
            .await
            .unwrap();
        assert_eq!(r.finish_reason, FinishReason::Length);
        assert!(r.usage.output_tokens <= 5);
    }

    #[tokio::test(start_paused = true)]
    async fn faults_and_outages() {
        let sim = fast()
            .rate_limit_rate(1.0, Duration::from_secs(7))
            .build()
            .unwrap();
        let cat = Catalog::builtin();
        let m = cat.require("gpt-4o-mini").unwrap();
        let req = ChatRequest::user_text("hi");
        let e = sim.chat(ProviderCall::new(&req, m)).await.unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(e.as_provider().unwrap().status, Some(429));

        let sim = fast()
            .outage(
                Duration::from_secs(10),
                Duration::from_secs(20),
                Some("gpt-4o-mini"),
            )
            .build()
            .unwrap();
        assert!(sim.chat(ProviderCall::new(&req, m)).await.is_ok());
        tokio::time::advance(Duration::from_secs(10)).await;
        let e = sim.chat(ProviderCall::new(&req, m)).await.unwrap_err();
        assert_eq!(e.as_provider().unwrap().status, Some(503));
        // another model is unaffected
        assert!(
            sim.chat(ProviderCall::new(&req, cat.require("gpt-4o").unwrap()))
                .await
                .is_ok()
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(sim.chat(ProviderCall::new(&req, m)).await.is_ok());

        let sim = fast()
            .timeout_rate(1.0, Duration::from_secs(30))
            .build()
            .unwrap();
        let t0 = tokio::time::Instant::now();
        let e = sim.chat(ProviderCall::new(&req, m)).await.unwrap_err();
        assert_eq!(t0.elapsed(), Duration::from_secs(30));
        assert_eq!(e.as_provider().unwrap().kind, ProviderErrorKind::Timeout);
        assert_eq!(sim.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn streams_match_whole_answers_and_can_be_cut() {
        let sim = fast().build().unwrap();
        let cat = Catalog::builtin();
        let m = cat.require("gpt-4o-mini").unwrap();
        let req = ChatRequest::user_text("Explain streaming");
        let whole = sim.chat(ProviderCall::new(&req, m)).await.unwrap();
        let mut s = sim.stream(ProviderCall::new(&req, m)).await.unwrap();
        let mut text = String::new();
        let mut usage = None;
        let mut done = false;
        while let Some(ev) = s.next().await {
            match ev.unwrap() {
                StreamEvent::TextDelta { text: t } => text.push_str(&t),
                StreamEvent::Usage(u) => usage = Some(u),
                StreamEvent::Done(_) => done = true,
                _ => {}
            }
        }
        assert!(done);
        assert_eq!(text, whole.content);
        assert_eq!(usage, Some(whole.usage));

        let sim = fast().cut_stream_after(3).build().unwrap();
        let mut s = sim.stream(ProviderCall::new(&req, m)).await.unwrap();
        let mut n = 0;
        let mut err = None;
        while let Some(ev) = s.next().await {
            match ev {
                Ok(StreamEvent::TextDelta { .. }) => n += 1,
                Ok(StreamEvent::Done(_)) => panic!("a cut stream must not end cleanly"),
                Ok(_) => {}
                Err(e) => err = Some(e),
            }
        }
        assert_eq!(n, 3);
        assert!(matches!(
            err,
            Some(Error::StreamInterrupted { chunks: 3, .. })
        ));
    }
}
