//! What goes in: [`ChatRequest`] and everything it carries.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the model.
    System,
    /// The person or program asking.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call.
    Tool,
}

/// A tool call made by the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id for the call.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments, as the JSON text the model produced.
    pub arguments: String,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub content: String,
    /// Tool calls made in an assistant message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// A tool result answering the call `tool_call_id`.
    pub fn tool(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            tool_call_id: Some(tool_call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }

    /// Adds tool calls (for an assistant message).
    #[must_use]
    pub fn with_tool_calls(mut self, calls: Vec<ToolCall>) -> Self {
        self.tool_calls = calls;
        self
    }
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Its name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// Its parameters as a JSON schema.
    #[serde(default)]
    pub parameters: serde_json::Value,
}

/// The shape the answer must take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResponseFormat {
    /// Free text.
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching a schema.
    JsonSchema {
        /// The schema's name.
        name: String,
        /// The schema.
        schema: serde_json::Value,
    },
}

/// Generation parameters. Every field changes the answer, so every field is part of
/// the exact cache key.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GenerationParams {
    /// The most output tokens. When absent, the model's maximum is assumed for
    /// worst-case budgeting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The answer's format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    /// How the model should choose tools (`"auto"`, `"none"`, `"required"` or a name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<String>,
}

/// A retrieved document passed along with the request, kept apart from the
/// conversation so context budgeting can trim documents by relevance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// An identifier, such as a URL or a chunk id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The text.
    pub text: String,
    /// Relevance to the request, higher is more relevant.
    #[serde(default)]
    pub score: f32,
}

impl Document {
    /// A document with `text` and relevance `score`.
    pub fn new(text: impl Into<String>, score: f32) -> Self {
        Document {
            id: None,
            text: text.into(),
            score,
        }
    }
}

/// A customer tier. Limits may scale by tier; routing may restrict it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Free users.
    Free,
    /// Paying users (the default).
    #[default]
    Standard,
    /// Premium users.
    Premium,
}

/// How urgent a request is; lower priorities are shed first under load.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Background work.
    Low,
    /// Ordinary traffic (the default).
    #[default]
    Normal,
    /// Interactive, latency-sensitive traffic.
    High,
}

/// What the cache may do for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Read and write the cache (the default).
    #[default]
    Use,
    /// Neither read nor write.
    Bypass,
    /// Skip the read, call the model, and write the fresh answer.
    Refresh,
}

/// A request's cache policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CachePolicy {
    /// Use, bypass or refresh.
    #[serde(default)]
    pub mode: CacheMode,
    /// The namespace; entries of different namespaces never match. Default: `"default"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Time to live for an answer stored by this request; overrides the cache's default.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration_ms"
    )]
    pub ttl: Option<Duration>,
    /// Tags for invalidation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl CachePolicy {
    /// The namespace, `"default"` when unset.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

mod opt_duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// Who is asking and how the request should be treated. None of it is sent to the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RequestMeta {
    /// The end user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The organisation or tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// The client's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The product feature making the call, for cost attribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    /// The customer tier.
    #[serde(default)]
    pub tier: Tier,
    /// The priority.
    #[serde(default)]
    pub priority: Priority,
    /// The cache policy.
    #[serde(default)]
    pub cache: CachePolicy,
    /// The most this request may cost. A stream is ended early when it reaches it; a
    /// whole request whose worst case exceeds it is refused before any call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost: Option<crate::types::Cost>,
    /// How long the caller is willing to wait for the answer. Set, and with a batch
    /// provider configured, the pipeline may gather the request into a provider batch
    /// (billed at the batch discount) instead of calling at once; see
    /// [`ChatRequest::deferrable`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration_ms"
    )]
    pub deferrable: Option<Duration>,
    /// Turns stream recovery off for this request: a stream cut after its first token
    /// ends with an error instead of being continued or restarted (see
    /// `PipelineBuilder::stream_recoveries`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_stream_recovery: bool,
}

/// A chat completion request.
///
/// ```
/// use tokenwise::{ChatRequest, Message};
/// let req = ChatRequest::new()
///     .model("gpt-4o-mini")
///     .message(Message::system("Be brief."))
///     .message(Message::user("What is GCRA?"))
///     .max_tokens(200)
///     .user("alice");
/// assert_eq!(req.last_user_text(), Some("What is GCRA?"));
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChatRequest {
    /// The model. When `None` the router chooses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The conversation, oldest first.
    pub messages: Vec<Message>,
    /// Generation parameters.
    #[serde(default)]
    pub params: GenerationParams,
    /// Retrieved documents with relevance scores.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<Document>,
    /// Who is asking and how to treat the request.
    #[serde(default)]
    pub meta: RequestMeta,
}

