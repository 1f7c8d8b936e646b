//! OpenAI's chat completions wire format: the request JSON into a [`ChatRequest`], and
//! answers out as `chat.completion` objects or `chat.completion.chunk` events.
//!
//! Parsing walks the JSON by hand so that every refusal names the parameter at fault
//! (`messages[1].content`, `stop`, ...). Unknown top-level fields are refused, as OpenAI
//! does: a misspelt `max_token` must not silently lift a cost limit.

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokenwise::{
    ChatRequest, ChatResponse, FinishReason, Message, ResponseFormat, Role, Tool, ToolCall,
    ToolCallDelta, Usage,
};

use super::error::ApiError;

/// A parsed `POST /v1/chat/completions` body.
#[derive(Debug)]
pub struct Parsed {
    /// The request for the pipeline (its `meta` is filled in by the caller).
    pub request: ChatRequest,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
}

/// Fields accepted and ignored whatever their value: they change nothing the gateway
/// sends upstream. `user` in particular: identity comes from the API key only, so a
/// client cannot step around its per-user limits by changing it.
const IGNORED: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "parallel_tool_calls",
];

/// Fields accepted only at their neutral value (what clients send by default), since
/// the gateway cannot honour anything else.
fn neutral(name: &str, v: &Value) -> Option<bool> {
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    Some(match name {
        "n" => v.as_u64() == Some(1),
        "frequency_penalty" | "presence_penalty" => zero(v),
        "logprobs" => v.as_bool() == Some(false),
        "top_logprobs" => v.as_u64() == Some(0),
        "logit_bias" => v.as_object().is_some_and(Map::is_empty),
        "functions" | "function_call" | "reasoning_effort" | "modalities" | "audio"
        | "prediction" | "web_search_options" | "verbosity" => false,
        _ => return None,
    })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        "invalid_type",
        param,
        format!(
            "Invalid type for `{param}`: expected {expected}, got {}.",
            kind_of(got)
        ),
    )
}

fn missing(param: &str) -> ApiError {
    ApiError::invalid(
        "missing_required_parameter",
        param,
        format!("Missing required parameter: `{param}`."),
    )
}

fn unknown(param: &str) -> ApiError {
    ApiError::invalid(
        "unknown_parameter",
        param,
        format!("Unrecognized request argument supplied: `{param}`."),
    )
}

fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid("unsupported_parameter", param, message)
}

/// A field, treating `null` as absent.
fn get<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn string<'a>(v: &'a Value, param: &str) -> Result<&'a str, ApiError> {
    v.as_str().ok_or_else(|| wrong_type(param, "a string", v))
}

fn object<'a>(v: &'a Value, param: &str) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| wrong_type(param, "an object", v))
}

fn array<'a>(v: &'a Value, param: &str) -> Result<&'a Vec<Value>, ApiError> {
    v.as_array().ok_or_else(|| wrong_type(param, "an array", v))
}

/// Refuses keys of `obj` outside `allowed`, naming the first one found.
fn only(obj: &Map<String, Value>, allowed: &[&str], prefix: &str) -> Result<(), ApiError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(unknown(&format!("{prefix}.{k}"))),
        None => Ok(()),
    }
}

fn number(v: &Value, param: &str, lo: f64, hi: f64) -> Result<f32, ApiError> {
    let x = v.as_f64().ok_or_else(|| wrong_type(param, "a number", v))?;
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            "invalid_value",
            param,
            format!("`{param}` must be between {lo} and {hi}, got {x}."),
        ));
    }
    Ok(x as f32)
}

fn positive_u32(v: &Value, param: &str) -> Result<u32, ApiError> {
    match v.as_u64().map(u32::try_from) {
        Some(Ok(n)) if n > 0 => Ok(n),
        _ if v.is_number() => Err(ApiError::invalid(
            "invalid_value",
            param,
            format!("`{param}` must be a whole number from 1 to {}.", u32::MAX),
        )),
        _ => Err(wrong_type(param, "an integer", v)),
    }
}

/// Parses a chat completions request body.
///
/// The common request (text messages, the sampling parameters, `stream`) is read
/// straight into its shape; any other body, and any body that is refused, is walked as
/// a JSON tree, which gives the same request or names the parameter at fault.
pub fn parse_chat(body: &[u8]) -> Result<Parsed, ApiError> {
    match fast::parse(body) {
        Some(parsed) => Ok(parsed),
        None => parse_tree(body),
    }
}

