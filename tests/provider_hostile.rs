//! The HTTP providers against hostile or broken upstreams: answers without usage are
//! counted within bounds and off the runtime's workers, implausible usage is replaced
//! by a local count, starts of the API key never show, and a Retry-After is capped.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Reply, Server, client, done_of, drain, text_of};
use tokenwise::context::{TiktokenCounter, TokenCounter};
use tokenwise::provider::{
    Anthropic, DEFAULT_MAX_RETRY_AFTER, Deadlines, OpenAiCompatible, OpenAiCompatibleBuilder,
    Provider, ProviderCall,
};
use tokenwise::{
    Catalog, ChatRequest, ChatResponse, Error, FinishReason, ManualClock, Message,
    ProviderErrorKind, Timestamp, TokenizerKind,
};

const KEY: &str = "sk-hostile-0123456789abcdef";

fn builder(server: &Server) -> OpenAiCompatibleBuilder {
    OpenAiCompatible::builder()
        .base_url(server.url("/v1"))
        .api_key(KEY)
        .http_client(client())
}

fn request() -> ChatRequest {
    ChatRequest::new()
        .message(Message::user("Say hello"))
        .max_tokens(50)
}

async fn chat(p: &dyn Provider, model: &str) -> tokenwise::Result<ChatResponse> {
    let cat = Catalog::builtin();
    p.chat(ProviderCall::new(&request(), cat.require(model).unwrap()))
        .await
}

fn whole(content: &str, usage: &str) -> String {
    format!(
        r#"{{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":{}}},"finish_reason":"stop"}}]{usage}}}"#,
        serde_json::Value::from(content)
    )
}

/// Counts with tiktoken, remembering the longest text it was given and the threads it
/// ran on.
#[derive(Debug, Default)]
struct Watching {
    longest: AtomicUsize,
    threads: Mutex<Vec<std::thread::ThreadId>>,
}

impl TokenCounter for Watching {
    fn count_text(&self, text: &str, tokenizer: TokenizerKind) -> u64 {
        self.longest.fetch_max(text.len(), Ordering::SeqCst);
        if let Ok(mut t) = self.threads.lock() {
            t.push(std::thread::current().id());
        }
        TiktokenCounter::new().count_text(text, tokenizer)
    }
}

#[tokio::test]
async fn an_answer_without_usage_is_counted_capped_and_off_the_runtime() {
    // One unbroken 4 MiB word: counting it whole is quadratic in its length.
    let word = "x".repeat(4 << 20);
    let server = Server::start(vec![Reply::json(200, &whole(&word, ""))]).await;
    let counter = Arc::new(Watching::default());
    let p = builder(&server)
        .token_counter(counter.clone())
        .deadlines(Deadlines::default().total(Duration::from_secs(30)))
        .build()
        .unwrap();
    let r = chat(&p, "gpt-4o-mini").await.unwrap();
    assert_eq!(r.content.len(), 4 << 20);
    assert!(r.usage.estimated);
    // At most 64 KiB of the text went through the tokenizer...
    assert!(counter.longest.load(Ordering::SeqCst) <= 64 << 10);
    // ... and the rest was estimated at the counted rate: the whole is within a few
    // percent of the head's count scaled up.
    let head = TiktokenCounter::new().count_text(&word[..64 << 10], TokenizerKind::O200k);
    let scaled = head * 64;
    assert!(
        r.usage.output_tokens.abs_diff(scaled) <= scaled / 50,
        "{} vs {scaled}",
        r.usage.output_tokens
    );
    let here = std::thread::current().id();
    let threads = counter.threads.lock().unwrap().clone();
    assert!(!threads.is_empty());
    assert!(
        threads.iter().all(|t| *t != here),
        "counted on the runtime's thread"
    );
}

/// A counter that blocks until released.
#[derive(Debug)]
struct Stuck(Mutex<std::sync::mpsc::Receiver<()>>);

impl TokenCounter for Stuck {
    fn count_text(&self, _text: &str, _tokenizer: TokenizerKind) -> u64 {
        if let Ok(rx) = self.0.lock() {
            let _ = rx.recv();
        }
        1
    }
}

#[tokio::test]
async fn counting_that_outlasts_the_deadline_gives_a_size_estimate() {
    let server = Server::start(vec![Reply::json(200, &whole("Hello there", ""))]).await;
    let (release, rx) = std::sync::mpsc::channel();
    let p = builder(&server)
        .token_counter(Arc::new(Stuck(Mutex::new(rx))))
        .deadlines(Deadlines::default().total(Duration::from_millis(800)))
        .build()
        .unwrap();
    let r = chat(&p, "gpt-4o-mini").await.unwrap();
    drop(release);
    assert!(r.usage.estimated);
    // Four bytes a token: "Hello there" is 11 bytes, "Say hello" 9.
    assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (3, 3));
}

