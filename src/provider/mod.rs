//! Model providers: the [`Provider`] trait, the HTTP providers [`OpenAiCompatible`] and
//! [`Anthropic`], and the [`SimulatedProvider`].
//!
//! A provider calls one model API, whole ([`Provider::chat`]) or streamed
//! ([`Provider::stream`]), and reports failures as [`ProviderError`](crate::ProviderError)s
//! whose kind decides retries, breakers and fallbacks.
//!
//! # Errors
//!
//! The HTTP providers read the status, the headers and the body of every failure:
//!
//! | kind | from | retry? |
//! | --- | --- | --- |
//! | [`RateLimited`](crate::ProviderErrorKind::RateLimited) | 429; every key of the pool cooling down | yes, after `retry_after` |
//! | [`Overloaded`](crate::ProviderErrorKind::Overloaded) | 529, `overloaded_error`, a 503 saying "overloaded" | yes, with backoff |
//! | [`Server`](crate::ProviderErrorKind::Server) | other 5xx; an error event inside a stream | yes |
//! | [`Timeout`](crate::ProviderErrorKind::Timeout) | a missed [`Deadlines`] deadline; 408, 504 | yes |
//! | [`Connection`](crate::ProviderErrorKind::Connection) | refused, reset or closed connections; a stream cut before its end marker | yes |
//! | [`InvalidResponse`](crate::ProviderErrorKind::InvalidResponse) | invalid JSON, no choices, a body over the cap | yes |
//! | [`Auth`](crate::ProviderErrorKind::Auth) | 401, 403; exhausted quota or billing | no |
//! | [`ContextLength`](crate::ProviderErrorKind::ContextLength) | a 4xx saying the prompt exceeds the context window | no, not as is |
//! | [`ContentFilter`](crate::ProviderErrorKind::ContentFilter) | a 4xx from the content filter | no |
//! | [`BadRequest`](crate::ProviderErrorKind::BadRequest) | other 4xx | no |
//!
//! `retry_after` comes from `retry-after-ms`, `retry-after` (seconds or an HTTP date),
//! or OpenAI's `x-ratelimit-reset-*` for an exhausted quota, capped at a day;
//! [`ProviderError::rate_limits`](crate::ProviderError::rate_limits) holds the remaining
//! requests and tokens the rate-limit headers reported. A failure after a stream has
//! delivered content is an [`Error::StreamInterrupted`](crate::Error::StreamInterrupted);
//! before, it is the provider error itself, so the pipeline can fall back. Error
//! messages never contain the API key.

mod anthropic;
pub(crate) mod http;
mod keys;
mod openai;
mod prompt_cache;
mod service;
mod simulated;
pub mod sse;

use std::fmt;

use async_trait::async_trait;

pub use anthropic::{ANTHROPIC_BASE_URL, ANTHROPIC_VERSION, Anthropic, AnthropicBuilder};
pub use http::{
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_RETRY_AFTER, DEFAULT_MAX_STREAM_BYTES, Deadlines,
    MAX_MALFORMED_EVENTS, STREAM_MALFORMED_EVENTS, http_client_builder,
};
pub use keys::{ApiKey, KeyLease, KeyPool, MAX_KEYS};
pub use openai::{
    Embeddings, MaxTokensField, OPENAI_BASE_URL, OpenAiCompatible, OpenAiCompatibleBuilder,
    OpenAiEmbedder,
};
pub use prompt_cache::{PromptCacheTtl, PromptCaching};
pub use service::ProviderService;
pub use simulated::{Outage, SimulatedProvider, SimulatedProviderBuilder};

use crate::Result;
use crate::types::{ChatRequest, ChatResponse, ChatStream, ModelSpec};

/// One call to a provider: the request and the model chosen for it.
///
/// The request's own `model` field may be unset (the router chose); providers must
/// send [`model`](Self::model)'s name.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ProviderCall<'a> {
    /// The request.
    pub request: &'a ChatRequest,
    /// The model to call.
    pub model: &'a ModelSpec,
    /// The request's prompt tokens for the model's tokenizer, when the caller has
    /// counted them already (the pipeline always has): providers use it instead of
    /// counting the prompt again.
    pub prompt_tokens: Option<u64>,
}

impl<'a> ProviderCall<'a> {
    /// A call of `request` on `model`.
    pub fn new(request: &'a ChatRequest, model: &'a ModelSpec) -> Self {
        ProviderCall {
            request,
            model,
            prompt_tokens: None,
        }
    }

    /// The prompt's token count, as already counted for `model`'s tokenizer.
    #[must_use]
    pub fn with_prompt_tokens(mut self, tokens: u64) -> Self {
        self.prompt_tokens = Some(tokens);
        self
    }

    /// The prompt's tokens: the count carried by the call, else counted now.
    pub(crate) fn count_prompt(&self) -> u64 {
        use crate::context::{TiktokenCounter, TokenCounter};
        self.prompt_tokens.unwrap_or_else(|| {
            TiktokenCounter::new().count_request(self.request, self.model.tokenizer)
        })
    }
}

/// The token charge of `call` for per-key quotas: prompt tokens plus output allowance.
pub(crate) fn token_estimate(call: &ProviderCall<'_>) -> u64 {
    call.count_prompt() + call.model.output_allowance(call.request.params.max_tokens)
}

/// Calls one model API.
///
/// Implementations report usage as the API returned it (or counted, marked
/// `estimated`), leave `cost` and `served` to the pipeline, and map every failure to a
/// [`ProviderError`](crate::ProviderError) of the right kind. A stream must end with
/// [`StreamEvent::Done`](crate::StreamEvent::Done), or with an error; never just stop.
///
/// # Implementing
///
/// ```
/// use async_trait::async_trait;
/// use futures_util::stream;
/// use tokenwise::provider::{Provider, ProviderCall};
/// use tokenwise::{ChatResponse, ChatStream, FinishReason, StreamEnd, StreamEvent, Usage};
///
/// /// Answers every question with "42".
/// #[derive(Debug)]
/// struct DeepThought;
///
/// #[async_trait]
/// impl Provider for DeepThought {
///     fn name(&self) -> &str {
///         "deep-thought"
///     }
///
///     async fn chat(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
///         Ok(ChatResponse::new("42", &call.model.name, self.name(), Usage::new(10, 1), FinishReason::Stop))
///     }
///
///     async fn stream(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
///         let end = StreamEnd::new(FinishReason::Stop, &call.model.name, self.name());
///         Ok(Box::pin(stream::iter([
///             Ok(StreamEvent::text("42")),
///             Ok(StreamEvent::Usage(Usage::new(10, 1))),
///             Ok(StreamEvent::Done(end)),
///         ])))
///     }
/// }
/// ```
#[async_trait]
pub trait Provider: Send + Sync + fmt::Debug {
    /// The provider's name, as used in the catalogue (`openai`, `anthropic`, ...).
    fn name(&self) -> &str;

    /// Asks for a whole answer.
    async fn chat(&self, call: ProviderCall<'_>) -> Result<ChatResponse>;

    /// Asks for a streamed answer.
    async fn stream(&self, call: ProviderCall<'_>) -> Result<ChatStream>;
}
