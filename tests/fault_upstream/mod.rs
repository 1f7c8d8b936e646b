//! A fault-injecting OpenAI-compatible upstream for tests: axum on 127.0.0.1, port 0,
//! answering `POST /v1/chat/completions` with one fault per model name, and recording
//! every attempt (which model, when, streamed or not, the messages).
//!
//! Use it from a test file with `mod fault_upstream;` (and `mod support;` for the client):
//!
//! ```ignore
//! let up = fault_upstream::Upstream::start().await;
//! let pipeline = fault_upstream::pipeline(&up).fallbacks("cut-after-3", ["ok"]).build()?;
//! ```
//!
//! | model | fault |
//! | --- | --- |
//! | `ok` (or any name not below) | a normal answer, [`ANSWER`], whole or streamed |
//! | `429-retry-after` | the first request of the test 429 with `retry-after-ms: 300`, then normal |
//! | `429-bare` | every request 429 without Retry-After |
//! | `500-once` | the first request 500, then normal |
//! | `503-always` | every request 503 |
//! | `reset` | the connection closes before any header |
//! | `silent` | the request is read and never answered |
//! | `slow-first-token` | headers at once, the first token after [`SLOW`] |
//! | `cut-after-3` | three tokens, then the connection breaks mid-body |
//! | `stall-after-3` | three tokens, then silence |
//! | `malformed-event` | a normal stream with one malformed event in the middle |
//! | `no-done` | a normal stream with finish reason and usage but no `data: [DONE]` |
//! | `context-length` | 400 `context_length_exceeded` |
//! | `content-filter` | 400 `content_filter` |
//! | `rejects-prefill` | 400 when the last message is the assistant's, else normal |
//! | `flaky` | 503 while [`Upstream::set_down`] says so, else normal |

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokenwise::observe::{MemoryUsage, UsageRecord};
use tokenwise::provider::OpenAiCompatible;
use tokenwise::resilience::{BreakerConfig, RetryPolicy};
use tokenwise::{Catalog, ModelSpec, PipelineBuilder, Pricing};
use tower::Service;

/// The answer every healthy model gives, one token a word.
pub const ANSWER: &str = "The quick brown fox jumps over the lazy dog.";
/// Its tokens as streamed.
pub const TOKENS: [&str; 9] = [
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog.",
];
/// How long `slow-first-token` waits before its first token.
pub const SLOW: Duration = Duration::from_secs(20);
/// The usage every healthy answer reports.
pub const USAGE: (u64, u64) = (12, 9);
/// The API key the pipeline's provider sends.
pub const KEY: &str = "sk-faults-0123456789";

/// Every fault model, for the catalogue.
pub const MODELS: [&str; 16] = [
    "ok",
    "ok-2",
    "429-retry-after",
    "429-bare",
    "500-once",
    "503-always",
    "reset",
    "silent",
    "slow-first-token",
    "cut-after-3",
    "stall-after-3",
    "malformed-event",
    "no-done",
    "context-length",
    "content-filter",
    "rejects-prefill",
];

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The model asked for.
    pub model: String,
    /// When, from the upstream's start.
    pub at: Duration,
    /// Whether it asked for a stream.
    pub stream: bool,
    /// The messages sent.
    pub messages: Value,
}

struct Shared {
    started: Instant,
    hits: Mutex<Vec<Hit>>,
    down: AtomicBool,
}

/// Marks a response whose connection must be closed without it.
#[derive(Clone, Copy)]
struct Reset;