#[tokio::test]
async fn implausible_usage_is_replaced_by_a_local_count() {
    let absurd_out = r#","usage":{"prompt_tokens":10,"completion_tokens":18446744073709551615}"#;
    let absurd_in = r#","usage":{"prompt_tokens":9223372036854775807,"completion_tokens":2}"#;
    let over_max = r#","usage":{"prompt_tokens":10,"completion_tokens":5000}"#;
    let fine = r#","usage":{"prompt_tokens":10,"completion_tokens":52}"#;
    let sse_absurd = [
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\n".to_owned(),
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":99999999999}}\n\n".to_owned(),
        "data: [DONE]\n\n".to_owned(),
    ];
    let server = Server::start(vec![
        Reply::json(200, &whole("Hello", absurd_out)),
        Reply::json(200, &whole("Hello", absurd_in)),
        Reply::json(200, &whole("Hello", over_max)),
        Reply::json(200, &whole("Hello", fine)),
        Reply::sse(sse_absurd),
    ])
    .await;
    let p = builder(&server).build().unwrap();
    let tok = Catalog::builtin().require("gpt-4o-mini").unwrap().tokenizer;
    let local_in = TiktokenCounter::new().count_request(&request(), tok);
    for _ in 0..3 {
        let r = chat(&p, "gpt-4o-mini").await.unwrap();
        assert!(r.usage.estimated, "{:?}", r.usage);
        assert_eq!(r.usage.input_tokens, local_in);
        assert_eq!(r.usage.output_tokens, 1);
    }
    // Slightly over max_tokens (50) is within the margin: kept as reported.
    let r = chat(&p, "gpt-4o-mini").await.unwrap();
    assert!(!r.usage.estimated);
    assert_eq!(r.usage.output_tokens, 52);
    let cat = Catalog::builtin();
    let s = p
        .stream(ProviderCall::new(
            &request(),
            cat.require("gpt-4o-mini").unwrap(),
        ))
        .await
        .unwrap();
    let (events, err) = drain(s).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "Hi");
    let end = done_of(&events).unwrap();
    assert!(end.usage.estimated);
    assert_eq!(end.usage.output_tokens, 1);
}

#[tokio::test]
async fn anthropic_input_sums_near_the_limit_are_replaced() {
    let body = r#"{"id":"m","type":"message","role":"assistant","content":[{"type":"text","text":"Hello"}],"stop_reason":"end_turn","usage":{"input_tokens":4611686018427387904,"cache_read_input_tokens":4611686018427387904,"cache_creation_input_tokens":5,"output_tokens":3}}"#;
    let server = Server::start(vec![Reply::json(200, body)]).await;
    let p = Anthropic::builder()
        .base_url(server.url(""))
        .api_key(KEY)
        .http_client(client())
        .build()
        .unwrap();
    let r = chat(&p, "claude-haiku-4-5").await.unwrap();
    assert!(r.usage.estimated);
    assert!(r.usage.input_tokens < 100, "{:?}", r.usage);
    assert_eq!(r.finish_reason, FinishReason::Stop);
}

#[tokio::test]
async fn starts_of_the_key_never_show() {
    let cut = &KEY[..12];
    let echo = format!(
        r#"{{"error":{{"message":"Incorrect API key provided: {cut}. Also seen: {}…","type":"invalid_request_error","code":"invalid_api_key"}}}}"#,
        &KEY[..20]
    );
    // An HTML error page whose first 200 characters end inside the key.
    let html = format!("<html>{}{KEY}</html>", "x".repeat(180));
    let server = Server::start(vec![
        Reply::json(401, &echo),
        Reply::body(500, "text/html", html),
    ])
    .await;
    let p = builder(&server).build().unwrap();
    for expected in [ProviderErrorKind::Auth, ProviderErrorKind::Server] {
        let e = chat(&p, "gpt-4o-mini").await.unwrap_err();
        assert_eq!(e.as_provider().unwrap().kind, expected);
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(&KEY[..8]), "key start leaked: {shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
    }
}

#[tokio::test]
async fn retry_after_is_capped_for_the_error_and_the_key_rest() {
    let limited =
        r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#;
    let server = Server::start(vec![
        Reply::json(429, limited).header("retry-after", "99999999999"),
        Reply::json(429, limited).header("retry-after", "99999999999"),
    ])
    .await;
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_000)));
    let p = builder(&server).clock(clock.clone()).build().unwrap();
    let e = chat(&p, "gpt-4o-mini").await.unwrap_err();
    assert_eq!(e.retry_after(), Some(DEFAULT_MAX_RETRY_AFTER));
    assert_eq!(
        p.key_pool().unwrap().next_ready_in(),
        DEFAULT_MAX_RETRY_AFTER
    );
    let p = builder(&server)
        .clock(clock.clone())
        .max_retry_after(Duration::from_secs(20))
        .build()
        .unwrap();
    let e = chat(&p, "gpt-4o-mini").await.unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(20)));
    clock.advance(Duration::from_secs(20));
    assert_eq!(p.key_pool().unwrap().ready(), 1);
    assert!(matches!(e, Error::Provider(_)));
}
