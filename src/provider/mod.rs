//! Model providers: the [`Provider`] trait and the [`SimulatedProvider`].
//!
//! A provider calls one model API, whole ([`Provider::chat`]) or streamed
//! ([`Provider::stream`]), and reports failures as [`ProviderError`](crate::ProviderError)s
//! whose kind decides retries, breakers and fallbacks.

mod service;
mod simulated;

use std::fmt;

use async_trait::async_trait;

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
}

impl<'a> ProviderCall<'a> {
    /// A call of `request` on `model`.
    pub fn new(request: &'a ChatRequest, model: &'a ModelSpec) -> Self {
        ProviderCall { request, model }
    }
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
