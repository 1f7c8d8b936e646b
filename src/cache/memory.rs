//! The in-memory exact-match cache.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use lru::LruCache;

use super::{
    BuildKeyHasher, Cache, CacheKey, CacheLookup, CacheQuery, CachedAnswer, DEFAULT_TTL,
    Invalidation,
};
use crate::clock::{Clock, Timestamp, default_clock};
use crate::types::ChatResponse;
use crate::{Error, Result};

/// One shard: an LRU map from digest to entry (digests hashed by their bytes).
type Shard = LruCache<CacheKey, Entry, BuildKeyHasher>;

#[derive(Debug)]
struct Entry {
    response: ChatResponse,
    expires_at: Timestamp,
    namespace: String,
    tags: Vec<String>,
}

impl Entry {
    /// Makes this entry `response`'s, stored for `query` until `expires_at`, reusing
    /// the buffers of its strings.
    fn refill(&mut self, query: &CacheQuery, response: &ChatResponse, expires_at: Timestamp) {
        // Every field, named: a field added to `ChatResponse` fails to compile here
        // until it is copied too.
        let ChatResponse {
            content,
            tool_calls,
            model,
            provider,
            usage,
            finish_reason,
            cost,
            served,
            guard_rejected,
        } = response;
        let r = &mut self.response;
        r.content.clone_from(content);
        r.tool_calls.clone_from(tool_calls);
        r.model.clone_from(model);
        r.provider.clone_from(provider);
        r.usage = *usage;
        r.finish_reason.clone_from(finish_reason);
        r.cost = *cost;
        r.served.clone_from(served);
        r.guard_rejected.clone_from(guard_rejected);
        self.expires_at = expires_at;
        self.namespace.clone_from(&query.namespace);
        self.tags.clone_from(&query.tags);
    }
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

