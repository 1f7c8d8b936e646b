//! # tokenwise
//!
//! Production middleware for LLM calls. tokenwise sits between your code and the model
//! providers and makes every call cheaper, faster, bounded and observable: token
//! budgeting, caching, rate limits, spend caps, fallbacks, routing, streaming, tracing
//! and usage records.
//!
//! Wrap a [`Provider`] in a [`Pipeline`], then call it whole or streamed. Every default
//! is in memory; swap any of them for your own implementation of a trait:
//! [`Provider`], [`Cache`](cache::Cache), [`Router`](router::Router),
//! [`Limiter`](limiter::Limiter), [`Budget`](budget::Budget).
//!
//! ## Quick start
//!
//! This runs offline, on the [`SimulatedProvider`](provider::SimulatedProvider):
//!
//! ```
//! use tokenwise::provider::SimulatedProvider;
//! use tokenwise::budget::BudgetWindow;
//! use tokenwise::{ChatRequest, Cost, Pipeline, ScopeKind};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tokenwise::Result<()> {
//! let pipeline = Pipeline::builder()
//!     .provider(SimulatedProvider::new())
//!     .default_model("gpt-4o-mini")
//!     .rate_limit(ScopeKind::User, 60)
//!     .spend_cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
//!     .build()?;
//!
//! let question = ChatRequest::user_text("What does a circuit breaker do?").user("ann");
//! let first = pipeline.chat(question.clone()).await?;
//! let again = pipeline.chat(question).await?;
//!
//! assert!(!first.served.is_cache_hit());
//! assert!(again.served.is_cache_hit()); // the repeat cost nothing
//! assert_eq!(again.content, first.content);
//! assert!(again.cost.is_zero() && !first.cost.is_zero());
//! # Ok(()) }
//! ```
//!
//! ## The funnel
//!
//! Every request runs through the same stages, in this order (see [`pipeline`]):
//! observe → plan → admit → cache → budget → dispatch → validate → settle. A cache hit
//! spends no budget and no token quota; a request refused at one stage consumes nothing
//! of the later ones and never reaches a provider; every stream, completed, cut or
//! dropped, commits what it used.
//!
//! ## Modules
//!
//! | module | concern | in-memory default |
//! | --- | --- | --- |
//! | [`provider`] | calling a model API | [`SimulatedProvider`](provider::SimulatedProvider); HTTP: [`OpenAiCompatible`](provider::OpenAiCompatible), [`Anthropic`](provider::Anthropic) |
//! | [`cache`] | reusing answers | [`ExactCache`](cache::ExactCache) |
//! | [`router`] | choosing models, validating answers, balancing deployments | [`CatalogRouter`](router::CatalogRouter), [`ComplexityRouter`](router::ComplexityRouter), [`CascadeRouter`](router::CascadeRouter) |
//! | [`limiter`] | rate limits on requests and tokens | [`GcraLimiter`](limiter::GcraLimiter) |
//! | [`budget`] | spend caps | [`MemoryBudget`](budget::MemoryBudget) |
//! | [`context`] | token counting, context budgets | [`TiktokenCounter`](context::TiktokenCounter), [`ContextBudget`](context::ContextBudget) |
//! | [`resilience`] | retries, breakers, hedging, concurrency | [`RetryPolicy`](resilience::RetryPolicy), [`Breakers`](resilience::Breakers), [`Concurrency`](resilience::Concurrency) |
//! | [`observe`] | spans and usage records | [`MemoryUsage`](observe::MemoryUsage) |
//! | [`batch`] | provider batch APIs at their discount | [`SimulatedBatch`](batch::SimulatedBatch); HTTP: [`OpenAiBatch`](batch::OpenAiBatch), [`AnthropicBatch`](batch::AnthropicBatch) |
//! | [`clock`] | time | [`TscClock`], [`TokioClock`] |
//!
//! With the cargo feature `redis`, `RedisLimiter` and `RedisBudget` share limits and
//! caps across every replica of a service.
//!
//! Each concern is also a tower layer ([`limiter::RateLimitLayer`],
//! [`cache::CacheLayer`], [`budget::BudgetLayer`] over a
//! [`provider::ProviderService`]), and [`Pipeline`] implements `tower::Service`.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod batch;
pub mod budget;
pub mod cache;
pub mod clock;
pub mod context;
mod error;
pub mod eval;
pub mod limiter;
pub mod observe;
pub mod pipeline;
pub mod provider;
#[cfg(feature = "redis")]
mod redis_conn;
pub mod resilience;
pub mod router;
pub mod types;

pub use clock::{Clock, ManualClock, Timestamp, TokioClock, TscClock};
pub use context::TokenCounter;
pub use error::{BoxError, Error, ProviderError, ProviderErrorKind, RateLimits, Result};
pub use pipeline::{
    BatchHandle, BatchJournal, BatchOptions, BatchOutcome, BatchProgress, WarmOptions, WarmReport,
};
pub use pipeline::{Pipeline, PipelineBuilder};
pub use provider::Provider;
#[cfg(feature = "redis")]
pub use redis_conn::{OnRedisError, RedisConnection};
pub use types::{
    Anonymous, CacheMode, CachePolicy, Catalog, ChatRequest, ChatResponse, ChatStream, Cost,
    Document, FinishReason, GenerationParams, Message, ModelSpec, Price, Pricing, Priority,
    RequestMeta, ResponseFormat, Role, Scope, ScopeKind, Served, StreamEnd, StreamEvent, Tier,
    TokenizerKind, Tool, ToolCall, ToolCallDelta, Truncation, Usage,
};

/// The README's code compiles.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The architecture guide's code compiles.
#[cfg(doctest)]
#[doc = include_str!("../docs/architecture.md")]
struct ArchitectureDoctests;

/// A boxed, sendable future, as returned by the tower services.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// Every extension trait is object safe: this fails to compile otherwise.
#[allow(dead_code)]
type _ObjectSafe = (
    Box<dyn Provider>,
    Box<dyn cache::Cache>,
    Box<dyn cache::Embedder>,
    Box<dyn router::Router>,
    Box<dyn router::Validator>,
    Box<dyn limiter::Limiter>,
    Box<dyn budget::Budget>,
    Box<dyn TokenCounter>,
    Box<dyn Clock>,
    Box<dyn observe::UsageSink>,
    Box<dyn context::Summarizer>,
);
