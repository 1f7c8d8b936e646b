//! The cache stage: an exact (or semantic) hit returns here, spending no budget and no
//! token quota; a complete answer is stored when the request settles; a stale answer
//! may stand in when every target is down.

use std::borrow::Cow;

use super::{Inner, Plan};
use crate::cache::{CacheKey, CacheQuery, is_cacheable};
use crate::types::{ChatResponse, Cost, Served};

/// The model name a routed request is keyed with before it is narrowed to a tier.
pub(super) const ROUTED: &str = "auto";

/// The capability tiers a lookup tries above the request's own, at most.
const MAX_HIGHER_TIERS: usize = 3;

/// How a routed request's cache query is keyed: its keys before narrowing, and the
/// capability tier of its primary target.
///
/// A routed request is served answers from models of its primary target's tier or a
/// higher one: a stronger model's answer is fine for a request the router sent to a
/// weaker one, never the reverse. Its answer is stored under the tier of the model that
/// gave it (a fallback or an escalation may be of another tier).
#[derive(Debug, Clone, Copy)]
pub(super) struct TierKeys {
    key: CacheKey,
    context_key: CacheKey,
    base_key: CacheKey,
    /// The primary target's capability tier.
    pub(super) tier: u8,
    /// Whether the cache reads the context keys (else only the exact key is narrowed).
    context: bool,
}

impl TierKeys {
    /// The keys of `q` (not yet narrowed), for a request whose primary is of `tier`.
    pub(super) fn of(q: &CacheQuery, tier: u8, context: bool) -> Self {
        TierKeys {
            key: q.key,
            context_key: q.context_key,
            base_key: q.base_key,
            tier,
            context,
        }
    }

    /// `q` (the same request's query, keyed any way) keyed for answers of `tier`.
    pub(super) fn query(&self, mut q: CacheQuery, tier: u8) -> CacheQuery {
        q.key = self.key;
        q.context_key = self.context_key;
        q.base_key = self.base_key;
        let mut buf = [0u8; 8];
        q.narrowed(tier_tag(tier, &mut buf), self.context)
    }
}

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

/// `tier:<n>`, written into `buf` (no allocation on the request path).
fn tier_tag(tier: u8, buf: &mut [u8; 8]) -> &str {
    buf[..5].copy_from_slice(b"tier:");
    let mut n = 5;
    if tier >= 100 {
        buf[n] = b'0' + tier / 100;
        n += 1;
    }
    if tier >= 10 {
        buf[n] = b'0' + tier / 10 % 10;
        n += 1;
    }
    buf[n] = b'0' + tier % 10;
    n += 1;
    std::str::from_utf8(&buf[..n]).unwrap_or("tier:?")
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
    pub(super) async fn cache_get(&self, plan: &mut Plan) -> Option<ChatResponse> {
        let (cache, q) = (self.cache.as_ref()?, plan.cache.as_ref()?);
        if !plan.cache_read {
            return None; // `refresh`: skip the read, still write
        }
        let hit = match cache.lookup(q).await {
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
            (None, Some(tiers)) => {
                let mut found = None;
                for tier in self.cache_tiers.above(tiers.tier) {
                    let q = tiers.query(q.clone(), tier);
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
        plan: &'p Plan,
        model: &str,
    ) -> Option<Cow<'p, CacheQuery>> {
        let q = plan.cache.as_ref()?;
        let Some(tiers) = plan.cache_tier else {
            return Some(Cow::Borrowed(q));
        };
        let tier = self.catalog.get(model).map_or(tiers.tier, |m| m.tier);
        self.cache_tiers.note(tier);
        // the plan's own query while it is keyed for this tier; derived afresh
        // otherwise (another tier, or a degrade mode re-keyed the plan's query for the
        // cheaper model it switched to)
        if plan.cache_keyed_tier == Some(tier) {
            return Some(Cow::Borrowed(q));
        }
        Some(Cow::Owned(tiers.query(q.clone(), tier)))
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

    #[test]
    fn tier_tags() {
        let mut buf = [0u8; 8];
        for t in [0u8, 3, 10, 42, 100, 255] {
            assert_eq!(super::tier_tag(t, &mut buf), format!("tier:{t}"));
        }
    }
}
