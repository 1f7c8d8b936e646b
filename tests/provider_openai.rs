//! The OpenAI-compatible provider against a loopback server replaying the chat
//! completions API's wire format: whole and streamed answers, tool calls, embeddings,
//! every failure class, key pools and deadlines.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{End, Reply, Server, client, done_of, drain, text_of};
use tokenwise::cache::Embedder;
use tokenwise::context::{TiktokenCounter, TokenCounter};
use tokenwise::provider::{
    Deadlines, OpenAiCompatible, OpenAiCompatibleBuilder, Provider, ProviderCall,
};
use tokenwise::{
    Catalog, ChatRequest, Error, FinishReason, ManualClock, Message, Pipeline, ProviderErrorKind,
    RateLimits, ResponseFormat, StreamEvent, Timestamp, Tool, Usage,
};

const KEY: &str = "sk-test-0123456789abcdef";

fn builder(server: &Server) -> OpenAiCompatibleBuilder {
    OpenAiCompatible::builder()
        .base_url(server.url("/v1"))
        .api_key(KEY)
}

fn provider(server: &Server) -> OpenAiCompatible {
    builder(server).build().unwrap()
}

fn request() -> ChatRequest {
    ChatRequest::new()
        .message(Message::system("Be brief."))
        .message(Message::user("Say hello"))
        .max_tokens(20)
}

async fn chat(
    p: &OpenAiCompatible,
    req: &ChatRequest,
) -> tokenwise::Result<tokenwise::ChatResponse> {
    let cat = Catalog::builtin();
    p.chat(ProviderCall::new(req, cat.require("gpt-4o-mini").unwrap()))
        .await
}

async fn stream(
    p: &OpenAiCompatible,
    req: &ChatRequest,
) -> tokenwise::Result<tokenwise::ChatStream> {
    let cat = Catalog::builtin();
    p.stream(ProviderCall::new(req, cat.require("gpt-4o-mini").unwrap()))
        .await
}

fn kind(e: &Error) -> ProviderErrorKind {
    e.as_provider()
        .unwrap_or_else(|| panic!("not a provider error: {e:?}"))
        .kind
}

const WHOLE: &str = r#"{
  "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
  "object": "chat.completion",
  "created": 1741569952,
  "model": "gpt-4o-mini-2024-07-18",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "Hello! How can I help?",
        "refusal": null,
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 1200,
    "completion_tokens": 7,
    "total_tokens": 1207,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
  },
  "service_tier": "default",
  "system_fingerprint": "fp_06737a9306"
}"#;

/// One `data:` event of a chunk whose first choice has `delta` and `finish`.
fn chunk(delta: &str, finish: Option<&str>) -> String {
    let finish = finish.map_or("null".to_owned(), |f| format!("\"{f}\""));
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\
         \"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_1\",\"choices\":[{{\"index\":0,\
         \"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}],\"usage\":null}}\n\n"
    )
}

fn usage_chunk(prompt: u64, completion: u64, cached: u64) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\
         \"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\
         \"completion_tokens\":{completion},\"total_tokens\":{},\"prompt_tokens_details\":\
         {{\"cached_tokens\":{cached}}}}}}}\n\n",
        prompt + completion
    )
}

#[tokio::test]
async fn whole_answer_maps_request_response_usage_and_rate_limit_headers() {
    let server = Server::start(vec![
        Reply::json(200, WHOLE)
            .header("x-ratelimit-remaining-requests", "499")
            .header("x-ratelimit-remaining-tokens", "199000"),
    ])
    .await;
    let p = builder(&server).header("x-extra", "yes").build().unwrap();
    let mut req = request();
    req.params.response_format = Some(ResponseFormat::JsonObject);
    let r = chat(&p, &req).await.unwrap();
    assert_eq!(r.content, "Hello! How can I help?");
    assert_eq!(r.finish_reason, FinishReason::Stop);
    assert_eq!(r.model, "gpt-4o-mini");
    assert_eq!(r.provider, "openai");
    assert_eq!(r.usage, Usage::new(1200, 7).with_cached_input(1024));
    assert!(!r.usage.estimated);
    assert_eq!(
        p.last_rate_limits(),
        Some(RateLimits::new(Some(499), Some(199_000)))
    );

    let got = &server.received()[0];
    assert_eq!(got.line(), "POST /v1/chat/completions HTTP/1.1");
    assert_eq!(
        got.header("authorization").unwrap(),
        format!("Bearer {KEY}")
    );
    assert_eq!(got.header("x-extra").unwrap(), "yes");
    assert_eq!(got.header("content-type").unwrap(), "application/json");
    let body = got.json();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["max_completion_tokens"], 20);
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1]["content"], "Say hello");
    assert_eq!(body["response_format"]["type"], "json_object");
    assert!(body.get("stream").is_none());
}

