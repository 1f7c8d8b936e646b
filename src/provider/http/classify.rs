//! The classification of failures into [`ProviderErrorKind`]s, and the rate-limit and
//! Retry-After headers.

#[cfg(test)]
use std::time::SystemTime;
use std::time::{Duration, UNIX_EPOCH};

use reqwest::header::HeaderMap;
#[cfg(test)]
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::Value;

use super::client::snippet;
use crate::clock::Timestamp;
use crate::error::{ProviderError, ProviderErrorKind, RateLimits};

/// Retry-After values are read up to one day; the provider's
/// [`max_retry_after`](DEFAULT_MAX_RETRY_AFTER) caps what is honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    header_str(headers, name).and_then(|v| v.parse().ok())
}

/// The remaining-quota headers [`rate_limits`] reads, in the order of its slots.
const QUOTA_HEADERS: [&str; 6] = [
    "x-ratelimit-remaining-requests",
    "anthropic-ratelimit-requests-remaining",
    "x-ratelimit-remaining-tokens",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-output-tokens-remaining",
];

/// The remaining-quota headers of OpenAI and Anthropic.
///
/// Read in one pass over the answer's header names (every answer's, so it must be
/// cheap): a look-up by name for each of the six would parse and hash each name, for
/// answers that mostly carry none of them. As a look-up would, only the first value of
/// a name counts.
pub(crate) fn rate_limits(headers: &HeaderMap) -> RateLimits {
    // For each of `QUOTA_HEADERS`: unseen, or seen with its first value (if a number).
    let mut seen: [Option<Option<u64>>; 6] = [None; 6];
    for (name, value) in headers {
        let name = name.as_str();
        if !(name.starts_with("x-ratelimit-") || name.starts_with("anthropic-ratelimit-")) {
            continue;
        }
        let slot = QUOTA_HEADERS
            .iter()
            .position(|h| *h == name)
            .and_then(|i| seen.get_mut(i));
        if let Some(slot @ None) = slot {
            *slot = Some(value.to_str().ok().and_then(|v| v.trim().parse().ok()));
        }
    }
    let [
        requests,
        anthropic_requests,
        tokens,
        anthropic_tokens,
        input,
        output,
    ] = seen.map(Option::flatten);
    let requests = requests.or(anthropic_requests);
    let tokens = tokens.or(anthropic_tokens).or(match (input, output) {
        (Some(i), Some(o)) => Some(i.min(o)),
        (i, o) => i.or(o),
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
        // As a look-up by name: a name's first value counts (trimmed), and one that is
        // not a number counts as absent; other headers are passed over.
        let mut h = headers(&[
            ("content-type", "application/json"),
            ("x-ratelimit-remaining-requests", "lots"),
            ("anthropic-ratelimit-requests-remaining", " 7 "),
            ("x-ratelimit-limit-tokens", "5"),
            ("anthropic-ratelimit-output-tokens-remaining", "40"),
        ]);
        h.append(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("1"),
        );
        h.append(
            "anthropic-ratelimit-output-tokens-remaining",
            HeaderValue::from_static("2"),
        );
        assert_eq!(rate_limits(&h), RateLimits::new(Some(7), Some(40)));
    }
}
