//! Routing by estimated difficulty: the cheapest model whose capability covers it.

use std::sync::Arc;

use super::{MAX_TARGETS, PromptTokens, RoutePlan, Router};
use crate::context::TiktokenCounter;
use crate::types::{Catalog, ChatRequest, ModelSpec, ResponseFormat, Tier, TokenizerKind};
use crate::{Error, Result};

/// What makes a request harder, and who may reach which capability tier.
#[derive(Debug, Clone)]
pub struct ComplexityRules {
    /// Prompts of at least this many tokens add one tier (default 2,000)...
    pub long_prompt_tokens: u64,
    /// ...and of at least this many, another (default 16,000).
    pub very_long_prompt_tokens: u64,
    /// Conversations with at least this many earlier messages add one tier (default 12).
    pub long_history: usize,
    /// Lowercase words of analytical work; any one in the final user turn adds a tier.
    pub analytical_words: Vec<String>,
    /// Code in the final user turn (a fenced block or common syntax) adds a tier.
    pub code_adds_tier: bool,
    /// Tools or a JSON schema response format add a tier.
    pub structure_adds_tier: bool,
    /// The highest tier free users reach (default 2: they never reach the top tiers).
    pub free_max_tier: u8,
    /// The highest tier standard users reach (default 4).
    pub standard_max_tier: u8,
    /// The lowest tier premium users get (default 1).
    pub premium_min_tier: u8,
}

impl Default for ComplexityRules {
    fn default() -> Self {
        ComplexityRules {
            long_prompt_tokens: 2_000,
            very_long_prompt_tokens: 16_000,
            long_history: 12,
            analytical_words: [
                "analyze",
                "analyse",
                "compare",
                "prove",
                "derive",
                "evaluate",
                "design",
                "architect",
                "optimize",
                "optimise",
                "debug",
                "refactor",
                "trade-off",
                "tradeoff",
                "why does",
                "step by step",
                "critique",
                "plan",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            code_adds_tier: true,
            structure_adds_tier: true,
            free_max_tier: 2,
            standard_max_tier: 4,
            premium_min_tier: 1,
        }
    }
}

/// The estimate for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Estimate {
    /// The capability tier the request needs (1 to 4), after the user-tier rules.
    pub tier: u8,
    /// Why, for logs.
    pub reasons: Vec<&'static str>,
}

/// Routes each request to the cheapest candidate model whose capability tier covers
/// the request's estimated difficulty; fallbacks are the next cheapest with at least
/// that tier (never lower, unless allowed), and the escalation tier is the cheapest
/// model of each higher tier the user may reach. A request naming a model keeps it,
/// with fallbacks of at least its tier.
///
/// ```
/// use tokenwise::router::{ComplexityRouter, Router};
/// use tokenwise::{Catalog, ChatRequest, Tier};
/// let catalog = Catalog::builtin();
/// let router = ComplexityRouter::new(&catalog, ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"]).unwrap();
/// let easy = router.route(&ChatRequest::user_text("What time zone is Oslo in?"), &catalog).unwrap();
/// assert_eq!(easy.targets[0].name, "gpt-4o-mini");
/// let hard = ChatRequest::user_text("Compare these two designs and prove which one scales:\n```rust\nfn a() {}\n```");
/// assert_eq!(router.route(&hard, &catalog).unwrap().targets[0].name, "gpt-4o");
/// let free = hard.clone().tier(Tier::Free);
/// assert_eq!(router.route(&free, &catalog).unwrap().targets[0].name, "gpt-4.1-mini");
/// ```
#[derive(Debug, Clone)]
pub struct ComplexityRouter {
    /// Candidates, cheapest first.
    models: Vec<Arc<ModelSpec>>,
    rules: ComplexityRules,
    allow_below_minimum: bool,
    counter: TiktokenCounter,
}

/// A model's price for ordering: input plus output per million tokens.
fn blended(m: &ModelSpec) -> u64 {
    m.pricing
        .input
        .nanos_per_mtok()
        .saturating_add(m.pricing.output.nanos_per_mtok())
}

