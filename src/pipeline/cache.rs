//! The cache stage: an exact (or semantic) hit returns here, spending no budget and no
//! token quota; a complete answer is stored when the request settles; a stale answer
//! may stand in when every target is down.

use super::{Inner, Plan};
use crate::cache::{CacheQuery, is_cacheable};
use crate::types::{ChatResponse, Cost, Served};

/// A stored answer as a response served from the cache: what it saved (its original
/// usage and cost) is reported and it costs nothing. The one conversion used by cache
/// hits, stale answers and single-flight followers.
pub(super) fn served_from_cache(mut r: ChatResponse, similarity: f32) -> ChatResponse {
    r.served = Served::Cache {
        similarity,
        saved_tokens: r.usage.total(),
        saved_cost: r.cost,
    };
    r.cost = Cost::ZERO;
    r
}

impl Inner {
    pub(super) async fn cache_get(&self, plan: &mut Plan) -> Option<ChatResponse> {
        let (cache, q) = (self.cache.as_ref()?, plan.cache.as_ref()?);
        if !plan.cache_read {
            return None; // `refresh`: skip the read, still write
        }
        match cache.lookup(q).await {
            Ok(found) => {
                plan.guard_rejected = found.rejected;
                let hit = found.answer?;
                let mut r = served_from_cache(hit.response, hit.similarity);
                r.guard_rejected = plan.guard_rejected.take();
                Some(r)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cache read failed; treated as a miss");
                None
            }
        }
    }

    pub(super) async fn cache_put(&self, q: &CacheQuery, response: &ChatResponse) {
        let Some(cache) = &self.cache else { return };
        if !is_cacheable(response) {
            return;
        }
        if let Err(e) = cache.put(q, response).await {
            tracing::warn!(error = %e, "cache write failed");
        }
    }

    /// A stale cached answer for a request every target failed with a retryable
    /// error, if the policy allows one.
    pub(super) async fn stale(&self, plan: &Plan, e: &crate::Error) -> Option<ChatResponse> {
        let (max_stale, cache, q) = (
            self.serve_stale?,
            self.cache.as_ref()?,
            plan.cache.as_ref()?,
        );
        if !e.is_retryable() {
            return None;
        }
        match cache.get_stale(q, max_stale).await {
            Ok(Some(hit)) => {
                tracing::warn!(error = %e, "every target failed; serving a stale cached answer");
                Some(served_from_cache(hit.response, hit.similarity))
            }
            _ => None,
        }
    }
}
