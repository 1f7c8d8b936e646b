//! Streamed answers: [`StreamEvent`] and [`ChatStream`].

use std::pin::Pin;

use futures_core::Stream;
use serde::{Deserialize, Serialize};

use super::{ChatResponse, Cost, FinishReason, Served, Usage};

/// A piece of a tool call, as streamed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ToolCallDelta {
    /// Which tool call of the answer this piece belongs to.
    pub index: u32,
    /// The call's id (usually only on the first piece).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The tool's name (usually only on the first piece).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A fragment of the arguments' JSON text.
    #[serde(default)]
    pub arguments: String,
}

impl ToolCallDelta {
    /// A fragment of tool call `index`.
    pub fn new(index: u32, arguments: impl Into<String>) -> Self {
        ToolCallDelta {
            index,
            id: None,
            name: None,
            arguments: arguments.into(),
        }
    }
}

/// The last event of a stream that finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StreamEnd {
    /// Why generation stopped. [`FinishReason::Truncated`] when a tokenwise limit ended it.
    pub finish_reason: FinishReason,
    /// The model that answered.
    pub model: String,
    /// The provider that answered.
    pub provider: String,
    /// Tokens used, as reported or counted.
    pub usage: Usage,
    /// What the stream cost.
    pub cost: Cost,
    /// How it was served.
    pub served: Served,
    /// Set when a tokenwise limit ended the stream early (`finish_reason` is then
    /// [`FinishReason::Truncated`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<Truncation>,
    /// A cached answer to a similar question that a semantic cache guard refused to
    /// serve for this one (see [`ChatResponse::guard_rejected`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard_rejected: Option<crate::types::GuardRejection>,
}

/// Which limit ended a stream early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "limit", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Truncation {
    /// The request's `max_tokens` was reached (the provider did not stop on its own).
    OutputTokens {
        /// The limit.
        max_tokens: u64,
    },
    /// The request's cost limit was reached.
    Cost {
        /// The limit.
        max_cost: Cost,
    },
}

impl StreamEnd {
    /// An end as a provider emits it; the pipeline fills in usage, cost and `served`.
    pub fn new(
        finish_reason: FinishReason,
        model: impl Into<String>,
        provider: impl Into<String>,
    ) -> Self {
        StreamEnd {
            finish_reason,
            model: model.into(),
            provider: provider.into(),
            usage: Usage::default(),
            cost: Cost::ZERO,
            served: Served::default(),
            truncated: None,
            guard_rejected: None,
        }
    }

    /// The end of a replayed (cached) answer.
    pub(crate) fn of_response(r: &ChatResponse) -> Self {
        StreamEnd {
            finish_reason: r.finish_reason.clone(),
            model: r.model.clone(),
            provider: r.provider.clone(),
            usage: r.usage,
            cost: r.cost,
            served: r.served.clone(),
            truncated: None,
            guard_rejected: r.guard_rejected.clone(),
        }
    }
}

/// One event of a streamed answer.
///
/// A well-formed stream is any number of deltas, at most one `Usage`, then exactly one
/// `Done`. A stream that ends without `Done`, or yields an `Err`, did not complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum StreamEvent {
    /// More answer text.
    TextDelta {
        /// The text.
        text: String,
    },
    /// More of a tool call.
    ToolCallDelta(ToolCallDelta),
    /// Token usage, as the provider reported it.
    Usage(Usage),
    /// The stream finished.
    Done(StreamEnd),
}

impl StreamEvent {
    /// A text delta.
    pub fn text(text: impl Into<String>) -> Self {
        StreamEvent::TextDelta { text: text.into() }
    }
}

/// A streamed answer: events until `Done`, or an error.
pub type ChatStream = Pin<Box<dyn Stream<Item = crate::Result<StreamEvent>> + Send + 'static>>;
