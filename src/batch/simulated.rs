//! A batch API in memory, on tokio time, with injectable failures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{BatchCall, BatchLimits, BatchLine, BatchProvider, BatchResults, BatchState};
use super::{BatchStatus, ItemResult, valid_custom_id};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::provider::SimulatedProvider;
use crate::types::{ChatRequest, ChatResponse, ModelSpec};
use crate::{Error, Result};

/// Builds a [`SimulatedBatch`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SimulatedBatchBuilder {
    name: String,
    latency: Duration,
    limits: BatchLimits,
    expire_first: u32,
    fail_every: Option<u32>,
    malformed_every: Option<u32>,
    max_batches: usize,
    answers: SimulatedProvider,
}

impl SimulatedBatchBuilder {
    /// The provider name it serves (default `simulated`): give it the name of the
    /// catalogue provider whose models it stands in for (`openai`, `anthropic`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How long a batch runs, on tokio time (default 10 minutes).
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// The most one batch may hold (default 1,000 requests, 1 MB).
    pub fn limits(mut self, limits: BatchLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The first `n` batches submitted expire: only their requests at even positions
    /// (0, 2, ...) are answered, the others are reported expired.
    pub fn expire_first(mut self, n: u32) -> Self {
        self.expire_first = n;
        self
    }

    /// Every `n`th request of a batch (by position, from 1) fails with a bad-request
    /// error.
    pub fn fail_every(mut self, n: u32) -> Self {
        self.fail_every = Some(n);
        self
    }

    /// Every `n`th request of a batch (by position, from 1) gets a result line that
    /// cannot be read, so its result is missing.
    pub fn malformed_every(mut self, n: u32) -> Self {
        self.malformed_every = Some(n);
        self
    }

    /// Where answers come from (default [`SimulatedProvider::new`]).
    pub fn answers(mut self, provider: SimulatedProvider) -> Self {
        self.answers = provider;
        self
    }

    /// Builds it, or reports an invalid setting.
    pub fn build(self) -> Result<SimulatedBatch> {
        self.limits.check()?;
        if self.name.trim().is_empty() {
            return Err(Error::Config("simulated batch: the name is empty".into()));
        }
        if self.fail_every == Some(0) || self.malformed_every == Some(0) {
            return Err(Error::Config(
                "simulated batch: `every` must be positive".into(),
            ));
        }
        Ok(SimulatedBatch {
            inner: Arc::new(Inner {
                config: self,
                batches: Mutex::new(HashMap::new()),
                submitted: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                result_reads: AtomicU64::new(0),
                status_reads: AtomicU64::new(0),
            }),
        })
    }
}

/// A batch API in memory: a batch ends [`latency`](SimulatedBatchBuilder::latency)
/// after it was submitted (on tokio time, so paused-time tests run at once), with
/// answers from a [`SimulatedProvider`], and the failures it was told to inject.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> tokenwise::Result<()> {
/// use std::time::Duration;
/// use tokenwise::batch::{BatchCall, BatchProvider, BatchState, ItemResult, SimulatedBatch};
/// use tokenwise::{Catalog, ChatRequest};
///
/// let sim = SimulatedBatch::builder().latency(Duration::from_secs(60)).build()?;
/// let model = Catalog::builtin().resolve("gpt-4o-mini")?;
/// let req = ChatRequest::user_text("hello");
/// let calls = [BatchCall::new("a", &req, &model)];
/// let id = sim.submit(&calls).await?;
/// assert_eq!(sim.status(&id).await?.state, BatchState::Running);
/// tokio::time::sleep(Duration::from_secs(60)).await;
/// assert_eq!(sim.status(&id).await?.state, BatchState::Ended);
/// let results = sim.results(&id, &calls).await?;
/// assert!(matches!(results.lines[0].result, ItemResult::Answer(_)));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SimulatedBatch {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SimulatedBatchBuilder,
    batches: Mutex<HashMap<String, SimBatch>>,
    submitted: AtomicU64,
    requests: AtomicU64,
    result_reads: AtomicU64,
    status_reads: AtomicU64,
}

#[derive(Debug)]
struct SimBatch {
    items: Vec<(String, ChatRequest, ModelSpec)>,
    ends_at: Instant,
    expires: bool,
    cancelled: bool,
}

impl SimulatedBatch {
    /// A builder with the defaults: named `simulated`, 10 minutes a batch, 1,000
    /// requests or 1 MB a batch, no failures.
    pub fn builder() -> SimulatedBatchBuilder {
        SimulatedBatchBuilder {
            name: "simulated".into(),
            latency: Duration::from_secs(600),
            limits: BatchLimits::new(1_000, 1_000_000),
            expire_first: 0,
            fail_every: None,
            malformed_every: None,
            max_batches: 10_000,
            answers: SimulatedProvider::new(),
        }
    }

    /// Batches submitted so far.
    pub fn batches_submitted(&self) -> u64 {
        self.inner.submitted.load(Ordering::Relaxed)
    }

