//! A provider as a tower service: the innermost service of a hand-built stack.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::{Provider, ProviderCall};
use crate::types::{Catalog, ChatRequest, ChatResponse};
use crate::{BoxFuture, Error};

/// Calls a [`Provider`] with the model the request names, and prices the answer from
/// the catalogue. Use it under the tokenwise layers in your own tower stack.
#[derive(Debug, Clone)]
pub struct ProviderService {
    provider: Arc<dyn Provider>,
    catalog: Catalog,
}

impl ProviderService {
    /// A service calling `provider`, pricing with `catalog`.
    pub fn new(provider: impl Provider + 'static, catalog: Catalog) -> Self {
        ProviderService {
            provider: Arc::new(provider),
            catalog,
        }
    }

    /// Like [`new`](Self::new), for a shared provider.
    pub fn from_arc(provider: Arc<dyn Provider>, catalog: Catalog) -> Self {
        ProviderService { provider, catalog }
    }
}

impl Service<ChatRequest> for ProviderService {
    type Response = ChatResponse;
    type Error = Error;
    type Future = BoxFuture<Result<ChatResponse, Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let provider = Arc::clone(&self.provider);
        let catalog = self.catalog.clone();
        Box::pin(async move {
            req.validate()?;
            let name = req
                .model
                .as_deref()
                .ok_or_else(|| Error::InvalidRequest("the request names no model".into()))?;
            let model = Arc::clone(catalog.require(name)?);
            let mut r = provider.chat(ProviderCall::new(&req, &model)).await?;
            r.cost = model.cost(&r.usage);
            Ok(r)
        })
    }
}
