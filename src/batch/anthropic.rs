//! Anthropic's Message Batches: `POST /v1/messages/batches` with every request in the
//! body, polled, and its results streamed as JSONL.

use async_trait::async_trait;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ItemResult;
use super::lines::{DEFAULT_MAX_RESULTS_BYTES, Gather, malformed, read_lines};
use super::openai::valid_path_part;
use super::{BatchCall, BatchLimits, BatchProvider, BatchResults, BatchState, BatchStatus};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::provider::Anthropic;
use crate::provider::http::classify_payload;
use crate::{Error, Result};

/// Anthropic's documented limits: 100,000 requests and 256 MB (less the body's
/// envelope, which the measure of [`BatchLimits::max_bytes`] leaves out).
const ANTHROPIC_LIMITS: BatchLimits = BatchLimits {
    max_requests: 100_000,
    max_bytes: 256 * 1_000_000 - 64,
};

/// The batch client for Anthropic's Message Batches, over an [`Anthropic`] provider:
/// the same base URL, key, version header, deadlines and request encoding.
///
/// - [`submit`](BatchProvider::submit): `POST {base}/v1/messages/batches`;
/// - [`status`](BatchProvider::status): `GET {base}/v1/messages/batches/{id}`;
/// - [`results`](BatchProvider::results): `GET {base}/v1/messages/batches/{id}/results`,
///   read line by line as it arrives, within
///   [`max_results_bytes`](Self::max_results_bytes). The key is only ever sent to the
///   configured base URL, whatever `results_url` the API reports;
/// - [`cancel`](BatchProvider::cancel): `POST {base}/v1/messages/batches/{id}/cancel`.
#[derive(Debug, Clone)]
pub struct AnthropicBatch {
    provider: Anthropic,
    limits: BatchLimits,
    max_results_bytes: u64,
}

impl AnthropicBatch {
    /// A batch client over `provider`, with Anthropic's limits (100,000 requests,
    /// 256 MB).
    pub fn new(provider: Anthropic) -> Self {
        AnthropicBatch {
            provider,
            limits: ANTHROPIC_LIMITS,
            max_results_bytes: DEFAULT_MAX_RESULTS_BYTES,
        }
    }

    /// Smaller batches than Anthropic allows (both limits must be positive).
    pub fn limits(mut self, limits: BatchLimits) -> Result<Self> {
        limits.check()?;
        self.limits = limits;
        Ok(self)
    }

    /// The most bytes read from one batch's results (default 512 MiB).
    pub fn max_results_bytes(mut self, n: u64) -> Result<Self> {
        if n == 0 {
            return Err(Error::Config("max_results_bytes must be positive".into()));
        }
        self.max_results_bytes = n;
        Ok(self)
    }

    fn core(&self) -> &crate::provider::http::HttpCore {
        self.provider.core()
    }

    fn invalid(&self, what: String) -> Error {
        self.core()
            .error(ProviderErrorKind::InvalidResponse, what)
            .into()
    }

