//! The limiter as a tower layer.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{Admission, Limiter};
use crate::context::{TiktokenCounter, TokenCounter, token_estimate};
use crate::types::{Catalog, ChatRequest, ChatResponse};
use crate::{BoxFuture, Error};

/// Admits requests through a [`Limiter`] before the inner service sees them, and
/// reconciles the token charge to the response's usage (or refunds it on failure).
///
/// ```
/// use std::sync::Arc;
/// use tower::ServiceBuilder;
/// use tokenwise::limiter::{GcraLimiter, RateLimitLayer};
/// use tokenwise::provider::{ProviderService, SimulatedProvider};
/// use tokenwise::{Catalog, ScopeKind};
///
/// let limiter = GcraLimiter::builder().requests_per_minute(ScopeKind::User, 60).build().unwrap();
/// let svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(Arc::new(limiter), Catalog::builtin()))
///     .service(ProviderService::new(SimulatedProvider::new(), Catalog::builtin()));
/// ```
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<dyn Limiter>,
    catalog: Catalog,
    counter: Arc<dyn TokenCounter>,
}

impl RateLimitLayer {
    /// A layer admitting through `limiter`, estimating tokens with the models in `catalog`.
    pub fn new(limiter: Arc<dyn Limiter>, catalog: Catalog) -> Self {
        RateLimitLayer {
            limiter,
            catalog,
            counter: Arc::new(TiktokenCounter::new()),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> RateLimitService<S> {
        RateLimitService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimitService<S> {
    inner: S,
    layer: RateLimitLayer,
}

impl<S> RateLimitService<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<ChatRequest> for RateLimitService<S>
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
            let charged = token_estimate(&*layer.counter, &layer.catalog, &req);
            layer
                .limiter
                .acquire(&Admission::new(&req.meta, charged))
                .await?;
            let meta = req.meta.clone();
            let result = inner.call(req).await;
            let actual = result.as_ref().map_or(0, |r| {
                if r.served.is_cache_hit() {
                    0
                } else {
                    r.usage.total()
                }
            });
            if actual != charged {
                if let Err(e) = layer.limiter.reconcile(&meta, charged, actual).await {
                    tracing::warn!(error = %e, "token reconciliation failed");
                }
            }
            result
        })
    }
}
