//! The model catalogue: what each model costs, how much it can read and write, and
//! how capable it is.

use hashbrown::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Cost, Pricing, Usage};
use crate::{Error, Result};

/// How tokens are counted for a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TokenizerKind {
    /// OpenAI's `o200k_base` (GPT-4o, GPT-4.1, GPT-5 and later, o-series).
    #[default]
    O200k,
    /// OpenAI's `cl100k_base` (GPT-4, GPT-3.5).
    Cl100k,
    /// Anthropic's models. Anthropic publishes no tokenizer; tokenwise approximates with
    /// `cl100k_base` plus 10 %, which errs high for English text.
    ClaudeApprox,
}

/// One model: provider, limits, prices and capability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ModelSpec {
    /// The API model id, e.g. `gpt-4o-mini`.
    pub name: String,
    /// The provider that serves it, e.g. `openai` or `anthropic`.
    pub provider: String,
    /// Context window in tokens (input plus output).
    pub context_window: u64,
    /// The most output tokens one call may produce.
    pub max_output: u64,
    /// Prices.
    #[serde(flatten)]
    pub pricing: Pricing,
    /// Capability tier: 1 (small, cheap) to 4 (frontier).
    pub tier: u8,
    /// How to count its tokens.
    #[serde(default)]
    pub tokenizer: TokenizerKind,
    /// The discount, in per cent (0 to 100), of the provider's batch API on this model's
    /// prices. Unset means the provider's usual discount: 50 % for `openai` and
    /// `anthropic`, none for others (see [`batch_discount`](Self::batch_discount)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_discount_percent: Option<u8>,
    /// Whether the model's API continues a final assistant message (assistant prefill),
    /// which lets a stream cut mid-answer be continued where it stopped. Unset means the
    /// provider's usual behaviour: `anthropic` does, others do not (see
    /// [`accepts_prefill`](Self::accepts_prefill)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<bool>,
}

impl ModelSpec {
    /// A model with the given limits and prices.
    pub fn new(
        name: impl Into<String>,
        provider: impl Into<String>,
        context_window: u64,
        max_output: u64,
        pricing: Pricing,
        tier: u8,
    ) -> Self {
        ModelSpec {
            name: name.into(),
            provider: provider.into(),
            context_window,
            max_output,
            pricing,
            tier,
            tokenizer: TokenizerKind::O200k,
            batch_discount_percent: None,
            prefill: None,
        }
    }

    /// Sets whether the model's API continues a final assistant message.
    #[must_use]
    pub fn with_prefill(mut self, accepts: bool) -> Self {
        self.prefill = Some(accepts);
        self
    }

    /// Whether the model continues a final assistant message: as set, else true for
    /// models of the `anthropic` provider.
    pub fn accepts_prefill(&self) -> bool {
        self.prefill.unwrap_or(self.provider == "anthropic")
    }

    /// Sets the batch API's discount on this model, in per cent (0 to 100).
    #[must_use]
    pub fn with_batch_discount(mut self, percent: u8) -> Self {
        self.batch_discount_percent = Some(percent);
        self
    }

    /// The batch API's discount in per cent: the one set, else 50 for models of the
    /// `openai` and `anthropic` providers (both price batches at half), else 0.
    pub fn batch_discount(&self) -> u8 {
        self.batch_discount_percent
            .unwrap_or(match self.provider.as_str() {
                "openai" | "anthropic" => 50,
                _ => 0,
            })
            .min(100)
    }