/// [`parse_chat`] through a JSON tree.
fn parse_tree(body: &[u8]) -> Result<Parsed, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "invalid_json",
            "",
            "The request body is empty: expected a JSON object.",
        ));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            "",
            format!("The request body is not valid JSON: {e}."),
        )
    })?;
    let obj = v.as_object().ok_or_else(|| {
        ApiError::invalid(
            "invalid_json",
            "",
            format!(
                "The request body must be a JSON object, got {}.",
                kind_of(&v)
            ),
        )
    })?;

    let mut req = ChatRequest::new();
    let mut stream = false;
    let mut include_usage = false;
    let mut max_tokens = None;
    let mut max_completion_tokens = None;
    for (name, value) in obj {
        let name = name.as_str();
        if value.is_null() || IGNORED.contains(&name) {
            continue;
        }
        match name {
            "model" => {
                let m = string(value, name)?.trim();
                if m.is_empty() {
                    return Err(ApiError::invalid(
                        "invalid_value",
                        name,
                        "`model` is empty.",
                    ));
                }
                // "auto" lets the gateway's router choose, like leaving it out.
                if m != "auto" {
                    req.model = Some(m.to_owned());
                }
            }
            "messages" => {
                for (i, m) in array(value, name)?.iter().enumerate() {
                    req.messages.push(message(m, &format!("messages[{i}]"))?);
                }
            }
            "max_tokens" => max_tokens = Some(positive_u32(value, name)?),
            "max_completion_tokens" => max_completion_tokens = Some(positive_u32(value, name)?),
            "temperature" => req.params.temperature = Some(number(value, name, 0.0, 2.0)?),
            "top_p" => req.params.top_p = Some(number(value, name, 0.0, 1.0)?),
            "stop" => req.params.stop = stop(value)?,
            "seed" => {
                req.params.seed = Some(value.as_u64().ok_or_else(|| {
                    if value.is_number() {
                        ApiError::invalid(
                            "invalid_value",
                            name,
                            "`seed` must be a non-negative integer.",
                        )
                    } else {
                        wrong_type(name, "an integer", value)
                    }
                })?);
            }
            "response_format" => req.params.response_format = Some(response_format(value)?),
            "tools" => {
                for (i, t) in array(value, name)?.iter().enumerate() {
                    req.params.tools.push(tool(t, &format!("tools[{i}]"))?);
                }
            }
            "tool_choice" => req.params.tool_choice = Some(tool_choice(value)?),
            "stream" => {
                stream = value
                    .as_bool()
                    .ok_or_else(|| wrong_type(name, "a boolean", value))?;
            }
            "stream_options" => {
                let o = object(value, name)?;
                only(o, &["include_usage", "include_obfuscation"], name)?;
                if let Some(u) = get(o, "include_usage") {
                    include_usage = u.as_bool().ok_or_else(|| {
                        wrong_type("stream_options.include_usage", "a boolean", u)
                    })?;
                }
            }
            other => match neutral(other, value) {
                Some(true) => {}
                Some(false) => {
                    return Err(unsupported(
                        other,
                        format!(
                            "`{other}` is not supported by this gateway (only its default value is accepted)."
                        ),
                    ));
                }
                None => return Err(unknown(other)),
            },
        }
    }
    if !obj.contains_key("messages") || obj.get("messages").is_some_and(Value::is_null) {
        return Err(missing("messages"));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "invalid_value",
            "messages",
            "`messages` must contain at least one message.",
        ));
    }
    // `max_completion_tokens` is OpenAI's current name; it wins when both are sent.
    req.params.max_tokens = max_completion_tokens.or(max_tokens);
    Ok(Parsed {
        request: req,
        stream,
        include_usage: stream && include_usage,
    })
}

/// The common request read straight into its shape, without a JSON tree. Gives up
/// (`None`) on anything it does not take exactly as [`parse_tree`] does: a field it does
/// not know, a value of another type or out of range, content parts, tool calls, a
/// repeated field. The tree then decides.
mod fast {
    use std::borrow::Cow;

    use serde::Deserialize;
    use serde_json::Value;
    use tokenwise::{ChatRequest, Message, Role};

