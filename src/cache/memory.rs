//! The in-memory exact-match cache.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use lru::LruCache;

use super::{Cache, CacheKey, CacheQuery, CachedAnswer, DEFAULT_TTL, Invalidation};
use crate::clock::{Clock, Timestamp, default_clock};
use crate::types::ChatResponse;
use crate::{Error, Result};

#[derive(Debug)]
struct Entry {
    response: ChatResponse,
    expires_at: Timestamp,
    namespace: String,
    tags: Vec<String>,
}

/// Builds an [`ExactCache`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ExactCacheBuilder {
    capacity: usize,
    ttl: Duration,
    namespace_ttl: HashMap<String, Duration>,
    keep_stale: Duration,
    clock: Option<Arc<dyn Clock>>,
}

impl ExactCacheBuilder {
    /// Keeps expired entries this long (while capacity allows) so that
    /// [`Cache::get_stale`] can serve them when every provider is down (default: none).
    pub fn keep_stale_for(mut self, d: Duration) -> Self {
        self.keep_stale = d;
        self
    }

    /// The most entries kept (default 10,000); the least recently used is evicted first.
    pub fn max_entries(mut self, n: usize) -> Self {
        self.capacity = n;
        self
    }

    /// The default time to live (default one hour).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The time to live of entries in `namespace`.
    pub fn namespace_ttl(mut self, namespace: impl Into<String>, ttl: Duration) -> Self {
        self.namespace_ttl.insert(namespace.into(), ttl);
        self
    }

    /// The clock TTLs are measured on (default: [`TokioClock`](crate::TokioClock)).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the cache; a zero capacity or TTL is a configuration error.
    pub fn build(self) -> Result<ExactCache> {
        let cap = NonZeroUsize::new(self.capacity)
            .ok_or_else(|| Error::Config("exact cache: max_entries must be at least 1".into()))?;
        if self.ttl.is_zero() || self.namespace_ttl.values().any(Duration::is_zero) {
            return Err(Error::Config("exact cache: a TTL must be positive".into()));
        }
        Ok(ExactCache {
            entries: Arc::new(Mutex::new(LruCache::new(cap))),
            ttl: self.ttl,
            namespace_ttl: Arc::new(self.namespace_ttl),
            keep_stale: self.keep_stale,
            clock: self.clock.unwrap_or_else(default_clock),
        })
    }
}

/// An in-memory exact-match cache: a bounded LRU map from [`CacheKey`] to answer, with
/// a TTL per entry (request TTL, else the namespace's, else the default) checked on the
/// injectable clock, and invalidation by key, namespace or tag.
///
/// Cheap to clone; clones share entries.
///
/// ```
/// use std::time::Duration;
/// use tokenwise::cache::ExactCache;
/// let cache = ExactCache::builder()
///     .max_entries(50_000)
///     .ttl(Duration::from_secs(600))
///     .namespace_ttl("faq", Duration::from_secs(86_400))
///     .build()
///     .unwrap();
/// assert_eq!(cache.len(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct ExactCache {
    entries: Arc<Mutex<LruCache<CacheKey, Entry>>>,
    ttl: Duration,
    namespace_ttl: Arc<HashMap<String, Duration>>,
    keep_stale: Duration,
    clock: Arc<dyn Clock>,
}

