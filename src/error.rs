//! The crate's one error type.
//!
//! Every fallible operation in tokenwise returns [`Error`]. It is `#[non_exhaustive]`:
//! match the variants you act on and keep a wildcard arm. Two helpers answer the
//! questions callers ask most: [`Error::retry_after`] (when may I try again?) and
//! [`Error::is_retryable`] (can the same request succeed if tried again?).

use std::fmt;
use std::time::Duration;

use crate::types::{Cost, Scope};

/// A boxed error from another crate or a user implementation, kept as a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for `Result<T, tokenwise::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a tokenwise call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A rate limit of this pipeline refused the request; nothing was consumed.
    #[error("rate limited on {scope} scope; retry after {retry_after:?}")]
    RateLimited {
        /// The scope whose limit refused the request.
        scope: Scope,
        /// When the same request would be admitted, if nothing else is consumed meanwhile.
        retry_after: Duration,
    },
    /// A spending cap refused the request; nothing was reserved.
    #[error("spend cap reached on {scope} scope: {spent} spent and reserved of {limit}")]
    BudgetExceeded {
        /// The scope whose cap refused the request.
        scope: Scope,
        /// The cap.
        limit: Cost,
        /// Spent plus currently reserved in the cap's window.
        spent: Cost,
        /// When the cap's window resets, if it resets.
        retry_after: Option<Duration>,
    },
    /// The pipeline is at its concurrency limit; the request was shed at once.
    #[error("overloaded: too many requests in flight")]
    Overloaded {
        /// A hint for when to retry.
        retry_after: Option<Duration>,
    },
    /// A model provider failed; see [`ProviderError::kind`].
    #[error(transparent)]
    Provider(Box<ProviderError>),
    /// No target can be tried now: every circuit breaker of the route is open (and no
    /// cached answer could stand in). Retry after `retry_after`.
    #[error("temporarily unavailable: every target's circuit is open; retry after {retry_after:?}")]
    Unavailable {
        /// When the first breaker lets a probe through.
        retry_after: Option<Duration>,
    },
    /// Every target of the route failed; the last failure is the source.
    #[error("all {attempts} attempt(s) failed; last error: {last}")]
    AllTargetsFailed {
        /// How many provider calls were made.
        attempts: u32,
        /// The last error seen.
        #[source]
        last: Box<Error>,
    },
    /// The prompt does not fit the model's context window.
    #[error("prompt of {tokens} tokens does not fit {model}'s context window of {limit} tokens")]
    ContextTooLong {
        /// The model.
        model: String,
        /// Tokens the prompt needs (input plus reserved output).
        tokens: u64,
        /// The model's context window.
        limit: u64,
    },
    /// The request named a model the catalogue does not know.
    #[error("unknown model `{0}`: add it to the catalogue or route to a known model")]
    UnknownModel(String),
    /// The request itself is invalid (empty messages, bad parameter, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The configuration is invalid; raised by builders and loaders, never mid-request.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A stream ended early or broke after it started. Never reported as a clean end.
    #[error("stream interrupted after {chunks} chunk(s): {reason}")]
    StreamInterrupted {
        /// Content chunks delivered before the break.
        chunks: u64,
        /// What happened.
        reason: String,
    },
    /// A backend (cache, limiter, budget store, usage sink) failed.
    #[error("{component} backend error")]
    Backend {
        /// Which component.
        component: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// When the same request may be tried again, if the error says.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenwise::{Error, Scope};
    /// let e = Error::RateLimited { scope: Scope::Global, retry_after: Duration::from_secs(2) };
    /// assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => Some(*retry_after),
            Error::BudgetExceeded { retry_after, .. } => *retry_after,
            Error::Overloaded { retry_after } | Error::Unavailable { retry_after } => *retry_after,
            Error::Provider(p) => p.retry_after,
            Error::AllTargetsFailed { last, .. } => last.retry_after(),
            _ => None,
        }
    }

    /// Whether the same request can succeed if tried again (possibly after
    /// [`retry_after`](Self::retry_after)): rate limits, overload, server errors,
    /// timeouts, connection failures, broken streams and unreachable backends. Client errors (bad request,
    /// auth, context length, unknown model, configuration) and spend caps are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RateLimited { .. } | Error::Overloaded { .. } | Error::Unavailable { .. } => {
                true
            }
            Error::StreamInterrupted { .. } | Error::Backend { .. } => true,
            Error::Provider(p) => p.kind.is_retryable(),
            Error::AllTargetsFailed { last, .. } => last.is_retryable(),
            _ => false,
        }
    }

    /// Whether the failure says the target (a provider and model) is unhealthy, so it
    /// counts against the target's circuit breaker: rate limits, overload, server
    /// errors, timeouts, connection failures, invalid responses and broken streams.
    /// A wrong request (bad request, auth, context length, content filter) never does.
    ///
    /// ```
    /// use tokenwise::{Error, ProviderError, ProviderErrorKind};
    /// let e: Error = ProviderError::new(ProviderErrorKind::Server, "openai", "boom").into();
    /// assert!(e.is_target_failure());
    /// let e: Error = ProviderError::new(ProviderErrorKind::BadRequest, "openai", "no").into();
    /// assert!(!e.is_target_failure());
    /// ```
    pub fn is_target_failure(&self) -> bool {
        match self {
            Error::Provider(p) => p.kind.is_target_failure(),
            Error::StreamInterrupted { .. } => true,
            _ => false,
        }
    }

    /// Whether the target said it is overloaded or did not answer in time (429, 503,
    /// other 5xx, timeouts): the signal for adaptive concurrency to back off.
    pub fn is_overload(&self) -> bool {
        self.as_provider().is_some_and(|p| {
            matches!(
                p.kind,
                ProviderErrorKind::RateLimited
                    | ProviderErrorKind::Overloaded
                    | ProviderErrorKind::Timeout
                    | ProviderErrorKind::Server
            )
        })
    }

    /// Whether the call timed out (no answer, or no first token, in time).
    pub fn is_timeout(&self) -> bool {
        self.as_provider()
            .is_some_and(|p| p.kind == ProviderErrorKind::Timeout)
    }

    /// Whether another target (a fallback model) may succeed where this one failed:
    /// anything but a request the provider judged wrong on its merits (bad request,
    /// content filter) or a refusal by the pipeline itself (limits, caps).
    pub fn may_succeed_elsewhere(&self) -> bool {
        match self {
            Error::Provider(p) => !matches!(
                p.kind,
                ProviderErrorKind::BadRequest | ProviderErrorKind::ContentFilter
            ),
            Error::ContextTooLong { .. } | Error::Config(_) | Error::StreamInterrupted { .. } => {
                true
            }
            _ => false,
        }
    }

    /// The provider error inside, if this is one.
    pub fn as_provider(&self) -> Option<&ProviderError> {
        match self {
            Error::Provider(p) => Some(p),
            Error::AllTargetsFailed { last, .. } => last.as_provider(),
            _ => None,
        }
    }

    /// A short, stable, lowercase name for the error, for metric labels and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::RateLimited { .. } => "rate_limited",
            Error::BudgetExceeded { .. } => "budget_exceeded",
            Error::Overloaded { .. } => "overloaded",
            Error::Unavailable { .. } => "unavailable",
            Error::Provider(p) => p.kind.as_str(),
            Error::AllTargetsFailed { .. } => "all_targets_failed",
            Error::ContextTooLong { .. } => "context_too_long",
            Error::UnknownModel(_) => "unknown_model",
            Error::InvalidRequest(_) => "invalid_request",
            Error::Config(_) => "config",
            Error::StreamInterrupted { .. } => "stream_interrupted",
            Error::Backend { .. } => "backend",
        }
    }

    /// Wraps a backend failure.
    pub fn backend(component: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            component,
            source: source.into(),
        }
    }
}

