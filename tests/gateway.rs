//! The OpenAI-compatible gateway example, started in-process on 127.0.0.1:0 and driven
//! over loopback by a plain HTTP client (and raw TCP where a client misbehaves on
//! purpose): whole and streamed answers, every error shape, limits, the cache, the
//! model list, and an OpenAI-compatible upstream whose key must never leak.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/gateway/mod.rs"]
mod gateway;
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use gateway::keys::KeyEntry;
use gateway::{Gateway, KeyTable, Limits};
use serde_json::{Value, json};
use tokenwise::budget::BudgetWindow;
use tokenwise::provider::{OpenAiCompatible, SimulatedProvider};
use tokenwise::provider::{Provider, ProviderCall};
use tokenwise::resilience::RetryPolicy;
use tokenwise::{
    ChatResponse, ChatStream, Cost, FinishReason, Pipeline, PipelineBuilder, ProviderError,
    ProviderErrorKind, ScopeKind, StreamEnd, StreamEvent, Tier, Usage,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ALICE: &str = "sk-test-alice-000001";
const BOB: &str = "sk-test-bob-0000002";
const CAROL: &str = "sk-test-carol-000003";

fn keys() -> KeyTable {
    let entry = |key: &str, user: &str, org: &str, tier: Tier| KeyEntry {
        key: key.into(),
        user: user.into(),
        org: Some(org.into()),
        tier,
    };
    KeyTable::from_entries([
        entry(ALICE, "alice", "acme", Tier::Standard),
        entry(BOB, "bob", "acme", Tier::Free),
        entry(CAROL, "carol", "globex", Tier::Premium),
    ])
    .expect("valid key table")
}

/// A simulated upstream with no latency.
fn instant() -> SimulatedProvider {
    SimulatedProvider::builder()
        .time_to_first_token(Duration::ZERO)
        .per_token(Duration::ZERO)
        .build()
        .expect("simulated provider")
}

fn pipeline() -> PipelineBuilder {
    Pipeline::builder()
        .provider(instant())
        .default_model("gpt-4o-mini")
}

/// A gateway serving on 127.0.0.1:0 until dropped.
struct Gw {
    addr: SocketAddr,
    pipeline: Pipeline,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    client: reqwest::Client,
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A response, read whole.
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Checks OpenAI's error shape, `status` and `code`; returns the error object.
    fn error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        let e = &v["error"];
        let fields: Vec<&str> = e
            .as_object()
            .expect("an error object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(fields, ["code", "message", "param", "type"], "{v}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(e["type"].is_string());
        assert_eq!(e["code"], code, "{v}");
        e.clone()
    }

    fn retry_after(&self) -> Option<u64> {
        self.header("retry-after").map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("Retry-After is whole seconds, got {v}"))
        })
    }
}

impl Gw {
    async fn start(p: Pipeline) -> Gw {
        Self::start_with(Gateway::new(p, keys(), "gpt-4o-mini"), Limits::default()).await
    }