impl ExactCache {
    /// A builder with the defaults: 10,000 entries, one hour TTL.
    pub fn builder() -> ExactCacheBuilder {
        ExactCacheBuilder {
            capacity: 10_000,
            ttl: DEFAULT_TTL,
            namespace_ttl: HashMap::new(),
            keep_stale: Duration::ZERO,
            clock: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, LruCache<CacheKey, Entry>> {
        // A panic while holding the lock cannot leave an entry half-written (every
        // mutation is a single LruCache call), so a poisoned map is still consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries held, expired ones not yet removed included.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The time to live an answer stored for `query` gets: the request's, else its
    /// namespace's, else the default.
    pub fn ttl_of(&self, query: &CacheQuery) -> Duration {
        self.ttl_for(query)
    }

    fn ttl_for(&self, query: &CacheQuery) -> Duration {
        query
            .ttl
            .or_else(|| self.namespace_ttl.get(&query.namespace).copied())
            .unwrap_or(self.ttl)
    }

    /// Synchronous lookup, for callers without an executor.
    pub fn get_now(&self, query: &CacheQuery) -> Option<CachedAnswer> {
        let now = self.clock.now();
        let mut map = self.lock();
        match map.get(&query.key) {
            Some(e) if e.expires_at > now => Some(CachedAnswer::exact(e.response.clone())),
            Some(e) => {
                // Expired: kept a while for stale serving, then dropped on read.
                if e.expires_at.saturating_add(self.keep_stale) <= now {
                    map.pop(&query.key);
                }
                None
            }
            None => None,
        }
    }

    /// Synchronous stale lookup: an entry that expired at most `max_stale` ago (and is
    /// still kept; see [`ExactCacheBuilder::keep_stale_for`]).
    pub fn get_stale_now(&self, query: &CacheQuery, max_stale: Duration) -> Option<CachedAnswer> {
        let now = self.clock.now();
        let mut map = self.lock();
        let e = map.get(&query.key)?;
        (e.expires_at.saturating_add(max_stale.min(self.keep_stale)) > now || e.expires_at > now)
            .then(|| CachedAnswer::exact(e.response.clone()))
    }

    /// The fresh answer stored under `key`, marking it recently used.
    pub(crate) fn get_key(&self, key: &CacheKey) -> Option<ChatResponse> {
        let now = self.clock.now();
        let mut map = self.lock();
        map.get(key)
            .filter(|e| e.expires_at > now)
            .map(|e| e.response.clone())
    }

    /// Whether a fresh answer is stored under `key` (without marking it used).
    pub(crate) fn is_live(&self, key: &CacheKey) -> bool {
        let now = self.clock.now();
        self.lock().peek(key).is_some_and(|e| e.expires_at > now)
    }

    /// Synchronous insert. Answers that fail [`is_cacheable`](super::is_cacheable)
    /// (errors never reach here; truncated, filtered or empty answers do) are ignored.
    pub fn put_now(&self, query: &CacheQuery, response: &ChatResponse) {
        let ttl = self.ttl_for(query);
        if ttl.is_zero() || !super::is_cacheable(response) {
            return;
        }
        let entry = Entry {
            response: response.clone(),
            expires_at: self.clock.now().saturating_add(ttl),
            namespace: query.namespace.clone(),
            tags: query.tags.clone(),
        };
        self.lock().put(query.key, entry);
    }

    /// Synchronous invalidation; returns how many entries were removed.
    pub fn invalidate_now(&self, what: &Invalidation) -> u64 {
        let mut map = self.lock();
        let doomed: Vec<CacheKey> = match what {
            Invalidation::Key(k) => return u64::from(map.pop(k).is_some()),
            Invalidation::All => {
                let n = map.len() as u64;
                map.clear();
                return n;
            }
            Invalidation::Namespace(ns) => map
                .iter()
                .filter(|(_, e)| &e.namespace == ns)
                .map(|(k, _)| *k)
                .collect(),
            Invalidation::Tag(tag) => map
                .iter()
                .filter(|(_, e)| e.tags.iter().any(|t| t == tag))
                .map(|(k, _)| *k)
                .collect(),
        };
        for k in &doomed {
            map.pop(k);
        }
        doomed.len() as u64
    }
}

#[async_trait]
impl Cache for ExactCache {
    async fn get(&self, query: &CacheQuery) -> Result<Option<CachedAnswer>> {
        Ok(self.get_now(query))
    }

    async fn put(&self, query: &CacheQuery, response: &ChatResponse) -> Result<()> {
        self.put_now(query, response);
        Ok(())
    }

    async fn invalidate(&self, what: &Invalidation) -> Result<u64> {
        Ok(self.invalidate_now(what))
    }

    async fn get_stale(
        &self,
        query: &CacheQuery,
        max_stale: Duration,
    ) -> Result<Option<CachedAnswer>> {
        Ok(self.get_stale_now(query, max_stale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheScope;
    use crate::clock::ManualClock;
    use crate::types::{ChatRequest, FinishReason, Usage};

    fn resp(text: &str) -> ChatResponse {
        ChatResponse::new(text, "m", "p", Usage::new(10, 5), FinishReason::Stop)
    }

    fn query(text: &str) -> CacheQuery {
        CacheQuery::for_request(&ChatRequest::user_text(text), CacheScope::Global).unwrap()
    }

    #[test]
    fn ttl_expiry_on_the_clock() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let cache = ExactCache::builder()
            .ttl(Duration::from_secs(60))
            .namespace_ttl("long", Duration::from_secs(600))
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let q = query("a");
        let long = CacheQuery::for_request(
            &ChatRequest::user_text("a").cache_namespace("long"),
            CacheScope::Global,
        )
        .unwrap();
        let short = CacheQuery::for_request(
            &ChatRequest::user_text("b").cache_ttl(Duration::from_secs(5)),
            CacheScope::Global,
        )
        .unwrap();
        cache.put_now(&q, &resp("A"));
        cache.put_now(&long, &resp("L"));
        cache.put_now(&short, &resp("S"));
        clock.advance(Duration::from_secs(5));
        assert!(cache.get_now(&short).is_none(), "request TTL wins");
        clock.advance(Duration::from_secs(54));
        assert_eq!(cache.get_now(&q).unwrap().response.content, "A");
        clock.advance(Duration::from_secs(1));
        assert!(cache.get_now(&q).is_none(), "expired exactly at 60 s");
        assert!(cache.get_now(&long).is_some(), "namespace TTL is longer");
        assert_eq!(cache.len(), 1, "expired entries are removed on read");
    }

    #[test]
    fn capacity_evicts_least_recently_used() {
        let cache = ExactCache::builder().max_entries(2).build().unwrap();
        cache.put_now(&query("a"), &resp("A"));
        cache.put_now(&query("b"), &resp("B"));
        assert!(cache.get_now(&query("a")).is_some());
        cache.put_now(&query("c"), &resp("C"));
        assert_eq!(cache.len(), 2);
        assert!(cache.get_now(&query("b")).is_none());
        assert!(cache.get_now(&query("a")).is_some());
    }

    #[test]
    fn invalidation_by_key_namespace_and_tag() {
        let cache = ExactCache::builder().build().unwrap();
        let tagged = CacheQuery::for_request(
            &ChatRequest::user_text("t").cache_tag("prices"),
            CacheScope::Global,
        )
        .unwrap();
        let ns = CacheQuery::for_request(
            &ChatRequest::user_text("n").cache_namespace("faq"),
            CacheScope::Global,
        )
        .unwrap();
        cache.put_now(&tagged, &resp("T"));
        cache.put_now(&ns, &resp("N"));
        cache.put_now(&query("k"), &resp("K"));
        assert_eq!(cache.invalidate_now(&Invalidation::Tag("prices".into())), 1);
        assert_eq!(
            cache.invalidate_now(&Invalidation::Namespace("faq".into())),
            1
        );
        assert_eq!(cache.invalidate_now(&Invalidation::Key(query("k").key)), 1);
        assert!(cache.is_empty());
        assert!(ExactCache::builder().max_entries(0).build().is_err());
    }
}
