//! What the HTTP providers share: the client, deadlines and size limits, bounded body
//! and event reading, and the classification of failures into [`ProviderErrorKind`]s.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
#[cfg(test)]
use std::time::SystemTime;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use tokio::time::Instant;

use super::keys::{ApiKey, KeyLease, KeyPool};
use super::sse::{SseDecoder, SseEvent};
use crate::clock::{Clock, Timestamp, TokioClock};
use crate::context::{TiktokenCounter, TokenCounter};
use crate::error::{ProviderError, ProviderErrorKind, RateLimits};
use crate::types::{
    ChatRequest, ChatResponse, ChatStream, FinishReason, ModelSpec, StreamEnd, StreamEvent,
    TokenizerKind, Usage,
};
use crate::{Error, Result};

/// The default cap on a whole response body: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;
/// The default cap on all the bytes of one streamed response: 64 MiB.
pub const DEFAULT_MAX_STREAM_BYTES: u64 = 64 << 20;
/// The most of an error body that is read to classify it: 64 KiB.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;
/// Retry-After values are read up to one day; the provider's
/// [`max_retry_after`](DEFAULT_MAX_RETRY_AFTER) caps what is honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
/// The default cap on an honoured Retry-After: 5 minutes. A provider asking for longer
/// is taken to mean this long (for the error's `retry_after` and the key's rest).
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);
/// How long a rate-limited key rests for the model when the provider gave no
/// Retry-After: one second on average, drawn evenly from half to one and a half, so
/// that callers sharing the key do not all come back at once.
const DEFAULT_KEY_REST: Duration = Duration::from_secs(1);

/// [`DEFAULT_KEY_REST`] with its jitter.
fn jittered_rest() -> Duration {
    use rand::Rng;
    DEFAULT_KEY_REST.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// Deadlines for one provider call. `None` turns a deadline off.
///
/// - `connect`: to open the TCP (and TLS) connection.
/// - `first_byte`: from sending the request to the response headers; for a stream, also
///   to the first token (the first text or tool-call delta).
/// - `idle`: the longest silence between two reads of the body, whole or streamed.
/// - `total`: the whole call, until the last byte of the answer.
///
/// A missed deadline fails the call with [`ProviderErrorKind::Timeout`]; in a stream that
/// already delivered content, with [`Error::StreamInterrupted`].
///
/// ```
/// use std::time::Duration;
/// use tokenwise::provider::Deadlines;
/// let d = Deadlines::default().first_byte(Duration::from_secs(20)).total(None);
/// assert_eq!(d.first_byte, Some(Duration::from_secs(20)));
/// assert_eq!(d.total, None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Deadlines {
    /// To connect. Default 10 s.
    pub connect: Option<Duration>,
    /// To the response headers, and for a stream to the first token. Default 120 s: a
    /// whole (unstreamed) answer only starts when the model has finished it.
    pub first_byte: Option<Duration>,
    /// Between two reads of the body. Default 60 s.
    pub idle: Option<Duration>,
    /// For the whole call. Default 10 minutes.
    pub total: Option<Duration>,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            connect: Some(Duration::from_secs(10)),
            first_byte: Some(Duration::from_secs(120)),
            idle: Some(Duration::from_secs(60)),
            total: Some(Duration::from_secs(600)),
        }
    }
}

impl Deadlines {
    /// No deadline at all.
    pub fn none() -> Self {
        Deadlines {
            connect: None,
            first_byte: None,
            idle: None,
            total: None,
        }
    }

    /// Sets the connect deadline.
    #[must_use]
    pub fn connect(mut self, d: impl Into<Option<Duration>>) -> Self {
        self.connect = d.into();
        self
    }

    /// Sets the first-byte (and first-token) deadline.
    #[must_use]
    pub fn first_byte(mut self, d: impl Into<Option<Duration>>) -> Self {
        self.first_byte = d.into();
        self
    }

    /// Sets the idle deadline.
    #[must_use]
    pub fn idle(mut self, d: impl Into<Option<Duration>>) -> Self {
        self.idle = d.into();
        self
    }

    /// Sets the total deadline.
    #[must_use]
    pub fn total(mut self, d: impl Into<Option<Duration>>) -> Self {
        self.total = d.into();
        self
    }
}

/// A `reqwest` client builder set up the way tokenwise's providers build theirs: rustls
/// with the *ring* crypto provider and the platform's certificate verifier.
///
/// Use it to customise the client (a proxy, say) and pass the result to a provider
/// builder's `http_client`.
///
/// ```
/// let client = tokenwise::provider::http_client_builder()?.no_proxy().build();
/// assert!(client.is_ok());
/// # Ok::<(), tokenwise::Error>(())
/// ```
pub fn http_client_builder() -> Result<reqwest::ClientBuilder> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map_err(|e| Error::Config(format!("TLS setup failed: {e}")))?
        .with_no_client_auth();
    Ok(reqwest::Client::builder().tls_backend_preconfigured(tls))
}

/// How the key is sent.
#[derive(Debug, Clone)]
pub(crate) enum Auth {
    /// `Authorization: Bearer KEY`.
    Bearer,
    /// `NAME: KEY`.
    Header(HeaderName),
}

/// Settings both HTTP providers share, collected by their builders.
#[derive(Debug, Clone)]
pub(crate) struct HttpSettings {
    pub(crate) name: String,
    pub(crate) base_url: String,
    pub(crate) keys: Vec<ApiKey>,
    pub(crate) auth: Auth,
    pub(crate) headers: HeaderMap,
    pub(crate) deadlines: Deadlines,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_event_bytes: usize,
    pub(crate) max_stream_bytes: u64,
    pub(crate) client: Option<reqwest::Client>,
    pub(crate) counter: Option<Arc<dyn TokenCounter>>,
    pub(crate) clock: Option<Arc<dyn Clock>>,
    /// Per-key requests and tokens a minute.
    pub(crate) key_limits: (Option<u64>, Option<u64>),
    pub(crate) max_retry_after: Duration,
    pub(crate) error: Option<String>,
}

impl HttpSettings {
    pub(crate) fn new(name: &str, base_url: &str, auth: Auth) -> Self {
        HttpSettings {
            name: name.to_owned(),
            base_url: base_url.to_owned(),
            keys: Vec::new(),
            auth,
            headers: HeaderMap::new(),
            deadlines: Deadlines::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_event_bytes: super::sse::DEFAULT_MAX_EVENT_BYTES,
            max_stream_bytes: DEFAULT_MAX_STREAM_BYTES,
            client: None,
            counter: None,
            clock: None,
            key_limits: (None, None),
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            error: None,
        }
    }

