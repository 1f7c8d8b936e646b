//! The Anthropic Messages API.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{
    Asked, Auth, EventError, HttpCore, HttpSettings, Sent, StreamEnding, Translate,
    classify_payload, documents_text, http_builder_methods, http_provider_accessors, replay,
    sse_stream,
};
use super::keys::ApiKey;
use super::openai::parameters;
use super::prompt_cache::{self, PromptCacheTtl, PromptCaching, SharedCaching};
use super::sse::SseEvent;
use super::{Provider, ProviderCall};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::types::{
    ChatResponse, ChatStream, FinishReason, ResponseFormat, Role, StreamEvent, ToolCall,
    ToolCallDelta, Usage,
};
use crate::{Error, Result};

/// Anthropic's API base URL.
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
/// The `anthropic-version` header sent by default.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Streamed tool-use blocks tracked per answer; further blocks are not forwarded.
const MAX_TOOL_BLOCKS: usize = 128;

/// Builds an [`Anthropic`] provider.
#[derive(Debug, Clone)]
#[must_use]
pub struct AnthropicBuilder {
    http: HttpSettings,
    version: String,
    caching: PromptCaching,
}

impl AnthropicBuilder {
    http_builder_methods!();

    /// The `anthropic-version` header (default [`ANTHROPIC_VERSION`]).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Where prompt-cache breakpoints go (default: [`PromptCaching::default`], on).
    pub fn prompt_caching(mut self, caching: PromptCaching) -> Self {
        self.caching = caching;
        self
    }

    /// The lifetime of cached prompt prefixes (default five minutes).
    pub fn prompt_cache_ttl(mut self, ttl: PromptCacheTtl) -> Self {
        self.caching.ttl = ttl;
        self
    }

    /// The lifetime of cached prompt prefixes for requests whose `meta.feature` is
    /// `feature`.
    pub fn prompt_cache_ttl_for(mut self, feature: impl Into<String>, ttl: PromptCacheTtl) -> Self {
        self.caching.routes.insert(feature.into(), ttl);
        self
    }

    /// Adds an `anthropic-beta` feature flag.
    pub fn beta(mut self, feature: &str) -> Self {
        let value = match self
            .http
            .headers
            .get("anthropic-beta")
            .and_then(|v| v.to_str().ok())
        {
            Some(existing) => format!("{existing},{feature}"),
            None => feature.to_owned(),
        };
        self.http.header("anthropic-beta", &value);
        self
    }

    /// Builds the provider, or reports the first invalid setting. A key is required.
    pub fn build(mut self) -> Result<Anthropic> {
        let version = self.version.clone();
        self.http.header("anthropic-version", &version);
        let core = self.http.build(true)?;
        Ok(Anthropic {
            core: Arc::new(core),
            caching: Arc::new(self.caching),
        })
    }
}

/// A provider for the Anthropic Messages API (`{base_url}/v1/messages`).
///
/// - System messages (and the request's documents) become the top-level `system`
///   prompt; tool calls and results become `tool_use` and `tool_result` blocks;
///   consecutive messages of one role are merged, as the API expects.
/// - `max_tokens` is required by the API: without one, the model's maximum output from
///   the catalogue is sent.
/// - A JSON [`ResponseFormat`] has no Messages API field: it becomes an instruction at
///   the end of the system prompt (with the schema, if any).
/// - Streams: `message_start`, `content_block_start` / `_delta` (text and
///   `input_json_delta`) / `_stop`, `message_delta` (stop reason and usage), `ping`,
///   `error` and `message_stop` are read; a stream without `message_stop` is an error.
/// - Usage: `input_tokens` counts the prompt including cache reads and writes
///   (`input_tokens + cache_read_input_tokens + cache_creation_input_tokens`);
///   `cached_input_tokens` is the cache reads.
///
/// Keys, deadlines, limits and errors work as for
/// [`OpenAiCompatible`](super::OpenAiCompatible). Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> tokenwise::Result<()> {
/// use tokenwise::provider::Anthropic;
/// use tokenwise::{ChatRequest, Pipeline};
///
/// let anthropic = Anthropic::builder()
///     .api_key(std::env::var("ANTHROPIC_API_KEY").unwrap_or_default())
///     .build()?;
/// let pipeline = Pipeline::builder().provider(anthropic).default_model("claude-haiku-4-5").build()?;
/// let answer = pipeline.chat(ChatRequest::user_text("Say hi")).await?;
/// println!("{}", answer.content);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Anthropic {
    core: Arc<HttpCore>,
    caching: SharedCaching,
}