impl From<ProviderError> for Error {
    fn from(e: ProviderError) -> Self {
        Error::Provider(Box::new(e))
    }
}

/// What kind of failure a provider reported. Decides retries and breakers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProviderErrorKind {
    /// 429: the provider's rate limit. Retryable after `retry_after`.
    RateLimited,
    /// 529 or 503 "overloaded". Retryable.
    Overloaded,
    /// Other 5xx. Retryable.
    Server,
    /// No response (or no first token) in time. Retryable.
    Timeout,
    /// The connection failed or was reset. Retryable.
    Connection,
    /// 401/403: the key is wrong or lacks access. Not retryable.
    Auth,
    /// 400 and other client errors. Not retryable.
    BadRequest,
    /// The prompt exceeds the model's context window. Not retryable as is.
    ContextLength,
    /// The provider's content filter refused. Not retryable.
    ContentFilter,
    /// The provider answered with something that is not a valid response. Retryable.
    InvalidResponse,
}

impl ProviderErrorKind {
    /// Whether a request that failed this way can succeed if tried again.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::Overloaded
                | Self::Server
                | Self::Timeout
                | Self::Connection
                | Self::InvalidResponse
        )
    }

    /// Whether this failure says something about the target's health (and so may
    /// trip a circuit breaker). Client errors never do.
    pub fn is_target_failure(self) -> bool {
        self.is_retryable()
    }

    /// A short, stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "provider_rate_limited",
            Self::Overloaded => "provider_overloaded",
            Self::Server => "provider_server_error",
            Self::Timeout => "provider_timeout",
            Self::Connection => "provider_connection",
            Self::Auth => "provider_auth",
            Self::BadRequest => "provider_bad_request",
            Self::ContextLength => "provider_context_length",
            Self::ContentFilter => "provider_content_filter",
            Self::InvalidResponse => "provider_invalid_response",
        }
    }
}

