//! The OpenAI chat completions API, and the many servers that speak it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::IgnoredAny;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Value, json};

use super::http::{
    Asked, Auth, EventError, HttpCore, HttpSettings, StreamEnding, Translate, classify_payload,
    documents_text, http_builder_methods, http_provider_accessors, replay, sse_stream,
};
use super::keys::ApiKey;
use super::sse::SseEvent;
use super::{Provider, ProviderCall};
use crate::cache::Embedder;
use crate::error::{ProviderError, ProviderErrorKind};
use crate::types::{
    ChatResponse, ChatStream, FinishReason, ResponseFormat, Role, StreamEvent, ToolCall,
    ToolCallDelta, Usage,
};
use crate::{Error, Result};

/// OpenAI's API base URL.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// Which request field carries the output token limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MaxTokensField {
    /// `max_completion_tokens`: OpenAI's current field, required by its reasoning models,
    /// and understood by recent vLLM, Groq, OpenRouter and LiteLLM.
    #[default]
    MaxCompletionTokens,
    /// `max_tokens`: the older field, for servers that know only it.
    MaxTokens,
}

/// Builds an [`OpenAiCompatible`] provider.
#[derive(Debug, Clone)]
#[must_use]
pub struct OpenAiCompatibleBuilder {
    http: HttpSettings,
    max_tokens_field: MaxTokensField,
    stream_usage: bool,
    prompt_cache_key: bool,
}

impl OpenAiCompatibleBuilder {
    http_builder_methods!();

    /// Which field carries `max_tokens` (default `max_completion_tokens`).
    pub fn max_tokens_field(mut self, field: MaxTokensField) -> Self {
        self.max_tokens_field = field;
        self
    }

    /// Whether streamed requests ask for usage with `stream_options.include_usage`
    /// (default on). Turn it off for a server that rejects the option; usage is then
    /// counted with the tokenizer and marked estimated.
    pub fn stream_usage(mut self, on: bool) -> Self {
        self.stream_usage = on;
        self
    }

    /// Whether requests with a stable prefix (system messages, tools or documents) carry
    /// a `prompt_cache_key` (default on): the same for one tenant (`meta.org`, else
    /// `meta.user`) and prefix, so that the provider serves them from one prompt cache.
    /// Turn it off for a server that rejects unknown fields.
    pub fn prompt_cache_key(mut self, on: bool) -> Self {
        self.prompt_cache_key = on;
        self
    }

    /// Sends the key as the raw value of header `name` (Azure OpenAI's `api-key`, say)
    /// instead of `Authorization: Bearer`.
    pub fn api_key_header(mut self, name: &str) -> Self {
        match reqwest::header::HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => self.http.auth = Auth::Header(n),
            Err(_) => self.http.fail(format!("invalid header name `{name}`")),
        }
        self
    }

    /// Builds the provider, or reports the first invalid setting. No key is required:
    /// local servers (Ollama, llama.cpp, vLLM) usually need none.
    pub fn build(self) -> Result<OpenAiCompatible> {
        let core = self.http.build(false)?;
        Ok(OpenAiCompatible {
            inner: Arc::new(Inner {
                core: Arc::new(core),
                max_tokens_field: self.max_tokens_field,
                stream_usage: self.stream_usage,
                prompt_cache_key: self.prompt_cache_key,
            }),
        })
    }
}

struct Inner {
    core: Arc<HttpCore>,
    max_tokens_field: MaxTokensField,
    stream_usage: bool,
    prompt_cache_key: bool,
}

