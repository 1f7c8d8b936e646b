//! Provider batch APIs: work that can wait, at the batch discount.
//!
//! OpenAI's Batch API and Anthropic's Message Batches take many requests at once, answer
//! them within a day (usually much sooner) and bill them at half the usual price. A
//! [`BatchProvider`] speaks one such API:
//!
//! - [`OpenAiBatch`]: uploads a JSONL file, creates a batch, polls it, downloads the
//!   output and error files;
//! - [`AnthropicBatch`]: creates a message batch, polls it, streams its results;
//! - [`SimulatedBatch`]: in memory, its latency on tokio time, with injectable failures
//!   (expired batches, failed items, malformed result lines), for tests and examples.
//!
//! Most code never calls a batch provider directly: give one to
//! [`PipelineBuilder::batch_provider`](crate::PipelineBuilder::batch_provider) and use
//! [`Pipeline::batch`](crate::Pipeline::batch), [`Pipeline::warm`](crate::Pipeline::warm)
//! or [`ChatRequest::deferrable`](crate::ChatRequest::deferrable). Results are priced
//! with [`ModelSpec::batch_cost`](crate::ModelSpec::batch_cost).

mod anthropic;
mod lines;
mod openai;
mod simulated;

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use anthropic::AnthropicBatch;
pub use openai::OpenAiBatch;
pub use simulated::{SimulatedBatch, SimulatedBatchBuilder};

use crate::types::{ChatRequest, ChatResponse, ModelSpec};
use crate::{Error, Result};

/// The most requests and bytes one batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BatchLimits {
    /// Requests in one batch.
    pub max_requests: usize,
    /// Bytes in one batch, counted as the sum over its requests of their encoded length
    /// ([`BatchProvider::encode`]) plus one (the newline or separator): the size of the
    /// JSONL file, or of the request body less its envelope.
    pub max_bytes: usize,
}

impl BatchLimits {
    /// Limits of `max_requests` requests and `max_bytes` bytes.
    pub fn new(max_requests: usize, max_bytes: usize) -> Self {
        BatchLimits {
            max_requests,
            max_bytes,
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.max_requests == 0 || self.max_bytes == 0 {
            return Err(Error::Config("batch limits must be positive".into()));
        }
        Ok(())
    }
}

/// One request of a batch: its id within the batch, the request and the model chosen
/// for it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct BatchCall<'a> {
    /// The request's id within its batch: ASCII letters, digits, `-` and `_`, at most
    /// 64 characters (both providers' rule).
    pub custom_id: &'a str,
    /// The request.
    pub request: &'a ChatRequest,
    /// The model to call.
    pub model: &'a ModelSpec,
}

impl<'a> BatchCall<'a> {
    /// A call of `request` on `model`, known in its batch as `custom_id`.
    pub fn new(custom_id: &'a str, request: &'a ChatRequest, model: &'a ModelSpec) -> Self {
        BatchCall {
            custom_id,
            request,
            model,
        }
    }

    pub(crate) fn provider_call(&self) -> crate::provider::ProviderCall<'a> {
        crate::provider::ProviderCall::new(self.request, self.model)
    }

    /// One line of a batch file: the provider's request body for this call (from
    /// `body`, as the provider writes it for a single call) placed by `line`, after the
    /// custom id is checked.
    pub(crate) fn encode_with(
        &self,
        body: impl FnOnce(&crate::provider::ProviderCall<'a>) -> Result<Vec<u8>>,
        line: impl FnOnce(&str, serde_json::Value) -> serde_json::Value,
    ) -> Result<Vec<u8>> {
        if !valid_custom_id(self.custom_id) {
            return Err(Error::InvalidRequest(format!(
                "invalid batch custom_id `{}`",
                self.custom_id
            )));
        }
        let unencodable = |e: serde_json::Error| {
            Error::InvalidRequest(format!("the request cannot be encoded: {e}"))
        };
        let body = body(&self.provider_call())?;
        let body = serde_json::from_slice(&body).map_err(unencodable)?;
        serde_json::to_vec(&line(self.custom_id, body)).map_err(unencodable)
    }
}

