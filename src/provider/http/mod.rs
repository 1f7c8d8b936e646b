//! What the HTTP providers share, by concern: their settings ([`settings`]), the
//! client core that sends requests and reads bounded bodies ([`client`]), the
//! classification of failures ([`classify`]), the usage of answers ([`usage`]) and the
//! translation of event streams ([`stream`]).

mod classify;
mod client;
mod direct;
mod paths;
mod settings;
mod stream;
mod usage;

pub(crate) use classify::classify_payload;
pub(crate) use client::{HttpCore, Response, Sent, documents_text};
pub(crate) use settings::{Auth, HttpSettings, http_builder_methods};
pub use settings::{
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_RETRY_AFTER, DEFAULT_MAX_STREAM_BYTES, Deadlines,
    http_client_builder,
};
pub(crate) use stream::{Asked, EventError, StreamEnding, Translate, replay, sse_stream};
pub use stream::{MAX_MALFORMED_EVENTS, STREAM_MALFORMED_EVENTS};
pub(crate) use usage::count_usage;

/// Generates the accessors both HTTP providers share, reading the [`HttpCore`] at the
/// given field path of `self`.
macro_rules! http_provider_accessors {
    ($($core:ident).+) => {
        /// The base URL requests go to.
        pub fn base_url(&self) -> &str {
            self.$($core).+.base_url()
        }

        /// The provider's keys, if it has any.
        pub fn key_pool(&self) -> Option<&$crate::provider::KeyPool> {
            self.$($core).+.keys()
        }

        /// What the last response's rate-limit headers said was left, if any said
        /// anything.
        pub fn last_rate_limits(&self) -> Option<$crate::RateLimits> {
            self.$($core).+.last_rate_limits()
        }
    };
}
pub(crate) use http_provider_accessors;

/// Inputs for the property tests of the decoders and parsers: arbitrary bytes, and
/// JSON built from the field names the APIs use, so that the parsers' deeper paths run.
#[cfg(test)]
pub(crate) mod arbitrary {
    use proptest::prelude::*;
    use serde_json::Value;

    const KEYS: &[&str] = &[
        "choices",
        "delta",
        "message",
        "content",
        "refusal",
        "role",
        "usage",
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "cached_tokens",
        "tool_calls",
        "index",
        "id",
        "function",
        "name",
        "arguments",
        "finish_reason",
        "error",
        "type",
        "code",
        "content_block",
        "text",
        "partial_json",
        "stop_reason",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "input",
    ];
    const WORDS: &[&str] = &[
        "stop",
        "length",
        "tool_calls",
        "assistant",
        "text",
        "tool_use",
        "text_delta",
        "input_json_delta",
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "error",
        "end_turn",
        "max_tokens",
        "[DONE]",
        "",
    ];

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u64>().prop_map(Value::from),
            (0u64..100).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ]
    }

    /// JSON values shaped like the APIs' (but anything may be anywhere).
    pub(crate) fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            number(),
            proptest::sample::select(WORDS).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((proptest::sample::select(KEYS), inner), 0..6).prop_map(
                    |kv| {
                        Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                    }
                ),
            ]
        })
    }

    /// Runs `feed` on `cases` (body, stream) pairs from [`body`] and [`stream`], the
    /// same pairs on every run (a fixed seed), failing the test if `feed` panics.
    pub(crate) fn run(cases: u32, feed: impl Fn(&[u8], &[u8])) {
        use proptest::test_runner::{Config, RngAlgorithm, TestRunner};
        let config = Config {
            rng_algorithm: RngAlgorithm::XorShift,
            ..Config::with_cases(cases)
        };
        let outcome = TestRunner::new(config).run(&(body(), stream()), |(body, stream)| {
            feed(&body, &stream);
            Ok(())
        });
        if let Err(e) = outcome {
            panic!("{e}");
        }
    }

    /// Bytes: arbitrary, or JSON (whole, or cut short, or with a byte changed).
    pub(crate) fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            json().prop_map(|v| v.to_string().into_bytes()),
            (json(), any::<usize>()).prop_map(|(v, cut)| {
                let mut b = v.to_string().into_bytes();
                b.truncate(cut % (b.len() + 1));
                b
            }),
            (json(), any::<usize>(), any::<u8>()).prop_map(|(v, at, byte)| {
                let mut b = v.to_string().into_bytes();
                if !b.is_empty() {
                    let i = at % b.len();
                    b[i] = byte;
                }
                b
            }),
        ]
    }

    /// An event stream: events of API-like JSON (or not), with names, in SSE framing,
    /// or arbitrary bytes.
    pub(crate) fn stream() -> impl Strategy<Value = Vec<u8>> {
        let event = (
            proptest::option::of(proptest::sample::select(WORDS)),
            body(),
        )
            .prop_map(|(name, data)| {
                let mut out = Vec::new();
                if let Some(n) = name {
                    out.extend_from_slice(format!("event: {n}\n").as_bytes());
                }
                out.extend_from_slice(b"data: ");
                out.extend(data.into_iter().filter(|b| *b != b'\n' && *b != b'\r'));
                out.extend_from_slice(b"\n\n");
                out
            });
        prop_oneof![
            proptest::collection::vec(event, 0..8).prop_map(|e| e.concat()),
            proptest::collection::vec(any::<u8>(), 0..512),
        ]
    }
}
