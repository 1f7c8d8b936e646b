//! Errors in OpenAI's body shape, `{"error": {"message", "type", "param", "code"}}`,
//! with the status code and `Retry-After` that fit each tokenwise error.

use std::fmt;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokenwise::{Error, ProviderErrorKind};

/// An error as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `rate_limit_error`, ...
    pub kind: &'static str,
    /// OpenAI's `code`, machine-readable.
    pub code: Option<&'static str>,
    /// The request parameter at fault, as a path (`messages[2].content`).
    pub param: Option<String>,
    /// A sentence for people.
    pub message: String,
    /// When the same request may succeed.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with `status`, `kind`, `code` and `message`.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code: Some(code),
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(
        code: &'static str,
        param: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        );
        let param = param.into();
        if !param.is_empty() {
            e.param = Some(param);
        }
        e
    }

    /// 401: no key, or one the gateway does not know.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            message,
        )
    }

    /// Sets the retry hint.
    #[must_use]
    pub fn retry_after(mut self, d: Option<Duration>) -> Self {
        self.retry_after = d;
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    /// The error a pipeline failure becomes. `redact` scrubs secrets from any text that
    /// came from the upstream.
    pub fn from_pipeline(e: &Error, redact: &dyn Fn(&str) -> String) -> Self {
        let status = |s: StatusCode, kind, code, msg: String| Self::new(s, kind, code, msg);
        match e {
            Error::RateLimited { scope, retry_after } => status(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                format!(
                    "Rate limit reached on the {scope} scope. Retry after {} s.",
                    retry_after_secs(*retry_after)
                ),
            )
            .retry_after(Some(*retry_after)),
            Error::BudgetExceeded {
                scope,
                limit,
                spent,
                retry_after,
            } => {
                let when = match retry_after {
                    Some(d) => format!("it resets in {} s", retry_after_secs(*d)),
                    None => "it does not reset".to_owned(),
                };
                status(
                    StatusCode::PAYMENT_REQUIRED,
                    "insufficient_quota",
                    "insufficient_quota",
                    format!(
                        "Spend cap reached on the {scope} scope: {spent} spent or reserved of {limit}; {when}."
                    ),
                )
                .retry_after(*retry_after)
            }
            Error::Overloaded { retry_after } => status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "overloaded",
                "The gateway is at capacity. Please retry shortly.".into(),
            )
            .retry_after(*retry_after),
            Error::Unavailable { retry_after } => status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "upstream_unavailable",
                "Every upstream model for this request is temporarily unavailable.".into(),
            )
            .retry_after(*retry_after),
            Error::AllTargetsFailed { last, .. } => Self::from_pipeline(last, redact),
            Error::Provider(p) => {
                let (s, kind, code, message) = match p.kind {
                    ProviderErrorKind::BadRequest => (
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        "upstream_rejected",
                        format!("The upstream rejected the request: {}", redact(&p.message)),
                    ),
                    ProviderErrorKind::ContextLength => (
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        "context_length_exceeded",
                        format!(
                            "The prompt is too long for the model: {}",
                            redact(&p.message)
                        ),
                    ),
                    ProviderErrorKind::ContentFilter => (
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        "content_filter",
                        "The upstream's content filter refused the request.".to_owned(),
                    ),
                    ProviderErrorKind::RateLimited => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "upstream_rate_limited",
                        "The upstream is rate limiting the gateway. Please retry shortly."
                            .to_owned(),
                    ),
                    ProviderErrorKind::Overloaded => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "upstream_overloaded",
                        "The upstream is overloaded. Please retry shortly.".to_owned(),
                    ),
                    ProviderErrorKind::Timeout => (
                        StatusCode::GATEWAY_TIMEOUT,
                        "server_error",
                        "upstream_timeout",
                        "The upstream did not answer in time.".to_owned(),
                    ),
                    ProviderErrorKind::Auth => (
                        StatusCode::BAD_GATEWAY,
                        "server_error",
                        "upstream_auth",
                        "The gateway's upstream credentials were rejected.".to_owned(),
                    ),
                    _ => (
                        StatusCode::BAD_GATEWAY,
                        "server_error",
                        "upstream_error",
                        "The upstream failed to answer.".to_owned(),
                    ),
                };
                status(s, kind, code, message).retry_after(p.retry_after)
            }
            Error::ContextTooLong {
                model,
                tokens,
                limit,
            } => Self::invalid(
                "context_length_exceeded",
                "messages",
                format!(
                    "This model's maximum context length is {limit} tokens, but the request needs {tokens} (prompt plus max output) on {model}."
                ),
            ),
            Error::UnknownModel(m) => {
                let mut e = Self::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "model_not_found",
                    format!("The model `{}` does not exist.", redact(m)),
                );
                e.param = Some("model".into());
                e
            }
            Error::InvalidRequest(msg) => Self::invalid("invalid_value", "", redact(msg)),
            Error::StreamInterrupted { .. } => status(
                StatusCode::BAD_GATEWAY,
                "server_error",
                "stream_interrupted",
                "The upstream stream broke before the answer was complete.".into(),
            ),
            Error::Backend { component, .. } => status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "backend_unavailable",
                format!("The gateway's {component} backend is unavailable."),
            ),
            _ => status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                "The gateway failed to process the request.".into(),
            ),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

/// Whole seconds for `Retry-After`, rounded up, and never 0: a refused client should
/// not retry at once.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    secs.max(1)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        let mut res = (self.status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(d) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(d)));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}