#[tokio::test]
async fn whole_answer_with_tool_calls() {
    let body = r#"{"id":"chatcmpl-2","object":"chat.completion","created":1,"model":"gpt-4o-mini",
      "choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":null,
        "tool_calls":[{"id":"call_abc","type":"function",
          "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
        "logprobs":null,"finish_reason":"tool_calls"}],
      "usage":{"prompt_tokens":80,"completion_tokens":17,"total_tokens":97}}"#;
    let server = Server::start(vec![Reply::json(200, body)]).await;
    let p = provider(&server);
    let mut req = request();
    req.params.tools = vec![Tool {
        name: "get_weather".into(),
        description: "Weather for a city".into(),
        parameters: serde_json::json!({"type":"object","properties":{"city":{"type":"string"}}}),
    }];
    req.params.tool_choice = Some("auto".into());
    let r = chat(&p, &req).await.unwrap();
    assert_eq!(r.finish_reason, FinishReason::ToolCalls);
    assert_eq!(r.content, "");
    assert_eq!(r.tool_calls.len(), 1);
    assert_eq!(r.tool_calls[0].id, "call_abc");
    assert_eq!(r.tool_calls[0].name, "get_weather");
    assert_eq!(r.tool_calls[0].arguments, r#"{"city":"Paris"}"#);
    let sent = server.received()[0].json();
    assert_eq!(sent["tools"][0]["type"], "function");
    assert_eq!(sent["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(sent["tool_choice"], "auto");
}

#[tokio::test]
async fn stream_split_inside_a_line_and_inside_utf8_characters() {
    // "café 👋" arrives with the é split between its two bytes and the emoji split
    // between its four, and an SSE line split in the middle of its JSON.
    let mut all = Vec::new();
    all.extend_from_slice(
        chunk(r#"{"role":"assistant","content":"","refusal":null}"#, None).as_bytes(),
    );
    all.extend_from_slice(b": keep-alive comment\r\n\r\n");
    all.extend_from_slice(
        chunk(r#"{"content":"caf\u00e9"}"#, None)
            .replace("\\u00e9", "é")
            .as_bytes(),
    );
    all.extend_from_slice(chunk(r#"{"content":" 👋"}"#, None).as_bytes());
    all.extend_from_slice(chunk("{}", Some("stop")).as_bytes());
    all.extend_from_slice(usage_chunk(9, 4, 0).as_bytes());
    all.extend_from_slice(b"data: [DONE]\n\n");
    let e_acute = all.windows(2).position(|w| w == "é".as_bytes()).unwrap();
    let emoji = all.windows(4).position(|w| w == "👋".as_bytes()).unwrap();
    let cuts = [
        10,
        e_acute + 1,
        e_acute + 30,
        emoji + 1,
        emoji + 3,
        all.len() - 3,
    ];
    let mut pieces = Vec::new();
    let mut at = 0;
    for c in cuts {
        pieces.push(all[at..c].to_vec());
        at = c;
    }
    pieces.push(all[at..].to_vec());
    let server = Server::start(vec![Reply::sse(pieces)]).await;
    let p = provider(&server);
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "café 👋");
    assert!(events.contains(&StreamEvent::Usage(Usage::new(9, 4))));
    let end = done_of(&events).expect("ends with Done");
    assert_eq!(end.finish_reason, FinishReason::Stop);
    assert_eq!(end.usage, Usage::new(9, 4));
    let sent = server.received()[0].json();
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(
        server.received()[0].header("accept").unwrap(),
        "text/event-stream"
    );
}

#[tokio::test]
async fn streamed_tool_call_deltas() {
    let pieces = [
        chunk(
            r#"{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}],"refusal":null}"#,
            None,
        ),
        chunk(
            r#"{"tool_calls":[{"index":0,"function":{"arguments":"{\"ci"}}]}"#,
            None,
        ),
        chunk(
            r#"{"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Paris\"}"}}]}"#,
            None,
        ),
        chunk(
            r#"{"tool_calls":[{"index":1,"id":"call_2","type":"function","function":{"name":"get_time","arguments":"{}"}}]}"#,
            None,
        ),
        chunk("{}", Some("tool_calls")),
        usage_chunk(50, 30, 0),
        "data: [DONE]\n\n".to_owned(),
    ];
    let server = Server::start(vec![Reply::sse(pieces)]).await;
    let (events, err) = drain(stream(&provider(&server), &request()).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    let deltas: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::ToolCallDelta(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(deltas.len(), 4);
    assert_eq!(deltas[0].id.as_deref(), Some("call_1"));
    assert_eq!(deltas[0].name.as_deref(), Some("get_weather"));
    let args: String = deltas
        .iter()
        .filter(|d| d.index == 0)
        .map(|d| d.arguments.as_str())
        .collect();
    assert_eq!(args, r#"{"city":"Paris"}"#);
    assert_eq!(deltas[3].index, 1);
    assert_eq!(deltas[3].name.as_deref(), Some("get_time"));
    assert_eq!(
        done_of(&events).unwrap().finish_reason,
        FinishReason::ToolCalls
    );
}

#[tokio::test]
async fn stream_without_usage_is_counted_and_marked_estimated() {
    let pieces = [
        chunk(r#"{"role":"assistant","content":"Hello"}"#, None),
        chunk(r#"{"content":" there, friend."}"#, None),
        chunk("{}", Some("length")),
        "data: [DONE]\n\n".to_owned(),
    ];
    let server = Server::start(vec![Reply::sse(pieces)]).await;
    // A server that rejects stream_options: the option is not sent.
    let p = builder(&server).stream_usage(false).build().unwrap();
    let req = request();
    let (events, err) = drain(stream(&p, &req).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    let end = done_of(&events).unwrap();
    assert_eq!(end.finish_reason, FinishReason::Length);
    let tok = Catalog::builtin().require("gpt-4o-mini").unwrap().tokenizer;
    let expected = Usage::new(
        TiktokenCounter.count_request(&req, tok),
        TiktokenCounter.count_text("Hello there, friend.", tok),
    )
    .estimated();
    assert_eq!(end.usage, expected);
    assert!(end.usage.estimated);
    assert!(events.contains(&StreamEvent::Usage(expected)));
    assert!(server.received()[0].json().get("stream_options").is_none());
}

#[tokio::test]
async fn error_event_inside_a_stream() {
    // After content: the stream breaks with StreamInterrupted, never a clean end.
    let after = [
        chunk(r#"{"role":"assistant","content":"Partial"}"#, None),
        "data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n".to_owned(),
    ];
    // Before content: the provider error itself, so the pipeline can fall back.
    let before = ["event: error\ndata: {\"error\":{\"message\":\"Overloaded\",\"type\":\"overloaded_error\"}}\n\n".to_owned()];
    let server = Server::start(vec![Reply::sse(after), Reply::sse(before)]).await;
    let p = provider(&server);
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert_eq!(text_of(&events), "Partial");
    assert!(done_of(&events).is_none());
    match err {
        Some(Error::StreamInterrupted { chunks: 1, reason }) => {
            assert!(reason.contains("server had an error"), "{reason}");
            assert!(reason.contains("provider_server_error"), "{reason}");
        }
        other => panic!("expected StreamInterrupted, got {other:?}"),
    }
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert!(events.is_empty());
    assert_eq!(kind(&err.unwrap()), ProviderErrorKind::Overloaded);
}

#[tokio::test]
async fn stream_with_a_finish_reason_but_no_done_is_complete() {
    let pieces = [
        chunk(r#"{"role":"assistant","content":"A whole answer"}"#, None),
        chunk("{}", Some("stop")),
        usage_chunk(9, 3, 0),
    ];
    let clean_close = Reply::sse(pieces.clone());
    let close_delimited = Reply::sse(pieces).close_delimited();
    let server = Server::start(vec![clean_close, close_delimited]).await;
    let p = provider(&server);
    for _ in 0..2 {
        let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(text_of(&events), "A whole answer");
        let end = done_of(&events).unwrap();
        assert_eq!(end.finish_reason, FinishReason::Stop);
        assert_eq!(end.usage, Usage::new(9, 3));
    }
}

#[tokio::test]
async fn stream_that_stops_without_a_finish_reason_is_cut() {
    let pieces = [chunk(
        r#"{"role":"assistant","content":"Half an ans"}"#,
        None,
    )];
    let clean_close = Reply::sse(pieces.clone());
    let close_delimited = Reply::sse(pieces).close_delimited();
    // `[DONE]` after no finish reason: the server said it is done, so it is.
    let done_only = Reply::sse([
        chunk(r#"{"role":"assistant","content":"Short"}"#, None),
        "data: [DONE]\n\n".to_owned(),
    ]);
    let server = Server::start(vec![clean_close, close_delimited, done_only]).await;
    let p = provider(&server);
    for _ in 0..2 {
        let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
        assert_eq!(text_of(&events), "Half an ans");
        assert!(done_of(&events).is_none(), "no clean end");
        match err {
            Some(Error::StreamInterrupted { chunks: 1, reason }) => {
                assert!(reason.contains("finish reason"), "{reason}")
            }
            other => panic!("expected StreamInterrupted, got {other:?}"),
        }
    }
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "Short");
    // Nothing at all before the end: the provider error, retryable.
    let server = Server::start(vec![Reply::sse([": just a comment\n\n"])]).await;
    let err = drain(stream(&provider(&server), &request()).await.unwrap())
        .await
        .1
        .unwrap();
    assert_eq!(kind(&err), ProviderErrorKind::Connection);
    assert!(err.is_retryable());
}

#[tokio::test]
async fn malformed_events_are_skipped_up_to_a_limit_and_counted() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let bad = "data: {\"choices\":[{\"delta\":{\"content\":\n\n".to_owned();
    let wrong_shape = "data: {\"choices\":\"no\"}\n\n".to_owned();
    let three = Reply::sse([
        chunk(r#"{"role":"assistant","content":"Hel"}"#, None),
        bad.clone(),
        wrong_shape,
        "data: not json at all\n\n".to_owned(),
        chunk(r#"{"content":"lo"}"#, None),
        chunk("{}", Some("stop")),
        "data: [DONE]\n\n".to_owned(),
    ]);
    let mut pieces = vec![chunk(r#"{"role":"assistant","content":"A"}"#, None)];
    pieces.extend(std::iter::repeat_n(bad.clone(), 4));
    pieces.push(chunk("{}", Some("stop")));
    let four = Reply::sse(pieces);
    let before_content = Reply::sse(std::iter::repeat_n(bad, 4));
    let server = Server::start(vec![three, four, before_content]).await;
    let p = provider(&server);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let run = async {
        let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(text_of(&events), "Hello");
        assert_eq!(done_of(&events).unwrap().finish_reason, FinishReason::Stop);
        let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
        assert_eq!(text_of(&events), "A");
        assert!(done_of(&events).is_none());
        match err {
            Some(Error::StreamInterrupted { chunks: 1, reason }) => {
                assert!(reason.contains("malformed"), "{reason}")
            }
            other => panic!("expected StreamInterrupted, got {other:?}"),
        }
        let err = drain(stream(&p, &request()).await.unwrap())
            .await
            .1
            .unwrap();
        assert_eq!(kind(&err), ProviderErrorKind::InvalidResponse);
    };
    let _guard = metrics::set_default_local_recorder(&recorder);
    run.await;
    let skipped: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == tokenwise::provider::STREAM_MALFORMED_EVENTS)
        .map(|(.., v)| match v {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum();
    assert_eq!(skipped, 3 + 4 + 4);
}

const RATE_LIMITED: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): Limit 3, Used 3, Requested 1.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;

#[tokio::test]
async fn rate_limited_with_each_form_of_retry_after() {
    let t0 = Timestamp::from_secs(1_750_000_000);
    let clock = Arc::new(ManualClock::new(t0));
    // Read when the clock is 7 s on (after the first reply's Retry-After).
    let date = httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + Duration::from_secs(1_750_000_000 + 7 + 30),
    );
    let server = Server::start(vec![
        Reply::json(429, RATE_LIMITED)
            .header("retry-after", "7")
            .header("x-ratelimit-remaining-requests", "0")
            .header("x-ratelimit-remaining-tokens", "149990"),
        Reply::json(429, RATE_LIMITED).header("retry-after", &date),
        Reply::json(429, RATE_LIMITED)
            .header("retry-after-ms", "1500")
            .header("retry-after", "2"),
        Reply::json(429, RATE_LIMITED)
            .header("x-ratelimit-remaining-requests", "0")
            .header("x-ratelimit-reset-requests", "1m30s"),
    ])
    .await;
    let p = builder(&server).clock(clock.clone()).build().unwrap();
    let expect = [
        Duration::from_secs(7),
        Duration::from_secs(30),
        Duration::from_millis(1500),
        Duration::from_secs(90),
    ];
    for (i, want) in expect.into_iter().enumerate() {
        let e = chat(&p, &request()).await.unwrap_err();
        assert_eq!(kind(&e), ProviderErrorKind::RateLimited, "{i}");
        assert_eq!(e.retry_after(), Some(want), "reply {i}");
        assert!(e.is_retryable());
        assert_eq!(e.as_provider().unwrap().status, Some(429));
        if i == 0 {
            assert_eq!(
                e.as_provider().unwrap().rate_limits,
                Some(RateLimits::new(Some(0), Some(149_990)))
            );
            assert!(e.to_string().contains("Rate limit reached"));
        }
        // The only key rests until then; move on.
        clock.advance(want);
    }
}

#[tokio::test]
async fn key_pool_rests_a_rate_limited_key_and_spreads_over_the_others() {
    let t0 = Timestamp::from_secs(1_000);
    let clock = Arc::new(ManualClock::new(t0));
    let server = Server::start(vec![
        Reply::json(429, RATE_LIMITED).header("retry-after", "30"),
        Reply::json(200, WHOLE),
    ])
    .await;
    let p = OpenAiCompatible::builder()
        .base_url(server.url("/v1"))
        .api_keys(["sk-key-A-000", "sk-key-B-111", "sk-key-C-222"])
        .http_client(client())
        .clock(clock.clone())
        .build()
        .unwrap();
    let pool = p.key_pool().unwrap();
    // Key A gets a 429; B and C are ready, so the error says "retry now".
    let e = chat(&p, &request()).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::RateLimited);
    assert_eq!(e.retry_after(), Some(Duration::ZERO));
    assert_eq!(pool.ready(), 2);
    for _ in 0..6 {
        chat(&p, &request()).await.unwrap();
    }
    let auth: Vec<String> = server
        .received()
        .iter()
        .map(|r| r.header("authorization").unwrap())
        .collect();
    assert_eq!(auth[0], "Bearer sk-key-A-000");
    assert!(auth[1..].iter().all(|a| !a.contains("key-A")), "{auth:?}");
    let b = auth.iter().filter(|a| a.contains("key-B")).count();
    let c = auth.iter().filter(|a| a.contains("key-C")).count();
    assert_eq!((b, c), (3, 3), "spread evenly over the ready keys");
    // After its Retry-After, A is back in turn.
    clock.advance(Duration::from_secs(30));
    assert_eq!(pool.ready(), 3);
    for _ in 0..3 {
        chat(&p, &request()).await.unwrap();
    }
    let last: Vec<String> = server.received()[7..]
        .iter()
        .map(|r| r.header("authorization").unwrap())
        .collect();
    assert!(last.iter().any(|a| a.contains("key-A")), "{last:?}");
}

#[tokio::test]
async fn a_429_without_retry_after_rests_the_key_for_that_model_only_with_jitter() {
    let t0 = Timestamp::from_secs(1_000);
    let clock = Arc::new(ManualClock::new(t0));
    let mut replies = Vec::new();
    for _ in 0..20 {
        replies.push(Reply::json(429, RATE_LIMITED));
        replies.push(Reply::json(200, WHOLE));
    }
    let server = Server::start(replies).await;
    let p = OpenAiCompatible::builder()
        .base_url(server.url("/v1"))
        .api_key("sk-only-key-000")
        .http_client(client())
        .clock(clock.clone())
        .build()
        .unwrap();
    let pool = p.key_pool().unwrap();
    let cat = Catalog::builtin();
    let mut rests = Vec::new();
    for _ in 0..20 {
        let big = cat.require("gpt-4o").unwrap();
        let e = p
            .chat(ProviderCall::new(&request(), big))
            .await
            .unwrap_err();
        assert_eq!(kind(&e), ProviderErrorKind::RateLimited);
        let rest = e.retry_after().unwrap();
        assert!(
            (Duration::from_millis(500)..Duration::from_millis(1500)).contains(&rest),
            "{rest:?}"
        );
        assert_eq!(pool.next_ready_in_for("gpt-4o"), rest);
        rests.push(rest);
        // The same key still serves another model at once.
        assert_eq!(pool.ready_for("gpt-4o-mini"), 1);
        chat(&p, &request()).await.unwrap();
        // And gpt-4o fails at once, without a request, until the rest is over.
        let sent = server.received().len();
        let e = p
            .chat(ProviderCall::new(&request(), big))
            .await
            .unwrap_err();
        assert_eq!(kind(&e), ProviderErrorKind::RateLimited);
        assert_eq!(server.received().len(), sent);
        clock.advance(rest);
    }
    rests.sort();
    rests.dedup();
    assert!(rests.len() > 10, "rests are jittered: {rests:?}");
}

#[tokio::test]
async fn all_keys_cooling_down_fails_at_once_without_a_request() {
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_000)));
    let server = Server::start(vec![
        Reply::json(429, RATE_LIMITED).header("retry-after", "20"),
    ])
    .await;
    let p = builder(&server).clock(clock.clone()).build().unwrap();
    assert!(chat(&p, &request()).await.is_err());
    clock.advance(Duration::from_secs(5));
    let e = chat(&p, &request()).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::RateLimited);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(15)));
    assert_eq!(e.as_provider().unwrap().status, None);
    let e = stream(&p, &request()).await.err().unwrap();
    assert_eq!(kind(&e), ProviderErrorKind::RateLimited);
    assert_eq!(
        server.received().len(),
        1,
        "no request while every key rests"
    );
}

#[tokio::test]
async fn overloaded_server_errors_html_and_invalid_bodies() {
    let html = "<html>\r\n<head><title>500 Internal Server Error</title></head>\r\n<body>\r\n<center><h1>500 Internal Server Error</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
    let server = Server::start(vec![
        Reply::json(529, r#"{"error":{"message":"The engine is currently overloaded, please try again later","type":"server_error"}}"#),
        Reply::json(503, r#"{"error":{"message":"The server is overloaded or not ready yet.","type":"server_error"}}"#),
        Reply::body(500, "text/html", html),
        Reply::body(502, "text/html", "<html><body>Bad gateway</body></html>"),
        Reply::body(200, "application/json", "{\"id\": \"chatcmpl-1\", \"choices\": [ {\"index\": 0, "),
        Reply::body(200, "text/html", "<html>captive portal</html>"),
        Reply::json(200, r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":0,"total_tokens":1}}"#),
        Reply::json(200, r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini"}"#),
    ])
    .await;
    let p = provider(&server);
    use ProviderErrorKind as K;
    let expect = [
        (K::Overloaded, Some(529), "overloaded"),
        (K::Overloaded, Some(503), "overloaded"),
        (K::Server, Some(500), "non-JSON body"),
        (K::Server, Some(502), "text/html"),
        (K::InvalidResponse, Some(200), "not valid JSON"),
        (K::InvalidResponse, Some(200), "not valid JSON"),
        (K::InvalidResponse, Some(200), "no choices"),
        (K::InvalidResponse, Some(200), "no choices"),
    ];
    for (i, (k, status, text)) in expect.into_iter().enumerate() {
        let e = chat(&p, &request()).await.unwrap_err();
        let pe = e.as_provider().unwrap();
        assert_eq!(pe.kind, k, "reply {i}: {e}");
        assert_eq!(pe.status, status, "reply {i}");
        assert!(e.to_string().contains(text), "reply {i}: {e}");
        assert!(e.is_retryable(), "reply {i}");
    }
}

#[tokio::test]
async fn client_errors_are_classified_and_not_retryable() {
    let server = Server::start(vec![
        Reply::json(400, r#"{"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages resulted in 130532 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#),
        Reply::json(400, r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy.","type":null,"param":"prompt","code":"content_filter","status":400}}"#),
        Reply::json(400, r#"{"error":{"message":"Invalid value for 'temperature': must be <= 2.","type":"invalid_request_error","param":"temperature","code":"invalid_value"}}"#),
        Reply::json(404, r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#),
        Reply::json(429, r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#),
        Reply::json(403, r#"{"error":{"message":"Project does not have access to model","type":"invalid_request_error","code":"model_not_found"}}"#),
    ])
    .await;
    let p = provider(&server);
    use ProviderErrorKind as K;
    for (i, k) in [
        K::ContextLength,
        K::ContentFilter,
        K::BadRequest,
        K::BadRequest,
        K::Auth,
        K::Auth,
    ]
    .into_iter()
    .enumerate()
    {
        let e = chat(&p, &request()).await.unwrap_err();
        assert_eq!(kind(&e), k, "reply {i}: {e}");
        assert!(!e.is_retryable(), "reply {i}");
    }
    // A quota error does not rest the key (it is not a rate limit).
    assert_eq!(p.key_pool().unwrap().ready(), 1);
}

#[tokio::test]
async fn the_api_key_never_shows() {
    // The server echoes the key back in its error message.
    let echo = format!(
        r#"{{"error":{{"message":"Incorrect API key provided: {KEY}. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}"#
    );
    let server = Server::start(vec![Reply::json(401, &echo)]).await;
    let p = provider(&server);
    let e = chat(&p, &request()).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::Auth);
    for shown in [
        format!("{e}"),
        format!("{e:?}"),
        format!("{p:?}"),
        format!("{:?}", p.key_pool()),
    ] {
        assert!(!shown.contains(KEY), "key leaked: {shown}");
        assert!(!shown.contains("0123456789abcdef"), "key leaked: {shown}");
    }
    assert!(e.to_string().contains("[redacted]"));
    // A header value set on the builder is not shown either.
    let p = builder(&server)
        .header("x-other-secret", "hunter2")
        .build()
        .unwrap();
    assert!(!format!("{p:?}").contains("hunter2"));
}

#[tokio::test]
async fn bodies_over_the_cap_are_refused() {
    let big = format!(
        r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}]}}"#,
        "x".repeat(10_000)
    );
    let server = Server::start(vec![
        Reply::json(200, &big),
        Reply::json(200, &big).close_delimited(),
        Reply::sse([chunk(
            &format!(r#"{{"content":"{}"}}"#, "y".repeat(5_000)),
            None,
        )]),
        Reply::sse((0..50).map(|_| chunk(r#"{"content":"0123456789"}"#, None))),
    ])
    .await;
    let p = builder(&server)
        .max_body_bytes(4_096)
        .max_event_bytes(4_096)
        .build()
        .unwrap();
    for i in 0..2 {
        let e = chat(&p, &request()).await.unwrap_err();
        assert_eq!(kind(&e), ProviderErrorKind::InvalidResponse, "{i}");
        assert!(e.to_string().contains("exceeds the cap"), "{e}");
    }
    // One event over the event cap.
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert!(events.is_empty());
    let err = err.unwrap();
    assert_eq!(kind(&err), ProviderErrorKind::InvalidResponse);
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    // Many small events over the stream cap: cut, never a clean end.
    let p = builder(&server).max_stream_bytes(4_096).build().unwrap();
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert!(!events.is_empty());
    assert!(done_of(&events).is_none());
    assert!(
        matches!(err, Some(Error::StreamInterrupted { .. })),
        "{err:?}"
    );
}

#[tokio::test]
async fn connection_resets_and_refusals() {
    let server = Server::start(vec![
        // Reset before any answer.
        Reply::reset(),
        // Headers promise 500 bytes; 11 come, then the connection is reset.
        Reply::json(200, "{\"choices\":")
            .content_length(500)
            .ending(End::Reset),
        // A stream reset after its first chunk.
        Reply::sse([chunk(r#"{"content":"Hel"}"#, None)]).ending(End::Reset),
    ])
    .await;
    let p = provider(&server);
    for i in 0..2 {
        let e = chat(&p, &request()).await.unwrap_err();
        assert_eq!(kind(&e), ProviderErrorKind::Connection, "{i}: {e}");
        assert!(e.is_retryable());
    }
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert_eq!(text_of(&events), "Hel");
    assert!(done_of(&events).is_none());
    assert!(
        matches!(err, Some(Error::StreamInterrupted { chunks: 1, .. })),
        "{err:?}"
    );

    // Nothing listens: refused at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    drop(listener);
    let p = OpenAiCompatible::builder()
        .base_url(url)
        .http_client(client())
        .build()
        .unwrap();
    let e = chat(&p, &request()).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::Connection, "{e}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn deadlines_first_byte_first_token_idle_and_total() {
    let tiny = Duration::from_millis(40);
    let server = Server::start(vec![
        // No response at all.
        Reply::silent(),
        // Headers, then nothing.
        Reply::sse(Vec::<Vec<u8>>::new()).ending(End::Hang),
        // Content, then nothing.
        Reply::sse([chunk(r#"{"content":"Hi"}"#, None)]).ending(End::Hang),
        // Content, then nothing, under a total deadline only.
        Reply::sse([chunk(r#"{"content":"Hi"}"#, None)]).ending(End::Hang),
    ])
    .await;
    let p = builder(&server)
        .deadlines(Deadlines::default().first_byte(tiny).idle(tiny))
        .build()
        .unwrap();
    let e = chat(&p, &request()).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::Timeout);
    assert!(e.to_string().contains("no response"), "{e}");

    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert!(events.is_empty());
    let err = err.unwrap();
    assert_eq!(kind(&err), ProviderErrorKind::Timeout);
    assert!(err.to_string().contains("no first token"), "{err}");

    // Content must come in time (generous), then the silence is the idle deadline's.
    let p = builder(&server)
        .deadlines(Deadlines::default().idle(Duration::from_millis(250)))
        .build()
        .unwrap();
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert_eq!(text_of(&events), "Hi");
    match err {
        Some(Error::StreamInterrupted { chunks: 1, reason }) => {
            assert!(
                reason.contains("provider_timeout") && reason.contains("no data"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }

    let p = builder(&server)
        .deadlines(Deadlines::none().total(Duration::from_millis(300)))
        .build()
        .unwrap();
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert_eq!(text_of(&events), "Hi");
    match err {
        Some(Error::StreamInterrupted { reason, .. }) => {
            assert!(reason.contains("longer than"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_server_that_answers_a_stream_request_whole_is_replayed() {
    let server = Server::start(vec![Reply::json(200, WHOLE)]).await;
    let (events, err) = drain(stream(&provider(&server), &request()).await.unwrap()).await;
    assert!(err.is_none());
    assert_eq!(text_of(&events), "Hello! How can I help?");
    assert_eq!(done_of(&events).unwrap().usage.input_tokens, 1200);
}

#[tokio::test]
async fn a_json_error_answering_a_stream_request_is_classified() {
    let server = Server::start(vec![Reply::json(
        400,
        r#"{"error":{"message":"context_length_exceeded","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
    )])
    .await;
    let e = stream(&provider(&server), &request()).await.err().unwrap();
    assert_eq!(kind(&e), ProviderErrorKind::ContextLength);
}

#[tokio::test]
async fn embeddings_and_the_embedder() {
    let body = r#"{"object":"list","data":[
        {"object":"embedding","index":1,"embedding":[0.0,3.0,4.0]},
        {"object":"embedding","index":0,"embedding":[1.0,0.0,0.0]}],
      "model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
    let server = Server::start(vec![
        Reply::json(200, body),
        Reply::json(200, body),
        Reply::json(
            200,
            r#"{"object":"list","data":[{"index":0,"embedding":[1.0]}],"model":"m"}"#,
        ),
    ])
    .await;
    let p = provider(&server);
    let e = p
        .embed("text-embedding-3-small", &["first", "second"])
        .await
        .unwrap();
    assert_eq!(e.vectors, vec![vec![1.0, 0.0, 0.0], vec![0.0, 3.0, 4.0]]);
    assert_eq!(e.input_tokens, Some(8));
    let got = &server.received()[0];
    assert_eq!(got.line(), "POST /v1/embeddings HTTP/1.1");
    assert_eq!(got.json()["input"], serde_json::json!(["first", "second"]));
    assert_eq!(got.json()["encoding_format"], "float");

    let embedder = p
        .embedder("text-embedding-3-small", 3)
        .send_dimensions(true);
    assert_eq!(embedder.dimensions(), 3);
    let v = embedder.embed(&["first", "second"]).await.unwrap();
    assert_eq!(v[1], vec![0.0, 0.6, 0.8]);
    assert_eq!(server.received()[1].json()["dimensions"], 3);
    // Wrong count of vectors.
    let e = embedder.embed(&["a", "b"]).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::InvalidResponse);
}

#[tokio::test]
async fn through_a_pipeline_whole_and_streamed() {
    let pieces = [
        chunk(r#"{"role":"assistant","content":"Streamed"}"#, None),
        chunk(r#"{"content":" answer"}"#, None),
        chunk("{}", Some("stop")),
        usage_chunk(20, 2, 0),
        "data: [DONE]\n\n".to_owned(),
    ];
    let server = Server::start(vec![Reply::json(200, WHOLE), Reply::sse(pieces)]).await;
    let pipeline = Pipeline::builder()
        .provider(provider(&server))
        .default_model("gpt-4o-mini")
        .no_cache()
        .build()
        .unwrap();
    let r = pipeline.chat(request()).await.unwrap();
    assert_eq!(r.content, "Hello! How can I help?");
    assert!(!r.cost.is_zero());
    let (events, err) = drain(pipeline.stream(request()).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "Streamed answer");
    let end = done_of(&events).unwrap();
    assert_eq!(end.usage, Usage::new(20, 2));
    assert!(!end.cost.is_zero());
}

#[tokio::test]
async fn huge_deadlines_do_not_overflow() {
    let pieces = [
        chunk(r#"{"content":"ok"}"#, None),
        chunk("{}", Some("stop")),
        "data: [DONE]\n\n".to_owned(),
    ];
    let server = Server::start(vec![Reply::json(200, WHOLE), Reply::sse(pieces)]).await;
    let forever = Duration::MAX;
    let http = tokenwise::provider::http_client_builder()
        .unwrap()
        .no_proxy()
        .connect_timeout(forever)
        .build()
        .unwrap();
    let p = OpenAiCompatible::builder()
        .base_url(server.url("/v1"))
        .http_client(http)
        .deadlines(
            Deadlines::default()
                .connect(forever)
                .first_byte(forever)
                .idle(forever)
                .total(forever),
        )
        .build()
        .unwrap();
    assert!(chat(&p, &request()).await.is_ok());
    let (events, err) = drain(stream(&p, &request()).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "ok");
}

#[tokio::test]
async fn invalid_settings_are_configuration_errors() {
    let bad = [
        OpenAiCompatible::builder().base_url("not a url").build(),
        OpenAiCompatible::builder().base_url("ftp://x/v1").build(),
        OpenAiCompatible::builder().name(" ").build(),
        OpenAiCompatible::builder().api_key("").build(),
        OpenAiCompatible::builder().api_key("sk-bad\nkey").build(),
        OpenAiCompatible::builder()
            .header("bad header", "v")
            .build(),
        OpenAiCompatible::builder()
            .api_key_header("bad header")
            .build(),
        OpenAiCompatible::builder().max_body_bytes(0).build(),
        OpenAiCompatible::builder()
            .api_keys((0..=tokenwise::provider::MAX_KEYS).map(|i| format!("sk-{i}")))
            .build(),
    ];
    for (i, b) in bad.into_iter().enumerate() {
        match b {
            Err(Error::Config(m)) => assert!(!m.contains("sk-bad"), "{i}: {m}"),
            other => panic!("{i}: expected a configuration error, got {other:?}"),
        }
    }
    let p = OpenAiCompatible::builder()
        .base_url("http://localhost:11434/v1/")
        .name("ollama")
        .build()
        .unwrap();
    assert_eq!(p.base_url(), "http://localhost:11434/v1");
    assert_eq!(p.name(), "ollama");
    assert!(p.key_pool().is_none());
}

#[tokio::test]
async fn per_key_limits_spread_requests_and_refuse_without_sending() {
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_000)));
    let server = Server::start(vec![Reply::json(200, WHOLE), Reply::json(200, WHOLE)]).await;
    let p = builder(&server)
        .api_key("sk-second-key-abcdef0123")
        .key_limits(Some(1), None)
        .clock(clock.clone())
        .build()
        .unwrap();
    chat(&p, &request()).await.unwrap();
    chat(&p, &request()).await.unwrap();
    // both keys used their one request a minute: refused at once, nothing sent
    let e = chat(&p, &request()).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::RateLimited);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(60)));
    let got = server.received();
    assert_eq!(got.len(), 2);
    let auth: Vec<String> = got
        .iter()
        .map(|r| {
            r.head
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_ne!(auth[0], auth[1], "one request per key");
    assert!(
        OpenAiCompatible::builder()
            .key_limits(Some(1), None)
            .build()
            .is_err(),
        "limits need keys"
    );
}

/// A keep-alive HTTP/1.1 server answering every request with [`WHOLE`] (with
/// `Connection: close` when `close` is set), counting the connections it accepted.
async fn keep_alive_server(close: bool) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    let mut res = hyper::Response::new(axum::body::Body::from(WHOLE));
                    res.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    if close {
                        res.headers_mut().insert(
                            "connection",
                            hyper::header::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(res)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}/v1"), accepted)
}

#[tokio::test]
async fn plain_http_keeps_its_connection_and_opens_another_when_told_to_close() {
    use std::sync::atomic::Ordering;
    for (close, connections) in [(false, 1), (true, 4)] {
        let (url, accepted) = keep_alive_server(close).await;
        let p = OpenAiCompatible::builder()
            .base_url(url)
            .api_key(KEY)
            .build()
            .unwrap();
        for _ in 0..4 {
            let r = chat(&p, &request()).await.unwrap();
            assert_eq!(r.content, "Hello! How can I help?", "close: {close}");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            connections,
            "close: {close}"
        );
    }
}