impl fmt::Debug for Anthropic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Anthropic")
            .field("core", &self.core)
            .field("caching", &self.caching)
            .finish()
    }
}

impl Anthropic {
    /// A builder named `anthropic`, for [`ANTHROPIC_BASE_URL`], with default deadlines and
    /// limits; add a key.
    pub fn builder() -> AnthropicBuilder {
        AnthropicBuilder {
            http: HttpSettings::new(
                "anthropic",
                ANTHROPIC_BASE_URL,
                Auth::Header(reqwest::header::HeaderName::from_static("x-api-key")),
            ),
            version: ANTHROPIC_VERSION.to_owned(),
            caching: PromptCaching::default(),
        }
    }

    /// A builder from the environment: the key from `ANTHROPIC_API_KEY` (required) and
    /// the base URL from `ANTHROPIC_BASE_URL` (optional).
    pub fn from_env() -> Result<AnthropicBuilder> {
        let key = ApiKey::from_env("ANTHROPIC_API_KEY")
            .ok_or_else(|| Error::Config("ANTHROPIC_API_KEY is not set".into()))?;
        let mut b = Self::builder().api_key(key);
        if let Ok(url) = std::env::var("ANTHROPIC_BASE_URL") {
            if !url.trim().is_empty() {
                b = b.base_url(url);
            }
        }
        Ok(b)
    }

    http_provider_accessors!(core);

    /// The HTTP machinery (for the batch client).
    pub(crate) fn core(&self) -> &Arc<HttpCore> {
        &self.core
    }