    use super::Parsed;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body<'a> {
        #[serde(borrow, default)]
        model: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        messages: Option<Vec<Msg<'a>>>,
        #[serde(default)]
        max_tokens: Option<u64>,
        #[serde(default)]
        max_completion_tokens: Option<u64>,
        #[serde(default)]
        temperature: Option<f64>,
        #[serde(default)]
        top_p: Option<f64>,
        #[serde(default)]
        seed: Option<u64>,
        #[serde(default)]
        stream: Option<bool>,
        #[serde(default)]
        stream_options: Option<StreamOptions>,
        // Accepted and ignored whatever their value (see `IGNORED`); read whole, so that
        // a body is refused or taken as the tree would.
        #[serde(default, rename = "user")]
        _user: Option<Value>,
        #[serde(default, rename = "metadata")]
        _metadata: Option<Value>,
        #[serde(default, rename = "store")]
        _store: Option<Value>,
        #[serde(default, rename = "service_tier")]
        _service_tier: Option<Value>,
        #[serde(default, rename = "safety_identifier")]
        _safety_identifier: Option<Value>,
        #[serde(default, rename = "prompt_cache_key")]
        _prompt_cache_key: Option<Value>,
        #[serde(default, rename = "parallel_tool_calls")]
        _parallel_tool_calls: Option<Value>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Msg<'a> {
        #[serde(borrow)]
        role: Cow<'a, str>,
        #[serde(borrow, default)]
        content: Option<Cow<'a, str>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct StreamOptions {
        #[serde(default)]
        include_usage: Option<bool>,
        #[serde(default, rename = "include_obfuscation")]
        _include_obfuscation: Option<Value>,
    }

    /// A whole number from 1 to `u32::MAX`, as `positive_u32` takes it.
    fn positive(n: Option<u64>) -> Option<Option<u32>> {
        match n {
            None => Some(None),
            Some(n) => u32::try_from(n).ok().filter(|n| *n > 0).map(Some),
        }
    }

    /// A number within `lo..=hi`, as `number` takes it.
    fn within(x: Option<f64>, lo: f64, hi: f64) -> Option<Option<f32>> {
        match x {
            None => Some(None),
            Some(x) => (lo..=hi).contains(&x).then_some(Some(x as f32)),
        }
    }

    pub(super) fn parse(body: &[u8]) -> Option<Parsed> {
        let b: Body<'_> = serde_json::from_slice(body).ok()?;
        let mut req = ChatRequest::new();
        if let Some(m) = &b.model {
            let m = m.trim();
            if m.is_empty() {
                return None;
            }
            if m != "auto" {
                req.model = Some(m.to_owned());
            }
        }
        let messages = b.messages?;
        if messages.is_empty() {
            return None;
        }
        req.messages.reserve_exact(messages.len());
        for m in messages {
            let text = m.content?.into_owned();
            req.messages.push(match &*m.role {
                "system" | "developer" => Message::new(Role::System, text),
                "user" => Message::new(Role::User, text),
                "assistant" => Message::assistant(text).with_tool_calls(Vec::new()),
                _ => return None,
            });
        }
        let max_tokens = positive(b.max_tokens)?;
        let max_completion_tokens = positive(b.max_completion_tokens)?;
        req.params.max_tokens = max_completion_tokens.or(max_tokens);
        req.params.temperature = within(b.temperature, 0.0, 2.0)?;
        req.params.top_p = within(b.top_p, 0.0, 1.0)?;
        req.params.seed = b.seed;
        let stream = b.stream.unwrap_or(false);
        let include_usage = b
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Some(Parsed {
            request: req,
            stream,
            include_usage: stream && include_usage,
        })
    }
}

/// Text content: a string, or an array of text parts joined by newlines.
fn content(v: Option<&Value>, param: &str) -> Result<Option<String>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    match v {
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(parts) => {
            let mut text = Vec::with_capacity(parts.len());
            for (i, p) in parts.iter().enumerate() {
                let at = format!("{param}[{i}]");
                let o = object(p, &at)?;
                let ty = get(o, "type").ok_or_else(|| missing(&format!("{at}.type")))?;
                match string(ty, &format!("{at}.type"))? {
                    "text" => {
                        only(o, &["type", "text"], &at)?;
                        let t = get(o, "text").ok_or_else(|| missing(&format!("{at}.text")))?;
                        text.push(string(t, &format!("{at}.text"))?);
                    }
                    "refusal" => {
                        only(o, &["type", "refusal"], &at)?;
                        let t =
                            get(o, "refusal").ok_or_else(|| missing(&format!("{at}.refusal")))?;
                        text.push(string(t, &format!("{at}.refusal"))?);
                    }
                    other => {
                        return Err(unsupported(
                            &format!("{at}.type"),
                            format!(
                                "Content parts of type `{other}` are not supported: this gateway takes text only."
                            ),
                        ));
                    }
                }
            }
            Ok(Some(text.join("\n")))
        }
        other => Err(wrong_type(
            param,
            "a string or an array of content parts",
            other,
        )),
    }
}

fn message(v: &Value, at: &str) -> Result<Message, ApiError> {
    let o = object(v, at)?;
    // Fields a client echoes back from a response are tolerated; anything else is a typo.
    only(
        o,
        &[
            "role",
            "content",
            "name",
            "tool_calls",
            "tool_call_id",
            "refusal",
            "annotations",
            "audio",
            "function_call",
        ],
        at,
    )?;
    for f in ["audio", "function_call"] {
        if get(o, f).is_some() {
            return Err(unsupported(
                &format!("{at}.{f}"),
                format!("`{f}` in messages is not supported by this gateway."),
            ));
        }
    }
    let role_at = format!("{at}.role");
    let role = match string(get(o, "role").ok_or_else(|| missing(&role_at))?, &role_at)? {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(ApiError::invalid(
                "invalid_value",
                role_at,
                format!(
                    "Invalid role `{other}`: expected system, developer, user, assistant or tool."
                ),
            ));
        }
    };
    let content_at = format!("{at}.content");
    let text = content(get(o, "content"), &content_at)?;
    match role {
        Role::Assistant => {
            let mut calls = Vec::new();
            if let Some(tc) = get(o, "tool_calls") {
                for (i, c) in array(tc, &format!("{at}.tool_calls"))?.iter().enumerate() {
                    calls.push(tool_call(c, &format!("{at}.tool_calls[{i}]"))?);
                }
            }
            if text.is_none() && calls.is_empty() {
                return Err(missing(&content_at));
            }
            Ok(Message::assistant(text.unwrap_or_default()).with_tool_calls(calls))
        }
        Role::Tool => {
            let id_at = format!("{at}.tool_call_id");
            let id = string(
                get(o, "tool_call_id").ok_or_else(|| missing(&id_at))?,
                &id_at,
            )?;
            Ok(Message::tool(id, text.ok_or_else(|| missing(&content_at))?))
        }
        _ => {
            for f in ["tool_calls", "tool_call_id"] {
                if get(o, f).is_some() {
                    return Err(ApiError::invalid(
                        "invalid_value",
                        format!("{at}.{f}"),
                        format!("`{f}` is only allowed on assistant and tool messages."),
                    ));
                }
            }
            let text = text.ok_or_else(|| missing(&content_at))?;
            Ok(Message::new(role, text))
        }
    }
}