/// A provider for the OpenAI chat completions API and every server that speaks it:
/// OpenAI itself, vLLM, Ollama, llama.cpp's server, LiteLLM, OpenRouter, Groq and the
/// like. Point [`base_url`](OpenAiCompatibleBuilder::base_url) at the server (up to and
/// including `/v1`); requests go to `{base_url}/chat/completions` and
/// `{base_url}/embeddings`.
///
/// - Whole and streamed answers (SSE, with `stream_options.include_usage`), tool calls
///   and their deltas, response formats (JSON object, JSON schema), `/v1/embeddings`.
/// - Every failure is a [`ProviderError`] of the right kind: see the
///   [provider docs](crate::provider#errors).
/// - Keys in a [`KeyPool`](super::KeyPool): requests take turns over the ready keys; a key that gets a
///   429 rests until its Retry-After.
/// - [`Deadlines`](super::Deadlines) for connect, first byte / first token, idle and
///   total; caps on body, event and stream sizes.
///
/// Cheap to clone; clones share the connection pool and the key pool.
///
/// ```no_run
/// # async fn demo() -> tokenwise::Result<()> {
/// use tokenwise::provider::OpenAiCompatible;
/// use tokenwise::{ChatRequest, Pipeline};
///
/// let openai = OpenAiCompatible::builder()
///     .api_key(std::env::var("OPENAI_API_KEY").unwrap_or_default())
///     .build()?;
/// let pipeline = Pipeline::builder().provider(openai).default_model("gpt-4o-mini").build()?;
/// let answer = pipeline.chat(ChatRequest::user_text("Say hi")).await?;
/// println!("{}", answer.content);
///
/// // A local server speaking the same API, under its own name:
/// let ollama = OpenAiCompatible::builder()
///     .name("ollama")
///     .base_url("http://localhost:11434/v1")
///     .build()?;
/// # let _ = ollama; Ok(()) }
/// ```
#[derive(Clone)]
pub struct OpenAiCompatible {
    inner: Arc<Inner>,
}

impl fmt::Debug for OpenAiCompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiCompatible")
            .field("core", &self.inner.core)
            .field("max_tokens_field", &self.inner.max_tokens_field)
            .field("stream_usage", &self.inner.stream_usage)
            .field("prompt_cache_key", &self.inner.prompt_cache_key)
            .finish()
    }
}

impl OpenAiCompatible {
    /// A builder named `openai`, for [`OPENAI_BASE_URL`], with default deadlines and
    /// limits and no key.
    pub fn builder() -> OpenAiCompatibleBuilder {
        OpenAiCompatibleBuilder {
            http: HttpSettings::new("openai", OPENAI_BASE_URL, Auth::Bearer),
            max_tokens_field: MaxTokensField::default(),
            stream_usage: true,
            prompt_cache_key: true,
        }
    }

    /// A builder from the environment: the key from `OPENAI_API_KEY` (required) and the
    /// base URL from `OPENAI_BASE_URL` (optional).
    pub fn from_env() -> Result<OpenAiCompatibleBuilder> {
        let key = ApiKey::from_env("OPENAI_API_KEY")
            .ok_or_else(|| Error::Config("OPENAI_API_KEY is not set".into()))?;
        let mut b = Self::builder().api_key(key);
        if let Ok(url) = std::env::var("OPENAI_BASE_URL") {
            if !url.trim().is_empty() {
                b = b.base_url(url);
            }
        }
        Ok(b)
    }

    http_provider_accessors!(inner.core);

    /// The HTTP machinery (for the batch client).
    pub(crate) fn core(&self) -> &Arc<HttpCore> {
        &self.inner.core
    }

    /// The request body, serialised straight from the borrowed request (no JSON tree in
    /// between: this runs on every call).
    pub(crate) fn body(&self, call: &ProviderCall<'_>, streaming: bool) -> Result<Vec<u8>> {
        let req = call.request;
        let p = &req.params;
        let docs = documents_text(&req.documents);
        let (max_completion_tokens, max_tokens) = match self.inner.max_tokens_field {
            MaxTokensField::MaxCompletionTokens => (p.max_tokens, None),
            MaxTokensField::MaxTokens => (None, p.max_tokens),
        };
        let prompt_cache_key = if self.inner.prompt_cache_key {
            super::prompt_cache::prompt_cache_key(req)
        } else {
            None
        };
        let body = WireRequest {
            model: &call.model.name,
            messages: WireMessages {
                messages: &req.messages,
                docs: docs.as_deref(),
            },
            max_completion_tokens,
            max_tokens,
            temperature: p.temperature,
            top_p: p.top_p,
            stop: &p.stop,
            seed: p.seed,
            response_format: p.response_format.as_ref().map(WireFormat),
            tools: WireTools(&p.tools),
            tool_choice: p.tool_choice.as_deref().map(WireToolChoice),
            prompt_cache_key,
            stream: streaming.then_some(true),
            stream_options: (streaming && self.inner.stream_usage).then_some(StreamOptions {
                include_usage: true,
            }),
        };
        // Room for the messages and some: one allocation for a typical request.
        let size = req
            .messages
            .iter()
            .map(|m| m.content.len() + 64)
            .sum::<usize>()
            + docs.as_ref().map_or(0, String::len)
            + 256;
        let mut out = Vec::with_capacity(size.min(1 << 20));
        serde_json::to_writer(&mut out, &body)
            .map_err(|e| Error::InvalidRequest(format!("the request cannot be encoded: {e}")))?;
        Ok(out)
    }

