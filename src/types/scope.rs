//! Scopes: who a rate limit or a spend cap applies to.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::RequestMeta;

/// The key of the shared bucket that requests without an identity of a scope's kind
/// fall into (no user, org, ip or feature): one bucket per scope kind.
pub const ANONYMOUS: &str = "<anonymous>";

/// What a pipeline does with a request that carries no identity for a scope its limits
/// or caps use (no `.user()` under a per-user limit, for example).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Anonymous {
    /// Such requests share one bucket per scope kind, keyed [`ANONYMOUS`]: they are
    /// limited and capped together. The default.
    #[default]
    SharedBucket,
    /// Such requests are refused with [`Error::InvalidRequest`](crate::Error::InvalidRequest)
    /// before any limit is checked.
    Refuse,
}

/// A scope that limits and caps apply to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "key", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Scope {
    /// Everything through the pipeline.
    Global,
    /// One organisation.
    Org(String),
    /// One user.
    User(String),
    /// One IP address.
    Ip(String),
    /// One product feature.
    Feature(String),
}

impl Scope {
    /// The kind of scope, as a stable lowercase name.
    pub fn kind(&self) -> ScopeKind {
        match self {
            Scope::Global => ScopeKind::Global,
            Scope::Org(_) => ScopeKind::Org,
            Scope::User(_) => ScopeKind::User,
            Scope::Ip(_) => ScopeKind::Ip,
            Scope::Feature(_) => ScopeKind::Feature,
        }
    }

    /// The key within its kind (`"*"` for global).
    pub fn key(&self) -> &str {
        match self {
            Scope::Global => "*",
            Scope::Org(k) | Scope::User(k) | Scope::Ip(k) | Scope::Feature(k) => k,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            other => write!(f, "{}:{}", other.kind().as_str(), other.key()),
        }
    }
}

/// The kinds of [`Scope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ScopeKind {
    /// [`Scope::Global`].
    Global,
    /// [`Scope::Org`].
    Org,
    /// [`Scope::User`].
    User,
    /// [`Scope::Ip`].
    Ip,
    /// [`Scope::Feature`].
    Feature,
}

impl ScopeKind {
    /// A stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Global => "global",
            ScopeKind::Org => "org",
            ScopeKind::User => "user",
            ScopeKind::Ip => "ip",
            ScopeKind::Feature => "feature",
        }
    }

    /// The identity of this kind that `meta` carries: `Some("*")` for global, `None`
    /// when the request does not say (no user, org, ip or feature).
    pub fn identity(self, meta: &RequestMeta) -> Option<&str> {
        match self {
            ScopeKind::Global => Some("*"),
            ScopeKind::Org => meta.org.as_deref(),
            ScopeKind::User => meta.user.as_deref(),
            ScopeKind::Ip => meta.ip.as_deref(),
            ScopeKind::Feature => meta.feature.as_deref(),
        }
    }

    /// The key of this kind for `meta`: its identity, or [`ANONYMOUS`] when the request
    /// carries none, so that a request without a user (or org, ip, feature) shares one
    /// bucket per scope kind and is never exempt from that scope's limits and caps.
    /// (A pipeline built with [`Anonymous::Refuse`] refuses such requests before any
    /// limit is checked.) Always `Some`; the `Option` is kept for custom backends that
    /// match on it.
    ///
    /// ```
    /// use tokenwise::{RequestMeta, ScopeKind};
    /// use tokenwise::types::ANONYMOUS;
    /// let meta = RequestMeta::default();
    /// assert_eq!(ScopeKind::User.key_of(&meta), Some(ANONYMOUS));
    /// assert_eq!(ScopeKind::Global.key_of(&meta), Some("*"));
    /// ```
    pub fn key_of(self, meta: &RequestMeta) -> Option<&str> {
        Some(self.identity(meta).unwrap_or(ANONYMOUS))
    }

    /// The scope of this kind with `key` (ignored for global).
    pub fn with_key(self, key: &str) -> Scope {
        let key = key.to_owned();
        match self {
            ScopeKind::Global => Scope::Global,
            ScopeKind::Org => Scope::Org(key),
            ScopeKind::User => Scope::User(key),
            ScopeKind::Ip => Scope::Ip(key),
            ScopeKind::Feature => Scope::Feature(key),
        }
    }

    /// The scope of this kind for `meta` (its shared anonymous bucket when `meta` has no
    /// identity of this kind).
    pub fn scope_of(self, meta: &RequestMeta) -> Option<Scope> {
        let key = self.key_of(meta)?.to_owned();
        Some(match self {
            ScopeKind::Global => Scope::Global,
            ScopeKind::Org => Scope::Org(key),
            ScopeKind::User => Scope::User(key),
            ScopeKind::Ip => Scope::Ip(key),
            ScopeKind::Feature => Scope::Feature(key),
        })
    }
}

impl fmt::Display for ScopeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