    pub(crate) fn fail(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(message);
        }
    }

    pub(crate) fn header(&mut self, name: &str, value: &str) {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(mut v)) => {
                v.set_sensitive(true);
                self.headers.insert(n, v);
            }
            _ => self.fail(format!("invalid header `{name}`")),
        }
    }

    pub(crate) fn build(self, required_key: bool) -> Result<HttpCore> {
        let name = self.name;
        let cfg = |m: String| Error::Config(format!("{name} provider: {m}"));
        if let Some(e) = self.error {
            return Err(cfg(e));
        }
        if name.trim().is_empty() {
            return Err(cfg("the name is empty".into()));
        }
        let base = self.base_url.trim().trim_end_matches('/').to_owned();
        match reqwest::Url::parse(&base) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => return Err(cfg(format!("invalid base URL `{base}`"))),
        }
        if self.max_body_bytes == 0 || self.max_event_bytes == 0 || self.max_stream_bytes == 0 {
            return Err(cfg("size limits must be positive".into()));
        }
        if self
            .keys
            .iter()
            .any(|k| HeaderValue::from_str(k.expose_secret()).is_err())
        {
            return Err(cfg(
                "an API key holds characters a header cannot carry".into()
            ));
        }
        let keys = if self.keys.is_empty() {
            if required_key {
                return Err(cfg("an API key is required".into()));
            }
            None
        } else {
            Some(KeyPool::new(self.keys).map_err(|e| cfg(e.to_string()))?)
        };
        let clock: Arc<dyn Clock> = self.clock.unwrap_or_else(|| Arc::new(TokioClock::new()));
        let keys = keys.map(|k| k.with_clock(Arc::clone(&clock)));
        let keys = match (keys, self.key_limits) {
            (Some(k), (None, None)) => Some(k),
            (Some(k), (rpm, tpm)) => Some(
                k.with_key_limits(rpm, tpm)
                    .map_err(|e| cfg(e.to_string()))?,
            ),
            (None, (None, None)) => None,
            (None, _) => return Err(cfg("per-key limits need API keys".into())),
        };
        let client = match self.client {
            Some(c) => c,
            None => {
                let mut b = http_client_builder()?;
                if let Some(d) = self.deadlines.connect {
                    b = b.connect_timeout(d);
                }
                b.build()
                    .map_err(|e| cfg(format!("HTTP client: {}", e.without_url())))?
            }
        };
        Ok(HttpCore {
            name,
            client,
            base_url: base,
            auth: self.auth,
            headers: self.headers,
            keys,
            deadlines: self.deadlines,
            max_body_bytes: self.max_body_bytes,
            max_event_bytes: self.max_event_bytes,
            max_stream_bytes: self.max_stream_bytes,
            counter: self
                .counter
                .unwrap_or_else(|| Arc::new(TiktokenCounter::new())),
            clock,
            max_retry_after: self.max_retry_after,
            last_rate_limits: Mutex::new(None),
        })
    }
}

/// Generates the builder setters both HTTP providers share. The builder must have an
/// `http: HttpSettings` field.
macro_rules! http_builder_methods {
    () => {
        /// The provider's name, as the catalogue's models name their provider.
        pub fn name(mut self, name: impl Into<String>) -> Self {
            self.http.name = name.into();
            self
        }

        /// The API's base URL.
        pub fn base_url(mut self, url: impl Into<String>) -> Self {
            self.http.base_url = url.into();
            self
        }

        /// Adds an API key to the provider's pool. Several keys share the load; a key
        /// that gets a 429 rests until its Retry-After.
        pub fn api_key(mut self, key: impl Into<$crate::provider::ApiKey>) -> Self {
            self.http.keys.push(key.into());
            self
        }

        /// Adds several API keys (at most [`MAX_KEYS`](crate::provider::MAX_KEYS) in all).
        pub fn api_keys<K: Into<$crate::provider::ApiKey>>(
            mut self,
            keys: impl IntoIterator<Item = K>,
        ) -> Self {
            self.http.keys.extend(keys.into_iter().map(Into::into));
            self
        }

        /// Keeps each key under `rpm` requests and `tpm` tokens (prompt plus output
        /// allowance) a minute, the provider's per-key limits: a key at its limit is
        /// skipped, and when every key is, the call fails at once as rate limited with
        /// the exact wait, without a request.
        pub fn key_limits(mut self, rpm: Option<u64>, tpm: Option<u64>) -> Self {
            self.http.key_limits = (rpm, tpm);
            self
        }

        /// Adds a header to every request. Its value is marked sensitive and never shown.
        pub fn header(mut self, name: &str, value: &str) -> Self {
            self.http.header(name, value);
            self
        }

        /// Sets every deadline at once (see [`Deadlines`](crate::provider::Deadlines)).
        pub fn deadlines(mut self, deadlines: $crate::provider::Deadlines) -> Self {
            self.http.deadlines = deadlines;
            self
        }

        /// Caps a whole response body (default 16 MiB); a larger body fails the call.
        pub fn max_body_bytes(mut self, n: usize) -> Self {
            self.http.max_body_bytes = n;
            self
        }

        /// Caps one line or event of a stream (default 1 MiB).
        pub fn max_event_bytes(mut self, n: usize) -> Self {
            self.http.max_event_bytes = n;
            self
        }

        /// Caps all the bytes of one stream (default 64 MiB).
        pub fn max_stream_bytes(mut self, n: u64) -> Self {
            self.http.max_stream_bytes = n;
            self
        }

        /// Uses this `reqwest` client (for a proxy or custom TLS, say). The connect
        /// deadline is then the client's own; build it from
        /// [`http_client_builder`](crate::provider::http_client_builder) to keep rustls
        /// on *ring*.
        pub fn http_client(mut self, client: reqwest::Client) -> Self {
            self.http.client = Some(client);
            self
        }

        /// Counts tokens when the API reports no usage (default:
        /// [`TiktokenCounter`](crate::context::TiktokenCounter)).
        pub fn token_counter(
            mut self,
            counter: std::sync::Arc<dyn $crate::context::TokenCounter>,
        ) -> Self {
            self.http.counter = Some(counter);
            self
        }

        /// Caps an honoured Retry-After (default
        /// [`DEFAULT_MAX_RETRY_AFTER`](crate::provider::DEFAULT_MAX_RETRY_AFTER), 5
        /// minutes): a longer one is taken as this long, for the error's `retry_after`
        /// and for the key's rest.
        pub fn max_retry_after(mut self, cap: std::time::Duration) -> Self {
            self.http.max_retry_after = cap;
            self
        }

        /// The clock key cooldowns and Retry-After dates are measured on (default:
        /// [`TokioClock`](crate::TokioClock)).
        pub fn clock(mut self, clock: std::sync::Arc<dyn $crate::clock::Clock>) -> Self {
            self.http.clock = Some(clock);
            self
        }
    };
}
pub(crate) use http_builder_methods;

