//! Single-flight in the funnel: identical requests that miss the cache at the same time
//! share one provider call (see [`crate::cache::SingleFlight`]).

use std::sync::Arc;

use super::Inner;
use super::cache::served_from_cache;
use super::plan::Plan;
use crate::cache::{Join, Leader, SharedStream};
use crate::observe::{Outcome, UsageRecord};
use crate::types::{ChatResponse, ChatStream, Served};

/// The leader's stream, shared with the identical requests that follow it.
pub(super) fn share(leader: Option<Leader<Arc<SharedStream>>>, s: ChatStream) -> ChatStream {
    match leader {
        Some(l) => crate::cache::share_stream(s, l),
        None => s,
    }
}

impl Inner {
    /// Single-flight for a whole answer that missed the cache: the answer of an
    /// identical request in flight (as a cache hit), or the leadership of the flight.
    pub(super) async fn join_flight(
        &self,
        plan: &Plan,
    ) -> (Option<ChatResponse>, Option<Leader<ChatResponse>>) {
        let Some(q) = plan.cache.as_ref().filter(|_| plan.cache_read) else {
            return (None, None);
        };
        match self.flights.join(q.key) {
            Join::Leader(l) => (None, Some(l)),
            Join::Alone => (None, None),
            Join::Follower(f) => {
                let shared = f.wait().await.map(|r| {
                    let mut r = served_from_cache(r, 1.0);
                    r.guard_rejected = None;
                    r
                });
                (shared, None)
            }
        }
    }

    /// Single-flight for a stream that missed the cache: a reader of the identical
    /// stream in flight (its usage recorded as a cache hit when it ends), or the
    /// leadership of the flight.
    pub(super) async fn join_stream_flight(
        self: &Arc<Self>,
        plan: &Plan,
        rec: &UsageRecord,
        span: &tracing::Span,
    ) -> (Option<ChatStream>, Option<Leader<Arc<SharedStream>>>) {
        let Some(q) = plan.cache.as_ref().filter(|_| plan.cache_read) else {
            return (None, None);
        };
        match self.stream_flights.join(q.key) {
            Join::Leader(l) => (None, Some(l)),
            Join::Alone => (None, None),
            Join::Follower(f) => {
                let (inner, span) = (Arc::clone(self), span.clone());
                let mut rec = rec.clone();
                let on_end: crate::cache::OnEnd = Box::new(move |end| {
                    if let Served::Cache { saved_cost, .. } = end.served {
                        rec.saved = saved_cost;
                    }
                    rec.outcome = Outcome::CacheHit;
                    rec.model = Some(end.model.clone());
                    rec.provider = Some(end.provider.clone());
                    inner.record(rec, &span, Some(end.finish_reason.as_str()));
                });
                (f.wait_with(|s| s.subscribe(Some(on_end))).await, None)
            }
        }
    }
}
