//! Exact token counts for Claude models from Anthropic's token-counting endpoint.

use std::fmt;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

use super::{TiktokenCounter, TokenCounter};
use crate::provider::ApiKey;
use crate::types::{ChatRequest, TokenizerKind};
use crate::{Error, Result};

/// The largest answer read from the endpoint.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The most calls to the endpoint one [`ClaudeTokenCounter::prepare`] has in flight.
const PARALLEL_CALLS: usize = 4;

/// A text's hash and length.
type TextKey = (u64, usize);

/// Token counts for Claude models from Anthropic's `POST /v1/messages/count_tokens`,
/// with the local estimate (`cl100k_base` + 10 %) as the fallback.
///
/// [`TokenCounter`] is synchronous and counts run inside the pipeline, so the endpoint
/// is asked ahead of time: [`prepare`](Self::prepare) counts each of the request's texts
/// not counted yet, one call per text, and caches the result (bounded, least recently
/// used out). [`count_text`] then answers from the cache for `ClaudeApprox`, else falls
/// back to the estimate; OpenAI tokenizers are counted locally as always. Give it to the
/// pipeline with [`PipelineBuilder::token_counter`](crate::PipelineBuilder::token_counter)
/// and the pipeline calls `prepare` by itself before planning each request that may go
/// to a Claude model, so admission estimates, reservations and context fitting use the
/// exact counts; a failing endpoint leaves them on the estimate.
///
/// A text's count is the endpoint's count for a one-message request holding it, less
/// that request's fixed overhead (measured once, with a one-token text).
///
/// [`count_text`]: TokenCounter::count_text
pub struct ClaudeTokenCounter {
    client: reqwest::Client,
    url: String,
    key: ApiKey,
    version: String,
    model: String,
    timeout: Duration,
    local: TiktokenCounter,
    cache: Mutex<lru::LruCache<TextKey, u64>>,
    overhead: Mutex<Option<u64>>,
    hasher: hashbrown::DefaultHashBuilder,
    rest: Duration,
    failed_at: Mutex<Option<tokio::time::Instant>>,
}

impl fmt::Debug for ClaudeTokenCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaudeTokenCounter")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("cached", &self.cached())
            .finish_non_exhaustive()
    }
}

