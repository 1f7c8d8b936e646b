//! `Pipeline` as a `tower::Service`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower_service::Service;

use super::Pipeline;
use crate::Error;
use crate::types::{ChatRequest, ChatResponse};

impl Service<ChatRequest> for Pipeline {
    type Response = ChatResponse;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<ChatResponse, Error>> + Send>>;

    /// Always ready: admission (concurrency and rate limits) happens inside `call`, and
    /// refuses with a typed error rather than queue.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.chat(req).await })
    }
}
