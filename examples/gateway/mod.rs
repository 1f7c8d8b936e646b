//! An OpenAI-compatible HTTP gateway over a tokenwise [`Pipeline`]: the parts the
//! `gateway` example runs and `tests/gateway.rs` drives over loopback.
//!
//! - `POST /v1/chat/completions`, whole and streamed (SSE), with OpenAI's request and
//!   response shapes.
//! - `GET /v1/models` and `GET /v1/models/{model}`: the pipeline's catalogue, which
//!   holds the models the configured upstreams serve.
//! - `GET /health`: `ok`, without a key, for load balancers.
//!
//! Every error has OpenAI's body shape; see `docs/gateway.md` for the status codes.

pub mod config;
pub mod error;
pub mod keys;
pub mod server;
pub mod sse;
pub mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokenwise::{CacheMode, Cost, Pipeline, Priority, Served, Tier};

pub use error::ApiError;
pub use keys::{KeyTable, Principal};
pub use server::{Peer, serve};

/// The environment variable that turns on per-request logging: `debug` logs every
/// request, with the pipeline's spans as context.
pub const LOG_ENV: &str = "TOKENWISE_GATEWAY_LOG";

/// Logs to stderr. By default only events at `info` and above, and no spans: the
/// pipeline opens an `info` span for every request, and recording its fields would
/// cost every call more than the gateway's own work. With `TOKENWISE_GATEWAY_LOG=debug`,
/// every event at `debug` and above, inside its request's span.
pub fn init_logging() {
    use tracing::level_filters::LevelFilter;
    use tracing_subscriber::prelude::*;
    let verbose = std::env::var(LOG_ENV).is_ok_and(|v| v.trim().eq_ignore_ascii_case("debug"));
    macro_rules! layer {
        () => {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
        };
    }
    let registry = tracing_subscriber::registry();
    let done = if verbose {
        registry
            .with(layer!().with_filter(LevelFilter::DEBUG))
            .try_init()
    } else {
        // A global filter, decided once per callsite: spans are never enabled, so the
        // pipeline's spans are not even created (a per-layer filter would leave them
        // created in the registry, entered and recorded, only to be skipped by the
        // layer).
        let filter = tracing_subscriber::filter::filter_fn(|m| {
            m.is_event() && *m.level() <= tracing::Level::INFO
        })
        .with_max_level_hint(LevelFilter::INFO);
        registry.with(filter).with(layer!()).try_init()
    };
    if let Err(e) = done {
        eprintln!("logging is already set up: {e}");
    }
}

/// The bounds on what one client can make the gateway hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest request body accepted; larger ones get 413 (default 1 MiB).
    pub max_body_bytes: usize,
    /// The longest a request body may take to arrive; then 408 (default 10 s).
    pub body_read_timeout: Duration,
    /// The longest a request head may take to arrive, idle keep-alive connections
    /// included; then the connection is closed (default 10 s).
    pub header_read_timeout: Duration,
    /// The longest a client may leave its response unread; then the connection is
    /// closed and a stream being written is dropped (default 30 s).
    pub write_stall_timeout: Duration,
    /// Open connections at most; more wait to be accepted (default 1,024).
    pub max_connections: usize,
    /// SSE frames buffered per stream between the pipeline and the client (default 32).
    pub sse_buffer: usize,
    /// On shutdown, how long requests in flight may take to finish (default 5 s).
    pub shutdown_grace: Duration,
    /// Not a bound but a latency option (default off): after each request starts or
    /// finishes, keep polling the sockets for this long before the runtime may sleep.
    /// Where waking an idle CPU is slow (virtual machines whose idle vCPUs halt), this
    /// takes that wake-up off the gateway's two hops, at the price of up to this much
    /// CPU time after each request while traffic is sparse (none while idle). It needs
    /// a single-threaded runtime (`serve` leaves it off, with a warning, on a
    /// multi-threaded one) and is taken as at most `server::MAX_BUSY_POLL` (10 ms). See
    /// `docs/gateway.md`.
    pub busy_poll: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            body_read_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            write_stall_timeout: Duration::from_secs(30),
            max_connections: 1_024,
            sse_buffer: 32,
            shutdown_grace: Duration::from_secs(5),
            busy_poll: None,
        }
    }
}