impl ComplexityRouter {
    /// A router over the catalogue models named in `candidates`.
    pub fn new<I, S>(catalog: &Catalog, candidates: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut models = Vec::new();
        for name in candidates {
            let m = catalog.get(name.as_ref()).ok_or_else(|| {
                Error::Config(format!(
                    "complexity router: model `{}` is not in the catalogue",
                    name.as_ref()
                ))
            })?;
            models.push(Arc::clone(m));
        }
        if models.is_empty() {
            return Err(Error::Config(
                "complexity router: no candidate models".into(),
            ));
        }
        models.sort_by_key(|m| (blended(m), m.tier));
        Ok(ComplexityRouter {
            models,
            rules: ComplexityRules::default(),
            allow_below_minimum: false,
            counter: TiktokenCounter,
        })
    }

    /// Replaces the rules.
    #[must_use]
    pub fn with_rules(mut self, rules: ComplexityRules) -> Self {
        self.rules = rules;
        self
    }

    /// Lets fallbacks drop below the request's estimated tier, after every model that
    /// covers it (default: never).
    #[must_use]
    pub fn allow_below_minimum(mut self, allow: bool) -> Self {
        self.allow_below_minimum = allow;
        self
    }

    fn max_tier(&self, tier: Tier) -> u8 {
        match tier {
            Tier::Free => self.rules.free_max_tier,
            Tier::Standard | Tier::Premium => self.rules.standard_max_tier,
        }
    }

    /// The capability tier `req` needs, and why.
    pub fn estimate(&self, req: &ChatRequest) -> Estimate {
        self.estimate_with(req, &PromptTokens::with_counter(req, &self.counter))
    }

    /// The capability tier `req` needs, reading the prompt's length from `tokens`.
    pub fn estimate_with(&self, req: &ChatRequest, tokens: &PromptTokens<'_>) -> Estimate {
        let r = &self.rules;
        let mut tier = 1u8;
        let mut reasons = Vec::new();
        let tokens = tokens.count(TokenizerKind::O200k);
        if tokens >= r.long_prompt_tokens {
            tier += 1;
            reasons.push("long prompt");
        }
        if tokens >= r.very_long_prompt_tokens {
            tier += 1;
            reasons.push("very long prompt");
        }
        if req.messages.len().saturating_sub(1) >= r.long_history {
            tier += 1;
            reasons.push("long history");
        }
        let last = req.last_user_text().unwrap_or_default().to_lowercase();
        if r.analytical_words.iter().any(|w| last.contains(w.as_str())) {
            tier += 1;
            reasons.push("analytical task");
        }
        let code = last.contains("```")
            || [
                "fn ", "def ", "class ", "#include", "=> {", "};", "select ", "import ",
            ]
            .iter()
            .any(|s| last.contains(s));
        if r.code_adds_tier && code {
            tier += 1;
            reasons.push("code");
        }
        let schema = matches!(
            req.params.response_format,
            Some(ResponseFormat::JsonSchema { .. })
        );
        if r.structure_adds_tier && (!req.params.tools.is_empty() || schema) {
            tier += 1;
            reasons.push("tools or schema");
        }
        if req.meta.tier == Tier::Premium {
            tier = tier.max(r.premium_min_tier);
        }
        let tier = tier.clamp(1, 4).min(self.max_tier(req.meta.tier).max(1));
        Estimate { tier, reasons }
    }
}

impl Router for ComplexityRouter {
    fn route(&self, req: &ChatRequest, catalog: &Catalog) -> Result<RoutePlan> {
        self.route_with_tokens(
            req,
            catalog,
            &PromptTokens::with_counter(req, &self.counter),
        )
    }