    /// Requests submitted so far, over every batch.
    pub fn requests_submitted(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// How many times results were read.
    pub fn result_reads(&self) -> u64 {
        self.inner.result_reads.load(Ordering::Relaxed)
    }

    /// How many times a batch's status was read.
    pub fn status_reads(&self) -> u64 {
        self.inner.status_reads.load(Ordering::Relaxed)
    }

    fn batches(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimBatch>> {
        match self.inner.batches.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn unknown(&self, id: &str) -> Error {
        ProviderError::new(
            ProviderErrorKind::BadRequest,
            &self.inner.config.name,
            format!("no batch `{id}`"),
        )
        .with_status(404)
        .into()
    }
}

#[async_trait]
impl BatchProvider for SimulatedBatch {
    fn name(&self) -> &str {
        &self.inner.config.name
    }

    fn limits(&self) -> BatchLimits {
        self.inner.config.limits
    }

    fn encode(&self, call: &BatchCall<'_>) -> Result<Vec<u8>> {
        if !valid_custom_id(call.custom_id) {
            return Err(Error::InvalidRequest(format!(
                "invalid batch custom_id `{}`",
                call.custom_id
            )));
        }
        serde_json::to_vec(&serde_json::json!({
            "custom_id": call.custom_id,
            "model": call.model.name,
            "request": call.request,
        }))
        .map_err(|e| Error::InvalidRequest(format!("the request cannot be encoded: {e}")))
    }

    async fn submit(&self, calls: &[BatchCall<'_>]) -> Result<String> {
        let limits = self.inner.config.limits;
        if calls.is_empty() || calls.len() > limits.max_requests {
            return Err(Error::InvalidRequest(format!(
                "a batch holds 1 to {} requests, not {}",
                limits.max_requests,
                calls.len()
            )));
        }
        let mut bytes = 0usize;
        for c in calls {
            bytes += self.encode(c)?.len() + 1;
        }
        if bytes > limits.max_bytes {
            return Err(Error::InvalidRequest(format!(
                "the batch of {bytes} bytes exceeds the limit of {} bytes",
                limits.max_bytes
            )));
        }
        let mut batches = self.batches();
        if batches.len() >= self.inner.config.max_batches {
            return Err(ProviderError::new(
                ProviderErrorKind::RateLimited,
                &self.inner.config.name,
                "too many batches held",
            )
            .into());
        }
        let n = self.inner.submitted.fetch_add(1, Ordering::Relaxed);
        self.inner
            .requests
            .fetch_add(calls.len() as u64, Ordering::Relaxed);
        let id = format!("simbatch_{n}");
        batches.insert(
            id.clone(),
            SimBatch {
                items: calls
                    .iter()
                    .map(|c| (c.custom_id.to_owned(), c.request.clone(), c.model.clone()))
                    .collect(),
                ends_at: Instant::now() + self.inner.config.latency,
                expires: n < u64::from(self.inner.config.expire_first),
                cancelled: false,
            },
        );
        Ok(id)
    }

    async fn status(&self, id: &str) -> Result<BatchStatus> {
        self.inner.status_reads.fetch_add(1, Ordering::Relaxed);
        let batches = self.batches();
        let b = batches.get(id).ok_or_else(|| self.unknown(id))?;
        let total = b.items.len() as u64;
        if Instant::now() < b.ends_at && !b.cancelled {
            return Ok(BatchStatus::new(BatchState::Running, total, 0, 0));
        }
        let state = if b.expires {
            BatchState::Expired
        } else {
            BatchState::Ended
        };
        let failed = self
            .inner
            .config
            .fail_every
            .map_or(0, |n| total / u64::from(n));
        Ok(BatchStatus::new(state, total, total - failed, failed))
    }

    async fn results(&self, id: &str, calls: &[BatchCall<'_>]) -> Result<BatchResults> {
        self.inner.result_reads.fetch_add(1, Ordering::Relaxed);
        let cfg = &self.inner.config;
        let batches = self.batches();
        let b = batches.get(id).ok_or_else(|| self.unknown(id))?;
        if Instant::now() < b.ends_at && !b.cancelled {
            return Err(Error::InvalidRequest(format!("batch `{id}` has not ended")));
        }
        let known: HashMap<&str, ()> = calls.iter().map(|c| (c.custom_id, ())).collect();
        let mut out = BatchResults::default();
        for (pos, (custom_id, req, model)) in b.items.iter().enumerate() {
            let nth = pos as u64 + 1;
            let every = |n: Option<u32>| n.is_some_and(|n| nth.is_multiple_of(u64::from(n)));
            if every(cfg.malformed_every) || !known.contains_key(custom_id.as_str()) {
                out.malformed += 1;
                continue;
            }
            let result = if b.expires && pos % 2 == 1 {
                ItemResult::Expired
            } else if b.cancelled && Instant::now() < b.ends_at {
                ItemResult::Failed(
                    ProviderError::new(ProviderErrorKind::Server, &cfg.name, "cancelled").into(),
                )
            } else if every(cfg.fail_every) {
                ItemResult::Failed(
                    ProviderError::new(
                        ProviderErrorKind::BadRequest,
                        &cfg.name,
                        "the simulated batch refused this request",
                    )
                    .with_status(400)
                    .into(),
                )
            } else {
                let (text, usage, finish) = cfg
                    .answers
                    .answer(crate::provider::ProviderCall::new(req, model));
                ItemResult::Answer(ChatResponse::new(
                    text,
                    &model.name,
                    &cfg.name,
                    usage,
                    finish,
                ))
            };
            out.lines.push(BatchLine::new(custom_id.clone(), result));
        }
        Ok(out)
    }

    async fn cancel(&self, id: &str) -> Result<()> {
        let mut batches = self.batches();
        let b = batches.get_mut(id).ok_or_else(|| self.unknown(id))?;
        b.cancelled = true;
        Ok(())
    }
}
