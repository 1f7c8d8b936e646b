//! Answer caching: the [`Cache`] trait, the canonical [`CacheKey`], the in-memory
//! [`ExactCache`], the [`SemanticCache`] with its [`Guards`], embedders and
//! [`VectorIndex`], and the single-flight that makes concurrent identical misses
//! share one provider call.
//!
//! The guide is `docs/caching.md`; the figures it quotes come from
//! `examples/cache_eval.rs` and `benches/cache_index.rs`.
//!
//! The pipeline builds one [`CacheQuery`] per request. Its exact key covers everything
//! that changes the answer: the model (or `auto` when the router chooses), every
//! generation parameter, the system prompt, tools, documents, the whole history, the
//! namespace and the tenant partition. Its context key covers the same minus the final
//! user turn, so a semantic cache can compare final turns only among entries whose
//! context is identical.
//!
//! What is never stored: errors (including 429s), refusals (content filter),
//! truncated answers (`length`) and broken streams. See [`is_cacheable`].

mod canon;
mod embed;
mod flight;
mod guards;
mod index;
mod judge;
pub(crate) mod key;
mod layer;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod semantic;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

#[cfg(feature = "local-embeddings")]
pub use embed::MiniLmEmbedder;
pub use embed::{CachedEmbedder, Embedder, HashingEmbedder, unit_vector};
pub(crate) use flight::{Join, Leader, OnEnd, SharedStream, SingleFlight, share_stream};
pub use flight::{MAX_SHARED_STREAM_BYTES, MAX_SHARED_STREAM_EVENTS};
pub use guards::{GuardKind, GuardRejection, Guards};
pub use index::{IndexConfig, Maintenance, MaintenanceDone, Quantization, Retired, VectorIndex};
pub use judge::{JUDGE_FEATURE_NAMES, JUDGE_FEATURES, PairFeatures, PairJudge};
pub(crate) use key::BuildKeyHasher;
pub use key::{CacheKey, CacheQuery, MAX_HISTORY_BYTES, MAX_HISTORY_TURNS};
pub use layer::{CacheLayer, CacheService};
pub use memory::{ExactCache, ExactCacheBuilder};
#[cfg(feature = "redis")]
pub use redis::RedisCache;
pub use semantic::{
    CacheEvent, CacheHook, CacheStats, ConversationMatching, DEFAULT_THRESHOLD, JudgedPair,
    SemanticCache, SemanticCacheBuilder,
};

/// The embedder over an OpenAI-compatible `/v1/embeddings` endpoint (defined with the
/// provider it calls).
pub use crate::provider::OpenAiEmbedder;

use crate::Result;
use crate::types::ChatResponse;

/// How far a cached answer may travel between tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Any request may be served any answer with the same key.
    Global,
    /// Answers stay within an organisation (the default). Requests without an org share
    /// one partition of their own.
    #[default]
    Org,
    /// Answers stay with one user. Requests without a user are not cached.
    User,
}

/// An answer read from a cache.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CachedAnswer {
    /// The response as it was first served (its usage and cost are what the hit saves).
    pub response: ChatResponse,
    /// 1.0 for an exact match, the similarity for a semantic one.
    pub similarity: f32,
}

impl CachedAnswer {
    /// An exact-match answer.
    pub fn exact(response: ChatResponse) -> Self {
        CachedAnswer {
            response,
            similarity: 1.0,
        }
    }

    /// A semantic answer served at `similarity`, for a [`Cache`] of your own (on a
    /// vector database, say). The similarity is a cosine: a number in [-1, 1] (1.0 for
    /// an exact match); anything else, NaN included, is refused.
    ///
    /// ```
    /// use tokenwise::cache::CachedAnswer;
    /// use tokenwise::{ChatResponse, FinishReason, Usage};
    ///
    /// let response = ChatResponse::new("Paris.", "m", "p", Usage::new(5, 2), FinishReason::Stop);
    /// let hit = CachedAnswer::new(response.clone(), 0.93)?;
    /// assert_eq!(hit.similarity, 0.93);
    /// assert!(CachedAnswer::new(response, f32::NAN).is_err());
    /// # Ok::<(), tokenwise::Error>(())
    /// ```
    pub fn new(response: ChatResponse, similarity: f32) -> crate::Result<Self> {
        if !(-1.0..=1.0).contains(&similarity) {
            return Err(crate::Error::InvalidRequest(format!(
                "cached answer: a similarity must be in [-1, 1], got {similarity}"
            )));
        }
        Ok(CachedAnswer {
            response,
            similarity,
        })
    }
}

/// What a lookup found: an answer, and the best candidate a guard refused, if any.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct CacheLookup {
    /// The answer to serve.
    pub answer: Option<CachedAnswer>,
    /// A semantic candidate above the threshold that a guard refused (reported even
    /// when a later candidate was served).
    pub rejected: Option<GuardRejection>,
}

