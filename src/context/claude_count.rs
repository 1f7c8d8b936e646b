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

/// A text's hash and length.
type TextKey = (u64, usize);

/// Token counts for Claude models from Anthropic's `POST /v1/messages/count_tokens`,
/// with the local estimate (`cl100k_base` + 10 %) as the fallback.
///
/// [`TokenCounter`] is synchronous and counts run inside the pipeline, so the endpoint
/// is asked ahead of time: [`prepare`](Self::prepare) (awaited before a request is
/// sent) counts each of the request's texts not counted yet, one call per text, and
/// caches the result (bounded, least recently used out). [`count_text`] then answers
/// from the cache for `ClaudeApprox`, else falls back to the estimate; OpenAI tokenizers
/// are counted locally as always. Give it to the pipeline with
/// [`PipelineBuilder::token_counter`](crate::PipelineBuilder::token_counter), so admission estimates,
/// reservations and context fitting use the exact counts.
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
        let known = *self.overhead.lock().unwrap_or_else(|p| p.into_inner());
        let overhead = match known {
            Some(o) => o,
            None => {
                let o = self.call("x").await?.saturating_sub(1);
                *self.overhead.lock().unwrap_or_else(|p| p.into_inner()) = Some(o);
                o
            }
        };
        let n = self.call(text).await?.saturating_sub(overhead);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(self.key_of(text), n);
        Ok(n)
    }

    /// Counts every text of `req` not counted yet (messages, tool calls, documents, tool
    /// definitions). Returns how many texts fell back to the estimate because the
    /// endpoint failed (the first failure ends the round: later texts are estimated too).
    pub async fn prepare(&self, req: &ChatRequest) -> usize {
        let mut texts: Vec<String> = Vec::new();
        for m in &req.messages {
            texts.push(m.content.clone());
            for c in &m.tool_calls {
                texts.push(c.name.clone());
                texts.push(c.arguments.clone());
            }
        }
        texts.extend(req.documents.iter().map(|d| d.text.clone()));
        for t in &req.params.tools {
            texts.push(t.name.clone());
            texts.push(t.description.clone());
            texts.push(t.parameters.to_string());
        }
        texts.retain(|t| !t.is_empty() && self.exact(t).is_none());
        texts.sort_unstable();
        texts.dedup();
        for (i, t) in texts.iter().enumerate() {
            if let Err(e) = self.count_exact(t).await {
                tracing::debug!(error = %e, "token counting endpoint failed; estimating");
                return texts.len() - i;
            }
        }
        0
    }
}

impl TokenCounter for ClaudeTokenCounter {
    fn count_text(&self, text: &str, tokenizer: TokenizerKind) -> u64 {
        match tokenizer {
            TokenizerKind::ClaudeApprox => self
                .exact(text)
                .unwrap_or_else(|| self.local.count_text(text, tokenizer)),
            _ => self.local.count_text(text, tokenizer),
        }
    }
}
