//! OpenAI's Batch API: a JSONL file of chat completion requests, uploaded to `/files`,
//! run by `/batches`, answered in an output file and an error file.

use async_trait::async_trait;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ItemResult;
use super::lines::{DEFAULT_MAX_RESULTS_BYTES, Gather, malformed, read_lines};
use super::{BatchCall, BatchLimits, BatchProvider, BatchResults, BatchState, BatchStatus};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::provider::OpenAiCompatible;
use crate::provider::http::classify_payload;
use crate::{Error, Result};

/// OpenAI's documented limits: 50,000 requests and a 200 MB input file.
const OPENAI_LIMITS: BatchLimits = BatchLimits {
    max_requests: 50_000,
    max_bytes: 200 * 1_000_000,
};

/// The batch client for OpenAI (and servers that copy its Batch API), over an
/// [`OpenAiCompatible`] provider: the same base URL, keys, headers, deadlines and
/// request encoding.
///
/// - [`submit`](BatchProvider::submit): `POST {base}/files` (multipart, purpose
///   `batch`), then `POST {base}/batches` for `/v1/chat/completions` within `24h`;
/// - [`status`](BatchProvider::status): `GET {base}/batches/{id}`;
/// - [`results`](BatchProvider::results): `GET {base}/files/{id}/content` for the
///   output file and the error file, read line by line within
///   [`max_results_bytes`](Self::max_results_bytes);
/// - [`cancel`](BatchProvider::cancel): `POST {base}/batches/{id}/cancel`.
///
/// ```
/// use tokenwise::batch::OpenAiBatch;
/// use tokenwise::provider::OpenAiCompatible;
/// let openai = OpenAiCompatible::builder().api_key("sk-test").build().unwrap();
/// let batch = OpenAiBatch::new(openai);
/// # let _ = batch;
/// ```
#[derive(Debug, Clone)]
pub struct OpenAiBatch {
    provider: OpenAiCompatible,
    limits: BatchLimits,
    max_results_bytes: u64,
    completion_window: String,
}

impl OpenAiBatch {
    /// A batch client over `provider`, with OpenAI's limits (50,000 requests, 200 MB).
    pub fn new(provider: OpenAiCompatible) -> Self {
        OpenAiBatch {
            provider,
            limits: OPENAI_LIMITS,
            max_results_bytes: DEFAULT_MAX_RESULTS_BYTES,
            completion_window: "24h".into(),
        }
    }

    /// Smaller batches than OpenAI allows (both limits must be positive).
    pub fn limits(mut self, limits: BatchLimits) -> Result<Self> {
        limits.check()?;
        self.limits = limits;
        Ok(self)
    }

    /// The most bytes read from one batch's result files (default 512 MiB).
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

    fn invalid(&self, status: u16, what: String) -> Error {
        self.core()
            .error(ProviderErrorKind::InvalidResponse, what)
            .with_status(status)
            .into()
    }

    /// Sends a request and reads its JSON answer.
    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Value> {
        let core = self.core();
        let (mut resp, sent) = core
            .send(method, path, "batch", body, "application/json", 0)
            .await?;
        let status = resp.status().as_u16();
        let bytes = core.read_body(&mut resp, &sent).await?;
        Ok(core.parse_json(status, &bytes)?)
    }

    /// Reads the lines of file `file_id` into `gather`.
    async fn read_file(
        &self,
        file_id: &str,
        gather: &mut Gather<'_, '_>,
        budget: &mut u64,
    ) -> Result<()> {
        if !valid_path_part(file_id) {
            return Err(self.invalid(200, format!("invalid file id `{file_id}`")));
        }
        let core = self.core();
        let (mut resp, sent) = core
            .send(
                Method::GET,
                &format!("/files/{file_id}/content"),
                "batch",
                None,
                "application/jsonl, application/json",
                0,
            )
            .await?;
        let name = core.name.clone();
        let mut used = 0u64;
        let cap = *budget;
        read_lines(core, &mut resp, &sent, cap, |line| {
            used += line.len() as u64 + 1;
            gather.line(line, |call, v| self.read_line(&name, call, v));
        })
        .await?;
        *budget = budget.saturating_sub(used);
        Ok(())
    }