    /// The answer in `body`, with the usage the API reported (not yet checked). The
    /// body is read straight into the answer's shape; a body that does not give an
    /// answer that way (an error payload, a wrong shape, invalid JSON, no choices) goes
    /// through a JSON tree, to be classified or reported as
    /// [`parse_response`](Self::parse_response) does. Fields tokenwise ignores are
    /// skipped unchecked: a stray byte inside one does not refuse the answer.
    pub(crate) fn parse_body(
        &self,
        call: &ProviderCall<'_>,
        body: &[u8],
        status: u16,
    ) -> std::result::Result<(ChatResponse, Option<Usage>), ProviderError> {
        if let Ok(w) = serde_json::from_slice::<WireResponse>(body) {
            if w.error.is_none() {
                if let Ok(answer) = self.answer(call, w, status) {
                    return Ok(answer);
                }
            }
        }
        let v = self.inner.core.parse_json(status, body)?;
        self.parse_response(call, v, status)
    }

    /// The answer in `v`, with the usage the API reported (not yet checked).
    pub(crate) fn parse_response(
        &self,
        call: &ProviderCall<'_>,
        v: Value,
        status: u16,
    ) -> std::result::Result<(ChatResponse, Option<Usage>), ProviderError> {
        let w: WireResponse = serde_json::from_value(v).map_err(|e| {
            self.inner
                .core
                .error(
                    ProviderErrorKind::InvalidResponse,
                    format!("unexpected response shape: {e}"),
                )
                .with_status(status)
        })?;
        self.answer(call, w, status)
    }

