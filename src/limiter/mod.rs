//! Admission: the [`Limiter`] trait and the in-memory [`GcraLimiter`].
//!
//! A limiter decides whether a request may start now. It counts requests and tokens
//! per scope (global, org, user, ip, feature). Every scope a request falls under is
//! checked and consumed together: a request refused by one scope consumes nothing of
//! any other. Token quotas are charged an estimate up front (prompt tokens plus the
//! output allowance) and reconciled to the actual usage afterwards.

pub(crate) mod core;
mod gcra;
mod layer;
#[cfg(feature = "redis")]
mod redis;
mod target;

use std::fmt;
use std::num::NonZeroU64;
use std::time::Duration;

use async_trait::async_trait;

pub(crate) use core::{QuotaTable, Shortfall};
pub(crate) use gcra::wait_until_admitted;
pub use gcra::{GcraLimiter, GcraLimiterBuilder};
pub use layer::{RateLimitLayer, RateLimitService};
#[cfg(feature = "redis")]
pub use redis::RedisLimiter;
pub use target::{TargetLimits, TargetLimitsBuilder};

use crate::types::{RequestMeta, ScopeKind};
use crate::{Error, Result};

/// An amount per period with a burst allowance. Cannot be built invalid.
///
/// ```
/// use std::num::NonZeroU64;
/// use tokenwise::limiter::Quota;
/// let q = Quota::per_minute(NonZeroU64::new(60).unwrap()).allow_burst(NonZeroU64::new(10).unwrap());
/// assert_eq!(q.burst().get(), 10);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    amount: NonZeroU64,
    period: Duration,
    burst: NonZeroU64,
}

impl Quota {
    /// `amount` per `period`, with a burst of `amount`. `None` for a zero period.
    pub fn new(amount: NonZeroU64, period: Duration) -> Option<Self> {
        if period.is_zero() {
            return None;
        }
        Some(Quota {
            amount,
            period,
            burst: amount,
        })
    }

    /// `amount` per second.
    pub fn per_second(amount: NonZeroU64) -> Self {
        Quota {
            amount,
            period: Duration::from_secs(1),
            burst: amount,
        }
    }

    /// `amount` per minute.
    pub fn per_minute(amount: NonZeroU64) -> Self {
        Quota {
            amount,
            period: Duration::from_secs(60),
            burst: amount,
        }
    }

    /// `amount` per hour.
    pub fn per_hour(amount: NonZeroU64) -> Self {
        Quota {
            amount,
            period: Duration::from_secs(3600),
            burst: amount,
        }
    }

    /// `amount` per day.
    pub fn per_day(amount: NonZeroU64) -> Self {
        Quota {
            amount,
            period: Duration::from_secs(86_400),
            burst: amount,
        }
    }

    /// Allows `burst` at once (default: the whole amount).
    #[must_use]
    pub fn allow_burst(mut self, burst: NonZeroU64) -> Self {
        self.burst = burst;
        self
    }

    /// The amount per period.
    pub fn amount(&self) -> NonZeroU64 {
        self.amount
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The burst.
    pub fn burst(&self) -> NonZeroU64 {
        self.burst
    }
}

/// What a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unit {
    /// Requests.
    Requests,
    /// Tokens (prompt plus output).
    Tokens,
}

/// A quota on one scope kind: e.g. 60 requests a minute per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LimitRule {
    /// Which scope the quota applies to (each user, each org, everything, ...).
    pub scope: ScopeKind,
    /// What it counts.
    pub unit: Unit,
    /// How much.
    pub quota: Quota,
}

/// What a limiter is asked.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Admission<'a> {
    /// Who asks.
    pub meta: &'a RequestMeta,
    /// The token estimate to charge: prompt tokens plus the output allowance.
    pub tokens: u64,
}

impl<'a> Admission<'a> {
    /// An admission of a request by `meta` charging `tokens`.
    pub fn new(meta: &'a RequestMeta, tokens: u64) -> Self {
        Admission { meta, tokens }
    }
}

/// Decides whether a request may start now.
///
/// `acquire` must be all-or-nothing across scopes and refuse with
/// [`Error::RateLimited`] naming the scope and an exact `retry_after`.
///
/// # Implementing
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use tokenwise::limiter::{Admission, Limiter};
/// use tokenwise::{Error, RequestMeta, Scope};
///
/// /// At most `max` requests, ever. Tokens are not limited.
/// #[derive(Debug)]
/// struct Lifetime { used: AtomicU64, max: u64 }
///
/// #[async_trait]
/// impl Limiter for Lifetime {
///     async fn acquire(&self, _req: &Admission<'_>) -> tokenwise::Result<()> {
///         let prev = self.used.fetch_add(1, Ordering::SeqCst);
///         if prev >= self.max {
///             self.used.fetch_sub(1, Ordering::SeqCst);
///             return Err(Error::RateLimited { scope: Scope::Global, retry_after: Duration::MAX });
///         }
///         Ok(())
///     }
///     async fn reconcile(&self, _meta: &RequestMeta, _charged: u64, _actual: u64) -> tokenwise::Result<()> {
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Limiter: Send + Sync + fmt::Debug {
    /// Admits the request and consumes one request and `tokens` tokens from every scope
    /// it falls under, or refuses it and consumes nothing.
    async fn acquire(&self, req: &Admission<'_>) -> Result<()>;

    /// Corrects the token charge of an admitted request from `charged` to `actual`
    /// (a refund when less was used).
    async fn reconcile(&self, meta: &RequestMeta, charged: u64, actual: u64) -> Result<()>;

    /// What [`acquire`](Self::acquire) would return, decided at once, for a limiter
    /// that never waits to decide (one in memory); `None`, the default, has the caller
    /// await `acquire` instead. The pipeline asks this first, which spares it a boxed
    /// future per request. An override must do exactly what `acquire` does.
    fn acquire_ready(&self, req: &Admission<'_>) -> Option<Result<()>> {
        let _ = req;
        None
    }

    /// What [`reconcile`](Self::reconcile) would return, done at once; `None`, the
    /// default, has the caller await `reconcile` (see
    /// [`acquire_ready`](Self::acquire_ready)).
    fn reconcile_ready(&self, meta: &RequestMeta, charged: u64, actual: u64) -> Option<Result<()>> {
        let _ = (meta, charged, actual);
        None
    }
}

pub(crate) fn nonzero(n: u64, what: &str) -> Result<NonZeroU64> {
    NonZeroU64::new(n).ok_or_else(|| Error::Config(format!("{what} must be at least 1")))
}
