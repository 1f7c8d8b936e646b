//! The cache stage: an exact (or semantic) hit returns here, spending no budget and no
//! token quota; a complete answer is stored when the request settles; a stale answer
//! may stand in when every target is down.

use std::borrow::Cow;

use super::{Inner, Plan};
use crate::cache::{CacheQuery, is_cacheable};
use crate::types::{ChatRequest, ChatResponse, Cost, Served};

/// The model name a routed request is keyed with, beside its capability tier.
pub(super) const ROUTED: &str = crate::cache::key::AUTO;

/// The capability tiers a lookup tries above the request's own, at most.
const MAX_HIGHER_TIERS: usize = 3;

/// The capability tiers this pipeline has stored a routed answer under, as a bit set
/// (tiers 0 to 63; higher tiers share the last bit). A routed miss looks in a higher
/// tier only when this pipeline has stored an answer there, so a pipeline whose
/// requests all go to one tier makes one lookup per miss, not one per tier of the
/// catalogue.
#[derive(Debug, Default)]
pub(super) struct StoredTiers(std::sync::atomic::AtomicU64);

impl StoredTiers {
    fn bit(tier: u8) -> u64 {
        1u64 << tier.min(63)
    }

    fn note(&self, tier: u8) {
        let bit = Self::bit(tier);
        if self.0.load(std::sync::atomic::Ordering::Relaxed) & bit == 0 {
            self.0.fetch_or(bit, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Up to [`MAX_HIGHER_TIERS`] stored tiers above `tier`, ascending.
    fn above(&self, tier: u8) -> impl Iterator<Item = u8> {
        let set = self.0.load(std::sync::atomic::Ordering::Relaxed);
        // the stored tiers strictly above `tier`, lowest first, by their set bits
        let mut rest = match tier {
            t if t >= 63 => 0,
            t => set & !((2u64 << t) - 1),
        };
        std::iter::from_fn(move || {
            (rest != 0).then(|| {
                let t = rest.trailing_zeros();
                rest &= rest - 1;
                u8::try_from(t).unwrap_or(63)
            })
        })
        .take(MAX_HIGHER_TIERS)
    }
}

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
    /// The query of routed request `req` for answers of capability `tier`: keyed with
    /// the model [`ROUTED`] and the tier (a routed request is served answers of its
    /// primary target's tier or a higher one, and an answer is stored under the tier of
    /// the model that gave it, which a fallback or an escalation may change).
    pub(super) fn tier_query(&self, req: &ChatRequest, tier: u8) -> Option<CacheQuery> {
        CacheQuery::keyed(
            req,
            self.cache_scope,
            ROUTED,
            Some(tier),
            self.cache_context,
        )
    }

    pub(super) async fn cache_get(
        &self,
        req: &ChatRequest,
        plan: &mut Plan,
    ) -> Option<ChatResponse> {
        let (cache, q) = (self.cache.as_ref()?, plan.cache.as_ref()?);
        if !plan.cache_read {
            return None; // `refresh`: skip the read, still write
        }
        let found = ready_or!(cache.lookup_ready(q), cache.lookup(q));
        let hit = match found {
            Ok(found) => {
                plan.guard_rejected = found.rejected;
                found.answer
            }
            Err(e) => {
                tracing::warn!(error = %e, "cache read failed; treated as a miss");
                return None;
            }
        };
        let hit = match (hit, plan.cache_tier) {
            (Some(hit), _) => hit,
            // a routed request: a stronger model's answer serves it too
            (None, Some(own)) => {
                let mut found = None;
                for tier in self.cache_tiers.above(own) {
                    let q = self.tier_query(req, tier)?;
                    match cache.lookup(&q).await {
                        Ok(l) if l.answer.is_some() => {
                            found = l.answer;
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "cache read failed; treated as a miss");
                            return None;
                        }
                    }
                }
                found?
            }
            (None, None) => return None,
        };
        let mut r = served_from_cache(hit.response, hit.similarity);
        r.guard_rejected = plan.guard_rejected.take();
        Some(r)
    }

    /// The query an answer from `model` is stored under: for a routed request, keyed
    /// by that model's tier (a fallback or escalation may differ from the primary's);
    /// otherwise the plan's own.
    pub(super) fn stored_under<'p>(
        &self,
        req: &ChatRequest,
        plan: &'p Plan,
        model: &str,
    ) -> Option<Cow<'p, CacheQuery>> {
        let q = plan.cache.as_ref()?;
        let Some(own) = plan.cache_tier else {
            return Some(Cow::Borrowed(q));
        };
        let tier = self.catalog.get(model).map_or(own, |m| m.tier);
        self.cache_tiers.note(tier);
        // the plan's own query while it is keyed for this tier; keyed afresh otherwise
        // (another tier, or a degrade mode re-keyed the plan's query for the cheaper
        // model it switched to)
        if plan.cache_keyed_tier == Some(tier) {
            return Some(Cow::Borrowed(q));
        }
        self.tier_query(req, tier).map(Cow::Owned)
    }

    pub(super) async fn cache_put(&self, q: &CacheQuery, response: &ChatResponse) {
        let Some(cache) = &self.cache else { return };
        if !is_cacheable(response) {
            return;
        }
        let stored = ready_or!(cache.put_ready(q, response), cache.put(q, response));
        if let Err(e) = stored {
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

#[cfg(test)]
mod tests {
    #[test]
    fn stored_tiers_above_a_tier() {
        let tiers = super::StoredTiers::default();
        for t in [0u8, 2, 5, 7, 9, 63, 200] {
            tiers.note(t);
        }
        let above = |t: u8| tiers.above(t).collect::<Vec<_>>();
        assert_eq!(above(0), [2, 5, 7]);
        assert_eq!(above(5), [7, 9, 63]);
        assert_eq!(above(9), [63]);
        assert_eq!(above(62), [63]);
        assert!(above(63).is_empty());
        assert!(above(255).is_empty());
    }
}