    fn read_line(&self, name: &str, call: &BatchCall<'_>, v: &Value) -> ItemResult {
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            let code = err.get("code").and_then(Value::as_str).unwrap_or_default();
            if code == "batch_expired" {
                return ItemResult::Expired;
            }
            if code == "batch_cancelled" {
                return ItemResult::Failed(
                    ProviderError::new(ProviderErrorKind::Server, name, "the batch was cancelled")
                        .into(),
                );
            }
            return ItemResult::Failed(classify_payload(name, &json!({ "error": err })).into());
        }
        let Some(resp) = v.get("response").filter(|r| r.is_object()) else {
            return malformed(name, "no response and no error");
        };
        let status = resp
            .get("status_code")
            .and_then(Value::as_u64)
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(200);
        let Some(body) = resp.get("body").filter(|b| b.is_object()) else {
            return malformed(name, "the response has no body");
        };
        if !(200..300).contains(&status) || body.get("error").is_some_and(|e| !e.is_null()) {
            return ItemResult::Failed(classify_payload(name, body).with_status(status).into());
        }
        match self
            .provider
            .parse_response(&call.provider_call(), body.clone(), status)
        {
            Ok((r, reported)) => ItemResult::Answer(with_usage(r, reported, call)),
            Err(e) => ItemResult::Failed(e.into()),
        }
    }
}