/// The gateway's state: the pipeline, the key table, the limits.
pub struct Gateway {
    pipeline: Pipeline,
    keys: KeyTable,
    limits: Limits,
    default_model: String,
    /// Strings that must never leave the gateway (the upstream key).
    secrets: Vec<String>,
    started: u64,
    requests: AtomicU64,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("keys", &self.keys)
            .field("limits", &self.limits)
            .field("default_model", &self.default_model)
            .field("secrets", &self.secrets.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway over `pipeline` for the keys in `keys`, with default limits.
    /// `default_model` is the model streamed chunks name until the answer says which
    /// one answered (the pipeline's own default model, usually).
    pub fn new(pipeline: Pipeline, keys: KeyTable, default_model: impl Into<String>) -> Self {
        Gateway {
            pipeline,
            keys,
            limits: Limits::default(),
            default_model: default_model.into(),
            secrets: Vec::new(),
            started: unix_now(),
            requests: AtomicU64::new(0),
        }
    }

    /// Sets the limits.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// A string scrubbed from every error message and log line the gateway writes
    /// (the upstream API key). Empty strings are ignored.
    #[must_use]
    pub fn secret(mut self, s: impl Into<String>) -> Self {
        let s = s.into();
        if !s.is_empty() {
            self.secrets.push(s);
        }
        self
    }

    /// The limits.
    pub fn limits_ref(&self) -> &Limits {
        &self.limits
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "[redacted]");
            }
        }
        out
    }

    fn redactor(self: &Arc<Self>) -> Box<dyn Fn(&str) -> String + Send + Sync> {
        let me = Arc::clone(self);
        Box::new(move |s: &str| me.redact(s))
    }

    /// `chatcmpl-` and 24 hex digits: 16 random, then 8 of the request count.
    fn next_id(&self) -> String {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(33);
        id.push_str("chatcmpl-");
        push_hex(&mut id, rand::random::<u64>(), 16);
        push_hex(&mut id, n & 0xffff_ffff, 8);
        id
    }

    /// Who the request's bearer key belongs to.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Principal>, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`.",
            ));
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, key) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            })
            .ok_or_else(|| {
                ApiError::unauthorized("The Authorization header must be `Bearer YOUR_KEY`.")
            })?;
        self.keys
            .lookup(key)
            .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))
    }
}

/// The router: every route, with OpenAI-shaped 404 and 405 answers.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*model}", get(get_model))
        .route("/health", get(|| async { "ok" }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gateway)
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!("Unknown request URL: {method} {}.", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("Method {method} is not allowed on {}.", uri.path()),
    )
}

fn model_object(m: &tokenwise::ModelSpec, created: u64) -> Value {
    json!({"id": m.name, "object": "model", "created": created, "owned_by": m.provider})
}

