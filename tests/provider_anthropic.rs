//! The Anthropic provider against a loopback server replaying the Messages API's wire
//! format: whole and streamed answers, tool use, cache usage, and every failure class.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{End, Reply, Server, done_of, drain, text_of};
use tokenwise::provider::{Anthropic, AnthropicBuilder, Deadlines, Provider, ProviderCall};
use tokenwise::{
    Catalog, ChatRequest, Error, FinishReason, ManualClock, Message, ProviderErrorKind, RateLimits,
    StreamEvent, Timestamp, Tool, ToolCall, Usage,
};

const KEY: &str = "sk-ant-api03-secretsecretsecret";

fn builder(server: &Server) -> AnthropicBuilder {
    Anthropic::builder().base_url(server.url("")).api_key(KEY)
}

fn provider(server: &Server) -> Anthropic {
    builder(server).build().unwrap()
}

fn request() -> ChatRequest {
    ChatRequest::new()
        .message(Message::system("You are terse."))
        .message(Message::system("Answer in English."))
        .message(Message::user("Say hello"))
        .max_tokens(100)
}

async fn chat(p: &Anthropic, req: &ChatRequest) -> tokenwise::Result<tokenwise::ChatResponse> {
    let cat = Catalog::builtin();
    p.chat(ProviderCall::new(
        req,
        cat.require("claude-haiku-4-5").unwrap(),
    ))
    .await
}

async fn stream(p: &Anthropic, req: &ChatRequest) -> tokenwise::Result<tokenwise::ChatStream> {
    let cat = Catalog::builtin();
    p.stream(ProviderCall::new(
        req,
        cat.require("claude-haiku-4-5").unwrap(),
    ))
    .await
}

fn kind(e: &Error) -> ProviderErrorKind {
    e.as_provider()
        .unwrap_or_else(|| panic!("not a provider error: {e:?}"))
        .kind
}

const WHOLE: &str = r#"{
  "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
  "type": "message",
  "role": "assistant",
  "model": "claude-haiku-4-5-20251001",
  "content": [
    {"type": "text", "text": "Hello! "},
    {"type": "text", "text": "Nice to meet you."}
  ],
  "stop_reason": "end_turn",
  "stop_sequence": null,
  "usage": {
    "input_tokens": 12,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 2000,
    "output_tokens": 9,
    "service_tier": "standard"
  }
}"#;