/// Whether an id from the API is safe to put in a URL path.
pub(super) fn valid_path_part(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[derive(Deserialize)]
struct WireBatch {
    id: Option<String>,
    status: Option<String>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    #[serde(default)]
    request_counts: Option<WireCounts>,
    #[serde(default)]
    errors: Option<Value>,
}

#[derive(Deserialize, Default)]
struct WireCounts {
    #[serde(default)]
    total: u64,
    #[serde(default)]
    completed: u64,
    #[serde(default)]
    failed: u64,
}

/// A multipart/form-data body of the `purpose` field and the `file` part.
fn multipart(file: &[u8]) -> (String, Vec<u8>) {
    let digest = blake3::hash(file).to_hex();
    let mut boundary = format!("tokenwise-{}", &digest[..32]);
    let mut n = 0u32;
    while file
        .windows(boundary.len())
        .any(|w| w == boundary.as_bytes())
    {
        n += 1;
        boundary = format!("tokenwise-{}-{n}", &digest[..32]);
    }
    let mut body = Vec::with_capacity(file.len() + 400);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[async_trait]
impl BatchProvider for OpenAiBatch {
    fn name(&self) -> &str {
        &self.core().name
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn encode(&self, call: &BatchCall<'_>) -> Result<Vec<u8>> {
        call.encode_with(
            |c| self.provider.body(c, false),
            |id, body| {
                json!({
                    "custom_id": id,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                })
            },
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
        let mut file = Vec::new();
        for c in calls {
            file.extend_from_slice(&self.encode(c)?);
            file.push(b'\n');
        }
        if file.len() > self.limits.max_bytes {
            return Err(Error::InvalidRequest(format!(
                "the batch file of {} bytes exceeds the limit of {} bytes",
                file.len(),
                self.limits.max_bytes
            )));
        }
        let (content_type, body) = multipart(&file);
        let uploaded = self
            .json(Method::POST, "/files", Some((&content_type, body)))
            .await?;
        let Some(file_id) = uploaded.get("id").and_then(Value::as_str) else {
            return Err(self.invalid(200, "the uploaded file has no id".into()));
        };
        let req = serde_json::to_vec(&json!({
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": self.completion_window,
        }))
        .map_err(|e| Error::InvalidRequest(format!("the batch cannot be encoded: {e}")))?;
        let created = self
            .json(Method::POST, "/batches", Some(("application/json", req)))
            .await?;
        match created.get("id").and_then(Value::as_str) {
            Some(id) if valid_path_part(id) => Ok(id.to_owned()),
            _ => Err(self.invalid(200, "the created batch has no valid id".into())),
        }
    }

    async fn status(&self, id: &str) -> Result<BatchStatus> {
        let b = self.batch(id).await?;
        let counts = b.request_counts.unwrap_or_default();
        let state = match b.status.as_deref() {
            Some("validating" | "in_progress" | "finalizing" | "cancelling") => BatchState::Running,
            Some("completed" | "cancelled") => BatchState::Ended,
            Some("expired") => BatchState::Expired,
            Some("failed") => BatchState::Failed(
                b.errors
                    .as_ref()
                    .and_then(|e| e.get("data"))
                    .and_then(Value::as_array)
                    .and_then(|d| d.first())
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("the batch failed")
                    .to_owned(),
            ),
            other => {
                return Err(self.invalid(
                    200,
                    format!("unknown batch status {:?}", other.unwrap_or("<none>")),
                ));
            }
        };
        Ok(BatchStatus::new(
            state,
            counts.total,
            counts.completed,
            counts.failed,
        ))
    }

    async fn results(&self, id: &str, calls: &[BatchCall<'_>]) -> Result<BatchResults> {
        let b = self.batch(id).await?;
        let mut gather = Gather::new(calls);
        let mut budget = self.max_results_bytes;
        for file in [&b.output_file_id, &b.error_file_id].into_iter().flatten() {
            self.read_file(file, &mut gather, &mut budget).await?;
        }
        Ok(gather.out)
    }

    async fn cancel(&self, id: &str) -> Result<()> {
        if !valid_path_part(id) {
            return Err(Error::InvalidRequest(format!("invalid batch id `{id}`")));
        }
        self.json(Method::POST, &format!("/batches/{id}/cancel"), None)
            .await
            .map(drop)
    }
}

impl OpenAiBatch {
    async fn batch(&self, id: &str) -> Result<WireBatch> {
        if !valid_path_part(id) {
            return Err(Error::InvalidRequest(format!("invalid batch id `{id}`")));
        }
        let v = self
            .json(Method::GET, &format!("/batches/{id}"), None)
            .await?;
        let b: WireBatch = serde_json::from_value(v)
            .map_err(|e| self.invalid(200, format!("unexpected batch shape: {e}")))?;
        if b.id.as_deref().is_some_and(|got| got != id) {
            return Err(self.invalid(200, format!("asked for batch {id}, got another")));
        }
        Ok(b)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::valid_custom_id;

    #[test]
    fn the_multipart_boundary_never_occurs_in_the_file() {
        let file = b"{\"custom_id\":\"a\"}\n".to_vec();
        let (ct, body) = multipart(&file);
        let boundary = ct.split("boundary=").nth(1).unwrap().to_owned();
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("name=\"purpose\"\r\n\r\nbatch\r\n"));
        assert!(text.ends_with(&format!("\r\n--{boundary}--\r\n")));
        // a file that holds the first boundary gets another one
        let mut tricky = file.clone();
        tricky.extend_from_slice(boundary.as_bytes());
        let (ct2, _) = multipart(&tricky);
        let b2 = ct2.split("boundary=").nth(1).unwrap();
        assert!(!tricky.windows(b2.len()).any(|w| w == b2.as_bytes()));
    }

    #[test]
    fn ids_are_checked_before_they_reach_a_path() {
        assert!(valid_path_part("batch_abc-123.x"));
        assert!(!valid_path_part("../files"));
        assert!(!valid_path_part("a/b"));
        assert!(!valid_path_part(""));
        assert!(valid_custom_id("tw-000001"));
        assert!(!valid_custom_id("has space"));
        assert!(!valid_custom_id(&"x".repeat(65)));
    }
}