async fn list_models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(e) = gw.authenticate(&headers) {
        return e.into_response();
    }
    let mut models: Vec<_> = gw.pipeline.catalog().models().collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    let data: Vec<Value> = models.iter().map(|m| model_object(m, gw.started)).collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn get_model(
    State(gw): State<Arc<Gateway>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = gw.authenticate(&headers) {
        return e.into_response();
    }
    match gw.pipeline.catalog().get(&model) {
        Some(m) => json_response(StatusCode::OK, &model_object(m, gw.started)),
        None => ApiError::from_pipeline(&tokenwise::Error::UnknownModel(model), &|s| gw.redact(s))
            .into_response(),
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    json_body(status, v.to_string().into_bytes())
}

fn json_body(status: StatusCode, body: Vec<u8>) -> Response {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// Reads at most `limit` bytes of body within `timeout`. A body that arrives in one
/// piece (most) is returned as it arrived, uncopied.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("The request body is larger than the gateway's limit of {limit} bytes."),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let read = async {
        let room = declared.map_or(8 * 1024, |n| usize::try_from(n).unwrap_or(limit).min(limit));
        // The first piece, until a second comes; then all of them, copied.
        let mut first: Option<bytes::Bytes> = None;
        let mut buf = bytes::BytesMut::new();
        let mut data = body.into_data_stream();
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|_| {
                ApiError::invalid("invalid_body", "", "The request body could not be read.")
            })?;
            let have = first.as_ref().map_or(buf.len(), bytes::Bytes::len);
            if have + chunk.len() > limit {
                return Err(too_large());
            }
            if first.is_none() && buf.is_empty() {
                first = Some(chunk);
                continue;
            }
            if let Some(f) = first.take() {
                buf.reserve(room.max(f.len() + chunk.len()));
                buf.extend_from_slice(&f);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(first.unwrap_or_else(|| buf.freeze()))
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!(
                "The request body did not arrive within {} s.",
                timeout.as_secs_f64()
            ),
        )
    })?
}

/// Exact dollars of `cost`, as a decimal string (nine places: nano-dollars).
pub fn dollars(cost: Cost) -> String {
    let n = cost.as_nanos();
    let mut out = String::with_capacity(30);
    push_decimal(&mut out, n / 1_000_000_000, 1);
    out.push('.');
    push_decimal(&mut out, n % 1_000_000_000, 9);
    out
}

/// The last `digits` hex digits of `v`, lowercase (written by hand: the formatting
/// machinery costs several times as much, on every request).
fn push_hex(out: &mut String, v: u64, digits: u32) {
    for i in (0..digits).rev() {
        let d = v.checked_shr(4 * i).unwrap_or(0) & 0xf;
        out.push(char::from_digit(d as u32, 16).unwrap_or('0'));
    }
}

/// `v` in decimal, zero-padded to at least `width` digits.
fn push_decimal(out: &mut String, mut v: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    while v > 0 || digits.len() - start < width {
        start -= 1;
        if let Some(d) = digits.get_mut(start) {
            *d = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if start == 0 {
            break;
        }
    }
    for &d in digits.get(start..).unwrap_or_default() {
        out.push(char::from(d));
    }
}

/// The client's address as text: an IPv4 address written by hand (as `Display` writes
/// it, for a fraction of the cost), others through `Display`.
fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut out = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(&mut out, u64::from(octet), 1);
            }
            out
        }
        other => other.to_string(),
    }
}

/// The gateway's own response headers' names, made once.
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_CACHE: HeaderName = HeaderName::from_static("x-tokenwise-cache");
static X_COST: HeaderName = HeaderName::from_static("x-tokenwise-cost-usd");
static X_SAVED: HeaderName = HeaderName::from_static("x-tokenwise-saved-usd");
static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

async fn chat_completions(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let id = gw.next_id();
    let (parts, body) = req.into_parts();
    let peer = parts.extensions.get::<Peer>().map(|p| ip_text(p.0.ip()));
    let mut res = match handle_chat(&gw, &id, &parts.headers, peer, body).await {
        Ok(res) => res,
        Err((e, who)) => {
            let user = who.as_deref().unwrap_or("-");
            let (status, code) = (e.status.as_u16(), e.code.unwrap_or("-"));
            if e.status.is_server_error() {
                let message = gw.redact(&e.message);
                tracing::warn!(request_id = %id, status, user, code, message, "request failed");
            } else {
                tracing::debug!(request_id = %id, status, user, code, "request refused");
            }
            e.into_response()
        }
    };
    res.headers_mut().insert(&X_REQUEST_ID, header_value(&id));
    res
}

type Failure = (ApiError, Option<String>);

