//! The OpenAI and Anthropic batch clients against loopback fakes of both providers'
//! batch endpoints (axum on port 0): the wire format sent, results read back through
//! the pipeline, oversized calls split, failed and malformed lines as per-item errors,
//! expired batches retried once, and bad bodies as typed errors.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tower::ServiceExt;

use tokenwise::batch::{
    AnthropicBatch, BatchCall, BatchLimits, BatchProvider, BatchState, ItemResult, OpenAiBatch,
};
use tokenwise::provider::{Anthropic, Deadlines, OpenAiCompatible, SimulatedProvider};
use tokenwise::{
    BatchOptions, BatchOutcome, Catalog, ChatRequest, Cost, Error, Pipeline, ProviderErrorKind,
    Usage,
};

const KEY: &str = "sk-batch-test-0123456789";
const IN_TOKENS: u64 = 50;
const OUT_TOKENS: u64 = 20;

/// What the fake does with a batch.
#[derive(Default)]
struct Script {
    /// Batches (by submission order) that expire: odd positions never run.
    expire: HashSet<usize>,
    /// Items whose line is an error.
    fail: HashSet<String>,
    /// Items whose line names them but has a broken body.
    broken: HashSet<String>,
    /// Items whose line is not JSON at all.
    garbage: HashSet<String>,
    /// Answer the status endpoint with this body instead.
    status_body: Option<String>,
    /// Refuse batch creation with this status.
    refuse_create: Option<u16>,
}

struct FakeBatch {
    ids: Vec<String>,
    models: Vec<String>,
    polls: u32,
    expire: bool,
}

#[derive(Default)]
struct Fake {
    script: Script,
    files: HashMap<String, Vec<u8>>,
    batches: HashMap<String, FakeBatch>,
    order: Vec<String>,
    /// Every request line received, in order.
    lines: Vec<Value>,
    auth_failures: u32,
    purposes: Vec<String>,
    cancelled: Vec<String>,
}

type Shared = Arc<Mutex<Fake>>;

fn reply(status: u16, body: String) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        body,
    )
}

fn check_auth(fake: &mut Fake, headers: &HeaderMap, openai: bool) -> bool {
    let ok = if openai {
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {KEY}"))
    } else {
        headers.get("x-api-key").and_then(|v| v.to_str().ok()) == Some(KEY)
            && headers.get("anthropic-version").is_some()
    };
    if !ok {
        fake.auth_failures += 1;
    }
    ok
}