    pub(crate) fn body(&self, call: &ProviderCall<'_>, streaming: bool) -> Result<Vec<u8>> {
        let req = call.request;
        let p = &req.params;
        let marks = prompt_cache::breakpoints(&self.caching, req, call.prompt_tokens);
        let mut history_mark: Option<(usize, usize)> = None;
        let mut system: Vec<String> = Vec::new();
        let mut messages: Vec<(&'static str, Vec<Value>)> = Vec::new();
        for (i, m) in req.messages.iter().enumerate() {
            let (role, blocks) = match m.role {
                Role::System => {
                    system.push(m.content.clone());
                    continue;
                }
                Role::User => ("user", text_block(&m.content).into_iter().collect()),
                Role::Assistant => {
                    let mut blocks: Vec<Value> = text_block(&m.content).into_iter().collect();
                    for c in &m.tool_calls {
                        let input: Value = if c.arguments.trim().is_empty() {
                            json!({})
                        } else {
                            serde_json::from_str(&c.arguments).map_err(|e| {
                                Error::InvalidRequest(format!(
                                    "tool call `{}` has arguments that are not JSON: {e}",
                                    c.id
                                ))
                            })?
                        };
                        blocks.push(json!({
                            "type": "tool_use", "id": c.id, "name": c.name, "input": input,
                        }));
                    }
                    ("assistant", blocks)
                }
                Role::Tool => (
                    "user",
                    vec![json!({
                        "type": "tool_result",
                        "tool_use_id": m.tool_call_id.as_deref().unwrap_or_default(),
                        "content": m.content,
                    })],
                ),
            };
            let blocks = if blocks.is_empty() {
                vec![json!({"type": "text", "text": m.content})]
            } else {
                blocks
            };
            match messages.last_mut() {
                Some((r, existing)) if *r == role => existing.extend(blocks),
                _ => messages.push((role, blocks)),
            }
            if marks.history == Some(i) {
                history_mark = messages
                    .last()
                    .map(|(_, b)| (messages.len() - 1, b.len() - 1));
            }
        }
        // (text, ends a cached section)
        let mut system: Vec<(String, bool)> = vec![(system.join("\n\n"), marks.system)];
        if let Some(d) = documents_text(&req.documents) {
            system.push((d, marks.documents));
        }
        match &p.response_format {
            Some(ResponseFormat::JsonObject) => system.push((
                "Answer with a single JSON object and nothing else.".into(),
                false,
            )),
            Some(ResponseFormat::JsonSchema { name, schema }) => system.push((
                format!(
                    "Answer with a single JSON object and nothing else, matching the JSON \
                     schema `{name}`:\n{schema}"
                ),
                false,
            )),
            Some(ResponseFormat::Text) | None => {}
        }
        let max_tokens = call.model.output_allowance(p.max_tokens);
        let cache_control = self.caching.ttl_for(req).cache_control();
        if let Some((m, b)) = history_mark {
            if let Some(block) = messages.get_mut(m).and_then(|(_, bs)| bs.get_mut(b)) {
                block["cache_control"] = cache_control.clone();
            }
        }
        let messages: Vec<Value> = messages
            .into_iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect();
        system.retain(|(text, _)| !text.is_empty());
        let mut body = json!({
            "model": call.model.name,
            "max_tokens": max_tokens,
            "messages": messages,
        });
        let obj = match body.as_object_mut() {
            Some(o) => o,
            None => return Err(Error::InvalidRequest("request body".into())),
        };
        if system.iter().any(|(_, mark)| *mark) {
            // as blocks, so that a breakpoint can end the system prompt or the documents
            let blocks: Vec<Value> = system
                .iter()
                .map(|(text, mark)| {
                    let mut b = json!({"type": "text", "text": text});
                    if *mark {
                        b["cache_control"] = cache_control.clone();
                    }
                    b
                })
                .collect();
            obj.insert("system".into(), blocks.into());
        } else if !system.is_empty() {
            let texts: Vec<&str> = system.iter().map(|(t, _)| t.as_str()).collect();
            obj.insert("system".into(), texts.join("\n\n").into());
        }
        if let Some(t) = p.temperature {
            obj.insert("temperature".into(), json!(t));
        }
        if let Some(t) = p.top_p {
            obj.insert("top_p".into(), json!(t));
        }
        if !p.stop.is_empty() {
            obj.insert("stop_sequences".into(), json!(p.stop));
        }
        if !p.tools.is_empty() {
            let tools: Vec<Value> = p
                .tools
                .iter()
                .map(|t| {
                    let mut v = json!({"name": t.name, "input_schema": parameters(&t.parameters)});
                    if !t.description.is_empty() {
                        v["description"] = json!(t.description);
                    }
                    v
                })
                .collect();
            let mut tools = tools;
            if let (true, Some(last)) = (marks.tools, tools.last_mut()) {
                last["cache_control"] = cache_control.clone();
            }
            obj.insert("tools".into(), tools.into());
        }
        if let Some(choice) = &p.tool_choice {
            let v = match choice.as_str() {
                "auto" => json!({"type": "auto"}),
                "none" => json!({"type": "none"}),
                "required" | "any" => json!({"type": "any"}),
                name => json!({"type": "tool", "name": name}),
            };
            obj.insert("tool_choice".into(), v);
        }
        if streaming {
            obj.insert("stream".into(), true.into());
        }
        serde_json::to_vec(&body)
            .map_err(|e| Error::InvalidRequest(format!("the request cannot be encoded: {e}")))
    }

    /// The answer in `v`, with the usage the API reported (not yet checked).
    pub(crate) fn parse_response(
        &self,
        call: &ProviderCall<'_>,
        v: Value,
        status: u16,
    ) -> std::result::Result<(ChatResponse, Option<Usage>), ProviderError> {
        let core = &self.core;
        let w: WireMessage = serde_json::from_value(v).map_err(|e| {
            core.error(
                ProviderErrorKind::InvalidResponse,
                format!("unexpected response shape: {e}"),
            )
            .with_status(status)
        })?;
        let mut text = String::new();
        let mut calls = Vec::new();
        for block in w.content {
            match block.kind.as_str() {
                "text" => text.push_str(block.text.as_deref().unwrap_or_default()),
                "tool_use" => calls.push(ToolCall {
                    id: block.id.unwrap_or_default(),
                    name: block.name.unwrap_or_default(),
                    arguments: block
                        .input
                        .map_or_else(|| "{}".to_owned(), |i| i.to_string()),
                }),
                // Thinking and other blocks are not part of the answer's text.
                _ => {}
            }
        }
        let finish = w
            .stop_reason
            .as_deref()
            .map_or(FinishReason::Other("unknown".into()), stop_reason);
        let usage = w.usage.and_then(|u| UsageParts::default().merge(u).usage());
        Ok((
            ChatResponse::new(text, &call.model.name, &core.name, Usage::default(), finish)
                .with_tool_calls(calls),
            usage,
        ))
    }

    /// Reads, parses and settles a whole answer.
    async fn whole(
        &self,
        call: &ProviderCall<'_>,
        resp: &mut crate::provider::http::Response,
        sent: &Sent,
    ) -> Result<ChatResponse> {
        let core = &self.core;
        let status = resp.status().as_u16();
        let bytes = core.read_body(resp, sent).await?;
        let v = core.parse_json(status, &bytes)?;
        drop(bytes);
        let (r, reported) = self.parse_response(call, v, status)?;
        Ok(core.settle_answer(call, r, reported, sent).await)
    }
}

fn text_block(text: &str) -> Option<Value> {
    (!text.is_empty()).then(|| json!({"type": "text", "text": text}))
}

/// Maps an Anthropic `stop_reason`.
fn stop_reason(s: &str) -> FinishReason {
    match s {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_owned()),
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn name(&self) -> &str {
        &self.core.name
    }

    async fn chat(&self, call: ProviderCall<'_>) -> Result<ChatResponse> {
        let body = self.body(&call, false)?;
        let core = &self.core;
        let (mut resp, sent) = core
            .post(
                "/v1/messages",
                &call.model.name,
                body,
                false,
                super::token_estimate(&call),
            )
            .await?;
        self.whole(&call, &mut resp, &sent).await
    }

    async fn stream(&self, call: ProviderCall<'_>) -> Result<ChatStream> {
        let body = self.body(&call, true)?;
        let core = &self.core;
        let (mut resp, sent) = core
            .post(
                "/v1/messages",
                &call.model.name,
                body,
                true,
                super::token_estimate(&call),
            )
            .await?;
        if HttpCore::is_json(&resp) {
            return Ok(replay(self.whole(&call, &mut resp, &sent).await?));
        }
        let translator = AnthropicStream {
            asked: Asked::new(call.request, call.model),
            usage: UsageParts::default(),
            tools: HashMap::new(),
            delivered: String::new(),
            finish: None,
        };
        Ok(sse_stream(Arc::clone(core), resp, sent, translator))
    }
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    content: Vec<WireBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    /// The writes by lifetime.
    #[serde(default)]
    cache_creation: Option<WireCacheCreation>,
}

#[derive(Debug, Default, Deserialize)]
struct WireCacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: Option<u64>,
}