fn tool_call(v: &Value, at: &str) -> Result<ToolCall, ApiError> {
    let o = object(v, at)?;
    only(o, &["id", "type", "function", "index"], at)?;
    if let Some(t) = get(o, "type") {
        if string(t, &format!("{at}.type"))? != "function" {
            return Err(unsupported(
                &format!("{at}.type"),
                "Only `function` tool calls are supported.",
            ));
        }
    }
    let id_at = format!("{at}.id");
    let id = string(get(o, "id").ok_or_else(|| missing(&id_at))?, &id_at)?;
    let f_at = format!("{at}.function");
    let f = object(get(o, "function").ok_or_else(|| missing(&f_at))?, &f_at)?;
    only(f, &["name", "arguments"], &f_at)?;
    let name_at = format!("{f_at}.name");
    let name = string(get(f, "name").ok_or_else(|| missing(&name_at))?, &name_at)?;
    let arguments = match get(f, "arguments") {
        None => String::new(),
        Some(a) => string(a, &format!("{f_at}.arguments"))?.to_owned(),
    };
    Ok(ToolCall {
        id: id.to_owned(),
        name: name.to_owned(),
        arguments,
    })
}

fn tool(v: &Value, at: &str) -> Result<Tool, ApiError> {
    let o = object(v, at)?;
    only(o, &["type", "function"], at)?;
    let ty_at = format!("{at}.type");
    if string(get(o, "type").ok_or_else(|| missing(&ty_at))?, &ty_at)? != "function" {
        return Err(unsupported(&ty_at, "Only `function` tools are supported."));
    }
    let f_at = format!("{at}.function");
    let f = object(get(o, "function").ok_or_else(|| missing(&f_at))?, &f_at)?;
    only(f, &["name", "description", "parameters", "strict"], &f_at)?;
    let name_at = format!("{f_at}.name");
    let name = string(get(f, "name").ok_or_else(|| missing(&name_at))?, &name_at)?;
    let description = match get(f, "description") {
        Some(d) => string(d, &format!("{f_at}.description"))?.to_owned(),
        None => String::new(),
    };
    let parameters = match get(f, "parameters") {
        Some(p) => Value::Object(object(p, &format!("{f_at}.parameters"))?.clone()),
        None => Value::Null,
    };
    Ok(Tool {
        name: name.to_owned(),
        description,
        parameters,
    })
}

fn tool_choice(v: &Value) -> Result<String, ApiError> {
    const AT: &str = "tool_choice";
    match v {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => Ok(s.clone()),
        Value::String(s) => Err(ApiError::invalid(
            "invalid_value",
            AT,
            format!("Invalid `tool_choice` `{s}`: expected auto, none, required or a function."),
        )),
        Value::Object(o) => {
            only(o, &["type", "function"], AT)?;
            let ty = get(o, "type").ok_or_else(|| missing("tool_choice.type"))?;
            if string(ty, "tool_choice.type")? != "function" {
                return Err(unsupported(
                    "tool_choice.type",
                    "Only `function` tool choices are supported.",
                ));
            }
            let f = object(
                get(o, "function").ok_or_else(|| missing("tool_choice.function"))?,
                "tool_choice.function",
            )?;
            only(f, &["name"], "tool_choice.function")?;
            let name = get(f, "name").ok_or_else(|| missing("tool_choice.function.name"))?;
            Ok(string(name, "tool_choice.function.name")?.to_owned())
        }
        other => Err(wrong_type(AT, "a string or an object", other)),
    }
}

fn stop(v: &Value) -> Result<Vec<String>, ApiError> {
    const MAX_STOP: usize = 4;
    let list: Vec<String> = match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, s)| string(s, &format!("stop[{i}]")).map(str::to_owned))
            .collect::<Result<_, _>>()?,
        other => return Err(wrong_type("stop", "a string or an array of strings", other)),
    };
    if list.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "invalid_value",
            "stop",
            format!(
                "`stop` takes at most {MAX_STOP} sequences, got {}.",
                list.len()
            ),
        ));
    }
    Ok(list)
}