impl CacheLookup {
    /// A lookup that found `answer` and refused nothing.
    pub fn found(answer: Option<CachedAnswer>) -> Self {
        CacheLookup {
            answer,
            rejected: None,
        }
    }
}

/// What to remove from a cache.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// One entry.
    Key(CacheKey),
    /// Every entry of a namespace.
    Namespace(String),
    /// Every entry carrying a tag.
    Tag(String),
    /// Everything.
    All,
}

/// Whether `response` may be stored: complete answers only (finish reason `stop` or
/// `tool_calls`), never length-truncated or filtered ones, never an empty answer.
pub fn is_cacheable(response: &ChatResponse) -> bool {
    response.finish_reason.is_complete()
        && (!response.content.is_empty() || !response.tool_calls.is_empty())
}

/// Stores and finds answers.
///
/// The pipeline calls [`get`](Self::get) before any budget is spent and
/// [`put`](Self::put) only for answers that pass [`is_cacheable`]. Errors from a cache
/// are logged and treated as a miss: a broken cache slows a pipeline, never stops it.
///
/// # Implementing
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use async_trait::async_trait;
/// use tokenwise::cache::{Cache, CacheKey, CacheQuery, CachedAnswer, Invalidation};
/// use tokenwise::ChatResponse;
///
/// /// Unbounded and without TTL: fine for a test, not for production.
/// #[derive(Debug, Default)]
/// struct MapCache(Mutex<HashMap<CacheKey, ChatResponse>>);
///
/// #[async_trait]
/// impl Cache for MapCache {
///     async fn get(&self, q: &CacheQuery) -> tokenwise::Result<Option<CachedAnswer>> {
///         Ok(self.0.lock().unwrap().get(&q.key).cloned().map(CachedAnswer::exact))
///     }
///     async fn put(&self, q: &CacheQuery, response: &ChatResponse) -> tokenwise::Result<()> {
///         self.0.lock().unwrap().insert(q.key, response.clone());
///         Ok(())
///     }
///     async fn invalidate(&self, what: &Invalidation) -> tokenwise::Result<u64> {
///         let mut map = self.0.lock().unwrap();
///         let n = map.len() as u64;
///         match what {
///             Invalidation::Key(k) => Ok(map.remove(k).map_or(0, |_| 1)),
///             _ => { map.clear(); Ok(n) }
///         }
///     }
/// }
/// ```
#[async_trait]
pub trait Cache: Send + Sync + fmt::Debug {
    /// The answer stored for `query`, if any and still fresh.
    async fn get(&self, query: &CacheQuery) -> Result<Option<CachedAnswer>>;

    /// Like [`get`](Self::get), also reporting a semantic candidate that a guard
    /// refused. The pipeline calls this one; the default wraps `get`.
    async fn lookup(&self, query: &CacheQuery) -> Result<CacheLookup> {
        Ok(CacheLookup::found(self.get(query).await?))
    }

    /// Stores `response` for `query` (with the query's TTL and tags).
    async fn put(&self, query: &CacheQuery, response: &ChatResponse) -> Result<()>;

    /// Removes entries; returns how many.
    async fn invalidate(&self, what: &Invalidation) -> Result<u64>;

    /// Whether this cache reads more of a query than its exact key, partition,
    /// namespace, TTL and tags: the [`context_key`](CacheQuery::context_key), the
    /// [`base_key`](CacheQuery::base_key), the
    /// [`final_user_text`](CacheQuery::final_user_text) or the
    /// [`history`](CacheQuery::history), as a semantic cache does. The default says it
    /// does. A cache that answers by the exact key alone may say it does not: the
    /// pipeline then skips working them out (two digests and a copy of the user turns
    /// per request) and hands it queries whose `context_key` and `base_key` equal
    /// `key` and whose `final_user_text` and `history` are `None`.
    fn reads_context(&self) -> bool {
        true
    }

    /// What [`lookup`](Self::lookup) would return, found at once, for a cache that never
    /// waits to answer (one in memory); `None`, the default, has the caller await
    /// `lookup` instead. The pipeline asks this first, which spares it a boxed future
    /// per request. An override must find exactly what `lookup` finds.
    fn lookup_ready(&self, query: &CacheQuery) -> Option<Result<CacheLookup>> {
        let _ = query;
        None
    }

    /// What [`put`](Self::put) would return, stored at once; `None`, the default, has
    /// the caller await `put` (see [`lookup_ready`](Self::lookup_ready)). An override
    /// that returns `Some` has stored the answer; one that returns `None` has done
    /// nothing.
    fn put_ready(&self, query: &CacheQuery, response: &ChatResponse) -> Option<Result<()>> {
        let _ = (query, response);
        None
    }

    /// An answer for `query` that expired at most `max_stale` ago, for when every
    /// provider is down. The default keeps no stale entries and finds none.
    async fn get_stale(
        &self,
        query: &CacheQuery,
        max_stale: Duration,
    ) -> Result<Option<CachedAnswer>> {
        let _ = (query, max_stale);
        Ok(None)
    }
}

/// Default time to live of a cached answer.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