/// What a provider's stream knows when it ends, for [`HttpCore::end_stream`].
pub(crate) struct StreamEnding {
    /// The text and tool arguments delivered, for counting when no usage came.
    pub(crate) delivered: String,
    pub(crate) usage: Option<Usage>,
    pub(crate) finish: Option<FinishReason>,
}

/// What a streamed call asked for: the request and the model.
#[derive(Debug, Clone)]
pub(crate) struct Asked {
    pub(crate) request: ChatRequest,
    pub(crate) model: ModelSpec,
}

impl Asked {
    pub(crate) fn new(request: &ChatRequest, model: &ModelSpec) -> Self {
        Asked {
            request: request.clone(),
            model: model.clone(),
        }
    }
}

/// The shared HTTP machinery of one provider.
pub(crate) struct HttpCore {
    pub(crate) name: String,
    client: reqwest::Client,
    base_url: String,
    auth: Auth,
    headers: HeaderMap,
    keys: Option<KeyPool>,
    pub(crate) deadlines: Deadlines,
    pub(crate) max_body_bytes: usize,
    max_event_bytes: usize,
    max_stream_bytes: u64,
    pub(crate) counter: Arc<dyn TokenCounter>,
    clock: Arc<dyn Clock>,
    max_retry_after: Duration,
    last_rate_limits: Mutex<Option<RateLimits>>,
}

impl fmt::Debug for HttpCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCore")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("keys", &self.keys)
            .field("deadlines", &self.deadlines)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_event_bytes", &self.max_event_bytes)
            .field("max_stream_bytes", &self.max_stream_bytes)
            .finish_non_exhaustive()
    }
}

/// A sent request: when it started and which key it used.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    start: Instant,
    key: Option<KeyLease>,
}

impl HttpCore {
    pub(crate) fn base_url(&self) -> &str {
        &self.base_url
    }

    pub(crate) fn keys(&self) -> Option<&KeyPool> {
        self.keys.as_ref()
    }

