//! What the HTTP providers share, by concern: their settings ([`settings`]), the
//! client core that sends requests and reads bounded bodies ([`client`]), the
//! classification of failures ([`classify`]), the usage of answers ([`usage`]) and the
//! translation of event streams ([`stream`]).

mod classify;
mod client;
mod settings;
mod stream;
mod usage;

pub(crate) use classify::classify_payload;
pub(crate) use client::{HttpCore, Sent, documents_text};
pub(crate) use settings::{Auth, HttpSettings, http_builder_methods};
pub use settings::{
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_RETRY_AFTER, DEFAULT_MAX_STREAM_BYTES, Deadlines,
    http_client_builder,
};
pub(crate) use stream::{Asked, EventError, StreamEnding, Translate, replay, sse_stream};
pub use stream::{MAX_MALFORMED_EVENTS, STREAM_MALFORMED_EVENTS};

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