fn response_format(v: &Value) -> Result<ResponseFormat, ApiError> {
    const AT: &str = "response_format";
    let o = object(v, AT)?;
    let ty = string(
        get(o, "type").ok_or_else(|| missing("response_format.type"))?,
        "response_format.type",
    )?;
    match ty {
        "text" => {
            only(o, &["type"], AT)?;
            Ok(ResponseFormat::Text)
        }
        "json_object" => {
            only(o, &["type"], AT)?;
            Ok(ResponseFormat::JsonObject)
        }
        "json_schema" => {
            only(o, &["type", "json_schema"], AT)?;
            let s = object(
                get(o, "json_schema").ok_or_else(|| missing("response_format.json_schema"))?,
                "response_format.json_schema",
            )?;
            only(
                s,
                &["name", "schema", "strict", "description"],
                "response_format.json_schema",
            )?;
            let name = string(
                get(s, "name").ok_or_else(|| missing("response_format.json_schema.name"))?,
                "response_format.json_schema.name",
            )?;
            let schema = match get(s, "schema") {
                Some(x) => Value::Object(object(x, "response_format.json_schema.schema")?.clone()),
                None => json!({}),
            };
            Ok(ResponseFormat::JsonSchema {
                name: name.to_owned(),
                schema,
            })
        }
        other => Err(ApiError::invalid(
            "invalid_value",
            "response_format.type",
            format!(
                "Invalid `response_format.type` `{other}`: expected text, json_object or json_schema."
            ),
        )),
    }
}

/// OpenAI's name for why generation stopped. tokenwise's own cut (`truncated`, a cost
/// or output limit) is reported as `length`; anything unknown as `stop`.
pub fn finish_reason(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Length | FinishReason::Truncated => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        _ => "stop",
    }
}

/// A whole answer as a `chat.completion` object, written straight from the answer: no
/// intermediate JSON tree, and the fixed parts (names, punctuation) copied as they
/// are, with only the answer's own strings escaped (this runs on every call).
pub fn completion(id: &str, created: u64, r: &ChatResponse) -> Vec<u8> {
    // Room for the whole object at once (the fixed parts are about 330 bytes).
    let size = 384
        + id.len()
        + r.model.len()
        + r.content.len()
        + r.tool_calls
            .iter()
            .map(|c| 64 + c.id.len() + c.name.len() + c.arguments.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(size.min(1 << 20));
    out.extend_from_slice(b"{\"id\":");
    json_str(&mut out, id);
    out.extend_from_slice(b",\"object\":\"chat.completion\",\"created\":");
    json_u64(&mut out, created);
    out.extend_from_slice(b",\"model\":");
    json_str(&mut out, &r.model);
    out.extend_from_slice(
        b",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":",
    );
    if r.tool_calls.is_empty() || !r.content.is_empty() {
        json_str(&mut out, &r.content);
    } else {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(b",\"refusal\":null,\"annotations\":[]");
    if !r.tool_calls.is_empty() {
        out.extend_from_slice(b",\"tool_calls\":");
        // Serialising these cannot fail (string keys only).
        let _ = serde_json::to_writer(&mut out, &WireToolCalls(&r.tool_calls));
    }
    out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":\"");
    out.extend_from_slice(finish_reason(&r.finish_reason).as_bytes());
    let u = &r.usage;
    out.extend_from_slice(b"\"}],\"usage\":{\"prompt_tokens\":");
    json_u64(&mut out, u.input_tokens);
    out.extend_from_slice(b",\"completion_tokens\":");
    json_u64(&mut out, u.output_tokens);
    out.extend_from_slice(b",\"total_tokens\":");
    json_u64(&mut out, u.total());
    out.extend_from_slice(b",\"prompt_tokens_details\":{\"cached_tokens\":");
    json_u64(&mut out, u.cached_input_tokens);
    out.extend_from_slice(
        b"},\"completion_tokens_details\":{\"reasoning_tokens\":0}},\"system_fingerprint\":null}",
    );
    out
}

/// `s` as a JSON string, escaped as `serde_json` escapes it.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a vector cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `n` as a JSON number.
fn json_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(at..).unwrap_or_default());
}

struct WireToolCalls<'a>(&'a [ToolCall]);

impl Serialize for WireToolCalls<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
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

#[derive(Serialize)]
struct WireUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: CachedTokens,
    completion_tokens_details: ReasoningTokens,
}

