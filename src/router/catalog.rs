//! The default router: the requested (or default) model, then configured fallbacks.

use std::collections::HashMap;
use std::sync::Arc;

use super::{MAX_TARGETS, RoutePlan, Router};
use crate::types::{Catalog, ChatRequest, ModelSpec};
use crate::{Error, Result};

/// Builds a [`CatalogRouter`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct CatalogRouterBuilder {
    default_model: Option<String>,
    fallbacks: HashMap<String, Vec<String>>,
    escalations: HashMap<String, Vec<String>>,
}

impl CatalogRouterBuilder {
    /// The model for requests that name none.
    pub fn default_model(mut self, model: impl Into<String>) -> Self {
        self.default_model = Some(model.into());
        self
    }

    /// When `model` fails, try `fallbacks` in order.
    pub fn fallbacks<I, S>(mut self, model: impl Into<String>, fallbacks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.fallbacks.insert(
            model.into(),
            fallbacks.into_iter().map(Into::into).collect(),
        );
        self
    }

    /// When a validator rejects `model`'s answer, escalate to `models` in order.
    pub fn escalate<I, S>(mut self, model: impl Into<String>, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.escalations
            .insert(model.into(), models.into_iter().map(Into::into).collect());
        self
    }

    /// Checks every named model against `catalog` and builds the router.
    pub fn build(self, catalog: &Catalog) -> Result<CatalogRouter> {
        let names = self
            .default_model
            .iter()
            .chain(self.fallbacks.keys())
            .chain(self.fallbacks.values().flatten())
            .chain(self.escalations.keys())
            .chain(self.escalations.values().flatten());
        for name in names {
            if catalog.get(name).is_none() {
                return Err(Error::Config(format!(
                    "router names model `{name}`, which the catalogue does not have"
                )));
            }
        }
        Ok(CatalogRouter {
            default_model: self.default_model,
            fallbacks: self.fallbacks,
            escalations: self.escalations,
        })
    }
}

/// Routes to the model the request names (or the default model), followed by the
/// fallbacks configured for it; escalates to the models configured for it.
///
/// ```
/// use tokenwise::Catalog;
/// use tokenwise::router::{CatalogRouter, Router};
/// let catalog = Catalog::builtin();
/// let router = CatalogRouter::builder()
///     .default_model("gpt-4o-mini")
///     .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
///     .escalate("gpt-4o-mini", ["gpt-4o"])
///     .build(&catalog)
///     .unwrap();
/// let plan = router.route(&tokenwise::ChatRequest::user_text("hi"), &catalog).unwrap();
/// let names: Vec<_> = plan.targets.iter().map(|m| m.name.as_str()).collect();
/// assert_eq!(names, ["gpt-4o-mini", "claude-haiku-4-5"]);
/// assert_eq!(plan.escalation[0].name, "gpt-4o");
/// ```
#[derive(Debug, Clone)]
pub struct CatalogRouter {
    default_model: Option<String>,
    fallbacks: HashMap<String, Vec<String>>,
    escalations: HashMap<String, Vec<String>>,
}

impl CatalogRouter {
    /// A builder with no default model and no fallbacks.
    pub fn builder() -> CatalogRouterBuilder {
        CatalogRouterBuilder::default()
    }

    fn resolve(catalog: &Catalog, names: &[String], out: &mut Vec<Arc<ModelSpec>>) -> Result<()> {
        for name in names {
            if out.len() >= MAX_TARGETS {
                break;
            }
            let spec = catalog.resolve(name)?;
            if !out.iter().any(|m| m.name == spec.name) {
                out.push(spec);
            }
        }
        Ok(())
    }
}

impl Router for CatalogRouter {
    fn route(&self, req: &ChatRequest, catalog: &Catalog) -> Result<RoutePlan> {
        let model = match (&req.model, &self.default_model) {
            (Some(m), _) => m,
            (None, Some(d)) => d,
            (None, None) => {
                return Err(Error::InvalidRequest(
                    "the request names no model and the router has no default model".into(),
                ));
            }
        };
        let mut targets = Vec::with_capacity(4);
        Self::resolve(catalog, std::slice::from_ref(model), &mut targets)?;
        if let Some(f) = self.fallbacks.get(model) {
            Self::resolve(catalog, f, &mut targets)?;
        }
        let mut escalation = Vec::new();
        if let Some(e) = self.escalations.get(model) {
            Self::resolve(catalog, e, &mut escalation)?;
        }
        Ok(RoutePlan {
            targets,
            escalation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_models_are_refused() {
        let c = Catalog::builtin();
        assert!(
            CatalogRouter::builder()
                .default_model("nope")
                .build(&c)
                .is_err()
        );
        let r = CatalogRouter::builder().build(&c).unwrap();
        assert!(matches!(
            r.route(&ChatRequest::user_text("x").model("nope"), &c),
            Err(Error::UnknownModel(_))
        ));
        assert!(matches!(
            r.route(&ChatRequest::user_text("x"), &c),
            Err(Error::InvalidRequest(_))
        ));
    }
}
