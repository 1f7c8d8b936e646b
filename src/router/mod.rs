//! Routing: which models to try, in what order, and when an answer is good enough.
//!
//! A [`Router`] turns a request into a [`RoutePlan`]: ordered targets (the primary,
//! then fallbacks tried when it fails) and an escalation tier tried when a
//! [`Validator`] finds the answer weak. [`CatalogRouter`] is the default.

pub(crate) mod balance;
mod catalog;
mod complexity;
mod validators;

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

pub use balance::{Balance, Deployments};
pub use catalog::{CatalogRouter, CatalogRouterBuilder};
pub use complexity::{CascadeRouter, ComplexityRouter, ComplexityRules, Estimate};
pub use validators::{AllOf, CitesSource, JsonAnswer, WeakAnswer};

use crate::Result;
use crate::context::{CountCache, TiktokenCounter, TokenCounter};
use crate::types::{Catalog, ChatRequest, ChatResponse, ModelSpec, TokenizerKind};

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

    /// The plan for `req`, given the prompt's token counts. The pipeline calls this one:
    /// a router that looks at the prompt's length reads `tokens` instead of counting,
    /// so each request is counted once per tokenizer and the count is shared with
    /// admission, the budget and the provider. The default ignores `tokens` and calls
    /// [`route`](Self::route).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tokenwise::router::{PromptTokens, RoutePlan, Router};
    /// use tokenwise::{Catalog, ChatRequest, Result, TokenizerKind};
    ///
    /// /// Long prompts go to the model with the larger window.
    /// #[derive(Debug)]
    /// struct ByLength;
    ///
    /// impl Router for ByLength {
    ///     fn route(&self, req: &ChatRequest, catalog: &Catalog) -> Result<RoutePlan> {
    ///         self.route_with_tokens(req, catalog, &PromptTokens::new(req))
    ///     }
    ///
    ///     fn route_with_tokens(
    ///         &self,
    ///         _req: &ChatRequest,
    ///         catalog: &Catalog,
    ///         tokens: &PromptTokens<'_>,
    ///     ) -> Result<RoutePlan> {
    ///         let name = if tokens.count(TokenizerKind::O200k) > 4_000 { "gpt-4.1" } else { "gpt-4o-mini" };
    ///         Ok(RoutePlan::new(vec![catalog.resolve(name)?]))
    ///     }
    /// }
    /// let plan = ByLength.route(&ChatRequest::user_text("hi"), &Catalog::builtin()).unwrap();
    /// assert_eq!(plan.targets[0].name, "gpt-4o-mini");
    /// ```
    fn route_with_tokens(
        &self,
        req: &ChatRequest,
        catalog: &Catalog,
        tokens: &PromptTokens<'_>,
    ) -> Result<RoutePlan> {
        let _ = tokens;
        self.route(req, catalog)
    }
}

/// One request's prompt tokens, counted on first use and at most once per tokenizer.
///
/// The pipeline makes one per request and hands it to
/// [`Router::route_with_tokens`]; the counts a router reads are the ones admission, the
/// budget and the provider then use. Outside a pipeline, [`PromptTokens::new`] counts
/// with [`TiktokenCounter`].
pub struct PromptTokens<'a> {
    req: &'a ChatRequest,
    counter: &'a dyn TokenCounter,
    cache: Option<&'a CountCache>,
    counted: [Cell<Option<u64>>; 3],
}

impl<'a> PromptTokens<'a> {
    /// Counts for `req` with [`TiktokenCounter`], uncached.
    pub fn new(req: &'a ChatRequest) -> Self {
        Self::with_counter(req, &TiktokenCounter)
    }

    /// Counts for `req` with `counter`, uncached.
    pub fn with_counter(req: &'a ChatRequest, counter: &'a dyn TokenCounter) -> Self {
        PromptTokens {
            req,
            counter,
            cache: None,
            counted: Default::default(),
        }
    }

    /// Counts for `req` with `counter`, each text's count kept in `cache`.
    pub(crate) fn cached(
        req: &'a ChatRequest,
        counter: &'a dyn TokenCounter,
        cache: &'a CountCache,
    ) -> Self {
        PromptTokens {
            cache: Some(cache),
            ..Self::with_counter(req, counter)
        }
    }

    /// The request's prompt tokens under `tokenizer`: messages, documents and tool
    /// definitions, as [`TokenCounter::count_request`] counts them.
    pub fn count(&self, tokenizer: TokenizerKind) -> u64 {
        let slot = &self.counted[Self::slot(tokenizer)];
        if let Some(n) = slot.get() {
            return n;
        }
        let n = match self.cache {
            Some(c) => c.count_request(self.counter, self.req, tokenizer),
            None => self.counter.count_request(self.req, tokenizer),
        };
        slot.set(Some(n));
        n
    }
}

impl PromptTokens<'_> {
    fn slot(tokenizer: TokenizerKind) -> usize {
        match tokenizer {
            TokenizerKind::O200k => 0,
            TokenizerKind::Cl100k => 1,
            TokenizerKind::ClaudeApprox => 2,
        }
    }

    /// What was counted, for the stages after routing.
    pub(crate) fn counted(&self) -> Counted {
        Counted(self.counted.each_ref().map(Cell::get))
    }
}

/// The prompt's token counts that a [`PromptTokens`] took, per tokenizer.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counted([Option<u64>; 3]);

impl Counted {
    /// The count under `tokenizer` (0 if it was not counted).
    pub(crate) fn get(&self, tokenizer: TokenizerKind) -> u64 {
        self.0[PromptTokens::slot(tokenizer)].unwrap_or(0)
    }
}

impl fmt::Debug for PromptTokens<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PromptTokens")
            .field("counted", &self.counted)
            .finish_non_exhaustive()
    }
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