#[derive(Serialize)]
struct CachedTokens {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct ReasoningTokens {
    reasoning_tokens: u64,
}

impl From<&Usage> for WireUsage {
    fn from(u: &Usage) -> Self {
        WireUsage {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
            total_tokens: u.total(),
            prompt_tokens_details: CachedTokens {
                cached_tokens: u.cached_input_tokens,
            },
            completion_tokens_details: ReasoningTokens {
                reasoning_tokens: 0,
            },
        }
    }
}

/// Writes `chat.completion.chunk` events for one streamed answer.
#[derive(Debug, Clone)]
pub struct Chunks {
    /// The completion id, shared by every chunk.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model named in chunks until the stream says which one answered.
    pub model: String,
    /// Whether the client asked for a usage chunk (then every chunk carries `usage`).
    pub include_usage: bool,
}

impl Chunks {
    /// One chunk as an SSE event, serialised straight from its parts (no JSON tree:
    /// this runs for every piece of every stream).
    fn chunk<C: Serialize>(&self, model: &str, choices: C, usage: Option<&Usage>) -> Bytes {
        let body = ChunkOut {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model,
            system_fingerprint: (),
            choices,
            usage: self.include_usage.then(|| usage.map(WireUsage::from)),
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"data: ");
        // Serialising these types cannot fail (string keys, no maps of other keys).
        if serde_json::to_writer(&mut out, &body).is_err() {
            return Bytes::new();
        }
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    fn delta<D: Serialize>(&self, delta: D) -> Bytes {
        self.chunk(
            &self.model,
            [ChoiceOut {
                index: 0,
                delta,
                logprobs: (),
                finish_reason: None,
            }],
            None,
        )
    }

    /// The first chunk: the role.
    pub fn role(&self) -> Bytes {
        #[derive(Serialize)]
        struct RoleDelta {
            role: &'static str,
            content: &'static str,
        }
        self.delta(RoleDelta {
            role: "assistant",
            content: "",
        })
    }

    /// More text.
    pub fn text(&self, text: &str) -> Bytes {
        #[derive(Serialize)]
        struct TextDelta<'a> {
            content: &'a str,
        }
        self.delta(TextDelta { content: text })
    }

    /// More of a tool call.
    pub fn tool_call(&self, d: &ToolCallDelta) -> Bytes {
        #[derive(Serialize)]
        struct Function<'a> {
            arguments: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            name: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Call<'a> {
            index: u32,
            function: Function<'a>,
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<&'a str>,
            #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
            kind: Option<&'static str>,
        }
        #[derive(Serialize)]
        struct CallsDelta<'a> {
            tool_calls: [Call<'a>; 1],
        }
        self.delta(CallsDelta {
            tool_calls: [Call {
                index: d.index,
                function: Function {
                    arguments: &d.arguments,
                    name: d.name.as_deref(),
                },
                id: d.id.as_deref(),
                kind: d.id.as_ref().map(|_| "function"),
            }],
        })
    }

    /// The last chunk with a choice: the finish reason, and the model that answered.
    pub fn finish(&self, reason: &FinishReason, model: &str) -> Bytes {
        self.chunk(
            model,
            [ChoiceOut {
                index: 0,
                delta: EmptyObject {},
                logprobs: (),
                finish_reason: Some(finish_reason(reason)),
            }],
            None,
        )
    }

    /// The usage chunk: no choices, the usage of the whole request.
    pub fn usage(&self, u: &Usage, model: &str) -> Bytes {
        self.chunk(model, [(); 0], Some(u))
    }
}

/// A `chat.completion.chunk` object.
#[derive(Serialize)]
struct ChunkOut<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: (),
    choices: C,
    /// Only when the client asked for usage: then `null` but in the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<WireUsage>>,
}

#[derive(Serialize)]
struct ChoiceOut<D> {
    index: u32,
    delta: D,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

/// `{}`.
#[derive(Serialize)]
struct EmptyObject {}

/// One SSE event carrying `v`.
pub fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The end of a complete stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::{fast, parse_tree};

