//! The plan stage: validate the request, let the router name the candidate models,
//! count the prompt once per tokenizer, and work out the worst case. Pure: no I/O, no
//! charge.

use std::sync::Arc;

use super::Inner;
use crate::cache::CacheQuery;
use crate::router::{Counted, PromptTokens, RoutePlan};
use crate::types::GuardRejection;
use crate::types::{CacheMode, ChatRequest, Cost, ModelSpec, TokenizerKind};
use crate::{Error, Result};

/// What the plan stage learns about a request, computed once and shared by every later
/// stage: the router's targets, the prompt's token counts (used by admission, the
/// budget, the context check and the providers), the worst case and the cache query.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) route: RoutePlan,
    /// Prompt tokens per tokenizer kind of the candidate models (and any the router read).
    pub(super) prompt_tokens: Counted,
    /// The token charge for admission: prompt plus output allowance on the primary.
    pub(super) token_estimate: u64,
    /// The most the request may cost on any candidate (plus escalation, if validated).
    pub(super) worst_case: Cost,
    /// The prompt's cost on the primary target: what a call abandoned mid-flight is
    /// charged, since the provider received the prompt.
    pub(super) prompt_cost: Cost,
    pub(super) cache: Option<CacheQuery>,
    /// For a routed request, the primary target's capability tier, which `cache` was
    /// keyed with (see `Inner::tier_query`).
    pub(super) cache_tier: Option<u8>,
    /// The capability tier `cache` is keyed for, while it is (a degrade mode that
    /// re-keys the query clears it): an answer of that tier is stored under `cache`
    /// itself, with no keys derived again.
    pub(super) cache_keyed_tier: Option<u8>,
    /// False under `CacheMode::Refresh`: the answer is written, never read.
    pub(super) cache_read: bool,
    /// A semantic match a cache guard refused, reported on the answer.
    pub(super) guard_rejected: Option<GuardRejection>,
    /// Whether a validator judges the first tier's answer (and may escalate).
    pub(super) validated: bool,
}

impl Plan {
    pub(super) fn prompt_tokens(&self, kind: TokenizerKind) -> u64 {
        self.prompt_tokens.get(kind)
    }

    /// The primary target's prompt tokens.
    pub(super) fn primary_prompt_tokens(&self) -> u64 {
        self.route
            .targets
            .first()
            .map_or(0, |m| self.prompt_tokens(m.tokenizer))
    }
}

impl Inner {
    pub(super) fn plan(&self, req: &ChatRequest) -> Result<Plan> {
        req.validate()?;
        // One count per tokenizer, shared by the router and every later stage.
        let tokens = PromptTokens::cached(req, &*self.counter, &self.counts);
        let route = self.router.route_with_tokens(req, &self.catalog, &tokens)?;
        let Some(primary) = route.targets.first() else {
            return Err(Error::InvalidRequest(
                "the router returned no target".into(),
            ));
        };
        let validated = self.validator.is_some() && !route.escalation.is_empty();
        // the `max_tokens` the context budget gives a request that sets none
        let max_tokens = match &self.context {
            Some(c) => c.max_tokens_for(req),
            None => req.params.max_tokens,
        };
        let escalation: &[Arc<ModelSpec>] = if validated { &route.escalation } else { &[] };
        let mut worst = Cost::ZERO;
        // With hedging two targets may run at once: reserve for both.
        let mut second = Cost::ZERO;
        let mut worst_escalation = Cost::ZERO;
        for (i, m) in route.targets.iter().chain(escalation).enumerate() {
            let n = tokens.count(m.tokenizer);
            let c = m.worst_case_cost(n, max_tokens);
            if i < route.targets.len() {
                if c > worst {
                    second = worst;
                    worst = c;
                } else {
                    second = second.max(c);
                }
            } else {
                worst_escalation = worst_escalation.max(c);
            }
        }
        let primary_prompt = tokens.count(primary.tokenizer);
        let prompt_tokens = tokens.counted();
        let token_estimate = primary_prompt + primary.output_allowance(max_tokens);
        let prompt_cost = primary.pricing.input.cost_of(primary_prompt);
        let (cache, cache_tier) = match (&self.cache, req.model.as_deref()) {
            (None, _) => (None, None),
            // A request naming its model is only ever served that model's answers.
            (Some(_), Some(named)) => (
                CacheQuery::keyed(req, self.cache_scope, named, None, self.cache_context),
                None,
            ),
            // A routed request is keyed by the capability tier of the model the router
            // chose, not by `auto` alone: an answer from a weaker model is not served
            // to a request routed to a stronger one (answers of a higher tier may be;
            // see `cache_get`).
            (Some(_), None) => match self.tier_query(req, primary.tier) {
                Some(q) => (Some(q), Some(primary.tier)),
                None => (None, None),
            },
        };
        Ok(Plan {
            route,
            prompt_tokens,
            token_estimate,
            worst_case: worst
                + worst_escalation
                + if self.hedge.is_some() {
                    second
                } else {
                    Cost::ZERO
                },
            prompt_cost,
            cache,
            cache_tier,
            cache_keyed_tier: cache_tier,
            cache_read: req.meta.cache.mode == CacheMode::Use,
            guard_rejected: None,
            validated,
        })
    }
}
