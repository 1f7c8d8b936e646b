//! The budget as a tower layer.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::Budget;
use crate::context::{TiktokenCounter, TokenCounter};
use crate::types::{Catalog, ChatRequest, ChatResponse, Cost};
use crate::{BoxFuture, Error};

/// Reserves a request's worst-case cost before the inner service runs and commits the
/// actual cost after (nothing on failure). Requests must name a catalogue model: a
/// layer cannot know which model an inner router would choose.
#[derive(Debug, Clone)]
pub struct BudgetLayer {
    budget: Arc<dyn Budget>,
    catalog: Catalog,
    counter: Arc<dyn TokenCounter>,
}

impl BudgetLayer {
    /// A layer spending from `budget` at the prices in `catalog`.
    pub fn new(budget: Arc<dyn Budget>, catalog: Catalog) -> Self {
        BudgetLayer {
            budget,
            catalog,
            counter: Arc::new(TiktokenCounter::new()),
        }
    }
}

impl<S> Layer<S> for BudgetLayer {
    type Service = BudgetService<S>;

    fn layer(&self, inner: S) -> BudgetService<S> {
        BudgetService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`BudgetLayer`].
#[derive(Debug, Clone)]
pub struct BudgetService<S> {
    inner: S,
    layer: BudgetLayer,
}

impl<S> BudgetService<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<ChatRequest> for BudgetService<S>
where
    S: Service<ChatRequest, Response = ChatResponse, Error = Error> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = ChatResponse;
    type Error = Error;
    type Future = BoxFuture<Result<ChatResponse, Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let name = req.model.as_deref().ok_or_else(|| {
                Error::InvalidRequest(
                    "the budget layer needs requests that name their model".into(),
                )
            })?;
            let model = Arc::clone(layer.catalog.require(name)?);
            let prompt = layer.counter.count_request(&req, model.tokenizer);
            let worst = model.worst_case_cost(prompt, req.params.max_tokens);
            let reservation = layer.budget.reserve(&req.meta, worst).await?;
            let result = inner.call(req).await;
            let actual = match &result {
                Ok(r) if r.served.is_cache_hit() => Cost::ZERO,
                Ok(r) if !r.cost.is_zero() => r.cost,
                Ok(r) => model.cost(&r.usage),
                Err(_) => Cost::ZERO,
            };
            if let Err(e) = layer.budget.commit(reservation, actual).await {
                tracing::error!(error = %e, cost = %actual, "budget commit failed");
            }
            result
        })
    }
}