impl ChatRequest {
    /// An empty request; add messages with [`message`](Self::message).
    pub fn new() -> Self {
        Self::default()
    }

    /// A request with one user message.
    pub fn user_text(text: impl Into<String>) -> Self {
        Self::new().message(Message::user(text))
    }

    /// Sets the model.
    #[must_use]
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Appends a message.
    #[must_use]
    pub fn message(mut self, message: Message) -> Self {
        self.messages.push(message);
        self
    }

    /// Sets the most output tokens.
    #[must_use]
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.params.max_tokens = Some(n);
        self
    }

    /// Sets the temperature.
    #[must_use]
    pub fn temperature(mut self, t: f32) -> Self {
        self.params.temperature = Some(t);
        self
    }

    /// Appends a retrieved document.
    #[must_use]
    pub fn document(mut self, doc: Document) -> Self {
        self.documents.push(doc);
        self
    }

    /// Marks the request as able to wait up to `max_wait` for its answer (see
    /// [`RequestMeta::deferrable`]). With a batch provider configured, the pipeline
    /// gathers such requests into provider batches at the batch discount, and calls at
    /// once instead if the batch would not answer in time.
    #[must_use]
    pub fn deferrable(mut self, max_wait: Duration) -> Self {
        self.meta.deferrable = Some(max_wait);
        self
    }

    /// Turns stream recovery off for this request (see
    /// [`RequestMeta::no_stream_recovery`]).
    #[must_use]
    pub fn without_stream_recovery(mut self) -> Self {
        self.meta.no_stream_recovery = true;
        self
    }

    /// Sets the end user.
    #[must_use]
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.meta.user = Some(user.into());
        self
    }

    /// Sets the organisation.
    #[must_use]
    pub fn org(mut self, org: impl Into<String>) -> Self {
        self.meta.org = Some(org.into());
        self
    }

    /// Sets the client IP.
    #[must_use]
    pub fn ip(mut self, ip: impl Into<String>) -> Self {
        self.meta.ip = Some(ip.into());
        self
    }

    /// Sets the product feature.
    #[must_use]
    pub fn feature(mut self, feature: impl Into<String>) -> Self {
        self.meta.feature = Some(feature.into());
        self
    }

    /// Sets the tier.
    #[must_use]
    pub fn tier(mut self, tier: Tier) -> Self {
        self.meta.tier = tier;
        self
    }

    /// Sets the priority.
    #[must_use]
    pub fn priority(mut self, priority: Priority) -> Self {
        self.meta.priority = priority;
        self
    }

    /// Sets the most this request may cost (see [`RequestMeta::max_cost`]).
    #[must_use]
    pub fn max_cost(mut self, cost: crate::types::Cost) -> Self {
        self.meta.max_cost = Some(cost);
        self
    }

    /// Sets the cache mode.
    #[must_use]
    pub fn cache_mode(mut self, mode: CacheMode) -> Self {
        self.meta.cache.mode = mode;
        self
    }

    /// Sets the cache namespace.
    #[must_use]
    pub fn cache_namespace(mut self, ns: impl Into<String>) -> Self {
        self.meta.cache.namespace = Some(ns.into());
        self
    }

    /// Sets the TTL of an answer this request stores in the cache.
    #[must_use]
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.meta.cache.ttl = Some(ttl);
        self
    }

    /// Adds a cache tag.
    #[must_use]
    pub fn cache_tag(mut self, tag: impl Into<String>) -> Self {
        self.meta.cache.tags.push(tag.into());
        self
    }

    /// The text of the final user message, if the conversation ends with one.
    pub fn last_user_text(&self) -> Option<&str> {
        match self.messages.last() {
            Some(m) if m.role == Role::User => Some(&m.content),
            _ => None,
        }
    }

    /// Checks what every provider would reject anyway: no messages, or parameters out
    /// of range.
    pub fn validate(&self) -> crate::Result<()> {
        use crate::Error;
        if self.messages.is_empty() {
            return Err(Error::InvalidRequest("the request has no messages".into()));
        }
        if self.params.max_tokens == Some(0) {
            return Err(Error::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        if let Some(t) = self.params.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(Error::InvalidRequest(format!(
                    "temperature must be between 0 and 2, got {t}"
                )));
            }
        }
        if let Some(p) = self.params.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::InvalidRequest(format!(
                    "top_p must be between 0 and 1, got {p}"
                )));
            }
        }
        if self.documents.iter().any(|d| !d.score.is_finite()) {
            return Err(Error::InvalidRequest(
                "document scores must be finite numbers".into(),
            ));
        }
        Ok(())
    }
}