    fn answer(
        &self,
        call: &ProviderCall<'_>,
        w: WireResponse,
        status: u16,
    ) -> std::result::Result<(ChatResponse, Option<Usage>), ProviderError> {
        let core = &self.inner.core;
        let invalid = |m: String| {
            core.error(ProviderErrorKind::InvalidResponse, m)
                .with_status(status)
        };
        let choice = w
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| invalid("the response has no choices".into()))?;
        let msg = choice
            .message
            .ok_or_else(|| invalid("the response's choice has no message".into()))?;
        let mut content = msg.content.unwrap_or_default();
        let mut finish = choice
            .finish_reason
            .as_deref()
            .map_or(FinishReason::Other("unknown".into()), finish_reason);
        if let Some(r) = msg.refusal.filter(|r| !r.is_empty()) {
            if content.is_empty() {
                content = r;
            }
            finish = FinishReason::ContentFilter;
        }
        let calls: Vec<ToolCall> = msg
            .tool_calls
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let f = c.function.unwrap_or_default();
                ToolCall {
                    id: c.id.unwrap_or_else(|| format!("call_{i}")),
                    name: f.name.unwrap_or_default(),
                    arguments: arguments_text(f.arguments),
                }
            })
            .collect();
        let usage = w.usage.and_then(WireUsage::into_usage);
        Ok((
            ChatResponse::new(
                content,
                &call.model.name,
                &core.name,
                Usage::default(),
                finish,
            )
            .with_tool_calls(calls),
            usage,
        ))
    }

    /// Reads, parses and settles a whole answer.
    async fn whole(
        &self,
        call: &ProviderCall<'_>,
        resp: &mut crate::provider::http::Response,
        sent: &super::http::Sent,
    ) -> Result<ChatResponse> {
        let core = &self.inner.core;
        let status = resp.status().as_u16();
        let bytes = core.read_body(resp, sent).await?;
        let (r, reported) = self.parse_body(call, &bytes, status)?;
        drop(bytes);
        Ok(core.settle_answer(call, r, reported, sent).await)
    }

    async fn chat_inner(&self, call: ProviderCall<'_>) -> std::result::Result<ChatResponse, Error> {
        let body = self.body(&call, false)?;
        let core = &self.inner.core;
        let (mut resp, sent) = core
            .post(
                "/chat/completions",
                &call.model.name,
                body,
                false,
                super::token_estimate(&call),
            )
            .await?;
        self.whole(&call, &mut resp, &sent).await
    }

    /// Embeds `texts` with `model` through `{base_url}/embeddings`, one vector per text,
    /// in order, as the API returns them (not normalised).
    pub async fn embed(&self, model: &str, texts: &[&str]) -> Result<Embeddings> {
        self.embed_with(model, texts, None).await
    }

    async fn embed_with(
        &self,
        model: &str,
        texts: &[&str],
        dimensions: Option<usize>,
    ) -> Result<Embeddings> {
        if texts.is_empty() {
            return Ok(Embeddings {
                vectors: Vec::new(),
                input_tokens: Some(0),
            });
        }
        let core = &self.inner.core;
        let mut body = json!({"model": model, "input": texts, "encoding_format": "float"});
        if let Some(d) = dimensions {
            body["dimensions"] = d.into();
        }
        let body = serde_json::to_vec(&body)
            .map_err(|e| Error::InvalidRequest(format!("the request cannot be encoded: {e}")))?;
        let (mut resp, sent) = core
            .post(
                "/embeddings",
                model,
                body,
                false,
                texts.iter().map(|t| (t.len() as u64).div_ceil(3)).sum(),
            )
            .await?;
        let status = resp.status().as_u16();
        let bytes = core.read_body(&mut resp, &sent).await?;
        let v = core.parse_json(status, &bytes)?;
        let invalid = |m: String| -> Error {
            core.error(ProviderErrorKind::InvalidResponse, m)
                .with_status(status)
                .into()
        };
        let w: WireEmbeddings = serde_json::from_value(v)
            .map_err(|e| invalid(format!("unexpected embeddings shape: {e}")))?;
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        for (pos, item) in w.data.into_iter().enumerate() {
            let i = item.index.unwrap_or(pos);
            match vectors.get_mut(i) {
                Some(slot @ None) => *slot = Some(item.embedding),
                _ => {
                    return Err(invalid(format!(
                        "embedding index {i} is out of range or repeated"
                    )));
                }
            }
        }
        let vectors = vectors
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid(format!("expected {} embeddings", texts.len())))?;
        Ok(Embeddings {
            vectors,
            input_tokens: w.usage.and_then(|u| u.prompt_tokens),
        })
    }

    /// An [`Embedder`] over this provider's `/embeddings` with `model`, returning unit
    /// vectors of `dimensions` (checked on every answer).
    pub fn embedder(&self, model: impl Into<String>, dimensions: usize) -> OpenAiEmbedder {
        OpenAiEmbedder {
            provider: self.clone(),
            model: model.into(),
            dimensions,
            send_dimensions: false,
        }
    }
}

/// Vectors from [`OpenAiCompatible::embed`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Embeddings {
    /// One vector per input text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// The input tokens the API reported, if it did.
    pub input_tokens: Option<u64>,
}

/// Texts per embeddings request.
const EMBED_BATCH: usize = 256;

/// An [`Embedder`] backed by an OpenAI-compatible `/embeddings` endpoint. Built by
/// [`OpenAiCompatible::embedder`].
#[derive(Debug, Clone)]
pub struct OpenAiEmbedder {
    provider: OpenAiCompatible,
    model: String,
    dimensions: usize,
    send_dimensions: bool,
}

impl OpenAiEmbedder {
    /// Asks the API for vectors of exactly [`dimensions`](Embedder::dimensions) (the
    /// `dimensions` parameter of OpenAI's `text-embedding-3` models). Off by default.
    #[must_use]
    pub fn send_dimensions(mut self, on: bool) -> Self {
        self.send_dimensions = on;
        self
    }
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn dimensions(&self) -> usize {
        self.dimensions
    }

