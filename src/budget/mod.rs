//! Spend caps: the [`Budget`] trait and the in-memory [`MemoryBudget`].
//!
//! Before a call, the pipeline reserves its worst-case cost (prompt tokens plus the
//! output allowance at the dearest candidate model's prices) against every cap that
//! applies; after it, it commits the actual cost, which releases the rest. A reservation
//! either succeeds on every cap or on none. Caps are never overshot by more than the
//! difference between a reservation and the actual cost, which is zero when token
//! counts are exact.

mod layer;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod sampler;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use layer::{BudgetLayer, BudgetService};
pub use memory::{AlertHook, MemoryBudget, MemoryBudgetBuilder};
#[cfg(feature = "redis")]
pub use redis::RedisBudget;
pub use sampler::{BudgetSampler, MAX_SAMPLED_SCOPES};

use crate::Result;
use crate::clock::Timestamp;
use crate::types::{Cost, RequestMeta, Scope, ScopeKind};

/// The window a cap counts spend over, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BudgetWindow {
    /// A calendar day, resetting at 00:00 UTC.
    Day,
    /// A calendar month, resetting at 00:00 UTC on the first.
    Month,
    /// Forever: the cap never resets.
    Total,
    /// A sliding window of this length: spend ages out in 60 steps of one sixtieth of it.
    Rolling(Duration),
}

impl BudgetWindow {
    /// An index that changes exactly when the window resets.
    pub fn index(self, at: Timestamp) -> u64 {
        match self {
            BudgetWindow::Day => at.as_secs() / 86_400,
            BudgetWindow::Month => {
                let (y, m, _) = civil_from_days(at.as_secs() / 86_400);
                y * 12 + (m - 1)
            }
            BudgetWindow::Total | BudgetWindow::Rolling(_) => 0,
        }
    }

    /// Time from `at` until the window resets; `None` for [`BudgetWindow::Total`].
    pub fn until_reset(self, at: Timestamp) -> Option<Duration> {
        let secs = at.as_secs();
        let next = match self {
            BudgetWindow::Day => (secs / 86_400 + 1) * 86_400,
            BudgetWindow::Month => {
                let (y, m, _) = civil_from_days(secs / 86_400);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(ny, nm, 1) * 86_400
            }
            BudgetWindow::Total => return None,
            // The soonest any spend ages out: one step of the window.
            BudgetWindow::Rolling(w) => {
                return Some((w / ROLLING_STEPS).max(Duration::from_nanos(1)));
            }
        };
        Some(Timestamp::from_secs(next).saturating_since(at))
    }

    /// A stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetWindow::Day => "day",
            BudgetWindow::Month => "month",
            BudgetWindow::Total => "total",
            BudgetWindow::Rolling(_) => "rolling",
        }
    }
}

/// Steps a rolling window is divided into.
pub(crate) const ROLLING_STEPS: u32 = 60;

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01, for dates from 1970 on.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A spending cap on one scope kind: e.g. $5 a day per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpendCap {
    /// Which scope the cap applies to.
    pub scope: ScopeKind,
    /// The most that may be spent in one window.
    pub limit: Cost,
    /// The window.
    pub window: BudgetWindow,
}

/// Money set aside for one call. Pass it back to [`Budget::commit`] or
/// [`Budget::release`]; the fields are for the budget that issued it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reservation {
    /// The issuing budget's id for it.
    pub id: u64,
    /// The amount reserved on each account.
    pub amount: Cost,
    /// The accounts it was reserved on, in the issuing budget's own naming.
    pub accounts: Vec<String>,
    /// The standing of the cap closest to its limit, before this reservation, if the
    /// budget reports it. Degrade modes read it.
    pub tightest: Option<CapStatus>,
}

impl Reservation {
    /// A reservation of `amount` on `accounts`.
    pub fn new(id: u64, amount: Cost, accounts: Vec<String>) -> Self {
        Reservation {
            id,
            amount,
            accounts,
            tightest: None,
        }
    }

    /// Records the cap closest to its limit, for degrade decisions.
    #[must_use]
    pub fn with_tightest(mut self, tightest: CapStatus) -> Self {
        self.tightest = Some(tightest);
        self
    }

    /// How much of the tightest cap was used, in per cent, before this reservation
    /// (spent plus reserved by others). `0` when the budget does not say.
    pub fn used_percent(&self) -> u64 {
        self.tightest.as_ref().map_or(0, CapStatus::used_percent)
    }
}

/// One cap's standing for a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CapStatus {
    /// The scope.
    pub scope: Scope,
    /// The window.
    pub window: BudgetWindow,
    /// The cap.
    pub limit: Cost,
    /// Committed spend in the current window.
    pub spent: Cost,
    /// Reserved by calls in flight.
    pub reserved: Cost,
}

impl CapStatus {
    /// Spent plus reserved, in per cent of the limit (rounded down; 100 and more at or
    /// over the cap).
    pub fn used_percent(&self) -> u64 {
        let used = u128::from(self.spent.saturating_add(self.reserved).as_nanos());
        let limit = u128::from(self.limit.as_nanos()).max(1);
        u64::try_from(used * 100 / limit).unwrap_or(u64::MAX)
    }
}

