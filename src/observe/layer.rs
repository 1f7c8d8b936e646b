//! Observability as a tower layer.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use super::{InFlight, Outcome, UsageRecord, UsageSink, finish, request_span};
use crate::clock::{Clock, TokioClock};
use crate::types::{ChatRequest, ChatResponse, Cost, Served};
use crate::{BoxFuture, Error};

/// Runs the inner service inside a `gen_ai.chat` span, emits the request metrics and
/// sends one [`UsageRecord`] per request to a [`UsageSink`]: the same span, metrics and
/// record a [`Pipeline`](crate::Pipeline) produces, for hand-built tower stacks. (The
/// inner services make no `gen_ai.attempt` spans and know nothing of routes.)
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    sink: Arc<dyn UsageSink>,
    clock: Arc<dyn Clock>,
}

impl ObserveLayer {
    /// A layer recording into `sink`.
    pub fn new(sink: Arc<dyn UsageSink>) -> Self {
        ObserveLayer {
            sink,
            clock: Arc::new(TokioClock::new()),
        }
    }

    /// Reads time from `clock` instead of the tokio clock.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> ObserveService<S> {
        ObserveService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct ObserveService<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S> ObserveService<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<ChatRequest> for ObserveService<S>
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
        let span = request_span(&req, false);
        Box::pin(
            async move {
                let _in_flight = InFlight::start();
                let mut rec = UsageRecord::new(layer.clock.now(), &req.meta, false);
                let result = inner.call(req).await;
                rec.latency = layer.clock.now().saturating_since(rec.started_at);
                let mut finish_reason = None;
                match &result {
                    Ok(r) => {
                        rec.model = Some(r.model.clone());
                        rec.provider = Some(r.provider.clone());
                        finish_reason = Some(r.finish_reason.to_string());
                        rec.set_served(&r.served);
                        match &r.served {
                            Served::Cache { .. } => rec.cost = Cost::ZERO,
                            Served::Provider { attempts, .. } => {
                                rec.outcome = Outcome::Provider;
                                rec.usage = r.usage;
                                rec.cost = r.cost;
                                rec.attempts = *attempts;
                            }
                        }
                    }
                    Err(e) => rec.set_error(e),
                }
                finish(
                    &tracing::Span::current(),
                    &mut rec,
                    finish_reason.as_deref(),
                );
                layer.sink.record(&rec);
                result
            }
            .instrument(span),
        )
    }
}