    /// The clock TTLs are measured on (default: [`TscClock`](crate::TscClock), or [`TokioClock`](crate::TokioClock) when built under paused tokio time; see [`clock`](crate::clock)).
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
        // One shard per 4,096 entries, at most 16: small caches stay one exact LRU;
        // large ones are shared by many threads, which then rarely wait for each other.
        let shards = (cap.get() / 4_096).clamp(1, 16);
        let entries = (0..shards)
            .map(|i| {
                let share = cap.get() / shards + usize::from(i < cap.get() % shards);
                Mutex::new(LruCache::with_hasher(
                    NonZeroUsize::new(share).unwrap_or(NonZeroUsize::MIN),
                    BuildKeyHasher::default(),
                ))
            })
            .collect();
        Ok(ExactCache {
            entries: Arc::new(entries),
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
/// A cache of more than 8,191 entries is split into up to 16 shards by key, each an
/// LRU of its share of the capacity, so that concurrent requests rarely wait on one
/// lock; eviction is then least recently used within a shard. Evicted answers are
/// dropped after the lock is released.
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
    entries: Arc<Vec<Mutex<Shard>>>,
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

    /// The shard holding `key` (digests are uniform, so their first bytes pick it).
    fn lock(&self, key: &CacheKey) -> MutexGuard<'_, Shard> {
        let b = key.as_bytes();
        let h = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let i = (h % self.entries.len().max(1) as u64) as usize;
        lock(&self.entries[i])
    }

    /// Entries held, expired ones not yet removed included.
    pub fn len(&self) -> usize {
        self.entries.iter().map(|m| lock(m).len()).sum()
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
        let mut map = self.lock(&query.key);
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
        let mut map = self.lock(&query.key);
        let e = map.get(&query.key)?;
        (e.expires_at.saturating_add(max_stale.min(self.keep_stale)) > now || e.expires_at > now)
            .then(|| CachedAnswer::exact(e.response.clone()))
    }

    /// The fresh answer stored under `key`, marking it recently used.
    pub(crate) fn get_key(&self, key: &CacheKey) -> Option<ChatResponse> {
        let now = self.clock.now();
        let mut map = self.lock(key);
        map.get(key)
            .filter(|e| e.expires_at > now)
            .map(|e| e.response.clone())
    }

    /// Whether a fresh answer is stored under `key` (without marking it used).
    pub(crate) fn is_live(&self, key: &CacheKey) -> bool {
        let now = self.clock.now();
        self.lock(key).peek(key).is_some_and(|e| e.expires_at > now)
    }

    /// Synchronous insert. Answers that fail [`is_cacheable`](super::is_cacheable)
    /// (errors never reach here; truncated, filtered or empty answers do) are ignored.
    pub fn put_now(&self, query: &CacheQuery, response: &ChatResponse) {
        let ttl = self.ttl_for(query);
        if ttl.is_zero() || !super::is_cacheable(response) {
            return;
        }
        let expires_at = self.clock.now().saturating_add(ttl);
        // The entry this one will evict, taken out first so that its memory (last
        // touched long ago) is written over rather than freed, and the new answer
        // copied outside the lock. Between the two locks, a concurrent store into the
        // same full shard may take out an entry of its own: the shard is then one
        // under its capacity until the next store (never over it: `push` evicts by
        // itself when full), and an entry is evicted early, as LRU order allows.
        let spare = {
            let mut map = self.lock(&query.key);
            if map.len() >= map.cap().get() && !map.contains(&query.key) {
                map.pop_lru().map(|(_, e)| e)
            } else {
                None
            }
        };
        let entry = match spare {
            Some(mut e) => {
                e.refill(query, response, expires_at);
                e
            }
            None => Entry {
                response: response.clone(),
                expires_at,
                namespace: query.namespace.clone(),
                tags: query.tags.clone(),
            },
        };
        let evicted = self.lock(&query.key).push(query.key, entry);
        drop(evicted); // outside the lock
    }

    /// Synchronous invalidation; returns how many entries were removed.
    pub fn invalidate_now(&self, what: &Invalidation) -> u64 {
        match what {
            Invalidation::Key(k) => u64::from(self.lock(k).pop(k).is_some()),
            Invalidation::All => self
                .entries
                .iter()
                .map(|shard| {
                    let mut map = lock(shard);
                    let n = map.len() as u64;
                    map.clear();
                    n
                })
                .sum(),
            Invalidation::Namespace(ns) => self.remove_where(|e| &e.namespace == ns),
            Invalidation::Tag(tag) => self.remove_where(|e| e.tags.iter().any(|t| t == tag)),
        }
    }

    /// Removes every entry `doomed` picks, shard by shard; returns how many.
    fn remove_where(&self, doomed: impl Fn(&Entry) -> bool) -> u64 {
        let mut removed = 0u64;
        for shard in self.entries.iter() {
            let mut map = lock(shard);
            let keys: Vec<CacheKey> = map
                .iter()
                .filter(|(_, e)| doomed(e))
                .map(|(k, _)| *k)
                .collect();
            for k in &keys {
                map.pop(k);
            }
            removed += keys.len() as u64;
        }
        removed
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding the lock cannot leave an entry half-written (every
    // mutation is a single LruCache call), so a poisoned map is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Cache for ExactCache {
    /// An exact cache answers by the exact key alone.
    fn reads_context(&self) -> bool {
        false
    }

    async fn get(&self, query: &CacheQuery) -> Result<Option<CachedAnswer>> {
        Ok(self.get_now(query))
    }

    /// What `get` finds, in one future (the default would wrap `get`'s).
    async fn lookup(&self, query: &CacheQuery) -> Result<CacheLookup> {
        Ok(CacheLookup::found(self.get_now(query)))
    }

    async fn put(&self, query: &CacheQuery, response: &ChatResponse) -> Result<()> {
        self.put_now(query, response);
        Ok(())
    }

    fn lookup_ready(&self, query: &CacheQuery) -> Option<Result<CacheLookup>> {
        Some(Ok(CacheLookup::found(self.get_now(query))))
    }

    fn put_ready(&self, query: &CacheQuery, response: &ChatResponse) -> Option<Result<()>> {
        self.put_now(query, response);
        Some(Ok(()))
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
    fn ready_paths_store_and_find_what_the_futures_do() {
        use futures_util::FutureExt;
        let cache = ExactCache::builder().build().unwrap();
        let (a, b) = (query("a"), query("b"));
        let ready = |q: &CacheQuery| cache.lookup_ready(q).unwrap().unwrap().answer;
        let awaited = |q: &CacheQuery| cache.lookup(q).now_or_never().unwrap().unwrap().answer;
        assert!(ready(&a).is_none() && awaited(&a).is_none());
        cache.put_ready(&a, &resp("first")).unwrap().unwrap();
        cache
            .put(&b, &resp("second"))
            .now_or_never()
            .unwrap()
            .unwrap();
        for q in [&a, &b] {
            let (r, w) = (ready(q).unwrap(), awaited(q).unwrap());
            assert_eq!(r.response.content, w.response.content);
        }
        assert_eq!(ready(&a).unwrap().response.content, "first");
        assert_eq!(ready(&b).unwrap().response.content, "second");
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
    fn an_evicted_entrys_slot_holds_the_new_answer_whole() {
        // Each answer differs from the one whose slot it takes in every field that owns
        // memory (longer and shorter texts, tool calls or none, other namespaces and
        // tags), so a field copied badly or kept from the old answer shows.
        let answer = |i: usize| {
            let calls = (0..i % 3)
                .map(|k| crate::types::ToolCall {
                    id: format!("call-{i}-{k}"),
                    name: "n".repeat(1 + (i + k) % 9),
                    arguments: format!("{{\"i\":{i}}}"),
                })
                .collect();
            let mut r = ChatResponse::new(
                "answer ".repeat(1 + i % 13),
                format!("model-{}", "m".repeat(i % 5)),
                "p".repeat(1 + i % 4),
                Usage::new(i as u64, 2 * i as u64),
                if i.is_multiple_of(3) {
                    FinishReason::ToolCalls
                } else {
                    FinishReason::Stop
                },
            )
            .with_tool_calls(calls);
            r.cost = crate::Cost::from_nanos(i as u64);
            r
        };
        let asked = |i: usize| {
            let mut req = ChatRequest::user_text(format!("question {i}"))
                .cache_namespace(format!("ns{}", i % 4));
            for t in 0..i % 3 {
                req = req.cache_tag(format!("tag{t}-{}", i % 5));
            }
            CacheQuery::for_request(&req, CacheScope::Global).unwrap()
        };
        let cache = ExactCache::builder().max_entries(3).build().unwrap();
        for i in 0..30 {
            cache.put_now(&asked(i), &answer(i));
            assert!(cache.len() <= 3);
            for j in i.saturating_sub(2)..=i {
                let got = cache.get_now(&asked(j)).expect("one of the last three");
                assert_eq!(got.response, answer(j), "answer {j} after {i}");
            }
            if i >= 3 {
                assert!(cache.get_now(&asked(i - 3)).is_none());
            }
        }
        // namespaces and tags are the new answers': invalidation finds them
        assert_eq!(
            cache.invalidate_now(&Invalidation::Namespace("ns1".into())),
            1 // 29 (27 and 28 are in ns3 and ns0)
        );
        assert!(cache.get_now(&asked(29)).is_none());
        assert_eq!(cache.invalidate_now(&Invalidation::Tag("tag0-4".into())), 0); // 29's, gone
        assert_eq!(cache.invalidate_now(&Invalidation::Tag("tag0-3".into())), 1); // 28
        assert_eq!(
            cache.invalidate_now(&Invalidation::Namespace("ns3".into())),
            1
        ); // 27
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_sharded_cache_keeps_its_bound_and_invalidates_every_shard() {
        let cache = ExactCache::builder().max_entries(20_000).build().unwrap();
        assert_eq!(cache.entries.len(), 4);
        for i in 0..30_000 {
            let tagged = CacheQuery::for_request(
                &ChatRequest::user_text(format!("q{i}")).cache_tag(if i % 2 == 0 {
                    "even"
                } else {
                    "odd"
                }),
                CacheScope::Global,
            )
            .unwrap();
            cache.put_now(&tagged, &resp("A"));
        }
        assert_eq!(cache.len(), 20_000, "each shard full, none over its share");
        let even = cache.invalidate_now(&Invalidation::Tag("even".into()));
        assert!((9_000..=11_000).contains(&even), "{even}");
        assert_eq!(cache.len() as u64, 20_000 - even);
        assert_eq!(cache.invalidate_now(&Invalidation::All), 20_000 - even);
        assert!(cache.is_empty());
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