/// What a pipeline does once the tightest spend cap of a request is used beyond a
/// threshold (see `PipelineBuilder::degrade_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Degrade {
    /// Answer with this (cheaper) catalogue model instead of the routed ones.
    CheaperModel(String),
    /// Serve cache hits; refuse misses with [`Error::BudgetExceeded`](crate::Error::BudgetExceeded).
    CacheOnly,
    /// Refuse every request, cache hits included, with
    /// [`Error::BudgetExceeded`](crate::Error::BudgetExceeded).
    Refuse,
}

impl Degrade {
    /// A stable lowercase name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Degrade::CheaperModel(_) => "cheaper_model",
            Degrade::CacheOnly => "cache_only",
            Degrade::Refuse => "refuse",
        }
    }
}

/// A spend threshold crossed, reported once per threshold and window.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetAlert {
    /// The scope.
    pub scope: Scope,
    /// The cap's window.
    pub window: BudgetWindow,
    /// The cap.
    pub limit: Cost,
    /// Committed spend in the window when the threshold was crossed.
    pub spent: Cost,
    /// The threshold crossed, in per cent of the cap.
    pub threshold_percent: u8,
}

/// Decides whether money may be spent.
///
/// # Implementing
///
/// ```
/// use std::sync::Mutex;
/// use async_trait::async_trait;
/// use tokenwise::budget::{Budget, CapStatus, Reservation};
/// use tokenwise::{Cost, Error, RequestMeta, Scope};
///
/// /// One global cap, forever.
/// #[derive(Debug)]
/// struct Wallet { limit: Cost, used: Mutex<Cost> }
///
/// #[async_trait]
/// impl Budget for Wallet {
///     async fn reserve(&self, _meta: &RequestMeta, amount: Cost) -> tokenwise::Result<Reservation> {
///         let mut used = self.used.lock().unwrap();
///         if *used + amount > self.limit {
///             return Err(Error::BudgetExceeded { scope: Scope::Global, limit: self.limit, spent: *used, retry_after: None });
///         }
///         *used += amount;
///         Ok(Reservation::new(0, amount, vec![]))
///     }
///     async fn commit(&self, r: Reservation, actual: Cost) -> tokenwise::Result<()> {
///         let mut used = self.used.lock().unwrap();
///         *used = used.saturating_sub(r.amount) + actual;
///         Ok(())
///     }
///     async fn status(&self, _meta: &RequestMeta) -> tokenwise::Result<Vec<CapStatus>> {
///         Ok(vec![])
///     }
/// }
/// ```
#[async_trait]
pub trait Budget: Send + Sync + fmt::Debug {
    /// Reserves `amount` on every cap that applies to `meta`, or refuses with
    /// [`Error::BudgetExceeded`](crate::Error::BudgetExceeded) and reserves nothing.
    async fn reserve(&self, meta: &RequestMeta, amount: Cost) -> Result<Reservation>;

    /// Replaces the reservation with the actual spend.
    async fn commit(&self, reservation: Reservation, actual: Cost) -> Result<()>;

    /// Gives the reservation back unspent.
    async fn release(&self, reservation: Reservation) -> Result<()> {
        self.commit(reservation, Cost::ZERO).await
    }

    /// The standing of every cap that applies to `meta`.
    async fn status(&self, meta: &RequestMeta) -> Result<Vec<CapStatus>>;

    /// What [`reserve`](Self::reserve) would return, decided at once, for a budget that
    /// never waits to decide (one in memory); `None`, the default, has the caller
    /// await `reserve` instead. The pipeline asks this first, which spares it a boxed
    /// future per request. An override must do exactly what `reserve` does.
    fn reserve_ready(&self, meta: &RequestMeta, amount: Cost) -> Option<Result<Reservation>> {
        let _ = (meta, amount);
        None
    }

    /// What [`commit`](Self::commit) would return for `reservation`, done at once;
    /// `None`, the default, has the caller await `commit` with the reservation (see
    /// [`reserve_ready`](Self::reserve_ready)). An override that returns `Some` has
    /// committed it; one that returns `None` has done nothing.
    fn commit_ready(&self, reservation: &Reservation, actual: Cost) -> Option<Result<()>> {
        let _ = (reservation, actual);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_windows() {
        // 2026-11-24 12:00:00 UTC
        let t = Timestamp::from_secs(1_795_521_600);
        assert_eq!(civil_from_days(t.as_secs() / 86_400), (2026, 11, 24));
        assert_eq!(
            BudgetWindow::Day.until_reset(t),
            Some(Duration::from_secs(12 * 3600))
        );
        // to 2026-12-01 00:00
        assert_eq!(
            BudgetWindow::Month.until_reset(t),
            Some(Duration::from_secs(6 * 86_400 + 12 * 3600))
        );
        let dec31 = Timestamp::from_secs(days_from_civil(2026, 12, 31) * 86_400);
        assert_eq!(
            BudgetWindow::Month.until_reset(dec31),
            Some(Duration::from_secs(86_400))
        );
        assert_ne!(
            BudgetWindow::Month.index(dec31),
            BudgetWindow::Month.index(dec31.saturating_add(Duration::from_secs(86_400)))
        );
        assert_eq!(BudgetWindow::Total.until_reset(t), None);
        for d in [0, 59, 60, 365, 10_000, 20_000, 30_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }
}