    async fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        let dims = self.send_dimensions.then_some(self.dimensions);
        for batch in texts.chunks(EMBED_BATCH) {
            let e = self.provider.embed_with(&self.model, batch, dims).await?;
            for mut v in e.vectors {
                if v.len() != self.dimensions {
                    return Err(ProviderError::new(
                        ProviderErrorKind::InvalidResponse,
                        self.provider.name(),
                        format!(
                            "embedding has {} dimensions, expected {}",
                            v.len(),
                            self.dimensions
                        ),
                    )
                    .into());
                }
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm.is_finite() && norm > 0.0 {
                    v.iter_mut().for_each(|x| *x /= norm);
                }
                out.push(v);
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Provider for OpenAiCompatible {
    fn name(&self) -> &str {
        &self.inner.core.name
    }

    async fn chat(&self, call: ProviderCall<'_>) -> Result<ChatResponse> {
        self.chat_inner(call).await
    }

    async fn stream(&self, call: ProviderCall<'_>) -> Result<ChatStream> {
        let body = self.body(&call, true)?;
        let core = &self.inner.core;
        let (mut resp, sent) = core
            .post(
                "/chat/completions",
                &call.model.name,
                body,
                true,
                super::token_estimate(&call),
            )
            .await?;
        if HttpCore::is_json(&resp) {
            // The server answered whole: replay it as a stream.
            return Ok(replay(self.whole(&call, &mut resp, &sent).await?));
        }
        let translator = OpenAiStream {
            asked: Asked::new(call.request, call.model),
            delivered: String::new(),
            finish: None,
            refused: false,
            usage: None,
        };
        Ok(sse_stream(Arc::clone(core), resp, sent, translator))
    }
}

/// A chat completions request, borrowed from the [`ChatRequest`](crate::ChatRequest).
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: WireMessages<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<WireFormat<'a>>,
    #[serde(skip_serializing_if = "WireTools::is_empty")]
    tools: WireTools<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// The messages, with the documents as a system message before the first message that
/// is not one (or last, when all are).
struct WireMessages<'a> {
    messages: &'a [crate::types::Message],
    docs: Option<&'a str>,
}

impl Serialize for WireMessages<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let docs = self.docs.map(|d| OutMessage {
            role: "system",
            content: Some(d),
            tool_calls: None,
            tool_call_id: None,
        });
        let mut seq = s.serialize_seq(Some(self.messages.len() + usize::from(docs.is_some())))?;
        let mut docs = docs;
        for m in self.messages {
            if m.role != Role::System {
                if let Some(d) = docs.take() {
                    seq.serialize_element(&d)?;
                }
            }
            seq.serialize_element(&OutMessage::from(m))?;
        }
        if let Some(d) = docs {
            seq.serialize_element(&d)?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    /// `null` for an assistant message that only calls tools.
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<WireCalls<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

impl<'a> From<&'a crate::types::Message> for OutMessage<'a> {
    fn from(m: &'a crate::types::Message) -> Self {
        let role = match m.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        let calls = !m.tool_calls.is_empty();
        OutMessage {
            role,
            content: (!calls || !m.content.is_empty()).then_some(m.content.as_str()),
            tool_calls: calls.then_some(WireCalls(&m.tool_calls)),
            tool_call_id: m.tool_call_id.as_deref(),
        }
    }
}

/// An assistant message's tool calls.
struct WireCalls<'a>(&'a [ToolCall]);

impl Serialize for WireCalls<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Function<'a> {
            name: &'a str,
            arguments: &'a str,
        }
        #[derive(Serialize)]
        struct Call<'a> {
            id: &'a str,
            #[serde(rename = "type")]
            kind: &'static str,
            function: Function<'a>,
        }
        s.collect_seq(self.0.iter().map(|c| Call {
            id: &c.id,
            kind: "function",
            function: Function {
                name: &c.name,
                arguments: &c.arguments,
            },
        }))
    }
}

/// The tools offered.
struct WireTools<'a>(&'a [crate::types::Tool]);

impl WireTools<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for WireTools<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Function<'a> {
            name: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            description: &'a str,
            parameters: Parameters<'a>,
        }
        #[derive(Serialize)]
        struct Tool<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            function: Function<'a>,
        }
        s.collect_seq(self.0.iter().map(|t| Tool {
            kind: "function",
            function: Function {
                name: &t.name,
                description: &t.description,
                parameters: Parameters(&t.parameters),
            },
        }))
    }
}

/// A tool's parameters, as [`parameters`] gives them, without copying.
struct Parameters<'a>(&'a Value);

impl Serialize for Parameters<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0.is_null() {
            let mut m = s.serialize_map(Some(2))?;
            m.serialize_entry("type", "object")?;
            m.serialize_entry("properties", &Empty)?;
            m.end()
        } else {
            self.0.serialize(s)
        }
    }
}