fn event(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn message_start(input: u64, cache_read: u64, cache_write: u64) -> String {
    event(
        "message_start",
        &format!(
            r#"{{"type":"message_start","message":{{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-haiku-4-5","stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":{input},"cache_creation_input_tokens":{cache_write},"cache_read_input_tokens":{cache_read},"output_tokens":1}}}}}}"#
        ),
    )
}

fn text_delta(index: u32, text: &str) -> String {
    event(
        "content_block_delta",
        &format!(
            r#"{{"type":"content_block_delta","index":{index},"delta":{{"type":"text_delta","text":{}}}}}"#,
            serde_json::to_string(text).unwrap()
        ),
    )
}

fn message_delta(stop: &str, output: u64) -> String {
    event(
        "message_delta",
        &format!(
            r#"{{"type":"message_delta","delta":{{"stop_reason":"{stop}","stop_sequence":null}},"usage":{{"output_tokens":{output}}}}}"#
        ),
    )
}

fn message_stop() -> String {
    event("message_stop", r#"{"type":"message_stop"}"#)
}

#[tokio::test]
async fn whole_answer_maps_system_headers_and_cache_usage() {
    let server = Server::start(vec![
        Reply::json(200, WHOLE)
            .header("anthropic-ratelimit-requests-remaining", "49")
            .header("anthropic-ratelimit-tokens-remaining", "39000")
            .header("request-id", "req_1"),
    ])
    .await;
    let p = builder(&server)
        .beta("prompt-caching-2024-07-31")
        .build()
        .unwrap();
    let r = chat(&p, &request()).await.unwrap();
    assert_eq!(r.content, "Hello! Nice to meet you.");
    assert_eq!(r.finish_reason, FinishReason::Stop);
    assert_eq!(r.provider, "anthropic");
    assert_eq!(r.model, "claude-haiku-4-5");
    // input = 12 uncached + 2000 read from cache + 100 written to it
    assert_eq!(
        r.usage,
        Usage::new(2112, 9)
            .with_cached_input(2000)
            .with_cache_writes(100, 0)
    );
    assert_eq!(
        p.last_rate_limits(),
        Some(RateLimits::new(Some(49), Some(39_000)))
    );
    let got = &server.received()[0];
    assert_eq!(got.line(), "POST /v1/messages HTTP/1.1");
    assert_eq!(got.header("x-api-key").unwrap(), KEY);
    assert_eq!(got.header("anthropic-version").unwrap(), "2023-06-01");
    assert_eq!(
        got.header("anthropic-beta").unwrap(),
        "prompt-caching-2024-07-31"
    );
    assert!(got.header("authorization").is_none());
    let body = got.json();
    assert_eq!(body["system"], "You are terse.\n\nAnswer in English.");
    assert_eq!(body["max_tokens"], 100);
    assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(body["messages"][0]["role"], "user");
    assert_eq!(body["messages"][0]["content"][0]["text"], "Say hello");
}

#[tokio::test]
async fn whole_answer_with_tool_use_and_results_sent_back() {
    let body = r#"{"id":"msg_2","type":"message","role":"assistant","model":"claude-haiku-4-5",
      "content":[{"type":"text","text":"Let me check."},
        {"type":"tool_use","id":"toolu_01A09q90qw90lq917835lq9","name":"get_weather",
         "input":{"location":"San Francisco, CA"}}],
      "stop_reason":"tool_use","stop_sequence":null,
      "usage":{"input_tokens":300,"output_tokens":60}}"#;
    let server = Server::start(vec![Reply::json(200, body)]).await;
    let p = provider(&server);
    let mut req = ChatRequest::new()
        .message(Message::user("Weather?"))
        .message(Message::assistant("").with_tool_calls(vec![ToolCall {
            id: "toolu_0".into(),
            name: "get_weather".into(),
            arguments: r#"{"location":"Paris"}"#.into(),
        }]))
        .message(Message::tool("toolu_0", "18C and sunny"));
    req.params.tools = vec![Tool {
        name: "get_weather".into(),
        description: "Current weather".into(),
        parameters: serde_json::json!({"type":"object","properties":{"location":{"type":"string"}},"required":["location"]}),
    }];
    req.params.tool_choice = Some("get_weather".into());
    let r = chat(&p, &req).await.unwrap();
    assert_eq!(r.finish_reason, FinishReason::ToolCalls);
    assert_eq!(r.content, "Let me check.");
    assert_eq!(r.tool_calls[0].id, "toolu_01A09q90qw90lq917835lq9");
    let args: serde_json::Value = serde_json::from_str(&r.tool_calls[0].arguments).unwrap();
    assert_eq!(args["location"], "San Francisco, CA");
    assert_eq!(r.usage, Usage::new(300, 60));
    let sent = server.received()[0].json();
    assert_eq!(sent["tools"][0]["input_schema"]["required"][0], "location");
    assert_eq!(
        sent["tool_choice"],
        serde_json::json!({"type":"tool","name":"get_weather"})
    );
    assert_eq!(sent["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(
        sent["messages"][1]["content"][0]["input"]["location"],
        "Paris"
    );
    assert_eq!(sent["messages"][2]["content"][0]["type"], "tool_result");
    assert_eq!(sent["messages"][2]["content"][0]["tool_use_id"], "toolu_0");
    assert!(sent.get("system").is_none());
}

#[tokio::test]
async fn streamed_text_and_tool_use_split_across_reads() {
    let mut all = String::new();
    all.push_str(&message_start(25, 1000, 50));
    all.push_str(&event(
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    ));
    all.push_str(&event("ping", r#"{"type": "ping"}"#));
    all.push_str(&text_delta(0, "Grüße"));
    all.push_str(&text_delta(0, ", 世界"));
    all.push_str(&event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    ));
    all.push_str(&event(
        "content_block_start",
        r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}"#,
    ));
    for part in ["", r#"{\"location\": \"San Fra"#, r#"ncisco\"}"#] {
        all.push_str(&event(
            "content_block_delta",
            &format!(
                r#"{{"type":"content_block_delta","index":1,"delta":{{"type":"input_json_delta","partial_json":"{part}"}}}}"#
            ),
        ));
    }
    all.push_str(&event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":1}"#,
    ));
    all.push_str(&message_delta("tool_use", 89));
    all.push_str(&message_stop());
    // CRLF line endings, as some proxies rewrite them.
    let all = all.replace('\n', "\r\n").into_bytes();
    // Cut inside "ü", inside "世", between CR and LF, and in the middle of lines.
    let u = all.windows(2).position(|w| w == "ü".as_bytes()).unwrap();
    let shi = all.windows(3).position(|w| w == "世".as_bytes()).unwrap();
    let crlf = all.windows(2).position(|w| w == b"\r\n").unwrap();
    let mut cuts = vec![
        crlf + 1,
        u + 1,
        shi + 1,
        shi + 2,
        all.len() / 2,
        all.len() - 5,
    ];
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut at = 0;
    for c in cuts {
        pieces.push(all[at..c].to_vec());
        at = c;
    }
    pieces.push(all[at..].to_vec());
    let server = Server::start(vec![Reply::sse(pieces)]).await;
    let (events, err) = drain(stream(&provider(&server), &request()).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "Grüße, 世界");
    let deltas: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::ToolCallDelta(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(deltas[0].index, 0);
    assert_eq!(
        deltas[0].id.as_deref(),
        Some("toolu_01T1x1fJ34qAmk2tNTrN7Up6")
    );
    assert_eq!(deltas[0].name.as_deref(), Some("get_weather"));
    let args: String = deltas.iter().map(|d| d.arguments.as_str()).collect();
    assert_eq!(args, r#"{"location": "San Francisco"}"#);
    let usage = Usage::new(25 + 1000 + 50, 89)
        .with_cached_input(1000)
        .with_cache_writes(50, 0);
    assert!(events.contains(&StreamEvent::Usage(usage)));
    let end = done_of(&events).unwrap();
    assert_eq!(end.finish_reason, FinishReason::ToolCalls);
    assert_eq!(end.usage, usage);
    assert_eq!(server.received()[0].json()["stream"], true);
}

#[tokio::test]
async fn stop_reasons_map_to_finish_reasons() {
    let body = |stop: &str| {
        format!(
            r#"{{"id":"m","type":"message","role":"assistant","model":"x","content":[{{"type":"text","text":"t"}}],"stop_reason":"{stop}","usage":{{"input_tokens":1,"output_tokens":1}}}}"#
        )
    };
    let stops = [
        "end_turn",
        "max_tokens",
        "stop_sequence",
        "tool_use",
        "refusal",
        "pause_turn",
    ];
    let server = Server::start(stops.iter().map(|s| Reply::json(200, &body(s))).collect()).await;
    let p = provider(&server);
    let want = [
        FinishReason::Stop,
        FinishReason::Length,
        FinishReason::Stop,
        FinishReason::ToolCalls,
        FinishReason::ContentFilter,
        FinishReason::Other("pause_turn".into()),
    ];
    for w in want {
        assert_eq!(chat(&p, &request()).await.unwrap().finish_reason, w);
    }
}

#[tokio::test]
async fn error_event_inside_a_stream() {
    let overloaded = event(
        "error",
        r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#,
    );
    let server = Server::start(vec![
        Reply::sse([
            message_start(10, 0, 0),
            text_delta(0, "The answer is"),
            overloaded.clone(),
        ]),
        Reply::sse([
            message_start(10, 0, 0),
            event("ping", r#"{"type":"ping"}"#),
            overloaded,
        ]),
    ])
    .await;
    let p = provider(&server);
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert_eq!(text_of(&events), "The answer is");
    assert!(done_of(&events).is_none());
    match err {
        Some(Error::StreamInterrupted { chunks: 1, reason }) => {
            assert!(reason.contains("provider_overloaded"), "{reason}")
        }
        other => panic!("expected StreamInterrupted, got {other:?}"),
    }
    // Before any content: the typed provider error, retryable, so fallbacks can act.
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert!(events.is_empty());
    let err = err.unwrap();
    assert_eq!(kind(&err), ProviderErrorKind::Overloaded);
    assert!(err.is_retryable());
}

#[tokio::test]
async fn stream_with_a_stop_reason_but_no_message_stop_is_complete() {
    let server = Server::start(vec![
        // The stop reason and usage came, then a clean end: complete.
        Reply::sse([
            message_start(10, 0, 0),
            text_delta(0, "Almost"),
            message_delta("end_turn", 2),
        ]),
        // No stop reason at all: cut.
        Reply::sse([message_start(10, 0, 0), text_delta(0, "Almost")]),
    ])
    .await;
    let p = provider(&server);
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "Almost");
    let end = done_of(&events).unwrap();
    assert_eq!(end.finish_reason, FinishReason::Stop);
    assert_eq!(end.usage.output_tokens, 2);
    assert!(!end.usage.estimated);
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert_eq!(text_of(&events), "Almost");
    assert!(done_of(&events).is_none());
    match err {
        Some(Error::StreamInterrupted { chunks: 1, reason }) => {
            assert!(reason.contains("finish reason"), "{reason}")
        }
        other => panic!("expected StreamInterrupted, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_events_are_skipped_up_to_a_limit() {
    let bad = "event: content_block_delta\ndata: {not json\n\n".to_owned();
    let odd = event("content_block_delta", r#"{"no_type":1}"#);
    let mut many = vec![message_start(10, 0, 0), text_delta(0, "A")];
    many.extend(std::iter::repeat_n(bad.clone(), 4));
    many.push(text_delta(0, "B"));
    let server = Server::start(vec![
        Reply::sse([
            message_start(10, 0, 0),
            text_delta(0, "Hel"),
            bad.clone(),
            odd,
            text_delta(0, "lo"),
            message_delta("end_turn", 2),
            message_stop(),
        ]),
        Reply::sse(many),
    ])
    .await;
    let p = provider(&server);
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "Hello");
    assert_eq!(done_of(&events).unwrap().finish_reason, FinishReason::Stop);
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert_eq!(text_of(&events), "A");
    match err {
        Some(Error::StreamInterrupted { chunks: 1, reason }) => {
            assert!(reason.contains("malformed"), "{reason}")
        }
        other => panic!("expected StreamInterrupted, got {other:?}"),
    }
}

#[tokio::test]
async fn stream_without_usage_is_estimated() {
    // A proxy that strips usage: counted with the tokenizer, marked estimated.
    let server = Server::start(vec![Reply::sse([
        event("message_start", r#"{"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[]}}"#),
        text_delta(0, "Hello there"),
        event("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"}}"#),
        message_stop(),
    ])])
    .await;
    let (events, err) = drain(stream(&provider(&server), &request()).await.unwrap()).await;
    assert!(err.is_none());
    let end = done_of(&events).unwrap();
    assert!(end.usage.estimated);
    assert!(end.usage.input_tokens > 0 && end.usage.output_tokens > 0);
}

const RATE_LIMITED: &str = r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#;

#[tokio::test]
async fn rate_limited_overloaded_server_errors_and_bad_bodies() {
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_750_000_000)));
    let date = httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + Duration::from_secs(1_750_000_000 + 12 + 45),
    );
    let server = Server::start(vec![
        Reply::json(429, RATE_LIMITED)
            .header("retry-after", "12")
            .header("anthropic-ratelimit-requests-remaining", "0")
            .header("anthropic-ratelimit-input-tokens-remaining", "0")
            .header("anthropic-ratelimit-output-tokens-remaining", "8000"),
        Reply::json(429, RATE_LIMITED).header("retry-after", &date),
        Reply::json(529, r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_2"}"#),
        Reply::json(500, r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#),
        Reply::body(500, "text/html", "<!DOCTYPE html><html><body><h1>Internal Server Error</h1></body></html>"),
        Reply::body(200, "application/json", r#"{"id":"msg_1","type":"message","content":[{"type":"te"#),
        Reply::json(200, r#"{"id":"msg_1","type":"message","role":"assistant"}"#),
        Reply::json(400, r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 208310 tokens > 200000 maximum"}}"#),
        Reply::json(401, r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#),
        Reply::json(400, r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#),
    ])
    .await;
    let p = builder(&server).clock(clock.clone()).build().unwrap();
    use ProviderErrorKind as K;
    let e = chat(&p, &request()).await.unwrap_err();
    assert_eq!(kind(&e), K::RateLimited);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(12)));
    assert_eq!(
        e.as_provider().unwrap().rate_limits,
        Some(RateLimits::new(Some(0), Some(0)))
    );
    clock.advance(Duration::from_secs(12));
    let e = chat(&p, &request()).await.unwrap_err();
    assert_eq!(kind(&e), K::RateLimited);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(45)));
    clock.advance(Duration::from_secs(45));
    let expect = [
        (K::Overloaded, "Overloaded", true),
        (K::Server, "Internal server error", true),
        (K::Server, "non-JSON body", true),
        (K::InvalidResponse, "not valid JSON", true),
        (K::InvalidResponse, "unexpected response shape", true),
        (K::ContextLength, "prompt is too long", false),
        (K::Auth, "invalid x-api-key", false),
        (K::BadRequest, "Field required", false),
    ];
    for (i, (k, text, retry)) in expect.into_iter().enumerate() {
        let e = chat(&p, &request()).await.unwrap_err();
        assert_eq!(kind(&e), k, "reply {i}: {e}");
        assert!(e.to_string().contains(text), "reply {i}: {e}");
        assert_eq!(e.is_retryable(), retry, "reply {i}");
    }
}

#[tokio::test]
async fn over_the_cap_reset_and_silent_servers() {
    let big = format!(
        r#"{{"id":"m","type":"message","role":"assistant","content":[{{"type":"text","text":"{}"}}],"stop_reason":"end_turn","usage":{{"input_tokens":1,"output_tokens":1}}}}"#,
        "z".repeat(20_000)
    );
    let server = Server::start(vec![
        Reply::json(200, &big),
        Reply::sse([message_start(10, 0, 0), text_delta(0, "Hal")]).ending(End::Reset),
        Reply::silent(),
    ])
    .await;
    let p = builder(&server).max_body_bytes(8_192).build().unwrap();
    let e = chat(&p, &request()).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::InvalidResponse);
    assert!(e.to_string().contains("exceeds the cap"));
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert_eq!(text_of(&events), "Hal");
    assert!(
        matches!(err, Some(Error::StreamInterrupted { chunks: 1, .. })),
        "{err:?}"
    );
    let p = builder(&server)
        .deadlines(Deadlines::default().first_byte(Duration::from_millis(40)))
        .build()
        .unwrap();
    let e = stream(&p, &request()).await.err().unwrap();
    assert_eq!(kind(&e), ProviderErrorKind::Timeout);
}

#[tokio::test]
async fn the_api_key_never_shows_and_is_required() {
    let server = Server::start(vec![Reply::json(
        401,
        &format!(r#"{{"type":"error","error":{{"type":"authentication_error","message":"invalid x-api-key {KEY}"}}}}"#),
    )])
    .await;
    let p = provider(&server);
    let e = chat(&p, &request()).await.unwrap_err();
    for shown in [e.to_string(), format!("{e:?}"), format!("{p:?}")] {
        assert!(!shown.contains("secretsecret"), "key leaked: {shown}");
    }
    assert!(matches!(
        Anthropic::builder().build(),
        Err(Error::Config(_))
    ));
}