impl fmt::Display for ProviderErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure reported by (or while talking to) a model provider.
#[derive(Debug, thiserror::Error)]
#[error("{provider}: {kind}{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
#[non_exhaustive]
pub struct ProviderError {
    /// What kind of failure.
    pub kind: ProviderErrorKind,
    /// The provider's name.
    pub provider: String,
    /// The HTTP status, if there was one.
    pub status: Option<u16>,
    /// A human-readable message (never contains credentials).
    pub message: String,
    /// When the provider said to retry.
    pub retry_after: Option<Duration>,
    /// What the provider's rate-limit headers said was left, if it sent any.
    pub rate_limits: Option<RateLimits>,
    /// The underlying error, if any.
    #[source]
    pub source: Option<BoxError>,
}

impl ProviderError {
    /// A provider error of `kind` from `provider` with `message`.
    pub fn new(
        kind: ProviderErrorKind,
        provider: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ProviderError {
            kind,
            provider: provider.into(),
            status: None,
            message: message.into(),
            retry_after: None,
            rate_limits: None,
            source: None,
        }
    }

    /// Sets the HTTP status.
    #[must_use]
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Sets the provider's retry hint.
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Sets what the provider's rate-limit headers said was left.
    #[must_use]
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limits = Some(limits);
        self
    }

    /// Sets the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }
}

/// What a provider's rate-limit headers said was left of its quotas
/// (`x-ratelimit-remaining-*` for OpenAI, `anthropic-ratelimit-*-remaining` for Anthropic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RateLimits {
    /// Requests left in the current window.
    pub remaining_requests: Option<u64>,
    /// Tokens left in the current window.
    pub remaining_tokens: Option<u64>,
}

impl RateLimits {
    /// Limits with these remaining counts.
    pub fn new(remaining_requests: Option<u64>, remaining_tokens: Option<u64>) -> Self {
        RateLimits {
            remaining_requests,
            remaining_tokens,
        }
    }

    /// Whether the headers said anything.
    pub fn is_empty(&self) -> bool {
        self.remaining_requests.is_none() && self.remaining_tokens.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classification() {
        let e: Error = ProviderError::new(ProviderErrorKind::RateLimited, "p", "slow down")
            .with_status(429)
            .with_retry_after(Duration::from_secs(3))
            .into();
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        assert!(e.to_string().contains("HTTP 429"));
        let e: Error = ProviderError::new(ProviderErrorKind::Auth, "p", "bad key").into();
        assert!(!e.is_retryable());
        let e = Error::BudgetExceeded {
            scope: Scope::Global,
            limit: Cost::from_dollars(1),
            spent: Cost::from_dollars(1),
            retry_after: None,
        };
        assert!(!e.is_retryable());
        assert_eq!(e.reason(), "budget_exceeded");
        let wrapped = Error::AllTargetsFailed {
            attempts: 2,
            last: Box::new(ProviderError::new(ProviderErrorKind::Server, "p", "boom").into()),
        };
        assert!(wrapped.is_retryable());
        assert_eq!(
            wrapped.as_provider().map(|p| p.kind),
            Some(ProviderErrorKind::Server)
        );
    }
}