/// Usage as it accumulates over a stream: later reports override earlier ones.
#[derive(Debug, Default, Clone, Copy)]
struct UsageParts {
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_write: Option<u64>,
    cache_write_1h: Option<u64>,
}

impl UsageParts {
    fn merge(mut self, u: WireUsage) -> Self {
        self.input = u.input_tokens.or(self.input);
        self.output = u.output_tokens.or(self.output);
        self.cache_read = u.cache_read_input_tokens.or(self.cache_read);
        self.cache_write = u.cache_creation_input_tokens.or(self.cache_write);
        self.cache_write_1h = u
            .cache_creation
            .and_then(|c| c.ephemeral_1h_input_tokens)
            .or(self.cache_write_1h);
        self
    }

    fn usage(&self) -> Option<Usage> {
        if self.input.is_none() && self.output.is_none() {
            return None;
        }
        let read = self.cache_read.unwrap_or(0);
        let write = self.cache_write.unwrap_or(0);
        let write_1h = self.cache_write_1h.unwrap_or(0).min(write);
        let input = self
            .input
            .unwrap_or(0)
            .saturating_add(read)
            .saturating_add(write);
        Some(
            Usage::new(input, self.output.unwrap_or(0))
                .with_cached_input(read)
                .with_cache_writes(write - write_1h, write_1h),
        )
    }
}

