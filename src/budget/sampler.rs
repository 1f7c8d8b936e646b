//! Sampling spend caps into the budget gauges on a timer, off the request path.

use std::time::Duration;

use crate::observe::metrics::record_budget_status;
use crate::{Error, Pipeline, RequestMeta, Result};

/// The most scopes one [`BudgetSampler`] watches.
pub const MAX_SAMPLED_SCOPES: usize = 1_000;

/// Samples spend caps into the budget gauges on a timer, off the request path.
///
/// Each tick asks the pipeline's budget for the standing of every cap that applies to
/// each of the given request metadata (a default [`RequestMeta`] covers the global
/// caps; one with `org` set adds that organisation's) and calls
/// [`record_budget_status`]. The task stops when the sampler is dropped.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tokenwise::Result<()> {
/// use std::time::Duration;
/// use tokenwise::budget::BudgetWindow;
/// use tokenwise::budget::BudgetSampler;
/// use tokenwise::provider::SimulatedProvider;
/// use tokenwise::{ChatRequest, Cost, Pipeline, RequestMeta, ScopeKind};
///
/// let pipeline = Pipeline::builder()
///     .provider(SimulatedProvider::new())
///     .default_model("gpt-4o-mini")
///     .spend_cap(ScopeKind::Global, Cost::from_dollars(50), BudgetWindow::Day)
///     .build()?;
/// let acme = ChatRequest::new().org("acme").meta; // the caps that apply to acme
/// let _sampler = BudgetSampler::spawn(
///     pipeline.clone(),
///     vec![RequestMeta::default(), acme],
///     Duration::from_secs(15),
/// )?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BudgetSampler {
    task: tokio::task::JoinHandle<()>,
}

impl BudgetSampler {
    /// Samples the caps that apply to each of `scopes` every `every`, starting now, on
    /// the current tokio runtime. Fails with [`Error::Config`] outside a runtime, for a
    /// zero period, or for more than [`MAX_SAMPLED_SCOPES`] scopes.
    pub fn spawn(pipeline: Pipeline, scopes: Vec<RequestMeta>, every: Duration) -> Result<Self> {
        if every.is_zero() {
            return Err(Error::Config(
                "the budget sampling period must be positive".into(),
            ));
        }
        if scopes.len() > MAX_SAMPLED_SCOPES {
            return Err(Error::Config(format!(
                "a budget sampler watches at most {MAX_SAMPLED_SCOPES} scopes, got {}",
                scopes.len()
            )));
        }
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config("a budget sampler needs a tokio runtime to run on".into())
        })?;
        let task = handle.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                Self::sample(&pipeline, &scopes).await;
            }
        });
        Ok(BudgetSampler { task })
    }

    /// Samples once: records the standing of every cap that applies to each of
    /// `scopes`. A budget backend that fails is logged and skipped.
    pub async fn sample(pipeline: &Pipeline, scopes: &[RequestMeta]) {
        for meta in scopes {
            match pipeline.budget_status(meta).await {
                Ok(caps) => record_budget_status(&caps),
                Err(e) => tracing::warn!(error = %e, "budget sampling failed"),
            }
        }
    }
}

impl Drop for BudgetSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}
