//! The budget stage: reserve the worst case on every spend cap at once, then apply the
//! degrade mode the tightest cap calls for. A reservation is a [`Held`], which settles
//! itself if the request is abandoned.

use std::sync::Arc;

use super::admit::Admitted;
use super::{Inner, Plan, run_detached};
use crate::budget::{CapStatus, Degrade, Reservation};
use crate::cache::CacheQuery;
use crate::router::RoutePlan;
use crate::types::{ChatRequest, Cost, RequestMeta};
use crate::{Error, Result};

/// A budget reservation that settles itself if the request is abandoned (its future
/// dropped) before the funnel settles it: the prompt's cost is committed.
pub(super) struct Held {
    inner: Arc<Inner>,
    reservation: Option<Reservation>,
    on_drop: Cost,
}

impl Held {
    /// Hands the reservation over (to a batch item, settled when its result arrives).
    pub(super) fn take(&mut self) -> Option<Reservation> {
        self.reservation.take()
    }

    /// Commits `cost` against the reservation (nothing without one).
    pub(super) async fn commit(&mut self, cost: Cost) {
        let r = self.reservation.take();
        self.inner.commit(r, cost).await;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            let inner = Arc::clone(&self.inner);
            let cost = self.on_drop;
            run_detached(Box::pin(async move { inner.commit(Some(r), cost).await }));
        }
    }
}

/// The refusal of a degrade mode: the cap's standing, as a spend-cap error.
fn over_threshold(st: &CapStatus, now: crate::clock::Timestamp) -> Error {
    Error::BudgetExceeded {
        scope: st.scope.clone(),
        limit: st.limit,
        spent: st.spent.saturating_add(st.reserved),
        retry_after: st.window.until_reset(now),
    }
}

impl Inner {
    /// Refuses a whole request whose worst case exceeds its cost limit: unlike a stream,
    /// it cannot be cut when it reaches the limit.
    pub(super) fn check_max_cost(&self, req: &ChatRequest, plan: &Plan) -> Result<()> {
        match req.meta.max_cost.or(self.max_cost) {
            Some(limit) if plan.worst_case > limit => Err(Error::InvalidRequest(format!(
                "the request may cost up to {} but its limit is {limit}; lower max_tokens or stream it",
                plan.worst_case
            ))),
            _ => Ok(()),
        }
    }

    /// The `Refuse` degrade mode: refuses before the cache once a cap of the request
    /// is used beyond its threshold.
    pub(super) async fn refuse_gate(&self, meta: &RequestMeta) -> Result<()> {
        let Some(threshold) = self
            .degrade
            .iter()
            .find(|(_, m)| *m == Degrade::Refuse)
            .map(|(p, _)| u64::from(*p))
        else {
            return Ok(());
        };
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        let now = self.clock.now();
        for st in budget.status(meta).await? {
            if st.used_percent() >= threshold {
                tracing::info!(scope = %st.scope, used = st.used_percent(), "degrade: refuse");
                return Err(over_threshold(&st, now));
            }
        }
        Ok(())
    }

    /// The budget stage: reserves the worst case, then applies the degrade mode the
    /// tightest cap calls for. A refusal gives the admission's token charge back.
    pub(super) async fn spend(
        self: &Arc<Self>,
        req: &ChatRequest,
        plan: &mut Plan,
        admitted: &mut Admitted<'_>,
        degraded: &mut Option<Degrade>,
    ) -> Result<Held> {
        let reservation = match &self.budget {
            Some(b) => {
                let reserved = ready_or!(
                    b.reserve_ready(&req.meta, plan.worst_case),
                    b.reserve(&req.meta, plan.worst_case)
                );
                match reserved {
                    Ok(r) => Some(r),
                    Err(e) => {
                        admitted.settle(0).await;
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let used = reservation.as_ref().map_or(0, Reservation::used_percent);
        let mode = self
            .degrade
            .iter()
            .rev()
            .find(|(p, _)| used >= u64::from(*p))
            .map(|(_, m)| m.clone());
        if let Some(m @ (Degrade::CheaperModel(_) | Degrade::CacheOnly)) = &mode {
            *degraded = Some(m.clone());
        }
        let mut held = Held {
            inner: Arc::clone(self),
            reservation,
            on_drop: plan.prompt_cost,
        };
        match mode {
            None | Some(Degrade::Refuse) => Ok(held),
            Some(Degrade::CheaperModel(name)) => {
                tracing::info!(used, model = %name, "degrade: cheaper model");
                let model = self.catalog.resolve(&name)?;
                if plan.cache.is_some() {
                    plan.cache = CacheQuery::keyed(
                        req,
                        self.cache_scope,
                        &model.name,
                        None,
                        self.cache_context,
                    );
                    plan.cache_keyed_tier = None;
                }
                plan.route = RoutePlan::new(vec![model]);
                Ok(held)
            }
            Some(Degrade::CacheOnly) => {
                let err = held
                    .reservation
                    .as_ref()
                    .and_then(|r| r.tightest.as_ref())
                    .map(|st| over_threshold(st, self.clock.now()));
                held.commit(Cost::ZERO).await;
                admitted.settle(0).await;
                tracing::info!(used, "degrade: cache only, and this was a miss");
                Err(err.unwrap_or(Error::Overloaded { retry_after: None }))
            }
        }
    }

    pub(super) async fn commit(&self, reservation: Option<Reservation>, cost: Cost) {
        if let (Some(b), Some(r)) = (&self.budget, reservation) {
            let done = ready_or!(b.commit_ready(&r, cost), b.commit(r, cost));
            if let Err(e) = done {
                tracing::error!(error = %e, cost = %cost, "budget commit failed");
            }
        }
    }
}