    async fn start_with(gw: Gateway, limits: Limits) -> Gw {
        let gw = Arc::new(gw.limits(limits.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(gateway::serve(
            listener,
            gateway::router(Arc::clone(&gw)),
            limits,
            async {
                let _ = stopped.await;
            },
        ));
        Gw {
            addr,
            pipeline: gw.pipeline().clone(),
            stop: Some(stop),
            client: support::client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let res = req.send().await.expect("request sent");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.expect("body read");
        Reply {
            status,
            headers,
            text,
        }
    }

    async fn post(&self, key: &str, body: &Value) -> Reply {
        self.post_raw(Some(key), body.to_string()).await
    }

    async fn post_raw(&self, key: Option<&str>, body: String) -> Reply {
        let mut req = self
            .client
            .post(self.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        self.send(req).await
    }

    async fn get(&self, key: Option<&str>, path: &str) -> Reply {
        let mut req = self.client.get(self.url(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        self.send(req).await
    }
}

fn ask(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
}

fn ask_streamed(text: &str, include_usage: bool) -> Value {
    let mut v = ask(text);
    v["stream"] = json!(true);
    v["stream_options"] = json!({"include_usage": include_usage});
    v
}

/// The `data:` payloads of an SSE body, in order; comment lines are skipped.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

fn chunks(data: &[String]) -> Vec<Value> {
    data.iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad chunk ({e}): {d}")))
        .collect()
}

fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// Sends `bytes` on a fresh connection and reads until the server closes it (at most
/// five seconds).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn whole_answer_has_openai_shape_and_cost_headers() {
    let gw = Gw::start(pipeline().build().unwrap()).await;
    let r = gw
        .post(ALICE, &ask("What does a circuit breaker do?"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-tokenwise-cache"), Some("miss"));
    let cost = r.header("x-tokenwise-cost-usd").expect("cost header");
    assert!(cost.parse::<f64>().unwrap() > 0.0, "{cost}");
    let v = r.json();
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    assert_eq!(r.header("x-request-id"), Some(id));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "gpt-4o-mini");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    assert!(choice["message"].get("tool_calls").is_none());
    let u = &v["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 0 && c > 0);
    assert_eq!(u["total_tokens"].as_u64(), Some(p + c));
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn repeat_is_served_from_cache_unless_told_not_to() {
    let gw = Gw::start(pipeline().build().unwrap()).await;
    let q = ask("How do I reset my password?");
    let first = gw.post(ALICE, &q).await;
    assert_eq!(first.header("x-tokenwise-cache"), Some("miss"));
    let again = gw.post(ALICE, &q).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("x-tokenwise-cache"), Some("hit"));
    assert_eq!(again.header("x-tokenwise-cost-usd"), Some("0.000000000"));
    assert_eq!(
        again.header("x-tokenwise-saved-usd"),
        first.header("x-tokenwise-cost-usd")
    );
    let (a, b) = (first.json(), again.json());
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    assert_eq!(a["usage"], b["usage"], "usage is never silently zero");
    assert_ne!(a["id"], b["id"]);
    // bob is in the same org: the per-org cache answers him too
    let bob = gw.post(BOB, &q).await;
    assert_eq!(bob.header("x-tokenwise-cache"), Some("hit"));
    // Cache-Control: no-store skips the cache
    let req = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ALICE)
        .header("cache-control", "no-store")
        .body(q.to_string());
    let bypass = gw.send(req).await;
    assert_eq!(bypass.header("x-tokenwise-cache"), Some("miss"));
}

#[tokio::test]
async fn streamed_answer_has_chunks_usage_and_done() {
    let gw = Gw::start(pipeline().build().unwrap()).await;
    let r = gw
        .post(ALICE, &ask_streamed("Explain exponential backoff", true))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("x-tokenwise-cache"), Some("miss"));
    let data = sse_data(&r.text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    let cs = chunks(&data);
    let id = cs[0]["id"].as_str().unwrap();
    assert_eq!(r.header("x-request-id"), Some(id));
    for c in &cs {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], "gpt-4o-mini");
        assert!(
            c.get("usage").is_some(),
            "with include_usage every chunk has usage"
        );
    }
    assert_eq!(cs[0]["choices"][0]["delta"]["role"], "assistant");
    let (usage_chunk, rest) = cs.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    let finish = rest.last().unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert!(
        rest[..rest.len() - 1]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null() && c["usage"].is_null())
    );
    let text = streamed_text(&cs);
    assert!(rest.len() > 3 && !text.is_empty());

    // The whole answer to the same question is the stream's text, from the cache, with
    // the same usage.
    let whole = gw.post(ALICE, &ask("Explain exponential backoff")).await;
    assert_eq!(whole.header("x-tokenwise-cache"), Some("hit"));
    let w = whole.json();
    assert_eq!(w["choices"][0]["message"]["content"], text);
    assert_eq!(w["usage"], usage_chunk["usage"]);

    // Streamed again: replayed from the cache, said so up front; no usage unless asked.
    let r = gw
        .post(ALICE, &ask_streamed("Explain exponential backoff", false))
        .await;
    assert_eq!(r.header("x-tokenwise-cache"), Some("hit"));
    let data = sse_data(&r.text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let cs = chunks(&data);
    assert_eq!(streamed_text(&cs), text);
    assert!(cs.iter().all(|c| c.get("usage").is_none()));
    assert!(r.text.contains(": tokenwise cache=hit"));
}

#[tokio::test]
async fn stream_broken_after_first_token_ends_with_an_error_event_and_no_done() {
    let sim = SimulatedProvider::builder()
        .time_to_first_token(Duration::ZERO)
        .per_token(Duration::ZERO)
        .cut_stream_after(3)
        .build()
        .unwrap();
    let p = Pipeline::builder()
        .provider(sim)
        .default_model("gpt-4o-mini")
        .build()
        .unwrap();
    let gw = Gw::start(p).await;
    let r = gw
        .post(ALICE, &ask_streamed("Tell me a long story", true))
        .await;
    assert_eq!(r.status, 200, "the stream had started");
    let data = sse_data(&r.text);
    assert!(!data.iter().any(|d| d == "[DONE]"), "{}", r.text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{last}");
    assert!(last["error"]["message"].is_string());
    let cs = chunks(&data[..data.len() - 1]);
    assert_eq!(
        cs.iter()
            .filter(|c| c["choices"][0]["delta"]["content"].is_string())
            .count(),
        4,
        "the role chunk and three text chunks came before the break"
    );
    // A broken stream is not cached: asking again misses.
    let again = gw.post(ALICE, &ask("Tell me a long story")).await;
    assert_eq!(again.header("x-tokenwise-cache"), Some("miss"));
}

#[tokio::test]
async fn missing_or_wrong_key_is_401() {
    let gw = Gw::start(pipeline().build().unwrap()).await;
    let body = ask("hi").to_string();
    for key in [None, Some("sk-not-a-key"), Some("")] {
        let r = gw.post_raw(key, body.clone()).await;
        let e = r.error(401, "invalid_api_key");
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    let req = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Basic {ALICE}"))
        .body(body);
    gw.send(req).await.error(401, "invalid_api_key");
    gw.get(None, "/v1/models")
        .await
        .error(401, "invalid_api_key");
}

#[tokio::test]
async fn bad_input_is_400_naming_the_parameter() {
    let gw = Gw::start(pipeline().build().unwrap()).await;
    let user = |c: Value| json!([{"role": "user", "content": c}]);
    let cases: Vec<(String, &str, Value)> = vec![
        ("{\"messages\": [".into(), "invalid_json", Value::Null),
        ("".into(), "invalid_json", Value::Null),
        ("[1, 2]".into(), "invalid_json", Value::Null),
        (
            json!({"messages": user(json!("x")), "max_token": 5}).to_string(),
            "unknown_parameter",
            json!("max_token"),
        ),
        (json!({"model": "gpt-4o-mini"}).to_string(), "missing_required_parameter", json!("messages")),
        (json!({"messages": []}).to_string(), "invalid_value", json!("messages")),
        (
            json!({"messages": user(json!(5))}).to_string(),
            "invalid_type",
            json!("messages[0].content"),
        ),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            "invalid_value",
            json!("messages[0].role"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x", "mood": "happy"}]}).to_string(),
            "unknown_parameter",
            json!("messages[0].mood"),
        ),
        (
            json!({"messages": user(json!([{"type": "image_url", "image_url": {"url": "http://x"}}]))})
                .to_string(),
            "unsupported_parameter",
            json!("messages[0].content[0].type"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "18C"}]})
                .to_string(),
            "missing_required_parameter",
            json!("messages[1].tool_call_id"),
        ),
        (
            json!({"messages": user(json!("x")), "temperature": 3}).to_string(),
            "invalid_value",
            json!("temperature"),
        ),
        (
            json!({"messages": user(json!("x")), "temperature": "hot"}).to_string(),
            "invalid_type",
            json!("temperature"),
        ),
        (
            json!({"messages": user(json!("x")), "max_tokens": 0}).to_string(),
            "invalid_value",
            json!("max_tokens"),
        ),
        (
            json!({"messages": user(json!("x")), "stop": ["a", "b", "c", "d", "e"]}).to_string(),
            "invalid_value",
            json!("stop"),
        ),
        (
            json!({"messages": user(json!("x")), "seed": -1}).to_string(),
            "invalid_value",
            json!("seed"),
        ),
        (
            json!({"messages": user(json!("x")), "n": 2}).to_string(),
            "unsupported_parameter",
            json!("n"),
        ),
        (
            json!({"messages": user(json!("x")), "tool_choice": "sometimes"}).to_string(),
            "invalid_value",
            json!("tool_choice"),
        ),
        (
            json!({"messages": user(json!("x")), "response_format": {"type": "yaml"}}).to_string(),
            "invalid_value",
            json!("response_format.type"),
        ),
        (
            json!({"messages": user(json!("x")), "stream": "yes"}).to_string(),
            "invalid_type",
            json!("stream"),
        ),
    ];
    for (body, code, param) in cases {
        let r = gw.post_raw(Some(ALICE), body.clone()).await;
        let e = r.error(400, code);
        assert_eq!(e["param"], param, "{body}: {e}");
        assert_eq!(e["type"], "invalid_request_error");
    }
    // What clients send by default is accepted: neutral values, ignored fields, text
    // parts, the developer role, nulls.
    let ok = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}], "name": "ann"},
        ],
        "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": false,
        "user": "someone-else", "metadata": {"k": "v"}, "store": false, "stop": "END",
        "max_completion_tokens": 40, "temperature": null, "stream": false,
        "parallel_tool_calls": true,
    });
    let r = gw.post(ALICE, &ok).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn unknown_model_is_404_and_unknown_routes_are_openai_shaped() {
    let gw = Gw::start(pipeline().build().unwrap()).await;
    let mut q = ask("hi");
    q["model"] = json!("gpt-imaginary");
    let e = gw.post(ALICE, &q).await.error(404, "model_not_found");
    assert_eq!(e["param"], "model");
    gw.get(Some(ALICE), "/v1/nothing")
        .await
        .error(404, "unknown_url");
    let req = gw.client.delete(gw.url("/v1/models")).bearer_auth(ALICE);
    gw.send(req).await.error(405, "method_not_allowed");
}

