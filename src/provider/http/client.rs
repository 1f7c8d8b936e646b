//! The client core: sending a request with the right key, reading bounded bodies
//! within the deadlines, and keeping secrets out of messages.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::Value;
use tokio::time::Instant;

use super::classify::{classify, classify_payload, rate_limits};
use super::direct::{Direct, DirectError, DirectResponse};
use super::paths::PathCache;
use super::settings::{Auth, Deadlines};
use crate::clock::Clock;
use crate::context::TokenCounter;
use crate::error::{ProviderError, ProviderErrorKind, RateLimits};
use crate::provider::keys::{ApiKey, KeyLease, KeyPool};

/// The most of an error body that is read to classify it: 64 KiB.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;
/// How long a rate-limited key rests for the model when the provider gave no
/// Retry-After: one second on average, drawn evenly from half to one and a half, so
/// that callers sharing the key do not all come back at once.
const DEFAULT_KEY_REST: Duration = Duration::from_secs(1);

/// `application/json`, made once.
static JSON: HeaderValue = HeaderValue::from_static("application/json");
/// `text/event-stream`, made once.
static EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");

/// [`DEFAULT_KEY_REST`] with its jitter.
fn jittered_rest() -> Duration {
    use rand::Rng;
    DEFAULT_KEY_REST.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// How requests are sent: reqwest (a caller's client, `https://`, a proxy), or the
/// direct transport to a plain `http://` base URL.
pub(crate) enum Transport {
    Reqwest(reqwest::Client),
    Direct(Direct),
}

/// An answer whose head has arrived.
#[derive(Debug)]
pub(crate) enum Response {
    Reqwest(reqwest::Response),
    Direct(DirectResponse),
}

impl Response {
    pub(crate) fn status(&self) -> reqwest::StatusCode {
        match self {
            Response::Reqwest(r) => r.status(),
            Response::Direct(r) => r.status(),
        }
    }

    pub(crate) fn headers(&self) -> &HeaderMap {
        match self {
            Response::Reqwest(r) => r.headers(),
            Response::Direct(r) => r.headers(),
        }
    }

    pub(crate) fn content_length(&self) -> Option<u64> {
        match self {
            Response::Reqwest(r) => r.content_length(),
            Response::Direct(r) => r.content_length(),
        }
    }

    async fn chunk(&mut self) -> std::result::Result<Option<Bytes>, TransportError> {
        match self {
            Response::Reqwest(r) => r.chunk().await.map_err(TransportError::Reqwest),
            Response::Direct(r) => r.chunk().await.map_err(TransportError::Direct),
        }
    }
}

/// A failure of either transport.
enum TransportError {
    Reqwest(reqwest::Error),
    Direct(DirectError),
}

impl TransportError {
    fn is_timeout(&self) -> bool {
        match self {
            TransportError::Reqwest(e) => e.is_timeout(),
            TransportError::Direct(e) => e.is_timeout(),
        }
    }

    fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            TransportError::Reqwest(e) => e,
            TransportError::Direct(e) => e,
        }
    }
}

