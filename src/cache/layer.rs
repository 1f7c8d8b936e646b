//! The cache as a tower layer.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{Cache, CacheQuery, CacheScope, is_cacheable};
use crate::types::{CacheMode, ChatRequest, ChatResponse, Cost, Served};
use crate::{BoxFuture, Error};

/// Answers from a [`Cache`] when it can; otherwise calls the inner service and stores
/// complete answers. Cache failures are logged and treated as misses.
#[derive(Debug, Clone)]
pub struct CacheLayer {
    cache: Arc<dyn Cache>,
    scope: CacheScope,
}

impl CacheLayer {
    /// A layer over `cache` with tenant `scope`.
    pub fn new(cache: Arc<dyn Cache>, scope: CacheScope) -> Self {
        CacheLayer { cache, scope }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> CacheService<S> {
        CacheService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`CacheLayer`].
#[derive(Debug, Clone)]
pub struct CacheService<S> {
    inner: S,
    layer: CacheLayer,
}

impl<S> CacheService<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<ChatRequest> for CacheService<S>
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
            let model = req.model.as_deref().unwrap_or(crate::cache::key::AUTO);
            let context = layer.cache.reads_context();
            let Some(q) = CacheQuery::keyed(&req, layer.scope, model, None, context) else {
                return inner.call(req).await;
            };
            let mut rejected = None;
            if req.meta.cache.mode == CacheMode::Use {
                match layer.cache.lookup(&q).await {
                    Ok(found) => {
                        rejected = found.rejected;
                        if let Some(hit) = found.answer {
                            let mut r = hit.response;
                            r.served = Served::Cache {
                                similarity: hit.similarity,
                                saved_tokens: r.usage.total(),
                                saved_cost: r.cost,
                            };
                            r.cost = Cost::ZERO;
                            r.guard_rejected = rejected;
                            return Ok(r);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cache read failed; treated as a miss"),
                }
            }
            let mut resp = inner.call(req).await?;
            resp.guard_rejected = rejected;
            if is_cacheable(&resp) && !resp.served.is_cache_hit() {
                if let Err(e) = layer.cache.put(&q, &resp).await {
                    tracing::warn!(error = %e, "cache write failed");
                }
            }
            Ok(resp)
        })
    }
}