#[tokio::test]
async fn huge_bodies_are_413() {
    let gw = Gw::start_with(
        Gateway::new(pipeline().build().unwrap(), keys(), "gpt-4o-mini"),
        Limits {
            max_body_bytes: 64 * 1024,
            ..Limits::default()
        },
    )
    .await;
    // Declared too large: refused before a byte of it is read.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        10 << 20
    );
    let out = raw(gw.addr, head.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("\"code\":\"request_too_large\""), "{out}");
    // Chunked, with no length declared: refused once it goes over.
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    let piece = vec![b' '; 64 * 1024 + 1];
    write!(req, "{:x}\r\n", piece.len()).unwrap();
    req.extend_from_slice(&piece);
    req.extend_from_slice(b"\r\n");
    let out = raw(gw.addr, &req).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    // Under the limit is fine.
    let r = gw.post(ALICE, &ask("small enough")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn slow_clients_get_408_or_are_disconnected() {
    let gw = Gw::start_with(
        Gateway::new(pipeline().build().unwrap(), keys(), "gpt-4o-mini"),
        Limits {
            body_read_timeout: Duration::from_millis(200),
            header_read_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
    )
    .await;
    // A body that stops half way: 408 in OpenAI's shape.
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE}\r\ncontent-length: 100\r\nconnection: close\r\n\r\n{{\"messages\""
    );
    let out = raw(gw.addr, req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("\"code\":\"request_timeout\""), "{out}");
    // A request head that never completes: the connection is closed.
    let out = raw(gw.addr, b"POST /v1/chat/completions HTTP/1.1\r\nhost:").await;
    assert!(!out.contains("200 OK"), "{out}");
    // A connection that sends nothing at all: closed too.
    let out = raw(gw.addr, b"").await;
    assert!(out.is_empty(), "{out}");
}

#[tokio::test]
async fn the_header_timeout_spares_requests_in_progress_and_keeps_alive_between_them() {
    let slow = SimulatedProvider::builder()
        .time_to_first_token(Duration::ZERO)
        .per_token(Duration::from_millis(40))
        .build()
        .unwrap();
    let p = Pipeline::builder()
        .provider(slow)
        .default_model("gpt-4o-mini")
        .build()
        .unwrap();
    let gw = Gw::start_with(
        Gateway::new(p, keys(), "gpt-4o-mini"),
        Limits {
            header_read_timeout: Duration::from_millis(150),
            ..Limits::default()
        },
    )
    .await;
    // A stream that lasts several header timeouts is written to its end, and the
    // connection then serves another request.
    let mut q = ask_streamed("Write a long essay about queues", true);
    q["max_tokens"] = json!(12);
    for _ in 0..2 {
        let r = gw.post(ALICE, &q).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.text.trim_end().ends_with("data: [DONE]"), "{}", r.text);
    }
}

// Busy polling runs on a single-threaded runtime (on a multi-threaded one it is left
// off), as `gateway --workers 1 --busy-poll-us N` runs it.
#[tokio::test(flavor = "current_thread")]
async fn with_busy_polling_answers_streams_and_cache_hits_are_unchanged() {
    let gw = Gw::start_with(
        Gateway::new(pipeline().build().unwrap(), keys(), "gpt-4o-mini"),
        Limits {
            busy_poll: Some(Duration::from_micros(200)),
            ..Limits::default()
        },
    )
    .await;
    for i in 0..20 {
        let q = ask(&format!("busy polling question {i}"));
        let r = gw.post(ALICE, &q).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.header("x-tokenwise-cache"), Some("miss"));
        let again = gw.post(ALICE, &q).await;
        assert_eq!(again.header("x-tokenwise-cache"), Some("hit"));
        assert_eq!(
            r.json()["choices"][0]["message"],
            again.json()["choices"][0]["message"]
        );
    }
    let r = gw
        .post(ALICE, &ask_streamed("Explain busy polling", true))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let data = sse_data(&r.text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(!streamed_text(&chunks(&data)).is_empty());
}

#[tokio::test]
async fn burst_over_a_users_rate_limit_is_429_with_retry_after() {
    let gw = Gw::start(pipeline().rate_limit(ScopeKind::User, 3).build().unwrap()).await;
    for i in 0..3 {
        let r = gw.post(ALICE, &ask(&format!("question {i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = gw.post(ALICE, &ask("question 3")).await;
    let e = r.error(429, "rate_limit_exceeded");
    assert_eq!(e["type"], "rate_limit_error");
    let secs = r.retry_after().expect("Retry-After");
    assert!((1..=60).contains(&secs), "{secs}");
    // Streams are refused the same way, before the stream starts.
    let r = gw.post(ALICE, &ask_streamed("question 4", true)).await;
    r.error(429, "rate_limit_exceeded");
    // The limit is per user: bob is unaffected.
    assert_eq!(gw.post(BOB, &ask("question 0")).await.status, 200);
}

#[tokio::test]
async fn spend_cap_is_402_with_retry_after_and_cache_still_serves() {
    let p = pipeline()
        .spend_cap(ScopeKind::User, Cost::from_micros(100), BudgetWindow::Day)
        .build()
        .unwrap();
    let gw = Gw::start(p).await;
    let mut served = Vec::new();
    let mut refused = None;
    for i in 0..50 {
        let mut q = ask(&format!("Summarise ticket {i}"));
        q["max_tokens"] = json!(60);
        let r = gw.post(CAROL, &q).await;
        if r.status == 200 {
            served.push(q);
        } else {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the cap refuses at last");
    assert!(
        !served.is_empty(),
        "the cap let some requests through first"
    );
    let e = r.error(402, "insufficient_quota");
    assert_eq!(e["type"], "insufficient_quota");
    assert!(e["message"].as_str().unwrap().contains("user:carol"), "{e}");
    let secs = r.retry_after().expect("a daily cap says when it resets");
    assert!((1..=86_400).contains(&secs), "{secs}");
    // A capped user is still answered from the cache, which costs nothing.
    let hit = gw.post(CAROL, &served[0]).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.header("x-tokenwise-cache"), Some("hit"));
}

#[tokio::test]
async fn overloaded_is_503_and_a_departed_streaming_client_frees_its_slot() {
    let slow = SimulatedProvider::builder()
        .time_to_first_token(Duration::ZERO)
        .per_token(Duration::from_millis(100))
        .build()
        .unwrap();
    let p = Pipeline::builder()
        .provider(slow)
        .default_model("gpt-4o-mini")
        .max_in_flight(1)
        .build()
        .unwrap();
    let gw = Gw::start(p).await;
    let mut open = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ALICE)
        .body(ask_streamed("Write a long essay about queues", true).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    let first = open.chunk().await.unwrap().expect("a first chunk");
    assert!(first.starts_with(b"data: "));
    assert_eq!(gw.pipeline.load().0, 1, "the stream holds the only slot");

    let r = gw.post(BOB, &ask("anything")).await;
    let e = r.error(503, "overloaded");
    assert_eq!(e["type"], "server_error");

    // The client goes away mid-stream: the gateway drops the pipeline's stream, which
    // frees the slot and settles what was used.
    drop(open);
    let mut waited = Duration::ZERO;
    while gw.pipeline.load().0 != 0 {
        assert!(waited < Duration::from_secs(3), "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    }
    let records = gw.pipeline.recent_usage();
    let dropped = records
        .iter()
        .find(|r| r.user.as_deref() == Some("alice"))
        .expect("the dropped stream was recorded");
    assert_eq!(dropped.outcome.label(), "stream_dropped");
    assert!(!dropped.cost.is_zero(), "what it used was committed");
    // The slot is free again (a stream answers 200 once its first token is in).
    let next = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(BOB)
        .body(ask_streamed("anything", false).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 200);
}

#[tokio::test]
async fn models_are_listed_in_openai_shape() {
    let gw = Gw::start(pipeline().build().unwrap()).await;
    let r = gw.get(Some(ALICE), "/v1/models").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), gw.pipeline.catalog().len());
    let mini = data.iter().find(|m| m["id"] == "gpt-4o-mini").unwrap();
    assert_eq!(mini["object"], "model");
    assert_eq!(mini["owned_by"], "openai");
    assert!(mini["created"].is_u64());
    assert!(data.iter().any(|m| m["owned_by"] == "anthropic"));
    let one = gw.get(Some(ALICE), "/v1/models/claude-haiku-4-5").await;
    assert_eq!(one.json()["id"], "claude-haiku-4-5");
    gw.get(Some(ALICE), "/v1/models/gpt-imaginary")
        .await
        .error(404, "model_not_found");
    let health = gw.get(None, "/health").await;
    assert_eq!((health.status, health.text.as_str()), (200, "ok"));
}

/// The OpenAI-compatible provider pointed at a scripted loopback server.
fn openai_upstream(server: &support::Server, key: &str) -> Pipeline {
    let up = OpenAiCompatible::builder()
        .base_url(server.url("/v1"))
        .api_key(key)
        .http_client(support::client())
        .build()
        .unwrap();
    Pipeline::builder()
        .provider(up)
        .default_model("gpt-4o-mini")
        .retry(RetryPolicy::none())
        .build()
        .unwrap()
}

const UPSTREAM_KEY: &str = "sk-upstream-Zq81vR4nT6wP0xY3";

#[tokio::test]
async fn openai_upstream_whole_with_tools_and_streamed() {
    let whole = json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": null,
            "tool_calls": [{"id": "call_9", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]}}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60,
            "prompt_tokens_details": {"cached_tokens": 32}},
    });
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let usage = format!(
        "data: {}\n\n",
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
            "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}})
    );
    let server = support::Server::start(vec![
        support::Reply::json(200, &whole.to_string()),
        support::Reply::sse([
            chunk(json!({"role": "assistant", "content": "Hel"}), Value::Null),
            chunk(json!({"content": "lo"}), Value::Null),
            chunk(json!({}), json!("stop")),
            usage,
            "data: [DONE]\n\n".to_owned(),
        ]),
    ])
    .await;
    let gw = Gw::start_with(
        Gateway::new(
            openai_upstream(&server, UPSTREAM_KEY),
            keys(),
            "gpt-4o-mini",
        )
        .secret(UPSTREAM_KEY),
        Limits::default(),
    )
    .await;

    let req = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "user", "content": "And in Oslo?"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "description": "Gets the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "auto",
        "max_tokens": 100, "temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["END"],
        "response_format": {"type": "json_object"},
    });
    let r = gw.post(ALICE, &req).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let m = &v["choices"][0]["message"];
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(m["content"], Value::Null);
    assert_eq!(m["tool_calls"][0]["id"], "call_9");
    assert_eq!(m["tool_calls"][0]["type"], "function");
    assert_eq!(m["tool_calls"][0]["function"]["name"], "weather");
    assert_eq!(
        m["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Oslo\"}"
    );
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 32);
    assert_eq!(v["usage"]["total_tokens"], 60);

    // What the upstream received: every parameter, and the gateway's own key.
    let got = &server.received()[0];
    assert_eq!(
        got.header("authorization").as_deref(),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    let sent = got.json();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["tools"][0]["function"]["name"], "weather");
    assert_eq!(sent["tool_choice"], "auto");
    assert_eq!(sent["seed"], 7);
    assert_eq!(sent["stop"], json!(["END"]));
    assert_eq!(sent["max_completion_tokens"], 100);
    assert_eq!(sent["response_format"]["type"], "json_object");
    let msgs = sent["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 5);
    assert_eq!(
        msgs[2]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Paris\"}"
    );
    assert_eq!(msgs[3]["role"], "tool");
    assert_eq!(msgs[3]["tool_call_id"], "call_1");

    // Streamed through the upstream's SSE.
    let r = gw.post(ALICE, &ask_streamed("Say hello", true)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let data = sse_data(&r.text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let cs = chunks(&data);
    assert_eq!(streamed_text(&cs), "Hello");
    assert_eq!(cs.last().unwrap()["usage"]["total_tokens"], 14);
    assert!(!r.text.contains(UPSTREAM_KEY));
}

/// Log output captured for one test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_upstream_key_never_leaves_the_gateway() {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    // The whole test (server, pipeline and client) runs on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let echo = |status: u16, code: &str| {
        support::Reply::json(
            status,
            &json!({"error": {"message": format!("Incorrect API key provided: {UPSTREAM_KEY}."),
                "type": "invalid_request_error", "param": null, "code": code}})
            .to_string(),
        )
    };
    let server = support::Server::start(vec![
        echo(401, "invalid_api_key"),
        echo(400, "invalid_value"),
    ])
    .await;
    let gw = Gw::start_with(
        Gateway::new(
            openai_upstream(&server, UPSTREAM_KEY),
            keys(),
            "gpt-4o-mini",
        )
        .secret(UPSTREAM_KEY),
        Limits::default(),
    )
    .await;

    // The upstream refuses the gateway's key: the client learns that, not the key.
    let r = gw.post(ALICE, &ask("first")).await;
    let e = r.error(502, "upstream_auth");
    assert_eq!(e["type"], "server_error");
    // The upstream echoes the key in a client error that is passed on: scrubbed.
    let r2 = gw.post(ALICE, &ask("second")).await;
    let e = r2.error(400, "upstream_rejected");
    assert!(e["message"].as_str().unwrap().contains("[redacted]"), "{e}");

    for reply in [&r, &r2] {
        assert!(!reply.text.contains(UPSTREAM_KEY), "{}", reply.text);
        for (name, value) in &reply.headers {
            assert!(
                !value
                    .as_bytes()
                    .windows(UPSTREAM_KEY.len())
                    .any(|w| w == UPSTREAM_KEY.as_bytes()),
                "{name}"
            );
        }
    }
    assert!(
        server
            .received()
            .iter()
            .all(|q| q.header("authorization").as_deref()
                == Some(format!("Bearer {UPSTREAM_KEY}").as_str()))
    );
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        logged.contains("request failed"),
        "the failures were logged:\n{logged}"
    );
    assert!(
        !logged.contains(UPSTREAM_KEY),
        "the key reached the logs:\n{logged}"
    );
    assert!(!logged.contains(ALICE), "a gateway key reached the logs");
}