    /// The cost of `usage` through the provider's batch API: [`cost`](Self::cost) less
    /// the [`batch_discount`](Self::batch_discount), rounded up to the nano-dollar.
    pub fn batch_cost(&self, usage: &Usage) -> Cost {
        let full = u128::from(self.cost(usage).as_nanos());
        let keep = u128::from(100 - self.batch_discount());
        let nanos = (full * keep).div_ceil(100);
        Cost::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Sets the tokenizer.
    #[must_use]
    pub fn with_tokenizer(mut self, t: TokenizerKind) -> Self {
        self.tokenizer = t;
        self
    }

    /// The cost of `usage` on this model.
    pub fn cost(&self, usage: &Usage) -> Cost {
        self.pricing.cost(usage)
    }

    /// The output tokens a request may produce: its `max_tokens`, else the model's maximum.
    pub fn output_allowance(&self, max_tokens: Option<u32>) -> u64 {
        max_tokens.map_or(self.max_output, |m| u64::from(m).min(self.max_output))
    }

    /// The worst-case cost of a call with `input_tokens` of prompt that may produce
    /// `max_tokens` of output (or the model's maximum), with no prompt-cache discount.
    pub fn worst_case_cost(&self, input_tokens: u64, max_tokens: Option<u32>) -> Cost {
        self.cost(&Usage::new(input_tokens, self.output_allowance(max_tokens)))
    }

    fn check(&self) -> Result<()> {
        let bad = |what: &str| {
            Err(Error::Config(format!(
                "model `{}`: {what}",
                if self.name.is_empty() {
                    "<unnamed>"
                } else {
                    &self.name
                }
            )))
        };
        if self.name.trim().is_empty() {
            return bad("name is empty");
        }
        if self.provider.trim().is_empty() {
            return bad("provider is empty");
        }
        if self.context_window == 0 {
            return bad("context_window must be positive");
        }
        if self.max_output == 0 || self.max_output > self.context_window {
            return bad("max_output must be positive and at most context_window");
        }
        if !(1..=4).contains(&self.tier) {
            return bad("tier must be between 1 and 4");
        }
        if self.batch_discount_percent.is_some_and(|p| p > 100) {
            return bad("batch_discount_percent must be between 0 and 100");
        }
        Ok(())
    }
}

/// The file format of a catalogue: a date and a list of models.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    prices_as_of: Option<String>,
    #[serde(default)]
    models: Vec<ModelSpec>,
}

/// A set of models by name. Cheap to clone.
///
/// [`Catalog::builtin`] holds the main OpenAI and Anthropic models with the prices
/// published on [`Catalog::BUILTIN_PRICES_AS_OF`]. Prices change: load your own
/// overrides from TOML or JSON with [`Catalog::merge_toml`] / [`Catalog::merge_json`].
///
/// ```
/// use tokenwise::Catalog;
/// let catalog = Catalog::builtin().merge_toml(r#"
///     prices_as_of = "2026-12-01"
///     [[models]]
///     name = "my-finetune"
///     provider = "openai"
///     context_window = 128000
///     max_output = 16384
///     input_per_mtok = 0.30
///     output_per_mtok = 1.20
///     cached_input_per_mtok = 0.15
///     tier = 2
/// "#).unwrap();
/// assert_eq!(catalog.get("my-finetune").unwrap().tier, 2);
/// assert!(catalog.get("gpt-4o-mini").is_some());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: Arc<HashMap<String, Arc<ModelSpec>>>,
    prices_as_of: Option<String>,
    unknown: Option<Arc<ModelSpec>>,
}

impl Catalog {
    /// The date the built-in prices were read from the providers' published price lists.
    pub const BUILTIN_PRICES_AS_OF: &'static str = "2026-11-18";

