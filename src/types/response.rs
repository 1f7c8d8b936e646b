//! What comes out: [`ChatResponse`], [`Usage`] and how an answer was served.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Cost, ToolCall};

/// Token counts of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// Prompt tokens, including the cached ones.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Prompt tokens read from the provider's prompt cache (a subset of `input_tokens`).
    #[serde(default)]
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the provider's prompt cache (a subset of `input_tokens`;
    /// Anthropic bills them above the input price).
    #[serde(default)]
    pub cache_write_tokens: u64,
    /// Of `cache_write_tokens`, those written with a one-hour lifetime (billed higher
    /// than five-minute writes).
    #[serde(default)]
    pub cache_write_1h_tokens: u64,
    /// True when tokenwise counted the tokens itself because the provider reported none.
    #[serde(default)]
    pub estimated: bool,
}

/// The usage of two calls together (estimated if either was).
impl std::ops::Add for Usage {
    type Output = Usage;

    fn add(self, b: Usage) -> Usage {
        Usage {
            input_tokens: self.input_tokens.saturating_add(b.input_tokens),
            output_tokens: self.output_tokens.saturating_add(b.output_tokens),
            cached_input_tokens: self
                .cached_input_tokens
                .saturating_add(b.cached_input_tokens),
            cache_write_tokens: self.cache_write_tokens.saturating_add(b.cache_write_tokens),
            cache_write_1h_tokens: self
                .cache_write_1h_tokens
                .saturating_add(b.cache_write_1h_tokens),
            estimated: self.estimated || b.estimated,
        }
    }
}

impl Usage {
    /// Usage with `input` and `output` tokens.
    pub fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Usage {
            input_tokens,
            output_tokens,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            estimated: false,
        }
    }

    /// Sets the cached input tokens.
    #[must_use]
    pub fn with_cached_input(mut self, cached: u64) -> Self {
        self.cached_input_tokens = cached;
        self
    }

    /// Sets the prompt tokens written to the provider's prompt cache: `five_minutes` with
    /// a five-minute lifetime and `one_hour` with a one-hour one.
    #[must_use]
    pub fn with_cache_writes(mut self, five_minutes: u64, one_hour: u64) -> Self {
        self.cache_write_tokens = five_minutes.saturating_add(one_hour);
        self.cache_write_1h_tokens = one_hour;
        self
    }

    /// Marks the counts as estimated by tokenwise.
    #[must_use]
    pub fn estimated(mut self) -> Self {
        self.estimated = true;
        self
    }

    /// Input plus output tokens.
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FinishReason {
    /// The model finished its answer.
    #[default]
    Stop,
    /// The output token limit cut the answer.
    Length,
    /// The model called tools.
    ToolCalls,
    /// The provider's content filter stopped the answer.
    ContentFilter,
    /// A tokenwise limit (output tokens or cost) ended a stream early.
    Truncated,
    /// Anything else the provider reported.
    Other(String),
}

impl FinishReason {
    /// Whether the answer is complete, and so may be cached.
    pub fn is_complete(&self) -> bool {
        matches!(self, FinishReason::Stop | FinishReason::ToolCalls)
    }
}

impl FinishReason {
    /// The reason as written on the wire and in records (`stop`, `length`, ...).
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Truncated => "truncated",
            FinishReason::Other(s) => s,
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an answer was served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Served {
    /// A provider answered.
    Provider {
        /// Provider calls made for this request, failures included.
        attempts: u32,
        /// Targets given up on before the one that answered.
        fallbacks: u32,
        /// Whether a validator escalated the request to a stronger model.
        escalated: bool,
    },
    /// The cache answered; no model was called.
    Cache {
        /// 1.0 for an exact match; the similarity for a semantic match.
        similarity: f32,
        /// The tokens the original call used, which this hit did not spend.
        saved_tokens: u64,
        /// What the original call cost, which this hit did not spend.
        saved_cost: Cost,
    },
}

impl Served {
    /// Whether the cache answered.
    pub fn is_cache_hit(&self) -> bool {
        matches!(self, Served::Cache { .. })
    }
}

impl Default for Served {
    fn default() -> Self {
        Served::Provider {
            attempts: 1,
            fallbacks: 0,
            escalated: false,
        }
    }
}

/// A complete answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChatResponse {
    /// The answer's text.
    pub content: String,
    /// Tool calls the model made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The model that answered.
    pub model: String,
    /// The provider that answered (for a cache hit, the one that answered originally).
    pub provider: String,
    /// Tokens used: through a pipeline, by every call behind the answer (an escalated
    /// first answer and hedged calls that lost included). For a cache hit, the usage of
    /// the original answering call, which was not spent again: the hit's `cost` is zero
    /// and [`Served::Cache`] reports what it saved.
    pub usage: Usage,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// What this call cost: through a pipeline, every provider call behind the answer
    /// (an escalated first answer and hedged calls that lost included), as its usage
    /// record says; zero for a cache hit.
    pub cost: Cost,
    /// How it was served.
    pub served: Served,
    /// A cached answer to a similar question that a semantic cache guard refused to
    /// serve for this one (so it was asked of a provider, or a lesser match was served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard_rejected: Option<crate::types::GuardRejection>,
}

impl ChatResponse {
    /// A response as a provider returns it; the pipeline fills in cost and `served`.
    pub fn new(
        content: impl Into<String>,
        model: impl Into<String>,
        provider: impl Into<String>,
        usage: Usage,
        finish_reason: FinishReason,
    ) -> Self {
        ChatResponse {
            content: content.into(),
            tool_calls: Vec::new(),
            model: model.into(),
            provider: provider.into(),
            usage,
            finish_reason,
            cost: Cost::ZERO,
            served: Served::default(),
            guard_rejected: None,
        }
    }

    /// Adds tool calls.
    #[must_use]
    pub fn with_tool_calls(mut self, calls: Vec<ToolCall>) -> Self {
        self.tool_calls = calls;
        self
    }
}
