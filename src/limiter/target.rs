//! Provider-side quotas: stay under the requests and tokens per minute each deployment
//! (provider key, model) allows, so the provider never has to answer 429.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use super::core::{Compiled, Core, Item, Refusal};
use super::{Quota, Unit, nonzero};
use crate::clock::{Clock, default_clock};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::{Error, Result};

/// Builds [`TargetLimits`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct TargetLimitsBuilder {
    limits: Vec<(String, Unit, Quota)>,
    clock: Option<Arc<dyn Clock>>,
    error: Option<String>,
}

impl TargetLimitsBuilder {
    /// At most `rpm` requests a minute to `model`.
    pub fn requests_per_minute(mut self, model: impl Into<String>, rpm: u64) -> Self {
        match nonzero(rpm, "requests per minute") {
            Ok(n) => self
                .limits
                .push((model.into(), Unit::Requests, Quota::per_minute(n))),
            Err(e) => self.error = self.error.or(Some(e.to_string())),
        }
        self
    }

    /// At most `tpm` tokens (prompt plus output allowance) a minute to `model`.
    pub fn tokens_per_minute(mut self, model: impl Into<String>, tpm: u64) -> Self {
        match nonzero(tpm, "tokens per minute") {
            Ok(n) => self
                .limits
                .push((model.into(), Unit::Tokens, Quota::per_minute(n))),
            Err(e) => self.error = self.error.or(Some(e.to_string())),
        }
        self
    }

    /// The clock (default: [`TscClock`](crate::TscClock), or [`TokioClock`](crate::TokioClock) when built under paused tokio time; see [`clock`](crate::clock)).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the limits.
    pub fn build(self) -> Result<TargetLimits> {
        if let Some(e) = self.error {
            return Err(Error::Config(format!("target limits: {e}")));
        }
        let mut by_model: HashMap<String, Vec<(usize, Unit)>> = HashMap::new();
        let mut quotas = Vec::with_capacity(self.limits.len());
        for (i, (model, unit, quota)) in self.limits.iter().enumerate() {
            // each quota is one model's own: a single key
            quotas.push((Compiled::new(quota), true));
            by_model.entry(model.clone()).or_default().push((i, *unit));
        }
        Ok(TargetLimits {
            inner: Arc::new(Inner {
                core: Core::new(quotas, self.limits.len().max(1)),
                by_model,
                clock: self.clock.unwrap_or_else(default_clock),
            }),
        })
    }
}

#[derive(Debug)]
struct Inner {
    core: Core,
    by_model: HashMap<String, Vec<(usize, Unit)>>,
    clock: Arc<dyn Clock>,
}

/// Per-model request and token quotas that the pipeline checks before it calls a
/// target. A target over its quota is skipped like a target that answered 429 (the
/// error is a [`ProviderErrorKind::RateLimited`] with the exact `retry_after`), so the
/// next target is tried and the provider is never sent a request it would refuse.
/// Token charges are reconciled to actual use.
///
/// ```
/// use tokenwise::limiter::TargetLimits;
/// let limits = TargetLimits::builder()
///     .requests_per_minute("gpt-4o", 500)
///     .tokens_per_minute("gpt-4o", 30_000)
///     .build()
///     .unwrap();
/// assert!(limits.check("gpt-4o", 1_000).is_ok());
/// assert!(limits.check("unlisted-model", 1_000_000).is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct TargetLimits {
    inner: Arc<Inner>,
}

impl TargetLimits {
    /// A builder with no limits.
    pub fn builder() -> TargetLimitsBuilder {
        TargetLimitsBuilder::default()
    }

    fn items<'a>(&self, model: &'a str, tokens: u64, only_tokens: bool) -> SmallVec<[Item<'a>; 4]> {
        let mut items = SmallVec::new();
        if let Some(quotas) = self.inner.by_model.get(model) {
            for &(quota, unit) in quotas {
                let units = match unit {
                    Unit::Requests if only_tokens => continue,
                    Unit::Requests => 1,
                    Unit::Tokens => tokens,
                };
                items.push(Item {
                    quota,
                    key: "*",
                    units,
                    mult: 1000,
                });
            }
        }
        items
    }

    /// Admits one request of `tokens` to `model` and consumes it, or refuses with a
    /// rate-limited provider error and consumes nothing. Models without limits pass.
    pub fn check(&self, model: &str, tokens: u64) -> Result<()> {
        let items = self.items(model, tokens, false);
        if items.is_empty() {
            return Ok(());
        }
        let now = self.inner.clock.now().as_nanos();
        self.inner.core.check(now, &items).map_err(|r| {
            let (msg, wait) = match r {
                Refusal::Wait { wait, .. } => {
                    (format!("local quota for {model} is used up"), Some(wait))
                }
                Refusal::TooLarge { most, .. } => (
                    format!(
                        "request needs more tokens than {model}'s quota allows at once ({most})"
                    ),
                    None,
                ),
                Refusal::Full => (
                    format!("quota table for {model} is full"),
                    Some(Duration::from_secs(1)),
                ),
            };
            let mut e = ProviderError::new(ProviderErrorKind::RateLimited, "tokenwise", msg);
            if let Some(w) = wait {
                e = e.with_retry_after(w);
            }
            e.into()
        })
    }

    /// Corrects a token charge to `model` from `charged` to `actual`.
    pub fn reconcile(&self, model: &str, charged: u64, actual: u64) {
        if charged == actual {
            return;
        }
        let items = self.items(model, charged.abs_diff(actual), true);
        let now = self.inner.clock.now().as_nanos();
        self.inner.core.adjust(now, &items, actual > charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Timestamp};

    #[test]
    fn per_model_quotas_refuse_like_a_429() {
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let l = TargetLimits::builder()
            .requests_per_minute("m", 2)
            .tokens_per_minute("m", 1_000)
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        l.check("m", 100).unwrap();
        l.check("m", 100).unwrap();
        let e = l.check("m", 100).unwrap_err();
        assert_eq!(
            e.as_provider().map(|p| p.kind),
            Some(ProviderErrorKind::RateLimited)
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(30)));
        clock.advance(Duration::from_secs(30));
        l.check("m", 100).unwrap();
        assert!(l.check("other", 1_000_000).is_ok());

        let l = TargetLimits::builder()
            .tokens_per_minute("t", 1_000)
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        l.check("t", 400).unwrap();
        l.check("t", 400).unwrap();
        // 800 charged of 1000: 350 more does not fit, until 150 are refunded
        assert!(l.check("t", 350).is_err());
        l.reconcile("t", 400, 250);
        l.check("t", 350).unwrap();
    }
}
