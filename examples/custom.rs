//! Your own parts in a pipeline: a cache and a router written here, plugged into
//! `Pipeline::builder()` in place of the defaults.
//!
//! - `TtlCache`: a bounded map with a time to live per entry, on the pipeline's clock
//!   (a file-backed or Redis store would implement the same four methods).
//! - `TierRouter`: free users get the small model; everyone else the large one, and a
//!   long prompt goes to the large one whatever the tier, with the small model as its
//!   fallback.
//!
//! Run with `cargo run --example custom`. Offline: the simulated provider answers. It
//! checks what it prints and exits 1 if the parts did not behave.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokenwise::cache::{Cache, CacheKey, CacheQuery, CachedAnswer, Invalidation};
use tokenwise::provider::SimulatedProvider;
use tokenwise::router::{RoutePlan, Router};
use tokenwise::{Catalog, ChatRequest, ChatResponse, Clock, Pipeline, Tier, Timestamp, TokioClock};

/// A cache of at most `capacity` answers, each kept for `ttl`; the oldest entry goes
/// first when it is full.
#[derive(Debug)]
struct TtlCache {
    clock: Arc<dyn Clock>,
    ttl: Duration,
    capacity: usize,
    inner: Mutex<TtlMap>,
}

#[derive(Debug, Default)]
struct TtlMap {
    entries: HashMap<CacheKey, (Timestamp, ChatResponse, String)>,
    order: VecDeque<CacheKey>,
}

impl TtlCache {
    fn new(clock: Arc<dyn Clock>, ttl: Duration, capacity: usize) -> Self {
        TtlCache {
            clock,
            ttl,
            capacity,
            inner: Mutex::new(TtlMap::default()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, TtlMap> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Cache for TtlCache {
    async fn get(&self, q: &CacheQuery) -> tokenwise::Result<Option<CachedAnswer>> {
        let now = self.clock.now();
        let mut map = self.map();
        match map.entries.get(&q.key) {
            Some((expires, response, _)) if now < *expires => {
                Ok(Some(CachedAnswer::exact(response.clone())))
            }
            Some(_) => {
                map.entries.remove(&q.key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn put(&self, q: &CacheQuery, response: &ChatResponse) -> tokenwise::Result<()> {
        let ttl = q.ttl.unwrap_or(self.ttl);
        let expires = self.clock.now().saturating_add(ttl);
        let mut map = self.map();
        if !map.entries.contains_key(&q.key) {
            while map.entries.len() >= self.capacity {
                let Some(oldest) = map.order.pop_front() else {
                    break;
                };
                map.entries.remove(&oldest);
            }
            map.order.push_back(q.key);
        }
        map.entries
            .insert(q.key, (expires, response.clone(), q.namespace.clone()));
        Ok(())
    }

    async fn invalidate(&self, what: &Invalidation) -> tokenwise::Result<u64> {
        let mut map = self.map();
        let before = map.entries.len();
        match what {
            Invalidation::Key(k) => {
                map.entries.remove(k);
            }
            Invalidation::Namespace(ns) => map.entries.retain(|_, (_, _, n)| n != ns),
            // This cache keeps no tags: a tag drops everything, which is never wrong.
            _ => map.entries.clear(),
        }
        let TtlMap { entries, order } = &mut *map;
        order.retain(|k| entries.contains_key(k));
        Ok((before - map.entries.len()) as u64)
    }
}

/// Free users get the small model; paying users the large one; a prompt longer than
/// `long_prompt` characters goes to the large model whatever the tier, falling back to
/// the small one.
#[derive(Debug)]
struct TierRouter {
    small: &'static str,
    large: &'static str,
    long_prompt: usize,
}

impl Router for TierRouter {
    fn route(&self, req: &ChatRequest, catalog: &Catalog) -> tokenwise::Result<RoutePlan> {
        let prompt: usize = req.messages.iter().map(|m| m.content.len()).sum();
        let targets = if prompt > self.long_prompt {
            vec![self.large, self.small]
        } else if req.meta.tier == Tier::Free {
            vec![self.small]
        } else {
            vec![self.large, self.small]
        };
        let targets = targets
            .into_iter()
            .map(|name| catalog.require(name).cloned())
            .collect::<tokenwise::Result<Vec<_>>>()?;
        Ok(RoutePlan::new(targets))
    }
}

fn check(ok: bool, what: &str) {
    if ok {
        println!("ok    {what}");
    } else {
        println!("FAIL  {what}");
        std::process::exit(1);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> tokenwise::Result<()> {
    tokio::time::pause(); // simulated latency passes at once
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
    let cache = Arc::new(TtlCache::new(
        Arc::clone(&clock),
        Duration::from_secs(60),
        100,
    ));
    let provider = SimulatedProvider::new();
    let pipeline = Pipeline::builder()
        .provider(provider.clone())
        .clock(Arc::clone(&clock))
        .cache(cache.clone())
        .router(Arc::new(TierRouter {
            small: "gpt-4o-mini",
            large: "gpt-4o",
            long_prompt: 2_000,
        }))
        .build()?;

    let free = |text: &str| ChatRequest::user_text(text).user("fay").tier(Tier::Free);
    let premium = |text: &str| ChatRequest::user_text(text).user("pat").tier(Tier::Premium);

    let a = pipeline.chat(free("What is a token bucket?")).await?;
    println!("free user      -> {} ({})", a.model, a.cost);
    check(a.model == "gpt-4o-mini", "a free user gets the small model");

    let b = pipeline.chat(premium("What is a token bucket?")).await?;
    println!("premium user   -> {} ({})", b.model, b.cost);
    check(b.model == "gpt-4o", "a premium user gets the large model");
    check(
        !b.served.is_cache_hit(),
        "the free user's cached answer is not served to the premium user (keyed by the routed model's tier)",
    );

    let long = "Summarise this contract. ".repeat(120);
    let c = pipeline.chat(free(&long)).await?;
    println!("long prompt    -> {}", c.model);
    check(c.model == "gpt-4o", "a long prompt goes to the large model");

    let again = pipeline.chat(free("What is a token bucket?")).await?;
    check(
        again.served.is_cache_hit(),
        "the repeat is served from the custom cache",
    );
    check(again.cost.is_zero(), "a hit costs nothing");

    tokio::time::advance(Duration::from_secs(61)).await;
    let later = pipeline.chat(free("What is a token bucket?")).await?;
    check(
        !later.served.is_cache_hit(),
        "past its TTL the entry is gone",
    );

    // (lookups drop the expired entries they meet, so count what is left)
    let stored = cache.map().entries.len();
    let dropped = pipeline.invalidate(&Invalidation::All).await?;
    check(
        stored > 0 && dropped == stored as u64 && cache.map().entries.is_empty(),
        "invalidation reaches the custom cache",
    );
    println!(
        "provider calls: {}, requests: {}",
        provider.calls(),
        pipeline.usage().totals.requests
    );
    check(
        provider.calls() == 4,
        "four calls reached the provider, one was cached",
    );
    Ok(())
}
