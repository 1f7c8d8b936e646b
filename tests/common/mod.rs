//! Helpers shared by the pipeline tests: the simulated provider at a known pace, a
//! pipeline builder on it, and what one user has spent.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use tokenwise::provider::SimulatedProvider;
use tokenwise::{ChatRequest, Cost, Pipeline, PipelineBuilder};

/// The simulated provider: first token after 100 ms, then 5 ms a token.
pub fn sim() -> SimulatedProvider {
    sim_paced(Duration::from_millis(100), Duration::from_millis(5))
}

/// The simulated provider at the given pace.
pub fn sim_paced(first_token: Duration, per_token: Duration) -> SimulatedProvider {
    SimulatedProvider::builder()
        .time_to_first_token(first_token)
        .per_token(per_token)
        .build()
        .unwrap()
}

/// A pipeline builder over `p` with `model` as the default model.
pub fn builder(p: &SimulatedProvider, model: &str) -> PipelineBuilder {
    Pipeline::builder().provider(p.clone()).default_model(model)
}

/// `(spent, reserved)` of `user`'s first budget.
pub async fn spent(p: &Pipeline, user: &str) -> (Cost, Cost) {
    let st = p
        .budget_status(&ChatRequest::user_text("").user(user).meta)
        .await
        .unwrap();
    (st[0].spent, st[0].reserved)
}

/// Drains a stream: its text, its final event, or its error.
pub async fn drain(
    mut s: tokenwise::ChatStream,
) -> (
    String,
    Option<tokenwise::StreamEnd>,
    Option<tokenwise::Error>,
) {
    use futures_util::StreamExt;
    let mut text = String::new();
    while let Some(ev) = s.next().await {
        match ev {
            Ok(tokenwise::StreamEvent::TextDelta { text: t }) => text.push_str(&t),
            Ok(tokenwise::StreamEvent::Done(end)) => return (text, Some(end), None),
            Ok(_) => {}
            Err(e) => return (text, None, Some(e)),
        }
    }
    (text, None, None)
}
