//! The prepare stage: before planning, the I/O that a configured token counter or
//! summarizer needs (exact counts from a provider's endpoint, summaries written by a
//! model). Skipped, at the cost of two checks, when neither is configured to prepare.

use super::Pipeline;
use crate::context::{Preparing, TokenCounter};
use crate::types::{ChatRequest, TokenizerKind};

/// Whether `counter` prepares for any tokenizer.
fn counter_prepares(counter: &dyn TokenCounter) -> bool {
    [
        TokenizerKind::O200k,
        TokenizerKind::Cl100k,
        TokenizerKind::ClaudeApprox,
    ]
    .into_iter()
    .any(|k| counter.prepares_for(k))
}

impl Pipeline {
    /// Whether a request needs the prepare stage: the context budget's summarizer
    /// prepares, or the token counter prepares for some tokenizer.
    pub(super) fn prepares(&self) -> bool {
        let inner = &self.inner;
        counter_prepares(&*inner.counter)
            || inner
                .context
                .as_ref()
                .and_then(|c| c.summarizer.as_ref())
                .is_some_and(|s| s.prepares())
    }

    /// Fetches exact counts for `req` (when a candidate model's tokenizer needs them)
    /// and writes the summary its fit will need on its primary target. Failures are
    /// logged, never returned: counts fall back to estimates and a fit without its
    /// summary leaves the dropped turns out. A request the plan will refuse is left
    /// alone (the plan reports why).
    pub(super) async fn prepare(&self, req: &ChatRequest) {
        let inner = &self.inner;
        if req.validate().is_err() {
            return;
        }
        let Ok(route) = inner.router.route(req, &inner.catalog) else {
            return;
        };
        let counter = &*inner.counter;
        if counter_prepares(counter)
            && route
                .targets
                .iter()
                .chain(&route.escalation)
                .any(|m| counter.prepares_for(m.tokenizer))
        {
            let estimated = counter.prepare(req).await;
            if estimated > 0 {
                tracing::debug!(estimated, "exact token counts unavailable; estimating");
            }
        }
        let (Some(budget), Some(model)) = (inner.context.as_ref(), route.targets.first()) else {
            return;
        };
        let Some(summarizer) = budget.summarizer.as_ref().filter(|s| s.prepares()) else {
            return;
        };
        let ahead = Preparing {
            pipeline: self,
            budget,
            model,
            request: req,
            counter,
            counts: &inner.counts,
        };
        if let Err(e) = summarizer.prepare(ahead).await {
            tracing::warn!(error = %e, "no summary written; the dropped turns are left out");
        }
    }
}