/// The shared HTTP machinery of one provider.
pub(crate) struct HttpCore {
    pub(crate) name: String,
    pub(super) transport: Transport,
    pub(super) base_url: String,
    pub(super) auth: Auth,
    /// The authentication header's value for each key of `keys`, by its index, made
    /// once (none for a key a header cannot carry).
    pub(super) auth_values: Box<[Option<HeaderValue>]>,
    pub(super) headers: HeaderMap,
    pub(super) keys: Option<KeyPool>,
    pub(crate) deadlines: Deadlines,
    pub(crate) max_body_bytes: usize,
    pub(super) max_event_bytes: usize,
    pub(super) max_stream_bytes: u64,
    pub(crate) counter: Arc<dyn TokenCounter>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) max_retry_after: Duration,
    pub(super) last_rate_limits: Mutex<Option<RateLimits>>,
    /// `base_url` joined with each path posted to, parsed.
    pub(super) urls: PathCache<reqwest::Url>,
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
    pub(super) start: Instant,
    pub(super) key: Option<KeyLease>,
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

    pub(super) fn total_deadline(&self, start: Instant) -> Option<Instant> {
        after(start, self.deadlines.total)
    }

    /// `base_url` followed by `path`, parsed once per path (the parse costs more than
    /// the rest of building a request).
    fn url(&self, path: &str) -> std::result::Result<reqwest::Url, ProviderError> {
        self.urls.get_or_make(path, |path| {
            let joined = format!("{}{}", self.base_url, path);
            reqwest::Url::parse(&joined).map_err(|e| {
                self.error(
                    ProviderErrorKind::Connection,
                    format!("sending the request: invalid URL `{joined}`: {e}"),
                )
            })
        })
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
    ) -> std::result::Result<(Response, Sent), ProviderError> {
        let accept = if streaming { &EVENT_STREAM } else { &JSON };
        self.send_with(
            reqwest::Method::POST,
            path,
            model,
            Some((JSON.clone(), body)),
            accept.clone(),
            tokens,
        )
        .await
    }

    /// Sends a `method` request to `path` (with `body` and its content type, if any)
    /// accepting `accept`, and returns the response if its status is a success. `tokens`
    /// is charged to the key's per-key quota; a 429 rests the key for `model`.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        model: &str,
        body: Option<(&str, Vec<u8>)>,
        accept: &str,
        tokens: u64,
    ) -> std::result::Result<(Response, Sent), ProviderError> {
        let header = |v: &str| {
            HeaderValue::from_str(v).map_err(|_| {
                self.error(
                    ProviderErrorKind::Connection,
                    format!("sending the request: invalid header value `{v}`"),
                )
            })
        };
        let body = match body {
            Some((content_type, body)) => Some((header(content_type)?, body)),
            None => None,
        };
        self.send_with(method, path, model, body, header(accept)?, tokens)
            .await
    }

    /// [`send`](Self::send) with the header values made.
    async fn send_with(
        &self,
        method: reqwest::Method,
        path: &str,
        model: &str,
        body: Option<(HeaderValue, Vec<u8>)>,
        accept: HeaderValue,
        tokens: u64,
    ) -> std::result::Result<(Response, Sent), ProviderError> {
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
        let mut headers = HeaderMap::with_capacity(4 + self.headers.len());
        headers.insert(reqwest::header::ACCEPT, accept);
        if let Some(lease) = &sent.key {
            let value = self
                .auth_values
                .get(lease.index())
                .cloned()
                .flatten()
                .ok_or_else(|| {
                    self.error(
                        ProviderErrorKind::Auth,
                        "the API key holds characters a header cannot carry",
                    )
                })?;
            let name = match &self.auth {
                Auth::Bearer => reqwest::header::AUTHORIZATION,
                Auth::Header(n) => n.clone(),
            };
            headers.insert(name, value);
        }
        for (name, value) in &self.headers {
            headers.append(name, value.clone());
        }
        let body = match body {
            Some((content_type, body)) => {
                headers.insert(reqwest::header::CONTENT_TYPE, content_type);
                Some(body)
            }
            None => None,
        };
        let sending = async {
            match &self.transport {
                Transport::Reqwest(client) => {
                    let mut req = client.request(method, self.url(path)?).headers(headers);
                    if let Some(body) = body {
                        req = req.body(body);
                    }
                    Ok(req
                        .send()
                        .await
                        .map(Response::Reqwest)
                        .map_err(TransportError::Reqwest))
                }
                Transport::Direct(direct) => Ok(direct
                    .send(method, path, headers, body.unwrap_or_default())
                    .await
                    .map(Response::Direct)
                    .map_err(TransportError::Direct)),
            }
        };
        let first = after(start, self.deadlines.first_byte);
        let deadline = earliest(first, self.total_deadline(start));
        let resp = match deadline {
            Some(at) => match tokio::time::timeout_at(at, sending).await {
                Ok(r) => r?,
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
            None => sending.await?,
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
    fn transport_error(&self, e: &TransportError, doing: &str) -> ProviderError {
        let kind = if e.is_timeout() {
            ProviderErrorKind::Timeout
        } else {
            ProviderErrorKind::Connection
        };
        let e = e.as_error();
        let mut message = format!("{doing}: {e}");
        let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
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
    pub(crate) async fn next_chunk(
        &self,
        resp: &mut Response,
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

    /// Reads the body of `resp`, up to `cap` bytes: cut there if `truncate`, else
    /// refused if longer. A body that arrives in one piece (most) is returned as it
    /// arrived, uncopied.
    async fn read_limited(
        &self,
        resp: &mut Response,
        sent: &Sent,
        cap: usize,
        truncate: bool,
    ) -> std::result::Result<Bytes, ProviderError> {
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
        // Room for the declared length up front when the body comes in pieces (within
        // reason: it may lie).
        let declared = resp.content_length().unwrap_or(0).min(256 << 10);
        let room = usize::try_from(declared).unwrap_or(0).min(cap);
        // The first piece, until a second comes; then all of them, copied.
        let mut first: Option<Bytes> = None;
        let mut body: Vec<u8> = Vec::new();
        let gather = |first: &mut Option<Bytes>, body: &mut Vec<u8>| {
            if let Some(f) = first.take() {
                body.reserve(room.max(f.len()));
                body.extend_from_slice(&f);
            }
        };
        while let Some(chunk) = self.next_chunk(resp, sent, None).await? {
            let have = first.as_ref().map_or(body.len(), Bytes::len);
            if have.saturating_add(chunk.len()) > cap {
                if truncate {
                    gather(&mut first, &mut body);
                    let left = cap.saturating_sub(have);
                    body.extend_from_slice(chunk.get(..left).unwrap_or_default());
                    break;
                }
                return Err(too_big((have + chunk.len()) as u64));
            }
            if first.is_none() && body.is_empty() {
                first = Some(chunk);
            } else {
                gather(&mut first, &mut body);
                body.extend_from_slice(&chunk);
            }
        }
        Ok(first.unwrap_or_else(|| Bytes::from(body)))
    }

    /// Reads a whole success body, within the body cap and the deadlines.
    pub(crate) async fn read_body(
        &self,
        resp: &mut Response,
        sent: &Sent,
    ) -> std::result::Result<Bytes, ProviderError> {
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
    pub(crate) fn is_json(resp: &Response) -> bool {
        resp.headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            })
    }
}

/// `d` after `t`; none when there is no deadline, or it lies beyond what an `Instant`
/// can hold.
pub(super) fn after(t: Instant, d: Option<Duration>) -> Option<Instant> {
    d.and_then(|d| t.checked_add(d))
}

pub(super) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