    pub(crate) fn last_rate_limits(&self) -> Option<RateLimits> {
        match self.last_rate_limits.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    pub(crate) fn error(
        &self,
        kind: ProviderErrorKind,
        message: impl Into<String>,
    ) -> ProviderError {
        ProviderError::new(kind, &self.name, message)
    }

    /// The JSON payload of a stream event. Text that is not JSON is the server's error
    /// message when the event is named `error`, else a malformed event.
    pub(crate) fn event_json(
        &self,
        ev: &SseEvent,
        data: &str,
    ) -> std::result::Result<Value, EventError> {
        serde_json::from_str(data).map_err(|e| {
            if ev.event == "error" {
                EventError::Failed(self.error(
                    ProviderErrorKind::Server,
                    format!("error in the stream: {}", snippet(data.as_bytes())),
                ))
            } else {
                EventError::Malformed(format!("a stream event is not valid JSON ({e})"))
            }
        })
    }

    /// The last two events of a stream: its usage (checked, or counted by tokenwise
    /// when the provider sent none or an implausible one) and its end.
    pub(crate) async fn end_stream(
        &self,
        asked: &Asked,
        ending: StreamEnding,
        sent: &Sent,
        out: &mut VecDeque<StreamEvent>,
    ) {
        let StreamEnding {
            delivered,
            usage,
            finish,
        } = ending;
        let usage = self
            .settle_usage(&asked.request, &asked.model, usage, || delivered, sent)
            .await;
        let finish = finish.unwrap_or_else(|| FinishReason::Other("unknown".into()));
        out.push_back(StreamEvent::Usage(usage));
        let mut end = StreamEnd::new(finish, &asked.model.name, &self.name);
        end.usage = usage;
        out.push_back(StreamEvent::Done(end));
    }

    fn total_deadline(&self, start: Instant) -> Option<Instant> {
        after(start, self.deadlines.total)
    }

    /// Posts `body` (JSON) for `model` to `path` and returns the response if its status
    /// is a success. `tokens` is the request's token estimate, charged to the key's
    /// per-key quota. A 429 rests the key for `model` only.
    pub(crate) async fn post(
        &self,
        path: &str,
        model: &str,
        body: Vec<u8>,
        streaming: bool,
        tokens: u64,
    ) -> std::result::Result<(reqwest::Response, Sent), ProviderError> {
        let start = Instant::now();
        let lease = match &self.keys {
            Some(pool) => match pool.acquire_for_model(model, tokens) {
                Ok(lease) => Some(lease),
                Err(wait) => {
                    return Err(self
                        .error(
                            ProviderErrorKind::RateLimited,
                            format!(
                                "all {} API key(s) are cooling down or at their per-key limits",
                                pool.len()
                            ),
                        )
                        .with_retry_after(wait));
                }
            },
            None => None,
        };
        let sent = Sent { start, key: lease };
        let url = format!("{}{}", self.base_url, path);
        let mut req = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                reqwest::header::ACCEPT,
                if streaming {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            );
        if let Some(lease) = &sent.key {
            let (name, value) = match &self.auth {
                Auth::Bearer => (
                    reqwest::header::AUTHORIZATION,
                    format!("Bearer {}", lease.key().expose_secret()),
                ),
                Auth::Header(n) => (n.clone(), lease.key().expose_secret().to_owned()),
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                self.error(
                    ProviderErrorKind::Auth,
                    "the API key holds characters a header cannot carry",
                )
            })?;
            value.set_sensitive(true);
            req = req.header(name, value);
        }
        for (name, value) in &self.headers {
            req = req.header(name, value.clone());
        }
        let req = req.body(body);
        let first = after(start, self.deadlines.first_byte);
        let deadline = earliest(first, self.total_deadline(start));
        let resp = match deadline {
            Some(at) => match tokio::time::timeout_at(at, req.send()).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(self.error(
                        ProviderErrorKind::Timeout,
                        format!(
                            "no response within {:?}",
                            at.saturating_duration_since(start)
                        ),
                    ));
                }
            },
            None => req.send().await,
        };
        let mut resp = resp.map_err(|e| self.transport_error(&e, "sending the request"))?;
        let limits = rate_limits(resp.headers());
        if !limits.is_empty() {
            if let Ok(mut g) = self.last_rate_limits.lock() {
                *g = Some(limits);
            }
        }
        let status = resp.status();
        if status.is_success() {
            return Ok((resp, sent));
        }
        let body = self
            .read_limited(&mut resp, &sent, MAX_ERROR_BODY_BYTES, true)
            .await
            .unwrap_or_default();
        let mut err = classify(
            &self.name,
            Some(status.as_u16()),
            resp.headers(),
            &body,
            self.clock.now(),
        );
        err.retry_after = err.retry_after.map(|d| d.min(self.max_retry_after));
        if let Some(lease) = &sent.key {
            err.message = scrub(&err.message, lease.key());
            if err.kind == ProviderErrorKind::RateLimited {
                if let Some(pool) = &self.keys {
                    let rest = err.retry_after.unwrap_or_else(jittered_rest);
                    pool.cool_down_model(lease.index(), model, rest);
                    // Another key may be ready sooner than this one.
                    let sooner = pool.next_ready_in_for(model);
                    err.retry_after = Some(err.retry_after.map_or(sooner, |r| r.min(sooner)));
                }
            }
        }
        Err(err)
    }

    /// Maps a transport failure to a provider error.
    fn transport_error(&self, e: &reqwest::Error, doing: &str) -> ProviderError {
        let kind = if e.is_timeout() {
            ProviderErrorKind::Timeout
        } else {
            ProviderErrorKind::Connection
        };
        let mut message = format!("{doing}: {e}");
        let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        let mut depth = 0;
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
            depth += 1;
            if depth == 4 {
                break;
            }
        }
        self.error(kind, message)
    }

    /// Reads the next chunk of `resp` within the idle and total deadlines.
    async fn next_chunk(
        &self,
        resp: &mut reqwest::Response,
        sent: &Sent,
        extra: Option<Instant>,
    ) -> std::result::Result<Option<Bytes>, ProviderError> {
        let idle = after(Instant::now(), self.deadlines.idle);
        let total = self.total_deadline(sent.start);
        let deadline = earliest(earliest(idle, total), extra);
        match deadline {
            Some(at) => match tokio::time::timeout_at(at, resp.chunk()).await {
                Ok(r) => r.map_err(|e| self.transport_error(&e, "reading the response")),
                Err(_) => {
                    let what = if Some(at) == total {
                        format!(
                            "the answer took longer than {:?}",
                            self.deadlines.total.unwrap_or_default()
                        )
                    } else if Some(at) == extra {
                        format!(
                            "no first token within {:?}",
                            self.deadlines.first_byte.unwrap_or_default()
                        )
                    } else {
                        format!("no data for {:?}", self.deadlines.idle.unwrap_or_default())
                    };
                    Err(self.error(ProviderErrorKind::Timeout, what))
                }
            },
            None => resp
                .chunk()
                .await
                .map_err(|e| self.transport_error(&e, "reading the response")),
        }
    }

    async fn read_limited(
        &self,
        resp: &mut reqwest::Response,
        sent: &Sent,
        cap: usize,
        truncate: bool,
    ) -> std::result::Result<Vec<u8>, ProviderError> {
        let too_big = |n: u64| {
            self.error(
                ProviderErrorKind::InvalidResponse,
                format!("the response body ({n} bytes or more) exceeds the cap of {cap} bytes"),
            )
        };
        if !truncate {
            if let Some(n) = resp.content_length() {
                if n > cap as u64 {
                    return Err(too_big(n));
                }
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = self.next_chunk(resp, sent, None).await? {
            if body.len().saturating_add(chunk.len()) > cap {
                if truncate {
                    let room = cap.saturating_sub(body.len());
                    body.extend_from_slice(chunk.get(..room).unwrap_or_default());
                    break;
                }
                return Err(too_big((body.len() + chunk.len()) as u64));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Reads a whole success body, within the body cap and the deadlines.
    pub(crate) async fn read_body(
        &self,
        resp: &mut reqwest::Response,
        sent: &Sent,
    ) -> std::result::Result<Vec<u8>, ProviderError> {
        self.read_limited(resp, sent, self.max_body_bytes, false)
            .await
            .map_err(|e| e.with_status(resp.status().as_u16()))
    }

    /// Parses a success body as JSON; a body carrying an `error` object is classified.
    pub(crate) fn parse_json(
        &self,
        status: u16,
        body: &[u8],
    ) -> std::result::Result<Value, ProviderError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            self.error(
                ProviderErrorKind::InvalidResponse,
                format!("the response is not valid JSON ({e}): {}", snippet(body)),
            )
            .with_status(status)
        })?;
        if v.get("error").is_some_and(|e| !e.is_null()) {
            return Err(classify_payload(&self.name, &v));
        }
        Ok(v)
    }

    /// Whether a response to a stream request came back whole, as JSON, rather than as
    /// an event stream (some servers ignore `stream`, or answer errors that way).
    pub(crate) fn is_json(resp: &reqwest::Response) -> bool {
        resp.headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            })
    }

    /// The usage of an answer: the reported one when it is plausible for what was
    /// asked, else a local count of the prompt and `output` (see [`count_usage`]), done
    /// off the runtime's workers and within the call's total deadline.
    pub(crate) async fn settle_usage(
        &self,
        request: &ChatRequest,
        model: &ModelSpec,
        reported: Option<Usage>,
        output: impl FnOnce() -> String,
        sent: &Sent,
    ) -> Usage {
        if let Some(u) = reported {
            match implausible(&u, request, model) {
                None => return u,
                Some(why) => tracing::warn!(
                    provider = %self.name,
                    model = %model.name,
                    "implausible usage replaced by a local count: {why}"
                ),
            }
        }
        let deadline = earliest(
            self.total_deadline(sent.start),
            after(Instant::now(), Some(MAX_COUNT_TIME)),
        );
        let output = output();
        let rough = rough_usage(request, output.len());
        let counter = Arc::clone(&self.counter);
        let request = request.clone();
        let tokenizer = model.tokenizer;
        let task = tokio::task::spawn_blocking(move || {
            count_usage(counter.as_ref(), &request, &output, tokenizer)
        });
        let counted = match deadline {
            Some(at) => tokio::time::timeout_at(at, task).await.ok(),
            None => Some(task.await),
        };
        match counted {
            Some(Ok(u)) => u,
            // Out of time (the task finishes on its own, its text capped) or failed:
            // a rough estimate from the sizes.
            _ => rough,
        }
    }
}

impl HttpCore {
    /// `r` with its usage settled (see [`settle_usage`](Self::settle_usage)).
    pub(crate) async fn settle_answer(
        &self,
        call: &super::ProviderCall<'_>,
        mut r: ChatResponse,
        reported: Option<Usage>,
        sent: &Sent,
    ) -> ChatResponse {
        let output = || {
            let mut out = r.content.clone();
            for c in &r.tool_calls {
                out.push_str(&c.arguments);
            }
            out
        };
        let usage = self
            .settle_usage(call.request, call.model, reported, output, sent)
            .await;
        r.usage = usage;
        r
    }
}

