//! Routing: which models to try, in what order, and when an answer is good enough.
//!
//! A [`Router`] turns a request into a [`RoutePlan`]: ordered targets (the primary,
//! then fallbacks tried when it fails) and an escalation tier tried when a
//! [`Validator`] finds the answer weak. [`CatalogRouter`] is the default.

pub(crate) mod balance;
mod catalog;
mod complexity;
mod validators;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

pub use balance::{Balance, Deployments};
pub use catalog::{CatalogRouter, CatalogRouterBuilder};
pub use complexity::{CascadeRouter, ComplexityRouter, ComplexityRules, Estimate};
pub use validators::{AllOf, CitesSource, JsonAnswer, WeakAnswer};

use crate::Result;
use crate::types::{Catalog, ChatRequest, ChatResponse, ModelSpec};

/// Most targets a plan may hold; longer plans are cut.
pub const MAX_TARGETS: usize = 8;

/// The models to try for one request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RoutePlan {
    /// Tried in order; the next one when the previous failed.
    pub targets: Vec<Arc<ModelSpec>>,
    /// Tried in order when a validator rejects an answer.
    pub escalation: Vec<Arc<ModelSpec>>,
}

impl RoutePlan {
    /// A plan with `targets` and no escalation.
    pub fn new(targets: Vec<Arc<ModelSpec>>) -> Self {
        RoutePlan {
            targets,
            escalation: Vec::new(),
        }
    }

    /// Sets the escalation tier.
    #[must_use]
    pub fn with_escalation(mut self, escalation: Vec<Arc<ModelSpec>>) -> Self {
        self.escalation = escalation;
        self
    }
}

/// Chooses models for a request.
///
/// Routing is a pure decision over the request and the catalogue: it is synchronous
/// and must not do I/O.
///
/// # Implementing
///
/// ```
/// use tokenwise::router::{RoutePlan, Router};
/// use tokenwise::{Catalog, ChatRequest, Tier};
///
/// /// Free users get the small model, everyone else the large one.
/// #[derive(Debug)]
/// struct ByTier;
///
/// impl Router for ByTier {
///     fn route(&self, req: &ChatRequest, catalog: &Catalog) -> tokenwise::Result<RoutePlan> {
///         let name = if req.meta.tier == Tier::Free { "gpt-4o-mini" } else { "gpt-4o" };
///         Ok(RoutePlan::new(vec![catalog.require(name)?.clone()]))
///     }
/// }
/// let plan = ByTier.route(&ChatRequest::user_text("hi"), &Catalog::builtin()).unwrap();
/// assert_eq!(plan.targets[0].name, "gpt-4o");
/// ```
pub trait Router: Send + Sync + fmt::Debug {
    /// The plan for `req`. An empty plan is an error the pipeline reports.
    fn route(&self, req: &ChatRequest, catalog: &Catalog) -> Result<RoutePlan>;
}

/// A validator's judgement of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Good enough: return it.
    Accept,
    /// Not good enough: try the escalation tier, for this reason.
    Escalate(String),
}

/// Decides whether an answer is good enough or the request should escalate.
///
/// # Implementing
///
/// ```
/// use async_trait::async_trait;
/// use tokenwise::router::{Validator, Verdict};
/// use tokenwise::{ChatRequest, ChatResponse};
///
/// /// Answers shorter than 20 characters are weak.
/// #[derive(Debug)]
/// struct MinLength;
///
/// #[async_trait]
/// impl Validator for MinLength {
///     async fn validate(&self, _req: &ChatRequest, resp: &ChatResponse) -> Verdict {
///         if resp.content.len() < 20 { Verdict::Escalate("too short".into()) } else { Verdict::Accept }
///     }
/// }
/// ```
#[async_trait]
pub trait Validator: Send + Sync + fmt::Debug {
    /// Judges `resp` as an answer to `req`.
    async fn validate(&self, req: &ChatRequest, resp: &ChatResponse) -> Verdict;
}

/// A validator from a closure.
pub struct FnValidator<F>(pub F);

impl<F> fmt::Debug for FnValidator<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnValidator")
    }
}

#[async_trait]
impl<F> Validator for FnValidator<F>
where
    F: Fn(&ChatRequest, &ChatResponse) -> Verdict + Send + Sync,
{
    async fn validate(&self, req: &ChatRequest, resp: &ChatResponse) -> Verdict {
        (self.0)(req, resp)
    }
}