    async fn json(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Value> {
        let core = self.core();
        let body = body.map(|b| ("application/json", b));
        let (mut resp, sent) = core
            .send(method, path, "batch", body, "application/json", 0)
            .await?;
        let status = resp.status().as_u16();
        let bytes = core.read_body(&mut resp, &sent).await?;
        Ok(core.parse_json(status, &bytes)?)
    }

    fn path(&self, id: &str, rest: &str) -> Result<String> {
        if !valid_path_part(id) {
            return Err(Error::InvalidRequest(format!("invalid batch id `{id}`")));
        }
        Ok(format!("/v1/messages/batches/{id}{rest}"))
    }

    fn read_line(&self, name: &str, call: &BatchCall<'_>, v: &Value) -> ItemResult {
        let Some(result) = v.get("result").filter(|r| r.is_object()) else {
            return malformed(name, "no result");
        };
        match result.get("type").and_then(Value::as_str) {
            Some("succeeded") => {
                let Some(message) = result.get("message").filter(|m| m.is_object()) else {
                    return malformed(name, "a succeeded result without a message");
                };
                match self
                    .provider
                    .parse_response(&call.provider_call(), message.clone(), 200)
                {
                    Ok((r, reported)) => ItemResult::Answer(with_usage(r, reported, call)),
                    Err(e) => ItemResult::Failed(e.into()),
                }
            }
            Some("errored") => {
                // `error` is the API's error body: {"type": "error", "error": {..}}
                let body = result.get("error").cloned().unwrap_or(Value::Null);
                let body = if body.get("error").is_some() {
                    body
                } else {
                    json!({ "error": body })
                };
                ItemResult::Failed(classify_payload(name, &body).into())
            }
            Some("expired") => ItemResult::Expired,
            Some("canceled") => ItemResult::Failed(
                ProviderError::new(
                    ProviderErrorKind::Server,
                    name,
                    "the batch was cancelled before this request ran",
                )
                .into(),
            ),
            other => malformed(name, format!("unknown result type {other:?}")),
        }
    }
}

#[derive(Deserialize)]
struct WireBatch {
    id: Option<String>,
    processing_status: Option<String>,
    #[serde(default)]
    request_counts: Option<WireCounts>,
}

#[derive(Deserialize, Default)]
struct WireCounts {
    #[serde(default)]
    processing: u64,
    #[serde(default)]
    succeeded: u64,
    #[serde(default)]
    errored: u64,
    #[serde(default)]
    canceled: u64,
    #[serde(default)]
    expired: u64,
}

#[async_trait]
impl BatchProvider for AnthropicBatch {
    fn name(&self) -> &str {
        &self.core().name
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn encode(&self, call: &BatchCall<'_>) -> Result<Vec<u8>> {
        call.encode_with(
            |c| self.provider.body(c, false),
            |id, params| json!({ "custom_id": id, "params": params }),
        )
    }

    async fn submit(&self, calls: &[BatchCall<'_>]) -> Result<String> {
        if calls.is_empty() || calls.len() > self.limits.max_requests {
            return Err(Error::InvalidRequest(format!(
                "a batch holds 1 to {} requests, not {}",
                self.limits.max_requests,
                calls.len()
            )));
        }
        let mut body = b"{\"requests\":[".to_vec();
        let mut measured = 0usize;
        for (i, c) in calls.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            let entry = self.encode(c)?;
            measured += entry.len() + 1;
            body.extend_from_slice(&entry);
        }
        body.extend_from_slice(b"]}");
        if measured > self.limits.max_bytes {
            return Err(Error::InvalidRequest(format!(
                "the batch of {measured} bytes exceeds the limit of {} bytes",
                self.limits.max_bytes
            )));
        }
        let created = self
            .json(Method::POST, "/v1/messages/batches", Some(body))
            .await?;
        match created.get("id").and_then(Value::as_str) {
            Some(id) if valid_path_part(id) => Ok(id.to_owned()),
            _ => Err(self.invalid("the created batch has no valid id".into())),
        }
    }

    async fn status(&self, id: &str) -> Result<BatchStatus> {
        let v = self.json(Method::GET, &self.path(id, "")?, None).await?;
        let b: WireBatch = serde_json::from_value(v)
            .map_err(|e| self.invalid(format!("unexpected batch shape: {e}")))?;
        if b.id.as_deref().is_some_and(|got| got != id) {
            return Err(self.invalid(format!("asked for batch {id}, got another")));
        }
        let c = b.request_counts.unwrap_or_default();
        let state = match b.processing_status.as_deref() {
            Some("in_progress" | "canceling") => BatchState::Running,
            // An ended batch whose requests expired is reported as expired, so the
            // caller knows some never ran.
            Some("ended") if c.expired > 0 => BatchState::Expired,
            Some("ended") => BatchState::Ended,
            other => {
                return Err(self.invalid(format!(
                    "unknown processing status {:?}",
                    other.unwrap_or("<none>")
                )));
            }
        };
        let total = c.processing + c.succeeded + c.errored + c.canceled + c.expired;
        Ok(BatchStatus::new(
            state,
            total,
            c.succeeded,
            c.errored + c.canceled + c.expired,
        ))
    }

    async fn results(&self, id: &str, calls: &[BatchCall<'_>]) -> Result<BatchResults> {
        let path = self.path(id, "/results")?;
        let core = self.core();
        let (mut resp, sent) = core
            .send(
                Method::GET,
                &path,
                "batch",
                None,
                "application/x-jsonl, application/json",
                0,
            )
            .await?;
        let name = core.name.clone();
        let mut gather = Gather::new(calls);
        read_lines(core, &mut resp, &sent, self.max_results_bytes, |line| {
            gather.line(line, |call, v| self.read_line(&name, call, v));
        })
        .await?;
        Ok(gather.out)
    }

    async fn cancel(&self, id: &str) -> Result<()> {
        self.json(Method::POST, &self.path(id, "/cancel")?, None)
            .await
            .map(drop)
    }
}

/// A batch answer with the usage its result reported, or, when it reported none, the
/// prompt and answer counted locally (capped, marked estimated).
fn with_usage(
    mut r: crate::types::ChatResponse,
    reported: Option<crate::types::Usage>,
    call: &BatchCall<'_>,
) -> crate::types::ChatResponse {
    r.usage = reported.unwrap_or_else(|| {
        let counter = crate::context::TiktokenCounter::new();
        crate::provider::http::count_usage(&counter, call.request, &r.content, call.model.tokenizer)
    });
    r
}