/// The longest time spent counting the tokens of an answer that came without usage.
const MAX_COUNT_TIME: Duration = Duration::from_secs(2);
/// The most of an answer's text counted with the tokenizer; the rest is estimated at
/// the rate of the counted part.
pub(crate) const MAX_COUNTED_BYTES: usize = 64 << 10;

/// The prompt and `output` counted with `counter`, `output` beyond
/// [`MAX_COUNTED_BYTES`] estimated at the rate of its counted part. Marked estimated.
pub(crate) fn count_usage(
    counter: &dyn TokenCounter,
    request: &ChatRequest,
    output: &str,
    tokenizer: TokenizerKind,
) -> Usage {
    let mut cut = output.len().min(MAX_COUNTED_BYTES);
    while !output.is_char_boundary(cut) {
        cut -= 1;
    }
    let head = output.get(..cut).unwrap_or_default();
    let mut out_tokens = counter.count_text(head, tokenizer);
    let rest = (output.len() - cut) as u64;
    if rest > 0 {
        let rate = if cut == 0 || out_tokens == 0 {
            // One token per four bytes, the usual rate of English text.
            (1, 4)
        } else {
            (out_tokens, cut as u64)
        };
        let more = u128::from(rest) * u128::from(rate.0) / u128::from(rate.1).max(1);
        out_tokens = out_tokens.saturating_add(u64::try_from(more).unwrap_or(u64::MAX));
    }
    Usage::new(counter.count_request(request, tokenizer), out_tokens).estimated()
}

/// A usage estimate from sizes alone: four bytes a token.
fn rough_usage(request: &ChatRequest, output_bytes: usize) -> Usage {
    let prompt: usize = request
        .messages
        .iter()
        .map(|m| {
            m.content.len()
                + m.tool_calls
                    .iter()
                    .map(|c| c.arguments.len())
                    .sum::<usize>()
        })
        .chain(request.documents.iter().map(|d| d.text.len()))
        .sum();
    Usage::new(
        (prompt as u64).div_ceil(4),
        (output_bytes as u64).div_ceil(4),
    )
    .estimated()
}

/// Why `u` cannot be the usage of an answer to `request` on `model`, if it cannot: more
/// output than `max_tokens` (or the model's limits) allow, or more input than the
/// context window holds, each with a 10 % margin.
pub(crate) fn implausible(u: &Usage, request: &ChatRequest, model: &ModelSpec) -> Option<String> {
    let margin = |n: u64| n.saturating_add(n / 10).saturating_add(64);
    let window = model.context_window.max(model.max_output);
    let out_cap = match request.params.max_tokens {
        Some(n) => u64::from(n),
        None if window > 0 => window,
        None => u64::from(u32::MAX),
    };
    if u.output_tokens > margin(out_cap) {
        return Some(format!(
            "{} output tokens, at most {out_cap} possible",
            u.output_tokens
        ));
    }
    let in_cap = if model.context_window > 0 {
        model.context_window
    } else {
        u64::from(u32::MAX)
    };
    if u.input_tokens > margin(in_cap) {
        return Some(format!(
            "{} input tokens, the context window holds {in_cap}",
            u.input_tokens
        ));
    }
    None
}