    /// An empty catalogue.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The built-in catalogue of current OpenAI and Anthropic models.
    pub fn builtin() -> Self {
        const OPENAI: &str = "openai";
        const ANTHROPIC: &str = "anthropic";
        // (name, provider, context, max output, in, out, cached in, tier)
        type Row = (&'static str, &'static str, u64, u64, f64, f64, f64, u8);
        #[rustfmt::skip]
        const MODELS: &[Row] = &[
            ("gpt-6.2-sol",       OPENAI, 1_050_000, 128_000, 2.00, 10.00, 0.10, 4),
            ("gpt-6-luna",        OPENAI, 1_050_000, 128_000, 0.10,  0.50, 0.01, 1),
            ("gpt-5.1",           OPENAI,   400_000, 128_000, 1.25, 10.00, 0.125, 3),
            ("gpt-5",             OPENAI,   400_000, 128_000, 1.25, 10.00, 0.125, 3),
            ("gpt-5-mini",        OPENAI,   400_000, 128_000, 0.25,  2.00, 0.025, 2),
            ("gpt-5-nano",        OPENAI,   400_000, 128_000, 0.05,  0.40, 0.005, 1),
            ("gpt-4.1",           OPENAI, 1_047_576,  32_768, 2.00,  8.00, 0.50, 3),
            ("gpt-4.1-mini",      OPENAI, 1_047_576,  32_768, 0.40,  1.60, 0.10, 2),
            ("gpt-4.1-nano",      OPENAI, 1_047_576,  32_768, 0.10,  0.40, 0.025, 1),
            ("gpt-4o",            OPENAI,   128_000,  16_384, 2.50, 10.00, 1.25, 3),
            ("gpt-4o-mini",       OPENAI,   128_000,  16_384, 0.15,  0.60, 0.075, 1),
            ("o3",                OPENAI,   200_000, 100_000, 2.00,  8.00, 0.50, 4),
            ("o4-mini",           OPENAI,   200_000, 100_000, 1.10,  4.40, 0.275, 3),
            ("claude-fable-5-1",  ANTHROPIC, 1_000_000, 128_000, 10.00, 50.00, 0.25, 4),
            ("claude-opus-5-5",   ANTHROPIC, 1_000_000, 128_000, 4.00, 20.00, 0.20, 4),
            ("claude-sonnet-5-5", ANTHROPIC, 1_000_000, 128_000, 2.00, 10.00, 0.10, 3),
            ("claude-haiku-5-5",  ANTHROPIC, 1_000_000, 128_000, 0.10,  0.50, 0.01, 1),
            ("claude-opus-4-5",   ANTHROPIC,   200_000,  64_000, 5.00, 25.00, 0.50, 4),
            ("claude-sonnet-4-5", ANTHROPIC,   200_000,  64_000, 3.00, 15.00, 0.30, 3),
            ("claude-haiku-4-5",  ANTHROPIC,   200_000,  64_000, 1.00,  5.00, 0.10, 2),
        ];
        let mut map = HashMap::with_capacity(MODELS.len());
        for &(name, provider, ctx, max_out, i, o, c, tier) in MODELS {
            // The table above is constant and every price in it is finite and positive.
            let Some(pricing) = Pricing::per_mtok(i, o, c) else {
                continue;
            };
            let tokenizer = if provider == ANTHROPIC {
                TokenizerKind::ClaudeApprox
            } else {
                TokenizerKind::O200k
            };
            let spec = ModelSpec::new(name, provider, ctx, max_out, pricing, tier)
                .with_tokenizer(tokenizer);
            map.insert(name.to_owned(), Arc::new(spec));
        }
        Catalog {
            models: Arc::new(map),
            prices_as_of: Some(Self::BUILTIN_PRICES_AS_OF.to_owned()),
            unknown: None,
        }
    }

    /// A catalogue from TOML text (`prices_as_of` and `[[models]]`).
    pub fn from_toml(text: &str) -> Result<Self> {
        Self::empty().merge_toml(text)
    }

    /// A catalogue from JSON text (`{"prices_as_of": .., "models": [..]}`).
    pub fn from_json(text: &str) -> Result<Self> {
        Self::empty().merge_json(text)
    }

    /// This catalogue with the models in TOML `text` added or replaced.
    pub fn merge_toml(self, text: &str) -> Result<Self> {
        let file: CatalogFile = toml::from_str(text)
            .map_err(|e| Error::Config(format!("model catalogue TOML: {e}")))?;
        self.merge_file(file)
    }

