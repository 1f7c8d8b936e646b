//! The in-memory spend-cap budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{Budget, BudgetWindow, CapStatus, Reservation, SpendCap};
use crate::clock::{Clock, default_clock};
use crate::types::{Cost, RequestMeta, ScopeKind};
use crate::{Error, Result};

/// Builds a [`MemoryBudget`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryBudgetBuilder {
    caps: Vec<SpendCap>,
    max_accounts: usize,
    clock: Option<Arc<dyn Clock>>,
}

impl MemoryBudgetBuilder {
    /// Caps spend on `scope` (each user, each org, everything, ...) at `limit` per `window`.
    pub fn cap(mut self, scope: ScopeKind, limit: Cost, window: BudgetWindow) -> Self {
        self.caps.push(SpendCap {
            scope,
            limit,
            window,
        });
        self
    }

    /// The most accounts (cap × key × window) kept (default 100,000). Accounts of past
    /// windows and idle keys with nothing spent are dropped first; when every account is
    /// live, new keys are refused with [`Error::Overloaded`].
    pub fn max_accounts(mut self, n: usize) -> Self {
        self.max_accounts = n;
        self
    }

    /// The clock windows are read from (default: [`TokioClock`](crate::TokioClock)).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the budget.
    pub fn build(self) -> Result<MemoryBudget> {
        if self.max_accounts == 0 {
            return Err(Error::Config(
                "budget: max_accounts must be at least 1".into(),
            ));
        }
        Ok(MemoryBudget {
            inner: Arc::new(Inner {
                caps: self.caps,
                accounts: Mutex::new(HashMap::new()),
                max_accounts: self.max_accounts,
                next_id: AtomicU64::new(1),
                clock: self.clock.unwrap_or_else(default_clock),
            }),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AccountKey {
    cap: usize,
    key: Box<str>,
    window: u64,
}

impl AccountKey {
    fn name(&self) -> String {
        format!("{}|{}|{}", self.cap, self.window, self.key)
    }

    fn parse(s: &str) -> Option<AccountKey> {
        let mut it = s.splitn(3, '|');
        let cap = it.next()?.parse().ok()?;
        let window = it.next()?.parse().ok()?;
        let key = it.next()?.into();
        Some(AccountKey { cap, key, window })
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Account {
    spent: Cost,
    reserved: Cost,
}

#[derive(Debug)]
struct Inner {
    caps: Vec<SpendCap>,
    accounts: Mutex<HashMap<AccountKey, Account>>,
    max_accounts: usize,
    next_id: AtomicU64,
    clock: Arc<dyn Clock>,
}

/// Spend caps in memory, per scope and calendar window (UTC), with reserve / commit.
///
/// All caps of a request are checked and reserved under one lock: a refused request
/// reserves nothing anywhere. A commit lands in the window the reservation was made
/// in, so a call that straddles midnight is charged to the day it started.
///
/// ```
/// use tokenwise::budget::{BudgetWindow, MemoryBudget};
/// use tokenwise::{Cost, ScopeKind};
/// let budget = MemoryBudget::builder()
///     .cap(ScopeKind::User, Cost::from_dollars(2), BudgetWindow::Day)
///     .cap(ScopeKind::Org, Cost::from_dollars(500), BudgetWindow::Month)
///     .build()
///     .unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

impl MemoryBudget {
    /// A builder with no caps.
    pub fn builder() -> MemoryBudgetBuilder {
        MemoryBudgetBuilder {
            caps: Vec::new(),
            max_accounts: 100_000,
            clock: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<AccountKey, Account>> {
        // Every mutation is applied after all checks, so a poisoned map is consistent.
        self.inner
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn keys_for(&self, meta: &RequestMeta) -> Vec<AccountKey> {
        let now = self.inner.clock.now();
        self.inner
            .caps
            .iter()
            .enumerate()
            .filter_map(|(cap, c)| {
                Some(AccountKey {
                    cap,
                    key: c.scope.key_of(meta)?.into(),
                    window: c.window.index(now),
                })
            })
            .collect()
    }

    /// Synchronous reserve: what [`Budget::reserve`] does, without a future.
    pub fn reserve_now(&self, meta: &RequestMeta, amount: Cost) -> Result<Reservation> {
        let keys = self.keys_for(meta);
        let now = self.inner.clock.now();
        let mut accounts = self.lock();
        for k in &keys {
            let cap = &self.inner.caps[k.cap];
            let acc = accounts.get(k).copied().unwrap_or_default();
            let committed = acc.spent.saturating_add(acc.reserved);
            if committed.saturating_add(amount) > cap.limit {
                return Err(Error::BudgetExceeded {
                    scope: cap
                        .scope
                        .scope_of(meta)
                        .unwrap_or(crate::types::Scope::Global),
                    limit: cap.limit,
                    spent: committed,
                    retry_after: cap.window.until_reset(now),
                });
            }
        }
        let new = keys.iter().filter(|k| !accounts.contains_key(*k)).count();
        if accounts.len() + new > self.inner.max_accounts {
            self.evict(&mut accounts, now);
            if accounts.len() + new > self.inner.max_accounts {
                return Err(Error::Overloaded { retry_after: None });
            }
        }
        for k in &keys {
            let acc = accounts.entry(k.clone()).or_default();
            acc.reserved = acc.reserved.saturating_add(amount);
        }
        Ok(Reservation::new(
            self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            amount,
            keys.iter().map(AccountKey::name).collect(),
        ))
    }

    /// Drops accounts of past windows and accounts with nothing spent or reserved.
    fn evict(&self, accounts: &mut HashMap<AccountKey, Account>, now: crate::clock::Timestamp) {
        let caps = &self.inner.caps;
        accounts.retain(|k, a| {
            let current = caps[k.cap].window.index(now) == k.window;
            !a.reserved.is_zero() || (current && !a.spent.is_zero())
        });
    }

    /// Synchronous commit: what [`Budget::commit`] does, without a future.
    pub fn commit_now(&self, reservation: &Reservation, actual: Cost) {
        let mut accounts = self.lock();
        for name in &reservation.accounts {
            let Some(k) = AccountKey::parse(name) else {
                continue;
            };
            let acc = accounts.entry(k).or_default();
            acc.reserved = acc.reserved.saturating_sub(reservation.amount);
            acc.spent = acc.spent.saturating_add(actual);
        }
    }

    /// The standing of every cap that applies to `meta`, synchronously.
    pub fn status_now(&self, meta: &RequestMeta) -> Vec<CapStatus> {
        let keys = self.keys_for(meta);
        let accounts = self.lock();
        keys.iter()
            .filter_map(|k| {
                let cap = &self.inner.caps[k.cap];
                let acc = accounts.get(k).copied().unwrap_or_default();
                Some(CapStatus {
                    scope: cap.scope.scope_of(meta)?,
                    window: cap.window,
                    limit: cap.limit,
                    spent: acc.spent,
                    reserved: acc.reserved,
                })
            })
            .collect()
    }

    /// Accounts currently kept.
    pub fn accounts(&self) -> usize {
        self.lock().len()
    }

    /// The caps.
    pub fn caps(&self) -> &[SpendCap] {
        &self.inner.caps
    }
}

#[async_trait]
impl Budget for MemoryBudget {
    async fn reserve(&self, meta: &RequestMeta, amount: Cost) -> Result<Reservation> {
        self.reserve_now(meta, amount)
    }

    async fn commit(&self, reservation: Reservation, actual: Cost) -> Result<()> {
        self.commit_now(&reservation, actual);
        Ok(())
    }

    async fn status(&self, meta: &RequestMeta) -> Result<Vec<CapStatus>> {
        Ok(self.status_now(meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Timestamp};
    use crate::types::Scope;
    use std::time::Duration;

    fn meta(user: &str) -> RequestMeta {
        RequestMeta {
            user: Some(user.into()),
            org: Some("acme".into()),
            ..Default::default()
        }
    }

    #[test]
    fn reserve_commit_refuse() {
        let clock = ManualClock::new(Timestamp::from_secs(1_795_521_600)); // 2026-11-24 12:00 UTC
        let b = MemoryBudget::builder()
            .cap(ScopeKind::User, Cost::from_cents(10), BudgetWindow::Day)
            .cap(ScopeKind::Org, Cost::from_cents(12), BudgetWindow::Month)
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let ann = meta("ann");
        let r = b.reserve_now(&ann, Cost::from_cents(8)).unwrap();
        // a second worst case does not fit while the first is reserved
        let e = b.reserve_now(&ann, Cost::from_cents(3)).unwrap_err();
        match e {
            Error::BudgetExceeded {
                scope,
                spent,
                retry_after,
                ..
            } => {
                assert_eq!(scope, Scope::User("ann".into()));
                assert_eq!(spent, Cost::from_cents(8));
                assert_eq!(retry_after, Some(Duration::from_secs(12 * 3600)));
            }
            other => panic!("{other:?}"),
        }
        // the actual cost was lower: the rest is released
        b.commit_now(&r, Cost::from_cents(2));
        let st = b.status_now(&ann);
        assert_eq!(st[0].spent, Cost::from_cents(2));
        assert_eq!(st[0].reserved, Cost::ZERO);
        b.reserve_now(&ann, Cost::from_cents(3))
            .map(|r| b.commit_now(&r, Cost::from_cents(3)))
            .unwrap();
        // bob is refused by the org cap (2 + 3 spent, 9 asked > 12) and reserves nothing on his own cap
        let bob = meta("bob");
        let e = b.reserve_now(&bob, Cost::from_cents(9)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::BudgetExceeded {
                    scope: Scope::Org(_),
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(b.status_now(&bob)[0].reserved, Cost::ZERO);
        // a new day resets the user cap
        clock.advance(Duration::from_secs(12 * 3600));
        b.reserve_now(&ann, Cost::from_cents(7)).unwrap();
    }

    #[test]
    fn accounts_are_bounded() {
        let clock = ManualClock::new(Timestamp::from_secs(1_795_521_600));
        let b = MemoryBudget::builder()
            .cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
            .max_accounts(2)
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        for u in ["a", "b"] {
            let r = b.reserve_now(&meta(u), Cost::from_cents(1)).unwrap();
            b.commit_now(&r, Cost::from_cents(1));
        }
        assert!(matches!(
            b.reserve_now(&meta("c"), Cost::from_cents(1)),
            Err(Error::Overloaded { .. })
        ));
        clock.advance(Duration::from_secs(86_400));
        b.reserve_now(&meta("c"), Cost::from_cents(1)).unwrap();
        assert_eq!(b.accounts(), 1);
    }
}