/// `{}`.
struct Empty;

impl Serialize for Empty {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_map(Some(0))?.end()
    }
}

/// `response_format`.
struct WireFormat<'a>(&'a ResponseFormat);

impl Serialize for WireFormat<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Schema<'a> {
            name: &'a str,
            schema: &'a Value,
            strict: bool,
        }
        let mut m = s.serialize_map(None)?;
        match self.0 {
            ResponseFormat::Text => m.serialize_entry("type", "text")?,
            ResponseFormat::JsonObject => m.serialize_entry("type", "json_object")?,
            ResponseFormat::JsonSchema { name, schema } => {
                m.serialize_entry("type", "json_schema")?;
                m.serialize_entry(
                    "json_schema",
                    &Schema {
                        name,
                        schema,
                        strict: true,
                    },
                )?;
            }
        }
        m.end()
    }
}

/// `tool_choice`: a mode, or the function to call.
struct WireToolChoice<'a>(&'a str);

impl Serialize for WireToolChoice<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Name<'a> {
            name: &'a str,
        }
        match self.0 {
            mode @ ("auto" | "none" | "required") => s.serialize_str(mode),
            name => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("type", "function")?;
                m.serialize_entry("function", &Name { name })?;
                m.end()
            }
        }
    }
}

/// A tool's parameters, defaulting to an object with no properties.
pub(crate) fn parameters(p: &Value) -> Value {
    if p.is_null() {
        json!({"type": "object", "properties": {}})
    } else {
        p.clone()
    }
}