    fn route_with_tokens(
        &self,
        req: &ChatRequest,
        catalog: &Catalog,
        tokens: &PromptTokens<'_>,
    ) -> Result<RoutePlan> {
        let cap = self.max_tier(req.meta.tier).max(1);
        let need = match &req.model {
            Some(name) => {
                let m = catalog.resolve(name)?;
                if m.tier > cap {
                    return Err(Error::InvalidRequest(format!(
                        "model {name} is above the capability tier this user may reach"
                    )));
                }
                m.tier
            }
            None => self.estimate_with(req, tokens).tier,
        };
        let mut targets: Vec<Arc<ModelSpec>> = Vec::new();
        if let Some(name) = &req.model {
            targets.push(catalog.resolve(name)?);
        }
        for m in self
            .models
            .iter()
            .filter(|m| m.tier >= need && m.tier <= cap)
        {
            if targets.len() < MAX_TARGETS && !targets.iter().any(|t| t.name == m.name) {
                targets.push(Arc::clone(m));
            }
        }
        if self.allow_below_minimum {
            for m in self.models.iter().filter(|m| m.tier < need) {
                if targets.len() < MAX_TARGETS && !targets.iter().any(|t| t.name == m.name) {
                    targets.push(Arc::clone(m));
                }
            }
        }
        let Some(primary_tier) = targets.first().map(|m| m.tier) else {
            return Err(Error::InvalidRequest(format!(
                "no candidate model covers capability tier {need} within this user's limit of {cap}"
            )));
        };
        // escalation: the cheapest model of each higher tier the user may reach
        let mut escalation: Vec<Arc<ModelSpec>> = Vec::new();
        for t in primary_tier + 1..=cap {
            if let Some(m) = self.models.iter().find(|m| m.tier == t) {
                escalation.push(Arc::clone(m));
            }
        }
        Ok(RoutePlan {
            targets,
            escalation,
        })
    }
}

/// Small models first: the first tier answers, and a validator's rejection escalates to
/// the next tier (see the pipeline's `validator`). Every tier is one or more catalogue
/// models; within a tier the first is tried first and the others are its fallbacks.
///
/// ```
/// use tokenwise::router::{CascadeRouter, Router};
/// use tokenwise::{Catalog, ChatRequest};
/// let catalog = Catalog::builtin();
/// let cascade = CascadeRouter::new(&catalog, [vec!["gpt-4o-mini"], vec!["gpt-4o", "claude-sonnet-4-5"]]).unwrap();
/// let plan = cascade.route(&ChatRequest::user_text("hi"), &catalog).unwrap();
/// assert_eq!(plan.targets[0].name, "gpt-4o-mini");
/// assert_eq!(plan.escalation[0].name, "gpt-4o");
/// ```
#[derive(Debug, Clone)]
pub struct CascadeRouter {
    tiers: Vec<Vec<Arc<ModelSpec>>>,
    free_max_tier: usize,
}

impl CascadeRouter {
    /// A cascade over `tiers`, smallest first.
    pub fn new<T, I, S>(catalog: &Catalog, tiers: T) -> Result<Self>
    where
        T: IntoIterator<Item = I>,
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = Vec::new();
        for tier in tiers {
            let mut models = Vec::new();
            for name in tier {
                let m = catalog.get(name.as_ref()).ok_or_else(|| {
                    Error::Config(format!(
                        "cascade: model `{}` is not in the catalogue",
                        name.as_ref()
                    ))
                })?;
                models.push(Arc::clone(m));
            }
            if models.is_empty() {
                return Err(Error::Config("cascade: a tier has no model".into()));
            }
            out.push(models);
        }
        if out.len() < 2 {
            return Err(Error::Config("cascade: at least two tiers".into()));
        }
        let n = out.len();
        Ok(CascadeRouter {
            tiers: out,
            free_max_tier: n,
        })
    }

    /// Free users escalate no further than cascade tier `n` (1-based; default: all).
    #[must_use]
    pub fn free_max_tier(mut self, n: usize) -> Self {
        self.free_max_tier = n.max(1);
        self
    }
}