/// The fault-injecting upstream, serving until dropped.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Starts serving on 127.0.0.1, port 0.
    pub async fn start() -> Upstream {
        let shared = Arc::new(Shared {
            started: Instant::now(),
            hits: Mutex::new(Vec::new()),
            down: AtomicBool::new(true),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let app = app.clone();
                let svc = service_fn(move |req: hyper::Request<Incoming>| {
                    let mut app = app.clone();
                    async move {
                        let res: Response = match app.call(req.map(Body::new)).await {
                            Ok(r) => r,
                            Err(e) => match e {},
                        };
                        if res.extensions().get::<Reset>().is_some() {
                            return Err(std::io::Error::other("reset on purpose"));
                        }
                        Ok::<_, std::io::Error>(res)
                    }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Upstream { addr, shared, task }
    }

    /// The base URL, up to and including `/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().unwrap().clone()
    }

    /// The requests for `model`.
    pub fn hits_for(&self, model: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.model == model)
            .collect()
    }

    /// Puts `flaky` down (503) or back up. It starts down.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn whole(model: &str) -> Response {
    let body = json!({
        "id": "chatcmpl-faults", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": USAGE.0, "completion_tokens": USAGE.1, "total_tokens": USAGE.0 + USAGE.1},
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn chunk(model: &str, delta: &Value, finish: Option<&str>) -> String {
    let c = json!({
        "id": "chatcmpl-faults", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {c}\n\n")
}

fn usage_chunk(model: &str) -> String {
    let c = json!({
        "id": "chatcmpl-faults", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [],
        "usage": {"prompt_tokens": USAGE.0, "completion_tokens": USAGE.1, "total_tokens": USAGE.0 + USAGE.1},
    });
    format!("data: {c}\n\n")
}

/// How a stream goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Normal,
    SlowFirst,
    CutAfter3,
    StallAfter3,
    Malformed,
    NoDone,
}

/// A streamed answer shaped by `shape`.
fn stream(model: &str, shape: Shape) -> Response {
    let model = model.to_owned();
    let pieces = futures_util::stream::unfold(0usize, move |i| {
        let model = model.clone();
        async move {
            let n = TOKENS.len();
            let item: Result<Bytes, std::io::Error> = match i {
                0 => {
                    if shape == Shape::SlowFirst {
                        tokio::time::sleep(SLOW).await;
                    }
                    Ok(chunk(&model, &json!({"role": "assistant", "content": ""}), None).into())
                }
                i if i <= n => {
                    if i == 4 && shape == Shape::CutAfter3 {
                        // Let the tokens before the cut reach the client first.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        return Some((Err(std::io::Error::other("cut")), n + 10));
                    }
                    if i == 4 && shape == Shape::StallAfter3 {
                        std::future::pending::<()>().await;
                    }
                    let mut s = String::new();
                    if i == 5 && shape == Shape::Malformed {
                        s.push_str("data: {\"choices\": [{\"delta\": \n\n");
                    }
                    s.push_str(&chunk(&model, &json!({"content": TOKENS[i - 1]}), None));
                    Ok(s.into())
                }
                i if i == n + 1 => Ok(chunk(&model, &json!({}), Some("stop")).into()),
                i if i == n + 2 => Ok(usage_chunk(&model).into()),
                i if i == n + 3 && shape != Shape::NoDone => Ok("data: [DONE]\n\n".into()),
                _ => return None,
            };
            Some((item, i + 1))
        }
    });
    let mut res = Response::new(Body::from_stream(pieces));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    res
}

async fn chat(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = v["model"].as_str().unwrap_or_default().to_owned();
    let streaming = v["stream"].as_bool().unwrap_or(false);
    let messages = v["messages"].clone();
    let seen_before = {
        let mut hits = shared.hits.lock().unwrap();
        let n = hits.iter().filter(|h| h.model == model).count();
        hits.push(Hit {
            model: model.clone(),
            at: shared.started.elapsed(),
            stream: streaming,
            messages: messages.clone(),
        });
        n
    };
    let answer = |shape: Shape| {
        if streaming {
            stream(&model, shape)
        } else {
            whole(&model)
        }
    };
    match model.as_str() {
        "429-retry-after" if seen_before == 0 => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                "rate_limit_exceeded",
                "Rate limit reached",
            );
            r.headers_mut()
                .insert("retry-after-ms", HeaderValue::from_static("300"));
            r
        }
        "429-bare" => error(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            "rate_limit_exceeded",
            "Rate limit reached",
        ),
        "500-once" if seen_before == 0 => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "server_error",
            "The server had an error",
        ),
        "503-always" => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            "Service unavailable",
        ),
        "flaky" if shared.down.load(Ordering::SeqCst) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            "Service unavailable",
        ),
        "reset" => {
            let mut r = Response::new(Body::empty());
            r.extensions_mut().insert(Reset);
            r
        }
        "silent" => std::future::pending().await,
        "context-length" => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "context_length_exceeded",
            "This model's maximum context length is 8192 tokens.",
        ),
        "content-filter" => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "content_filter",
            "The response was filtered due to the prompt triggering content management policy.",
        ),
        "rejects-prefill"
            if messages
                .as_array()
                .and_then(|m| m.last())
                .is_some_and(|m| m["role"] == "assistant") =>
        {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
                "assistant prefill is not supported by this model",
            )
        }
        "slow-first-token" => answer(Shape::SlowFirst),
        "cut-after-3" => answer(Shape::CutAfter3),
        "stall-after-3" => answer(Shape::StallAfter3),
        "malformed-event" => answer(Shape::Malformed),
        "no-done" => answer(Shape::NoDone),
        _ => answer(Shape::Normal),
    }
}

/// A catalogue of every fault model (and `flaky`), served by the `openai` provider.
pub fn catalog() -> Catalog {
    let mut c = Catalog::empty();
    let pricing = Pricing::per_mtok(1.0, 2.0, 0.5).unwrap();
    for name in MODELS.iter().chain(["flaky"].iter()) {
        c = c
            .with_model(ModelSpec::new(*name, "openai", 8_192, 1_024, pricing, 1))
            .unwrap();
    }
    c
}

/// The usage records of a pipeline, kept in memory.
pub fn usage() -> Arc<MemoryUsage> {
    Arc::new(MemoryUsage::new(64, 256))
}

/// The last usage record.
pub fn last_record(usage: &MemoryUsage) -> UsageRecord {
    usage.recent().last().cloned().expect("a usage record")
}

/// A pipeline builder over `up`: the fault catalogue, one key, short deadlines (first
/// token and idle 300 ms, attempt 2 s), retries 10 ms apart, no cache, and a breaker
/// opening after 5 failures for 500 ms. Add fallbacks and a usage sink as needed.
pub fn pipeline(up: &Upstream) -> PipelineBuilder {
    let provider = OpenAiCompatible::builder()
        .base_url(up.url())
        .api_key(KEY)
        .http_client(crate::support::client())
        .build()
        .unwrap();
    tokenwise::Pipeline::builder()
        .catalog(catalog())
        .provider(provider)
        .default_model("ok")
        .no_cache()
        .attempt_timeout(Duration::from_secs(2))
        .first_token_timeout(Duration::from_millis(300))
        .idle_timeout(Duration::from_millis(300))
        .retry(RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            ..RetryPolicy::default()
        })
        .breaker(BreakerConfig {
            consecutive_failures: 5,
            open_for: Duration::from_millis(500),
            ..BreakerConfig::default()
        })
}