impl ClaudeTokenCounter {
    /// A counter for `model` against `base_url` (e.g. `https://api.anthropic.com`),
    /// caching up to 65,536 counts.
    pub fn new(base_url: &str, key: ApiKey, model: impl Into<String>) -> Result<Self> {
        let client = crate::provider::http_client_builder()?
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Self::with_client(client, base_url, key, model))
    }

    /// Like [`new`](Self::new), with a client of your own.
    pub fn with_client(
        client: reqwest::Client,
        base_url: &str,
        key: ApiKey,
        model: impl Into<String>,
    ) -> Self {
        ClaudeTokenCounter {
            client,
            url: format!(
                "{}/v1/messages/count_tokens",
                base_url.trim_end_matches('/')
            ),
            key,
            version: crate::provider::ANTHROPIC_VERSION.to_owned(),
            model: model.into(),
            timeout: Duration::from_secs(10),
            local: TiktokenCounter::new(),
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(65_536).unwrap_or(NonZeroUsize::MIN),
            )),
            overhead: Mutex::new(None),
            hasher: Default::default(),
            rest: Duration::from_secs(30),
            failed_at: Mutex::new(None),
        }
    }

    /// Caches up to `capacity` counts.
    #[must_use]
    pub fn capacity(self, capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = lru::LruCache::new(cap);
        self
    }

    /// The deadline of one call to the endpoint (default 10 s).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long [`prepare`](Self::prepare) leaves the endpoint alone after it failed
    /// (default 30 s): meanwhile requests are planned on the estimate at once, rather
    /// than each waiting for a failing endpoint.
    #[must_use]
    pub fn rest_after_failure(mut self, rest: Duration) -> Self {
        self.rest = rest;
        self
    }

    /// Counts cached.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn key_of(&self, text: &str) -> TextKey {
        (self.hasher.hash_one(text), text.len())
    }

    /// The cached exact count of `text`, if any.
    pub fn exact(&self, text: &str) -> Option<u64> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.key_of(text))
            .copied()
    }

    async fn call(&self, text: &str) -> Result<u64> {
        let body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
        });
        let backend = |m: String| Error::Backend {
            component: "anthropic count_tokens",
            source: m.into(),
        };
        let resp = self
            .client
            .post(&self.url)
            .header("x-api-key", self.key.expose_secret())
            .header("anthropic-version", &self.version)
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| backend(format!("request failed: {}", e.without_url())))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(backend(format!("status {status}")));
        }
        let mut resp = resp;
        let mut bytes = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| backend(format!("unreadable answer: {}", e.without_url())))?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(backend("the answer is too large".into()));
            }
            bytes.extend_from_slice(&chunk);
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| backend(format!("the answer is not JSON: {e}")))?;
        v.get("input_tokens")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| backend("the answer has no input_tokens".into()))
    }

    /// The exact count of `text`, from the cache or the endpoint.
    pub async fn count_exact(&self, text: &str) -> Result<u64> {
        if text.is_empty() {
            return Ok(0);
        }
        if let Some(n) = self.exact(text) {
            return Ok(n);
        }
        let overhead = self.overhead().await?;
        let n = match self.call(text).await {
            Ok(n) => n.saturating_sub(overhead),
            Err(e) => {
                self.note_failure();
                return Err(e);
            }
        };
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(self.key_of(text), n);
        Ok(n)
    }

    /// The fixed overhead of a one-message request, measured once.
    async fn overhead(&self) -> Result<u64> {
        let known = *self.overhead.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = known {
            return Ok(o);
        }
        let o = match self.call("x").await {
            Ok(n) => n.saturating_sub(1),
            Err(e) => {
                self.note_failure();
                return Err(e);
            }
        };
        *self.overhead.lock().unwrap_or_else(|p| p.into_inner()) = Some(o);
        Ok(o)
    }

    fn note_failure(&self) {
        *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::time::Instant::now());
    }

    /// Whether the endpoint failed less than the rest period ago.
    fn resting(&self) -> bool {
        self.failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < self.rest)
    }

    /// Counts every text of `req` not counted yet (messages, tool calls, documents, tool
    /// definitions), up to four calls at a time. Returns how many texts fell back to the
    /// estimate because the endpoint failed: the first failure ends the round (later
    /// texts are estimated too), and for the [rest period](Self::rest_after_failure)
    /// after a failure the endpoint is not called at all.
    pub async fn prepare(&self, req: &ChatRequest) -> usize {
        use futures_util::StreamExt;

        let mut texts: Vec<&str> = Vec::new();
        for m in &req.messages {
            texts.push(&m.content);
            for c in &m.tool_calls {
                texts.push(&c.name);
                texts.push(&c.arguments);
            }
        }
        texts.extend(req.documents.iter().map(|d| d.text.as_str()));
        let schemas: Vec<String> = req
            .params
            .tools
            .iter()
            .map(|t| t.parameters.to_string())
            .collect();
        for (t, schema) in req.params.tools.iter().zip(&schemas) {
            texts.push(&t.name);
            texts.push(&t.description);
            texts.push(schema);
        }
        texts.retain(|t| !t.is_empty() && self.exact(t).is_none());
        texts.sort_unstable();
        texts.dedup();
        if texts.is_empty() {
            return 0;
        }
        if self.resting() {
            return texts.len();
        }
        if let Err(e) = self.overhead().await {
            tracing::debug!(error = %e, "token counting endpoint failed; estimating");
            return texts.len();
        }
        let mut counted = 0;
        // the futures are built up front (not by a lazy map), so that the stream's type
        // holds no closure over borrowed texts, which a `Send` future cannot name
        let pending: Vec<_> = texts.iter().map(|t| self.count_exact(t)).collect();
        let mut calls = futures_util::stream::iter(pending).buffer_unordered(PARALLEL_CALLS);
        while let Some(r) = calls.next().await {
            match r {
                Ok(_) => counted += 1,
                Err(e) => {
                    tracing::debug!(error = %e, "token counting endpoint failed; estimating");
                    break;
                }
            }
        }
        texts.len() - counted
    }
}

#[async_trait::async_trait]
impl TokenCounter for ClaudeTokenCounter {
    /// `true` for Claude models (`ClaudeApprox`): a pipeline counts their requests'
    /// texts with the endpoint before planning.
    fn prepares_for(&self, tokenizer: TokenizerKind) -> bool {
        tokenizer == TokenizerKind::ClaudeApprox
    }

    /// As [`ClaudeTokenCounter::prepare`].
    async fn prepare(&self, request: &ChatRequest) -> usize {
        ClaudeTokenCounter::prepare(self, request).await
    }

    fn count_text(&self, text: &str, tokenizer: TokenizerKind) -> u64 {
        match tokenizer {
            TokenizerKind::ClaudeApprox => self
                .exact(text)
                .unwrap_or_else(|| self.local.count_text(text, tokenizer)),
            _ => self.local.count_text(text, tokenizer),
        }
    }
}
