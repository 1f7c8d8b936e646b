//! Claude token counts from the token-counting endpoint (a loopback stand-in): exact
//! counts cached per text, the local estimate as fallback, and the pipeline's
//! reservations using the best count.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::ServiceExt;

use tokenwise::context::{ClaudeTokenCounter, TiktokenCounter, TokenCounter};
use tokenwise::provider::{ApiKey, SimulatedProvider};
use tokenwise::{CacheMode, ChatRequest, Cost, Document, Message, Pipeline, TokenizerKind};

#[derive(Default)]
struct Fake {
    calls: AtomicUsize,
    fail: Mutex<bool>,
    keys: Mutex<Vec<String>>,
    /// Tokens per word (0: one).
    per_word: AtomicUsize,
}

/// Counts like the real endpoint might: 5 tokens of overhead plus one per word.
async fn count(
    State(f): State<Arc<Fake>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    f.calls.fetch_add(1, Ordering::SeqCst);
    f.keys.lock().unwrap().push(
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    );
    if *f.fail.lock().unwrap() {
        return (StatusCode::SERVICE_UNAVAILABLE, "{}".into());
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["model"], "claude-sonnet-4-5");
    let text = v["messages"][0]["content"].as_str().unwrap();
    let per_word = f.per_word.load(Ordering::SeqCst).max(1);
    let n = 5 + per_word * text.split_whitespace().count();
    (StatusCode::OK, format!(r#"{{"input_tokens":{n}}}"#))
}

async fn serve() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route("/v1/messages/count_tokens", post(count))
        .with_state(Arc::clone(&fake));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let app = app.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        Ok::<_, Infallible>(match app.oneshot(req.map(Body::new)).await {
                            Ok(r) => r,
                            Err(e) => match e {},
                        })
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), fake)
}

fn client() -> reqwest::Client {
    tokenwise::provider::http_client_builder()
        .unwrap()
        .no_proxy()
        .build()
        .unwrap()
}

#[tokio::test]
async fn exact_counts_are_fetched_once_and_preferred() {
    let (base, fake) = serve().await;
    let c = ClaudeTokenCounter::with_client(
        client(),
        &base,
        ApiKey::new("sk-test"),
        "claude-sonnet-4-5",
    );
    let text = "one two three four five six seven";
    let estimate = TiktokenCounter::new().count_text(text, TokenizerKind::ClaudeApprox);
    assert_eq!(
        c.count_text(text, TokenizerKind::ClaudeApprox),
        estimate,
        "estimate until counted"
    );
    assert_eq!(c.count_exact(text).await.unwrap(), 7);
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        2,
        "overhead once, then the text"
    );
    assert_eq!(c.count_text(text, TokenizerKind::ClaudeApprox), 7);
    assert_eq!(c.count_exact(text).await.unwrap(), 7);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "cached");
    // OpenAI tokenizers stay local
    assert_eq!(
        c.count_text(text, TokenizerKind::O200k),
        TiktokenCounter::new().count_text(text, TokenizerKind::O200k)
    );
    assert!(fake.keys.lock().unwrap().iter().all(|k| k == "sk-test"));

    // a request's texts in one round, each once
    let req = ChatRequest::new()
        .message(Message::system("be brief please"))
        .message(Message::user(text))
        .message(Message::user("be brief please"))
        .document(Document::new("alpha beta gamma delta", 1.0));
    assert_eq!(c.prepare(&req).await, 0);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 4, "two new texts");
    assert_eq!(
        c.count_text("alpha beta gamma delta", TokenizerKind::ClaudeApprox),
        4
    );
    // the request's count uses the exact figures
    assert_eq!(
        c.count_request(&req, TokenizerKind::ClaudeApprox),
        3 + (3 + 3) + (3 + 7) + (3 + 3) + (3 + 4)
    );
}

