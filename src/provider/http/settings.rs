//! The settings both HTTP providers share: deadlines, size limits, keys and the client.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::client::{HttpCore, Transport};
use super::paths::PathCache;
use crate::clock::{Clock, TokioClock};
use crate::context::{TiktokenCounter, TokenCounter};
use crate::provider::keys::{ApiKey, KeyPool};
use crate::{Error, Result};

/// The default cap on a whole response body: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;
/// The default cap on all the bytes of one streamed response: 64 MiB.
pub const DEFAULT_MAX_STREAM_BYTES: u64 = 64 << 20;
/// The default cap on an honoured Retry-After: 5 minutes. A provider asking for longer
/// is taken to mean this long (for the error's `retry_after` and the key's rest).
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);

/// Deadlines for one provider call. `None` turns a deadline off.
///
/// - `connect`: to open the TCP (and TLS) connection.
/// - `first_byte`: from sending the request to the response headers; for a stream, also
///   to the first token (the first text or tool-call delta).
/// - `idle`: the longest silence between two reads of the body, whole or streamed.
/// - `total`: the whole call, until the last byte of the answer.
///
/// A missed deadline fails the call with [`ProviderErrorKind::Timeout`](crate::ProviderErrorKind::Timeout); in a stream that
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
            max_event_bytes: crate::provider::sse::DEFAULT_MAX_EVENT_BYTES,
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
        // A caller's client is used as given; else a plain `http://` base URL gets the
        // direct transport (unless a proxy variable is set), and anything else a
        // reqwest client of our own.
        let direct = match self.client {
            Some(_) => None,
            None => super::direct::Direct::for_base(&base, self.deadlines.connect),
        };
        let transport = match (self.client, direct) {
            (Some(c), _) => Transport::Reqwest(c),
            (None, Some(d)) => Transport::Direct(d),
            (None, None) => {
                let mut b = http_client_builder()?;
                if let Some(d) = self.deadlines.connect {
                    b = b.connect_timeout(d);
                }
                Transport::Reqwest(
                    b.build()
                        .map_err(|e| cfg(format!("HTTP client: {}", e.without_url())))?,
                )
            }
        };
        let auth_values = keys
            .as_ref()
            .map(|pool| {
                pool.all_keys()
                    .iter()
                    .map(|k| auth_value(&self.auth, k))
                    .collect()
            })
            .unwrap_or_default();
        Ok(HttpCore {
            name,
            transport,
            base_url: base,
            auth_values,
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
            urls: PathCache::default(),
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

        /// Uses this `reqwest` client (for a proxy or custom TLS, say) for every
        /// request. The connect deadline is then the client's own; build it from
        /// [`http_client_builder`](crate::provider::http_client_builder) to keep rustls
        /// on *ring*. Without one, a plain `http://` base URL goes through hyper's
        /// HTTP/1.1 client directly (unless a proxy variable is set), and any other
        /// through a reqwest client of the provider's own.
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

/// The header value that carries `key` under `auth`, marked sensitive; none if the key
/// holds characters a header cannot carry.
fn auth_value(auth: &Auth, key: &ApiKey) -> Option<HeaderValue> {
    let mut value = match auth {
        Auth::Bearer => HeaderValue::from_str(&format!("Bearer {}", key.expose_secret())),
        Auth::Header(_) => HeaderValue::from_str(key.expose_secret()),
    }
    .ok()?;
    value.set_sensitive(true);
    Some(value)
}