/// Whether `id` is a valid [`BatchCall::custom_id`].
pub fn valid_custom_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Where a batch stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum BatchState {
    /// Queued, validating, running or finalising: poll again later.
    Running,
    /// Done (completed, or cancelled): the results are ready.
    Ended,
    /// Its completion window passed: the results of the requests that finished are
    /// ready, the others are reported [`ItemResult::Expired`] or missing.
    Expired,
    /// The provider refused or lost the whole batch; there are no results.
    Failed(String),
}

impl BatchState {
    /// Whether the batch will not change any more.
    pub fn is_final(&self) -> bool {
        !matches!(self, BatchState::Running)
    }
}

/// A batch's state and request counts, as its provider reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BatchStatus {
    /// Where it stands.
    pub state: BatchState,
    /// Requests in the batch.
    pub total: u64,
    /// Requests answered so far.
    pub succeeded: u64,
    /// Requests failed so far.
    pub failed: u64,
}

impl BatchStatus {
    /// A status.
    pub fn new(state: BatchState, total: u64, succeeded: u64, failed: u64) -> Self {
        BatchStatus {
            state,
            total,
            succeeded,
            failed,
        }
    }
}

/// The result of one request of a batch.
#[derive(Debug)]
#[non_exhaustive]
pub enum ItemResult {
    /// The answer; its `cost` is left to the caller (see
    /// [`ModelSpec::batch_cost`](crate::ModelSpec::batch_cost)).
    Answer(ChatResponse),
    /// The request failed; a malformed result line is an
    /// [`InvalidResponse`](crate::ProviderErrorKind::InvalidResponse).
    Failed(Error),
    /// The batch expired before the request ran.
    Expired,
}

/// One line of a batch's results.
#[derive(Debug)]
#[non_exhaustive]
pub struct BatchLine {
    /// The request it answers.
    pub custom_id: String,
    /// What became of it.
    pub result: ItemResult,
}

impl BatchLine {
    /// A line.
    pub fn new(custom_id: impl Into<String>, result: ItemResult) -> Self {
        BatchLine {
            custom_id: custom_id.into(),
            result,
        }
    }
}

/// A batch's results: one line per request the provider reported on.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct BatchResults {
    /// The lines that name a request of the batch, first one per request.
    pub lines: Vec<BatchLine>,
    /// Lines that could not be read or named no request of the batch; their requests
    /// are missing from `lines`.
    pub malformed: usize,
}

/// One provider's batch API.
///
/// A batch moves through [`submit`](Self::submit) → [`status`](Self::status) until
/// [final](BatchState::is_final) → [`results`](Self::results). Implementations map every
/// failure to a typed [`Error`], never panic on a malformed body, and bound what they
/// read.
#[async_trait]
pub trait BatchProvider: Send + Sync + fmt::Debug {
    /// The provider's name, as used in the catalogue (`openai`, `anthropic`, ...): the
    /// pipeline sends a model's requests to the batch provider of the same name.
    fn name(&self) -> &str;

    /// The most one batch may hold.
    fn limits(&self) -> BatchLimits;

    /// One request as the batch carries it (a JSONL line without its newline, or the
    /// request's entry in the body): its length counts against
    /// [`BatchLimits::max_bytes`].
    fn encode(&self, call: &BatchCall<'_>) -> Result<Vec<u8>>;

    /// Submits `calls` as one batch; returns its id.
    async fn submit(&self, calls: &[BatchCall<'_>]) -> Result<String>;

    /// The batch's state and counts.
    async fn status(&self, id: &str) -> Result<BatchStatus>;

    /// The results of a final batch. `calls` are the requests it was submitted with (by
    /// `custom_id`), for usage counted when the provider reports none.
    async fn results(&self, id: &str, calls: &[BatchCall<'_>]) -> Result<BatchResults>;

    /// Asks the provider to cancel the batch; requests already answered stay answered.
    async fn cancel(&self, id: &str) -> Result<()>;
}