    /// Values of every kind, including the edges the parameters check.
    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            prop_oneof![
                Just(0i64),
                Just(1),
                Just(2),
                Just(-1),
                Just(i64::from(u32::MAX)),
                Just(i64::from(u32::MAX) + 1),
            ]
            .prop_map(Value::from),
            prop_oneof![Just(0.5f64), Just(1.0), Just(2.5), Just(-0.0), Just(1e300)]
                .prop_map(Value::from),
            prop_oneof![
                Just("auto"),
                Just(" gpt-4o-mini "),
                Just(""),
                Just("  "),
                Just("héllo \u{1F600}"),
                Just("a\"b\\\\c\\n"),
            ]
            .prop_map(Value::from),
            Just(json!([{"type": "text", "text": "hi"}])),
            Just(json!({"include_usage": true})),
            Just(json!({"include_usage": null, "include_obfuscation": false})),
            Just(json!({"include_usage": 1})),
            Just(json!({"other": true})),
        ]
    }

    fn text() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!("Hi")),
            Just(json!("héllo \u{1F600}")),
            Just(json!("a\"b\\c\n")),
            Just(json!("")),
        ]
    }

    fn message() -> impl Strategy<Value = Value> {
        let role = prop_oneof![
            8 => proptest::sample::select(vec!["system", "developer", "user", "assistant"])
                .prop_map(Value::from),
            1 => Just(json!("tool")),
            1 => value(),
        ];
        let content = prop_oneof![8 => text(), 2 => value()];
        let extra = proptest::option::weighted(
            0.1,
            (
                proptest::sample::select(vec!["name", "tool_call_id", "refusal", "oops"]),
                value(),
            ),
        );
        (
            proptest::option::weighted(0.97, role),
            proptest::option::weighted(0.95, content),
            extra,
        )
            .prop_map(|(role, content, extra)| {
                let mut m = Map::new();
                if let Some(r) = role {
                    m.insert("role".into(), r);
                }
                if let Some(c) = content {
                    m.insert("content".into(), c);
                }
                if let Some((k, v)) = extra {
                    m.insert(k.into(), v);
                }
                Value::Object(m)
            })
    }

    /// A top-level field, mostly with a value of its type.
    fn field() -> impl Strategy<Value = (&'static str, Value)> {
        let typed = prop_oneof![
            text().prop_map(|v| ("model", v)),
            prop_oneof![
                Just(json!("auto")),
                Just(json!(" gpt-4o-mini ")),
                Just(json!("  "))
            ]
            .prop_map(|v| ("model", v)),
            (0u64..3).prop_map(|n| ("max_tokens", json!(n))),
            (0u64..3).prop_map(|n| ("max_completion_tokens", json!(n))),
            (-1.0f64..3.0).prop_map(|x| ("temperature", json!(x))),
            (0u8..3).prop_map(|x| ("temperature", json!(x))),
            (-0.5f64..1.5).prop_map(|x| ("top_p", json!(x))),
            any::<u64>().prop_map(|n| ("seed", json!(n))),
            any::<bool>().prop_map(|b| ("stream", json!(b))),
            any::<bool>().prop_map(|b| ("stream_options", json!({"include_usage": b}))),
            text().prop_map(|v| ("user", v)),
        ];
        let any_field = (proptest::sample::select(FIELDS), value());
        prop_oneof![8 => typed, 2 => any_field]
    }

    const FIELDS: &[&str] = &[
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "n",
        "stop",
        "max_token",
    ];

    /// Request bodies: mostly well-formed, some with wrong types, unknown fields,
    /// repeated fields or a byte changed.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let fields = proptest::collection::vec(field(), 0..6);
        let messages = proptest::option::weighted(
            0.97,
            prop_oneof![
                9 => proptest::collection::vec(message(), 0..4).prop_map(Value::from),
                1 => value(),
            ],
        );
        (fields, messages, 0u8..20, any::<usize>(), any::<u8>()).prop_map(
            |(fields, messages, twist, at, byte)| {
                let mut o = Map::new();
                for (k, v) in fields {
                    o.insert(k.to_owned(), v);
                }
                if let Some(m) = messages {
                    o.insert("messages".into(), m);
                }
                let mut b = Value::Object(o).to_string().into_bytes();
                match twist {
                    // A repeated field: the tree keeps the last.
                    0 => {
                        b.pop();
                        b.extend_from_slice(br#","model":"again"}"#);
                    }
                    1 if !b.is_empty() => {
                        let i = at % b.len();
                        b[i] = byte;
                    }
                    _ => {}
                }
                b
            },
        )
    }

    #[test]
    fn the_fast_path_agrees_with_the_tree() {
        let mut runner = proptest::test_runner::TestRunner::new(
            proptest::test_runner::Config::with_cases(20_000),
        );
        let taken = std::cell::Cell::new(0u32);
        runner
            .run(&body(), |b| {
                if let Some(p) = fast::parse(&b) {
                    taken.set(taken.get() + 1);
                    let tree = parse_tree(&b);
                    prop_assert!(
                        tree.is_ok(),
                        "{:?} refused: {tree:?}",
                        String::from_utf8_lossy(&b)
                    );
                    prop_assert_eq!(
                        format!("{:?}", Some(&p)),
                        format!("{:?}", tree.as_ref().ok())
                    );
                }
                Ok(())
            })
            .unwrap();
        // The generator reaches the fast path often enough for the comparison to mean
        // something.
        let taken = taken.get();
        assert!(taken > 1_000, "only {taken} bodies took the fast path");
    }

    #[test]
    fn the_fast_path_takes_the_common_request() {
        let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi \u00e9"}],"max_tokens":50,"temperature":0.7,"stream":true,"stream_options":{"include_usage":true},"user":"u1"}"#;
        let p = fast::parse(body).expect("the fast path takes it");
        assert_eq!(format!("{p:?}"), format!("{:?}", parse_tree(body).unwrap()));
        assert!(p.stream && p.include_usage);
        assert_eq!(p.request.messages[1].content, "Hi é");
    }

    /// The hand-written `chat.completion` object is, byte for byte, what serialising
    /// its shape with serde gives.
    #[test]
    fn completions_have_openais_shape() {
        use serde::Serialize;
        use tokenwise::{ChatResponse, FinishReason, ToolCall, Usage};

        use super::{WireToolCalls, WireUsage, completion, finish_reason};

        #[derive(Serialize)]
        struct Completion<'a> {
            id: &'a str,
            object: &'static str,
            created: u64,
            model: &'a str,
            choices: [Choice<'a>; 1],
            usage: WireUsage,
            system_fingerprint: (),
        }
        #[derive(Serialize)]
        struct Choice<'a> {
            index: u32,
            message: AnswerMessage<'a>,
            logprobs: (),
            finish_reason: &'static str,
        }
        #[derive(Serialize)]
        struct AnswerMessage<'a> {
            role: &'static str,
            content: Option<&'a str>,
            refusal: (),
            annotations: [(); 0],
            #[serde(skip_serializing_if = "Option::is_none")]
            tool_calls: Option<WireToolCalls<'a>>,
        }
        let reference = |id: &str, created: u64, r: &ChatResponse| {
            serde_json::to_vec(&Completion {
                id,
                object: "chat.completion",
                created,
                model: &r.model,
                choices: [Choice {
                    index: 0,
                    message: AnswerMessage {
                        role: "assistant",
                        content: (r.tool_calls.is_empty() || !r.content.is_empty())
                            .then_some(r.content.as_str()),
                        refusal: (),
                        annotations: [],
                        tool_calls: (!r.tool_calls.is_empty())
                            .then_some(WireToolCalls(&r.tool_calls)),
                    },
                    logprobs: (),
                    finish_reason: finish_reason(&r.finish_reason),
                }],
                usage: WireUsage::from(&r.usage),
                system_fingerprint: (),
            })
            .unwrap()
        };
        let mut r = ChatResponse::new(
            "A \"quoted\"\n\u{1}\u{7f} é answer\\",
            "gpt-4o-mini",
            "openai",
            Usage::new(12, 4).with_cached_input(3),
            FinishReason::Length,
        );
        for created in [0, 7, 1_700_000_000, u64::MAX] {
            let got = completion("chatcmpl-1", created, &r);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(reference("chatcmpl-1", created, &r)).unwrap()
            );
        }
        r.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "f".into(),
            arguments: "{\"x\":1}".into(),
        }];
        for content in ["", "and text"] {
            r.content = content.into();
            r.usage = Usage::new(u64::MAX / 2, 0);
            r.finish_reason = FinishReason::ToolCalls;
            let got = completion("c\"2", 1, &r);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(reference("c\"2", 1, &r)).unwrap()
            );
        }
    }

    /// Each chunk, as the client reads it.
    #[test]
    fn chunks_have_openais_shape() {
        use tokenwise::{FinishReason, ToolCallDelta, Usage};

        use super::Chunks;
        let parse = |b: bytes::Bytes| -> Value {
            let text = std::str::from_utf8(&b).unwrap();
            let json = text
                .strip_prefix("data: ")
                .unwrap()
                .strip_suffix("\n\n")
                .unwrap();
            serde_json::from_str(json).unwrap()
        };
        let head = |usage: bool| {
            let mut v = json!({"id": "c1", "object": "chat.completion.chunk", "created": 7,
                "model": "m", "system_fingerprint": null});
            if usage {
                v["usage"] = Value::Null;
            }
            v
        };
        let with = |mut v: Value, choices: Value| {
            v["choices"] = choices;
            v
        };
        for include_usage in [false, true] {
            let c = Chunks {
                id: "c1".into(),
                created: 7,
                model: "m".into(),
                include_usage,
            };
            let delta = |d: Value| {
                with(
                    head(include_usage),
                    json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": null}]),
                )
            };
            assert_eq!(
                parse(c.role()),
                delta(json!({"role": "assistant", "content": ""}))
            );
            assert_eq!(parse(c.text("a\"b")), delta(json!({"content": "a\"b"})));
            let mut d = ToolCallDelta::new(1, "{\"x\":");
            assert_eq!(
                parse(c.tool_call(&d)),
                delta(json!({"tool_calls": [{"index": 1, "function": {"arguments": "{\"x\":"}}]}))
            );
            d.id = Some("call_1".into());
            d.name = Some("f".into());
            assert_eq!(
                parse(c.tool_call(&d)),
                delta(
                    json!({"tool_calls": [{"index": 1, "id": "call_1", "type": "function",
                    "function": {"arguments": "{\"x\":", "name": "f"}}]})
                )
            );
            let mut fin = with(
                head(include_usage),
                json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}]),
            );
            fin["model"] = json!("other");
            assert_eq!(parse(c.finish(&FinishReason::Length, "other")), fin);
        }
        let c = Chunks {
            id: "c1".into(),
            created: 7,
            model: "m".into(),
            include_usage: true,
        };
        let u = Usage::new(10, 3).with_cached_input(4);
        let mut want = with(head(true), json!([]));
        want["usage"] = json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 0}});
        assert_eq!(parse(c.usage(&u, "m")), want);
    }
}