/// A provider whose streams are long and all ready at once: far more than socket
/// buffers hold. Usage comes first, so a cut stream needs no counting.
#[derive(Debug)]
struct Flood;

#[async_trait::async_trait]
impl Provider for Flood {
    fn name(&self) -> &str {
        "flood"
    }

    async fn chat(&self, _call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
        Err(ProviderError::new(ProviderErrorKind::BadRequest, "flood", "streams only").into())
    }

    async fn stream(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
        const PIECES: usize = 400;
        let model = call.model.name.clone();
        let events = futures_util::stream::iter(0..PIECES + 2).map(move |i| {
            Ok(match i {
                0 => StreamEvent::Usage(Usage::new(10, 1_000_000)),
                i if i <= PIECES => StreamEvent::text("lorem ipsum ".repeat(5_000)),
                _ => StreamEvent::Done(StreamEnd::new(FinishReason::Stop, &model, "flood")),
            })
        });
        Ok(Box::pin(events))
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_the_write_stall_timeout() {
    let p = Pipeline::builder()
        .provider(Flood)
        .default_model("gpt-4o-mini")
        .max_in_flight(4)
        .build()
        .unwrap();
    let gw = Gw::start_with(
        Gateway::new(p, keys(), "gpt-4o-mini"),
        Limits {
            write_stall_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(gw.addr).await.unwrap();
    let body =
        json!({"stream": true, "messages": [{"role": "user", "content": "Everything, please"}]})
            .to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // ...and the client reads no more. The stream must not be held forever.
    let mut waited = Duration::ZERO;
    while gw.pipeline.load().0 != 0 {
        assert!(
            waited < Duration::from_secs(10),
            "a stalled client held its stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    let records = gw.pipeline.recent_usage();
    assert_eq!(records[0].outcome.label(), "stream_dropped");
    assert!(!records[0].cost.is_zero(), "what it used was committed");
    drop(s);
}

#[test]
fn key_tables_load_from_toml_and_json_and_are_checked() {
    let toml = r#"
        [[keys]]
        key = "gw-3f9c1d7a5e2b4c68"
        user = "alice"
        org = "acme"
        tier = "premium"

        [[keys]]
        key = "gw-77aa01bc93de4f12"
        user = "bob"
    "#;
    let t = KeyTable::from_toml(toml).unwrap();
    assert_eq!(t.len(), 2);
    let alice = t.lookup("gw-3f9c1d7a5e2b4c68").unwrap();
    assert_eq!(
        (alice.user.as_str(), alice.org.as_deref(), alice.tier),
        ("alice", Some("acme"), Tier::Premium)
    );
    let bob = t.lookup("gw-77aa01bc93de4f12").unwrap();
    assert_eq!((bob.org.as_deref(), bob.tier), (None, Tier::Standard));
    assert!(t.lookup("gw-3f9c1d7a5e2b4c6").is_none());
    assert!(!format!("{t:?}").contains("gw-"), "Debug never shows keys");

    let json = r#"{"keys": [{"key": "gw-3f9c1d7a5e2b4c68", "user": "alice", "tier": "free"}]}"#;
    assert_eq!(KeyTable::from_json(json).unwrap().len(), 1);
    for bad in [
        r#"{"keys": [{"key": "short", "user": "alice"}]}"#,
        r#"{"keys": [{"key": "gw-3f9c1d7a5e2b4c68", "user": " "}]}"#,
        r#"{"keys": [{"key": "gw-3f9c1d7a5e2b4c68", "user": "a"}, {"key": "gw-3f9c1d7a5e2b4c68", "user": "b"}]}"#,
        r#"{"keys": [{"key": "gw-3f9c1d7a5e2b4c68", "user": "a", "teir": "free"}]}"#,
        r#"{"keys": [{"key": "gw-3f9c1d7a5e2b4c68", "user": "a", "tier": "gold"}]}"#,
        r#"{"keys": []}"#,
    ] {
        let e = KeyTable::from_json(bad).unwrap_err();
        assert!(!e.contains("gw-3f9c"), "errors never show keys: {e}");
    }
    let e =
        KeyTable::from_toml("[[keys]]\nkey = \"gw-3f9c1d7a5e2b4c68\"\nuser = alice\n").unwrap_err();
    assert!(e.contains("line 3"), "{e}");
    assert!(!e.contains("gw-3f9c"), "errors never show keys: {e}");
}

const CONFIG: &str = r#"
default_model = "gpt-4o-mini"

[upstreams.primary]
kind = "openai"
base_url = "PRIMARY_URL"
key_env = "PRIMARY_KEY"

[upstreams.local]
kind = "openai"
base_url = "LOCAL_URL"

[[models]]
name = "gpt-4o-mini"
upstream = "primary"

[[models]]
name = "local-model"
upstream = "local"
context_window = 8192
max_output = 1024
input_per_mtok = 0.0
output_per_mtok = 0.0
cached_input_per_mtok = 0.0
tier = 1

[limits]
user_rpm = 0
org_tpm = 0
global_rpm = 0

[spend_caps]
user_cents_per_day = 0
org_cents_per_day = 0

[timeouts]
attempt_secs = 10
first_token_secs = 5
idle_secs = 5

[retry]
attempts = 1
"#;

fn answer(model: &str, text: &str) -> String {
    json!({
        "id": "c", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2}
    })
    .to_string()
}

#[tokio::test]
async fn a_configured_gateway_routes_each_model_to_its_upstream_and_falls_back() {
    use gateway::config::{GatewayConfig, Plan};
    let down = r#"{"error":{"message":"boom","type":"server_error"}}"#;
    let primary = support::Server::start(vec![
        support::Reply::json(200, &answer("gpt-4o-mini", "from primary")),
        support::Reply::json(500, down),
    ])
    .await;
    let local = support::Server::start(vec![support::Reply::json(
        200,
        &answer("local-model", "from local"),
    )])
    .await;
    let text = CONFIG
        .replace("PRIMARY_URL", &primary.url("/v1"))
        .replace("LOCAL_URL", &local.url("/v1"));
    let cfg = GatewayConfig::from_toml(&text).unwrap();
    let env: std::collections::BTreeMap<String, String> =
        [("PRIMARY_KEY".to_owned(), UPSTREAM_KEY.to_owned())].into();
    let client = support::client();
    let fallback = ["gpt-4o-mini=local-model".to_owned()];
    let plan = Plan::from_config(
        &cfg,
        &tokenwise::Catalog::builtin(),
        &fallback,
        &env,
        false,
        Some(&client),
    )
    .unwrap();
    let said = plan.describe();
    assert!(
        said.contains("fallbacks: gpt-4o-mini -> local-model"),
        "{said}"
    );
    assert!(said.contains("no requests/min per user limit"), "{said}");
    let mut gw = Gateway::new(plan.pipeline().unwrap(), keys(), "gpt-4o-mini");
    for s in &plan.secrets {
        gw = gw.secret(s.clone());
    }
    let gw = Gw::start_with(gw, Limits::default()).await;
    // Only what the upstreams serve is listed, and owned by its upstream.
    let listed = gw.get(Some(ALICE), "/v1/models").await.json();
    let mut ids: Vec<(String, String)> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["owned_by"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            ("gpt-4o-mini".to_owned(), "primary".to_owned()),
            ("local-model".to_owned(), "local".to_owned())
        ]
    );
    gw.post(
        ALICE,
        &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .error(404, "model_not_found");
    // The primary answers its model with its key.
    let r = gw
        .post(
            ALICE,
            &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one"}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "from primary");
    // Then it fails: the fallback on the other upstream answers.
    let r = gw
        .post(
            ALICE,
            &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "two"}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "from local");
    let to_primary = primary.received();
    assert_eq!(to_primary.len(), 2, "no retry with attempts = 1");
    assert!(to_primary.iter().all(|q| q.json()["model"] == "gpt-4o-mini"
        && q.header("authorization").as_deref()
            == Some(format!("Bearer {UPSTREAM_KEY}").as_str())));
    let to_local = local.received();
    assert_eq!(to_local.len(), 1);
    assert_eq!(to_local[0].json()["model"], "local-model");
    assert!(to_local[0].header("authorization").is_none());
}

#[test]
fn configurations_are_checked() {
    use gateway::config::{GatewayConfig, Plan};
    let base = tokenwise::Catalog::builtin();
    let none: std::collections::BTreeMap<String, String> = Default::default();
    let plan = |text: &str, fallbacks: &[&str], allow: bool| {
        let cfg = GatewayConfig::from_toml(text)?;
        let f: Vec<String> = fallbacks.iter().map(|s| (*s).to_owned()).collect();
        Plan::from_config(&cfg, &base, &f, &none, allow, None)
    };
    let ok = CONFIG
        .replace("PRIMARY_URL", "http://127.0.0.1:1/v1")
        .replace("LOCAL_URL", "http://127.0.0.1:2/v1");
    // The key variable is unset: refused, unless only checking.
    assert!(plan(&ok, &[], false).unwrap_err().contains("PRIMARY_KEY"));
    let checked = plan(&ok, &[], true).unwrap();
    assert!(checked.describe().contains("$PRIMARY_KEY is not set"));
    // Busy polling is a top-level number of microseconds, off when absent.
    assert_eq!(GatewayConfig::from_toml(&ok).unwrap().busy_poll_us, None);
    let busy = format!("busy_poll_us = 200\n{ok}");
    assert_eq!(
        GatewayConfig::from_toml(&busy).unwrap().busy_poll_us,
        Some(200)
    );
    assert!(GatewayConfig::from_toml(&format!("busy_poll_us = -1\n{ok}")).is_err());
    for (text, fallbacks, says) in [
        (
            ok.replace("upstream = \"local\"", "upstream = \"nowhere\""),
            vec![],
            "nowhere",
        ),
        (ok.clone(), vec!["gpt-4o-mini=gpt-4o"], "gpt-4o"),
        (ok.clone(), vec!["gpt-4o-mini"], "PRIMARY=FALLBACK"),
        (
            ok.replace("context_window = 8192\n", ""),
            vec![],
            "context_window",
        ),
        (
            ok.replace("default_model = \"gpt-4o-mini\"", "default_model = \"o3\""),
            vec![],
            "o3",
        ),
        (
            ok.replace("attempt_secs = 10", "attempt_secs = 0"),
            vec![],
            "at least 1 second",
        ),
        (format!("{ok}\nsurprise = 1\n"), vec![], "surprise"),
        (
            ok.replace(
                "kind = \"openai\"\nbase_url = \"http://127.0.0.1:2/v1\"",
                "kind = \"anthropic\"\nbase_url = \"http://127.0.0.1:2/v1\"",
            ),
            vec![],
            "key_env",
        ),
    ] {
        let e = plan(&text, &fallbacks, true).unwrap_err();
        assert!(e.contains(says), "{says}: {e}");
    }
}