#[derive(Debug, Deserialize)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    message: Option<WireStartMessage>,
    #[serde(default)]
    content_block: Option<WireBlock>,
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireStartMessage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireDelta {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Turns Messages API stream events into stream events.
struct AnthropicStream {
    asked: Asked,
    usage: UsageParts,
    /// Content block index → tool call index.
    tools: HashMap<u64, u32>,
    delivered: String,
    finish: Option<FinishReason>,
}

impl Translate for AnthropicStream {
    fn event(
        &mut self,
        core: &HttpCore,
        ev: SseEvent,
        out: &mut VecDeque<StreamEvent>,
    ) -> std::result::Result<bool, EventError> {
        let data = ev.data.trim();
        if data.is_empty() {
            return Ok(ev.event == "message_stop");
        }
        let v = core.event_json(&ev, data)?;
        if ev.event == "error" || v.get("type").and_then(Value::as_str) == Some("error") {
            return Err(classify_payload(&core.name, &v).into());
        }
        let e: WireEvent = serde_json::from_value(v)
            .map_err(|e| EventError::Malformed(format!("unexpected stream event shape: {e}")))?;
        match e.kind.as_str() {
            "message_start" => {
                if let Some(u) = e.message.and_then(|m| m.usage) {
                    self.usage = self.usage.merge(u);
                }
            }
            "content_block_start" => {
                let Some(block) = e.content_block else {
                    return Ok(false);
                };
                match block.kind.as_str() {
                    "tool_use" => {
                        let Some(index) = e.index else {
                            return Ok(false);
                        };
                        if self.tools.len() >= MAX_TOOL_BLOCKS {
                            return Ok(false);
                        }
                        let n = u32::try_from(self.tools.len()).unwrap_or(u32::MAX);
                        self.tools.insert(index, n);
                        let mut d = ToolCallDelta::new(n, String::new());
                        d.id = block.id;
                        d.name = block.name;
                        out.push_back(StreamEvent::ToolCallDelta(d));
                    }
                    "text" => {
                        if let Some(t) = block.text.filter(|t| !t.is_empty()) {
                            self.delivered.push_str(&t);
                            out.push_back(StreamEvent::text(t));
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let Some(delta) = e.delta else {
                    return Ok(false);
                };
                match delta.kind.as_deref() {
                    Some("text_delta") => {
                        if let Some(t) = delta.text.filter(|t| !t.is_empty()) {
                            self.delivered.push_str(&t);
                            out.push_back(StreamEvent::text(t));
                        }
                    }
                    Some("input_json_delta") => {
                        let tool = e.index.and_then(|i| self.tools.get(&i).copied());
                        if let (Some(n), Some(json)) = (tool, delta.partial_json) {
                            if !json.is_empty() {
                                self.delivered.push_str(&json);
                                out.push_back(StreamEvent::ToolCallDelta(ToolCallDelta::new(
                                    n, json,
                                )));
                            }
                        }
                    }
                    // Thinking, signatures and citations are not part of the answer.
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(r) = e.delta.and_then(|d| d.stop_reason) {
                    self.finish = Some(stop_reason(&r));
                }
                if let Some(u) = e.usage {
                    self.usage = self.usage.merge(u);
                }
            }
            "message_stop" => return Ok(true),
            // `ping`, `content_block_stop` and event types added later carry nothing
            // tokenwise needs.
            _ => {}
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
        StreamEnding {
            delivered: std::mem::take(&mut self.delivered),
            usage: self.usage.usage(),
            finish: self.finish.take(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Catalog, ChatRequest, Message, Tool};

    #[test]
    fn request_body_maps_system_tools_and_results() {
        let p = Anthropic::builder().api_key("k").build().unwrap();
        let cat = Catalog::builtin();
        let m = cat.require("claude-haiku-4-5").unwrap();
        let mut req = ChatRequest::new()
            .message(Message::system("Be brief."))
            .message(Message::user("Weather in Paris and Rome?"))
            .message(Message::assistant("Checking.").with_tool_calls(vec![
                ToolCall {
                    id: "t1".into(),
                    name: "weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                },
                ToolCall {
                    id: "t2".into(),
                    name: "weather".into(),
                    arguments: r#"{"city":"Rome"}"#.into(),
                },
            ]))
            .message(Message::tool("t1", "18C"))
            .message(Message::tool("t2", "25C"));
        req.params.stop = vec!["END".into()];
        req.params.tools = vec![Tool {
            name: "weather".into(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }];
        req.params.tool_choice = Some("required".into());
        req.params.response_format = Some(ResponseFormat::JsonObject);
        let body: Value =
            serde_json::from_slice(&p.body(&ProviderCall::new(&req, m), true).unwrap()).unwrap();
        assert_eq!(body["model"], "claude-haiku-4-5");
        assert_eq!(body["max_tokens"], 64_000);
        assert!(
            body["system"]
                .as_str()
                .unwrap()
                .starts_with("Be brief.\n\n")
        );
        assert!(body["system"].as_str().unwrap().contains("JSON object"));
        assert_eq!(body["stop_sequences"], json!(["END"]));
        assert_eq!(body["stream"], true);
        assert_eq!(body["tool_choice"], json!({"type": "any"}));
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
        assert!(body["tools"][0].get("description").is_none());
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert_eq!(msgs[1]["content"][1]["type"], "tool_use");
        assert_eq!(msgs[1]["content"][2]["input"]["city"], "Rome");
        // Both results in one user turn.
        assert_eq!(msgs[2]["role"], "user");
        assert_eq!(msgs[2]["content"][1]["tool_use_id"], "t2");

        let bad =
            ChatRequest::new().message(Message::assistant("").with_tool_calls(vec![ToolCall {
                id: "t".into(),
                name: "n".into(),
                arguments: "{not json".into(),
            }]));
        assert!(matches!(
            p.body(&ProviderCall::new(&bad, m), false),
            Err(Error::InvalidRequest(_))
        ));
    }

    #[test]
    fn stop_reasons_and_usage() {
        assert_eq!(stop_reason("end_turn"), FinishReason::Stop);
        assert_eq!(stop_reason("stop_sequence"), FinishReason::Stop);
        assert_eq!(stop_reason("max_tokens"), FinishReason::Length);
        assert_eq!(stop_reason("tool_use"), FinishReason::ToolCalls);
        assert_eq!(stop_reason("refusal"), FinishReason::ContentFilter);
        let u = UsageParts::default()
            .merge(WireUsage {
                input_tokens: Some(10),
                output_tokens: Some(1),
                cache_read_input_tokens: Some(100),
                cache_creation_input_tokens: Some(20),
                cache_creation: None,
            })
            .merge(WireUsage {
                output_tokens: Some(15),
                ..WireUsage::default()
            })
            .usage()
            .unwrap();
        assert_eq!(
            u,
            Usage::new(130, 15)
                .with_cached_input(100)
                .with_cache_writes(20, 0)
        );
    }

    /// Feeds `body` to the whole-answer parser and `stream` to the stream translator:
    /// nothing panics, and what is kept is bounded by the input.
    fn feed(p: &Anthropic, body: &[u8], stream: &[u8]) {
        let cat = Catalog::builtin();
        let req = ChatRequest::new().message(Message::user("hi"));
        let m = cat.require("claude-haiku-4-5").unwrap();
        let call = ProviderCall::new(&req, m);
        let core = &p.core;
        if let Ok(v) = core.parse_json(200, body) {
            if let Ok((r, _usage)) = p.parse_response(&call, v, 200) {
                assert!(r.content.len() <= body.len());
            }
        }
        let mut decoder = crate::provider::sse::SseDecoder::with_max_event_bytes(1024);
        let mut events = Vec::new();
        let _ = decoder.feed(stream, &mut events);
        let mut t = AnthropicStream {
            asked: Asked::new(&req, m),
            usage: UsageParts::default(),
            tools: HashMap::new(),
            delivered: String::new(),
            finish: None,
        };
        let mut out = VecDeque::new();
        for ev in events {
            assert!(ev.data.len() <= 1024);
            if t.event(core, ev, &mut out).is_err() {
                break;
            }
        }
        assert!(t.delivered.len() <= stream.len());
        assert!(t.tools.len() <= MAX_TOOL_BLOCKS);
        let _ = t.ending();
    }

    fn fuzz(cases: u32) {
        let p = Anthropic::builder().api_key("k").build().unwrap();
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