async fn handle_chat(
    gw: &Arc<Gateway>,
    id: &str,
    headers: &HeaderMap,
    peer: Option<String>,
    body: Body,
) -> Result<Response, Failure> {
    let who = gw.authenticate(headers).map_err(|e| (e, None))?;
    let fail = |e: ApiError| (e, Some(who.user.clone()));
    let limits = &gw.limits;
    let bytes = read_body(
        body,
        headers,
        limits.max_body_bytes,
        limits.body_read_timeout,
    )
    .await
    .map_err(fail)?;
    let parsed = wire::parse_chat(&bytes).map_err(fail)?;
    let mut req = parsed.request;
    let meta = &mut req.meta;
    meta.user = Some(who.user.clone());
    meta.org.clone_from(&who.org);
    meta.tier = who.tier;
    meta.priority = match who.tier {
        Tier::Free => Priority::Low,
        Tier::Premium => Priority::High,
        _ => Priority::Normal,
    };
    meta.ip = peer;
    meta.cache.mode = cache_mode(headers);
    let created = unix_now();
    let redact = |s: &str| gw.redact(s);
    if parsed.stream {
        let model = req
            .model
            .clone()
            .unwrap_or_else(|| gw.default_model.clone());
        let stream = boxed(|| gw.pipeline.stream(req))
            .await
            .map_err(|e| fail(ApiError::from_pipeline(&e, &redact)))?;
        let started = sse::start(
            stream,
            sse::Writer {
                chunks: wire::Chunks {
                    id: id.to_owned(),
                    created,
                    model,
                    include_usage: parsed.include_usage,
                },
                buffer: limits.sse_buffer,
                stall: limits.write_stall_timeout,
                redact: gw.redactor(),
                request_id: id.to_owned(),
            },
        );
        let mut res = Response::new(started.body);
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(&X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
        if let Some(hit) = started.cache_hit {
            h.insert(
                &X_CACHE,
                HeaderValue::from_static(if hit { "hit" } else { "miss" }),
            );
            if hit {
                h.insert(&X_COST, HeaderValue::from_static("0.000000000"));
            }
        }
        let cache = match started.cache_hit {
            Some(true) => "hit",
            Some(false) => "miss",
            None => "unknown",
        };
        tracing::debug!(request_id = %id, user = %who.user, cache, "stream started");
        return Ok(res);
    }
    let answer = boxed(|| gw.pipeline.chat(req))
        .await
        .map_err(|e| fail(ApiError::from_pipeline(&e, &redact)))?;
    let mut res = json_body(StatusCode::OK, wire::completion(id, created, &answer));
    let h = res.headers_mut();
    let hit = answer.served.is_cache_hit();
    h.insert(
        &X_CACHE,
        HeaderValue::from_static(if hit { "hit" } else { "miss" }),
    );
    h.insert(&X_COST, header_value(&dollars(answer.cost)));
    if let Served::Cache { saved_cost, .. } = &answer.served {
        h.insert(&X_SAVED, header_value(&dollars(*saved_cost)));
    }
    tracing::debug!(
        request_id = %id,
        user = %who.user,
        model = %answer.model,
        cache = hit,
        tokens = answer.usage.total(),
        cost = %answer.cost,
        "answered"
    );
    Ok(res)
}

/// The future `make` makes, made in its place on the heap. The pipeline's futures are
/// large (kilobytes), and the handler's future is moved on its way into the server:
/// boxed, they are not moved at all (written into the box, not made on the stack and
/// copied there). Boxed here, in a plain function, rather than with `Box::pin` inside
/// the handler: a future made in an async function, even one moved straight into a
/// box, keeps room in that function's own future across the await (the handler's
/// future was 9 KB with it, 1.4 KB without), which every move of it then copies.
fn boxed<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// `Cache-Control: no-store` skips the cache; `no-cache` asks the model again and
/// stores the fresh answer.
fn cache_mode(headers: &HeaderMap) -> CacheMode {
    let Some(v) = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
    else {
        return CacheMode::Use;
    };
    let has = |d: &str| v.split(',').any(|x| x.trim().eq_ignore_ascii_case(d));
    if has("no-store") {
        CacheMode::Bypass
    } else if has("no-cache") {
        CacheMode::Refresh
    } else {
        CacheMode::Use
    }
}