impl Router for CascadeRouter {
    fn route(&self, req: &ChatRequest, _catalog: &Catalog) -> Result<RoutePlan> {
        let reach = if req.meta.tier == Tier::Free {
            self.free_max_tier
        } else {
            self.tiers.len()
        };
        let targets = self.tiers[0].iter().take(MAX_TARGETS).cloned().collect();
        let escalation = self.tiers[1..reach.min(self.tiers.len())]
            .iter()
            .flatten()
            .take(MAX_TARGETS)
            .cloned()
            .collect();
        Ok(RoutePlan {
            targets,
            escalation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Message, Tool};

    fn router() -> (Catalog, ComplexityRouter) {
        let c = Catalog::builtin();
        let r = ComplexityRouter::new(
            &c,
            [
                "gpt-4o-mini",
                "gpt-4.1-mini",
                "gpt-4o",
                "o3",
                "claude-haiku-4-5",
            ],
        )
        .unwrap();
        (c, r)
    }

    #[test]
    fn each_feature_raises_the_tier() {
        let (_, r) = router();
        assert_eq!(r.estimate(&ChatRequest::user_text("hello")).tier, 1);
        assert_eq!(
            r.estimate(&ChatRequest::user_text("Please analyze the churn"))
                .tier,
            2
        );
        assert_eq!(
            r.estimate(&ChatRequest::user_text("what does `def f(x):` do"))
                .tier,
            2
        );
        let mut tools = ChatRequest::user_text("book it");
        tools.params.tools.push(Tool {
            name: "book".into(),
            description: String::new(),
            parameters: serde_json::json!({}),
        });
        assert_eq!(r.estimate(&tools).tier, 2);
        assert_eq!(
            r.estimate(&ChatRequest::user_text("word ".repeat(2_500)))
                .tier,
            2
        );
        assert_eq!(
            r.estimate(&ChatRequest::user_text("word ".repeat(20_000)))
                .tier,
            3
        );
        let mut long = ChatRequest::new();
        for _ in 0..7 {
            long = long
                .message(Message::user("a"))
                .message(Message::assistant("b"));
        }
        assert_eq!(r.estimate(&long.message(Message::user("c"))).tier, 2);
        let all = ChatRequest::user_text("Compare and debug:\n```\nfn main() {}\n```");
        assert_eq!(r.estimate(&all).tier, 3);
    }

    #[test]
    fn cheapest_capable_model_with_fallbacks_never_below() {
        let (c, r) = router();
        let plan = r
            .route(
                &ChatRequest::user_text("Compare and debug:\n```\nfn main() {}\n```"),
                &c,
            )
            .unwrap();
        let names: Vec<&str> = plan.targets.iter().map(|m| m.name.as_str()).collect();
        // o3 (tier 4, $2 + $8) is cheaper than gpt-4o (tier 3, $2.50 + $10)
        assert_eq!(names, ["o3", "gpt-4o"], "tier 3 and above, cheapest first");
        assert!(plan.targets.iter().all(|m| m.tier >= 3));
        assert!(plan.escalation.is_empty(), "nothing above tier 4");
        let mid = r
            .route(&ChatRequest::user_text("Please analyze the churn"), &c)
            .unwrap();
        assert_eq!(mid.targets[0].name, "gpt-4.1-mini");
        assert_eq!(
            mid.escalation
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["gpt-4o", "o3"]
        );
        let below = r
            .clone()
            .allow_below_minimum(true)
            .route(
                &ChatRequest::user_text("Compare and debug:\n```\nfn main() {}\n```"),
                &c,
            )
            .unwrap();
        assert!(below.targets.len() > 2 && below.targets[2].tier < 3);
    }

    #[test]
    fn free_users_never_reach_the_top_tier() {
        let (c, r) = router();
        let req =
            ChatRequest::user_text("Prove and compare:\n```\nfn main() {}\n```").tier(Tier::Free);
        let plan = r.route(&req, &c).unwrap();
        assert!(
            plan.targets
                .iter()
                .chain(&plan.escalation)
                .all(|m| m.tier <= 2),
            "{plan:?}"
        );
        assert!(matches!(
            r.route(
                &ChatRequest::user_text("x").model("o3").tier(Tier::Free),
                &c
            ),
            Err(Error::InvalidRequest(_))
        ));
    }

    #[test]
    fn a_named_model_keeps_fallbacks_of_its_tier() {
        let (c, r) = router();
        let plan = r
            .route(&ChatRequest::user_text("hi").model("gpt-4o"), &c)
            .unwrap();
        assert_eq!(plan.targets[0].name, "gpt-4o");
        assert!(plan.targets.iter().all(|m| m.tier >= 3));
    }
}