/// The part named `file` of a multipart body, and the `purpose` field.
fn multipart_parts(content_type: &str, body: &[u8]) -> Option<(String, Vec<u8>)> {
    let boundary = content_type.split("boundary=").nth(1)?.trim();
    let delim = format!("--{boundary}");
    let text = body;
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(at) = find(rest, delim.as_bytes()) {
        rest = &rest[at + delim.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let end = find(rest, delim.as_bytes())?;
        parts.push(&rest[..end]);
    }
    let mut purpose = String::new();
    let mut file = None;
    for p in parts {
        let split = find(p, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&p[..split]).to_string();
        let mut content = &p[split + 4..];
        if content.ends_with(b"\r\n") {
            content = &content[..content.len() - 2];
        }
        if head.contains("name=\"purpose\"") {
            purpose = String::from_utf8_lossy(content).to_string();
        } else if head.contains("name=\"file\"") {
            file = Some(content.to_vec());
        }
    }
    Some((purpose, file?))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn register(fake: &mut Fake, lines: Vec<Value>, ids: Vec<String>, models: Vec<String>) -> String {
    let n = fake.order.len();
    let id = format!("batch_{n}");
    fake.lines.extend(lines);
    fake.batches.insert(
        id.clone(),
        FakeBatch {
            ids,
            models,
            polls: 0,
            expire: fake.script.expire.contains(&n),
        },
    );
    fake.order.push(id.clone());
    id
}

/// What became of item `pos` of batch `b`: `None` if it never ran (expired).
fn fate(fake: &Fake, b: &FakeBatch, pos: usize) -> Option<&'static str> {
    let id = &b.ids[pos];
    if b.expire && pos % 2 == 1 {
        None
    } else if fake.script.garbage.contains(id) {
        Some("garbage")
    } else if fake.script.broken.contains(id) {
        Some("broken")
    } else if fake.script.fail.contains(id) {
        Some("fail")
    } else {
        Some("ok")
    }
}

// ---- OpenAI ------------------------------------------------------------------------

async fn oa_upload(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> impl axum::response::IntoResponse {
    let mut fake = s.lock().unwrap();
    if !check_auth(&mut fake, &headers, true) {
        return reply(
            401,
            r#"{"error":{"message":"bad key","type":"invalid_request_error"}}"#.into(),
        );
    }
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Some((purpose, file)) = multipart_parts(&ct, &body) else {
        return reply(400, r#"{"error":{"message":"no file part"}}"#.into());
    };
    fake.purposes.push(purpose);
    let id = format!("file-in-{}", fake.files.len());
    fake.files.insert(id.clone(), file);
    reply(
        200,
        json!({"id": id, "object": "file", "purpose": "batch"}).to_string(),
    )
}

async fn oa_create(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> impl axum::response::IntoResponse {
    let mut fake = s.lock().unwrap();
    if !check_auth(&mut fake, &headers, true) {
        return reply(401, r#"{"error":{"message":"bad key"}}"#.into());
    }
    if let Some(code) = fake.script.refuse_create {
        return reply(
            code,
            r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#.into(),
        );
    }
    let req: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(req["endpoint"], "/v1/chat/completions");
    assert_eq!(req["completion_window"], "24h");
    let file = fake.files[req["input_file_id"].as_str().unwrap()].clone();
    let lines: Vec<Value> = file
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let ids = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_owned())
        .collect();
    let models = lines
        .iter()
        .map(|l| l["body"]["model"].as_str().unwrap().to_owned())
        .collect();
    let id = register(&mut fake, lines, ids, models);
    reply(
        200,
        json!({"id": id, "object": "batch", "status": "validating"}).to_string(),
    )
}

async fn oa_status(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> impl axum::response::IntoResponse {
    let mut fake = s.lock().unwrap();
    if !check_auth(&mut fake, &headers, true) {
        return reply(401, "{}".into());
    }
    if let Some(body) = &fake.script.status_body {
        return reply(200, body.clone());
    }
    let Some(b) = fake.batches.get_mut(&id) else {
        return reply(404, r#"{"error":{"message":"no such batch"}}"#.into());
    };
    b.polls += 1;
    let polls = b.polls;
    let b = &fake.batches[&id];
    let total = b.ids.len();
    if polls < 2 {
        return reply(
            200,
            json!({"id": id, "status": "in_progress",
            "request_counts": {"total": total, "completed": 0, "failed": 0}})
            .to_string(),
        );
    }
    let status = if b.expire { "expired" } else { "completed" };
    reply(
        200,
        json!({"id": id, "status": status,
        "output_file_id": format!("{id}-out"), "error_file_id": format!("{id}-err"),
        "request_counts": {"total": total, "completed": total, "failed": 0}})
        .to_string(),
    )
}

async fn oa_content(
    State(s): State<Shared>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> impl axum::response::IntoResponse {
    let mut fake = s.lock().unwrap();
    if !check_auth(&mut fake, &headers, true) {
        return reply(401, "{}".into());
    }
    let (batch_id, kind) = file.rsplit_once('-').unwrap();
    let b = &fake.batches[batch_id];
    let mut out = String::new();
    for (pos, id) in b.ids.iter().enumerate() {
        let line = match (fate(&fake, b, pos), kind) {
            (None, "err") => json!({"id": "r", "custom_id": id, "response": null,
                "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}}).to_string(),
            (Some("fail"), "err") => json!({"id": "r", "custom_id": id, "response": {"status_code": 400, "request_id": "q",
                "body": {"error": {"message": "Invalid value for 'temperature'", "type": "invalid_request_error", "param": null, "code": null}}}, "error": null}).to_string(),
            (Some("garbage"), "out") => "this line is not JSON {".to_owned(),
            (Some("broken"), "out") => json!({"id": "r", "custom_id": id, "response": {"status_code": 200, "body": {"choices": "none"}}, "error": null}).to_string(),
            (Some("ok"), "out") => json!({"id": "r", "custom_id": id, "response": {"status_code": 200, "request_id": "q", "body": {
                "id": "chatcmpl-1", "object": "chat.completion", "model": b.models[pos],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer to {id}")}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": IN_TOKENS, "completion_tokens": OUT_TOKENS, "total_tokens": IN_TOKENS + OUT_TOKENS}}}, "error": null}).to_string(),
            _ => continue,
        };
        out.push_str(&line);
        out.push('\n');
    }
    (
        StatusCode::OK,
        [("content-type", "application/octet-stream")],
        out,
    )
}

async fn oa_cancel(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> impl axum::response::IntoResponse {
    let mut fake = s.lock().unwrap();
    if !check_auth(&mut fake, &headers, true) {
        return reply(401, "{}".into());
    }
    fake.cancelled.push(id.clone());
    reply(200, json!({"id": id, "status": "cancelling"}).to_string())
}

async fn an_cancel(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> impl axum::response::IntoResponse {
    let mut fake = s.lock().unwrap();
    if !check_auth(&mut fake, &headers, false) {
        return reply(401, "{}".into());
    }
    fake.cancelled.push(id.clone());
    reply(
        200,
        json!({"id": id, "type": "message_batch", "processing_status": "canceling"}).to_string(),
    )
}

// ---- Anthropic ---------------------------------------------------------------------

async fn an_create(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> impl axum::response::IntoResponse {
    let mut fake = s.lock().unwrap();
    if !check_auth(&mut fake, &headers, false) {
        return reply(
            401,
            r#"{"type":"error","error":{"type":"authentication_error","message":"bad key"}}"#
                .into(),
        );
    }
    let req: Value = serde_json::from_slice(&body).unwrap();
    let lines: Vec<Value> = req["requests"].as_array().unwrap().clone();
    let ids = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_owned())
        .collect();
    let models = lines
        .iter()
        .map(|l| l["params"]["model"].as_str().unwrap().to_owned())
        .collect();
    let id = register(&mut fake, lines, ids, models);
    reply(
        200,
        json!({"id": id, "type": "message_batch", "processing_status": "in_progress"}).to_string(),
    )
}

async fn an_status(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> impl axum::response::IntoResponse {
    let mut fake = s.lock().unwrap();
    if !check_auth(&mut fake, &headers, false) {
        return reply(401, "{}".into());
    }
    if let Some(body) = &fake.script.status_body {
        return reply(200, body.clone());
    }
    let b = fake.batches.get_mut(&id).unwrap();
    b.polls += 1;
    let total = b.ids.len() as u64;
    if b.polls < 2 {
        return reply(200, json!({"id": id, "type": "message_batch", "processing_status": "in_progress",
            "request_counts": {"processing": total, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}}).to_string());
    }
    let expired = if b.expire { total / 2 } else { 0 };
    reply(200, json!({"id": id, "type": "message_batch", "processing_status": "ended",
        "results_url": format!("https://elsewhere.example/v1/messages/batches/{id}/results"),
        "request_counts": {"processing": 0, "succeeded": total - expired, "errored": 0, "canceled": 0, "expired": expired}}).to_string())
}

async fn an_results(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> impl axum::response::IntoResponse {
    let mut fake = s.lock().unwrap();
    if !check_auth(&mut fake, &headers, false) {
        return (
            StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            "{}".to_owned(),
        );
    }
    let b = &fake.batches[&id];
    let mut out = String::new();
    for (pos, cid) in b.ids.iter().enumerate() {
        let line = match fate(&fake, b, pos) {
            None => json!({"custom_id": cid, "result": {"type": "expired"}}).to_string(),
            Some("fail") => json!({"custom_id": cid, "result": {"type": "errored", "error": {"type": "error",
                "error": {"type": "invalid_request_error", "message": "max_tokens: too large"}}}}).to_string(),
            Some("garbage") => "{\"custom_id\": ".to_owned(),
            Some("broken") => json!({"custom_id": cid, "result": {"type": "succeeded", "message": {"content": 7}}}).to_string(),
            _ => json!({"custom_id": cid, "result": {"type": "succeeded", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": b.models[pos],
                "content": [{"type": "text", "text": format!("answer to {cid}")}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": IN_TOKENS, "output_tokens": OUT_TOKENS}}}}).to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    (
        StatusCode::OK,
        [("content-type", "application/binary")],
        out,
    )
}

struct Server {
    base: String,
    state: Shared,
}

async fn serve(script: Script) -> Server {
    let state: Shared = Arc::new(Mutex::new(Fake {
        script,
        ..Fake::default()
    }));
    let app = Router::new()
        .route("/v1/files", post(oa_upload))
        .route("/v1/batches", post(oa_create))
        .route("/v1/batches/{id}", get(oa_status))
        .route("/v1/files/{id}/content", get(oa_content))
        .route("/v1/batches/{id}/cancel", post(oa_cancel))
        .route("/v1/messages/batches/{id}/cancel", post(an_cancel))
        .route("/v1/messages/batches", post(an_create))
        .route("/v1/messages/batches/{id}", get(an_status))
        .route("/v1/messages/batches/{id}/results", get(an_results))
        .with_state(Arc::clone(&state));
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
    Server {
        base: format!("http://{addr}"),
        state,
    }
}

fn client() -> reqwest::Client {
    tokenwise::provider::http_client_builder()
        .unwrap()
        .no_proxy()
        .build()
        .unwrap()
}

fn openai(server: &Server, limits: BatchLimits) -> OpenAiBatch {
    let p = OpenAiCompatible::builder()
        .base_url(format!("{}/v1", server.base))
        .api_key(KEY)
        .http_client(client())
        .deadlines(Deadlines::none())
        .build()
        .unwrap();
    OpenAiBatch::new(p).limits(limits).unwrap()
}

fn anthropic(server: &Server, limits: BatchLimits) -> AnthropicBatch {
    let p = Anthropic::builder()
        .base_url(&server.base)
        .api_key(KEY)
        .http_client(client())
        .deadlines(Deadlines::none())
        .build()
        .unwrap();
    AnthropicBatch::new(p).limits(limits).unwrap()
}

fn pipeline(model: &str, batch: impl BatchProvider + 'static) -> Pipeline {
    let mut o = BatchOptions::default();
    o.poll_interval = Duration::from_secs(60);
    Pipeline::builder()
        .provider(SimulatedProvider::new())
        .default_model(model)
        .batch_provider(batch)
        .batch_options(o)
        .build()
        .unwrap()
}

fn questions(n: usize) -> Vec<ChatRequest> {
    (0..n)
        .map(|i| ChatRequest::user_text(format!("Classify review {i}")).max_tokens(64))
        .collect()
}

fn key(i: usize) -> String {
    format!("tw-{i:06}")
}

fn kind(e: &Error) -> ProviderErrorKind {
    e.as_provider()
        .unwrap_or_else(|| panic!("not a provider error: {e:?}"))
        .kind
}

fn check_once(out: &[BatchOutcome], n: usize) {
    assert_eq!(out.len(), n);
    let idx: HashSet<usize> = out.iter().map(|o| o.index).collect();
    assert_eq!(idx.len(), n);
}

#[tokio::test(start_paused = true)]
async fn openai_batches_are_uploaded_split_and_read_back() {
    let script = Script {
        fail: [key(1)].into(),
        broken: [key(3)].into(),
        garbage: [key(4)].into(),
        ..Script::default()
    };
    let server = serve(script).await;
    let p = pipeline(
        "gpt-4o-mini",
        openai(&server, BatchLimits::new(2, 1_000_000)),
    );
    let out = p.batch(questions(6)).await.unwrap().collect().await;
    check_once(&out, 6);
    let model = Catalog::builtin().resolve("gpt-4o-mini").unwrap();
    let each = model.batch_cost(&Usage::new(IN_TOKENS, OUT_TOKENS));
    assert_eq!(
        each.as_nanos() * 2,
        model.cost(&Usage::new(IN_TOKENS, OUT_TOKENS)).as_nanos()
    );
    for o in &out {
        match o.index {
            1 => assert_eq!(
                kind(o.result.as_ref().unwrap_err()),
                ProviderErrorKind::BadRequest
            ),
            3 | 4 => assert_eq!(
                kind(o.result.as_ref().unwrap_err()),
                ProviderErrorKind::InvalidResponse
            ),
            i => {
                let r = o.result.as_ref().unwrap();
                assert_eq!(r.content, format!("answer to {}", key(i)));
                assert_eq!(r.cost, each);
            }
        }
    }
    let fake = server.state.lock().unwrap();
    assert_eq!(fake.order.len(), 3, "six requests in batches of two");
    assert_eq!(fake.auth_failures, 0);
    assert!(fake.purposes.iter().all(|p| p == "batch"));
    assert_eq!(fake.lines.len(), 6);
    let first = &fake.lines[0];
    assert_eq!(first["custom_id"], key(0));
    assert_eq!(first["method"], "POST");
    assert_eq!(first["url"], "/v1/chat/completions");
    assert_eq!(first["body"]["model"], "gpt-4o-mini");
    assert_eq!(first["body"]["messages"][0]["content"], "Classify review 0");
    assert!(first["body"].get("stream").is_none());
    drop(fake);
    assert_eq!(p.usage().totals.cost, Cost::from_nanos(each.as_nanos() * 3));
}

#[tokio::test(start_paused = true)]
async fn an_expired_openai_batch_is_retried_once_for_its_unfinished_items() {
    let server = serve(Script {
        expire: [0].into(),
        ..Script::default()
    })
    .await;
    let p = pipeline(
        "gpt-4o-mini",
        openai(&server, BatchLimits::new(100, 1_000_000)),
    );
    let out = p.batch(questions(5)).await.unwrap().collect().await;
    check_once(&out, 5);
    assert!(out.iter().all(|o| o.result.is_ok()), "{out:?}");
    let fake = server.state.lock().unwrap();
    assert_eq!(fake.order.len(), 2);
    let second: Vec<&str> = fake.batches["batch_1"]
        .ids
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(second, vec![key(1), key(3)]);
}

#[tokio::test(start_paused = true)]
async fn anthropic_batches_are_split_by_bytes_and_their_results_streamed() {
    let script = Script {
        fail: [key(0)].into(),
        broken: [key(2)].into(),
        garbage: [key(5)].into(),
        expire: [1].into(),
        ..Script::default()
    };
    let server = serve(script).await;
    // each request's entry is about 150 bytes: three fit in 500
    let p = pipeline(
        "claude-haiku-4-5",
        anthropic(&server, BatchLimits::new(100, 500)),
    );
    let out = p.batch(questions(7)).await.unwrap().collect().await;
    check_once(&out, 7);
    let fake = server.state.lock().unwrap();
    let sizes: Vec<usize> = fake
        .order
        .iter()
        .map(|b| fake.batches[b].ids.len())
        .collect();
    assert!(fake.order.len() >= 3, "{sizes:?} {out:?}");
    assert_eq!(fake.auth_failures, 0);
    let line = &fake.lines[0];
    assert_eq!(line["custom_id"], key(0));
    assert_eq!(line["params"]["model"], "claude-haiku-4-5");
    assert_eq!(line["params"]["max_tokens"], 64);
    // the second batch ([3, 4, 5]) expired: its expired item (4) and the one whose line
    // could not be read (5, which may not have run) were sent again, once, together
    assert_eq!(
        fake.batches[&fake.order[1]].ids,
        vec![key(3), key(4), key(5)]
    );
    assert_eq!(fake.order.len(), 4);
    let last = &fake.batches[fake.order.last().unwrap()].ids;
    assert_eq!(last, &vec![key(4), key(5)]);
    drop(fake);
    let model = Catalog::builtin().resolve("claude-haiku-4-5").unwrap();
    for o in &out {
        match o.index {
            0 => assert_eq!(
                kind(o.result.as_ref().unwrap_err()),
                ProviderErrorKind::BadRequest
            ),
            2 | 5 => assert_eq!(
                kind(o.result.as_ref().unwrap_err()),
                ProviderErrorKind::InvalidResponse
            ),
            i => {
                let r = o.result.as_ref().unwrap();
                assert_eq!(r.content, format!("answer to {}", key(i)));
                assert_eq!(r.cost, model.batch_cost(&Usage::new(IN_TOKENS, OUT_TOKENS)));
            }
        }
    }
}

#[tokio::test]
async fn bad_bodies_and_refusals_are_typed_errors() {
    let model = Catalog::builtin().resolve("gpt-4o-mini").unwrap();
    let req = ChatRequest::user_text("hi");
    let calls = [BatchCall::new("a", &req, &model)];

    let server = serve(Script {
        status_body: Some("not json".into()),
        ..Script::default()
    })
    .await;
    let b = openai(&server, BatchLimits::new(10, 1_000_000));
    let e = b.status("batch_0").await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::InvalidResponse);
    let a = anthropic(&server, BatchLimits::new(10, 1_000_000));
    assert_eq!(
        kind(&a.status("batch_0").await.unwrap_err()),
        ProviderErrorKind::InvalidResponse
    );
    // an id that cannot go in a path is refused before any request
    assert!(matches!(
        b.status("../files").await,
        Err(Error::InvalidRequest(_))
    ));
    // a custom id the providers would refuse
    let bad = [BatchCall::new("has space", &req, &model)];
    assert!(matches!(
        b.submit(&bad).await,
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(b.submit(&[]).await, Err(Error::InvalidRequest(_))));

    let server = serve(Script {
        status_body: Some(r#"{"id":"batch_0","status":"teleported"}"#.into()),
        refuse_create: Some(429),
        ..Script::default()
    })
    .await;
    let b = openai(&server, BatchLimits::new(10, 1_000_000));
    assert_eq!(
        kind(&b.status("batch_0").await.unwrap_err()),
        ProviderErrorKind::InvalidResponse
    );
    assert_eq!(
        kind(&b.submit(&calls).await.unwrap_err()),
        ProviderErrorKind::RateLimited
    );

    // a wrong key is an auth error, and never appears in the message
    let p = OpenAiCompatible::builder()
        .base_url(format!("{}/v1", server.base))
        .api_key("sk-wrong-key-987654321")
        .http_client(client())
        .build()
        .unwrap();
    let e = OpenAiBatch::new(p).submit(&calls).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::Auth);
    assert!(!e.to_string().contains("sk-wrong-key"));
}

#[tokio::test]
async fn results_past_the_cap_are_refused() {
    let server = serve(Script::default()).await;
    let b = openai(&server, BatchLimits::new(10, 1_000_000))
        .max_results_bytes(64)
        .unwrap();
    let model = Catalog::builtin().resolve("gpt-4o-mini").unwrap();
    let req = ChatRequest::user_text("hi");
    let calls = [BatchCall::new("a", &req, &model)];
    let id = b.submit(&calls).await.unwrap();
    assert_eq!(b.status(&id).await.unwrap().state, BatchState::Running);
    assert_eq!(b.status(&id).await.unwrap().state, BatchState::Ended);
    let e = b.results(&id, &calls).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::InvalidResponse);
    assert!(e.to_string().contains("cap"), "{e}");
    // with room, the same results read
    let b = openai(&server, BatchLimits::new(10, 1_000_000));
    let r = b.results(&id, &calls).await.unwrap();
    assert_eq!(r.malformed, 0);
    assert!(matches!(&r.lines[0].result, ItemResult::Answer(a) if a.content == "answer to a"));
    assert!(
        OpenAiBatch::new(OpenAiCompatible::builder().build().unwrap())
            .limits(BatchLimits::new(0, 1))
            .is_err()
    );
}

#[tokio::test]
async fn batches_are_cancelled_at_their_own_endpoints() {
    let server = serve(Script::default()).await;
    let model = Catalog::builtin().resolve("gpt-4o-mini").unwrap();
    let req = ChatRequest::user_text("hi");
    let calls = [BatchCall::new("a", &req, &model)];
    let b = openai(&server, BatchLimits::new(10, 1_000_000));
    let id = b.submit(&calls).await.unwrap();
    b.cancel(&id).await.unwrap();
    let a = anthropic(&server, BatchLimits::new(10, 1_000_000));
    let id2 = a.submit(&calls).await.unwrap();
    a.cancel(&id2).await.unwrap();
    assert_eq!(server.state.lock().unwrap().cancelled, vec![id, id2]);
}

#[tokio::test(start_paused = true)]
async fn a_batch_whose_status_cannot_be_read_fails_its_items_after_the_set_tries() {
    let server = serve(Script {
        status_body: Some("<html>gateway error</html>".into()),
        ..Script::default()
    })
    .await;
    let mut o = BatchOptions::default();
    o.poll_interval = Duration::from_secs(60);
    o.max_poll_failures = 3;
    let p = Pipeline::builder()
        .provider(SimulatedProvider::new())
        .default_model("gpt-4o-mini")
        .batch_provider(openai(&server, BatchLimits::new(10, 1_000_000)))
        .batch_options(o)
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let out = p.batch(questions(2)).await.unwrap().collect().await;
    check_once(&out, 2);
    for o in &out {
        assert_eq!(
            kind(o.result.as_ref().unwrap_err()),
            ProviderErrorKind::InvalidResponse
        );
    }
    assert_eq!(start.elapsed(), Duration::from_secs(180));
}