#[tokio::test]
async fn a_failing_endpoint_falls_back_to_the_estimate_and_the_cache_is_bounded() {
    let (base, fake) = serve().await;
    let c = ClaudeTokenCounter::with_client(client(), &base, ApiKey::new("k"), "claude-sonnet-4-5")
        .capacity(2);
    *fake.fail.lock().unwrap() = true;
    assert!(c.count_exact("a b c").await.is_err());
    let req = ChatRequest::user_text("some words here").document(Document::new("more words", 1.0));
    assert_eq!(c.prepare(&req).await, 2, "both estimated");
    assert_eq!(
        c.count_text("some words here", TokenizerKind::ClaudeApprox),
        TiktokenCounter::new().count_text("some words here", TokenizerKind::ClaudeApprox)
    );
    *fake.fail.lock().unwrap() = false;
    for t in ["a", "a b", "a b c", "a b c d"] {
        c.count_exact(t).await.unwrap();
    }
    assert_eq!(c.cached(), 2);
    // nothing listens here: an error, not a hang or a panic
    let dead =
        ClaudeTokenCounter::with_client(client(), "http://127.0.0.1:1", ApiKey::new("k"), "m");
    assert!(dead.count_exact("x y").await.is_err());
}

fn pipeline(counter: Arc<ClaudeTokenCounter>) -> Pipeline {
    Pipeline::builder()
        .provider(SimulatedProvider::builder().build().unwrap())
        .default_model("claude-sonnet-4-5")
        .token_counter(counter)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_pipeline_fetches_the_counts_by_itself_once_per_text() {
    let (base, fake) = serve().await;
    let counter = Arc::new(ClaudeTokenCounter::with_client(
        client(),
        &base,
        ApiKey::new("k"),
        "claude-sonnet-4-5",
    ));
    let pipe = pipeline(counter.clone());
    let req = ChatRequest::new()
        .message(Message::system("be brief please"))
        .message(Message::user("one two three"))
        .max_tokens(20);
    pipe.chat(req.clone()).await.unwrap();
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        3,
        "the overhead, then each text"
    );
    assert_eq!(counter.cached(), 2);
    assert_eq!(counter.exact("one two three"), Some(3));
    // the same texts again, and a stream: counted already
    pipe.chat(req.clone().cache_mode(CacheMode::Bypass))
        .await
        .unwrap();
    let mut s = pipe
        .stream(req.clone().cache_mode(CacheMode::Bypass))
        .await
        .unwrap();
    while futures_util::StreamExt::next(&mut s).await.is_some() {}
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3, "cached");
    // a request for an OpenAI model is counted locally
    pipe.chat(ChatRequest::user_text("four five six").model("gpt-4o-mini"))
        .await
        .unwrap();
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
    // a new turn: only its text is counted (streams are prepared too)
    let longer = req
        .message(Message::assistant("ok"))
        .message(Message::user("seven eight"));
    let mut s = pipe.stream(longer).await.unwrap();
    while futures_util::StreamExt::next(&mut s).await.is_some() {}
    assert_eq!(fake.calls.load(Ordering::SeqCst), 5, "two new texts");
    assert_eq!(counter.cached(), 4);
}

#[tokio::test]
async fn the_plan_uses_exact_counts_and_the_estimate_when_the_endpoint_fails() {
    let (base, fake) = serve().await;
    fake.per_word.store(1_000, Ordering::SeqCst);
    // 50 words: about 55 tokens by the estimate, 50,000 by the endpoint; at $3 per
    // million input tokens the worst case is under $0.001 or about $0.15
    let req = ChatRequest::user_text("word ".repeat(50))
        .max_tokens(10)
        .max_cost(Cost::from_cents(1));
    let exact = pipeline(Arc::new(ClaudeTokenCounter::with_client(
        client(),
        &base,
        ApiKey::new("k"),
        "claude-sonnet-4-5",
    )));
    let refused = exact.chat(req.clone()).await.unwrap_err();
    assert_eq!(refused.reason(), "invalid_request", "{refused}");
    assert!(refused.to_string().contains("may cost up to"), "{refused}");

    *fake.fail.lock().unwrap() = true;
    let counter = Arc::new(ClaudeTokenCounter::with_client(
        client(),
        &base,
        ApiKey::new("k"),
        "claude-sonnet-4-5",
    ));
    let estimated = pipeline(counter.clone());
    let before = fake.calls.load(Ordering::SeqCst);
    estimated.chat(req.clone()).await.unwrap();
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        before + 1,
        "one failed call"
    );
    assert_eq!(counter.cached(), 0);
    // the endpoint rests after a failure: the next request does not wait for it
    estimated
        .chat(req.cache_mode(CacheMode::Bypass))
        .await
        .unwrap();
    assert_eq!(fake.calls.load(Ordering::SeqCst), before + 1, "resting");
}