fn arguments_text(v: Option<Value>) -> String {
    match v {
        Some(Value::String(s)) => s,
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Maps an OpenAI-style `finish_reason`.
fn finish_reason(s: &str) -> FinishReason {
    match s {
        "stop" | "eos" | "eos_token" | "stop_sequence" => FinishReason::Stop,
        "length" | "max_tokens" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_owned()),
    }
}

#[derive(Debug, Deserialize)]
struct WireResponse {
    #[serde(default)]
    choices: Vec<WireChoice>,
    /// Present and not `null` on an error payload, which is classified instead.
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireChoice {
    #[serde(default)]
    message: Option<WireMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    tool_calls: Vec<WireToolCall>,
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunction>,
}

#[derive(Debug, Default, Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<WireUsageDetails>,
}

#[derive(Debug, Deserialize)]
struct WireUsageDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl WireUsage {
    fn into_usage(self) -> Option<Usage> {
        if self.prompt_tokens.is_none() && self.completion_tokens.is_none() {
            return None;
        }
        let input = self.prompt_tokens.unwrap_or(0);
        let cached = self
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
            .min(input);
        Some(Usage::new(input, self.completion_tokens.unwrap_or(0)).with_cached_input(cached))
    }
}

#[derive(Debug, Deserialize)]
struct WireChunk {
    #[serde(default, deserialize_with = "null_as_empty")]
    choices: Vec<WireChunkChoice>,
    /// Present and not `null` on an error payload, which is classified instead.
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    tool_calls: Vec<WireToolCall>,
}

#[derive(Debug, Deserialize)]
struct WireEmbeddings {
    data: Vec<WireEmbedding>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireEmbedding {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

fn null_as_empty<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// A stream event's chunk, read straight into the chunk's shape; an event that does
/// not fit it (an error, a wrong shape, invalid JSON) goes through a JSON tree to be
/// classified or reported. Fields tokenwise ignores are skipped unchecked.
fn read_chunk(
    core: &HttpCore,
    ev: &SseEvent,
    data: &str,
) -> std::result::Result<WireChunk, EventError> {
    if ev.event != "error" {
        if let Ok(c) = serde_json::from_str::<WireChunk>(data) {
            if c.error.is_none() {
                return Ok(c);
            }
        }
    }
    chunk_through_tree(core, ev, data)
}

/// [`read_chunk`] through a JSON tree.
fn chunk_through_tree(
    core: &HttpCore,
    ev: &SseEvent,
    data: &str,
) -> std::result::Result<WireChunk, EventError> {
    let v = core.event_json(ev, data)?;
    if ev.event == "error" || v.get("error").is_some_and(|e| !e.is_null()) {
        return Err(classify_payload(&core.name, &v).into());
    }
    serde_json::from_value(v)
        .map_err(|e| EventError::Malformed(format!("unexpected stream chunk shape: {e}")))
}

/// Turns chat completion chunks into stream events.
struct OpenAiStream {
    asked: Asked,
    /// Text and tool arguments delivered, for counting when no usage comes.
    delivered: String,
    finish: Option<FinishReason>,
    refused: bool,
    usage: Option<Usage>,
}

impl Translate for OpenAiStream {
    fn event(
        &mut self,
        core: &HttpCore,
        ev: SseEvent,
        out: &mut VecDeque<StreamEvent>,
    ) -> std::result::Result<bool, EventError> {
        let data = ev.data.trim();
        if data == "[DONE]" {
            return Ok(true);
        }
        if data.is_empty() {
            return Ok(false);
        }
        let chunk = read_chunk(core, &ev, data)?;
        for choice in chunk.choices {
            if choice.index.unwrap_or(0) != 0 {
                continue;
            }
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    self.delivered.push_str(&text);
                    out.push_back(StreamEvent::text(text));
                }
                if let Some(text) = delta.refusal.filter(|t| !t.is_empty()) {
                    self.refused = true;
                    self.delivered.push_str(&text);
                    out.push_back(StreamEvent::text(text));
                }
                for (pos, call) in delta.tool_calls.into_iter().enumerate() {
                    let f = call.function.unwrap_or_default();
                    let args = arguments_text(f.arguments);
                    if call.id.is_none() && f.name.is_none() && args.is_empty() {
                        continue;
                    }
                    self.delivered.push_str(&args);
                    let index = call
                        .index
                        .unwrap_or_else(|| u32::try_from(pos).unwrap_or(u32::MAX));
                    let mut d = ToolCallDelta::new(index, args);
                    d.id = call.id;
                    d.name = f.name;
                    out.push_back(StreamEvent::ToolCallDelta(d));
                }
            }
            if let Some(r) = choice.finish_reason {
                self.finish = Some(finish_reason(&r));
            }
        }
        if let Some(u) = chunk.usage.and_then(WireUsage::into_usage) {
            self.usage = Some(u);
        }
        Ok(false)
    }

    fn has_finish(&self) -> bool {
        self.finish.is_some()
    }

    fn asked(&self) -> &Asked {
        &self.asked
    }

    fn ending(&mut self) -> StreamEnding {
        let finish = if self.refused {
            Some(FinishReason::ContentFilter)
        } else {
            self.finish.take()
        };
        StreamEnding {
            delivered: std::mem::take(&mut self.delivered),
            usage: self.usage,
            finish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Catalog, ChatRequest, Message, Tool};

    #[test]
    fn request_body_maps_every_parameter() {
        let p = OpenAiCompatible::builder()
            .max_tokens_field(MaxTokensField::MaxTokens)
            .build()
            .unwrap();
        let cat = Catalog::builtin();
        let mut req = ChatRequest::new()
            .message(Message::system("Be brief."))
            .message(Message::user("Weather in Paris?"))
            .message(Message::assistant("").with_tool_calls(vec![ToolCall {
                id: "call_1".into(),
                name: "weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            }]))
            .message(Message::tool("call_1", "18C"))
            .max_tokens(50)
            .temperature(0.5)
            .document(crate::types::Document::new("Paris is in France.", 1.0));
        req.params.stop = vec!["END".into()];
        req.params.seed = Some(7);
        req.params.response_format = Some(ResponseFormat::JsonSchema {
            name: "w".into(),
            schema: json!({"type": "object"}),
        });
        req.params.tools = vec![Tool {
            name: "weather".into(),
            description: "Gets the weather".into(),
            parameters: Value::Null,
        }];
        req.params.tool_choice = Some("weather".into());
        let m = cat.require("gpt-4o-mini").unwrap();
        let body: Value =
            serde_json::from_slice(&p.body(&ProviderCall::new(&req, m), true).unwrap()).unwrap();
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(body["max_tokens"], 50);
        assert!(body.get("max_completion_tokens").is_none());
        assert_eq!(body["stop"], json!(["END"]));
        assert_eq!(body["seed"], 7);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["response_format"]["type"], "json_schema");
        assert_eq!(body["response_format"]["json_schema"]["name"], "w");
        assert_eq!(body["tools"][0]["function"]["parameters"]["type"], "object");
        assert_eq!(body["tool_choice"]["function"]["name"], "weather");
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 5);
        assert_eq!(msgs[0]["role"], "system");
        assert!(msgs[1]["content"].as_str().unwrap().contains("<document>"));
        assert_eq!(msgs[3]["content"], Value::Null);
        assert_eq!(
            msgs[3]["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert_eq!(msgs[4]["role"], "tool");
        assert_eq!(msgs[4]["tool_call_id"], "call_1");
        let whole: Value =
            serde_json::from_slice(&p.body(&ProviderCall::new(&req, m), false).unwrap()).unwrap();
        assert!(whole.get("stream").is_none());
        assert!(whole.get("stream_options").is_none());
    }

    #[test]
    fn finish_reasons() {
        assert_eq!(finish_reason("stop"), FinishReason::Stop);
        assert_eq!(finish_reason("length"), FinishReason::Length);
        assert_eq!(finish_reason("tool_calls"), FinishReason::ToolCalls);
        assert_eq!(finish_reason("content_filter"), FinishReason::ContentFilter);
        assert_eq!(finish_reason("weird"), FinishReason::Other("weird".into()));
    }

    /// Feeds `body` to the whole-answer parser and `stream` to the stream translator:
    /// nothing panics, and what is kept is bounded by the input.
    fn feed(p: &OpenAiCompatible, body: &[u8], stream: &[u8]) {
        let cat = Catalog::builtin();
        let req = ChatRequest::new().message(Message::user("hi"));
        let m = cat.require("gpt-4o-mini").unwrap();
        let call = ProviderCall::new(&req, m);
        let core = &p.inner.core;
        let through_tree = core
            .parse_json(200, body)
            .and_then(|v| p.parse_response(&call, v, 200));
        if let Ok((r, _usage)) = &through_tree {
            assert!(r.content.len() <= body.len());
        }
        // Reading straight into the answer's shape agrees with going through a tree,
        // except that it does not check what it skips: a body whose only fault is
        // inside a field tokenwise ignores (a stray byte, an unpaired surrogate) is
        // read, where the tree refuses it as invalid JSON.
        let direct = p.parse_body(&call, body, 200);
        match (&direct, &through_tree) {
            (Ok(_), Err(e)) => {
                assert!(
                    e.message.starts_with("the response is not valid JSON"),
                    "{e:?}"
                );
            }
            _ => assert_eq!(format!("{direct:?}"), format!("{through_tree:?}")),
        }
        let mut decoder = crate::provider::sse::SseDecoder::with_max_event_bytes(1024);
        let mut events = Vec::new();
        let _ = decoder.feed(stream, &mut events);
        let mut t = OpenAiStream {
            asked: Asked::new(&req, m),
            delivered: String::new(),
            finish: None,
            refused: false,
            usage: None,
        };
        let mut out = VecDeque::new();
        for ev in events {
            assert!(ev.data.len() <= 1024);
            // The direct read agrees with the tree, but for faults inside skipped fields.
            let data = ev.data.trim();
            if data != "[DONE]" && !data.is_empty() {
                let direct = read_chunk(core, &ev, data);
                let tree = chunk_through_tree(core, &ev, data);
                match (&direct, &tree) {
                    (Ok(_), Err(EventError::Malformed(m))) => {
                        assert!(m.starts_with("a stream event is not valid JSON"), "{m}");
                    }
                    _ => assert_eq!(format!("{direct:?}"), format!("{tree:?}")),
                }
            }
            if t.event(core, ev, &mut out).is_err() {
                break;
            }
        }
        assert!(t.delivered.len() <= stream.len());
        let _ = t.ending();
    }

    fn fuzz(cases: u32) {
        let p = OpenAiCompatible::builder().build().unwrap();
        crate::provider::http::arbitrary::run(cases, |body, stream| feed(&p, body, stream));
    }

    #[test]
    fn arbitrary_bodies_and_streams_never_panic() {
        fuzz(10_000);
    }

    #[test]
    #[ignore = "a million cases: run with --ignored"]
    fn a_million_arbitrary_bodies_and_streams_never_panic() {
        fuzz(1_000_000);
    }
}