    /// This catalogue with the models in JSON `text` added or replaced.
    pub fn merge_json(self, text: &str) -> Result<Self> {
        let file: CatalogFile = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("model catalogue JSON: {e}")))?;
        self.merge_file(file)
    }

    /// This catalogue with `spec` added or replaced.
    pub fn with_model(self, spec: ModelSpec) -> Result<Self> {
        self.merge_file(CatalogFile {
            prices_as_of: None,
            models: vec![spec],
        })
    }

    fn merge_file(self, file: CatalogFile) -> Result<Self> {
        let mut map: HashMap<String, Arc<ModelSpec>> = (*self.models).clone();
        for spec in file.models {
            spec.check()?;
            map.insert(spec.name.clone(), Arc::new(spec));
        }
        Ok(Catalog {
            models: Arc::new(map),
            prices_as_of: file.prices_as_of.or(self.prices_as_of),
            unknown: self.unknown,
        })
    }

    /// The model called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<ModelSpec>> {
        self.models.get(name)
    }

    /// Serves models the catalogue does not list, with `template`'s provider, limits,
    /// tier and prices (its name is ignored). Without this, requests naming an unknown
    /// model are refused with [`Error::UnknownModel`]. The template's input and output
    /// prices must be positive: an unknown model is never free.
    ///
    /// ```
    /// use tokenwise::{Catalog, ModelSpec, Pricing};
    /// let template = ModelSpec::new("*", "openai", 128_000, 16_384, Pricing::per_mtok(5.0, 15.0, 5.0).unwrap(), 3);
    /// let catalog = Catalog::builtin().with_unknown_models(template).unwrap();
    /// let m = catalog.resolve("my-new-model").unwrap();
    /// assert_eq!((m.name.as_str(), m.provider.as_str()), ("my-new-model", "openai"));
    /// ```
    pub fn with_unknown_models(mut self, template: ModelSpec) -> Result<Self> {
        template.check()?;
        if template.pricing.input == super::Price::ZERO
            || template.pricing.output == super::Price::ZERO
        {
            return Err(Error::Config(
                "the price for unknown models must be positive: an unknown model is never free"
                    .into(),
            ));
        }
        self.unknown = Some(Arc::new(template));
        Ok(self)
    }

    /// The model called `name`: listed, or made from the unknown-model template (see
    /// [`with_unknown_models`](Self::with_unknown_models)), or [`Error::UnknownModel`].
    pub fn resolve(&self, name: &str) -> Result<Arc<ModelSpec>> {
        if let Some(m) = self.models.get(name) {
            return Ok(Arc::clone(m));
        }
        match &self.unknown {
            Some(t) => Ok(Arc::new(ModelSpec {
                name: name.to_owned(),
                ..(**t).clone()
            })),
            None => Err(Error::UnknownModel(name.to_owned())),
        }
    }

    /// The model called `name`, or [`Error::UnknownModel`].
    pub fn require(&self, name: &str) -> Result<&Arc<ModelSpec>> {
        self.get(name)
            .ok_or_else(|| Error::UnknownModel(name.to_owned()))
    }

    /// All models, in no particular order.
    pub fn models(&self) -> impl Iterator<Item = &Arc<ModelSpec>> {
        self.models.values()
    }

    /// How many models.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The date the prices were taken, if known.
    pub fn prices_as_of(&self) -> Option<&str> {
        self.prices_as_of.as_deref()
    }

    /// Serializes the catalogue as TOML, in the format the loaders read.
    pub fn to_toml(&self) -> Result<String> {
        let mut models: Vec<ModelSpec> = self.models.values().map(|m| (**m).clone()).collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        toml::to_string(&CatalogFile {
            prices_as_of: self.prices_as_of.clone(),
            models,
        })
        .map_err(|e| Error::Config(format!("model catalogue TOML: {e}")))
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_has_both_providers_and_round_trips() {
        let c = Catalog::builtin();
        assert_eq!(c.prices_as_of(), Some(Catalog::BUILTIN_PRICES_AS_OF));
        let mini = c.require("gpt-4o-mini").unwrap();
        assert_eq!(
            mini.pricing.input,
            crate::types::Price::per_mtok(0.15).unwrap()
        );
        assert_eq!(c.require("claude-haiku-4-5").unwrap().provider, "anthropic");
        assert!(matches!(c.require("nope"), Err(Error::UnknownModel(_))));
        let text = c.to_toml().unwrap();
        let back = Catalog::from_toml(&text).unwrap();
        assert_eq!(back.len(), c.len());
        assert_eq!(back.get("o3"), c.get("o3"));
    }

    #[test]
    fn invalid_entries_are_refused_with_a_clear_error() {
        let err = Catalog::from_json(
            r#"{"models":[{"name":"x","provider":"p","context_window":10,"max_output":20,
            "input_per_mtok":1,"output_per_mtok":1,"cached_input_per_mtok":1,"tier":1}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_output"), "{err}");
        let err = Catalog::from_json(
            r#"{"models":[{"name":"x","provider":"p","context_window":10,"max_output":5,
            "input_per_mtok":-1,"output_per_mtok":1,"cached_input_per_mtok":1,"tier":1}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("non-negative"), "{err}");
        let err = Catalog::from_toml("bogus = 1").unwrap_err();
        assert!(matches!(err, Error::Config(_)));
    }

    #[test]
    fn worst_case_uses_max_output_when_unset() {
        let c = Catalog::builtin();
        let m = c.require("gpt-4o-mini").unwrap();
        assert_eq!(m.output_allowance(None), 16_384);
        assert_eq!(m.output_allowance(Some(100)), 100);
        assert_eq!(m.output_allowance(Some(1_000_000)), 16_384);
        assert!(m.worst_case_cost(1000, None) > m.worst_case_cost(1000, Some(10)));
    }

    #[test]
    fn batch_discount_defaults_by_provider_and_loads_from_files() {
        let c = Catalog::builtin();
        let mini = c.require("gpt-4o-mini").unwrap();
        let u = Usage::new(1_000_000, 1_000_000);
        assert_eq!(mini.batch_discount(), 50);
        assert_eq!(mini.batch_cost(&u).as_nanos() * 2, mini.cost(&u).as_nanos());
        assert_eq!(c.require("claude-haiku-4-5").unwrap().batch_discount(), 50);
        // an older file without the field still loads; a set field is kept and written back
        let c = Catalog::from_toml(
            r#"[[models]]
            name = "local"
            provider = "vllm"
            context_window = 1000
            max_output = 100
            input_per_mtok = 1.0
            output_per_mtok = 2.0
            cached_input_per_mtok = 0.5
            tier = 1
            [[models]]
            name = "cheap-batch"
            provider = "openai"
            context_window = 1000
            max_output = 100
            input_per_mtok = 1.0
            output_per_mtok = 2.0
            cached_input_per_mtok = 0.5
            tier = 1
            batch_discount_percent = 75"#,
        )
        .unwrap();
        let local = c.require("local").unwrap();
        assert_eq!(local.batch_discount(), 0);
        assert_eq!(local.batch_cost(&u), local.cost(&u));
        let cheap = c.require("cheap-batch").unwrap();
        assert_eq!(cheap.batch_discount(), 75);
        assert_eq!(cheap.batch_cost(&u), Cost::from_nanos(750_000_000));
        let back = Catalog::from_toml(&c.to_toml().unwrap()).unwrap();
        assert_eq!(back.require("cheap-batch").unwrap().batch_discount(), 75);
        assert!(!c.to_toml().unwrap().contains("batch_discount_percent = 0"));
        let err = Catalog::from_json(
            r#"{"models":[{"name":"x","provider":"p","context_window":10,"max_output":5,
            "input_per_mtok":1,"output_per_mtok":1,"cached_input_per_mtok":1,"tier":1,
            "batch_discount_percent":150}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("batch_discount_percent"), "{err}");
    }
}