/// `d` after `t`; none when there is no deadline, or it lies beyond what an `Instant`
/// can hold.
fn after(t: Instant, d: Option<Duration>) -> Option<Instant> {
    d.and_then(|d| t.checked_add(d))
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// The request's retrieved documents as one block of text for the system prompt, in the
/// order given (the context budget has already trimmed them).
pub(crate) fn documents_text(docs: &[crate::types::Document]) -> Option<String> {
    if docs.is_empty() {
        return None;
    }
    let mut s = String::from("Documents:\n");
    for d in docs {
        s.push('\n');
        match &d.id {
            Some(id) => {
                s.push_str("<document id=\"");
                s.push_str(&id.replace('"', "&quot;"));
                s.push_str("\">\n");
            }
            None => s.push_str("<document>\n"),
        }
        s.push_str(&d.text);
        s.push_str("\n</document>\n");
    }
    Some(s)
}

/// The shortest start of a key that is redacted where it appears on its own.
const MIN_REDACTED_PREFIX: usize = 8;

/// Replaces every occurrence of `key` in `text`, and of any start of it of 8 characters
/// or more (a key cut short by a body cap or an echo that truncates). A key shorter
/// than 8 characters is replaced only whole.
pub(crate) fn scrub(text: &str, key: &ApiKey) -> String {
    let secret = key.expose_secret();
    if secret.len() < 4 {
        return text.to_owned();
    }
    let head = secret.get(..MIN_REDACTED_PREFIX).unwrap_or(secret);
    if !text.contains(head) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(head) {
        let (before, tail) = rest.split_at(i);
        out.push_str(before);
        let mut n = tail
            .bytes()
            .zip(secret.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        while !tail.is_char_boundary(n) {
            n -= 1;
        }
        out.push_str("[redacted]");
        rest = tail.get(n..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

/// The first 200 characters of a body, on one line.
pub(crate) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == 200 {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    if out.trim().is_empty() {
        "(empty body)".to_owned()
    } else {
        out
    }
}

// ---------------------------------------------------------------------------------------
// Classification.

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    header_str(headers, name).and_then(|v| v.parse().ok())
}

/// The remaining-quota headers of OpenAI and Anthropic.
pub(crate) fn rate_limits(headers: &HeaderMap) -> RateLimits {
    let requests = header_u64(headers, "x-ratelimit-remaining-requests")
        .or_else(|| header_u64(headers, "anthropic-ratelimit-requests-remaining"));
    let tokens = header_u64(headers, "x-ratelimit-remaining-tokens")
        .or_else(|| header_u64(headers, "anthropic-ratelimit-tokens-remaining"))
        .or_else(|| {
            let input = header_u64(headers, "anthropic-ratelimit-input-tokens-remaining");
            let output = header_u64(headers, "anthropic-ratelimit-output-tokens-remaining");
            match (input, output) {
                (Some(i), Some(o)) => Some(i.min(o)),
                (i, o) => i.or(o),
            }
        });
    RateLimits::new(requests, tokens)
}

fn capped(d: Duration) -> Duration {
    d.min(MAX_RETRY_AFTER)
}

fn secs_f64(s: &str) -> Option<Duration> {
    let v: f64 = s.parse().ok()?;
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    if v <= 0.0 {
        return Some(Duration::ZERO);
    }
    Some(capped(Duration::from_secs_f64(v.min(1e9))))
}

/// When to retry, from `retry-after-ms`, `retry-after` (seconds or an HTTP date, read
/// against `now`), or OpenAI's `x-ratelimit-reset-*` for an exhausted quota.
pub(crate) fn retry_after(headers: &HeaderMap, now: Timestamp) -> Option<Duration> {
    if let Some(ms) = header_str(headers, "retry-after-ms").and_then(secs_f64) {
        return Some(capped(ms / 1000));
    }
    if let Some(v) = header_str(headers, "retry-after") {
        if let Some(d) = secs_f64(v) {
            return Some(d);
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            let now = UNIX_EPOCH + Duration::from_nanos(now.as_nanos());
            return Some(capped(at.duration_since(now).unwrap_or(Duration::ZERO)));
        }
    }
    let reset = |remaining: &str, reset: &str| {
        (header_u64(headers, remaining) == Some(0))
            .then(|| header_str(headers, reset).and_then(go_duration))
            .flatten()
    };
    match (
        reset(
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
        reset("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    ) {
        (Some(a), Some(b)) => Some(capped(a.max(b))),
        (a, b) => a.or(b).map(capped),
    }
}

/// Parses a Go-style duration as OpenAI's reset headers carry it: `1s`, `6m0s`, `20ms`,
/// `1h2m3.5s`.
pub(crate) fn go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(n_end);
        let value: f64 = num.parse().ok()?;
        let u_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(u_end);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    (total.is_finite() && total >= 0.0).then(|| capped(Duration::from_secs_f64(total.min(1e9))))
}

/// What an error body said.
#[derive(Debug, Default)]
struct Detail {
    kind: String,
    code: String,
    message: Option<String>,
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Reads the error shapes in use: `{"error": {"message", "type", "code"}}` (OpenAI,
/// Anthropic, vLLM), `{"error": "text"}` (Ollama, llama.cpp), `{"message", "type"}`
/// and `{"detail": ...}` (FastAPI servers).
fn detail(v: &Value) -> Detail {
    let obj = match v.get("error") {
        Some(Value::String(s)) => {
            return Detail {
                message: Some(s.clone()),
                ..Detail::default()
            };
        }
        Some(e @ Value::Object(_)) => e,
        _ => v,
    };
    let field = |k: &str| obj.get(k).and_then(value_text);
    Detail {
        kind: field("type").unwrap_or_default(),
        code: field("code").unwrap_or_default(),
        message: field("message").or_else(|| v.get("detail").and_then(value_text)),
    }
}

const CONTEXT_MARKERS: &[&str] = &[
    "context_length_exceeded",
    "context length",
    "context window",
    "context_window",
    "prompt is too long",
    "input is too long",
    "too many tokens",
    "exceeds the maximum number of tokens",
    "maximum number of tokens allowed",
];

const FILTER_MARKERS: &[&str] = &[
    "content_filter",
    "content_policy",
    "content policy",
    "content management policy",
    "safety system",
];

fn kind_of(status: Option<u16>, d: &Detail) -> ProviderErrorKind {
    use ProviderErrorKind as K;
    let text = format!(
        "{} {} {}",
        d.kind,
        d.code,
        d.message.as_deref().unwrap_or_default()
    )
    .to_ascii_lowercase();
    let has = |markers: &[&str]| markers.iter().any(|m| text.contains(m));
    let client_error = status.is_none_or(|s| (400..500).contains(&s));
    let tag = |t: &str| d.kind == t || d.code == t;
    if tag("insufficient_quota") || tag("billing_error") {
        return K::Auth;
    }
    if client_error && status != Some(429) && has(CONTEXT_MARKERS) {
        return K::ContextLength;
    }
    if client_error && status != Some(429) && has(FILTER_MARKERS) {
        return K::ContentFilter;
    }
    if tag("overloaded_error") || status == Some(529) {
        return K::Overloaded;
    }
    match status {
        Some(429) => K::RateLimited,
        Some(401 | 403) => K::Auth,
        Some(408 | 504) => K::Timeout,
        Some(503) if text.contains("overload") => K::Overloaded,
        Some(500..=599) => K::Server,
        Some(400..=499) => K::BadRequest,
        Some(_) => K::InvalidResponse,
        None => {
            if tag("rate_limit_error") || tag("rate_limit_exceeded") {
                K::RateLimited
            } else if tag("authentication_error") || tag("permission_error") {
                K::Auth
            } else if tag("invalid_request_error") || tag("not_found_error") {
                K::BadRequest
            } else if tag("timeout_error") {
                K::Timeout
            } else {
                // An error in the middle of an answer is the server's.
                K::Server
            }
        }
    }
}

/// Classifies a failed HTTP response.
pub(crate) fn classify(
    provider: &str,
    status: Option<u16>,
    headers: &HeaderMap,
    body: &[u8],
    now: Timestamp,
) -> ProviderError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let d = parsed.as_ref().map(detail).unwrap_or_default();
    let kind = kind_of(status, &d);
    let message = match &d.message {
        Some(m) => m.clone(),
        None => {
            let ct = header_str(headers, "content-type").unwrap_or("no content type");
            if parsed.is_some() {
                snippet(body)
            } else {
                format!(
                    "non-JSON body ({} bytes, {ct}): {}",
                    body.len(),
                    snippet(body)
                )
            }
        }
    };
    let mut e = ProviderError::new(kind, provider, message);
    if let Some(s) = status {
        e = e.with_status(s);
    }
    let limits = rate_limits(headers);
    if !limits.is_empty() {
        e = e.with_rate_limits(limits);
    }
    if let Some(d) = retry_after(headers, now) {
        e = e.with_retry_after(d);
    }
    e
}

/// Classifies an error payload inside a 200 body or a stream.
pub(crate) fn classify_payload(provider: &str, v: &Value) -> ProviderError {
    let d = detail(v);
    let kind = kind_of(None, &d);
    let message = d
        .message
        .clone()
        .unwrap_or_else(|| snippet(v.to_string().as_bytes()));
    ProviderError::new(kind, provider, format!("error in the response: {message}"))
}

// ---------------------------------------------------------------------------------------
// Streams.

/// How many malformed events (not JSON, or not of the expected shape) one stream may
/// skip; one more fails it with [`ProviderErrorKind::InvalidResponse`].
pub const MAX_MALFORMED_EVENTS: u32 = 3;

/// `tokenwise_stream_malformed_events_total`: stream events skipped as malformed, by
/// `provider`.
pub const STREAM_MALFORMED_EVENTS: &str = "tokenwise_stream_malformed_events_total";

/// Why a stream event could not be used.
#[derive(Debug)]
pub(crate) enum EventError {
    /// Not JSON, or not of the expected shape: skipped, up to [`MAX_MALFORMED_EVENTS`].
    Malformed(String),
    /// The stream failed: an error event, say.
    Failed(ProviderError),
}

impl From<ProviderError> for EventError {
    fn from(e: ProviderError) -> Self {
        EventError::Failed(e)
    }
}

/// Turns one API's SSE events into stream events.
pub(crate) trait Translate: Send + 'static {
    /// Handles one event, pushing the text and tool-call deltas it carries to `out`;
    /// `Ok(true)` at the stream's end marker.
    fn event(
        &mut self,
        core: &HttpCore,
        ev: SseEvent,
        out: &mut VecDeque<StreamEvent>,
    ) -> std::result::Result<bool, EventError>;

    /// Whether the stream has said how the answer finished: then a clean end of the
    /// body completes it, end marker or not.
    fn has_finish(&self) -> bool;

    /// What the call asked for.
    fn asked(&self) -> &Asked;

    /// What the stream knows at its end.
    fn ending(&mut self) -> StreamEnding;
}

struct StreamState<T> {
    core: Arc<HttpCore>,
    resp: reqwest::Response,
    sent: Sent,
    decoder: SseDecoder,
    events: VecDeque<SseEvent>,
    translator: T,
    out: VecDeque<StreamEvent>,
    bytes: u64,
    chunks: u64,
    malformed: u32,
    finished: bool,
    /// A decoding error to report once the events decoded before it are handled.
    pending: Option<ProviderError>,
}

impl<T: Translate> StreamState<T> {
    fn fail(&mut self, e: ProviderError) -> Error {
        self.finished = true;
        self.out.clear();
        let e = match &self.sent.key {
            Some(lease) => {
                let mut e = e;
                e.message = scrub(&e.message, lease.key());
                e
            }
            None => e,
        };
        if self.chunks == 0 {
            e.into()
        } else {
            Error::StreamInterrupted {
                chunks: self.chunks,
                reason: e.to_string(),
            }
        }
    }

    /// Queues the usage and the end, and marks the stream finished.
    async fn complete(&mut self) {
        let ending = self.translator.ending();
        let core = Arc::clone(&self.core);
        core.end_stream(self.translator.asked(), ending, &self.sent, &mut self.out)
            .await;
        self.finished = true;
    }

    /// Reads until at least one SSE event is decoded; `Ok(false)` at the end of the body.
    async fn fill(&mut self) -> std::result::Result<bool, ProviderError> {
        let first_token = if self.chunks == 0 {
            after(self.sent.start, self.core.deadlines.first_byte)
        } else {
            None
        };
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        while self.events.is_empty() {
            let Some(chunk) = self
                .core
                .next_chunk(&mut self.resp, &self.sent, first_token)
                .await?
            else {
                return Ok(false);
            };
            self.bytes = self.bytes.saturating_add(chunk.len() as u64);
            if self.bytes > self.core.max_stream_bytes {
                return Err(self.core.error(
                    ProviderErrorKind::InvalidResponse,
                    format!(
                        "the stream exceeds the cap of {} bytes",
                        self.core.max_stream_bytes
                    ),
                ));
            }
            let mut decoded = Vec::new();
            let result = self.decoder.feed(&chunk, &mut decoded);
            self.events.extend(decoded);
            if let Err(e) = result {
                let e = self
                    .core
                    .error(ProviderErrorKind::InvalidResponse, e.to_string());
                if self.events.is_empty() {
                    return Err(e);
                }
                // Handle what came before; the error comes back on the next read.
                self.pending = Some(e);
                break;
            }
        }
        Ok(true)
    }

    async fn next(&mut self) -> Option<Result<StreamEvent>> {
        loop {
            if let Some(ev) = self.out.pop_front() {
                if matches!(
                    ev,
                    StreamEvent::TextDelta { .. } | StreamEvent::ToolCallDelta(_)
                ) {
                    self.chunks += 1;
                }
                return Some(Ok(ev));
            }
            if self.finished {
                return None;
            }
            let ev = match self.events.pop_front() {
                Some(ev) => ev,
                None => match self.fill().await {
                    Ok(true) => continue,
                    // A clean end of the body: complete if the answer said how it
                    // finished, cut otherwise.
                    Ok(false) if self.translator.has_finish() => {
                        self.complete().await;
                        continue;
                    }
                    Ok(false) => {
                        let e = self.core.error(
                            ProviderErrorKind::Connection,
                            "the stream ended without a finish reason",
                        );
                        return Some(Err(self.fail(e)));
                    }
                    Err(e) => return Some(Err(self.fail(e))),
                },
            };
            match self.translator.event(&self.core, ev, &mut self.out) {
                Ok(true) => self.complete().await,
                Ok(false) => {}
                Err(EventError::Malformed(why)) => {
                    self.malformed += 1;
                    metrics::counter!(STREAM_MALFORMED_EVENTS, "provider" => self.core.name.clone())
                        .increment(1);
                    tracing::debug!(provider = %self.core.name, "skipped a malformed stream event: {why}");
                    if self.malformed > MAX_MALFORMED_EVENTS {
                        let e = self.core.error(
                            ProviderErrorKind::InvalidResponse,
                            format!(
                                "more than {MAX_MALFORMED_EVENTS} malformed events in the stream; the last: {why}"
                            ),
                        );
                        return Some(Err(self.fail(e)));
                    }
                }
                Err(EventError::Failed(e)) => return Some(Err(self.fail(e))),
            }
        }
    }
}

/// A stream of `resp`'s SSE body, translated by `translator`.
pub(crate) fn sse_stream<T: Translate>(
    core: Arc<HttpCore>,
    resp: reqwest::Response,
    sent: Sent,
    translator: T,
) -> ChatStream {
    let decoder = SseDecoder::with_max_event_bytes(core.max_event_bytes);
    let state = StreamState {
        core,
        resp,
        sent,
        decoder,
        events: VecDeque::new(),
        translator,
        out: VecDeque::new(),
        bytes: 0,
        chunks: 0,
        malformed: 0,
        finished: false,
        pending: None,
    };
    Box::pin(stream::unfold(state, |mut st| async move {
        let item = st.next().await?;
        Some((item, st))
    }))
}

/// A whole answer as a stream: its text, tool calls, usage and end.
pub(crate) fn replay(r: ChatResponse) -> ChatStream {
    let mut events: Vec<Result<StreamEvent>> = Vec::new();
    if !r.content.is_empty() {
        events.push(Ok(StreamEvent::text(r.content.clone())));
    }
    for (i, call) in r.tool_calls.iter().enumerate() {
        let mut d = crate::types::ToolCallDelta::new(
            u32::try_from(i).unwrap_or(u32::MAX),
            call.arguments.clone(),
        );
        d.id = Some(call.id.clone());
        d.name = Some(call.name.clone());
        events.push(Ok(StreamEvent::ToolCallDelta(d)));
    }
    events.push(Ok(StreamEvent::Usage(r.usage)));
    let mut end = StreamEnd::new(r.finish_reason.clone(), &r.model, &r.provider);
    end.usage = r.usage;
    events.push(Ok(StreamEvent::Done(end)));
    Box::pin(stream::iter(events))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system_time(t: Timestamp) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(t.as_nanos())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        let now = Timestamp::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "1.5")]), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after-ms", "250"), ("retry-after", "1")]),
                now
            ),
            Some(Duration::from_millis(250))
        );
        let date = httpdate::fmt_http_date(system_time(now) + Duration::from_secs(42));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &date)]), now),
            Some(Duration::from_secs(42))
        );
        let past = httpdate::fmt_http_date(system_time(now) - Duration::from_secs(42));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "99999999999")]), now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        for odd in ["-0", "-5", "NaN", "inf", "1e999"] {
            let r = retry_after(&headers(&[("retry-after", odd)]), now);
            assert!(r.is_none() || r == Some(Duration::ZERO), "{odd}: {r:?}");
        }
        assert_eq!(
            retry_after(
                &headers(&[
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "6m0s"),
                    ("x-ratelimit-remaining-tokens", "10"),
                    ("x-ratelimit-reset-tokens", "20ms"),
                ]),
                now
            ),
            Some(Duration::from_secs(360))
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(go_duration("3x"), None);
        assert_eq!(go_duration(""), None);
        assert_eq!(go_duration("s"), None);
    }

    #[test]
    fn classification() {
        use ProviderErrorKind as K;
        let now = Timestamp::from_secs(0);
        let h = HeaderMap::new();
        let c =
            |status: u16, body: &str| classify("p", Some(status), &h, body.as_bytes(), now).kind;
        assert_eq!(
            c(
                429,
                r#"{"error":{"message":"slow","type":"requests","code":"rate_limit_exceeded"}}"#
            ),
            K::RateLimited
        );
        assert_eq!(
            c(
                429,
                r#"{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}"#
            ),
            K::Auth
        );
        assert_eq!(
            c(
                529,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            K::Overloaded
        );
        assert_eq!(
            c(503, r#"{"error":"server overloaded, try later"}"#),
            K::Overloaded
        );
        assert_eq!(c(503, "<html>down</html>"), K::Server);
        assert_eq!(c(500, "<html><body>oops</body></html>"), K::Server);
        assert_eq!(c(504, ""), K::Timeout);
        assert_eq!(
            c(
                401,
                r#"{"error":{"message":"bad key","type":"invalid_request_error","code":"invalid_api_key"}}"#
            ),
            K::Auth
        );
        assert_eq!(
            c(
                403,
                r#"{"type":"error","error":{"type":"permission_error","message":"no"}}"#
            ),
            K::Auth
        );
        assert_eq!(
            c(
                400,
                r#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#
            ),
            K::ContextLength
        );
        assert_eq!(
            c(
                400,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#
            ),
            K::ContextLength
        );
        assert_eq!(
            c(
                400,
                r#"{"object":"error","message":"This model's maximum context length is 4096 tokens. However, you requested 5000 tokens","type":"BadRequestError","code":400}"#
            ),
            K::ContextLength
        );
        assert_eq!(
            c(
                400,
                r#"{"error":{"message":"The response was filtered due to the prompt triggering content management policy.","code":"content_filter"}}"#
            ),
            K::ContentFilter
        );
        assert_eq!(
            c(
                400,
                r#"{"error":{"message":"bad temperature","type":"invalid_request_error"}}"#
            ),
            K::BadRequest
        );
        assert_eq!(c(404, r#"{"error":"model 'x' not found"}"#), K::BadRequest);
        assert_eq!(
            c(422, r#"{"detail":[{"msg":"field required"}]}"#),
            K::BadRequest
        );
        assert_eq!(c(302, ""), K::InvalidResponse);
        let e = classify(
            "p",
            Some(500),
            &headers(&[("content-type", "text/html")]),
            b"<html>\n<b>boom</b></html>",
            now,
        );
        assert!(e.message.contains("non-JSON body"), "{}", e.message);
        assert!(e.message.contains("text/html"));
        let e = classify(
            "p",
            Some(404),
            &h,
            br#"{"error":"model 'x' not found"}"#,
            now,
        );
        assert_eq!(e.message, "model 'x' not found");
        let e = classify("p", Some(422), &h, br#"{"detail":"bad field"}"#, now);
        assert_eq!(e.message, "bad field");
    }

    #[test]
    fn payload_classification() {
        use ProviderErrorKind as K;
        let k = |s: &str| classify_payload("p", &serde_json::from_str(s).unwrap()).kind;
        assert_eq!(
            k(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#),
            K::Overloaded
        );
        assert_eq!(
            k(r#"{"type":"error","error":{"type":"api_error","message":"Internal"}}"#),
            K::Server
        );
        assert_eq!(
            k(r#"{"error":{"message":"Rate limit","type":"rate_limit_error"}}"#),
            K::RateLimited
        );
        assert_eq!(
            k(r#"{"error":{"message":"x","type":"invalid_request_error"}}"#),
            K::BadRequest
        );
        assert_eq!(k(r#"{"error":"something broke"}"#), K::Server);
    }

    #[test]
    fn rate_limit_headers() {
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-remaining-tokens", "149000"),
        ]);
        assert_eq!(rate_limits(&h), RateLimits::new(Some(59), Some(149_000)));
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "3"),
            ("anthropic-ratelimit-input-tokens-remaining", "900"),
            ("anthropic-ratelimit-output-tokens-remaining", "100"),
        ]);
        assert_eq!(rate_limits(&h), RateLimits::new(Some(3), Some(100)));
        assert!(rate_limits(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn scrubbing_and_snippets() {
        let k = ApiKey::new("sk-secret-123");
        assert_eq!(scrub("bad key sk-secret-123!", &k), "bad key [redacted]!");
        // Starts of the key of 8 characters or more, wherever they are cut.
        assert_eq!(
            scrub("key sk-secre… and sk-secret-12 and sk-secr", &k),
            "key [redacted]… and [redacted] and sk-secr"
        );
        assert_eq!(
            scrub("sk-secret-123sk-secret-123", &k),
            "[redacted][redacted]"
        );
        assert_eq!(scrub("é sk-secret-1é", &k), "é [redacted]é");
        // A short key is replaced only whole.
        let short = ApiKey::new("abcd12");
        assert_eq!(scrub("abcd12 abcd1", &short), "[redacted] abcd1");
        assert_eq!(snippet(b""), "(empty body)");
        assert_eq!(snippet("a\nb".as_bytes()), "a b");
        assert_eq!(snippet(&[b'x'; 300]).chars().count(), 201);
    }
}
